//! VP8, VP9 and AV1 streams (libvpx, libaom via ffmpeg) played by str0m WHEP viewers:
//! our packetizers against str0m's depacketizers over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cascade_origin::catalog::Codec;
use common::{publish_video, vpx_frames, Edge};
use loadtest::whep::{VideoCodec, Viewer, ViewerOptions};

async fn play(codec: Codec, offer: VideoCodec) -> loadtest::whep::ViewerReport {
    let edge = Edge::start(Default::default()).await;
    let frames = vpx_frames(codec).await;
    assert!(frames.len() >= 80 && frames[0].1, "{} frames", frames.len());
    let name = format!("s{codec}");
    let task = publish_video(&edge.registry, &name, codec, frames);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut o = ViewerOptions::new(edge.whep_url(&name));
    o.video_codecs = vec![VideoCodec::H264, offer];
    o.duration = Some(Duration::from_secs(3));
    let r = Viewer::start(o)
        .await
        .unwrap()
        .finish_duration()
        .await
        .unwrap();
    task.abort();
    println!(
        "{codec}: ttff {:?} ms, {} frames, {} keyframes, lost {}, noncontiguous {}",
        r.ttff_ms, r.video_frames, r.keyframes, r.packets_lost, r.noncontiguous_frames
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp8_plays() {
    let r = play(Codec::Vp8, VideoCodec::Vp8).await;
    assert_eq!(r.video_codec.as_deref(), Some("Vp8"));
    assert_eq!(r.first_frame_keyframe, Some(true));
    assert!(r.video_frames >= 80, "{} frames", r.video_frames);
    assert_eq!(r.packets_lost, 0);
    assert_eq!(r.noncontiguous_frames, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp9_plays() {
    let r = play(Codec::Vp9, VideoCodec::Vp9).await;
    assert_eq!(r.video_codec.as_deref(), Some("Vp9"));
    assert!(r.video_frames >= 80, "{} frames", r.video_frames);
    assert_eq!(r.packets_lost, 0);
    assert_eq!(r.noncontiguous_frames, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn av1_plays() {
    let r = play(Codec::Av1, VideoCodec::Av1).await;
    assert_eq!(r.video_codec.as_deref(), Some("Av1"));
    assert!(r.video_frames >= 80, "{} frames", r.video_frames);
    assert_eq!(r.packets_lost, 0);
    assert_eq!(r.noncontiguous_frames, 0);
}
