//! NAL unit headers of H.264 (ITU-T H.264 §7.3.1) and H.265 (§7.3.1.2):
//! the unit type and the classes of units the roles act on (parameter
//! sets, random access points, delimiters, filler).

/// The two NAL-based codecs, whose NAL headers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nal {
    /// H.264: one-byte NAL header, type in the low 5 bits.
    H264,
    /// H.265: two-byte NAL header, type in bits 1..7 of the first byte.
    H265,
}

impl Nal {
    /// Length of the NAL unit header in bytes.
    pub fn header_len(self) -> usize {
        match self {
            Self::H264 => 1,
            Self::H265 => 2,
        }
    }

    /// The NAL unit type from a unit's first header byte.
    pub fn unit_type(self, first: u8) -> u8 {
        match self {
            Self::H264 => first & 0x1f,
            Self::H265 => (first >> 1) & 0x3f,
        }
    }

    /// The NAL unit type of a unit; 0 for an empty one.
    pub fn type_of(self, nal: &[u8]) -> u8 {
        nal.first().map_or(0, |&b| self.unit_type(b))
    }

    /// True for a unit a decoder can start at: H.264 IDR (5), H.265 IRAP
    /// (BLA/IDR/CRA, 16..=21).
    pub fn is_random_access(self, unit_type: u8) -> bool {
        match self {
            Self::H264 => unit_type == h264::IDR,
            Self::H265 => (16..=21).contains(&unit_type),
        }
    }

    /// True for a parameter set (H.264 SPS/PPS; H.265 VPS/SPS/PPS).
    pub fn is_parameter_set(self, unit_type: u8) -> bool {
        match self {
            Self::H264 => unit_type == h264::SPS || unit_type == h264::PPS,
            Self::H265 => (32..=34).contains(&unit_type),
        }
    }

    /// True for an access unit delimiter, which must stay first.
    pub fn is_delimiter(self, unit_type: u8) -> bool {
        match self {
            Self::H264 => unit_type == h264::AUD,
            Self::H265 => unit_type == 35,
        }
    }

    /// True for filler data, which carries nothing a decoder needs.
    pub fn is_filler(self, unit_type: u8) -> bool {
        match self {
            Self::H264 => unit_type == h264::FILLER,
            Self::H265 => unit_type == 38,
        }
    }
}

/// H.264 NAL unit types (ITU-T H.264 table 7-1) and shorthands.
pub mod h264 {
    use super::Nal;

    /// Coded slice of a non-IDR picture.
    pub const SLICE: u8 = 1;
    /// Coded slice of an IDR picture.
    pub const IDR: u8 = 5;
    /// Supplemental enhancement information.
    pub const SEI: u8 = 6;
    /// Sequence parameter set.
    pub const SPS: u8 = 7;
    /// Picture parameter set.
    pub const PPS: u8 = 8;
    /// Access unit delimiter.
    pub const AUD: u8 = 9;
    /// Filler data.
    pub const FILLER: u8 = 12;

    /// The type (low 5 bits of the header byte) of a NAL unit; 0 for an
    /// empty one.
    pub fn nal_type(nal: &[u8]) -> u8 {
        Nal::H264.type_of(nal)
    }

    /// True for coded-slice NAL types (1..=5).
    pub fn is_vcl(unit_type: u8) -> bool {
        (SLICE..=IDR).contains(&unit_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_types() {
        assert_eq!(h264::nal_type(&[0x67, 0x64]), h264::SPS);
        assert_eq!(h264::nal_type(&[0x65]), h264::IDR);
        assert_eq!(h264::nal_type(&[]), 0);
        assert!(Nal::H264.is_parameter_set(h264::SPS) && Nal::H264.is_parameter_set(h264::PPS));
        assert!(!Nal::H264.is_parameter_set(h264::SEI));
        assert!(Nal::H264.is_random_access(h264::IDR) && !Nal::H264.is_random_access(1));
        assert!(Nal::H264.is_delimiter(9) && Nal::H264.is_filler(12));
        assert!(h264::is_vcl(1) && h264::is_vcl(5) && !h264::is_vcl(6) && !h264::is_vcl(0));
        assert_eq!(Nal::H264.header_len(), 1);
    }

    #[test]
    fn h265_types() {
        // VPS 0x40, SPS 0x42, PPS 0x44, IDR_W_RADL 0x26, CRA 0x2a, AUD 0x46.
        let t = |b: u8| Nal::H265.unit_type(b);
        assert_eq!([t(0x40), t(0x42), t(0x44)], [32, 33, 34]);
        assert!([0x40, 0x42, 0x44]
            .iter()
            .all(|&b| Nal::H265.is_parameter_set(t(b))));
        assert!(Nal::H265.is_random_access(t(0x26)) && Nal::H265.is_random_access(t(0x2a)));
        assert!(!Nal::H265.is_random_access(t(0x02)));
        assert!(Nal::H265.is_delimiter(t(0x46)) && Nal::H265.is_filler(38));
        assert_eq!(Nal::H265.type_of(&[0x26, 0x01]), 19);
        assert_eq!(Nal::H265.header_len(), 2);
    }
}
