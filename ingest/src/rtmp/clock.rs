//! FLV timestamps (32-bit milliseconds, wrapping after ~49.7 days, reset or
//! jumping when an encoder restarts its clock) to one monotonic u64
//! millisecond timeline per publisher, shared by audio and video so that a
//! rebase keeps them in sync. Sans-IO: the caller passes the wall clock.

/// A step back larger than this is a jump, not audio/video interleaving.
pub const MAX_BACKWARD_MS: i64 = 1_000;
/// A step forward larger than the wall clock time elapsed plus this is a
/// jump, not a burst of buffered frames.
pub const MAX_AHEAD_MS: i64 = 10_000;

/// The timeline of one publisher.
#[derive(Debug, Default)]
pub struct Clock {
    last: Option<Last>,
    jumps: u64,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    raw: u32,
    wall_ms: u64,
    out: u64,
}

impl Clock {
    /// A timeline that starts at the wall clock time of its first timestamp,
    /// so that a publisher taking a stream over continues forward in time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps an FLV timestamp seen at wall clock `now_ms` to the timeline.
    pub fn map(&mut self, raw: u32, now_ms: u64) -> u64 {
        let out = match self.last {
            None => now_ms,
            Some(last) => {
                // Wrapping difference: a 32-bit wrap is a small step.
                let delta = i64::from(raw.wrapping_sub(last.raw) as i32);
                let wall = i64::try_from(now_ms.saturating_sub(last.wall_ms)).unwrap_or(i64::MAX);
                if delta < -MAX_BACKWARD_MS || delta > wall.saturating_add(MAX_AHEAD_MS) {
                    // Rebase: continue where the wall clock says we are.
                    self.jumps += 1;
                    last.out.saturating_add(u64::try_from(wall).unwrap_or(0))
                } else {
                    last.out.saturating_add_signed(delta)
                }
            }
        };
        self.last = Some(Last {
            raw,
            wall_ms: now_ms,
            out,
        });
        out
    }

    /// Moves the timeline forward by `ms` from the last timestamp on: used
    /// when one track stepped back on its own (a per-track jump the shared
    /// clock tolerates as interleaving), so both tracks move together.
    pub fn advance(&mut self, ms: u64) {
        if let Some(last) = &mut self.last {
            last.out = last.out.saturating_add(ms);
            self.jumps += 1;
        }
    }

    /// Jumps rebased so far.
    pub fn jumps(&self) -> u64 {
        self.jumps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_deltas_and_wraps() {
        let mut c = Clock::new();
        let start = 1_000_000;
        assert_eq!(c.map(u32::MAX - 10, start), start);
        assert_eq!(c.map(u32::MAX, start + 10), start + 10);
        assert_eq!(c.map(22, start + 33), start + 33);
        // Audio slightly behind video is interleaving, not a jump.
        assert_eq!(c.map(2, start + 34), start + 13);
        assert_eq!(c.jumps(), 0);
    }

    #[test]
    fn rebases_jumps_on_the_wall_clock() {
        let mut c = Clock::new();
        let t0 = 5_000;
        c.map(1_000, t0);
        assert_eq!(c.map(1_040, t0 + 40), t0 + 40);
        // Encoder restarted its clock at 0.
        assert_eq!(c.map(0, t0 + 80), t0 + 80);
        assert_eq!(c.map(40, t0 + 120), t0 + 120);
        // A one-hour leap forward.
        assert_eq!(c.map(3_600_040, t0 + 160), t0 + 160);
        assert_eq!(c.jumps(), 2);
    }

    proptest! {
        #[test]
        fn never_panics_and_tracks_small_steps(steps in proptest::collection::vec((any::<u32>(), 0u64..100), 1..200)) {
            let mut c = Clock::new();
            let mut now = 0u64;
            for (raw, dt) in steps {
                now += dt;
                let _ = c.map(raw, now);
            }
        }
    }
}
