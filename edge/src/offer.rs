//! The offer cascade makes in OvenMediaEngine's WebSocket signalling
//! (OvenPlayer), where the server offers and the browser answers: which
//! payload types to offer so every current browser accepts one for the
//! stream's codec, where the ICE candidates go so a rejected m-line cannot
//! take them away, and what the answer kept. No I/O: `ws.rs` is the shell.
//!
//! Browsers match an offered H.264 payload type by profile (profile_idc plus
//! constraint flags), not by level, and only against the profiles they list
//! for receiving: Debian's Chromium 156 lists `42001f`, `42e01f`, `4d001f`,
//! `f4001f` (no High), Firefox with OpenH264 `42e01f`/`42001f`, Safari
//! `640c1f`/`42e01f`. Offering a High stream only as `64001e` gets the video
//! m-line rejected. Their decoders play far more than they list (the WHEP
//! path, `sdp.rs`, already serves "any H.264" the same way), so a stream is
//! offered under its own profile first and then under the others browsers
//! list, each with its RTX; the answer picks. Other codecs are offered only
//! as what the stream is (VP9/AV1 profile, H.265 parameters).

use cascade_media::sdp::fmtp_value;
use cascade_origin::catalog::{Catalog, Codec, Kind, TrackInfo};
use serde_json::{json, Value};
use str0m::format::Codec as RtcCodec;
use str0m::media::{Frequency, Mid, Pt};

use crate::sdp::{self, H264Profile};

/// Payload types of our offer (dynamic range, RFC 3551): video primaries and
/// their RTX pairs, then Opus.
const PT_VIDEO: [(u8, u8); 5] = [(96, 97), (98, 99), (100, 101), (102, 103), (104, 105)];
const PT_AUDIO: u8 = 111;

/// H.264 profiles browsers list for receiving (profile_idc, profile-iop),
/// most capable first. One of them is accepted by every current browser
/// with H.264 at all.
const H264_BROWSER_PROFILES: [(u8, u8); 5] = [
    (0x64, 0x00), // High (Chrome builds with High, Edge)
    (0x64, 0x0c), // Constrained High (Safari)
    (0x4d, 0x00), // Main (Chromium)
    (0x42, 0xe0), // Constrained Baseline (every browser)
    (0x42, 0x00), // Baseline (Chromium, Firefox)
];

/// One payload type offered for a track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Offered {
    pub(crate) pt: u8,
    pub(crate) rtx: Option<u8>,
    pub(crate) fmtp: String,
}

/// One track we offer: its catalog entry, str0m codec and payload types
/// (most preferred first).
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) track: TrackInfo,
    pub(crate) codec: RtcCodec,
    pub(crate) clock: Frequency,
    pub(crate) channels: Option<u8>,
    pub(crate) formats: Vec<Offered>,
    /// The m-line, once added to the offer.
    pub(crate) mid: Option<Mid>,
}

impl Plan {
    /// Audio or video.
    pub(crate) fn kind(&self) -> Kind {
        self.track.kind()
    }

    /// The payload type the answer kept: the first of the answerer's
    /// (its preference order) that is one of ours and not an RTX.
    pub(crate) fn chosen(&self, remote_pts: &[Pt]) -> Option<Pt> {
        remote_pts
            .iter()
            .copied()
            .find(|pt| self.formats.iter().any(|f| Pt::from(f.pt) == *pt))
    }

    /// What was offered, for a log line or an error a user can act on.
    pub(crate) fn describe(&self) -> String {
        let name = self.track.codec.sdp_name();
        match self.track.codec {
            Codec::H264 => {
                let plids: Vec<&str> = self
                    .formats
                    .iter()
                    .filter_map(|f| fmtp_value(&f.fmtp, "profile-level-id"))
                    .collect();
                format!(
                    "{name} (stream profile-level-id {}, offered as {})",
                    plids.first().copied().unwrap_or("?"),
                    plids.join(", ")
                )
            }
            _ if self.track.fmtp.is_empty() => name.to_string(),
            _ => format!("{name} ({})", self.track.fmtp),
        }
    }
}

/// What we offer a browser for the catalog's tracks: audio first (Opus is
/// never rejected, so the BUNDLE group keeps a transport whatever the browser
/// thinks of the video), then video. Tracks no browser plays are left out.
pub(crate) fn plans(catalog: &Catalog) -> Vec<Plan> {
    let mut out = Vec::new();
    if let Some(a) = catalog
        .track(Kind::Audio)
        .filter(|a| a.codec == Codec::Opus)
    {
        out.push(Plan {
            track: a.clone(),
            codec: RtcCodec::Opus,
            clock: Frequency::FORTY_EIGHT_KHZ,
            channels: Some(2),
            formats: vec![Offered {
                pt: PT_AUDIO,
                rtx: None,
                fmtp: "minptime=10;useinbandfec=1".into(),
            }],
            mid: None,
        });
    }
    if let Some(v) = catalog.video() {
        if let Some(plan) = video_plan(v) {
            out.push(plan);
        }
    }
    out
}

fn video_plan(v: &TrackInfo) -> Option<Plan> {
    let (codec, fmtps) = match v.codec {
        Codec::H264 => (RtcCodec::H264, h264_fmtps(v)),
        Codec::Vp8 => (RtcCodec::Vp8, vec![String::new()]),
        Codec::Vp9 => {
            let profile = fmtp_value(&v.fmtp, "profile-id").unwrap_or("0");
            (RtcCodec::Vp9, vec![format!("profile-id={profile}")])
        }
        Codec::Av1 => (RtcCodec::Av1, vec![av1_fmtp(&v.fmtp)]),
        Codec::H265 => (RtcCodec::H265, vec![v.fmtp.clone()]),
        Codec::Opus => return None,
    };
    let formats = fmtps
        .into_iter()
        .zip(PT_VIDEO)
        .map(|(fmtp, (pt, rtx))| Offered {
            pt,
            rtx: Some(rtx),
            fmtp,
        })
        .collect();
    Some(Plan {
        track: v.clone(),
        codec,
        clock: Frequency::NINETY_KHZ,
        channels: None,
        formats,
        mid: None,
    })
}

/// The stream's own profile-level-id first, then the browser profiles that
/// fit it best (same level: a level only says what the stream needs, and
/// browsers match on the profile), one per profile.
fn h264_fmtps(v: &TrackInfo) -> Vec<String> {
    let own = v.profile_level_id().unwrap_or(sdp::DEFAULT_PLID);
    let level = own & 0xff;
    let stream = H264Profile::of(own);
    let mut plids = vec![own];
    let mut others: Vec<(usize, u32)> = H264_BROWSER_PROFILES
        .iter()
        .enumerate()
        .map(|(i, &(idc, iop))| (i, u32::from(idc) << 16 | u32::from(iop) << 8 | level))
        .collect();
    // Best fit first (a decoder of that profile contains the stream's), then
    // the list's order.
    others.sort_by_key(|&(i, plid)| {
        (
            std::cmp::Reverse(sdp::h264_fit(stream, H264Profile::of(plid))),
            i,
        )
    });
    for (_, plid) in others {
        if !plids
            .iter()
            .any(|&p| H264Profile::of(p) == H264Profile::of(plid))
        {
            plids.push(plid);
        }
    }
    plids
        .into_iter()
        .map(|plid| {
            format!("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={plid:06x}")
        })
        .collect()
}

/// AV1's SDP parameters (profile, level-idx, tier) as the stream has them;
/// the others are not AV1's business in an offer.
fn av1_fmtp(fmtp: &str) -> String {
    ["profile", "level-idx", "tier"]
        .iter()
        .filter_map(|k| fmtp_value(fmtp, k).map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(";")
}

/// Puts the `a=candidate` lines (and `a=end-of-candidates`) of the offer's
/// first m-line that has them on every other m-line too. str0m writes them
/// on the first m-line only (fine under BUNDLE), but a browser that rejects
/// that m-line drops its candidates with it and never starts ICE.
pub(crate) fn spread_candidates(sdp: &str) -> String {
    let eol = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let lines: Vec<&str> = sdp.lines().collect();
    let is_cand = |l: &str| l.starts_with("a=candidate:") || l == "a=end-of-candidates";
    let mut sections: Vec<Vec<&str>> = vec![Vec::new()];
    for l in &lines {
        if l.starts_with("m=") {
            sections.push(Vec::new());
        }
        if let Some(s) = sections.last_mut() {
            s.push(l);
        }
    }
    let shared: Vec<&str> = sections
        .iter()
        .skip(1)
        .map(|s| s.iter().copied().filter(|l| is_cand(l)).collect::<Vec<_>>())
        .find(|c| !c.is_empty())
        .unwrap_or_default();
    let mut out = String::with_capacity(sdp.len() + shared.len() * 80 * sections.len());
    for (i, s) in sections.iter().enumerate() {
        for l in s {
            out.push_str(l);
            out.push_str(eol);
        }
        if i > 0 && !s.iter().any(|l| is_cand(l)) {
            for l in &shared {
                out.push_str(l);
                out.push_str(eol);
            }
        }
    }
    out
}

/// The offer's candidates as OME sends them in its `candidates` array
/// (OvenPlayer adds each with `addIceCandidate`), pointing at the first
/// m-line: audio when the stream has it, which no browser rejects.
pub(crate) fn candidates_json(sdp: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut index: i64 = -1;
    let mut mid: Option<&str> = None;
    for l in sdp.lines() {
        if l.starts_with("m=") {
            index += 1;
            if index > 0 {
                break;
            }
        } else if let Some(m) = l.strip_prefix("a=mid:") {
            mid = Some(m.trim());
        } else if let Some(c) = l.strip_prefix("a=") {
            if c.starts_with("candidate:") {
                out.push(json!({ "candidate": c, "sdpMLineIndex": 0 }));
            }
        }
    }
    if let Some(mid) = mid {
        for c in &mut out {
            c["sdpMid"] = Value::from(mid);
        }
    }
    out
}

/// m-lines the answer rejected (port 0), by mid.
pub(crate) fn rejected_mids(answer: &str) -> Vec<String> {
    sdp::scan(answer)
        .into_iter()
        .filter(|m| m.disabled)
        .filter_map(|m| m.mid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdp::tests::track;

    /// `RTCRtpReceiver.getCapabilities("video")` of Debian's Chromium
    /// 156.0.8078 (headless, this machine, 2026-12-06): mime, fmtp.
    const CHROMIUM_156: &[(&str, &str)] = &[
        ("VP8", ""),
        ("VP9", "profile-id=0"),
        ("VP9", "profile-id=2"),
        ("VP9", "profile-id=1"),
        ("VP9", "profile-id=3"),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=4d001f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=f4001f",
        ),
        (
            "H264",
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=f4001f",
        ),
        ("AV1", "level-idx=5;profile=0;tier=0"),
        ("AV1", "level-idx=5;profile=1;tier=0"),
    ];

    /// Firefox ESR 153 on this machine (no OpenH264 plugin: it cannot be
    /// downloaded here), from `getCapabilities` and its recvonly offer.
    const FIREFOX_153_HERE: &[(&str, &str)] = &[
        ("VP8", "max-fs=12288;max-fr=60"),
        ("VP9", "max-fs=12288;max-fr=60"),
        ("AV1", ""),
    ];

    /// Firefox with its OpenH264 plugin (other distributions): its recvonly
    /// offer lists these H.264 payload types besides the above.
    const FIREFOX_OPENH264: &[(&str, &str)] = &[
        (
            "H264",
            "profile-level-id=42e01f;level-asymmetry-allowed=1;packetization-mode=1",
        ),
        ("H264", "profile-level-id=42e01f;level-asymmetry-allowed=1"),
        (
            "H264",
            "profile-level-id=42001f;level-asymmetry-allowed=1;packetization-mode=1",
        ),
        ("VP8", "max-fs=12288;max-fr=60"),
        ("VP9", "max-fs=12288;max-fr=60"),
    ];

    /// libwebrtc's/Firefox's match of an offered format against a receive
    /// capability: same codec; H.264 same profile and packetization-mode;
    /// VP9 same profile-id; AV1 same profile (absent = 0).
    fn accepts(cap: (&str, &str), codec: Codec, fmtp: &str) -> bool {
        if !cap.0.eq_ignore_ascii_case(codec.sdp_name()) {
            return false;
        }
        let get = |f: &str, k: &str, d: &str| fmtp_value(f, k).unwrap_or(d).to_string();
        match codec {
            Codec::H264 => {
                let plid = |f: &str| {
                    u32::from_str_radix(&get(f, "profile-level-id", "42001f"), 16).unwrap_or(0)
                };
                get(cap.1, "packetization-mode", "0") == get(fmtp, "packetization-mode", "0")
                    && H264Profile::of(plid(cap.1)) == H264Profile::of(plid(fmtp))
            }
            Codec::Vp9 => get(cap.1, "profile-id", "0") == get(fmtp, "profile-id", "0"),
            Codec::Av1 => get(cap.1, "profile", "0") == get(fmtp, "profile", "0"),
            _ => true,
        }
    }

    fn accepted(receiver: &[(&str, &str)], plan: &Plan) -> bool {
        plan.formats.iter().any(|f| {
            receiver
                .iter()
                .any(|&cap| accepts(cap, plan.track.codec, &f.fmtp))
        })
    }

    fn video(codec: Codec, fmtp: &str) -> Plan {
        let c = Catalog {
            tracks: vec![track(codec, fmtp), track(Codec::Opus, "")],
        };
        plans(&c)
            .into_iter()
            .find(|p| p.kind() == Kind::Video)
            .unwrap()
    }

    #[test]
    fn every_h264_profile_is_accepted_by_chromium_and_firefox() {
        for plid in [
            "64001e", // x264 High (OBS default) as the B-frame re-encode sends it
            "640028", // High 4.0 (1080p)
            "640c1f", // Constrained High
            "4d001f", // Main
            "4d401f", // Main, constraint_set1
            "42e01f", // Constrained Baseline
            "42c01e", // CB written with constraint_set0+1
            "42001f", // Baseline
            "f4001f", // High 4:4:4 Predictive
            "7a001f", // High 4:2:2
        ] {
            let p = video(
                Codec::H264,
                &format!("packetization-mode=1;profile-level-id={plid}"),
            );
            assert!(accepted(CHROMIUM_156, &p), "chromium, {plid}: {p:?}");
            assert!(accepted(FIREFOX_OPENH264, &p), "firefox, {plid}: {p:?}");
            // The stream's own profile is offered first: browsers that list
            // it (Chrome with High, Safari) answer with it.
            assert!(p.formats[0].fmtp.ends_with(plid), "{plid}: {p:?}");
            // Every payload type has its RTX, all distinct.
            let mut pts: Vec<u8> = p
                .formats
                .iter()
                .flat_map(|f| [f.pt, f.rtx.unwrap()])
                .collect();
            let n = pts.len();
            pts.sort_unstable();
            pts.dedup();
            assert_eq!(pts.len(), n, "{p:?}");
            assert!(!pts.contains(&PT_AUDIO));
        }
    }

    #[test]
    fn h264_alternatives_fit_the_stream_best_first() {
        let p = video(Codec::H264, "profile-level-id=64001e");
        let plids: Vec<&str> = p
            .formats
            .iter()
            .map(|f| fmtp_value(&f.fmtp, "profile-level-id").unwrap())
            .collect();
        // Own (High) first, Constrained High would not contain it, Main next
        // best; one per profile, at the stream's level.
        assert_eq!(plids, ["64001e", "640c1e", "4d001e", "42e01e", "42001e"]);
        let cb = video(Codec::H264, "profile-level-id=42e01f");
        let first_two: Vec<&str> = cb
            .formats
            .iter()
            .take(2)
            .map(|f| fmtp_value(&f.fmtp, "profile-level-id").unwrap())
            .collect();
        assert_eq!(first_two, ["42e01f", "64001f"]);
        assert_eq!(cb.formats.len(), 5);
        assert!(cb
            .formats
            .iter()
            .all(|f| f.fmtp.contains("packetization-mode=1")));
    }

    #[test]
    fn other_codecs_are_offered_as_what_the_stream_is() {
        let vp8 = video(Codec::Vp8, "");
        assert_eq!(vp8.formats.len(), 1);
        assert!(accepted(CHROMIUM_156, &vp8) && accepted(FIREFOX_153_HERE, &vp8));
        for profile in ["0", "2"] {
            let vp9 = video(Codec::Vp9, &format!("profile-id={profile}"));
            assert_eq!(vp9.formats[0].fmtp, format!("profile-id={profile}"));
            assert!(accepted(CHROMIUM_156, &vp9), "{vp9:?}");
        }
        assert!(accepted(FIREFOX_153_HERE, &video(Codec::Vp9, "")));
        let av1 = video(Codec::Av1, "profile=0;level-idx=8;tier=0");
        assert!(accepted(CHROMIUM_156, &av1) && accepted(FIREFOX_153_HERE, &av1));
        // H.265: offered as it is, and Chromium here (no H.265) rejects it.
        let hevc = video(Codec::H265, "level-id=93;profile-id=1;tier-flag=0");
        assert_eq!(hevc.formats[0].fmtp, "level-id=93;profile-id=1;tier-flag=0");
        assert!(!accepted(CHROMIUM_156, &hevc));
        // Firefox here has no H.264 at all: the answer will reject video.
        assert!(!accepted(
            FIREFOX_153_HERE,
            &video(Codec::H264, "profile-level-id=42e01f")
        ));
    }

    #[test]
    fn audio_goes_first_and_is_opus() {
        let c = Catalog {
            tracks: vec![
                track(Codec::H264, "profile-level-id=640028"),
                track(Codec::Opus, ""),
            ],
        };
        let p = plans(&c);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].codec, RtcCodec::Opus);
        assert_eq!(p[0].formats[0].pt, PT_AUDIO);
        assert_eq!(p[1].codec, RtcCodec::H264);
        let video_only = Catalog {
            tracks: vec![track(Codec::Vp8, "")],
        };
        assert_eq!(plans(&video_only).len(), 1);
    }

    #[test]
    fn chosen_follows_the_answerers_order() {
        let p = video(Codec::H264, "profile-level-id=64001e");
        // Chromium kept Main and CB (our 100, 102 after its own order).
        assert_eq!(
            p.chosen(&[Pt::from(102), Pt::from(103), Pt::from(100)]),
            Some(Pt::from(102))
        );
        assert_eq!(p.chosen(&[Pt::from(97)]), None, "an RTX alone is no codec");
        assert_eq!(p.chosen(&[]), None);
        assert!(p.describe().contains("64001e"), "{}", p.describe());
    }

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
        a=candidate:1 1 udp 2130706431 198.18.0.1 8189 typ host\r\n\
        a=candidate:2 1 tcp 2130706175 198.18.0.1 8189 typ host tcptype passive\r\n\
        a=end-of-candidates\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:1\r\na=sendonly\r\n";

    #[test]
    fn candidates_on_every_m_line() {
        let out = spread_candidates(OFFER);
        let video = out.split("m=video").nth(1).unwrap();
        assert_eq!(video.matches("a=candidate:").count(), 2, "{out}");
        assert!(video.contains("a=end-of-candidates\r\n"));
        assert_eq!(out.matches("a=candidate:").count(), 4);
        assert!(out.ends_with("\r\n") && !out.contains("\n\n"));
        // Idempotent, and a no-op without candidates.
        assert_eq!(spread_candidates(&out), out);
        let none = "v=0\r\nm=audio 9 RTP 111\r\n";
        assert_eq!(spread_candidates(none), none);
    }

    #[test]
    fn candidates_as_ome_sends_them() {
        let c = candidates_json(OFFER);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0]["sdpMLineIndex"], 0);
        assert_eq!(c[0]["sdpMid"], "0");
        assert!(c[0]["candidate"]
            .as_str()
            .unwrap()
            .starts_with("candidate:1 1 udp"));
    }

    #[test]
    fn rejected_m_lines_by_mid() {
        let answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
            m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n";
        assert_eq!(rejected_mids(answer), ["1"]);
        assert!(rejected_mids(OFFER).is_empty());
    }
}
