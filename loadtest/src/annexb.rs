//! H.264 Annex-B parsing: split a byte stream into access units, classify them (NAL
//! splitting itself is `cascade_media::annexb`).
//!
//! Used on ffmpeg's output (to build frames) and on what viewers receive (str0m's depacketizer
//! emits Annex-B), so it must never panic on arbitrary bytes.

use std::ops::Range;

// NAL splitting and types live in cascade-media (shared with ingest and
// edge); re-exported under the names loadtest and its tests use.
pub use cascade_media::annexb::{nal_ranges, nal_units};
pub use cascade_media::nal::h264::{
    is_vcl, nal_type, AUD as NAL_AUD, IDR as NAL_IDR, PPS as NAL_PPS, SEI as NAL_SEI,
    SLICE as NAL_SLICE, SPS as NAL_SPS,
};

/// The 4-byte start code written in front of every NAL we emit.
pub const START_CODE: &[u8] = &cascade_media::annexb::START_CODE;

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
    fn reads_the_sps_profile() {
        let mut data = nal(NAL_SPS, &[0x42, 0xe0, 0x1f]);
        data.extend_from_slice(&[0, 0, 1, 0x68, 0xce]);
        data.extend(nal(NAL_IDR, &[0x88, 1, 2]));
        assert_eq!(sps_profile(&data), Some((0x42, 0xe0, 0x1f)));
        assert_eq!(sps_profile(&data[8..]), None);
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
    }
}
