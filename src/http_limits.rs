//! Limits that keep the `--http` listener (HTTP and HTTPS) up under
//! slowloris-style abuse: connections in total and per client IP, a
//! deadline for each request head, and an idle keep-alive timeout. Request
//! bodies that stall are cut by tower-http's body timeout (see
//! [`body_timeout_layer`]).
//!
//! axum's `serve` gives no access to hyper's connection builder, so the
//! limits live in two axum [`Listener`] wrappers instead:
//! - [`Capped`] refuses a connection over either cap right at accept (it is
//!   closed at once) and hands out an IO that holds its places until it is
//!   dropped; on HTTPS it sits under the TLS listener, so handshakes count.
//! - [`Timed`] wraps the (decrypted) stream in [`TimedIo`], which watches
//!   the bytes going through and fails the read once a deadline passes:
//!   hyper then closes the connection. The decision is the sans-IO
//!   [`Timing`] (bytes and `now` in, deadline out).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::serve::Listener;
use cascade_rtc::limit::{IpGuard, PerIp, SharedLogOnce};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `cascade_http_refused_total{reason}`: HTTP connections refused or cut:
/// `max_connections`, `per_ip`, `header_timeout`, `idle_timeout`.
pub const REFUSED: &str = "cascade_http_refused_total";

/// Describes this module's metric.
pub fn describe_metrics() {
    metrics::describe_counter!(
        REFUSED,
        "HTTP connections refused or closed by a limit, by reason (max_connections, per_ip, header_timeout, idle_timeout)"
    );
}

/// The limits of the `--http` listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections in total, 0 = no cap (`--http-max-connections`).
    pub max_connections: usize,
    /// Open connections per client IP, 0 = no cap (`--http-max-per-ip`).
    pub per_ip: usize,
    /// A request head must arrive in full within this of its first byte
    /// (of the connection, for the first request) (`--http-header-timeout`).
    pub header_timeout: Duration,
    /// A request body may stall this long between two reads (`--http-body-timeout`).
    pub body_timeout: Duration,
    /// A keep-alive connection idle this long after a response is closed
    /// (`--http-idle-timeout`).
    pub idle_timeout: Duration,
}

/// Default `--http-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default `--http-max-per-ip`: well above what one browser (6 per host)
/// or one office NAT of viewers opens, far below the total.
pub const DEFAULT_PER_IP: usize = 64;
/// Default `--http-header-timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--http-body-timeout`.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `--http-idle-timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            per_ip: DEFAULT_PER_IP,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Cuts request bodies that stall longer than the limit between two reads
/// (the handler sees a body error and answers 4xx; the connection closes).
pub fn body_timeout_layer(limits: &Limits) -> tower_http::timeout::RequestBodyTimeoutLayer {
    tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_timeout)
}

/// Why a connection's deadline ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The request head did not arrive in full in time.
    Header,
    /// Nothing after the last response for the idle timeout.
    Idle,
}

impl Expiry {
    fn reason(self) -> &'static str {
        match self {
            Self::Header => "header_timeout",
            Self::Idle => "idle_timeout",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (or reading) a request head, until `deadline`.
    Head { deadline: Instant, why: Expiry },
    /// The head is in: the handler runs, the body is read (its stalls are
    /// the body timeout's business), the response goes out.
    Request,
    /// Switched protocols (WebSocket): no HTTP deadlines any more.
    Upgraded,
}

/// The deadlines of one HTTP/1.1 connection, from the bytes it reads and
/// writes. Sans-IO: the caller passes `now`.
///
/// A request head ends at the first empty line (`\r\n\r\n`); the first
/// write after it is the response, after which the connection is idle
/// until the next request's first byte. Interim `1xx` responses (100
/// Continue) keep the request going; `101` ends HTTP on this connection.
#[derive(Debug, Clone)]
pub struct Timing {
    phase: Phase,
    /// How many bytes of `\r\n\r\n` the last read ended with.
    matched: usize,
    header: Duration,
    idle: Duration,
}

const END_OF_HEAD: &[u8; 4] = b"\r\n\r\n";

impl Timing {
    /// A connection accepted at `now`: its first head is due in `header`.
    pub fn new(now: Instant, header: Duration, idle: Duration) -> Self {
        Self {
            phase: Phase::Head {
                deadline: now + header,
                why: Expiry::Header,
            },
            matched: 0,
            header,
            idle,
        }
    }

    /// When the connection must be closed, and why; `None` for no deadline.
    pub fn deadline(&self) -> Option<(Instant, Expiry)> {
        match self.phase {
            Phase::Head { deadline, why } => Some((deadline, why)),
            Phase::Request | Phase::Upgraded => None,
        }
    }

    /// `data` was read at `now`.
    pub fn on_read(&mut self, data: &[u8], now: Instant) {
        let Phase::Head { why, .. } = self.phase else {
            return;
        };
        if data.is_empty() {
            return;
        }
        if why == Expiry::Idle {
            // The next request starts: its head is due in `header`.
            self.phase = Phase::Head {
                deadline: now + self.header,
                why: Expiry::Header,
            };
        }
        for &b in data {
            self.matched = if b == END_OF_HEAD[self.matched] {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END_OF_HEAD.len() {
                self.matched = 0;
                self.phase = Phase::Request;
                // Bytes after the head are its body (or a pipelined request
                // hyper has buffered): the response comes next either way.
                return;
            }
        }
    }

    /// `data` (the start of a write) was written at `now`.
    pub fn on_write(&mut self, data: &[u8], now: Instant) {
        match self.phase {
            Phase::Upgraded => {}
            Phase::Request => {
                if data.starts_with(b"HTTP/1.1 101") || data.starts_with(b"HTTP/1.0 101") {
                    self.phase = Phase::Upgraded;
                } else if data.starts_with(b"HTTP/1.1 1") {
                    // 100 Continue: the body is still to come.
                } else {
                    self.idle_from(now);
                }
            }
            // The rest of a response (or one hyper sends on its own, a 400
            // for a bad head): the connection is busy, not idle.
            Phase::Head {
                why: Expiry::Idle, ..
            } => self.idle_from(now),
            Phase::Head {
                why: Expiry::Header,
                ..
            } => {}
        }
    }

    fn idle_from(&mut self, now: Instant) {
        self.matched = 0;
        self.phase = Phase::Head {
            deadline: now + self.idle,
            why: Expiry::Idle,
        };
    }
}

/// Refuses a connection and says so: counted, logged once per IP a minute.
fn refuse(log: &SharedLogOnce, ip: IpAddr, reason: &'static str) {
    metrics::counter!(REFUSED, "reason" => reason).increment(1);
    if log.allow(ip, Instant::now()) {
        tracing::warn!(%ip, reason, "HTTP connection refused or closed by a limit (logged once a minute per address)");
    }
}

/// An axum [`Listener`] that closes connections over the total or per-IP
/// cap as soon as they are accepted.
pub struct Capped<L> {
    inner: L,
    total: Option<Arc<Semaphore>>,
    per_ip: PerIp,
    log: SharedLogOnce,
}

impl<L> Capped<L> {
    /// Caps `inner` with `limits` (0 = no cap).
    pub fn new(inner: L, limits: &Limits, log: SharedLogOnce) -> Self {
        Self {
            inner,
            total: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections))),
            per_ip: PerIp::new(limits.per_ip),
            log,
        }
    }
}

impl<L: Listener<Addr = SocketAddr>> Listener for Capped<L> {
    type Io = CappedIo<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = self.inner.accept().await;
            let total = match &self.total {
                None => None,
                Some(s) => match s.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        refuse(&self.log, peer.ip(), "max_connections");
                        continue;
                    }
                },
            };
            let Some(ip) = self.per_ip.acquire(peer.ip()) else {
                refuse(&self.log, peer.ip(), "per_ip");
                continue;
            };
            return (
                CappedIo {
                    io,
                    _total: total,
                    _ip: ip,
                },
                peer,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its places under the caps until dropped.
pub struct CappedIo<T> {
    io: T,
    _total: Option<OwnedSemaphorePermit>,
    _ip: IpGuard,
}

impl<T: AsyncRead + Unpin> AsyncRead for CappedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CappedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// An axum [`Listener`] whose connections close at the header and idle
/// deadlines of [`Timing`].
pub struct Timed<L> {
    inner: L,
    limits: Limits,
    log: SharedLogOnce,
}

impl<L> Timed<L> {
    /// Times the connections of `inner` with `limits`.
    pub fn new(inner: L, limits: &Limits, log: SharedLogOnce) -> Self {
        Self {
            inner,
            limits: *limits,
            log,
        }
    }
}

impl<L: Listener<Addr = SocketAddr>> Listener for Timed<L> {
    type Io = TimedIo<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, peer) = self.inner.accept().await;
        let now = Instant::now();
        let timing = Timing::new(now, self.limits.header_timeout, self.limits.idle_timeout);
        (
            TimedIo {
                io,
                timing,
                sleep: Box::pin(tokio::time::sleep_until(now.into())),
                armed: None,
                peer: peer.ip(),
                log: self.log.clone(),
            },
            peer,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that fails its reads once its [`Timing`] deadline passed.
pub struct TimedIo<T> {
    io: T,
    timing: Timing,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The deadline `sleep` is set to.
    armed: Option<Instant>,
    peer: IpAddr,
    log: SharedLogOnce,
}

impl<T> TimedIo<T> {
    /// Ready with the error to return when the deadline has passed; else
    /// registers the waker for it.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let (deadline, why) = self.timing.deadline()?;
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline.into());
            self.armed = Some(deadline);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        refuse(&self.log, self.peer, why.reason());
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            match why {
                Expiry::Header => "request head not received in time",
                Expiry::Idle => "keep-alive connection idle",
            },
        ))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.timing.on_read(&buf.filled()[before..], Instant::now());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.timing.on_write(&buf[..n], Instant::now());
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            // The status line is at the start of the first buffer.
            if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
                this.timing
                    .on_write(&first[..n.min(first.len())], Instant::now());
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(10);
    const I: Duration = Duration::from_secs(60);

    fn ms(t0: Instant, x: u64) -> Instant {
        t0 + Duration::from_millis(x)
    }

    #[test]
    fn silent_connection_closes_at_header_timeout() {
        let t0 = Instant::now();
        let t = Timing::new(t0, H, I);
        assert_eq!(t.deadline(), Some((t0 + H, Expiry::Header)));
    }

    #[test]
    fn slow_head_keeps_its_first_deadline() {
        // Slowloris: a byte now and then does not move the deadline.
        let t0 = Instant::now();
        let mut t = Timing::new(t0, H, I);
        for i in 0..100 {
            t.on_read(b"X", ms(t0, i * 1000));
            assert_eq!(t.deadline(), Some((t0 + H, Expiry::Header)));
        }
    }

    #[test]
    fn request_response_idle_next_request() {
        let t0 = Instant::now();
        let mut t = Timing::new(t0, H, I);
        t.on_read(b"GET / HTTP/1.1\r\nHost: a\r", ms(t0, 10));
        t.on_read(b"\n\r", ms(t0, 20));
        assert!(t.deadline().is_some(), "head not over yet");
        t.on_read(b"\n", ms(t0, 30));
        assert_eq!(t.deadline(), None, "the handler runs untimed");
        t.on_write(b"HTTP/1.1 200 OK\r\n", ms(t0, 40));
        assert_eq!(t.deadline(), Some((ms(t0, 40) + I, Expiry::Idle)));
        // More of the response: still busy.
        t.on_write(b"body", ms(t0, 50));
        assert_eq!(t.deadline(), Some((ms(t0, 50) + I, Expiry::Idle)));
        // The next request's first byte starts its header deadline.
        t.on_read(b"G", ms(t0, 5000));
        assert_eq!(t.deadline(), Some((ms(t0, 5000) + H, Expiry::Header)));
        t.on_read(b"ET / HTTP/1.1\r\n\r\n", ms(t0, 5001));
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn continue_and_upgrade() {
        let t0 = Instant::now();
        let mut t = Timing::new(t0, H, I);
        t.on_read(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", t0);
        t.on_write(b"HTTP/1.1 100 Continue\r\n\r\n", t0);
        assert_eq!(t.deadline(), None, "the body is still to come");
        t.on_write(b"HTTP/1.1 201 Created\r\n", t0);
        assert!(t.deadline().is_some());
        t.on_read(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", t0);
        t.on_write(b"HTTP/1.1 101 Switching Protocols\r\n", t0);
        assert_eq!(t.deadline(), None);
        t.on_read(b"\r\n\r\nanything", ms(t0, 1));
        t.on_write(b"HTTP/1.1 200", ms(t0, 1));
        assert_eq!(t.deadline(), None, "a WebSocket is never timed out here");
    }

    #[test]
    fn end_of_head_split_anywhere() {
        let head = b"GET /x HTTP/1.1\r\nA: b\r\r\nC: d\r\n\r\n";
        for split in 0..=head.len() {
            let t0 = Instant::now();
            let mut t = Timing::new(t0, H, I);
            t.on_read(&head[..split], t0);
            if split < head.len() {
                assert!(t.deadline().is_some(), "split at {split}");
            }
            t.on_read(&head[split..], t0);
            assert_eq!(t.deadline(), None, "split at {split}");
        }
    }

    #[tokio::test]
    async fn capped_refuses_over_the_per_ip_cap() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let limits = Limits {
            per_ip: 2,
            ..Limits::default()
        };
        let mut l = Capped::new(tcp, &limits, SharedLogOnce::default());
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let (a, _) = l.accept().await;
        let (_b, _) = l.accept().await;
        // The third is accepted and closed at once; then accept waits on.
        let more = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(more.is_err(), "nothing admitted over the cap");
        let mut buf = [0u8; 1];
        use tokio::io::AsyncReadExt;
        let n = clients[2].read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the refused connection is closed");
        drop(a);
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_c2, _) = l.accept().await;
    }
}
