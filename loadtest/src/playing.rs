//! Which viewers of a load run are playing right now, and how often one stalled: the soak
//! run (`scripts/soak.py`) needs "every viewer that rejoined plays again" and "nothing stuck",
//! which connected/failed counts cannot say.
//!
//! Sans-IO: each viewer task publishes its live flag and video frame count in a [`Slot`];
//! the run's once-a-second tick hands the values to [`PlayWatch::tick`]. A viewer is
//! *playing* when its video frame count grew since the previous tick; a *stall* is a viewer
//! that had played and then received no video frame for a whole tick (≥ 1 s at 30 fps),
//! counted once per episode.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One viewer's progress, written by its task and read by the tick.
#[derive(Debug, Default)]
pub struct Slot {
    /// The session is up (started and not yet stopped).
    pub live: AtomicBool,
    /// Video frames received so far by this session.
    pub frames: AtomicU64,
}

impl Slot {
    /// The values the tick reads: (live, frames).
    pub fn sample(&self) -> (bool, u64) {
        (
            self.live.load(Ordering::Relaxed),
            self.frames.load(Ordering::Relaxed),
        )
    }
}

/// Per-viewer state between ticks.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Frame count at the previous tick while live (`None`: not live then).
    last: Option<u64>,
    /// In a stall episode (counted already).
    stalled: bool,
}

/// Counts playing viewers and stall episodes from successive samples.
#[derive(Debug, Default)]
pub struct PlayWatch {
    seen: Vec<Seen>,
    stalls: u64,
}

impl PlayWatch {
    /// A watch over `n` viewers.
    pub fn new(n: usize) -> Self {
        Self {
            seen: vec![Seen::default(); n],
            stalls: 0,
        }
    }

    /// One tick: `samples[i]` is viewer `i`'s (live, frames). Returns how many viewers
    /// played since the previous tick.
    pub fn tick(&mut self, samples: &[(bool, u64)]) -> u64 {
        let mut playing = 0;
        for (seen, &(live, frames)) in self.seen.iter_mut().zip(samples) {
            if !live {
                *seen = Seen::default();
                continue;
            }
            let prev = seen.last.unwrap_or(0);
            if frames > prev {
                playing += 1;
                seen.stalled = false;
            } else if prev > 0 && !seen.stalled {
                self.stalls += 1;
                seen.stalled = true;
            }
            seen.last = Some(frames);
        }
        playing
    }

    /// Stall episodes so far.
    pub fn stalls(&self) -> u64 {
        self.stalls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_viewer_plays_while_frames_grow() {
        let mut w = PlayWatch::new(2);
        assert_eq!(
            w.tick(&[(true, 0), (false, 0)]),
            0,
            "connected, no frame yet"
        );
        assert_eq!(w.tick(&[(true, 30), (true, 0)]), 1);
        assert_eq!(w.tick(&[(true, 60), (true, 25)]), 2);
        assert_eq!(w.stalls(), 0, "waiting for the first frame is not a stall");
    }

    #[test]
    fn a_stall_counts_once_per_episode() {
        let mut w = PlayWatch::new(1);
        w.tick(&[(true, 30)]);
        assert_eq!(w.tick(&[(true, 30)]), 0);
        assert_eq!(w.tick(&[(true, 30)]), 0);
        assert_eq!(w.stalls(), 1, "one episode over two silent ticks");
        assert_eq!(w.tick(&[(true, 40)]), 1);
        w.tick(&[(true, 40)]);
        assert_eq!(w.stalls(), 2, "a second episode after it played again");
    }

    #[test]
    fn leaving_and_rejoining_starts_afresh() {
        let mut w = PlayWatch::new(1);
        w.tick(&[(true, 30)]);
        assert_eq!(
            w.tick(&[(false, 30)]),
            0,
            "stopped: neither playing nor stalled"
        );
        // The slot's next session starts its count at zero again.
        assert_eq!(w.tick(&[(true, 0)]), 0);
        assert_eq!(w.tick(&[(true, 20)]), 1);
        assert_eq!(w.stalls(), 0);
    }
}
