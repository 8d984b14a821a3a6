//! RTMP publish → WHEP viewer latency through the real binary, on loopback:
//! Debian's ffmpeg encodes an FLV (x264 + AAC) ahead of time, a minimal RTMP
//! client here replays it in real time and puts our SEI tag (loadtest::tag)
//! with the send wall clock into every video access unit, and a
//! loadtest::whep::Viewer reads it back: latency = arrival − send. Prints
//! p50/p99 (docs/latency.md); asserts only that tagged frames arrive.
//! B-frame streams are measured both ways: re-encoded (`--bframes
//! transcode`, the default; the tag is carried over to the new frame) and
//! passed through (`--bframes drop`).

#![allow(clippy::unwrap_used)]

mod common;
mod rtmp_client;

use std::time::Duration;

use common::{wait_live, Node, TOKEN};
use rtmp_client::{encode_flv, read_flv, replay, Client};

async fn measure(stream: &str, extra: &[&str], node_args: &[&str]) -> loadtest::whep::ViewerReport {
    let flv = encode_flv(16, extra).await;
    let tags = read_flv(&flv);
    let node = Node::start("all", node_args);
    let rtmp = node
        .rtmp
        .clone()
        .expect("all-in-one prints its RTMP address");
    let client = Client::publish(&rtmp, "live", &format!("{stream}?token={TOKEN}")).await;
    let sender = tokio::spawn(replay(client, tags));
    wait_live(&node.http, stream).await;
    // Past the start-up (the cached group's burst), then 10 s of frames.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = common::view(&node.http, stream, 10).await;
    sender.abort();
    r
}

/// The cached group a joining viewer gets first arrives in a burst, its
/// latency the group's age (up to a GOP); live frames follow. Samples count
/// as live from the first one under this bound on.
const LIVE_FROM_MS: f64 = 50.0;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Prints the viewer's figures, and the same over the live frames only
/// (after the cached group). Returns the live p50.
fn print(label: &str, r: &loadtest::whep::ViewerReport) -> f64 {
    let mut live: Vec<f64> = r
        .latency_samples_ms
        .iter()
        .skip_while(|&&ms| ms >= LIVE_FROM_MS)
        .copied()
        .collect();
    live.sort_by(f64::total_cmp);
    eprintln!(
        "rtmp latency {label}: live frames p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples); \
         all frames incl. the cached group p50 {:.1} p99 {:.1} ({} tagged, {} video frames)",
        percentile(&live, 0.5),
        percentile(&live, 0.99),
        percentile(&live, 1.0),
        live.len(),
        r.latency_ms_p50.unwrap_or(f64::NAN),
        r.latency_ms_p99.unwrap_or(f64::NAN),
        r.tagged_frames,
        r.video_frames
    );
    percentile(&live, 0.5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_publish_to_whep_viewer_latency() {
    let nobf = measure("lat-nobf", &["-bf", "0"], &[]).await;
    let nobf_p50 = print("x264 -bf 0", &nobf);
    let tc = measure("lat-bf", &[], &["--bframes", "transcode"]).await;
    let tc_p50 = print("x264 default B-frames, transcoded", &tc);
    let bf = measure("lat-bf", &[], &["--bframes", "drop"]).await;
    print("x264 default B-frames, passed through", &bf);
    eprintln!(
        "rtmp latency added by the B-frame transcode: {:.1} ms (live p50)",
        tc_p50 - nobf_p50
    );
    // Passed through, the edge sends the I/P frames only (docs/bframes.md).
    for (r, min) in [(&nobf, 200), (&tc, 200), (&bf, 60)] {
        assert!(r.connected, "{r:?}");
        assert!(r.tagged_frames >= min, "tagged frames arrive: {r:?}");
        assert!(r.latency_ms_p50.is_some(), "{r:?}");
    }
}
