//! RTSP frames → registry frames, sans-IO: the catalog of a pulled stream,
//! one timeline for its tracks, decode timestamps for B-frame cameras and
//! audio to Opus. retina hands over depacketized frames (H.264/H.265 in
//! Annex-B with the parameter sets before every keyframe, AAC access
//! units, G.711 bytes) with RTP timestamps; this module gives them the
//! [`Frame`] contract of ARCHITECTURE.md "The data model".

use bytes::Bytes;
use cascade_origin::catalog::{Catalog, Codec, TrackInfo};
use cascade_origin::frame::Frame;

use crate::audio::{g711::Law, AacToOpus, Packet48};

/// Video clock (RTP, RFC 6184/7798).
const VIDEO_CLOCK: u64 = 90_000;
/// Largest reorder depth believed (1 s of 90 kHz): a bigger jump back is a
/// timestamp reset, not a B-frame.
const MAX_REORDER: u64 = 90_000;
/// A frame larger than this is refused (garbage, or a camera gone mad):
/// far over any sane keyframe, well under the registry's group cap.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// An Opus packet is at most 120 ms at 510 kbit/s, ~7.7 kB (RFC 6716 §3.4
/// allows more only for padding): anything larger is not passed on.
const MAX_OPUS_PACKET: usize = 8 << 10;

/// The audio a camera offers, as far as we take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudioIn {
    /// AAC with its AudioSpecificConfig.
    Aac(Vec<u8>),
    /// G.711 at a clock rate, with a channel count.
    G711 {
        /// μ-law or A-law.
        law: Law,
        /// Samples per second (8000 on every camera seen).
        rate: u32,
        /// Interleaved channels.
        channels: usize,
    },
    /// Opus (RFC 7587), passed through as the camera encoded it.
    Opus {
        /// The SDP's `sprop-stereo=1`, or 2 channels in the SDP.
        stereo: bool,
    },
}

/// How camera audio becomes the published Opus track.
enum Audio {
    /// AAC or G.711 → PCM → Opus.
    Transcode(Box<AacToOpus>),
    /// Opus as it came.
    Opus { stereo: bool },
}

/// A frame for a track of the published stream.
#[derive(Debug)]
pub struct Out {
    /// `video` or `audio`.
    pub track: &'static str,
    /// The frame.
    pub frame: Frame,
}

/// The mapping state of one RTSP connection.
pub struct Media {
    video: Codec,
    fmtp: String,
    /// The B-frame re-encode's fmtp while its frames are published.
    fmtp_override: Option<String>,
    bframes: bool,
    audio: Option<Audio>,
    /// Stream zero in µs since the UNIX epoch (like RTMP's timeline), set by
    /// the first frame of the connection from its arrival time minus its
    /// RTP time since PLAY: the tracks share RTP-Info's NPT zero.
    zero_us: Option<i64>,
    /// Waiting for a keyframe (start, or after packet loss).
    need_keyframe: bool,
    max_pts: Option<u64>,
    reorder: u64,
    last_dts: u64,
    /// The catalog changed since the last [`Media::catalog`] call.
    dirty: bool,
    /// A video keyframe was seen, so the catalog is complete.
    ready: bool,
    opus_frames: Vec<Packet48>,
}

impl Media {
    /// A mapper for `video` (H.264 or H.265) and optional audio.
    pub fn new(video: Codec, audio: Option<AudioIn>) -> Result<Self, String> {
        let audio = match audio {
            None => None,
            Some(AudioIn::Aac(asc)) => Some(Audio::Transcode(Box::new(
                AacToOpus::new(&asc).map_err(|e| e.to_string())?,
            ))),
            Some(AudioIn::G711 {
                law,
                rate,
                channels,
            }) => Some(Audio::Transcode(Box::new(
                AacToOpus::g711(law, rate, channels).map_err(|e| e.to_string())?,
            ))),
            Some(AudioIn::Opus { stereo }) => Some(Audio::Opus { stereo }),
        };
        Ok(Self {
            video,
            fmtp: String::new(),
            fmtp_override: None,
            bframes: false,
            audio,
            zero_us: None,
            need_keyframe: true,
            max_pts: None,
            reorder: 0,
            last_dts: 0,
            dirty: true,
            ready: false,
            opus_frames: Vec::new(),
        })
    }

    /// Sets the video fmtp from retina's RFC 6381 codec string (known after
    /// the first frame even when the SDP had no parameter sets).
    pub fn set_rfc6381(&mut self, codec: &str) {
        let fmtp = fmtp_of(self.video, codec);
        if fmtp != self.fmtp {
            self.fmtp = fmtp;
            self.dirty = true;
        }
    }

    /// The video fmtp of a re-encode whose frames replace the camera's
    /// (`None`: the camera's own).
    pub fn set_video_fmtp(&mut self, fmtp: Option<&str>) {
        if self.fmtp_override.as_deref() != fmtp {
            self.fmtp_override = fmtp.map(str::to_string);
            self.dirty = true;
        }
    }

    /// The catalog when it is complete and changed since the last call.
    pub fn catalog(&mut self) -> Option<Catalog> {
        if !self.ready || !self.dirty {
            return None;
        }
        self.dirty = false;
        let mut tracks = vec![TrackInfo {
            name: "video".into(),
            codec: self.video,
            fmtp: self
                .fmtp_override
                .clone()
                .unwrap_or_else(|| self.fmtp.clone()),
            channels: None,
            bframes: self.bframes,
            rendition: None,
        }];
        if let Some(a) = &self.audio {
            let stereo = match a {
                Audio::Transcode(t) => t.channels() > 1,
                Audio::Opus { stereo } => *stereo,
            };
            let stereo = if stereo {
                ";stereo=1;sprop-stereo=1"
            } else {
                ""
            };
            tracks.push(TrackInfo {
                name: "audio".into(),
                codec: Codec::Opus,
                fmtp: format!("minptime=10;useinbandfec=1{stereo}"),
                // RFC 7587 §7: always 2 in SDP, mono or not.
                channels: Some(2),
                bframes: false,
                rendition: None,
            });
        }
        Some(Catalog { tracks })
    }

    /// True once the video has B-frames (the catalog says so too).
    pub fn bframes(&self) -> bool {
        self.bframes
    }

    fn zero(&mut self, wall_us: u64, elapsed: i64, clock: u32) -> i64 {
        *self.zero_us.get_or_insert_with(|| {
            let since_play = elapsed.saturating_mul(1_000_000) / i64::from(clock.max(1));
            i64::try_from(wall_us).unwrap_or(i64::MAX) - since_play
        })
    }

    /// One video frame: `elapsed` is retina's RTP time since PLAY (90 kHz),
    /// `loss` the packets lost before it, `wall_us` its arrival.
    pub fn video(
        &mut self,
        data: Vec<u8>,
        elapsed: i64,
        keyframe: bool,
        loss: u16,
        wall_us: u64,
    ) -> Result<Option<Out>, String> {
        if data.len() > MAX_FRAME_BYTES {
            return Err(format!("video frame of {} bytes", data.len()));
        }
        if loss > 0 {
            // References are gone: nothing decodes until the next keyframe.
            self.need_keyframe = true;
        }
        if self.need_keyframe && !keyframe {
            return Ok(None);
        }
        self.need_keyframe = false;
        if keyframe && !self.ready {
            self.ready = true;
            self.dirty = true;
        }
        let zero = self.zero(wall_us, elapsed, VIDEO_CLOCK as u32);
        let pts = ticks(zero, VIDEO_CLOCK as u32, elapsed);
        let dts = self.dts(pts);
        Ok(Some(Out {
            track: "video",
            frame: Frame {
                payload: Bytes::from(data),
                pts,
                dts,
                keyframe,
                ingest_us: wall_us,
            },
        }))
    }

    /// Decode time for a frame in arrival (decode) order. RTP carries only
    /// presentation times; a frame presented before one already received is
    /// a B-frame, and the largest such step back is the reorder depth `D`.
    /// dts = max(previous dts, highest pts so far − D): non-decreasing, and
    /// ≤ pts for every frame once `D` is known (the B-frames that reveal a
    /// deeper reorder, up to the next reference frame, may get dts > pts).
    fn dts(&mut self, pts: u64) -> u64 {
        let max = match self.max_pts {
            Some(m) if pts < m && m - pts <= MAX_REORDER => {
                if !self.bframes {
                    self.bframes = true;
                    self.dirty = true;
                }
                self.reorder = self.reorder.max(m - pts);
                m
            }
            Some(m) if pts < m => {
                // A reset, not reordering: start over from here.
                self.last_dts = pts.saturating_sub(self.reorder);
                pts
            }
            _ => pts,
        };
        self.max_pts = Some(max);
        let dts = self.last_dts.max(max.saturating_sub(self.reorder));
        self.last_dts = dts;
        dts
    }

    /// One audio frame (AAC access unit, G.711 bytes or an Opus packet) at `elapsed` in the
    /// audio clock `clock`: the Opus frames it completed.
    pub fn audio(
        &mut self,
        data: &[u8],
        elapsed: i64,
        clock: u32,
        wall_us: u64,
        out: &mut Vec<Out>,
    ) -> Result<(), String> {
        if !self.ready {
            // Nothing is published before the first keyframe.
            return Ok(());
        }
        let zero = self.zero(wall_us, elapsed, clock);
        let pts = ticks(zero, 48_000, 0)
            + u64::try_from(elapsed.max(0)).unwrap_or(0) * 48_000 / u64::from(clock.max(1));
        let t = match &mut self.audio {
            None => return Ok(()),
            Some(Audio::Transcode(t)) => t,
            Some(Audio::Opus { .. }) => {
                if data.is_empty() || data.len() > MAX_OPUS_PACKET {
                    return Ok(());
                }
                out.push(Out {
                    track: "audio",
                    frame: Frame {
                        payload: Bytes::copy_from_slice(data),
                        pts,
                        dts: pts,
                        keyframe: true,
                        ingest_us: wall_us,
                    },
                });
                return Ok(());
            }
        };
        self.opus_frames.clear();
        t.push(data, pts, &mut self.opus_frames)
            .map_err(|e| e.to_string())?;
        for p in self.opus_frames.drain(..) {
            out.push(Out {
                track: "audio",
                frame: Frame {
                    payload: p.payload,
                    pts: p.pts,
                    dts: p.pts,
                    keyframe: true,
                    ingest_us: wall_us,
                },
            });
        }
        Ok(())
    }
}

/// `zero_us` (µs since the epoch) plus `elapsed` ticks, in ticks of `clock`.
fn ticks(zero_us: i64, clock: u32, elapsed: i64) -> u64 {
    let base = i128::from(zero_us) * i128::from(clock) / 1_000_000;
    u64::try_from((base + i128::from(elapsed)).max(0)).unwrap_or(0)
}

/// The SDP fmtp of the published video, from an RFC 6381 codec string:
/// `avc1.PPCCLL` → `profile-level-id=ppccll;packetization-mode=1`,
/// `hvc1.P.…` → `profile-id=P`.
fn fmtp_of(codec: Codec, rfc6381: &str) -> String {
    match codec {
        Codec::H264 => {
            let id = rfc6381
                .strip_prefix("avc1.")
                .filter(|h| h.len() == 6 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .unwrap_or("42e01f");
            format!(
                "profile-level-id={};packetization-mode=1",
                id.to_ascii_lowercase()
            )
        }
        Codec::H265 => {
            let profile = rfc6381
                .split('.')
                .nth(1)
                .map(|p| p.trim_start_matches(|c: char| c.is_ascii_alphabetic()))
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .unwrap_or("1");
            format!("profile-id={profile}")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALL: u64 = 1_700_000_000_000_000;

    #[test]
    fn fmtp_from_codec_strings() {
        assert_eq!(
            fmtp_of(Codec::H264, "avc1.64001F"),
            "profile-level-id=64001f;packetization-mode=1"
        );
        assert_eq!(
            fmtp_of(Codec::H264, "junk"),
            "profile-level-id=42e01f;packetization-mode=1"
        );
        assert_eq!(fmtp_of(Codec::H265, "hvc1.1.6.L93.B0"), "profile-id=1");
        assert_eq!(fmtp_of(Codec::H265, "hev1.A2.6.L93"), "profile-id=2");
    }

    #[test]
    fn nothing_before_the_first_keyframe_then_a_catalog() {
        let mut m = Media::new(Codec::H264, None).unwrap();
        assert!(m.video(vec![1], 0, false, 0, WALL).unwrap().is_none());
        assert!(m.catalog().is_none());
        let o = m.video(vec![2], 3000, true, 0, WALL).unwrap().unwrap();
        assert!(o.frame.keyframe);
        m.set_rfc6381("avc1.42c01e");
        let c = m.catalog().unwrap();
        assert_eq!(c.tracks.len(), 1);
        assert_eq!(
            c.tracks[0].fmtp,
            "profile-level-id=42c01e;packetization-mode=1"
        );
        assert!(m.catalog().is_none(), "unchanged");
        // Timeline: epoch-based, 90 kHz.
        assert_eq!(o.frame.pts, WALL * 9 / 100);
        let o = m.video(vec![3], 6000, false, 0, WALL + 1).unwrap().unwrap();
        assert_eq!(o.frame.pts, WALL * 9 / 100 + 3000);
        assert_eq!(o.frame.dts, o.frame.pts);
        assert!(!m.bframes());
    }

    #[test]
    fn loss_waits_for_the_next_keyframe() {
        let mut m = Media::new(Codec::H264, None).unwrap();
        m.video(vec![1], 0, true, 0, WALL).unwrap().unwrap();
        assert!(m.video(vec![1], 3000, false, 2, WALL).unwrap().is_none());
        assert!(m.video(vec![1], 6000, false, 0, WALL).unwrap().is_none());
        assert!(m.video(vec![1], 9000, true, 0, WALL).unwrap().is_some());
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut m = Media::new(Codec::H264, None).unwrap();
        assert!(m
            .video(vec![0; MAX_FRAME_BYTES + 1], 0, true, 0, WALL)
            .is_err());
    }

    #[test]
    fn bframes_get_monotonic_dts_not_after_pts() {
        let mut m = Media::new(Codec::H264, None).unwrap();
        // Decode order I0 P3 B1 B2 P6 B4 B5 P9 B7 B8 (frame units of 3000).
        let order = [0u64, 3, 1, 2, 6, 4, 5, 9, 7, 8, 12, 10, 11];
        let mut last = 0;
        let mut out = Vec::new();
        for (i, n) in order.iter().enumerate() {
            let o = m
                .video(vec![0], (*n * 3000) as i64, i == 0, 0, WALL)
                .unwrap()
                .unwrap();
            out.push((o.frame.pts, o.frame.dts));
        }
        assert!(m.bframes());
        assert!(m.catalog().unwrap().tracks[0].bframes);
        for (i, (pts, dts)) in out.iter().enumerate() {
            assert!(*dts >= last, "dts monotonic at {i}");
            last = *dts;
            // Only the frames before the first P after the reorder was
            // revealed (indices 2 and 3) may break it.
            if !(2..4).contains(&i) {
                assert!(dts <= pts, "dts {dts} > pts {pts} at {i}");
            }
        }
    }

    #[test]
    fn g711_audio_becomes_opus_at_the_right_pitch() {
        // 1 kHz μ-law tone at 8 kHz, 20 ms packets, as a camera sends it.
        let mut m = Media::new(
            Codec::H264,
            Some(AudioIn::G711 {
                law: Law::Mu,
                rate: 8_000,
                channels: 1,
            }),
        )
        .unwrap();
        m.video(vec![0], 0, true, 0, WALL).unwrap();
        let cat = m.catalog().unwrap();
        assert_eq!(cat.tracks[1].codec, Codec::Opus);
        let mut frames = Vec::new();
        for p in 0..100i64 {
            let bytes: Vec<u8> = (0..160)
                .map(|i| {
                    let t = (p * 160 + i) as f64 / 8000.0;
                    mu_encode(
                        (0.5 * (2.0 * std::f64::consts::PI * 1000.0 * t).sin() * 32767.0) as i16,
                    )
                })
                .collect();
            m.audio(&bytes, p * 160, 8_000, WALL, &mut frames).unwrap();
        }
        assert!(frames.len() >= 90, "{} Opus frames for 2 s", frames.len());
        let mut dec = opus_rs::OpusDecoder::new(48_000, 1).unwrap();
        let mut pcm = Vec::new();
        for f in &frames {
            let mut buf = vec![0f32; 960];
            let n = dec.decode(&f.frame.payload, 960, &mut buf).unwrap();
            pcm.extend_from_slice(&buf[..n]);
        }
        // Skip the warm-up; count rising zero crossings over 1 s.
        let second = &pcm[24_000..72_000];
        let crossings = second
            .windows(2)
            .filter(|w| w[0] < 0.0 && w[1] >= 0.0)
            .count();
        assert!((990..=1010).contains(&crossings), "{crossings} Hz");
        // Opus timestamps: 20 ms apart, on the video's timeline.
        let d = frames[1].frame.pts - frames[0].frame.pts;
        assert_eq!(d, 960);
        let video_zero = WALL * 48 / 1000;
        assert!(frames[0].frame.pts.abs_diff(video_zero) < 48 * 30);
    }

    #[test]
    fn opus_audio_is_passed_through_on_the_video_timeline() {
        let mut m = Media::new(Codec::H264, Some(AudioIn::Opus { stereo: false })).unwrap();
        let mut out = Vec::new();
        // Nothing before the first keyframe.
        m.audio(&[0xfc, 1], 0, 48_000, WALL, &mut out).unwrap();
        assert!(out.is_empty());
        m.video(vec![0], 0, true, 0, WALL).unwrap().unwrap();
        let cat = m.catalog().unwrap();
        assert_eq!(cat.tracks[1].codec, Codec::Opus);
        assert_eq!(cat.tracks[1].fmtp, "minptime=10;useinbandfec=1");
        m.audio(&[0xfc, 1, 2], 960, 48_000, WALL, &mut out).unwrap();
        m.audio(&[0xfc, 3], 1920, 48_000, WALL, &mut out).unwrap();
        m.audio(&vec![0; MAX_OPUS_PACKET + 1], 2880, 48_000, WALL, &mut out)
            .unwrap();
        assert_eq!(out.len(), 2, "the oversized packet is not passed on");
        assert_eq!(&out[0].frame.payload[..], &[0xfc, 1, 2]);
        assert_eq!(out[1].frame.pts - out[0].frame.pts, 960);
        assert_eq!(out[0].frame.pts, WALL * 48 / 1000 + 960);
    }

    #[test]
    fn a_reencode_fmtp_replaces_the_cameras_and_back() {
        let mut m = Media::new(Codec::H264, None).unwrap();
        m.video(vec![0], 0, true, 0, WALL).unwrap();
        m.set_rfc6381("avc1.640028");
        assert!(m.catalog().unwrap().tracks[0].fmtp.contains("640028"));
        m.set_video_fmtp(Some("profile-level-id=4d401e;packetization-mode=1"));
        assert!(m.catalog().unwrap().tracks[0].fmtp.contains("4d401e"));
        m.set_video_fmtp(None);
        assert!(m.catalog().unwrap().tracks[0].fmtp.contains("640028"));
        assert!(m.catalog().is_none());
    }

    proptest::proptest! {
        /// Whatever a camera sends (sizes, timestamps in any order, loss,
        /// audio garbage): no panic; dts goes back only at a timestamp
        /// reset (a step back of more than `MAX_REORDER`), which the edge's
        /// timeline re-bases.
        #[test]
        fn arbitrary_frames_never_panic(
            frames in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..64),
                 -1_000_000i64..1_000_000, proptest::bool::ANY, 0u16..3, proptest::bool::ANY),
                0..64),
        ) {
            let audio = AudioIn::G711 { law: Law::A, rate: 8_000, channels: 1 };
            let mut m = Media::new(Codec::H265, Some(audio)).unwrap();
            let mut last_dts = 0;
            let mut max_pts = 0;
            let mut out = Vec::new();
            for (data, elapsed, key, loss, is_audio) in frames {
                if is_audio {
                    let _ = m.audio(&data, elapsed, 8_000, WALL, &mut out);
                } else if let Ok(Some(o)) = m.video(data, elapsed, key, loss, WALL) {
                    let reset = o.frame.pts + MAX_REORDER < max_pts;
                    proptest::prop_assert!(reset || o.frame.dts >= last_dts);
                    last_dts = o.frame.dts;
                    max_pts = if reset { o.frame.pts } else { max_pts.max(o.frame.pts) };
                }
                let _ = m.catalog();
            }
        }
    }

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
}
