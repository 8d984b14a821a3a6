//! VP8 packetization (RFC 7741): a 4-byte payload descriptor with a 15-bit
//! picture id, then the frame split into evenly sized partitions-agnostic
//! pieces; S=1 on the first packet of the frame.

use std::sync::Arc;

use super::Payload;

/// X + I + M(15-bit picture id): 4 bytes of descriptor.
const DESCRIPTOR: usize = 4;

/// Packetizes one VP8 frame into `out`; the last payload gets the marker.
pub(crate) fn packetize(frame: &[u8], picture_id: u16, max: usize, out: &mut Vec<Payload>) {
    if frame.is_empty() {
        return;
    }
    let room = max.saturating_sub(DESCRIPTOR).max(1);
    let n = frame.len().div_ceil(room);
    let chunk = frame.len().div_ceil(n).max(1);
    let pid = picture_id & 0x7fff;
    let first = out.len();
    for (i, piece) in frame.chunks(chunk).enumerate() {
        let mut v = Vec::with_capacity(DESCRIPTOR + piece.len());
        // X=1 (extension byte follows), S=1 on the frame's first packet, PID=0.
        v.push(0x80 | if i == 0 { 0x10 } else { 0 });
        // I=1: a picture id follows.
        v.push(0x80);
        // M=1: 15-bit picture id.
        v.push(0x80 | (pid >> 8).to_le_bytes()[0]);
        v.push(pid.to_le_bytes()[0]);
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

    /// The receiver's side: strip descriptors, check S and picture ids.
    fn depacketize(payloads: &[Payload]) -> (Vec<u8>, u16) {
        let mut frame = Vec::new();
        let mut pid = None;
        for (i, p) in payloads.iter().enumerate() {
            let d = &p.data;
            assert_eq!(d[0] & 0x80, 0x80);
            assert_eq!(d[0] & 0x10 != 0, i == 0, "S only on the first packet");
            assert_eq!(d[1] & 0x80, 0x80);
            assert_eq!(d[2] & 0x80, 0x80);
            let id = u16::from_be_bytes([d[2] & 0x7f, d[3]]);
            assert!(pid.is_none_or(|p| p == id));
            pid = Some(id);
            frame.extend_from_slice(&d[4..]);
        }
        (frame, pid.unwrap())
    }

    #[test]
    fn round_trip() {
        let frame: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
        let mut out = Vec::new();
        packetize(&frame, 0x1234, 1100, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|p| p.data.len() <= 1100));
        assert!(out[2].marker && !out[0].marker);
        assert_eq!(depacketize(&out), (frame, 0x1234));
    }
}
