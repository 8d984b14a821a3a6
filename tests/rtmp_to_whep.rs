//! RTMP in, WebRTC out, through the real binary: Debian's ffmpeg publishes
//! x264 (default B-frames, and `-bf 0`) + AAC over RTMP; WHEP viewers get
//! H.264 starting at a keyframe and Opus audio, in sync.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{ffmpeg_publish, metric_sum, view, wait_live, Node, TOKEN};

/// `min_video` frames in 5 s: ≈30 fps, or the I/P frames alone when the
/// edge drops B slices (edge/src/bframes.rs, docs/bframes.md).
/// `node_args` pick the B-frame policy. Returns `/api/streams` and the
/// node's `/metrics` text.
async fn rtmp_plays(
    node_args: &[&str],
    stream: &str,
    extra: &[&str],
    min_video: u64,
) -> (serde_json::Value, String) {
    let node = Node::start("all", node_args);
    let rtmp = node
        .rtmp
        .clone()
        .expect("all-in-one prints its RTMP address");
    let url = format!("rtmp://{rtmp}/live/{stream}?token={TOKEN}");
    let mut child = ffmpeg_publish(&url, extra, 12);
    wait_live(&node.http, stream).await;
    let r = view(&node.http, stream, 5).await;
    assert!(r.connected, "{r:?}");
    assert_eq!(
        r.first_frame_keyframe,
        Some(true),
        "starts at a keyframe: {r:?}"
    );
    assert!(r.video_frames >= min_video, "video for 5 s: {r:?}");
    assert!(r.audio_frames >= 150, "Opus every 20 ms for 5 s: {r:?}");
    assert_eq!(
        r.audio_codec
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("opus")
    );
    assert_eq!(
        r.noncontiguous_frames, 0,
        "no broken frames on loopback: {r:?}"
    );
    if let Some(d) = r.av_drift_ms {
        assert!(d.abs() < 40.0, "A/V drift {d} ms");
    }
    eprintln!(
        "rtmp {stream}: ttff {:?} ms, av drift {:?} ms",
        r.ttff_ms, r.av_drift_ms
    );
    let streams: serde_json::Value = reqwest::get(format!("{}/api/streams", node.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let metrics = reqwest::get(format!("{}/metrics", node.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let _ = child.kill().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    (streams, metrics)
}

/// The default policy where ffmpeg exists: the ingest re-encodes a
/// B-frame stream without B-frames, so viewers get the full frame rate and
/// the edge has nothing to drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_with_bframes_is_transcoded_and_plays_over_whep() {
    let (streams, metrics) = rtmp_plays(&["--bframes", "transcode"], "bft", &[], 100).await;
    assert_eq!(
        metric_sum(&metrics, "cascade_edge_bframes_dropped_total"),
        0.0,
        "re-encoded without B-frames: nothing to drop"
    );
    assert!(
        metric_sum(&metrics, "cascade_ingest_transcode_frames_total") > 0.0,
        "frames went through the transcoder"
    );
    assert_eq!(streams[0]["protocol"], "rtmp");
    assert_eq!(
        streams[0]["bframes"], true,
        "the source's B-frames are still reported: {streams}"
    );
}

/// `--bframes drop`: no re-encode; the edge drops B slices for Chromium's
/// sake and ~8–15 of 30 fps remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_with_bframes_dropped_at_the_edge_plays_over_whep() {
    let (streams, metrics) = rtmp_plays(&["--bframes", "drop"], "bf", &[], 40).await;
    assert!(
        metric_sum(&metrics, "cascade_edge_bframes_dropped_total") > 0.0,
        "the edge counts the B-frames it drops"
    );
    assert_eq!(
        metric_sum(&metrics, "cascade_ingest_transcode_frames_total"),
        0.0,
        "no transcoder with --bframes drop"
    );
    assert_eq!(streams[0]["protocol"], "rtmp");
    assert_eq!(
        streams[0]["bframes"], true,
        "x264 defaults use B-frames: {streams}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_without_bframes_plays_over_whep() {
    let (streams, metrics) = rtmp_plays(&[], "nobf", &["-bf", "0"], 100).await;
    assert_eq!(
        metric_sum(&metrics, "cascade_edge_bframes_dropped_total"),
        0.0,
        "no B-frames, none dropped"
    );
    assert_eq!(
        metric_sum(&metrics, "cascade_ingest_transcode_frames_total"),
        0.0,
        "no B-frames, no transcoder"
    );
    assert_eq!(streams[0]["bframes"], false, "{streams}");
}
