//! Worker shards: each owns many sessions, a timer heap and a handle on the
//! shared UDP socket; the [`Server`] spreads new sessions over them.
//!
//! Shard loop (one tokio task per shard):
//! `select! { commands, wake (media ready), datagrams (batch), earliest timer,
//! housekeeping }`; after every input the touched session is drained
//! (`poll_output` until a future `Timeout`), transmitting as it goes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::UdpSocketState;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use crate::egress::{Batch, Egress};
use crate::metrics as m;
use crate::mux::{self, Datagram, Meta, Route, Routes};
use crate::session::{CloseReason, Ctx, Flow, Handler, SessionHandle, SessionId, Waker};
use crate::{Config, Error, Result};

/// Commands queued per shard: signalling is bursty (a ramp of joins) but
/// each command is handled in microseconds.
const COMMAND_QUEUE: usize = 1024;
/// Datagrams queued per shard before dropping, like a socket buffer:
/// ~40 ms of 1,000 viewers' feedback.
const INBOX: usize = 4096;
/// Datagrams handled per wake-up before other branches get a turn.
const INBOX_BATCH: usize = 64;
/// ICE + DTLS must complete within this after the answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A connected peer silent this long is gone. Viewers send RTCP every second
/// and consent checks every ~5 s (RFC 7675), publishers send media
/// continuously, so 10 s of silence is a vanished peer, found 20 s sooner
/// than by the 30 s consent expiry.
const CONSENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Send and receive buffer asked of the kernel for the shared UDP socket: ~13 ms of
/// 2.5 Gbit/s, room for a frame burst to every viewer of a shard.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Immediate re-polls per drain (str0m asks for `Timeout(now)` after writes).
const MAX_IMMEDIATE: usize = 64;

pub(crate) enum Command {
    Add(Box<NewSession>),
    Close(SessionId),
    RemoteCandidate(SessionId, Candidate),
    Call(SessionId, Box<dyn FnOnce(&mut Rtc) + Send>),
    Shutdown,
}

pub(crate) struct NewSession {
    id: SessionId,
    rtc: Rtc,
    handler: Box<dyn Handler>,
    ufrag: String,
    kind: &'static str,
    span: tracing::Span,
}

struct Entry {
    rtc: Rtc,
    handler: Box<dyn Handler>,
    ufrag: String,
    addrs: Vec<(Protocol, SocketAddr)>,
    timeout: Option<Instant>,
    created: Instant,
    last_input: Instant,
    connected: bool,
    kind: &'static str,
    span: tracing::Span,
}

struct Shard {
    sessions: HashMap<SessionId, Entry>,
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    egress: Arc<Egress>,
    /// A drain's datagrams, sent together (GSO) when the drain ends.
    batch: Batch,
    count: Arc<AtomicUsize>,
    load: Arc<AtomicUsize>,
    ids: Vec<SessionId>,
}

impl Shard {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut inbox: mpsc::Receiver<Datagram>,
        wake: Arc<Notify>,
    ) {
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self
                .timers
                .peek()
                .map(|Reverse((t, _))| *t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown) | None => {
                        self.close_all(CloseReason::Shutdown);
                        return;
                    }
                    Some(cmd) => self.command(cmd),
                },
                // Media before the inbox: a wake means a frame is ready for
                // every viewer, while the inbox is mostly viewers' RTCP and
                // STUN. Under load the inbox is never empty, so with it first a
                // frame waited behind batch after batch of feedback.
                _ = wake.notified() => {
                    self.wake_all();
                    // Under load a pass lasts about a frame interval, so the next wake is
                    // often ready when it ends and the inbox would only get the gaps: a
                    // joining viewer's ICE and DTLS datagrams waited pass after pass, and
                    // str0m's timers (DTLS retransmits, RTCP) behind both. One inbox batch
                    // and the due timers after each pass bound that wait to a pass.
                    self.inbox_batch(&mut inbox, None);
                    self.timers(Instant::now());
                }
                Some(d) = inbox.recv() => self.inbox_batch(&mut inbox, Some(d)),
                _ = tokio::time::sleep_until(next.into()) => self.timers(Instant::now()),
                _ = housekeeping.tick() => self.housekeeping(Instant::now()),
            }
            self.egress.publish(&mut self.batch);
        }
    }

    /// Handles `first` and up to `INBOX_BATCH` datagrams in all that are already queued.
    fn inbox_batch(&mut self, inbox: &mut mpsc::Receiver<Datagram>, first: Option<Datagram>) {
        let mut budget = INBOX_BATCH;
        if let Some(d) = first {
            self.datagram(d);
            budget -= 1;
        }
        for _ in 0..budget {
            match inbox.try_recv() {
                Ok(d) => self.datagram(d),
                Err(_) => break,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Add(n) => {
                let NewSession {
                    id,
                    rtc,
                    handler,
                    ufrag,
                    kind,
                    span,
                } = *n;
                self.sessions.insert(
                    id,
                    Entry {
                        rtc,
                        handler,
                        ufrag,
                        addrs: Vec::new(),
                        timeout: None,
                        created: now,
                        last_input: now,
                        connected: false,
                        kind,
                        span,
                    },
                );
                self.load.fetch_add(1, Ordering::Relaxed);
                self.drain(id, now);
            }
            Command::Close(id) => self.close(id, CloseReason::Delete),
            Command::RemoteCandidate(id, c) => {
                if let Some(e) = self.sessions.get_mut(&id) {
                    e.rtc.add_remote_candidate(c);
                    self.drain(id, now);
                }
            }
            Command::Call(id, f) => {
                if let Some(e) = self.sessions.get_mut(&id) {
                    f(&mut e.rtc);
                    // An ICE restart changes the local ufrag: route the new one.
                    let ufrag = e.rtc.direct_api().local_ice_credentials().ufrag;
                    if ufrag != e.ufrag {
                        let shard = self.egress.routes.route_of(&e.ufrag);
                        if let Some(route) = shard {
                            self.egress.routes.add_ufrag(ufrag.clone(), route);
                        }
                        // Checks with the old ufrag fail str0m's integrity
                        // check now; its route would only leak.
                        self.egress.routes.remove(&e.ufrag, &[]);
                        e.ufrag = ufrag;
                    }
                    self.drain(id, now);
                }
            }
            Command::Shutdown => {}
        }
    }

    fn datagram(&mut self, d: Datagram) {
        let now = Instant::now();
        let Some(e) = self.sessions.get_mut(&d.id) else {
            return;
        };
        let path = (d.proto, d.source);
        if !e.addrs.contains(&path) && e.addrs.len() < 8 {
            e.addrs.push(path);
        }
        let Ok(recv) = Receive::new(d.proto, d.source, d.destination, &d.data) else {
            metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "unparsable").increment(1);
            return;
        };
        e.last_input = now;
        if let Err(err) = e.rtc.handle_input(Input::Receive(now, recv)) {
            let _g = e.span.enter();
            tracing::debug!(error = %err, "peer input refused");
            drop(_g);
            self.close(d.id, CloseReason::Error);
            return;
        }
        self.drain(d.id, now);
    }

    fn wake_all(&mut self) {
        let now = Instant::now();
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        ids.extend(self.sessions.keys().copied());
        for &id in &ids {
            let Some(e) = self.sessions.get_mut(&id) else {
                continue;
            };
            let flow = e.handler.on_wake(&mut Ctx {
                rtc: &mut e.rtc,
                now,
                id,
            });
            match flow {
                Flow::Close => self.close(id, CloseReason::Handler),
                // Nothing written: its timers are on the heap, nothing to poll.
                Flow::Idle => {}
                Flow::Continue => self.drain(id, now),
            }
        }
        self.ids = ids;
    }

    fn timers(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(e) = self.sessions.get_mut(&id) else {
                continue;
            };
            // Lazy deletion: only the session's current deadline counts.
            if e.timeout != Some(t) {
                continue;
            }
            e.timeout = None;
            if e.rtc.handle_input(Input::Timeout(now)).is_err() {
                self.close(id, CloseReason::Error);
                continue;
            }
            self.drain(id, now);
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        for (id, e) in &self.sessions {
            let connect_late = !e.connected && now.duration_since(e.created) > CONNECT_TIMEOUT;
            let silent = e.connected && now.duration_since(e.last_input) > CONSENT_TIMEOUT;
            if connect_late || silent {
                ids.push(*id);
            }
        }
        for &id in &ids {
            let reason = if self.sessions.get(&id).is_some_and(|e| e.connected) {
                CloseReason::ConsentTimeout
            } else {
                CloseReason::ConnectTimeout
            };
            self.close(id, reason);
        }
        self.ids = ids;
    }

    /// Polls a session until str0m wants to be called back later.
    fn drain(&mut self, id: SessionId, now: Instant) {
        let Some(e) = self.sessions.get_mut(&id) else {
            return;
        };
        let mut close = None;
        let mut immediate = 0;
        loop {
            match e.rtc.poll_output() {
                Ok(Output::Transmit(t)) => self.egress.push(&mut self.batch, &t),
                Ok(Output::Timeout(t)) => {
                    if t <= now && immediate < MAX_IMMEDIATE {
                        immediate += 1;
                        if e.rtc.handle_input(Input::Timeout(now)).is_err() {
                            close = Some(CloseReason::Error);
                            break;
                        }
                        continue;
                    }
                    if e.timeout != Some(t) {
                        e.timeout = Some(t);
                        self.timers.push(Reverse((t, id)));
                    }
                    break;
                }
                Ok(Output::Event(ev)) => match ev {
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        close = Some(CloseReason::ConsentTimeout);
                        break;
                    }
                    Event::IceConnectionStateChange(_) => {}
                    Event::Closed => {
                        close = Some(CloseReason::PeerClosed);
                        break;
                    }
                    ev => {
                        if matches!(ev, Event::Connected) {
                            e.connected = true;
                            let _g = e.span.enter();
                            tracing::info!(
                                setup_ms = now.duration_since(e.created).as_millis() as u64,
                                "connected"
                            );
                        }
                        let flow = e.handler.on_event(
                            &mut Ctx {
                                rtc: &mut e.rtc,
                                now,
                                id,
                            },
                            ev,
                        );
                        if flow == Flow::Close {
                            close = Some(CloseReason::Handler);
                            break;
                        }
                    }
                },
                Err(err) => {
                    let _g = e.span.enter();
                    tracing::debug!(error = %err, "rtc error");
                    close = Some(CloseReason::Error);
                    break;
                }
            }
        }
        if close.is_none() && !e.rtc.is_alive() {
            close = Some(CloseReason::PeerClosed);
        }
        self.egress.flush(&mut self.batch);
        if let Some(reason) = close {
            self.close(id, reason);
        }
    }

    fn close(&mut self, id: SessionId, reason: CloseReason) {
        let Some(mut e) = self.sessions.remove(&id) else {
            return;
        };
        e.rtc.disconnect();
        self.egress.routes.remove(&e.ufrag, &e.addrs);
        self.egress.routes.remove_meta(id);
        e.handler.on_close(reason);
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.load.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!(m::SESSIONS_CLOSED, "kind" => e.kind, "reason" => reason.as_str())
            .increment(1);
        metrics::gauge!(m::SESSIONS, "kind" => e.kind).decrement(1.0);
        let _g = e.span.enter();
        tracing::info!(
            reason = reason.as_str(),
            secs = e.created.elapsed().as_secs(),
            "session closed"
        );
    }

    fn close_all(&mut self, reason: CloseReason) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close(id, reason);
        }
    }
}

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
            gso: crate::egress::gso_allowed(),
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
            let shard = Shard {
                sessions: HashMap::new(),
                timers: BinaryHeap::new(),
                egress: egress.clone(),
                batch: Batch::default(),
                count: count.clone(),
                load: load.clone(),
                ids: Vec::new(),
            };
            tokio::spawn(
                shard
                    .run(cmd_rx, in_rx, wake.clone())
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

impl Routes {
    pub(crate) fn route_of(&self, ufrag: &str) -> Option<Route> {
        self.lookup_ufrag(ufrag)
    }
}
