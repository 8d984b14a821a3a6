//! Batched UDP egress for the shards: a drain's transmits are collected, consecutive
//! datagrams to one destination with one size become a single GSO `sendmsg` (quinn-udp
//! `segment_size`), and the batch is flushed when the drain ends.
//!
//! Why: a viewer's video frame is ~9 equal-size packets to one address; one syscall for all
//! of them costs ~0.8 µs per packet instead of ~3 µs (DESIGN.md, measured on this machine).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use quinn_udp::UdpSocketState;
use str0m::net::{Protocol, Transmit};
use tokio::net::UdpSocket;

use crate::metrics as m;
use crate::mux::Routes;
use crate::shard::Sink;

/// Largest GSO super-datagram: the UDP length field caps it at 64 KiB minus headers.
const MAX_GSO_BYTES: usize = 65_000;
/// Initial capacity of a batch's byte buffer: a keyframe burst of one viewer.
const BATCH_BYTES: usize = 64 * 1024;

/// Where shards send: the shared UDP socket (and ICE-TCP connections by address).
pub(crate) struct Egress {
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) state: Arc<UdpSocketState>,
    pub(crate) routes: Arc<Routes>,
    /// Addresses of this host: only these may be set as the source of a send.
    pub(crate) local_ips: HashSet<IpAddr>,
    /// Off ([`Config::gso`](crate::Config::gso)) sends one datagram per `sendmsg` (A/B
    /// benchmarks, or a NIC whose driver mishandles UDP GSO without failing the send).
    pub(crate) gso: bool,
    /// Metric handles, resolved once: a `counter!` lookup per drain hashed the key every time
    /// (~2% of a shard's CPU at 600 viewers, measured with perf). Counts gather in the
    /// [`Batch`] and reach them in [`Egress::publish`], once per shard loop turn rather than
    /// per drain (the per-drain adds were ~1% in perf at 300 viewers; no end-to-end change
    /// beyond noise in an A/B).
    pub(crate) counters: Counters,
    /// UDP payload bytes sent since start: the node's egress rate for its
    /// load report (placement), read by [`crate::Server::bytes_out`].
    pub(crate) bytes_out: std::sync::atomic::AtomicU64,
}

/// The egress counters, resolved once.
pub(crate) struct Counters {
    out: metrics::Counter,
    calls: metrics::Counter,
    send_dropped: metrics::Counter,
}

impl Counters {
    /// Resolves the handles; call after the metrics recorder is installed.
    pub(crate) fn new() -> Self {
        Self {
            out: metrics::counter!(m::DATAGRAMS_OUT),
            calls: metrics::counter!(m::SEND_CALLS),
            send_dropped: metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "send"),
        }
    }
}

/// One run of datagrams for one destination, all `segment` bytes but possibly the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    destination: SocketAddr,
    src_ip: Option<IpAddr>,
    start: usize,
    len: usize,
    segment: usize,
    /// A shorter datagram ended the run: GSO allows only the last segment to be short.
    closed: bool,
}

/// Datagrams waiting to be sent; reused across drains so the steady state allocates nothing.
#[derive(Debug)]
pub(crate) struct Batch {
    buf: Vec<u8>,
    groups: Vec<Group>,
    /// Datagrams sent, `sendmsg` calls made and datagrams dropped since the last publish.
    sent: u64,
    calls: u64,
    dropped: u64,
    /// Payload bytes of the datagrams sent since the last publish.
    bytes: u64,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            buf: Vec::with_capacity(BATCH_BYTES),
            groups: Vec::new(),
            sent: 0,
            calls: 0,
            dropped: 0,
            bytes: 0,
        }
    }
}

impl Batch {
    /// Appends one datagram, extending the last run when GSO can carry it in the same call.
    fn push(
        &mut self,
        destination: SocketAddr,
        src_ip: Option<IpAddr>,
        data: &[u8],
        max_segments: usize,
    ) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        let n = data.len();
        if let Some(g) = self.groups.last_mut() {
            let fits = g.destination == destination
                && g.src_ip == src_ip
                && !g.closed
                && n <= g.segment
                && g.len / g.segment.max(1) < max_segments
                && g.len + n <= MAX_GSO_BYTES;
            if fits {
                g.len += n;
                g.closed = n < g.segment;
                return;
            }
        }
        self.groups.push(Group {
            destination,
            src_ip,
            start,
            len: n,
            segment: n,
            closed: false,
        });
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.groups.clear();
    }

    /// Datagrams waiting.
    #[cfg(test)]
    fn runs(&self) -> Vec<(SocketAddr, usize, usize)> {
        self.groups
            .iter()
            .map(|g| (g.destination, g.len, g.segment))
            .collect()
    }
}

/// One shard's way out: the shared [`Egress`] and the shard's own [`Batch`].
pub(crate) struct ShardEgress {
    pub(crate) egress: Arc<Egress>,
    pub(crate) batch: Batch,
}

impl Sink for ShardEgress {
    #[inline]
    fn push(&mut self, t: &Transmit) {
        self.egress.push(&mut self.batch, t);
    }

    fn flush(&mut self) {
        self.egress.flush(&mut self.batch);
    }

    fn publish(&mut self) {
        self.egress.publish(&mut self.batch);
    }
}

impl Egress {
    /// Queues a str0m transmit: UDP into the batch, ICE-TCP straight to its connection.
    pub(crate) fn push(&self, batch: &mut Batch, t: &Transmit) {
        match t.proto {
            Protocol::Udp => {
                let src_ip = Some(t.source.ip()).filter(|ip| self.local_ips.contains(ip));
                let max_segments = if self.gso {
                    self.state.max_gso_segments()
                } else {
                    1
                };
                batch.push(t.destination, src_ip, &t.contents, max_segments);
            }
            _ => {
                let ok = self
                    .routes
                    .tcp_sender(t.destination)
                    .is_some_and(|tx| tx.try_send(t.contents.to_vec()).is_ok());
                if ok {
                    metrics::counter!(m::DATAGRAMS_OUT).increment(1);
                } else {
                    metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "tcp_send").increment(1);
                }
            }
        }
    }

    /// Sends everything batched, one `sendmsg` per run, and empties the batch.
    pub(crate) fn flush(&self, batch: &mut Batch) {
        if batch.groups.is_empty() {
            return;
        }
        let (mut sent, mut dropped, mut calls, mut bytes) = (0u64, 0u64, 0u64, 0u64);
        for g in &batch.groups {
            let Some(contents) = batch.buf.get(g.start..g.start + g.len) else {
                continue;
            };
            let segments = g.len.div_ceil(g.segment.max(1));
            calls += 1;
            match self.send_one(g, contents, segments) {
                Ok(()) => {
                    sent += segments as u64;
                    bytes += g.len as u64;
                }
                Err(e) if segments > 1 && self.state.max_gso_segments() == 1 => {
                    // The device refused GSO (quinn-udp turned it off): resend one by one.
                    tracing::debug!(error = %e, "gso send refused, sending datagrams singly");
                    for chunk in contents.chunks(g.segment.max(1)) {
                        calls += 1;
                        let single = Group {
                            len: chunk.len(),
                            ..*g
                        };
                        match self.send_one(&single, chunk, 1) {
                            Ok(()) => {
                                sent += 1;
                                bytes += chunk.len() as u64;
                            }
                            Err(_) => dropped += 1,
                        }
                    }
                }
                // Non-blocking: media is never worth waiting for, a full send buffer
                // drops like a congested link.
                Err(_) => dropped += segments as u64,
            }
        }
        batch.clear();
        batch.sent += sent;
        batch.calls += calls;
        batch.dropped += dropped;
        batch.bytes += bytes;
    }

    /// Adds the batch's counts to the metrics and zeroes them.
    pub(crate) fn publish(&self, batch: &mut Batch) {
        if batch.calls > 0 {
            self.counters.out.increment(batch.sent);
            self.counters.calls.increment(batch.calls);
            self.bytes_out
                .fetch_add(batch.bytes, std::sync::atomic::Ordering::Relaxed);
        }
        if batch.dropped > 0 {
            self.counters.send_dropped.increment(batch.dropped);
        }
        (batch.sent, batch.calls, batch.dropped, batch.bytes) = (0, 0, 0, 0);
    }

    fn send_one(&self, g: &Group, contents: &[u8], segments: usize) -> std::io::Result<()> {
        let tx = quinn_udp::Transmit {
            destination: g.destination,
            ecn: None,
            contents,
            segment_size: (segments > 1).then_some(g.segment),
            src_ip: g.src_ip,
        };
        self.state.try_send((&*self.socket).into(), &tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn equal_sizes_to_one_destination_share_a_run() {
        let mut b = Batch::default();
        for _ in 0..3 {
            b.push(addr(1), None, &[0; 1200], 64);
        }
        // A short last segment closes the run; the next frame starts a new one.
        b.push(addr(1), None, &[0; 700], 64);
        b.push(addr(1), None, &[0; 1200], 64);
        // Another destination, then a bigger datagram: new runs.
        b.push(addr(2), None, &[0; 1200], 64);
        b.push(addr(2), None, &[0; 1300], 64);
        assert_eq!(
            b.runs(),
            vec![
                (addr(1), 3 * 1200 + 700, 1200),
                (addr(1), 1200, 1200),
                (addr(2), 1200, 1200),
                (addr(2), 1300, 1300),
            ]
        );
        b.clear();
        assert!(b.runs().is_empty());
    }

    #[test]
    fn runs_respect_segment_and_byte_limits() {
        let mut b = Batch::default();
        for _ in 0..5 {
            b.push(addr(1), None, &[0; 100], 2);
        }
        assert_eq!(
            b.runs(),
            vec![
                (addr(1), 200, 100),
                (addr(1), 200, 100),
                (addr(1), 100, 100)
            ]
        );
        let mut b = Batch::default();
        for _ in 0..60 {
            b.push(addr(1), None, &[0; 1400], 64);
        }
        let runs = b.runs();
        assert!(runs.iter().all(|r| r.1 <= MAX_GSO_BYTES), "{runs:?}");
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), 60 * 1400);
        // With GSO off every datagram is its own run.
        let mut b = Batch::default();
        b.push(addr(1), None, &[0; 10], 1);
        b.push(addr(1), None, &[0; 10], 1);
        assert_eq!(b.runs().len(), 2);
    }

    #[tokio::test]
    async fn flush_delivers_every_datagram_in_order() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let state = Arc::new(UdpSocketState::new((&socket).into()).unwrap());
        let egress = Egress {
            socket: Arc::new(UdpSocket::from_std(socket).unwrap()),
            state,
            routes: Arc::new(Routes::default()),
            local_ips: HashSet::new(),
            gso: true,
            counters: Counters::new(),
            bytes_out: Default::default(),
        };
        let to = rx.local_addr().unwrap();
        let mut b = Batch::default();
        for i in 0..9u8 {
            let len = if i == 8 { 300 } else { 1200 };
            b.push(to, None, &vec![i; len], egress.state.max_gso_segments());
        }
        egress.flush(&mut b);
        // Counted in the batch until published.
        assert_eq!(b.sent, 9);
        assert!(b.calls >= 1 && b.dropped == 0);
        egress.publish(&mut b);
        assert_eq!((b.sent, b.calls, b.dropped), (0, 0, 0));
        let mut buf = [0u8; 2000];
        for i in 0..9u8 {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(n, if i == 8 { 300 } else { 1200 });
            assert!(buf[..n].iter().all(|&x| x == i));
        }
    }
}
