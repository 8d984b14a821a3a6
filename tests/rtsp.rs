//! RTSP pull through the real binary, against a real RTSP server: GStreamer's
//! (tests/rtsp/server.py, Debian's gir1.2-gst-rtsp-server-1.0) serving an
//! ffmpeg-made MP4 (x264 + a 1 kHz AAC tone) as H.264 + AAC, H.264 + G.711
//! PCMU, H.264 + Opus, H.264 with B-frames, and Motion-JPEG, an x265 one as
//! H.265 + AAC and H.265 + Opus, with Basic or Digest auth on demand; a
//! proxy strips the SDP's parameter sets for the in-band case, and a live
//! tagged camera measures latency (ignored test). WHEP viewers are the Rust
//! client of loadtest.
//!
//! Needs python3-gi and the GStreamer packages of scripts/test.sh; without
//! them the tests fail (they never skip).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{metric_sum, Node, TOKEN};

/// The Python with Debian's `gi` module (a pyenv `python3` on PATH may
/// lack it).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// 90 s of 640×360 30 fps x264 (keyframe every second, no B-frames) and a
/// 1 kHz AAC tone, made once per test binary.
fn media() -> &'static Path {
    static MEDIA: OnceLock<PathBuf> = OnceLock::new();
    MEDIA.get_or_init(|| make_media("cam.mp4", "0"))
}

/// The same with x264's B-frames (2 between references).
fn bframes_media() -> &'static Path {
    static MEDIA: OnceLock<PathBuf> = OnceLock::new();
    MEDIA.get_or_init(|| make_media("bframes.mp4", "2"))
}

/// 30 s of the same picture as H.265 (libx265, no B-frames, keyframe every
/// second) with the AAC tone.
fn h265_media() -> &'static Path {
    static MEDIA: OnceLock<PathBuf> = OnceLock::new();
    MEDIA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cascade-rtsp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h265.mp4");
        let ok = Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg("testsrc2=size=640x360:rate=30:duration=30")
            .args(["-f", "lavfi", "-i"])
            .arg("sine=frequency=1000:sample_rate=48000:duration=30")
            .args(["-c:v", "libx265", "-preset", "ultrafast", "-x265-params"])
            .arg("keyint=30:bframes=0:log-level=error")
            .args([
                "-tag:v", "hvc1", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2",
            ])
            .arg(&path)
            .status()
            .expect("ffmpeg runs")
            .success();
        assert!(ok, "ffmpeg (libx265) made the H.265 camera's file");
        path
    })
}

fn make_media(name: &str, bframes: &str) -> PathBuf {
    {
        let dir = std::env::temp_dir().join(format!("cascade-rtsp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let ok = Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg("testsrc2=size=640x360:rate=30:duration=90")
            .args(["-f", "lavfi", "-i"])
            .arg("sine=frequency=1000:sample_rate=48000:duration=90")
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-g",
                "30",
                "-bf",
                bframes,
                "-pix_fmt",
                "yuv420p",
                "-c:a",
                "aac",
                "-ac",
                "2",
            ])
            .arg(&path)
            .status()
            .expect("ffmpeg runs (scripts/test.sh installs it)")
            .success();
        assert!(ok, "ffmpeg made the camera's file");
        path
    }
}

/// A port nothing listens on right now (for a server to take, or to stay dead).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// tests/rtsp/server.py on `port`; killed on drop.
struct Camera {
    child: Child,
    port: u16,
}

impl Camera {
    fn start(port: u16, auth: &str) -> Self {
        Self::start_with(port, auth, &[])
    }

    /// With the H.265 mounts (`/h265`, `/h265opus`) too.
    fn start_h265(port: u16) -> Self {
        Self::start_with(
            port,
            "none",
            &["--h265-media".as_ref(), h265_media().as_os_str()],
        )
    }

    fn start_with(port: u16, auth: &str, extra: &[&std::ffi::OsStr]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rtsp/server.py");
        let mut cmd = Command::new(python());
        cmd.arg(script).args(extra);
        let mut child = cmd
            .arg("--media")
            .arg(media())
            .args(["--port", &port.to_string(), "--auth-method", auth])
            .arg("--bframes-media")
            .arg(bframes_media())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("READY"),
            "the RTSP server starts (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 ...): {line:?}"
        );
        Self { child, port }
    }

    fn url(&self, creds: &str, mount: &str) -> String {
        format!("rtsp://{creds}127.0.0.1:{}/{mount}", self.port)
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /api/pulls` as text.
async fn pulls_text(base: &str) -> String {
    reqwest::get(format!("{base}/api/pulls"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The `/api/pulls` row of `stream`.
async fn pull(base: &str, stream: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&pulls_text(base).await).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["stream"] == stream)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until the pull of `stream` is in `state`; returns its row.
async fn wait_state(base: &str, stream: &str, state: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let p = pull(base, stream).await;
        if p["state"] == state {
            return p;
        }
        assert!(Instant::now() < deadline, "{stream} never {state}: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /api/pulls` with the publish token.
/// A camera serving `mount`, an `all` node started with `args`, and an
/// always-on pull of it as `stream`, live (held: dropping either ends it).
async fn live_pull(args: &[&str], stream: &str, mount: &str) -> (Camera, Node) {
    let camera = Camera::start(free_port(), "none");
    let node = Node::start("all", args);
    assert_eq!(
        add_pull(&node.http, stream, &camera.url("", mount), false).await,
        201
    );
    wait_state(&node.http, stream, "live", Duration::from_secs(15)).await;
    (camera, node)
}

async fn add_pull(base: &str, stream: &str, url: &str, on_demand: bool) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/api/pulls"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"stream": stream, "url": url, "on_demand": on_demand, "grace_s": 2}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn viewer_options(base: &str, stream: &str) -> loadtest::whep::ViewerOptions {
    loadtest::whep::ViewerOptions::new(format!("{base}/whep/{stream}"))
}

/// H.264 + AAC camera: a WHEP viewer gets H.264 from a keyframe (with SPS)
/// and Opus; the camera is killed and restarted on the same port and the
/// same viewer (no new WHEP exchange) gets frames again from a keyframe.
#[tokio::test]
async fn camera_plays_and_a_viewer_survives_a_camera_restart() {
    let port = free_port();
    let camera = Camera::start(port, "none");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        format!(
            "[[pull]]\nstream = \"cam1\"\nurl = \"{}\"\n",
            camera.url("", "cam")
        ),
    )
    .unwrap();
    let node = Node::start("all", &["--config", file.to_str().unwrap()]);
    let base = node.http.clone();
    wait_state(&base, "cam1", "live", Duration::from_secs(15)).await;
    let streams: serde_json::Value = reqwest::get(format!("{base}/api/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(streams[0]["protocol"], "rtsp", "{streams}");
    assert_eq!(streams[0]["pull"]["state"], "live", "{streams}");

    let mut v = loadtest::whep::Viewer::start(viewer_options(&base, "cam1"))
        .await
        .unwrap();
    v.wait_connected().await.unwrap();
    v.wait_video_frames(90, Duration::from_secs(15))
        .await
        .unwrap();

    // The camera dies: the pull reports it, the stream stays published.
    drop(camera);
    let p = wait_state(&base, "cam1", "error", Duration::from_secs(10)).await;
    eprintln!("camera gone: {p}");
    let before = v.video_frames();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        v.video_frames() <= before + 2,
        "no frames from a dead camera"
    );
    assert!(!v.is_finished(), "the viewer stays through the outage");

    // It reboots: the same viewer resumes.
    let restarted = Instant::now();
    let _camera = Camera::start(port, "none");
    let up = restarted.elapsed();
    v.wait_video_frames(before + 60, Duration::from_secs(30))
        .await
        .unwrap();
    let resumed = restarted.elapsed();
    eprintln!(
        "camera restart → frames at the viewer again: {:.2} s (server start {:.2} s of it)",
        resumed.as_secs_f64(),
        up.as_secs_f64()
    );
    wait_state(&base, "cam1", "live", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = v.stop().await.unwrap();
    eprintln!("viewer: {r:?}");
    assert!(r.connected);
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.keyframes >= 2, "a keyframe after the restart: {r:?}");
    assert_eq!(r.video_codec.as_deref(), Some("H264"), "{r:?}");
    assert_eq!(
        r.audio_codec.as_deref().map(str::to_ascii_lowercase),
        Some("opus".into())
    );
    assert!(r.audio_frames >= 150, "Opus every 20 ms: {r:?}");
    let m = metrics(&base).await;
    assert!(metric_sum(&m, "cascade_rtsp_reconnects_total") >= 1.0);
    assert!(metric_sum(&m, "cascade_rtsp_frames_total") > 200.0);
    // Latency inside cascade: camera frame in (ingest_us) → RTP out.
    let delay = metric_sum(&m, "cascade_edge_egress_delay_seconds_sum")
        / metric_sum(&m, "cascade_edge_egress_delay_seconds_count").max(1.0);
    eprintln!(
        "mean frame arrival from the camera → sent to the viewer: {:.2} ms",
        delay * 1000.0
    );
    assert!(delay < 0.1, "{delay} s");
}

/// G.711 PCMU camera audio arrives as Opus at 50 packets a second.
#[tokio::test]
async fn g711_camera_audio_becomes_opus() {
    let (_camera, node) = live_pull(&[], "g", "g711").await;
    let base = node.http.clone();
    let r = common::view(&base, "g", 5).await;
    eprintln!("g711 viewer: {r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert_eq!(
        r.audio_codec.as_deref().map(str::to_ascii_lowercase),
        Some("opus".into())
    );
    assert!(r.audio_frames >= 200, "Opus every 20 ms for 5 s: {r:?}");
    if let Some(d) = r.av_drift_ms {
        assert!(d.abs() < 60.0, "A/V drift {d} ms");
    }
}

/// Digest and Basic auth from the URL; wrong credentials, a dead port and a
/// camera with no usable codec give clear error states; the password is
/// never in the API or the node's logs.
#[tokio::test]
async fn auth_errors_and_no_password_anywhere() {
    const PASSWORD: &str = "Sup3rS3cretPw";
    let digest = Camera::start(free_port(), "digest");
    let basic = {
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rtsp/server.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg("--media")
            .arg(media())
            .args(["--port", &port.to_string(), "--auth-method", "basic"])
            .args(["--password", PASSWORD])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("READY"), "{line:?}");
        Camera { child, port }
    };
    let open = Camera::start(free_port(), "none");
    // The node's log goes to a file we read afterwards.
    let log = tempfile::NamedTempFile::new().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut node = Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["all", "--http", &http, "--rtmp", "127.0.0.1:0"])
        .args(["--udp", "127.0.0.1:0", "--tcp", "127.0.0.1:0"])
        .args(["--publish-token", TOKEN])
        .env("CASCADE_LOG", "debug")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://{http}");
    let up = Instant::now();
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(up.elapsed() < Duration::from_secs(20), "node starts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The digest camera's password is s3cret (server.py's default).
    let digest_ok = digest.url("admin:s3cret@", "cam");
    assert_eq!(add_pull(&base, "dig", &digest_ok, false).await, 201);
    let basic_ok = basic.url(&format!("admin:{PASSWORD}@"), "cam");
    assert_eq!(add_pull(&base, "bas", &basic_ok, false).await, 201);
    let wrong = basic.url("admin:Wr0ngPassw0rd@", "cam");
    assert_eq!(add_pull(&base, "wrong", &wrong, false).await, 201);
    let dead = format!("rtsp://admin:{PASSWORD}@127.0.0.1:{}/cam", free_port());
    assert_eq!(add_pull(&base, "dead", &dead, false).await, 201);
    assert_eq!(
        add_pull(&base, "mj", &open.url("", "mjpeg"), false).await,
        201
    );
    // Refused at the door: duplicates, bad URLs, no token.
    assert_eq!(add_pull(&base, "dig", &digest_ok, false).await, 409);
    assert_eq!(add_pull(&base, "x", "http://cam/x", false).await, 400);
    let no_token = reqwest::Client::new()
        .post(format!("{base}/api/pulls"))
        .json(&serde_json::json!({"stream": "y", "url": "rtsp://h/x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status().as_u16(), 401);

    wait_state(&base, "dig", "live", Duration::from_secs(15)).await;
    wait_state(&base, "bas", "live", Duration::from_secs(15)).await;
    let w = wait_state(&base, "wrong", "error", Duration::from_secs(15)).await;
    let e = w["error"].as_str().unwrap();
    assert!(e.contains("401") && e.contains("credentials"), "{e}");
    let d = wait_state(&base, "dead", "error", Duration::from_secs(15)).await;
    assert!(d["error"].as_str().unwrap().contains("refused"), "{d}");
    let mj = wait_state(&base, "mj", "error", Duration::from_secs(15)).await;
    assert!(
        mj["error"]
            .as_str()
            .unwrap()
            .contains("no supported video codec"),
        "{mj}"
    );
    // Errors do not disturb the others.
    assert_eq!(pull(&base, "dig").await["state"], "live");
    let text = pulls_text(&base).await;
    eprintln!("/api/pulls: {text}");
    assert!(!text.contains(PASSWORD) && !text.contains("Wr0ng") && !text.contains("s3cret"));
    assert!(text.contains(&format!("rtsp://127.0.0.1:{}/cam", basic.port)));
    // DELETE ends the stream.
    let del = reqwest::Client::new()
        .delete(format!("{base}/api/pulls/bas"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 200);
    assert!(pull(&base, "bas").await.is_null());
    let _ = node.kill();
    let _ = node.wait();
    let logs = std::fs::read_to_string(log.path()).unwrap();
    assert!(logs.contains("rtsp pull"), "the log has the pulls");
    for secret in [PASSWORD, "Wr0ngPassw0rd", "s3cret"] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
}

/// On demand: nothing connects until a viewer asks; the viewer's WHEP
/// request waits for the camera instead of getting 404; the pull
/// disconnects `grace` after the last viewer leaves.
#[tokio::test]
async fn on_demand_connects_on_the_first_viewer_and_leaves_after_the_last() {
    let camera = Camera::start(free_port(), "none");
    let node = Node::start("all", &[]);
    let base = node.http.clone();
    // grace_s = 2 (add_pull).
    assert_eq!(
        add_pull(&base, "od", &camera.url("", "cam"), true).await,
        201
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pull(&base, "od").await["state"], "idle");
    assert!(!pulls_text(&base).await.contains("live"));
    let asked = Instant::now();
    let mut v = loadtest::whep::Viewer::start(viewer_options(&base, "od"))
        .await
        .expect("the WHEP request waits for the camera, no 404");
    v.wait_connected().await.unwrap();
    v.wait_video_frames(30, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!(
        "on demand: WHEP POST → 30 frames at the viewer in {:.2} s",
        asked.elapsed().as_secs_f64()
    );
    assert_eq!(pull(&base, "od").await["state"], "live");
    // DELETE: the session ends now (a viewer that just vanishes counts
    // until the 10 s consent timeout).
    let (status, r) = v.delete().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    let left = Instant::now();
    wait_state(&base, "od", "idle", Duration::from_secs(8)).await;
    eprintln!(
        "on demand: last viewer gone → idle in {:.2} s (grace 2 s)",
        left.elapsed().as_secs_f64()
    );
    // Readers are counted once a second: the grace runs from the last count.
    assert!(
        left.elapsed() >= Duration::from_secs(1),
        "not before the grace"
    );
    assert!(
        left.elapsed() < Duration::from_secs(5),
        "soon after the grace"
    );
    let streams = reqwest::get(format!("{base}/api/streams"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!streams.contains("\"od\""), "unpublished: {streams}");
    // A second viewer starts it again.
    let r = common::view(&base, "od", 3).await;
    assert!(r.video_frames > 30, "{r:?}");
}

/// Split cluster: the pull runs on the ingest node (on demand there runs
/// always-on), the relay carries it to the origin, an edge plays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_cluster_ingest_pulls_and_an_edge_plays() {
    use common::SECRET;
    let camera = Camera::start(free_port(), "none");
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().unwrap();
    let ingest = Node::start("ingest", &["--cluster-secret", SECRET, "--origin", &quic]);
    let edge = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    assert_eq!(
        add_pull(&ingest.http, "cam", &camera.url("", "cam"), true).await,
        201
    );
    // On an ingest node on-demand pulls connect at once.
    wait_state(&ingest.http, "cam", "live", Duration::from_secs(15)).await;
    common::wait_live(&origin.http, "cam").await;
    let r = common::view(&edge.http, "cam", 4).await;
    eprintln!("split viewer: {r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.video_frames > 60, "{r:?}");
    assert!(r.audio_frames > 100, "{r:?}");
    // The edge has no pulls.
    let s = reqwest::get(format!("{}/api/pulls", edge.http))
        .await
        .unwrap()
        .status();
    assert_eq!(s.as_u16(), 404);
}

/// Hostile or broken cameras: one that answers garbage, one whose DESCRIBE
/// never ends, one that stalls mid-stream (SIGSTOP). Each gets a clear
/// error and a retry; a good camera on the same node plays on.
#[tokio::test]
async fn garbage_endless_describe_and_stall_are_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_port = garbage.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
                let _ = s.write_all(&junk).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            // Accept, read nothing, answer nothing.
            held.push(s);
        }
    });
    let good = Camera::start(free_port(), "none");
    let stalling = Camera::start(free_port(), "none");
    let node = Node::start("all", &[]);
    let base = node.http.clone();
    let garbage_url = format!("rtsp://127.0.0.1:{garbage_port}/x");
    assert_eq!(add_pull(&base, "garbage", &garbage_url, false).await, 201);
    let silent_url = format!("rtsp://127.0.0.1:{silent_port}/x");
    assert_eq!(add_pull(&base, "silent", &silent_url, false).await, 201);
    assert_eq!(
        add_pull(&base, "good", &good.url("", "cam"), false).await,
        201
    );
    assert_eq!(
        add_pull(&base, "stall", &stalling.url("", "cam"), false).await,
        201
    );
    wait_state(&base, "stall", "live", Duration::from_secs(15)).await;
    let stopped = Instant::now();
    let pid = stalling.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let g = wait_state(&base, "garbage", "error", Duration::from_secs(15)).await;
    eprintln!("garbage: {g}");
    let s = wait_state(&base, "stall", "error", Duration::from_secs(10)).await;
    eprintln!(
        "stall detected after {:.1} s: {s}",
        stopped.elapsed().as_secs_f64()
    );
    assert!(s["error"].as_str().unwrap().contains("stalled"), "{s}");
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let d = wait_state(&base, "silent", "error", Duration::from_secs(15)).await;
    assert_eq!(
        d["error"], "timeout: no answer to DESCRIBE within 10 s",
        "{d}"
    );
    wait_state(&base, "stall", "live", Duration::from_secs(20)).await;
    assert_eq!(pull(&base, "good").await["state"], "live");
    let r = common::view(&base, "good", 3).await;
    assert!(r.video_frames > 45, "{r:?}");
}

/// A camera whose H.264 has B-frames, `--bframes drop`: the pull sees the
/// reordering, the catalog says `bframes`, and viewers get decodable video
/// (the edge's B-frame method, docs/bframes.md).
#[tokio::test]
async fn bframes_camera_is_marked_and_plays() {
    let (_camera, node) = live_pull(&["--bframes", "drop"], "b", "bframes").await;
    let base = node.http.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let streams: serde_json::Value = reqwest::get(format!("{base}/api/streams"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if streams[0]["bframes"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "bframes never marked: {streams}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = common::view(&base, "b", 4).await;
    eprintln!("bframes viewer: {r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.video_frames > 20, "{r:?}");
    assert!(r.audio_frames > 100, "{r:?}");
}

/// Waits until `/api/streams` says `bframes: true` for the first stream.
async fn wait_bframes_marked(base: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let streams: serde_json::Value = reqwest::get(format!("{base}/api/streams"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if streams[0]["bframes"] == true {
            return streams;
        }
        assert!(Instant::now() < deadline, "bframes never marked: {streams}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A B-frame camera under `--bframes transcode`: like an RTMP publisher,
/// its video goes through the ffmpeg re-encode, so viewers get all 30 fps
/// and the edge has no B-frames to drop; the source's B-frames are still
/// reported (as tests/rtmp_to_whep.rs asserts for RTMP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bframes_camera_is_reencoded_with_bframes_transcode() {
    let (_camera, node) = live_pull(&["--bframes", "transcode"], "bt", "bframes").await;
    let base = node.http.clone();
    let streams = wait_bframes_marked(&base).await;
    assert_eq!(streams[0]["protocol"], "rtsp");
    // Past the switch to the re-encode's first keyframe.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = common::view(&base, "bt", 4).await;
    eprintln!("re-encoded bframes viewer: {r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.video_frames > 90, "all 30 fps, not only I/P: {r:?}");
    assert!(r.audio_frames > 100, "{r:?}");
    let m = metrics(&base).await;
    assert!(
        metric_sum(&m, "cascade_ingest_transcode_frames_total") > 0.0,
        "frames went through the transcoder"
    );
    assert_eq!(
        metric_sum(&m, "cascade_edge_bframes_dropped_total"),
        0.0,
        "re-encoded without B-frames: nothing to drop"
    );
}

/// A camera with Opus audio (retina cannot demux it: the pull runs on our
/// own depacketizers): H.264 from a keyframe and the camera's Opus, passed
/// through at 50 packets a second.
#[tokio::test]
async fn opus_camera_audio_is_passed_through() {
    let (_camera, node) = live_pull(&[], "op", "opus").await;
    let base = node.http.clone();
    let r = common::view(&base, "op", 5).await;
    eprintln!("opus camera viewer: {r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert_eq!(r.video_codec.as_deref(), Some("H264"), "{r:?}");
    assert!(r.video_frames > 120, "{r:?}");
    assert!(r.keyframes >= 4, "a keyframe a second: {r:?}");
    assert_eq!(
        r.audio_codec.as_deref().map(str::to_ascii_lowercase),
        Some("opus".into())
    );
    assert!(r.audio_frames >= 200, "Opus every 20 ms for 5 s: {r:?}");
    if let Some(d) = r.av_drift_ms {
        assert!(d.abs() < 60.0, "A/V drift {d} ms");
    }
    let m = metrics(&base).await;
    assert_eq!(
        metric_sum(&m, "cascade_ingest_opus_frames_total"),
        0.0,
        "passed through, not transcoded"
    );
}

/// H.265 cameras, with AAC (retina's depacketizer) and with Opus (ours):
/// a WHEP viewer offering H.265 gets it from an IRAP picture with
/// VPS/SPS/PPS, and Opus.
#[tokio::test]
async fn h265_cameras_play_over_whep() {
    let camera = Camera::start_h265(free_port());
    let node = Node::start("all", &[]);
    let base = node.http.clone();
    for (stream, mount) in [("h5", "h265"), ("h5o", "h265opus")] {
        assert_eq!(
            add_pull(&base, stream, &camera.url("", mount), false).await,
            201
        );
    }
    for stream in ["h5", "h5o"] {
        wait_state(&base, stream, "live", Duration::from_secs(15)).await;
        let streams = reqwest::get(format!("{base}/api/streams"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut o = viewer_options(&base, stream);
        o.video_codecs = vec![loadtest::whep::VideoCodec::H265];
        o.duration = Some(Duration::from_secs(4));
        let v = loadtest::whep::Viewer::start(o).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(25), v.finish_duration())
            .await
            .unwrap()
            .unwrap();
        eprintln!("{stream} viewer: {r:?}\n/api/streams: {streams}");
        assert_eq!(r.video_codec.as_deref(), Some("H265"), "{r:?}");
        assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
        assert!(r.video_frames > 90, "{r:?}");
        assert!(r.audio_frames > 150, "{r:?}");
    }
}

/// A TCP proxy in front of a camera that drops `sprop-parameter-sets` from
/// its SDP (fixing Content-Length), so the camera's parameter sets come
/// only in-band. Returns the proxy's port.
async fn strip_sprop_proxy(camera_port: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", camera_port)).await
            else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            tokio::spawn(async move {
                // Rewrite until the SDP went by, then copy verbatim.
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let Ok(n) = sr.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() < head_end + 4 + len {
                        continue;
                    }
                    let body =
                        String::from_utf8_lossy(&buf[head_end + 4..head_end + 4 + len]).to_string();
                    let rest = buf[head_end + 4 + len..].to_vec();
                    let is_sdp = body.starts_with("v=0");
                    let body: String = if is_sdp {
                        body.split("\r\n")
                            .map(|l| {
                                if l.starts_with("a=fmtp:") {
                                    l.split(';')
                                        .filter(|p| !p.trim().starts_with("sprop-"))
                                        .collect::<Vec<_>>()
                                        .join(";")
                                } else {
                                    l.to_string()
                                }
                            })
                            .collect::<Vec<_>>()
                            .join("\r\n")
                    } else {
                        body
                    };
                    let head: String = text[..head_end]
                        .lines()
                        .map(|l| {
                            if l.to_ascii_lowercase().starts_with("content-length:") {
                                format!("Content-Length: {}", body.len())
                            } else {
                                l.to_string()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\r\n");
                    let out = format!("{head}\r\n\r\n{body}");
                    if sw_write(&mut cw, out.as_bytes()).await.is_err() {
                        return;
                    }
                    buf = rest;
                    if is_sdp {
                        if cw.write_all(&buf).await.is_err() {
                            return;
                        }
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        return;
                    }
                }
            });
        }
    });
    port
}

async fn sw_write(w: &mut tokio::net::tcp::OwnedWriteHalf, b: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(b).await
}

/// Cameras whose SDP has no parameter sets (SPS/PPS only in-band): through
/// retina's depacketizer (H.264 + AAC) and through ours (H.264 + Opus), the
/// viewer gets decodable frames from a keyframe.
#[tokio::test]
async fn in_band_only_parameter_sets_play() {
    let camera = Camera::start(free_port(), "none");
    let proxy = strip_sprop_proxy(camera.port).await;
    let node = Node::start("all", &[]);
    let base = node.http.clone();
    for (stream, mount) in [("ib", "inband"), ("ibo", "opus")] {
        let url = format!("rtsp://127.0.0.1:{proxy}/{mount}");
        assert_eq!(add_pull(&base, stream, &url, false).await, 201);
    }
    for stream in ["ib", "ibo"] {
        wait_state(&base, stream, "live", Duration::from_secs(15)).await;
        let r = common::view(&base, stream, 3).await;
        eprintln!("{stream} (no sprop) viewer: {r:?}");
        assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
        assert!(r.video_frames > 60, "{r:?}");
        assert!(r.audio_frames > 100, "{r:?}");
    }
}

/// Camera-to-viewer latency on loopback (docs/rtsp.md "Figures"): a live
/// camera (tests/rtsp/server.py `--live`: videotestsrc, x264 zerolatency,
/// 30 fps) stamps loadtest's SEI tag with the wall clock into every access
/// unit as it hands it to the RTP payloader; the WHEP viewer reads it back
/// on arrival (same machine, same clock): latency = arrival − camera send.
/// Prints mean/p50/p95/max over the frames the camera sent after the
/// viewer's POST; asserts nothing about timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (≈20 s, prints the figures): cargo test --test rtsp -- --ignored camera_to_viewer_latency"]
async fn camera_to_viewer_latency() {
    let camera = Camera::start_with(free_port(), "none", &["--live".as_ref()]);
    // Through retina's depacketizer (video only) and through ours (Opus).
    for mount in ["live", "live-opus"] {
        latency_of(&camera, mount).await;
    }
}

async fn latency_of(camera: &Camera, mount: &str) {
    let node = Node::start("all", &[]);
    let base = node.http.clone();
    assert_eq!(
        add_pull(&base, "lat", &camera.url("", mount), false).await,
        201
    );
    wait_state(&base, "lat", "live", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = common::view(&base, "lat", 15).await;
    assert!(r.tagged_frames > 100, "the camera's tags arrive: {r:?}");
    // Frames the camera sent after the viewer's POST: the cached group a
    // joining viewer gets in a burst is older than the viewer.
    let mut live = r.live_latency_samples_ms.clone();
    assert!(!live.is_empty(), "{r:?}");
    live.sort_by(f64::total_cmp);
    let pct = |q: f64| live[((live.len() - 1) as f64 * q).round() as usize];
    let mean = live.iter().sum::<f64>() / live.len() as f64;
    let m = metrics(&base).await;
    let inside = metric_sum(&m, "cascade_edge_egress_delay_seconds_sum")
        / metric_sum(&m, "cascade_edge_egress_delay_seconds_count").max(1.0);
    eprintln!(
        "/{mount}: camera → viewer latency (loopback, RTSP/TCP): mean {mean:.2} ms, p50 {:.2} ms, \
         p95 {:.2} ms, max {:.2} ms over {} frames; inside cascade (ingest → RTP out) \
         mean {:.2} ms; {} video frames, {} tagged",
        pct(0.5),
        pct(0.95),
        pct(1.0),
        live.len(),
        inside * 1000.0,
        r.video_frames,
        r.tagged_frames
    );
}
