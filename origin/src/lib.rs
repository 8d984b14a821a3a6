//! cascade's relay: the data model every role shares, the stream registry
//! that fans frames out, and the QUIC relay that links nodes.
//!
//! Despite its name, this crate is not only the origin role: it is the
//! shared data model, registry and relay that every role links. Ingest
//! publishes into a [`Registry`] and uplinks it with a [`relay::Client`];
//! the origin serves its registry with a [`relay::Server`]; an edge fetches
//! through a client into its own registry and fans out from there. The
//! origin role is this crate alone, the other roles add their protocols.
//!
//! - [`model`]: stream → catalog → track → group → frame. A
//!   [`model::track::Producer`] writes frames; any number of
//!   [`model::track::Consumer`]s read them, each with its own cursor, starting
//!   at the current group's keyframe (the group cache). A consumer that falls
//!   behind skips to the next keyframe instead of queueing.
//! - [`registry::Registry`]: the streams of one node by name; publishing,
//!   takeover by a new publisher, subscribing (locally or on demand from an
//!   upstream node), keyframe requests travelling back to the publisher.
//! - [`relay`]: the QUIC wire protocol (one uni stream per group, newest
//!   first), the origin's server and the client that ingest and edge use.
//!
//! What this crate does not do: parse or packetize media, speak WebRTC or
//! RTMP. Frames are opaque access units with timestamps.
#![warn(missing_docs)]

pub mod cluster;
mod error;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod relay;

pub use error::{Error, ProtocolError, Result};
pub use model::{catalog, frame, track};
pub use registry::Registry;

/// What every entry point (WHIP, WHEP, WebSocket, RTMP, the HTML pages, the
/// registry) says when [`valid_stream_name`] refuses a name: one text, so
/// the rule is stated the same way everywhere.
pub const BAD_STREAM_NAME: &str = "bad stream name: use 1-64 characters of A-Z a-z 0-9 _ -";

/// Checks a stream name against INTERFACE.md: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_stream_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Microseconds since the UNIX epoch now: the ingest wall clock stamped on
/// every frame so latency can be measured end to end across nodes.
pub fn wallclock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        assert!(valid_stream_name("a"));
        assert!(valid_stream_name("Cam_1-x"));
        assert!(valid_stream_name(&"a".repeat(64)));
        assert!(!valid_stream_name(""));
        assert!(!valid_stream_name(&"a".repeat(65)));
        assert!(!valid_stream_name("a/b"));
        assert!(!valid_stream_name("a b"));
        assert!(!valid_stream_name("é"));
    }
}
