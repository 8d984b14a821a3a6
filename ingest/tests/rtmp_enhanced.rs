//! Enhanced RTMP (FourCC video) as OBS sends it: H.265 (`hvc1`) and AV1
//! (`av01`). Debian's ffmpeg 5.1 cannot mux E-RTMP, so ffmpeg encodes raw
//! HEVC/AV1 and our client packs the ExVideoTagHeader tags itself, with the
//! parameter sets / sequence header only in the configuration record.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use cascade_ingest::h264::split_annexb;
use cascade_origin::catalog::{Codec, Kind};
use common::media::{collect, wait_live, Seen};
use common::rtmp::{have_ffmpeg, Client, Server, TOKEN};

async fn encode(codec: &[&str], format: &str) -> Vec<u8> {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=320x240:rate=30",
            ])
            .args(["-t", "3", "-pix_fmt", "yuv420p", "-g", "30"])
            .args(codec)
            .args(["-f", format, "-"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Publishes a configuration tag then one frame tag per picture at 30 fps.
async fn publish(name: &str, config: Bytes, frames: Vec<Bytes>) -> Seen {
    let server = Server::start().await;
    let mut c = Client::publish(server.addr, "live", &format!("{name}?token={TOKEN}"))
        .await
        .unwrap();
    let registry = server.registry.clone();
    let n = name.to_string();
    let viewer = tokio::spawn(async move {
        let sub = wait_live(&registry, &n, Duration::from_secs(10)).await;
        collect(sub, Duration::from_secs(20)).await
    });
    c.send(9, 0, config).await.unwrap();
    let start = tokio::time::Instant::now();
    for (i, f) in frames.into_iter().enumerate() {
        let ts = u32::try_from(i).unwrap() * 1000 / 30;
        tokio::time::sleep_until(start + Duration::from_millis(u64::from(ts))).await;
        c.send(9, ts, f).await.unwrap();
        c.drain();
    }
    drop(c);
    let seen = viewer.await.unwrap();
    server.stop().await;
    seen
}

fn hevc_type(nal: &[u8]) -> u8 {
    (nal[0] >> 1) & 0x3f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hevc_over_enhanced_rtmp() {
    let stream = encode(
        &[
            "-c:v",
            "libx265",
            "-bf",
            "0",
            "-x265-params",
            "log-level=error",
        ],
        "hevc",
    )
    .await;
    let nals = split_annexb(&stream);
    let params: Vec<&[u8]> = nals
        .iter()
        .copied()
        .filter(|n| (32..=34).contains(&hevc_type(n)))
        .take(3)
        .collect();
    assert_eq!(params.len(), 3);
    // hvcC: version, profile (Main), 19 bytes we do not read, length size 4.
    let mut hvcc = BytesMut::new();
    hvcc.put_u8(1);
    hvcc.put_u8(1);
    hvcc.put_slice(&[0; 19]);
    hvcc.put_u8(0xff);
    hvcc.put_u8(3);
    for p in &params {
        hvcc.put_u8(0x80 | hevc_type(p));
        hvcc.put_u16(1);
        hvcc.put_u16(u16::try_from(p.len()).unwrap());
        hvcc.put_slice(p);
    }
    let mut config = BytesMut::from(&[0x90, b'h', b'v', b'c', b'1'][..]);
    config.put_slice(&hvcc);
    // Access units: a new one at each VCL NAL starting a picture; parameter
    // sets left out (they travel in hvcC, as MP4-style muxers do).
    let mut units: Vec<(bool, BytesMut)> = Vec::new();
    for n in nals.iter().filter(|n| n.len() > 2) {
        let t = hevc_type(n);
        if (32..=34).contains(&t) || t == 35 {
            continue;
        }
        if t < 32 && n[2] & 0x80 != 0 {
            units.push((false, BytesMut::new()));
        }
        let Some((key, au)) = units.last_mut() else {
            continue;
        };
        *key |= (16..=21).contains(&t);
        au.put_u32(u32::try_from(n.len()).unwrap());
        au.put_slice(n);
    }
    let frames: Vec<Bytes> = units
        .into_iter()
        .map(|(key, au)| {
            // CodedFramesX: no composition offset (no B-frames).
            let mut tag = BytesMut::from(
                &[
                    0x80 | if key { 0x10 } else { 0x20 } | 3,
                    b'h',
                    b'v',
                    b'c',
                    b'1',
                ][..],
            );
            tag.put_slice(&au);
            tag.freeze()
        })
        .collect();
    let seen = publish("hevc", config.freeze(), frames).await;
    let v = seen.catalog.track(Kind::Video).unwrap();
    assert_eq!((v.codec, v.fmtp.as_str()), (Codec::H265, "profile-id=1"));
    assert!(seen.video.len() >= 60, "{} frames", seen.video.len());
    assert!(seen.video[0].frame.keyframe);
    for g in seen.video.iter().filter(|g| g.frame.keyframe) {
        let types: Vec<u8> = split_annexb(&g.frame.payload)
            .iter()
            .map(|n| hevc_type(n))
            .collect();
        assert_eq!(
            &types[..3],
            &[32, 33, 34],
            "keyframe without VPS/SPS/PPS in front: {types:?}"
        );
    }
    assert!(seen
        .video
        .windows(2)
        .all(|w| w[1].frame.dts > w[0].frame.dts));
}

/// The OBUs of a low-overhead bitstream: (type, whole OBU bytes).
fn obus(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some(&h) = data.first() {
        assert!(h & 0x02 != 0, "OBU without size field");
        let mut at = 1 + usize::from(h & 0x04 != 0);
        let mut size = 0usize;
        for i in 0..8 {
            let b = data[at];
            at += 1;
            size |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        out.push(((h >> 3) & 0x0f, &data[..at + size]));
        data = &data[at + size..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn av1_over_enhanced_rtmp() {
    let stream = encode(
        &[
            "-c:v",
            "libaom-av1",
            "-cpu-used",
            "8",
            "-row-mt",
            "1",
            "-b:v",
            "300k",
        ],
        "obu",
    )
    .await;
    let all = obus(&stream);
    let seq = all.iter().find(|(t, _)| *t == 1).unwrap().1;
    let mut config = BytesMut::from(&[0x90, b'a', b'v', b'0', b'1'][..]);
    config.put_slice(&[0x81, 0x00, 0x0c, 0x00]); // av1C: version 1, profile 0
    config.put_slice(seq);
    // Temporal units split at temporal delimiters, which are dropped, as is
    // the sequence header (it travels in av1C).
    let mut units: Vec<(bool, BytesMut)> = Vec::new();
    for (t, obu) in all {
        match t {
            2 => units.push((false, BytesMut::new())),
            1 => {
                if let Some((key, _)) = units.last_mut() {
                    *key = true;
                }
            }
            _ => {
                if let Some((_, tu)) = units.last_mut() {
                    tu.put_slice(obu);
                }
            }
        }
    }
    let frames: Vec<Bytes> = units
        .into_iter()
        .map(|(key, tu)| {
            let mut tag = BytesMut::from(
                &[
                    0x80 | if key { 0x10 } else { 0x20 } | 1,
                    b'a',
                    b'v',
                    b'0',
                    b'1',
                ][..],
            );
            tag.put_slice(&tu);
            tag.freeze()
        })
        .collect();
    let seen = publish("av1", config.freeze(), frames).await;
    let v = seen.catalog.track(Kind::Video).unwrap();
    assert_eq!(v.codec, Codec::Av1);
    assert!(seen.video.len() >= 60, "{} frames", seen.video.len());
    assert!(seen.video[0].frame.keyframe);
    for g in &seen.video {
        let types: Vec<u8> = obus(&g.frame.payload).iter().map(|(t, _)| *t).collect();
        assert_eq!(
            types.first() == Some(&1),
            g.frame.keyframe,
            "sequence header iff keyframe: {types:?}"
        );
    }
}
