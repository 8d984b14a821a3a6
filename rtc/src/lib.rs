//! WebRTC sessions for cascade: str0m `Rtc` instances driven sans-IO inside a
//! few worker shards (one per core) behind one UDP port and a passive ICE-TCP
//! listener, shared by WHIP publishers and WHEP viewers.
//!
//! How it is driven:
//! - [`Server::bind`] ([`server`]) opens the UDP socket (and the TCP listener),
//!   starts the receive loop ([`mux`]) and the shards ([`shard`]).
//! - A signalling layer (WHIP in ingest, WHEP in edge) builds an `Rtc` with
//!   [`Server::rtc_builder`], negotiates, then hands it to [`Server::add`] with
//!   a [`Handler`] that reacts to str0m events and writes media when woken.
//! - [`http`] holds the WHIP/WHEP resource protocol common to both (POST,
//!   PATCH, DELETE, OPTIONS, CORS) and the one place where INTERFACE.md's
//!   status table becomes HTTP ([`http::ApiError`]).
//!
//! What this crate does not do: decide what media a session sends or how it
//! depacketizes what it receives; that is the handler's job.
#![warn(missing_docs)]

pub mod auth;
pub mod bwe;
mod egress;
pub mod http;
pub mod ice;
pub mod limit;
pub mod metrics;
pub mod mux;
pub mod sdpfrag;
pub mod server;
pub mod session;
pub mod shard;
pub mod stun;
pub mod webhook;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use server::{Reservation, Server};
pub use session::{Ctx, Flow, Handler, SessionHandle, SessionId, Waker};

/// Errors of the WebRTC session layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Socket set-up failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// str0m refused an operation (bad SDP, bad state).
    #[error("webrtc: {0}")]
    Rtc(#[from] str0m::RtcError),
    /// The session no longer exists.
    #[error("no such session")]
    NoSession,
    /// The node is at its session limit or draining.
    #[error("node full")]
    Full,
    /// The client's address holds as many sessions as it may.
    #[error("too many sessions from one address")]
    TooManyFromAddress,
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the WebRTC layer of a node needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// The one UDP port for all media.
    pub udp: SocketAddr,
    /// Passive ICE-TCP listener (RFC 4571 framing), if any.
    pub tcp: Option<SocketAddr>,
    /// Addresses put into ICE candidates; empty = every up interface address.
    pub advertise: Vec<IpAddr>,
    /// Worker shards; 0 = one per core.
    pub shards: usize,
    /// Sessions (publishers + viewers) past which new viewers get 503;
    /// publishers are only refused by their own pool ([`Limits::max_publishers`]).
    pub max_sessions: usize,
    /// STUN/TURN servers offered to clients (`Link: rel="ice-server"`).
    pub ice: ice::IceServers,
    /// Send a drain's equal-size datagrams to one peer in one `sendmsg` (UDP GSO) where
    /// the kernel offers it. Off sends one datagram per call: A/B benchmarks, or a NIC
    /// whose driver mishandles UDP GSO without failing the send.
    pub gso: bool,
    /// Limits that hold under abuse.
    pub limits: Limits,
}

/// Limits of the WebRTC layer that hold under abuse (each a flag of the node).
#[derive(Clone, Debug)]
pub struct Limits {
    /// ICE-TCP connections per source IP (0 = no cap besides the node's 4096).
    pub tcp_per_ip: usize,
    /// An ICE-TCP connection that sends no frame this long is closed. Viewers
    /// send RTCP every second and consent checks every few seconds.
    pub tcp_idle: Duration,
    /// Remote ICE candidates one session accepts in its lifetime, over PATCH
    /// and the WebSocket together; more are ignored (and counted).
    pub max_remote_candidates: usize,
    /// WHIP publishers at once: a pool of their own, so viewers (refused
    /// at `max_sessions`) can never keep them out (0 = no cap).
    pub max_publishers: usize,
    /// WHIP, WHEP and WebSocket sessions per client IP, negotiations in
    /// progress included (0 = no cap).
    pub sessions_per_ip: usize,
    /// Test hook for the supervision tests: every shard panics when asked to
    /// add a session after this many. Never set outside tests.
    #[doc(hidden)]
    pub panic_shard_after: Option<usize>,
    /// Wrong tokens per source IP before 429, shared with every protocol
    /// of the node (the node passes the same gate to RTMP).
    pub auth: limit::AuthGate,
}

/// Default [`Limits::tcp_per_ip`].
pub const DEFAULT_TCP_PER_IP: usize = 16;
/// Default [`Limits::tcp_idle`].
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(30);
/// Default [`Limits::max_publishers`].
pub const DEFAULT_MAX_PUBLISHERS: usize = 1000;
/// Default [`Limits::sessions_per_ip`].
pub const DEFAULT_SESSIONS_PER_IP: usize = 64;
/// Default [`Limits::max_remote_candidates`].
pub const DEFAULT_MAX_REMOTE_CANDIDATES: usize = 32;

impl Default for Limits {
    fn default() -> Self {
        Self {
            tcp_per_ip: DEFAULT_TCP_PER_IP,
            tcp_idle: DEFAULT_TCP_IDLE,
            max_remote_candidates: DEFAULT_MAX_REMOTE_CANDIDATES,
            max_publishers: DEFAULT_MAX_PUBLISHERS,
            sessions_per_ip: DEFAULT_SESSIONS_PER_IP,
            panic_shard_after: None,
            auth: limit::AuthGate::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            udp: SocketAddr::from(([0, 0, 0, 0], 8189)),
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 8189))),
            advertise: Vec::new(),
            shards: 0,
            max_sessions: 10_000,
            ice: ice::IceServers::default(),
            gso: true,
            limits: Limits::default(),
        }
    }
}

/// Every address of an up interface, non-loopback first, skipping IPv6
/// link-local (browsers cannot use them without a scope id).
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_unspecified(),
            IpAddr::V6(v6) => !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    addrs.sort_by_key(|ip| (ip.is_loopback(), ip.is_ipv6()));
    addrs.dedup();
    addrs
}
