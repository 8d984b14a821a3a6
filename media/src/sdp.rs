//! A tolerant scan of SDP (RFC 8866) offers and answers: the m-lines with
//! their kind, port-0 state, mid, direction and payload types (rtpmap,
//! fmtp, RTX pairing), and fmtp parameter lookup.
//!
//! str0m parses SDP for real (and the HTTP layer answers 400 when it
//! cannot); this scan only reads what the roles decide on (which kinds a
//! WHIP publisher sends, which codec a WHEP viewer takes, which m-lines an
//! answer rejected) and never fails: unknown or malformed lines are skipped.

/// One payload type of an m-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    /// The payload type.
    pub pt: u8,
    /// Encoding name from `a=rtpmap` as written (`H264`, `opus`, `rtx`).
    pub name: String,
    /// Clock rate from `a=rtpmap`; 0 without one.
    pub clock: u32,
    /// Channel count from `a=rtpmap`, when given.
    pub channels: Option<u8>,
    /// The `a=fmtp` parameters, trimmed; empty without one.
    pub fmtp: String,
    /// The RTX payload type repairing this one (`a=fmtp:X apt=pt`).
    pub rtx: Option<u8>,
}

/// The media direction attribute of an m-line (RFC 8866 §6.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// `a=sendrecv`, also the default without an attribute.
    #[default]
    SendRecv,
    /// `a=sendonly`.
    SendOnly,
    /// `a=recvonly`.
    RecvOnly,
    /// `a=inactive`.
    Inactive,
}

/// One m-line and the attributes under it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MediaLine {
    /// `audio`, `video`, `application`… (lower-cased).
    pub kind: String,
    /// `a=mid`, if any.
    pub mid: Option<String>,
    /// The direction, from the SDP writer's point of view.
    pub direction: Direction,
    /// Port 0: the writer disabled (offer) or rejected (answer) it.
    pub disabled: bool,
    /// The payload types in m-line order.
    pub formats: Vec<Format>,
}

impl MediaLine {
    /// The SDP's writer receives on it (recvonly or sendrecv).
    pub fn receives(&self) -> bool {
        matches!(self.direction, Direction::SendRecv | Direction::RecvOnly)
    }

    /// The SDP's writer sends on it (sendonly or sendrecv).
    pub fn sends(&self) -> bool {
        matches!(self.direction, Direction::SendRecv | Direction::SendOnly)
    }
}

/// Reads the m-lines of an SDP. Session-level lines are ignored; unknown
/// or malformed lines are skipped.
pub fn scan(sdp: &str) -> Vec<MediaLine> {
    let mut lines: Vec<MediaLine> = Vec::new();
    let mut rtx_apt: Vec<(usize, u8, u8)> = Vec::new();
    for line in sdp.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("m=") {
            let mut it = rest.split_whitespace();
            let kind = it.next().unwrap_or_default().to_ascii_lowercase();
            let disabled = it.next() == Some("0");
            let _proto = it.next();
            let formats = it
                .filter_map(|pt| pt.parse::<u8>().ok())
                .map(|pt| Format {
                    pt,
                    name: String::new(),
                    clock: 0,
                    channels: None,
                    fmtp: String::new(),
                    rtx: None,
                })
                .collect();
            lines.push(MediaLine {
                kind,
                mid: None,
                direction: Direction::SendRecv,
                disabled,
                formats,
            });
            continue;
        }
        let index = lines.len().wrapping_sub(1);
        let Some(m) = lines.last_mut() else {
            continue;
        };
        if let Some(mid) = line.strip_prefix("a=mid:") {
            m.mid = Some(mid.trim().to_string());
        } else if line == "a=sendrecv" {
            m.direction = Direction::SendRecv;
        } else if line == "a=sendonly" {
            m.direction = Direction::SendOnly;
        } else if line == "a=recvonly" {
            m.direction = Direction::RecvOnly;
        } else if line == "a=inactive" {
            m.direction = Direction::Inactive;
        } else if let Some(rest) = line.strip_prefix("a=rtpmap:") {
            let Some((pt, enc)) = rest.split_once(' ') else {
                continue;
            };
            let Ok(pt) = pt.trim().parse::<u8>() else {
                continue;
            };
            let mut parts = enc.trim().split('/');
            let name = parts.next().unwrap_or_default().to_string();
            let clock = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let channels = parts.next().and_then(|c| c.parse().ok());
            if let Some(f) = m.formats.iter_mut().find(|f| f.pt == pt) {
                f.name = name;
                f.clock = clock;
                f.channels = channels;
            }
        } else if let Some(rest) = line.strip_prefix("a=fmtp:") {
            let (pt, params) = rest.split_once(' ').unwrap_or((rest, ""));
            let Ok(pt) = pt.trim().parse::<u8>() else {
                continue;
            };
            if let Some(apt) = fmtp_value(params, "apt").and_then(|a| a.parse::<u8>().ok()) {
                rtx_apt.push((index, pt, apt));
            }
            if let Some(f) = m.formats.iter_mut().find(|f| f.pt == pt) {
                f.fmtp = params.trim().to_string();
            }
        }
    }
    // RTX is paired after the whole m-line is read: its rtpmap may come
    // after its fmtp.
    for (index, rtx, apt) in rtx_apt {
        let Some(m) = lines.get_mut(index) else {
            continue;
        };
        let is_rtx = m
            .formats
            .iter()
            .any(|f| f.pt == rtx && f.name.eq_ignore_ascii_case("rtx"));
        if let Some(f) = m.formats.iter_mut().find(|f| f.pt == apt) {
            if is_rtx {
                f.rtx = Some(rtx);
            }
        }
    }
    lines
}

/// Looks up `key` (case-insensitive) in an fmtp string (`a=1;b=2`).
pub fn fmtp_value<'a>(fmtp: &'a str, key: &str) -> Option<&'a str> {
    fmtp.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Chromium WHEP offer (recvonly Opus + VP8/H.264×3/AV1 with RTX);
    /// edge's negotiation tests read it too.
    const CHROME: &str = include_str!("../testdata/chrome-recvonly-offer.sdp");

    /// Kinds with a sending m-line, as ingest's WHIP endpoint asks.
    fn sending(sdp: &str) -> (bool, bool) {
        let lines = scan(sdp);
        let any = |k: &str| lines.iter().any(|m| m.kind == k && m.sends());
        (any("audio"), any("video"))
    }

    // From edge/src/sdp.rs.
    #[test]
    fn scans_chrome_offer() {
        let lines = scan(CHROME);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].mid.as_deref(), Some("1"));
        let h264 = lines[1].formats.iter().find(|f| f.pt == 106).unwrap();
        assert_eq!(h264.name, "H264");
        assert_eq!(h264.clock, 90000);
        assert_eq!(h264.rtx, Some(107));
        assert_eq!(fmtp_value(&h264.fmtp, "profile-level-id"), Some("42e01f"));
        assert_eq!(lines[0].formats[0].channels, Some(2));
        assert_eq!(lines[0].direction, Direction::RecvOnly);
        assert!(lines[0].receives() && !lines[0].sends());
        // The AV1 format has no RTX, and RTX formats repair nothing.
        let av1 = lines[1].formats.iter().find(|f| f.pt == 45).unwrap();
        assert_eq!(av1.rtx, None);
        assert!(scan("v=0\r\n").is_empty());
    }

    // From ingest/src/whip.rs.
    #[test]
    fn sending_kinds() {
        let o = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n";
        assert_eq!(sending(o), (true, true));
        let o = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n";
        assert_eq!(sending(o), (false, true));
        let o = "v=0\r\nm=audio 9 RTP 111\r\na=inactive\r\nm=video 9 RTP 96\r\n";
        assert_eq!(sending(o), (false, true));
        assert_eq!(sending("v=0\r\n"), (false, false));
    }

    #[test]
    fn disabled_lines_and_mids() {
        let answer = "v=0\r\na=sendrecv\r\nm=audio 0 UDP/TLS/RTP/SAVPF 0\r\na=mid:a\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid: v \r\na=inactive\r\n";
        let lines = scan(answer);
        assert!(lines[0].disabled && !lines[1].disabled);
        assert_eq!(lines[1].mid.as_deref(), Some("v"));
        assert_eq!(lines[1].direction, Direction::Inactive);
        assert!(!lines[1].receives() && !lines[1].sends());
        // Session-level direction does not leak into m-lines.
        assert_eq!(lines[0].direction, Direction::SendRecv);
    }

    // From origin/src/model/catalog.rs.
    #[test]
    fn fmtp_lookup() {
        let f = "packetization-mode=1; profile-level-id=42e01f";
        assert_eq!(fmtp_value(f, "profile-level-id"), Some("42e01f"));
        assert_eq!(fmtp_value(f, "PACKETIZATION-MODE"), Some("1"));
        assert_eq!(fmtp_value("a=1", "b"), None);
        assert_eq!(fmtp_value("garbage", "a"), None);
    }

    proptest! {
        // From edge/src/sdp.rs (there together with negotiation).
        #[test]
        fn scan_never_panics(s in "\\PC*") {
            let _ = scan(&s);
        }

        // SDP-shaped lines in any order: the RTX pairing and the direction
        // stay within their m-line.
        #[test]
        fn scans_sdp_like_lines(lines in proptest::collection::vec(
            prop_oneof![
                Just("m=video 9 UDP/TLS/RTP/SAVPF 96 97".to_string()),
                Just("m=audio 0 RTP 111".to_string()),
                Just("m=application 9 UDP/DTLS/SCTP webrtc-datachannel".to_string()),
                "a=rtpmap:[0-9]{1,4} [A-Za-z0-9]{0,5}/[0-9]{0,6}(/[0-9]{0,3})?",
                "a=fmtp:[0-9]{1,4} [a-z=;0-9-]{0,40}",
                "a=mid:[a-z0-9]{0,3}",
                "a=(sendrecv|sendonly|recvonly|inactive)",
            ], 0..30)) {
            let sdp = lines.join("\r\n");
            let scanned = scan(&sdp);
            let m_lines = lines.iter().filter(|l| l.starts_with("m=")).count();
            prop_assert_eq!(scanned.len(), m_lines);
            for m in &scanned {
                prop_assert!(m.receives() || m.sends() || m.direction == Direction::Inactive);
                for f in &m.formats {
                    if let Some(rtx) = f.rtx {
                        prop_assert!(m.formats.iter().any(|g| g.pt == rtx && g.name.eq_ignore_ascii_case("rtx")));
                    }
                }
            }
        }
    }
}
