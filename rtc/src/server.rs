//! The WebRTC side of a node as signalling sees it: [`Server::bind`] opens the
//! one UDP port (and the ICE-TCP listener) and starts the receive loops and the
//! shards; admission ([`Server::admit`]), placement of new sessions on the least
//! loaded shard ([`Server::add`]) and lookup of live ones ([`Server::session`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use quinn_udp::UdpSocketState;
use str0m::{Candidate, Rtc, RtcConfig};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use crate::egress::{Batch, Egress, ShardEgress};
use crate::metrics as m;
use crate::mux::{self, Meta, Route, Routes};
use crate::session::{Handler, SessionHandle, SessionId, Waker};
use crate::shard::{self, Command, NewSession, Shard};
use crate::{Config, Error, Result};

/// Commands queued per shard: signalling is bursty (a ramp of joins) but
/// each command is handled in microseconds.
const COMMAND_QUEUE: usize = 1024;
/// Datagrams queued per shard before dropping, like a socket buffer:
/// ~40 ms of 1,000 viewers' feedback.
const INBOX: usize = 4096;
/// Send and receive buffer asked of the kernel for the shared UDP socket: ~13 ms of
/// 2.5 Gbit/s, room for a frame burst to every viewer of a shard.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

struct ShardRef {
    cmds: mpsc::Sender<Command>,
    wake: Arc<Notify>,
    load: Arc<AtomicUsize>,
}

struct Inner {
    local_udp: SocketAddr,
    local_tcp: Option<SocketAddr>,
    advertise: Arc<Vec<IpAddr>>,
    ice: crate::ice::IceServers,
    routes: Arc<Routes>,
    shards: Vec<ShardRef>,
    count: Arc<AtomicUsize>,
    max_sessions: usize,
    draining: AtomicBool,
}

/// The WebRTC side of a node: one UDP port, one ICE-TCP port, N shards.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Binds the sockets and starts the receive loops and shards.
    pub async fn bind(cfg: Config) -> Result<Self> {
        let socket = std::net::UdpSocket::bind(cfg.udp)?;
        socket.set_nonblocking(true)?;
        // Best effort (the kernel caps it at net.core.{w,r}mem_max): the default ~212 KB
        // holds a few ms of a thousand viewers' bursts.
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let state = Arc::new(UdpSocketState::new((&socket).into())?);
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let local_udp = socket.local_addr()?;
        let tcp = match cfg.tcp {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let local_tcp = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let local_ips: HashSet<IpAddr> = crate::interface_addresses().into_iter().collect();
        let mut advertise = cfg.advertise.clone();
        if advertise.is_empty() {
            advertise = if local_udp.ip().is_unspecified() {
                crate::interface_addresses()
            } else {
                vec![local_udp.ip()]
            };
        }
        let advertise = Arc::new(advertise);
        let routes = Arc::new(Routes::default());
        let egress = Arc::new(Egress {
            socket: socket.clone(),
            state: state.clone(),
            routes: routes.clone(),
            local_ips,
            gso: cfg.gso,
            counters: crate::egress::Counters::new(),
        });
        let n = if cfg.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.shards
        };
        let count = Arc::new(AtomicUsize::new(0));
        let mut shards = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for i in 0..n {
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
            let (in_tx, in_rx) = mpsc::channel(INBOX);
            let wake = Arc::new(Notify::new());
            let load = Arc::new(AtomicUsize::new(0));
            let sink = ShardEgress {
                egress: egress.clone(),
                batch: Batch::default(),
            };
            let shard = Shard::new(sink, routes.clone(), count.clone(), load.clone());
            tokio::spawn(
                shard::run(shard, cmd_rx, in_rx, wake.clone())
                    .instrument(tracing::info_span!("shard", index = i)),
            );
            shards.push(ShardRef {
                cmds: cmd_tx,
                wake,
                load,
            });
            inboxes.push(in_tx);
        }
        let inboxes = Arc::new(inboxes);
        tokio::spawn(mux::udp_loop(
            socket,
            state,
            routes.clone(),
            inboxes.clone(),
            advertise.clone(),
        ));
        if let Some(l) = tcp {
            tokio::spawn(mux::tcp_loop(l, routes.clone(), inboxes, advertise.clone()));
        }
        tracing::info!(udp = %local_udp, tcp = ?local_tcp, shards = n, advertise = ?advertise, "webrtc listening");
        Ok(Self {
            inner: Arc::new(Inner {
                local_udp,
                local_tcp,
                advertise,
                ice: cfg.ice,
                routes,
                shards,
                count,
                max_sessions: cfg.max_sessions,
                draining: AtomicBool::new(false),
            }),
        })
    }

    /// The bound UDP address.
    pub fn local_udp(&self) -> SocketAddr {
        self.inner.local_udp
    }

    /// The bound ICE-TCP address, if any.
    pub fn local_tcp(&self) -> Option<SocketAddr> {
        self.inner.local_tcp
    }

    /// The addresses put into candidates.
    pub fn advertise(&self) -> &[IpAddr] {
        &self.inner.advertise
    }

    /// A str0m config with what every cascade session needs: ICE-lite (we
    /// never gather; our host candidates are final).
    pub fn rtc_builder(&self) -> RtcConfig {
        Rtc::builder().set_ice_lite(true)
    }

    /// Adds our host candidates (UDP, then passive TCP) to a new `Rtc`.
    pub fn add_local_candidates(&self, rtc: &mut Rtc) {
        for c in self.local_candidates() {
            rtc.add_local_candidate(c);
        }
    }

    /// Our host candidates: UDP, then passive TCP, per advertised address.
    pub fn local_candidates(&self) -> Vec<Candidate> {
        let mut out = Vec::new();
        for ip in self.inner.advertise.iter() {
            let udp = SocketAddr::new(*ip, self.inner.local_udp.port());
            if let Ok(c) = Candidate::host(udp, "udp") {
                out.push(c);
            }
            if let Some(tcp) = self.inner.local_tcp {
                let addr = SocketAddr::new(*ip, tcp.port());
                if let Ok(c) = Candidate::builder()
                    .tcp()
                    .host(addr)
                    .tcptype(str0m::net::TcpType::Passive)
                    .build()
                {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The STUN/TURN servers to offer clients.
    pub fn ice_servers(&self) -> &crate::ice::IceServers {
        &self.inner.ice
    }

    /// Fails with [`Error::Full`] when a new session would exceed the limit
    /// or the node drains; signalling checks this before heavy work.
    pub fn admit(&self) -> Result<()> {
        if self.inner.draining.load(Ordering::Relaxed)
            || self.inner.count.load(Ordering::Relaxed) >= self.inner.max_sessions
        {
            return Err(Error::Full);
        }
        Ok(())
    }

    /// Hands a negotiated `Rtc` to the least loaded shard. `make` builds the
    /// handler with a [`Waker`] for that shard.
    pub fn add(
        &self,
        mut rtc: Rtc,
        kind: &'static str,
        stream: &str,
        span: tracing::Span,
        make: impl FnOnce(SessionId, Waker) -> Box<dyn Handler>,
    ) -> Result<SessionHandle> {
        self.admit()?;
        let (index, shard) = self
            .inner
            .shards
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.load.load(Ordering::Relaxed))
            .ok_or(Error::Full)?;
        let id = SessionId::random();
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let handler = make(id, Waker(shard.wake.clone()));
        self.inner
            .routes
            .add_ufrag(ufrag.clone(), Route { shard: index, id });
        self.inner.routes.add_meta(
            id,
            Meta {
                shard: index,
                kind,
                stream: stream.to_string(),
                etag: new_etag(),
                remote_ufrag: None,
            },
        );
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        let cmd = Command::Add(Box::new(NewSession {
            id,
            rtc,
            handler,
            ufrag: ufrag.clone(),
            kind,
            span,
        }));
        if shard.cmds.try_send(cmd).is_err() {
            self.inner.routes.remove(&ufrag, &[]);
            self.inner.routes.remove_meta(id);
            self.inner.count.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Full);
        }
        metrics::counter!(m::SESSIONS_OPENED, "kind" => kind).increment(1);
        metrics::gauge!(m::SESSIONS, "kind" => kind).increment(1.0);
        Ok(SessionHandle {
            id,
            tx: shard.cmds.clone(),
        })
    }

    /// The handle of a live session of `kind` on `stream`, with its ETag.
    pub fn session(
        &self,
        kind: &str,
        stream: &str,
        id: SessionId,
    ) -> Option<(SessionHandle, String)> {
        let meta = self.inner.routes.meta(id)?;
        if meta.kind != kind || meta.stream != stream {
            return None;
        }
        let shard = self.inner.shards.get(meta.shard)?;
        Some((
            SessionHandle {
                id,
                tx: shard.cmds.clone(),
            },
            meta.etag,
        ))
    }

    /// Replaces a session's ETag (after an ICE restart).
    pub fn set_etag(&self, id: SessionId, etag: String) {
        self.inner.routes.set_etag(id, etag);
    }

    /// The client's current ICE ufrag of a session, when signalling
    /// recorded one ([`Server::set_remote_ufrag`]).
    pub fn remote_ufrag(&self, id: SessionId) -> Option<String> {
        self.inner.routes.meta(id).and_then(|m| m.remote_ufrag)
    }

    /// Records the client's ICE ufrag (from its offer, or after a restart).
    pub fn set_remote_ufrag(&self, id: SessionId, ufrag: String) {
        self.inner.routes.set_remote_ufrag(id, ufrag);
    }

    /// Sessions on this node.
    pub fn sessions(&self) -> usize {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Stops admitting sessions (SIGTERM): new offers get 503.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// True once draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Closes every session and stops the shards.
    pub async fn shutdown(&self) {
        for s in &self.inner.shards {
            let _ = s.cmds.send(Command::Shutdown).await;
        }
    }
}

/// A fresh quoted ETag (RFC 9110 §8.8.3).
pub fn new_etag() -> String {
    format!("\"{:016x}\"", rand::random::<u64>())
}
