//! What a viewer verifies about the frames it receives, accumulated into a [`ViewerReport`].
//!
//! Pure bookkeeping (no I/O): fed one depacketized frame at a time with its arrival instant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use str0m::format::Codec;

use crate::{annexb, stats, tag};

/// Counters shared by many viewers for live progress (the loadtest CLI prints them each second).
#[derive(Debug, Default)]
pub struct LiveCounters {
    /// Viewers whose DTLS is up.
    pub connected: AtomicU64,
    /// Viewers that failed (signalling, ICE, DTLS).
    pub failed: AtomicU64,
    /// RTP packets that made up received frames.
    pub packets_received: AtomicU64,
    /// RTP sequence numbers skipped between received frames.
    pub packets_lost: AtomicU64,
    /// Video frames received.
    pub video_frames: AtomicU64,
    /// Audio frames received.
    pub audio_frames: AtomicU64,
}

/// A break in the tag sequence: `next` followed `after` where `after + 1` was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqGap {
    /// Last sequence number before the break.
    pub after: u64,
    /// First one after it.
    pub next: u64,
}

/// Everything a viewer saw. Assertions belong to the caller.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ViewerReport {
    /// ICE + DTLS completed.
    pub connected: bool,
    /// From POST to DTLS connected.
    pub connect_ms: Option<f64>,
    /// From POST to the first decodable video frame (keyframe with parameter sets).
    pub ttff_ms: Option<f64>,
    /// Negotiated video codec, e.g. "H264".
    pub video_codec: Option<String>,
    /// Negotiated audio codec, e.g. "Opus".
    pub audio_codec: Option<String>,
    /// Video frames received.
    pub video_frames: u64,
    /// Audio frames received.
    pub audio_frames: u64,
    /// Whether the first video frame was a keyframe (IDR with SPS+PPS for H.264).
    pub first_frame_keyframe: Option<bool>,
    /// Keyframes received.
    pub keyframes: u64,
    /// Frames str0m flagged as not contiguous with the previous one.
    pub noncontiguous_frames: u64,
    /// Video frames that carried our tag.
    pub tagged_frames: u64,
    /// First and last tag sequence numbers seen.
    pub first_seq: Option<u64>,
    /// Last tag sequence number seen.
    pub last_seq: Option<u64>,
    /// Forward jumps in the tag sequence (frames never received).
    pub seq_gaps: Vec<SeqGap>,
    /// Backward or repeated tag sequence numbers (a new publisher, a duplicate, reordering).
    pub seq_backwards: Vec<SeqGap>,
    /// RTP packets that made up received frames.
    pub packets_received: u64,
    /// RTP sequence numbers skipped between received frames.
    pub packets_lost: u64,
    /// Tag send → arrival, ms.
    pub latency_ms_p50: Option<f64>,
    /// Tag send → arrival, ms.
    pub latency_ms_p99: Option<f64>,
    /// Tag send → arrival, ms.
    pub latency_ms_max: Option<f64>,
    /// How far the video RTP clock drifted from the wall clock over the session, ms.
    pub video_drift_ms: Option<f64>,
    /// How far the audio RTP clock drifted from the wall clock over the session, ms.
    pub audio_drift_ms: Option<f64>,
    /// `video_drift_ms - audio_drift_ms`: A/V clocks advancing at the same wall rate ≈ 0.
    pub av_drift_ms: Option<f64>,
    /// Header-only viewer: counts come from clear RTP headers; frame checks, tags, latency
    /// and TTFF are not measured.
    pub headers_only: bool,
    /// Header-only: from POST to the first video RTP packet, ms.
    pub first_packet_ms: Option<f64>,
    /// Header-only: RFC 3550 interarrival jitter of video, ms.
    pub video_jitter_ms: Option<f64>,
    /// Header-only: retransmission (RTX) packets seen.
    pub rtx_packets: u64,
    /// Why the session ended: "duration", "stopped", "disconnected".
    pub end: String,
    /// `--viewer-caps`: this viewer's receive cap, bit/s (`None`: uncapped).
    pub cap_bps: Option<u64>,
    /// Datagrams the cap dropped (its queue was full).
    pub cap_dropped: u64,
    /// Picture size of the last keyframe (`WxH`, from the SPS / VP8 header):
    /// the rendition the server settled on for this viewer.
    pub video_size: Option<String>,
    /// Keyframes whose picture size differed from the one before: rendition
    /// switches the viewer saw.
    pub size_changes: u64,
    /// From POST to the first keyframe of the last size, ms.
    pub size_since_ms: Option<f64>,
    /// Latency samples (ms), kept for aggregation across viewers.
    #[serde(skip)]
    pub latency_samples_ms: Vec<f64>,
    /// Latency samples (ms) of frames the publisher sent after this viewer's POST: live
    /// frames only, without a fast-start backlog (a server's cached group left the
    /// publisher before the viewer asked, so its age is not delay the server adds).
    #[serde(skip)]
    pub live_latency_samples_ms: Vec<f64>,
}

/// Tracks one media clock against arrival time in 1-second buckets of arrival; the minimum
/// `arrival - media time` per bucket is the transit floor, immune to jitter and bursts.
#[derive(Debug, Default)]
struct ClockTrack {
    first: Option<(Instant, f64)>,
    bucket_min: Vec<f64>,
}

/// Buckets kept per clock track: one per second of session, capped (a day is plenty).
const MAX_BUCKETS: usize = 86_400;

impl ClockTrack {
    fn add(&mut self, arrival: Instant, media_secs: f64) {
        let (t0, m0) = *self.first.get_or_insert((arrival, media_secs));
        let wall = arrival.saturating_duration_since(t0).as_secs_f64();
        let offset = wall - (media_secs - m0);
        let bucket = wall as usize;
        if bucket >= MAX_BUCKETS {
            return;
        }
        if self.bucket_min.len() <= bucket {
            self.bucket_min.resize(bucket + 1, f64::INFINITY);
        }
        if let Some(b) = self.bucket_min.get_mut(bucket) {
            *b = b.min(offset);
        }
    }

    /// Transit floor in the last complete second minus that of the second second (the first
    /// second holds the fast-start burst), in ms.
    fn drift_ms(&self) -> Option<f64> {
        let n = self.bucket_min.len();
        if n < 4 {
            return None;
        }
        let early = *self.bucket_min.get(1)?;
        let late = *self.bucket_min.get(n - 2)?;
        (early.is_finite() && late.is_finite()).then_some((late - early) * 1000.0)
    }
}

/// Accumulates a [`ViewerReport`] from received frames.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    pub(crate) report: ViewerReport,
    last_rtp_seq: [Option<u64>; 2],
    video_clock: ClockTrack,
    audio_clock: ClockTrack,
}

/// One received, depacketized frame.
pub(crate) struct Received<'a> {
    pub(crate) video: bool,
    pub(crate) codec: Codec,
    pub(crate) data: &'a [u8],
    pub(crate) media_secs: f64,
    pub(crate) rtp_seqs: (u64, u64),
    pub(crate) contiguous: bool,
    pub(crate) arrival: Instant,
    pub(crate) since_post: Duration,
}

impl Checker {
    pub(crate) fn frame(&mut self, f: &Received<'_>, live: &LiveCounters) {
        let r = &mut self.report;
        let slot = usize::from(f.video);
        let (first, last) = f.rtp_seqs;
        let packets = last.saturating_sub(first) + 1;
        let mut lost = 0;
        if let Some(prev) = self.last_rtp_seq[slot] {
            lost = first.saturating_sub(prev + 1);
        }
        self.last_rtp_seq[slot] = Some(last.max(self.last_rtp_seq[slot].unwrap_or(0)));
        r.packets_received += packets;
        r.packets_lost += lost;
        live.packets_received.fetch_add(packets, Ordering::Relaxed);
        live.packets_lost.fetch_add(lost, Ordering::Relaxed);
        r.noncontiguous_frames += u64::from(!f.contiguous);
        if !f.video {
            r.audio_frames += 1;
            r.audio_codec
                .get_or_insert_with(|| format!("{:?}", f.codec));
            live.audio_frames.fetch_add(1, Ordering::Relaxed);
            self.audio_clock.add(f.arrival, f.media_secs);
            return;
        }
        r.video_frames += 1;
        live.video_frames.fetch_add(1, Ordering::Relaxed);
        r.video_codec
            .get_or_insert_with(|| format!("{:?}", f.codec));
        self.video_clock.add(f.arrival, f.media_secs);
        let keyframe = is_decodable_start(f.codec, f.data);
        r.first_frame_keyframe.get_or_insert(keyframe);
        if keyframe {
            r.keyframes += 1;
            r.ttff_ms.get_or_insert(f.since_post.as_secs_f64() * 1000.0);
            if let Some((w, h)) = crate::picture::size(f.codec, f.data) {
                let size = format!("{w}x{h}");
                if r.video_size.as_deref() != Some(size.as_str()) {
                    if r.video_size.is_some() {
                        r.size_changes += 1;
                    }
                    r.video_size = Some(size);
                    r.size_since_ms = Some(f.since_post.as_secs_f64() * 1000.0);
                }
            }
        }
        if let Some(t) = tag::find(f.data) {
            r.tagged_frames += 1;
            let now_us = crate::wallclock_us();
            let latency_ms = now_us.saturating_sub(t.sent_us) as f64 / 1000.0;
            r.latency_samples_ms.push(latency_ms);
            let since_post_us = u64::try_from(f.since_post.as_micros()).unwrap_or(u64::MAX);
            if t.sent_us >= now_us.saturating_sub(since_post_us) {
                r.live_latency_samples_ms.push(latency_ms);
            }
            r.first_seq.get_or_insert(t.seq);
            if let Some(prev) = r.last_seq {
                let gap = SeqGap {
                    after: prev,
                    next: t.seq,
                };
                if t.seq > prev.saturating_add(1) {
                    r.seq_gaps.push(gap);
                } else if t.seq <= prev {
                    r.seq_backwards.push(gap);
                }
            }
            r.last_seq = Some(t.seq);
        }
    }

    pub(crate) fn finish(mut self, end: &str) -> ViewerReport {
        let r = &mut self.report;
        r.end = end.to_string();
        r.latency_ms_p50 = stats::percentile(&r.latency_samples_ms, 50.0);
        r.latency_ms_p99 = stats::percentile(&r.latency_samples_ms, 99.0);
        r.latency_ms_max = stats::percentile(&r.latency_samples_ms, 100.0);
        r.video_drift_ms = self.video_clock.drift_ms();
        r.audio_drift_ms = self.audio_clock.drift_ms();
        r.av_drift_ms = r.video_drift_ms.zip(r.audio_drift_ms).map(|(v, a)| v - a);
        self.report
    }
}

/// A decoder can start on this frame: H.264 IDR with SPS+PPS, H.265 IRAP
/// with VPS+SPS+PPS, or a VP8 key frame.
pub fn is_decodable_start(codec: Codec, data: &[u8]) -> bool {
    match codec {
        Codec::H264 => annexb::au_info(data).decodable_start(),
        // VP8 frame tag: bit 0 of the first byte is the inverse key-frame flag (RFC 6386 §9.1).
        Codec::Vp8 => data.first().is_some_and(|b| b & 1 == 0),
        // An IRAP picture (types 16–21) with VPS, SPS and PPS in front.
        Codec::H265 => {
            let types: Vec<u8> = cascade_media::annexb::nal_units(data)
                .iter()
                .map(|n| (n[0] >> 1) & 0x3f)
                .collect();
            [32, 33, 34].iter().all(|t| types.contains(t))
                && types.iter().any(|t| (16..=21).contains(t))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_drift_is_zero_for_real_time_media() {
        let mut c = ClockTrack::default();
        let t0 = Instant::now();
        for i in 0..200u64 {
            // 30 fps, arrival jitter up to 9 ms, a burst at the start.
            let media = i as f64 / 30.0;
            let wall = if i < 20 {
                0.0
            } else {
                media + (i % 10) as f64 / 1000.0
            };
            c.add(t0 + Duration::from_secs_f64(wall), media + 100.0);
        }
        let d = c.drift_ms().unwrap();
        assert!(d.abs() < 10.0, "drift {d}");
    }

    #[test]
    fn sequence_gaps_and_losses_are_recorded() {
        let live = LiveCounters::default();
        let mut ch = Checker::default();
        let t0 = Instant::now();
        let au = |seq| {
            let base = [0, 0, 0, 1, 0x41, 0x9a, 1];
            tag::insert(
                &base,
                tag::Tag {
                    seq,
                    sent_us: crate::wallclock_us(),
                },
            )
        };
        for (i, seq) in [5u64, 6, 9, 3].into_iter().enumerate() {
            let data = au(seq);
            let i = i as u64;
            let rtp = if i == 2 { (20, 21) } else { (i * 2, i * 2 + 1) };
            ch.frame(
                &Received {
                    video: true,
                    codec: Codec::H264,
                    data: &data,
                    media_secs: i as f64,
                    rtp_seqs: rtp,
                    contiguous: true,
                    arrival: t0,
                    since_post: Duration::ZERO,
                },
                &live,
            );
        }
        let r = ch.finish("stopped");
        assert_eq!(r.first_frame_keyframe, Some(false));
        assert_eq!(r.seq_gaps, vec![SeqGap { after: 6, next: 9 }]);
        assert_eq!(r.seq_backwards, vec![SeqGap { after: 9, next: 3 }]);
        assert_eq!(r.packets_lost, 16);
        assert_eq!(r.tagged_frames, 4);
        assert!(r.latency_ms_p50.is_some());
    }
}
