//! What a viewer sends next on one track, independent of str0m: first the
//! cached group with compressed timestamps (fast start), then the live ring;
//! after lagging, nothing until the next keyframe.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::TryRecvError;

use crate::fanout::{PacketizedFrame, Receiver};

/// Spacing of compressed backlog timestamps (fast start), in milliseconds:
/// distinct timestamps (receivers delimit frames by them), close enough that
/// a 3 s group adds ~90 ms to the receiver's first-frame anchor.
const BACKLOG_STEP_MS: u64 = 1;

/// What to do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Send this frame with this timestamp (edge timeline) and wall clock.
    Frame(Arc<PacketizedFrame>, u64, Instant),
    /// Fell behind the ring: frames are skipped up to the next keyframe.
    Lagged,
    /// Nothing more now (ring empty, or this wake's backlog budget spent).
    Idle,
    /// The feed ended.
    Closed,
}

/// A viewer's position on one track.
#[derive(Debug)]
pub(crate) struct Cursor {
    clock: u64,
    rx: Option<Receiver>,
    backlog: VecDeque<(Arc<PacketizedFrame>, u64, Instant)>,
    waiting_keyframe: bool,
    /// Times this cursor skipped to a keyframe.
    pub(crate) skips: u64,
}

impl Cursor {
    /// A cursor on a track with `clock` Hz timestamps; video starts only at
    /// a keyframe.
    pub(crate) fn new(clock: u32, video: bool) -> Self {
        Self {
            clock: u64::from(clock.max(1)),
            rx: None,
            backlog: VecDeque::new(),
            waiting_keyframe: video,
            skips: 0,
        }
    }

    /// Starts from the cached `group` (keyframe first), then `rx`. The
    /// group's timestamps are compressed towards its newest frame, which keeps
    /// its live timestamp: the receiver decodes the backlog at once and its
    /// playout clock anchors near live instead of at the group's start.
    pub(crate) fn start(&mut self, group: Vec<Arc<PacketizedFrame>>, rx: Receiver) {
        self.rx = Some(rx);
        let step = (self.clock * BACKLOG_STEP_MS / 1000).max(1);
        let newest = group.last().map_or(0, |f| f.ts);
        let n = group.len();
        for (i, f) in group.into_iter().enumerate() {
            let behind = u64::try_from(n - 1 - i).unwrap_or(0).saturating_mul(step);
            let ts = f.ts.max(newest.saturating_sub(behind));
            let lead = Duration::from_micros((ts - f.ts).saturating_mul(1_000_000) / self.clock);
            let wallclock = f.wallclock.checked_add(lead).unwrap_or(f.wallclock);
            self.backlog.push_back((f, ts, wallclock));
        }
    }

    /// Starts from the live ring only (a rendition switch: the cached group
    /// is the past, the viewer already has a picture).
    pub(crate) fn start_live(&mut self, rx: Receiver) {
        self.rx = Some(rx);
    }

    /// Reading a feed already ([`Self::start`] or [`Self::start_live`]).
    pub(crate) fn started(&self) -> bool {
        self.rx.is_some()
    }

    /// The track clock, Hz.
    pub(crate) fn clock(&self) -> u64 {
        self.clock
    }

    /// True while cached frames remain to be sent.
    pub(crate) fn in_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Drops what is queued and waits for the next keyframe.
    pub(crate) fn skip_to_keyframe(&mut self) {
        self.backlog.clear();
        self.waiting_keyframe = true;
        self.skips += 1;
    }

    /// The next frame to send. Backlog frames spend `budget` (packets); the
    /// ring waits behind the backlog.
    pub(crate) fn next(&mut self, budget: &mut usize) -> Next {
        loop {
            let (f, ts, wallclock) = if !self.backlog.is_empty() {
                if *budget == 0 {
                    return Next::Idle;
                }
                let Some(entry) = self.backlog.pop_front() else {
                    return Next::Idle;
                };
                *budget = budget.saturating_sub(entry.0.payloads.len().max(1));
                if self.backlog.is_empty() {
                    // Release the group's slots: viewers live long, groups once.
                    self.backlog = VecDeque::new();
                }
                entry
            } else {
                let Some(rx) = self.rx.as_mut() else {
                    return Next::Idle;
                };
                match rx.try_recv() {
                    Ok(f) => {
                        let (ts, wallclock) = (f.ts, f.wallclock);
                        (f, ts, wallclock)
                    }
                    Err(TryRecvError::Empty) => return Next::Idle,
                    Err(TryRecvError::Lagged(_)) => {
                        self.skip_to_keyframe();
                        return Next::Lagged;
                    }
                    Err(TryRecvError::Closed) => return Next::Closed,
                }
            };
            if self.waiting_keyframe {
                if !f.keyframe {
                    continue;
                }
                self.waiting_keyframe = false;
            }
            return Next::Frame(f, ts, wallclock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::{Feed, FANOUT_FRAMES};
    use crate::packetize::Payload;
    use cascade_origin::catalog::Kind;

    fn frame(ts: u64, keyframe: bool, packets: usize, at: Instant) -> Arc<PacketizedFrame> {
        Arc::new(PacketizedFrame {
            payloads: vec![
                Payload {
                    data: Arc::from(&[1u8][..]),
                    marker: false
                };
                packets
            ],
            ts,
            keyframe,
            ingest_us: 0,
            wallclock: at + Duration::from_micros(ts * 1_000_000 / 90_000),
        })
    }

    fn frames(c: &mut Cursor, budget: &mut usize) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        loop {
            match c.next(budget) {
                Next::Frame(f, ts, _) => out.push((ts, f.keyframe)),
                Next::Lagged => {}
                Next::Idle | Next::Closed => return out,
            }
        }
    }

    #[test]
    fn backlog_is_compressed_towards_live() {
        let t0 = Instant::now();
        let feed = Feed::detached("s", "video", Kind::Video);
        for i in 0..10u64 {
            feed.publish(frame(i * 3000, i == 0, 1, t0));
        }
        let (group, rx) = feed.subscribe().unwrap();
        let mut c = Cursor::new(90_000, true);
        c.start(group, rx);
        let mut budget = usize::MAX;
        let got = frames(&mut c, &mut budget);
        let want: Vec<(u64, bool)> = (0..10u64)
            .map(|i| (27_000 - (9 - i) * 90, i == 0))
            .collect();
        assert_eq!(got, want, "1 ms apart, newest unchanged");
        feed.publish(frame(30_000, false, 1, t0));
        assert_eq!(frames(&mut c, &mut budget), vec![(30_000, false)]);
    }

    #[test]
    fn backlog_spends_the_budget_and_the_ring_waits() {
        let t0 = Instant::now();
        let feed = Feed::detached("s", "video", Kind::Video);
        for i in 0..5u64 {
            feed.publish(frame(i * 3000, i == 0, 10, t0));
        }
        let (group, rx) = feed.subscribe().unwrap();
        let mut c = Cursor::new(90_000, true);
        c.start(group, rx);
        feed.publish(frame(15_000, false, 10, t0));
        let mut budget = 24;
        assert_eq!(frames(&mut c, &mut budget).len(), 3);
        assert!(c.in_backlog());
        let mut budget = 24;
        let got = frames(&mut c, &mut budget);
        assert_eq!(got.len(), 3, "two cached frames, then the ring");
        assert_eq!(got[2], (15_000, false));
    }

    #[test]
    fn lagging_skips_to_the_next_keyframe() {
        let t0 = Instant::now();
        let feed = Feed::detached("s", "video", Kind::Video);
        feed.publish(frame(0, true, 1, t0));
        let (group, rx) = feed.subscribe().unwrap();
        let mut c = Cursor::new(90_000, true);
        c.start(group, rx);
        let mut budget = usize::MAX;
        assert_eq!(frames(&mut c, &mut budget).len(), 1);
        for i in 1..(FANOUT_FRAMES as u64 + 20) {
            feed.publish(frame(i * 3000, false, 1, t0));
        }
        assert!(matches!(c.next(&mut budget), Next::Lagged));
        assert_eq!(c.skips, 1);
        assert!(
            matches!(c.next(&mut budget), Next::Idle),
            "delta frames skipped"
        );
        // The keyframe resumes (the ring overran again meanwhile: counted).
        feed.publish(frame(1_000_000, true, 1, t0));
        feed.publish(frame(1_003_000, false, 1, t0));
        assert_eq!(
            frames(&mut c, &mut budget),
            vec![(1_000_000, true), (1_003_000, false)]
        );
    }

    #[test]
    fn audio_needs_no_keyframe_and_end_closes() {
        let t0 = Instant::now();
        let feed = Feed::detached("s", "audio", Kind::Audio);
        let (group, rx) = feed.subscribe().unwrap();
        let mut c = Cursor::new(48_000, false);
        c.start(group, rx);
        feed.publish(frame(960, true, 1, t0));
        let mut budget = usize::MAX;
        assert_eq!(frames(&mut c, &mut budget), vec![(960, true)]);
        feed.end();
        assert!(matches!(c.next(&mut budget), Next::Closed));
    }
}
