//! The cluster view for placement and `/api/cluster`, without I/O: load
//! reports of nodes ([`Report`]), the table a node keeps of them
//! ([`Cluster`]: fresh for [`FRESH`], bounded, the least loaded healthy
//! edge on request), and the node's own shared state ([`Node`]: its id, its
//! report, its upstream path, its table) that relay sessions read and feed.
//!
//! Reports travel over the relay control stream: every connected node
//! sends its upstream `Load` (its own report, then those of the nodes below
//! it) every [`REPORT_INTERVAL`]; the upstream answers with `Cluster` (its
//! path from the origin and its table), so every node can place viewers and
//! a node whose upstream path contains itself refuses the link (a loop).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::relay::wire::valid_label;
use crate::{valid_stream_name, ProtocolError};

/// How often a node reports its load upstream (and hears the table back).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A node not heard of for longer vanishes from the table.
pub const FRESH: Duration = Duration::from_secs(5);
/// Nodes a table holds: a cluster is far smaller; a hostile child cannot
/// grow it past this.
pub const MAX_NODES: usize = 1024;
/// Reports in one `Load` or `Cluster` message: with the caps below a
/// message stays under the wire's 64 KiB (`wire::MAX_MESSAGE`).
pub const MAX_REPORT_NODES: usize = 24;
/// Stream names listed per report (the rest are counted, not named).
pub const MAX_STREAMS: usize = 16;
/// Longest upstream chain: deeper trees are refused as if looped.
pub const MAX_TIERS: usize = 16;
/// Longest public URL.
pub const MAX_URL: usize = 200;
/// Longest node id (ours are 16 hex digits).
pub const MAX_ID: usize = 32;

/// One node's load as it reports it. Every field has a serde default so
/// later versions can add fields and older ones still parse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Random id chosen at start ([`new_id`]).
    pub node: String,
    /// `origin`, `ingest`, `edge` or `all`.
    #[serde(default)]
    pub role: String,
    /// Where its HTTP endpoints are (`--public-url`): a redirect target.
    #[serde(default)]
    pub url: String,
    /// Local viewers (WHEP and OvenPlayer subscribers of its registry).
    #[serde(default)]
    pub viewers: u64,
    /// WebRTC sessions (viewers and WHIP publishers).
    #[serde(default)]
    pub sessions: u64,
    /// `--max-sessions` (0: no WebRTC).
    #[serde(default)]
    pub max_sessions: u64,
    /// Bits per second it sends to WebRTC peers.
    #[serde(default)]
    pub egress_bps: u64,
    /// Process CPU over the last interval, in thousandths of the machine
    /// (all cores): 1000 is every core busy.
    #[serde(default)]
    pub cpu_permille: u32,
    /// True while it drains: never a placement target.
    #[serde(default)]
    pub draining: bool,
    /// Streams it serves (at most [`MAX_STREAMS`] named).
    #[serde(default)]
    pub streams: Vec<String>,
    /// Streams it serves in all, named or not.
    #[serde(default)]
    pub stream_count: u64,
    /// Its upstream chain, origin first, its own upstream last; empty for
    /// the origin (or a node whose link is down). Its tier is the length.
    #[serde(default)]
    pub upstream: Vec<String>,
    /// How old the report is, in milliseconds, when sent on (a node's
    /// table forwards what it heard earlier).
    #[serde(default)]
    pub age_ms: u64,
}

/// A node id: 1–[`MAX_ID`] lowercase hex digits.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID).contains(&id.len()) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random node id (64 bits, hex).
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn valid_url(url: &str) -> bool {
    url.len() <= MAX_URL
        && (url.is_empty() || url.starts_with("http://") || url.starts_with("https://"))
        && url.bytes().all(|b| b.is_ascii_graphic())
}

impl Report {
    /// Checks what serde cannot: ids, caps, the URL, names.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = ProtocolError::BadReport;
        if !valid_id(&self.node) {
            return Err(bad("node id"));
        }
        if !self.role.is_empty() && !valid_label(&self.role) {
            return Err(bad("role"));
        }
        if !valid_url(&self.url) {
            return Err(bad("url"));
        }
        if self.streams.len() > MAX_STREAMS || !self.streams.iter().all(|s| valid_stream_name(s)) {
            return Err(bad("streams"));
        }
        if self.upstream.len() > MAX_TIERS || !self.upstream.iter().all(|s| valid_id(s)) {
            return Err(bad("upstream chain"));
        }
        Ok(())
    }

    /// Hops from the origin (0 for the origin).
    pub fn tier(&self) -> usize {
        self.upstream.len()
    }

    /// Sessions over the cap, 0..=1 (1 when it has no cap or no WebRTC).
    pub fn fill(&self) -> f64 {
        if self.max_sessions == 0 {
            1.0
        } else {
            self.sessions as f64 / self.max_sessions as f64
        }
    }

    /// Whether it can take a viewer: an edge, not draining, below its cap.
    pub fn healthy_edge(&self) -> bool {
        matches!(self.role.as_str(), "edge" | "all")
            && !self.draining
            && self.sessions < self.max_sessions
            && !self.url.is_empty()
    }
}

/// Checks a list of reports from the wire: count and each report.
pub fn validate_reports(nodes: &[Report]) -> Result<(), ProtocolError> {
    if nodes.len() > MAX_REPORT_NODES {
        return Err(ProtocolError::BadReport("too many nodes"));
    }
    nodes.iter().try_for_each(Report::validate)
}

/// Checks an upstream path from the wire.
pub fn validate_path(path: &[String]) -> Result<(), ProtocolError> {
    if path.len() > MAX_TIERS || !path.iter().all(|s| valid_id(s)) {
        return Err(ProtocolError::BadReport("path"));
    }
    Ok(())
}

/// The loop `path` (origin first, ending with our upstream) closes through
/// `own`, written from us upwards back to us (`a → b → a`); `None` when
/// `own` is not on it.
pub fn loop_through(own: &str, path: &[String]) -> Option<String> {
    let at = path.iter().position(|n| n == own)?;
    let mut chain = vec![own.to_string()];
    chain.extend(path[at + 1..].iter().rev().cloned());
    chain.push(own.to_string());
    Some(chain.join(" → "))
}

/// Where a table entry came from: a node below us (reported up through our
/// relay server) or the table our upstream sent down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Reported by a node below this one.
    Below,
    /// Heard from the upstream's table.
    Upstream,
}

#[derive(Clone, Debug)]
struct Entry {
    report: Report,
    seen: Instant,
    via: Via,
}

/// One row of [`Cluster::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// The report as last heard.
    #[serde(flatten)]
    pub report: Report,
    /// Hops from the origin.
    pub tier: usize,
    /// Milliseconds since it was last heard of.
    pub last_seen_ms: u64,
    /// Where this node heard it.
    pub via: Via,
}

/// The table of reports a node heard, on virtual time.
#[derive(Debug, Default)]
pub struct Cluster {
    nodes: HashMap<String, Entry>,
}

impl Cluster {
    /// Takes a (validated) report heard at `now`, `via` a child or the
    /// upstream. A report already older than one we hold is ignored; a new
    /// node is refused when the table is full (false).
    pub fn report(&mut self, now: Instant, report: Report, via: Via) -> bool {
        let seen = now
            .checked_sub(Duration::from_millis(report.age_ms))
            .unwrap_or(now);
        if now.saturating_duration_since(seen) > FRESH {
            return false;
        }
        let full = self.nodes.len() >= MAX_NODES;
        match self.nodes.get_mut(&report.node) {
            Some(e) if e.seen > seen => true,
            // A node below us reports to us directly: our upstream's copy
            // of it (which came from us) never replaces that.
            Some(e) if e.via == Via::Below && via == Via::Upstream => true,
            Some(e) => {
                *e = Entry { report, seen, via };
                true
            }
            None if full => false,
            None => {
                self.nodes
                    .insert(report.node.clone(), Entry { report, seen, via });
                true
            }
        }
    }

    /// Forgets `id` as heard directly from below, unless a report newer
    /// than `heard` came since (it reconnected over another link): its link
    /// is gone, so it should not wait out [`FRESH`] as a placement target.
    pub fn forget_below(&mut self, id: &str, heard: Instant) {
        if self
            .nodes
            .get(id)
            .is_some_and(|e| e.via == Via::Below && e.seen <= heard)
        {
            self.nodes.remove(id);
        }
    }

    /// Forgets the nodes not heard of within [`FRESH`].
    pub fn expire(&mut self, now: Instant) {
        self.nodes
            .retain(|_, e| now.saturating_duration_since(e.seen) <= FRESH);
    }

    /// The least loaded healthy edge heard within [`FRESH`], other than
    /// `exclude` (ourselves): fewest sessions for its cap, then least CPU.
    pub fn best_edge(&self, now: Instant, exclude: &str) -> Option<&Report> {
        self.nodes
            .values()
            .filter(|e| now.saturating_duration_since(e.seen) <= FRESH)
            .map(|e| &e.report)
            .filter(|r| r.node != exclude && r.healthy_edge())
            .min_by(|a, b| {
                a.fill()
                    .total_cmp(&b.fill())
                    .then(a.cpu_permille.cmp(&b.cpu_permille))
                    .then(a.node.cmp(&b.node))
            })
    }

    /// Every node with its tier and age, by tier then id.
    pub fn snapshot(&self, now: Instant) -> Vec<NodeView> {
        let mut v: Vec<NodeView> = self
            .nodes
            .values()
            .map(|e| NodeView {
                report: e.report.clone(),
                tier: e.report.tier(),
                last_seen_ms: now.saturating_duration_since(e.seen).as_millis() as u64,
                via: e.via,
            })
            .collect();
        v.sort_by(|a, b| a.tier.cmp(&b.tier).then(a.report.node.cmp(&b.report.node)));
        v
    }

    /// Up to `max` reports heard `via`, freshest first, with their age set
    /// for sending on.
    pub fn forward(&self, now: Instant, via: Option<Via>, max: usize) -> Vec<Report> {
        let mut v: Vec<&Entry> = self
            .nodes
            .values()
            .filter(|e| via.is_none_or(|w| e.via == w))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.seen));
        v.into_iter()
            .take(max)
            .map(|e| Report {
                age_ms: now.saturating_duration_since(e.seen).as_millis() as u64,
                ..e.report.clone()
            })
            .collect()
    }

    /// Nodes in the table.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// What the node shell measures about itself each interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalLoad {
    /// Local viewers.
    pub viewers: u64,
    /// WebRTC sessions.
    pub sessions: u64,
    /// Bits per second sent.
    pub egress_bps: u64,
    /// Process CPU, thousandths of the machine.
    pub cpu_permille: u32,
    /// Draining.
    pub draining: bool,
    /// Streams served, all of them.
    pub streams: Vec<String>,
}

struct State {
    own: Report,
    /// Our upstream chain from the origin, as our upstream last told it.
    path: Vec<String>,
    table: Cluster,
}

/// This node in the cluster: its id and report, its upstream path, the
/// table it heard. Shared by the relay sessions (which feed and send it)
/// and the HTTP side (placement, `/api/cluster`).
pub struct Node {
    id: String,
    state: Mutex<State>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish()
    }
}

impl Node {
    /// A node with a fresh id, `role` and public `url`.
    pub fn new(role: &str, url: &str) -> Self {
        let id = new_id();
        Self {
            state: Mutex::new(State {
                own: Report {
                    node: id.clone(),
                    role: role.to_string(),
                    url: url.to_string(),
                    ..Default::default()
                },
                path: Vec::new(),
                table: Cluster::default(),
            }),
            id,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The shell's latest measurement of this node.
    pub fn set_local(&self, load: LocalLoad) {
        let mut s = self.lock();
        let own = &mut s.own;
        own.viewers = load.viewers;
        own.sessions = load.sessions;
        own.egress_bps = load.egress_bps;
        own.cpu_permille = load.cpu_permille;
        own.draining = load.draining;
        own.stream_count = load.streams.len() as u64;
        own.streams = load
            .streams
            .into_iter()
            .filter(|s| valid_stream_name(s))
            .take(MAX_STREAMS)
            .collect();
    }

    /// Its public HTTP URL (`--public-url`), where viewers are sent.
    pub fn set_url(&self, url: &str) {
        self.lock().own.url = url.to_string();
    }

    /// Its `--max-sessions` (0: no WebRTC).
    pub fn set_max_sessions(&self, max: u64) {
        self.lock().own.max_sessions = max;
    }

    /// Its own report now, with its upstream chain.
    pub fn own(&self) -> Report {
        let s = self.lock();
        Report {
            upstream: s.path.clone(),
            ..s.own.clone()
        }
    }

    /// What goes up in `Load`: our report, then the freshest of those below.
    pub fn load_message(&self, now: Instant) -> Vec<Report> {
        let mut v = vec![self.own()];
        let s = self.lock();
        v.extend(s.table.forward(now, Some(Via::Below), MAX_REPORT_NODES - 1));
        v
    }

    /// What goes down in `Cluster`: our path including us, and our table
    /// with ourselves first.
    pub fn cluster_message(&self, now: Instant) -> (Vec<String>, Vec<Report>) {
        let own = self.own();
        let s = self.lock();
        let mut path = s.path.clone();
        path.push(self.id.clone());
        let mut nodes = vec![own];
        nodes.extend(s.table.forward(now, None, MAX_REPORT_NODES - 1));
        (path, nodes)
    }

    /// A `Load` from a node below. Our own id among the reports means the
    /// link closes a loop: refused, nothing taken.
    pub fn handle_load(&self, now: Instant, nodes: Vec<Report>) -> Result<(), ProtocolError> {
        if let Some(r) = nodes.iter().find(|r| r.node == self.id) {
            // Our own report came back up through the sender: we are below
            // ourselves. Name the chain from us up as our report had it.
            let mut chain = vec![self.id.clone()];
            chain.extend(
                r.upstream
                    .iter()
                    .rev()
                    .take_while(|n| **n != self.id)
                    .cloned(),
            );
            if let Some(sender) = nodes.first().map(|r| &r.node) {
                if chain.last() != Some(sender) {
                    chain.push(sender.clone());
                }
            }
            chain.push(self.id.clone());
            return Err(ProtocolError::Loop(chain.join(" → ")));
        }
        let mut s = self.lock();
        // The sender is linked to us: its upstream chain is ours plus us,
        // whatever it believed when it wrote the report (its first one
        // goes out before it heard our path).
        let mut chain = s.path.clone();
        chain.push(self.id.clone());
        for (i, mut r) in nodes.into_iter().enumerate() {
            if i == 0 {
                r.upstream.clone_from(&chain);
            }
            s.table.report(now, r, Via::Below);
        }
        Ok(())
    }

    /// A `Cluster` from our upstream: refused when its path runs through
    /// us; else it is our path and its nodes join our table.
    pub fn handle_cluster(
        &self,
        now: Instant,
        path: Vec<String>,
        nodes: Vec<Report>,
    ) -> Result<(), ProtocolError> {
        if let Some(chain) = loop_through(&self.id, &path) {
            return Err(ProtocolError::Loop(chain));
        }
        if path.len() >= MAX_TIERS {
            return Err(ProtocolError::BadReport("too many tiers"));
        }
        let mut s = self.lock();
        s.path = path;
        for r in nodes.into_iter().filter(|r| r.node != self.id) {
            s.table.report(now, r, Via::Upstream);
        }
        Ok(())
    }

    /// The upstream link is down: no path until it is back.
    pub fn upstream_lost(&self) {
        self.lock().path.clear();
    }

    /// The link of the node below that reported `id` (last at `heard`)
    /// ended: it is no placement target any more (a dead edge leaves the
    /// table within the link's idle timeout, not [`FRESH`]).
    pub fn link_below_lost(&self, id: &str, heard: Instant) {
        self.lock().table.forget_below(id, heard);
    }

    /// Forgets stale nodes.
    pub fn expire(&self, now: Instant) {
        self.lock().table.expire(now);
    }

    /// The least loaded healthy edge other than this node.
    pub fn best_edge(&self, now: Instant) -> Option<Report> {
        self.lock().table.best_edge(now, &self.id).cloned()
    }

    /// This node (tier from its path, age 0) and every node it heard of.
    pub fn snapshot(&self, now: Instant) -> Vec<NodeView> {
        let own = self.own();
        let mut v = vec![NodeView {
            tier: own.tier(),
            report: own,
            last_seen_ms: 0,
            via: Via::Below,
        }];
        let s = self.lock();
        v.extend(s.table.snapshot(now));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str, sessions: u64, max: u64, cpu: u32) -> Report {
        Report {
            node: id.into(),
            role: "edge".into(),
            url: format!("http://{id}.example:8080"),
            sessions,
            max_sessions: max,
            cpu_permille: cpu,
            upstream: vec!["00".into()],
            ..Default::default()
        }
    }

    #[test]
    fn best_edge_is_the_least_filled_healthy_fresh_one() {
        let t0 = Instant::now();
        let mut c = Cluster::default();
        c.report(t0, edge("a1", 9, 10, 100), Via::Below);
        c.report(t0, edge("b2", 2, 10, 500), Via::Below);
        c.report(t0, edge("c3", 2, 10, 200), Via::Below);
        // Same fill: the one with less CPU.
        assert_eq!(c.best_edge(t0, "zz").map(|r| r.node.as_str()), Some("c3"));
        // Never ourselves.
        assert_eq!(c.best_edge(t0, "c3").map(|r| r.node.as_str()), Some("b2"));
        // Draining and full ones are not healthy; neither is an ingest.
        c.report(
            t0,
            Report {
                draining: true,
                ..edge("c3", 0, 10, 0)
            },
            Via::Below,
        );
        c.report(t0, edge("b2", 10, 10, 0), Via::Below);
        c.report(
            t0,
            Report {
                role: "ingest".into(),
                ..edge("d4", 0, 10, 0)
            },
            Via::Below,
        );
        assert_eq!(c.best_edge(t0, "zz").map(|r| r.node.as_str()), Some("a1"));
        // Stale: a1 heard 6 s ago is no target, and expiry drops it.
        let t6 = t0 + Duration::from_secs(6);
        c.report(t6, edge("e5", 5, 10, 0), Via::Below);
        assert_eq!(c.best_edge(t6, "zz").map(|r| r.node.as_str()), Some("e5"));
        assert_eq!(c.len(), 5);
        c.expire(t6);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_lost_link_forgets_its_node_unless_it_reported_again() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut c = Cluster::default();
        c.report(t0, edge("a1", 0, 10, 0), Via::Below);
        c.report(t0, edge("b2", 0, 10, 0), Via::Upstream);
        c.forget_below("a1", t0);
        assert_eq!(c.best_edge(t0, "zz").map(|r| r.node.as_str()), Some("b2"));
        // Only what came from below, directly: the upstream's copy stays.
        c.forget_below("b2", t1);
        assert_eq!(c.len(), 1);
        // Reconnected over a new link before the old one was noticed: kept.
        c.report(t1, edge("a1", 0, 10, 0), Via::Below);
        c.forget_below("a1", t0);
        assert_eq!(c.len(), 2);
        c.forget_below("nobody", t1);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn reports_age_and_older_ones_do_not_overwrite() {
        let t0 = Instant::now();
        let t2 = t0 + Duration::from_secs(2);
        let mut c = Cluster::default();
        c.report(t2, edge("a1", 1, 10, 0), Via::Below);
        // Heard from the upstream with an age of 1.5 s: older, ignored.
        c.report(
            t2,
            Report {
                age_ms: 1500,
                ..edge("a1", 7, 10, 0)
            },
            Via::Upstream,
        );
        let snap = c.snapshot(t2 + Duration::from_millis(300));
        assert_eq!(snap[0].report.sessions, 1);
        assert_eq!(snap[0].last_seen_ms, 300);
        assert_eq!(snap[0].tier, 1);
        // Forwarded on with its age.
        let fwd = c.forward(t2 + Duration::from_millis(400), Some(Via::Below), 8);
        assert_eq!(fwd[0].age_ms, 400);
        assert!(c.forward(t2, Some(Via::Upstream), 8).is_empty());
        // Too old to count at all.
        assert!(!c.report(
            t2,
            Report {
                age_ms: 9000,
                ..edge("b2", 0, 1, 0)
            },
            Via::Upstream
        ));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut c = Cluster::default();
        for n in 0..MAX_NODES + 10 {
            c.report(t0, edge(&format!("{n:x}"), 0, 1, 0), Via::Below);
        }
        assert_eq!(c.len(), MAX_NODES);
    }

    #[test]
    fn validation_refuses_bad_reports() {
        assert!(edge("a1", 0, 1, 0).validate().is_ok());
        let bad = [
            Report {
                node: "A1".into(),
                ..edge("a1", 0, 1, 0)
            },
            Report {
                node: String::new(),
                ..edge("a1", 0, 1, 0)
            },
            Report {
                url: "javascript:x".into(),
                ..edge("a1", 0, 1, 0)
            },
            Report {
                url: "http://a b".into(),
                ..edge("a1", 0, 1, 0)
            },
            Report {
                url: format!("http://{}", "a".repeat(MAX_URL)),
                ..edge("a1", 0, 1, 0)
            },
            Report {
                role: "a b".into(),
                ..edge("a1", 0, 1, 0)
            },
            Report {
                streams: vec!["a b".into()],
                ..edge("a1", 0, 1, 0)
            },
            Report {
                streams: vec!["s".into(); MAX_STREAMS + 1],
                ..edge("a1", 0, 1, 0)
            },
            Report {
                upstream: vec!["0".into(); MAX_TIERS + 1],
                ..edge("a1", 0, 1, 0)
            },
        ];
        for r in bad {
            assert!(r.validate().is_err(), "{r:?}");
        }
        assert!(validate_reports(&vec![edge("a1", 0, 1, 0); MAX_REPORT_NODES + 1]).is_err());
        assert!(validate_path(&["xyz".to_string()]).is_err());
    }

    #[test]
    fn loops_are_named_from_us_up_and_back() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(loop_through("a", &p(&["o", "b"])), None);
        assert_eq!(loop_through("a", &p(&["b", "a"])).as_deref(), Some("a → a"));
        assert_eq!(
            loop_through("a", &p(&["a", "b"])).as_deref(),
            Some("a → b → a")
        );
        assert_eq!(
            loop_through("a", &p(&["a", "c", "b"])).as_deref(),
            Some("a → b → c → a")
        );
    }

    #[test]
    fn two_nodes_linked_both_ways_refuse_the_loop() {
        let t0 = Instant::now();
        let a = Node::new("edge", "http://a");
        let b = Node::new("edge", "http://b");
        // a links to b, b links to a; a reports up to b first.
        b.handle_load(t0, a.load_message(t0)).unwrap();
        let (path, nodes) = b.cluster_message(t0);
        a.handle_cluster(t0, path, nodes).unwrap();
        // b's Load up to a carries a's own report back (a is below b):
        // refused at a, the chain named from a upwards.
        let e = a.handle_load(t0, b.load_message(t0)).unwrap_err();
        assert!(matches!(e, ProtocolError::Loop(_)), "{e}");
        assert_eq!(
            e.to_string(),
            format!("relay loop: {a} → {b} → {a}", a = a.id(), b = b.id())
        );
        // And a's Cluster down to b runs through b: refused there too.
        let (path, nodes) = a.cluster_message(t0);
        let e = b.handle_cluster(t0, path, nodes).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("relay loop: {b} → {a} → {b}", a = a.id(), b = b.id())
        );
    }

    #[test]
    fn a_node_reporting_to_itself_is_a_loop() {
        let t0 = Instant::now();
        let a = Node::new("edge", "http://a");
        assert!(a.handle_load(t0, a.load_message(t0)).is_err());
        let (path, nodes) = a.cluster_message(t0);
        assert!(a.handle_cluster(t0, path, nodes).is_err());
    }

    #[test]
    fn a_chain_gives_every_node_its_tier_and_the_origin_the_whole_table() {
        let t0 = Instant::now();
        let origin = Node::new("origin", "");
        let e1 = Node::new("edge", "http://e1");
        let e2 = Node::new("edge", "http://e2");
        for n in [&e1, &e2] {
            n.set_max_sessions(10);
        }
        // e1 under the origin, e2 under e1; two rounds of reports.
        for _ in 0..2 {
            let (p, n) = origin.cluster_message(t0);
            e1.handle_cluster(t0, p, n).unwrap();
            let (p, n) = e1.cluster_message(t0);
            e2.handle_cluster(t0, p, n).unwrap();
            e1.handle_load(t0, e2.load_message(t0)).unwrap();
            origin.handle_load(t0, e1.load_message(t0)).unwrap();
        }
        let snap = origin.snapshot(t0);
        let tiers: Vec<(String, usize)> = snap
            .iter()
            .map(|v| (v.report.node.clone(), v.tier))
            .collect();
        assert_eq!(
            tiers,
            vec![
                (origin.id().to_string(), 0),
                (e1.id().to_string(), 1),
                (e2.id().to_string(), 2)
            ]
        );
        // e2 places on e1 (it never places on itself).
        e2.expire(t0);
        assert_eq!(e2.best_edge(t0).map(|r| r.node), Some(e1.id().to_string()));
    }
}
