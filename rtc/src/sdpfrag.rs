//! Trickle ICE SDP fragments (RFC 8840) as PATCH bodies carry them.

/// The parts of a fragment cascade acts on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Frag {
    /// `a=ice-ufrag` when the client restarts ICE.
    pub ice_ufrag: Option<String>,
    /// `a=ice-pwd` with it.
    pub ice_pwd: Option<String>,
    /// `candidate:…` values (without the `a=` prefix).
    pub candidates: Vec<String>,
}

/// Candidates accepted in one fragment; browsers trickle a handful.
const MAX_CANDIDATES: usize = 64;

impl Frag {
    /// Parses a fragment leniently: unknown lines are ignored.
    pub fn parse(s: &str) -> Self {
        let mut f = Self::default();
        for line in s.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
                f.ice_ufrag = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
                f.ice_pwd = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("a=") {
                if v.starts_with("candidate:") && f.candidates.len() < MAX_CANDIDATES {
                    f.candidates.push(v.to_string());
                }
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trickle() {
        let f = Frag::parse(
            "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\na=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\na=end-of-candidates\r\n",
        );
        assert_eq!(f.ice_ufrag.as_deref(), Some("EsAw"));
        assert_eq!(f.candidates.len(), 1);
        assert!(f.candidates[0].starts_with("candidate:1387637174"));
    }
}
