//! Media checks for ingest tests: collect what a registry subscriber sees,
//! split Annex-B, mux Opus packets into a minimal Ogg file (RFC 7845) so
//! ffmpeg can decode them, estimate a tone's frequency, measure A/V drift.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cascade_origin::catalog::Catalog;
use cascade_origin::frame::Frame;
use cascade_origin::registry::Subscriber;
use cascade_origin::Registry;
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

/// A frame and when the subscriber got it.
#[derive(Clone, Debug)]
pub struct Got {
    /// The frame.
    pub frame: Frame,
    /// Arrival at the subscriber.
    pub at: Instant,
}

/// Everything one subscriber saw of a stream.
#[derive(Debug, Default)]
pub struct Seen {
    /// The catalog when the stream ended.
    pub catalog: Catalog,
    /// Video frames in arrival order.
    pub video: Vec<Got>,
    /// Audio frames in arrival order.
    pub audio: Vec<Got>,
}

/// Waits until `name` is live (polling), then subscribes.
pub async fn wait_live(registry: &Arc<Registry>, name: &str, within: Duration) -> Subscriber {
    timeout(within, async {
        loop {
            if let Some(s) = registry.subscribe_local(name) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("stream {name} never went live"))
}

/// Reads both tracks until they close (the publisher left) or `within`.
pub async fn collect(sub: Subscriber, within: Duration) -> Seen {
    let mut video = sub.track("video");
    let mut audio = sub.track("audio");
    let mut seen = Seen::default();
    let deadline = Instant::now() + within;
    loop {
        let catalog = sub.catalog();
        if video.is_none() && audio.is_none() {
            seen.catalog = catalog;
            return seen;
        }
        seen.catalog = catalog;
        tokio::select! {
            r = async { video.as_mut().unwrap().next().await }, if video.is_some() => match r {
                Ok(frame) => seen.video.push(Got { frame, at: Instant::now() }),
                Err(_) => video = None,
            },
            r = async { audio.as_mut().unwrap().next().await }, if audio.is_some() => match r {
                Ok(frame) => seen.audio.push(Got { frame, at: Instant::now() }),
                Err(_) => audio = None,
            },
            _ = tokio::time::sleep_until(deadline) => return seen,
        }
    }
}

/// NAL unit types of an Annex-B H.264 access unit.
pub fn nal_types(au: &[u8]) -> Vec<u8> {
    cascade_ingest::h264::split_annexb(au)
        .iter()
        .filter_map(|n| n.first().map(|b| b & 0x1f))
        .collect()
}

/// Ogg CRC-32 (polynomial 0x04c11db7, not reflected, RFC 3533).
fn ogg_crc(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn ogg_page(out: &mut Vec<u8>, packet: &[u8], granule: u64, seq: u32, flags: u8) {
    let mut page = Vec::with_capacity(packet.len() + 64);
    page.extend_from_slice(b"OggS");
    page.push(0);
    page.push(flags);
    page.extend_from_slice(&granule.to_le_bytes());
    page.extend_from_slice(&0x6361_7363u32.to_le_bytes());
    page.extend_from_slice(&seq.to_le_bytes());
    page.extend_from_slice(&[0; 4]);
    let mut lacing = vec![255u8; packet.len() / 255];
    lacing.push((packet.len() % 255) as u8);
    page.push(lacing.len() as u8);
    page.extend_from_slice(&lacing);
    page.extend_from_slice(packet);
    let crc = ogg_crc(&page);
    page[22..26].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&page);
}

/// An Ogg Opus file holding `packets` of 20 ms (one packet per page).
pub fn ogg_opus(packets: &[Bytes], channels: u8, pre_skip: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut head = b"OpusHead".to_vec();
    head.push(1);
    head.push(channels);
    head.extend_from_slice(&pre_skip.to_le_bytes());
    head.extend_from_slice(&48_000u32.to_le_bytes());
    head.extend_from_slice(&0i16.to_le_bytes());
    head.push(0);
    ogg_page(&mut out, &head, 0, 0, 0x02);
    let mut tags = b"OpusTags".to_vec();
    let vendor = b"cascade-test";
    tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
    tags.extend_from_slice(vendor);
    tags.extend_from_slice(&0u32.to_le_bytes());
    ogg_page(&mut out, &tags, 0, 1, 0);
    for (i, p) in packets.iter().enumerate() {
        let last = i + 1 == packets.len();
        let granule = (i as u64 + 1) * 960;
        ogg_page(
            &mut out,
            p,
            granule,
            i as u32 + 2,
            if last { 0x04 } else { 0 },
        );
    }
    out
}

/// Decodes an Ogg Opus file with ffmpeg to mono 48 kHz samples.
pub async fn ffmpeg_decode(ogg: Vec<u8>) -> Vec<i16> {
    let mut child = tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "ogg",
            "-i",
            "-",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            "48000",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        stdin.write_all(&ogg).await.unwrap();
    });
    let out = timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert!(out.status.success());
    out.stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Frequency of a tone by rising zero crossings, skipping the first 200 ms.
pub fn tone_frequency(samples: &[i16], rate: u32) -> f64 {
    let skip = rate as usize / 5;
    let s = &samples[skip.min(samples.len())..];
    let crossings = s.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
    crossings as f64 * f64::from(rate) / s.len().max(1) as f64
}

/// RMS level of samples (to tell a tone from silence).
pub fn rms(samples: &[i16]) -> f64 {
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len().max(1) as f64).sqrt()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// Window over which A/V offsets are compared.
const DRIFT_WINDOW: Duration = Duration::from_millis(500);

/// A/V drift: per half-second window (by arrival, from `skip` on), the median
/// of (audio pts − arrival) minus the median of (video dts − arrival), in
/// seconds; returns (max − min) over windows and the windows' values. Video
/// uses dts because frames arrive in decode order: with B-frames, pts − dts
/// alternates by picture type and a window's median of pts would jitter by a
/// frame without any real drift.
pub fn av_drift(seen: &Seen, skip: Duration) -> (f64, Vec<f64>) {
    let t0 = seen
        .video
        .first()
        .map(|g| g.at)
        .into_iter()
        .chain(seen.audio.first().map(|g| g.at))
        .min()
        .unwrap();
    let end = seen
        .video
        .last()
        .map(|g| g.at)
        .into_iter()
        .chain(seen.audio.last().map(|g| g.at))
        .min()
        .unwrap();
    let offset = |g: &Got, ts: u64, clock: f64| ts as f64 / clock - (g.at - t0).as_secs_f64();
    let mut diffs = Vec::new();
    let mut w = t0 + skip;
    while w + DRIFT_WINDOW <= end {
        let in_w = |g: &&Got| g.at >= w && g.at < w + DRIFT_WINDOW;
        let a = median(
            seen.audio
                .iter()
                .filter(in_w)
                .map(|g| offset(g, g.frame.pts, 48_000.0))
                .collect(),
        );
        let v = median(
            seen.video
                .iter()
                .filter(in_w)
                .map(|g| offset(g, g.frame.dts, 90_000.0))
                .collect(),
        );
        if let (Some(a), Some(v)) = (a, v) {
            diffs.push(a - v);
        }
        w += DRIFT_WINDOW;
    }
    let max = diffs.iter().cloned().fold(f64::MIN, f64::max);
    let min = diffs.iter().cloned().fold(f64::MAX, f64::min);
    (if diffs.is_empty() { 0.0 } else { max - min }, diffs)
}
