//! The AAC → Opus transcoder on real ffmpeg AAC: decoded Opus lines up with
//! the AAC it came from (resampler and encoder delays accounted for in the
//! pts), and the CPU cost per stream (printed, not asserted).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use cascade_ingest::audio::{AacToOpus, Packet48};
use cascade_ingest::flv::{parse_audio, Audio};
use common::rtmp::{have_ffmpeg, read_flv};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecParameters, Decoder, DecoderOptions, CODEC_TYPE_AAC};
use symphonia::core::formats::Packet;
use symphonia::default::codecs::AacDecoder;

/// AAC in FLV from ffmpeg: `expr` is an aevalsrc expression in t.
async fn aac_flv(
    expr: &str,
    rate: u32,
    channels: u32,
    secs: u32,
) -> (Vec<u8>, Vec<(u32, bytes::Bytes)>) {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let src = format!(
        "aevalsrc={expr}:s={rate}:c={}",
        if channels == 1 { "mono" } else { "stereo" }
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                &src,
                "-t",
                &secs.to_string(),
            ])
            .args(["-c:a", "aac", "-b:a", "128k", "-f", "flv", "-"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success());
    let mut asc = Vec::new();
    let mut frames = Vec::new();
    for t in read_flv(&out.stdout).into_iter().filter(|t| t.kind == 8) {
        match parse_audio(&t.data).unwrap() {
            Audio::AacConfig(c) => asc = c.to_vec(),
            Audio::Aac(f) => frames.push((t.ts, f)),
            _ => {}
        }
    }
    (asc, frames)
}

/// First time (s) at which |sample| exceeds `level` in a timeline of
/// (start time s, rate, mono samples) chunks.
fn onset(chunks: &[(f64, f64, Vec<f32>)], level: f32) -> Option<f64> {
    chunks.iter().find_map(|(start, rate, s)| {
        s.iter()
            .position(|x| x.abs() > level)
            .map(|i| start + i as f64 / rate)
    })
}

#[tokio::test]
async fn opus_pts_line_up_with_the_aac_timeline() {
    let mut errors = Vec::new();
    for (rate, channels) in [(44_100, 2), (48_000, 1), (32_000, 2)] {
        // Silence, then a full-scale 1 kHz tone from t = 1 s.
        let (asc, frames) =
            aac_flv("if(gte(t\\,1)\\,sin(2*PI*1000*t)\\,0)", rate, channels, 2).await;
        // Reference: the AAC decoded as is, each frame at its FLV timestamp.
        let mut params = CodecParameters::new();
        params
            .for_codec(CODEC_TYPE_AAC)
            .with_extra_data(asc.clone().into());
        let mut aac = AacDecoder::try_new(&params, &DecoderOptions::default()).unwrap();
        let mut reference = Vec::new();
        for (ts, f) in &frames {
            let d = aac.decode(&Packet::new_from_slice(0, 0, 0, f)).unwrap();
            let spec = *d.spec();
            let mut b = SampleBuffer::<f32>::new(d.frames() as u64, spec);
            b.copy_interleaved_ref(d);
            let ch = spec.channels.count();
            let mono: Vec<f32> = b.samples().iter().step_by(ch).copied().collect();
            reference.push((f64::from(*ts) / 1000.0, f64::from(spec.rate), mono));
        }
        // Ours: transcode with 48 kHz pts from the same timestamps, decode.
        let mut t = AacToOpus::new(&asc).unwrap();
        let mut packets: Vec<Packet48> = Vec::new();
        // A real timeline starts far from zero (the clock is wall-clock based):
        // shift by 10 s so no pts would be negative after delay compensation.
        for (ts, f) in &frames {
            t.push(f, (u64::from(*ts) + 10_000) * 48, &mut packets)
                .unwrap();
        }
        let mut dec = opus_rs::OpusDecoder::new(48_000, 2).unwrap();
        let mut ours = Vec::new();
        for p in &packets {
            let mut pcm = vec![0f32; 960 * 2];
            let n = dec.decode(&p.payload, 960, &mut pcm).unwrap();
            let mono: Vec<f32> = pcm[..n * 2].iter().step_by(2).copied().collect();
            ours.push((p.pts as f64 / 48_000.0 - 10.0, 48_000.0, mono));
        }
        let want = onset(&reference, 0.3).unwrap();
        let got = onset(&ours, 0.3).unwrap();
        println!(
            "{rate} Hz x{channels}: tone onset AAC {want:.4} s, Opus {got:.4} s, error {:+.2} ms",
            (got - want) * 1000.0
        );
        errors.push((got - want) * 1000.0);
    }
    // FLV timestamps are whole ms: the reference places frames ±0.5 ms.
    assert!(
        errors.iter().all(|e| e.abs() < 1.5),
        "Opus is off the AAC timeline by {errors:?} ms"
    );
}

/// CPU per stream of the transcode: time spent per second of audio.
#[tokio::test]
async fn transcode_cpu_cost_per_stream() {
    let secs = 20;
    for (rate, channels) in [(44_100, 2), (48_000, 2), (48_000, 1)] {
        let (asc, frames) =
            aac_flv("sin(2*PI*440*t)+0.3*sin(2*PI*3000*t)", rate, channels, secs).await;
        let mut t = AacToOpus::new(&asc).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        for (ts, f) in &frames {
            t.push(f, u64::from(*ts) * 48, &mut out).unwrap();
        }
        let spent = start.elapsed();
        let share = spent.as_secs_f64() / f64::from(secs) * 100.0;
        println!(
            "transcode AAC {rate} Hz x{channels} → Opus 48 kHz: {:.1} ms per s of audio = {share:.2}% of one core ({} Opus frames)",
            spent.as_secs_f64() * 1000.0 / f64::from(secs),
            out.len()
        );
        assert!(out.len() >= (secs as usize - 1) * 50);
    }
}
