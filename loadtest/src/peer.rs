//! Drives one str0m `Rtc` under tokio (client side, full ICE) over UDP or ICE-TCP.
//!
//! Loop shape used by the publisher and viewer:
//! `loop { drain() -> events + next timeout; select!{ datagram => handle, deadline => tick } }`.
//! ICE-TCP (RFC 6544) uses an active candidate on the discard port 9 and RFC 4571 framing
//! (2-byte length) on one connection to the server's passive candidate.
//!
//! UDP sockets receive with GRO (quinn-udp): a server's GSO batch (one viewer-frame, a few
//! equal-size datagrams) arrives as one buffer that is split by its stride here. Without it,
//! on loopback the kernel segments every batch again and delivers each datagram separately,
//! and that receive-side work runs in the *sender's* softirq: the load generator would be
//! billed to the server it measures.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSocketState};

use str0m::net::{Protocol, Receive, TcpType};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::shaper::Shaper;
use crate::{Error, Result};

/// UDP receive buffer: a GRO buffer holds up to 64 KiB of coalesced datagrams, and a
/// shorter buffer would truncate them.
const RECV_BUF: usize = 64 * 1024;
/// TCP read buffer: several RFC 4571 frames per read.
const TCP_READ_BUF: usize = 64 * 1024;
/// Active TCP candidates advertise port 9 (RFC 6544 §4.5).
const ACTIVE_TCP_PORT: u16 = 9;
/// Requested SO_RCVBUF for each client socket.
const UDP_RECV_BUFFER: usize = 1 << 20;
/// Datagrams read per wakeup when the tap takes them all (bounded for fairness).
const MAX_TAPPED_BURST: usize = 64;
/// Deadline for the TCP connect to the server's passive candidate.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

enum Transport {
    Udp {
        socket: UdpSocket,
        state: UdpSocketState,
        /// Datagrams of the last GRO read not yet handled (in `Peer::buf`).
        pending: Segments,
    },
    Tcp {
        conn: Option<(TcpStream, SocketAddr)>,
        /// Bytes read but not yet a whole frame.
        pending: Vec<u8>,
    },
}

pub(crate) struct Peer {
    pub(crate) rtc: Rtc,
    transport: Transport,
    local: SocketAddr,
    buf: Vec<u8>,
    /// `--viewer-caps`: received UDP datagrams pass this bottleneck first.
    shaper: Option<Shaper<(SocketAddr, Vec<u8>)>>,
}

impl Peer {
    /// Bind a UDP socket on `ip` (port 0) and add it as the host candidate.
    pub(crate) fn bind(mut rtc: Rtc, ip: IpAddr) -> Result<Self> {
        let socket = udp_socket(SocketAddr::new(ip, 0))?;
        let local = socket.local_addr()?;
        let cand = Candidate::host(local, "udp")
            .map_err(|e| Error::BadAnswer(format!("host candidate: {e}")))?;
        rtc.add_local_candidate(cand);
        Ok(Self {
            rtc,
            transport: Transport::Udp {
                state: UdpSocketState::new((&socket).into())?,
                socket,
                pending: Segments::default(),
            },
            local,
            buf: vec![0; RECV_BUF],
            shaper: None,
        })
    }

    /// Use ICE-TCP only: an active host candidate on `ip`; the connection is made when
    /// str0m first sends to a remote (passive) TCP candidate.
    pub(crate) fn tcp(mut rtc: Rtc, ip: IpAddr) -> Result<Self> {
        let local = SocketAddr::new(ip, ACTIVE_TCP_PORT);
        let cand = Candidate::builder()
            .tcp()
            .host(local)
            .tcptype(TcpType::Active)
            .build()
            .map_err(|e| Error::BadAnswer(format!("tcp candidate: {e}")))?;
        rtc.add_local_candidate(cand);
        Ok(Self {
            rtc,
            transport: Transport::Tcp {
                conn: None,
                pending: Vec::new(),
            },
            local,
            buf: vec![0; TCP_READ_BUF],
            shaper: None,
        })
    }

    /// Caps what this peer receives over UDP at `bps` (a tbf-like queue,
    /// [`crate::shaper`]); ICE-TCP is not capped.
    pub(crate) fn set_cap(&mut self, bps: u64) {
        self.shaper = Some(Shaper::new(bps));
    }

    /// Datagrams the cap dropped so far.
    pub(crate) fn cap_dropped(&self) -> u64 {
        self.shaper.as_ref().map_or(0, Shaper::dropped)
    }

    /// Poll str0m until it wants to wait: send its datagrams, hand events to `on_event`,
    /// return the instant it next needs a tick.
    pub(crate) async fn drain(&mut self, mut on_event: impl FnMut(Event)) -> Result<Instant> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => self.send(&t.contents, t.destination, t.proto).await,
                Output::Event(e) => on_event(e),
            }
        }
    }

    async fn send(&mut self, data: &[u8], dst: SocketAddr, proto: Protocol) {
        // A failed send is loss, which str0m's retransmissions and ICE checks handle.
        let res = match (&mut self.transport, proto) {
            (Transport::Udp { socket, .. }, Protocol::Udp) => {
                socket.send_to(data, dst).await.map(|_| ())
            }
            (Transport::Tcp { conn, .. }, Protocol::Tcp) => {
                if conn.is_none() {
                    match tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
                        Ok(Ok(s)) => {
                            let _ = s.set_nodelay(true);
                            *conn = Some((s, dst));
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %dst, "tcp connect failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                match conn {
                    // One connection: checks towards other TCP candidates are dropped.
                    Some((s, remote)) if *remote == dst => match u16::try_from(data.len()) {
                        Ok(len) => {
                            let mut frame = Vec::with_capacity(data.len() + 2);
                            frame.extend_from_slice(&len.to_be_bytes());
                            frame.extend_from_slice(data);
                            s.write_all(&frame).await
                        }
                        Err(_) => Ok(()),
                    },
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "send failed");
        }
    }

    /// Wait for one datagram or until `until`, and feed whichever came first to str0m.
    pub(crate) async fn wait(&mut self, until: Instant) -> Result<()> {
        self.wait_tapped(until, &mut |_, _| false).await
    }

    /// Like [`Self::wait`], but `tap` sees each datagram first and keeps it from str0m by
    /// returning true (header-only viewers take RTP this way and skip SRTP).
    pub(crate) async fn wait_tapped(
        &mut self,
        until: Instant,
        tap: &mut (dyn FnMut(&[u8], Instant) -> bool + Send),
    ) -> Result<()> {
        if let (
            Some(shaper),
            Transport::Udp {
                socket,
                state,
                pending,
            },
        ) = (&mut self.shaper, &mut self.transport)
        {
            // Capped: arrivals queue in the shaper; what leaves it goes to the tap or str0m
            // (one datagram for str0m per call: it must be drained between inputs).
            let now = Instant::now();
            while let Some((source, data)) = shaper.pop_due(now) {
                if !tap(&data, now) {
                    feed(&mut self.rtc, Protocol::Udp, source, self.local, &data, now);
                    return Ok(());
                }
            }
            let wake = shaper.next_release().map_or(until, |r| r.min(until));
            if pending.is_empty() {
                tokio::select! {
                    r = recv_gro(socket, state, &mut self.buf) => *pending = r?,
                    _ = tokio::time::sleep_until(wake.into()) => {
                        if wake >= until {
                            self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                        }
                        return Ok(());
                    }
                }
            }
            let now = Instant::now();
            while let Some(range) = pending.next() {
                let data = self.buf.get(range).unwrap_or_default().to_vec();
                let len = data.len();
                shaper.offer(now, (pending.source, data), len);
            }
            return Ok(());
        }
        let sleep = tokio::time::sleep_until(until.into());
        match &mut self.transport {
            Transport::Udp {
                socket,
                state,
                pending,
            } => {
                if pending.is_empty() {
                    tokio::select! {
                        r = recv_gro(socket, state, &mut self.buf) => *pending = r?,
                        _ = sleep => {
                            self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                            return Ok(());
                        }
                    }
                }
                // Datagrams the tap takes leave str0m untouched, so a burst of them (one
                // video frame) is read in this one wakeup; the first one for str0m ends it
                // and the rest of its GRO buffer waits for the next call (str0m must be
                // drained between inputs). Never read a datagram the loop will not hand on.
                let mut now = Instant::now();
                for taken in 1..=MAX_TAPPED_BURST {
                    let Some(range) = pending.next() else {
                        match try_recv_gro(socket, state, &mut self.buf) {
                            Ok(p) => {
                                *pending = p;
                                now = Instant::now();
                                continue;
                            }
                            Err(_) => break,
                        }
                    };
                    let data = self.buf.get(range).unwrap_or_default();
                    if !tap(data, now) {
                        feed(
                            &mut self.rtc,
                            Protocol::Udp,
                            pending.source,
                            self.local,
                            data,
                            now,
                        );
                        break;
                    }
                    if taken == MAX_TAPPED_BURST {
                        break;
                    }
                }
            }
            Transport::Tcp {
                conn: Some((stream, remote)),
                pending,
            } => {
                // One frame per call, as for UDP: str0m must be drained between inputs (a
                // DTLS Finished and the SRTP right behind it often share one read).
                if let Some(frame) = next_frame(pending) {
                    let now = Instant::now();
                    if !tap(&frame, now) {
                        feed(
                            &mut self.rtc,
                            Protocol::Tcp,
                            *remote,
                            self.local,
                            &frame,
                            now,
                        );
                    }
                    return Ok(());
                }
                tokio::select! {
                    r = stream.read(&mut self.buf) => {
                        let n = r?;
                        if n == 0 {
                            return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                        pending.extend_from_slice(self.buf.get(..n).unwrap_or_default());
                    }
                    _ = sleep => self.rtc.handle_input(Input::Timeout(Instant::now()))?,
                }
            }
            Transport::Tcp { conn: None, .. } => {
                sleep.await;
                self.rtc.handle_input(Input::Timeout(Instant::now()))?;
            }
        }
        Ok(())
    }
}

/// A non-blocking UDP socket with a receive buffer that holds a keyframe burst even when
/// the task is late (the 208 KiB default overflows with many viewers on one machine).
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(UDP_RECV_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// The datagrams of one GRO read: `len` bytes in the buffer, split every `stride` bytes.
#[derive(Debug, PartialEq)]
struct Segments {
    pos: usize,
    len: usize,
    stride: usize,
    source: SocketAddr,
}

impl Default for Segments {
    fn default() -> Self {
        Self {
            pos: 0,
            len: 0,
            stride: 0,
            source: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

impl Segments {
    fn is_empty(&self) -> bool {
        self.pos >= self.len
    }

    /// The byte range of the next datagram, if any is left.
    fn next(&mut self) -> Option<std::ops::Range<usize>> {
        if self.is_empty() {
            return None;
        }
        let end = self.len.min(self.pos + self.stride.max(1));
        let range = self.pos..end;
        self.pos = end;
        Some(range)
    }
}

/// Waits for and reads one GRO buffer.
async fn recv_gro(socket: &UdpSocket, state: &UdpSocketState, buf: &mut [u8]) -> Result<Segments> {
    loop {
        socket.readable().await?;
        match try_recv_gro(socket, state, buf) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads one GRO buffer if one is ready, without waiting.
fn try_recv_gro(
    socket: &UdpSocket,
    state: &UdpSocketState,
    buf: &mut [u8],
) -> std::io::Result<Segments> {
    let mut meta = [RecvMeta::default()];
    socket.try_io(tokio::io::Interest::READABLE, || {
        let mut bufs = [IoSliceMut::new(buf)];
        state.recv(socket.into(), &mut bufs, &mut meta)
    })?;
    let [meta] = meta;
    Ok(Segments {
        pos: 0,
        len: meta.len,
        stride: meta.stride,
        source: meta.addr,
    })
}

/// Take one whole RFC 4571 frame (16-bit length + bytes) off the front of `pending`.
fn next_frame(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let &[hi, lo] = pending.get(..2)? else {
        return None;
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let frame = pending.get(2..2 + len)?.to_vec();
    pending.drain(..2 + len);
    Some(frame)
}

/// Hand one datagram to str0m; one it rejects is the peer's problem, not a reason to end.
fn feed(
    rtc: &mut Rtc,
    proto: Protocol,
    source: SocketAddr,
    dst: SocketAddr,
    data: &[u8],
    now: Instant,
) {
    // Anything str0m cannot classify (not STUN/DTLS/RTP) is dropped.
    let Ok(contents) = data.try_into() else {
        return;
    };
    let input = Input::Receive(
        now,
        Receive {
            proto,
            source,
            destination: dst,
            contents,
        },
    );
    if let Err(e) = rtc.handle_input(input) {
        tracing::debug!(error = %e, "datagram rejected");
    }
}

/// Waits up to `limit` for a client task (publisher or viewer) and returns
/// its report; `what` names it in the timeout error.
pub(crate) async fn join_task<T>(
    task: &mut Option<tokio::task::JoinHandle<Result<T>>>,
    limit: Duration,
    what: &'static str,
) -> Result<T> {
    let Some(task) = task.take() else {
        return Err(Error::Task("already joined".into()));
    };
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Error::Task(e.to_string())),
        Err(_) => Err(Error::Timeout(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_a_gro_buffer_by_stride() {
        let mut s = Segments {
            len: 10,
            stride: 4,
            ..Segments::default()
        };
        assert_eq!(s.next(), Some(0..4));
        assert_eq!(s.next(), Some(4..8));
        assert_eq!(s.next(), Some(8..10)); // GSO allows a short last segment
        assert_eq!(s.next(), None);
        assert!(s.is_empty());
        // No GRO: stride equals the one datagram's length.
        let mut one = Segments {
            len: 5,
            stride: 5,
            ..Segments::default()
        };
        assert_eq!(one.next(), Some(0..5));
        assert_eq!(one.next(), None);
    }

    #[test]
    fn splits_rfc4571_frames() {
        let mut p = vec![0, 2, 7, 8, 0, 1, 9, 0];
        assert_eq!(next_frame(&mut p), Some(vec![7, 8]));
        assert_eq!(next_frame(&mut p), Some(vec![9]));
        assert_eq!(next_frame(&mut p), None); // half a length
        assert_eq!(p, vec![0]);
    }

    proptest! {
        #[test]
        fn framing_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut p = data;
            while next_frame(&mut p).is_some() {}
        }
    }
}
