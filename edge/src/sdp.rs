//! What a WHEP offer asks for, and which of it the stream can serve: the
//! codec choice per m-line against the stream's catalog, over the tolerant
//! m-line scan of `cascade_media::sdp` (payload types, fmtp, RTX).

use cascade_media::sdp::fmtp_value;
pub(crate) use cascade_media::sdp::{scan, Format, MediaLine};
use cascade_origin::catalog::{Catalog, Codec, Kind, TrackInfo};

/// What one m-line will carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Choice {
    /// The m-line's mid.
    pub(crate) mid: String,
    /// The catalog track sent on it.
    pub(crate) track: TrackInfo,
    /// The offered payload type we send with.
    pub(crate) format: Format,
}

/// Why an offer cannot be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 400: nothing to receive on.
    NoMedia,
    /// 406: no offered codec plays the stream.
    NotAcceptable(String),
}

/// The transport-wide congestion control extension's URI (its `a=extmap`).
const TWCC_URI: &str = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// Whether `sdp` (a viewer's WHEP offer, or an OvenPlayer's answer to the
/// edge's offer) lets the viewer send transport-wide congestion feedback
/// for its video: the extension at session level or in a video section.
/// Without it str0m's estimator hears nothing (its estimate would stay at
/// the start value, and the viewer low), so such viewers get no estimation.
pub(crate) fn has_twcc(sdp: &str) -> bool {
    let mut section = "";
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            section = m.split(' ').next().unwrap_or("");
        } else if (section.is_empty() || section == "video")
            && line.starts_with("a=extmap:")
            && line.split_whitespace().nth(1) == Some(TWCC_URI)
        {
            return true;
        }
    }
    false
}

/// Picks the payload type per m-line. Video decides: a viewer that can play
/// none of the stream's video is refused; one that lacks only the audio
/// codec still gets video.
pub(crate) fn negotiate(lines: &[MediaLine], catalog: &Catalog) -> Result<Vec<Choice>, Refusal> {
    let usable = |kind: &str| {
        lines
            .iter()
            .find(|m| m.kind == kind && m.receives() && !m.disabled && m.mid.is_some())
    };
    let (video_line, audio_line) = (usable("video"), usable("audio"));
    if video_line.is_none() && audio_line.is_none() {
        return Err(Refusal::NoMedia);
    }
    let mut out = Vec::new();
    let video_track = catalog.video();
    if let (Some(line), Some(track)) = (video_line, video_track) {
        match pick(line, track) {
            Some(format) => out.push(choice(line, track, format)),
            None => return Err(Refusal::NotAcceptable(describe(track))),
        }
    }
    if let (Some(line), Some(track)) = (audio_line, catalog.track(Kind::Audio)) {
        if let Some(format) = pick(line, track) {
            out.push(choice(line, track, format));
        }
    }
    if out.is_empty() {
        let what: Vec<String> = catalog.tracks.iter().map(describe).collect();
        let what = if what.is_empty() {
            "no tracks yet".to_string()
        } else {
            what.join(" + ")
        };
        return Err(Refusal::NotAcceptable(what));
    }
    Ok(out)
}

fn choice(line: &MediaLine, track: &TrackInfo, format: Format) -> Choice {
    Choice {
        mid: line.mid.clone().unwrap_or_default(),
        track: track.clone(),
        format,
    }
}

/// The stream's codec as a viewer should read it in a 406 body.
fn describe(track: &TrackInfo) -> String {
    match track.codec {
        Codec::H264 => format!(
            "H264 (profile-level-id={:06x}, packetization-mode=1)",
            track.profile_level_id().unwrap_or(DEFAULT_PLID)
        ),
        c => c.sdp_name().to_string(),
    }
}

/// RFC 6184 §8.1: an absent profile-level-id means baseline level 1.0; our
/// ingest always sets one, so default to what browsers always decode.
pub(crate) const DEFAULT_PLID: u32 = 0x42e01f;

/// The best offered format for `track`, if any plays it.
fn pick(line: &MediaLine, track: &TrackInfo) -> Option<Format> {
    let name = track.codec.sdp_name();
    line.formats
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name.eq_ignore_ascii_case(name) && f.clock == track.codec.clock_rate())
        .filter_map(|(i, f)| score(track, f).map(|s| ((s, f.rtx.is_some(), usize::MAX - i), f)))
        .max_by_key(|(k, _)| *k)
        .map(|(_, f)| f.clone())
}

/// How well an offered format fits (higher is better); `None` = unusable.
fn score(track: &TrackInfo, f: &Format) -> Option<u8> {
    match track.codec {
        Codec::H264 => {
            // FU-A needs packetization-mode=1 (RFC 6184 §6.3).
            if fmtp_value(&f.fmtp, "packetization-mode") != Some("1") {
                return None;
            }
            let offered = fmtp_value(&f.fmtp, "profile-level-id")
                .and_then(|v| u32::from_str_radix(v, 16).ok())
                .unwrap_or(0x42000a);
            let stream = track.profile_level_id().unwrap_or(DEFAULT_PLID);
            Some(h264_fit(H264Profile::of(stream), H264Profile::of(offered)))
        }
        Codec::Vp9 => {
            let want = fmtp_value(&track.fmtp, "profile-id").unwrap_or("0");
            let got = fmtp_value(&f.fmtp, "profile-id").unwrap_or("0");
            Some(if want == got { 2 } else { 1 })
        }
        Codec::Av1 => {
            let want = fmtp_value(&track.fmtp, "profile").unwrap_or("0");
            let got = fmtp_value(&f.fmtp, "profile").unwrap_or("0");
            Some(if want == got { 2 } else { 1 })
        }
        Codec::H265 | Codec::Vp8 | Codec::Opus => Some(1),
    }
}

/// H.264 profiles as far as "can this decoder play that stream" goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum H264Profile {
    ConstrainedBaseline,
    Baseline,
    Main,
    ConstrainedHigh,
    High,
    /// High 10/4:2:2/4:4:4 and anything else.
    Other(u8),
}

impl H264Profile {
    /// The profile a `profile-level-id` names (its level ignored).
    pub(crate) fn of(plid: u32) -> Self {
        let [_, idc, iop, _] = plid.to_be_bytes();
        match idc {
            // constraint_set1 makes baseline constrained (RFC 6184 table 5).
            0x42 if iop & 0x40 != 0 => Self::ConstrainedBaseline,
            0x42 => Self::Baseline,
            // Main with constraint_set0 is also constrained baseline.
            0x4d if iop & 0x80 != 0 => Self::ConstrainedBaseline,
            0x4d => Self::Main,
            0x58 if iop & 0xc0 == 0xc0 => Self::ConstrainedBaseline,
            0x58 => Self::Baseline,
            0x64 if iop & 0x0c == 0x0c => Self::ConstrainedHigh,
            0x64 => Self::High,
            other => Self::Other(other),
        }
    }
}

/// 3 = same profile, 2 = the decoder's profile contains the stream's, 1 =
/// mismatch. A mismatch is still served (browsers decode far more than
/// they offer, e.g. Firefox offers only constrained baseline); callers
/// prefer better fits when several are offered.
pub(crate) fn h264_fit(stream: H264Profile, decoder: H264Profile) -> u8 {
    use H264Profile::*;
    if stream == decoder {
        return 3;
    }
    let contains = match decoder {
        Baseline | Main | ConstrainedHigh => stream == ConstrainedBaseline,
        High => matches!(stream, ConstrainedBaseline | Main | ConstrainedHigh),
        _ => false,
    };
    if contains {
        2
    } else {
        1
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Chromium WHEP offer (recvonly Opus + VP8/H.264×3/AV1 with RTX),
    /// shared with cascade-media's scanner tests.
    const CHROME: &str = include_str!("../../media/testdata/chrome-recvonly-offer.sdp");

    pub(crate) fn track(codec: Codec, fmtp: &str) -> TrackInfo {
        TrackInfo {
            name: if codec == Codec::Opus {
                "audio"
            } else {
                "video"
            }
            .into(),
            codec,
            fmtp: fmtp.into(),
            channels: None,
            bframes: false,
            rendition: None,
        }
    }

    fn catalog(tracks: Vec<TrackInfo>) -> Catalog {
        Catalog { tracks }
    }

    #[test]
    fn picks_matching_h264_profile() {
        let lines = scan(CHROME);
        let opus = track(Codec::Opus, "minptime=10;useinbandfec=1");
        for (plid, pt) in [
            ("42e01f", 106),
            ("42001f", 102),
            ("64001f", 112),
            ("4d001f", 112),
            ("640c1f", 112),
        ] {
            let c = catalog(vec![
                track(
                    Codec::H264,
                    &format!("profile-level-id={plid};packetization-mode=1"),
                ),
                opus.clone(),
            ]);
            let got = negotiate(&lines, &c).unwrap();
            assert_eq!(got[0].format.pt, pt, "stream {plid}");
            assert_eq!(got[1].format.pt, 111);
        }
    }

    #[test]
    fn refuses_what_cannot_play() {
        let lines = scan(CHROME);
        let h265 = catalog(vec![track(Codec::H265, "")]);
        assert!(
            matches!(negotiate(&lines, &h265), Err(Refusal::NotAcceptable(s)) if s.contains("H265"))
        );
        let vp8 = catalog(vec![track(Codec::Vp8, ""), track(Codec::Opus, "")]);
        assert_eq!(negotiate(&lines, &vp8).unwrap()[0].format.pt, 96);
        assert_eq!(negotiate(&scan("v=0\r\n"), &vp8), Err(Refusal::NoMedia));
        // Audio-only offer to a stream with audio: audio only.
        let audio_only: String = CHROME.split("m=video").next().unwrap().to_string();
        let got = negotiate(&scan(&audio_only), &vp8).unwrap();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn video_without_audio_codec_still_plays() {
        let offer = CHROME.replace("opus/48000/2", "PCMU/8000");
        let c = catalog(vec![
            track(Codec::H264, "profile-level-id=42e01f;packetization-mode=1"),
            track(Codec::Opus, ""),
        ]);
        let got = negotiate(&scan(&offer), &c).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].track.codec, Codec::H264);
    }

    #[test]
    fn packetization_mode_zero_is_refused() {
        let offer = CHROME.replace("packetization-mode=1", "packetization-mode=0");
        let c = catalog(vec![track(
            Codec::H264,
            "profile-level-id=42e01f;packetization-mode=1",
        )]);
        assert!(matches!(
            negotiate(&scan(&offer), &c),
            Err(Refusal::NotAcceptable(_))
        ));
    }

    #[test]
    fn twcc_offered_for_video_or_the_session() {
        let ext = format!("a=extmap:3 {TWCC_URI}");
        let video = format!(
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n{ext}\r\n"
        );
        assert!(has_twcc(&video), "Chromium/Firefox: in the video section");
        let session = format!("v=0\r\n{ext}\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n");
        assert!(has_twcc(&session), "session level applies to video");
        // Firefox offers it for video only; audio alone does not count.
        let audio = format!(
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n{ext}\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
        );
        assert!(!has_twcc(&audio));
        let other = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n";
        assert!(!has_twcc(other));
        // With a direction after the id (RFC 8285), still the same URI.
        let dir =
            format!("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=extmap:3/sendrecv {TWCC_URI}\r\n");
        assert!(has_twcc(&dir));
    }

    proptest! {
        #[test]
        fn has_twcc_never_panics(s in "\\PC*") {
            let _ = has_twcc(&s);
        }

        #[test]
        fn scan_never_panics(s in "\\PC*") {
            let lines = scan(&s);
            let c = catalog(vec![track(Codec::H264, "profile-level-id=zz"), track(Codec::Opus, "")]);
            let _ = negotiate(&lines, &c);
        }

        #[test]
        fn scan_never_panics_on_sdp_like(lines in proptest::collection::vec(
            prop_oneof![
                Just("m=video 9 UDP/TLS/RTP/SAVPF 96 97".to_string()),
                Just("m=audio 0 RTP 111".to_string()),
                "a=rtpmap:[0-9]{1,4} [A-Za-z0-9]{0,5}/[0-9]{0,6}(/[0-9]{0,3})?",
                "a=fmtp:[0-9]{1,4} [a-z=;0-9-]{0,40}",
                "a=mid:[a-z0-9]{0,3}",
                Just("a=recvonly".to_string()),
            ], 0..30)) {
            let sdp = lines.join("\r\n");
            let scanned = scan(&sdp);
            let c = catalog(vec![track(Codec::Vp8, ""), track(Codec::Opus, "")]);
            let _ = negotiate(&scanned, &c);
        }
    }
}
