//! Real encoders: Debian's ffmpeg publishes libx264 (default B-frames and
//! `-bf 0`) with AAC at 44.1/48 kHz, mono and stereo, to `rtmp::serve`; a
//! registry subscriber checks video order and keyframes, the B-frame flag,
//! Opus framing, the decoded tone's frequency and A/V drift.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use bytes::Bytes;
use cascade_origin::catalog::{Codec, Kind};
use common::media::{
    av_drift, collect, ffmpeg_decode, nal_types, ogg_opus, rms, tone_frequency, wait_live,
};
use common::rtmp::{ffmpeg_publish, have_ffmpeg, Encode, Server, WAIT};
use tokio::time::timeout;

/// Duration of an Opus packet in ms from its TOC byte (RFC 6716 §3.1);
/// `None` for packets holding more than one frame.
fn opus_frame_ms(toc: u8) -> Option<f64> {
    if toc & 0x03 != 0 {
        return None;
    }
    let config = toc >> 3;
    Some(match config {
        0..=11 => [10.0, 20.0, 40.0, 60.0][usize::from(config % 4)],
        12..=15 => [10.0, 20.0][usize::from(config % 2)],
        _ => [2.5, 5.0, 10.0, 20.0][usize::from(config % 4)],
    })
}

async fn publish_and_check(name: &str, e: Encode) {
    assert!(
        have_ffmpeg(),
        "ffmpeg is required (apt-get install -y ffmpeg)"
    );
    let server = Server::start().await;
    let mut ff = ffmpeg_publish(&server.url(name), e);
    let sub = wait_live(&server.registry, name, Duration::from_secs(15)).await;
    // The B-frame flag is known when the stream goes live (the catalog
    // waits for the first picture, which x264 gives a composition offset).
    let early = sub.catalog();
    let seen = collect(sub, Duration::from_secs(u64::from(e.secs) + 20)).await;
    let status = timeout(WAIT, ff.wait()).await.unwrap().unwrap();
    assert!(status.success(), "ffmpeg failed: {status}");

    let expect_bframes = e.bframes != Some(0);
    let v = seen.catalog.track(Kind::Video).expect("video track");
    assert_eq!(v.codec, Codec::H264);
    assert!(
        v.fmtp.starts_with("profile-level-id=") && v.fmtp.ends_with(";packetization-mode=1"),
        "{}",
        v.fmtp
    );
    assert_eq!(v.bframes, expect_bframes, "catalog bframes flag");
    assert_eq!(
        early.track(Kind::Video).map(|t| t.bframes),
        Some(expect_bframes),
        "flag at go-live"
    );
    let a = seen.catalog.track(Kind::Audio).expect("audio track");
    assert_eq!((a.codec, a.channels), (Codec::Opus, Some(2)));

    // Video: complete, in decode order, keyframes decodable on their own.
    let video: Vec<_> = seen.video.iter().map(|g| &g.frame).collect();
    let secs = usize::try_from(e.secs).unwrap();
    assert!(
        video.len() >= 30 * (secs - 1),
        "only {} video frames",
        video.len()
    );
    assert!(video[0].keyframe, "first frame is not a keyframe");
    for f in video.iter().filter(|f| f.keyframe) {
        let types = nal_types(&f.payload);
        let pos = |t: u8| types.iter().position(|&x| x == t);
        let (sps, pps, idr) = (pos(7).unwrap(), pos(8).unwrap(), pos(5).unwrap());
        assert!(
            sps < idr && pps < idr,
            "parameter sets after IDR: {types:?}"
        );
    }
    assert!(video
        .iter()
        .filter(|f| !f.keyframe)
        .all(|f| !nal_types(&f.payload).contains(&5)));
    for w in video.windows(2) {
        assert!(
            w[1].dts > w[0].dts,
            "dts not increasing: {} then {}",
            w[0].dts,
            w[1].dts
        );
    }
    assert!(video.iter().all(|f| f.pts >= f.dts));
    assert_eq!(
        video.iter().any(|f| f.pts != f.dts),
        expect_bframes,
        "pts != dts presence"
    );

    // Audio: Opus, 20 ms frames, contiguous 48 kHz timestamps.
    let audio: Vec<_> = seen.audio.iter().map(|g| &g.frame).collect();
    assert!(
        audio.len() >= 50 * (secs - 1),
        "only {} audio frames",
        audio.len()
    );
    for f in &audio {
        assert_eq!(
            opus_frame_ms(f.payload[0]),
            Some(20.0),
            "toc {:#x}",
            f.payload[0]
        );
    }
    let steps: Vec<u64> = audio.windows(2).map(|w| w[1].pts - w[0].pts).collect();
    assert!(steps.iter().all(|&s| s == 960), "audio pts steps {steps:?}");

    // The decoded tone has the frequency ffmpeg generated.
    let packets: Vec<Bytes> = audio.iter().map(|f| f.payload.clone()).collect();
    let pcm = ffmpeg_decode(ogg_opus(&packets, 2, 312)).await;
    let freq = tone_frequency(&pcm, 48_000);
    let level = rms(&pcm);
    println!(
        "{name}: decoded tone {freq:.1} Hz (want {}), rms {level:.0}",
        e.tone
    );
    assert!(
        (freq - f64::from(e.tone)).abs() < f64::from(e.tone) * 0.02,
        "tone {freq} Hz"
    );
    assert!(level > 500.0, "decoded audio is silent: rms {level}");

    // A/V drift between the two pts timelines against arrival.
    let (drift, windows) = av_drift(&seen, Duration::from_secs(1));
    println!(
        "{name}: A/V offset per second {windows:.3?}, drift {:.1} ms",
        drift * 1000.0
    );
    assert!(drift < 0.040, "A/V drift {drift}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x264_default_bframes_aac_44k_stereo() {
    let e = Encode {
        secs: 5,
        bframes: None,
        rate: 44_100,
        channels: 2,
        tone: 1000,
    };
    publish_and_check("bf_44k_stereo", e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x264_no_bframes_aac_48k_mono() {
    let e = Encode {
        secs: 4,
        bframes: Some(0),
        rate: 48_000,
        channels: 1,
        tone: 1000,
    };
    publish_and_check("nobf_48k_mono", e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x264_default_bframes_aac_48k_stereo() {
    let e = Encode {
        secs: 4,
        bframes: None,
        rate: 48_000,
        channels: 2,
        tone: 440,
    };
    publish_and_check("bf_48k_stereo", e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x264_no_bframes_aac_44k_mono() {
    let e = Encode {
        secs: 4,
        bframes: Some(0),
        rate: 44_100,
        channels: 1,
        tone: 1000,
    };
    publish_and_check("nobf_44k_mono", e).await;
}
