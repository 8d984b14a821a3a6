//! OvenMediaEngine's WebSocket signalling from the client side, for the
//! tests that drive `/ws/live/{stream}` without a browser: connect, ask for
//! the offer, answer with a real str0m `Rtc`.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use str0m::change::SdpOffer;
use str0m::format::{Codec as RtcCodec, FormatParams};
use str0m::media::{Frequency, Pt};
use str0m::Rtc;
use tokio_tungstenite::tungstenite::Message;

use super::Edge;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text message, or `None` on close or after `within`.
pub async fn next_json(ws: &mut Ws, within: Duration) -> Option<Value> {
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
pub async fn offer(edge: &Edge, stream: &str) -> (Ws, Value) {
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
pub fn answerer(h264: &[&str]) -> Rtc {
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

/// Answers `offer` with `rtc` over `ws`; returns the answer SDP.
pub async fn answer(ws: &mut Ws, offer: &Value, rtc: &mut Rtc) -> String {
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
