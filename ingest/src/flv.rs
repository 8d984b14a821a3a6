//! FLV tag bodies as RTMP carries them in video (type 9) and audio (type 8)
//! messages: legacy AVC/AAC and enhanced RTMP (FourCC `avc1`, `hvc1`, `av01`,
//! `vp09`; `mp4a`, `Opus`). Strict and bounded: a tag either parses into a
//! typed value sharing the message's bytes, or is refused with an error.

use bytes::Bytes;

/// Why a tag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tag ended before its header did.
    #[error("truncated {0} tag")]
    Truncated(&'static str),
    /// A header field holds a value the format does not define.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Video codecs RTMP can carry to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoCodec {
    /// H.264 (legacy codec id 7, or FourCC `avc1`).
    H264,
    /// H.265 (FourCC `hvc1`, or the widespread legacy codec id 12).
    H265,
    /// AV1 (FourCC `av01`).
    Av1,
    /// VP9 (FourCC `vp09`).
    Vp9,
}

/// A parsed video tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Video {
    /// Decoder configuration record (avcC, hvcC, av1C, vpcC).
    Config {
        /// The codec.
        codec: VideoCodec,
        /// The record.
        record: Bytes,
    },
    /// One coded picture.
    Frame {
        /// The codec.
        codec: VideoCodec,
        /// The tag's frame type says keyframe (the bitstream has the last word).
        keyframe: bool,
        /// Composition time offset in ms: pts = dts + cts.
        cts: i32,
        /// The picture: NAL units with length prefixes, or OBUs / a VP9 frame.
        data: Bytes,
    },
    /// End of sequence.
    End,
    /// Valid but carries nothing we use (command frames, metadata, multitrack).
    Ignored(&'static str),
}

/// A parsed audio tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audio {
    /// AAC AudioSpecificConfig.
    AacConfig(Bytes),
    /// One raw AAC frame.
    Aac(Bytes),
    /// Opus ID header (enhanced RTMP `Opus`).
    OpusConfig(Bytes),
    /// One Opus packet.
    Opus(Bytes),
    /// End of sequence.
    End,
    /// A codec or packet type we do not carry (MP3, AC-3, …).
    Ignored(&'static str),
}

fn u24(b: &[u8]) -> Option<u32> {
    let b = b.get(..3)?;
    Some(u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]))
}

/// Signed 24-bit composition time offset.
fn si24(b: &[u8]) -> Option<i32> {
    let v = u24(b)?;
    // invariant: v < 2^24, so the shifted value fits in i32 bits exactly.
    Some(((v << 8) as i32) >> 8)
}

fn fourcc_video(fourcc: &[u8]) -> Option<VideoCodec> {
    match fourcc {
        b"avc1" => Some(VideoCodec::H264),
        b"hvc1" => Some(VideoCodec::H265),
        b"av01" => Some(VideoCodec::Av1),
        b"vp09" => Some(VideoCodec::Vp9),
        _ => None,
    }
}

/// Parses the body of an RTMP video message.
pub fn parse_video(tag: &Bytes) -> Result<Video, Error> {
    let &b0 = tag.first().ok_or(Error::Truncated("video"))?;
    if b0 & 0x80 != 0 {
        return parse_ex_video(tag, b0);
    }
    let frame_type = (b0 >> 4) & 0x0f;
    let codec = match b0 & 0x0f {
        7 => VideoCodec::H264,
        12 => VideoCodec::H265,
        2..=6 => return Ok(Video::Ignored("legacy video codec")),
        _ => return Err(Error::Invalid("video codec id")),
    };
    if frame_type == 5 {
        return Ok(Video::Ignored("video command frame"));
    }
    if !(1..=4).contains(&frame_type) {
        return Err(Error::Invalid("video frame type"));
    }
    let packet_type = *tag.get(1).ok_or(Error::Truncated("video"))?;
    let cts = tag
        .get(2..5)
        .and_then(si24)
        .ok_or(Error::Truncated("video"))?;
    let body = tag.slice(5..);
    match packet_type {
        0 => Ok(Video::Config {
            codec,
            record: body,
        }),
        1 => Ok(Video::Frame {
            codec,
            keyframe: frame_type == 1 || frame_type == 4,
            cts,
            data: body,
        }),
        2 => Ok(Video::End),
        _ => Err(Error::Invalid("AVC packet type")),
    }
}

/// Enhanced RTMP video (`ExVideoTagHeader`).
fn parse_ex_video(tag: &Bytes, b0: u8) -> Result<Video, Error> {
    let frame_type = (b0 >> 4) & 0x07;
    let packet_type = b0 & 0x0f;
    match packet_type {
        4 => return Ok(Video::Ignored("video metadata")),
        5 => return Ok(Video::Ignored("mpeg2-ts sequence start")),
        6 => return Ok(Video::Ignored("video multitrack")),
        7 => return Ok(Video::Ignored("video packet modifier")),
        0..=3 => {}
        _ => return Err(Error::Invalid("video packet type")),
    }
    if frame_type == 5 {
        return Ok(Video::Ignored("video command frame"));
    }
    if !(1..=4).contains(&frame_type) {
        return Err(Error::Invalid("video frame type"));
    }
    let fourcc = tag.get(1..5).ok_or(Error::Truncated("video"))?;
    let codec = fourcc_video(fourcc).ok_or(Error::Invalid("video fourcc"))?;
    let keyframe = frame_type == 1 || frame_type == 4;
    match packet_type {
        0 => Ok(Video::Config {
            codec,
            record: tag.slice(5..),
        }),
        1 if matches!(codec, VideoCodec::H264 | VideoCodec::H265) => {
            let cts = tag
                .get(5..8)
                .and_then(si24)
                .ok_or(Error::Truncated("video"))?;
            Ok(Video::Frame {
                codec,
                keyframe,
                cts,
                data: tag.slice(8..),
            })
        }
        1 | 3 => Ok(Video::Frame {
            codec,
            keyframe,
            cts: 0,
            data: tag.slice(5..),
        }),
        _ => Ok(Video::End),
    }
}

/// Parses the body of an RTMP audio message.
pub fn parse_audio(tag: &Bytes) -> Result<Audio, Error> {
    let &b0 = tag.first().ok_or(Error::Truncated("audio"))?;
    match b0 >> 4 {
        10 => {
            let packet_type = *tag.get(1).ok_or(Error::Truncated("audio"))?;
            let body = tag.slice(2..);
            match packet_type {
                0 => Ok(Audio::AacConfig(body)),
                1 => Ok(Audio::Aac(body)),
                _ => Err(Error::Invalid("AAC packet type")),
            }
        }
        9 => parse_ex_audio(tag, b0 & 0x0f),
        0..=8 | 11 | 14 | 15 => Ok(Audio::Ignored("audio codec")),
        _ => Err(Error::Invalid("audio format")),
    }
}

/// Enhanced RTMP audio (`ExAudioTagHeader`).
fn parse_ex_audio(tag: &Bytes, packet_type: u8) -> Result<Audio, Error> {
    match packet_type {
        4 => return Ok(Audio::Ignored("multichannel config")),
        5 => return Ok(Audio::Ignored("audio multitrack")),
        7 => return Ok(Audio::Ignored("audio packet modifier")),
        0..=2 => {}
        _ => return Err(Error::Invalid("audio packet type")),
    }
    let fourcc = tag.get(1..5).ok_or(Error::Truncated("audio"))?;
    let body = tag.slice(5..);
    match (fourcc, packet_type) {
        (_, 2) => Ok(Audio::End),
        (b"mp4a", 0) => Ok(Audio::AacConfig(body)),
        (b"mp4a", _) => Ok(Audio::Aac(body)),
        (b"Opus", 0) => Ok(Audio::OpusConfig(body)),
        (b"Opus", _) => Ok(Audio::Opus(body)),
        (b".mp3" | b"ac-3" | b"ec-3" | b"fLaC", _) => Ok(Audio::Ignored("audio codec")),
        _ => Err(Error::Invalid("audio fourcc")),
    }
}

/// The fields of an AudioSpecificConfig (ISO 14496-3 §1.6.2.1) we report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AacConfig {
    /// Audio object type (2 = AAC-LC, 5 = SBR/HE-AAC, 29 = PS/HE-AACv2).
    pub object_type: u8,
    /// Sampling rate in Hz.
    pub sample_rate: u32,
    /// Channel configuration (1 = mono, 2 = stereo; 0 = in a PCE).
    pub channels: u8,
}

/// Sampling frequencies by index (ISO 14496-3 Table 1.18).
const AAC_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// Parses the leading fields of an AudioSpecificConfig.
pub fn parse_asc(asc: &[u8]) -> Result<AacConfig, Error> {
    let mut bits = Bits { data: asc, pos: 0 };
    let mut object_type = bits.read(5)?;
    if object_type == 31 {
        object_type = 32 + bits.read(6)?;
    }
    let index = bits.read(4)?;
    let sample_rate = if index == 15 {
        bits.read(24)?
    } else {
        let i = usize::try_from(index).map_err(|_| Error::Invalid("AAC sampling index"))?;
        *AAC_RATES
            .get(i)
            .ok_or(Error::Invalid("AAC sampling index"))?
    };
    let channels = bits.read(4)?;
    Ok(AacConfig {
        object_type: u8::try_from(object_type).map_err(|_| Error::Invalid("AAC object type"))?,
        sample_rate,
        channels: u8::try_from(channels).map_err(|_| Error::Invalid("AAC channels"))?,
    })
}

/// A most-significant-bit-first bit reader.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn read(&mut self, n: u32) -> Result<u32, Error> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = self
                .data
                .get(self.pos / 8)
                .ok_or(Error::Truncated("AudioSpecificConfig"))?;
            let bit = (byte >> (7 - self.pos % 8)) & 1;
            v = v << 1 | u32::from(bit);
            self.pos += 1;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn legacy_avc() {
        let t = Bytes::from_static(&[0x17, 0x00, 0, 0, 0, 1, 2]);
        assert_eq!(
            parse_video(&t).unwrap(),
            Video::Config {
                codec: VideoCodec::H264,
                record: Bytes::from_static(&[1, 2])
            }
        );
        let t = Bytes::from_static(&[0x27, 0x01, 0xff, 0xff, 0xdf, 9]);
        assert_eq!(
            parse_video(&t).unwrap(),
            Video::Frame {
                codec: VideoCodec::H264,
                keyframe: false,
                cts: -33,
                data: Bytes::from_static(&[9])
            }
        );
        assert!(parse_video(&Bytes::from_static(&[0x17, 0x01])).is_err());
        assert!(parse_video(&Bytes::new()).is_err());
    }

    #[test]
    fn enhanced_video() {
        // Keyframe, CodedFrames, hvc1, cts 66.
        let t = Bytes::from_static(&[0x91, b'h', b'v', b'c', b'1', 0, 0, 66, 7]);
        assert_eq!(
            parse_video(&t).unwrap(),
            Video::Frame {
                codec: VideoCodec::H265,
                keyframe: true,
                cts: 66,
                data: Bytes::from_static(&[7])
            }
        );
        // Inter frame, CodedFramesX, av01: no cts field.
        let t = Bytes::from_static(&[0xa3, b'a', b'v', b'0', b'1', 7]);
        assert_eq!(
            parse_video(&t).unwrap(),
            Video::Frame {
                codec: VideoCodec::Av1,
                keyframe: false,
                cts: 0,
                data: Bytes::from_static(&[7])
            }
        );
        let t = Bytes::from_static(&[0x90, b'a', b'v', b'0', b'1', 0x81]);
        assert!(matches!(
            parse_video(&t).unwrap(),
            Video::Config {
                codec: VideoCodec::Av1,
                ..
            }
        ));
        assert!(parse_video(&Bytes::from_static(&[0x90, b'x', b'x', b'x', b'x'])).is_err());
    }

    #[test]
    fn audio_tags() {
        let t = Bytes::from_static(&[0xaf, 0x00, 0x12, 0x10]);
        assert_eq!(
            parse_audio(&t).unwrap(),
            Audio::AacConfig(Bytes::from_static(&[0x12, 0x10]))
        );
        assert_eq!(
            parse_asc(&[0x12, 0x10]).unwrap(),
            AacConfig {
                object_type: 2,
                sample_rate: 44100,
                channels: 2
            }
        );
        assert_eq!(
            parse_asc(&[0x11, 0x88]).unwrap(),
            AacConfig {
                object_type: 2,
                sample_rate: 48000,
                channels: 1
            }
        );
        assert!(parse_asc(&[0x12]).is_err());
        let t = Bytes::from_static(&[0x91, b'O', b'p', b'u', b's', 1]);
        assert_eq!(
            parse_audio(&t).unwrap(),
            Audio::Opus(Bytes::from_static(&[1]))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let b = Bytes::from(data.clone());
            let _ = parse_video(&b);
            let _ = parse_audio(&b);
            let _ = parse_asc(&data);
        }
    }
}
