//! RTP packetizers: one access unit in, RTP payloads out, done once per frame
//! per track on this node and shared by every viewer (`Arc<[u8]>`).
//!
//! Each codec follows its RTP payload format: H.264 (RFC 6184, single NAL,
//! STAP-A, FU-A), H.265 (RFC 7798, single NAL, AP, FU), VP8 (RFC 7741),
//! VP9 (RFC 9628, non-flexible mode), AV1 (AOM RTP spec, OBU elements) and
//! Opus (RFC 7587, one frame per packet).

use std::sync::Arc;

use cascade_media::nal::Nal;
use cascade_origin::catalog::Codec;

mod av1;
mod h26x;
mod vp8;
mod vp9;

/// Largest RTP payload we emit. str0m targets 1,150-byte datagrams and warns
/// at 1,280; a payload of 1,100 plus the RTP header (12), the header
/// extensions str0m adds (≤ 28) and the SRTP tag (16) stays under 1,160.
pub const MAX_PAYLOAD: usize = 1100;

/// One RTP payload and its marker bit (last packet of a video frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The RTP payload (no RTP header), shared by every viewer.
    pub data: Arc<[u8]>,
    /// The RTP marker bit.
    pub marker: bool,
}

/// Turns access units of one codec into RTP payloads. Holds no numbering
/// of its own: what a receiver orders frames by is per viewer (RTP sequence
/// numbers and timestamps), because one packetization serves viewers that
/// switch between renditions (`vp8.rs` says why VP8/VP9 carry no picture
/// id).
#[derive(Debug)]
pub struct Packetizer {
    codec: Codec,
}

impl Packetizer {
    /// A packetizer for `codec` (every codec of the catalog has one; the
    /// `Option` leaves room for codecs that will not).
    pub fn new(codec: Codec) -> Option<Self> {
        Some(Self { codec })
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Packetizes one access unit. Never panics; malformed input yields
    /// whatever payloads can be made of it (possibly none).
    pub fn packetize(&mut self, frame: &[u8], keyframe: bool) -> Vec<Payload> {
        let mut out = Vec::new();
        match self.codec {
            Codec::H264 => h26x::packetize(Nal::H264, frame, MAX_PAYLOAD, &mut out),
            Codec::H265 => h26x::packetize(Nal::H265, frame, MAX_PAYLOAD, &mut out),
            Codec::Vp8 => vp8::packetize(frame, MAX_PAYLOAD, &mut out),
            Codec::Vp9 => vp9::packetize(frame, keyframe, MAX_PAYLOAD, &mut out),
            Codec::Opus => {
                // RFC 7587 §4.2: one Opus packet per RTP packet; the marker
                // bit flags talkspurts, which we cannot know: leave it clear.
                if !frame.is_empty() {
                    out.push(Payload {
                        data: Arc::from(frame),
                        marker: false,
                    });
                }
            }
            Codec::Av1 => av1::packetize(frame, keyframe, MAX_PAYLOAD, &mut out),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_panics_and_respects_mtu(data in proptest::collection::vec(any::<u8>(), 0..5000), key in any::<bool>()) {
            for codec in [Codec::H264, Codec::H265, Codec::Vp8, Codec::Vp9, Codec::Av1, Codec::Opus] {
                let mut p = Packetizer::new(codec).unwrap();
                let out = p.packetize(&data, key);
                for pl in &out {
                    if codec != Codec::Opus {
                        prop_assert!(pl.data.len() <= MAX_PAYLOAD);
                    }
                    prop_assert!(!pl.data.is_empty());
                }
                if codec != Codec::Opus {
                    // Only the last payload of a frame carries the marker.
                    for (i, pl) in out.iter().enumerate() {
                        prop_assert_eq!(pl.marker, i + 1 == out.len());
                    }
                }
            }
        }
    }

    #[test]
    fn opus_is_one_packet() {
        let mut p = Packetizer::new(Codec::Opus).unwrap();
        let out = p.packetize(&[1, 2, 3], true);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].data, &[1, 2, 3]);
        assert!(p.packetize(&[], true).is_empty());
    }
}
