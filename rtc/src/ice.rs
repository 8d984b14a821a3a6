//! STUN/TURN servers offered to clients (`Link: rel="ice-server"` on WHIP
//! and WHEP answers, `ice_servers` in OvenPlayer offers), with TURN
//! credentials minted per answer in coturn's REST scheme (`use-auth-secret`):
//! username `expiry:random`, credential `base64(HMAC-SHA1(secret, username))`.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// TURN credentials live this long unless configured otherwise: long enough
/// for a viewing session to restart ICE with them, short enough that a
/// leaked credential soon stops working.
pub const DEFAULT_TURN_TTL: Duration = Duration::from_secs(24 * 3600);

/// A bad `--ice-servers` entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad ice server {0:?}: use stun:HOST[:PORT], stuns:, turn:HOST[:PORT][?transport=udp|tcp] or turns:")]
pub struct BadUrl(pub String);

/// One ICE server URL (RFC 7064/7065), validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url(String);

impl Url {
    /// Parses `stun:`, `stuns:`, `turn:` or `turns:` followed by a host
    /// (and optional port / `?transport=`). Text that would break a `Link`
    /// header or JSON (spaces, quotes, `<>`, `,`, `;`) is refused.
    pub fn parse(s: &str) -> Result<Self, BadUrl> {
        let s = s.trim();
        let bad = || BadUrl(s.to_string());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") {
            return Err(bad());
        }
        let host = rest.split(['?', ':']).next().unwrap_or("");
        if host.is_empty() && !rest.starts_with('[') {
            return Err(bad());
        }
        if s.len() > 256
            || s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || "\"<>,;\\".contains(c))
        {
            return Err(bad());
        }
        Ok(Self(s.to_string()))
    }

    /// The URL text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `turn:` and `turns:` (these need credentials).
    pub fn is_turn(&self) -> bool {
        self.0.starts_with("turn")
    }
}

/// One entry as clients consume it (W3C `RTCIceServer`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// The URL.
    pub urls: String,
    /// TURN username, when it is a TURN server with a secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The ICE servers of a node.
#[derive(Clone, Debug, Default)]
pub struct IceServers {
    /// STUN/TURN URLs, in the order clients should try them.
    pub urls: Vec<Url>,
    /// coturn `static-auth-secret`: TURN entries get time-limited
    /// credentials derived from it. Without it TURN URLs go out bare.
    pub turn_secret: Option<String>,
    /// Lifetime of minted TURN credentials ([`DEFAULT_TURN_TTL`] when zero).
    pub turn_ttl: Duration,
}

impl IceServers {
    /// True when nothing is configured (then no `Link` header and no
    /// `ice_servers` key: OvenPlayer forces relay as soon as the key exists).
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// The entries for a client asking at `now_unix` (seconds since 1970);
    /// one fresh TURN credential shared by every TURN entry of the answer.
    pub fn entries(&self, now_unix: u64) -> Vec<Entry> {
        let creds = match &self.turn_secret {
            Some(secret) if self.urls.iter().any(Url::is_turn) => {
                let ttl = if self.turn_ttl.is_zero() {
                    DEFAULT_TURN_TTL
                } else {
                    self.turn_ttl
                };
                Some(turn_credentials(
                    secret,
                    now_unix.saturating_add(ttl.as_secs()),
                    &random_user(),
                ))
            }
            _ => None,
        };
        self.urls
            .iter()
            .map(|u| {
                let (username, credential) = match (&creds, u.is_turn()) {
                    (Some((n, c)), true) => (Some(n.clone()), Some(c.clone())),
                    _ => (None, None),
                };
                Entry {
                    urls: u.as_str().to_string(),
                    username,
                    credential,
                }
            })
            .collect()
    }

    /// `Link` header values (RFC 9725 §4.6) for a client asking at `now_unix`.
    pub fn links(&self, now_unix: u64) -> Vec<String> {
        self.entries(now_unix).iter().map(link).collect()
    }
}

/// One `Link: <url>; rel="ice-server"` value, with TURN credentials as
/// RFC 9725 §4.6 spells them.
pub fn link(e: &Entry) -> String {
    let mut s = format!("<{}>; rel=\"ice-server\"", e.urls);
    if let (Some(u), Some(c)) = (&e.username, &e.credential) {
        s.push_str(&format!(
            "; username=\"{u}\"; credential=\"{c}\"; credential-type=\"password\""
        ));
    }
    s
}

/// coturn REST credentials valid until `expiry_unix` for `user`:
/// (`"{expiry}:{user}"`, base64 HMAC-SHA1 of it keyed with the secret).
pub fn turn_credentials(secret: &str, expiry_unix: u64, user: &str) -> (String, String) {
    let username = format!("{expiry_unix}:{user}");
    // invariant: HMAC accepts keys of any length.
    #[allow(clippy::unwrap_used)]
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    let credential = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, credential)
}

fn random_user() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Seconds since 1970 now (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "stun:stun.l.google.com:19302",
            "turn:198.18.0.1:3478?transport=udp",
            "turns:t.example",
            "stun:[::1]:3478",
        ] {
            assert!(Url::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://x",
            "stun:",
            "turn:a b",
            "stun:a\"b",
            "stun:a>",
            "x",
            "turn:a,b",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        assert!(Url::parse("turn:x").unwrap().is_turn());
        assert!(!Url::parse("stun:x").unwrap().is_turn());
    }

    proptest::proptest! {
        #[test]
        fn url_parse_never_panics(s in ".{0,300}") {
            if let Ok(u) = Url::parse(&s) {
                // Whatever passes is safe inside a Link header and JSON.
                proptest::prop_assert!(!u.as_str().contains(['"', '<', '>', ',', ';', ' ']));
            }
        }
    }

    #[test]
    fn coturn_rest_credentials() {
        // Reference value computed with: printf '1700000000:alice' |
        // openssl dgst -sha1 -hmac secret -binary | base64
        let (u, c) = turn_credentials("secret", 1_700_000_000, "alice");
        assert_eq!(u, "1700000000:alice");
        assert_eq!(c, "d8soP47RbdIKLDUOpnJPVQyq5Ts=");
    }

    #[test]
    fn links_carry_turn_credentials_only_for_turn() {
        let s = IceServers {
            urls: vec![
                Url::parse("stun:s:3478").unwrap(),
                Url::parse("turn:t:3478?transport=udp").unwrap(),
            ],
            turn_secret: Some("k".into()),
            turn_ttl: Duration::from_secs(60),
        };
        let l = s.links(1000);
        assert_eq!(l[0], "<stun:s:3478>; rel=\"ice-server\"");
        assert!(
            l[1].starts_with("<turn:t:3478?transport=udp>; rel=\"ice-server\"; username=\"1060:")
        );
        assert!(l[1].ends_with("credential-type=\"password\""));
        let e = s.entries(1000);
        let json = serde_json::to_string(&e[0]).unwrap();
        assert_eq!(json, r#"{"urls":"stun:s:3478"}"#);
        assert!(IceServers::default().links(0).is_empty());
    }
}
