//! The crate's errors: [`Error`] for every operation, and [`ProtocolError`]
//! for the ways a peer node (or, rarely, this one) breaks the relay protocol,
//! each naming what was wrong so the log line says what to fix.

/// Errors of the relay and registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream name is not 1–64 characters of `[A-Za-z0-9_-]`.
    #[error("{}", crate::BAD_STREAM_NAME)]
    BadStreamName,
    /// The stream has no publisher.
    #[error("stream is not live")]
    NotLive,
    /// The track or broadcast was closed by its producer.
    #[error("closed")]
    Closed,
    /// A peer node broke the relay protocol.
    #[error("relay protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The peer node did not present the cluster secret.
    #[error("relay authentication failed")]
    Auth,
    /// QUIC connection failure.
    #[error("quic: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// QUIC connect failure.
    #[error("quic connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// TLS set-up failure (certificate generation, configuration).
    #[error("tls: {0}")]
    Tls(String),
    /// The relay link to the upstream node is down or did not answer in time.
    #[error("relay link unavailable")]
    Unavailable,
    /// I/O failure (sockets, certificates).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// How the relay protocol was broken. Decoding errors blame the peer node
/// (the link is closed with the protocol error code); encoding errors
/// ([`ProtocolError::Encode`], a too large message of ours) blame this one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// `Hello` named a protocol version this node does not speak.
    #[error("peer speaks protocol version {theirs}, this node {ours}: upgrade the older node")]
    VersionMismatch {
        /// The version this node speaks.
        ours: u32,
        /// The version the peer announced.
        theirs: u32,
    },
    /// A control message of a type this node does not know (a newer peer?).
    #[error("unknown control message type {0:?}")]
    UnknownMessage(String),
    /// A control message that is not valid JSON of its type.
    #[error("malformed control message: {0}")]
    MalformedMessage(#[source] serde_json::Error),
    /// A control message of the wrong type at this point of the link.
    #[error("expected {expected}, got {got}")]
    UnexpectedMessage {
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A control message body over the cap.
    #[error("control message of {len} bytes, at most {max}")]
    MessageTooLarge {
        /// Announced or encoded body length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A protocol label (how a stream reached cascade) outside the rule of
    /// [`crate::relay::wire::valid_label`].
    #[error("bad protocol label: use 1-16 characters of A-Z a-z 0-9 -")]
    BadLabel,
    /// A track name outside the stream-name alphabet or length.
    #[error("bad track name: use 1-64 characters of A-Z a-z 0-9 _ -")]
    BadTrackName,
    /// A rendition name outside the stream-name alphabet (or too long for
    /// its track name `video-<name>`), or a rendition on an audio track.
    #[error("bad rendition: name of 1-58 characters of A-Z a-z 0-9 _ -, on a video track")]
    BadRendition,
    /// A catalog listing more tracks than the cap.
    #[error("catalog lists {count} tracks, at most {max}")]
    TooManyTracks {
        /// Tracks listed.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// A track's fmtp over the cap.
    #[error("fmtp of {len} bytes, at most {max}")]
    FmtpTooLong {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A group stream header that cannot be read.
    #[error("bad group header")]
    BadGroupHeader,
    /// Frame flags with bits this version does not define.
    #[error("unknown frame flags {0:#04x}")]
    UnknownFrameFlags(u8),
    /// A frame payload over the cap.
    #[error("frame of {len} bytes, at most {max}")]
    FrameTooLarge {
        /// Announced payload length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A stream ended in the middle of a message, header or frame.
    #[error("stream ended early")]
    StreamEndedEarly,
    /// Reading a stream failed in a way that is neither a reset nor a lost
    /// connection.
    #[error("stream read: {0}")]
    Read(#[source] quinn::ReadError),
    /// Writing a handshake message failed.
    #[error("control write: {0}")]
    Write(#[source] quinn::WriteError),
    /// A publication or subscription id of the other side's parity: the
    /// connecting side uses even ids, the accepting side odd ones.
    #[error("id {0} has the wrong parity for the peer")]
    WrongIdParity(u64),
    /// A new publication or subscription reused a live id.
    #[error("id {0} is already in use")]
    IdInUse(u64),
    /// The peer published to a node that does not take publications (a
    /// client link: only the accepting side serves a registry).
    #[error("publish not accepted on this side of the link")]
    PublishRefused,
    /// A load report or cluster table that breaks the caps or the rules of
    /// [`crate::cluster::Report::validate`].
    #[error("bad load report: {0}")]
    BadReport(&'static str),
    /// The link would close a loop of relay links: this node would be its
    /// own upstream. The text is the chain, e.g. `a1 → b2 → a1`.
    #[error("relay loop: {0}")]
    Loop(String),
    /// The peer published more streams on one link than the cap.
    #[error("more than {max} publications on one link")]
    TooManyPublications {
        /// The cap.
        max: usize,
    },
    /// This node could not encode one of its own messages (a bug here, not
    /// the peer's fault).
    #[error("cannot encode control message: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
