//! One UDP port (and one passive ICE-TCP listener) for every session of the
//! node: datagrams are routed to their session's shard by STUN ufrag first,
//! then by the 5-tuple learnt from it. Maps, never a scan of all sessions.
//!
//! A source address is learnt only by the shard, once a binding request from
//! it passed the message integrity check with the session's password
//! ([`Routes::learn`]); the router itself never adds addresses, so spoofed or
//! forged requests with a known ufrag cost one HMAC in the shard and no
//! memory. Each session keeps at most `shard::MAX_PATHS` addresses, and
//! they are forgotten with it.
//!
//! Receive loop: `readable` → batched `recvmsg` (quinn-udp: GRO, destination
//! address) → route → `try_send` to the shard's bounded inbox (dropped when
//! full, like a socket buffer would).

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use quinn_udp::{RecvMeta, UdpSocketState};
use str0m::net::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::limit::{PerIp, SharedLogOnce};
use crate::metrics as m;
use crate::session::SessionId;
use crate::stun;

/// Receive buffer: room for a GRO batch of 64 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Largest RFC 4571 frame (its length field is 16 bits).
const MAX_TCP_FRAME: usize = 65_535;
/// Outgoing frames queued per ICE-TCP connection before dropping: ~1 s of
/// a 2.5 Mbit/s stream. TCP viewers that cannot drain that fall behind.
const TCP_QUEUE: usize = 256;
/// ICE-TCP connections per node.
const MAX_TCP_CONNS: usize = 4096;
/// How long an ICE-TCP connection may stay unbound: its session must have
/// verified a binding request over it (learnt its address) by then.
const TCP_FIRST_PACKET: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a session lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Index of the shard that owns the session.
    pub shard: usize,
    /// The session.
    pub id: SessionId,
}

/// A datagram on its way to a shard.
pub(crate) struct Datagram {
    pub(crate) id: SessionId,
    pub(crate) proto: Protocol,
    pub(crate) source: SocketAddr,
    pub(crate) destination: SocketAddr,
    pub(crate) data: Vec<u8>,
}

/// The routing tables shared by the receive loops and the shards (public for the demux
/// bench, `benches/mux.rs`).
#[derive(Default)]
pub struct Routes {
    ufrag: RwLock<HashMap<String, Route>>,
    addr: RwLock<HashMap<(bool, SocketAddr), Route>>,
    tcp: RwLock<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    meta: RwLock<HashMap<SessionId, Meta>>,
}

/// What signalling knows of a live session (its resource URL's parts).
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub(crate) shard: usize,
    pub(crate) kind: &'static str,
    pub(crate) stream: String,
    pub(crate) etag: String,
    /// The client's current ICE ufrag: a PATCH fragment carrying another
    /// one restarts ICE, the same one is plain trickle (RFC 8840 §4.4).
    pub(crate) remote_ufrag: Option<String>,
    /// Remote candidates signalled so far (PATCH and WebSocket), capped.
    pub(crate) candidates: usize,
    /// The session's places in the publisher pool and its client's per-IP
    /// count: freed when the session (and so this entry) goes.
    pub(crate) held: Option<Arc<crate::server::Admission>>,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Routes {
    /// Routes binding requests carrying `ufrag` (our local ICE ufrag) to `route`.
    pub fn add_ufrag(&self, ufrag: String, route: Route) {
        write(&self.ufrag).insert(ufrag, route);
    }

    /// Forgets every route of a session (its ufrag and learnt addresses);
    /// an ICE-TCP connection on one of those addresses is closed with it.
    pub fn remove(&self, ufrag: &str, addrs: &[(Protocol, SocketAddr)]) {
        write(&self.ufrag).remove(ufrag);
        self.forget(addrs);
    }

    /// Forgets learnt addresses (and closes ICE-TCP connections on them: their
    /// writer ends when its sender is dropped, and the reader with it).
    pub fn forget(&self, addrs: &[(Protocol, SocketAddr)]) {
        let mut a = write(&self.addr);
        for (p, s) in addrs {
            a.remove(&(is_tcp(*p), *s));
        }
        drop(a);
        if addrs.iter().any(|(p, _)| is_tcp(*p)) {
            let mut t = write(&self.tcp);
            for (p, s) in addrs {
                if is_tcp(*p) {
                    t.remove(s);
                }
            }
        }
    }

    /// Routes later datagrams from `source` to `route`. Only a shard calls it,
    /// after a binding request from there passed the integrity check.
    pub fn learn(&self, proto: Protocol, source: SocketAddr, route: Route) {
        write(&self.addr).insert((is_tcp(proto), source), route);
    }

    /// Routes one datagram: a binding request by its local ufrag, anything
    /// else by its learnt source address. Learns nothing. The flag is true for
    /// a binding request from an address not learnt for that session (the
    /// shard verifies it before learning).
    pub fn route(&self, proto: Protocol, source: SocketAddr, data: &[u8]) -> Option<(Route, bool)> {
        let key = (is_tcp(proto), source);
        if let Some(ufrag) = stun::local_ufrag(data) {
            let route = read(&self.ufrag).get(ufrag).copied()?;
            let known = read(&self.addr).get(&key) == Some(&route);
            return Some((route, !known));
        }
        read(&self.addr).get(&key).copied().map(|r| (r, false))
    }

    /// True when `source` is learnt (verified) for some session.
    pub fn is_learnt(&self, proto: Protocol, source: SocketAddr) -> bool {
        read(&self.addr).contains_key(&(is_tcp(proto), source))
    }

    /// Learnt addresses, all sessions together (bounded by sessions × paths).
    pub fn addresses(&self) -> usize {
        read(&self.addr).len()
    }

    /// Reserves up to `wanted` more remote candidates for session `id` out of
    /// `max` in its lifetime; returns how many may be added.
    pub(crate) fn reserve_candidates(&self, id: SessionId, wanted: usize, max: usize) -> usize {
        let mut meta = write(&self.meta);
        let Some(m) = meta.get_mut(&id) else {
            return 0;
        };
        let n = wanted.min(max.saturating_sub(m.candidates));
        m.candidates += n;
        n
    }

    pub(crate) fn lookup_ufrag(&self, ufrag: &str) -> Option<Route> {
        read(&self.ufrag).get(ufrag).copied()
    }

    pub(crate) fn tcp_sender(&self, peer: SocketAddr) -> Option<mpsc::Sender<Vec<u8>>> {
        read(&self.tcp).get(&peer).cloned()
    }

    /// Sessions currently routable by ufrag.
    #[cfg(test)]
    pub(crate) fn sessions(&self) -> usize {
        read(&self.ufrag).len()
    }

    pub(crate) fn add_meta(&self, id: SessionId, meta: Meta) {
        write(&self.meta).insert(id, meta);
    }

    pub(crate) fn meta(&self, id: SessionId) -> Option<Meta> {
        read(&self.meta).get(&id).cloned()
    }

    pub(crate) fn set_etag(&self, id: SessionId, etag: String) {
        if let Some(m) = write(&self.meta).get_mut(&id) {
            m.etag = etag;
        }
    }

    pub(crate) fn set_remote_ufrag(&self, id: SessionId, ufrag: String) {
        if let Some(m) = write(&self.meta).get_mut(&id) {
            m.remote_ufrag = Some(ufrag);
        }
    }

    /// Attaches `held` to session `id` (dropped now if it is gone).
    pub(crate) fn hold(&self, id: SessionId, held: Arc<crate::server::Admission>) {
        if let Some(m) = write(&self.meta).get_mut(&id) {
            m.held = Some(held);
        }
    }

    pub(crate) fn remove_meta(&self, id: SessionId) {
        write(&self.meta).remove(&id);
    }
}

fn is_tcp(p: Protocol) -> bool {
    !matches!(p, Protocol::Udp)
}

/// Picks the destination address str0m should see: the address the packet
/// arrived on if we advertise it, else the first advertised address of the
/// same family (behind 1:1 NAT the packet arrives on the private address
/// while the candidate names the public one).
pub(crate) fn destination(dst_ip: Option<IpAddr>, port: u16, advertise: &[IpAddr]) -> SocketAddr {
    let ip = match dst_ip {
        Some(ip) if advertise.contains(&ip) => ip,
        Some(ip) => advertise
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == ip.is_ipv4())
            .unwrap_or(ip),
        None => advertise
            .first()
            .copied()
            .unwrap_or(IpAddr::from([127, 0, 0, 1])),
    };
    SocketAddr::new(ip, port)
}

/// The shard inboxes, by shard index.
pub(crate) type Inboxes = Arc<Vec<mpsc::Sender<Datagram>>>;

fn deliver(inboxes: &Inboxes, route: Route, dgram: Datagram) {
    let Some(inbox) = inboxes.get(route.shard) else {
        return;
    };
    if inbox.try_send(dgram).is_err() {
        metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "inbox_full").increment(1);
    }
}

/// The UDP receive loop; runs until the socket fails for good.
pub(crate) async fn udp_loop(
    socket: Arc<UdpSocket>,
    state: Arc<UdpSocketState>,
    routes: Arc<Routes>,
    inboxes: Inboxes,
    advertise: Arc<Vec<IpAddr>>,
) {
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = vec![0u8; RECV_BUF];
    // Resolved once: this loop counts every datagram of the node.
    let datagrams_in = metrics::counter!(m::DATAGRAMS_IN);
    let unrouted = metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "unrouted");
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut meta = [RecvMeta::default()];
        let res = socket.try_io(tokio::io::Interest::READABLE, || {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            state.recv((&*socket).into(), &mut bufs, &mut meta)
        });
        match res {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "udp recv");
                continue;
            }
        }
        let meta = &meta[0];
        let stride = meta.stride.max(1);
        let data = buf.get(..meta.len).unwrap_or(&[]);
        for chunk in data.chunks(stride) {
            datagrams_in.increment(1);
            let Some((route, _)) = routes.route(Protocol::Udp, meta.addr, chunk) else {
                unrouted.increment(1);
                continue;
            };
            deliver(
                &inboxes,
                route,
                Datagram {
                    id: route.id,
                    proto: Protocol::Udp,
                    source: meta.addr,
                    destination: destination(meta.dst_ip, port, &advertise),
                    data: chunk.to_vec(),
                },
            );
        }
    }
}

/// What bounds the ICE-TCP listener beyond [`MAX_TCP_CONNS`].
#[derive(Clone, Debug)]
pub(crate) struct TcpLimits {
    /// Connections per source IP.
    pub(crate) per_ip: PerIp,
    /// A connection that sends no frame this long is closed, bound or not.
    pub(crate) idle: std::time::Duration,
}

/// The passive ICE-TCP accept loop (RFC 6544 passive candidates, RFC 4571
/// framing): each connection's first frame must be a binding request with a
/// known ufrag, its session must verify one within [`TCP_FIRST_PACKET`], every
/// frame must come within the idle timeout, and it is closed with its session.
pub(crate) async fn tcp_loop(
    listener: TcpListener,
    routes: Arc<Routes>,
    inboxes: Inboxes,
    advertise: Arc<Vec<IpAddr>>,
    limits: TcpLimits,
) {
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNS));
    let logged = SharedLogOnce::default();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let Some(ip_guard) = limits.per_ip.acquire(peer.ip()) else {
            metrics::counter!(m::TCP_REFUSED, "reason" => "per_ip").increment(1);
            if logged.allow(peer.ip(), std::time::Instant::now()) {
                tracing::info!(ip = %peer.ip(), "ice-tcp connection refused: per-ip limit");
            }
            continue;
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            metrics::counter!(m::TCP_REFUSED, "reason" => "limit").increment(1);
            tracing::debug!("ice-tcp connection limit reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let inboxes = inboxes.clone();
        let advertise = advertise.clone();
        let idle = limits.idle;
        tokio::spawn(async move {
            tcp_conn(stream, peer, routes, inboxes, advertise, idle).await;
            drop(permit);
            drop(ip_guard);
        });
    }
}

/// Why an ICE-TCP connection ended (a metric label).
fn tcp_closed(reason: &'static str) {
    metrics::counter!(m::TCP_CLOSED, "reason" => reason).increment(1);
}

async fn tcp_conn(
    stream: TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    inboxes: Inboxes,
    advertise: Arc<Vec<IpAddr>>,
    idle: std::time::Duration,
) {
    let local = stream.local_addr().ok();
    let dst = destination(
        local.map(|l| l.ip()),
        local.map_or(0, |l| l.port()),
        &advertise,
    );
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    write(&routes.tcp).insert(peer, tx);
    // Ends when its sender is dropped: by this task, or by `Routes::forget`
    // when the session that learnt this connection ends.
    let mut writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let Ok(len) = u16::try_from(frame.len()) else {
                continue;
            };
            if wr.write_all(&len.to_be_bytes()).await.is_err()
                || wr.write_all(&frame).await.is_err()
            {
                return;
            }
        }
    });
    let bind_by = tokio::time::Instant::now() + TCP_FIRST_PACKET;
    let mut first = true;
    let mut bound = false;
    let mut buf = vec![0u8; MAX_TCP_FRAME];
    loop {
        let mut len = [0u8; 2];
        let read_len = async {
            rd.read_exact(&mut len).await?;
            let n = usize::from(u16::from_be_bytes(len));
            rd.read_exact(&mut buf[..n]).await?;
            Ok::<usize, std::io::Error>(n)
        };
        let idle_at = tokio::time::Instant::now() + idle;
        let deadline = if bound { idle_at } else { idle_at.min(bind_by) };
        let n = tokio::select! {
            _ = &mut writer => {
                tcp_closed("session_ended");
                break;
            }
            r = tokio::time::timeout_at(deadline, read_len) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => {
                    tcp_closed("peer");
                    break;
                }
                Err(_) => {
                    tcp_closed(if bound { "idle" } else { "unbound" });
                    break;
                }
            },
        };
        if !bound && !first {
            // Learnt by the shard once a binding request over this
            // connection passed the integrity check.
            bound = routes.is_learnt(Protocol::Tcp, peer);
        }
        let data = &buf[..n];
        let Some((route, _)) = routes.route(Protocol::Tcp, peer, data) else {
            if first {
                tracing::debug!("ice-tcp first packet not routable");
                tcp_closed("unroutable");
                break;
            }
            continue;
        };
        first = false;
        deliver(
            &inboxes,
            route,
            Datagram {
                id: route.id,
                proto: Protocol::Tcp,
                source: peer,
                destination: dst,
                data: data.to_vec(),
            },
        );
    }
    write(&routes.tcp).remove(&peer);
    writer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_prefers_advertised() {
        let adv = vec![IpAddr::from([1, 2, 3, 4]), IpAddr::from([127, 0, 0, 1])];
        assert_eq!(
            destination(Some(IpAddr::from([127, 0, 0, 1])), 9, &adv),
            "127.0.0.1:9".parse().unwrap()
        );
        // Arrived on a private address behind NAT: the public one is the candidate.
        assert_eq!(
            destination(Some(IpAddr::from([10, 0, 0, 5])), 9, &adv),
            "1.2.3.4:9".parse().unwrap()
        );
        assert_eq!(destination(None, 9, &adv), "1.2.3.4:9".parse().unwrap());
    }

    #[test]
    fn routes_by_ufrag_then_address() {
        let routes = Routes::default();
        let r = Route {
            shard: 1,
            id: SessionId(7),
        };
        routes.add_ufrag("abcd".into(), r);
        let src: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        // Not STUN and address unknown: dropped.
        assert_eq!(routes.route(Protocol::Udp, src, &[0x80; 20]), None);
        let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[0; 12]);
        stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x06]);
        stun.extend_from_slice(b"abcd:x\0\0");
        assert_eq!(routes.route(Protocol::Udp, src, &stun), Some((r, true)));
        // Routing a binding request learns nothing: the shard learns the
        // address once the request passed the integrity check.
        assert_eq!(routes.route(Protocol::Udp, src, &[0x80; 20]), None);
        assert_eq!(routes.addresses(), 0);
        routes.learn(Protocol::Udp, src, r);
        assert!(routes.is_learnt(Protocol::Udp, src));
        assert_eq!(routes.route(Protocol::Udp, src, &stun), Some((r, false)));
        assert_eq!(
            routes.route(Protocol::Udp, src, &[0x80; 20]),
            Some((r, false))
        );
        // Same address over TCP is a different path.
        assert_eq!(routes.route(Protocol::Tcp, src, &[0x80; 20]), None);
        routes.remove("abcd", &[(Protocol::Udp, src)]);
        assert_eq!(routes.route(Protocol::Udp, src, &[0x80; 20]), None);
        assert_eq!(routes.sessions(), 0);
    }
}
