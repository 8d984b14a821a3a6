//! The B-frame transcoder with real encoders: Debian's ffmpeg publishes
//! libx264 with its default B-frames over RTMP to `rtmp::serve_with`
//! (policy `transcode`, Debian's ffmpeg as the transcoder); a registry
//! subscriber checks that the published video has no B-frames and no
//! composition offsets, keeps the source's frame times and keyframes, and
//! stays in sync with the audio. Failures fall back to the source.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cascade_ingest::rtmp::Policy;
use cascade_ingest::transcode::{find_ffmpeg, Settings};
use cascade_origin::catalog::{Codec, Kind};
use common::media::{av_drift, collect, nal_types, wait_live};
use common::rtmp::{ffmpeg_publish, Encode, Server, WAIT};
use tokio::time::timeout;

/// Reads an unsigned Exp-Golomb value (H.264 9.1) at bit `pos`.
fn ue(data: &[u8], pos: &mut usize) -> Option<u32> {
    let bit = |p: usize| data.get(p / 8).map(|b| (b >> (7 - p % 8)) & 1);
    let mut zeros = 0;
    while bit(*pos)? == 0 {
        zeros += 1;
        *pos += 1;
        if zeros > 31 {
            return None;
        }
    }
    *pos += 1;
    let mut v = 0u32;
    for _ in 0..zeros {
        v = v << 1 | u32::from(bit(*pos)?);
        *pos += 1;
    }
    Some((1 << zeros) - 1 + v)
}

/// Slice types (0–9, H.264 Table 7-6) of the access unit's slices.
fn slice_types(au: &[u8]) -> Vec<u32> {
    cascade_ingest::h264::split_annexb(au)
        .iter()
        .filter(|n| n.first().is_some_and(|b| matches!(b & 0x1f, 1 | 5)))
        .filter_map(|n| {
            let mut pos = 8;
            ue(n, &mut pos)?; // first_mb_in_slice
            ue(n, &mut pos)
        })
        .collect()
}

fn transcode_policy(ffmpeg: PathBuf, max: usize) -> Policy {
    Policy::Transcode(Arc::new(Settings::new(ffmpeg, max)))
}

/// x264 defaults: B-frames, keyframe every 30 frames (1 s at 30 fps).
fn bframe_encode(secs: u32) -> Encode {
    Encode {
        secs,
        bframes: None,
        rate: 48_000,
        channels: 2,
        tone: 440,
    }
}

/// PIDs of this process's transcoding ffmpeg children (`-i pipe:0`).
fn transcode_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == me && String::from_utf8_lossy(&cmd).contains("pipe:0") {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x264_bframes_are_transcoded_in_sync() {
    let ffmpeg = find_ffmpeg(None, std::env::var_os("PATH").as_deref())
        .expect("ffmpeg is required (apt-get install -y ffmpeg)");
    let server = Server::start_with(transcode_policy(ffmpeg, 4)).await;
    let e = bframe_encode(6);
    let name = "bf_transcoded";
    let mut ff = ffmpeg_publish(&server.url(name), e);
    let sub = wait_live(&server.registry, name, Duration::from_secs(20)).await;
    assert_eq!(
        transcode_children().len(),
        1,
        "one ffmpeg transcodes the stream"
    );
    let early = sub.catalog();
    let seen = collect(sub, Duration::from_secs(u64::from(e.secs) + 20)).await;
    let status = timeout(WAIT, ff.wait()).await.unwrap().unwrap();
    assert!(status.success(), "ffmpeg failed: {status}");

    let v = seen.catalog.track(Kind::Video).expect("video track");
    assert_eq!(v.codec, Codec::H264);
    assert!(v.bframes, "the catalog still says the source has B-frames");
    assert_eq!(
        early.track(Kind::Video).map(|t| t.fmtp.clone()),
        Some(v.fmtp.clone()),
        "live with the transcoder's fmtp from the start"
    );
    assert!(
        v.fmtp.starts_with("profile-level-id=") && v.fmtp.ends_with(";packetization-mode=1"),
        "{}",
        v.fmtp
    );

    let video: Vec<_> = seen.video.iter().map(|g| &g.frame).collect();
    let secs = usize::try_from(e.secs).unwrap();
    println!("transcoded: {} video frames", video.len());
    assert!(
        video.len() >= 30 * (secs - 1),
        "only {} video frames",
        video.len()
    );
    assert!(video[0].keyframe, "first frame is not a keyframe");
    // No B-frames left: no composition offsets, no B slices (1 or 6).
    assert!(video.iter().all(|f| f.pts == f.dts), "composition offsets");
    for f in &video {
        let types = slice_types(&f.payload);
        assert!(!types.is_empty(), "no slice in {:?}", nal_types(&f.payload));
        assert!(
            types.iter().all(|t| t % 5 != 1),
            "B slice in the output: {types:?}"
        );
    }
    // In order, every source frame time kept: 30 fps steps of 33/34 ms.
    let steps: Vec<u64> = video.windows(2).map(|w| w[1].pts - w[0].pts).collect();
    assert!(
        steps.iter().all(|&s| s == 33 * 90 || s == 34 * 90),
        "video pts steps {steps:?}"
    );
    // Keyframes where the source has them: every 30 frames (-g 30).
    let keys: Vec<usize> = (0..video.len()).filter(|&i| video[i].keyframe).collect();
    println!("keyframes at frames {keys:?}");
    assert!(keys.len() >= secs - 1, "keyframes {keys:?}");
    assert!(
        keys.windows(2).all(|w| w[1] - w[0] == 30),
        "keyframes not on the source's GOP: {keys:?}"
    );
    for &i in &keys {
        let types = nal_types(&video[i].payload);
        let pos = |t: u8| types.iter().position(|&x| x == t);
        assert!(pos(7).unwrap() < pos(5).unwrap(), "{types:?}");
    }

    // Same timeline as the audio: a constant offset, no drift.
    assert!(seen.audio.len() >= 50 * (secs - 1));
    let (drift, windows) = av_drift(&seen, Duration::from_secs(1));
    println!(
        "A/V offset per second {windows:.3?}, drift {:.1} ms",
        drift * 1000.0
    );
    assert!(drift < 0.040, "A/V drift {drift}");
    // The encoder starts video and audio at 0: the first video pts (x264's
    // first picture) lies within a frame or two of the first audio pts.
    let v0 = video[0].pts as f64 / 90_000.0;
    let a0 = seen.audio[0].frame.pts as f64 / 48_000.0;
    println!(
        "first video pts - first audio pts: {:.1} ms",
        (v0 - a0) * 1000.0
    );
    assert!((v0 - a0).abs() < 0.150, "video starts {v0} vs audio {a0}");

    // The child goes with the stream.
    let gone = timeout(WAIT, async {
        while !transcode_children().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "ffmpeg transcoder still running");
    server.stop().await;
}

/// A transcoder that cannot run (exits at once; or no slot left) leaves
/// the source playing: B-frames passed through, from a keyframe on.
async fn falls_back(policy: Policy, name: &str) {
    let server = Server::start_with(policy).await;
    // Long enough to outlast the stall detection (5 s) by 3 s of frames.
    let e = bframe_encode(9);
    let mut ff = ffmpeg_publish(&server.url(name), e);
    let sub = wait_live(&server.registry, name, Duration::from_secs(20)).await;
    let seen = collect(sub, Duration::from_secs(u64::from(e.secs) + 20)).await;
    let status = timeout(WAIT, ff.wait()).await.unwrap().unwrap();
    assert!(status.success(), "ffmpeg failed: {status}");
    let v = seen.catalog.track(Kind::Video).expect("video track");
    assert!(v.bframes);
    let video: Vec<_> = seen.video.iter().map(|g| &g.frame).collect();
    println!("{name}: {} source frames", video.len());
    assert!(video.len() >= 30 * 2, "only {} video frames", video.len());
    assert!(video[0].keyframe);
    assert!(
        video.iter().any(|f| f.pts != f.dts),
        "the source (with B-frames) is what plays"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transcoder_that_exits_falls_back_to_the_source() {
    // `true` takes any arguments and exits at once, like a broken ffmpeg.
    falls_back(transcode_policy(PathBuf::from("/bin/true"), 4), "bf_exits").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_limit_streams_fall_back_to_the_source() {
    let ffmpeg = find_ffmpeg(None, std::env::var_os("PATH").as_deref()).expect("ffmpeg");
    falls_back(transcode_policy(ffmpeg, 0), "bf_limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transcoder_that_stalls_falls_back_to_the_source() {
    // Takes ffmpeg's arguments, reads nothing, writes nothing: a hung child.
    use std::os::unix::fs::PermissionsExt;
    let script = std::env::temp_dir().join(format!("cascade-stall-{}.sh", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    falls_back(transcode_policy(script.clone(), 4), "bf_stalls").await;
    let _ = std::fs::remove_file(&script);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_replaces_the_transcoder() {
    let ffmpeg = find_ffmpeg(None, std::env::var_os("PATH").as_deref()).expect("ffmpeg");
    let server = Server::start_with(transcode_policy(ffmpeg, 4)).await;
    let name = "bf_takeover";
    let _first = ffmpeg_publish(&server.url(name), bframe_encode(20));
    let _sub = wait_live(&server.registry, name, Duration::from_secs(20)).await;
    let old = transcode_children();
    assert_eq!(old.len(), 1, "{old:?}");
    let _second = ffmpeg_publish(&server.url(name), bframe_encode(20));
    // The new publisher gets its own transcoder; the old one is killed with
    // the connection it served.
    let replaced = timeout(Duration::from_secs(20), async {
        loop {
            let now = transcode_children();
            if now.len() == 1 && now != old {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        replaced.is_ok(),
        "transcoders after the takeover: {:?} (before: {old:?})",
        transcode_children()
    );
    server.stop().await;
    let gone = timeout(WAIT, async {
        while !transcode_children().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "ffmpeg transcoder still running after shutdown"
    );
}
