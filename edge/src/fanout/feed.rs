//! The feed's sans-IO core: one (stream, track)'s origin frames in decode
//! order → the edge timeline (re-based on publisher takeover) → the B-frame
//! method → packetized once; plus the rate limit on upstream keyframe
//! requests. No clock reads, sockets, locks or metrics: the feed task
//! (`fanout/mod.rs`) passes `now` in and acts on each [`Output`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cascade_origin::catalog::{Codec, Kind};
use cascade_origin::frame::Frame;

use super::{PacketizedFrame, KEYFRAME_INTERVAL};
use crate::bframes::{is_h264_b_slice, BframeTs};
use crate::packetize::Packetizer;

/// A decode-timestamp step larger than this (or any step backwards) is a
/// new publisher's timeline (takeover), not a gap in one encoder's output.
const MAX_STEP: Duration = Duration::from_secs(5);

/// Maps a publisher's timestamps to the edge timeline, re-basing on jumps.
#[derive(Debug)]
pub(crate) struct Timeline {
    clock: u64,
    offset: i128,
    last: Option<(u64, i128, u64)>,
}

impl Timeline {
    pub(crate) fn new(clock: u32) -> Self {
        Self {
            clock: u64::from(clock),
            offset: 0,
            last: None,
        }
    }

    /// The frame's pts on the edge timeline, and whether a new timeline
    /// (publisher takeover) started with it.
    pub(crate) fn map(&mut self, dts: u64, pts: u64, ingest_us: u64) -> (u64, bool) {
        let max_step = u128::from(self.clock) * MAX_STEP.as_millis() / 1000;
        let mut jumped = false;
        if let Some((last_dts, last_mapped, last_us)) = self.last {
            let forward = u128::from(dts.saturating_sub(last_dts));
            if dts < last_dts || forward > max_step {
                // Continue by the wall time between the two frames, so audio
                // and video (re-based independently) stay in step.
                let wall_us = u128::from(ingest_us.saturating_sub(last_us));
                let ticks =
                    (wall_us * u128::from(self.clock) / 1_000_000).clamp(1, max_step.max(1));
                let ticks = i128::try_from(ticks).unwrap_or(1);
                self.offset = last_mapped + ticks - i128::from(dts);
                jumped = true;
            }
        }
        let mapped_dts = i128::from(dts) + self.offset;
        self.last = Some((dts, mapped_dts, ingest_us));
        let ts = (i128::from(pts) + self.offset).max(0);
        (u64::try_from(ts).unwrap_or(u64::MAX), jumped)
    }

    /// The decode timestamp of the last mapped frame on the edge timeline.
    pub(crate) fn dts(&self) -> u64 {
        self.last.map_or(0, |(_, mapped, _)| {
            u64::try_from(mapped.max(0)).unwrap_or(u64::MAX)
        })
    }
}

/// What the core asks of its task, in the order it happened.
#[derive(Debug)]
pub(crate) enum Output {
    /// A new publisher's timeline started (takeover): the cached group is
    /// the old publisher's and cannot start a decoder any more.
    Rebased,
    /// A B-frame was not forwarded ([`BframeTs::DropB`]).
    BframeDropped,
    /// A frame for the viewers, on the edge timeline.
    Frame(PacketizedFrame),
    /// Ask the publisher for a keyframe (at most one per [`KEYFRAME_INTERVAL`]).
    RequestKeyframe,
}

/// One feed's state between frames: timeline, B-frame handling, the
/// packetizer and the keyframe request limit.
pub(crate) struct Core {
    packetizer: Packetizer,
    clock: u32,
    video: bool,
    /// How B-frames get their RTP timestamps (bframes.rs); frames without
    /// B-frames (pts = dts) come out the same under every method.
    method: BframeTs,
    timeline: Timeline,
    /// pts − dts of the timeline's first frame (a keyframe): shifts dts-based
    /// timestamps onto the presentation clock the audio uses.
    reorder: Option<u64>,
    /// The local instant of the edge timeline's zero, fixed by the first
    /// frame sent (re-bases continue the timeline, so it stays valid).
    anchor: Option<Instant>,
    /// After a takeover, video decodes only from the new publisher's keyframe.
    waiting_keyframe: bool,
    /// A keyframe was asked for and not yet requested upstream.
    wanted: bool,
    last_request: Option<Instant>,
    /// Allocated once: at most a re-base, a frame and a request per input.
    out: VecDeque<Output>,
}

impl Core {
    /// A core for a track of `codec`, `None` when the codec cannot be
    /// packetized. `method` applies to H.264 only (the only codec whose
    /// B slices the edge can tell); other codecs are stamped with their pts.
    pub(crate) fn new(codec: Codec, method: BframeTs) -> Option<Self> {
        let packetizer = Packetizer::new(codec)?;
        let clock = codec.clock_rate();
        Some(Self {
            packetizer,
            clock,
            video: codec.kind() == Kind::Video,
            method: if codec == Codec::H264 {
                method
            } else {
                BframeTs::Pts
            },
            timeline: Timeline::new(clock),
            reorder: None,
            anchor: None,
            waiting_keyframe: false,
            wanted: false,
            last_request: None,
            out: VecDeque::with_capacity(4),
        })
    }

    /// The next frame of the track. `now` and `wall_us` (µs since the UNIX
    /// epoch) are the same moment on the local and the wall clock: they tie
    /// the timeline to local instants on the first frame sent.
    pub(crate) fn handle_frame(&mut self, now: Instant, wall_us: u64, frame: &Frame) {
        self.frame(now, wall_us, frame);
        self.request_due(now);
    }

    /// A viewer wants a keyframe (joined, lost one, or lags).
    pub(crate) fn request_keyframe(&mut self, now: Instant) {
        self.wanted = true;
        self.request_due(now);
    }

    /// The instant of [`Core::poll_timeout`] came.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.request_due(now);
    }

    /// When a held-back keyframe request may go upstream, if one waits.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        // `wanted` without a previous request never outlives its input:
        // the first request goes out at once.
        self.last_request
            .filter(|_| self.wanted)
            .map(|t| t + KEYFRAME_INTERVAL)
    }

    /// The next thing to do; drain after every input.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn frame(&mut self, now: Instant, wall_us: u64, frame: &Frame) {
        let (pts_ts, jumped) = self.timeline.map(frame.dts, frame.pts, frame.ingest_us);
        if jumped {
            self.reorder = None;
            self.out.push_back(Output::Rebased);
            // A new publisher: its frames decode only from its keyframe.
            self.waiting_keyframe = self.video;
        }
        if self.waiting_keyframe && !frame.keyframe {
            return;
        }
        self.waiting_keyframe = false;
        if self.method == BframeTs::DropB && is_h264_b_slice(&frame.payload) {
            self.out.push_back(Output::BframeDropped);
            return;
        }
        let ts = match self.method {
            // Without B slices the rest is in presentation order:
            // pts is monotonic and keeps A/V sync exact.
            BframeTs::Pts | BframeTs::DropB => pts_ts,
            BframeTs::Dts => {
                let delay = *self
                    .reorder
                    .get_or_insert(frame.pts.saturating_sub(frame.dts));
                self.timeline.dts().saturating_add(delay)
            }
        };
        let clock = self.clock;
        let anchor = *self
            .anchor
            .get_or_insert_with(|| anchor_of(now, wall_us, frame, clock));
        let out = packetize_frame(&mut self.packetizer, frame, ts, anchor, clock);
        self.out.push_back(Output::Frame(out));
    }

    fn request_due(&mut self, now: Instant) {
        if self.wanted
            && self
                .last_request
                .is_none_or(|t| now >= t + KEYFRAME_INTERVAL)
        {
            self.out.push_back(Output::RequestKeyframe);
            self.last_request = Some(now);
            self.wanted = false;
        }
    }
}

/// Packetizes one origin frame on the edge timeline (the core's step,
/// public for the bench).
pub fn packetize_frame(
    p: &mut Packetizer,
    frame: &Frame,
    ts: u64,
    anchor: Instant,
    clock: u32,
) -> PacketizedFrame {
    let payloads = p.packetize(&frame.payload, frame.keyframe);
    let micros = u128::from(ts) * 1_000_000 / u128::from(clock.max(1));
    // Publisher timestamps are input: never let them overflow the instant.
    let after = Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX));
    let wallclock = anchor.checked_add(after).unwrap_or(anchor);
    PacketizedFrame {
        payloads,
        ts,
        keyframe: frame.keyframe,
        ingest_us: frame.ingest_us,
        wallclock,
    }
}

/// The local instant of the stream timeline's zero, from a frame's ingest
/// wall clock: `ts / clock` after it is the frame's capture instant. `now`
/// and `wall_us` are the same moment on the two clocks.
fn anchor_of(now: Instant, wall_us: u64, frame: &Frame, clock: u32) -> Instant {
    let age = Duration::from_micros(wall_us.saturating_sub(frame.ingest_us));
    let media = Duration::from_micros(
        u64::try_from(u128::from(frame.pts) * 1_000_000 / u128::from(clock.max(1))).unwrap_or(0),
    );
    now.checked_sub(age.saturating_add(media))
        .or_else(|| now.checked_sub(age))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_continues_across_takeover() {
        let mut t = Timeline::new(90_000);
        assert_eq!(t.map(0, 0, 1_000_000), (0, false));
        assert_eq!(t.map(3000, 3000, 1_033_333), (3000, false));
        // New publisher restarts at 0, 100 ms of wall time later.
        let (ts, jumped) = t.map(0, 0, 1_133_333);
        assert!(jumped);
        assert_eq!(ts, 3000 + 9000);
        assert_eq!(t.map(3000, 3000, 1_166_666), (15_000, false));
        // A forward jump of an hour is a new timeline too.
        let (ts, jumped) = t.map(3000 + 90_000 * 3600, 3000 + 90_000 * 3600, 1_200_000);
        assert!(jumped);
        assert!(ts > 15_000 && ts < 15_000 + 90_000);
    }

    proptest::proptest! {
        /// Whatever timestamps publishers send (jumps, wraps, takeovers), the
        /// edge timeline never goes backwards and never panics.
        #[test]
        fn timeline_is_monotonic(steps in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u64..10_000_000), 1..200)) {
            let mut t = Timeline::new(90_000);
            let mut last = None;
            for (dts, us) in steps {
                let (ts, _) = t.map(dts, dts, us);
                if let Some(l) = last {
                    proptest::prop_assert!(ts >= l, "{ts} after {l}");
                }
                last = Some(ts);
            }
        }
    }

    #[test]
    fn extreme_timestamps_do_not_overflow_the_clock() {
        let mut p = Packetizer::new(Codec::Opus).unwrap();
        let f = Frame {
            payload: bytes::Bytes::from_static(b"x"),
            pts: u64::MAX,
            dts: u64::MAX,
            keyframe: true,
            ingest_us: 0,
        };
        let anchor = anchor_of(Instant::now(), u64::MAX, &f, 48_000);
        let out = packetize_frame(&mut p, &f, u64::MAX, anchor, 48_000);
        assert_eq!(out.payloads.len(), 1);
    }

    #[test]
    fn dts_follows_the_timeline() {
        let mut t = Timeline::new(90_000);
        t.map(1000, 7000, 0);
        assert_eq!(t.dts(), 1000);
        t.map(4000, 4000, 33_000);
        assert_eq!(t.dts(), 4000);
        // Takeover: the new timeline continues after the old one.
        t.map(0, 6000, 66_000);
        assert_eq!(t.dts(), 4000 + 2970);
    }

    #[test]
    fn timeline_keeps_bframe_pts() {
        let mut t = Timeline::new(90_000);
        // Decode order I P B: pts 0, 6000, 3000 with dts 0, 3000, 6000... shifted.
        assert_eq!(t.map(0, 3000, 0).0, 3000);
        assert_eq!(t.map(3000, 9000, 0).0, 9000);
        assert_eq!(t.map(6000, 6000, 0).0, 6000);
    }

    // --- the core, on virtual time ---

    /// Wall clock of the tests' first frame, µs since the epoch.
    const WALL0: u64 = 1_700_000_000_000_000;
    /// One frame at 30 fps, 90 kHz ticks / µs.
    const TICKS: u64 = 3000;
    const FRAME_US: u64 = 33_333;

    /// An H.264 access unit whose one slice has `slice_type` (ue(v) after
    /// first_mb_in_slice = 0): 0 = P, 1 = B, 2 = I.
    fn h264(slice_type: u8) -> bytes::Bytes {
        let (nal, header) = match slice_type {
            0 => (0x41, 0b1100_0000), // "1" "1"
            1 => (0x01, 0b1010_0000), // "1" "010" (non-reference)
            _ => (0x65, 0b1011_0000), // IDR, "1" "011"
        };
        bytes::Bytes::from(vec![0, 0, 0, 1, nal, header, 0x55, 0x55, 0x55])
    }

    fn video(dts: u64, pts: u64, slice_type: u8, ingest_us: u64) -> Frame {
        Frame {
            payload: h264(slice_type),
            pts,
            dts,
            keyframe: slice_type == 2,
            ingest_us,
        }
    }

    /// Everything the core asked for after one input.
    fn drain(core: &mut Core) -> Vec<Output> {
        std::iter::from_fn(|| core.poll_output()).collect()
    }

    fn frames(out: &[Output]) -> Vec<&PacketizedFrame> {
        out.iter()
            .filter_map(|o| match o {
                Output::Frame(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    fn count(out: &[Output], f: impl Fn(&Output) -> bool) -> usize {
        out.iter().filter(|o| f(o)).count()
    }

    #[test]
    fn takeover_rebases_and_waits_for_the_new_keyframe() {
        let t0 = Instant::now();
        let mut core = Core::new(Codec::H264, BframeTs::DropB).unwrap();
        let mut all = Vec::new();
        // Publisher A: 10 frames from dts 900_000 (10 s into its stream).
        for i in 0..10 {
            let dts = 900_000 + i * TICKS;
            let at = i * FRAME_US;
            let t = if i == 0 { 2 } else { 0 };
            core.handle_frame(
                t0 + Duration::from_micros(at),
                WALL0 + at,
                &video(dts, dts, t, WALL0 + at),
            );
            all.extend(drain(&mut core));
        }
        assert_eq!(count(&all, |o| matches!(o, Output::Rebased)), 0);
        // Publisher B takes over 200 ms later, its timestamps from 0; its
        // first frame is a P-frame a decoder cannot start from.
        let b0 = 9 * FRAME_US + 200_000;
        let mut after = Vec::new();
        for i in 0..5 {
            let at = b0 + i * FRAME_US;
            let t = if i == 1 { 2 } else { 0 };
            core.handle_frame(
                t0 + Duration::from_micros(at),
                WALL0 + at,
                &video(i * TICKS, i * TICKS, t, WALL0 + at),
            );
            after.extend(drain(&mut core));
        }
        assert!(matches!(after.first(), Some(Output::Rebased)));
        assert_eq!(count(&after, |o| matches!(o, Output::Rebased)), 1);
        // B's leading P-frame is held back; its keyframe and what follows go out.
        let sent = frames(&after);
        assert_eq!(sent.len(), 4);
        assert!(sent[0].keyframe);
        all.extend(after);
        let ts: Vec<u64> = frames(&all).iter().map(|f| f.ts).collect();
        assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");
        // The timeline continues by the wall time between A's last frame and
        // B's first (200 ms = 18 000 ticks), then B's own steps.
        let a_last = 900_000 + 9 * TICKS;
        assert_eq!(ts[10], a_last + 18_000 + TICKS);
        // Wall clocks (for sender reports) keep one anchor across the takeover.
        let wall: Vec<Instant> = frames(&all).iter().map(|f| f.wallclock).collect();
        assert!(wall.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn audio_takeover_does_not_wait_for_a_keyframe() {
        let t0 = Instant::now();
        let mut core = Core::new(Codec::Opus, BframeTs::DropB).unwrap();
        let opus = |pts: u64, us: u64| Frame {
            payload: bytes::Bytes::from_static(b"opus"),
            pts,
            dts: pts,
            keyframe: true,
            ingest_us: WALL0 + us,
        };
        core.handle_frame(t0, WALL0, &opus(480_000, 0));
        core.handle_frame(t0, WALL0 + 20_000, &opus(480_960, 20_000));
        let out = drain(&mut core);
        assert_eq!(frames(&out).len(), 2);
        core.handle_frame(t0, WALL0 + 40_000, &opus(0, 40_000));
        let out = drain(&mut core);
        assert!(
            matches!(out.as_slice(), [Output::Rebased, Output::Frame(f)] if f.ts == 480_960 + 960)
        );
    }

    #[test]
    fn keyframe_requests_are_rate_limited() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut core = Core::new(Codec::H264, BframeTs::DropB).unwrap();
        assert_eq!(core.poll_timeout(), None);
        // The first request goes upstream at once.
        core.request_keyframe(t0);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Output::RequestKeyframe]
        ));
        assert_eq!(core.poll_timeout(), None);
        // Three more within the interval: held back as one.
        for n in [100, 200, 400] {
            core.request_keyframe(ms(n));
            assert!(drain(&mut core).is_empty());
        }
        assert_eq!(core.poll_timeout(), Some(t0 + KEYFRAME_INTERVAL));
        // Frames before the deadline do not release it either.
        core.handle_frame(ms(450), WALL0, &video(0, 0, 2, WALL0));
        assert_eq!(
            count(&drain(&mut core), |o| matches!(o, Output::RequestKeyframe)),
            0
        );
        core.handle_timeout(t0 + KEYFRAME_INTERVAL);
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Output::RequestKeyframe]
        ));
        assert_eq!(core.poll_timeout(), None);
        // A spurious timeout with nothing wanted asks for nothing.
        core.handle_timeout(ms(2000));
        assert!(drain(&mut core).is_empty());
        // Well after the interval, a request goes out at once again.
        core.request_keyframe(ms(2000));
        assert!(matches!(
            drain(&mut core).as_slice(),
            [Output::RequestKeyframe]
        ));
    }

    #[test]
    fn a_due_request_goes_out_with_the_next_frame() {
        // The task checks after every input, frames included (as before).
        let t0 = Instant::now();
        let mut core = Core::new(Codec::H264, BframeTs::DropB).unwrap();
        core.request_keyframe(t0);
        core.request_keyframe(t0 + Duration::from_millis(10));
        drain(&mut core);
        core.handle_frame(
            t0 + Duration::from_millis(600),
            WALL0,
            &video(0, 0, 2, WALL0),
        );
        let out = drain(&mut core);
        assert!(matches!(
            out.as_slice(),
            [Output::Frame(_), Output::RequestKeyframe]
        ));
    }

    /// Decode order of an IPBB… stream: I0 P3 B1 B2 P6 B4 B5 (pts in frames),
    /// dts one frame behind pts of the keyframe (x264's reorder delay).
    fn ibp_stream() -> Vec<Frame> {
        [(2, 1), (0, 4), (1, 2), (1, 3), (0, 7), (1, 5), (1, 6)]
            .iter()
            .enumerate()
            .map(|(i, &(t, pts))| {
                let i = i as u64;
                video(i * TICKS, pts * TICKS, t, WALL0 + i * FRAME_US)
            })
            .collect()
    }

    #[test]
    fn bframes_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut core = Core::new(Codec::H264, BframeTs::DropB).unwrap();
        let mut out = Vec::new();
        for (i, f) in ibp_stream().iter().enumerate() {
            core.handle_frame(
                t0 + Duration::from_micros(i as u64 * FRAME_US),
                f.ingest_us,
                f,
            );
            out.extend(drain(&mut core));
        }
        assert_eq!(count(&out, |o| matches!(o, Output::BframeDropped)), 4);
        let ts: Vec<u64> = frames(&out).iter().map(|f| f.ts / TICKS).collect();
        // I and P kept, stamped with their pts: monotonic without the B's.
        assert_eq!(ts, vec![1, 4, 7]);
    }

    #[test]
    fn other_methods_keep_bframes() {
        let t0 = Instant::now();
        for method in [BframeTs::Pts, BframeTs::Dts] {
            let mut core = Core::new(Codec::H264, method).unwrap();
            let mut out = Vec::new();
            for f in ibp_stream() {
                core.handle_frame(t0, f.ingest_us, &f);
                out.extend(drain(&mut core));
            }
            assert_eq!(count(&out, |o| matches!(o, Output::BframeDropped)), 0);
            let ts: Vec<u64> = frames(&out).iter().map(|f| f.ts / TICKS).collect();
            match method {
                BframeTs::Pts => assert_eq!(ts, vec![1, 4, 2, 3, 7, 5, 6]),
                // dts + the keyframe's reorder delay (one frame): monotonic.
                _ => assert_eq!(ts, vec![1, 2, 3, 4, 5, 6, 7]),
            }
        }
        // Only H.264 B slices are recognised: other codecs go by pts.
        let mut core = Core::new(Codec::Vp8, BframeTs::DropB).unwrap();
        let f = video(0, 0, 1, WALL0);
        core.handle_frame(t0, WALL0, &f);
        assert!(matches!(drain(&mut core).as_slice(), [Output::Frame(_)]));
    }

    #[test]
    fn timeline_across_gaps() {
        let t0 = Instant::now();
        let mut core = Core::new(Codec::H264, BframeTs::DropB).unwrap();
        let mut send = |dts: u64, us: u64, t: u8| {
            core.handle_frame(
                t0 + Duration::from_micros(us),
                WALL0 + us,
                &video(dts, dts, t, WALL0 + us),
            );
            drain(&mut core)
        };
        assert_eq!(frames(&send(0, 0, 2))[0].ts, 0);
        // A 3 s stall of one encoder (timestamps and wall clock agree) is a
        // gap, not a takeover: timestamps pass through unchanged.
        let out = send(270_000, 3_000_000, 0);
        assert_eq!(count(&out, |o| matches!(o, Output::Rebased)), 0);
        assert_eq!(frames(&out)[0].ts, 270_000);
        // Past MAX_STEP (5 s) it is a new timeline: continued by the wall
        // time between the frames, at most MAX_STEP, from a keyframe.
        let out = send(270_000 + 90_000 * 8, 11_000_000, 2);
        assert!(matches!(out.first(), Some(Output::Rebased)));
        assert_eq!(frames(&out)[0].ts, 270_000 + 90_000 * 5);
        // And runs on from there.
        let out = send(270_000 + 90_000 * 8 + TICKS, 11_033_333, 0);
        assert_eq!(frames(&out)[0].ts, 270_000 + 90_000 * 5 + TICKS);
    }

    #[test]
    fn first_frame_anchors_the_wallclock() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut core = Core::new(Codec::H264, BframeTs::DropB).unwrap();
        // Ingested 40 ms ago at pts 1 s: the timeline's zero was 1.04 s ago.
        let f = video(90_000, 90_000, 2, WALL0);
        core.handle_frame(t0, WALL0 + 40_000, &f);
        let out = drain(&mut core);
        let first = frames(&out)[0];
        assert_eq!(first.wallclock, t0 - Duration::from_millis(40));
        assert_eq!(first.ingest_us, WALL0);
        // Later frames keep the anchor, whatever `now` they come with.
        let f = video(90_000 + TICKS, 90_000 + TICKS, 0, WALL0 + FRAME_US);
        core.handle_frame(t0 + Duration::from_secs(1), WALL0 + 2_000_000, &f);
        let out = drain(&mut core);
        assert_eq!(
            frames(&out)[0].wallclock,
            t0 - Duration::from_millis(40) + Duration::from_micros(FRAME_US)
        );
    }
}
