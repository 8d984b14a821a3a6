//! What a stream carries: its tracks and their codec parameters.

use serde::{Deserialize, Serialize};

/// Audio or video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An audio track.
    Audio,
    /// A video track.
    Video,
}

/// The codecs cascade carries. Browsers decode these in WebRTC; AAC is
/// transcoded to Opus at ingest and never appears here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// H.264 / AVC.
    H264,
    /// H.265 / HEVC.
    H265,
    /// VP8.
    Vp8,
    /// VP9.
    Vp9,
    /// AV1.
    Av1,
    /// Opus.
    Opus,
}

impl Codec {
    /// The kind of media this codec carries.
    pub fn kind(self) -> Kind {
        match self {
            Self::Opus => Kind::Audio,
            _ => Kind::Video,
        }
    }

    /// The RTP clock rate (RFC 7587 fixes Opus at 48 kHz; video is 90 kHz).
    pub fn clock_rate(self) -> u32 {
        match self {
            Self::Opus => 48_000,
            _ => 90_000,
        }
    }

    /// The SDP encoding name.
    pub fn sdp_name(self) -> &'static str {
        match self {
            Self::H264 => "H264",
            Self::H265 => "H265",
            Self::Vp8 => "VP8",
            Self::Vp9 => "VP9",
            Self::Av1 => "AV1",
            Self::Opus => "opus",
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.sdp_name())
    }
}

/// One track of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// Track name, unique in the stream: `video`, `audio`.
    pub name: String,
    /// The codec.
    pub codec: Codec,
    /// Codec parameters as an SDP `fmtp` line value, e.g.
    /// `profile-level-id=42e01f;packetization-mode=1` or
    /// `minptime=10;useinbandfec=1`; empty when none.
    #[serde(default)]
    pub fmtp: String,
    /// Audio channels (Opus: 2 as RFC 7587 requires in SDP).
    #[serde(default)]
    pub channels: Option<u8>,
    /// True when the video uses B-frames (pts ≠ dts somewhere).
    #[serde(default)]
    pub bframes: bool,
    /// Set on video tracks that are one quality of several (simulcast layers,
    /// the ABR ladder). `None` for a stream with one video track, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendition: Option<Rendition>,
}

/// One quality of a stream's video: a simulcast layer or a step of the ABR
/// ladder. Every rendition is its own video track in the catalog, so it
/// crosses the relay and is packetized on the edge like any other track.
///
/// Naming: the track named [`VIDEO`] is the default rendition (the best one,
/// what a viewer gets that knows nothing of renditions); the others are named
/// [`rendition_track`]`(name)`, i.e. `video-<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendition {
    /// What viewers pick it by: the simulcast `rid` (`q`, `h`, `f`, or OBS's
    /// `0`, `1`, `2`) or the ladder step (`720p`, `source`). Stream-name
    /// alphabet, so `video-<name>` is a valid track name.
    pub name: String,
    /// Picture width in pixels, 0 while unknown.
    #[serde(default)]
    pub width: u32,
    /// Picture height in pixels, 0 while unknown.
    #[serde(default)]
    pub height: u32,
    /// Bitrate in kbit/s, 0 while unknown: the ladder's nominal one, or a
    /// simulcast layer's as the ingest measures it live (the catalog is
    /// updated when it moves by more than 25%, at most every 5 s).
    #[serde(default)]
    pub bitrate_kbps: u32,
    /// Frames per second, 0 while unknown.
    #[serde(default)]
    pub framerate: u32,
}

/// The name of the default video track (and of the only one without
/// renditions).
pub const VIDEO: &str = "video";

/// The track name of a non-default rendition: `video-<name>`.
pub fn rendition_track(name: &str) -> String {
    format!("{VIDEO}-{name}")
}

impl TrackInfo {
    /// Audio or video.
    pub fn kind(&self) -> Kind {
        self.codec.kind()
    }

    /// The H.264 `profile-level-id` from `fmtp`, if any.
    pub fn profile_level_id(&self) -> Option<u32> {
        fmtp_value(&self.fmtp, "profile-level-id").and_then(|v| u32::from_str_radix(v, 16).ok())
    }
}

// The fmtp parser lives with the SDP scanner in cascade-media; re-exported
// because `TrackInfo::fmtp` holds fmtp strings and callers look here.
pub use cascade_media::sdp::fmtp_value;

/// Everything a stream carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The tracks, at most one per kind today (simulcast adds more later).
    pub tracks: Vec<TrackInfo>,
}

impl Catalog {
    /// The first track of a kind.
    pub fn track(&self, kind: Kind) -> Option<&TrackInfo> {
        self.tracks.iter().find(|t| t.kind() == kind)
    }

    /// The video track a viewer gets by default: [`VIDEO`] (the default
    /// rendition when there are several), else the first video track.
    pub fn video(&self) -> Option<&TrackInfo> {
        self.by_name(VIDEO)
            .filter(|t| t.kind() == Kind::Video)
            .or_else(|| self.track(Kind::Video))
    }

    /// The track with this name.
    pub fn by_name(&self, name: &str) -> Option<&TrackInfo> {
        self.tracks.iter().find(|t| t.name == name)
    }

    /// The video tracks that are renditions, in catalog order (empty for a
    /// stream with a single video track).
    pub fn renditions(&self) -> impl Iterator<Item = &TrackInfo> {
        self.tracks
            .iter()
            .filter(|t| t.kind() == Kind::Video && t.rendition.is_some())
    }

    /// The video track of the rendition with this name.
    pub fn rendition(&self, name: &str) -> Option<&TrackInfo> {
        self.renditions()
            .find(|t| t.rendition.as_ref().is_some_and(|r| r.name == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmtp_lookup() {
        let t = TrackInfo {
            name: "video".into(),
            codec: Codec::H264,
            fmtp: "packetization-mode=1; profile-level-id=42e01f".into(),
            channels: None,
            bframes: false,
            rendition: None,
        };
        assert_eq!(t.profile_level_id(), Some(0x42e01f));
    }

    #[test]
    fn renditions_are_video_tracks_with_a_rendition() {
        let video = |name: &str, r: Option<&str>| TrackInfo {
            name: name.into(),
            codec: Codec::H264,
            fmtp: String::new(),
            channels: None,
            bframes: false,
            rendition: r.map(|r| Rendition {
                name: r.into(),
                width: 640,
                height: 360,
                bitrate_kbps: 800,
                framerate: 30,
            }),
        };
        let c = Catalog {
            tracks: vec![
                video(VIDEO, Some("f")),
                video(&rendition_track("h"), Some("h")),
            ],
        };
        assert_eq!(c.renditions().count(), 2);
        assert_eq!(c.video().unwrap().name, VIDEO);
        assert_eq!(c.rendition("h").unwrap().name, "video-h");
        assert!(c.rendition("q").is_none());
        // Old peers' JSON (no `rendition`) still parses; None is not written.
        let plain = Catalog {
            tracks: vec![video(VIDEO, None)],
        };
        let j = serde_json::to_string(&plain).unwrap();
        assert!(!j.contains("rendition"));
        assert_eq!(serde_json::from_str::<Catalog>(&j).unwrap(), plain);
        assert_eq!(plain.renditions().count(), 0);
    }

    #[test]
    fn catalog_json_roundtrip() {
        let c = Catalog {
            tracks: vec![TrackInfo {
                name: "audio".into(),
                codec: Codec::Opus,
                fmtp: "minptime=10;useinbandfec=1".into(),
                channels: Some(2),
                bframes: false,
                rendition: None,
            }],
        };
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Catalog>(&j).unwrap(), c);
        assert_eq!(c.track(Kind::Audio).unwrap().codec, Codec::Opus);
        assert!(c.track(Kind::Video).is_none());
    }
}
