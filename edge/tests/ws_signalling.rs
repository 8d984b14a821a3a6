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
use common::Edge;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::change::SdpOffer;
use str0m::format::{Codec as RtcCodec, FormatParams};
use str0m::media::{Frequency, Pt};
use str0m::Rtc;
use tokio_tungstenite::tungstenite::Message;

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
            },
            TrackInfo {
                name: "audio".into(),
                codec: Codec::Opus,
                fmtp: "minptime=10;useinbandfec=1".into(),
                channels: Some(2),
                bframes: false,
            },
        ],
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws, within: Duration) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(within, ws.next()).await.ok()??.ok()?;
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Connects, asks for the offer and returns it.
async fn offer(edge: &Edge, stream: &str) -> (Ws, Value) {
    let url = format!("ws://{}/ws/live/{stream}", edge.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(
        json!({"command": "request_offer"}).to_string().into(),
    ))
    .await
    .unwrap();
    let offer = next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(offer["command"], "offer", "{offer}");
    (ws, offer)
}

/// A browser-like answerer receiving only Opus and the given H.264
/// profile-level-ids (none: no H.264 at all, like Firefox here).
fn answerer(h264: &[&str]) -> Rtc {
    let mut cfg = Rtc::builder().clear_codecs().enable_opus(true, false);
    for (i, plid) in h264.iter().enumerate() {
        cfg.codec_config().add_config(
            Pt::from(120 + 2 * i as u8),
            Some(Pt::from(121 + 2 * i as u8)),
            RtcCodec::H264,
            Frequency::NINETY_KHZ,
            None,
            FormatParams::parse_line(&format!(
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={plid}"
            )),
        );
    }
    cfg.build(Instant::now())
}

async fn answer(ws: &mut Ws, offer: &Value, rtc: &mut Rtc) -> String {
    let sdp = SdpOffer::from_sdp_string(offer["sdp"]["sdp"].as_str().unwrap()).unwrap();
    let answer = rtc.sdp_api().accept_offer(sdp).unwrap().to_sdp_string();
    ws.send(Message::Text(
        json!({"command": "answer", "id": offer["id"], "peer_id": 0,
               "sdp": {"type": "answer", "sdp": answer}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    answer
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
