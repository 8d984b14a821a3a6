//! Placement and the node's load report: a task measures this node every
//! second (viewers, WebRTC sessions, egress bit rate, process CPU from
//! `/proc/self/stat`, draining, streams) into its [`Node`], which
//! the relay sends upstream; with `--placement`, a middleware answers
//! `POST /whep/{stream}` with `307` to the least loaded healthy edge when
//! this node should not take the viewer (not an edge, draining, full, or
//! busier than that edge by a margin).
//!
//! The decisions ([`decide`]) and the CPU arithmetic ([`parse_stat`],
//! [`CpuMeter`]) are sans-IO and unit-tested; the shell reads the clock,
//! the file and the servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cascade_origin::cluster::{LocalLoad, Node, Report, REPORT_INTERVAL};
use cascade_origin::Registry;
use tracing::Instrument;

/// Redirects by reason (`not_edge`, `draining`, `full`, `load`).
pub const REDIRECTS: &str = "cascade_placement_redirects_total";

/// Registers the metric's description.
pub fn describe_metrics() {
    metrics::describe_counter!(
        REDIRECTS,
        "POST /whep answered 307 to another edge (--placement), by reason"
    );
}

/// The kernel's clock ticks per second in `/proc` (`USER_HZ`): fixed at 100
/// by the Linux ABI whatever `CONFIG_HZ` is.
const USER_HZ: u64 = 100;

/// utime + stime (clock ticks) from the text of `/proc/self/stat`. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Process CPU between two samples, in thousandths of the machine.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: Option<(Instant, u64)>,
}

impl CpuMeter {
    /// Takes the tick count read at `now`; the share since the previous
    /// sample (0 for the first), over `cores` cores.
    pub fn sample(&mut self, now: Instant, ticks: u64, cores: usize) -> u32 {
        let prev = self.last.replace((now, ticks));
        let Some((then, before)) = prev else {
            return 0;
        };
        let wall = now.saturating_duration_since(then).as_secs_f64() * cores.max(1) as f64;
        if wall <= 0.0 {
            return 0;
        }
        let busy = ticks.saturating_sub(before) as f64 / USER_HZ as f64;
        ((busy / wall) * 1000.0).round().clamp(0.0, 1000.0) as u32
    }
}

/// Egress bit rate between two byte counts.
#[derive(Debug, Default)]
pub struct RateMeter {
    last: Option<(Instant, u64)>,
}

impl RateMeter {
    /// Takes the byte count at `now`; bits per second since the previous.
    pub fn sample(&mut self, now: Instant, bytes: u64) -> u64 {
        let Some((then, before)) = self.last.replace((now, bytes)) else {
            return 0;
        };
        let secs = now.saturating_duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return 0;
        }
        (bytes.saturating_sub(before) as f64 * 8.0 / secs) as u64
    }
}

/// What this node knows of itself when a viewer asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Own {
    /// It serves WHEP.
    pub edge: bool,
    pub draining: bool,
    pub sessions: u64,
    pub max_sessions: u64,
}

/// Why a viewer was sent elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// This node does not serve viewers (origin, ingest).
    NotEdge,
    /// This node drains.
    Draining,
    /// This node is at `--max-sessions`.
    Full,
    /// This node is busier than the best edge by more than the margin.
    Load,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotEdge => "not_edge",
            Self::Draining => "draining",
            Self::Full => "full",
            Self::Load => "load",
        }
    }
}

/// Whether to send a viewer to `best` (the least loaded healthy edge other
/// than us) rather than serve it. `margin_permille`: how much fuller (in
/// thousandths of its cap) this node must be than `best` before it sends
/// viewers away, so two similar edges do not bounce viewers between them.
pub fn decide(own: &Own, best: Option<&Report>, margin_permille: u64) -> Option<Reason> {
    let best = best?;
    if !own.edge {
        return Some(Reason::NotEdge);
    }
    if own.draining {
        return Some(Reason::Draining);
    }
    if own.max_sessions > 0 && own.sessions >= own.max_sessions {
        return Some(Reason::Full);
    }
    // No cap (no WebRTC) counts as full.
    let fill = |s: u64, m: u64| s.saturating_mul(1000).checked_div(m).unwrap_or(1000);
    let ours = fill(own.sessions, own.max_sessions);
    let theirs = fill(best.sessions, best.max_sessions);
    (ours > theirs.saturating_add(margin_permille)).then_some(Reason::Load)
}

/// `base` (`http://host:port`, no trailing `/` needed) plus the request's
/// path and query: the viewer keeps its stream and its `?token=`.
pub fn location(base: &str, path_and_query: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path_and_query)
}

/// Default hysteresis: a node sends viewers away on load alone only when
/// it is fuller than the best edge by 20 % of its cap.
pub const MARGIN_PERMILLE: u64 = 200;

/// Puts the placement middleware in front of `router`. On a node without
/// WHEP (origin, ingest) `POST /whep/{stream}` gets a route of its own so
/// the middleware sees it: 307 to an edge, or 404 when none is known.
pub fn layer(mut router: axum::Router, placement: Placement) -> axum::Router {
    if !placement.edge {
        router = router.route(
            "/whep/{stream}",
            axum::routing::post(|| async {
                (
                    StatusCode::NOT_FOUND,
                    "this node serves no viewers and knows no healthy edge yet\n",
                )
            }),
        );
    }
    router.layer(axum::middleware::from_fn_with_state(placement, middleware))
}

/// True for `POST /whep/{stream}` (not a session resource below it).
fn is_whep_create(method: &Method, path: &str) -> bool {
    method == Method::POST
        && path
            .strip_prefix("/whep/")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// What the placement middleware reads.
#[derive(Clone)]
pub struct Placement {
    pub node: Arc<Node>,
    pub rtc: Option<cascade_rtc::Server>,
    pub edge: bool,
    pub draining: Arc<AtomicBool>,
    pub max_sessions: u64,
    pub margin_permille: u64,
}

/// `--placement`: a `POST /whep/{stream}` this node should not take gets
/// `307` to the best edge; everything else passes.
pub async fn middleware(State(p): State<Placement>, req: Request, next: Next) -> Response {
    if !is_whep_create(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let own = Own {
        edge: p.edge,
        draining: p.draining.load(Ordering::Relaxed),
        sessions: p.rtc.as_ref().map_or(0, |r| r.sessions() as u64),
        max_sessions: p.max_sessions,
    };
    let best = p.node.best_edge(Instant::now());
    let Some(reason) = decide(&own, best.as_ref(), p.margin_permille) else {
        return next.run(req).await;
    };
    let Some(best) = best else {
        return next.run(req).await;
    };
    let pq = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path(), |pq| pq.as_str());
    let to = location(&best.url, pq);
    let Ok(value) = HeaderValue::from_str(&to) else {
        return next.run(req).await;
    };
    metrics::counter!(REDIRECTS, "reason" => reason.as_str()).increment(1);
    tracing::debug!(to = %to, reason = reason.as_str(), edge = %best.node, "WHEP placed on another edge");
    let mut res = (StatusCode::TEMPORARY_REDIRECT, format!("placed on {to}\n")).into_response();
    res.headers_mut().insert(header::LOCATION, value);
    // Browsers on other origins follow it only if they may read it.
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    res.headers_mut().insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location"),
    );
    res
}

/// Measures this node into `node` every [`REPORT_INTERVAL`] until `stop`.
pub fn spawn_sampler(
    node: Arc<Node>,
    registry: Arc<Registry>,
    rtc: Option<cascade_rtc::Server>,
    draining: Arc<AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(
        async move {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let (mut cpu, mut rate) = (CpuMeter::default(), RateMeter::default());
            let mut tick = tokio::time::interval(REPORT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                let now = Instant::now();
                let ticks = std::fs::read_to_string("/proc/self/stat")
                    .ok()
                    .and_then(|t| parse_stat(&t));
                let streams = registry.list();
                node.set_local(LocalLoad {
                    viewers: streams.iter().map(|s| s.viewers as u64).sum(),
                    sessions: rtc.as_ref().map_or(0, |r| r.sessions() as u64),
                    egress_bps: rtc.as_ref().map_or(0, |r| rate.sample(now, r.bytes_out())),
                    cpu_permille: ticks.map_or(0, |t| cpu.sample(now, t, cores)),
                    draining: draining.load(Ordering::Relaxed),
                    streams: streams.into_iter().map(|s| s.stream).collect(),
                });
                node.expire(now);
            }
        }
        .instrument(tracing::info_span!("load_sampler")),
    );
}

/// `/api/cluster`: this node and every node it heard of.
pub fn cluster_json(node: &Node) -> serde_json::Value {
    let now = Instant::now();
    serde_json::json!({
        "node": node.id(),
        "fresh_s": cascade_origin::cluster::FRESH.as_secs(),
        "nodes": node.snapshot(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STAT: &str = "4242 (cascade (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 200000000 5000 18446744073709551615";

    #[test]
    fn stat_gives_utime_plus_stime() {
        assert_eq!(parse_stat(STAT), Some(325));
        assert_eq!(parse_stat("1 (a) S 1 2 3"), None);
        assert_eq!(parse_stat("no paren"), None);
        assert_eq!(parse_stat(""), None);
    }

    proptest::proptest! {
        #[test]
        fn stat_garbage_never_panics(s in "\\PC{0,200}") {
            let _ = parse_stat(&s);
        }
    }

    #[test]
    fn cpu_is_a_share_of_every_core() {
        let t0 = Instant::now();
        let mut m = CpuMeter::default();
        assert_eq!(m.sample(t0, 1000, 4), 0);
        // 200 ticks = 2 s of CPU in 1 s on 4 cores: half the machine.
        assert_eq!(m.sample(t0 + Duration::from_secs(1), 1200, 4), 500);
        // Counter going back (never on Linux) or no time: no nonsense.
        assert_eq!(m.sample(t0 + Duration::from_secs(2), 100, 4), 0);
        assert_eq!(m.sample(t0 + Duration::from_secs(2), 100_000, 4), 0);
        let mut r = RateMeter::default();
        assert_eq!(r.sample(t0, 0), 0);
        assert_eq!(r.sample(t0 + Duration::from_secs(2), 250_000), 1_000_000);
    }

    fn best(sessions: u64, max: u64) -> Report {
        Report {
            node: "b2".into(),
            role: "edge".into(),
            url: "http://10.0.0.2:8080".into(),
            sessions,
            max_sessions: max,
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let edge = |sessions, draining| Own {
            edge: true,
            draining,
            sessions,
            max_sessions: 10,
        };
        let b = best(2, 10);
        // No other healthy edge: serve whatever happens.
        assert_eq!(decide(&edge(10, true), None, 200), None);
        let origin = Own {
            edge: false,
            ..edge(0, false)
        };
        assert_eq!(decide(&origin, Some(&b), 200), Some(Reason::NotEdge));
        assert_eq!(
            decide(&edge(0, true), Some(&b), 200),
            Some(Reason::Draining)
        );
        assert_eq!(decide(&edge(10, false), Some(&b), 200), Some(Reason::Full));
        // Hysteresis: 4/10 vs 2/10 is within 20 %, 5/10 is past it.
        assert_eq!(decide(&edge(4, false), Some(&b), 200), None);
        assert_eq!(decide(&edge(5, false), Some(&b), 200), Some(Reason::Load));
        assert_eq!(decide(&edge(1, false), Some(&b), 200), None);
    }

    #[test]
    fn location_keeps_path_and_query() {
        assert_eq!(
            location("http://10.0.0.2:8080/", "/whep/s1?token=abc"),
            "http://10.0.0.2:8080/whep/s1?token=abc"
        );
        assert!(is_whep_create(&Method::POST, "/whep/s1"));
        assert!(!is_whep_create(&Method::POST, "/whep/s1/abc"));
        assert!(!is_whep_create(&Method::PATCH, "/whep/s1"));
        assert!(!is_whep_create(&Method::POST, "/whip/s1"));
        assert!(!is_whep_create(&Method::POST, "/whep/"));
    }
}
