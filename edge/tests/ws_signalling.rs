//! OvenMediaEngine's WebSocket signalling (`/ws/live/{stream}`) driven by a
//! Rust client whose answers come from a real str0m `Rtc`: what the player
//! hears when its browser rejects the video or never connects, and the shape
//! of the offer (profiles a Main-only browser accepts, candidates on every
//! m-line and in the `candidates` array).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade_origin::catalog::{Catalog, Codec, TrackInfo};
use common::ome::{answer, answerer, next_json, offer};
use common::Edge;

/// Log lines of this test process (each test binary is its own process
/// under nextest; the buffer is shared by the tests of one `cargo test`).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let w = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn,cascade_edge=info")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        logs
    })
    .clone()
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// x264 High as the ingest's B-frame re-encode sends it.
fn high_catalog() -> Catalog {
    Catalog {
        tracks: vec![
            TrackInfo {
                name: "video".into(),
                codec: Codec::H264,
                fmtp: "profile-level-id=64001e;packetization-mode=1".into(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_video_is_an_error_the_player_shows_and_the_log_names_the_codec() {
    let logs = capture_logs();
    let edge = Edge::start(Default::default()).await;
    let _publisher = edge
        .registry
        .publish("high", high_catalog(), "test")
        .unwrap();
    let (mut ws, offer) = offer(&edge, "high").await;
    let mut rtc = answerer(&[]);
    let sdp = answer(&mut ws, &offer, &mut rtc).await;
    assert!(
        sdp.contains("m=video 0 "),
        "the answer rejects video: {sdp}"
    );
    let msg = next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(msg["code"], 406, "{msg}");
    let text = msg["error"].as_str().unwrap();
    assert!(text.contains("H264") && text.contains("64001e"), "{text}");
    // OvenPlayer closes on `error`; so does the server.
    assert!(next_json(&mut ws, Duration::from_secs(5)).await.is_none());
    let log = logs.text();
    assert!(
        log.lines()
            .any(|l| l.contains("ws viewer refused") && l.contains("H264")),
        "{log}"
    );
    assert_eq!(edge.rtc.sessions(), 0, "no session left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_only_browser_accepts_a_high_stream_and_candidates_are_everywhere() {
    // Whichever test of this binary runs first installs the one global
    // subscriber: it must be the capturing one (`cargo test` runs both in
    // one process; nextest runs each alone).
    let _logs = capture_logs();
    let edge = Edge::start(Default::default()).await;
    let _publisher = edge
        .registry
        .publish("high2", high_catalog(), "test")
        .unwrap();
    let (mut ws, offer) = offer(&edge, "high2").await;
    let sdp = offer["sdp"]["sdp"].as_str().unwrap();
    // Every m-line carries the candidates (a rejected first m-line must
    // not take them away), and so does OME's `candidates` array.
    let sections: Vec<&str> = sdp.split("\r\nm=").skip(1).collect();
    assert_eq!(sections.len(), 2, "{sdp}");
    assert!(sections[0].starts_with("audio"), "audio first: {sdp}");
    for s in &sections {
        assert!(s.contains("a=candidate:"), "{s}");
    }
    let cands = offer["candidates"].as_array().unwrap();
    assert!(!cands.is_empty(), "{offer}");
    assert!(cands[0]["candidate"]
        .as_str()
        .unwrap()
        .starts_with("candidate:"));
    assert_eq!(cands[0]["sdpMLineIndex"], 0);
    // Debian's Chromium receives no High: the answer keeps video through
    // the Main payload type we offer beside the stream's own.
    let mut rtc = answerer(&["4d001f", "42e01f"]);
    let answer = answer(&mut ws, &offer, &mut rtc).await;
    let video = answer.split("m=video").nth(1).unwrap();
    assert!(!video.starts_with(" 0 "), "video accepted: {answer}");
    assert!(video.contains("profile-level-id=4d00"), "{answer}");
    // Without ICE the player is told within a few seconds, not left black.
    let msg = next_json(&mut ws, Duration::from_secs(15)).await.unwrap();
    assert_eq!(msg["code"], 408, "{msg}");
    assert!(
        msg["error"].as_str().unwrap().contains("no ICE connection"),
        "{msg}"
    );
    assert!(next_json(&mut ws, Duration::from_secs(5)).await.is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge.rtc.sessions() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(edge.rtc.sessions(), 0, "the session ended with the report");
}
