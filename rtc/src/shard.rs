//! Worker shards: each owns many sessions, a timer heap and a `Sink` on the
//! shared UDP socket; the [`Server`] spreads new sessions over them.
//!
//! `Shard` is the sans-IO core: every input carries its `now` (a command, a
//! datagram, a wake, the timers, housekeeping), datagrams leave through the
//! sink and `Shard::poll_timeout` says when to call back. After every input
//! the touched session is drained (`poll_output` until a future `Timeout`).
//!
//! `run` is the shell, one tokio task per shard:
//! `select! { commands, wake (media ready), datagrams (batch), earliest timer,
//! housekeeping }`, then the sink's counters are published.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::net::{Protocol, Receive, Transmit};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::{mpsc, Notify};

use crate::metrics as m;
use crate::mux::{Datagram, Route, Routes};
use crate::session::{CloseReason, Ctx, Flow, Handler, SessionId};
use crate::stun;

#[doc(no_inline)]
pub use crate::server::{new_etag, Server};

/// Datagrams handled per wake-up before other branches get a turn.
const INBOX_BATCH: usize = 64;
/// ICE + DTLS must complete within this after the answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A connected peer silent this long is gone. Viewers send RTCP every second
/// and consent checks every ~5 s (RFC 7675), publishers send media
/// continuously, so 10 s of silence is a vanished peer, found 20 s sooner
/// than by the 30 s consent expiry.
const CONSENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the shell runs [`Shard::handle_housekeeping`] (the connect and
/// consent deadlines are checked there, not on the timer heap).
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Immediate re-polls per drain (str0m asks for `Timeout(now)` after writes).
const MAX_IMMEDIATE: usize = 64;
/// A deadline this close after `now` counts as due within a drain. str0m's
/// pacer (on for sessions with bandwidth estimation, `crate::bwe`) asks for a
/// timeout 1 µs ahead after every packet it releases; taken literally, each
/// packet of a frame became its own timer-heap entry, drain and `sendmsg`
/// (1.0 datagrams per drain instead of 9.5 at 2.5 Mbit/s, ~300 wakes/s per
/// viewer; with this slack 8.9 and ~19, `edge/tests/abr_link.rs`). The session
/// is then fed that deadline — or `now` if it has passed — never an earlier
/// time than before (see `Entry::clock`).
const NEAR_DUE: Duration = Duration::from_micros(100);
/// Source addresses (paths) a session keeps routed: a browser uses one or
/// two, a few more through network changes. A new verified path past it
/// replaces the oldest, so the routing table holds at most this many
/// entries per session.
pub(crate) const MAX_PATHS: usize = 8;

/// Where a shard's datagrams go. Generic rather than `dyn`: `push` runs once
/// per outgoing packet and must stay a static, inlinable call.
pub(crate) trait Sink {
    /// Queues one str0m transmit.
    fn push(&mut self, t: &Transmit);
    /// Sends what is queued; called when a drain ends so a session's packets
    /// to one peer leave together (GSO).
    fn flush(&mut self);
    /// Reports what was sent since the last call; once per shell loop turn.
    fn publish(&mut self);
}

pub(crate) enum Command {
    Add(Box<NewSession>),
    Close(SessionId),
    RemoteCandidate(SessionId, Candidate),
    Call(SessionId, Box<dyn FnOnce(&mut Rtc) + Send>),
    Shutdown,
}

pub(crate) struct NewSession {
    pub(crate) id: SessionId,
    pub(crate) rtc: Rtc,
    pub(crate) handler: Box<dyn Handler>,
    pub(crate) ufrag: String,
    pub(crate) kind: &'static str,
    pub(crate) span: tracing::Span,
}

struct Entry {
    rtc: Rtc,
    handler: Box<dyn Handler>,
    ufrag: String,
    /// Our local ICE password: binding requests from a new path must carry
    /// its MESSAGE-INTEGRITY before the path is routed.
    pass: String,
    /// Verified paths, oldest first (at most [`MAX_PATHS`]).
    addrs: Vec<(Protocol, SocketAddr)>,
    timeout: Option<Instant>,
    /// The latest time given to `rtc`: a near-due timeout ([`NEAR_DUE`]) may
    /// run it slightly ahead of the shard's clock, and str0m must never see
    /// time go back.
    clock: Instant,
    created: Instant,
    last_input: Instant,
    connected: bool,
    kind: &'static str,
    span: tracing::Span,
}

impl Entry {
    /// The time to give `rtc` for an input at `now`: never before the last.
    fn at(&mut self, now: Instant) -> Instant {
        self.clock = self.clock.max(now);
        self.clock
    }
}

/// The sans-IO core of one shard: its sessions and their timer heap.
pub(crate) struct Shard<S> {
    sessions: HashMap<SessionId, Entry>,
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    sink: S,
    /// The node's routing tables: closes and ICE restarts update them.
    routes: Arc<Routes>,
    /// Sessions on the node (admission), and on this shard (placement).
    count: Arc<AtomicUsize>,
    load: Arc<AtomicUsize>,
    /// Scratch list of session ids, reused so a wake allocates nothing.
    ids: Vec<SessionId>,
    /// Test hook ([`crate::Limits::panic_shard_after`]): panic when adding
    /// the session after this many.
    panic_after: Option<usize>,
    added: usize,
    /// This shard's index in the server (the `shard` of the routes it learns).
    index: usize,
}

/// The shard shell: runs `shard` until [`Command::Shutdown`] or the server is gone.
pub(crate) async fn run<S: Sink>(
    mut shard: Shard<S>,
    mut cmds: mpsc::Receiver<Command>,
    mut inbox: mpsc::Receiver<Datagram>,
    wake: Arc<Notify>,
) {
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = shard
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            cmd = cmds.recv() => match cmd {
                Some(Command::Shutdown) | None => {
                    shard.close_all(Instant::now(), CloseReason::Shutdown);
                    return;
                }
                Some(cmd) => shard.handle_command(Instant::now(), cmd),
            },
            // Media before the inbox: a wake means a frame is ready for
            // every viewer, while the inbox is mostly viewers' RTCP and
            // STUN. Under load the inbox is never empty, so with it first a
            // frame waited behind batch after batch of feedback.
            _ = wake.notified() => {
                shard.handle_wake(Instant::now());
                // Under load a pass lasts about a frame interval, so the next wake is
                // often ready when it ends and the inbox would only get the gaps: a
                // joining viewer's ICE and DTLS datagrams waited pass after pass, and
                // str0m's timers (DTLS retransmits, RTCP) behind both. One inbox batch
                // and the due timers after each pass bound that wait to a pass.
                inbox_batch(&mut shard, &mut inbox, None);
                shard.handle_timeout(Instant::now());
            }
            Some(d) = inbox.recv() => inbox_batch(&mut shard, &mut inbox, Some(d)),
            _ = tokio::time::sleep_until(next.into()) => shard.handle_timeout(Instant::now()),
            _ = housekeeping.tick() => shard.handle_housekeeping(Instant::now()),
        }
        shard.sink.publish();
    }
}

/// Handles `first` and up to `INBOX_BATCH` datagrams in all that are already queued.
fn inbox_batch<S: Sink>(
    shard: &mut Shard<S>,
    inbox: &mut mpsc::Receiver<Datagram>,
    first: Option<Datagram>,
) {
    let mut budget = INBOX_BATCH;
    if let Some(d) = first {
        shard.handle_datagram(Instant::now(), d);
        budget -= 1;
    }
    for _ in 0..budget {
        match inbox.try_recv() {
            Ok(d) => shard.handle_datagram(Instant::now(), d),
            Err(_) => break,
        }
    }
}

impl<S: Sink> Shard<S> {
    pub(crate) fn new(
        sink: S,
        routes: Arc<Routes>,
        count: Arc<AtomicUsize>,
        load: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            sessions: HashMap::new(),
            timers: BinaryHeap::new(),
            sink,
            routes,
            count,
            load,
            ids: Vec::new(),
            panic_after: None,
            added: 0,
            index: 0,
        }
    }

    /// Sets the shard's index (0 unless set).
    pub(crate) fn index(mut self, index: usize) -> Self {
        self.index = index;
        self
    }

    /// Sets the panic test hook (supervision tests only).
    pub(crate) fn panic_after(mut self, n: Option<usize>) -> Self {
        self.panic_after = n;
        self
    }

    /// The earliest session deadline (possibly a superseded one: waking for it
    /// early is harmless, [`Shard::handle_timeout`] skips it).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// A signalling command. [`Command::Shutdown`] is the shell's to handle.
    pub(crate) fn handle_command(&mut self, now: Instant, cmd: Command) {
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
                let mut rtc = rtc;
                let pass = rtc.direct_api().local_ice_credentials().pass;
                self.sessions.insert(
                    id,
                    Entry {
                        rtc,
                        handler,
                        ufrag,
                        pass,
                        addrs: Vec::new(),
                        timeout: None,
                        clock: now,
                        created: now,
                        last_input: now,
                        connected: false,
                        kind,
                        span,
                    },
                );
                self.load.fetch_add(1, Ordering::Relaxed);
                // After the load count, as a real bug in a session would be.
                if self.panic_after.is_some_and(|n| self.added >= n) {
                    panic!("injected shard panic (Limits::panic_shard_after)");
                }
                self.added += 1;
                self.drain(id, now);
            }
            Command::Close(id) => self.close(id, now, CloseReason::Delete),
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
                    let creds = e.rtc.direct_api().local_ice_credentials();
                    e.pass = creds.pass;
                    let ufrag = creds.ufrag;
                    if ufrag != e.ufrag {
                        if let Some(route) = self.routes.lookup_ufrag(&e.ufrag) {
                            self.routes.add_ufrag(ufrag.clone(), route);
                        }
                        // Checks with the old ufrag fail str0m's integrity
                        // check now; its route would only leak.
                        self.routes.remove(&e.ufrag, &[]);
                        e.ufrag = ufrag;
                    }
                    self.drain(id, now);
                }
            }
            Command::Shutdown => {}
        }
    }

    /// A datagram the mux routed to one of this shard's sessions.
    pub(crate) fn handle_datagram(&mut self, now: Instant, d: Datagram) {
        let Some(e) = self.sessions.get_mut(&d.id) else {
            return;
        };
        let path = (d.proto, d.source);
        if !e.addrs.contains(&path) {
            // A new path: only a binding request signed with our password
            // proves the peer is there; anything else (a forged or replayed
            // check with a known ufrag, spoofed sources) is dropped before it
            // costs memory.
            if !stun::verified(&d.data, &e.pass) {
                metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "stun_integrity").increment(1);
                return;
            }
            if e.addrs.len() >= MAX_PATHS {
                let oldest = e.addrs.remove(0);
                self.routes.forget(&[oldest]);
            }
            e.addrs.push(path);
            let route = Route {
                shard: self.index,
                id: d.id,
            };
            self.routes.learn(d.proto, d.source, route);
            let _g = e.span.enter();
            tracing::debug!(proto = ?d.proto, "path learnt");
        }
        let Ok(recv) = Receive::new(d.proto, d.source, d.destination, &d.data) else {
            metrics::counter!(m::DATAGRAMS_DROPPED, "reason" => "unparsable").increment(1);
            return;
        };
        e.last_input = now;
        let at = e.at(now);
        if let Err(err) = e.rtc.handle_input(Input::Receive(at, recv)) {
            let _g = e.span.enter();
            tracing::debug!(error = %err, "peer input refused");
            drop(_g);
            self.close(d.id, now, CloseReason::Error);
            return;
        }
        self.drain(d.id, now);
    }

    /// The shard was woken: every handler may write what is pending.
    pub(crate) fn handle_wake(&mut self, now: Instant) {
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
                Flow::Close => self.close(id, now, CloseReason::Handler),
                // Nothing written: its timers are on the heap, nothing to poll.
                Flow::Idle => {}
                Flow::Continue => self.drain(id, now),
            }
        }
        self.ids = ids;
    }

    /// Runs every session whose deadline has passed, earliest first.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        while let Some(id) = self.pop_due(now) {
            let Some(e) = self.sessions.get_mut(&id) else {
                continue;
            };
            let at = e.at(now);
            if e.rtc.handle_input(Input::Timeout(at)).is_err() {
                self.close(id, now, CloseReason::Error);
                continue;
            }
            self.drain(id, now);
        }
    }

    /// The session with the earliest current deadline at or before `now`,
    /// taken off the heap.
    fn pop_due(&mut self, now: Instant) -> Option<SessionId> {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                return None;
            }
            self.timers.pop();
            // Lazy deletion: only the session's current deadline counts.
            if let Some(e) = self.sessions.get_mut(&id) {
                if e.timeout == Some(t) {
                    e.timeout = None;
                    return Some(id);
                }
            }
        }
        None
    }

    /// Closes sessions past the connect or consent deadline.
    pub(crate) fn handle_housekeeping(&mut self, now: Instant) {
        metrics::gauge!(m::ROUTED_ADDRESSES).set(self.routes.addresses() as f64);
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
            self.close(id, now, reason);
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
                Ok(Output::Transmit(t)) => self.sink.push(&t),
                Ok(Output::Timeout(t)) => {
                    if t <= now + NEAR_DUE && immediate < MAX_IMMEDIATE {
                        immediate += 1;
                        // An overdue deadline is fed as `now`, not as
                        // itself: str0m stamps what its pacer releases with
                        // the time it is given, and a shard that woke late
                        // then sent a whole probe cluster at once stamped
                        // as if spread over its 15 ms. Chromium saw them
                        // arrive together and str0m rejected the probe
                        // ("receive/send ratio" 2.4-63) or measured the
                        // link at what the late timer let out (1-1.9 Mbit/s
                        // on an unlimited link), tests/browser_abr.rs.
                        let at = e.at(t.max(now));
                        if e.rtc.handle_input(Input::Timeout(at)).is_err() {
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
        self.sink.flush();
        if let Some(reason) = close {
            self.close(id, now, reason);
        }
    }

    fn close(&mut self, id: SessionId, now: Instant, reason: CloseReason) {
        let Some(mut e) = self.sessions.remove(&id) else {
            return;
        };
        e.rtc.disconnect();
        self.routes.remove(&e.ufrag, &e.addrs);
        self.routes.remove_meta(id);
        e.handler.on_close(reason);
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.load.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!(m::SESSIONS_CLOSED, "kind" => e.kind, "reason" => reason.as_str())
            .increment(1);
        metrics::gauge!(m::SESSIONS, "kind" => e.kind).decrement(1.0);
        let _g = e.span.enter();
        tracing::info!(
            reason = reason.as_str(),
            secs = now.saturating_duration_since(e.created).as_secs(),
            "session closed"
        );
    }

    /// Closes every session (shutdown).
    pub(crate) fn close_all(&mut self, now: Instant, reason: CloseReason) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.close(id, now, reason);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The shard core on virtual time: real str0m sessions (ICE-lite, as
    //! [`Server::rtc_builder`] makes them) against full-ICE str0m clients, with
    //! the datagrams carried by hand through [`Routes`] (as the mux does) and
    //! an in-memory sink. No sockets, no sleeps.

    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder};
    use metrics::{SharedString, Unit};
    use str0m::change::SdpAnswer;
    use str0m::IceCreds;

    use super::*;
    use crate::mux::Route;

    const SERVER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8189);

    /// A datagram the shard sent: protocol, source, destination, bytes.
    type Packet = (Protocol, SocketAddr, SocketAddr, Vec<u8>);

    /// The in-memory sink: what a drain pushes counts as sent when it flushes.
    #[derive(Default)]
    struct Mem {
        queued: Vec<Packet>,
        sent: Vec<Packet>,
        flushes: usize,
    }

    impl Sink for Mem {
        fn push(&mut self, t: &Transmit) {
            self.queued
                .push((t.proto, t.source, t.destination, t.contents.to_vec()));
        }

        fn flush(&mut self) {
            self.flushes += 1;
            self.sent.append(&mut self.queued);
        }

        fn publish(&mut self) {}
    }

    /// What the handlers saw, shared with the test.
    #[derive(Default)]
    struct Log {
        stats: Vec<(SessionId, Instant)>,
        wakes: Vec<SessionId>,
        closed: Vec<(SessionId, CloseReason)>,
    }

    struct Probe {
        id: SessionId,
        log: Arc<Mutex<Log>>,
        wake: Flow,
    }

    impl Handler for Probe {
        fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) -> Flow {
            if let Event::PeerStats(_) = event {
                self.log.lock().unwrap().stats.push((ctx.id, ctx.now));
            }
            Flow::Continue
        }

        fn on_wake(&mut self, ctx: &mut Ctx<'_>) -> Flow {
            self.log.lock().unwrap().wakes.push(ctx.id);
            self.wake
        }

        fn on_close(&mut self, reason: CloseReason) {
            self.log.lock().unwrap().closed.push((self.id, reason));
        }
    }

    /// A browser stand-in: full ICE, controlling, offering a data channel.
    struct Client {
        rtc: Rtc,
        addr: SocketAddr,
        /// The server's answer, for a restart's answer with new credentials.
        answer: String,
        ice: Vec<IceConnectionState>,
    }

    struct Fixture {
        shard: Shard<Mem>,
        routes: Arc<Routes>,
        count: Arc<AtomicUsize>,
        load: Arc<AtomicUsize>,
        log: Arc<Mutex<Log>>,
    }

    impl Fixture {
        fn new() -> Self {
            let routes = Arc::new(Routes::default());
            let count = Arc::new(AtomicUsize::new(0));
            let load = Arc::new(AtomicUsize::new(0));
            Self {
                shard: Shard::new(Mem::default(), routes.clone(), count.clone(), load.clone()),
                routes,
                count,
                load,
                log: Arc::default(),
            }
        }

        /// Negotiates session `id` with a new client and hands it to the shard
        /// the way [`Server::add`] does (ufrag route, count, `Add`).
        fn add(&mut self, now: Instant, id: u128, wake: Flow, stats: Option<Duration>) -> Client {
            let id = SessionId(id);
            let port = 10_000 + u16::try_from(id.0).unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut client = Rtc::builder().build(now);
            client.add_local_candidate(Candidate::host(addr, "udp").unwrap());
            let mut api = client.sdp_api();
            api.add_channel("x".into());
            let (offer, pending) = api.apply().unwrap();
            let mut rtc = Rtc::builder()
                .set_ice_lite(true)
                .set_stats_interval(stats)
                .build(now);
            rtc.add_local_candidate(Candidate::host(SERVER, "udp").unwrap());
            let answer = rtc.sdp_api().accept_offer(offer).unwrap();
            let answer_text = answer.to_sdp_string();
            client.sdp_api().accept_answer(pending, answer).unwrap();
            let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
            self.routes.add_ufrag(ufrag.clone(), Route { shard: 0, id });
            self.count.fetch_add(1, Ordering::Relaxed);
            let handler = Box::new(Probe {
                id,
                log: self.log.clone(),
                wake,
            });
            self.shard.handle_command(
                now,
                Command::Add(Box::new(NewSession {
                    id,
                    rtc,
                    handler,
                    ufrag,
                    kind: "whep",
                    span: tracing::Span::none(),
                })),
            );
            Client {
                rtc: client,
                addr,
                answer: answer_text,
                ice: Vec::new(),
            }
        }

        /// A datagram from a client, routed as the mux routes it.
        fn receive(&mut self, now: Instant, t: &Transmit) {
            let Some((route, _)) = self.routes.route(t.proto, t.source, &t.contents) else {
                return;
            };
            let d = Datagram {
                id: route.id,
                proto: t.proto,
                source: t.source,
                destination: t.destination,
                data: t.contents.to_vec(),
            };
            self.shard.handle_datagram(now, d);
        }

        /// Carries datagrams both ways and runs every clock until `done` holds
        /// or `until` passes; returns the virtual time it stopped at.
        fn pump(
            &mut self,
            mut now: Instant,
            until: Instant,
            clients: &mut [&mut Client],
            done: impl Fn(&Self, &[&mut Client]) -> bool,
        ) -> Instant {
            for _ in 0..100_000 {
                let mut next = until;
                for c in clients.iter_mut() {
                    loop {
                        match c.rtc.poll_output().unwrap() {
                            Output::Transmit(t) => self.receive(now, &t),
                            Output::Timeout(t) => break next = next.min(t),
                            Output::Event(Event::IceConnectionStateChange(s)) => c.ice.push(s),
                            Output::Event(_) => {}
                        }
                    }
                }
                let sent = std::mem::take(&mut self.shard.sink.sent);
                let in_flight = !sent.is_empty();
                for (proto, source, destination, data) in sent {
                    if let Some(c) = clients.iter_mut().find(|c| c.addr == destination) {
                        let recv = Receive::new(proto, source, destination, &data).unwrap();
                        c.rtc.handle_input(Input::Receive(now, recv)).unwrap();
                    }
                }
                if done(self, clients) || now >= until {
                    return now;
                }
                if in_flight {
                    continue;
                }
                // Nothing in flight: on to the earliest deadline of any side.
                now = self
                    .shard
                    .poll_timeout()
                    .map_or(next, |t| t.min(next))
                    .max(now);
                for c in clients.iter_mut() {
                    c.rtc.handle_input(Input::Timeout(now)).unwrap();
                }
                self.shard.handle_timeout(now);
            }
            panic!("pump did not settle");
        }

        /// Runs the handshake of session `id`; returns when it connected.
        fn connect(&mut self, now: Instant, id: u128, client: &mut Client) -> Instant {
            let connected = |f: &Self, _: &[&mut Client]| f.connected(id);
            let at = self.pump(now, now + Duration::from_secs(5), &mut [client], connected);
            assert!(self.connected(id), "session {id} connects");
            at
        }

        fn connected(&self, id: u128) -> bool {
            self.shard
                .sessions
                .get(&SessionId(id))
                .is_some_and(|e| e.connected)
        }

        fn alive(&self, id: u128) -> bool {
            self.shard.sessions.contains_key(&SessionId(id))
        }

        fn closed(&self) -> Vec<(u128, CloseReason)> {
            let log = self.log.lock().unwrap();
            log.closed.iter().map(|(id, r)| (id.0, *r)).collect()
        }

        fn ufrag(&self, id: u128) -> String {
            self.shard.sessions[&SessionId(id)].ufrag.clone()
        }
    }

    /// Counters recorded while a test runs (`metrics::with_local_recorder`:
    /// per thread, so parallel tests do not mix).
    #[derive(Default)]
    struct Counts(Mutex<Vec<(Key, Arc<AtomicU64>)>>);

    struct Count(Arc<AtomicU64>);

    impl CounterFn for Count {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::Relaxed);
        }

        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::Relaxed);
        }
    }

    impl Recorder for Counts {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let mut all = self.0.lock().unwrap();
            let value = match all.iter().find(|(k, _)| k == key) {
                Some((_, v)) => v.clone(),
                None => {
                    let v = Arc::new(AtomicU64::new(0));
                    all.push((key.clone(), v.clone()));
                    v
                }
            };
            Counter::from_arc(Arc::new(Count(value)))
        }

        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    impl Counts {
        /// `cascade_rtc_sessions_closed_total{reason}`.
        fn closed(&self, reason: CloseReason) -> u64 {
            let all = self.0.lock().unwrap();
            all.iter()
                .filter(|(k, _)| k.name() == m::SESSIONS_CLOSED)
                .filter(|(k, _)| {
                    k.labels()
                        .any(|l| l.key() == "reason" && l.value() == reason.as_str())
                })
                .map(|(_, v)| v.load(Ordering::Relaxed))
                .sum()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn timers_fire_in_deadline_order_across_sessions() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        // Stats every 300, 100 and 200 ms from 0, 10 and 20 ms: the heap has to
        // interleave them, in neither insertion nor id order.
        let plan = [(1, 0, 300), (2, 10, 100), (3, 20, 200)];
        for (id, start, every) in plan {
            let at = t0 + start * MS;
            let mut c = f.add(at, id, Flow::Continue, Some(every * MS));
            assert_eq!(f.connect(at, id, &mut c), at, "connects without a timer");
        }
        f.log.lock().unwrap().stats.clear();
        let end = t0 + 1000 * MS;
        while let Some(t) = f.shard.poll_timeout().filter(|t| *t <= end) {
            f.shard.handle_timeout(t);
        }
        let mut want: Vec<(Duration, u128)> = plan
            .iter()
            .flat_map(|&(id, start, every)| {
                (1..)
                    .map(move |k| ((start + k * every) * MS, id))
                    .take_while(|(t, _)| *t <= 1000 * MS)
            })
            .collect();
        want.sort();
        let fired: Vec<(Duration, u128)> = {
            let log = f.log.lock().unwrap();
            log.stats.iter().map(|(id, t)| (*t - t0, id.0)).collect()
        };
        assert_eq!(fired, want, "every deadline met, at its time, in order");

        // Late (a long pass held the shard up): each due session runs once, the
        // earliest deadline first: 2 (1010 ms), 3 (1020 ms), 1 (1200 ms).
        f.log.lock().unwrap().stats.clear();
        let late = t0 + 2000 * MS;
        f.shard.handle_timeout(late);
        let fired: Vec<u128> = f.log.lock().unwrap().stats.iter().map(|s| s.0 .0).collect();
        assert_eq!(fired, [2, 3, 1]);
        assert!(f.shard.poll_timeout().is_some_and(|t| t > late), "re-armed");
        assert!(f.closed().is_empty());
    }

    #[test]
    fn superseded_deadlines_are_skipped() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        let mut c = f.add(t0, 1, Flow::Continue, Some(100 * MS));
        f.connect(t0, 1, &mut c);
        let first = f.shard.poll_timeout().unwrap();
        assert_eq!(first, t0 + 100 * MS);
        assert_eq!(f.shard.pop_due(first - MS), None, "not yet due");
        // The deadline moves (str0m re-armed it); the old heap entry stays behind.
        f.shard.sessions.get_mut(&SessionId(1)).unwrap().timeout = Some(first + 50 * MS);
        f.shard
            .timers
            .push(Reverse((first + 50 * MS, SessionId(1))));
        assert_eq!(f.shard.pop_due(first), None, "stale entry dropped");
        assert_eq!(f.shard.pop_due(first + 50 * MS), Some(SessionId(1)));
        assert_eq!(f.shard.pop_due(first + 50 * MS), None, "popped once");
    }

    #[test]
    fn drain_sends_a_sessions_output_in_one_flush() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        let mut c = f.add(t0, 1, Flow::Continue, None);
        assert_eq!(f.shard.sink.flushes, 1, "added: drained once");
        assert!(
            f.shard.poll_timeout().is_some(),
            "its deadline is on the heap"
        );
        assert_eq!(f.load.load(Ordering::Relaxed), 1);
        // The client's first check: the answer leaves in the drain of that datagram.
        let check = loop {
            match c.rtc.poll_output().unwrap() {
                Output::Transmit(t) => break t,
                Output::Timeout(t) => c.rtc.handle_input(Input::Timeout(t)).unwrap(),
                Output::Event(_) => {}
            }
        };
        f.receive(t0, &check);
        assert_eq!(f.shard.sink.flushes, 2);
        assert!(f.shard.sink.queued.is_empty(), "nothing left unsent");
        let sent = std::mem::take(&mut f.shard.sink.sent);
        assert!(!sent.is_empty());
        assert!(
            sent.iter().all(|p| (p.1, p.2) == (SERVER, c.addr)),
            "{sent:?}"
        );
        let mut c = c;
        f.connect(t0, 1, &mut c);
        assert!(f.connected(1));
        assert!(f.closed().is_empty());
    }

    #[test]
    fn wake_drains_only_handlers_that_wrote() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        let _a = f.add(t0, 1, Flow::Idle, None);
        let _b = f.add(t0, 2, Flow::Continue, None);
        let _c = f.add(t0, 3, Flow::Close, None);
        let flushes = f.shard.sink.flushes;
        f.shard.handle_wake(t0 + MS);
        let mut woken = f.log.lock().unwrap().wakes.clone();
        woken.sort();
        assert_eq!(woken, [SessionId(1), SessionId(2), SessionId(3)]);
        assert_eq!(f.shard.sink.flushes, flushes + 1, "only session 2 drained");
        assert_eq!(f.closed(), [(3, CloseReason::Handler)]);
        assert_eq!(f.count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn connect_timeout_closes_and_counts() {
        let counts = Counts::default();
        metrics::with_local_recorder(&counts, || {
            let t0 = Instant::now();
            let mut f = Fixture::new();
            let _a = f.add(t0, 1, Flow::Continue, None);
            let _b = f.add(t0 + Duration::from_secs(5), 2, Flow::Continue, None);
            let ufrag = f.ufrag(1);
            f.shard.handle_housekeeping(t0 + CONNECT_TIMEOUT);
            assert!(f.alive(1) && f.alive(2), "the limit itself is allowed");
            f.shard.handle_housekeeping(t0 + CONNECT_TIMEOUT + MS);
            assert!(!f.alive(1) && f.alive(2));
            assert_eq!(f.closed(), [(1, CloseReason::ConnectTimeout)]);
            assert_eq!(counts.closed(CloseReason::ConnectTimeout), 1);
            assert_eq!(f.count.load(Ordering::Relaxed), 1, "admission count");
            assert_eq!(f.load.load(Ordering::Relaxed), 1, "shard load");
            assert_eq!(f.routes.lookup_ufrag(&ufrag), None, "route gone");
            f.shard
                .handle_housekeeping(t0 + Duration::from_secs(5) + CONNECT_TIMEOUT + MS);
            assert!(!f.alive(2));
            assert_eq!(counts.closed(CloseReason::ConnectTimeout), 2);
            assert_eq!(f.count.load(Ordering::Relaxed), 0);
        });
    }

    #[test]
    fn consent_timeout_closes_a_silent_session() {
        let counts = Counts::default();
        metrics::with_local_recorder(&counts, || {
            let t0 = Instant::now();
            let mut f = Fixture::new();
            let mut c = f.add(t0, 1, Flow::Continue, None);
            let connected = f.connect(t0, 1, &mut c);
            // Connected long ago, but the peer keeps talking (consent checks): kept.
            let later = connected + Duration::from_secs(30);
            f.pump(connected, later, &mut [&mut c], |_, _| false);
            f.shard.handle_housekeeping(later);
            assert!(f.alive(1), "a talking peer is kept");
            // Then silence: closed once it exceeds the consent timeout.
            let last = f.shard.sessions[&SessionId(1)].last_input;
            assert!(last > connected + Duration::from_secs(20), "checks arrived");
            f.shard.handle_timeout(last + CONSENT_TIMEOUT);
            f.shard.handle_housekeeping(last + CONSENT_TIMEOUT);
            assert!(f.alive(1));
            f.shard.handle_housekeeping(last + CONSENT_TIMEOUT + MS);
            assert!(!f.alive(1));
            assert_eq!(f.closed(), [(1, CloseReason::ConsentTimeout)]);
            assert_eq!(counts.closed(CloseReason::ConsentTimeout), 1);
            assert_eq!(f.count.load(Ordering::Relaxed), 0);
        });
    }

    #[test]
    fn ice_restart_moves_the_route_to_the_new_ufrag() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        let mut c = f.add(t0, 1, Flow::Continue, None);
        let _other = f.add(t0, 2, Flow::Continue, None);
        let now = f.connect(t0, 1, &mut c);
        let old = f.ufrag(1);
        let route = Route {
            shard: 0,
            id: SessionId(1),
        };
        assert_eq!(f.routes.lookup_ufrag(&old), Some(route));

        // The client restarts; the server swaps credentials as a PATCH does (http.rs).
        let mut api = c.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api.apply().unwrap();
        let offer = offer.to_sdp_string();
        let remote = IceCreds {
            ufrag: attr(&offer, "a=ice-ufrag:"),
            pass: attr(&offer, "a=ice-pwd:"),
        };
        let local = IceCreds::new();
        let creds = local.clone();
        let restart = move |rtc: &mut Rtc| {
            let mut api = rtc.direct_api();
            api.set_local_ice_credentials(creds);
            api.set_remote_ice_credentials(remote);
        };
        f.shard
            .handle_command(now, Command::Call(SessionId(1), Box::new(restart)));
        assert_eq!(f.ufrag(1), local.ufrag);
        assert_eq!(
            f.routes.lookup_ufrag(&local.ufrag),
            Some(route),
            "new ufrag routed"
        );
        assert_eq!(f.routes.lookup_ufrag(&old), None, "old ufrag forgotten");
        let other = f.ufrag(2);
        assert!(f.routes.lookup_ufrag(&other).is_some(), "others untouched");

        // The client's checks carry the new ufrag and reach the session again.
        let answer = c
            .answer
            .replace(&attr(&c.answer, "a=ice-ufrag:"), &local.ufrag)
            .replace(&attr(&c.answer, "a=ice-pwd:"), &local.pass);
        let answer = SdpAnswer::from_sdp_string(&answer).unwrap();
        c.rtc.sdp_api().accept_answer(pending, answer).unwrap();
        c.ice.clear();
        let reconnected = |_: &Fixture, cs: &[&mut Client]| {
            cs[0].ice.iter().any(|s| {
                matches!(
                    s,
                    IceConnectionState::Connected | IceConnectionState::Completed
                )
            })
        };
        f.pump(
            now,
            now + Duration::from_secs(5),
            &mut [&mut c],
            reconnected,
        );
        assert!(reconnected(&f, &[&mut c]), "client reconnects: {:?}", c.ice);
        assert!(f.alive(1));
        assert!(f.closed().is_empty());
    }

    #[test]
    fn close_and_shutdown() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        let _a = f.add(t0, 1, Flow::Continue, None);
        let _b = f.add(t0, 2, Flow::Continue, None);
        let _c = f.add(t0, 3, Flow::Continue, None);
        let ufrag = f.ufrag(1);
        f.shard.handle_command(t0, Command::Close(SessionId(1)));
        f.shard.handle_command(t0, Command::Close(SessionId(1)));
        assert_eq!(f.closed(), [(1, CloseReason::Delete)], "closed once");
        assert_eq!(f.routes.lookup_ufrag(&ufrag), None);
        f.shard.close_all(t0, CloseReason::Shutdown);
        let mut closed = f.closed();
        closed.sort_by_key(|c| c.0);
        assert_eq!(
            closed,
            [
                (1, CloseReason::Delete),
                (2, CloseReason::Shutdown),
                (3, CloseReason::Shutdown)
            ]
        );
        assert_eq!(f.count.load(Ordering::Relaxed), 0);
        assert_eq!(f.load.load(Ordering::Relaxed), 0);
        assert!(f.shard.poll_timeout().is_some(), "stale entries may stay");
        f.shard
            .handle_timeout(t0 + Duration::from_secs(3600 * 24 * 365 * 20));
        assert_eq!(f.shard.poll_timeout(), None, "and are dropped when due");
    }

    /// A binding request to session `id` signed with `pass`, from `source`.
    fn check(f: &Fixture, id: u128, pass: &str, source: SocketAddr) -> Transmit {
        let data = crate::stun::tests::signed_request(&format!("{}:peer", f.ufrag(id)), pass);
        Transmit {
            proto: Protocol::Udp,
            source,
            destination: SERVER,
            contents: data.into(),
        }
    }

    fn from_port(port: u16) -> SocketAddr {
        SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port)
    }

    #[test]
    fn forged_checks_learn_no_address_and_leave_the_session_alone() {
        let counts = Counts::default();
        metrics::with_local_recorder(&counts, || {
            let t0 = Instant::now();
            let mut f = Fixture::new();
            let mut c = f.add(t0, 1, Flow::Continue, None);
            let now = f.connect(t0, 1, &mut c);
            let learnt = f.routes.addresses();
            assert_eq!(learnt, 1, "the client's verified path");
            // A known ufrag, the wrong password, a new source port each time.
            for port in 0..2_000u16 {
                let t = check(&f, 1, "not-the-password-at-all", from_port(10_000 + port));
                f.receive(now, &t);
            }
            assert_eq!(f.routes.addresses(), learnt, "nothing learnt");
            assert_eq!(f.shard.sessions[&SessionId(1)].addrs.len(), 1);
            assert!(f.shard.sink.sent.is_empty(), "no answer to a forgery");
            // The client still talks over its path.
            let later = now + Duration::from_secs(20);
            f.pump(now, later, &mut [&mut c], |_, _| false);
            f.shard.handle_housekeeping(later);
            assert!(f.alive(1) && f.closed().is_empty());
        });
    }

    #[test]
    fn verified_paths_are_bounded_per_session_and_forgotten_with_it() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        let _a = f.add(t0, 1, Flow::Continue, None);
        let _b = f.add(t0, 2, Flow::Continue, None);
        let pass = f.shard.sessions[&SessionId(1)].pass.clone();
        for port in 0..(MAX_PATHS as u16 * 4) {
            let t = check(&f, 1, &pass, from_port(20_000 + port));
            f.receive(t0, &t);
        }
        assert_eq!(f.routes.addresses(), MAX_PATHS, "oldest paths replaced");
        let newest = from_port(20_000 + MAX_PATHS as u16 * 4 - 1);
        assert!(f.routes.is_learnt(Protocol::Udp, newest));
        assert!(!f.routes.is_learnt(Protocol::Udp, from_port(20_000)));
        // Session 2's password does not open session 1's routes.
        let t = check(
            &f,
            1,
            &f.shard.sessions[&SessionId(2)].pass.clone(),
            from_port(9),
        );
        f.receive(t0, &t);
        assert!(!f.routes.is_learnt(Protocol::Udp, from_port(9)));
        f.shard.handle_command(t0, Command::Close(SessionId(1)));
        assert_eq!(f.routes.addresses(), 0, "forgotten with the session");
    }

    #[test]
    fn the_panic_hook_fires_on_the_nth_add() {
        let t0 = Instant::now();
        let mut f = Fixture::new();
        f.shard.panic_after = Some(1);
        let _a = f.add(t0, 1, Flow::Continue, None);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f.add(t0, 2, Flow::Continue, None);
        }));
        assert!(r.is_err());
    }

    fn attr(sdp: &str, name: &str) -> String {
        sdp.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {sdp}"))
            .to_string()
    }
}
