//! Harness for the root tests: runs the real `cascade` binary in any role
//! on loopback with every port chosen by the OS, reads the addresses back
//! from its start-up banner, and kills it on drop.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A secret for split-cluster tests.
pub const SECRET: &str = "test-cluster-secret-0123456789abcdef";
/// The publish token tests use.
pub const TOKEN: &str = "test-publish-token";

/// A running cascade process.
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub http: String,
    /// `127.0.0.1:PORT` of RTMP, when the role ingests.
    pub rtmp: Option<String>,
    /// `127.0.0.1:PORT` of the relay, when the role serves it.
    pub quic: Option<String>,
    /// Every line of the banner.
    pub banner: Vec<String>,
}

impl Node {
    /// Starts `cascade ROLE` with loopback ports 0 plus `extra` flags.
    pub fn start(role: &str, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            role.into(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--rtmp".into(),
            "127.0.0.1:0".into(),
            "--udp".into(),
            "127.0.0.1:0".into(),
            "--tcp".into(),
            "127.0.0.1:0".into(),
            "--advertise".into(),
            "127.0.0.1".into(),
            "--publish-token".into(),
            TOKEN.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args(&args)
            .env_remove("RUST_LOG")
            .env(
                "CASCADE_LOG",
                std::env::var("CASCADE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cascade binary runs");
        let stdout = child.stdout.take().expect("stdout piped");
        // Bounded: only the banner is read; once `rx` is dropped sends fail and
        // the thread just drains the pipe.
        let (tx, rx) = mpsc::sync_channel(256);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Keep draining after the banner so the child never blocks.
                let _ = tx.send(line);
            }
        });
        let mut banner = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let done = line.contains("(replace STREAM");
                    banner.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("cascade {role} did not print its banner: {banner:?}");
                }
            }
        }
        let find = |prefix: &str| -> Option<String> {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
        };
        let health = find("Health:").expect("health line");
        let http = health
            .split_whitespace()
            .next()
            .and_then(|u| u.strip_suffix("/healthz"))
            .expect("health url")
            .to_string();
        let rtmp = banner.iter().find_map(|l| {
            let l = l.trim().strip_prefix("Server:")?.trim();
            let rest = l.strip_prefix("rtmp://")?;
            rest.strip_suffix("/live").map(str::to_string)
        });
        let quic = find("Relay (QUIC):");
        Self {
            child,
            http,
            rtmp,
            quic,
            banner,
        }
    }

    /// Sends SIGTERM (graceful drain).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Test media shared by the tests of one binary.
pub async fn media(gop_frames: u32) -> std::sync::Arc<loadtest::media::TestMedia> {
    let opts = loadtest::media::Options {
        gop_frames,
        ..Default::default()
    };
    std::sync::Arc::new(
        loadtest::media::TestMedia::generate(opts)
            .await
            .expect("ffmpeg makes test media"),
    )
}

/// Starts a WHIP publisher on `base` for `stream` and waits until it is connected.
pub async fn publish(
    base: &str,
    stream: &str,
    media: std::sync::Arc<loadtest::media::TestMedia>,
    seq_start: u64,
) -> loadtest::whip::Publisher {
    let mut o = loadtest::whip::PublisherOptions::new(format!("{base}/whip/{stream}"));
    o.token = Some(TOKEN.into());
    o.seq_start = seq_start;
    let mut p = loadtest::whip::Publisher::start(o, media)
        .await
        .expect("whip publish accepted");
    tokio::time::timeout(Duration::from_secs(15), p.wait_connected())
        .await
        .expect("publisher connects in time")
        .expect("publisher connects");
    p
}

/// Waits until `GET /api/streams` on `base` lists `stream`.
pub async fn wait_live(base: &str, stream: &str) {
    let url = format!("{base}/api/streams");
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(r) = reqwest::get(&url).await {
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

/// Runs one WHEP viewer of `stream` on `base` for `secs` and returns its report.
pub async fn view(base: &str, stream: &str, secs: u64) -> loadtest::whep::ViewerReport {
    let mut o = loadtest::whep::ViewerOptions::new(format!("{base}/whep/{stream}"));
    o.duration = Some(Duration::from_secs(secs));
    let v = loadtest::whep::Viewer::start(o)
        .await
        .expect("whep viewer accepted");
    tokio::time::timeout(Duration::from_secs(secs + 20), v.finish_duration())
        .await
        .expect("viewer finishes")
        .expect("viewer report")
}

/// Asserts what every healthy viewer must have seen.
pub fn assert_good_viewer(r: &loadtest::whep::ViewerReport) {
    assert!(r.connected, "viewer connected: {r:?}");
    assert_eq!(
        r.first_frame_keyframe,
        Some(true),
        "first frame is a keyframe: {r:?}"
    );
    assert!(r.video_frames > 30, "video frames arrive: {r:?}");
    assert!(r.audio_frames > 20, "audio frames arrive: {r:?}");
    assert!(
        r.seq_gaps.is_empty(),
        "no frame gaps on loopback: {:?}",
        r.seq_gaps
    );
    assert!(
        r.seq_backwards.is_empty(),
        "frames in order: {:?}",
        r.seq_backwards
    );
    if let Some(d) = r.av_drift_ms {
        assert!(d.abs() < 40.0, "A/V drift {d} ms");
    }
}

/// Sum of every series of the Prometheus metric `name` (all label sets) in a
/// `/metrics` text; 0 when it is absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Debian's ffmpeg publishing `secs` of 640×360 30 fps x264 (a keyframe
/// every 2 s) + a 1 kHz AAC tone as FLV to `url` (`rtmp://` or `rtmps://`);
/// `extra` output options go before the URL (`-bf 0`, TLS options, …).
pub fn ffmpeg_publish(url: &str, extra: &[&str], secs: u32) -> tokio::process::Child {
    let video = format!("testsrc2=size=640x360:rate=30:duration={secs}");
    let tone = format!("sine=frequency=1000:sample_rate=44100:duration={secs}");
    tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            &video,
            "-f",
            "lavfi",
            "-i",
            &tone,
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            "60",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-ac",
            "2",
        ])
        .args(extra)
        .args(["-f", "flv", url])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg runs (scripts/test.sh installs it)")
}
