//! One authenticated relay link, the same on both ends: the async shell
//! around the link core ([`Link`]). The core decides (ids, subscriptions,
//! retries); the shell writes its control messages, runs the stream tasks
//! it starts and stops, asks the registry, and feeds back what happens.
//!
//! Loop: perform the core's actions until none is left, then `select!` over
//! control messages (read by a helper task), events from stream tasks, local
//! commands, uplink announcements, new group streams and the core's next
//! retry, and hand what arrives to the core. The link ends on any
//! control-stream error.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod handle;

pub(crate) use super::link::Side;
use super::link::{Link, Report};
use super::recv::{read_group, Incoming, Routes};
use super::send::Outgoing;
use super::wire::{read_message, Message};
use super::{code, AbortOnDrop};
use crate::cluster::{Node, REPORT_INTERVAL};
use crate::metrics::{RELAY_LINKS, RELAY_PROTOCOL_ERRORS, RELAY_REFUSED};
use crate::registry::{Registry, Subscriber};
use crate::{Error, ProtocolError, Result};

/// Control messages read ahead of the session loop.
const CONTROL_QUEUE: usize = 64;
/// Events from stream tasks (catalog, end, keyframe requests): rare, small.
const EVENT_QUEUE: usize = 256;
/// A control write the peer does not accept within this time ends the link.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `Subscribe` from the peer may wait for the stream (a cascading
/// node fetches it from its own upstream first).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The link core with the shell's handles: fetched streams are published in
/// a registry, fetches wait on a oneshot, local streams are sent from a
/// registry subscriber.
type Core = Link<Arc<Registry>, Fetch, Subscriber>;
/// Where a local fetch hears whether the stream came.
type Fetch = oneshot::Sender<Result<()>>;

/// What the session's tasks send it.
pub(crate) enum Event {
    /// A stream task's report, for the core.
    Stream(Report),
    /// The peer's subscription found (or did not find) its stream.
    Resolved {
        id: u64,
        subscriber: Option<Subscriber>,
    },
}

impl From<Report> for Event {
    fn from(r: Report) -> Self {
        Self::Stream(r)
    }
}

/// Requests from the local node to the link.
pub(crate) enum Command {
    /// Subscribe to `name` upstream and publish it in `registry`.
    Subscribe {
        registry: Arc<Registry>,
        name: String,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Local inputs a session may take besides the peer.
pub(crate) struct Inputs<'a> {
    pub(crate) commands: Option<&'a mut mpsc::Receiver<Command>>,
    pub(crate) uplink: Option<watch::Receiver<Option<Arc<Registry>>>>,
    pub(crate) linger: Duration,
    /// How long resubscriptions of held streams are retried.
    pub(crate) hold: Duration,
    pub(crate) cancel: CancellationToken,
    /// Fires to drop the link on purpose (it is then treated as lost).
    pub(crate) kick: Option<Arc<Notify>>,
    /// Streams to subscribe again at once (held over from a lost link).
    pub(crate) resubscribe: Vec<(Arc<Registry>, String)>,
}

/// What a lost link leaves behind: the streams it fed, kept live for a
/// grace period so a reconnect can take them over without ending them.
pub(crate) struct Orphans {
    held: Vec<Incoming>,
    /// Our subscriptions among them, to subscribe again after reconnecting.
    pub(crate) resubscribe: Vec<(Arc<Registry>, String)>,
    /// Streams this link published upstream.
    pub(crate) uplinked: HashSet<String>,
}

impl Orphans {
    /// Keeps the streams live for `grace`, then ends those nobody took over.
    pub(crate) fn hold(self, grace: Duration) {
        if self.held.is_empty() {
            return;
        }
        let held = self.held;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            drop(held);
        });
    }
}

/// True when the link ended in a way worth a grace period: the peer (or
/// the network) vanished, rather than someone closing it on purpose.
pub(crate) fn lost(end: &Result<()>) -> bool {
    match end {
        Err(Error::Connection(quinn::ConnectionError::ApplicationClosed(c))) => {
            c.error_code != code::CLOSED
        }
        Err(Error::Connection(quinn::ConnectionError::LocallyClosed)) => false,
        Err(Error::Connection(_)) | Err(Error::Unavailable) => true,
        _ => false,
    }
}

pub(crate) struct Session {
    conn: quinn::Connection,
    control: quinn::SendStream,
    serve: Option<Arc<Registry>>,
    core: Core,
    routes: Arc<Routes>,
    seq: Arc<AtomicU64>,
    /// The stream tasks of the ids the core sends and receives.
    outgoing: HashMap<u64, Outgoing>,
    incoming: HashMap<u64, Incoming>,
    events_tx: mpsc::Sender<Event>,
    linger: Duration,
    /// This node in the cluster: load reports go up, tables come down.
    node: Arc<Node>,
    side: Side,
    /// The peer below us has reported: it speaks `Load`/`Cluster`, so it
    /// gets our table (an older peer never hears a message it would refuse).
    peer_reports: bool,
    /// The node below (accepting side) and when it last reported: it
    /// leaves our table when this link ends.
    peer_node: Option<(String, Instant)>,
}

/// Decrements the links gauge when the session ends, however it ends.
struct LinkGauge(&'static str);

impl Drop for LinkGauge {
    fn drop(&mut self) {
        metrics::gauge!(RELAY_LINKS, "direction" => self.0).decrement(1.0);
    }
}

async fn next_command(rx: &mut Option<&mut mpsc::Receiver<Command>>) -> Option<Command> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_announcement(
    rx: &mut Option<broadcast::Receiver<String>>,
) -> Result<String, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until the core's next retry; pending forever without one.
async fn retry_due(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn uplink_changed(
    rx: &mut Option<watch::Receiver<Option<Arc<Registry>>>>,
) -> Option<Arc<Registry>> {
    match rx {
        Some(w) => match w.changed().await {
            Ok(()) => w.borrow_and_update().clone(),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Session {
    /// A session on an authenticated link. `serve`: the registry the peer
    /// may publish to and subscribe from. `resume_uplink`: the streams the
    /// lost link before this one published.
    pub(crate) fn new(
        conn: quinn::Connection,
        control: quinn::SendStream,
        side: Side,
        serve: Option<Arc<Registry>>,
        resume_uplink: HashSet<String>,
        node: Arc<Node>,
    ) -> Self {
        Self {
            node,
            side,
            peer_reports: false,
            peer_node: None,
            conn,
            control,
            core: Link::new(side, serve.is_some(), resume_uplink),
            serve,
            routes: Arc::new(Routes::default()),
            // Group sequences start at 1: 0 means "no previous group".
            seq: Arc::new(AtomicU64::new(1)),
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            events_tx: mpsc::channel(1).0,
            linger: Duration::ZERO,
        }
    }

    /// Runs the link until the connection ends or `inputs.cancel` fires.
    pub(crate) async fn run(
        &mut self,
        mut recv: quinn::RecvStream,
        side: Side,
        mut inputs: Inputs<'_>,
    ) -> Result<()> {
        let direction = if side == Side::Connected { "out" } else { "in" };
        metrics::gauge!(RELAY_LINKS, "direction" => direction).increment(1.0);
        let _gauge = LinkGauge(direction);
        self.linger = inputs.linger;
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        self.events_tx = events_tx;
        let (ctl_tx, mut control) = mpsc::channel(CONTROL_QUEUE);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let msg = read_message(&mut recv).await;
                let failed = msg.is_err();
                if ctl_tx.send(msg).await.is_err() || failed {
                    break;
                }
            }
        }));
        let mut uplink: Option<Arc<Registry>> = inputs
            .uplink
            .as_mut()
            .and_then(|w| w.borrow_and_update().clone());
        let mut announcements = None;
        if let Some(reg) = uplink.clone() {
            announcements = Some(reg.announcements());
            self.uplink_all(&reg).await?;
        }
        for (registry, name) in std::mem::take(&mut inputs.resubscribe) {
            if registry.subscribers(&name) > 0 {
                let until = Instant::now() + inputs.hold;
                let live = registry.is_live(&name);
                self.core.handle_resubscribe(registry, name, until, live);
            }
        }
        self.perform_actions().await?;
        // The first report goes at once: a loop is refused within a round trip.
        let mut report_tick = tokio::time::interval(REPORT_INTERVAL);
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let kick = inputs.kick.clone().unwrap_or_default();
        let result = loop {
            if let Err(e) = self.perform_actions().await {
                break Err(e);
            }
            let retry_at = self.core.poll_timeout();
            let step = tokio::select! {
                msg = control.recv() => match msg {
                    Some(Ok(m)) => self.core.handle_message(Instant::now(), m),
                    Some(Err(e)) => Err(e),
                    None => Err(Error::Closed),
                },
                Some(ev) = events.recv() => {
                    self.on_event(ev);
                    Ok(())
                }
                Some(cmd) = next_command(&mut inputs.commands) => {
                    self.on_command(cmd);
                    Ok(())
                }
                name = next_announcement(&mut announcements) => match (name, uplink.clone()) {
                    (Ok(name), Some(reg)) => self.uplink_one(&reg, &name).await,
                    // Missed some: rescan.
                    (Err(broadcast::error::RecvError::Lagged(_)), Some(reg)) => self.uplink_all(&reg).await,
                    _ => Ok(()),
                },
                reg = uplink_changed(&mut inputs.uplink) => {
                    uplink = reg;
                    announcements = uplink.as_ref().map(|r| r.announcements());
                    match uplink.clone() {
                        Some(reg) => self.uplink_all(&reg).await,
                        None => Ok(()),
                    }
                }
                uni = self.conn.accept_uni() => match uni {
                    Ok(stream) => {
                        tokio::spawn(read_group(self.conn.clone(), stream, self.routes.clone()).in_current_span());
                        Ok(())
                    }
                    Err(e) => Err(Error::Connection(e)),
                },
                _ = report_tick.tick() => self.report().await,
                _ = retry_due(retry_at), if retry_at.is_some() => {
                    self.core.handle_timeout(Instant::now());
                    Ok(())
                }
                _ = kick.notified() => {
                    self.conn.close(code::RECONNECT, b"reconnecting");
                    break Err(Error::Unavailable);
                }
                _ = inputs.cancel.cancelled() => {
                    self.conn.close(code::CLOSED, b"shutting down");
                    break Ok(());
                }
            };
            if let Err(e) = step {
                break Err(e);
            }
        };
        if side == Side::Connected {
            self.node.upstream_lost();
        }
        if let Some((id, heard)) = self.peer_node.take() {
            self.node.link_below_lost(&id, heard);
        }
        if let Err(Error::Protocol(ProtocolError::Loop(chain))) = &result {
            tracing::error!(
                "relay loop: {chain}: refusing the link (an edge's --origin leads back to itself)"
            );
            metrics::counter!(RELAY_REFUSED, "reason" => "loop").increment(1);
            let text = format!("relay loop: {chain}");
            let reason = text.as_bytes();
            self.conn.close(
                code::LOOP,
                reason.get(..reason.len().min(200)).unwrap_or(reason),
            );
            return result;
        }
        let violation = match &result {
            Err(Error::Protocol(reason)) => Some(reason.to_string()),
            Err(Error::BadStreamName) => Some("bad stream name".to_string()),
            _ => None,
        };
        if let Some(reason) = violation {
            tracing::info!(%reason, "peer broke the relay protocol: closing");
            metrics::counter!(RELAY_PROTOCOL_ERRORS).increment(1);
            self.conn.close(code::PROTOCOL, b"protocol violation");
        }
        result
    }

    /// Takes the streams this link fed, for [`Orphans::hold`].
    pub(crate) fn orphans(&mut self) -> Orphans {
        let left = self.core.orphans();
        Orphans {
            held: self.incoming.drain().map(|(_, i)| i).collect(),
            resubscribe: left.resubscribe,
            uplinked: left.uplinked,
        }
    }

    /// Every [`REPORT_INTERVAL`]: our load goes up (connecting side), our
    /// path and table go down to a peer that reports (accepting side).
    async fn report(&mut self) -> Result<()> {
        let now = Instant::now();
        self.node.expire(now);
        match self.side {
            Side::Connected => {
                let nodes = self.node.load_message(now);
                self.write(&Message::Load { nodes }).await
            }
            Side::Accepted if self.peer_reports => self.send_cluster(now).await,
            Side::Accepted => Ok(()),
        }
    }

    pub(super) async fn send_cluster(&mut self, now: Instant) -> Result<()> {
        let (path, nodes) = self.node.cluster_message(now);
        self.write(&Message::Cluster { path, nodes }).await
    }

    async fn write(&mut self, msg: &Message) -> Result<()> {
        let bytes = msg.encode()?;
        match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, self.control.write_all(&bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(quinn::WriteError::ConnectionLost(e))) => Err(Error::Connection(e)),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => {
                tracing::info!("control stream stalled: closing");
                self.conn.close(code::CLOSED, b"control stream stalled");
                Err(Error::Closed)
            }
        }
    }
}
