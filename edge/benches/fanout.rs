//! Fan-out cost on the edge's hot path, in memory (no sockets):
//! - `packetize/h264_*`: one H.264 access unit → RTP payloads (done once per
//!   frame per track on a node, whatever the number of viewers);
//! - `fanout/N`: packetize one ~10 KB frame once, then write its payloads to N
//!   connected viewer sessions (str0m RTP mode, `StreamTx::write_rtp` with the
//!   shared `Arc<[u8]>`, SRTP included) and drain each session's output until
//!   its next timeout, as a shard does. Throughput is per packet written, so
//!   criterion's "elem/s" is packets per second per core.
//!
//! Sessions are real str0m pairs (ICE-lite server, full-ICE client) whose
//! ICE + DTLS handshakes ran in memory before measuring; the server side is
//! configured as the edge configures viewers (RTP mode, RTX cache size).
//! Before measuring each N, the bench prints the resident memory per viewer
//! session (RSS growth / N, server sessions only after the clients are
//! dropped, with the RTX caches filled).
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_edge::fanout::packetize_frame;
use cascade_edge::packetize::Packetizer;
use cascade_edge::viewer::{RTX_CACHE_AGE, RTX_CACHE_PACKETS};
use cascade_origin::catalog::Codec;
use cascade_origin::frame::Frame;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use str0m::change::SdpOffer;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// An access unit like a 2.5 Mbit/s 30 fps P-frame: SPS/PPS-free, one 10 KB slice.
fn access_unit(len: usize) -> Bytes {
    let mut v = vec![0, 0, 0, 1, 0x41];
    v.extend((0..len).map(|i| (i % 251) as u8 + 1));
    Bytes::from(v)
}

struct Viewer {
    server: Rtc,
    mid: Mid,
    pt: Pt,
    seq: u64,
    /// Virtual time the handshake reached (str0m must never see time go back).
    clock: Instant,
}

/// Delivers every pending datagram of `from` to `to`; returns the earliest timeout.
fn pump(from: &mut Rtc, to: &mut Rtc, now: Instant) -> Instant {
    loop {
        match from.poll_output().unwrap() {
            Output::Timeout(t) => return t,
            Output::Transmit(t) => {
                let r = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).unwrap();
                to.handle_input(Input::Receive(now, r)).unwrap();
            }
            Output::Event(_) => {}
        }
    }
}

fn connected_viewer(i: u16, t0: Instant) -> Viewer {
    let mut client = RtcConfig::new().clear_codecs().enable_h264(true).build(t0);
    let caddr: SocketAddr = ([127, 0, 0, 1], 20_000 + i).into();
    client.add_local_candidate(Candidate::host(caddr, "udp").unwrap());
    let mut api = client.sdp_api();
    let mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let offer_sdp = offer.to_sdp_string();

    let mut server = Rtc::builder()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_h264(true)
        .build(t0);
    server.add_local_candidate(Candidate::host(([127, 0, 0, 1], 10_000).into(), "udp").unwrap());
    let answer = server
        .sdp_api()
        .accept_offer(SdpOffer::from_sdp_string(&offer_sdp).unwrap())
        .unwrap();
    let answer_sdp = answer.to_sdp_string();
    client.sdp_api().accept_answer(pending, answer).unwrap();
    // The first H.264 payload type the answer kept.
    let pt = answer_sdp
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("a=rtpmap:")?;
            let (pt, enc) = rest.split_once(' ')?;
            enc.starts_with("H264/")
                .then(|| pt.parse::<u8>().ok())
                .flatten()
        })
        .unwrap();

    let mut now = t0;
    let mut connected = false;
    for _ in 0..2000 {
        let a = pump(&mut client, &mut server, now);
        let b = loop {
            match server.poll_output().unwrap() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let r =
                        Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).unwrap();
                    client.handle_input(Input::Receive(now, r)).unwrap();
                }
                Output::Event(Event::Connected) => connected = true,
                Output::Event(_) => {}
            }
        };
        if connected {
            break;
        }
        now = a.min(b).max(now + Duration::from_millis(1));
        client.handle_input(Input::Timeout(now)).unwrap();
        server.handle_input(Input::Timeout(now)).unwrap();
    }
    assert!(connected, "in-memory handshake did not complete");
    drop(client);
    server
        .direct_api()
        .stream_tx_by_mid(mid, None)
        .unwrap()
        .set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, None);
    Viewer {
        server,
        mid,
        pt: Pt::from(pt),
        seq: 1,
        clock: now,
    }
}

/// Resident set size of this process, KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("packetize");
    for len in [1_000usize, 10_000, 100_000] {
        let au = access_unit(len);
        let mut p = Packetizer::new(Codec::H264).unwrap();
        let packets = p.packetize(&au, false).len() as u64;
        g.throughput(Throughput::Elements(packets));
        g.bench_with_input(BenchmarkId::new("h264", len), &au, |b, au| {
            b.iter(|| p.packetize(au, false));
        });
    }
    g.finish();

    let t0 = Instant::now();
    let au = access_unit(10_000);
    let frame = Frame {
        payload: au,
        pts: 0,
        dts: 0,
        keyframe: false,
        ingest_us: 0,
    };
    let mut g = c.benchmark_group("fanout");
    g.sample_size(20);
    for n in [1u16, 10, 100, 500] {
        let before = rss_kib();
        let mut viewers: Vec<Viewer> = (0..n).map(|i| connected_viewer(i, t0)).collect();
        let connected_kib = rss_kib().saturating_sub(before);
        let base = viewers.iter().map(|v| v.clock).max().unwrap_or(t0);
        let started = Instant::now();
        let mut p = Packetizer::new(Codec::H264).unwrap();
        let packets = p.packetize(&frame.payload, false).len() as u64;
        g.throughput(Throughput::Elements(packets * u64::from(n)));
        let mut ts = 0u64;
        let mut send_frame = |viewers: &mut Vec<Viewer>| {
            ts += 3000;
            let now = base + started.elapsed();
            let pf = packetize_frame(&mut p, &frame, ts, t0, 90_000);
            for v in viewers.iter_mut() {
                let mut api = v.server.direct_api();
                let tx = api.stream_tx_by_mid(v.mid, None).unwrap();
                for pl in &pf.payloads {
                    tx.write_rtp(
                        RtpWrite::new(
                            v.pt,
                            v.seq.into(),
                            (ts & 0xffff_ffff) as u32,
                            pf.wallclock,
                            pl.data.clone(),
                        )
                        .marker(pl.marker)
                        .nackable(true),
                    );
                    v.seq += 1;
                }
                // Drain as a shard does: transmits are dropped (no socket).
                let mut immediate = 0;
                loop {
                    match v.server.poll_output().unwrap() {
                        Output::Timeout(t) if t <= now && immediate < 64 => {
                            immediate += 1;
                            v.server.handle_input(Input::Timeout(now)).unwrap();
                        }
                        Output::Timeout(_) => break,
                        Output::Transmit(t) => {
                            std::hint::black_box(&t.contents);
                        }
                        Output::Event(_) => {}
                    }
                }
            }
        };
        // 2 s of 30 fps video fills every RTX cache before measuring memory.
        for _ in 0..60 {
            send_frame(&mut viewers);
        }
        eprintln!(
            "fanout/{n}: resident memory per viewer session: {} KiB after connect, {} KiB with the RTX cache full",
            connected_kib / u64::from(n),
            rss_kib().saturating_sub(before) / u64::from(n)
        );
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| send_frame(&mut viewers));
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
