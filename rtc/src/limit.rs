//! Small building blocks for limits that must hold under abuse: a count of
//! open connections per source IP ([`PerIp`], handing out Drop guards like
//! pingora's inflight counters), a log throttle that lets one line per
//! source through per minute ([`LogOnce`]) and a ban on sources that sent
//! too many wrong tokens ([`AuthFailures`], shared as [`AuthGate`] by WHIP,
//! WHEP, the WebSocket and RTMP). All are plain data: callers pass the time
//! in, nothing here reads a clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often one source may be logged about one refusal.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// Sources remembered by a [`LogOnce`]; past it, entries older than
/// [`LOG_EVERY`] are forgotten (and if all are recent, the oldest go), so a
/// spoofed-address flood cannot grow it without bound.
const LOG_SOURCES: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open connections per source IP, capped. Cloning shares the counts.
#[derive(Clone, Debug)]
pub struct PerIp {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct IpGuard {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    /// At most `max` connections per IP (0 = no limit).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A place for one more connection from `ip`, or `None` at the cap.
    pub fn acquire(&self, ip: IpAddr) -> Option<IpGuard> {
        let ip = canonical(ip);
        let mut open = lock(&self.open);
        let n = open.entry(ip).or_insert(0);
        if self.max != 0 && *n >= self.max {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpGuard {
            ip,
            open: self.open.clone(),
        })
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        lock(&self.open).get(&canonical(ip)).copied().unwrap_or(0)
    }

    /// Source IPs with at least one open connection (the map's size).
    pub fn sources(&self) -> usize {
        lock(&self.open).len()
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An IPv4 peer reached over an IPv6 socket counts as its IPv4 address.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Lets one log line per source through per [`LOG_EVERY`].
#[derive(Debug, Default)]
pub struct LogOnce {
    last: HashMap<IpAddr, Instant>,
}

impl LogOnce {
    /// True when `ip` was not logged about in the last minute (and notes it).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let ip = canonical(ip);
        if let Some(t) = self.last.get(&ip) {
            if now.saturating_duration_since(*t) < LOG_EVERY {
                return false;
            }
        }
        if self.last.len() >= LOG_SOURCES && !self.last.contains_key(&ip) {
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < LOG_EVERY);
            if self.last.len() >= LOG_SOURCES {
                // All recent: a flood of sources. Forget them; at worst a
                // source is logged twice within a minute.
                self.last.clear();
            }
        }
        self.last.insert(ip, now);
        true
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// A [`LogOnce`] shared between tasks.
#[derive(Clone, Debug, Default)]
pub struct SharedLogOnce(Arc<Mutex<LogOnce>>);

impl SharedLogOnce {
    /// [`LogOnce::allow`] under the lock.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        lock(&self.0).allow(ip, now)
    }
}

/// Window over which wrong tokens are counted, and how long a ban lasts.
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Default [`AuthFailures`] maximum: wrong tokens per source per window.
pub const DEFAULT_AUTH_MAX_FAILURES: u32 = 10;
/// Sources an [`AuthFailures`] remembers (bounded like [`LogOnce`]).
const AUTH_SOURCES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Failures {
    /// Start of the counting window.
    since: Instant,
    count: u32,
    /// Set when `count` reached the maximum: refused until then.
    banned_until: Option<Instant>,
}

impl Failures {
    fn stale(&self, now: Instant) -> bool {
        self.banned_until.is_none_or(|b| now >= b)
            && now.saturating_duration_since(self.since) >= AUTH_WINDOW
    }
}

/// Wrong (or missing) tokens per source IP: after `max` of them within
/// [`AUTH_WINDOW`], the source is banned for one [`AUTH_WINDOW`] from the
/// failure that reached the maximum. The ban is on the address, not on the
/// token: a right token from a banned address is refused too, otherwise a
/// guesser could ignore the 429s and still learn when a guess is right (as
/// MediaMTX and OvenMediaEngine do). Attempts refused while banned do not
/// extend the ban.
#[derive(Debug)]
pub struct AuthFailures {
    max: u32,
    by_ip: HashMap<IpAddr, Failures>,
}

impl AuthFailures {
    /// At most `max` wrong tokens per source per minute (0 = no limit).
    pub fn new(max: u32) -> Self {
        Self {
            max,
            by_ip: HashMap::new(),
        }
    }

    /// How long `ip` must still wait, or `None` when it may try a token.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let until = self.by_ip.get(&canonical(ip))?.banned_until?;
        (now < until).then(|| until - now)
    }

    /// Notes a wrong or missing token from `ip`; returns the ban it starts
    /// (when this failure reached the maximum).
    pub fn fail(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.max == 0 {
            return None;
        }
        let ip = canonical(ip);
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= AUTH_SOURCES {
            self.evict(now);
        }
        let f = self.by_ip.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            banned_until: None,
        });
        if f.stale(now) {
            *f = Failures {
                since: now,
                count: 0,
                banned_until: None,
            };
        }
        if f.banned_until.is_some_and(|b| now < b) {
            return None;
        }
        f.count = f.count.saturating_add(1);
        if f.count >= self.max {
            f.banned_until = Some(now + AUTH_WINDOW);
            return Some(AUTH_WINDOW);
        }
        None
    }

    /// Makes room: forget stale sources, then unbanned ones, then (a flood
    /// of banned sources) the oldest, so memory stays bounded.
    fn evict(&mut self, now: Instant) {
        self.by_ip.retain(|_, f| !f.stale(now));
        if self.by_ip.len() >= AUTH_SOURCES {
            self.by_ip
                .retain(|_, f| f.banned_until.is_some_and(|b| now < b));
        }
        if self.by_ip.len() >= AUTH_SOURCES {
            let oldest = self
                .by_ip
                .iter()
                .min_by_key(|(_, f)| f.since)
                .map(|(ip, _)| *ip);
            if let Some(ip) = oldest {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

/// [`AuthFailures`] shared by every protocol of a node, with the metric
/// `cascade_auth_refused_total{protocol,reason}` and a log line at most once
/// per source per minute. Cloning shares the state.
#[derive(Clone, Debug)]
pub struct AuthGate(Arc<Mutex<(AuthFailures, LogOnce)>>);

impl Default for AuthGate {
    fn default() -> Self {
        Self::new(DEFAULT_AUTH_MAX_FAILURES)
    }
}

impl AuthGate {
    /// At most `max` wrong tokens per source per minute (0 = no limit).
    pub fn new(max: u32) -> Self {
        Self(Arc::new(Mutex::new((
            AuthFailures::new(max),
            LogOnce::default(),
        ))))
    }

    /// Before a token is checked: `Err(seconds to wait)` when `ip` is
    /// banned (counted as `reason="rate_limited"`).
    pub fn admit(&self, protocol: &'static str, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let mut g = lock(&self.0);
        let Some(wait) = g.0.banned(ip, now) else {
            return Ok(());
        };
        metrics::counter!(crate::metrics::AUTH_REFUSED, "protocol" => protocol, "reason" => "rate_limited")
            .increment(1);
        if g.1.allow(ip, now) {
            tracing::warn!(%ip, protocol, "refused: too many wrong tokens from this address");
        }
        Err(retry_after_secs(wait))
    }

    /// After a missing (`given` false) or wrong token from `ip`.
    pub fn failed(&self, protocol: &'static str, given: bool, ip: IpAddr, now: Instant) {
        let reason = if given {
            "wrong_token"
        } else {
            "missing_token"
        };
        metrics::counter!(crate::metrics::AUTH_REFUSED, "protocol" => protocol, "reason" => reason)
            .increment(1);
        let mut g = lock(&self.0);
        if let Some(ban) = g.0.fail(ip, now) {
            if g.1.allow(ip, now) {
                tracing::warn!(%ip, protocol, secs = ban.as_secs(), "too many wrong tokens: address banned");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn per_ip_caps_and_frees() {
        let l = PerIp::new(2);
        let a = l.acquire(ip(1)).unwrap();
        let b = l.acquire(ip(1)).unwrap();
        assert!(l.acquire(ip(1)).is_none(), "third from one address");
        let _c = l.acquire(ip(2)).expect("another address is not affected");
        assert_eq!(l.open(ip(1)), 2);
        drop(a);
        let _d = l.acquire(ip(1)).expect("a freed place is reusable");
        drop(b);
        drop(_d);
        assert_eq!(l.open(ip(1)), 0);
        assert_eq!(l.sources(), 1, "empty entries are removed");
        // The same IPv4 peer over an IPv6 socket shares its count.
        let l = PerIp::new(1);
        let _v4 = l.acquire(ip(3)).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.3".parse().unwrap();
        assert!(l.acquire(mapped).is_none());
        // 0 means no limit.
        let l = PerIp::new(0);
        let g: Vec<_> = (0..100).map(|_| l.acquire(ip(1)).unwrap()).collect();
        assert_eq!(l.open(ip(1)), 100);
        drop(g);
        assert_eq!(l.sources(), 0);
    }

    #[test]
    fn logs_once_per_source_per_minute() {
        let t0 = Instant::now();
        let mut l = LogOnce::default();
        assert!(l.allow(ip(1), t0));
        assert!(!l.allow(ip(1), t0 + Duration::from_secs(59)));
        assert!(l.allow(ip(2), t0 + Duration::from_secs(1)));
        assert!(l.allow(ip(1), t0 + LOG_EVERY));
    }

    #[test]
    fn log_memory_is_bounded() {
        let t0 = Instant::now();
        let mut l = LogOnce::default();
        for i in 0..(LOG_SOURCES as u32 * 3) {
            let ip = IpAddr::from(i.to_be_bytes());
            assert!(l.allow(ip, t0));
            assert!(l.len() <= LOG_SOURCES);
        }
    }

    #[test]
    fn bans_after_max_failures_for_a_window() {
        let t0 = Instant::now();
        let mut a = AuthFailures::new(3);
        assert_eq!(a.banned(ip(1), t0), None);
        assert_eq!(a.fail(ip(1), t0), None);
        assert_eq!(a.fail(ip(1), t0 + Duration::from_secs(1)), None);
        assert_eq!(a.banned(ip(1), t0 + Duration::from_secs(1)), None);
        let at = t0 + Duration::from_secs(2);
        assert_eq!(a.fail(ip(1), at), Some(AUTH_WINDOW), "third starts a ban");
        assert_eq!(a.banned(ip(1), at), Some(AUTH_WINDOW));
        assert_eq!(a.banned(ip(2), at), None, "another address is not banned");
        // Failures during the ban do not extend it.
        assert_eq!(a.fail(ip(1), at + Duration::from_secs(30)), None);
        assert_eq!(
            a.banned(ip(1), at + Duration::from_secs(50)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(a.banned(ip(1), at + AUTH_WINDOW), None, "ban over");
        // A fresh window after the ban.
        assert_eq!(a.fail(ip(1), at + AUTH_WINDOW), None);
        // IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(a.fail(mapped, at + AUTH_WINDOW), None);
        assert!(a.fail(ip(1), at + AUTH_WINDOW).is_some());
    }

    #[test]
    fn failures_spread_over_more_than_a_window_never_ban() {
        let t0 = Instant::now();
        let mut a = AuthFailures::new(3);
        for i in 0..100u64 {
            // Two per window: the count restarts before reaching three.
            let t = t0 + Duration::from_secs(31 * i);
            assert_eq!(a.fail(ip(1), t), None, "failure {i}");
            assert_eq!(a.banned(ip(1), t), None);
        }
    }

    #[test]
    fn zero_means_no_limit() {
        let t0 = Instant::now();
        let mut a = AuthFailures::new(0);
        for _ in 0..1000 {
            assert_eq!(a.fail(ip(1), t0), None);
        }
        assert_eq!(a.banned(ip(1), t0), None);
        assert!(a.is_empty());
    }

    #[test]
    fn auth_memory_is_bounded_and_keeps_bans() {
        let t0 = Instant::now();
        let mut a = AuthFailures::new(2);
        a.fail(ip(1), t0);
        a.fail(ip(1), t0);
        for i in 0..(AUTH_SOURCES as u32 * 3) {
            let src = IpAddr::from((i + (1 << 24)).to_be_bytes());
            a.fail(src, t0 + Duration::from_millis(1));
            assert!(a.len() <= AUTH_SOURCES);
        }
        assert!(
            a.banned(ip(1), t0 + Duration::from_secs(1)).is_some(),
            "a flood of one-off sources does not lift a ban"
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(59_001)), 60);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
    }

    #[test]
    fn gate_bans_the_address_whatever_the_protocol() {
        let t0 = Instant::now();
        let g = AuthGate::new(2);
        assert_eq!(g.admit("whip", ip(1), t0), Ok(()));
        g.failed("whip", false, ip(1), t0);
        g.failed("rtmp", true, ip(1), t0);
        assert_eq!(g.admit("whep", ip(1), t0), Err(60));
        assert_eq!(g.admit("ws", ip(2), t0), Ok(()));
    }
}
