//! AV1 packetization (AOM "RTP Payload Format for AV1" v1.0): a temporal
//! unit of low-overhead OBUs becomes packets of OBU elements, each prefixed
//! with its LEB128 length (W=0). OBU size fields are stripped (the format
//! recommends it), temporal delimiters and tile lists dropped; OBUs that do
//! not fit are fragmented across packets (Y / Z flags).

use std::sync::Arc;

use super::Payload;

const OBU_SEQUENCE_HEADER: u8 = 1;
const OBU_TEMPORAL_DELIMITER: u8 = 2;
const OBU_TILE_LIST: u8 = 8;
/// A LEB128 value over 8 bytes is malformed (AV1 spec 4.10.5).
const MAX_LEB128_BYTES: usize = 8;

/// Reads a LEB128 value; `(value, bytes read)`.
fn leb128(data: &[u8]) -> Option<(usize, usize)> {
    let mut value: u64 = 0;
    for (i, b) in data.iter().take(MAX_LEB128_BYTES).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, i + 1));
        }
    }
    None
}

fn write_leb128(mut v: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn leb128_len(v: usize) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// The OBUs of a temporal unit as RTP OBU elements (size field removed),
/// plus whether a sequence header is among them. Stops at the first
/// malformed OBU.
pub(crate) fn elements(tu: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    let mut sequence_header = false;
    let mut rest = tu;
    while let Some(&header) = rest.first() {
        let obu_type = (header >> 3) & 0x0f;
        let has_ext = header & 0x04 != 0;
        let has_size = header & 0x02 != 0;
        let hdr_len = 1 + usize::from(has_ext);
        let Some(hdr) = rest.get(..hdr_len) else {
            break;
        };
        let (payload, next) = if has_size {
            let Some((size, n)) = rest.get(hdr_len..).and_then(leb128) else {
                break;
            };
            let start = hdr_len + n;
            let Some(payload) = start.checked_add(size).and_then(|end| rest.get(start..end)) else {
                break;
            };
            (payload, start + size)
        } else {
            (rest.get(hdr_len..).unwrap_or_default(), rest.len())
        };
        if obu_type != OBU_TEMPORAL_DELIMITER && obu_type != OBU_TILE_LIST {
            sequence_header |= obu_type == OBU_SEQUENCE_HEADER;
            let mut e = Vec::with_capacity(hdr_len + payload.len());
            e.extend_from_slice(hdr);
            if let Some(first) = e.first_mut() {
                *first &= !0x02;
            }
            e.extend_from_slice(payload);
            out.push(e);
        }
        rest = rest.get(next..).unwrap_or_default();
    }
    (out, sequence_header)
}

/// Packetizes one temporal unit into `out`; the last payload gets the marker.
pub(crate) fn packetize(tu: &[u8], keyframe: bool, max: usize, out: &mut Vec<Payload>) {
    let (elements, sequence_header) = elements(tu);
    // N: the first packet of a coded video sequence (a keyframe that
    // carries its sequence header).
    let mut n_flag = keyframe && sequence_header;
    let first = out.len();
    let mut cur: Vec<u8> = vec![0];
    let mut z = false;
    for e in &elements {
        let mut rest = e.as_slice();
        while !rest.is_empty() {
            let space = max.saturating_sub(cur.len());
            // The largest piece whose length prefix and bytes fit.
            let mut take = rest
                .len()
                .min(space.saturating_sub(leb128_len(rest.len().min(space))));
            while take > 0 && leb128_len(take) + take > space {
                take -= 1;
            }
            if take == 0 {
                if cur.len() == 1 {
                    // max too small to carry anything: give up on the frame.
                    return;
                }
                flush(&mut cur, z, false, &mut n_flag, out);
                z = false;
                continue;
            }
            let (piece, tail) = rest.split_at(take);
            write_leb128(piece.len(), &mut cur);
            cur.extend_from_slice(piece);
            rest = tail;
            if !rest.is_empty() {
                // The element continues in the next packet.
                flush(&mut cur, z, true, &mut n_flag, out);
                z = true;
            }
        }
    }
    if cur.len() > 1 {
        flush(&mut cur, z, false, &mut n_flag, out);
    }
    if out.len() > first {
        if let Some(last) = out.last_mut() {
            last.marker = true;
        }
    }
}

fn flush(cur: &mut Vec<u8>, z: bool, y: bool, n: &mut bool, out: &mut Vec<Payload>) {
    let header = (u8::from(z) << 7) | (u8::from(y) << 6) | (u8::from(*n) << 3);
    *n = false;
    let mut v = std::mem::replace(cur, vec![0]);
    if let Some(h) = v.first_mut() {
        *h = header;
    }
    out.push(Payload {
        data: Arc::from(v),
        marker: false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obu(obu_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(obu_type << 3) | 0x02];
        write_leb128(payload.len(), &mut v);
        v.extend_from_slice(payload);
        v
    }

    /// The receiver's side: OBU elements back from the packets.
    fn depacketize(payloads: &[Payload]) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut continuing = false;
        for p in payloads {
            let d = &p.data;
            let (z, y) = (d[0] & 0x80 != 0, d[0] & 0x40 != 0);
            assert_eq!(z, continuing);
            let mut i = 1;
            let mut first = true;
            while i < d.len() {
                let (len, n) = leb128(&d[i..]).unwrap();
                let piece = d[i + n..i + n + len].to_vec();
                if first && z {
                    out.last_mut().unwrap().extend_from_slice(&piece);
                } else {
                    out.push(piece);
                }
                first = false;
                i += n + len;
            }
            continuing = y;
        }
        out
    }

    #[test]
    fn leb128_round_trip() {
        for v in [0usize, 1, 127, 128, 300, 16_383, 16_384, 1 << 30] {
            let mut b = Vec::new();
            write_leb128(v, &mut b);
            assert_eq!(b.len(), leb128_len(v));
            assert_eq!(leb128(&b), Some((v, b.len())));
        }
        assert_eq!(leb128(&[0x80; 9]), None);
    }

    #[test]
    fn round_trip_with_fragmentation() {
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let mut tu = obu(OBU_TEMPORAL_DELIMITER, &[]);
        tu.extend(obu(OBU_SEQUENCE_HEADER, &[1, 2, 3]));
        tu.extend(obu(6, &big)); // OBU_FRAME
        tu.extend(obu(3, &[9; 10])); // a frame header after it
        let mut out = Vec::new();
        packetize(&tu, true, 1100, &mut out);
        assert!(out.len() >= 5);
        assert!(out.iter().all(|p| p.data.len() <= 1100));
        assert_eq!(out[0].data[0] & 0x08, 0x08, "N on the first packet");
        assert!(out[1..].iter().all(|p| p.data[0] & 0x08 == 0));
        assert!(out.last().unwrap().marker);
        let obus = depacketize(&out);
        // Size fields stripped, temporal delimiter dropped.
        assert_eq!(obus.len(), 3);
        assert_eq!(obus[0], vec![OBU_SEQUENCE_HEADER << 3, 1, 2, 3]);
        assert_eq!(obus[1][0], 6 << 3);
        assert_eq!(&obus[1][1..], &big[..]);
        assert_eq!(obus[2], [vec![3 << 3], vec![9; 10]].concat());
    }

    #[test]
    fn last_obu_without_size_field() {
        let tu = [vec![(6 << 3) | 0x02, 2, 7, 7], vec![6 << 3, 5, 5, 5]].concat();
        let (e, seq) = elements(&tu);
        assert!(!seq);
        assert_eq!(e, vec![vec![6 << 3, 7, 7], vec![6 << 3, 5, 5, 5]]);
    }
}
