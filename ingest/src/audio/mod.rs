//! AAC or G.711 → Opus, once per stream: browsers have no AAC in WebRTC
//! (and G.711 only at 8 kHz mono, which WHEP viewers do not negotiate).
//! symphonia decodes AAC-LC (HE-AAC: its LC core, without SBR), [`g711`]
//! decodes μ-law/A-law (RTSP cameras), rubato resamples to 48 kHz, opus-rs
//! (pure Rust) encodes 20 ms frames.
//!
//! Timing: every Opus packet's pts is derived from the AAC timestamps in the
//! 48 kHz clock, minus the resampler and encoder delays, so that decoded audio
//! lines up with the video whatever those delays are.

use bytes::Bytes;
use rubato::{FftFixedIn, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecParameters, Decoder, DecoderOptions, CODEC_TYPE_AAC};
use symphonia::core::formats::Packet;
use symphonia::default::codecs::AacDecoder;

pub mod g711;

/// Opus clock and output rate (RFC 7587).
pub const OPUS_RATE: u32 = 48_000;
/// Samples per channel in one 20 ms Opus frame.
pub const FRAME_SAMPLES: usize = 960;
/// Encoder lookahead in samples: 2.5 ms CELT overlap + 4 ms delay
/// compensation, as in libopus (which opus-rs ports). Decoded audio lags the
/// input by this much, so packet timestamps are moved back by it.
pub const OPUS_LOOKAHEAD: i64 = 312;
/// A jump between an AAC frame's timestamp and where the previous frames put
/// it, beyond which the timeline is re-anchored (a gap, a rebase).
const RESYNC_SAMPLES: i64 = 2_880;
/// Input frames the resampler takes per call: one AAC frame.
const RESAMPLER_CHUNK: usize = 1024;
/// Largest Opus packet we let the encoder write (RFC 6716 §3.4: 1275 bytes
/// per frame).
const MAX_PACKET: usize = 1_500;

/// Why a transcoder could not be built or a frame not transcoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The AudioSpecificConfig is one symphonia does not decode.
    #[error("unsupported aac config: {0}")]
    Unsupported(String),
    /// An AAC frame failed to decode.
    #[error("aac decode: {0}")]
    Decode(String),
    /// The resampler or encoder failed (or panicked).
    #[error("transcode: {0}")]
    Internal(String),
}

/// One encoded Opus packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet48 {
    /// The Opus packet (20 ms).
    pub payload: Bytes,
    /// Presentation time in the 48 kHz clock.
    pub pts: u64,
}

/// What the transcoder decodes.
enum Source {
    Aac(Box<AacDecoder>),
    /// G.711 at `rate` Hz with `channels` interleaved channels.
    G711 {
        law: g711::Law,
        rate: u32,
        channels: usize,
    },
}

/// The AAC (or G.711) → Opus transcoder of one stream.
pub struct AacToOpus {
    decoder: Source,
    /// Input frames the resampler takes per call.
    chunk: usize,
    /// Channels the encoder gets: 1 for mono sources, else 2.
    channels: usize,
    /// Set once the first frame told us the decoded rate.
    resampler: Option<FftFixedIn<f32>>,
    in_rate: u32,
    /// Resampler input, planar, waiting for a whole chunk.
    pending: Vec<Vec<f32>>,
    /// 48 kHz time of the first input sample since the last re-anchor.
    anchor: Option<i64>,
    /// Input samples since the anchor.
    in_count: u64,
    /// Resampler output samples since the anchor (including its delay).
    out_count: u64,
    /// Interleaved 48 kHz samples waiting for a whole Opus frame.
    fifo: Vec<f32>,
    fifo_pts: i64,
    encoder: opus_rs::OpusEncoder,
    last_pts: Option<u64>,
}

impl AacToOpus {
    /// A transcoder for an AudioSpecificConfig.
    pub fn new(asc: &[u8]) -> Result<Self, Error> {
        let info = crate::flv::parse_asc(asc).map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut params = CodecParameters::new();
        params.for_codec(CODEC_TYPE_AAC).with_extra_data(asc.into());
        let decoder = guarded(|| AacDecoder::try_new(&params, &DecoderOptions::default()))
            .map_err(|e| Error::Unsupported(e.to_string()))?
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let channels = if info.channels == 1 { 1 } else { 2 };
        Self::with_source(Source::Aac(Box::new(decoder)), channels, RESAMPLER_CHUNK)
    }

    /// A transcoder for G.711 (`law`) at `rate` Hz with `channels` channels
    /// (RTSP cameras: 8 kHz mono). The resampler works on 20 ms chunks so
    /// that a 8 kHz source is not held back 128 ms by a 1024-sample chunk.
    pub fn g711(law: g711::Law, rate: u32, channels: usize) -> Result<Self, Error> {
        if !(4_000..=96_000).contains(&rate) || !(1..=8).contains(&channels) {
            return Err(Error::Unsupported(format!("g711 at {rate} Hz x{channels}")));
        }
        let out = if channels == 1 { 1 } else { 2 };
        let source = Source::G711 {
            law,
            rate,
            channels,
        };
        Self::with_source(source, out, (rate / 50) as usize)
    }

    fn with_source(decoder: Source, channels: usize, chunk: usize) -> Result<Self, Error> {
        let mut encoder = opus_rs::OpusEncoder::new(
            i32::try_from(OPUS_RATE).unwrap_or(48_000),
            channels,
            opus_rs::Application::Audio,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        // Music-grade rates: the tone/voice/music of a broadcast, not a call.
        encoder.bitrate_bps = if channels == 1 { 64_000 } else { 96_000 };
        Ok(Self {
            decoder,
            chunk,
            channels,
            resampler: None,
            in_rate: 0,
            pending: Vec::new(),
            anchor: None,
            in_count: 0,
            out_count: 0,
            fifo: Vec::new(),
            fifo_pts: 0,
            encoder,
            last_pts: None,
        })
    }

    /// Channels of the Opus output (1 or 2).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Decodes one raw AAC frame whose first sample is at `pts` (48 kHz
    /// clock) and appends the Opus packets that became complete to `out`.
    pub fn push(&mut self, aac: &[u8], pts: u64, out: &mut Vec<Packet48>) -> Result<(), Error> {
        let (rate, planar) = self.decode(aac)?;
        if planar.first().is_none_or(|c| c.is_empty()) {
            return Ok(());
        }
        if rate != self.in_rate {
            self.in_rate = rate;
            self.resampler = if rate == OPUS_RATE {
                None
            } else {
                let r = FftFixedIn::<f32>::new(
                    rate as usize,
                    OPUS_RATE as usize,
                    self.chunk,
                    2,
                    self.channels,
                )
                .map_err(|e| Error::Internal(e.to_string()))?;
                Some(r)
            };
            self.anchor = None;
        }
        let pts = i64::try_from(pts).map_err(|_| Error::Internal("pts overflow".into()))?;
        let expected = self
            .anchor
            .map(|a| a + (self.in_count * u64::from(OPUS_RATE) / u64::from(rate.max(1))) as i64);
        if expected.is_none_or(|e| (pts - e).abs() > RESYNC_SAMPLES) {
            self.reanchor(pts, out)?;
        }
        self.in_count += planar.first().map_or(0, |c| c.len() as u64);
        for (p, c) in self.pending.iter_mut().zip(planar) {
            p.extend_from_slice(&c);
        }
        self.resample()?;
        self.encode(out)
    }

    /// Starts a new timeline at `pts`: flushes the partial frame (padded with
    /// silence) and restarts the resampler.
    fn reanchor(&mut self, pts: i64, out: &mut Vec<Packet48>) -> Result<(), Error> {
        if !self.fifo.is_empty() {
            self.fifo.resize(FRAME_SAMPLES * self.channels, 0.0);
            self.encode(out)?;
        }
        self.fifo.clear();
        if let Some(r) = &mut self.resampler {
            r.reset();
        }
        self.pending = vec![Vec::new(); self.channels];
        self.anchor = Some(pts);
        self.in_count = 0;
        self.out_count = 0;
        Ok(())
    }

    /// Decodes to planar f32 at the decoder's rate, mapped to our channels.
    fn decode(&mut self, aac: &[u8]) -> Result<(u32, Vec<Vec<f32>>), Error> {
        let decoder = match &mut self.decoder {
            Source::Aac(d) => d,
            Source::G711 {
                law,
                rate,
                channels,
            } => {
                let mut planar = vec![Vec::with_capacity(aac.len() / *channels); self.channels];
                for frame in aac.chunks_exact(*channels) {
                    for (c, p) in planar.iter_mut().enumerate() {
                        let b = frame.get(c).or(frame.first()).copied().unwrap_or(0);
                        p.push(law.decode(b));
                    }
                }
                return Ok((*rate, planar));
            }
        };
        let packet = Packet::new_from_slice(0, 0, 0, aac);
        let channels = self.channels;
        guarded(move || -> Result<(u32, Vec<Vec<f32>>), Error> {
            let decoded = decoder
                .decode(&packet)
                .map_err(|e| Error::Decode(e.to_string()))?;
            let spec = *decoded.spec();
            let frames = decoded.frames();
            let src_channels = spec.channels.count().max(1);
            let mut buf = SampleBuffer::<f32>::new(frames as u64, spec);
            buf.copy_interleaved_ref(decoded);
            let samples = buf.samples();
            let mut planar = vec![Vec::with_capacity(frames); channels];
            for frame in samples.chunks_exact(src_channels) {
                for (c, p) in planar.iter_mut().enumerate() {
                    // Mono stays mono; more than two channels keep the first two.
                    p.push(frame.get(c).or(frame.first()).copied().unwrap_or(0.0));
                }
            }
            Ok((spec.rate, planar))
        })?
    }

    /// Runs whole chunks through the resampler into the Opus fifo.
    fn resample(&mut self) -> Result<(), Error> {
        let anchor = self.anchor.unwrap_or(0);
        let Some(r) = &mut self.resampler else {
            // 48 kHz input: straight through.
            let n = self.pending.first().map_or(0, Vec::len);
            let start = anchor + self.out_count as i64;
            push_fifo(&mut self.fifo, &mut self.fifo_pts, &self.pending, 0, start);
            self.out_count += n as u64;
            self.pending.iter_mut().for_each(Vec::clear);
            return Ok(());
        };
        let delay = r.output_delay() as u64;
        loop {
            let need = r.input_frames_next();
            if self.pending.first().map_or(0, Vec::len) < need {
                return Ok(());
            }
            let chunk: Vec<&[f32]> = self.pending.iter().map(|p| &p[..need]).collect();
            let resampled =
                guarded(|| r.process(&chunk, None))?.map_err(|e| Error::Internal(e.to_string()))?;
            self.pending.iter_mut().for_each(|p| {
                p.drain(..need);
            });
            let n = resampled.first().map_or(0, Vec::len) as u64;
            // Output sample j shows the input at j - delay: drop the warm-up.
            let skip = delay.saturating_sub(self.out_count).min(n);
            let start = anchor + (self.out_count + skip) as i64 - delay as i64;
            push_fifo(
                &mut self.fifo,
                &mut self.fifo_pts,
                &resampled,
                skip as usize,
                start,
            );
            self.out_count += n;
        }
    }

    /// Encodes every whole 20 ms frame in the fifo.
    fn encode(&mut self, out: &mut Vec<Packet48>) -> Result<(), Error> {
        let frame_len = FRAME_SAMPLES * self.channels;
        while self.fifo.len() >= frame_len {
            let mut packet = vec![0u8; MAX_PACKET];
            let encoder = &mut self.encoder;
            let input = &self.fifo[..frame_len];
            let n = guarded(|| encoder.encode(input, FRAME_SAMPLES, &mut packet))?
                .map_err(|e| Error::Internal(e.to_string()))?;
            packet.truncate(n);
            self.fifo.drain(..frame_len);
            let mut pts = u64::try_from(self.fifo_pts - OPUS_LOOKAHEAD).unwrap_or(0);
            if let Some(last) = self.last_pts {
                // Never step back: a re-anchor into the past continues on.
                pts = pts.max(last + FRAME_SAMPLES as u64);
            }
            self.last_pts = Some(pts);
            self.fifo_pts += FRAME_SAMPLES as i64;
            out.push(Packet48 {
                payload: Bytes::from(packet),
                pts,
            });
        }
        Ok(())
    }
}

/// Appends planar samples from index `skip` on to the interleaved fifo; the
/// first appended sample has time `start` (sets the fifo time when empty).
fn push_fifo(
    fifo: &mut Vec<f32>,
    fifo_pts: &mut i64,
    planar: &[Vec<f32>],
    skip: usize,
    start: i64,
) {
    let n = planar.first().map_or(0, Vec::len);
    if skip >= n {
        return;
    }
    if fifo.is_empty() {
        *fifo_pts = start;
    }
    for i in skip..n {
        for c in planar {
            fifo.push(c.get(i).copied().unwrap_or(0.0));
        }
    }
}

/// Runs third-party codec code so that a panic on hostile input costs this
/// stream its audio, not the connection task.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| Error::Internal("codec panicked".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_configs_are_refused() {
        assert!(AacToOpus::new(&[]).is_err());
        // AAC Main (object type 1) is not decoded by symphonia.
        assert!(AacToOpus::new(&[0x0a, 0x10]).is_err());
        // 44.1 kHz stereo LC builds.
        let t = AacToOpus::new(&[0x12, 0x10]).unwrap();
        assert_eq!(t.channels(), 2);
    }

    #[test]
    fn garbage_frames_do_not_panic() {
        let mut t = AacToOpus::new(&[0x11, 0x88]).unwrap();
        let mut out = Vec::new();
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37) ^ n).collect();
            let _ = t.push(&junk, u64::from(n) * 1024, &mut out);
        }
    }
}
