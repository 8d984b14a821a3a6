//! The QUIC relay between nodes: wire format, the origin's server, and the
//! client ingest and edge use.
//!
//! One connection per node pair, ALPN `cascade-relay/2`. The connecting side
//! opens one bidirectional control stream and both sides prove they know the
//! cluster secret (HMAC challenge-response bound to the TLS session, the
//! connecting side first: `auth`). The server admits handshakes with caps
//! of their own, apart from authenticated links (`admit`). Then either side may
//! publish a stream to the other or subscribe to one of the other's streams;
//! each group of each track travels on its own unidirectional stream,
//! newest first, and a group a slow link cannot deliver in time is reset
//! rather than queued (`send`). The receiving side feeds a local publisher
//! (`recv`), so the registry above never knows a link is involved. The
//! link protocol itself (ids, subscriptions, retries) is a sans-IO core
//! (`link`) that the per-connection task (`session`) drives.

mod admit;
mod auth;
mod client;
mod link;
mod order;
mod recv;
mod select;
mod send;
mod server;
mod session;
pub mod tls;
pub mod wire;

use std::time::Duration;

pub use admit::Limits;
pub use auth::EXPORTER_LABEL;
pub use client::{Client, Options};
pub use server::Server;

/// The ALPN protocol name; its suffix is the wire version.
pub const ALPN: &[u8] = b"cascade-relay/2";
/// The previous version's ALPN: both ends still offer it, only to tell an
/// older node clearly to upgrade instead of failing in TLS.
pub const ALPN_V1: &[u8] = b"cascade-relay/1";

/// How long the streams of a lost link stay live by default, waiting for
/// the peer to reconnect and take them over: viewers then see a gap, not an
/// end. Long enough for a node to restart (`--relay-hold` sets it).
pub const LINK_GRACE: Duration = Duration::from_secs(15);

/// Deadline for the QUIC handshake plus the secret handshake, at the
/// connecting side.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// The same deadline at the accepting side, shorter: a stranger holds a
/// handshake slot at most this long. Four round trips plus a lost packet
/// or two fit even across continents.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Application error codes on connection close and stream reset/stop.
pub mod code {
    use quinn::VarInt;

    /// Normal close (node shutting down, client dropped).
    pub const CLOSED: VarInt = VarInt::from_u32(0);
    /// The peer did not prove it knows the cluster secret.
    pub const AUTH: VarInt = VarInt::from_u32(1);
    /// The peer broke the wire protocol.
    pub const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// The node refuses more connections.
    pub const BUSY: VarInt = VarInt::from_u32(3);
    /// The peer speaks another version of the relay protocol.
    pub const VERSION: VarInt = VarInt::from_u32(5);
    /// The link is dropped on purpose and will be back: keep its streams
    /// for the grace period as if it had been lost.
    pub const RECONNECT: VarInt = VarInt::from_u32(4);
    /// The link would close a loop of relay links (the reason names it).
    pub const LOOP: VarInt = VarInt::from_u32(6);
    /// Stream reset: a newer group superseded this one.
    pub const SUPERSEDED: VarInt = VarInt::from_u32(0x10);
    /// Stream stopped: the group names no live publication or subscription.
    pub const UNKNOWN: VarInt = VarInt::from_u32(0x11);
}

/// Aborts a spawned task when dropped, so a task tree follows its owner.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
