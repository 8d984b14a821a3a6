//! The relay client of ingest and edge nodes: keeps one link to the origin
//! up in the background (reconnecting with backoff, never blocking start-up),
//! publishes the local streams upstream (ingest: [`Client::uplink`]) and
//! fetches streams on demand (edge: the [`Upstream`] implementation).
//!
//! With an origin standby ([`Client::connect_failover`]) the one link goes
//! to whichever of the two origins answers: it stays where it works and
//! moves to the other after a failed attempt or a lost link ([`Targets`]).
//! The streams the lost link fed are held and fetched again through the
//! new link, exactly as after a reconnect to the same origin.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::session::{Command, Inputs, Session, Side};
use super::wire::VERSION;
use super::{auth, code, tls, ALPN, AUTH_TIMEOUT, LINK_GRACE};
use crate::cluster::Node;
use crate::metrics::{RELAY_FAILOVERS, RELAY_REFUSED, RELAY_UPSTREAM};
use crate::registry::{Registry, Upstream};
use crate::{Error, ProtocolError, Result};

/// Fetch requests waiting for the link (e.g. while it reconnects); each
/// waits at most `Options::fetch_timeout`, so the queue stays short.
const COMMAND_QUEUE: usize = 64;
/// First reconnect delay; doubles up to `Options::max_backoff`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Delay before trying again a link refused as a loop: the configuration
/// is wrong and stays wrong until an operator fixes it, so attempts stay
/// rare (no storm of links and fetches around the loop).
pub(crate) const LOOP_BACKOFF: Duration = Duration::from_secs(5);
/// With a standby to try instead, how long the QUIC handshake with one
/// origin may take. A dead origin never answers and QUIC gives up only
/// after three probe timeouts (~3 s with its default first RTT estimate),
/// as long as a fetch waits: a handshake takes milliseconds on a LAN and
/// well under a second across continents.
const FAILOVER_DIAL: Duration = Duration::from_secs(1);

/// Tunables of a [`Client`].
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Bound on an upstream fetch (subscribe and answer), including waiting
    /// for the link to come up: a viewer gets "not live" after this.
    pub fetch_timeout: Duration,
    /// How long a fetched stream stays subscribed without local readers.
    pub linger: Duration,
    /// Longest delay between reconnect attempts: viewers resume at most
    /// this long after the origin is back.
    pub max_backoff: Duration,
    /// How long the streams of a lost link stay live, waiting for it to
    /// come back (`--relay-hold`).
    pub hold: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fetch_timeout: Duration::from_secs(3),
            linger: Duration::from_secs(5),
            max_backoff: Duration::from_secs(1),
            hold: LINK_GRACE,
        }
    }
}

/// The upstreams a dialer may use, in order of preference, and which one
/// it tries now: sans-IO, so the failover policy is tested on its own.
///
/// Policy: stay on the target that works; after a failed attempt or a lost
/// link move to the next one (the origin that just failed is the least
/// likely to answer at once). No return to the primary while the standby
/// works: both origins carry every stream, and a return would cost viewers
/// a second gap for nothing.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    /// `(HOST:PORT, label)`, the label naming it in metrics and logs.
    list: Vec<(String, &'static str)>,
    current: usize,
    /// The target of the last link that came up.
    last_up: Option<usize>,
}

impl Targets {
    pub(crate) fn new(list: Vec<(String, &'static str)>) -> Self {
        Self {
            list,
            current: 0,
            last_up: None,
        }
    }

    /// The address and label to dial now.
    pub(crate) fn current(&self) -> (&str, &'static str) {
        self.list
            .get(self.current)
            .map_or(("", "primary"), |(a, l)| (a.as_str(), *l))
    }

    /// The attempt failed or the link was lost: the next target is next.
    pub(crate) fn failed(&mut self) {
        if !self.list.is_empty() {
            self.current = (self.current + 1) % self.list.len();
        }
    }

    /// A link to the current target came up; true when the previous link
    /// went to another target (a failover).
    pub(crate) fn up(&mut self) -> bool {
        let moved = self.last_up.is_some_and(|i| i != self.current);
        self.last_up = Some(self.current);
        moved
    }

    /// Bound on one QUIC handshake: short when another target waits.
    pub(crate) fn dial_timeout(&self) -> Duration {
        if self.list.len() > 1 {
            FAILOVER_DIAL
        } else {
            AUTH_TIMEOUT
        }
    }

    /// Every target's label, for zeroing gauges.
    pub(crate) fn labels(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.list.iter().map(|(_, l)| *l)
    }
}

/// A link to an upstream node (the origin). Cheap to clone; the background
/// task stops with [`Client::close`] (or when every clone is dropped).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    uplink: watch::Sender<Option<Arc<Registry>>>,
    connected: watch::Receiver<bool>,
    cancel: CancellationToken,
    options: Options,
    kick: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Client {
    /// Starts connecting to `origin` (`HOST:PORT`) in the background with
    /// default [`Options`]. Must be called inside a tokio runtime.
    pub fn connect(origin: String, secret: String) -> Self {
        Self::connect_with(origin, secret, Options::default())
    }

    /// Like [`Client::connect`] with explicit options.
    pub fn connect_with(origin: String, secret: String, options: Options) -> Self {
        Self::connect_node(origin, secret, options, Arc::new(Node::new("node", "")))
    }

    /// Like [`Client::connect_with`] for `node`: its load goes upstream
    /// and the upstream's table comes back into it.
    pub fn connect_node(origin: String, secret: String, options: Options, node: Arc<Node>) -> Self {
        Self::connect_targets(
            Targets::new(vec![(origin, "primary")]),
            secret,
            options,
            node,
        )
    }

    /// Like [`Client::connect_node`] with an origin standby: the link goes
    /// to `primary` while it answers and to `standby` when it does not
    /// (an edge's `--origin-standby`). Both origins must carry the streams
    /// (every ingest uplinks to both).
    pub fn connect_failover(
        primary: String,
        standby: String,
        secret: String,
        options: Options,
        node: Arc<Node>,
    ) -> Self {
        Self::connect_targets(
            Targets::new(vec![(primary, "primary"), (standby, "standby")]),
            secret,
            options,
            node,
        )
    }

    /// Like [`Client::connect_node`] to the origin standby alone: an
    /// ingest's second uplink, which keeps the standby warm with every
    /// stream (labelled `standby` in metrics).
    pub fn connect_standby(
        standby: String,
        secret: String,
        options: Options,
        node: Arc<Node>,
    ) -> Self {
        Self::connect_targets(
            Targets::new(vec![(standby, "standby")]),
            secret,
            options,
            node,
        )
    }

    fn connect_targets(
        targets: Targets,
        secret: String,
        options: Options,
        node: Arc<Node>,
    ) -> Self {
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (uplink, uplink_rx) = watch::channel(None);
        let (connected_tx, connected) = watch::channel(false);
        let cancel = CancellationToken::new();
        let kick = Arc::new(Notify::new());
        let origins: Vec<&str> = targets.list.iter().map(|(a, _)| a.as_str()).collect();
        let span = tracing::info_span!("relay", role = "client", origin = %origins.join(" | "));
        let dialer = Dialer {
            targets,
            secret,
            options,
            commands: commands_rx,
            uplink: uplink_rx,
            connected: connected_tx,
            cancel: cancel.clone(),
            kick: kick.clone(),
            resubscribe: Vec::new(),
            resume_uplink: HashSet::new(),
            resubscribe_until: Instant::now(),
            node,
        };
        tokio::spawn(dialer.run().instrument(span));
        Self {
            inner: Arc::new(Inner {
                commands,
                uplink,
                connected,
                cancel,
                options,
                kick,
            }),
        }
    }

    /// Publishes every stream of `registry` (present and future) upstream,
    /// again after each reconnect.
    pub fn uplink(&self, registry: Arc<Registry>) {
        self.inner.uplink.send_replace(Some(registry));
    }

    /// True while the link is up and authenticated.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Waits until the link is up, at most `within`; returns whether it is.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let mut rx = self.inner.connected.clone();
        tokio::time::timeout(within, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Drops the current link as if it were lost; the client reconnects and
    /// streams carry on after a gap (e.g. after the origin's address changed).
    pub fn reconnect(&self) {
        self.inner.kick.notify_waiters();
    }

    /// Closes the link and stops reconnecting.
    pub fn close(&self) {
        self.inner.cancel.cancel();
    }
}

impl Upstream for Client {
    fn fetch(
        &self,
        registry: Arc<Registry>,
        name: String,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> {
        let commands = self.inner.commands.clone();
        let within = self.inner.options.fetch_timeout;
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let ask = async {
                commands
                    .send(Command::Subscribe {
                        registry,
                        name,
                        reply,
                    })
                    .await
                    .map_err(|_| Error::Unavailable)?;
                answer.await.map_err(|_| Error::Unavailable)?
            };
            match tokio::time::timeout(within, ask).await {
                Ok(Ok(())) => Ok(()),
                // Whatever went wrong upstream, for the viewer it is not live.
                Ok(Err(_)) | Err(_) => Err(Error::NotLive),
            }
        })
    }
}

/// The background task: connect, run the session, back off, repeat.
struct Dialer {
    targets: Targets,
    secret: String,
    options: Options,
    commands: mpsc::Receiver<Command>,
    uplink: watch::Receiver<Option<Arc<Registry>>>,
    connected: watch::Sender<bool>,
    cancel: CancellationToken,
    kick: Arc<Notify>,
    /// Streams of the lost link to fetch again, until `resubscribe_until`.
    resubscribe: Vec<(Arc<Registry>, String)>,
    /// Streams the lost link published, to resume at the next keyframe.
    resume_uplink: HashSet<String>,
    resubscribe_until: Instant,
    node: Arc<Node>,
}

impl Dialer {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut was_failing = false;
        for label in self.targets.labels() {
            metrics::gauge!(RELAY_UPSTREAM, "origin" => label).set(0.0);
        }
        while !self.cancel.is_cancelled() {
            let (addr, label) = self.targets.current();
            let addr = addr.to_string();
            let attempt = tokio::select! {
                a = connect_once(&addr, &self.secret, self.targets.dial_timeout()) => a,
                _ = self.cancel.cancelled() => break,
            };
            match attempt {
                Ok((_endpoint, conn, send, recv)) => {
                    if self.targets.up() {
                        metrics::counter!(RELAY_FAILOVERS, "to" => label).increment(1);
                        tracing::warn!(origin = %addr, to = label, "relay failover: link up to the {label} origin");
                    } else {
                        tracing::info!(origin = %addr, to = label, "relay link up");
                    }
                    metrics::gauge!(RELAY_UPSTREAM, "origin" => label).set(1.0);
                    backoff = MIN_BACKOFF;
                    was_failing = false;
                    self.connected.send_replace(true);
                    let (resubscribe, resume_uplink) = if Instant::now() < self.resubscribe_until {
                        (
                            std::mem::take(&mut self.resubscribe),
                            std::mem::take(&mut self.resume_uplink),
                        )
                    } else {
                        (Vec::new(), HashSet::new())
                    };
                    let mut session = Session::new(
                        conn,
                        send,
                        Side::Connected,
                        None,
                        resume_uplink,
                        self.node.clone(),
                    );
                    let inputs = Inputs {
                        commands: Some(&mut self.commands),
                        uplink: Some(self.uplink.clone()),
                        linger: self.options.linger,
                        hold: self.options.hold,
                        cancel: self.cancel.clone(),
                        kick: Some(self.kick.clone()),
                        resubscribe,
                    };
                    let end = session.run(recv, Side::Connected, inputs).await;
                    self.connected.send_replace(false);
                    metrics::gauge!(RELAY_UPSTREAM, "origin" => label).set(0.0);
                    match &end {
                        Ok(()) => tracing::info!("relay link closed"),
                        Err(e) => match loop_reason(e) {
                            Some(why) => {
                                tracing::error!(retry_in = ?LOOP_BACKOFF, "relay link refused: {why}");
                                backoff = LOOP_BACKOFF;
                            }
                            None => tracing::warn!(error = %e, "relay link lost"),
                        },
                    }
                    if end.is_err() {
                        // Keep fetched streams live for a moment and fetch
                        // them again once reconnected: viewers see a gap.
                        let mut orphans = session.orphans();
                        self.resubscribe = std::mem::take(&mut orphans.resubscribe);
                        self.resume_uplink = std::mem::take(&mut orphans.uplinked);
                        self.resubscribe_until = Instant::now() + self.options.hold;
                        orphans.hold(self.options.hold);
                        // The origin just lost is the least likely to
                        // answer now: the standby (if any) is tried first.
                        self.targets.failed();
                    }
                }
                Err(e) => {
                    if is_auth_failure(&e) {
                        metrics::counter!(RELAY_REFUSED, "reason" => "auth").increment(1);
                        tracing::error!(error = %e, "origin refused the cluster secret (or failed to prove it)");
                    } else if is_version_mismatch(&e) {
                        metrics::counter!(RELAY_REFUSED, "reason" => "version").increment(1);
                        tracing::error!(error = %e, "origin speaks another relay protocol version: run the same cascade version on every node");
                    } else if !was_failing {
                        tracing::warn!(error = %e, origin = %addr, "cannot reach origin; retrying");
                    } else {
                        tracing::debug!(error = %e, origin = %addr, "cannot reach origin");
                    }
                    was_failing = true;
                    self.targets.failed();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.cancel.cancelled() => break,
            }
            backoff = (backoff * 2).min(self.options.max_backoff).max(MIN_BACKOFF);
        }
    }
}

/// The loop a link was refused for, by either end: the text names it.
pub(crate) fn loop_reason(e: &Error) -> Option<String> {
    match e {
        Error::Protocol(ProtocolError::Loop(chain)) => Some(format!("relay loop: {chain}")),
        Error::Connection(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == code::LOOP =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

fn is_auth_failure(e: &Error) -> bool {
    match e {
        Error::Auth => true,
        Error::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == code::AUTH
        }
        _ => false,
    }
}

fn is_version_mismatch(e: &Error) -> bool {
    match e {
        Error::Protocol(ProtocolError::VersionMismatch { .. }) => true,
        Error::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == code::VERSION
        }
        _ => false,
    }
}

type Connected = (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
);

async fn connect_once(origin: &str, secret: &str, dial: Duration) -> Result<Connected> {
    let addr = tokio::net::lookup_host(origin)
        .await?
        .next()
        .ok_or(Error::Unavailable)?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(tls::client_config()?);
    let attempt = async {
        let conn = tokio::time::timeout(dial, endpoint.connect(addr, tls::SERVER_NAME)?)
            .await
            .map_err(|_| Error::Unavailable)??;
        if tls::negotiated_alpn(&conn).as_deref() != Some(ALPN) {
            // An older origin (it chose the previous version we offer only
            // to tell this apart from a network failure).
            conn.close(
                code::VERSION,
                b"relay protocol 1 is no longer spoken: upgrade the origin",
            );
            return Err(ProtocolError::VersionMismatch {
                ours: VERSION,
                theirs: 1,
            }
            .into());
        }
        let (mut send, mut recv) = conn.open_bi().await?;
        if let Err(e) = auth::connect(&conn, &mut send, &mut recv, secret).await {
            if matches!(e, Error::Auth) {
                conn.close(code::AUTH, b"origin failed to prove the cluster secret");
            }
            return Err(e);
        }
        Ok((conn, send, recv))
    };
    match tokio::time::timeout(AUTH_TIMEOUT, attempt).await {
        Ok(Ok((conn, send, recv))) => Ok((endpoint, conn, send, recv)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::Targets;

    fn two() -> Targets {
        Targets::new(vec![("a:1".into(), "primary"), ("b:1".into(), "standby")])
    }

    #[test]
    fn starts_on_the_primary_and_stays_while_it_works() {
        let mut t = two();
        assert_eq!(t.current(), ("a:1", "primary"));
        assert!(!t.up(), "the first link is no failover");
        assert!(!t.up(), "a reconnect to the same origin is none either");
        assert_eq!(t.current(), ("a:1", "primary"));
    }

    #[test]
    fn a_lost_primary_moves_to_the_standby_and_stays_there() {
        let mut t = two();
        t.up();
        t.failed(); // link lost
        assert_eq!(t.current(), ("b:1", "standby"));
        assert!(t.up(), "up on the other origin: a failover");
        // Primary back or not: the link stays on the standby that works.
        assert!(!t.up());
        assert_eq!(t.current(), ("b:1", "standby"));
        // The standby lost in turn: back to the primary.
        t.failed();
        assert_eq!(t.current(), ("a:1", "primary"));
        assert!(t.up());
    }

    #[test]
    fn a_dead_primary_at_start_is_skipped() {
        let mut t = two();
        t.failed(); // the first attempt (primary) failed
        assert_eq!(t.current(), ("b:1", "standby"));
        assert!(!t.up(), "the first link ever is no failover");
        // Both down: attempts alternate.
        t.failed();
        assert_eq!(t.current().1, "primary");
        t.failed();
        assert_eq!(t.current().1, "standby");
    }

    #[test]
    fn one_target_always_redials_it() {
        let mut t = Targets::new(vec![("a:1".into(), "primary")]);
        t.up();
        t.failed();
        assert_eq!(t.current(), ("a:1", "primary"));
        assert!(!t.up());
        let mut none = Targets::new(Vec::new());
        none.failed();
        assert_eq!(none.current().0, "");
        assert_eq!(two().labels().collect::<Vec<_>>(), ["primary", "standby"]);
        assert_eq!(two().dial_timeout(), super::FAILOVER_DIAL);
        assert_eq!(
            Targets::new(vec![("a:1".into(), "primary")]).dial_timeout(),
            super::AUTH_TIMEOUT
        );
    }
}
