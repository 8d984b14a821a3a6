//! VP9 packetization (RFC 9628), non-flexible mode without layers: a 3-byte
//! payload descriptor (I, P, B, E flags and a 15-bit picture id) per packet.

use std::sync::Arc;

use super::Payload;

/// Flags byte + 15-bit picture id.
const DESCRIPTOR: usize = 3;

/// Packetizes one VP9 frame into `out`; the last payload gets the marker.
pub(crate) fn packetize(
    frame: &[u8],
    picture_id: u16,
    keyframe: bool,
    max: usize,
    out: &mut Vec<Payload>,
) {
    if frame.is_empty() {
        return;
    }
    let room = max.saturating_sub(DESCRIPTOR).max(1);
    let n = frame.len().div_ceil(room);
    let chunk = frame.len().div_ceil(n).max(1);
    let count = frame.chunks(chunk).count();
    let pid = picture_id & 0x7fff;
    for (i, piece) in frame.chunks(chunk).enumerate() {
        let mut v = Vec::with_capacity(DESCRIPTOR + piece.len());
        // I=1 (picture id present), P=inter-predicted, B=begin, E=end of frame.
        let mut flags = 0x80;
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
        v.push(0x80 | (pid >> 8).to_le_bytes()[0]);
        v.push(pid.to_le_bytes()[0]);
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
        packetize(&frame, 7, true, 1100, &mut out);
        assert_eq!(out.len(), 3);
        let mut back = Vec::new();
        for (i, p) in out.iter().enumerate() {
            let d = &p.data;
            assert_eq!(d[0] & 0x08 != 0, i == 0);
            assert_eq!(d[0] & 0x04 != 0, i == 2);
            assert_eq!(d[0] & 0x40, 0, "keyframe: not inter-predicted");
            assert_eq!(u16::from_be_bytes([d[1] & 0x7f, d[2]]), 7);
            back.extend_from_slice(&d[3..]);
        }
        assert_eq!(back, frame);
        assert!(out[2].marker);
    }
}
