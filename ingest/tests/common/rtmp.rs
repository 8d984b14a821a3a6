//! RTMP test harness: a server on 127.0.0.1:0, an rml_rtmp-based publishing
//! client that sends whatever FLV tags and timestamps a test wants, raw
//! handshakes for malformed-input tests, ffmpeg publishers, FLV file reading.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cascade_ingest::rtmp;
use cascade_origin::Registry;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Publish token used by every test server.
pub const TOKEN: &str = "s3cret-token";
/// Upper bound for any single network wait in the harness.
pub const WAIT: Duration = Duration::from_secs(10);

/// Logs to the test output (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_test_writer()
        .try_init();
}

/// An RTMP server on an ephemeral port.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The registry it publishes into.
    pub registry: Arc<Registry>,
    /// Cancels `serve`.
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts `rtmp::serve` on 127.0.0.1:0.
    pub async fn start() -> Self {
        Self::start_with(rtmp::Policy::Drop).await
    }

    /// Starts `rtmp::serve_with` on 127.0.0.1:0 with a B-frame policy.
    pub async fn start_with(policy: rtmp::Policy) -> Self {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Registry::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (registry, shutdown) = (registry.clone(), shutdown.clone());
            async move {
                rtmp::serve_with(listener, registry, Arc::from(TOKEN), shutdown, policy)
                    .await
                    .unwrap();
            }
        });
        Self {
            addr,
            registry,
            shutdown,
            task,
        }
    }

    /// The publish URL of `name` with the right token.
    pub fn url(&self, name: &str) -> String {
        format!("rtmp://{}/live/{name}?token={TOKEN}", self.addr)
    }

    /// Stops the server and checks its task ended cleanly (no panic).
    pub async fn stop(self) {
        self.shutdown.cancel();
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

/// True when the `ffmpeg` binary is installed.
pub fn have_ffmpeg() -> bool {
    std::process::Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Options of an ffmpeg test publish.
#[derive(Clone, Copy, Debug)]
pub struct Encode {
    /// Seconds of media.
    pub secs: u32,
    /// libx264 B-frames (`None`: x264's default).
    pub bframes: Option<u32>,
    /// AAC sampling rate.
    pub rate: u32,
    /// AAC channels.
    pub channels: u32,
    /// Sine frequency.
    pub tone: u32,
}

fn encode_args(e: Encode) -> Vec<String> {
    let mut a: Vec<String> = [
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=30",
        "-f",
        "lavfi",
        "-i",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("sine=frequency={}:sample_rate={}", e.tone, e.rate));
    for s in [
        "-t",
        &e.secs.to_string(),
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-g",
        "30",
    ] {
        a.push(s.to_string());
    }
    if let Some(bf) = e.bframes {
        a.push("-bf".into());
        a.push(bf.to_string());
    }
    for s in [
        "-c:a",
        "aac",
        "-ar",
        &e.rate.to_string(),
        "-ac",
        &e.channels.to_string(),
        "-b:a",
        "128k",
    ] {
        a.push(s.to_string());
    }
    a
}

/// Publishes a test pattern and tone in real time (`-re`) to `url`.
pub fn ffmpeg_publish(url: &str, e: Encode) -> tokio::process::Child {
    let mut args = vec!["-re".to_string()];
    args.extend(encode_args(e));
    args.extend(["-f".into(), "flv".into(), url.to_string()]);
    tokio::process::Command::new("ffmpeg")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Encodes the test pattern and tone into an FLV file in memory (fast).
pub async fn ffmpeg_flv(e: Encode) -> Vec<u8> {
    let mut args = encode_args(e);
    args.extend(["-f".into(), "flv".into(), "-".into()]);
    let out = timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("ffmpeg")
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One FLV tag read from a file.
#[derive(Clone, Debug)]
pub struct Tag {
    /// 8 audio, 9 video, 18 script.
    pub kind: u8,
    /// Timestamp, ms.
    pub ts: u32,
    /// Tag body.
    pub data: Bytes,
}

/// Reads the tags of an FLV file.
pub fn read_flv(file: &[u8]) -> Vec<Tag> {
    assert_eq!(&file[..3], b"FLV");
    let mut at = u32::from_be_bytes(file[5..9].try_into().unwrap()) as usize + 4;
    let mut tags = Vec::new();
    while at + 11 <= file.len() {
        let h = &file[at..at + 11];
        let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let end = at + 11 + size;
        if end > file.len() {
            break;
        }
        tags.push(Tag {
            kind: h[0],
            ts,
            data: Bytes::copy_from_slice(&file[at + 11..end]),
        });
        at = end + 4;
    }
    tags
}

/// Completes a client handshake on `io`; returns bytes read past it.
pub async fn client_handshake(io: &mut TcpStream) -> Vec<u8> {
    let mut hs = Handshake::new(PeerType::Client);
    io.write_all(&hs.generate_outbound_p0_and_p1().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = timeout(WAIT, io.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "server closed during handshake");
        match hs.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                io.write_all(&response_bytes).await.unwrap()
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                io.write_all(&response_bytes).await.unwrap();
                return remaining_bytes;
            }
        }
    }
}

/// A publishing RTMP client built on rml_rtmp's client session.
pub struct Client {
    /// The socket (tests may write raw bytes to it).
    pub io: TcpStream,
    session: ClientSession,
}

impl Client {
    /// Connects to app `app` and publishes `key`; `Err` carries what the
    /// server said (status code or description) or that it closed.
    pub async fn publish(addr: SocketAddr, app: &str, key: &str) -> Result<Self, String> {
        let mut io = TcpStream::connect(addr).await.unwrap();
        let rest = client_handshake(&mut io).await;
        let (session, _) = ClientSession::new(ClientSessionConfig::new()).unwrap();
        let mut c = Self { io, session };
        let r = c.session.request_connection(app.to_string()).unwrap();
        c.send_result(r).await;
        c.until(rest, |e| {
            matches!(e, ClientSessionEvent::ConnectionRequestAccepted)
        })
        .await?;
        let r = c
            .session
            .request_publishing(key.to_string(), PublishRequestType::Live)
            .unwrap();
        c.send_result(r).await;
        c.until(Vec::new(), |e| {
            matches!(e, ClientSessionEvent::PublishRequestAccepted)
        })
        .await?;
        Ok(c)
    }

    async fn send_result(&mut self, r: ClientSessionResult) {
        if let ClientSessionResult::OutboundResponse(p) = r {
            self.io.write_all(&p.bytes).await.unwrap();
        }
    }

    async fn until(
        &mut self,
        mut pending: Vec<u8>,
        done: impl Fn(&ClientSessionEvent) -> bool,
    ) -> Result<(), String> {
        let mut buf = vec![0u8; 65536];
        loop {
            if !pending.is_empty() {
                let results = self
                    .session
                    .handle_input(&pending)
                    .map_err(|e| e.to_string())?;
                pending.clear();
                let mut finished = false;
                for r in results {
                    match r {
                        ClientSessionResult::OutboundResponse(p) => self
                            .io
                            .write_all(&p.bytes)
                            .await
                            .map_err(|e| e.to_string())?,
                        // Results after the event (e.g. the chunk size) still go out.
                        ClientSessionResult::RaisedEvent(e) if done(&e) => finished = true,
                        ClientSessionResult::RaisedEvent(
                            ClientSessionEvent::ConnectionRequestRejected { description },
                        ) => return Err(description),
                        ClientSessionResult::RaisedEvent(
                            ClientSessionEvent::UnhandleableOnStatusCode { code },
                        ) => return Err(code),
                        ClientSessionResult::RaisedEvent(
                            e @ ClientSessionEvent::UnknownTransactionResultReceived { .. },
                        ) => {
                            // Our refusals come as `_error` results.
                            return Err(format!("{e:?}"));
                        }
                        ClientSessionResult::RaisedEvent(_) => {}
                        ClientSessionResult::UnhandleableMessageReceived(_) => {}
                    }
                }
                if finished {
                    return Ok(());
                }
            }
            let n = timeout(WAIT, self.io.read(&mut buf))
                .await
                .map_err(|_| "timeout".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed".into());
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Sends one FLV tag body as an audio (8) or video (9) message.
    pub async fn send(&mut self, kind: u8, ts: u32, data: Bytes) -> std::io::Result<()> {
        let ts = RtmpTimestamp::new(ts);
        let r = if kind == 8 {
            self.session.publish_audio_data(data, ts, false)
        } else {
            self.session.publish_video_data(data, ts, false)
        };
        match r.unwrap() {
            ClientSessionResult::OutboundResponse(p) => self.io.write_all(&p.bytes).await,
            _ => Ok(()),
        }
    }

    /// Reads and discards what the server sends (acks), non-blocking.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.io.try_read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// Sends FLV tags paced in real time, timestamps rewritten by `map`.
pub async fn send_paced(
    c: &mut Client,
    tags: &[Tag],
    map: impl Fn(u32) -> u32,
) -> std::io::Result<()> {
    let start = tokio::time::Instant::now();
    let first = tags.iter().find(|t| t.kind != 18).map_or(0, |t| t.ts);
    for t in tags.iter().filter(|t| t.kind == 8 || t.kind == 9) {
        let due = start + Duration::from_millis(u64::from(t.ts.saturating_sub(first)));
        tokio::time::sleep_until(due).await;
        c.send(t.kind, map(t.ts), t.data.clone()).await?;
        c.drain();
    }
    Ok(())
}

/// True when the server closed `io` within `within` (EOF or reset).
pub async fn closed_within(io: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}
