//! A WHEP viewer's session handler: on connect it starts from the feed's
//! cached group (fast start), then on every shard wake drains its feed
//! receivers and writes the shared RTP payloads with its own sequence
//! numbers and timestamp offset (str0m RTP mode, no per-viewer copy).
//!
//! Fast start: the cached group's timestamps are compressed so the newest
//! cached frame keeps its live timestamp and older ones sit 1 ms apart before
//! it; the receiver decodes the backlog at once and plays live from then on,
//! instead of anchoring its playout clock on the old keyframe (which would
//! add the group's age to its latency for the whole session). The cached
//! group is paced (`BACKLOG_PACKETS_PER_WAKE`) so it does not overflow
//! receive buffers. Measured on loopback (tests/whep_play.rs, 3 s GOP,
//! joining 2.6 s in): first frame 5–15 ms after the POST; 79 compressed
//! frames put the receiver's first-frame anchor ~110 ms behind live, where
//! uncompressed timestamps would put it ~2.6 s behind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fanout::{Hub, Member, PacketizedFrame};
use crate::metrics as m;
use cascade_origin::catalog::Kind;
use cascade_origin::registry::Subscriber;
use cascade_rtc::session::CloseReason;
use cascade_rtc::{Ctx, Flow, Handler, Waker};
use str0m::media::{Mid, Pt};
use str0m::rtp::RtpWrite;
use str0m::rtp::Ssrc;
use str0m::Event;

pub mod control;
mod cursor;
pub mod switch;

use control::{Control, Registered, Status};
use cursor::{Cursor, Next};
use switch::{Command, Direction, Rung, Source, Switch, Verdict};

/// Packets str0m may hold unsent for one stream before the viewer counts as
/// lagging: ~1 s of 2.5 Mbit/s video. Beyond it we skip to a keyframe rather
/// than grow an unbounded queue.
pub const MAX_QUEUED_PACKETS: usize = 256;
/// For a viewer whose video str0m paces (bandwidth estimation on): the
/// oldest unsent packet may wait this long before the viewer counts as
/// lagging. Paced at ~1.1× an estimate that just fell to 0.4 Mbit/s, 256
/// packets of 720p are 5–6 s of queue: a rendition switch down waited
/// behind them (Chromium: a 4.5 s freeze on a 3 → 0.4 Mbit/s drop). A
/// 720p keyframe paced on a link that carries it takes ~0.2 s.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(500);
/// [`MAX_QUEUE_DELAY`] during an up-switch's grace (`abr::UP_GRACE`): the
/// new rendition's keyframe makes str0m cut its estimate (to 1.4 Mbit/s
/// from 5 Mbit/s on a 4 Mbit/s link, Chromium), its pacer then lets out
/// ~1.1 × that while the estimate climbs back over ~2 s, and the 720p
/// queued behind the keyframe passed 0.5 s: the viewer skipped to the next
/// keyframe and stepped down with the link carrying 720p twice over (2 of
/// 12 climbs in tests/browser_abr.rs). A link that does not carry the new
/// rendition loses packets, and loss still takes the viewer down at once.
///
/// The same limit holds on the lowest rendition during start-up
/// (`abr::Controller::starting_on_the_lowest`): str0m's start-up probes
/// overfill a slow link's queue and it cuts its estimate under the lowest
/// rendition's own rate for a second (Chromium behind 400 kbit/s: 0.52 →
/// 0.17 Mbit/s in 0.6 s, back to 0.32 at 1.6 s). Its pacer then needs
/// ~0.85 s for a 20 kB 180p keyframe; at 0.5 s the viewer skipped twice in
/// 0.25 s and froze for 0.86 s with nothing lower to step down to
/// (tests/browser_abr.rs, the settle case, session 13).
pub const UP_GRACE_QUEUE_DELAY: Duration = Duration::from_millis(1500);
/// Per-viewer retransmission cache: packets and age. 128 packets ≈ 0.45 s of
/// 2.5 Mbit/s video, enough for NACK repair at RTTs up to ~300 ms. Measured
/// (benches/fanout.rs, 500 sessions): ~0.45 KiB per cached packet, so 128
/// keeps a viewer at ~185 KiB resident (str0m's default 1,000: > 500 KiB;
/// 512: ~350 KiB; 0: ~126 KiB). Payloads are shared `Arc`s, never copied.
pub const RTX_CACHE_PACKETS: usize = 128;
/// Retransmissions' share of a viewer's video bytes above which str0m drops
/// queued resends (`StreamTx::set_rtx_cache`), for sessions with bandwidth
/// estimation. Without a cap, a link that suddenly carries less than the
/// rendition got every lost packet NACKed and resent, and resent again: in
/// `edge/tests/abr_link.rs` a 4 → 0.4 Mbit/s drop drew 1.7–2.9 Mbit/s of
/// retransmissions into the 0.4 Mbit/s link, which then lost even the
/// lowest rendition and went audio only. 0.15 is str0m's default (libwebrtc
/// bounds resends by the estimate for the same reason). Sessions without
/// an estimator keep resending everything asked for, as before (and pay
/// nothing for the byte history the cap keeps).
pub const RTX_RATIO_CAP: f32 = 0.15;

/// The retransmission cap for a session with (`true`) or without an
/// estimator: see [`RTX_RATIO_CAP`].
pub fn rtx_ratio_cap(estimated: bool) -> Option<f32> {
    estimated.then_some(RTX_RATIO_CAP)
}

/// Age limit of the retransmission cache: older packets are useless to a
/// receiver whose jitter buffer has moved on.
pub const RTX_CACHE_AGE: Duration = Duration::from_secs(1);
/// At most one keyframe request per viewer per this interval.
const VIEWER_KEYFRAME_INTERVAL: Duration = Duration::from_secs(1);
/// Backlog packets written per wake (frames arrive every 20–33 ms, each a
/// wake, so this paces the cached group at ~2,000 packets/s ≈ 17 Mbit/s).
/// Sent at once, a cached GOP (hundreds of packets) overflows receive
/// buffers on the way: 212 KB of `rmem` holds ~90 full-size datagrams, and
/// on loopback 64 per wake still lost packets while 16–24 lost none.
const BACKLOG_PACKETS_PER_WAKE: usize = 24;

/// How much of a viewer's start estimate a fast-start group may take (ABR
/// viewers only, in milliseconds of it). A cached group goes out faster
/// than real time, and the start estimate is a guess, not the link: a
/// 64 kB group (1 s of a 0.5 Mbit/s start) into a 400 kbit/s link with a
/// 300 ms queue lost packets and froze the picture (Chromium, measured).
/// 300 ms passes a group that is little more than its keyframe; anything
/// longer starts live at a fresh keyframe, which a viewer waits about as
/// long for.
const FAST_START_MS: u64 = 300;

/// Live viewers on this node, for the session limit; one slot per viewer.
pub struct Slot {
    count: Arc<AtomicUsize>,
}

impl Slot {
    /// Takes a slot unless `max` (0 = unlimited) are taken.
    pub fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!(m::VIEWERS).increment(1.0);
        Some(Self {
            count: count.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::VIEWERS).decrement(1.0);
    }
}

fn kind_label(video: bool) -> &'static str {
    if video {
        "video"
    } else {
        "audio"
    }
}

/// One outgoing track of a viewer.
pub struct Out {
    mid: Mid,
    /// The str0m stream's SSRC, learnt at the first write: looking a stream up by
    /// SSRC is one hash probe, by mid a scan comparing trimmed strings (3% of a
    /// shard at 300 viewers in perf, 1.5% after; no end-to-end change beyond noise
    /// in an A/B, docs/benchmarks.md).
    ssrc: Option<Ssrc>,
    pt: Pt,
    video: bool,
    member: Member,
    cursor: Cursor,
    seq: u64,
    ts_offset: u64,
    last_keyframe_request: Option<Instant>,
    /// A keyframe request the per-viewer interval held back, and its cause:
    /// it goes out once the interval has passed, unless a keyframe came
    /// first. Dropping it left a viewer that lagged twice within a second
    /// (a switch down behind a queue) waiting for the publisher's next
    /// natural keyframe: Chromium froze 3 s in tests/browser_abr.rs.
    keyframe_owed: Option<&'static str>,
    frames: u64,
    packets: u64,
    /// Metric handles resolved once: a lookup per wake per viewer would cost
    /// more than the counting.
    frames_out: metrics::Counter,
    packets_out: metrics::Counter,
    /// Video only: ingest → handed to this session (live frames, not backlog).
    egress_delay: Option<metrics::Histogram>,
    /// Video of a stream with renditions: the switching machinery. `None`
    /// otherwise, so single-rendition streams run the path they always did.
    renditions: Option<Box<Renditions>>,
    /// Video of a stream that had no renditions when the viewer joined:
    /// what it takes to gain them if the stream does later (see [`Late`]).
    late: Option<Box<Late>>,
}

/// A simulcast publisher's stream goes live with one plain track when only
/// one layer came within the ingest's wait (1.5 s; seen under load); its
/// other layers make it a stream with renditions seconds later. A viewer
/// that joined in between watches the catalog (one atomic load per wake)
/// and gains the switching machinery then, so Auto moves it up as it does
/// for viewers who came later. Its session has no bandwidth estimator (that
/// is set at the offer), so the choice is the best flowing rendition or
/// the layer endpoint's; OvenPlayer's menu, sent at the start, stays empty.
struct Late {
    catalog: tokio::sync::watch::Receiver<cascade_origin::catalog::Catalog>,
    hub: Arc<Hub>,
    waker: Waker,
    controls: Arc<control::Controls>,
    id: cascade_rtc::session::SessionId,
    /// The session's estimator start, when it has one (the stream said
    /// renditions were coming: [`bwe_start`]).
    bwe_start: Option<u64>,
}

/// A video track's renditions as one viewer gets them.
struct Renditions {
    switch: Switch,
    hub: Arc<Hub>,
    waker: Waker,
    clock: u32,
    /// The rendition being switched to: its feed and this viewer's cursor.
    pending: Option<(Member, Cursor)>,
    control: Arc<Control>,
    _registered: Registered,
    /// The stream's catalog: a rendition added later (a late simulcast
    /// layer) joins the ladder; one atomic load per wake to notice.
    catalog: tokio::sync::watch::Receiver<cascade_origin::catalog::Catalog>,
    codec: cascade_origin::catalog::Codec,
    /// Counts this viewer on the current rendition's track (`/api/streams`).
    watching: Option<cascade_origin::track::Watch>,
    /// `cascade_edge_rendition_viewers{rendition}` of the current one.
    gauge: Option<metrics::Gauge>,
    /// The automatic choice: str0m's bandwidth estimate in, a rendition
    /// out (`crate::abr`). `None` when the session has no estimator.
    abr: Option<Abr>,
}

/// A viewer's ABR controller and what the shell remembers for it.
struct Abr {
    controller: crate::abr::Controller,
    /// str0m's starting estimate for this viewer, bit/s: what its first
    /// moment of video may cost (see [`FAST_START_MS`]).
    start_bps: u64,
    /// The target was Auto at the last wake: on a return to Auto the
    /// controller is told what is being sent, and decides again from there.
    auto: bool,
    /// The video's rate sent between receiver reports.
    sent: crate::abr::SentMeter,
    /// The video's loss between receiver reports, less what the edge
    /// dropped itself.
    loss: crate::abr::LossMeter,
}

/// What sending a rendition costs, bit/s: its nominal bitrate, else a
/// guess from its picture (0.1 bit per pixel per frame), else 1 Mbit/s.
pub(crate) fn rung_bps(r: &Rung) -> u64 {
    if r.bitrate_kbps > 0 {
        return u64::from(r.bitrate_kbps) * 1000;
    }
    let pixels = u64::from(r.width) * u64::from(r.height);
    let fps = u64::from(if r.framerate > 0 { r.framerate } else { 30 });
    if pixels > 0 {
        (pixels * fps / 10).max(64_000)
    } else {
        1_000_000
    }
}

/// How a better rendition's cost is bounded below by the one under it:
/// that one's cost × (pixel ratio)^this. Encoders spend fewer bits per pixel
/// on bigger pictures, and bitrate ∝ pixels^0.75 is the usual rule of thumb:
/// ×2.83 for each doubling of both sides. Real ladders sit above it
/// (`--abr-ladder 720p:2500,360p:800,180p:250`: ×3.1 and ×3.2; Chromium's
/// simulcast layers once settled: ×3.5–5), so it only bites on a rate that
/// is implausibly low for the picture.
pub(crate) const PIXEL_COST_EXPONENT: f64 = 0.75;

/// The controller's view of a ladder (best first, as [`ladder`] gives it):
/// names and costs, each rendition costing more than every lower one. The
/// controller orders renditions by cost, and live rates can cross: a
/// simulcast encoder ramps its layers up at different paces and starves
/// one under load, and an unlimited Chromium viewer on 360p was "switched
/// up" to 180p when 180p measured more than 360p for a moment, and stayed
/// there 7 s (tests/browser_abr.rs, the settle case). A better rendition
/// that measures less is priced just above the one below it: it fits
/// wherever that one does, which is true while its rate is that low.
///
/// A bigger picture also costs at least the one below it scaled by
/// [`PIXEL_COST_EXPONENT`]. The live rate the ingest publishes (over 2 s,
/// at most every 5 s) trails a layer that is still ramping up: a Chromium
/// publisher's 720p layer measured 1.1–1.3 Mbit/s when the viewers joined
/// and made 2.0–2.3 seconds later, and the viewer behind 1.5 Mbit/s was
/// sent to it (estimate 1.40 Mbit/s), as was the unlimited one at 1.6
/// Mbit/s, whose send queue then lagged behind str0m's pacer until it
/// stepped down (tests/browser_abr.rs, the settle case, session 13). With
/// 360p at 0.45–0.52 Mbit/s the floor prices that 720p at 1.27–1.47.
/// A top layer that truly costs little (a still picture) is priced high
/// for its size: a viewer needs more estimate to get it, nothing worse.
fn abr_ladder(ladder: &[Rung]) -> Vec<crate::abr::Rung> {
    // (cost, pixels) of the rendition below the one being priced.
    let mut below: Option<(u64, u64)> = None;
    let mut rungs: Vec<crate::abr::Rung> = ladder
        .iter()
        .rev()
        .map(|r| {
            let pixels = u64::from(r.width) * u64::from(r.height);
            let mut bps = rung_bps(r);
            if let Some((cost, px)) = below {
                bps = bps.max(cost.saturating_add(1));
                if px > 0 && pixels > px {
                    let ratio = pixels as f64 / px as f64;
                    bps = bps.max((cost as f64 * ratio.powf(PIXEL_COST_EXPONENT)) as u64);
                }
            }
            below = Some((bps, pixels));
            crate::abr::Rung {
                name: r.name.clone(),
                bps,
            }
        })
        .collect();
    rungs.reverse();
    rungs
}

/// Estimation needs the viewer's transport-wide congestion control
/// feedback. Whether `sdp` (the viewer's offer, or its answer to the edge's
/// offer: `side`) keeps it; when it does not and the session wanted
/// estimation (`wanted`), counts and logs that the viewer's Auto plays the
/// best rendition that flows, as it does with estimation off.
pub(crate) fn keeps_feedback(wanted: bool, sdp: &str, side: &str) -> bool {
    let twcc = crate::sdp::has_twcc(sdp);
    if wanted && !twcc {
        metrics::counter!(m::ABR_NO_FEEDBACK).increment(1);
        tracing::info!(
            side,
            "no transport-wide congestion control: no bandwidth estimate, Auto plays the best rendition that flows"
        );
    }
    twcc
}

/// [`bwe_start`] for a viewer of `sub`'s default video track.
pub fn bwe_start_of(sub: &Subscriber) -> Option<u64> {
    let catalog = sub.catalog();
    let codec = catalog.by_name(cascade_origin::catalog::VIDEO)?.codec;
    bwe_start(&catalog, codec)
}

/// For a stream whose video has renditions in `codec`: str0m's starting
/// estimate for a viewer ([`crate::abr::start_estimate`] of the lowest
/// rendition): a start low enough that a slow link never gets a top
/// rendition's keyframe it cannot carry (the overshoot a start on the top
/// rendition caused: docs/quality.md, "Measured with Chromium"). `None`:
/// nothing to choose from, so the session gets no estimator at all.
///
/// A default video track that is a rendition alone counts too: its
/// publisher has more coming (an RTMP `--abr-ladder` marks the source so
/// while ffmpeg starts, `cascade_ingest::ladder::amend`), and str0m gives a
/// session an estimator only when it is created: a viewer who joined in
/// that gap had none for the rest of its session.
pub fn bwe_start(
    catalog: &cascade_origin::catalog::Catalog,
    codec: cascade_origin::catalog::Codec,
) -> Option<u64> {
    // What `ladder` keeps, less its "two or more": the default track must
    // be a rendition in `codec`; the lowest of them sets the start.
    let video = catalog.by_name(cascade_origin::catalog::VIDEO)?;
    if video.codec != codec || video.rendition.is_none() {
        return None;
    }
    let low = catalog
        .renditions()
        .filter(|t| t.codec == codec)
        .filter_map(rung_of)
        .map(|r| rung_bps(&r))
        .min()?;
    Some(crate::abr::start_estimate(low))
}

impl Renditions {
    /// Joins rung `i`'s feed as the pending rendition, live frames only,
    /// and asks upstream for a keyframe of it.
    fn join(&mut self, i: usize, sub: &Subscriber) -> bool {
        let Some(rung) = self.switch.renditions().get(i) else {
            return false;
        };
        let Some(member) = self.hub.join(sub, &rung.track, &self.waker) else {
            return false;
        };
        let Some((_, rx)) = member.feed().subscribe() else {
            return false;
        };
        let mut cursor = Cursor::new(self.clock, true);
        cursor.start_live(rx);
        member.feed().request_keyframe();
        metrics::counter!(m::KEYFRAME_REQUESTS, "cause" => "switch").increment(1);
        self.pending = Some((member, cursor));
        true
    }

    /// Viewer counts follow the rendition being sent.
    fn count(&mut self, sub: &Subscriber) {
        if let Some(g) = self.gauge.take() {
            g.decrement(1.0);
        }
        self.watching = None;
        match self.switch.current() {
            Some(r) => {
                self.watching = sub.watch(&r.track);
                let rank = self
                    .switch
                    .renditions()
                    .iter()
                    .position(|x| x.track == r.track)
                    .unwrap_or(0);
                let g = metrics::gauge!(m::RENDITION_VIEWERS, "rendition" => rank_label(rank));
                g.increment(1.0);
                self.gauge = Some(g);
            }
            None => {
                let g = metrics::gauge!(m::AUDIO_ONLY_VIEWERS);
                g.increment(1.0);
                self.gauge = Some(g);
            }
        }
    }

    /// Runs the ABR controller: its choice becomes the Auto target (ignored
    /// while the viewer has chosen by hand), its bitrates go to str0m's
    /// estimator (probing toward the next rendition up).
    fn drive_abr(&mut self, ctx: &mut Ctx<'_>) {
        let Some(a) = &mut self.abr else {
            return;
        };
        let auto = *self.switch.target() == switch::Target::Auto;
        if auto && !a.auto {
            // First wake, or back to Auto after a manual choice: the
            // controller kept following the estimate meanwhile (its
            // switches were not applied), so its own choice is the one the
            // link carries now: go there at once rather than climbing
            // again from what the viewer picked by hand.
            match a.controller.current().map(str::to_owned) {
                Some(name) => self.switch.set_auto_pick(Some(&name)),
                None => self.switch.set_auto_audio_only(),
            }
        }
        a.auto = auto;
        a.controller.handle_timeout(ctx.now);
        while let Some(o) = a.controller.poll_output() {
            match o {
                crate::abr::Output::Switch(s) => {
                    metrics::histogram!(m::ABR_ESTIMATE).record(s.estimate_bps as f64);
                    let direction = if s.up { "up" } else { "down" };
                    metrics::counter!(m::ABR_DECISIONS, "direction" => direction, "cause" => s.cause.as_str())
                        .increment(1);
                    tracing::debug!(
                        session = ?ctx.id,
                        to = s.to.as_deref().unwrap_or("audio only"),
                        up = s.up,
                        cause = s.cause.as_str(),
                        estimate_bps = s.estimate_bps,
                        // The costs the estimate was held against.
                        ladder = ?a.controller.ladder().iter().map(|r| (&r.name, r.bps)).collect::<Vec<_>>(),
                        applied = auto,
                        "abr decision"
                    );
                    if !auto {
                        continue;
                    }
                    if s.avoids_freeze() {
                        metrics::counter!(m::ABR_FREEZES_AVOIDED).increment(1);
                    }
                    match s.to.as_deref() {
                        Some(name) => self.switch.set_auto_pick(Some(name)),
                        None => self.switch.set_auto_audio_only(),
                    }
                }
                crate::abr::Output::Bitrate { minimum, desired } => {
                    tracing::trace!(session = ?ctx.id, minimum, desired, "bwe bitrate");
                    ctx.rtc.bwe().set_bitrate(
                        str0m::bwe::Bitrate::bps(minimum),
                        str0m::bwe::Bitrate::bps(desired),
                    );
                }
                crate::abr::Output::Reset { bps } => {
                    metrics::counter!(m::ABR_RESTARTS).increment(1);
                    tracing::debug!(session = ?ctx.id, bps, "bwe restarted: re-probing stagnated");
                    ctx.rtc.bwe().reset(str0m::bwe::Bitrate::bps(bps));
                }
            }
        }
    }

    fn report(&self) {
        self.control.report(Status {
            rendition: self.switch.current().map(|r| r.name.clone()),
            target: self.switch.target().clone(),
        });
    }
}

impl Drop for Renditions {
    fn drop(&mut self) {
        if let Some(g) = self.gauge.take() {
            g.decrement(1.0);
        }
    }
}

/// Empties what str0m holds for sending on `mid` (its paced send queue,
/// resend cache and owed resends; see `Out::flush_video` for why), without
/// any negotiation: str0m empties a stream's send buffers when its media
/// stops sending, and `SdpApi::set_direction` takes effect locally at once,
/// so the direction goes to inactive and back in one call and the changes
/// are dropped without `apply` (the remote sees a gap in sequence numbers,
/// nothing else). With `estimated`, the resend cap's byte history restarts
/// too (a cap of `None` drops it; str0m keeps it across cap changes).
/// Returns the packets the pacer last saw queued on `ssrc` (a snapshot a
/// few ms old: what the receiver will count as lost), or `None` when the
/// media is not sending. `edge/tests/abr_link.rs` checks the effect.
pub fn flush_send_buffers(
    rtc: &mut str0m::Rtc,
    mid: Mid,
    ssrc: Option<Ssrc>,
    estimated: bool,
) -> Option<u64> {
    let dir = rtc.media(mid).map(|m| m.direction())?;
    if !dir.is_sending() {
        return None;
    }
    let queued = ssrc.and_then(|ssrc| {
        let mut api = rtc.direct_api();
        let tx = api.stream_tx(&ssrc)?;
        tx.queue_info().map(|q| q.packet_count() as u64)
    });
    let mut api = rtc.sdp_api();
    api.set_direction(mid, str0m::media::Direction::Inactive);
    api.set_direction(mid, dir);
    drop(api);
    if let (true, Some(ssrc)) = (estimated, ssrc) {
        if let Some(tx) = rtc.direct_api().stream_tx(&ssrc) {
            tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, None);
            tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, rtx_ratio_cap(true));
        }
    }
    Some(queued.unwrap_or(0))
}

/// Bounded label of a rendition: its rank in the ladder (0 = the default,
/// the best), not its publisher-chosen name.
fn rank_label(rank: usize) -> &'static str {
    const RANKS: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];
    RANKS.get(rank).copied().unwrap_or("8+")
}

/// The rung of a catalog track that is a rendition.
fn rung_of(t: &cascade_origin::catalog::TrackInfo) -> Option<Rung> {
    let r = t.rendition.as_ref()?;
    Some(Rung {
        name: r.name.clone(),
        track: t.name.clone(),
        bitrate_kbps: r.bitrate_kbps,
        width: r.width,
        height: r.height,
        framerate: r.framerate,
    })
}

/// The renditions of a catalog, best first (largest picture, then highest
/// bitrate; normally the default `video` track first, unless a better layer
/// was added after go-live), as far as they share `codec` (one payload type
/// on the viewer's m-line). Empty unless there are two or more and the
/// default track is one of them.
pub fn ladder(
    catalog: &cascade_origin::catalog::Catalog,
    codec: cascade_origin::catalog::Codec,
) -> Vec<Rung> {
    let mut rungs: Vec<Rung> = catalog
        .renditions()
        .filter(|t| t.codec == codec)
        .filter_map(rung_of)
        .collect();
    let key = |r: &Rung| {
        (
            u64::from(r.width) * u64::from(r.height),
            r.bitrate_kbps,
            r.track == cascade_origin::catalog::VIDEO,
        )
    };
    rungs.sort_by_key(|r| std::cmp::Reverse(key(r)));
    if rungs.len() < 2
        || !rungs
            .iter()
            .any(|r| r.track == cascade_origin::catalog::VIDEO)
    {
        return Vec::new();
    }
    rungs
}

/// [`ladder`] of the codec of `catalog`'s default video track (`None`:
/// no video).
fn video_ladder(catalog: &cascade_origin::catalog::Catalog) -> Option<Vec<Rung>> {
    let codec = catalog.by_name(cascade_origin::catalog::VIDEO)?.codec;
    Some(ladder(catalog, codec))
}

impl Out {
    /// An outgoing track on `mid` with payload type `pt`, fed by `member`.
    pub fn new(mid: Mid, pt: Pt, clock: u32, member: Member) -> Self {
        let video = member.feed().kind() == Kind::Video;
        Self {
            mid,
            ssrc: None,
            pt,
            video,
            member,
            cursor: Cursor::new(clock, video),
            // RFC 3550 §5.1: random initial sequence number and timestamp;
            // the sequence stays below 2^15 so the SRTP rollover counter starts
            // at 0 without out-of-band signalling.
            seq: u64::from(rand::random::<u16>() & 0x7fff),
            ts_offset: u64::from(rand::random::<u32>()),
            last_keyframe_request: None,
            keyframe_owed: None,
            frames: 0,
            packets: 0,
            frames_out: metrics::counter!(m::FRAMES_OUT, "kind" => kind_label(video)),
            packets_out: metrics::counter!(m::PACKETS_OUT, "kind" => kind_label(video)),
            egress_delay: video.then(|| metrics::histogram!(m::EGRESS_DELAY_SECONDS)),
            renditions: None,
            late: None,
        }
    }

    /// Makes this (video) track switch between `ladder`'s renditions; it
    /// starts on the default one (the track it was created with). Returns
    /// the viewer's control for signalling. A track that already sends (a
    /// stream that gained renditions, `Late`) moves to the controller's
    /// choice by a switch at a keyframe, not by swapping the feed under its
    /// running cursor.
    pub fn enable_renditions(
        &mut self,
        ladder: Vec<Rung>,
        subscriber: &Subscriber,
        waker: Waker,
        hub: Arc<Hub>,
        registered: impl FnOnce(Arc<Control>) -> Registered,
        bwe_start: Option<u64>,
    ) -> Arc<Control> {
        let started = self.cursor.started();
        let mut catalog = subscriber.catalog_watch();
        catalog.borrow_and_update();
        let codec = subscriber
            .catalog()
            .video()
            .map_or(cascade_origin::catalog::Codec::H264, |t| t.codec);
        let clock = u32::try_from(self.cursor.clock()).unwrap_or(90_000);
        let abr = bwe_start.map(|start| Abr {
            controller: crate::abr::Controller::new(abr_ladder(&ladder), start),
            start_bps: start,
            auto: false,
            sent: crate::abr::SentMeter::default(),
            loss: crate::abr::LossMeter::default(),
        });
        let mut switch = Switch::new(ladder.clone(), clock);
        // With ABR the viewer starts where the controller starts (a low
        // rendition), not on the default one: its first picture is then a
        // small keyframe any link carries. A track already sending gets
        // there through `drive_abr`'s first wake instead (a switch): its
        // cursor reads the default feed, and dropping that member ended the
        // feed under it and closed the session (an RTMP ladder viewer that
        // joined before the steps, tests/abr_ladder.rs).
        let start = abr
            .as_ref()
            .filter(|_| !started)
            .and_then(|a| a.controller.current())
            .and_then(|name| ladder.iter().position(|r| r.name == name));
        if let Some(i) = start.filter(|&i| Some(i) != switch.current_index()) {
            let track = ladder.get(i).map(|r| r.track.clone()).unwrap_or_default();
            if let Some(member) = hub.join(subscriber, &track, &waker) {
                self.member = member;
                switch.start_at(i);
            }
        }
        let first = switch.current().map(|r| r.name.clone());
        let control = Control::new(ladder, first, waker.clone());
        self.renditions = Some(Box::new(Renditions {
            switch,
            hub,
            waker,
            clock,
            pending: None,
            control: control.clone(),
            _registered: registered(control.clone()),
            catalog,
            codec,
            watching: None,
            gauge: None,
            abr,
        }));
        control
    }

    /// The rendition switch of this track, if it has renditions (the ABR
    /// controller drives it through [`Switch::set_auto_pick`]).
    pub fn switch_mut(&mut self) -> Option<&mut Switch> {
        self.renditions.as_mut().map(|r| &mut r.switch)
    }

    /// Subscribes to the feed: the cached group (timestamps compressed, see
    /// [`cursor`]), then the live ring. False when the feed has ended.
    fn start(&mut self) -> bool {
        let Some((group, rx)) = self.member.feed().subscribe() else {
            return false;
        };
        // A viewer with a bandwidth estimate may not get a cached group its
        // start estimate cannot carry in FAST_START_MS: sent as a burst
        // (fast start paces it at ~17 Mbit/s), a long group — a simulcast
        // layer's runs from the last keyframe anyone asked for, often many
        // seconds — is dropped by a slow link and freezes the viewer before
        // its first picture. It starts live instead, at a keyframe asked
        // for at once (`Viewer::on_event`, Connected).
        let budget = self
            .renditions
            .as_ref()
            .and_then(|r| r.abr.as_ref())
            .map(|a| a.start_bps * FAST_START_MS / 8000);
        let bytes: usize = group.iter().map(|f| f.bytes()).sum();
        if budget.is_some_and(|b| bytes as u64 > b) {
            tracing::debug!(bytes, budget = ?budget, "cached group too large for the link estimate: starting live");
            self.cursor.start_live(rx);
        } else {
            self.cursor.start(group, rx);
        }
        true
    }

    /// Takes a signalled target and acts on the switch's commands.
    fn steer(&mut self, ctx: &mut Ctx<'_>, sub: &Subscriber) {
        let now = ctx.now;
        let Some(r) = self.renditions.as_deref_mut() else {
            return;
        };
        if r.catalog.has_changed().unwrap_or(false) {
            let catalog = r.catalog.borrow_and_update().clone();
            let new = ladder(&catalog, r.codec);
            if !new.is_empty() && new != r.switch.renditions() {
                let added = new
                    .iter()
                    .any(|n| !r.switch.renditions().iter().any(|o| o.name == n.name));
                r.control.set_renditions(new.clone());
                if let Some(a) = &mut r.abr {
                    a.controller.set_ladder(now, abr_ladder(&new));
                    // A better rendition appeared (a simulcast layer that
                    // started late): when the estimate already carries it
                    // with the up-switch headroom, go now, as a viewer
                    // without ABR would, instead of waiting out a hold.
                    // (Not when only the live rates moved.)
                    if let (true, true, Some(est), Some(best)) =
                        (added, a.auto, a.controller.estimate(), new.first())
                    {
                        let fits = est as f64 >= rung_bps(best) as f64 * crate::abr::UP_HEADROOM;
                        if fits && a.controller.current() != Some(best.name.as_str()) {
                            a.controller.set_current(now, Some(&best.name));
                            r.switch.set_auto_pick(Some(&best.name));
                        }
                    }
                }
                r.switch.set_ladder(new);
                if r.switch.pending().is_none() {
                    r.pending = None;
                }
                r.report();
            }
        }
        if let Some(target) = r.control.take() {
            r.switch.set_target(target);
            r.report();
        }
        r.drive_abr(ctx);
        let now_us = cascade_origin::wallclock_us();
        let stall_us = u64::try_from(switch::STALL.as_micros()).unwrap_or(u64::MAX);
        let mut flowing = |rung: &Rung| {
            sub.last_ingest_us(&rung.track)
                .is_some_and(|us| now_us.saturating_sub(us) < stall_us)
        };
        match r.switch.poll(now, &mut flowing) {
            // The rendition is gone (its track ended): stay.
            Some(Command::Join(i)) if !r.join(i, sub) => {
                r.pending = None;
                r.switch.cancel_pending();
            }
            Some(Command::Join(_)) => {}
            Some(Command::Leave) => r.pending = None,
            Some(Command::AskAgain) => {
                if let Some((member, _)) = &r.pending {
                    member.feed().request_keyframe();
                    metrics::counter!(m::KEYFRAME_REQUESTS, "cause" => "switch_retry").increment(1);
                }
            }
            Some(Command::StopVideo) => {
                r.pending = None;
                if self.switched(sub) == Some(Direction::Down) {
                    self.flush_video(ctx);
                }
            }
            None => {}
        }
    }

    /// After a switch: counts, metrics, the status signalling reads. Says
    /// which way it went (`None`: no switch was pending).
    fn switched(&mut self, sub: &Subscriber) -> Option<Direction> {
        let r = self.renditions.as_deref_mut()?;
        let taken = r.switch.take_switch();
        if let Some((dir, to)) = &taken {
            let direction = match dir {
                Direction::Up => "up",
                Direction::Down => "down",
            };
            metrics::counter!(m::RENDITION_SWITCHES, "direction" => direction).increment(1);
            tracing::debug!(
                direction,
                to = to.as_deref().unwrap_or("audio only"),
                "rendition switch"
            );
        }
        r.count(sub);
        r.report();
        taken.map(|(dir, _)| dir)
    }

    /// Drops what str0m still holds of this viewer's video: its paced send
    /// queue, its resend cache and the resends it owes. On a switch down
    /// the link no longer carries the rendition left behind, so its packets
    /// still queued went through the narrowed link before the new
    /// rendition's keyframe, and its NACKed packets were resent in the
    /// keyframe's way (str0m also caps resends at a share of what it sent,
    /// and the flood of the old rendition had used that share up): Chromium
    /// behind a link cut from 4 to 0.4 Mbit/s showed 180p only 2.7–3.8 s
    /// later, after a 1.75–3.25 s freeze (tests/browser_abr.rs). The viewer
    /// decodes from the new keyframe on, so nothing dropped here is missed;
    /// the gap in sequence numbers is ordinary loss to its receiver (and
    /// not congestion to the controller: `abr::LossMeter::dropped`). The
    /// resend cap of an estimated session restarts as well: the flood had
    /// used up its share, so the new keyframe's lost packets were never
    /// resent and Chromium NACKed them for 3.5 s before it asked for
    /// another keyframe. How: [`flush_send_buffers`].
    fn flush_video(&mut self, ctx: &mut Ctx<'_>) {
        let estimated = self.renditions.as_ref().is_some_and(|r| r.abr.is_some());
        let Some(queued) = flush_send_buffers(ctx.rtc, self.mid, self.ssrc, estimated) else {
            return;
        };
        metrics::counter!(m::VIDEO_FLUSHES).increment(1);
        if let Some(a) = self.renditions.as_mut().and_then(|r| r.abr.as_mut()) {
            a.loss.dropped(queued);
        }
    }

    /// Frames of the pending rendition: non-keyframes are dropped; its
    /// keyframe (a fresh one) makes it the current one.
    fn pump_pending(&mut self, ctx: &mut Ctx<'_>, sub: &Subscriber) -> Option<Flow> {
        let r = self.renditions.as_deref_mut()?;
        let (_, cursor) = r.pending.as_mut()?;
        let mut budget = usize::MAX;
        loop {
            match cursor.next(&mut budget) {
                Next::Frame(f, ts, wallclock) => {
                    let input = switch::In {
                        ts,
                        wallclock,
                        ingest_us: f.ingest_us,
                        keyframe: f.keyframe,
                    };
                    if let Verdict::SwitchAndSend(ts, wall) =
                        r.switch.on_frame(ctx.now, Source::Pending, input)
                    {
                        let (member, cursor) = r.pending.take()?;
                        self.member = member;
                        self.cursor = cursor;
                        if self.switched(sub) == Some(Direction::Down) {
                            self.flush_video(ctx);
                        }
                        return match self.write(ctx, &f, ts, wall) {
                            Written::NoStream => Some(Flow::Close),
                            _ => None,
                        };
                    }
                }
                Next::Lagged => {}
                Next::Idle => return None,
                // The rendition ended: forget the switch, the target stays.
                Next::Closed => {
                    r.pending = None;
                    r.switch.cancel_pending();
                    return None;
                }
            }
        }
    }

    fn lagged(&mut self, cause: &'static str, now: Instant) {
        metrics::counter!(m::LAG_SKIPS, "cause" => cause).increment(1);
        tracing::debug!(
            cause,
            video = self.video,
            "viewer lagging: skipping to the next keyframe"
        );
        self.want_keyframe("lag", now);
    }

    fn want_keyframe(&mut self, cause: &'static str, now: Instant) {
        if !self.video {
            return;
        }
        if self
            .last_keyframe_request
            .is_some_and(|t| now.duration_since(t) < VIEWER_KEYFRAME_INTERVAL)
        {
            self.keyframe_owed = Some(cause);
            return;
        }
        self.keyframe_owed = None;
        self.last_keyframe_request = Some(now);
        metrics::counter!(m::KEYFRAME_REQUESTS, "cause" => cause).increment(1);
        self.member.feed().request_keyframe();
    }

    /// Writes one frame, unless it is a live non-keyframe and str0m's send
    /// queue is already too long: then the viewer lags and skips to the next
    /// keyframe. One stream lookup serves both (it is per viewer per frame).
    fn write(
        &mut self,
        ctx: &mut Ctx<'_>,
        frame: &PacketizedFrame,
        ts: u64,
        wallclock: Instant,
    ) -> Written {
        let check_queue = !frame.keyframe && !self.cursor.in_backlog();
        let abr = self.renditions.as_ref().and_then(|r| r.abr.as_ref());
        let paced = abr.is_some();
        let max_delay = if abr.is_some_and(|a| {
            a.controller.in_up_grace(ctx.now) || a.controller.starting_on_the_lowest(ctx.now)
        }) {
            UP_GRACE_QUEUE_DELAY
        } else {
            MAX_QUEUE_DELAY
        };
        let mut api = ctx.rtc.direct_api();
        let tx = match self.ssrc {
            Some(ssrc) => api.stream_tx(&ssrc),
            None => api.stream_tx_by_mid(self.mid, None),
        };
        let Some(tx) = tx else {
            return Written::NoStream;
        };
        self.ssrc = Some(tx.ssrc());
        if check_queue
            && tx.queue_info().is_some_and(|q| {
                q.packet_count() > MAX_QUEUED_PACKETS
                    || (paced
                        && q.first_unsent()
                            .is_some_and(|t| ctx.now.saturating_duration_since(t) > max_delay))
            })
        {
            return Written::QueueFull;
        }
        // RTP timestamps wrap modulo 2^32 by design (RFC 3550 §5.1); the mask
        // makes the narrowing exact.
        let rtp_ts = ((ts.wrapping_add(self.ts_offset)) & 0xffff_ffff) as u32;
        for p in &frame.payloads {
            tx.write_rtp(
                RtpWrite::new(self.pt, self.seq.into(), rtp_ts, wallclock, p.data.clone())
                    .marker(p.marker)
                    .nackable(self.video),
            );
            self.seq += 1;
        }
        self.frames += 1;
        self.packets += frame.payloads.len() as u64;
        Written::Sent
    }

    /// Sends the backlog (a budget per wake), then everything the ring
    /// holds. `Close` once the feed ended.
    /// A stream that had no renditions when the viewer joined gained them:
    /// the viewer gains the switching machinery ([`Late`]).
    fn upgrade(&mut self, sub: &Subscriber) {
        let Some(late) = self.late.as_deref_mut() else {
            return;
        };
        if !late.catalog.has_changed().unwrap_or(false) {
            return;
        }
        let catalog = late.catalog.borrow_and_update().clone();
        let ladder = video_ladder(&catalog).unwrap_or_default();
        if ladder.is_empty() {
            return;
        }
        let Some(late) = self.late.take() else {
            return;
        };
        tracing::debug!(
            renditions = ladder.len(),
            "the stream gained renditions: the viewer follows them"
        );
        let Late {
            hub,
            waker,
            controls,
            id,
            bwe_start,
            ..
        } = *late;
        self.enable_renditions(
            ladder,
            sub,
            waker,
            hub,
            |c| controls.insert(id, c),
            bwe_start,
        );
    }

    fn pump(&mut self, ctx: &mut Ctx<'_>, sub: &Subscriber) -> Flow {
        if let Some(cause) = self.keyframe_owed {
            self.want_keyframe(cause, ctx.now);
        }
        if self.late.is_some() {
            self.upgrade(sub);
        }
        if self.renditions.is_some() {
            self.steer(ctx, sub);
            if let Some(flow) = self.pump_pending(ctx, sub) {
                return flow;
            }
        }
        let mut budget = BACKLOG_PACKETS_PER_WAKE;
        loop {
            // Backlog frames left the publisher up to a GOP ago: not a delay we add.
            let live = !self.cursor.in_backlog();
            match self.cursor.next(&mut budget) {
                Next::Frame(f, ts, wallclock) => {
                    if f.keyframe {
                        self.keyframe_owed = None;
                    }
                    let (ts, wallclock) = match self.renditions.as_deref_mut() {
                        None => (ts, wallclock),
                        Some(r) => {
                            let input = switch::In {
                                ts,
                                wallclock,
                                ingest_us: f.ingest_us,
                                keyframe: f.keyframe,
                            };
                            match r.switch.on_frame(ctx.now, Source::Current, input) {
                                Verdict::Send(ts, w) | Verdict::SwitchAndSend(ts, w) => (ts, w),
                                Verdict::Drop => continue,
                            }
                        }
                    };
                    match self.write(ctx, &f, ts, wallclock) {
                        Written::Sent => {}
                        Written::QueueFull => {
                            self.cursor.skip_to_keyframe();
                            self.lagged("queue", ctx.now);
                            // Paced (ABR): the rendition does not fit what
                            // str0m lets out; the controller steps down.
                            if let Some(a) =
                                self.renditions.as_deref_mut().and_then(|r| r.abr.as_mut())
                            {
                                a.controller.on_queue_lag(ctx.now);
                            }
                            continue;
                        }
                        Written::NoStream => return Flow::Close,
                    }
                    if let (true, Some(h)) = (live, &self.egress_delay) {
                        let us = cascade_origin::wallclock_us().saturating_sub(f.ingest_us);
                        h.record(us as f64 / 1e6);
                    }
                }
                Next::Lagged => self.lagged("fanout", ctx.now),
                Next::Idle => return Flow::Continue,
                Next::Closed => return Flow::Close,
            }
        }
    }
}

/// What [`Out::write`] did with a frame.
enum Written {
    Sent,
    /// Not sent: the viewer cannot keep up (see `MAX_QUEUED_PACKETS`).
    QueueFull,
    /// str0m has no stream for the mid: the session is broken.
    NoStream,
}

/// One negotiated outgoing track: its m-line, payload type, RTP clock and
/// the catalog track it carries.
pub type Planned = (Mid, Pt, u32, String);

/// The outgoing tracks of a new viewer: each planned track joined to its
/// feed on this node (one packetization shared by every viewer); tracks
/// whose feed has ended are left out.
pub fn outs(
    hub: &Arc<Hub>,
    subscriber: &Subscriber,
    planned: Vec<Planned>,
    waker: &Waker,
) -> Vec<Out> {
    planned
        .into_iter()
        .filter_map(|(mid, pt, clock, track)| {
            let member = hub.join(subscriber, &track, waker)?;
            Some(Out::new(mid, pt, clock, member))
        })
        .collect()
}

/// Gives the video out of a stream with renditions its switching machinery
/// and registers its control under session `id` in `controls`; returns the
/// control (`None` for streams without renditions, which stay as they are).
pub fn attach_renditions(
    outs: &mut [Out],
    hub: &Arc<Hub>,
    subscriber: &Subscriber,
    waker: &Waker,
    controls: &Arc<control::Controls>,
    id: cascade_rtc::session::SessionId,
    bwe_start: Option<u64>,
) -> Option<Arc<Control>> {
    let ladder = video_ladder(&subscriber.catalog())?;
    let i = outs.iter().position(|o| o.video)?;
    let out = outs.get_mut(i)?;
    if ladder.is_empty() {
        let mut watch = subscriber.catalog_watch();
        watch.borrow_and_update();
        out.late = Some(Box::new(Late {
            catalog: watch,
            hub: hub.clone(),
            waker: waker.clone(),
            controls: controls.clone(),
            id,
            bwe_start,
        }));
        return None;
    }
    Some(out.enable_renditions(
        ladder,
        subscriber,
        waker.clone(),
        hub.clone(),
        |c| controls.insert(id, c),
        bwe_start,
    ))
}

/// A WHEP viewer.
pub struct Viewer {
    outs: Vec<Out>,
    subscriber: Subscriber,
    _slot: Slot,
    span: tracing::Span,
    posted: Instant,
    connected: bool,
    first_written: bool,
    /// Told once when ICE and DTLS are up (OvenPlayer signalling reports a
    /// viewer that never gets there).
    on_connected: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Viewer {
    /// A viewer sending `outs`; holds the stream subscription (counted as a
    /// viewer by the registry) and its slot until the session ends.
    pub fn new(
        outs: Vec<Out>,
        subscriber: Subscriber,
        slot: Slot,
        span: tracing::Span,
        posted: Instant,
    ) -> Self {
        Self {
            outs,
            subscriber,
            _slot: slot,
            span,
            posted,
            connected: false,
            first_written: false,
            on_connected: None,
        }
    }

    /// The rendition switch of the viewer's video, if its stream has
    /// renditions (for the ABR controller).
    pub fn switch_mut(&mut self) -> Option<&mut Switch> {
        self.outs.iter_mut().find_map(Out::switch_mut)
    }

    fn abr_mut(&mut self) -> Option<&mut Abr> {
        self.outs
            .iter_mut()
            .find_map(|o| o.renditions.as_mut().and_then(|r| r.abr.as_mut()))
    }

    /// Sends `()` on `tx` when the session connects (dropped unsent if it
    /// never does).
    #[must_use]
    pub fn on_connected(mut self, tx: tokio::sync::oneshot::Sender<()>) -> Self {
        self.on_connected = Some(tx);
        self
    }

    fn pump(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        if !self.connected {
            return Flow::Idle;
        }
        let mut flow = Flow::Idle;
        for out in &mut self.outs {
            let (frames, packets) = (out.frames, out.packets);
            if out.pump(ctx, &self.subscriber) == Flow::Close {
                flow = Flow::Close;
            }
            if out.frames > frames {
                if flow == Flow::Idle {
                    flow = Flow::Continue;
                }
                out.frames_out.increment(out.frames - frames);
                out.packets_out.increment(out.packets - packets);
            }
        }
        if !self.first_written && self.outs.iter().any(|o| o.video && o.frames > 0) {
            self.first_written = true;
            let ms = ctx.now.duration_since(self.posted).as_secs_f64();
            metrics::histogram!(m::FIRST_FRAME_SECONDS).record(ms);
            let _g = self.span.enter();
            tracing::debug!(
                first_frame_ms = (ms * 1000.0) as u64,
                "first video frame written"
            );
        }
        flow
    }
}

impl Handler for Viewer {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) -> Flow {
        match event {
            Event::Connected => {
                self.connected = true;
                if let Some(tx) = self.on_connected.take() {
                    let _ = tx.send(());
                }
                if self.outs.is_empty() {
                    // Every track ended between the answer and the handshake.
                    return Flow::Close;
                }
                for out in &mut self.outs {
                    if !out.start() {
                        return Flow::Close;
                    }
                    if out.renditions.is_some() {
                        out.switched(&self.subscriber);
                    }
                    // A viewer that found no cached group (the origin's cache
                    // outgrew its cap, or a takeover just happened) waits for
                    // a keyframe: ask for one.
                    if out.video && !out.cursor.in_backlog() {
                        out.want_keyframe("join", ctx.now);
                    }
                }
                self.pump(ctx)
            }
            Event::KeyframeRequest(req) => {
                if let Some(out) = self.outs.iter_mut().find(|o| o.mid == req.mid) {
                    out.want_keyframe("viewer", ctx.now);
                }
                Flow::Continue
            }
            // Sessions with an estimator only (`cascade_rtc::bwe::enable`).
            // str0m's estimate events are the mean of its distinct
            // estimates over 3 s (`EstimateSmoother`): they trail the link
            // by seconds both ways. The controller reads the estimate
            // itself from the stats event (below); the mean only confirms
            // up-switches after start-up (`abr::Controller::on_smoothed_estimate`).
            //
            // Both only once connected: str0m reports its start estimate
            // every stats interval from the session's creation, and the
            // controller's start-up (fast up-holds, probing toward the top)
            // runs from the first estimate it hears. With ICE + DTLS taking
            // 3.4 s on a loaded machine, start-up was over 1.6 s after the
            // first feedback, and an unlimited Chromium viewer then waited
            // the full up-hold on 360p and reached 720p 8.1 s after its
            // first frame (tests/browser_abr.rs).
            Event::EgressBitrateEstimate(str0m::bwe::BweKind::Twcc { estimate, .. })
                if self.connected =>
            {
                if let Some(a) = self.abr_mut() {
                    tracing::trace!(session = ?ctx.id, estimate_bps = estimate.as_u64(), "smoothed estimate");
                    a.controller
                        .on_smoothed_estimate(ctx.now, estimate.as_u64());
                }
                Flow::Continue
            }
            // Every `cascade_rtc::bwe::STATS_INTERVAL`: `bwe_tx` is str0m's
            // current estimate (delay- and loss-based, unsmoothed). Seen
            // side by side in Chromium start-ups (tests/browser_abr.rs), it
            // reached 2.58 Mbit/s 3.4 s after the session began where the
            // events took until 6.3 s, and a fall shows at once.
            Event::PeerStats(s) if self.connected => {
                if let (Some(raw), Some(a)) = (s.bwe_tx, self.abr_mut()) {
                    tracing::trace!(session = ?ctx.id, estimate_bps = raw.as_u64(), rtt = ?s.rtt, "bandwidth estimate");
                    a.controller.on_estimate(ctx.now, raw.as_u64());
                }
                Flow::Continue
            }
            Event::MediaEgressStats(s) => {
                let video = self.outs.iter().any(|o| o.video && o.mid == s.mid);
                // `s.loss` is Some when a new receiver report came; its
                // counters give the loss less what a flush dropped.
                if let (true, Some(_), Some(r)) = (video, s.loss, &s.remote) {
                    if let Some(a) = self.abr_mut() {
                        // Both meters advance on every report, so their
                        // windows stay aligned.
                        let sent = a.sent.rate(s.timestamp, s.bytes);
                        let max_seq = *r.maximum_sequence_number;
                        let Some(loss) = a.loss.on_report(max_seq, r.packets_lost) else {
                            return Flow::Continue;
                        };
                        tracing::trace!(session = ?ctx.id, loss, sent_bps = sent, nacks = s.nacks, "receiver report");
                        a.controller.on_report(ctx.now, sent, loss);
                    }
                }
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }

    fn on_wake(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        self.pump(ctx)
    }

    fn on_close(&mut self, reason: CloseReason) {
        metrics::counter!(m::VIEWERS_ENDED, "reason" => reason.as_str()).increment(1);
        let _g = self.span.enter();
        let frames: u64 = self.outs.iter().map(|o| o.frames).sum();
        let skips: u64 = self.outs.iter().map(|o| o.cursor.skips).sum();
        tracing::info!(
            reason = reason.as_str(),
            frames,
            lag_skips = skips,
            "viewer ended"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_origin::catalog::{Catalog, Codec, Rendition, TrackInfo};

    fn track(name: &str, codec: Codec, r: Option<(&str, u32, u32)>) -> TrackInfo {
        TrackInfo {
            name: name.into(),
            codec,
            fmtp: String::new(),
            channels: None,
            bframes: false,
            rendition: r.map(|(n, w, h)| Rendition {
                name: n.into(),
                width: w,
                height: h,
                bitrate_kbps: w,
                framerate: 30,
            }),
        }
    }

    #[test]
    fn an_estimator_only_for_streams_with_renditions_or_some_coming() {
        let plain = Catalog {
            tracks: vec![
                track("video", Codec::H264, None),
                track("audio", Codec::Opus, None),
            ],
        };
        assert_eq!(bwe_start(&plain, Codec::H264), None);
        // An RTMP ladder starting: the source alone, marked as a rendition.
        let coming = Catalog {
            tracks: vec![
                track("video", Codec::H264, Some(("source", 1280, 720))),
                track("audio", Codec::Opus, None),
            ],
        };
        assert_eq!(
            bwe_start(&coming, Codec::H264),
            Some(crate::abr::start_estimate(1_280_000))
        );
        assert_eq!(bwe_start(&coming, Codec::Vp8), None, "another codec");
        let full = Catalog {
            tracks: vec![
                track("video", Codec::H264, Some(("f", 1280, 720))),
                track("video-q", Codec::H264, Some(("q", 320, 180))),
            ],
        };
        assert_eq!(
            bwe_start(&full, Codec::H264),
            Some(crate::abr::start_estimate(320_000)),
            "the lowest rendition's"
        );
    }

    #[test]
    fn ladder_is_best_first_and_needs_the_default_and_a_second_step() {
        let c = Catalog {
            tracks: vec![
                track("video-q", Codec::H264, Some(("q", 320, 180))),
                track("video", Codec::H264, Some(("f", 1280, 720))),
                track("video-h", Codec::H264, Some(("h", 640, 360))),
                track("audio", Codec::Opus, None),
            ],
        };
        let names: Vec<String> = ladder(&c, Codec::H264)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["f", "h", "q"]);
        // Another codec than the viewer's m-line plays: not a step.
        assert!(ladder(&c, Codec::Vp8).is_empty());
        // One video track, no renditions: the old path.
        let plain = Catalog {
            tracks: vec![track("video", Codec::H264, None)],
        };
        assert!(ladder(&plain, Codec::H264).is_empty());
        assert_eq!(rank_label(0), "0");
        assert_eq!(rank_label(9), "8+");
    }

    /// A 720p / 360p / 180p simulcast catalog (f, h, q).
    fn simulcast() -> Catalog {
        Catalog {
            tracks: vec![
                track("video-q", Codec::H264, Some(("q", 320, 180))),
                track("video", Codec::H264, Some(("f", 1280, 720))),
                track("video-h", Codec::H264, Some(("h", 640, 360))),
            ],
        }
    }

    /// Sets the live rate of rendition `name`.
    fn set_kbps(c: &mut Catalog, name: &str, kbps: u32) {
        for t in &mut c.tracks {
            if let Some(r) = t.rendition.as_mut().filter(|r| r.name == name) {
                r.bitrate_kbps = kbps;
            }
        }
    }

    #[test]
    fn abr_costs_rise_with_the_rank_even_when_live_rates_cross() {
        let mut c = simulcast();
        let costs = |c: &Catalog| -> Vec<(String, u64)> {
            abr_ladder(&ladder(c, Codec::H264))
                .into_iter()
                .map(|r| (r.name, r.bps))
                .collect()
        };
        let set = set_kbps;
        set(&mut c, "q", 150);
        set(&mut c, "h", 500);
        set(&mut c, "f", 2_500);
        let want = |v: [(&str, u64); 3]| v.map(|(n, b)| (n.to_string(), b)).to_vec();
        assert_eq!(
            costs(&c),
            want([("f", 2_500_000), ("h", 500_000), ("q", 150_000)])
        );
        // 'h' measured under 'q' for a moment, 'f' under both: each is
        // priced at least as the one below it scaled by its picture
        // (4× the pixels: × 4^0.75 = 2.83).
        set(&mut c, "h", 120);
        set(&mut c, "f", 100);
        assert_eq!(
            costs(&c),
            want([("f", 1_199_999), ("h", 424_264), ("q", 150_000)])
        );
    }

    #[test]
    fn a_top_layer_still_ramping_up_is_priced_for_its_picture() {
        let mut c = simulcast();
        let set = |c: &mut Catalog, [f, h, q]: [u32; 3]| {
            set_kbps(c, "f", f);
            set_kbps(c, "h", h);
            set_kbps(c, "q", q);
        };
        let cost_of_f = |c: &Catalog| abr_ladder(&ladder(c, Codec::H264))[0].bps;
        // Chromium's layers as the viewers of the settle case joined: 720p
        // at 1.16 Mbit/s on its way to 2.0.
        set(&mut c, [1_164, 448, 143]);
        let f = cost_of_f(&c);
        assert_eq!(f, 1_267_135);
        // A viewer estimated at 1.40 Mbit/s no longer fits it (the up
        // threshold is 1.2 × the cost).
        assert!(1_400_000.0 < f as f64 * crate::abr::UP_HEADROOM);
        // Settled layers are priced at what they make: the floor is below.
        set(&mut c, [2_020, 448, 143]);
        assert_eq!(cost_of_f(&c), 2_020_000);
        set(&mut c, [2_500, 800, 250]);
        let costs: Vec<u64> = abr_ladder(&ladder(&c, Codec::H264))
            .into_iter()
            .map(|r| r.bps)
            .collect();
        assert_eq!(costs, [2_500_000, 800_000, 250_000]);
        // Same picture, two bitrates: no floor from the picture.
        let mut same = Catalog {
            tracks: vec![
                track("video", Codec::H264, Some(("hi", 1280, 720))),
                track("video-lo", Codec::H264, Some(("lo", 1280, 720))),
            ],
        };
        set_kbps(&mut same, "hi", 2_500);
        set_kbps(&mut same, "lo", 1_200);
        let costs: Vec<u64> = abr_ladder(&ladder(&same, Codec::H264))
            .into_iter()
            .map(|r| r.bps)
            .collect();
        assert_eq!(costs, [2_500_000, 1_200_000]);
    }
}
