//! `--events-webhook`: tells the operator's own service what happens on this
//! node — a publish starts or stops, viewers come and go (batched), a pull
//! changes state, the node drains — by POSTing JSON batches to a URL.
//!
//! Fire and forget, never in the way of media: producers call
//! [`Events::emit`], which only `try_send`s into a bounded queue (full →
//! the event is dropped and counted); one task batches the queue (up to
//! [`MAX_BATCH`] events or [`BATCH_WINDOW`]) and POSTs each batch once with
//! a [`POST_TIMEOUT`], no retries, so a slow or dead receiver costs one
//! task and a bounded queue, never memory or latency elsewhere.
//!
//! Publish and viewer events come from [`Tracker`], a sans-IO diff of
//! [`cascade_origin::Registry::list`] snapshots taken every
//! [`POLL_EVERY`]: no hook in the media path at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cascade_origin::registry::StreamStats;
use cascade_origin::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Events waiting to be sent; past it new ones are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Events per POST at most.
pub const MAX_BATCH: usize = 256;
/// How long the sender gathers events before a POST.
pub const BATCH_WINDOW: Duration = Duration::from_millis(500);
/// A POST that has not been answered in this long is abandoned.
pub const POST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the registry is compared with its last snapshot.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

const SENT: &str = "cascade_events_sent_total";
const DROPPED: &str = "cascade_events_dropped_total";
const POSTS: &str = "cascade_events_posts_total";

/// What happened. Serialized as `{"type": "publish_start", ...}` with the
/// time (`at`, UNIX milliseconds) and node added by [`Events::emit`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A publisher went live (WHIP, RTMP, RTSP; not relayed copies).
    PublishStart { stream: String, protocol: String },
    /// The stream's publisher left (and no takeover followed).
    PublishStop { stream: String, protocol: String },
    /// Viewers of a stream on this node changed since the last report:
    /// `viewers` now, `delta` the net change (a batch, not one per viewer).
    Viewers {
        stream: String,
        viewers: usize,
        delta: i64,
    },
    /// An RTSP pull changed state (`idle`, `connecting`, `live`, `error`,
    /// or `removed` when it was deleted), with its last error.
    Pull {
        stream: String,
        state: String,
        error: Option<String>,
    },
    /// The node started draining (SIGTERM or `POST /api/drain`).
    Drain { timeout_s: u64 },
}

#[derive(Serialize)]
struct Stamped<'a> {
    #[serde(flatten)]
    event: &'a Event,
    at: u64,
}

#[derive(Serialize)]
struct Batch<'a> {
    node: &'a str,
    events: Vec<Stamped<'a>>,
}

/// The producers' handle; cheap to clone. A disabled one (no webhook)
/// does nothing.
#[derive(Clone, Default)]
pub struct Events {
    tx: Option<mpsc::Sender<(Event, u64)>>,
}

impl Events {
    /// Starts the sender task for `url`; `node` names this node in every
    /// batch (its role and HTTP address). The task ends when every clone
    /// of the handle is gone, after sending what is queued; await it (with
    /// a timeout) at shutdown so the last events go out.
    pub fn start(url: String, node: String) -> anyhow::Result<(Self, JoinHandle<()>)> {
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .connect_timeout(POST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // Like the auth webhook: the operator's URL, not a proxy's.
            .no_proxy()
            .build()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(send_loop(client, url, node, rx));
        Ok((Self { tx: Some(tx) }, task))
    }

    /// Queues `event` without waiting; dropped (and counted) when the
    /// queue is full.
    pub fn emit(&self, event: Event) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send((event, unix_ms())).is_err() {
            metrics::counter!(DROPPED).increment(1);
        }
    }

    /// True when a webhook is configured.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn send_loop(
    client: reqwest::Client,
    url: String,
    node: String,
    mut rx: mpsc::Receiver<(Event, u64)>,
) {
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    let mut last_error_log: Option<tokio::time::Instant> = None;
    loop {
        // None: every handle is gone and the queue is empty.
        let Some(first) = rx.recv().await else { break };
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + BATCH_WINDOW;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        {
            let body = Batch {
                node: &node,
                events: batch
                    .iter()
                    .map(|(event, at)| Stamped { event, at: *at })
                    .collect(),
            };
            let result = match client.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("answered {}", r.status())),
                Err(e) if e.is_timeout() => Err("no answer within 2 s".to_string()),
                Err(_) => Err("unreachable".to_string()),
            };
            match result {
                Ok(()) => {
                    metrics::counter!(POSTS, "result" => "ok").increment(1);
                    metrics::counter!(SENT).increment(batch.len() as u64);
                }
                Err(why) => {
                    metrics::counter!(POSTS, "result" => "error").increment(1);
                    metrics::counter!(DROPPED).increment(batch.len() as u64);
                    let now = tokio::time::Instant::now();
                    // One line a minute: a dead receiver must not flood logs.
                    if last_error_log.is_none_or(|t| now - t >= Duration::from_secs(60)) {
                        last_error_log = Some(now);
                        tracing::warn!(%host, %why, events = batch.len(), "events webhook failed; these events are dropped (logged once a minute)");
                    }
                }
            }
        }
    }
}

/// Diffs registry snapshots into publish and viewer events (sans-IO).
#[derive(Debug, Default)]
pub struct Tracker {
    /// Stream → (protocol, viewers, relayed) at the last snapshot.
    seen: HashMap<String, (String, usize, bool)>,
}

impl Tracker {
    /// The events that turn the last snapshot into `now`. Relayed copies
    /// (`StreamStats::relayed`) report viewers but not publishes: the node
    /// that holds the publisher reports those, once for the cluster.
    pub fn observe(&mut self, now: &[StreamStats]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut next = HashMap::with_capacity(now.len());
        for s in now {
            let before = self.seen.remove(&s.stream);
            let publisher = !s.relayed;
            match &before {
                None if publisher => out.push(Event::PublishStart {
                    stream: s.stream.clone(),
                    protocol: s.protocol.clone(),
                }),
                // A takeover by another protocol is a new publish.
                Some((p, _, _)) if publisher && *p != s.protocol => {
                    out.push(Event::PublishStop {
                        stream: s.stream.clone(),
                        protocol: p.clone(),
                    });
                    out.push(Event::PublishStart {
                        stream: s.stream.clone(),
                        protocol: s.protocol.clone(),
                    });
                }
                _ => {}
            }
            let was = before.as_ref().map_or(0, |b| b.1);
            if was != s.viewers {
                out.push(Event::Viewers {
                    stream: s.stream.clone(),
                    viewers: s.viewers,
                    delta: s.viewers as i64 - was as i64,
                });
            }
            next.insert(s.stream.clone(), (s.protocol.clone(), s.viewers, s.relayed));
        }
        let mut gone: Vec<_> = self.seen.drain().collect();
        gone.sort();
        for (stream, (protocol, viewers, relayed)) in gone {
            if viewers > 0 {
                out.push(Event::Viewers {
                    stream: stream.clone(),
                    viewers: 0,
                    delta: -(viewers as i64),
                });
            }
            if !relayed {
                out.push(Event::PublishStop { stream, protocol });
            }
        }
        self.seen = next;
        out
    }
}

/// Diffs `/api/pulls` snapshots into pull events (sans-IO).
#[derive(Debug, Default)]
pub struct PullTracker {
    /// Stream → (state, error) at the last snapshot.
    seen: HashMap<String, (&'static str, Option<String>)>,
}

impl PullTracker {
    /// The pull events that turn the last snapshot into `now`.
    pub fn observe(&mut self, now: &[cascade_ingest::rtsp::PullInfo]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut next = HashMap::with_capacity(now.len());
        for p in now {
            let state = (p.state, p.error.clone());
            if self.seen.remove(&p.stream).as_ref() != Some(&state) {
                out.push(Event::Pull {
                    stream: p.stream.clone(),
                    state: p.state.to_string(),
                    error: p.error.clone(),
                });
            }
            next.insert(p.stream.clone(), state);
        }
        let mut gone: Vec<String> = self.seen.drain().map(|(s, _)| s).collect();
        gone.sort();
        out.extend(gone.into_iter().map(|stream| Event::Pull {
            stream,
            state: "removed".into(),
            error: None,
        }));
        self.seen = next;
        out
    }
}

/// Watches `registry` (and the node's RTSP `pulls`) every [`POLL_EVERY`]
/// and emits what changed, until `stop`; then one last look (a drain that
/// just ended reports its stops) and the task ends, dropping its handle.
pub fn watch_registry(
    registry: Arc<Registry>,
    pulls: Option<Arc<cascade_ingest::rtsp::Pulls>>,
    events: Events,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    if !events.enabled() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut pull_tracker = PullTracker::default();
        let mut tracker = Tracker::default();
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.cancelled() => true,
            };
            for e in tracker.observe(&registry.list()) {
                events.emit(e);
            }
            if let Some(p) = &pulls {
                for e in pull_tracker.observe(&p.list()) {
                    events.emit(e);
                }
            }
            if last {
                break;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(stream: &str, protocol: &str, viewers: usize) -> StreamStats {
        StreamStats {
            relayed: protocol == "relay",
            stream: stream.into(),
            protocol: protocol.into(),
            codecs: vec![],
            bframes: false,
            bitrate_bps: 0,
            viewers,
            uptime_s: 0,
            renditions: vec![],
        }
    }

    #[test]
    fn publishes_start_and_stop_once() {
        let mut t = Tracker::default();
        let e = t.observe(&[stats("cam", "rtmp", 0)]);
        assert_eq!(
            e,
            vec![Event::PublishStart {
                stream: "cam".into(),
                protocol: "rtmp".into()
            }]
        );
        assert!(t.observe(&[stats("cam", "rtmp", 0)]).is_empty());
        assert_eq!(
            t.observe(&[]),
            vec![Event::PublishStop {
                stream: "cam".into(),
                protocol: "rtmp".into()
            }]
        );
        assert!(t.observe(&[]).is_empty());
    }

    #[test]
    fn viewers_are_reported_as_batched_changes() {
        let mut t = Tracker::default();
        t.observe(&[stats("cam", "whip", 0)]);
        assert_eq!(
            t.observe(&[stats("cam", "whip", 5)]),
            vec![Event::Viewers {
                stream: "cam".into(),
                viewers: 5,
                delta: 5
            }]
        );
        assert_eq!(
            t.observe(&[stats("cam", "whip", 2)]),
            vec![Event::Viewers {
                stream: "cam".into(),
                viewers: 2,
                delta: -3
            }]
        );
        // The stream ends with viewers still attached: they are gone too.
        assert_eq!(
            t.observe(&[]),
            vec![
                Event::Viewers {
                    stream: "cam".into(),
                    viewers: 0,
                    delta: -2
                },
                Event::PublishStop {
                    stream: "cam".into(),
                    protocol: "whip".into()
                }
            ]
        );
    }

    #[test]
    fn relayed_copies_report_viewers_not_publishes() {
        let mut t = Tracker::default();
        assert_eq!(
            t.observe(&[stats("cam", "relay", 1)]),
            vec![Event::Viewers {
                stream: "cam".into(),
                viewers: 1,
                delta: 1
            }]
        );
        assert_eq!(
            t.observe(&[]),
            vec![Event::Viewers {
                stream: "cam".into(),
                viewers: 0,
                delta: -1
            }]
        );
    }

    #[test]
    fn a_takeover_by_another_protocol_is_stop_then_start() {
        let mut t = Tracker::default();
        t.observe(&[stats("cam", "rtmp", 0)]);
        assert_eq!(
            t.observe(&[stats("cam", "whip", 0)]),
            vec![
                Event::PublishStop {
                    stream: "cam".into(),
                    protocol: "rtmp".into()
                },
                Event::PublishStart {
                    stream: "cam".into(),
                    protocol: "whip".into()
                }
            ]
        );
    }

    #[test]
    fn pulls_report_each_state_change_once_and_their_removal() {
        let info = |state: &'static str, error: Option<&str>| cascade_ingest::rtsp::PullInfo {
            stream: "cam".into(),
            url: "rtsp://h/p".into(),
            on_demand: false,
            state,
            error: error.map(str::to_string),
        };
        let mut t = PullTracker::default();
        let pull = |state: &str, error: Option<&str>| Event::Pull {
            stream: "cam".into(),
            state: state.into(),
            error: error.map(str::to_string),
        };
        assert_eq!(
            t.observe(&[info("connecting", None)]),
            [pull("connecting", None)]
        );
        assert!(t.observe(&[info("connecting", None)]).is_empty());
        assert_eq!(
            t.observe(&[info("error", Some("Connection refused"))]),
            [pull("error", Some("Connection refused"))]
        );
        assert_eq!(t.observe(&[]), [pull("removed", None)]);
    }

    #[test]
    fn events_serialize_with_type_and_time() {
        let e = Event::Drain { timeout_s: 30 };
        let j = serde_json::to_value(Batch {
            node: "edge 10.0.0.1:8080",
            events: vec![Stamped { event: &e, at: 7 }],
        })
        .unwrap();
        assert_eq!(
            j,
            serde_json::json!({"node": "edge 10.0.0.1:8080", "events": [{"type": "drain", "timeout_s": 30, "at": 7}]})
        );
    }

    #[tokio::test]
    async fn a_disabled_handle_and_a_full_queue_never_block() {
        Events::default().emit(Event::Drain { timeout_s: 1 });
        let (tx, _rx) = mpsc::channel(1);
        let events = Events { tx: Some(tx) };
        // Nobody reads: the second and later emits are dropped at once.
        for _ in 0..10 {
            events.emit(Event::Drain { timeout_s: 1 });
        }
    }
}
