//! The WHIP publisher and WHEP viewers against an in-test str0m server on 127.0.0.1: real ICE,
//! DTLS, SRTP, H.264 + Opus from ffmpeg, and every check a viewer reports.

// Helpers outside #[test] fns too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use loadtest::media::{Options, Profile, TestMedia};
use loadtest::whep::{self, VideoCodec, Viewer, ViewerOptions};
use loadtest::whip::{Publisher, PublisherOptions};
use loadtest::Error;
use tokio::time::timeout;

const TOKEN: &str = "s3cret";
const LIMIT: Duration = Duration::from_secs(60);

async fn media(profile: Profile) -> Arc<TestMedia> {
    let opts = Options {
        profile,
        seconds: 2,
        // Half-second GOPs: the in-test server starts viewers at a keyframe by waiting for one.
        gop_frames: 15,
        ..Options::default()
    };
    Arc::new(
        timeout(LIMIT, TestMedia::generate(opts))
            .await
            .unwrap()
            .unwrap(),
    )
}

async fn publish(server: &common::Server, stream: &str, media: Arc<TestMedia>) -> Publisher {
    let mut opts = PublisherOptions::new(server.whip_url(stream));
    opts.token = Some(TOKEN.into());
    let mut p = timeout(LIMIT, Publisher::start(opts, media))
        .await
        .unwrap()
        .unwrap();
    p.wait_connected().await.unwrap();
    p
}

fn assert_clean(r: &whep::ViewerReport, min_secs: f64) {
    assert!(r.connected, "{r:?}");
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.seq_gaps.is_empty(), "gaps {:?}", r.seq_gaps);
    assert!(
        r.seq_backwards.is_empty(),
        "backwards {:?}",
        r.seq_backwards
    );
    assert_eq!(r.tagged_frames, r.video_frames);
    assert!(r.video_frames as f64 >= 30.0 * min_secs, "{r:?}");
    assert!(r.audio_frames as f64 >= 50.0 * min_secs, "{r:?}");
    assert_eq!(r.audio_codec.as_deref(), Some("Opus"));
    assert_eq!(r.video_codec.as_deref(), Some("H264"));
    assert_eq!(r.packets_lost, 0, "{r:?}");
    let av = r.av_drift_ms.expect("a/v drift measured");
    assert!(av.abs() < 40.0, "a/v drift {av} ms");
    let p99 = r.latency_ms_p99.expect("latency measured");
    assert!(p99 < 1000.0, "latency p99 {p99} ms");
    assert!(r.ttff_ms.is_some_and(|t| t < 2000.0), "{r:?}");
}

#[tokio::test]
async fn generated_media_is_well_formed() {
    let m = media(Profile::ConstrainedBaseline).await;
    assert_eq!(m.video.len(), 60);
    let keys: Vec<usize> = (0..m.video.len())
        .filter(|&i| m.video[i].keyframe)
        .collect();
    assert_eq!(keys, vec![0, 15, 30, 45]);
    for f in m.video.iter().filter(|f| f.keyframe) {
        assert!(loadtest::annexb::au_info(&f.annexb).decodable_start());
    }
    assert_eq!(m.video[1].pts_90k, 3000);
    // 2 s of 20 ms Opus frames (the encoder may add one for its lookahead).
    assert!((100..=102).contains(&m.audio.len()), "{}", m.audio.len());
    assert_eq!(m.audio[1].pts_48k, 960);
    let (profile, _, level) = loadtest::annexb::sps_profile(&m.video[0].annexb).unwrap();
    assert_eq!((profile, level), (66, 31));
}

#[tokio::test]
async fn publisher_to_viewers_in_order_with_audio() {
    let server = common::start(TOKEN).await;
    let m = media(Profile::ConstrainedBaseline).await;
    let publisher = publish(&server, "live", m).await;
    let mut viewers = Vec::new();
    for _ in 0..2 {
        let mut o = ViewerOptions::new(server.whep_url("live"));
        o.duration = Some(Duration::from_secs(6));
        viewers.push(timeout(LIMIT, Viewer::start(o)).await.unwrap().unwrap());
    }
    for v in viewers {
        let r = v.finish_duration().await.unwrap();
        eprintln!("{}", serde_json::to_string(&r).unwrap());
        assert_eq!(r.end, "duration");
        assert_clean(&r, 4.5);
    }
    let (status, report) = publisher.delete().await.unwrap();
    assert_eq!(status, 200);
    assert!(report.connected);
    assert!(report.video_frames >= 180);
    assert!(server.keyframe_requests_sent() >= 1);
    assert!(report.keyframe_requests >= 1, "{report:?}");
}

#[tokio::test]
async fn high_profile_and_viewer_delete() {
    let server = common::start(TOKEN).await;
    let publisher = publish(&server, "hi", media(Profile::High).await).await;
    let mut v = timeout(
        LIMIT,
        Viewer::start(ViewerOptions::new(server.whep_url("hi"))),
    )
    .await
    .unwrap()
    .unwrap();
    v.wait_connected().await.unwrap();
    // 5 s of video: enough for the A/V drift window.
    v.wait_video_frames(150, LIMIT).await.unwrap();
    assert!(publisher.next_seq() >= 150);
    let (status, r) = v.delete().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(r.end, "stopped");
    assert_clean(&r, 4.5);
    publisher.stop().await.unwrap();
}

#[tokio::test]
async fn error_statuses_are_exposed() {
    let server = common::start(TOKEN).await;
    // Unknown stream: 404 with a body, through both the raw helper and the Viewer.
    let sdp = whep::offer_sdp(&[VideoCodec::H264], true).unwrap();
    let reply = whep::post_offer(&server.whep_url("nope"), &sdp, None)
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, "stream not live");
    let err = Viewer::start(ViewerOptions::new(server.whep_url("nope")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Status { status: 404, .. }), "{err}");
    // Wrong publish token: 401, raw and through the Publisher.
    let sdp = loadtest::whip::offer_sdp(Profile::Main, true).unwrap();
    let reply = loadtest::whip::post_offer(&server.whip_url("live"), &sdp, Some("bad"))
        .await
        .unwrap();
    assert_eq!(reply.status, 401);
    let mut o = PublisherOptions::new(server.whip_url("live"));
    o.token = Some("wrong".into());
    let err = Publisher::start(o, media(Profile::ConstrainedBaseline).await)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Status { status: 401, .. }), "{err}");
}
