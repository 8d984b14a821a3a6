//! RTMPS: a TLS handshake in front of an RTMP connection. The binary builds
//! the rustls server configuration (certificate, reloads); this only runs
//! the handshake under a deadline, so a client that connects and says
//! nothing cannot hold one of the node's connection slots, and sorts its
//! failures into the RTMP refusal reasons.

use std::io::ErrorKind;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::Error;

/// A client must finish the TLS handshake within this; the RTMP handshake
/// deadline ([`super::HANDSHAKE_TIMEOUT`]) starts after it.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the server side of the TLS handshake on `socket`.
pub(super) async fn accept(
    acceptor: &TlsAcceptor,
    socket: TcpStream,
) -> Result<TlsStream<TcpStream>, Error> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Err(_) => Err(Error::HandshakeTimeout),
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(classify(e)),
    }
}

/// A peer that closed before finishing the handshake is a probe (as on
/// plain RTMP); anything else is a TLS failure (a plain RTMP client on the
/// RTMPS port, an unknown certificate on the client's side, no common
/// cipher suite).
fn classify(e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => Error::ClosedEarly,
        _ => Error::Tls(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_sort_into_reasons() {
        let eof = classify(std::io::Error::new(ErrorKind::UnexpectedEof, "eof"));
        assert!(matches!(eof, Error::ClosedEarly));
        let bad = classify(std::io::Error::new(
            ErrorKind::InvalidData,
            "received corrupt message",
        ));
        assert_eq!(bad.reason(), "tls");
        assert!(bad.to_string().contains("corrupt"), "{bad}");
    }
}
