//! The relay server: accepts links from other nodes (ingests publishing,
//! edges subscribing), authenticates them and serves them from a registry.
//! Any node can run one, so an edge can be the upstream of further edges.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::admit::{Admission, Decision, Limits};
use super::session::{lost, Inputs, Session, Side};
use super::{auth, code, tls, ALPN, HANDSHAKE_TIMEOUT};
use crate::cluster::Node;
use crate::metrics::{RELAY_HANDSHAKES, RELAY_REFUSED, RELAY_RETRIES};
use crate::registry::Registry;
use crate::{Error, Result};

/// The close reason an older node sees (and logs) when it connects.
const OLD_VERSION: &[u8] =
    b"relay protocol 1 is not spoken here: upgrade this node to the same cascade version as its origin (cascade-relay/2)";

/// A relay server bound to a UDP port. Dropping it (or [`Server::shutdown`])
/// closes every link.
pub struct Server {
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
}

impl Server {
    /// Binds `addr` and serves `registry` to nodes that know `secret`,
    /// with the default [`Limits`].
    pub async fn bind(addr: SocketAddr, secret: String, registry: Arc<Registry>) -> Result<Self> {
        Self::bind_with(addr, secret, registry, Limits::default()).await
    }

    /// [`Server::bind`] with the operator's caps on handshakes and links.
    pub async fn bind_with(
        addr: SocketAddr,
        secret: String,
        registry: Arc<Registry>,
        limits: Limits,
    ) -> Result<Self> {
        let node = Arc::new(Node::new("node", ""));
        Self::bind_node(addr, secret, registry, limits, node).await
    }

    /// [`Server::bind_with`] for `node`: the links below report their load
    /// into its table and hear its path and table back.
    pub async fn bind_node(
        addr: SocketAddr,
        secret: String,
        registry: Arc<Registry>,
        limits: Limits,
        node: Arc<Node>,
    ) -> Result<Self> {
        if secret.is_empty() {
            tracing::warn!("relay cluster secret is empty: any node can join");
        }
        let endpoint = quinn::Endpoint::server(tls::server_config()?, addr)?;
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(
            endpoint.clone(),
            secret.into(),
            registry,
            limits,
            cancel.clone(),
            node,
        ));
        tracing::info!(addr = %endpoint.local_addr()?, "relay server listening");
        Ok(Self { endpoint, cancel })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Stops accepting and closes every link.
    pub fn shutdown(&self) {
        self.cancel.cancel();
        self.endpoint.close(code::CLOSED, b"shutting down");
    }

    /// Waits (at most `within`) until the closes of [`Server::shutdown`]
    /// went out: a node that exits right after it would leave its peers to
    /// find out from the idle timeout instead (an edge with an origin
    /// standby moves there as soon as it hears the close).
    pub async fn wait_closed(&self, within: std::time::Duration) {
        let _ = tokio::time::timeout(within, self.endpoint.wait_idle()).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Locks the admission counts; a panic elsewhere while holding the lock
/// leaves counts that are still the best we have.
fn lock(a: &Mutex<Admission>) -> MutexGuard<'_, Admission> {
    a.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A handshake slot, freed however the handshake ends.
struct HandshakeSlot {
    admission: Arc<Mutex<Admission>>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut a = lock(&self.admission);
        a.handshake_ended(self.ip);
        metrics::gauge!(RELAY_HANDSHAKES).set(a.handshakes() as f64);
    }
}

/// A link slot, freed when the link ends.
struct LinkSlot(Arc<Mutex<Admission>>);

impl Drop for LinkSlot {
    fn drop(&mut self) {
        lock(&self.0).link_down();
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    secret: Arc<str>,
    registry: Arc<Registry>,
    limits: Limits,
    cancel: CancellationToken,
    node: Arc<Node>,
) {
    let admission = Arc::new(Mutex::new(Admission::new(limits)));
    let ids = AtomicU64::new(0);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = cancel.cancelled() => None,
        };
        let Some(incoming) = incoming else {
            break;
        };
        let peer = incoming.remote_address();
        let decision = lock(&admission).incoming(peer.ip(), incoming.remote_address_validated());
        match decision {
            Decision::Accept => {}
            Decision::Retry => {
                metrics::counter!(RELAY_RETRIES).increment(1);
                // Stateless: a spoofed source never answers it.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            Decision::Refuse(reason) => {
                metrics::counter!(RELAY_REFUSED, "reason" => reason).increment(1);
                if lock(&admission).should_log(peer.ip(), Instant::now()) {
                    tracing::info!(%peer, reason, "relay connection attempt refused (logged once a minute per source)");
                }
                incoming.refuse();
                continue;
            }
        }
        let slot = {
            let a = lock(&admission);
            metrics::gauge!(RELAY_HANDSHAKES).set(a.handshakes() as f64);
            HandshakeSlot {
                admission: admission.clone(),
                ip: peer.ip(),
            }
        };
        let span = tracing::info_span!("relay", role = "server", conn = ids.fetch_add(1, Ordering::Relaxed), %peer);
        let (secret, registry, cancel) = (secret.clone(), registry.clone(), cancel.clone());
        let node = node.clone();
        tokio::spawn(
            serve(incoming, secret, registry, cancel, slot, limits.hold, node).instrument(span),
        );
    }
}

/// Why a link was refused, as the metric label and the close reason.
fn refusal(e: &Error) -> (&'static str, quinn::VarInt, &'static [u8]) {
    match e {
        Error::Auth => ("auth", code::AUTH, b"relay authentication failed"),
        // The peer gave up on the handshake with the auth code (its own
        // deadline, or a node that checks before it proves).
        Error::Connection(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == code::AUTH =>
        {
            ("auth", code::AUTH, b"relay authentication failed")
        }
        Error::Connection(_) | Error::Closed => ("connection", code::CLOSED, b"connection lost"),
        _ => ("protocol", code::PROTOCOL, b"relay handshake failed"),
    }
}

/// Logs a refused peer, at most once a minute per source.
fn log_refusal(
    admission: &Mutex<Admission>,
    ip: IpAddr,
    reason: &str,
    error: &dyn std::fmt::Display,
) {
    if lock(admission).should_log(ip, Instant::now()) {
        tracing::info!(reason, %error, "relay peer refused");
    }
}

async fn serve(
    incoming: quinn::Incoming,
    secret: Arc<str>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
    slot: HandshakeSlot,
    hold: std::time::Duration,
    node: Arc<Node>,
) {
    let (admission, ip) = (slot.admission.clone(), slot.ip);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "relay handshake failed");
            return;
        }
        Err(_) => {
            metrics::counter!(RELAY_REFUSED, "reason" => "timeout").increment(1);
            return;
        }
    };
    if tls::negotiated_alpn(&conn).as_deref() != Some(ALPN) {
        metrics::counter!(RELAY_REFUSED, "reason" => "version").increment(1);
        log_refusal(
            &admission,
            ip,
            "version",
            &"the peer speaks relay protocol 1: upgrade it",
        );
        conn.close(code::VERSION, OLD_VERSION);
        return;
    }
    let handshake = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        auth::accept(&conn, &mut send, &mut recv, &secret).await?;
        Ok::<_, Error>((send, recv))
    };
    let (send, recv) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            let (reason, code, text) = refusal(&e);
            log_refusal(&admission, ip, reason, &e);
            metrics::counter!(RELAY_REFUSED, "reason" => reason).increment(1);
            conn.close(code, text);
            return;
        }
        Err(_) => {
            log_refusal(&admission, ip, "timeout", &"no node handshake in time");
            metrics::counter!(RELAY_REFUSED, "reason" => "timeout").increment(1);
            conn.close(code::PROTOCOL, b"relay handshake timed out");
            return;
        }
    };
    // Authenticated: the handshake slot is free, a link slot is needed.
    drop(slot);
    if !lock(&admission).link_up() {
        metrics::counter!(RELAY_REFUSED, "reason" => "busy").increment(1);
        tracing::warn!("relay link limit reached: refusing an authenticated peer");
        conn.close(code::BUSY, b"relay link limit reached");
        return;
    }
    let _link = LinkSlot(admission);
    tracing::info!("relay peer connected");
    let mut session = Session::new(
        conn,
        send,
        Side::Accepted,
        Some(registry),
        Default::default(),
        node,
    );
    let inputs = Inputs {
        commands: None,
        uplink: None,
        linger: std::time::Duration::ZERO,
        hold,
        cancel,
        kick: None,
        resubscribe: Vec::new(),
    };
    let end = session.run(recv, Side::Accepted, inputs).await;
    match &end {
        Ok(()) => tracing::info!("relay peer disconnected"),
        Err(e) => match super::client::loop_reason(e) {
            Some(why) => tracing::error!("relay peer refused: {why}"),
            None => tracing::info!(error = %e, "relay peer disconnected"),
        },
    }
    if lost(&end) {
        // The peer may be back in a moment and publish again (takeover).
        session.orphans().hold(hold);
    }
}
