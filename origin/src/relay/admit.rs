//! Which connection attempts the relay server takes, without I/O: strangers
//! still in the handshake are counted apart from authenticated links, so a
//! flood of attempts never takes a linked node's room, and capped in total
//! and per source; above a threshold, attempts from addresses QUIC has not
//! validated get a Retry first (a spoofed source never comes back, and
//! costs one stateless packet). Also rate-limits refusal logs per source.
//!
//! ```text
//! in:  incoming(source, validated) | handshake_ended(source) | link_up() | link_down()
//!      | should_log(source, now)
//! out: Decision::{Accept, Retry, Refuse(reason)}
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Caps of one relay server (`--relay-max-*` flags in the binary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Attempts in the handshake (QUIC + node) at once, from everyone.
    pub handshakes: usize,
    /// The same from one source (an IPv4 address or an IPv6 /64).
    pub handshakes_per_source: usize,
    /// Above this many attempts in the handshake, unvalidated ones get a
    /// Retry (one more round trip for real nodes, none for spoofed ones).
    pub retry_above: usize,
    /// Authenticated links: edges and ingests of a large cluster.
    pub links: usize,
    /// How long the streams of a lost link (an ingest that crashed) stay
    /// live on this server, waiting for it to come back (`--relay-hold`).
    pub hold: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Far more than a cluster's nodes reconnecting at once; each
            // holds a slot at most `HANDSHAKE_TIMEOUT`.
            handshakes: 256,
            // A rack of nodes behind one NAT restarting together fits.
            handshakes_per_source: 32,
            retry_above: 32,
            links: 1024,
            hold: super::LINK_GRACE,
        }
    }
}

/// What to do with a connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start the handshake; the caller reports its end.
    Accept,
    /// Ask the client to prove its address first.
    Retry,
    /// Refuse it; the reason is the metric label.
    Refuse(&'static str),
}

/// Refusal logs: one per source per this long.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Sources remembered for log rate-limiting; beyond it (after forgetting
/// those older than [`LOG_EVERY`]) refusals go unlogged, still counted.
const MAX_LOG_SOURCES: usize = 4096;

/// The server's count of handshakes and links.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    limits: Limits,
    /// Handshakes in progress per source; sources with none are removed.
    per_source: HashMap<IpAddr, usize>,
    handshakes: usize,
    links: usize,
    logged: HashMap<IpAddr, Instant>,
}

/// The unit the per-source cap counts: an IPv4 address, or the /64 of an
/// IPv6 address (one host usually owns a whole /64).
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// A connection attempt from `ip`; `validated`: QUIC has proof the
    /// address is real (the client answered a Retry).
    pub(crate) fn incoming(&mut self, ip: IpAddr, validated: bool) -> Decision {
        let key = source(ip);
        if self.links >= self.limits.links {
            return Decision::Refuse("busy");
        }
        if self.handshakes >= self.limits.handshakes {
            return Decision::Refuse("handshakes");
        }
        let from_source = self.per_source.get(&key).copied().unwrap_or(0);
        if from_source >= self.limits.handshakes_per_source {
            return Decision::Refuse("handshakes_per_source");
        }
        if !validated && self.handshakes >= self.limits.retry_above {
            return Decision::Retry;
        }
        self.handshakes += 1;
        *self.per_source.entry(key).or_insert(0) += 1;
        Decision::Accept
    }

    /// An accepted attempt from `ip` finished its handshake, either way.
    pub(crate) fn handshake_ended(&mut self, ip: IpAddr) {
        let key = source(ip);
        self.handshakes = self.handshakes.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&key);
            }
        }
    }

    /// An authenticated peer wants a link slot: false when all are taken.
    pub(crate) fn link_up(&mut self) -> bool {
        if self.links >= self.limits.links {
            return false;
        }
        self.links += 1;
        true
    }

    /// A link ended.
    pub(crate) fn link_down(&mut self) {
        self.links = self.links.saturating_sub(1);
    }

    /// Handshakes in progress.
    pub(crate) fn handshakes(&self) -> usize {
        self.handshakes
    }

    /// Authenticated links up.
    #[cfg(test)]
    pub(crate) fn links(&self) -> usize {
        self.links
    }

    /// Whether a refusal of `ip` at `now` may be logged: once per source per
    /// minute, from a bounded set of sources.
    pub(crate) fn should_log(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source(ip);
        if let Some(&at) = self.logged.get(&key) {
            if now.saturating_duration_since(at) < LOG_EVERY {
                return false;
            }
        } else if self.logged.len() >= MAX_LOG_SOURCES {
            self.logged
                .retain(|_, at| now.saturating_duration_since(*at) < LOG_EVERY);
            if self.logged.len() >= MAX_LOG_SOURCES {
                return false;
            }
        }
        self.logged.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn small() -> Admission {
        Admission::new(Limits {
            handshakes: 6,
            handshakes_per_source: 3,
            retry_above: 2,
            links: 2,
            ..Limits::default()
        })
    }

    #[test]
    fn strangers_are_capped_per_source_and_in_total() {
        let mut a = small();
        let (x, y, z) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        for _ in 0..3 {
            assert_eq!(a.incoming(x, true), Decision::Accept);
        }
        assert_eq!(
            a.incoming(x, true),
            Decision::Refuse("handshakes_per_source")
        );
        for _ in 0..3 {
            assert_eq!(a.incoming(y, true), Decision::Accept);
        }
        // The total is full: a third source waits for a slot.
        assert_eq!(a.incoming(z, true), Decision::Refuse("handshakes"));
        a.handshake_ended(x);
        assert_eq!(a.incoming(z, true), Decision::Accept);
        assert_eq!(a.handshakes(), 6);
        for _ in 0..3 {
            a.handshake_ended(y);
        }
        assert_eq!(a.handshakes(), 3);
        assert!(!a.per_source.contains_key(&y), "forgotten when done");
    }

    #[test]
    fn unvalidated_sources_get_a_retry_under_load() {
        let mut a = small();
        let x = ip("192.0.2.1");
        assert_eq!(a.incoming(x, false), Decision::Accept);
        assert_eq!(a.incoming(ip("192.0.2.9"), false), Decision::Accept);
        // Two in progress: from now on prove the address first.
        assert_eq!(a.incoming(ip("198.51.100.7"), false), Decision::Retry);
        assert_eq!(a.handshakes(), 2, "a retry holds no slot");
        assert_eq!(a.incoming(ip("198.51.100.7"), true), Decision::Accept);
        a.handshake_ended(x);
        a.handshake_ended(ip("192.0.2.9"));
        a.handshake_ended(ip("198.51.100.7"));
        assert_eq!(a.incoming(x, false), Decision::Accept);
    }

    #[test]
    fn links_have_their_own_room() {
        let mut a = small();
        let x = ip("192.0.2.1");
        // Two nodes authenticate and take the link slots.
        for _ in 0..2 {
            assert_eq!(a.incoming(x, true), Decision::Accept);
            a.handshake_ended(x);
            assert!(a.link_up());
        }
        assert_eq!(a.links(), 2);
        // Strangers filling the handshake slots never touch them.
        let mut b = small();
        for n in 0..6 {
            let _ = b.incoming(ip(&format!("203.0.113.{n}")), true);
        }
        assert_eq!(b.incoming(x, true), Decision::Refuse("handshakes"));
        assert!(b.link_up() && b.link_up(), "links do not wait on strangers");
        // All link slots taken: new attempts are refused before any work.
        assert_eq!(a.incoming(x, true), Decision::Refuse("busy"));
        assert!(!a.link_up());
        a.link_down();
        assert_eq!(a.incoming(x, true), Decision::Accept);
    }

    #[test]
    fn ipv6_sources_are_their_64() {
        let mut a = small();
        for n in 1..=3 {
            let host = ip(&format!("2001:db8:1:2::{n}"));
            assert_eq!(a.incoming(host, true), Decision::Accept);
        }
        assert_eq!(
            a.incoming(ip("2001:db8:1:2:ffff::1"), true),
            Decision::Refuse("handshakes_per_source")
        );
        assert_eq!(a.incoming(ip("2001:db8:1:3::1"), true), Decision::Accept);
        assert_eq!(source(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn refusal_logs_once_per_source_per_minute_from_a_bounded_set() {
        let t0 = Instant::now();
        let mut a = small();
        let x = ip("192.0.2.1");
        assert!(a.should_log(x, t0));
        assert!(!a.should_log(x, t0 + Duration::from_secs(59)));
        assert!(a.should_log(ip("192.0.2.2"), t0));
        assert!(a.should_log(x, t0 + LOG_EVERY));
        // A flood of sources: the set stays bounded.
        for n in 0..(MAX_LOG_SOURCES as u32 + 100) {
            let _ = a.should_log(IpAddr::V4(n.into()), t0 + LOG_EVERY);
        }
        assert!(a.logged.len() <= MAX_LOG_SOURCES);
        // A minute later the old ones are forgotten and logging resumes.
        assert!(a.should_log(ip("198.51.100.1"), t0 + LOG_EVERY * 2));
        assert!(a.logged.len() <= MAX_LOG_SOURCES);
    }
}
