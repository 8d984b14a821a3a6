//! VP8 packetization (RFC 7741): a 1-byte payload descriptor, then the frame
//! split into evenly sized partitions-agnostic pieces; S=1 on the first
//! packet of the frame.
//!
//! No picture id (I=0), on purpose: each rendition of a stream is
//! packetized once for all its viewers, so picture ids would be numbered
//! per rendition and jump when a viewer switches. A receiver given picture
//! ids without temporal layers (libwebrtc: Chromium, Firefox) takes every
//! delta frame to reference the picture id before it, so after a switch it
//! either dropped the new rendition's frames as old ones (Firefox froze
//! 3.2 s until its own keyframe request) or, when the target's keyframe was
//! lost on the link, decoded its delta frames against an old-rendition
//! picture of the same id minus one (a broken picture). Without them it
//! orders frames by the per-viewer RTP sequence numbers, as for H.264: a
//! delta frame decodes only after every packet since its keyframe. (Per
//! viewer picture ids would be possible without a copy, str0m's
//! `RtpWrite::vp8_patch`, but no receiver here needs them.)

use std::sync::Arc;

use super::Payload;

/// The required first octet only (X=0: no extension fields).
const DESCRIPTOR: usize = 1;

/// Packetizes one VP8 frame into `out`; the last payload gets the marker.
pub(crate) fn packetize(frame: &[u8], max: usize, out: &mut Vec<Payload>) {
    if frame.is_empty() {
        return;
    }
    let room = max.saturating_sub(DESCRIPTOR).max(1);
    let n = frame.len().div_ceil(room);
    let chunk = frame.len().div_ceil(n).max(1);
    let first = out.len();
    for (i, piece) in frame.chunks(chunk).enumerate() {
        let mut v = Vec::with_capacity(DESCRIPTOR + piece.len());
        // X=0, N=0, S=1 on the frame's first packet, partition index 0.
        v.push(if i == 0 { 0x10 } else { 0 });
        v.extend_from_slice(piece);
        out.push(Payload {
            data: Arc::from(v),
            marker: false,
        });
    }
    if out.len() > first {
        if let Some(last) = out.last_mut() {
            last.marker = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receiver's side: strip descriptors, check S and that no
    /// extension (picture id) is there.
    fn depacketize(payloads: &[Payload]) -> Vec<u8> {
        let mut frame = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let d = &p.data;
            assert_eq!(d[0] & 0x80, 0, "X=0: no picture id");
            assert_eq!(d[0] & 0x10 != 0, i == 0, "S only on the first packet");
            assert_eq!(d[0] & 0x0f, 0, "partition index 0");
            frame.extend_from_slice(&d[1..]);
        }
        frame
    }

    #[test]
    fn round_trip() {
        let frame: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
        let mut out = Vec::new();
        packetize(&frame, 1100, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|p| p.data.len() <= 1100));
        assert!(out[2].marker && !out[0].marker);
        assert_eq!(depacketize(&out), frame);
    }
}
