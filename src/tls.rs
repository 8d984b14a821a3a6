//! TLS for the `--http` listener (HTTPS, `wss://`) and `--rtmps`: one
//! certificate from `--tls-cert`/`--tls-key` (PEM), re-read when its files
//! change (ACME renewals) without touching established connections, and an
//! axum [`Listener`] that runs each handshake in a task of its own under a
//! deadline, so a client that connects and says nothing holds no slot for
//! long and never delays anyone else's handshake.
//!
//! The reload decision is sans-IO ([`Watch`]: file stamps in, "reload now"
//! out); the task around it reads the files and swaps the certificate the
//! resolver hands to new handshakes.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use axum::serve::Listener;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A client must finish the TLS handshake within this, or is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on the HTTPS listener; past it the
/// listener stops accepting (the kernel backlog holds the rest) until one
/// ends, so a flood costs a bounded number of tasks and buffers.
pub const MAX_HANDSHAKES: usize = 1024;
/// How often the certificate files' stamps are looked at.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);
/// Handshaken connections waiting for the HTTP server to take them.
const READY_QUEUE: usize = 64;

/// `cascade_tls_handshake_failures_total{listener="https",reason}`: TLS
/// handshakes that did not complete (`timeout`, `error`, `closed`).
pub const HANDSHAKE_FAILURES: &str = "cascade_tls_handshake_failures_total";
/// `cascade_tls_reloads_total{result}`: certificate reloads, `ok` or `error`
/// (the old certificate stays in use on `error`).
pub const RELOADS: &str = "cascade_tls_reloads_total";

/// Describes this module's metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        HANDSHAKE_FAILURES,
        "TLS handshakes on the HTTPS listener that did not complete, by reason (timeout, error, closed)"
    );
    metrics::describe_counter!(
        RELOADS,
        "Certificate reloads after the --tls-cert/--tls-key files changed, by result (ok, error: the old certificate stays)"
    );
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key from PEM text: the first certificate is
/// the server's, the rest its chain (as ACME clients write `fullchain.pem`);
/// the key must be the certificate's.
pub fn parse(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("certificate PEM: {}", pem_error(e)))?;
    if chain.is_empty() {
        bail!("no CERTIFICATE in the certificate file");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| anyhow::anyhow!("private key PEM: {}", pem_error(e)))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| anyhow::anyhow!("certificate and key: {e}"))
}

/// A PEM error as an operator reads it (the library prints marker lines as
/// byte arrays).
fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a section has no \"-----END {}-----\" line (a truncated file?)",
            String::from_utf8_lossy(&end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("bad BEGIN line {:?}", String::from_utf8_lossy(&line))
        }
        Error::NoItemsFound => "nothing of the expected kind in the file".into(),
        e => e.to_string(),
    }
}

/// Reads and parses the two files.
fn load(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let cert_pem =
        std::fs::read(cert).with_context(|| format!("reading --tls-cert {}", cert.display()))?;
    let key_pem =
        std::fs::read(key).with_context(|| format!("reading --tls-key {}", key.display()))?;
    parse(&cert_pem, &key_pem)
        .with_context(|| format!("loading {} and {}", cert.display(), key.display()))
}

/// Hands every new handshake the current certificate; a reload swaps it.
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Resolver {
    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// What identifies one version of a file without reading it: a renewal
/// that rewrites it in place changes its time or length, one that moves a
/// new file (or symlink target) into place changes its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    /// The stamp of `path` (following symlinks, as certbot's `live/` are).
    fn of(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

/// The stamps of the certificate and the key file, together.
pub type Stamps = (Stamp, Stamp);

/// When to reload: sans-IO, fed the files' stamps at each poll.
///
/// A reload is tried once per new pair of stamps. A failed one (a half
/// written file, a certificate whose new key is not there yet) is not tried
/// again, nor logged again, until a file changes once more: ACME clients
/// write the certificate and the key one after the other.
#[derive(Debug)]
pub struct Watch {
    /// The stamps of the loaded (or last tried) files.
    seen: Stamps,
}

impl Watch {
    /// Starts from the stamps of the files loaded at start-up.
    pub fn new(loaded: Stamps) -> Self {
        Self { seen: loaded }
    }

    /// True when the files changed since the last load or attempt: the
    /// caller loads them now (whatever comes of it, these stamps are done).
    pub fn poll(&mut self, now: Stamps) -> bool {
        if now == self.seen {
            return false;
        }
        self.seen = now;
        true
    }
}

/// The loaded certificate and what serves it.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<Resolver>,
    loaded: Stamps,
}

impl Tls {
    /// Loads the files; an error here stops the start-up.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        // Stamps first: a change between them and the read is seen again.
        let loaded = (
            Stamp::of(cert).with_context(|| format!("--tls-cert {}", cert.display()))?,
            Stamp::of(key).with_context(|| format!("--tls-key {}", key.display()))?,
        );
        let certified = load(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            resolver: Arc::new(Resolver {
                current: RwLock::new(Arc::new(certified)),
            }),
            loaded,
        })
    }

    fn config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<ServerConfig>> {
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(c))
    }

    /// The HTTPS listener's acceptor: HTTP/1.1 (the server speaks only it;
    /// WebSocket upgrades need it).
    pub fn https(&self) -> anyhow::Result<TlsAcceptor> {
        Ok(TlsAcceptor::from(self.config(&[b"http/1.1"])?))
    }

    /// The RTMPS listener's acceptor (no ALPN: encoders send none).
    pub fn rtmps(&self) -> anyhow::Result<TlsAcceptor> {
        Ok(TlsAcceptor::from(self.config(&[])?))
    }

    /// Polls the files every [`RELOAD_POLL`] until `stop`, swapping in a
    /// changed certificate for new handshakes; established connections keep
    /// the one they started with.
    pub fn spawn_reload(&self, stop: CancellationToken) {
        let mut reloader = self.reloader();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match reloader.check() {
                    None => {}
                    Some(Ok(())) => {
                        metrics::counter!(RELOADS, "result" => "ok").increment(1);
                        tracing::info!(cert = %reloader.cert.display(), "TLS certificate reloaded");
                    }
                    Some(Err(e)) => {
                        metrics::counter!(RELOADS, "result" => "error").increment(1);
                        tracing::error!(
                            error = format!("{e:#}"),
                            "TLS certificate files changed but do not load: the previous certificate stays in use"
                        );
                    }
                }
            }
        });
    }

    fn reloader(&self) -> Reloader {
        Reloader {
            cert: self.cert.clone(),
            key: self.key.clone(),
            resolver: self.resolver.clone(),
            watch: Watch::new(self.loaded),
        }
    }
}

/// The reload task's body: one look at the files per call.
struct Reloader {
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<Resolver>,
    watch: Watch,
}

impl Reloader {
    /// `None` when nothing changed (or a file is missing for a moment,
    /// being replaced: looked at again next time); else whether the changed
    /// files were loaded (on an error the previous certificate stays).
    fn check(&mut self) -> Option<anyhow::Result<()>> {
        let (Ok(c), Ok(k)) = (Stamp::of(&self.cert), Stamp::of(&self.key)) else {
            return None;
        };
        if !self.watch.poll((c, k)) {
            return None;
        }
        Some(load(&self.cert, &self.key).map(|new| self.resolver.set(Arc::new(new))))
    }
}

/// An axum [`Listener`] that hands out connections once their TLS
/// handshake is done. Handshakes run in tasks of their own (at most
/// [`MAX_HANDSHAKES`], each within [`HANDSHAKE_TIMEOUT`]) so a slow one
/// never holds up the next accept.
pub struct TlsListener<L: Listener> {
    ready: mpsc::Receiver<(TlsStream<L::Io>, SocketAddr)>,
    local: SocketAddr,
}

impl<L: Listener<Addr = SocketAddr>> TlsListener<L> {
    /// Starts accepting on `inner`; stops when the listener is dropped.
    pub fn new(inner: L, acceptor: TlsAcceptor) -> io::Result<Self> {
        let local = inner.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(inner, acceptor, tx));
        Ok(Self { ready, local })
    }
}

async fn accept_loop<L: Listener<Addr = SocketAddr>>(
    mut inner: L,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<L::Io>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        // A slot first: at the cap, connections wait in the kernel backlog.
        let permit = tokio::select! {
            _ = ready.closed() => return,
            p = handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (io, peer) = tokio::select! {
            _ = ready.closed() => return,
            c = inner.accept() => c,
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await;
            drop(permit);
            let reason = match r {
                Ok(Ok(stream)) => {
                    // Fails only when the server is gone (shutting down).
                    let _ = ready.send((stream, peer)).await;
                    return;
                }
                Err(_) => "timeout",
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    "closed"
                }
                Ok(Err(e)) => {
                    // Scanners and plain-HTTP clients make these all day, and
                    // client addresses are PII: debug level.
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    "error"
                }
            };
            metrics::counter!(HANDSHAKE_FAILURES, "listener" => "https", "reason" => reason)
                .increment(1);
        });
    }
}

impl<L: Listener<Addr = SocketAddr>> Listener for TlsListener<L> {
    type Io = TlsStream<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop ended: only when this listener is going away.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(secs: u64, len: u64, inode: u64) -> Stamp {
        Stamp {
            modified: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
            len,
            inode,
        }
    }

    #[test]
    fn reloads_once_per_change() {
        let (c0, k0) = (stamp(1, 100, 1), stamp(1, 50, 2));
        let mut w = Watch::new((c0, k0));
        assert!(!w.poll((c0, k0)), "unchanged files are not read");
        // The renewal writes the certificate first: one attempt (it fails:
        // the old key), not one per poll while the key is not there yet.
        let c1 = stamp(5, 120, 1);
        assert!(w.poll((c1, k0)));
        assert!(!w.poll((c1, k0)));
        assert!(!w.poll((c1, k0)));
        // Then the key: tried again.
        let k1 = stamp(6, 50, 2);
        assert!(w.poll((c1, k1)));
        assert!(!w.poll((c1, k1)));
        // A new file moved into place with the same time and length.
        assert!(w.poll((c1, stamp(6, 50, 9))));
    }

    fn cert(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (c.pem(), key.serialize_pem())
    }

    #[test]
    fn parses_matching_pairs_only() {
        let (c1, k1) = cert("a.example");
        let (c2, k2) = cert("b.example");
        assert!(parse(c1.as_bytes(), k1.as_bytes()).is_ok());
        // A chain: leaf then more certificates.
        let chain = format!("{c1}{c2}");
        assert_eq!(
            parse(chain.as_bytes(), k1.as_bytes()).unwrap().cert.len(),
            2
        );
        let e = parse(c1.as_bytes(), k2.as_bytes()).unwrap_err();
        assert!(format!("{e:#}").contains("certificate and key"), "{e:#}");
        assert!(parse(b"", k1.as_bytes()).is_err());
        let e = parse(c1.as_bytes(), b"").unwrap_err();
        assert!(
            format!("{e:#}").contains("private key PEM: nothing"),
            "{e:#}"
        );
        let e = parse(&c1.as_bytes()[..c1.len() / 2], k1.as_bytes()).unwrap_err();
        assert!(
            format!("{e:#}").contains("no \"-----END CERTIFICATE-----\" line"),
            "{e:#}"
        );
        assert!(
            parse(k1.as_bytes(), c1.as_bytes()).is_err(),
            "swapped files"
        );
        let _ = k2;
    }

    /// Writes `text` to `path` the way renewals do (a new file moved into
    /// place), so the stamp changes whatever the clock's granularity.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn reload_swaps_good_files_and_keeps_the_old_on_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, kp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (c1, k1) = cert("a.example");
        replace(&cp, &c1);
        replace(&kp, &k1);
        let tls = Tls::load(&cp, &kp).unwrap();
        let mut r = tls.reloader();
        let first = tls.resolver.get();
        assert!(r.check().is_none(), "nothing changed");
        // A renewal writes the new certificate, then its key.
        let (c2, k2) = cert("b.example");
        replace(&cp, &c2);
        assert!(r.check().unwrap().is_err(), "new certificate, old key");
        assert!(r.check().is_none(), "the same failure is not retried");
        assert!(Arc::ptr_eq(&first, &tls.resolver.get()), "old one kept");
        replace(&kp, &k2);
        r.check().unwrap().unwrap();
        let second = tls.resolver.get();
        assert_eq!(
            second.cert[0],
            parse(c2.as_bytes(), k2.as_bytes()).unwrap().cert[0]
        );
        // Half a file: refused, the current one stays.
        replace(&cp, &c1[..c1.len() / 2]);
        assert!(r.check().unwrap().is_err());
        assert!(Arc::ptr_eq(&second, &tls.resolver.get()));
        // A missing file (mid-replacement) is looked at later.
        std::fs::remove_file(&kp).unwrap();
        assert!(r.check().is_none());
        // And a bad pair at start-up stops the start.
        assert!(Tls::load(&cp, &kp).is_err());
    }
}
