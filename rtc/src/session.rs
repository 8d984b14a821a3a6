//! What a session is to a shard: an `Rtc` plus a [`Handler`] that gives it
//! meaning (publisher or viewer), and the handle signalling uses to reach it.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use str0m::{Event, Rtc};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::shard::Command;
use crate::{Error, Result};

/// A session's identity; also the last path segment of its WHIP/WHEP
/// resource URL, so it is random and unguessable (128 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Parses the 32-hex-digit form.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What the shard does after a handler call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep the session.
    Continue,
    /// Keep the session; `on_wake` wrote nothing, so the shard skips polling it.
    /// A shard serves the viewers of many streams and every frame of any of them
    /// wakes the whole shard: without this, each wake polled every session (str0m's
    /// timeout handling included) whether it had media or not.
    Idle,
    /// End the session (the handler decided: e.g. the stream ended).
    Close,
}

/// Why a session ended, for logs and metrics (bounded label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Signalling `DELETE`.
    Delete,
    /// DTLS close_notify / RTCP BYE from the peer.
    PeerClosed,
    /// No packet from the peer for the consent-freshness window.
    ConsentTimeout,
    /// ICE/DTLS did not complete in time.
    ConnectTimeout,
    /// The handler ended it (stream over, superseded publisher...).
    Handler,
    /// str0m reported an error for the peer's input.
    Error,
    /// The node is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::PeerClosed => "peer_closed",
            Self::ConsentTimeout => "consent_timeout",
            Self::ConnectTimeout => "connect_timeout",
            Self::Handler => "handler",
            Self::Error => "error",
            Self::Shutdown => "shutdown",
        }
    }
}

/// What a handler may touch during a call.
pub struct Ctx<'a> {
    /// The session's str0m instance.
    pub rtc: &'a mut Rtc,
    /// The time of this call (the shard's clock; never read the clock yourself).
    pub now: Instant,
    /// The session's id.
    pub id: SessionId,
}

/// The meaning of a session. Called only from its shard; all calls for one
/// session are sequential. After every call the shard drains `Rtc` output.
pub trait Handler: Send + 'static {
    /// A str0m event. ICE/DTLS lifecycle (`IceConnectionStateChange`,
    /// `Closed`) is handled by the shard; the handler still sees `Connected`.
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) -> Flow;

    /// The shard was woken through this session's [`Waker`] (or a shard
    /// neighbour's): write whatever is pending.
    fn on_wake(&mut self, _ctx: &mut Ctx<'_>) -> Flow {
        Flow::Continue
    }

    /// The session ended; release what it holds.
    fn on_close(&mut self, _reason: CloseReason) {}
}

/// Wakes a shard so its handlers' `on_wake` runs (media arrived, a keyframe
/// was requested). Coalescing: many wakes before the shard runs are one.
#[derive(Clone)]
pub struct Waker(pub(crate) Arc<Notify>);

impl Waker {
    /// Schedules `on_wake` for the sessions of this shard.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    /// True when both wake the same shard: lets a fan-out that serves many
    /// sessions wake each shard once per frame instead of once per session.
    pub fn same_shard(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Reaches a running session from signalling (PATCH, DELETE).
#[derive(Clone)]
pub struct SessionHandle {
    pub(crate) id: SessionId,
    pub(crate) tx: mpsc::Sender<Command>,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Ends the session (signalling DELETE).
    pub async fn close(&self) -> Result<()> {
        self.tx
            .send(Command::Close(self.id))
            .await
            .map_err(|_| Error::NoSession)
    }

    /// Adds a trickled remote candidate.
    pub async fn add_remote_candidate(&self, candidate: str0m::Candidate) -> Result<()> {
        self.tx
            .send(Command::RemoteCandidate(self.id, candidate))
            .await
            .map_err(|_| Error::NoSession)
    }

    /// Runs `f` on the session's `Rtc` inside its shard (e.g. an ICE restart
    /// offer/answer) and returns its result.
    pub async fn with_rtc<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Rtc) -> T + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let call: Box<dyn FnOnce(&mut Rtc) + Send> = Box::new(move |rtc| {
            let _ = reply.send(f(rtc));
        });
        self.tx
            .send(Command::Call(self.id, call))
            .await
            .map_err(|_| Error::NoSession)?;
        rx.await.map_err(|_| Error::NoSession)
    }
}
