//! Test harness for the relay: an ingest, an origin and edges, each with its
//! own registry, linked over real QUIC on 127.0.0.1.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cascade_origin::catalog::{Catalog, Codec, TrackInfo};
use cascade_origin::frame::Frame;
use cascade_origin::relay::tls;
use cascade_origin::relay::wire::{read_message, Message, VERSION};
use cascade_origin::relay::{Client, Options, Server};
use cascade_origin::Registry;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::timeout;

pub const SECRET: &str = "cluster-secret-for-tests-0123456789";
/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(5);

pub fn catalog() -> Catalog {
    Catalog {
        tracks: vec![
            TrackInfo {
                name: "video".into(),
                codec: Codec::H264,
                fmtp: "profile-level-id=42e01f;packetization-mode=1".into(),
                channels: None,
                bframes: false,
                rendition: None,
            },
            TrackInfo {
                name: "audio".into(),
                codec: Codec::Opus,
                fmtp: "minptime=10;useinbandfec=1".into(),
                channels: Some(2),
                bframes: false,
                rendition: None,
            },
        ],
    }
}

/// Frame `n` of a test stream: payload encodes `n`, keyframe as asked.
pub fn frame(n: u64, keyframe: bool, size: usize) -> Frame {
    let mut payload = vec![(n % 251) as u8; size.max(8)];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    Frame {
        payload: Bytes::from(payload),
        pts: n * 3000,
        dts: n * 3000,
        keyframe,
        ingest_us: cascade_origin::wallclock_us(),
    }
}

pub fn options() -> Options {
    Options {
        fetch_timeout: Duration::from_secs(3),
        linger: Duration::from_millis(300),
        max_backoff: Duration::from_millis(500),
        hold: Duration::from_secs(5),
    }
}

pub struct Edge {
    pub registry: Arc<Registry>,
    pub client: Client,
}

pub struct Cluster {
    pub ingest: Arc<Registry>,
    pub origin: Arc<Registry>,
    pub server: Server,
    pub uplink: Client,
    pub addr: String,
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl Cluster {
    pub async fn start() -> Self {
        init_tracing();
        let origin = Registry::new();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            SECRET.into(),
            origin.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let ingest = Registry::new();
        let uplink = Client::connect_with(addr.clone(), SECRET.into(), options());
        uplink.uplink(ingest.clone());
        assert!(uplink.wait_connected(WAIT).await, "uplink did not connect");
        Self {
            ingest,
            origin,
            server,
            uplink,
            addr,
        }
    }

    pub async fn edge(&self) -> Edge {
        edge_of(&self.addr, SECRET).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.uplink.close();
    }
}

pub async fn edge_of(addr: &str, secret: &str) -> Edge {
    let registry = Registry::new();
    let client = Client::connect_with(addr.to_string(), secret.into(), options());
    registry.set_upstream(Arc::new(client.clone()));
    Edge { registry, client }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.client.close();
    }
}

/// Waits until `name` is live in `registry`.
pub async fn wait_live(registry: &Registry, name: &str) {
    tokio::time::timeout(WAIT, async {
        while !registry.is_live(name) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("stream did not go live");
}

/// Waits until `name` is no longer live in `registry`.
pub async fn wait_gone(registry: &Registry, name: &str) {
    tokio::time::timeout(WAIT, async {
        while registry.is_live(name) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("stream stayed live");
}

/// The frame number a test payload carries.
pub fn number(f: &Frame) -> u64 {
    let mut be = [0u8; 8];
    be.copy_from_slice(&f.payload[..8]);
    u64::from_be_bytes(be)
}

pub async fn raw_connect(addr: std::net::SocketAddr) -> quinn::Connection {
    raw_connect_with(addr, tls::client_config().unwrap()).await
}

/// A bare QUIC connection to a relay server, for speaking the wire by hand.
pub async fn raw_connect_with(
    addr: std::net::SocketAddr,
    config: quinn::ClientConfig,
) -> quinn::Connection {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(addr, tls::SERVER_NAME).unwrap();
    timeout(WAIT, connecting).await.unwrap().unwrap()
}

pub fn close_code(e: quinn::ConnectionError) -> Option<quinn::VarInt> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code),
        _ => None,
    }
}

/// The TLS exporter of `conn`, as both ends of the relay handshake bind
/// their proofs to it.
pub fn binding(conn: &quinn::Connection) -> [u8; 32] {
    let mut x = [0u8; 32];
    conn.export_keying_material(&mut x, cascade_origin::relay::EXPORTER_LABEL, b"")
        .unwrap();
    x
}

/// A handshake proof, written out from the wire spec (`relay::auth`):
/// HMAC(secret, "cascade-relay/2 " | role | exporter | client nonce | server nonce).
pub fn proof(
    secret: &str,
    role: &[u8],
    binding: &[u8; 32],
    client: &[u8; 32],
    server: &[u8; 32],
) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(b"cascade-relay/2 ");
    m.update(role);
    m.update(binding);
    m.update(client);
    m.update(server);
    m.finalize().into_bytes().into()
}

/// Runs the handshake by hand with `secret` up to our proof; returns the
/// control stream (`AuthOk` comes next if the server took it).
pub async fn handshake(
    conn: &quinn::Connection,
    secret: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let ours = [7u8; 32];
    let hello = Message::Hello {
        version: VERSION,
        nonce: ours,
    };
    send.write_all(&hello.encode().unwrap()).await.unwrap();
    let Message::Challenge { nonce } = timeout(WAIT, read_message(&mut recv))
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("expected challenge");
    };
    let auth = Message::Auth {
        proof: proof(secret, b"client", &binding(conn), &ours, &nonce),
    };
    send.write_all(&auth.encode().unwrap()).await.unwrap();
    (send, recv)
}

/// The whole handshake by hand with the right secret, checking the
/// server's proof too; returns the control stream.
pub async fn handshake_ok(
    conn: &quinn::Connection,
    secret: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let ours = [8u8; 32];
    let hello = Message::Hello {
        version: VERSION,
        nonce: ours,
    };
    send.write_all(&hello.encode().unwrap()).await.unwrap();
    let Message::Challenge { nonce } = timeout(WAIT, read_message(&mut recv))
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("expected challenge");
    };
    let x = binding(conn);
    let auth = Message::Auth {
        proof: proof(secret, b"client", &x, &ours, &nonce),
    };
    send.write_all(&auth.encode().unwrap()).await.unwrap();
    let Message::AuthOk { proof: theirs } = timeout(WAIT, read_message(&mut recv))
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("expected auth_ok");
    };
    assert_eq!(theirs, proof(secret, b"server", &x, &ours, &nonce));
    (send, recv)
}
