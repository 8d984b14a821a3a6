//! The crate's error type: what can go wrong generating media, signalling or running a session.

/// Everything the clients can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Local I/O (sockets, media files).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// ffmpeg could not be run or failed.
    #[error("ffmpeg: {0}")]
    Ffmpeg(String),
    /// The generated media could not be parsed.
    #[error("media: {0}")]
    Media(String),
    /// The HTTP request itself failed (connect, timeout, body).
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered the offer with something other than 201.
    #[error("server answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body (the server's explanation).
        body: String,
    },
    /// The 201 answer lacked something WHIP/WHEP requires.
    #[error("bad answer: {0}")]
    BadAnswer(String),
    /// str0m refused something (SDP, state).
    #[error("rtc: {0}")]
    Rtc(#[from] str0m::RtcError),
    /// A wait ran past its deadline.
    #[error("timeout: {0}")]
    Timeout(&'static str),
    /// The session task ended abnormally (panic or cancellation).
    #[error("session task: {0}")]
    Task(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
