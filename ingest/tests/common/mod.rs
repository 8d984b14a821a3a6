//! Shared harness of the ingest integration tests. Each submodule serves one
//! concern; test files take what they need (hence `dead_code` allowed).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod media;
pub mod rtmp;
