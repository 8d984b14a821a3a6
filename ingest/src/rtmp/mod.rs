//! RTMP ingest: `rtmp://HOST:1935/live/{stream}?token=TOKEN` (INTERFACE.md).
//!
//! rml_rtmp does the handshake, chunking and command flow; [`chunk::Guard`]
//! checks the chunk stream before rml_rtmp sees it; [`media::Media`] turns FLV
//! tags into the catalog and frames published into the registry. All of it
//! runs in a sans-IO `session::Session` per connection (handshake, commands,
//! publish state machine, deadlines); `conn` is its I/O shell, one task and
//! one tracing span per connection:
//!
//! ```text
//! loop { drain Session outputs → socket writes, registry, ffmpeg spawn, close
//!        select! { shutdown | superseded | transcoder | Session deadline | read }
//!        → Session::handle_* }
//! ```
//!
//! RTMP cannot answer keyframe requests; viewers rely on the group cache.
//! H.264 with B-frames is re-encoded without them when the [`Policy`] says
//! so: the connection's video then goes through an ffmpeg child
//! ([`crate::transcode`]) whose output is one more `select!` arm.
//!
//! RTMPS ([`serve_tls`]) is the same connection behind a TLS handshake
//! ([`tls`]): `conn` runs over any byte stream.

mod av1;
pub mod chunk;
pub mod clock;
mod conn;
pub mod media;
mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use crate::transcode::Policy;
use cascade_origin::Registry;
use cascade_rtc::auth::Auth;
use cascade_rtc::limit::{AuthGate, LogOnce, PerIp};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use chunk::{
    Guard, MAX_CHUNK_SIZE, MAX_COMMAND_MESSAGE, MAX_MEDIA_MESSAGE, MAX_UNAUTHORISED_MESSAGE,
};
pub use clock::Clock;
pub use media::{Media, Track, FRAME_WAIT_MS, HEADER_WAIT_MS};

/// The only RTMP application name we publish on (INTERFACE.md).
pub const APP: &str = "live";
/// Open connections per node; past this, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection must have published (with a valid token) this soon after
/// its accept, or it is closed: a client that never publishes would
/// otherwise hold a connection slot forever with a byte now and then.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections per source IP.
pub const DEFAULT_PER_IP: usize = 16;
/// A client must finish the handshake within this (a stalled one is dropped).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that sends nothing for this long is closed. Encoders send
/// media continuously; before publishing a client has no reason to idle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// A peer that does not read our responses for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Socket failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed before sending a byte (a port probe, a health check).
    #[error("closed before the handshake")]
    ClosedEarly,
    /// The handshake was malformed.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Nothing arrived for [`IDLE_TIMEOUT`].
    #[error("idle timeout")]
    Idle,
    /// No accepted publish within the publish timeout of the accept.
    #[error("no publish within the publish timeout")]
    PublishTimeout,
    /// The peer did not read our responses.
    #[error("write timed out")]
    WriteTimeout,
    /// The chunk stream broke a limit or the protocol.
    #[error("chunk stream: {0}")]
    Chunk(#[from] chunk::Error),
    /// rml_rtmp refused a message.
    #[error("rtmp session: {0}")]
    Session(String),
    /// The TLS handshake of an RTMPS connection failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The client asked for something we refuse (reason is a metric label).
    #[error("refused: {0}")]
    Refused(&'static str),
    /// The registry refused the publish.
    #[error("publish: {0}")]
    Publish(#[from] cascade_origin::Error),
}

impl Error {
    /// A bounded label for the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io(_) | Self::WriteTimeout => "io",
            Self::Handshake(_) | Self::HandshakeTimeout | Self::ClosedEarly => "handshake",
            Self::Idle => "idle",
            Self::Tls(_) => "tls",
            Self::PublishTimeout => "publish_timeout",
            Self::Chunk(_) | Self::Session(_) => "protocol",
            Self::Refused(r) => r,
            Self::Publish(_) => "publish",
        }
    }
}

/// Connection limits of an RTMP listener (flags of the node).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections on the listener.
    pub max_connections: usize,
    /// Open connections per source IP (0 = no per-IP cap).
    pub per_ip: usize,
    /// Time from accept to an accepted publish.
    pub publish_timeout: Duration,
    /// Wrong-token limiter per source IP, shared with WHIP/WHEP/WebSocket.
    pub auth: AuthGate,
    /// `--token-secret`: signed publish tokens accepted beside the publish
    /// token (not a limit, but it travels with them to every listener).
    pub token_secret: Option<String>,
    /// `--auth-webhook`: decides publishes the publish token or a signed
    /// token do not allow (travels with the limits like `token_secret`).
    pub auth_webhook: Option<cascade_rtc::webhook::Webhook>,
    /// Set when the node drains: new publishes are refused with
    /// `NetStream.Publish.Rejected`; accepted ones run on.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// `--abr-ladder`: extra renditions re-encoded from H.264 streams
    /// (empty: off). Not a limit either; it travels with them.
    pub ladder: crate::ladder::Ladder,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            per_ip: DEFAULT_PER_IP,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            auth: AuthGate::default(),
            token_secret: None,
            auth_webhook: None,
            draining: Arc::default(),
            ladder: crate::ladder::Ladder::default(),
        }
    }
}

/// Shared by every connection of one server.
struct Ctx {
    registry: Arc<Registry>,
    token: Arc<str>,
    bframes: Policy,
    publish_timeout: Duration,
    auth: AuthGate,
    tokens: Auth,
    draining: Arc<std::sync::atomic::AtomicBool>,
    ladder: crate::ladder::Ladder,
}

impl Ctx {
    /// What every connection of a plain or TLS listener shares.
    fn new(
        registry: Arc<Registry>,
        publish_token: Arc<str>,
        bframes: Policy,
        limits: &Limits,
    ) -> Arc<Self> {
        Arc::new(Self {
            tokens: Auth::new(Some(&publish_token), None, limits.token_secret.as_deref())
                .with_webhook(limits.auth_webhook.clone()),
            registry,
            token: publish_token,
            bframes,
            publish_timeout: limits.publish_timeout,
            auth: limits.auth.clone(),
            ladder: limits.ladder.clone(),
            draining: limits.draining.clone(),
        })
    }
}

/// Accepts RTMP connections on `listener` until `shutdown` is cancelled,
/// publishing into `registry` with protocol `rtmp`. Every connection is
/// closed when `shutdown` fires. Returns only on shutdown. Streams with
/// B-frames are passed through ([`Policy::Drop`]); see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    publish_token: Arc<str>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    serve_with(listener, registry, publish_token, shutdown, Policy::Drop).await
}

/// [`serve`] with a policy for H.264 streams with B-frames: pass them
/// through, or re-encode their video without B-frames
/// ([`crate::transcode`]).
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    publish_token: Arc<str>,
    shutdown: CancellationToken,
    bframes: Policy,
) -> Result<(), Error> {
    let limits = Limits::default();
    serve_with_limits(listener, registry, publish_token, shutdown, bframes, limits).await
}

/// [`serve_with`] under explicit connection [`Limits`].
pub async fn serve_with_limits(
    listener: TcpListener,
    registry: Arc<Registry>,
    publish_token: Arc<str>,
    shutdown: CancellationToken,
    bframes: Policy,
    limits: Limits,
) -> Result<(), Error> {
    let ctx = Ctx::new(registry, publish_token, bframes, &limits);
    accept_loop(listener, ctx, shutdown, None, limits).await
}

/// [`serve_with`] for RTMPS: every connection first completes a TLS
/// handshake with `tls` (within [`tls::TLS_HANDSHAKE_TIMEOUT`]), then runs
/// exactly as on plain RTMP. Connections count against the same kind of
/// limit, on their own: an RTMPS listener has its own [`MAX_CONNECTIONS`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: TlsAcceptor,
    registry: Arc<Registry>,
    publish_token: Arc<str>,
    shutdown: CancellationToken,
    bframes: Policy,
    limits: Limits,
) -> Result<(), Error> {
    let ctx = Ctx::new(registry, publish_token, bframes, &limits);
    accept_loop(listener, ctx, shutdown, Some(tls), limits).await
}

/// Accepts until `shutdown`; one task per connection, each behind a TLS
/// handshake when `tls` is set.
async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    tls: Option<TlsAcceptor>,
    limits: Limits,
) -> Result<(), Error> {
    let max_connections = limits.max_connections;
    let limit = Arc::new(Semaphore::new(max_connections));
    let per_ip = PerIp::new(limits.per_ip);
    let mut logged = LogOnce::default();
    let ids = AtomicU64::new(0);
    let scheme = if tls.is_some() { "rtmps" } else { "rtmp" };
    tracing::info!(addr = ?listener.local_addr().ok(), "{scheme} ingest listening");
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "rtmp accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(ip_guard) = per_ip.acquire(peer.ip()) else {
            metrics::counter!(crate::metrics::RTMP_REFUSED, "reason" => "per_ip").increment(1);
            if logged.allow(peer.ip(), std::time::Instant::now()) {
                tracing::info!(
                    ip = %peer.ip(),
                    max = limits.per_ip,
                    "rtmp connection refused: per-ip connection limit"
                );
            }
            drop(socket);
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::info!(
                max = max_connections,
                "rtmp connection refused: node at its connection limit"
            );
            metrics::counter!(crate::metrics::RTMP_REFUSED, "reason" => "limit").increment(1);
            drop(socket);
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "rtmp",
            conn = id,
            tls = tls.is_some(),
            stream = tracing::field::Empty
        );
        let ctx = ctx.clone();
        let shutdown = shutdown.child_token();
        let tls = tls.clone();
        tokio::spawn(
            async move {
                run(socket, peer, ctx, tls, shutdown).await;
                drop(permit);
                drop(ip_guard);
            }
            .instrument(span),
        );
    }
}

async fn run(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    metrics::counter!(crate::metrics::RTMP_ACCEPTED).increment(1);
    metrics::gauge!(crate::metrics::RTMP_CONNECTIONS).increment(1.0);
    // Client addresses are PII: debug level only.
    tracing::debug!(%peer, "rtmp connection");
    let _ = socket.set_nodelay(true);
    let end = match tls {
        None => conn::Conn::run(socket, ctx, peer, "rtmp", shutdown).await,
        Some(tls) => tokio::select! {
            _ = shutdown.cancelled() => Ok("shutdown"),
            r = tls::accept(&tls, socket) => match r {
                Ok(stream) => conn::Conn::run(stream, ctx, peer, "rtmps", shutdown).await,
                Err(e) => Err(e),
            },
        },
    };
    match end {
        Ok(reason) => tracing::info!(reason, "rtmp connection closed"),
        Err(Error::ClosedEarly) => tracing::debug!("rtmp connection closed before the handshake"),
        Err(e) => {
            tracing::info!(error = %e, "rtmp connection refused");
            metrics::counter!(crate::metrics::RTMP_REFUSED, "reason" => e.reason()).increment(1);
        }
    }
    metrics::gauge!(crate::metrics::RTMP_CONNECTIONS).decrement(1.0);
}

/// Splits a stream key `{stream}?token=TOKEN` into the name and the token.
pub fn parse_key(key: &str) -> (&str, Option<&str>) {
    let (name, query) = key.split_once('?').unwrap_or((key, ""));
    (name, query_token(query))
}

/// The `token` parameter of a query string.
fn query_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(parse_key("cam?token=abc"), ("cam", Some("abc")));
        assert_eq!(parse_key("cam?x=1&token=abc"), ("cam", Some("abc")));
        assert_eq!(parse_key("cam"), ("cam", None));
        assert_eq!(parse_key("cam?token="), ("cam", Some("")));
    }
}
