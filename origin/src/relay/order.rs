//! Puts the groups of one track back in order on the receiving side. Each
//! group travels on its own stream, so the first frame of group N+1 can
//! overtake the last frames of group N (stream priority, task scheduling).
//! Each group names its predecessor; a group is held until that one has
//! passed and ended (FIN or reset), for at most [`HOLD`]; then what it waits
//! for is abandoned. Sans-IO: the caller passes `now`, wakes at
//! [`Order::deadline`].

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
    /// The group that must pass before this one (0: none).
    prev: u64,
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
    /// Groups waiting for their predecessor to pass and `open` to end.
    held: BTreeMap<u64, Held>,
    held_frames: usize,
    held_since: Option<Instant>,
}

impl Order {
    /// A frame of `group` (whose predecessor on the track is `prev`);
    /// frames ready to write go to `out`. Returns the number of stale frames
    /// dropped (0 or 1).
    pub(crate) fn frame(
        &mut self,
        group: u64,
        prev: u64,
        frame: Frame,
        now: Instant,
        out: &mut Vec<Frame>,
    ) -> usize {
        if self.open == Some(group) {
            out.push(frame);
            return 0;
        }
        if self.is_stale(group) {
            return 1;
        }
        if self.open.is_none() && self.held.is_empty() && self.follows(prev) {
            self.open = Some(group);
            self.last = Some(group);
            out.push(frame);
            return 0;
        }
        let held = self.held.entry(group).or_default();
        held.prev = prev;
        held.frames.push(frame);
        self.held_frames += 1;
        self.held_since.get_or_insert(now);
        if self.held_frames > MAX_HELD {
            self.abandon(now, out);
        } else if self.open.is_none() {
            self.release(now, out, false);
        }
        0
    }

    /// The stream of `group` ended (finished or reset).
    pub(crate) fn end(&mut self, group: u64, prev: u64, now: Instant, out: &mut Vec<Frame>) {
        if self.open == Some(group) {
            self.open = None;
            self.release(now, out, false);
        } else if !self.is_stale(group) {
            // Possibly without a frame (reset early): successors may still
            // name it as their predecessor.
            let held = self.held.entry(group).or_default();
            held.prev = prev;
            held.ended = true;
            self.held_since.get_or_insert(now);
            if self.open.is_none() {
                self.release(now, out, false);
            }
        }
    }

    /// When [`Order::expire`] must run, if anything is held.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.held_since.map(|t| t + HOLD)
    }

    /// Gives up on what the held groups wait for, if they waited too long.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<Frame>) -> bool {
        if self.deadline().is_some_and(|d| now >= d) {
            self.abandon(now, out);
            return true;
        }
        false
    }

    fn is_stale(&self, group: u64) -> bool {
        self.last.is_some_and(|l| group <= l)
    }

    /// True once the predecessor `prev` has passed (or there is none).
    fn follows(&self, prev: u64) -> bool {
        prev == 0 || self.last.is_some_and(|l| prev <= l)
    }

    fn abandon(&mut self, now: Instant, out: &mut Vec<Frame>) {
        self.open = None;
        self.release(now, out, true);
    }

    /// Nothing is open: pass held groups through, oldest first, while each
    /// follows its predecessor (the first one regardless when `force`),
    /// until one that is still open.
    fn release(&mut self, now: Instant, out: &mut Vec<Frame>, mut force: bool) {
        let mut released = false;
        while let Some((_, first)) = self.held.first_key_value() {
            if !force && !self.follows(first.prev) {
                break;
            }
            force = false;
            let Some((group, held)) = self.held.pop_first() else {
                break;
            };
            released = true;
            self.held_frames = self.held_frames.saturating_sub(held.frames.len());
            self.last = Some(group);
            out.extend(held.frames);
            if !held.ended {
                self.open = Some(group);
                break;
            }
        }
        if self.held.is_empty() {
            self.held_since = None;
        } else if released {
            // What is left waits afresh for the group just opened.
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
        o.frame(1, 0, f(1), now, &mut out);
        o.frame(1, 0, f(2), now, &mut out);
        o.end(1, 0, now, &mut out);
        o.frame(3, 1, f(3), now, &mut out);
        assert_eq!(pts(&out), [1, 2, 3]);
        assert!(o.deadline().is_none());
    }

    #[test]
    fn newer_group_waits_for_the_older_tail() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, 0, f(1), now, &mut out);
        o.frame(2, 1, f(10), now, &mut out); // overtook the tail of group 1
        o.frame(1, 0, f(2), now, &mut out);
        assert_eq!(pts(&out), [1, 2]);
        o.end(1, 0, now, &mut out);
        o.frame(2, 1, f(11), now, &mut out);
        assert_eq!(pts(&out), [1, 2, 10, 11]);
        // Late frames of an ended group are stale.
        assert_eq!(o.frame(1, 0, f(3), now, &mut out), 1);
    }

    #[test]
    fn a_group_arriving_after_its_successor_is_not_lost() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, 0, f(1), now, &mut out);
        o.end(1, 0, now, &mut out);
        // Group 5 (after 3) shows up before group 3 does at all.
        o.frame(5, 3, f(50), now, &mut out);
        assert_eq!(pts(&out), [1]);
        o.frame(3, 1, f(30), now, &mut out);
        o.end(3, 1, now, &mut out);
        assert_eq!(pts(&out), [1, 30, 50]);
    }

    #[test]
    fn a_predecessor_reset_before_any_frame_still_lets_successors_pass() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, 0, f(1), now, &mut out);
        o.end(1, 0, now, &mut out);
        o.frame(5, 3, f(50), now, &mut out);
        o.end(3, 1, now, &mut out); // group 3 reset with nothing delivered
        assert_eq!(pts(&out), [1, 50]);
        assert!(o.deadline().is_none());
    }

    #[test]
    fn stalled_group_is_abandoned_after_hold() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, 0, f(1), now, &mut out);
        o.frame(2, 1, f(10), now, &mut out);
        o.frame(3, 2, f(20), now, &mut out);
        o.end(2, 1, now, &mut out); // group 2 complete but still behind group 1
        assert!(!o.expire(now + HOLD / 2, &mut out));
        assert!(o.expire(now + HOLD, &mut out));
        assert_eq!(pts(&out), [1, 10, 20]);
        o.frame(3, 2, f(21), now, &mut out);
        assert_eq!(o.frame(1, 0, f(2), now, &mut out), 1);
        assert_eq!(pts(&out), [1, 10, 20, 21]);
    }

    #[test]
    fn a_missing_predecessor_is_given_up_after_hold() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, 0, f(1), now, &mut out);
        o.end(1, 0, now, &mut out);
        o.frame(5, 3, f(50), now, &mut out); // group 3 never comes
        assert_eq!(o.deadline(), Some(now + HOLD));
        assert!(o.expire(now + HOLD, &mut out));
        assert_eq!(pts(&out), [1, 50]);
        assert_eq!(o.frame(3, 1, f(30), now, &mut out), 1);
    }

    #[test]
    fn holding_is_bounded() {
        let (mut o, now, mut out) = (Order::default(), Instant::now(), Vec::new());
        o.frame(1, 0, f(0), now, &mut out);
        for n in 0..=MAX_HELD as u64 {
            o.frame(2, 1, f(n + 1), now, &mut out);
        }
        assert_eq!(out.len(), MAX_HELD + 2);
        assert!(o.deadline().is_none());
    }
}
