//! H.264 Annex-B parsing: split a byte stream into NAL units and access units, classify them.
//!
//! Used on ffmpeg's output (to build frames) and on what viewers receive (str0m's depacketizer
//! emits Annex-B), so it must never panic on arbitrary bytes.

use std::ops::Range;

/// NAL unit type: coded slice of a non-IDR picture.
pub const NAL_SLICE: u8 = 1;
/// NAL unit type: coded slice of an IDR picture.
pub const NAL_IDR: u8 = 5;
/// NAL unit type: supplemental enhancement information.
pub const NAL_SEI: u8 = 6;
/// NAL unit type: sequence parameter set.
pub const NAL_SPS: u8 = 7;
/// NAL unit type: picture parameter set.
pub const NAL_PPS: u8 = 8;
/// NAL unit type: access unit delimiter.
pub const NAL_AUD: u8 = 9;

/// The 4-byte start code written in front of every NAL we emit.
pub const START_CODE: &[u8] = &[0, 0, 0, 1];

/// The type (low 5 bits of the header byte) of a NAL unit; 0 for an empty one.
pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// True for coded-slice NAL types (1..=5).
pub fn is_vcl(kind: u8) -> bool {
    (1..=5).contains(&kind)
}

/// Byte ranges of the NAL units in `data` (start codes excluded, trailing zeros of the
/// 4-byte start code trimmed). Bytes before the first start code are ignored.
pub fn nal_ranges(data: &[u8]) -> Vec<Range<usize>> {
    // Positions just past each start code (00 00 01); a preceding 00 belongs to a 4-byte code.
    let mut starts: Vec<(usize, usize)> = Vec::new(); // (code_start, payload_start)
    let mut i = 0;
    while i + 2 < data.len() {
        if data.get(i..i + 3) == Some(&[0, 0, 1]) {
            let code_start = if i > 0 && data.get(i - 1) == Some(&0) {
                i - 1
            } else {
                i
            };
            starts.push((code_start, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (n, &(_, begin)) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(data.len(), |&(code, _)| code);
        // Trailing zero bytes are not part of the NAL (trailing_zero_8bits).
        let mut end = end.max(begin);
        while end > begin && data.get(end - 1) == Some(&0) {
            end -= 1;
        }
        if end > begin {
            out.push(begin..end);
        }
    }
    out
}

/// The NAL units of `data`, as slices.
pub fn nal_units(data: &[u8]) -> Vec<&[u8]> {
    nal_ranges(data)
        .into_iter()
        .filter_map(|r| data.get(r))
        .collect()
}

/// What one access unit contains, as far as the tests care.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuInfo {
    /// Has an IDR slice.
    pub idr: bool,
    /// Has a sequence parameter set.
    pub sps: bool,
    /// Has a picture parameter set.
    pub pps: bool,
    /// Has any coded slice.
    pub vcl: bool,
}

impl AuInfo {
    /// A decoder can start here: IDR with SPS and PPS in front.
    pub fn decodable_start(&self) -> bool {
        self.idr && self.sps && self.pps
    }
}

/// Classify the NAL units of one access unit.
pub fn au_info(au: &[u8]) -> AuInfo {
    let mut info = AuInfo::default();
    for nal in nal_units(au) {
        match nal_type(nal) {
            NAL_IDR => {
                info.idr = true;
                info.vcl = true;
            }
            NAL_SPS => info.sps = true,
            NAL_PPS => info.pps = true,
            k if is_vcl(k) => info.vcl = true,
            _ => {}
        }
    }
    info
}

/// Starts a new picture: a slice whose `first_mb_in_slice` is 0. That field is the first
/// ue(v) after the 1-byte header, and ue(v) value 0 is the single bit `1`.
fn first_slice_of_picture(nal: &[u8]) -> bool {
    nal.get(1).is_some_and(|b| b & 0x80 != 0)
}

/// Split an Annex-B elementary stream into access units (byte ranges of `data`, each starting
/// at a start code). A new unit starts at an AUD, at a non-VCL NAL (SPS/PPS/SEI) following a
/// slice, or at a slice with `first_mb_in_slice == 0` following a slice.
pub fn access_units(data: &[u8]) -> Vec<Range<usize>> {
    let mut units = Vec::new();
    let mut code_starts = Vec::new();
    let nals = nal_ranges(data);
    // Recover where each NAL's start code begins (3 or 4 bytes before the payload).
    for r in &nals {
        let s = r.start;
        let code = if s >= 4 && data.get(s - 4..s) == Some(START_CODE) {
            s - 4
        } else {
            s.saturating_sub(3)
        };
        code_starts.push(code);
    }
    let mut cur_start: Option<usize> = None;
    let mut seen_vcl = false;
    for (r, &code) in nals.iter().zip(&code_starts) {
        let Some(nal) = data.get(r.clone()) else {
            continue;
        };
        let kind = nal_type(nal);
        let boundary = match cur_start {
            None => true,
            Some(_) if kind == NAL_AUD => true,
            Some(_) if is_vcl(kind) => seen_vcl && first_slice_of_picture(nal),
            Some(_) => seen_vcl && matches!(kind, NAL_SEI | NAL_SPS | NAL_PPS),
        };
        if boundary {
            if let Some(start) = cur_start {
                units.push(start..code);
            }
            cur_start = Some(code);
            seen_vcl = false;
        }
        if is_vcl(kind) {
            seen_vcl = true;
        }
    }
    if let Some(start) = cur_start {
        units.push(start..data.len());
    }
    units
}

/// The `profile_idc`, constraint flags and `level_idc` of the first SPS in `data`.
pub fn sps_profile(data: &[u8]) -> Option<(u8, u8, u8)> {
    let sps = nal_units(data)
        .into_iter()
        .find(|n| nal_type(n) == NAL_SPS)?;
    Some((*sps.get(1)?, *sps.get(2)?, *sps.get(3)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nal(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = START_CODE.to_vec();
        v.push(0x60 | kind);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn splits_nals_with_3_and_4_byte_codes() {
        let mut data = nal(NAL_SPS, &[0x42, 0xe0, 0x1f]);
        data.extend_from_slice(&[0, 0, 1, 0x68, 0xce]);
        data.extend(nal(NAL_IDR, &[0x88, 1, 2]));
        let nals = nal_units(&data);
        assert_eq!(nals.len(), 3);
        assert_eq!(nal_type(nals[0]), NAL_SPS);
        assert_eq!(nals[1], &[0x68, 0xce]);
        assert_eq!(nal_type(nals[2]), NAL_IDR);
        assert_eq!(sps_profile(&data), Some((0x42, 0xe0, 0x1f)));
    }

    #[test]
    fn splits_access_units_by_aud_and_first_slice() {
        let mut data = nal(NAL_AUD, &[0xf0]);
        data.extend(nal(NAL_SPS, &[0x42, 0, 0x1f]));
        data.extend(nal(NAL_PPS, &[0xce]));
        data.extend(nal(NAL_IDR, &[0x88, 1]));
        data.extend(nal(NAL_IDR, &[0x10, 1])); // second slice of the same picture
        data.extend(nal(NAL_SLICE, &[0x9a, 2])); // new picture, no AUD
        data.extend(nal(NAL_SEI, &[5, 1, 0]));
        data.extend(nal(NAL_SLICE, &[0x9a, 3]));
        let aus = access_units(&data);
        assert_eq!(aus.len(), 3);
        let first = au_info(&data[aus[0].clone()]);
        assert!(first.decodable_start());
        assert!(!au_info(&data[aus[1].clone()]).idr);
        assert_eq!(nal_units(&data[aus[2].clone()]).len(), 2);
        // Units tile the stream.
        assert_eq!(aus[0].start, 0);
        assert_eq!(aus[2].end, data.len());
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = nal_units(&data);
            let aus = access_units(&data);
            for au in aus {
                prop_assert!(au.start <= au.end && au.end <= data.len());
                let _ = au_info(&data[au]);
            }
            let _ = sps_profile(&data);
        }

        #[test]
        fn round_trips_nal_bodies(bodies in proptest::collection::vec(
            proptest::collection::vec(1u8..=255, 1..40), 1..8)) {
            // Bodies without zero bytes cannot contain start codes, so splitting recovers them.
            let mut data = Vec::new();
            for b in &bodies {
                data.extend_from_slice(START_CODE);
                data.extend_from_slice(b);
            }
            let nals = nal_units(&data);
            prop_assert_eq!(nals.len(), bodies.len());
            for (n, b) in nals.iter().zip(&bodies) {
                prop_assert_eq!(*n, b.as_slice());
            }
        }
    }
}
