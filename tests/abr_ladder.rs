//! `--abr-ladder` with the real binary (issue 14): ffmpeg publishes
//! 1280×720 over RTMP, the ingest's ffmpeg child adds 360p and 180p, and
//! `/api/streams` lists the three renditions. Real WHEP viewers (loadtest's
//! str0m viewer) each decode one rendition, checked by the picture size of
//! its keyframes' SPS: Auto climbs to the source, and viewers that ask for
//! 360p and 180p through the layer endpoint get those steps; a viewer that
//! offers no transport-wide congestion feedback gets no estimate and plays
//! the source from the start.
//!
//! On a split cluster the edge receives only the renditions its viewers
//! watch (per-rendition relay subscription): the others are held back at
//! the origin and come when a viewer wants them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{ffmpeg_publish, metric_sum, wait_live, Node, SECRET, TOKEN};

/// A WHEP viewer for 10 s; with `layer`, it asks for that rendition through
/// the session's layer endpoint (`{"encodingId": NAME}`) once connected.
/// Without, it stays on Auto for 20 s: the bandwidth estimate starts it on
/// the lowest rendition and it climbs (its report's size is the last one).
async fn viewer(base: &str, stream: &str, layer: Option<&str>) -> loadtest::whep::ViewerReport {
    viewer_twcc(base, stream, layer, true).await
}

/// [`viewer`], offering transport-wide congestion feedback or not (`twcc`).
async fn viewer_twcc(
    base: &str,
    stream: &str,
    layer: Option<&str>,
    twcc: bool,
) -> loadtest::whep::ViewerReport {
    let mut o = loadtest::whep::ViewerOptions::new(format!("{base}/whep/{stream}"));
    o.duration = Some(Duration::from_secs(if layer.is_some() { 10 } else { 20 }));
    o.twcc = twcc;
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
    let mut publisher = ffmpeg_publish(&url, &SOURCE_720P, 30);
    wait_live(&node.http, "ladder").await;
    // A viewer who joins before the ladder's steps exist (ffmpeg's first
    // frames take a while), behind a link the source does not fit: the
    // source is marked as a rendition meanwhile, so its session gets an
    // estimator and Auto takes it to the step its link carries once the
    // steps come (before session 15 it had no estimator and got the
    // source, 2.5 Mbit/s into 1.2, for its whole session).
    let before = rendition_count(&node.http).await;
    let early_url = format!("{}/whep/ladder", node.http);
    let early = tokio::spawn(async move {
        // Behind 1.2 Mbit/s: the source (2.5 Mbit/s) does not fit, 360p does.
        let mut o = loadtest::whep::ViewerOptions::new(early_url);
        o.duration = Some(Duration::from_secs(20));
        o.cap_bps = Some(1_200_000);
        let v = loadtest::whep::Viewer::start(o)
            .await
            .expect("whep viewer accepted");
        tokio::time::timeout(Duration::from_secs(30), v.finish_duration())
            .await
            .expect("viewer ends in time")
            .expect("viewer works")
    });
    let streams = wait_renditions(&node.http).await;
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

    // And a WHEP client that offers no transport-wide congestion feedback:
    // nothing to estimate with, so its Auto plays the best rendition that
    // flows, the source, from the start (no climb).
    let (free, mid, low, blind) = tokio::join!(
        viewer(&node.http, "ladder", None),
        viewer(&node.http, "ladder", Some("360p")),
        viewer(&node.http, "ladder", Some("180p")),
        viewer_twcc(&node.http, "ladder", None, false),
    );
    let early = early.await.unwrap();
    let _ = publisher.kill().await;
    eprintln!(
        "joined with {before} renditions listed: {} frames, size {:?} since {:?} ms, switches {}",
        early.video_frames, early.video_size, early.size_since_ms, early.size_changes
    );
    assert!(
        before < 3,
        "the ladder's steps were already listed: the early viewer missed the gap it is for"
    );
    // Estimated: a rendition its link carries, not the source.
    assert_eq!(early.video_size.as_deref(), Some("640x360"), "{early:?}");
    assert!(early.video_frames > 60, "{early:?}");
    eprintln!(
        "without TWCC: {} frames, size {:?} since {:?} ms, switches {}",
        blind.video_frames, blind.video_size, blind.size_since_ms, blind.size_changes
    );
    assert_eq!(blind.video_size.as_deref(), Some("1280x720"), "{blind:?}");
    assert_eq!(blind.size_changes, 0, "started on the source: {blind:?}");
    assert!(blind.video_frames > 60, "{blind:?}");
    // The estimating Auto viewer started low and climbed.
    assert!(free.size_changes >= 1, "Auto starts low: {free:?}");
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
    assert_eq!(
        metric_sum(&metrics, "cascade_edge_abr_no_feedback_total"),
        1.0,
        "the viewer without TWCC counted"
    );
}

/// ffmpeg's arguments for a 1280×720 2.5 Mbit/s source without B-frames.
const SOURCE_720P: [&str; 10] = [
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

/// `/api/streams` now.
async fn streams(base: &str) -> serde_json::Value {
    reqwest::get(format!("{base}/api/streams"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// How many renditions `/api/streams` lists for the first stream now.
async fn rendition_count(base: &str) -> usize {
    streams(base).await[0]["renditions"]
        .as_array()
        .map_or(0, Vec::len)
}

/// `/api/streams` once the stream lists its three renditions.
async fn wait_renditions(base: &str) -> serde_json::Value {
    let mut now = serde_json::Value::Null;
    for _ in 0..50 {
        now = streams(base).await;
        if now[0]["renditions"]
            .as_array()
            .is_some_and(|r| r.len() == 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    now
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_receives_only_the_renditions_its_viewers_watch() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin
        .quic
        .clone()
        .expect("origin prints its relay address");
    let ingest = Node::start(
        "ingest",
        &[
            "--cluster-secret",
            SECRET,
            "--origin",
            &quic,
            "--abr-ladder",
            "360p:800,180p:250",
        ],
    );
    let edge = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let rtmp = ingest.rtmp.clone().expect("ingest prints its RTMP address");
    let url = format!("rtmp://{rtmp}/live/ladder?token={TOKEN}");
    let mut publisher = ffmpeg_publish(&url, &SOURCE_720P, 50);
    wait_live(&origin.http, "ladder").await;
    let streams = wait_renditions(&origin.http).await;
    assert_eq!(streams[0]["renditions"].as_array().map(Vec::len), Some(3));

    // A viewer on a slow link picks 180p: after the 2 s linger the edge
    // holds back the source and 360p, and still plays 180p.
    let low = viewer(&edge.http, "ladder", Some("180p"));
    let watch = async {
        tokio::time::sleep(Duration::from_secs(7)).await;
        metrics(&edge.http).await
    };
    let (low, during) = tokio::join!(low, watch);
    let held = metric_sum(&during, "cascade_origin_relay_renditions_held");
    eprintln!(
        "180p viewer: {} frames, size {:?}; renditions held at the edge: {held}",
        low.video_frames, low.video_size
    );
    assert_eq!(low.video_size.as_deref(), Some("320x180"), "{low:?}");
    assert!(low.video_frames > 60, "{low:?}");
    assert!(low.audio_frames > 100, "{low:?}");
    assert_eq!(
        held, 2.0,
        "source and 360p held back while only 180p is watched"
    );
    let selects = metric_sum(
        &metrics(&origin.http).await,
        "cascade_origin_relay_selects_total",
    );
    assert!(selects >= 1.0, "the origin heard the edge's selection");

    // A new viewer on Auto climbs to the source again: asked for and played.
    let auto = viewer(&edge.http, "ladder", None).await;
    let _ = publisher.kill().await;
    eprintln!(
        "auto viewer: {} frames, size {:?}",
        auto.video_frames, auto.video_size
    );
    assert_eq!(auto.video_size.as_deref(), Some("1280x720"), "{auto:?}");
    assert!(auto.video_frames > 60, "{auto:?}");
}
