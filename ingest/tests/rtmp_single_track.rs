//! Audio-only and video-only RTMP publishes: after the header wait (about a
//! second) the stream goes live with the one track it has.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use cascade_origin::catalog::{Codec, Kind};
use common::media::{collect, ffmpeg_decode, ogg_opus, tone_frequency, wait_live};
use common::rtmp::{have_ffmpeg, Server};

fn ffmpeg(url: &str, input: &[&str], codec: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-re",
            "-f",
            "lavfi",
        ])
        .args(input)
        .args(["-t", "3"])
        .args(codec)
        .args(["-f", "flv", url])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_only_stream() {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let server = Server::start().await;
    let mut ff = ffmpeg(
        &server.url("radio"),
        &["-i", "sine=frequency=1000:sample_rate=44100"],
        &["-c:a", "aac", "-ac", "2"],
    );
    let sub = wait_live(&server.registry, "radio", Duration::from_secs(10)).await;
    let catalog = sub.catalog();
    assert_eq!(catalog.tracks.len(), 1);
    assert_eq!(catalog.track(Kind::Audio).unwrap().codec, Codec::Opus);
    let seen = collect(sub, Duration::from_secs(20)).await;
    assert!(ff.wait().await.unwrap().success());
    assert!(seen.audio.len() >= 50, "{} audio frames", seen.audio.len());
    let packets: Vec<Bytes> = seen.audio.iter().map(|g| g.frame.payload.clone()).collect();
    let freq = tone_frequency(&ffmpeg_decode(ogg_opus(&packets, 2, 312)).await, 48_000);
    assert!((freq - 1000.0).abs() < 20.0, "tone {freq}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_only_stream() {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let server = Server::start().await;
    let mut ff = ffmpeg(
        &server.url("silent"),
        &["-i", "testsrc2=size=320x240:rate=30"],
        &["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "30"],
    );
    let sub = wait_live(&server.registry, "silent", Duration::from_secs(10)).await;
    let catalog = sub.catalog();
    assert_eq!(catalog.tracks.len(), 1);
    let video = catalog.track(Kind::Video).unwrap();
    assert_eq!(video.codec, Codec::H264);
    assert!(video.bframes, "x264 default B-frames known at go-live");
    let seen = collect(sub, Duration::from_secs(20)).await;
    assert!(ff.wait().await.unwrap().success());
    assert!(seen.video.len() >= 30, "{} video frames", seen.video.len());
    assert!(seen.video[0].frame.keyframe);
    server.stop().await;
}
