//! VP9 packetization (RFC 9628), non-flexible mode without layers: a 1-byte
//! payload descriptor (P, B, E flags) per packet. No picture id (I=0), for
//! the reason `vp8.rs` gives: renditions are packetized once each, and
//! picture ids that jump at a viewer's switch mislead the receiver.

use std::sync::Arc;

use super::Payload;

/// The flags byte.
const DESCRIPTOR: usize = 1;

/// Packetizes one VP9 frame into `out`; the last payload gets the marker.
pub(crate) fn packetize(frame: &[u8], keyframe: bool, max: usize, out: &mut Vec<Payload>) {
    if frame.is_empty() {
        return;
    }
    let room = max.saturating_sub(DESCRIPTOR).max(1);
    let n = frame.len().div_ceil(room);
    let chunk = frame.len().div_ceil(n).max(1);
    let count = frame.chunks(chunk).count();
    for (i, piece) in frame.chunks(chunk).enumerate() {
        let mut v = Vec::with_capacity(DESCRIPTOR + piece.len());
        // I=0 (no picture id), P=inter-predicted, B=begin, E=end of frame.
        let mut flags = 0;
        if !keyframe {
            flags |= 0x40;
        }
        if i == 0 {
            flags |= 0x08;
        }
        if i + 1 == count {
            flags |= 0x04;
        }
        v.push(flags);
        v.extend_from_slice(piece);
        out.push(Payload {
            data: Arc::from(v),
            marker: i + 1 == count,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let frame: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        packetize(&frame, true, 1100, &mut out);
        assert_eq!(out.len(), 3);
        let mut back = Vec::new();
        for (i, p) in out.iter().enumerate() {
            let d = &p.data;
            assert_eq!(d[0] & 0x08 != 0, i == 0);
            assert_eq!(d[0] & 0x04 != 0, i == 2);
            assert_eq!(d[0] & 0x40, 0, "keyframe: not inter-predicted");
            assert_eq!(d[0] & 0x80, 0, "I=0: no picture id");
            back.extend_from_slice(&d[1..]);
        }
        assert_eq!(back, frame);
        assert!(out[2].marker);
    }
}
