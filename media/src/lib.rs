//! Media helpers shared by cascade's roles (ingest, edge, rtc, loadtest):
//! one home for code that was copied between them.
//!
//! What belongs here: codec bitstream helpers (Annex-B NAL splitting, NAL
//! unit types) and the small text formats the roles read (SDP m-line and
//! fmtp scanning), plus the constant-time token comparison every HTTP/RTMP
//! entry point uses. Everything is pure functions over bytes and strings:
//! no I/O, no clock, no async runtime, no dependencies, so any crate
//! (including loadtest, which does not link the server) can use it.
//!
//! What does not: negotiation policy (edge's codec choice stays in edge),
//! protocol state machines, and the data model (stream names, catalog,
//! frames live in `cascade-origin`).

pub mod annexb;
pub mod nal;
pub mod sdp;
pub mod token;
