//! The media core of one RTMP publisher (sans-IO): FLV tags in, catalog and
//! frames for the `video` and `audio` tracks out. Video leaves in decode
//! order as Annex-B (parameter sets before every keyframe) with pts and dts
//! in 90 kHz; AAC becomes Opus at 48 kHz; B-frames are detected.

use bytes::Bytes;
use cascade_origin::catalog::{Catalog, Codec, TrackInfo};
use cascade_origin::frame::Frame;

use super::av1;
use super::clock::Clock;
use crate::audio::{self, AacToOpus};
use crate::flv::{self, Audio, Video, VideoCodec};
use crate::h264;

/// How long to wait for the second sequence header after the first before
/// publishing an audio-only or video-only stream.
pub const HEADER_WAIT_MS: u64 = 1_000;
/// How long to wait for the first video frame after the first header: the
/// catalog then says whether the stream has B-frames (x264 gives its first
/// picture a composition offset) before any viewer reads it. x264's
/// lookahead delays the first frame by about a second.
pub const FRAME_WAIT_MS: u64 = 3_000;
/// Video clock rate (RFC 6184/7798/AV1 RTP: 90 kHz); FLV counts ms.
const VIDEO_PER_MS: u64 = 90;
/// Opus clock per ms.
const AUDIO_PER_MS: u64 = 48;
/// Where a video frame that stepped back in time is put after the previous
/// one: about a frame at 30 fps.
const BACKSTEP_GAP_MS: u64 = 33;

/// Which track a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    /// `video`.
    Video,
    /// `audio`.
    Audio,
}

impl Track {
    /// The track name in the catalog.
    pub fn name(self) -> &'static str {
        match self {
            Self::Video => "video",
            Self::Audio => "audio",
        }
    }
}

/// Why a tag was dropped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The FLV tag header is malformed.
    #[error("flv: {0}")]
    Flv(#[from] flv::Error),
    /// The H.264/H.265 configuration or access unit is malformed.
    #[error("bitstream: {0}")]
    Bitstream(#[from] h264::Error),
    /// AAC could not be transcoded.
    #[error("audio: {0}")]
    Audio(#[from] audio::Error),
    /// A frame arrived before its sequence header.
    #[error("frame before sequence header")]
    NoConfig,
    /// A frame's codec differs from its sequence header's.
    #[error("frame codec differs from the sequence header")]
    CodecMismatch,
}

enum VideoConfig {
    Nal(h264::Config),
    /// AV1: the sequence header OBU(s) from av1C, put before keyframes.
    Av1 {
        obus: Bytes,
        fmtp: String,
    },
    Vp9,
}

struct VideoState {
    codec: Codec,
    record: Bytes,
    config: VideoConfig,
}

enum AudioState {
    None,
    Aac {
        asc: Bytes,
        transcoder: Box<AacToOpus>,
    },
    Opus {
        channels: u8,
    },
}

/// The media core of one publisher.
pub struct Media {
    clock: Clock,
    video: Option<VideoState>,
    audio: AudioState,
    bframes: bool,
    catalog_changed: bool,
    first_header_ms: Option<u64>,
    video_frames: u64,
    last_video_dts: u64,
    last_audio_pts: u64,
}

impl Default for Media {
    fn default() -> Self {
        Self::new()
    }
}

impl Media {
    /// A core waiting for sequence headers.
    pub fn new() -> Self {
        Self {
            clock: Clock::new(),
            video: None,
            audio: AudioState::None,
            bframes: false,
            catalog_changed: false,
            first_header_ms: None,
            video_frames: 0,
            last_video_dts: 0,
            last_audio_pts: 0,
        }
    }

    /// True once the catalog is worth publishing: both sequence headers
    /// and the first video frame seen; or, after [`HEADER_WAIT_MS`], the one
    /// track that came (video: with its first frame); or, after
    /// [`FRAME_WAIT_MS`], whatever came.
    pub fn ready(&self, now_ms: u64) -> bool {
        let Some(t) = self.first_header_ms else {
            return false;
        };
        let video = self.video.is_some();
        let audio = !matches!(self.audio, AudioState::None);
        let video_done = video && self.video_frames > 0;
        let waited = now_ms.saturating_sub(t);
        (video_done && audio)
            || (waited >= HEADER_WAIT_MS && (video_done || (audio && !video)))
            || waited >= FRAME_WAIT_MS
    }

    /// When [`Media::ready`] may turn true without more input, if ever.
    pub fn ready_deadline(&self, now_ms: u64) -> Option<u64> {
        self.first_header_ms.map(|t| {
            if now_ms < t + HEADER_WAIT_MS {
                t + HEADER_WAIT_MS
            } else {
                t + FRAME_WAIT_MS
            }
        })
    }

    /// True (once per change) when the catalog changed since the last call.
    pub fn take_catalog_changed(&mut self) -> bool {
        std::mem::take(&mut self.catalog_changed)
    }

    /// True once a frame with a composition offset was seen.
    pub fn bframes(&self) -> bool {
        self.bframes
    }

    /// The avcC of an H.264 stream: what the B-frame transcoder starts from.
    pub fn h264_record(&self) -> Option<Bytes> {
        self.video
            .as_ref()
            .filter(|v| v.codec == Codec::H264)
            .map(|v| v.record.clone())
    }

    /// Timestamp jumps rebased so far.
    pub fn jumps(&self) -> u64 {
        self.clock.jumps()
    }

    /// The catalog for the tracks seen so far.
    pub fn catalog(&self) -> Catalog {
        let mut tracks = Vec::new();
        if let Some(v) = &self.video {
            let fmtp = match &v.config {
                VideoConfig::Nal(c) => c.fmtp.clone(),
                VideoConfig::Av1 { fmtp, .. } => fmtp.clone(),
                VideoConfig::Vp9 => String::new(),
            };
            tracks.push(TrackInfo {
                name: Track::Video.name().into(),
                codec: v.codec,
                fmtp,
                channels: None,
                bframes: self.bframes,
                rendition: None,
            });
        }
        let opus_channels = match &self.audio {
            AudioState::None => None,
            AudioState::Aac { transcoder, .. } => Some(transcoder.channels()),
            AudioState::Opus { channels } => Some(usize::from(*channels)),
        };
        if let Some(ch) = opus_channels {
            let stereo = if ch > 1 {
                ";stereo=1;sprop-stereo=1"
            } else {
                ""
            };
            tracks.push(TrackInfo {
                name: Track::Audio.name().into(),
                codec: Codec::Opus,
                fmtp: format!("minptime=10;useinbandfec=1{stereo}"),
                // RFC 7587 §7: always 2 in SDP, mono or not.
                channels: Some(2),
                bframes: false,
                rendition: None,
            });
        }
        Catalog { tracks }
    }

    /// Handles one video message with FLV timestamp `raw_ts`.
    pub fn video(
        &mut self,
        raw_ts: u32,
        tag: &Bytes,
        now_ms: u64,
        ingest_us: u64,
        out: &mut Vec<(Track, Frame)>,
    ) -> Result<(), Error> {
        match flv::parse_video(tag)? {
            Video::Config { codec, record } => self.video_config(codec, record, now_ms),
            Video::Frame {
                keyframe,
                cts,
                data,
                codec,
            } => {
                let Some(v) = &self.video else {
                    return Err(Error::NoConfig);
                };
                if catalog_codec(codec) != v.codec {
                    return Err(Error::CodecMismatch);
                }
                let (payload, keyframe) = match &v.config {
                    VideoConfig::Nal(c) => {
                        let au = h264::to_annexb(&data, c)?;
                        (au.payload, au.keyframe)
                    }
                    VideoConfig::Av1 { obus, .. } => {
                        (av1::with_sequence_header(obus, data, keyframe), keyframe)
                    }
                    VideoConfig::Vp9 => (data, keyframe),
                };
                if payload.is_empty() {
                    return Ok(());
                }
                let mut dts_ms = self.clock.map(raw_ts, now_ms);
                if self.video_frames > 0 && dts_ms < self.last_video_dts {
                    // Video stepped back on its own: continue one frame on.
                    let target = self.last_video_dts + BACKSTEP_GAP_MS;
                    self.clock.advance(target - dts_ms);
                    dts_ms = target;
                }
                self.last_video_dts = dts_ms;
                if cts != 0 && !self.bframes {
                    self.bframes = true;
                    self.catalog_changed = true;
                }
                let pts_ms = dts_ms.saturating_add_signed(i64::from(cts));
                self.video_frames += 1;
                out.push((
                    Track::Video,
                    Frame {
                        payload,
                        pts: pts_ms * VIDEO_PER_MS,
                        dts: dts_ms * VIDEO_PER_MS,
                        keyframe,
                        ingest_us,
                    },
                ));
                Ok(())
            }
            Video::End | Video::Ignored(_) => Ok(()),
        }
    }

    fn video_config(&mut self, codec: VideoCodec, record: Bytes, now_ms: u64) -> Result<(), Error> {
        if self.video.as_ref().is_some_and(|v| v.record == record) {
            return Ok(()); // re-sent unchanged (OBS does on reconnect of its output)
        }
        let config = match codec {
            VideoCodec::H264 => VideoConfig::Nal(h264::parse_avcc(&record)?),
            VideoCodec::H265 => VideoConfig::Nal(h264::parse_hvcc(&record)?),
            VideoCodec::Av1 => {
                // av1C (AV1-ISOBMFF §2.3): 4 bytes, then the config OBUs.
                let b1 = *record.get(1).ok_or(h264::Error::Truncated("av1C"))?;
                let obus = record
                    .get(4..)
                    .map(Bytes::copy_from_slice)
                    .unwrap_or_default();
                let fmtp = format!("profile={}", b1 >> 5);
                VideoConfig::Av1 { obus, fmtp }
            }
            VideoCodec::Vp9 => VideoConfig::Vp9,
        };
        let codec = catalog_codec(codec);
        self.video = Some(VideoState {
            codec,
            record,
            config,
        });
        self.catalog_changed = true;
        self.first_header_ms.get_or_insert(now_ms);
        Ok(())
    }

    /// Handles one audio message with FLV timestamp `raw_ts`.
    pub fn audio(
        &mut self,
        raw_ts: u32,
        tag: &Bytes,
        now_ms: u64,
        ingest_us: u64,
        out: &mut Vec<(Track, Frame)>,
    ) -> Result<(), Error> {
        match flv::parse_audio(tag)? {
            Audio::AacConfig(asc) => {
                if matches!(&self.audio, AudioState::Aac { asc: a, .. } if *a == asc) {
                    return Ok(());
                }
                let transcoder = AacToOpus::new(&asc)?;
                self.audio = AudioState::Aac {
                    asc,
                    transcoder: Box::new(transcoder),
                };
                self.catalog_changed = true;
                self.first_header_ms.get_or_insert(now_ms);
                Ok(())
            }
            Audio::Aac(frame) => {
                let AudioState::Aac { transcoder, .. } = &mut self.audio else {
                    return Err(Error::NoConfig);
                };
                let pts = self.clock.map(raw_ts, now_ms) * AUDIO_PER_MS;
                let mut packets = Vec::new();
                transcoder.push(&frame, pts, &mut packets)?;
                for p in packets {
                    // A new AudioSpecificConfig restarts the transcoder: never
                    // let its first packets step back over the old ones.
                    let pts = if self.last_audio_pts == 0 {
                        p.pts
                    } else {
                        p.pts.max(self.last_audio_pts + audio::FRAME_SAMPLES as u64)
                    };
                    self.last_audio_pts = pts;
                    out.push((Track::Audio, audio_frame(p.payload, pts, ingest_us)));
                }
                Ok(())
            }
            Audio::OpusConfig(head) => {
                // OpusHead (RFC 7845 §5.1): channel count at byte 9.
                let channels = head.get(9).copied().unwrap_or(2).clamp(1, 2);
                if !matches!(self.audio, AudioState::Opus { channels: c } if c == channels) {
                    self.audio = AudioState::Opus { channels };
                    self.catalog_changed = true;
                }
                self.first_header_ms.get_or_insert(now_ms);
                Ok(())
            }
            Audio::Opus(packet) => {
                if !matches!(self.audio, AudioState::Opus { .. }) {
                    return Err(Error::NoConfig);
                }
                let pts = (self.clock.map(raw_ts, now_ms) * AUDIO_PER_MS).max(self.last_audio_pts);
                self.last_audio_pts = pts;
                out.push((Track::Audio, audio_frame(packet, pts, ingest_us)));
                Ok(())
            }
            Audio::End | Audio::Ignored(_) => Ok(()),
        }
    }
}

fn catalog_codec(codec: VideoCodec) -> Codec {
    match codec {
        VideoCodec::H264 => Codec::H264,
        VideoCodec::H265 => Codec::H265,
        VideoCodec::Av1 => Codec::Av1,
        VideoCodec::Vp9 => Codec::Vp9,
    }
}

fn audio_frame(payload: Bytes, pts: u64, ingest_us: u64) -> Frame {
    Frame {
        payload,
        pts,
        dts: pts,
        // Every audio frame can start a group.
        keyframe: true,
        ingest_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avc_seq() -> Bytes {
        let mut v = vec![
            0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x64, 0, 0x1f, 1, 0, 2,
            0x68, 0xee,
        ];
        v.truncate(22);
        Bytes::from(v)
    }

    fn avc_frame(key: bool, cts: i32, nal: u8) -> Bytes {
        let mut v = vec![if key { 0x17 } else { 0x27 }, 1];
        v.extend_from_slice(&cts.to_be_bytes()[1..]);
        v.extend_from_slice(&[0, 0, 0, 2, nal, 0x80]);
        Bytes::from(v)
    }

    #[test]
    fn video_frames_and_bframes() {
        let mut m = Media::new();
        let mut out = Vec::new();
        assert!(matches!(
            m.video(0, &avc_frame(true, 0, 0x65), 0, 0, &mut out),
            Err(Error::NoConfig)
        ));
        m.video(0, &avc_seq(), 1_000, 0, &mut out).unwrap();
        // Video-only: ready after the header wait once a frame came, or
        // after the frame wait regardless.
        assert!(!m.ready(1_500) && !m.ready(2_000) && m.ready(4_000));
        assert!(m.take_catalog_changed());
        let c = m.catalog();
        assert_eq!(
            c.tracks[0].fmtp,
            "profile-level-id=64001f;packetization-mode=1"
        );
        m.video(0, &avc_frame(true, 66, 0x65), 1_000, 0, &mut out)
            .unwrap();
        m.video(33, &avc_frame(false, 0, 0x41), 1_033, 0, &mut out)
            .unwrap();
        let (_, f) = &out[0];
        assert!(f.keyframe);
        assert_eq!(f.dts, 1_000 * 90);
        assert_eq!(f.pts, 1_066 * 90);
        assert_eq!(&f.payload[..5], &[0, 0, 0, 1, 0x67]);
        assert!(!out[1].1.keyframe);
        assert!(m.bframes() && m.take_catalog_changed());
        assert!(m.catalog().tracks[0].bframes);
    }

    proptest::proptest! {
        #[test]
        fn garbage_tags_never_panic(
            tags in proptest::collection::vec((proptest::bool::ANY, any_u32(), proptest::collection::vec(0u8..=255, 0..64)), 1..40)
        ) {
            let mut m = Media::new();
            let mut out = Vec::new();
            // With and without valid configuration in place.
            m.video(0, &avc_seq(), 1_000, 0, &mut out).unwrap();
            m.audio(0, &Bytes::from_static(&[0xaf, 0, 0x12, 0x10]), 1_000, 0, &mut out).unwrap();
            for (video, ts, data) in tags {
                let data = Bytes::from(data);
                let _ = if video {
                    m.video(ts, &data, 2_000, 0, &mut out)
                } else {
                    m.audio(ts, &data, 2_000, 0, &mut out)
                };
            }
            let _ = m.catalog();
        }
    }

    fn any_u32() -> impl proptest::strategy::Strategy<Value = u32> {
        proptest::num::u32::ANY
    }

    #[test]
    fn he_aac_config_decodes_its_core() {
        // Explicit SBR signalling: object type 5, 22.05 kHz core, stereo,
        // 44.1 kHz extension rate, then AAC-LC.
        let mut m = Media::new();
        let mut out = Vec::new();
        m.audio(
            0,
            &Bytes::from_static(&[0xaf, 0, 0x2b, 0x92, 0x08, 0x00]),
            0,
            0,
            &mut out,
        )
        .unwrap();
        assert_eq!(m.catalog().tracks[0].codec, Codec::Opus);
    }

    #[test]
    fn video_stepping_back_moves_both_tracks_on() {
        let mut m = Media::new();
        let mut out = Vec::new();
        m.video(0, &avc_seq(), 10_000, 0, &mut out).unwrap();
        m.video(1_000, &avc_frame(true, 0, 0x65), 10_000, 0, &mut out)
            .unwrap();
        m.video(1_033, &avc_frame(false, 0, 0x41), 10_033, 0, &mut out)
            .unwrap();
        // 500 ms back: within the interleaving tolerance of the shared clock.
        m.video(533, &avc_frame(false, 0, 0x41), 10_066, 0, &mut out)
            .unwrap();
        m.video(566, &avc_frame(false, 0, 0x41), 10_100, 0, &mut out)
            .unwrap();
        let dts: Vec<u64> = out.iter().map(|(_, f)| f.dts / 90).collect();
        assert_eq!(dts, vec![10_000, 10_033, 10_066, 10_099]);
        assert_eq!(m.jumps(), 1);
    }

    #[test]
    fn opus_passes_through() {
        let mut m = Media::new();
        let mut out = Vec::new();
        let mut head = b"OpusHead".to_vec();
        head.extend_from_slice(&[1, 1, 0x38, 1, 0x80, 0xbb, 0, 0, 0, 0, 0]);
        let mut tag = vec![0x90, b'O', b'p', b'u', b's'];
        tag.extend_from_slice(&head);
        m.audio(0, &Bytes::from(tag), 5_000, 0, &mut out).unwrap();
        assert!(m.ready(6_000));
        let cat = m.catalog();
        assert_eq!(
            (cat.tracks[0].codec, cat.tracks[0].fmtp.as_str()),
            (Codec::Opus, "minptime=10;useinbandfec=1")
        );
        for i in 0..3u32 {
            let tag = Bytes::from(vec![0x91, b'O', b'p', b'u', b's', 0xfc, i as u8]);
            m.audio(i * 20, &tag, 5_000 + u64::from(i) * 20, 7, &mut out)
                .unwrap();
        }
        let pts: Vec<u64> = out.iter().map(|(_, f)| f.pts).collect();
        assert_eq!(pts, vec![5_000 * 48, 5_020 * 48, 5_040 * 48]);
        assert_eq!(&out[1].1.payload[..], &[0xfc, 1]);
    }

    #[test]
    fn frame_codec_must_match_its_header() {
        let mut m = Media::new();
        let mut out = Vec::new();
        m.video(0, &avc_seq(), 0, 0, &mut out).unwrap();
        let hevc = Bytes::from_static(&[0x93, b'h', b'v', b'c', b'1', 0, 0, 0, 2, 0x26, 1]);
        assert!(matches!(
            m.video(0, &hevc, 0, 0, &mut out),
            Err(Error::CodecMismatch)
        ));
    }
}
