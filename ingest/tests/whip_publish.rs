//! A real WHIP publisher (str0m, H.264 + Opus made by ffmpeg) against the
//! WHIP endpoint on real sockets: frames reach the registry decodable,
//! keyframe first, on one A/V timeline; a frame is delivered on its own last
//! packet, not held for the next frame; bad tokens are refused; a second
//! publisher takes the stream over.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use cascade_origin::Registry;
use loadtest::media::{Options, TestMedia};
use loadtest::whip::{Publisher, PublisherOptions};
use tokio::time::timeout;

const TOKEN: &str = "test-token-0123456789";

struct Node {
    registry: Arc<Registry>,
    base: String,
}

async fn node() -> Node {
    let rtc = cascade_rtc::Server::bind(cascade_rtc::Config {
        udp: "127.0.0.1:0".parse().unwrap(),
        tcp: None,
        advertise: vec!["127.0.0.1".parse().unwrap()],
        shards: 2,
        max_sessions: 16,
        ..Default::default()
    })
    .await
    .unwrap();
    let registry = Registry::new();
    let app = cascade_ingest::whip::router(registry.clone(), rtc, TOKEN.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Node {
        registry,
        base: format!("http://{addr}"),
    }
}

async fn media() -> Arc<TestMedia> {
    Arc::new(TestMedia::generate(Options::default()).await.unwrap())
}

fn publisher_opts(base: &str, stream: &str) -> PublisherOptions {
    let mut o = PublisherOptions::new(format!("{base}/whip/{stream}"));
    o.token = Some(TOKEN.into());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_reach_registry_keyframe_first_with_audio() {
    let n = node().await;
    let mut p = Publisher::start(publisher_opts(&n.base, "cam"), media().await)
        .await
        .unwrap();
    timeout(Duration::from_secs(10), p.wait_connected())
        .await
        .unwrap()
        .unwrap();
    let sub = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = n.registry.subscribe_local("cam") {
                if s.catalog().tracks.len() == 2 {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("stream goes live with audio and video");
    let cat = sub.catalog();
    assert_eq!(cat.by_name("video").unwrap().codec.to_string(), "H264");
    assert_eq!(cat.by_name("audio").unwrap().codec.to_string(), "opus");
    let mut video = sub.track("video").unwrap();
    let mut audio = sub.track("audio").unwrap();
    let first = timeout(Duration::from_secs(5), video.next())
        .await
        .unwrap()
        .unwrap();
    assert!(first.keyframe, "viewers start at a keyframe");
    let nals: Vec<u8> = loadtest::annexb::nal_units(&first.payload)
        .iter()
        .map(|n| loadtest::annexb::nal_type(n))
        .collect();
    assert!(
        nals.contains(&7) && nals.contains(&8) && nals.contains(&5),
        "SPS+PPS+IDR in {nals:?}"
    );
    let mut last = first.pts;
    for _ in 0..45 {
        let f = timeout(Duration::from_secs(5), video.next())
            .await
            .unwrap()
            .unwrap();
        assert!(f.pts > last, "video pts increase");
        last = f.pts;
    }
    let a = timeout(Duration::from_secs(5), audio.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!a.payload.is_empty());
    // One timeline: the audio and video pts (in seconds) are close.
    let v_s = last as f64 / 90_000.0;
    let a_s = a.pts as f64 / 48_000.0;
    assert!(
        (v_s - a_s).abs() < 2.0,
        "audio {a_s:.3}s vs video {v_s:.3}s"
    );
    let (status, _) = p.delete().await.unwrap();
    assert_eq!(status, 200);
    timeout(Duration::from_secs(5), sub.ended())
        .await
        .expect("DELETE ends the stream");
}

/// A frame completes on its marker bit: the publisher's last frame, with no
/// frame after it, still reaches the registry. (A depacketizer that ended a
/// frame at the next frame's first packet, or an ingest that held a frame
/// back, would never deliver it: the stream stays open until the consent
/// timeout, 10 s, so nothing else flushes it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_frame_arrives_without_a_next_one() {
    let n = node().await;
    let mut p = Publisher::start(publisher_opts(&n.base, "last"), media().await)
        .await
        .unwrap();
    timeout(Duration::from_secs(10), p.wait_connected())
        .await
        .unwrap()
        .unwrap();
    let sub = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = n.registry.subscribe_local("last") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut video = sub.track("video").unwrap();
    let seq = |f: &cascade_origin::frame::Frame| loadtest::tag::find(&f.payload).map(|t| t.seq);
    // Live for a few frames, then stop without telling the server (no
    // DELETE: the stream stays open).
    let mut seen = 0;
    timeout(Duration::from_secs(10), async {
        while seen < 5 {
            seen = seq(&video.next().await.unwrap()).unwrap_or(seen).max(seen);
        }
    })
    .await
    .unwrap();
    let report = p.stop().await.unwrap();
    let last = report.next_seq - 1;
    // Frames arrive in order: `last` was seen already or is still to come.
    timeout(Duration::from_secs(5), async {
        while seen < last {
            let f = video
                .next()
                .await
                .expect("stream open until consent timeout");
            seen = seq(&f).unwrap_or(seen).max(seen);
        }
    })
    .await
    .expect("the last frame sent arrives on its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_401() {
    let n = node().await;
    let mut o = publisher_opts(&n.base, "cam");
    o.token = Some("nope".into());
    assert!(Publisher::start(o, media().await).await.is_err());
    let r = loadtest::http::post_offer(&format!("{}/whip/cam", n.base), "v=0\r\n", None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_keeps_subscribers() {
    let n = node().await;
    let m = media().await;
    let mut p1 = Publisher::start(publisher_opts(&n.base, "s"), m.clone())
        .await
        .unwrap();
    timeout(Duration::from_secs(10), p1.wait_connected())
        .await
        .unwrap()
        .unwrap();
    let sub = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = n.registry.subscribe_local("s") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut video = sub.track("video").unwrap();
    timeout(Duration::from_secs(5), video.next())
        .await
        .unwrap()
        .unwrap();
    let mut o2 = publisher_opts(&n.base, "s");
    o2.seq_start = 1_000_000;
    let mut p2 = Publisher::start(o2, m).await.unwrap();
    timeout(Duration::from_secs(10), p2.wait_connected())
        .await
        .unwrap()
        .unwrap();
    // The subscriber keeps reading and eventually sees the new publisher's
    // frames (SEI sequence numbers from 1,000,000 on).
    let saw_new = timeout(Duration::from_secs(10), async {
        loop {
            let f = video
                .next()
                .await
                .expect("track stays open across takeover");
            if let Some(tag) = loadtest::tag::find(&f.payload) {
                if tag.seq >= 1_000_000 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(saw_new.is_ok(), "frames of the new publisher arrive");
    let _ = p1.stop().await;
    let _ = p2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_with_more_tracks_than_a_stream_carries_is_refused_up_front() {
    let n = node().await;
    let media = (0..17)
        .map(|i| format!("m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:{i}\r\na=sendonly\r\na=rtpmap:96 H264/90000\r\n"))
        .collect::<String>();
    let offer = format!("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n{media}");
    let r = loadtest::http::post_offer(&format!("{}/whip/many", n.base), &offer, Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("17 audio/video m-lines, at most 16"),
        "{}",
        r.body
    );
    assert!(!n.registry.is_live("many"));
}
