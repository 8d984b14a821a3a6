//! TLS through the real binary with a test CA (rcgen, in a temporary
//! directory): WHIP and WHEP over HTTPS with a Rust client, a plain-HTTP
//! client and a silent one refused, ffmpeg publishing over `rtmps://`, the
//! certificate replaced on disk while a viewer watches, and (root only, in a
//! network namespace) headless Chromium playing the player page over
//! `https://`, publishing from `/publish` in a real secure context, and
//! OvenPlayer from an `https://` page over `wss://`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[allow(dead_code)]
#[path = "browser/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ffmpeg_publish, media, metric_sum, Node, TOKEN};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SerialNumber};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test CA and the server certificate files cascade is given.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    /// The server's key: kept across renewals, so a browser's SPKI pin holds.
    key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "cascade test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
            key: KeyPair::generate().unwrap(),
        };
        std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
        pki.issue(1);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn ca_path(&self) -> PathBuf {
        self.path("ca.pem")
    }
    fn cert_path(&self) -> PathBuf {
        self.path("cert.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.path("key.pem")
    }

    /// Issues a server certificate with `serial` for loopback and the
    /// namespace addresses and moves it into place (as renewals do); returns
    /// its DER.
    fn issue(&self, serial: u64) -> CertificateDer<'static> {
        let names = [
            "localhost",
            "127.0.0.1",
            netns::CASCADE_IP,
            netns::STATIC_IP,
        ];
        let mut p = CertificateParams::new(names.map(String::from).to_vec()).unwrap();
        p.serial_number = Some(SerialNumber::from(serial));
        let cert = p.signed_by(&self.key, &self.ca, &self.ca_key).unwrap();
        replace(&self.key_path(), &self.key.serialize_pem());
        replace(&self.cert_path(), &cert.pem());
        cert.der().clone()
    }

    /// The flags that turn TLS on.
    fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert_path().to_string_lossy().into_owned(),
            "--tls-key".into(),
            self.key_path().to_string_lossy().into_owned(),
        ]
    }

    fn reqwest_ca(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap()
    }

    /// A client that trusts the test CA (and nothing else).
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(self.reqwest_ca())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// The certificate a fresh TLS connection to `addr` is shown (verified
    /// against the test CA).
    async fn served_cert(&self, addr: &str) -> CertificateDer<'static> {
        let tls = self.connect(addr).await;
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    /// A TLS connection to `addr`, verified against the test CA.
    async fn connect(&self, addr: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let host = addr.rsplit_once(':').unwrap().0;
        let name = ServerName::try_from(host.to_string()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the test CA");
        tls
    }
}

/// Writes a new file and renames it over `path`.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start(pki: &Pki, extra: &[&str]) -> Node {
    let mut args = pki.flags();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start("all", &args);
    assert!(node.http.starts_with("https://"), "{:?}", node.banner);
    node
}

/// `host:port` of an `https://host:port` base.
fn authority(base: &str) -> &str {
    base.trim_start_matches("https://")
}

async fn wait_live(client: &reqwest::Client, base: &str, stream: &str) {
    let url = format!("{base}/api/streams");
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    if v.as_array()
                        .is_some_and(|a| a.iter().any(|s| s["stream"] == stream))
                    {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("stream goes live");
}

async fn metrics(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn viewer_opts(pki: &Pki, base: &str, stream: &str, secs: u64) -> loadtest::whep::ViewerOptions {
    let mut o = loadtest::whep::ViewerOptions::new(format!("{base}/whep/{stream}"));
    o.duration = Some(Duration::from_secs(secs));
    o.root_ca = Some(pki.reqwest_ca());
    o
}

async fn publish_whip(pki: &Pki, base: &str, stream: &str) -> loadtest::whip::Publisher {
    let mut o = loadtest::whip::PublisherOptions::new(format!("{base}/whip/{stream}"));
    o.token = Some(TOKEN.into());
    o.root_ca = Some(pki.reqwest_ca());
    let mut p = loadtest::whip::Publisher::start(o, media(30).await)
        .await
        .expect("WHIP publish over HTTPS accepted");
    tokio::time::timeout(Duration::from_secs(15), p.wait_connected())
        .await
        .expect("publisher connects in time")
        .expect("publisher connects");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_and_whep_over_https() {
    let pki = Pki::new();
    let node = start(&pki, &[]);
    let banner = node.banner.join("\n");
    for url in ["https://", "/whip/STREAM", "wss://", "/ws/live/STREAM"] {
        assert!(banner.contains(url), "banner shows {url}: {banner}");
    }
    assert!(!banner.contains("http://"), "no plain URL: {banner}");
    let client = pki.client();
    let p = publish_whip(&pki, &node.http, "tls1").await;
    wait_live(&client, &node.http, "tls1").await;
    let v = loadtest::whep::Viewer::start(viewer_opts(&pki, &node.http, "tls1", 4))
        .await
        .expect("WHEP over HTTPS accepted");
    let r = tokio::time::timeout(Duration::from_secs(25), v.finish_duration())
        .await
        .unwrap()
        .unwrap();
    common::assert_good_viewer(&r);
    // Player page and API over HTTPS; the certificate is the test CA's.
    let page = client
        .get(format!("{}/play/tls1", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    // HTTPS only: a plain-HTTP request on the port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", authority(&node.http)))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP refused: {plain:?}");
    // A client that does not trust the test CA refuses the server.
    let untrusted = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap()
        .get(format!("{}/healthz", node.http))
        .send()
        .await;
    assert!(untrusted.is_err(), "{untrusted:?}");
    let m = metrics(&client, &node.http).await;
    assert!(
        metric_sum(&m, "cascade_tls_handshake_failures_total") >= 2.0,
        "the two failed handshakes are counted: {m}"
    );
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_and_holds_up_nobody() {
    let pki = Pki::new();
    let node = start(&pki, &[]);
    let addr = authority(&node.http).to_string();
    // Connects and never sends a ClientHello.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let t0 = Instant::now();
    // Others are served meanwhile: handshakes do not wait for each other.
    let client = pki.client();
    for _ in 0..3 {
        let r = client
            .get(format!("{}/healthz", node.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The server closes it after its handshake deadline (10 s).
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf))
        .await
        .expect("closed within the handshake timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(9), "{waited:?}");
    eprintln!("silent TLS client dropped after {waited:?}");
    let m = metrics(&client, &node.http).await;
    assert!(
        m.contains(r#"cascade_tls_handshake_failures_total{listener="https",reason="timeout"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_publishes_over_rtmps() {
    let pki = Pki::new();
    let node = start(&pki, &["--rtmps", "127.0.0.1:0"]);
    let rtmps = node
        .banner
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Server:")?
                .trim()
                .strip_prefix("rtmps://")
        })
        .and_then(|r| r.strip_suffix("/live"))
        .expect("banner shows the rtmps:// server")
        .to_string();
    let client = pki.client();
    // A plain RTMP client on the RTMPS port: refused at the TLS layer.
    let mut plain = tokio::net::TcpStream::connect(&rtmps).await.unwrap();
    let mut c0c1 = vec![3u8];
    c0c1.resize(1537, 0);
    plain.write_all(&c0c1).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf)).await;
    let url = format!("rtmps://{rtmps}/live/secure?token={TOKEN}");
    // The TLS layer checks the server against the test CA.
    let ca = pki.ca_path();
    let tls = [
        "-bf",
        "0",
        "-tls_verify",
        "1",
        "-ca_file",
        ca.to_str().unwrap(),
    ];
    let mut child = ffmpeg_publish(&url, &tls, 12);
    wait_live(&client, &node.http, "secure").await;
    let v = loadtest::whep::Viewer::start(viewer_opts(&pki, &node.http, "secure", 5))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(25), v.finish_duration())
        .await
        .unwrap()
        .unwrap();
    assert!(r.connected, "{r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.video_frames >= 120, "≈30 fps for 5 s: {r:?}");
    assert!(r.audio_frames >= 150, "Opus every 20 ms: {r:?}");
    assert_eq!(r.noncontiguous_frames, 0, "{r:?}");
    let m = metrics(&client, &node.http).await;
    assert!(
        m.contains(r#"cascade_ingest_rtmp_refused_total{reason="tls"} 1"#),
        "the plain client is counted: {m}"
    );
    let streams: serde_json::Value = client
        .get(format!("{}/api/streams", node.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(streams[0]["protocol"], "rtmp", "{streams}");
    eprintln!(
        "rtmps: ttff {:?} ms, latency p50 {:?} ms",
        r.ttff_ms, r.latency_ms_p50
    );
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_replaced_while_a_viewer_watches() {
    let pki = Pki::new();
    let first = pki.issue(1);
    let node = start(&pki, &[]);
    let addr = authority(&node.http).to_string();
    let served = pki.served_cert(&addr).await;
    assert_eq!(served, first, "serves serial 1");
    let client = pki.client();
    let p = publish_whip(&pki, &node.http, "renew").await;
    wait_live(&client, &node.http, "renew").await;
    let mut v = loadtest::whep::Viewer::start(viewer_opts(&pki, &node.http, "renew", 12))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), v.wait_connected())
        .await
        .unwrap()
        .unwrap();
    // The renewal: a new certificate (serial 2) moved into place.
    let second = pki.issue(2);
    assert_ne!(second, first);
    let t0 = Instant::now();
    let mut frames = v.video_frames();
    let mut stalls = 0;
    let seen_new = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The viewer keeps receiving all along.
        let now = v.video_frames();
        if now == frames {
            stalls += 1;
        }
        frames = now;
        if pki.served_cert(&addr).await == second {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "new certificate served"
        );
    };
    eprintln!("renewed certificate served {seen_new:?} after it was written");
    // A broken file is refused and the renewed certificate stays.
    replace(
        &pki.cert_path(),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    let t1 = Instant::now();
    loop {
        let m = metrics(&client, &node.http).await;
        if metric_sum(&m, "cascade_tls_reloads_total") >= 2.0 {
            assert!(
                m.contains(r#"cascade_tls_reloads_total{result="ok"} 1"#),
                "{m}"
            );
            assert!(
                m.contains(r#"cascade_tls_reloads_total{result="error"} 1"#),
                "{m}"
            );
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "bad file noticed: {m}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(pki.served_cert(&addr).await, second);
    let r = tokio::time::timeout(Duration::from_secs(25), v.finish_duration())
        .await
        .unwrap()
        .unwrap();
    common::assert_good_viewer(&r);
    assert_eq!(stalls, 0, "no half second without video during the reload");
    assert!(r.video_frames > 250, "12 s of video: {r:?}");
    let _ = p.stop().await;
}

// ---- Chromium (root only: network namespaces) ----

/// One test's budget.
const BROWSER_BUDGET: Duration = Duration::from_secs(55);

/// `--ignore-certificate-errors-spki-list`: base64 of the SHA-256 of the
/// server key's SubjectPublicKeyInfo, so Chromium checks the chain as usual
/// and accepts this one key in place of a trusted root.
fn spki_pin(pki: &Pki) -> String {
    use sha2::Digest;
    base64(&sha2::Sha256::digest(pki.key.public_key_der()))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct BrowserSetup {
    pki: Pki,
    ns: netns::Netns,
    cascade: netns::Cascade,
}

fn browser_setup(tag: &str) -> Option<BrowserSetup> {
    let ns = netns::Netns::create(tag)?;
    let pki = Pki::new();
    let flags = pki.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cascade = netns::Cascade::start(&ns, &flags);
    assert!(cascade.base.starts_with("https://"), "{}", cascade.base);
    Some(BrowserSetup { pki, ns, cascade })
}

impl BrowserSetup {
    /// A WHIP publisher over HTTPS inside the namespace (this binary's
    /// `helper_tls_whip_publisher`), returned once connected.
    fn publisher(&self, stream: &str, secs: u64) -> netns::Proc {
        let exe = std::env::current_exe().unwrap();
        let mut c = self.ns.cmd(exe.to_str().unwrap());
        c.args([
            "helper_tls_whip_publisher",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "CASCADE_TLS_PUBLISH",
            format!("{}/whip/{stream}", self.cascade.base),
        )
        .env("CASCADE_TLS_CA", self.pki.ca_path())
        .env("CASCADE_TLS_SECS", secs.to_string());
        let mut p = netns::Proc::spawn(c);
        p.wait_line(
            |l| l.contains("PUBLISHER CONNECTED"),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|lines| panic!("publisher did not connect: {lines:?}"));
        p
    }

    /// run.mjs with `job`, Chromium pinned to the server key and Node
    /// trusting the test CA (for the runner's own `fetch`es).
    fn run_browser(&self, mut job: serde_json::Value) -> serde_json::Value {
        job["timeoutSecs"] = serde_json::Value::from(BROWSER_BUDGET.as_secs() - 5);
        job["flags"] = serde_json::json!([format!(
            "--ignore-certificate-errors-spki-list={}",
            spki_pin(&self.pki)
        )]);
        let mut c = self.ns.cmd("node");
        c.current_dir(netns::browser_dir())
            .arg("run.mjs")
            .arg(job.to_string())
            .env("NODE_EXTRA_CA_CERTS", self.pki.ca_path());
        let mut p = netns::Proc::spawn(c);
        let line = p
            .wait_line(|l| l.starts_with('{'), BROWSER_BUDGET)
            .unwrap_or_else(|lines| panic!("browser runner printed no result: {lines:?}"));
        serde_json::from_str(&line).unwrap()
    }
}

fn frames_flow(v: &serde_json::Value) {
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let f0 = v["first"]["framesDecoded"].as_u64().unwrap_or(0);
    let f1 = v["last"]["framesDecoded"].as_u64().unwrap_or(0);
    assert!(f0 > 0, "first frame decoded: {v:#}");
    assert!(
        f1 > f0 + 30,
        "frames keep being decoded ({f0} → {f1}): {v:#}"
    );
    assert!(
        v["last"]["width"].as_u64().unwrap_or(0) > 0,
        "a picture: {v:#}"
    );
}

#[test]
fn chromium_plays_the_player_page_over_https() {
    let Some(s) = browser_setup("tlsplay") else {
        return;
    };
    let _publisher = s.publisher("live", 40);
    let v = s.run_browser(serde_json::json!({
        "kind": "play", "base": s.cascade.base, "stream": "live", "secs": 3,
        "screenshot": netns::screenshot("player-https.png"),
    }));
    frames_flow(&v);
    eprintln!("player page over https: first frame {} ms", v["ttffMs"]);
}

#[test]
fn chromium_publishes_from_a_secure_context_and_watches() {
    let Some(s) = browser_setup("tlspub") else {
        return;
    };
    // `/publish` over https: a real secure context, so the page gets the
    // (fake) camera without any "treat as secure" flag doing the work.
    let v = s.run_browser(serde_json::json!({
        "kind": "publish-and-watch", "base": s.cascade.base, "stream": "cam",
        "token": netns::TOKEN, "secs": 3,
    }));
    assert!(v["ok"] == true, "runner failed: {v:#}");
    assert_eq!(v["publishState"], "live", "{v:#}");
    frames_flow(&v);
    assert_eq!(v["whipSessionsAfterClose"], 0.0, "{v:#}");
}

#[test]
fn ovenplayer_plays_over_wss_from_an_https_page() {
    let Some(s) = browser_setup("tlsoven") else {
        return;
    };
    let _publisher = s.publisher("live", 40);
    let ws = format!(
        "{}/ws/live/live",
        s.cascade.base.replacen("https://", "wss://", 1)
    );
    let v = s.run_browser(serde_json::json!({
        "kind": "player", "base": s.cascade.base, "staticHost": netns::STATIC_IP,
        "staticTls": {
            "cert": s.pki.cert_path(), "key": s.pki.key_path(),
        },
        "page": "ovenplayer.html", "pageQuery": format!("ws={}", urlencode(&ws)), "secs": 3,
        "screenshot": netns::screenshot("ovenplayer-wss.png"),
    }));
    frames_flow(&v);
    assert!(
        v["pageOrigin"]
            .as_str()
            .unwrap_or("")
            .starts_with("https://"),
        "the page itself is https (no mixed content allowed): {v:#}"
    );
}

#[test]
fn base64_matches_the_rfc() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Body of the namespace publisher: does nothing unless started by
/// [`BrowserSetup::publisher`].
#[test]
fn helper_tls_whip_publisher() {
    let Ok(url) = std::env::var("CASCADE_TLS_PUBLISH") else {
        return;
    };
    let ca = std::fs::read(std::env::var("CASCADE_TLS_CA").unwrap()).unwrap();
    let secs: u64 = std::env::var("CASCADE_TLS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut o = loadtest::whip::PublisherOptions::new(url);
        o.token = Some(netns::TOKEN.into());
        o.bind = netns::PUBLISHER_IP.parse().unwrap();
        o.duration = Some(Duration::from_secs(secs));
        o.root_ca = Some(reqwest::Certificate::from_pem(&ca).unwrap());
        let mut p = loadtest::whip::Publisher::start(o, media(30).await)
            .await
            .expect("whip publish over https accepted");
        tokio::time::timeout(Duration::from_secs(15), p.wait_connected())
            .await
            .unwrap()
            .unwrap();
        println!("PUBLISHER CONNECTED");
        let _ = tokio::time::timeout(Duration::from_secs(secs + 5), p.finish()).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_slowloris_is_closed_at_the_header_timeout() {
    let pki = Pki::new();
    let node = start(&pki, &["--http-header-timeout", "2s"]);
    let addr = authority(&node.http).to_string();
    // Handshake done, then half a request head and nothing more.
    let mut slow = pki.connect(&addr).await;
    let t0 = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let client = pki.client();
    let r = client
        .get(format!("{}/healthz", node.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "others are served meanwhile");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(6), slow.read(&mut buf))
        .await
        .expect("closed at the header timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1800) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    eprintln!("HTTPS slowloris closed after {waited:?}");
    let m = metrics(&client, &node.http).await;
    assert!(
        m.contains(r#"cascade_http_refused_total{reason="header_timeout"} 1"#),
        "{m}"
    );
}
