//! Real WHEP viewers (str0m, real sockets on 127.0.0.1) watching a stream fed
//! with ffmpeg-made H.264 + Opus: frame order, fast start mid-GOP, DELETE,
//! publisher takeover and stream end.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{eventually, media, Edge, Publisher};
use loadtest::whep::{Viewer, ViewerOptions};

/// 3 s GOP: a viewer that waited for the next keyframe would wait up to 3 s.
const GOP_FRAMES: u32 = 90;

fn opts(edge: &Edge, stream: &str, secs: u64) -> ViewerOptions {
    let mut o = ViewerOptions::new(edge.whep_url(stream));
    o.duration = Some(Duration::from_secs(secs));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_in_order_from_a_keyframe_with_audio() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let _p = Publisher::start(&edge.registry, "play", media, 0);
    // Join mid-GOP.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let viewer = Viewer::start(opts(&edge, "play", 4)).await.unwrap();
    let r = viewer.finish_duration().await.unwrap();
    println!(
        "viewer: ttff {:?} ms, connect {:?} ms, video {} frames, audio {}, latency p50 {:?} ms p99 {:?} ms",
        r.ttff_ms, r.connect_ms, r.video_frames, r.audio_frames, r.latency_ms_p50, r.latency_ms_p99
    );
    assert!(r.connected);
    assert_eq!(r.video_codec.as_deref(), Some("H264"));
    assert_eq!(
        r.first_frame_keyframe,
        Some(true),
        "first frame must be decodable"
    );
    assert!(r.video_frames >= 90, "video frames {}", r.video_frames);
    assert!(r.audio_frames >= 150, "audio frames {}", r.audio_frames);
    assert!(r.seq_gaps.is_empty(), "gaps {:?}", r.seq_gaps);
    assert!(
        r.seq_backwards.is_empty(),
        "backwards {:?}",
        r.seq_backwards
    );
    assert_eq!(r.packets_lost, 0);
    assert_eq!(r.tagged_frames, r.video_frames);
    let ttff = r.ttff_ms.unwrap();
    assert!(
        ttff < 1000.0,
        "time to first frame {ttff} ms with a 3 s GOP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_joining_mid_gop_start_fast() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let _p = Publisher::start(&edge.registry, "join", media, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ttffs = Vec::new();
    // Joins spread over two GOPs, at different distances from the keyframe.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let v = Viewer::start(opts(&edge, "join", 2)).await.unwrap();
        let r = v.finish_duration().await.unwrap();
        println!(
            "viewer {i}: ttff {:?} ms, seqs {:?}..{:?}, frames {}, keyframes {}, lost {}, noncontiguous {}",
            r.ttff_ms, r.first_seq, r.last_seq, r.video_frames, r.keyframes, r.packets_lost, r.noncontiguous_frames
        );
        assert_eq!(r.first_frame_keyframe, Some(true), "viewer {i}");
        assert!(r.seq_gaps.is_empty(), "viewer {i}: gaps {:?}", r.seq_gaps);
        ttffs.push(r.ttff_ms.unwrap());
    }
    ttffs.sort_by(f64::total_cmp);
    println!("time to first frame (ms, sorted, 3 s GOP, loopback): {ttffs:?}");
    let p50 = ttffs[ttffs.len() / 2];
    assert!(p50 < 600.0, "ttff p50 {p50} ms");
    assert!(ttffs.iter().all(|t| *t < 1500.0), "{ttffs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_frees_the_session() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let _p = Publisher::start(&edge.registry, "del", media, 0);
    let mut v = Viewer::start(opts(&edge, "del", 30)).await.unwrap();
    v.wait_connected().await.unwrap();
    assert_eq!(edge.registry.viewers("del"), 1);
    assert_eq!(edge.rtc.sessions(), 1);
    // Let media flow first (the viewer's DTLS can finish before ours): wait
    // for frames rather than a fixed sleep, which a loaded machine outlasts.
    v.wait_video_frames(1, Duration::from_secs(10))
        .await
        .unwrap();
    let (status, report) = v.delete().await.unwrap();
    assert_eq!(status, 200);
    assert!(report.video_frames > 0);
    let freed = eventually(Duration::from_secs(3), || {
        edge.registry.viewers("del") == 0 && edge.rtc.sessions() == 0
    })
    .await;
    assert!(
        freed,
        "viewers {} sessions {}",
        edge.registry.viewers("del"),
        edge.rtc.sessions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_keeps_viewers_on_a_continuous_timeline() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let first = Publisher::start(&edge.registry, "take", media.clone(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let viewer = Viewer::start(opts(&edge, "take", 7)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // A reconnecting encoder: timestamps restart at 0, sequence tags jump.
    let _second = Publisher::start(&edge.registry, "take", media, 1_000_000);
    drop(first);
    let r = viewer.finish_duration().await.unwrap();
    println!(
        "takeover: video {} frames, gaps {:?}, video drift {:?} ms, a/v drift {:?} ms",
        r.video_frames, r.seq_gaps, r.video_drift_ms, r.av_drift_ms
    );
    assert!(
        r.last_seq.unwrap() >= 1_000_000 + 30,
        "viewer resumed on the new publisher"
    );
    assert!(r.seq_backwards.is_empty());
    assert_eq!(r.seq_gaps.len(), 1, "{:?}", r.seq_gaps);
    assert!(r.keyframes >= 2);
    // Without re-basing, the RTP clock would step back ~3 s at the takeover.
    let drift = r.video_drift_ms.unwrap();
    assert!(
        drift.abs() < 500.0,
        "video clock drift {drift} ms across takeover"
    );
    assert!(
        r.av_drift_ms.unwrap().abs() < 200.0,
        "a/v drift {:?}",
        r.av_drift_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_end_closes_viewer_sessions() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let p = Publisher::start(&edge.registry, "end", media, 0);
    let mut v = Viewer::start(opts(&edge, "end", 30)).await.unwrap();
    v.wait_connected().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(p);
    let closed = eventually(Duration::from_secs(3), || edge.rtc.sessions() == 0).await;
    assert!(closed, "session still open after the stream ended");
    assert_eq!(edge.registry.viewers("end"), 0);
    let _ = v.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_without_cached_group_asks_for_a_keyframe() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    // Mid-GOP start: nothing decodable is cached for 3 s, unless the
    // publisher honours the keyframe request the joining viewer makes.
    let p = Publisher::start_at(&edge.registry, "kf", media, 0, 5, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let viewer = Viewer::start(opts(&edge, "kf", 2)).await.unwrap();
    let r = viewer.finish_duration().await.unwrap();
    println!(
        "no cached group: keyframe requests {}, ttff {:?} ms",
        p.keyframe_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        r.ttff_ms
    );
    assert!(
        p.keyframe_requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(r.first_frame_keyframe, Some(true));
    assert!(r.seq_gaps.is_empty(), "{:?}", r.seq_gaps);
    assert!(r.ttff_ms.unwrap() < 1000.0, "ttff {:?}", r.ttff_ms);
}

/// Fast start must not raise latency for the rest of the session: a
/// receiver anchors its playout clock on the first frame (arrival − media
/// time); if the cached group kept its original timestamps, that anchor
/// would sit the group's age (here ~2.6 s) behind live frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_start_keeps_the_receiver_on_live_time() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let _p = Publisher::start(&edge.registry, "anchor", media, 0);
    // Join 2.6 s into a 3 s GOP: ~78 frames cached.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let samples = common::probe::watch(&edge.whep_url("anchor"), 3).await;
    let video: Vec<_> = samples.iter().filter(|s| s.video).collect();
    assert!(video.len() > 100, "{} video frames", video.len());
    let t0 = video[0].arrival;
    let offset = |s: &common::probe::Sample| {
        s.arrival.duration_since(t0).as_secs_f64() - (s.media_secs - video[0].media_secs)
    };
    let last = video.last().unwrap().arrival;
    let live = video
        .iter()
        .filter(|s| last.duration_since(s.arrival) < Duration::from_secs(1))
        .map(|s| offset(s))
        .fold(f64::INFINITY, f64::min);
    // Positive: live frames arrive later than the first frame's anchor
    // predicts, i.e. the anchor adds no delay; negative: latency added.
    let added_ms = -live * 1000.0;
    let backlog_span = video
        .windows(2)
        .take_while(|w| w[1].media_secs - w[0].media_secs < 0.01)
        .count();
    println!("fast start: {backlog_span} compressed frames, latency added by the first-frame anchor: {added_ms:.0} ms");
    assert!(
        added_ms < 300.0,
        "first-frame anchor {added_ms:.0} ms behind live"
    );
    // RTP media time never goes backwards.
    assert!(video.windows(2).all(|w| w[1].media_secs > w[0].media_secs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_only_and_audio_only_viewers() {
    let edge = Edge::start(Default::default()).await;
    let media = media(GOP_FRAMES).await;
    let _p = Publisher::start(&edge.registry, "parts", media, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut video_only = opts(&edge, "parts", 2);
    video_only.audio = false;
    let mut audio_only = opts(&edge, "parts", 2);
    audio_only.video_codecs.clear();
    let (v, a) = tokio::join!(
        async {
            Viewer::start(video_only)
                .await
                .unwrap()
                .finish_duration()
                .await
                .unwrap()
        },
        async {
            Viewer::start(audio_only)
                .await
                .unwrap()
                .finish_duration()
                .await
                .unwrap()
        },
    );
    assert!(
        v.video_frames >= 40 && v.audio_frames == 0,
        "video-only: {v:?}"
    );
    assert_eq!(v.first_frame_keyframe, Some(true));
    assert!(
        a.audio_frames >= 60 && a.video_frames == 0,
        "audio-only: {a:?}"
    );
    assert_eq!(a.packets_lost, 0);
}
