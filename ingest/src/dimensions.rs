//! Picture size of a video keyframe, read from the bitstream: the H.264
//! sequence parameter set (ITU-T H.264 §7.3.2.1.1) and the VP8 key frame
//! header (RFC 6386 §9.1). Simulcast layer choice ranks layers by it.
//! Parsers of network input: they return `None` on anything unexpected and
//! never panic (property tests below).

/// Width and height of a keyframe, when the codec's header says.
pub(crate) fn of_keyframe(codec: cascade_origin::catalog::Codec, au: &[u8]) -> Option<(u32, u32)> {
    use cascade_media::nal::h264 as nal_h264;
    use cascade_origin::catalog::Codec;
    match codec {
        Codec::H264 => cascade_media::annexb::nal_units(au)
            .into_iter()
            .find(|nal| nal_h264::nal_type(nal) == nal_h264::SPS)
            .and_then(|nal| h264_sps(nal.get(1..)?)),
        Codec::Vp8 => vp8(au),
        _ => None,
    }
}

/// VP8 key frame: 3-byte frame tag (bit 0 clear = key frame), start code
/// 9d 01 2a, then 14-bit width and height (2 bits of scaling each).
fn vp8(frame: &[u8]) -> Option<(u32, u32)> {
    let head = frame.get(..10)?;
    if head[0] & 1 != 0 || head[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u32::from(u16::from_le_bytes([head[6], head[7]]) & 0x3fff);
    let h = u32::from(u16::from_le_bytes([head[8], head[9]]) & 0x3fff);
    (w > 0 && h > 0).then_some((w, h))
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
        let bit = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(bit))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |acc, _| Some(acc << 1 | self.bit()?))
    }

    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        ((1u64 << zeros) - 1 + u64::from(self.bits(zeros)?))
            .try_into()
            .ok()
    }

    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// Width and height from an SPS (without its NAL header byte), cropping
/// applied.
fn h264_sps(sps: &[u8]) -> Option<(u32, u32)> {
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
        if chroma_format > 3 {
            return None;
        }
        if chroma_format == 3 {
            r.bit()?; // separate_colour_plane_flag
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            let lists = if chroma_format == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let cycle = r.ue()?;
            if cycle > 255 {
                return None;
            }
            for _ in 0..cycle {
                r.se()?;
            }
        }
        2 => {}
        _ => return None,
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()?.checked_add(1)?;
    let height_units = r.ue()?.checked_add(1)?;
    let frame_mbs_only = r.bit()?;
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field_flag
    }
    r.bit()?; // direct_8x8_inference_flag
    let (mut crop_x, mut crop_y) = (0, 0);
    if r.bit()? == 1 {
        let (left, right, top, bottom) = (r.ue()?, r.ue()?, r.ue()?, r.ue()?);
        let (unit_x, unit_y) = match chroma_format {
            1 => (2, 2 * (2 - frame_mbs_only)),
            2 => (2, 2 - frame_mbs_only),
            _ => (1, 2 - frame_mbs_only),
        };
        crop_x = unit_x * left.checked_add(right)?;
        crop_y = unit_y * top.checked_add(bottom)?;
    }
    let width = width_mbs.checked_mul(16)?.checked_sub(crop_x)?;
    let height = (2 - frame_mbs_only)
        .checked_mul(height_units)?
        .checked_mul(16)?
        .checked_sub(crop_y)?;
    (width > 0 && height > 0 && width <= 16_384 && height <= 16_384).then_some((width, height))
}

fn skip_scaling_list(r: &mut Bits, size: usize) -> Option<()> {
    let (mut last, mut next) = (8i64, 8i64);
    for _ in 0..size {
        if next != 0 {
            next = (last + r.se()? + 256) % 256;
        }
        if next != 0 {
            last = next;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_origin::catalog::Codec;
    use proptest::prelude::*;

    #[test]
    fn x264_sps_sizes() {
        // x264 High 4:2:0, 1280×720 (45×45 MBs, no crop) and 640×360
        // (40×23 MBs, 8 rows cropped), as ffmpeg writes them.
        let hd = [
            0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00, 0x03,
            0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
        ];
        assert_eq!(h264_sps(&hd), Some((1280, 720)));
        let sd = [
            0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03,
            0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96,
        ];
        assert_eq!(h264_sps(&sd), Some((640, 360)));
        let mut au = vec![0, 0, 0, 1, 0x67];
        au.extend_from_slice(&hd);
        au.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88]);
        assert_eq!(of_keyframe(Codec::H264, &au), Some((1280, 720)));
    }

    #[test]
    fn constrained_baseline_with_crop() {
        // 640×360 constrained baseline: 40×23 MBs, frame_cropping bottom 4
        // (×2 = 8 rows).
        let mut w = BitWriter::default();
        w.bits(66, 8);
        w.bits(0xe01f, 16);
        w.ue(0); // sps id
        w.ue(0); // log2_max_frame_num_minus4
        w.ue(2); // poc type 2
        w.ue(1); // max_num_ref_frames
        w.bits(0, 1);
        w.ue(39); // 40 MBs wide
        w.ue(22); // 23 MBs high
        w.bits(1, 1); // frame_mbs_only
        w.bits(1, 1); // direct_8x8
        w.bits(1, 1); // cropping
        w.ue(0);
        w.ue(0);
        w.ue(0);
        w.ue(4);
        w.bits(0, 1); // vui
        assert_eq!(h264_sps(&w.finish()), Some((640, 360)));
    }

    #[test]
    fn vp8_key_frame_header() {
        let mut f = vec![0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a];
        f.extend_from_slice(&1280u16.to_le_bytes());
        f.extend_from_slice(&720u16.to_le_bytes());
        assert_eq!(of_keyframe(Codec::Vp8, &f), Some((1280, 720)));
        f[0] |= 1; // an inter frame has no size
        assert_eq!(of_keyframe(Codec::Vp8, &f), None);
        assert_eq!(of_keyframe(Codec::Av1, &f), None);
    }

    #[derive(Default)]
    struct BitWriter {
        out: Vec<u8>,
        n: usize,
    }

    impl BitWriter {
        fn bits(&mut self, v: u32, count: u32) {
            for i in (0..count).rev() {
                if self.n.is_multiple_of(8) {
                    self.out.push(0);
                }
                let b = (v >> i) & 1;
                let last = self.out.len() - 1;
                self.out[last] |= (b as u8) << (7 - self.n % 8);
                self.n += 1;
            }
        }
        fn ue(&mut self, v: u32) {
            let x = v + 1;
            let len = 32 - x.leading_zeros();
            self.bits(0, len - 1);
            self.bits(x, len);
        }
        fn finish(mut self) -> Vec<u8> {
            self.bits(1, 1); // rbsp stop bit
            self.out
        }
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = h264_sps(&data);
            let _ = of_keyframe(Codec::H264, &data);
            let _ = of_keyframe(Codec::Vp8, &data);
        }
    }
}
