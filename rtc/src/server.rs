//! The WebRTC side of a node as signalling sees it: [`Server::bind`] opens the
//! one UDP port (and the ICE-TCP listener) and starts the receive loops and the
//! shards; admission ([`Server::admit`]), placement of new sessions on the least
//! loaded shard ([`Server::add`]) and lookup of live ones ([`Server::session`]).
//!
//! Supervision: every shard and receive task is watched; one that panics (or
//! a receive loop that stops) is reported through [`Server::failed`], its
//! shard stops taking sessions and its sessions leave the count. The node
//! exits non-zero on it so its supervisor restarts it, rather than running on
//! with sessions that vanished.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use quinn_udp::UdpSocketState;
use str0m::{Candidate, Rtc, RtcConfig};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::egress::{Batch, Egress, ShardEgress};
use crate::limit::{IpGuard, PerIp, SharedLogOnce};
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
    /// Set when its task died: placement skips it.
    dead: Arc<AtomicBool>,
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
    /// The publishers' pool (`None`: no cap).
    publishers: Option<Arc<Semaphore>>,
    /// Sessions per client IP.
    per_ip: PerIp,
    refusals: SharedLogOnce,
    draining: AtomicBool,
    max_candidates: usize,
    auth: crate::limit::AuthGate,
    /// Why a shard or receive task failed, once one did.
    failed: watch::Sender<Option<String>>,
    /// The shared send side, for its byte count.
    egress: Arc<Egress>,
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
            bytes_out: Default::default(),
        });
        let n = if cfg.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.shards
        };
        let count = Arc::new(AtomicUsize::new(0));
        let (failed, _) = watch::channel(None);
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
            let shard = Shard::new(sink, routes.clone(), count.clone(), load.clone())
                .index(i)
                .panic_after(cfg.limits.panic_shard_after);
            let task = tokio::spawn(
                shard::run(shard, cmd_rx, in_rx, wake.clone())
                    .instrument(tracing::info_span!("shard", index = i)),
            );
            let dead = Arc::new(AtomicBool::new(false));
            let watched = (load.clone(), count.clone(), dead.clone(), failed.clone());
            tokio::spawn(async move {
                let (load, count, dead, failed) = watched;
                // A shard returns only on shutdown; a panic is a failure.
                let Err(e) = task.await else { return };
                if !e.is_panic() {
                    return;
                }
                dead.store(true, Ordering::Relaxed);
                // Its sessions are gone with it: correct the node's count.
                let lost = load.swap(0, Ordering::Relaxed);
                count.fetch_sub(lost.min(count.load(Ordering::Relaxed)), Ordering::Relaxed);
                report(
                    &failed,
                    format!("shard {i} panicked ({lost} sessions lost)"),
                );
            });
            shards.push(ShardRef {
                cmds: cmd_tx,
                wake,
                load,
                dead,
            });
            inboxes.push(in_tx);
        }
        let inboxes = Arc::new(inboxes);
        let udp = tokio::spawn(mux::udp_loop(
            socket,
            state,
            routes.clone(),
            inboxes.clone(),
            advertise.clone(),
        ));
        watch_loop(udp, "udp receive", failed.clone());
        if let Some(l) = tcp {
            let limits = mux::TcpLimits {
                per_ip: crate::limit::PerIp::new(cfg.limits.tcp_per_ip),
                idle: cfg.limits.tcp_idle,
            };
            let tcp = tokio::spawn(mux::tcp_loop(
                l,
                routes.clone(),
                inboxes,
                advertise.clone(),
                limits,
            ));
            watch_loop(tcp, "ice-tcp accept", failed.clone());
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
                publishers: (cfg.limits.max_publishers > 0)
                    .then(|| Arc::new(Semaphore::new(cfg.limits.max_publishers))),
                per_ip: PerIp::new(cfg.limits.sessions_per_ip),
                refusals: SharedLogOnce::default(),
                draining: AtomicBool::new(false),
                max_candidates: cfg.limits.max_remote_candidates,
                auth: cfg.limits.auth.clone(),
                failed,
                egress,
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

    /// The node's wrong-token limiter (429 per source IP).
    pub fn auth(&self) -> &crate::limit::AuthGate {
        &self.inner.auth
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

    /// Admission of a new `kind` session from `ip` (when known), before any
    /// heavy work: publishers (`"whip"`) take a place in their own pool and
    /// are not refused for the node's session count, viewers are refused
    /// once all sessions reach `max_sessions` ([`Server::admit`]), and
    /// no address holds more than its share of sessions. The places are
    /// held until the [`Admission`] is dropped, or (after [`Server::hold`])
    /// until the session ends.
    pub fn admit_from(&self, kind: &'static str, ip: Option<IpAddr>) -> Result<Admission> {
        let refuse = |reason: &'static str, e: Error| {
            metrics::counter!(m::SESSIONS_REFUSED, "kind" => kind, "reason" => reason).increment(1);
            if let Some(ip) = ip {
                if self.inner.refusals.allow(ip, Instant::now()) {
                    tracing::warn!(%ip, kind, reason, "session refused (logged once a minute per address)");
                }
            }
            e
        };
        let publisher = if kind == PUBLISHER {
            if self.inner.draining.load(Ordering::Relaxed) {
                return Err(Error::Full);
            }
            match &self.inner.publishers {
                None => None,
                Some(p) => Some(
                    p.clone()
                        .try_acquire_owned()
                        .map_err(|_| refuse("publishers_full", Error::Full))?,
                ),
            }
        } else {
            if self.inner.draining.load(Ordering::Relaxed) {
                return Err(Error::Full);
            }
            if self.inner.count.load(Ordering::Relaxed) >= self.inner.max_sessions {
                return Err(refuse("viewers_full", Error::Full));
            }
            None
        };
        let ip = match ip {
            None => None,
            Some(ip) => Some(
                self.inner
                    .per_ip
                    .acquire(ip)
                    .ok_or_else(|| refuse("per_ip", Error::TooManyFromAddress))?,
            ),
        };
        Ok(Admission {
            _publisher: publisher,
            _ip: ip,
        })
    }

    /// Ties `admission` to session `id`: its places are freed when the
    /// session ends (at once if it already has).
    pub fn hold(&self, id: SessionId, admission: Admission) {
        self.inner.routes.hold(id, Arc::new(admission));
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
        if kind == PUBLISHER {
            // Publishers were admitted to their own pool (admit_from).
            if self.inner.draining.load(Ordering::Relaxed) {
                return Err(Error::Full);
            }
        } else {
            self.admit()?;
        }
        let (index, shard) = self
            .inner
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.dead.load(Ordering::Relaxed))
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
                candidates: 0,
                held: None,
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

    /// How many of `wanted` more remote candidates session `id` may add
    /// ([`crate::Limits::max_remote_candidates`] in its lifetime); the rest
    /// are to be ignored, and are counted here.
    pub fn reserve_candidates(&self, id: SessionId, kind: &'static str, wanted: usize) -> usize {
        let n = self
            .inner
            .routes
            .reserve_candidates(id, wanted, self.inner.max_candidates);
        if n < wanted {
            metrics::counter!(m::CANDIDATES_REFUSED, "kind" => kind).increment((wanted - n) as u64);
        }
        n
    }

    /// Counts one negotiation in progress as a session (admission applies)
    /// until the guard is dropped: signalling that holds a client for
    /// seconds before [`Server::add`] (the WebSocket) takes one.
    pub fn reserve(&self) -> Result<Reservation> {
        self.admit()?;
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation {
            count: self.inner.count.clone(),
            admission: None,
        })
    }

    /// [`Server::reserve`] for a client at `ip` (when known), counted in its
    /// address's sessions too ([`Server::admit_from`]): the WebSocket.
    pub fn reserve_from(&self, kind: &'static str, ip: Option<IpAddr>) -> Result<Reservation> {
        let admission = self.admit_from(kind, ip)?;
        let mut r = self.reserve()?;
        r.admission = Some(admission);
        Ok(r)
    }

    /// Source addresses in the routing table (bounded: sessions × paths).
    pub fn routed_addresses(&self) -> usize {
        self.inner.routes.addresses()
    }

    /// Resolves when a shard or receive task failed (panicked, or the
    /// receive loop stopped), with what failed. The node exits on it.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.failed.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// UDP payload bytes sent to peers since start (ICE-TCP not counted):
    /// the egress rate of the node's load report.
    pub fn bytes_out(&self) -> u64 {
        self.inner
            .egress
            .bytes_out
            .load(std::sync::atomic::Ordering::Relaxed)
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

/// The session kind that takes places in the publishers' pool.
const PUBLISHER: &str = "whip";

/// Places a new session holds (publisher pool, its address's count) until
/// dropped.
#[derive(Debug)]
pub struct Admission {
    _publisher: Option<OwnedSemaphorePermit>,
    _ip: Option<IpGuard>,
}

/// A negotiation counted as a session ([`Server::reserve`]).
#[derive(Debug)]
pub struct Reservation {
    count: Arc<AtomicUsize>,
    admission: Option<Admission>,
}

impl Reservation {
    /// Ends the reservation (the session about to be added takes its place
    /// in the count) and hands over its places for [`Server::hold`].
    pub fn release(mut self) -> Option<Admission> {
        self.admission.take()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Records a failure (the first one wins) and logs it.
fn report(failed: &watch::Sender<Option<String>>, why: String) {
    tracing::error!(what = %why, "webrtc task failed: the node must restart");
    metrics::counter!(m::TASK_FAILURES).increment(1);
    failed.send_if_modified(|v| {
        if v.is_none() {
            *v = Some(why);
            true
        } else {
            false
        }
    });
}

/// Watches a loop that should run for the node's life: any end is a failure.
fn watch_loop(
    task: tokio::task::JoinHandle<()>,
    what: &'static str,
    failed: watch::Sender<Option<String>>,
) {
    tokio::spawn(async move {
        let why = match task.await {
            Ok(()) => format!("{what} loop stopped"),
            Err(e) if e.is_panic() => format!("{what} task panicked"),
            Err(_) => return, // cancelled: the runtime is shutting down
        };
        report(&failed, why);
    });
}

/// A fresh quoted ETag (RFC 9110 §8.8.3).
pub fn new_etag() -> String {
    format!("\"{:016x}\"", rand::random::<u64>())
}
