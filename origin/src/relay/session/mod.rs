//! One authenticated relay link, the same on both ends: it serves the
//! peer's `Publish`/`Subscribe` from a registry (server side), issues its
//! own for the uplink and for upstream fetches (client side), and routes
//! every later message by id to the stream task it concerns.
//!
//! Loop: `select!` over control messages (read by a helper task), events
//! from stream tasks, local commands, uplink announcements and new group
//! streams; the link ends on any control-stream error.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod handle;

use super::recv::{read_group, Incoming, Routes};
use super::send::Outgoing;
use super::wire::{read_message, Message};
use super::{code, AbortOnDrop, LINK_GRACE};
use crate::metrics::{RELAY_LINKS, RELAY_PROTOCOL_ERRORS};
use crate::model::catalog::Catalog;
use crate::registry::{Registry, Subscriber};
use crate::{Error, Result};

/// Control messages read ahead of the session loop.
const CONTROL_QUEUE: usize = 64;
/// Events from stream tasks (catalog, end, keyframe requests): rare, small.
const EVENT_QUEUE: usize = 256;
/// A control write the peer does not accept within this time ends the link.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `Subscribe` from the peer may wait for the stream (a cascading
/// node fetches it from its own upstream first).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams the peer may publish to us on one link.
const MAX_PUBLICATIONS: usize = 256;
/// Streams the peer may subscribe to on one link.
const MAX_SUBSCRIPTIONS: usize = 1024;
/// Our own subscriptions awaiting an answer.
const MAX_PENDING: usize = 256;
/// Pause between re-subscription attempts after a lost link.
const RETRY: Duration = Duration::from_millis(500);

/// What stream tasks report to their session.
pub(crate) enum Event {
    /// A stream we send changed its catalog.
    Catalog { id: u64, catalog: Catalog },
    /// A stream we send ended.
    Ended { id: u64 },
    /// A local reader of a stream we receive wants a keyframe.
    Keyframe { id: u64, track: String },
    /// A stream we receive has had no readers for the grace period.
    Idle { id: u64 },
    /// A stream we receive was taken over locally or closed.
    Gone { id: u64 },
    /// Time to ask again for a stream held over from a lost link.
    Retry {
        registry: Arc<Registry>,
        name: String,
        until: Instant,
    },
    /// The peer's subscription found (or did not find) its stream.
    Resolved {
        id: u64,
        subscriber: Option<Subscriber>,
    },
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

struct Pending {
    registry: Arc<Registry>,
    name: String,
    waiters: Vec<oneshot::Sender<Result<()>>>,
    /// For a re-subscription after a lost link: keep asking until then
    /// (the upstream may be back before its own publisher is).
    retry_until: Option<Instant>,
}

/// Which end of the link this is; decides id parity and metric labels.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Accepted,
    Connected,
}

/// Local inputs a session may take besides the peer.
pub(crate) struct Inputs<'a> {
    pub(crate) commands: Option<&'a mut mpsc::Receiver<Command>>,
    pub(crate) uplink: Option<watch::Receiver<Option<Arc<Registry>>>>,
    pub(crate) linger: Duration,
    pub(crate) cancel: CancellationToken,
    /// Fires to drop the link on purpose (it is then treated as lost).
    pub(crate) kick: Option<Arc<Notify>>,
    /// Streams to subscribe again at once (held over from a lost link).
    pub(crate) resubscribe: Vec<(Arc<Registry>, String)>,
    /// Streams the lost link published upstream.
    pub(crate) resume_uplink: HashSet<String>,
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
    next_id: u64,
    routes: Arc<Routes>,
    seq: Arc<AtomicU64>,
    outgoing: HashMap<u64, Outgoing>,
    incoming: HashMap<u64, Incoming>,
    /// Peer subscriptions waiting for their stream, with their `resume` flag.
    resolving: HashMap<u64, bool>,
    pending: HashMap<u64, Pending>,
    pending_names: HashMap<String, u64>,
    /// Our subscriptions by name: id and the registry they feed.
    subscribed: HashMap<String, (u64, Arc<Registry>)>,
    uplinked: HashMap<String, u64>,
    /// Streams the previous (lost) link already published: the peer has
    /// seen their current group, so they resume at the next keyframe.
    resume_uplink: HashSet<String>,
    events_tx: mpsc::Sender<Event>,
    linger: Duration,
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
    pub(crate) fn new(
        conn: quinn::Connection,
        control: quinn::SendStream,
        side: Side,
        serve: Option<Arc<Registry>>,
    ) -> Self {
        Self {
            conn,
            control,
            serve,
            // Ids never clash: the connecting side uses even, the accepting odd.
            next_id: if side == Side::Connected { 0 } else { 1 },
            routes: Arc::new(Routes::default()),
            // Group sequences start at 1: 0 means "no previous group".
            seq: Arc::new(AtomicU64::new(1)),
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            resolving: HashMap::new(),
            pending: HashMap::new(),
            pending_names: HashMap::new(),
            subscribed: HashMap::new(),
            uplinked: HashMap::new(),
            resume_uplink: HashSet::new(),
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
        self.resume_uplink = std::mem::take(&mut inputs.resume_uplink);
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
                let until = Instant::now() + LINK_GRACE;
                self.subscribe(registry, name, None, Some(until)).await?;
            }
        }
        let kick = inputs.kick.clone().unwrap_or_default();
        let result = loop {
            let step = tokio::select! {
                msg = control.recv() => match msg {
                    Some(Ok(m)) => self.on_message(m).await,
                    Some(Err(e)) => Err(e),
                    None => Err(Error::Closed),
                },
                Some(ev) = events.recv() => self.on_event(ev).await,
                Some(cmd) = next_command(&mut inputs.commands) => self.on_command(cmd).await,
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
        let violation = match &result {
            Err(Error::Protocol(reason)) => Some(reason.clone()),
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
        let resubscribe = self
            .subscribed
            .drain()
            .map(|(name, (_, registry))| (registry, name))
            .collect();
        Orphans {
            held: self.incoming.drain().map(|(_, i)| i).collect(),
            resubscribe,
            uplinked: self.uplinked.drain().map(|(name, _)| name).collect(),
        }
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 2;
        id
    }

    fn peer_id(&self, id: u64) -> Result<u64> {
        if id % 2 == self.next_id % 2 {
            return Err(Error::Protocol("id of the wrong parity".into()));
        }
        if self.incoming.contains_key(&id)
            || self.outgoing.contains_key(&id)
            || self.resolving.contains_key(&id)
        {
            return Err(Error::Protocol("id in use".into()));
        }
        Ok(id)
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
