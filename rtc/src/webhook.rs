//! `--auth-webhook URL`: an operator's HTTP service decides who may publish
//! or view. Before a publish or view is admitted that the built-in token
//! rules do not already allow ([`crate::auth::Auth::decide`]), the node
//! POSTs `{"action","stream","protocol","remote_addr","token"}` as JSON to
//! the URL: a 2xx answer allows, anything else — another status, a connect
//! error, no full answer within [`TIMEOUT`] — refuses.
//!
//! Two parts: [`Cache`], plain data on the caller's clock, remembers
//! decisions per (action, stream, protocol, client IP, token) for
//! [`DECIDED_TTL`] (errors and timeouts only [`FAILED_TTL`], so a
//! recovering auth service is asked again soon) and holds at most
//! [`MAX_ENTRIES`]; and [`Webhook`], the async client around it, which
//! bounds calls in flight ([`MAX_IN_FLIGHT`]: past it a request is refused
//! as busy, never queued, so a slow auth service cannot pile up tasks) and
//! reads at most [`MAX_RESPONSE`] bytes of an answer.
//!
//! Tokens are sent to the webhook (it has to judge them) but never logged;
//! logs name the URL's host and the status.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::auth::Action;
use crate::metrics as m;

/// An answer must be complete this soon after the request started.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How long an allow or a refusal is reused.
pub const DECIDED_TTL: Duration = Duration::from_secs(10);
/// How long a connect error or timeout is reused: long enough that a burst
/// of retries against a dead service costs one call, short enough that a
/// recovered one is asked again at once.
pub const FAILED_TTL: Duration = Duration::from_secs(1);
/// Decisions remembered; past it the oldest is forgotten.
pub const MAX_ENTRIES: usize = 10_000;
/// Calls in flight at once; more are refused as busy (503).
pub const MAX_IN_FLIGHT: usize = 256;
/// Bytes of a response body read at most (the status decides; the body is
/// read only so the connection can be reused).
pub const MAX_RESPONSE: usize = 4 * 1024;

/// What the webhook said, as cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx status.
    Allow,
    /// Any other status (redirects are not followed).
    Deny,
    /// No answer: connect or protocol error.
    Error,
    /// No full answer within [`TIMEOUT`].
    Timeout,
}

impl Outcome {
    /// True only for [`Outcome::Allow`].
    pub fn allows(self) -> bool {
        self == Self::Allow
    }

    /// The `result` label of `cascade_auth_webhook_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Error => "error",
            Self::Timeout => "timeout",
        }
    }

    /// How long this outcome may be reused.
    pub fn ttl(self) -> Duration {
        match self {
            Self::Allow | Self::Deny => DECIDED_TTL,
            Self::Error | Self::Timeout => FAILED_TTL,
        }
    }
}

/// One question for the webhook; its fields are the JSON body.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Query {
    /// Publish or view.
    pub action: Action,
    /// The stream name as the client gave it.
    pub stream: String,
    /// `whip`, `rtmp`, `rtmps`, `whep` or `ws`.
    pub protocol: &'static str,
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The token the client gave, if any.
    pub token: Option<String>,
}

#[derive(serde::Serialize)]
struct Body<'a> {
    action: &'static str,
    stream: &'a str,
    protocol: &'static str,
    remote_addr: String,
    token: Option<&'a str>,
}

impl Query {
    /// The JSON body POSTed for this query.
    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            action: self.action.claim(),
            stream: &self.stream,
            protocol: self.protocol,
            remote_addr: self.remote_addr.to_string(),
            token: self.token.as_deref(),
        };
        // Serializing a struct of strings cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The cache key: the client's port does not matter (one player opens
    /// a new connection per attempt), an IPv4 peer on an IPv6 socket is its
    /// IPv4 address.
    pub fn key(&self) -> Key {
        Key {
            action: self.action,
            stream: self.stream.clone(),
            protocol: self.protocol,
            ip: crate::limit::canonical(self.remote_addr.ip()),
            token: self.token.clone(),
        }
    }
}

/// What a decision is cached under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    action: Action,
    stream: String,
    protocol: &'static str,
    ip: IpAddr,
    token: Option<String>,
}

#[derive(Clone, Copy, Debug)]
struct Cached {
    outcome: Outcome,
    expires: Instant,
    /// Insertion number: matches the `order` entry that is current.
    seq: u64,
}

/// Decisions by [`Key`], each for its [`Outcome::ttl`], at most `max` of
/// them (the oldest inserted goes first). Plain data: the caller passes
/// `now`.
#[derive(Debug)]
pub struct Cache {
    max: usize,
    map: HashMap<Key, Cached>,
    /// Insertion order; entries whose `seq` no longer matches the map are
    /// stale and skipped (lazy deletion, like the shard's timer heap).
    order: VecDeque<(u64, Key)>,
    next_seq: u64,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new(MAX_ENTRIES)
    }
}

impl Cache {
    /// At most `max` decisions (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// The decision for `key` if one is still valid at `now`.
    pub fn get(&mut self, key: &Key, now: Instant) -> Option<Outcome> {
        let c = self.map.get(key)?;
        if now < c.expires {
            return Some(c.outcome);
        }
        self.map.remove(key);
        None
    }

    /// Remembers `outcome` for `key` from `now`.
    pub fn put(&mut self, key: Key, outcome: Outcome, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let cached = Cached {
            outcome,
            expires: now + outcome.ttl(),
            seq,
        };
        match self.map.entry(key.clone()) {
            Entry::Occupied(mut e) => {
                e.insert(cached);
            }
            Entry::Vacant(e) => {
                e.insert(cached);
                while self.map.len() > self.max {
                    self.evict_oldest();
                }
            }
        }
        self.order.push_back((seq, key));
        // Keys decided again leave stale order entries: compact before they
        // outnumber the live ones.
        if self.order.len() > 2 * self.max {
            let map = &self.map;
            self.order
                .retain(|(seq, k)| map.get(k).is_some_and(|c| c.seq == *seq));
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((seq, key)) = self.order.pop_front() {
            if self.map.get(&key).is_some_and(|c| c.seq == seq) {
                self.map.remove(&key);
                return;
            }
        }
    }

    /// Decisions held (valid or not yet noticed to be expired).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Why [`Webhook::ask`] gave no outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

/// A `--auth-webhook URL` that is not a usable http(s) URL.
#[derive(Debug, thiserror::Error)]
#[error("--auth-webhook: {0}")]
pub struct BadUrl(String);

/// The webhook client of a node: one per node, shared by every protocol
/// (one cache, one in-flight bound). Cloning shares it.
#[derive(Clone)]
pub struct Webhook(Arc<Inner>);

struct Inner {
    url: reqwest::Url,
    /// For logs: the URL's host (the path or query might carry a secret).
    host: String,
    client: reqwest::Client,
    cache: Mutex<Cache>,
    in_flight: Arc<Semaphore>,
    /// Last time a failed call was logged: a dead auth service would
    /// otherwise log once per attempt.
    logged: Mutex<Option<Instant>>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("host", &self.0.host)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Failed calls are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Webhook {
    /// A client for `url` (`http://` or `https://`; HTTPS verifies the
    /// server against the system's root certificates, through rustls).
    pub fn new(url: &str) -> Result<Self, BadUrl> {
        let parsed = reqwest::Url::parse(url).map_err(|e| BadUrl(format!("{url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(BadUrl(format!(
                "{url:?}: the scheme must be http or https, not {}",
                parsed.scheme()
            )));
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| BadUrl(format!("{url:?}: no host")))?
            .to_string();
        let client = reqwest::Client::builder()
            // A redirect is an answer other than 2xx: refused, not followed
            // (a POST turned GET on another host is not what was asked).
            .redirect(reqwest::redirect::Policy::none())
            // The auth service is the operator's: reached directly, not
            // through whatever proxy the environment names.
            .no_proxy()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .user_agent(concat!("cascade/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BadUrl(format!("{url:?}: {e}")))?;
        Ok(Self(Arc::new(Inner {
            url: parsed,
            host,
            client,
            cache: Mutex::new(Cache::default()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            logged: Mutex::new(None),
        })))
    }

    /// The URL's host, for logs and the banner.
    pub fn host(&self) -> &str {
        &self.0.host
    }

    /// The webhook's decision on `q`: from the cache, or by a call; `Busy`
    /// when [`MAX_IN_FLIGHT`] calls are already out.
    pub async fn ask(&self, q: &Query) -> Result<Outcome, Busy> {
        let key = q.key();
        if let Some(hit) = lock(&self.0.cache).get(&key, Instant::now()) {
            metrics::counter!(m::WEBHOOK_CACHE_HITS).increment(1);
            return Ok(hit);
        }
        let Ok(_permit) = self.0.in_flight.clone().try_acquire_owned() else {
            metrics::counter!(m::WEBHOOK_BUSY).increment(1);
            tracing::warn!(host = %self.0.host, "auth webhook: {MAX_IN_FLIGHT} calls in flight, refusing");
            return Err(Busy);
        };
        let started = Instant::now();
        let (outcome, status) = match tokio::time::timeout(TIMEOUT, self.call(q)).await {
            Ok(r) => r,
            Err(_) => (Outcome::Timeout, None),
        };
        let took = started.elapsed();
        metrics::histogram!(m::WEBHOOK_SECONDS).record(took.as_secs_f64());
        metrics::counter!(m::WEBHOOK_REQUESTS, "result" => outcome.label()).increment(1);
        self.log(q, outcome, status, took);
        lock(&self.0.cache).put(key, outcome, Instant::now());
        Ok(outcome)
    }

    /// One POST; the status, if one came.
    async fn call(&self, q: &Query) -> (Outcome, Option<u16>) {
        let res = self
            .0
            .client
            .post(self.0.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(q.body())
            .send()
            .await;
        let mut res = match res {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return (Outcome::Timeout, None),
            Err(_) => return (Outcome::Error, None),
        };
        let status = res.status();
        // Read a little of the body (so a small answer frees the connection
        // for reuse); the status alone decides.
        let mut read = 0;
        while read < MAX_RESPONSE {
            match res.chunk().await {
                Ok(Some(c)) => read += c.len(),
                Ok(None) => break,
                Err(e) if e.is_timeout() => return (Outcome::Timeout, Some(status.as_u16())),
                // The status came: a body cut short does not change it.
                Err(_) => break,
            }
        }
        let outcome = if status.is_success() {
            Outcome::Allow
        } else {
            Outcome::Deny
        };
        (outcome, Some(status.as_u16()))
    }

    fn log(&self, q: &Query, outcome: Outcome, status: Option<u16>, took: Duration) {
        let ms = took.as_millis() as u64;
        let (action, protocol, host) = (q.action.claim(), q.protocol, &self.0.host);
        match outcome {
            Outcome::Allow | Outcome::Deny => {
                tracing::debug!(
                    host,
                    status,
                    ms,
                    action,
                    protocol,
                    result = outcome.label(),
                    "auth webhook answered"
                );
            }
            Outcome::Error | Outcome::Timeout => {
                let now = Instant::now();
                let mut last = lock(&self.0.logged);
                if last.is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY) {
                    *last = Some(now);
                    tracing::warn!(
                        host,
                        ms,
                        action,
                        protocol,
                        result = outcome.label(),
                        "auth webhook failed: refusing"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(stream: &str, port: u16, token: Option<&str>) -> Query {
        Query {
            action: Action::Publish,
            stream: stream.into(),
            protocol: "whip",
            remote_addr: SocketAddr::from(([192, 0, 2, 1], port)),
            token: token.map(String::from),
        }
    }

    #[test]
    fn body_has_the_contract_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&q("cam", 5000, Some("t")).body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "action": "publish", "stream": "cam", "protocol": "whip",
                "remote_addr": "192.0.2.1:5000", "token": "t"
            })
        );
        let mut view = q("cam", 1, None);
        view.action = Action::View;
        view.protocol = "ws";
        view.remote_addr = "[2001:db8::1]:443".parse().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&view.body()).unwrap();
        assert_eq!(v["action"], "view");
        assert_eq!(v["token"], serde_json::Value::Null);
        assert_eq!(v["remote_addr"], "[2001:db8::1]:443");
    }

    #[test]
    fn key_ignores_the_port_not_the_rest() {
        assert_eq!(q("a", 1, Some("t")).key(), q("a", 2, Some("t")).key());
        assert_ne!(q("a", 1, Some("t")).key(), q("b", 1, Some("t")).key());
        assert_ne!(q("a", 1, Some("t")).key(), q("a", 1, Some("u")).key());
        assert_ne!(q("a", 1, Some("t")).key(), q("a", 1, None).key());
        let mut view = q("a", 1, Some("t"));
        view.action = Action::View;
        assert_ne!(view.key(), q("a", 1, Some("t")).key());
        let mut rtmp = q("a", 1, Some("t"));
        rtmp.protocol = "rtmp";
        assert_ne!(rtmp.key(), q("a", 1, Some("t")).key());
        let mut mapped = q("a", 1, Some("t"));
        mapped.remote_addr = "[::ffff:192.0.2.1]:9".parse().unwrap();
        assert_eq!(mapped.key(), q("a", 1, Some("t")).key());
    }

    #[test]
    fn decisions_last_ten_seconds() {
        let t0 = Instant::now();
        let mut c = Cache::default();
        let (a, b) = (q("a", 1, Some("t")).key(), q("b", 1, None).key());
        c.put(a.clone(), Outcome::Allow, t0);
        c.put(b.clone(), Outcome::Deny, t0);
        let almost = t0 + DECIDED_TTL - Duration::from_millis(1);
        assert_eq!(c.get(&a, almost), Some(Outcome::Allow));
        assert_eq!(
            c.get(&b, almost),
            Some(Outcome::Deny),
            "refusals are cached too"
        );
        assert_eq!(c.get(&a, t0 + DECIDED_TTL), None);
        assert_eq!(c.get(&b, t0 + DECIDED_TTL), None);
        assert!(c.is_empty(), "expired entries are dropped when seen");
    }

    #[test]
    fn failures_last_one_second() {
        let t0 = Instant::now();
        let mut c = Cache::default();
        let (a, b) = (q("a", 1, None).key(), q("b", 1, None).key());
        c.put(a.clone(), Outcome::Error, t0);
        c.put(b.clone(), Outcome::Timeout, t0);
        let almost = t0 + FAILED_TTL - Duration::from_millis(1);
        assert_eq!(c.get(&a, almost), Some(Outcome::Error));
        assert_eq!(c.get(&b, almost), Some(Outcome::Timeout));
        assert_eq!(c.get(&a, t0 + FAILED_TTL), None);
        assert_eq!(c.get(&b, t0 + FAILED_TTL), None);
        // A later answer replaces the failure for the full ten seconds.
        c.put(a.clone(), Outcome::Allow, t0 + FAILED_TTL);
        assert_eq!(
            c.get(&a, t0 + FAILED_TTL + Duration::from_secs(9)),
            Some(Outcome::Allow)
        );
    }

    #[test]
    fn bounded_oldest_first() {
        let t0 = Instant::now();
        let mut c = Cache::new(3);
        let k = |s: &str| q(s, 1, None).key();
        c.put(k("a"), Outcome::Allow, t0);
        c.put(k("b"), Outcome::Allow, t0);
        c.put(k("c"), Outcome::Allow, t0);
        // Deciding "a" again makes it the newest.
        c.put(k("a"), Outcome::Deny, t0);
        c.put(k("d"), Outcome::Allow, t0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&k("b"), t0), None, "the oldest went");
        assert_eq!(c.get(&k("a"), t0), Some(Outcome::Deny));
        assert_eq!(c.get(&k("c"), t0), Some(Outcome::Allow));
        assert_eq!(c.get(&k("d"), t0), Some(Outcome::Allow));
    }

    #[test]
    fn memory_stays_bounded_under_churn() {
        let t0 = Instant::now();
        let mut c = Cache::new(100);
        for i in 0..10_000u32 {
            // Many distinct keys, and one key decided over and over.
            c.put(q(&format!("s{i}"), 1, None).key(), Outcome::Deny, t0);
            c.put(q("hot", 1, None).key(), Outcome::Allow, t0);
            assert!(c.len() <= 100);
            assert!(c.order.len() <= 2 * 100 + 1);
        }
        assert_eq!(c.get(&q("hot", 1, None).key(), t0), Some(Outcome::Allow));
    }

    #[test]
    fn urls_are_checked() {
        assert!(Webhook::new("http://127.0.0.1:9/auth").is_ok());
        assert!(Webhook::new("https://auth.example.com/hook?k=v").is_ok());
        for bad in [
            "ftp://h/x",
            "auth.example.com",
            "",
            "http://",
            "unix:/tmp/s",
        ] {
            assert!(Webhook::new(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Webhook::new("https://auth.example.com/x").unwrap().host(),
            "auth.example.com"
        );
    }

    #[tokio::test]
    async fn busy_past_the_in_flight_cap_and_cache_first() {
        let w = Webhook::new("http://127.0.0.1:9/auth").unwrap();
        // Hold every permit, as MAX_IN_FLIGHT hanging calls would.
        let _all =
            w.0.in_flight
                .clone()
                .try_acquire_many_owned(MAX_IN_FLIGHT as u32)
                .unwrap();
        let query = q("a", 1, Some("t"));
        assert_eq!(w.ask(&query).await, Err(Busy));
        // A cached decision is still answered: it needs no call.
        lock(&w.0.cache).put(query.key(), Outcome::Allow, Instant::now());
        assert_eq!(w.ask(&q("a", 2, Some("t"))).await, Ok(Outcome::Allow));
    }

    #[tokio::test]
    async fn no_server_refuses_and_caches_briefly() {
        // A port nothing listens on: connection refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let w = Webhook::new(&format!("http://127.0.0.1:{port}/auth")).unwrap();
        let query = q("a", 1, None);
        assert_eq!(w.ask(&query).await, Ok(Outcome::Error));
        assert_eq!(lock(&w.0.cache).len(), 1);
    }
}
