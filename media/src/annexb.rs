//! Annex-B byte streams (H.264 Annex B, H.265 Annex B): splitting into NAL
//! units. Frames in cascade carry Annex-B access units; ingest builds them,
//! edge packetizes them, loadtest reads them back. Never panics on any input.
//!
//! Splitting rules (the byte stream syntax of H.264/H.265 Annex B):
//! - a NAL unit starts after `00 00 01`; a zero byte in front of it is the
//!   4-byte start code's (or `leading_zero_8bits`), not payload;
//! - bytes before the first start code are not a NAL unit (ignored);
//! - zero bytes at the end of a unit are `trailing_zero_8bits` (a NAL unit
//!   ends in the RBSP stop bit, never in a zero byte) and are trimmed;
//! - units that are empty after that are skipped.

use std::ops::Range;

/// The 4-byte start code written in front of every NAL unit we emit.
pub const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// Byte ranges of the NAL units in `data` (start codes and trailing zero
/// bytes excluded; see the module doc for the rules).
pub fn nal_ranges(data: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    // Look for the 0x01 of each `00 00 01`: a byte search the compiler
    // vectorizes, instead of matching three bytes at every offset.
    let mut i = 2;
    while let Some(k) = data.get(i..).and_then(|s| s.iter().position(|&b| b == 1)) {
        let j = i + k;
        // invariant: j >= i >= 2.
        if data.get(j - 2..j) == Some(&[0, 0][..]) {
            if let Some(s) = start {
                push(data, s, j - 2, &mut out);
            }
            start = Some(j + 1);
            // The next start code's 0x01 comes at least 3 bytes later.
            i = j + 3;
        } else {
            i = j + 1;
        }
    }
    if let Some(s) = start {
        push(data, s, data.len(), &mut out);
    }
    out
}

fn push(data: &[u8], start: usize, mut end: usize, out: &mut Vec<Range<usize>>) {
    // Zeros before a start code are trailing_zero_8bits or the first byte
    // of a 4-byte start code, never NAL payload (RBSP ends in a 1 bit).
    while end > start && data.get(end - 1) == Some(&0) {
        end -= 1;
    }
    if end > start {
        out.push(start..end);
    }
}

/// The NAL units of an Annex-B buffer, as slices of it.
pub fn nal_units(data: &[u8]) -> Vec<&[u8]> {
    nal_ranges(data)
        .into_iter()
        .filter_map(|r| data.get(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference split, as plain as it gets: every `00 00 01` from the left,
    /// bytes before the first ignored, trailing zeros trimmed, empties skipped.
    fn naive(data: &[u8]) -> Vec<&[u8]> {
        fn close<'a>(data: &'a [u8], s: usize, mut e: usize, out: &mut Vec<&'a [u8]>) {
            while e > s && data[e - 1] == 0 {
                e -= 1;
            }
            if e > s {
                out.push(&data[s..e]);
            }
        }
        let mut out = Vec::new();
        let mut start: Option<usize> = None;
        let mut i = 0;
        while i + 3 <= data.len() {
            if data[i..i + 3] == [0, 0, 1] {
                if let Some(s) = start {
                    close(data, s, i, &mut out);
                }
                i += 3;
                start = Some(i);
            } else {
                i += 1;
            }
        }
        if let Some(s) = start {
            close(data, s, data.len(), &mut out);
        }
        out
    }

    // From edge/src/packetize/h26x.rs.
    #[test]
    fn start_codes_and_trailing_zeros() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 0, 0, 0, 0, 1, 0x68, 2, 0, 0, 1, 0x65, 3,
        ];
        let n = nal_units(&data);
        assert_eq!(n, vec![&[0x67, 1][..], &[0x68, 2][..], &[0x65, 3][..]]);
        assert!(nal_units(&[]).is_empty());
        assert!(nal_units(&[0, 0, 1]).is_empty());
    }

    // From loadtest/src/annexb.rs.
    #[test]
    fn splits_nals_with_3_and_4_byte_codes() {
        let mut data = vec![0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f];
        data.extend_from_slice(&[0, 0, 1, 0x68, 0xce]);
        data.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 1, 2]);
        let nals = nal_units(&data);
        assert_eq!(
            nals,
            vec![
                &[0x67, 0x42, 0xe0, 0x1f][..],
                &[0x68, 0xce][..],
                &[0x65, 0x88, 1, 2][..]
            ]
        );
        assert_eq!(nal_ranges(&data), vec![4..8, 11..13, 17..21]);
    }

    #[test]
    fn edge_cases() {
        // Bytes before the first start code are not a unit.
        assert_eq!(
            nal_units(&[0x41, 0x9a, 0, 0, 1, 0x65, 1]),
            vec![&[0x65, 1][..]]
        );
        assert!(nal_units(&[0x41, 0x9a]).is_empty());
        // Leading zeros (leading_zero_8bits) and trailing zeros at the end.
        assert_eq!(
            nal_units(&[0, 0, 0, 0, 0, 1, 0x09, 0xf0, 0, 0]),
            vec![&[0x09, 0xf0][..]]
        );
        // Back-to-back start codes give no empty unit.
        assert_eq!(
            nal_units(&[0, 0, 1, 0, 0, 1, 0x41, 0, 0, 0, 1]),
            vec![&[0x41][..]]
        );
        // A 0x01 inside a unit after a single zero is payload.
        assert_eq!(
            nal_units(&[0, 0, 1, 0x41, 0, 1, 2]),
            vec![&[0x41, 0, 1, 2][..]]
        );
    }

    proptest! {
        // Inputs rich in 00 and 01 bytes so start codes are frequent.
        #[test]
        fn matches_a_naive_split(data in proptest::collection::vec(
            prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..200)) {
            prop_assert_eq!(nal_units(&data), naive(&data));
            for r in nal_ranges(&data) {
                prop_assert!(r.start < r.end && r.end <= data.len());
            }
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = nal_units(&data);
        }

        // From ingest/src/h264.rs and loadtest/src/annexb.rs: bodies without
        // zero bytes cannot contain start codes, so splitting recovers them,
        // whichever start code length is in front.
        #[test]
        fn round_trips(bodies in proptest::collection::vec(
            proptest::collection::vec(1u8..=255, 1..40), 1..8),
            four in proptest::collection::vec(any::<bool>(), 8)) {
            let mut data = Vec::new();
            for (b, &four) in bodies.iter().zip(&four) {
                data.extend_from_slice(if four { &START_CODE[..] } else { &START_CODE[1..] });
                data.extend_from_slice(b);
            }
            let want: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(nal_units(&data), want);
        }
    }
}
