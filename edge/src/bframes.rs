//! How frames of a stream with B-frames get their RTP timestamps (and which
//! are sent), chosen by measurement in headless Chromium: docs/bframes.md.
//! Streams without B-frames (pts = dts) come out the same under every method.

use cascade_media::annexb;
use cascade_media::nal::{h264, Nal};

/// A video frame's RTP timestamp, frames always sent in decode order.
/// Measured in Debian's Chromium 156 (docs/bframes.md): with B-frames in
/// the stream it decodes only keyframes whatever the timestamps (~1 fps,
/// a PLI storm), so the default drops B slices. Chosen per node by
/// [`crate::Config::bframe_ts`]; the cascade binary lets the side-by-side
/// measurement (tests/browser_bframes.rs) override it with the environment
/// variable `CASCADE_EDGE_BFRAME_TS`, not part of the operator interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BframeTs {
    /// RTP timestamp = pts (RFC 6184's sampling instant of the picture).
    /// Chromium: ~1 fps, only keyframes decode (and it also discards frames
    /// whose RTP timestamp is older than one already decoded).
    Pts,
    /// RTP timestamp = dts + the reorder delay (pts − dts of the timeline's
    /// first frame, a keyframe): monotonic in decode order, video kept on the
    /// audio's presentation clock. Chromium: still ~1 fps — its WebRTC H.264
    /// decoding does not survive the reorder delay itself, not the timestamps.
    Dts,
    /// Drop B slices (SRS's default, `keep_bframe off`) and stamp the rest
    /// with their pts, which is monotonic once the B-frames are gone. x264's
    /// P-frames do not reference B-frames (the I/P pictures decode
    /// bit-exact without them, docs/bframes.md): Chromium plays every I/P
    /// frame (~8–15 fps with x264's adaptive B-frames), no decode errors.
    DropB,
}

impl BframeTs {
    /// The method chosen by measurement (docs/bframes.md): the only one that
    /// keeps a B-frame stream moving in Chromium without transcoding.
    pub const DEFAULT: Self = Self::DropB;

    /// `pts`, `dts`, `drop-b`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pts" => Some(Self::Pts),
            "dts" => Some(Self::Dts),
            "drop-b" | "drop" => Some(Self::DropB),
            _ => None,
        }
    }
}

impl Default for BframeTs {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// True when the Annex-B H.264 access unit's first slice is a B slice
/// (H.264 7.3.3: `first_mb_in_slice` ue(v), then `slice_type` ue(v),
/// B = 1 or 6). Never panics on any input.
pub fn is_h264_b_slice(au: &[u8]) -> bool {
    for nal in annexb::nal_ranges(au) {
        let Some(&header) = au.get(nal.start) else {
            continue;
        };
        if matches!(Nal::H264.unit_type(header), h264::SLICE | h264::IDR) {
            // Enough of the slice header for two ue(v), escapes removed.
            let body = au.get(nal.start + 1..).unwrap_or(&[]);
            let rbsp = unescape(body, 16);
            let mut r = Bits {
                data: &rbsp,
                pos: 0,
            };
            return r.ue().is_some() && r.ue().is_some_and(|t| t % 5 == 1);
        }
    }
    false
}

/// Up to `max` RBSP bytes of a NAL body (emulation prevention removed).
fn unescape(body: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(max);
    let mut zeros = 0;
    for &b in body {
        if out.len() >= max {
            break;
        }
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// An MSB-first bit reader for Exp-Golomb codes.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - (self.pos % 8))) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }

    /// ue(v); `None` past the data or beyond 31 leading zeros.
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0u32;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let mut v = 0u32;
        for _ in 0..zeros {
            v = (v << 1) | self.bit()?;
        }
        u32::try_from((1u64 << zeros) - 1 + u64::from(v)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slice NAL (type `nal_type`) whose header starts with
    /// first_mb_in_slice = 0 ("1") and slice_type `t` as ue(v).
    fn slice(nal_type: u8, t: u32) -> Vec<u8> {
        // ue(t): (t+1) in binary with leading zeros; prefix "1" for mb 0.
        let code = t + 1;
        let len = 32 - code.leading_zeros();
        let mut bits = vec![1u8];
        bits.extend(std::iter::repeat_n(0u8, (len - 1) as usize));
        bits.extend((0..len).rev().map(|i| ((code >> i) & 1) as u8));
        bits.push(1);
        let mut bytes = vec![0u8; bits.len().div_ceil(8)];
        for (i, b) in bits.iter().enumerate() {
            bytes[i / 8] |= b << (7 - i % 8);
        }
        let mut nal = vec![0, 0, 0, 1, 0x60 | nal_type];
        nal.extend(bytes);
        nal.extend([0x55; 8]);
        nal
    }

    #[test]
    fn slice_types() {
        assert!(is_h264_b_slice(&slice(1, 1)));
        assert!(is_h264_b_slice(&slice(1, 6)));
        assert!(!is_h264_b_slice(&slice(1, 0))); // P
        assert!(!is_h264_b_slice(&slice(5, 7))); // I (IDR)
        assert!(!is_h264_b_slice(&slice(1, 5))); // P, all slices

        // SEI and SPS in front are skipped.
        let mut au = vec![0, 0, 0, 1, 0x06, 5, 1, 0x80, 0, 0, 1, 0x67, 0x64];
        au.extend(slice(1, 1));
        assert!(is_h264_b_slice(&au));
        assert!(!is_h264_b_slice(&[]));
        assert!(!is_h264_b_slice(&[0, 0, 1]));
    }

    #[test]
    fn methods_parse() {
        assert_eq!(BframeTs::parse("pts"), Some(BframeTs::Pts));
        assert_eq!(BframeTs::parse("dts"), Some(BframeTs::Dts));
        assert_eq!(BframeTs::parse("drop-b"), Some(BframeTs::DropB));
        assert_eq!(BframeTs::parse("x"), None);
    }

    proptest! {
        #[test]
        fn b_slice_check_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = is_h264_b_slice(&data);
            let mut au = vec![0, 0, 1, 0x41];
            au.extend(&data);
            let _ = is_h264_b_slice(&au);
        }
    }
}
