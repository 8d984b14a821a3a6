//! TLS for relay links: a self-signed certificate made at start-up, and a
//! client that accepts any certificate. Nodes authenticate each other with
//! the cluster secret (see `auth`), not with a PKI: the proofs are bound to
//! the TLS session (its exporter), so a man in the middle with its own
//! certificate gets through TLS but not through the node handshake.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::{ALPN, ALPN_V1};
use crate::{Error, Result};

/// Name in the self-signed certificate and in the client's SNI.
pub const SERVER_NAME: &str = "cascade-relay";
/// A silent peer (crashed node, cut network) is dropped after this long, so
/// a node notices a lost origin within a second and starts reconnecting;
/// its streams are held meanwhile (`LINK_GRACE` / `--relay-hold`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Keep-alives keep a link alive when no media flows: four may be lost in
/// a row before the link is declared dead. Five small packets a second per
/// link cost nothing next to media.
const KEEP_ALIVE: Duration = Duration::from_millis(200);
/// Concurrent group streams a peer may open: two or three live groups per
/// track (the newest and ones still draining) for a few hundred streams.
pub const MAX_UNI_STREAMS: u32 = 1024;
/// Bytes a peer may have in flight to us over all streams of a link: a few
/// seconds of a hundred 6 Mbit/s streams; bounds what a peer can make us buffer.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Connection attempts quinn holds before the accept loop decides on them
/// (refused beyond): a flood waits here, not in memory without bound.
const MAX_INCOMING: usize = 4096;
/// Bytes buffered per attempt and in total before it is accepted: the relay
/// sends no 0-RTT data, so only a few Initial packets ever wait.
const INCOMING_BUFFER: u64 = 64 * 1024;
const INCOMING_BUFFER_TOTAL: u64 = 16 * 1024 * 1024;

/// The protocols offered: the current one first (the server picks by its
/// own order), then the previous one, only to refuse it with a clear reason.
fn alpn() -> Vec<Vec<u8>> {
    vec![ALPN.to_vec(), ALPN_V1.to_vec()]
}

/// The application protocol a connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    // One control stream per link, opened by the connecting side.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(tls_error)?));
    Ok(Arc::new(t))
}

/// A server configuration with a fresh self-signed certificate.
pub fn server_config() -> Result<quinn::ServerConfig> {
    let cert =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(tls_error)?;
    let key = PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key.into())
        .map_err(tls_error)?;
    tls.alpn_protocols = alpn();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport()?);
    config
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(config)
}

/// A client configuration that accepts any server certificate (the HMAC
/// handshake that follows, bound to this TLS session, is what
/// authenticates the origin).
pub fn client_config() -> Result<quinn::ClientConfig> {
    client_config_offering(alpn())
}

/// [`client_config`] offering other protocol names (tests and tools that
/// speak, or pretend to speak, another version).
pub fn client_config_offering(protocols: Vec<Vec<u8>>) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = protocols;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport()?);
    Ok(config)
}

/// Accepts any certificate but still checks the handshake signatures, so the
/// TLS session is bound to the key the server holds. Whoever holds that key
/// must still prove the cluster secret over this very session (`auth`).
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
