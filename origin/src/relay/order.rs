//! Puts the groups of one track back in order on the receiving side. Each
//! group travels on its own stream, so the first frame of group N+1 can
//! overtake the last frames of group N (stream priority, task scheduling).
//! A newer group is held until the older one ends (FIN or reset), for at
//! most [`HOLD`]; then the older one is abandoned. Sans-IO: the caller passes
//! `now` and wakes at [`Order::deadline`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::model::frame::Frame;

/// Longest a newer group waits for the older one to end: far above the
/// reordering a healthy link produces, short enough that a stalled group
/// costs viewers little. The sender resets such a group later anyway.
pub(crate) const HOLD: Duration = Duration::from_millis(200);
/// Frames a track may hold while waiting: a GOP of 60 fps video.
const MAX_HELD: usize = 256;

#[derive(Default)]
struct Held {
    frames: Vec<Frame>,
    ended: bool,
}

/// The ordering state of one track.
#[derive(Default)]
pub(crate) struct Order {
    /// The group being passed through, while its stream is open.
    open: Option<u64>,
    /// The newest group passed through (open or ended); older ones are stale.
    last: Option<u64>,
    /// Newer groups waiting for `open` to end.
    held: BTreeMap<u64, Held>,
    held_frames: usize,
    held_since: Option<Instant>,
}

impl Order {
    /// A frame of `group`; frames ready to write go to `out`. Returns the
    /// number of stale frames dropped (0 or 1).
    pub(crate) fn frame(
        &mut self,
        group: u64,
        frame: Frame,
        now: Instant,
        out: &mut Vec<Frame>,
    ) -> usize {
        if self.open == Some(group) {
            out.push(frame);
            return 0;
        }
        if self.last.is_some_and(|l| group <= l) {
            return 1;
        }
        if self.open.is_none() {
            self.open = Some(group);
            self.last = Some(group);
            out.push(frame);
            return 0;
        }
        self.held.entry(group).or_default().frames.push(frame);
        self.held_frames += 1;
        self.held_since.get_or_insert(now);
        if self.held_frames > MAX_HELD {
            self.abandon(now, out);
        }
        0
    }

    /// The stream of `group` ended (finished or reset).
    pub(crate) fn end(&mut self, group: u64, now: Instant, out: &mut Vec<Frame>) {
        if self.open == Some(group) {
            self.open = None;
            self.release(now, out);
        } else if let Some(h) = self.held.get_mut(&group) {
            h.ended = true;
        }
    }

    /// When [`Order::expire`] must run, if anything is held.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.held_since.map(|t| t + HOLD)
    }

    /// Abandons the open group if newer ones waited too long.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<Frame>) -> bool {
        if self.deadline().is_some_and(|d| now >= d) {
            self.abandon(now, out);
            return true;
        }
        false
    }

    fn abandon(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.open = None;
        self.release(now, out);
    }

    /// The open group is over: pass the held groups through, oldest first,
    /// until one that is still open.
    fn release(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.held_since = None;
        while let Some((group, held)) = self.held.pop_first() {
            self.held_frames = self.held_frames.saturating_sub(held.frames.len());
            self.last = Some(group);
            out.extend(held.frames);
            if !held.ended {
                self.open = Some(group);
                break;
            }
        }
        if !self.held.is_empty() {
            self.held_since = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f(n: u64) -> Frame {
        Frame {
            payload: Bytes::new(),
            pts: n,
            dts: n,
            keyframe: false,
            ingest_us: 0,
        }
    }

    fn pts(v: &[Frame]) -> Vec<u64> {
        v.iter().map(|f| f.pts).collect()
    }

    #[test]
    fn in_order_groups_pass_straight_through() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, f(1), now, &mut out);
        o.frame(1, f(2), now, &mut out);
        o.end(1, now, &mut out);
        o.frame(2, f(3), now, &mut out);
        assert_eq!(pts(&out), [1, 2, 3]);
        assert!(o.deadline().is_none());
    }

    #[test]
    fn newer_group_waits_for_the_older_tail() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, f(1), now, &mut out);
        o.frame(2, f(10), now, &mut out); // overtook the tail of group 1
        o.frame(1, f(2), now, &mut out);
        assert_eq!(pts(&out), [1, 2]);
        o.end(1, now, &mut out);
        o.frame(2, f(11), now, &mut out);
        assert_eq!(pts(&out), [1, 2, 10, 11]);
        // Late frames of an ended group are stale.
        assert_eq!(o.frame(1, f(3), now, &mut out), 1);
    }

    #[test]
    fn stalled_group_is_abandoned_after_hold() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, f(1), now, &mut out);
        o.frame(2, f(10), now, &mut out);
        o.frame(3, f(20), now, &mut out);
        o.end(2, now, &mut out); // group 2 complete but still behind group 1
        assert!(!o.expire(now + HOLD / 2, &mut out));
        assert!(o.expire(now + HOLD, &mut out));
        assert_eq!(pts(&out), [1, 10, 20]);
        o.frame(3, f(21), now, &mut out);
        assert_eq!(o.frame(1, f(2), now, &mut out), 1);
        assert_eq!(pts(&out), [1, 10, 20, 21]);
    }

    #[test]
    fn holding_is_bounded() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, f(0), now, &mut out);
        for n in 0..=MAX_HELD as u64 {
            o.frame(2, f(n + 1), now, &mut out);
        }
        assert_eq!(out.len(), MAX_HELD + 2);
        assert!(o.deadline().is_none());
    }
}
