//! Trickle ICE SDP fragments (RFC 8840) as PATCH bodies carry them, and the
//! fragment cascade answers an ICE restart with (RFC 9725 §4.4.2).

/// The parts of a fragment cascade acts on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Frag {
    /// `a=ice-ufrag`: the client's current ufrag (trickle) or a new one
    /// (ICE restart).
    pub ice_ufrag: Option<String>,
    /// `a=ice-pwd` with it.
    pub ice_pwd: Option<String>,
    /// The first `m=` line, echoed in a restart answer.
    pub media: Option<String>,
    /// The first `a=mid` value.
    pub mid: Option<String>,
    /// `candidate:…` values (without the `a=` prefix).
    pub candidates: Vec<String>,
}

/// Candidates accepted in one fragment; browsers trickle a handful.
const MAX_CANDIDATES: usize = 64;
/// Longest ufrag/pwd/mid/m-line kept; RFC 8839 caps ufrag at 256 and pwd at
/// 256 characters, a sane m-line is far shorter.
const MAX_VALUE: usize = 256;

fn value(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty() && v.len() <= MAX_VALUE).then(|| v.to_string())
}

impl Frag {
    /// Parses a fragment leniently: unknown lines are ignored.
    pub fn parse(s: &str) -> Self {
        let mut f = Self::default();
        for line in s.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
                f.ice_ufrag = value(v);
            } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
                f.ice_pwd = value(v);
            } else if line.starts_with("m=") {
                if f.media.is_none() {
                    f.media = value(line);
                }
            } else if let Some(v) = line.strip_prefix("a=mid:") {
                if f.mid.is_none() {
                    f.mid = value(v);
                }
            } else if let Some(v) = line.strip_prefix("a=") {
                if v.starts_with("candidate:") && f.candidates.len() < MAX_CANDIDATES {
                    f.candidates.push(v.to_string());
                }
            }
        }
        f
    }
}

/// The `200` body of an ICE restart: our new credentials and, under the
/// client's first m-line and mid when it sent them, our candidates.
pub fn restart_answer(
    ufrag: &str,
    pwd: &str,
    media: Option<&str>,
    mid: Option<&str>,
    candidates: &[String],
) -> String {
    let mut s = format!("a=ice-lite\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n");
    if let (Some(m), Some(mid)) = (media, mid) {
        s.push_str(&format!("{m}\r\na=mid:{mid}\r\n"));
        for c in candidates {
            s.push_str(&format!("a={c}\r\n"));
        }
        s.push_str("a=end-of-candidates\r\n");
    }
    s
}

/// The ICE ufrag of an SDP offer (session or first media level).
pub fn offer_ufrag(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .and_then(value)
}

/// Removes the `ufrag` extension from `a=candidate` lines of an answer: a
/// client restarting ICE usually patches only `a=ice-ufrag`/`a=ice-pwd` in
/// the answer it keeps, and candidates still naming the old ufrag would then
/// be dropped as stale (str0m and browsers check it).
pub fn strip_candidate_ufrag(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        if !line.starts_with("a=candidate:") {
            out.push_str(line);
            continue;
        }
        let body = line.trim_end_matches(['\r', '\n']);
        let mut words = body.split(' ').peekable();
        let mut kept: Vec<&str> = Vec::new();
        while let Some(w) = words.next() {
            if w == "ufrag" && kept.len() >= 8 {
                words.next();
                continue;
            }
            kept.push(w);
        }
        out.push_str(&kept.join(" "));
        out.push_str(&line[body.len()..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_trickle() {
        let f = Frag::parse(
            "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\na=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\na=end-of-candidates\r\n",
        );
        assert_eq!(f.ice_ufrag.as_deref(), Some("EsAw"));
        assert_eq!(f.media.as_deref(), Some("m=audio 9 RTP/AVP 0"));
        assert_eq!(f.mid.as_deref(), Some("0"));
        assert_eq!(f.candidates.len(), 1);
        assert!(f.candidates[0].starts_with("candidate:1387637174"));
    }

    #[test]
    fn answer_shape() {
        let a = restart_answer(
            "u",
            "p",
            Some("m=audio 9 UDP/TLS/RTP/SAVPF 0"),
            Some("0"),
            &["candidate:1 1 udp 1 1.2.3.4 5 typ host".into()],
        );
        assert_eq!(
            a,
            "a=ice-lite\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=candidate:1 1 udp 1 1.2.3.4 5 typ host\r\na=end-of-candidates\r\n"
        );
        assert_eq!(
            restart_answer("u", "p", None, None, &[]),
            "a=ice-lite\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\n"
        );
        assert_eq!(
            offer_ufrag("v=0\r\nm=video 9\r\na=ice-ufrag:abc\r\n").as_deref(),
            Some("abc")
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,2000}") {
            let f = Frag::parse(&s);
            prop_assert!(f.candidates.len() <= MAX_CANDIDATES);
            prop_assert!(f.ice_ufrag.as_ref().is_none_or(|u| u.len() <= MAX_VALUE));
            let _ = offer_ufrag(&s);
            let _ = strip_candidate_ufrag(&s);
        }
    }
}
