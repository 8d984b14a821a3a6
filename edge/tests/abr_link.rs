//! str0m's bandwidth estimate in RTP mode, and the ABR controller on top of
//! it, over a capped link simulated in memory on virtual time
//! (`common/link.rs`). The tests print the convergence figures quoted in
//! docs/quality-abr.md.
#![allow(clippy::unwrap_used)] // test

#[path = "common/link.rs"]
mod link;

use std::time::Duration;

use cascade_edge::abr::{Controller, Rung};
use link::Sim;
use str0m::bwe::Bitrate;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn mbps(b: u64) -> f64 {
    b as f64 / 1e6
}

#[test]
fn rtp_mode_packets_carry_twcc_and_the_estimate_follows_a_cap() {
    // A sender that adapts to the estimate (up to 2.5 Mbit/s), starting at
    // 2.5 Mbit/s, behind a 1 Mbit/s bottleneck.
    let mut sim = Sim::new(Some(1_000_000), 2_500_000, Some(Bitrate::kbps(2_500)));
    sim.follow = Some(2_500_000);
    sim.run_until(secs(15));
    let c = &sim.counts;
    assert!(c.media_packets > 500, "{c:?}");
    assert_eq!(
        c.with_twcc, c.media_packets,
        "every RTP-mode packet has TWCC"
    );
    let below = sim.reached(Duration::ZERO, 0, 1_200_000);
    let mean = sim.mean_estimate(secs(10), secs(15));
    println!(
        "cap 1.0 Mbit/s, starting at 2.5: estimate ≤ 1.2 after {below:?}, mean 10–15 s {:.2} Mbit/s, dropped {}",
        mbps(mean),
        sim.down.dropped
    );
    assert!(below.is_some_and(|t| t < secs(2)), "{:?}", sim.estimates);
    assert!((700_000..=1_300_000).contains(&mean), "{:?}", sim.estimates);

    sim.set_cap(Some(3_000_000));
    sim.run_until(secs(35));
    let up = sim.reached(secs(15), 2_000_000, u64::MAX);
    let mean2 = sim.mean_estimate(secs(25), secs(35));
    println!(
        "cap raised to 3.0 at 15 s: estimate ≥ 2.0 after {up:?}, mean 25–35 s {:.2} Mbit/s",
        mbps(mean2)
    );
    assert!(mean2 > 2_000_000, "{:?}", sim.estimates);
}

#[test]
fn probing_raises_the_estimate_when_the_cap_rises() {
    // The lowest rendition (300 kbit/s) on a 1.5 Mbit/s link; we ask str0m
    // to discover 3 Mbit/s.
    let mut sim = Sim::new(
        Some(1_500_000),
        300_000,
        Some(cascade_rtc::bwe::INITIAL_ESTIMATE),
    );
    sim.run_until(secs(1));
    sim.tx
        .bwe()
        .set_bitrate(Bitrate::ZERO, Bitrate::bps(3_000_000));
    sim.run_until(secs(20));
    let mean1 = sim.mean_estimate(secs(10), secs(20));
    let c = &sim.counts;
    println!(
        "sending 0.3 Mbit/s, cap 1.5: mean estimate 10–20 s {:.2} Mbit/s; RTX/padding {} kB + {} padding packets, {} dropped at keyframes",
        mbps(mean1),
        c.rtx_bytes / 1000,
        c.padding_packets,
        sim.down.dropped,
    );
    // Hardly anything was lost: the RTX here is probing (resent packets as
    // padding), as are the padding-bit packets.
    assert!(
        c.rtx_bytes + c.padding_packets > 0,
        "str0m probes with padding in RTP mode"
    );
    assert!(
        (900_000..=2_000_000).contains(&mean1),
        "{:?}",
        sim.estimates
    );

    sim.set_cap(Some(5_000_000));
    sim.run_until(secs(40));
    let up = sim.reached(secs(20), 2_500_000, u64::MAX);
    let mean2 = sim.mean_estimate(secs(30), secs(40));
    println!(
        "cap raised to 5: estimate ≥ 2.5 after {up:?}, mean 30–40 s {:.2} Mbit/s",
        mbps(mean2)
    );
    assert!(mean2 > mean1 + 500_000, "{:?}", &sim.estimates);
}

#[test]
fn without_bwe_no_estimate_and_no_probing() {
    let mut sim = Sim::new(Some(1_000_000), 500_000, None);
    sim.run_until(secs(5));
    assert!(sim.counts.media_packets > 100);
    assert_eq!(sim.counts.padding_packets, 0);
    assert!(sim.estimates.is_empty());
    // Not negotiated, not sent: sessions without BWE stay as they were.
    assert_eq!(sim.counts.with_twcc, 0);
}

fn ladder() -> Vec<Rung> {
    [("q", 250_000), ("h", 800_000), ("f", 2_500_000)]
        .into_iter()
        .map(|(n, b)| Rung {
            name: n.into(),
            bps: b,
        })
        .collect()
}

/// A viewer as the edge builds one: str0m started at
/// `abr::start_estimate` of the lowest rendition, the controller on what
/// that carries (the lowest here), retransmissions capped.
fn abr_sim(cap: Option<u64>) -> Sim {
    let initial = cascade_edge::abr::start_estimate(250_000);
    let abr = Controller::new(ladder(), initial);
    let start = abr
        .current()
        .and_then(|n| ladder().into_iter().find(|r| r.name == n).map(|r| r.bps));
    let mut sim = Sim::new(cap, start.unwrap(), Some(Bitrate::bps(initial)));
    sim.cap_rtx(cascade_edge::viewer::rtx_ratio_cap(true));
    sim.abr = Some(abr);
    sim
}

fn settled(sim: &Sim) -> (Option<String>, Duration) {
    let last = sim.switches.last();
    (
        sim.abr
            .as_ref()
            .and_then(|a| a.current())
            .map(str::to_owned),
        last.map_or(Duration::ZERO, |s| s.0),
    )
}

#[test]
fn abr_settles_on_what_each_link_carries() {
    for (cap, want) in [(Some(400_000), "q"), (Some(1_500_000), "h"), (None, "f")] {
        let mut sim = abr_sim(cap);
        sim.run_until(secs(30));
        let (got, at) = settled(&sim);
        println!(
            "cap {:?}: settled on {got:?} at {at:?} (switches {:?})",
            cap.map(mbps),
            sim.switches
        );
        assert_eq!(got.as_deref(), Some(want), "{:?}", sim.switches);
        assert!(at <= secs(6), "settled after {at:?}");
        assert!(sim.switches.len() <= 2, "flapping: {:?}", sim.switches);
    }
}

#[test]
fn abr_goes_audio_only_below_the_lowest() {
    let mut sim = abr_sim(Some(150_000));
    sim.run_until(secs(60));
    println!("cap 0.15: switches {:?}", sim.switches);
    let first = sim
        .switches
        .iter()
        .find(|s| s.1.is_none())
        .map(|s| s.0)
        .unwrap();
    assert!(first < secs(5), "audio only after {first:?}");
    // Video tries come back (the estimate a str0m receiver feeds back
    // barely moves under 80% loss: it reports no losses between its
    // reports, unlike libwebrtc), but the up-hold doubles each time.
    let mut video = Duration::ZERO;
    let mut since = None;
    for (t, to) in sim.switches.iter().filter(|s| s.0 >= first) {
        match (to, since) {
            (Some(_), None) => since = Some(*t),
            (None, Some(s)) => {
                video += *t - s;
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        video += secs(60) - s;
    }
    println!(
        "video {video:?} of the {:?} after the first audio-only",
        secs(60) - first
    );
    assert!(video < secs(12), "{:?}", sim.switches);
    assert!(sim.switches.len() <= 8, "{:?}", sim.switches);
}

#[test]
fn abr_climbs_when_the_cap_rises_and_drops_when_it_falls() {
    let mut sim = abr_sim(Some(400_000));
    sim.run_until(secs(15));
    assert_eq!(settled(&sim).0.as_deref(), Some("q"));
    sim.set_cap(Some(1_500_000));
    sim.run_until(secs(45));
    let (got, at) = settled(&sim);
    println!("cap 0.4 → 1.5 at 15 s: now {got:?}, switched at {at:?}");
    assert_eq!(got.as_deref(), Some("h"), "{:?}", sim.switches);
    let n = sim.switches.len();
    sim.set_cap(Some(400_000));
    sim.run_until(secs(55));
    let down = sim.switches.get(n).cloned();
    println!("cap 1.5 → 0.4 at 45 s: {down:?}");
    let down = down.unwrap();
    assert_eq!(down.1.as_deref(), Some("q"));
    assert!(
        down.0 - secs(45) < secs(2),
        "down after {:?}",
        down.0 - secs(45)
    );
}

#[test]
fn abr_drops_from_the_top_to_what_a_narrow_link_delivers_within_two_seconds() {
    // Settled on 'f' behind 4 Mbit/s, the link narrows to 400 kbit/s: the
    // drop-tail queue fills and holds a constant delay, so the delay-based
    // estimate lags; the receiver's loss × what was sent says at once
    // what the link carries.
    let mut sim = abr_sim(Some(4_000_000));
    sim.run_until(secs(20));
    assert_eq!(settled(&sim).0.as_deref(), Some("f"), "{:?}", sim.switches);
    let n = sim.switches.len();
    sim.set_cap(Some(400_000));
    sim.run_until(secs(30));
    let after: Vec<_> = sim.switches[n..].to_vec();
    println!("cap 4 → 0.4 at 20 s: {after:?}");
    println!(
        "receiver reports from 19 s (time, loss): {:?}",
        sim.losses
            .iter()
            .filter(|l| l.0 >= secs(19))
            .collect::<Vec<_>>()
    );
    let first = after.first().cloned().unwrap();
    // The figure: the first switch down within 2 s of the drop.
    assert!(
        first.0 - secs(20) < secs(2),
        "first switch after {:?}",
        first.0 - secs(20)
    );
    // And on what the link carries soon after, never audio only (the
    // lowest fits 400 kbit/s).
    let low = after
        .iter()
        .find(|s| s.1.as_deref() == Some("q"))
        .unwrap_or_else(|| panic!("never on q: {after:?}"));
    assert!(
        low.0 - secs(20) < secs(3),
        "on q after {:?}",
        low.0 - secs(20)
    );
    assert!(after.iter().all(|s| s.1.is_some()), "audio only: {after:?}");
}

/// What BWE adds to a viewer's cost, in this debug build (the criterion
/// bench `edge/benches/abr.rs` gives optimized figures): sender-side str0m
/// time per media packet at 2.5 Mbit/s on an uncapped link, without and with.
#[test]
fn bwe_sender_cost_per_packet() {
    // Interleaved runs, the fastest of each kept: the machine is shared.
    let mut best = [f64::MAX; 2];
    let mut wakes = [0u64; 2];
    let mut batch = [0f64; 2];
    for _ in 0..5 {
        for (k, bwe) in [None, Some(Bitrate::kbps(2_500))].into_iter().enumerate() {
            let mut sim = Sim::new(None, 2_500_000, bwe);
            sim.run_until(secs(2));
            let (cpu0, n0, w0) = (sim.tx_cpu, sim.counts.media_packets, sim.tx_wakes);
            let (b0, o0) = (sim.tx_bursts, sim.tx_rtp_out);
            sim.run_until(secs(12));
            let n = sim.counts.media_packets - n0;
            assert!(n > 1000);
            let us = (sim.tx_cpu - cpu0).as_secs_f64() * 1e6 / n as f64;
            best[k] = best[k].min(us);
            wakes[k] = (sim.tx_wakes - w0) / 10;
            batch[k] = (sim.tx_rtp_out - o0) as f64 / (sim.tx_bursts - b0).max(1) as f64;
        }
    }
    println!(
        "sender str0m time per media packet at 2.5 Mbit/s: {:.2} µs without BWE, {:.2} µs with \
         (×{:.2}); sender timeout calls per second {} → {}; RTP datagrams per drain {:.1} → {:.1}",
        best[0],
        best[1],
        best[1] / best[0],
        wakes[0],
        wakes[1],
        batch[0],
        batch[1]
    );
}

/// A switch down empties the viewer's send buffers without negotiation
/// (`viewer::flush_send_buffers`, on str0m's behaviour when a media stops
/// sending): the queued packets are gone, the direction is as before, and
/// what is written next goes out.
#[test]
fn flushing_empties_the_send_queue_and_media_flows_on() {
    use cascade_edge::viewer::flush_send_buffers;
    use str0m::media::Direction;

    // Estimated and paced at ~1.1 × what a 300 kbit/s link carries, while
    // 2.5 Mbit/s is written (no lag skip here): the queue grows.
    let mut sim = Sim::new(Some(300_000), 2_500_000, Some(Bitrate::kbps(300)));
    sim.cap_rtx(Some(cascade_edge::viewer::RTX_RATIO_CAP));
    sim.run_until(secs(2));
    let queue = |sim: &mut Sim| {
        let mut d = sim.tx.direct_api();
        let tx = d.stream_tx_by_mid(sim.mid, None).unwrap();
        (tx.ssrc(), tx.queue_info().map_or(0, |q| q.packet_count()))
    };
    let (ssrc, before) = queue(&mut sim);
    assert!(before > 50, "only {before} packets queued");
    let dropped = flush_send_buffers(&mut sim.tx, sim.mid, Some(ssrc), true);
    assert_eq!(dropped, Some(before as u64));
    assert_eq!(
        sim.tx.media(sim.mid).map(|m| m.direction()),
        Some(Direction::SendOnly)
    );
    // 100 ms later the queue holds about what was written since (~30
    // packets at 2.5 Mbit/s), not the backlog.
    let sent_before = sim.counts.media_packets;
    sim.run_until(secs(2) + Duration::from_millis(100));
    let (_, after) = queue(&mut sim);
    assert!(
        after < 45,
        "{after} packets queued after the flush (was {before})"
    );
    sim.run_until(secs(3));
    let sent = sim.counts.media_packets - sent_before;
    println!("flush: {before} packets queued → {after} 100 ms later; {sent} media packets sent in the next 0.9 s");
    assert!(sent > 20, "only {sent} media packets after the flush");
}
