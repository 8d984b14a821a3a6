//! `--abr-ladder` with the real binary (issue 14): ffmpeg publishes
//! 1280×720 over RTMP, the ingest's ffmpeg child adds 360p and 180p, and
//! `/api/streams` lists the three renditions. Real WHEP viewers (loadtest's
//! str0m viewer) each decode one rendition, checked by the picture size of
//! its keyframes' SPS: Auto gets the source, and viewers that ask for 360p
//! and 180p through the layer endpoint get those steps.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{ffmpeg_publish, metric_sum, wait_live, Node, TOKEN};

/// A WHEP viewer for 10 s; with `layer`, it asks for that rendition through
/// the session's layer endpoint (`{"encodingId": NAME}`) once connected.
async fn viewer(base: &str, stream: &str, layer: Option<&str>) -> loadtest::whep::ViewerReport {
    let mut o = loadtest::whep::ViewerOptions::new(format!("{base}/whep/{stream}"));
    o.duration = Some(Duration::from_secs(10));
    let mut v = loadtest::whep::Viewer::start(o)
        .await
        .expect("whep viewer accepted");
    if let Some(name) = layer {
        v.wait_connected().await.expect("viewer connects");
        let res = reqwest::Client::new()
            .post(format!("{}/layer", v.location()))
            .header("content-type", "application/json")
            .body(format!(r#"{{"encodingId":"{name}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200, "layer {name}");
    }
    tokio::time::timeout(Duration::from_secs(30), v.finish_duration())
        .await
        .expect("viewer ends in time")
        .expect("viewer works")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_ladder_renditions_each_play() {
    let node = Node::start("all", &["--abr-ladder", "720p:2500,360p:800,180p:250"]);
    let rtmp = node
        .rtmp
        .clone()
        .expect("all-in-one prints its RTMP address");
    let url = format!("rtmp://{rtmp}/live/ladder?token={TOKEN}");
    let extra = [
        "-vf",
        "scale=1280:720",
        "-bf",
        "0",
        "-b:v",
        "2500k",
        "-maxrate",
        "2500k",
        "-bufsize",
        "2500k",
    ];
    let mut publisher = ffmpeg_publish(&url, &extra, 30);
    wait_live(&node.http, "ladder").await;

    // The steps join the catalog with their first frames.
    let mut streams = serde_json::Value::Null;
    for _ in 0..50 {
        streams = reqwest::get(format!("{}/api/streams", node.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if streams[0]["renditions"]
            .as_array()
            .is_some_and(|r| r.len() == 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = streams[0]["renditions"]
        .as_array()
        .expect("renditions listed");
    let names: Vec<&str> = r.iter().map(|x| x["name"].as_str().unwrap()).collect();
    // 720p is at the source's height: skipped, the source is that rendition.
    assert_eq!(names, ["source", "360p", "180p"], "{streams}");
    let sizes: Vec<(u64, u64)> = r
        .iter()
        .map(|x| (x["width"].as_u64().unwrap(), x["height"].as_u64().unwrap()))
        .collect();
    assert_eq!(sizes, [(1280, 720), (640, 360), (320, 180)], "{streams}");
    assert_eq!(r[1]["track"], "video-360p");

    let (free, mid, low) = tokio::join!(
        viewer(&node.http, "ladder", None),
        viewer(&node.http, "ladder", Some("360p")),
        viewer(&node.http, "ladder", Some("180p")),
    );
    let _ = publisher.kill().await;
    for (r, size) in [(&free, "1280x720"), (&mid, "640x360"), (&low, "320x180")] {
        eprintln!(
            "{} frames ({} keyframes), size {:?} since {:?} ms, switches {}",
            r.video_frames, r.keyframes, r.video_size, r.size_since_ms, r.size_changes
        );
        assert!(r.connected, "{r:?}");
        assert_eq!(r.video_size.as_deref(), Some(size), "{r:?}");
        assert!(r.video_frames > 60, "decodable frames: {r:?}");
        assert!(r.audio_frames > 100, "audio plays: {r:?}");
    }

    let metrics = reqwest::get(format!("{}/metrics", node.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_sum(&metrics, "cascade_ingest_ladder_failures_total"),
        0.0
    );
}
