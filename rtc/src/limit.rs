//! Small building blocks for limits that must hold under abuse: a count of
//! open connections per source IP ([`PerIp`], handing out Drop guards like
//! pingora's inflight counters) and a log throttle that lets one line per
//! source through per minute ([`LogOnce`]). Both are plain data: callers
//! pass the time in, nothing here reads a clock.

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
fn canonical(ip: IpAddr) -> IpAddr {
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
}
