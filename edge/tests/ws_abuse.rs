//! The OvenPlayer WebSocket under abuse: a 16 MiB frame is refused from its
//! header (the server closes without waiting for the payload), negotiations
//! count as sessions (503 at the limit before the upgrade), and the
//! `candidate` command is capped per session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ome::{answerer, next_json};
use common::Edge;
use futures::{SinkExt, StreamExt};
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder};
use metrics::{SharedString, Unit};
use serde_json::{json, Value};
use str0m::change::SdpOffer;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

/// Counts `cascade_rtc_candidates_refused_total` for this test process.
struct Refused(Arc<AtomicU64>);

struct Count(Arc<AtomicU64>);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl Recorder for Refused {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == cascade_rtc::metrics::CANDIDATES_REFUSED {
            Counter::from_arc(Arc::new(Count(self.0.clone())))
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_of_the_websocket_is_bounded() {
    let refused = Arc::new(AtomicU64::new(0));
    metrics::set_global_recorder(Refused(refused.clone())).unwrap();
    let edge = Edge::start_with(Default::default(), 2).await;
    let _publisher = edge
        .registry
        .publish("cam", common::catalog(), "test")
        .unwrap();
    let url = format!("ws://{}/ws/live/cam", edge.http);

    // A frame announcing 16 MiB: closed on its header, long before the
    // payload could have arrived (only 64 KiB of it is ever sent).
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let tokio_tungstenite::MaybeTlsStream::Plain(raw) = ws.get_mut() else {
        unreachable!("plain ws")
    };
    let mut frame = vec![0x82u8, 0x80 | 127];
    frame.extend_from_slice(&(16u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&vec![0u8; 64 * 1024]);
    raw.write_all(&frame).await.unwrap();
    let t0 = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server closed on the oversized frame");
    eprintln!("16 MiB frame refused after {} ms", t0.elapsed().as_millis());

    // Negotiations count as sessions: two sockets waiting to ask for an
    // offer fill a node of two; the third is refused before its upgrade.
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge.rtc.sessions() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_eq!(edge.rtc.sessions(), 2, "negotiations counted");
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 503)
        }
        other => panic!("third upgrade refused with 503: {:?}", other.map(|_| ())),
    }
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    while edge.rtc.sessions() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(edge.rtc.sessions(), 0, "released when the socket closes");

    // A candidate flood: 20 messages of 10 candidates; 32 are taken.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Text(
        json!({"command": "request_offer"}).to_string().into(),
    ))
    .await
    .unwrap();
    let offer = next_json(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(offer["command"], "offer", "{offer}");
    let sdp = SdpOffer::from_sdp_string(offer["sdp"]["sdp"].as_str().unwrap()).unwrap();
    let mut rtc = answerer(&["42e01f"]);
    let answer = rtc.sdp_api().accept_offer(sdp).unwrap().to_sdp_string();
    ws.send(Message::Text(
        json!({"command": "answer", "id": offer["id"], "peer_id": 0,
               "sdp": {"type": "answer", "sdp": answer}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    for m in 0..20u16 {
        let cands: Vec<Value> = (0..10u16)
            .map(|i| {
                json!({"candidate": format!("candidate:{m}{i} 1 udp 2130706431 127.0.0.1 {} typ host", 20_000 + m * 10 + i),
                       "sdpMLineIndex": 0})
            })
            .collect();
        ws.send(Message::Text(
            json!({"command": "candidate", "id": offer["id"], "peer_id": 0, "candidates": cands})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.load(Ordering::Relaxed) < 168 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refused.load(Ordering::Relaxed),
        200 - cascade_rtc::DEFAULT_MAX_REMOTE_CANDIDATES as u64,
        "all past the cap refused"
    );
    assert_eq!(edge.rtc.sessions(), 1, "the session itself lives on");
}
