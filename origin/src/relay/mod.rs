//! The QUIC relay between nodes: wire format, the origin's server, and the
//! client ingest and edge use.
