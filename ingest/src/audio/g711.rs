//! G.711 (ITU-T, 1972) μ-law and A-law sample expansion: IP cameras send
//! it over RTSP as PCMU/PCMA. Each byte is one companded sample; expanding
//! it gives 14-bit (μ-law) or 13-bit (A-law) linear PCM, returned here as
//! f32 in [-1, 1] for the resample + Opus stage of [`super::AacToOpus`].

/// Which companding law a G.711 stream uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Law {
    /// μ-law (RTP payload type 0, `PCMU`): North America, Japan.
    Mu,
    /// A-law (RTP payload type 8, `PCMA`): Europe and most cameras.
    A,
}

impl Law {
    /// Expands one companded byte to a sample in [-1, 1].
    pub fn decode(self, byte: u8) -> f32 {
        let linear = match self {
            Self::Mu => mu_to_linear(byte),
            Self::A => a_to_linear(byte),
        };
        f32::from(linear) / 32_768.0
    }
}

/// μ-law byte → 16-bit linear (G.711 §2, table 2a): bits are stored
/// inverted; 3 exponent bits, 4 mantissa bits, bias 0x84.
fn mu_to_linear(byte: u8) -> i16 {
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = i32::from(u & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    // At most (15 << 3 + 0x84) << 7 - 0x84 = 32_124: fits i16.
    let v = if u & 0x80 != 0 { -magnitude } else { magnitude };
    i16::try_from(v).unwrap_or(0)
}

/// A-law byte → 16-bit linear (G.711 §2, table 1a): even bits inverted
/// (XOR 0x55); 3 exponent bits, 4 mantissa bits; sign bit set = positive.
fn a_to_linear(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let exponent = (a >> 4) & 0x07;
    let mantissa = i32::from(a & 0x0f);
    let magnitude = match exponent {
        0 => (mantissa << 4) + 8,
        e => ((mantissa << 4) + 0x108) << (e - 1),
    };
    let v = if a & 0x80 != 0 { magnitude } else { -magnitude };
    i16::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference compressors (G.711 encode direction), only to check
    /// that expand(compress(x)) stays within the quantization step.
    fn mu_encode(x: i16) -> u8 {
        let sign = if x < 0 { 0x80u8 } else { 0 };
        let mut m = i32::from(x).abs().min(32_635) + 0x84;
        let mut exponent = 7u8;
        while exponent > 0 && m & (0x4000 >> (7 - exponent)) == 0 {
            exponent -= 1;
        }
        m >>= exponent + 3;
        !(sign | (exponent << 4) | (m as u8 & 0x0f))
    }

    #[test]
    fn mu_law_known_values() {
        assert_eq!(mu_to_linear(0xff), 0);
        assert_eq!(mu_to_linear(0x7f), 0);
        assert_eq!(mu_to_linear(0x80), 32_124);
        assert_eq!(mu_to_linear(0x00), -32_124);
    }

    #[test]
    fn a_law_known_values() {
        assert_eq!(a_to_linear(0xd5), 8);
        assert_eq!(a_to_linear(0x55), -8);
        assert_eq!(a_to_linear(0xaa), 32_256);
        assert_eq!(a_to_linear(0x2a), -32_256);
    }

    #[test]
    fn mu_law_round_trips_within_a_step() {
        for x in (-32_000i16..32_000).step_by(97) {
            let y = mu_to_linear(mu_encode(x));
            // The step grows with the magnitude: 1/16 of it bounds the error.
            let tolerance = (i32::from(x).abs() / 16).max(8);
            assert!(
                (i32::from(y) - i32::from(x)).abs() <= tolerance,
                "{x} -> {y}"
            );
        }
    }

    #[test]
    fn every_byte_decodes_into_range() {
        for b in 0..=255u8 {
            for law in [Law::Mu, Law::A] {
                let v = law.decode(b);
                assert!((-1.0..=1.0).contains(&v));
            }
        }
    }
}
