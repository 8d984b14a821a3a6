//! The sans-IO core of one RTMP connection: the handshake, the command flow
//! (connect, publish, refusals), the handshake, publish and idle deadlines
//! (a connection must publish within `publish_timeout` of its accept,
//! whatever it sends meanwhile), and the
//! publish state machine of [`publish`] (frames held until the catalog is
//! ready, go-live, the B-frame transcode and its fallback). [`super::conn`]
//! owns the socket, the timer, the registry and the ffmpeg child, and
//! drives a [`Session`] like str0m's `Rtc`:
//!
//! ```text
//! loop { while let Some(o) = poll_output() { write | publish | frame | spawn | close }
//!        select! { shutdown | superseded | transcoder event | sleep_until(poll_timeout()) | read }
//!        → handle_shutdown | handle_superseded | handle_transcoder | handle_timeout | handle_input/eof }
//! ```

mod publish;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_origin::catalog::Catalog;
use cascade_origin::frame::Frame;
use cascade_rtc::auth::{Action, Auth, Check, Denied};
use cascade_rtc::limit::AuthGate;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};

use super::chunk::Guard;
use super::media::Track;
use super::{parse_key, query_token, Error, APP, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use crate::metrics as m;
use crate::transcode::{self, Event, Policy, Settings};
use publish::Publishing;
pub(super) use publish::Transcode;

/// When an input is handled. Deadlines run on the monotonic clock; the
/// media timeline and the ingest stamp of frames on the wall clock (it is
/// compared across nodes), so the shell reads both.
#[derive(Clone, Copy, Debug)]
pub(super) struct Now {
    /// Monotonic time.
    pub(super) at: Instant,
    /// Microseconds since the UNIX epoch.
    pub(super) wall_us: u64,
}

impl Now {
    fn ms(self) -> u64 {
        self.wall_us / 1_000
    }
}

/// What the shell must do, in order.
#[derive(Debug)]
pub(super) enum Output {
    /// Bytes for the peer. During the handshake they are due by its
    /// deadline (`Some`); afterwards within [`super::WRITE_TIMEOUT`].
    Transmit {
        /// The bytes.
        bytes: Vec<u8>,
        /// The handshake deadline, while the handshake runs.
        handshake_deadline: Option<Instant>,
    },
    /// The catalog is ready: publish the stream into the registry.
    Publish {
        /// Stream name (validated).
        name: String,
        /// The first catalog.
        catalog: Catalog,
        /// True when the video is the transcoder's.
        transcoded: bool,
    },
    /// The live stream's catalog changed.
    Catalog(Catalog),
    /// A frame for a track of the live stream.
    Frame(Track, Frame),
    /// Ask the auth webhook whether this publish may go ahead; the answer
    /// goes to [`Session::handle_authorized`]. Nothing else is handled
    /// meanwhile (the publish deadline still runs).
    Authorize {
        /// Stream name (validated).
        stream: String,
        /// The token the client gave, if any.
        token: Option<String>,
    },
    /// Start a B-frame transcode of the video from its avcC; the answer
    /// goes to [`Session::handle_transcode`] before any other input.
    StartTranscode {
        /// How transcodes run.
        settings: Arc<Settings>,
        /// The H.264 sequence header.
        avcc: Bytes,
    },
    /// The connection is over: why it ended normally, or the error. Nothing
    /// follows it.
    Close(Result<&'static str, Error>),
}

enum Phase {
    Handshake {
        hs: Box<Handshake>,
        deadline: Instant,
        /// Bytes received so far: none means a probe ([`Error::ClosedEarly`]).
        received: usize,
    },
    Rtmp {
        session: Box<ServerSession>,
        /// Any wakeup restarts it, as a read timeout in the loop would.
        idle_at: Instant,
    },
    Closed,
}

/// One RTMP connection, from its first byte to its close.
pub(super) struct Session {
    /// Until a publish is accepted: the connection must have published by
    /// then (idle pings do not extend it).
    publish_by: Option<Instant>,
    tokens: Auth,
    bframes: Policy,
    phase: Phase,
    guard: Guard,
    /// Token given in the connect URL's query (`rtmp://h/live?token=T`).
    app_token: Option<String>,
    publish: Option<Publishing>,
    unknown_logged: bool,
    /// rml_rtmp results not handled yet: handling pauses while a
    /// transcoder starts, so that later frames see it.
    backlog: VecDeque<ServerSessionResult>,
    /// While a transcoder starts: the frames of the message that asked for
    /// it, and that message's time.
    starting: Option<(Vec<(Track, Frame)>, Now)>,
    /// The time of the last input: header waits (wall clock milliseconds)
    /// become deadlines from it.
    last: Now,
    outputs: VecDeque<Output>,
    /// The node's wrong-token limiter and this client's address.
    auth: Option<(AuthGate, IpAddr)>,
    /// While the auth webhook decides: the publish request's id, the
    /// stream name and whether a token was given. rml_rtmp results wait in
    /// `backlog` meanwhile.
    authorizing: Option<(u32, String, bool)>,
    /// Set by the node when it drains: new publishes are refused (ones
    /// already accepted run on until the drain ends).
    draining: Arc<AtomicBool>,
}

impl Session {
    /// A connection accepted at `now`, publishing with `token`, which must
    /// publish within `publish_timeout`.
    pub(super) fn new(
        now: Now,
        token: Arc<str>,
        bframes: Policy,
        publish_timeout: Duration,
    ) -> Self {
        Self {
            publish_by: Some(now.at + publish_timeout),
            tokens: Auth::new(Some(&token), None, None),
            bframes,
            phase: Phase::Handshake {
                hs: Box::new(Handshake::new(PeerType::Server)),
                deadline: now.at + HANDSHAKE_TIMEOUT,
                received: 0,
            },
            guard: Guard::new(),
            app_token: None,
            publish: None,
            unknown_logged: false,
            backlog: VecDeque::new(),
            starting: None,
            last: now,
            outputs: VecDeque::new(),
            auth: None,
            authorizing: None,
            draining: Arc::default(),
        }
    }

    /// Refuses new publishes while `flag` is set (the node drains).
    pub(super) fn set_draining(&mut self, flag: Arc<AtomicBool>) {
        self.draining = flag;
    }

    /// Counts wrong tokens of this connection against `ip` in `gate`, and
    /// refuses its publish while `ip` is banned (the ban is on the address:
    /// a right token is refused too).
    pub(super) fn set_auth(&mut self, gate: AuthGate, ip: IpAddr) {
        self.auth = Some((gate, ip));
    }

    /// Publishes are checked against `tokens` (publish token and signed
    /// tokens) instead of the token given to [`Self::new`].
    pub(super) fn set_tokens(&mut self, tokens: Auth) {
        self.tokens = tokens;
    }

    /// The next thing to do; drain it after every `handle_*`.
    pub(super) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Session::handle_timeout`] is due, if ever.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Handshake { deadline, .. } => {
                Some(self.publish_by.map_or(*deadline, |p| p.min(*deadline)))
            }
            Phase::Rtmp { idle_at, .. } => {
                let publish = self.publish.as_ref();
                let header = publish.and_then(|p| p.header_deadline(self.last));
                let stall = publish.and_then(Publishing::stall_deadline);
                Some(
                    [header, stall, self.publish_by]
                        .into_iter()
                        .flatten()
                        .fold(*idle_at, Instant::min),
                )
            }
            Phase::Closed => None,
        }
    }

    /// The publish's H.264 sequence header (avcC), for the ABR ladder.
    pub(super) fn h264_record(&self) -> Option<bytes::Bytes> {
        self.publish.as_ref().and_then(Publishing::h264_record)
    }

    /// True while a transcode runs: its events go to
    /// [`Session::handle_transcoder`]; otherwise the shell drops them.
    pub(super) fn transcoding(&self) -> bool {
        self.publish.as_ref().is_some_and(Publishing::transcoding)
    }

    /// Bytes from the peer.
    pub(super) fn handle_input(&mut self, now: Now, data: &[u8]) {
        self.wake(now);
        if data.is_empty() {
            return;
        }
        match &mut self.phase {
            Phase::Handshake { hs, received, .. } => {
                *received += data.len();
                match hs.process_bytes(data) {
                    Ok(HandshakeProcessResult::InProgress { response_bytes }) => {
                        self.transmit(response_bytes);
                    }
                    Ok(HandshakeProcessResult::Completed {
                        response_bytes,
                        remaining_bytes,
                    }) => {
                        self.transmit(response_bytes);
                        self.start_rtmp(now, &remaining_bytes);
                    }
                    Err(e) => self.close(Err(Error::Handshake(e.to_string()))),
                }
            }
            Phase::Rtmp { session, .. } => {
                if let Err(e) = self.guard.feed(data) {
                    return self.close(Err(e.into()));
                }
                match session.handle_input(data) {
                    Ok(results) => {
                        self.backlog.extend(results);
                        self.process(now);
                    }
                    Err(e) => self.close(Err(Error::Session(e.to_string()))),
                }
            }
            Phase::Closed => {}
        }
    }

    /// The peer closed its side.
    pub(super) fn handle_eof(&mut self, now: Now) {
        self.wake(now);
        let end = match &self.phase {
            Phase::Handshake { received: 0, .. } => Err(Error::ClosedEarly),
            Phase::Handshake { .. } => Err(Error::Handshake("closed during handshake".into())),
            Phase::Rtmp { .. } => Ok("closed by peer"),
            Phase::Closed => return,
        };
        self.close(end);
    }

    /// The deadline of [`Session::poll_timeout`] passed.
    pub(super) fn handle_timeout(&mut self, now: Now) {
        let publish = self.publish.as_ref();
        let header_due = publish
            .and_then(|p| p.header_deadline(self.last))
            .is_some_and(|d| d <= now.at);
        let stall_due = publish
            .and_then(Publishing::stall_deadline)
            .is_some_and(|d| d <= now.at);
        match &self.phase {
            Phase::Handshake { deadline, .. } if *deadline <= now.at => {
                return self.close(Err(Error::HandshakeTimeout));
            }
            _ if self.publish_by.is_some_and(|p| p <= now.at) => {
                return self.close(Err(Error::PublishTimeout));
            }
            // Other wakeups come first and restart the idle clock.
            Phase::Rtmp { idle_at, .. } if *idle_at <= now.at && !header_due && !stall_due => {
                return self.close(Err(Error::Idle));
            }
            _ => {}
        }
        self.wake(now);
        let Some(p) = &mut self.publish else {
            return;
        };
        if header_due {
            p.go_live(now, &mut self.outputs);
        }
        if stall_due {
            p.fall_back(now, transcode::Error::Stalled, &mut self.outputs);
        }
    }

    /// One event of the running transcode's output (the shell turns the
    /// end of its channel into [`Event::Ended`]).
    pub(super) fn handle_transcoder(&mut self, now: Now, ev: Event) {
        self.wake(now);
        if self.is_closed() || self.starting.is_some() {
            return;
        }
        if let Some(p) = &mut self.publish {
            p.transcoded(now, ev, &mut self.outputs);
        }
    }

    /// The answer to [`Output::StartTranscode`]; handling resumes where it
    /// paused.
    pub(super) fn handle_transcode(
        &mut self,
        started: Result<Box<dyn Transcode>, transcode::Error>,
    ) {
        let Some((out, now)) = self.starting.take() else {
            return;
        };
        if self.is_closed() {
            return;
        }
        if let Some(p) = &mut self.publish {
            p.transcode_started(now, started, out, &mut self.outputs);
        }
        self.process(now);
    }

    /// The auth webhook's answer to [`Output::Authorize`]; handling resumes
    /// where it paused.
    pub(super) fn handle_authorized(&mut self, now: Now, decided: Result<(), Denied>) {
        let Some((id, name, token_given)) = self.authorizing.take() else {
            return;
        };
        if self.is_closed() {
            return;
        }
        self.wake(now);
        match decided {
            Ok(()) => self.admit_publish(id, name),
            Err(Denied::Refused(reason)) => {
                if let Some((gate, ip)) = &self.auth {
                    gate.failed("rtmp", token_given, *ip, now.at);
                }
                tracing::info!(
                    token_given,
                    reason,
                    "rtmp publish refused by the auth webhook"
                );
                self.refuse(
                    id,
                    "NetStream.Publish.Unauthorized",
                    "publish not allowed (key: {stream}?token=TOKEN)",
                    "token",
                );
            }
            Err(Denied::Busy) => self.refuse(
                id,
                "NetStream.Publish.Unauthorized",
                "authorization service busy, retry later",
                "auth_busy",
            ),
        }
        self.process(now);
    }

    /// The node shuts down.
    pub(super) fn handle_shutdown(&mut self) {
        self.close(Ok("shutdown"));
    }

    /// A newer publisher took the stream over.
    pub(super) fn handle_superseded(&mut self) {
        self.close(Ok("taken over by a new publisher"));
    }

    fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Notes the time of an input; after the handshake every wakeup
    /// restarts the idle clock.
    fn wake(&mut self, now: Now) {
        self.last = now;
        if let Phase::Rtmp { idle_at, .. } = &mut self.phase {
            *idle_at = now.at + IDLE_TIMEOUT;
        }
    }

    fn close(&mut self, end: Result<&'static str, Error>) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed;
        self.backlog.clear();
        self.starting = None;
        self.authorizing = None;
        self.outputs.push_back(Output::Close(end));
    }

    fn transmit(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let handshake_deadline = match &self.phase {
            Phase::Handshake { deadline, .. } => Some(*deadline),
            _ => None,
        };
        self.outputs.push_back(Output::Transmit {
            bytes,
            handshake_deadline,
        });
    }

    /// The handshake is done: the RTMP session starts with what followed it.
    fn start_rtmp(&mut self, now: Now, rest: &[u8]) {
        match ServerSession::new(ServerSessionConfig::new()) {
            Ok((session, results)) => {
                self.phase = Phase::Rtmp {
                    session: Box::new(session),
                    idle_at: now.at + IDLE_TIMEOUT,
                };
                self.backlog.extend(results);
                self.process(now);
                self.handle_input(now, rest);
            }
            Err(e) => self.close(Err(Error::Session(e.to_string()))),
        }
    }

    fn rtmp(&mut self) -> Option<&mut ServerSession> {
        match &mut self.phase {
            Phase::Rtmp { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Handles rml_rtmp's results until none are left, the connection
    /// closes or a transcoder is starting.
    fn process(&mut self, now: Now) {
        while self.starting.is_none() && self.authorizing.is_none() && !self.is_closed() {
            let Some(r) = self.backlog.pop_front() else {
                return;
            };
            match r {
                ServerSessionResult::OutboundResponse(p) => self.transmit(p.bytes),
                ServerSessionResult::RaisedEvent(e) => self.event(now, e),
                ServerSessionResult::UnhandleableMessageReceived(p) => {
                    metrics::counter!(m::RTMP_UNKNOWN_MESSAGES).increment(1);
                    if !std::mem::replace(&mut self.unknown_logged, true) {
                        tracing::info!(
                            type_id = p.type_id,
                            "ignoring rtmp message of unknown type"
                        );
                    }
                }
            }
        }
    }

    /// Sends an error status for request `id`, then ends the connection.
    fn refuse(&mut self, id: u32, code: &str, text: &str, reason: &'static str) {
        let results = self
            .rtmp()
            .and_then(|s| s.reject_request(id, code, text).ok())
            .unwrap_or_default();
        for r in results {
            if let ServerSessionResult::OutboundResponse(p) = r {
                self.transmit(p.bytes);
            }
        }
        self.close(Err(Error::Refused(reason)));
    }

    fn accept(&mut self, id: u32) {
        let Some(session) = self.rtmp() else {
            return;
        };
        match session.accept_request(id) {
            Ok(results) => {
                for r in results {
                    if let ServerSessionResult::OutboundResponse(p) = r {
                        self.transmit(p.bytes);
                    }
                }
            }
            Err(e) => self.close(Err(Error::Session(e.to_string()))),
        }
    }

    fn event(&mut self, now: Now, e: ServerSessionEvent) {
        match e {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                let (app, query) = app_name.split_once('?').unwrap_or((&app_name, ""));
                if app.trim_end_matches('/') != APP {
                    tracing::info!(app, "rtmp connect refused: unknown application");
                    return self.refuse(
                        request_id,
                        "NetConnection.Connect.Rejected",
                        "unknown application: use /live",
                        "app",
                    );
                }
                self.app_token = query_token(query).map(str::to_string);
                self.accept(request_id);
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => self.publish_requested(request_id, &stream_key),
            ServerSessionEvent::PublishStreamFinished { .. } => self.close(Ok("unpublished")),
            ServerSessionEvent::PlayStreamRequested { request_id, .. } => {
                tracing::info!("rtmp play refused: ingest only");
                self.refuse(
                    request_id,
                    "NetStream.Play.Failed",
                    "playback over RTMP is not offered: use WHEP",
                    "play",
                );
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => self.media(now, (Track::Video, timestamp.value, data)),
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => self.media(now, (Track::Audio, timestamp.value, data)),
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                tracing::debug!(?metadata, "rtmp metadata");
            }
            // Not the event itself: releaseStream/FCPublish carry the stream
            // key, token included, and tokens are never logged.
            ServerSessionEvent::UnhandleableAmf0Command { command_name, .. } => {
                tracing::trace!(command = %command_name, "rtmp command ignored");
            }
            _ => tracing::trace!("rtmp event ignored"),
        }
    }

    fn publish_requested(&mut self, id: u32, key: &str) {
        if self.publish.is_some() {
            return self.refuse(
                id,
                "NetStream.Publish.BadName",
                "this connection is already publishing",
                "protocol",
            );
        }
        if self.draining.load(Ordering::Relaxed) {
            tracing::info!("rtmp publish refused: this node is draining");
            return self.refuse(
                id,
                "NetStream.Publish.Rejected",
                "this server is draining (shutting down): publish to another ingest",
                "draining",
            );
        }
        let (name, token) = parse_key(key);
        let token = token.or(self.app_token.as_deref());
        let at = self.last.at;
        if let Some((gate, ip)) = &self.auth {
            if gate.admit("rtmp", *ip, at).is_err() {
                return self.refuse(
                    id,
                    "NetStream.Publish.Unauthorized",
                    "too many wrong tokens from this address, retry in a minute",
                    "rate_limited",
                );
            }
        }
        // Never log the token, only whether one came.
        let unix = self.last.wall_us / 1_000_000;
        match self.tokens.check(Action::Publish, name, token, unix) {
            Check::Allow => {}
            Check::Refuse(why) => {
                if let Some((gate, ip)) = &self.auth {
                    gate.failed("rtmp", token.is_some(), *ip, at);
                }
                tracing::info!(
                    token_given = token.is_some(),
                    reason = why.label(),
                    "rtmp publish refused: missing or wrong token"
                );
                return self.refuse(
                    id,
                    "NetStream.Publish.Unauthorized",
                    "publish token missing or wrong (key: {stream}?token=TOKEN)",
                    "token",
                );
            }
            // The webhook is not asked about names no stream can have.
            Check::Ask if cascade_origin::valid_stream_name(name) => {
                self.authorizing = Some((id, name.to_string(), token.is_some()));
                self.outputs.push_back(Output::Authorize {
                    stream: name.to_string(),
                    token: token.map(str::to_string),
                });
                return;
            }
            Check::Ask => {}
        }
        self.admit_publish(id, name.to_string());
    }

    /// A publish the token rules or the webhook allowed: check the name,
    /// accept, wait for the sequence headers.
    fn admit_publish(&mut self, id: u32, name: String) {
        if !cascade_origin::valid_stream_name(&name) {
            tracing::info!("rtmp publish refused: bad stream name");
            return self.refuse(
                id,
                "NetStream.Publish.BadName",
                cascade_origin::BAD_STREAM_NAME,
                "name",
            );
        }
        tracing::Span::current().record("stream", name.as_str());
        self.accept(id);
        if self.is_closed() {
            return;
        }
        // Authorised: no publish deadline, and media may be large now.
        self.publish_by = None;
        self.guard.authorise();
        tracing::info!("rtmp publish accepted, waiting for sequence headers");
        self.publish = Some(Publishing::new(name));
    }

    fn media(&mut self, now: Now, msg: (Track, u32, Bytes)) {
        let Some(p) = &mut self.publish else {
            return;
        };
        if let Some(out) = p.media(now, msg, &self.bframes, &mut self.outputs) {
            self.starting = Some((out, now));
        }
    }
}

#[cfg(test)]
mod tests;
