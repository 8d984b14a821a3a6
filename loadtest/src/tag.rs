//! Frame tags: an H.264 SEI (user_data_unregistered) carrying a sequence number and send time.
//!
//! The publisher puts one in every video access unit; a viewer that finds it knows the frame's
//! place in the sequence (order, gaps) and its latency on the clock shared over loopback.

use crate::annexb::{self, NAL_SEI, START_CODE};

/// Identifies our SEI among others (x264 writes its own user_data_unregistered).
pub const UUID: [u8; 16] = *b"cascade-loadtest";

/// SEI payload type 5: user_data_unregistered (H.264 D.1.6).
const PAYLOAD_USER_DATA_UNREGISTERED: u8 = 5;
/// UUID + sequence (u64) + send time µs (u64).
const PAYLOAD_LEN: usize = 16 + 8 + 8;

/// What a tag carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// Frame sequence number, +1 per video frame sent by a publisher.
    pub seq: u64,
    /// Publisher wall clock at send, µs since the Unix epoch.
    pub sent_us: u64,
}

/// The SEI NAL unit (header included, start code excluded) for `tag`, with emulation
/// prevention applied.
pub fn sei_nal(tag: Tag) -> Vec<u8> {
    let mut rbsp = Vec::with_capacity(3 + PAYLOAD_LEN + 1);
    rbsp.push(PAYLOAD_USER_DATA_UNREGISTERED);
    // invariant: 32 < 255, so the size fits one byte without 0xFF extension.
    rbsp.push(PAYLOAD_LEN as u8);
    rbsp.extend_from_slice(&UUID);
    rbsp.extend_from_slice(&tag.seq.to_be_bytes());
    rbsp.extend_from_slice(&tag.sent_us.to_be_bytes());
    rbsp.push(0x80); // rbsp_trailing_bits
    let mut nal = Vec::with_capacity(rbsp.len() + 8);
    nal.push(NAL_SEI); // forbidden_zero 0, nal_ref_idc 0
    escape_into(&rbsp, &mut nal);
    nal
}

/// Insert `tag`'s SEI into an Annex-B access unit, in front of its first coded slice (an SEI
/// must precede the VCL NAL units of its access unit, H.264 7.4.1.2.3).
pub fn insert(au: &[u8], tag: Tag) -> Vec<u8> {
    let sei = sei_nal(tag);
    let mut out = Vec::with_capacity(au.len() + sei.len() + START_CODE.len());
    let ranges = annexb::nal_ranges(au);
    let first_vcl = ranges
        .iter()
        .find(|r| au.get(r.start).is_some_and(|b| annexb::is_vcl(b & 0x1f)));
    let split = match first_vcl {
        // Back up over the start code of the slice.
        Some(r) => {
            let s = r.start;
            if s >= 4 && au.get(s - 4..s) == Some(START_CODE) {
                s - 4
            } else {
                s.saturating_sub(3)
            }
        }
        None => au.len(),
    };
    out.extend_from_slice(au.get(..split).unwrap_or(au));
    out.extend_from_slice(START_CODE);
    out.extend_from_slice(&sei);
    out.extend_from_slice(au.get(split..).unwrap_or(&[]));
    out
}

/// Find our tag in an Annex-B access unit.
pub fn find(au: &[u8]) -> Option<Tag> {
    annexb::nal_units(au)
        .into_iter()
        .filter(|n| annexb::nal_type(n) == NAL_SEI)
        .find_map(parse_sei)
}

/// Parse an SEI NAL unit (header included); `Some` if one of its messages is our tag.
pub fn parse_sei(nal: &[u8]) -> Option<Tag> {
    let rbsp = unescape(nal.get(1..)?);
    let mut rest = rbsp.as_slice();
    // sei_message()*: payload type and size are each a run of 0xFF plus a final byte.
    while rest.len() > 1 {
        let (kind, r) = read_ff_coded(rest)?;
        let (size, r) = read_ff_coded(r)?;
        let payload = r.get(..size)?;
        rest = r.get(size..)?;
        if kind == usize::from(PAYLOAD_USER_DATA_UNREGISTERED)
            && size == PAYLOAD_LEN
            && payload.get(..16) == Some(&UUID[..])
        {
            let seq = u64::from_be_bytes(payload.get(16..24)?.try_into().ok()?);
            let sent_us = u64::from_be_bytes(payload.get(24..32)?.try_into().ok()?);
            return Some(Tag { seq, sent_us });
        }
    }
    None
}

fn read_ff_coded(data: &[u8]) -> Option<(usize, &[u8])> {
    let mut value = 0usize;
    let mut rest = data;
    loop {
        let (&b, r) = rest.split_first()?;
        rest = r;
        value = value.checked_add(usize::from(b))?;
        if b != 0xff {
            return Some((value, rest));
        }
    }
}

/// RBSP → NAL payload: after two zero bytes, a byte ≤ 3 gets an 0x03 in front (7.4.1).
fn escape_into(rbsp: &[u8], out: &mut Vec<u8>) {
    let mut zeros = 0;
    for &b in rbsp {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
}

/// NAL payload → RBSP: drop each 0x03 that follows two zero bytes.
fn unescape(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut zeros = 0;
    for &b in data {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_with_emulation_prevention() {
        // Zero-heavy values force emulation-prevention bytes into the NAL.
        let tag = Tag { seq: 1, sent_us: 0 };
        let nal = sei_nal(tag);
        assert!(nal.windows(3).any(|w| w == [0, 0, 3]));
        assert!(!nal.windows(3).any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 2));
        assert_eq!(parse_sei(&nal), Some(tag));
    }

    #[test]
    fn inserts_before_first_slice_and_finds_it() {
        let mut au = vec![0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f];
        au.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xce]);
        au.extend_from_slice(&[0, 0, 1, 0x65, 0x88, 0x80]);
        let tag = Tag {
            seq: 42,
            sent_us: 1_700_000_000_000_000,
        };
        let tagged = insert(&au, tag);
        let kinds: Vec<u8> = annexb::nal_units(&tagged)
            .iter()
            .map(|n| annexb::nal_type(n))
            .collect();
        assert_eq!(kinds, vec![7, 8, 6, 5]);
        assert_eq!(find(&tagged), Some(tag));
        assert!(annexb::au_info(&tagged).decodable_start());
    }

    #[test]
    fn skips_foreign_sei_messages() {
        // An x264-style SEI with another UUID, then ours in the same NAL.
        let mut rbsp = vec![5, 17];
        rbsp.extend_from_slice(&[0xaa; 16]);
        rbsp.push(b'x');
        let ours = sei_nal(Tag { seq: 7, sent_us: 9 });
        rbsp.extend_from_slice(&unescape(&ours[1..]));
        let mut nal = vec![NAL_SEI];
        escape_into(&rbsp, &mut nal);
        assert_eq!(parse_sei(&nal), Some(Tag { seq: 7, sent_us: 9 }));
    }

    proptest! {
        #[test]
        fn round_trips(seq in any::<u64>(), sent_us in any::<u64>()) {
            let tag = Tag { seq, sent_us };
            prop_assert_eq!(parse_sei(&sei_nal(tag)), Some(tag));
            let au = insert(&[0, 0, 0, 1, 0x41, 0x9a, 0, 0, 0], tag);
            prop_assert_eq!(find(&au), Some(tag));
        }

        #[test]
        fn escape_round_trips(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut esc = Vec::new();
            escape_into(&data, &mut esc);
            prop_assert_eq!(unescape(&esc), data);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_sei(&data);
            let _ = find(&data);
            let _ = insert(&data, Tag { seq: 1, sent_us: 2 });
        }
    }
}
