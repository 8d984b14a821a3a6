//! Header-only viewing: count RTP from the clear SRTP headers without decrypting.
//!
//! The answer SDP maps payload types to video/audio and clock rates; packets are then
//! accounted per SSRC (loss, jitter) and video frames counted by the marker bit.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::check::{LiveCounters, ViewerReport};
use crate::rtp::{self, SeqTracker};

/// SSRCs tracked per viewer: a handful per media; more is a misbehaving sender.
const MAX_SSRCS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct PtInfo {
    video: bool,
    clock: u32,
    rtx: bool,
}

/// Payload types of an SDP (offer or answer) by `a=rtpmap`, with their m-line kind.
fn pt_map(sdp: &str) -> HashMap<u8, PtInfo> {
    let mut map = HashMap::new();
    let mut video = false;
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            video = m.starts_with("video");
        } else if let Some(rest) = line.strip_prefix("a=rtpmap:") {
            let mut it = rest.split_whitespace();
            let (Some(pt), Some(enc)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(pt) = pt.parse::<u8>() else {
                continue;
            };
            let mut enc = enc.split('/');
            let name = enc.next().unwrap_or("");
            let clock = enc.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            map.insert(
                pt,
                PtInfo {
                    video,
                    clock,
                    rtx: name.eq_ignore_ascii_case("rtx"),
                },
            );
        }
    }
    map
}

/// The tap's state for one viewer.
#[derive(Debug)]
pub(crate) struct HeaderTap {
    pts: HashMap<u8, PtInfo>,
    ssrcs: HashMap<u32, (bool, SeqTracker)>,
    t0: Instant,
    pub(crate) first_video: Option<Instant>,
    video_frames: u64,
    audio_packets: u64,
    rtx_packets: u64,
}

impl HeaderTap {
    pub(crate) fn new(answer_sdp: &str, t0: Instant) -> Self {
        Self {
            pts: pt_map(answer_sdp),
            ssrcs: HashMap::new(),
            t0,
            first_video: None,
            video_frames: 0,
            audio_packets: 0,
            rtx_packets: 0,
        }
    }

    /// Take an RTP datagram (true) or leave it for str0m (STUN, DTLS, RTCP: false).
    pub(crate) fn packet(&mut self, data: &[u8], now: Instant, live: &LiveCounters) -> bool {
        let Some(h) = rtp::parse(data) else {
            return false;
        };
        let Some(info) = self.pts.get(&h.pt).copied() else {
            return true; // RTP we did not negotiate: drop it, str0m would too
        };
        if info.rtx {
            self.rtx_packets += 1;
            return true;
        }
        if !self.ssrcs.contains_key(&h.ssrc) && self.ssrcs.len() >= MAX_SSRCS {
            return true;
        }
        let (_, tracker) = self
            .ssrcs
            .entry(h.ssrc)
            .or_insert_with(|| (info.video, SeqTracker::default()));
        let lost_before = tracker.lost();
        let arrival = now.saturating_duration_since(self.t0).as_secs_f64();
        tracker.update(h.seq, h.timestamp, arrival, info.clock);
        let lost_now = tracker.lost();
        live.packets_received.fetch_add(1, Ordering::Relaxed);
        if lost_now > lost_before {
            live.packets_lost
                .fetch_add(lost_now - lost_before, Ordering::Relaxed);
        } else if lost_now < lost_before {
            live.packets_lost
                .fetch_sub(lost_before - lost_now, Ordering::Relaxed);
        }
        if info.video {
            self.first_video.get_or_insert(now);
            if h.marker {
                self.video_frames += 1;
                live.video_frames.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.audio_packets += 1;
            live.audio_frames.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Video frames (marker bits) seen so far.
    pub(crate) fn video_frames(&self) -> u64 {
        self.video_frames
    }

    /// Fold the counts into `r` (whose frame-level fields stay empty).
    pub(crate) fn finish(&self, r: &mut ViewerReport) {
        r.headers_only = true;
        r.video_frames += self.video_frames;
        r.audio_frames += self.audio_packets;
        r.rtx_packets += self.rtx_packets;
        let mut jitter: Option<f64> = None;
        for (video, t) in self.ssrcs.values() {
            r.packets_received += t.received();
            r.packets_lost += t.lost();
            if *video {
                jitter = Some(jitter.unwrap_or(0.0).max(t.jitter_ms()));
            }
        }
        r.video_jitter_ms = jitter;
        r.first_packet_ms = self
            .first_video
            .map(|t| t.saturating_duration_since(self.t0).as_secs_f64() * 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\na=rtpmap:102 H264/90000\r\na=rtpmap:103 rtx/90000\r\n";

    fn rtp(pt: u8, marker: bool, seq: u16, ssrc: u32) -> Vec<u8> {
        let mut p = vec![0x80, pt | if marker { 0x80 } else { 0 }];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p
    }

    #[test]
    fn maps_payload_types() {
        let m = pt_map(ANSWER);
        assert!(!m[&111].video && m[&111].clock == 48_000);
        assert!(m[&102].video && !m[&102].rtx);
        assert!(m[&103].rtx);
    }

    #[test]
    fn counts_frames_loss_and_leaves_rtcp() {
        let live = LiveCounters::default();
        let t0 = Instant::now();
        let mut tap = HeaderTap::new(ANSWER, t0);
        for (seq, marker) in [(1, false), (2, true), (4, true)] {
            assert!(tap.packet(&rtp(102, marker, seq, 5), t0, &live));
        }
        assert!(tap.packet(&rtp(111, false, 9, 6), t0, &live));
        assert!(tap.packet(&rtp(103, false, 3, 7), t0, &live));
        assert!(!tap.packet(&[0x81, 200, 0, 1, 0, 0, 0, 0], t0, &live));
        assert!(!tap.packet(&[0, 1, 0, 0], t0, &live)); // STUN
        let mut r = ViewerReport::default();
        tap.finish(&mut r);
        assert_eq!((r.video_frames, r.audio_frames), (2, 1));
        assert_eq!(
            (r.packets_received, r.packets_lost, r.rtx_packets),
            (4, 1, 1)
        );
        assert_eq!(live.packets_lost.load(Ordering::Relaxed), 1);
    }
}
