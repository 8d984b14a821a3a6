//! The relay server: accepts links from other nodes (ingests publishing,
//! edges subscribing), authenticates them and serves them from a registry.
//! Any node can run one, so an edge can be the upstream of further edges.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::session::{lost, Inputs, Session, Side};
use super::{auth, code, tls, AUTH_TIMEOUT, LINK_GRACE};
use crate::metrics::RELAY_REFUSED;
use crate::registry::Registry;
use crate::{Error, Result};

/// Links one server accepts at once: edges and ingests of a large cluster.
const MAX_CONNECTIONS: usize = 1024;

/// A relay server bound to a UDP port. Dropping it (or [`Server::shutdown`])
/// closes every link.
pub struct Server {
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
}

impl Server {
    /// Binds `addr` and serves `registry` to nodes that know `secret`.
    pub async fn bind(addr: SocketAddr, secret: String, registry: Arc<Registry>) -> Result<Self> {
        if secret.is_empty() {
            tracing::warn!("relay cluster secret is empty: any node can join");
        }
        let endpoint = quinn::Endpoint::server(tls::server_config()?, addr)?;
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(
            endpoint.clone(),
            secret.into(),
            registry,
            cancel.clone(),
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
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    secret: Arc<str>,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let ids = AtomicU64::new(0);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = cancel.cancelled() => None,
        };
        let Some(incoming) = incoming else {
            break;
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            metrics::counter!(RELAY_REFUSED, "reason" => "busy").increment(1);
            incoming.refuse();
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("relay", role = "server", conn = ids.fetch_add(1, Ordering::Relaxed), peer = %incoming.remote_address());
        let (secret, registry, cancel, active) = (
            secret.clone(),
            registry.clone(),
            cancel.clone(),
            active.clone(),
        );
        tokio::spawn(
            async move {
                serve(incoming, &secret, registry, cancel).await;
                active.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
}

/// Why a link was refused, as the metric label and the close reason.
fn refusal(e: &Error) -> (&'static str, quinn::VarInt, &'static [u8]) {
    match e {
        Error::Auth => ("auth", code::AUTH, b"relay authentication failed"),
        // The peer checks our proof first: a secret mismatch usually shows
        // here as the peer closing with the auth code.
        Error::Connection(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == code::AUTH =>
        {
            ("auth", code::AUTH, b"relay authentication failed")
        }
        Error::Connection(_) | Error::Closed => ("connection", code::CLOSED, b"connection lost"),
        _ => ("protocol", code::PROTOCOL, b"relay handshake failed"),
    }
}

async fn serve(
    incoming: quinn::Incoming,
    secret: &str,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
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
    let handshake = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        auth::accept(&mut send, &mut recv, secret).await?;
        Ok::<_, Error>((send, recv))
    };
    let (send, recv) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            let (reason, code, text) = refusal(&e);
            tracing::info!(reason, error = %e, "relay peer refused");
            metrics::counter!(RELAY_REFUSED, "reason" => reason).increment(1);
            conn.close(code, text);
            return;
        }
        Err(_) => {
            tracing::info!(reason = "timeout", "relay peer refused");
            metrics::counter!(RELAY_REFUSED, "reason" => "timeout").increment(1);
            conn.close(code::PROTOCOL, b"relay handshake timed out");
            return;
        }
    };
    tracing::info!("relay peer connected");
    let mut session = Session::new(
        conn,
        send,
        Side::Accepted,
        Some(registry),
        Default::default(),
    );
    let inputs = Inputs {
        commands: None,
        uplink: None,
        linger: std::time::Duration::ZERO,
        cancel,
        kick: None,
        resubscribe: Vec::new(),
    };
    let end = session.run(recv, Side::Accepted, inputs).await;
    match &end {
        Ok(()) => tracing::info!("relay peer disconnected"),
        Err(e) => tracing::info!(error = %e, "relay peer disconnected"),
    }
    if lost(&end) {
        // The peer may be back in a moment and publish again (takeover).
        session.orphans().hold(LINK_GRACE);
    }
}
