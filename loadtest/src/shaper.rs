//! A per-viewer bandwidth cap enforced on receive (`--viewer-caps`): what a
//! Linux `tbf` qdisc does on the viewer's link, in the client. Datagrams that
//! arrive are released at the cap's rate from a bounded queue; what would
//! overflow the queue is dropped. The sender then sees what a real
//! bottleneck shows it — growing delay in its TWCC feedback, then loss —
//! so the server's bandwidth estimation can be tested without network
//! namespaces. Sans-IO: the caller passes `now` and delivers what
//! [`Shaper::pop_due`] returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How much the queue holds, in time at the cap's rate (tbf's `latency`):
/// 200 ms absorbs a keyframe burst of a rendition that fits the cap, like
/// the home routers and mobile links it stands for, and no more.
pub const QUEUE_TIME: Duration = Duration::from_millis(200);
/// The queue holds at least this many bytes whatever the rate (tbf needs a
/// burst of at least an MTU, and a queue of two datagrams drops every burst).
pub const MIN_QUEUE_BYTES: usize = 8 * 1500;

/// A tbf-like queue: rate in bit/s, drop-tail beyond its byte limit.
#[derive(Debug)]
pub struct Shaper<T> {
    rate_bps: u64,
    limit: usize,
    queued: usize,
    /// When the link finishes sending the last queued datagram.
    free_at: Option<Instant>,
    queue: VecDeque<(Instant, T, usize)>,
    dropped: u64,
    passed: u64,
}

impl<T> Shaper<T> {
    /// A cap of `rate_bps` (> 0).
    pub fn new(rate_bps: u64) -> Self {
        let rate_bps = rate_bps.max(1);
        let limit = usize::try_from(u128::from(rate_bps) * QUEUE_TIME.as_millis() / 8_000)
            .unwrap_or(usize::MAX)
            .max(MIN_QUEUE_BYTES);
        Self {
            rate_bps,
            limit,
            queued: 0,
            free_at: None,
            queue: VecDeque::new(),
            dropped: 0,
            passed: 0,
        }
    }

    /// A datagram of `len` bytes arrived at `now`: queued (true) or dropped.
    pub fn offer(&mut self, now: Instant, item: T, len: usize) -> bool {
        if self.queued + len > self.limit {
            self.dropped += 1;
            return false;
        }
        let start = self.free_at.map_or(now, |f| f.max(now));
        let nanos = (len as u128 * 8 * 1_000_000_000) / u128::from(self.rate_bps);
        let release = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.free_at = Some(release);
        self.queued += len;
        self.queue.push_back((release, item, len));
        true
    }

    /// The next datagram whose time on the link is over, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.queue.front().is_some_and(|(t, _, _)| *t <= now) {
            let (_, item, len) = self.queue.pop_front()?;
            self.queued -= len;
            self.passed += 1;
            return Some(item);
        }
        None
    }

    /// When the next datagram is released.
    pub fn next_release(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _, _)| *t)
    }

    /// Datagrams dropped at the full queue.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Datagrams released.
    pub fn passed(&self) -> u64 {
        self.passed
    }
}

/// Parses one cap: `400k`, `1.5M`, `2500000` (bit/s), or `none`.
pub fn parse_cap(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        Some((i, 'g' | 'G')) => (&t[..i], 1e9),
        _ => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n * mult >= 1_000.0 && n * mult <= 1e11 => {
            Ok(Some((n * mult) as u64))
        }
        _ => Err(format!(
            "invalid bandwidth cap {s:?}: bit/s like 400k, 1.5M, 2500000, or none"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn releases_at_the_rate_and_drops_beyond_the_queue() {
        let t0 = Instant::now();
        // 1 Mbit/s: 1000 bytes take 8 ms; the queue holds 25,000 bytes.
        let mut s = Shaper::new(1_000_000);
        let mut accepted = 0;
        for i in 0..40 {
            accepted += u32::from(s.offer(t0, i, 1000));
        }
        assert_eq!(accepted, 25);
        assert_eq!(s.dropped(), 15);
        assert_eq!(s.next_release(), Some(t0 + Duration::from_millis(8)));
        assert_eq!(s.pop_due(t0 + Duration::from_millis(7)), None);
        assert_eq!(s.pop_due(t0 + Duration::from_millis(8)), Some(0));
        // After 100 ms, 12 datagrams have left the link in all.
        let mut n = 1;
        while s.pop_due(t0 + Duration::from_millis(100)).is_some() {
            n += 1;
        }
        assert_eq!(n, 12);
        // Room again: a new arrival queues behind the rest.
        assert!(s.offer(t0 + Duration::from_millis(100), 99, 1000));
        assert_eq!(s.passed(), 12);
    }

    #[test]
    fn an_idle_link_passes_a_datagram_after_its_serialization_time() {
        let t0 = Instant::now();
        let mut s = Shaper::new(400_000);
        assert!(s.offer(t0, (), 1000));
        assert_eq!(s.next_release(), Some(t0 + Duration::from_millis(20)));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(s.pop_due(later), Some(()));
        assert!(s.offer(later, (), 500));
        assert_eq!(s.next_release(), Some(later + Duration::from_millis(10)));
    }

    #[test]
    fn parses_caps() {
        assert_eq!(parse_cap("400k"), Ok(Some(400_000)));
        assert_eq!(parse_cap("1.5M"), Ok(Some(1_500_000)));
        assert_eq!(parse_cap("1500K"), Ok(Some(1_500_000)));
        assert_eq!(parse_cap("2500000"), Ok(Some(2_500_000)));
        assert_eq!(parse_cap(" none "), Ok(None));
        for bad in ["", "k", "-1k", "0", "fast", "NaN", "10", "1e12"] {
            assert!(parse_cap(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,12}") {
            let _ = parse_cap(&s);
        }

        #[test]
        fn queue_stays_bounded(
            rate in 1_000u64..100_000_000,
            sizes in proptest::collection::vec((1usize..1500, 0u64..5_000), 1..200),
        ) {
            let t0 = Instant::now();
            let mut s = Shaper::new(rate);
            let mut now = t0;
            let mut out = 0u64;
            for (i, (len, gap_us)) in sizes.iter().enumerate() {
                now += Duration::from_micros(*gap_us);
                while s.pop_due(now).is_some() {
                    out += 1;
                }
                s.offer(now, i, *len);
                prop_assert!(s.queued <= s.limit);
            }
            prop_assert_eq!(out, s.passed());
            prop_assert_eq!(s.passed() + s.dropped() + s.queue.len() as u64, sizes.len() as u64);
        }
    }
}
