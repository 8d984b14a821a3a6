//! The picture size a keyframe announces: H.264 from its SPS, VP8 from its
//! key frame header. A viewer reports with it which rendition the server sent
//! it (`--viewer-caps`): renditions of one stream differ in size. Network
//! input, so it never panics (proptest below).

use str0m::format::Codec;

use crate::annexb::{nal_type, nal_units, NAL_SPS};

/// Width and height of the picture a keyframe starts, if it says.
pub fn size(codec: Codec, data: &[u8]) -> Option<(u32, u32)> {
    match codec {
        Codec::H264 => nal_units(data)
            .into_iter()
            .find(|n| nal_type(n) == NAL_SPS)
            .and_then(|n| h264_sps_size(n.get(1..)?)),
        Codec::Vp8 => vp8_size(data),
        _ => None,
    }
}

/// RFC 6386 §9.1: a key frame's 3-byte tag, start code 9d 01 2a, then
/// 14-bit width and height (2 bits of scaling each above them).
fn vp8_size(d: &[u8]) -> Option<(u32, u32)> {
    if d.first()? & 1 != 0 || d.get(3..6)? != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([*d.get(6)?, *d.get(7)?]) & 0x3fff;
    let h = u16::from_le_bytes([*d.get(8)?, *d.get(9)?]) & 0x3fff;
    Some((u32::from(w), u32::from(h)))
}

/// Exp-Golomb bit reader over an RBSP (emulation prevention removed).
struct Bits {
    data: Vec<u8>,
    pos: usize,
}

impl Bits {
    fn new(ebsp: &[u8]) -> Self {
        let mut data = Vec::with_capacity(ebsp.len());
        let mut zeros = 0;
        for &b in ebsp {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            data.push(b);
        }
        Self { data, pos: 0 }
    }

    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Some(v)
    }

    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.bits(zeros)?;
        Some(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }

    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// H.264 §7.3.2.1.1 up to the frame size and cropping; `sps` is the NAL
/// payload after its 1-byte header.
fn h264_sps_size(sps: &[u8]) -> Option<(u32, u32)> {
    let mut r = Bits::new(sps);
    let profile = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format = 1;
    if matches!(
        profile,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format = r.ue()?;
        if chroma_format == 3 {
            r.bit()?; // separate_colour_plane_flag
        }
        r.ue()?; // bit_depth_luma
        r.ue()?; // bit_depth_chroma
        r.bit()?; // qpprime_y_zero_transform_bypass
        if r.bit()? == 1 {
            let lists = if chroma_format == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i64, 8i64);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256) % 256;
                        }
                        last = if next == 0 { last } else { next };
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?;
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let n = r.ue()?;
            if n > 255 {
                return None;
            }
            for _ in 0..n {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed
    let w_mbs = u64::from(r.ue()?) + 1;
    let h_units = u64::from(r.ue()?) + 1;
    let frame_mbs_only = u64::from(r.bit()?);
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field
    }
    r.bit()?; // direct_8x8_inference
    let (mut cl, mut cr, mut ct, mut cb) = (0, 0, 0, 0);
    if r.bit()? == 1 {
        cl = u64::from(r.ue()?);
        cr = u64::from(r.ue()?);
        ct = u64::from(r.ue()?);
        cb = u64::from(r.ue()?);
    }
    let (sub_w, sub_h) = match chroma_format {
        1 => (2, 2),
        2 => (2, 1),
        _ => (1, 1),
    };
    let (crop_x, crop_y) = if chroma_format == 0 {
        (1, 2 - frame_mbs_only)
    } else {
        (sub_w, sub_h * (2 - frame_mbs_only))
    };
    let w = (w_mbs * 16).checked_sub(crop_x * (cl + cr))?;
    let h = ((2 - frame_mbs_only) * h_units * 16).checked_sub(crop_y * (ct + cb))?;
    Some((u32::try_from(w).ok()?, u32::try_from(h).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// SPS NAL units (with header byte) as Debian's ffmpeg/x264 writes them
    /// (`-f lavfi -i testsrc=size=WxH -pix_fmt yuv420p -profile:v P`).
    const SPS_1280X720_HIGH: &[u8] = &[
        0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00, 0x03,
        0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
    ];
    const SPS_320X180_BASELINE: &[u8] = &[
        0x67, 0x42, 0xc0, 0x0d, 0xd9, 0x01, 0x41, 0x9f, 0x9f, 0x01, 0x10, 0x00, 0x00, 0x03, 0x00,
        0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x42, 0xa4, 0x80,
    ];
    const SPS_640X360_MAIN: &[u8] = &[
        0x67, 0x4d, 0x40, 0x1e, 0xec, 0xa0, 0x50, 0x17, 0xfc, 0xb8, 0x08, 0x80, 0x00, 0x00, 0x03,
        0x00, 0x80, 0x00, 0x00, 0x1e, 0x07, 0x8b, 0x16, 0xcb,
    ];
    const SPS_854X480_HIGH: &[u8] = &[
        0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0xd8, 0x3d, 0xe6, 0xf0, 0x11, 0x00, 0x00, 0x03,
        0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x18, 0x31, 0x96,
    ];

    fn annexb(nal: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0, 1];
        v.extend_from_slice(nal);
        v.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80]);
        v
    }

    #[test]
    fn reads_h264_sizes() {
        assert_eq!(
            size(Codec::H264, &annexb(SPS_1280X720_HIGH)),
            Some((1280, 720))
        );
        assert_eq!(
            size(Codec::H264, &annexb(SPS_320X180_BASELINE)),
            Some((320, 180))
        );
        assert_eq!(
            size(Codec::H264, &annexb(SPS_640X360_MAIN)),
            Some((640, 360))
        );
        assert_eq!(
            size(Codec::H264, &annexb(SPS_854X480_HIGH)),
            Some((854, 480))
        );
        assert_eq!(size(Codec::H264, &[0, 0, 0, 1, 0x65, 0x88]), None);
    }

    #[test]
    fn reads_vp8_sizes() {
        let key = [
            0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01, 0, 0,
        ];
        assert_eq!(size(Codec::Vp8, &key), Some((640, 360)));
        let mut inter = key;
        inter[0] |= 1;
        assert_eq!(size(Codec::Vp8, &inter), None);
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = size(Codec::H264, &data);
            let _ = size(Codec::Vp8, &data);
            let mut nal = vec![0, 0, 0, 1, 0x67];
            nal.extend_from_slice(&data);
            let _ = size(Codec::H264, &nal);
        }
    }
}
