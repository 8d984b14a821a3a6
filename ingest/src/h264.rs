//! H.264/H.265 bitstream helpers: decoder configuration records (avcC, hvcC)
//! to parameter sets, and length-prefixed (AVCC) access units to Annex-B with
//! the parameter sets in front of every keyframe, as the data model requires.

use bytes::{BufMut, Bytes, BytesMut};
use cascade_media::annexb::START_CODE;

// Splitting and NAL types live in cascade-media (shared with edge and
// loadtest); re-exported under the names this crate's callers know.
pub use cascade_media::annexb::nal_units as split_annexb;
pub use cascade_media::nal::Nal;

/// Parameter sets a configuration record may carry. Real encoders send one
/// SPS and one PPS (HEVC: one VPS too); the cap bounds hostile records.
const MAX_PARAMETER_SETS: usize = 16;

/// Why a configuration record or access unit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The record or unit ended before a length said it would.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field holds a value the format does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A parsed decoder configuration record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which NAL syntax the stream uses.
    pub nal: Nal,
    /// Bytes of the length prefix in front of each NAL unit (1, 2 or 4).
    pub length_size: usize,
    /// Parameter sets in the order a decoder needs them (VPS, SPS, PPS).
    pub parameter_sets: Vec<Bytes>,
    /// SDP fmtp for the codec (`profile-level-id=..;packetization-mode=1`).
    pub fmtp: String,
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, Error> {
        let (&b, rest) = self.data.split_first().ok_or(Error::Truncated(self.what))?;
        self.data = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<usize, Error> {
        Ok(usize::from(self.u8()?) << 8 | usize::from(self.u8()?))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.data.len() < n {
            return Err(Error::Truncated(self.what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
}

/// Parses an `AVCDecoderConfigurationRecord` (ISO 14496-15 §5.3.3.1).
pub fn parse_avcc(record: &[u8]) -> Result<Config, Error> {
    let mut r = Reader {
        data: record,
        what: "avcC",
    };
    if r.u8()? != 1 {
        return Err(Error::Invalid("avcC version"));
    }
    r.take(3)?; // profile, compatibility, level: taken from the SPS itself
    let length_size = usize::from(r.u8()? & 0x03) + 1;
    if length_size == 3 {
        return Err(Error::Invalid("avcC length size"));
    }
    let mut parameter_sets = Vec::new();
    let sps_count = r.u8()? & 0x1f;
    for _ in 0..sps_count {
        let n = r.u16()?;
        parameter_sets.push(Bytes::copy_from_slice(r.take(n)?));
    }
    let pps_count = r.u8()?;
    if usize::from(sps_count) + usize::from(pps_count) > MAX_PARAMETER_SETS {
        return Err(Error::Invalid("avcC parameter set count"));
    }
    for _ in 0..pps_count {
        let n = r.u16()?;
        parameter_sets.push(Bytes::copy_from_slice(r.take(n)?));
    }
    // Bytes after the PPS (high-profile chroma fields) are not needed.
    let sps = parameter_sets
        .iter()
        .find(|p| {
            p.first()
                .is_some_and(|&b| Nal::H264.unit_type(b) == cascade_media::nal::h264::SPS)
        })
        .ok_or(Error::Invalid("avcC without SPS"))?;
    let plid = sps.get(1..4).ok_or(Error::Truncated("SPS"))?;
    let fmtp = format!(
        "profile-level-id={:02x}{:02x}{:02x};packetization-mode=1",
        plid[0], plid[1], plid[2]
    );
    Ok(Config {
        nal: Nal::H264,
        length_size,
        parameter_sets,
        fmtp,
    })
}

/// Parses an `HEVCDecoderConfigurationRecord` (ISO 14496-15 §8.3.3.1).
pub fn parse_hvcc(record: &[u8]) -> Result<Config, Error> {
    let mut r = Reader {
        data: record,
        what: "hvcC",
    };
    if r.u8()? != 1 {
        return Err(Error::Invalid("hvcC version"));
    }
    let profile_idc = r.u8()? & 0x1f;
    r.take(19)?; // compatibility, constraint and level fields, chroma, bit depths
    let length_size = usize::from(r.u8()? & 0x03) + 1;
    if length_size == 3 {
        return Err(Error::Invalid("hvcC length size"));
    }
    let arrays = r.u8()?;
    let mut parameter_sets = Vec::new();
    for _ in 0..arrays {
        r.u8()?; // completeness + NAL type: the units carry their own type
        let count = r.u16()?;
        for _ in 0..count {
            if parameter_sets.len() >= MAX_PARAMETER_SETS {
                return Err(Error::Invalid("hvcC parameter set count"));
            }
            let n = r.u16()?;
            parameter_sets.push(Bytes::copy_from_slice(r.take(n)?));
        }
    }
    // Decoders need VPS before SPS before PPS whatever the record's order.
    parameter_sets.sort_by_key(|p| p.first().map_or(0, |&b| Nal::H265.unit_type(b)));
    Ok(Config {
        nal: Nal::H265,
        length_size,
        parameter_sets,
        fmtp: format!("profile-id={profile_idc}"),
    })
}

/// One length-prefixed access unit converted to Annex-B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessUnit {
    /// Annex-B bytes, parameter sets in front when `keyframe`.
    pub payload: Bytes,
    /// True when the unit holds a random access point (IDR/IRAP).
    pub keyframe: bool,
}

/// Splits a length-prefixed access unit into its NAL units, refusing units
/// whose lengths run past the end.
pub fn split_avcc(data: &[u8], length_size: usize) -> Result<Vec<&[u8]>, Error> {
    if !matches!(length_size, 1 | 2 | 4) {
        return Err(Error::Invalid("NAL length size"));
    }
    let mut r = Reader {
        data,
        what: "NAL unit",
    };
    let mut units = Vec::new();
    while !r.data.is_empty() {
        let mut n = 0usize;
        for &b in r.take(length_size)? {
            n = n << 8 | usize::from(b);
        }
        let unit = r.take(n)?;
        if !unit.is_empty() {
            units.push(unit);
        }
    }
    Ok(units)
}

/// Converts a length-prefixed access unit to Annex-B. When it holds a random
/// access point and carries no parameter sets of its own, `config`'s are put
/// in front (after an access unit delimiter, which must stay first).
pub fn to_annexb(data: &[u8], config: &Config) -> Result<AccessUnit, Error> {
    let nal = config.nal;
    let units = split_avcc(data, config.length_size)?;
    let types: Vec<u8> = units
        .iter()
        .map(|u| u.first().map_or(0, |&b| nal.unit_type(b)))
        .collect();
    let keyframe = types.iter().any(|&t| nal.is_random_access(t));
    let inband = types.iter().any(|&t| nal.is_parameter_set(t));
    let insert = keyframe && !inband;
    let extra: usize = if insert {
        config
            .parameter_sets
            .iter()
            .map(|p| p.len() + START_CODE.len())
            .sum()
    } else {
        0
    };
    let mut out = BytesMut::with_capacity(data.len() + extra + units.len() * START_CODE.len());
    let mut inserted = !insert;
    for (unit, &t) in units.iter().zip(&types) {
        if !inserted && !nal.is_delimiter(t) {
            for p in &config.parameter_sets {
                out.put_slice(&START_CODE);
                out.put_slice(p);
            }
            inserted = true;
        }
        out.put_slice(&START_CODE);
        out.put_slice(unit);
    }
    Ok(AccessUnit {
        payload: out.freeze(),
        keyframe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPS: &[u8] = &[0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9];
    const PPS: &[u8] = &[0x68, 0xeb, 0xe3, 0xcb];

    fn avcc() -> Vec<u8> {
        let mut v = vec![1, 0x64, 0x00, 0x1f, 0xff, 0xe1];
        v.extend_from_slice(&(SPS.len() as u16).to_be_bytes());
        v.extend_from_slice(SPS);
        v.push(1);
        v.extend_from_slice(&(PPS.len() as u16).to_be_bytes());
        v.extend_from_slice(PPS);
        v
    }

    fn prefixed(units: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for u in units {
            v.extend_from_slice(&(u.len() as u32).to_be_bytes());
            v.extend_from_slice(u);
        }
        v
    }

    #[test]
    fn avcc_record() {
        let c = parse_avcc(&avcc()).unwrap();
        assert_eq!(c.length_size, 4);
        assert_eq!(
            c.parameter_sets,
            vec![Bytes::from_static(SPS), Bytes::from_static(PPS)]
        );
        assert_eq!(c.fmtp, "profile-level-id=64001f;packetization-mode=1");
        assert!(parse_avcc(&avcc()[..8]).is_err());
        assert!(parse_avcc(&[]).is_err());
    }

    #[test]
    fn idr_gets_parameter_sets_after_delimiter() {
        let c = parse_avcc(&avcc()).unwrap();
        let aud: &[u8] = &[0x09, 0xf0];
        let idr: &[u8] = &[0x65, 0x88, 0x84];
        let au = to_annexb(&prefixed(&[aud, idr]), &c).unwrap();
        assert!(au.keyframe);
        assert_eq!(split_annexb(&au.payload), vec![aud, SPS, PPS, idr]);
        let p: &[u8] = &[0x41, 0x9a];
        let au = to_annexb(&prefixed(&[p]), &c).unwrap();
        assert!(!au.keyframe);
        assert_eq!(split_annexb(&au.payload), vec![p]);
    }

    #[test]
    fn inband_parameter_sets_are_not_doubled() {
        let c = parse_avcc(&avcc()).unwrap();
        let idr: &[u8] = &[0x65, 0x88];
        let au = to_annexb(&prefixed(&[SPS, PPS, idr]), &c).unwrap();
        assert_eq!(split_annexb(&au.payload), vec![SPS, PPS, idr]);
    }

    #[test]
    fn overlong_nal_is_refused() {
        let c = parse_avcc(&avcc()).unwrap();
        assert!(to_annexb(&[0, 0, 0, 9, 0x65], &c).is_err());
        assert!(to_annexb(&[0, 0], &c).is_err());
    }

    #[test]
    fn hvcc_orders_parameter_sets() {
        let mut v = vec![1, 0x01];
        v.extend_from_slice(&[0; 19]);
        v.push(0xff); // length size 4
        v.push(3);
        for unit in [&[0x44u8, 0x01][..], &[0x42, 0x01], &[0x40, 0x01]] {
            v.push(Nal::H265.unit_type(unit[0]));
            v.extend_from_slice(&1u16.to_be_bytes());
            v.extend_from_slice(&(unit.len() as u16).to_be_bytes());
            v.extend_from_slice(unit);
        }
        let c = parse_hvcc(&v).unwrap();
        let types: Vec<u8> = c
            .parameter_sets
            .iter()
            .map(|p| Nal::H265.unit_type(p[0]))
            .collect();
        assert_eq!(types, vec![32, 33, 34]);
        assert_eq!(c.fmtp, "profile-id=1");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256), ls in 0usize..6) {
            let _ = parse_avcc(&data);
            let _ = parse_hvcc(&data);
            let _ = split_avcc(&data, ls);
            let _ = split_annexb(&data);
            let c = parse_avcc(&avcc()).unwrap();
            let _ = to_annexb(&data, &c);
        }

        #[test]
        fn annexb_roundtrip(units in proptest::collection::vec(proptest::collection::vec(1u8..=255, 1..40), 1..8)) {
            // Units without zero bytes cannot contain start codes.
            let c = Config { nal: Nal::H264, length_size: 4, parameter_sets: vec![], fmtp: String::new() };
            let refs: Vec<&[u8]> = units.iter().map(|u| u.as_slice()).collect();
            let au = to_annexb(&prefixed(&refs), &c).unwrap();
            prop_assert_eq!(split_annexb(&au.payload), refs);
        }
    }
}
