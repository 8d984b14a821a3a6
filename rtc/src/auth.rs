//! Who may publish or view which stream: the one decision every protocol
//! (WHIP, WHEP, the OvenPlayer WebSocket, RTMP) asks through
//! [`Auth::authorize`]. A token is either a static one (`--publish-token`,
//! `--viewer-token`, compared in constant time) or, with `--token-secret`,
//! a signed JWT (HS256, verified by the `jsonwebtoken` crate) whose claims
//! say which stream (`sub`, or `*` for all) and which action (`act`:
//! `publish` or `view`) it allows until when (`exp`, required). Plain data:
//! the caller passes the time in.

use std::fmt;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// What a client asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a stream (WHIP, RTMP).
    Publish,
    /// Watch a stream (WHEP, WebSocket).
    View,
}

impl Action {
    /// The `act` claim that allows it.
    pub fn claim(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::View => "view",
        }
    }
}

/// Why a token was refused (never says more to the client than "missing or
/// wrong"; the reason is for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token where one is needed.
    Missing,
    /// Neither the static token nor a validly signed JWT.
    Wrong,
    /// A valid JWT whose `exp` has passed.
    Expired,
    /// A valid JWT for another stream.
    OtherStream,
    /// A valid JWT for the other action (a `view` token cannot publish).
    OtherAction,
}

impl Refusal {
    /// Metric/log label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Wrong => "wrong_token",
            Self::Expired => "expired_token",
            Self::OtherStream => "other_stream",
            Self::OtherAction => "other_action",
        }
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    act: String,
    exp: u64,
}

/// The node's token rules. Cloning shares the key.
#[derive(Clone, Default)]
pub struct Auth {
    publish: Option<Arc<str>>,
    view: Option<Arc<str>>,
    secret: Option<Arc<DecodingKey>>,
    /// True when viewing needs a token (`--viewer-token` set).
    view_closed: bool,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Auth")
            .field("publish_token", &self.publish.is_some())
            .field("viewer_token", &self.view.is_some())
            .field("token_secret", &self.secret.is_some())
            .finish()
    }
}

impl Auth {
    /// Publishing needs `publish` (or a publish JWT); viewing is open
    /// unless `view` is set, then it needs `view` (or a view JWT). A JWT is
    /// accepted wherever a static token is, never instead of opening
    /// something that is open.
    pub fn new(publish: Option<&str>, view: Option<&str>, secret: Option<&str>) -> Self {
        Self {
            publish: publish.map(Arc::from),
            view: view.map(Arc::from),
            secret: secret.map(|s| Arc::new(DecodingKey::from_secret(s.as_bytes()))),
            view_closed: view.is_some(),
        }
    }

    /// Whether `action` needs a token at all.
    pub fn required(&self, action: Action) -> bool {
        match action {
            Action::Publish => true,
            Action::View => self.view_closed,
        }
    }

    /// May the holder of `token` do `action` on `stream` at `now_unix`
    /// (seconds since the UNIX epoch)?
    pub fn authorize(
        &self,
        action: Action,
        stream: &str,
        token: Option<&str>,
        now_unix: u64,
    ) -> Result<(), Refusal> {
        if !self.required(action) {
            return Ok(());
        }
        let Some(token) = token else {
            return Err(Refusal::Missing);
        };
        let fixed = match action {
            Action::Publish => &self.publish,
            Action::View => &self.view,
        };
        if fixed
            .as_deref()
            .is_some_and(|f| cascade_media::token::matches(token, f))
        {
            return Ok(());
        }
        let Some(key) = &self.secret else {
            return Err(Refusal::Wrong);
        };
        let claims = verify(key, token)?;
        if claims.exp <= now_unix {
            return Err(Refusal::Expired);
        }
        if claims.act != action.claim() {
            return Err(Refusal::OtherAction);
        }
        if claims.sub != "*" && claims.sub != stream {
            return Err(Refusal::OtherStream);
        }
        Ok(())
    }
}

/// Signature (HS256 only: no `alg` confusion) and claim presence; `exp` is
/// compared by the caller against its own `now`.
fn verify(key: &DecodingKey, token: &str) -> Result<Claims, Refusal> {
    let mut v = Validation::new(Algorithm::HS256);
    v.validate_exp = false;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, key, &v)
        .map(|d| d.claims)
        .map_err(|_| Refusal::Wrong)
}

/// Seconds since the UNIX epoch, for [`Auth::authorize`] callers.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "a-token-secret-of-some-length-000";
    const NOW: u64 = 1_800_000_000;

    fn jwt(secret: &str, alg: Algorithm, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn tok(sub: &str, act: &str, exp: u64) -> String {
        jwt(
            SECRET,
            Algorithm::HS256,
            serde_json::json!({"sub": sub, "act": act, "exp": exp}),
        )
    }

    #[test]
    fn static_tokens_as_before() {
        let a = Auth::new(Some("pub"), None, None);
        assert_eq!(a.authorize(Action::Publish, "s", Some("pub"), NOW), Ok(()));
        assert_eq!(
            a.authorize(Action::Publish, "s", Some("nope"), NOW),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            a.authorize(Action::Publish, "s", None, NOW),
            Err(Refusal::Missing)
        );
        // Open viewing stays open.
        assert_eq!(a.authorize(Action::View, "s", None, NOW), Ok(()));
        let a = Auth::new(Some("pub"), Some("view"), None);
        assert_eq!(a.authorize(Action::View, "s", Some("view"), NOW), Ok(()));
        assert_eq!(
            a.authorize(Action::View, "s", Some("pub"), NOW),
            Err(Refusal::Wrong),
            "the publish token does not view"
        );
    }

    #[test]
    fn signed_tokens_per_stream_and_action() {
        let a = Auth::new(Some("pub"), Some("view"), Some(SECRET));
        let exp = NOW + 60;
        assert_eq!(
            a.authorize(Action::Publish, "a", Some(&tok("a", "publish", exp)), NOW),
            Ok(())
        );
        assert_eq!(
            a.authorize(Action::Publish, "b", Some(&tok("a", "publish", exp)), NOW),
            Err(Refusal::OtherStream)
        );
        assert_eq!(
            a.authorize(Action::Publish, "b", Some(&tok("*", "publish", exp)), NOW),
            Ok(())
        );
        assert_eq!(
            a.authorize(Action::Publish, "a", Some(&tok("a", "view", exp)), NOW),
            Err(Refusal::OtherAction)
        );
        assert_eq!(
            a.authorize(Action::View, "a", Some(&tok("a", "view", exp)), NOW),
            Ok(())
        );
        assert_eq!(
            a.authorize(Action::View, "a", Some(&tok("a", "publish", exp)), NOW),
            Err(Refusal::OtherAction)
        );
        assert_eq!(
            a.authorize(Action::Publish, "a", Some(&tok("a", "publish", NOW)), NOW),
            Err(Refusal::Expired)
        );
        // The static tokens still work beside the secret.
        assert_eq!(a.authorize(Action::Publish, "a", Some("pub"), NOW), Ok(()));
    }

    #[test]
    fn bad_signatures_and_claims_are_wrong() {
        let a = Auth::new(Some("pub"), None, Some(SECRET));
        let exp = NOW + 60;
        let claims = serde_json::json!({"sub": "a", "act": "publish", "exp": exp});
        for (why, t) in [
            (
                "other key",
                jwt("another-secret", Algorithm::HS256, claims.clone()),
            ),
            ("HS512", jwt(SECRET, Algorithm::HS512, claims.clone())),
            (
                "no exp",
                jwt(
                    SECRET,
                    Algorithm::HS256,
                    serde_json::json!({"sub": "a", "act": "publish"}),
                ),
            ),
            (
                "no act",
                jwt(
                    SECRET,
                    Algorithm::HS256,
                    serde_json::json!({"sub": "a", "exp": exp}),
                ),
            ),
            ("garbage", "a.b.c".into()),
            // alg=none with the signature stripped.
            (
                "alg none",
                format!(
                    "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                    tok("a", "publish", exp).split('.').nth(1).unwrap()
                ),
            ),
        ] {
            assert_eq!(
                a.authorize(Action::Publish, "a", Some(&t), NOW),
                Err(Refusal::Wrong),
                "{why}"
            );
        }
        // Without a secret a JWT is just a wrong static token.
        let a = Auth::new(Some("pub"), None, None);
        assert_eq!(
            a.authorize(Action::Publish, "a", Some(&tok("a", "publish", exp)), NOW),
            Err(Refusal::Wrong)
        );
    }

    proptest::proptest! {
        /// Client input never panics the verifier and never passes
        /// without the key: free text and JWT-shaped strings alike.
        #[test]
        fn forged_tokens_never_pass(
            free in ".{0,200}",
            h in "[A-Za-z0-9_-]{0,60}",
            p in "[A-Za-z0-9_-]{0,120}",
            sig in "[A-Za-z0-9_-]{0,60}",
            stream in "[a-z]{1,8}",
        ) {
            let a = Auth::new(Some("a-static-publish-token-of-32-char"), Some("a-static-viewer-token-of-32-chars"), Some(SECRET));
            for t in [free, format!("{h}.{p}.{sig}")] {
                for act in [Action::Publish, Action::View] {
                    proptest::prop_assert!(a.authorize(act, &stream, Some(&t), NOW).is_err());
                }
            }
        }
    }
}
