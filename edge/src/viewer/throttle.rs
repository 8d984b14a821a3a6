//! A short token bucket in front of str0m for one viewer's video, right
//! after a switch down that a lossy receiver report decided (sans-IO).
//!
//! Why: at such a switch the link has just narrowed under the old
//! rendition, its bottleneck queue is full of it, and str0m's pacer still
//! runs at ~1.1 × an estimate that has not caught up (1.2–1.7 Mbit/s into a
//! 0.4 Mbit/s link, Chromium in tests/browser_abr.rs). The new rendition's
//! keyframe went out at that rate into the full queue, most of its packets
//! were dropped, and their resends took another trip through the queue:
//! the freeze at the drop. The report says what the link delivered; the
//! viewer lets the keyframe and the frames behind it into str0m at a share
//! of that ([`RATE_SHARE`]), for at most [`PACE_FOR`], so the queue drains
//! instead of overflowing. str0m's own pacer and estimator are untouched
//! (restarting the estimator instead was tried: docs/quality.md).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The share of the delivered rate the video is let out at. At the switch
/// the bottleneck's queue is full of the old rendition; what arrives while
/// it is full is dropped, so the video must come in under the link's rate
/// (the delivered rate is the video's alone, the audio's ~40–50 kbit/s
/// come on top) for the queue to drain. Without drops the keyframe lands
/// once the queue and itself have crossed the link, whatever the share,
/// until the share makes the keyframe itself the slower part. Chromium
/// behind 400 kbit/s (tests/browser_abr.rs): at 1.0 × the delivered rate
/// the keyframe lost up to 89% in the queue and one drop froze 3.3 s.
pub const RATE_SHARE: f64 = 0.7;
/// The longest a switch is throttled; what is still held then goes to
/// str0m at once (its pacer has had the time to follow the link).
pub const PACE_FOR: Duration = Duration::from_millis(1500);
/// At most this many packets are held (a 1.5 s window of a low rendition
/// is ~200); past it everything goes to str0m.
pub const MAX_HELD: usize = 1024;
/// Credit never builds beyond this (bytes): one burst of a few packets, so
/// a pause does not turn into a flood.
const MAX_CREDIT: f64 = 4.0 * 1200.0;

/// Holds items of known size and lets them out at a rate.
#[derive(Debug)]
pub struct Throttle<T> {
    /// Bytes per second.
    rate: f64,
    /// Bytes that may go now (may fall below zero by one packet).
    credit: f64,
    last: Instant,
    until: Instant,
    held: VecDeque<(usize, T)>,
}

impl<T> Throttle<T> {
    /// A throttle at `rate_bps` × [`RATE_SHARE`] from `now` for [`PACE_FOR`],
    /// starting with one packet's credit.
    pub fn new(now: Instant, rate_bps: u64) -> Self {
        Self {
            rate: rate_bps as f64 * RATE_SHARE / 8.0,
            credit: 1200.0,
            last: now,
            until: now + PACE_FOR,
            held: VecDeque::new(),
        }
    }

    /// Queues an item of `bytes`.
    pub fn push(&mut self, bytes: usize, item: T) {
        self.held.push_back((bytes, item));
    }

    /// Items held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The throttle's time is up (or it holds too much): the caller lets
    /// everything go with [`Self::drain`] and drops it.
    pub fn is_over(&self, now: Instant) -> bool {
        now >= self.until || self.held.len() > MAX_HELD
    }

    /// Lets out, in order, what the credit earned up to `now` allows: an
    /// item goes while the credit is positive, and its size is taken off.
    pub fn release(&mut self, now: Instant, mut out: impl FnMut(T)) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.credit = (self.credit + dt * self.rate).min(MAX_CREDIT);
        while self.credit > 0.0 {
            let Some((bytes, item)) = self.held.pop_front() else {
                break;
            };
            self.credit -= bytes as f64;
            out(item);
        }
    }

    /// Lets out everything held, in order.
    pub fn drain(&mut self, mut out: impl FnMut(T)) {
        for (_, item) in self.held.drain(..) {
            out(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn lets_out_at_the_share_of_the_rate_in_order() {
        let t0 = Instant::now();
        // 320 kbit/s = 40 000 bytes/s.
        let mut t = Throttle::new(t0, (320_000.0 / RATE_SHARE) as u64);
        for i in 0..100u32 {
            t.push(1000, i);
        }
        let mut out = Vec::new();
        t.release(t0, |i| out.push(i));
        assert_eq!(out, vec![0, 1], "one packet's credit at the start");
        for k in 1..=50 {
            t.release(t0 + ms(10 * k), |i| out.push(i));
        }
        // 0.5 s: 20 000 bytes earned + the first 1 200.
        assert!((20..=23).contains(&out.len()), "{}", out.len());
        assert!(out.windows(2).all(|w| w[0] + 1 == w[1]));
        assert!(!t.is_over(t0 + ms(500)));
        assert!(t.is_over(t0 + PACE_FOR));
        t.drain(|i| out.push(i));
        assert_eq!(out.len(), 100);
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn a_pause_does_not_become_a_flood() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0, 400_000);
        t.release(t0, |_: u32| {});
        // Nothing held for a second, then a burst.
        for i in 0..50 {
            t.push(1200, i);
        }
        let mut n = 0;
        t.release(t0 + ms(1000), |_| n += 1);
        assert!(n <= 5, "{n}");
    }

    #[test]
    fn too_much_held_ends_it() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0, 100_000);
        for i in 0..=MAX_HELD {
            t.push(1000, i);
        }
        assert!(t.is_over(t0));
    }
}
