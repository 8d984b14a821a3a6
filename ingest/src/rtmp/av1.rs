//! AV1 in RTMP: temporal units as low-overhead OBUs (AV1-ISOBMFF), with
//! the sequence header from av1C put in front of keyframes that lack one so
//! that every group decodes on its own.

use bytes::{BufMut, Bytes, BytesMut};

/// An AV1 temporal unit with the sequence header in front of keyframes that
/// lack one, so that a group decodes on its own.
pub(super) fn with_sequence_header(seq: &Bytes, data: Bytes, keyframe: bool) -> Bytes {
    // OBU type is bits 3..6 of the header byte; 1 = sequence header,
    // 2 = temporal delimiter (which may precede it).
    let has_seq = obu_types(&data).any(|t| t == 1);
    if !keyframe || seq.is_empty() || has_seq {
        return data;
    }
    let mut b = BytesMut::with_capacity(seq.len() + data.len());
    b.put_slice(seq);
    b.put_slice(&data);
    b.freeze()
}

/// The types of the first OBUs of a low-overhead bitstream (those with size
/// fields); stops at the first OBU without one or on malformed input.
fn obu_types(data: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (&h, tail) = rest.split_first()?;
        let t = (h >> 3) & 0x0f;
        rest = if h & 0x02 == 0 {
            &[]
        } else {
            skip_obu(tail, h & 0x04 != 0)
        };
        Some(t)
    })
}

/// The bytes after an OBU whose header byte was just read; empty when
/// malformed (the walk then ends).
fn skip_obu(tail: &[u8], extension: bool) -> &[u8] {
    let Some(mut tail) = tail.get(usize::from(extension)..) else {
        return &[];
    };
    let mut size = 0usize;
    for i in 0..8 {
        let Some((&b, t2)) = tail.split_first() else {
            return &[];
        };
        tail = t2;
        size |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return tail.get(size..).unwrap_or(&[]);
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obu_walk() {
        // Temporal delimiter (size 0), sequence header (size 1).
        let d = [0x12, 0x00, 0x0a, 0x01, 0xaa];
        assert_eq!(obu_types(&d).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(obu_types(&[0x12, 0x85]).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn sequence_header_before_keyframes_only() {
        let seq = Bytes::from_static(&[0x0a, 0x01, 0xaa]);
        let frame = Bytes::from_static(&[0x32, 0x01, 0x00]);
        let key = with_sequence_header(&seq, frame.clone(), true);
        assert_eq!(obu_types(&key).collect::<Vec<_>>(), vec![1, 6]);
        assert_eq!(with_sequence_header(&seq, frame.clone(), false), frame);
        assert_eq!(with_sequence_header(&seq, key.clone(), true), key);
    }
}
