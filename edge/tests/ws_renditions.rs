//! OvenPlayer's quality menu over OME's WebSocket signalling, driven by a
//! Rust client with a real str0m `Rtc` that connects and receives: a stream
//! with renditions sends the `playlist` notification after the answer;
//! `change_rendition` by name switches the video (the frames' rendition
//! tags follow) and is confirmed by `rendition_changed`; `auto: true` hands
//! the choice back. Shapes as OvenPlayer 0.10's WebRTCLoader reads them.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ladder::{ladder_media, publish, TAG_BASE};
use common::ome::{answer, answerer, next_json, offer, Ws};
use common::Edge;
use futures::SinkExt;
use serde_json::{json, Value};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message;

/// Drives `rtc` over `sock`, recording the rendition of each video frame
/// in `seen` and its latency from the publisher (µs, loopback's shared
/// clock) in `late`.
fn drive(
    mut rtc: Rtc,
    sock: UdpSocket,
    local: SocketAddr,
    seen: Arc<Mutex<Vec<u64>>>,
    late: Arc<Mutex<Vec<u64>>>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = loop {
                match rtc.poll_output() {
                    Ok(Output::Timeout(t)) => break t,
                    Ok(Output::Transmit(t)) => {
                        let _ = sock.send_to(&t.contents, t.destination).await;
                    }
                    Ok(Output::Event(Event::MediaData(d))) => {
                        if let Some(t) = loadtest::tag::find(&d.data) {
                            seen.lock().unwrap().push(t.seq / TAG_BASE);
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_micros() as u64);
                            late.lock().unwrap().push(now.saturating_sub(t.sent_us));
                        }
                    }
                    Ok(Output::Event(_)) => {}
                    Err(_) => return,
                }
            };
            let wait = timeout.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
                Ok(Ok((n, source))) => {
                    if let Ok(r) = Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                        if rtc.handle_input(Input::Receive(Instant::now(), r)).is_err() {
                            return;
                        }
                    }
                }
                _ => {
                    if rtc.handle_input(Input::Timeout(Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// An OvenPlayer stand-in on `stream`: the socket, the server's offer and
/// the rendition of each video frame received so far.
async fn play(edge: &Edge, stream: &str) -> (Ws, Value, Arc<Mutex<Vec<u64>>>) {
    let (mut ws, offer) = offer(edge, stream).await;
    let mut rtc = answerer(&["42e01f"]);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sock.local_addr().unwrap();
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    answer(&mut ws, &offer, &mut rtc).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    drive(rtc, sock, local, seen.clone(), Default::default());
    (ws, offer, seen)
}

/// Notifications until one of `kind` that satisfies `ok`.
async fn until(ws: &mut Ws, kind: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = next_json(ws, left)
            .await
            .unwrap_or_else(|| panic!("no {kind} notification"));
        if v["command"] == "notification" && v["type"] == kind && ok(&v) {
            return v;
        }
    }
}

/// The renditions of the last five frames, newest first.
fn newest(seen: &Arc<Mutex<Vec<u64>>>) -> Vec<u64> {
    seen.lock().unwrap().iter().rev().take(5).copied().collect()
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playlist_change_rendition_and_rendition_changed() {
    let edge = Edge::start(Default::default()).await;
    let _p = publish(&edge.registry, "menu", ladder_media().await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ws, offer, seen) = play(&edge, "menu").await;

    // The playlist, as OvenPlayer reads it: renditions[i].name and
    // video_track.video.{bitrate,width,height}; auto.
    let playlist = until(&mut ws, "playlist", |_| true).await;
    let m = &playlist["message"];
    assert_eq!(m["auto"], true, "{playlist}");
    let r = m["renditions"].as_array().unwrap();
    let names: Vec<&str> = r.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["f", "h", "q"]);
    assert_eq!(r[0]["video_track"]["video"]["height"], 720);
    assert_eq!(r[2]["video_track"]["video"]["width"], 320);
    assert_eq!(r[1]["video_track"]["video"]["bitrate"], 1_280_000);
    assert!(r[0]["audio_track"].is_object());

    let last = |seen: &Arc<Mutex<Vec<u64>>>| seen.lock().unwrap().last().copied();
    assert!(
        common::eventually(Duration::from_secs(5), || last(&seen) == Some(0)).await,
        "plays the default rendition"
    );

    // A pick from the menu: setCurrentQuality sends the name and auto false.
    send(
        &mut ws,
        json!({"command": "change_rendition", "id": offer["id"], "rendition_name": "q", "auto": false}),
    )
    .await;
    let changed = until(&mut ws, "rendition_changed", |v| {
        v["message"]["rendition_name"] == "q"
    })
    .await;
    assert_eq!(changed["message"]["auto"], false, "{changed}");
    assert_eq!(
        changed["auto"], false,
        "OvenPlayer reads auto at the top level"
    );
    assert!(
        common::eventually(Duration::from_secs(3), || last(&seen) == Some(2)).await,
        "the video is the 320×180 rendition: {:?}",
        newest(&seen)
    );

    // An unknown name: a warning, nothing changes.
    send(
        &mut ws,
        json!({"command": "change_rendition", "id": offer["id"], "rendition_name": "nope", "auto": false}),
    )
    .await;
    let warning = until(&mut ws, "warning", |_| true).await;
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("unknown rendition"),
        "{warning}"
    );

    // Back to Auto (setAutoQuality(true)): the default rendition again.
    send(
        &mut ws,
        json!({"command": "change_rendition", "id": offer["id"], "auto": true}),
    )
    .await;
    let changed = until(&mut ws, "rendition_changed", |v| {
        v["message"]["rendition_name"] == "f"
    })
    .await;
    assert_eq!(changed["auto"], true, "{changed}");
    assert!(
        common::eventually(Duration::from_secs(3), || last(&seen) == Some(0)).await,
        "auto plays the default rendition"
    );
}

/// A viewer that joined a simulcast stream before its other layers came
/// (one rendition, no menu) gets the playlist when they come, and its
/// `change_rendition` works from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_who_joined_before_the_renditions_gets_the_playlist_then() {
    let edge = Edge::start(Default::default()).await;
    let _p = common::ladder::publish_with(
        &edge.registry,
        "latemenu",
        ladder_media().await,
        Some(Duration::from_millis(1500)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ws, offer, seen) = play(&edge, "latemenu").await;
    let playlist = until(&mut ws, "playlist", |_| true).await;
    let r = playlist["message"]["renditions"].as_array().unwrap();
    let names: Vec<&str> = r.iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["f", "h", "q"], "{playlist}");
    send(
        &mut ws,
        json!({"command": "change_rendition", "id": offer["id"], "rendition_name": "h", "auto": false}),
    )
    .await;
    until(&mut ws, "rendition_changed", |v| {
        v["message"]["rendition_name"] == "h"
    })
    .await;
    let last = |seen: &Arc<Mutex<Vec<u64>>>| seen.lock().unwrap().last().copied();
    assert!(
        common::eventually(Duration::from_secs(8), || last(&seen) == Some(1)).await,
        "plays h: {:?}",
        last(&seen)
    );
}

/// A stream with one video track sends no playlist (OvenPlayer then shows
/// no quality menu, as before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_rendition_streams_send_no_playlist() {
    let edge = Edge::start(Default::default()).await;
    let _p = common::Publisher::start(&edge.registry, "plain", common::media(30).await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ws, offer) = offer(&edge, "plain").await;
    let mut rtc = answerer(&["42e01f"]);
    answer(&mut ws, &offer, &mut rtc).await;
    if let Some(v) = next_json(&mut ws, Duration::from_millis(800)).await {
        assert_ne!(v["type"], "playlist", "{v}");
    }
}

/// A player whose answer drops the transport-wide congestion extension
/// the edge offered (with estimation on, the binary's default) sends no
/// feedback: str0m's estimate would stay at its start, low, and hold Auto
/// on the lowest rendition. It gets no estimation instead: Auto plays the
/// best rendition that flows, unpaced, as with `--abr=false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_transport_feedback_gets_the_best_rendition() {
    let edge = Edge::start(cascade_edge::Config {
        abr: true,
        ..Default::default()
    })
    .await;
    let _p = publish(&edge.registry, "nofb", ladder_media().await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ws, offer) = offer(&edge, "nofb").await;
    let mut rtc = answerer(&["42e01f"]);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sock.local_addr().unwrap();
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let sdp =
        str0m::change::SdpOffer::from_sdp_string(offer["sdp"]["sdp"].as_str().unwrap()).unwrap();
    let full = rtc.sdp_api().accept_offer(sdp).unwrap().to_sdp_string();
    assert!(full.contains("transport-wide-cc"), "str0m answers with it");
    let stripped: String = full
        .split_inclusive("\r\n")
        .filter(|l| !l.contains("transport-wide-cc"))
        .collect();
    send(
        &mut ws,
        json!({"command": "answer", "id": offer["id"], "peer_id": 0,
               "sdp": {"type": "answer", "sdp": stripped}}),
    )
    .await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let late = Arc::new(Mutex::new(Vec::new()));
    drive(rtc, sock, local, seen.clone(), late.clone());
    let playlist = until(&mut ws, "playlist", |_| true).await;
    assert_eq!(playlist["message"]["auto"], true, "{playlist}");
    let last = |seen: &Arc<Mutex<Vec<u64>>>| seen.lock().unwrap().last().copied();
    assert!(
        common::eventually(Duration::from_secs(5), || last(&seen) == Some(0)).await,
        "Auto plays the best rendition (f): {:?}",
        newest(&seen)
    );
    // Unpaced: f's frames keep coming at its rate (30 fps published) and
    // on time, not queued behind a pacer held to the estimator's start
    // (1 Mbit/s × 1.1 for f's 2.56 Mbit/s: str0m drains such a queue
    // within 2 s, so the frames would still come, late).
    let before = seen.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = seen.lock().unwrap()[before..]
        .iter()
        .filter(|&&r| r == 0)
        .count();
    assert!(got >= 60, "{got} frames of f in 3 s");
    let mut lat: Vec<u64> = late.lock().unwrap()[before..].to_vec();
    lat.sort_unstable();
    let p90 = lat[lat.len() * 9 / 10];
    assert!(
        p90 < 500_000,
        "90th percentile latency {p90} µs on loopback"
    );
}
