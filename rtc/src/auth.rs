//! Who may publish or view which stream: the one decision every protocol
//! (WHIP, WHEP, the OvenPlayer WebSocket, RTMP) asks through
//! [`Auth::authorize`]. A token is either a static one (`--publish-token`,
//! `--viewer-token`, compared in constant time) or, with `--token-secret`,
//! a signed JWT (HS256, verified by the `jsonwebtoken` crate) whose claims
//! say which stream (`sub`, or `*` for all) and which action (`act`:
//! `publish` or `view`) it allows until when (`exp`, required). Plain data:
//! the caller passes the time in.
//!
//! With `--auth-webhook` ([`crate::webhook`]) a token the built-in rules
//! allow is still admitted without a call (the operator's own tools keep
//! working while the auth service is down); every other publish and every
//! other view — viewing closes even without `--viewer-token` — is decided
//! by the webhook: [`Auth::check`] says whether to ask, [`Auth::decide`]
//! asks.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::webhook::{Busy, Outcome, Query, Webhook};

/// What a client asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// `--auth-webhook`: decides what the built-in rules do not allow.
    webhook: Option<Webhook>,
}

/// What the built-in rules say about a request ([`Auth::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Allowed (a right token, or nothing needed).
    Allow,
    /// Refused; no webhook to ask.
    Refuse(Refusal),
    /// Not allowed by the built-in rules: the webhook decides.
    Ask,
}

/// Why [`Auth::decide`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Refused like a wrong token (401, counted toward the wrong-token
    /// limit); the label says why, for metrics and logs.
    Refused(&'static str),
    /// The webhook's calls in flight are at their cap: retry later (503,
    /// not counted).
    Busy,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Auth")
            .field("publish_token", &self.publish.is_some())
            .field("viewer_token", &self.view.is_some())
            .field("token_secret", &self.secret.is_some())
            .field("webhook", &self.webhook)
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
            webhook: None,
        }
    }

    /// These rules, with `webhook` deciding what they do not allow; a
    /// webhook closes viewing (it decides every view without a right token).
    pub fn with_webhook(mut self, webhook: Option<Webhook>) -> Self {
        self.view_closed |= webhook.is_some();
        self.webhook = webhook;
        self
    }

    /// The webhook, when one is set.
    pub fn webhook(&self) -> Option<&Webhook> {
        self.webhook.as_ref()
    }

    /// Whether `action` needs a token (or the webhook's consent) at all.
    pub fn required(&self, action: Action) -> bool {
        match action {
            Action::Publish => true,
            Action::View => self.view_closed,
        }
    }

    /// The built-in rules on a request, and whether the webhook must be
    /// asked. Without a webhook this is [`Auth::authorize`].
    pub fn check(&self, action: Action, stream: &str, token: Option<&str>, now_unix: u64) -> Check {
        match (
            self.authorize(action, stream, token, now_unix),
            &self.webhook,
        ) {
            (Ok(()), _) => Check::Allow,
            (Err(why), None) => Check::Refuse(why),
            (Err(_), Some(_)) => Check::Ask,
        }
    }

    /// The full decision on `action` for a client at `remote_addr` over
    /// `protocol`: the built-in rules, then (when they do not allow it and
    /// a webhook is set) the webhook's answer. Never takes longer than the
    /// webhook's timeout.
    pub async fn decide(
        &self,
        action: Action,
        stream: &str,
        protocol: &'static str,
        remote_addr: SocketAddr,
        token: Option<&str>,
        now_unix: u64,
    ) -> Result<(), Denied> {
        let webhook = match self.check(action, stream, token, now_unix) {
            Check::Allow => return Ok(()),
            Check::Refuse(why) => return Err(Denied::Refused(why.label())),
            Check::Ask => match &self.webhook {
                Some(w) => w,
                // `check` asks only when there is a webhook.
                None => return Err(Denied::Refused(Refusal::Wrong.label())),
            },
        };
        let query = Query {
            action,
            stream: stream.to_string(),
            protocol,
            remote_addr,
            token: token.map(str::to_string),
        };
        match webhook.ask(&query).await {
            Ok(Outcome::Allow) => Ok(()),
            Ok(Outcome::Deny) => Err(Denied::Refused("webhook_deny")),
            Ok(Outcome::Error) => Err(Denied::Refused("webhook_error")),
            Ok(Outcome::Timeout) => Err(Denied::Refused("webhook_timeout")),
            Err(Busy) => Err(Denied::Busy),
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

    #[test]
    fn a_webhook_decides_what_tokens_do_not_allow() {
        let hook = Webhook::new("http://127.0.0.1:9/auth").unwrap();
        let a = Auth::new(Some("pub"), None, Some(SECRET)).with_webhook(Some(hook));
        let exp = NOW + 60;
        // The operator's tokens: no call.
        assert_eq!(
            a.check(Action::Publish, "s", Some("pub"), NOW),
            Check::Allow
        );
        assert_eq!(
            a.check(Action::Publish, "s", Some(&tok("s", "publish", exp)), NOW),
            Check::Allow
        );
        assert_eq!(
            a.check(Action::View, "s", Some(&tok("s", "view", exp)), NOW),
            Check::Allow
        );
        // Everything else, views included (no viewer token is set).
        assert!(a.required(Action::View), "a webhook closes viewing");
        for (act, t) in [
            (Action::Publish, None),
            (Action::Publish, Some("other")),
            (Action::View, None),
            (Action::View, Some("pub")),
        ] {
            assert_eq!(a.check(act, "s", t, NOW), Check::Ask, "{act:?} {t:?}");
        }
        // Without a webhook nothing changes.
        let a = Auth::new(Some("pub"), None, None).with_webhook(None);
        assert!(!a.required(Action::View));
        assert_eq!(a.check(Action::View, "s", None, NOW), Check::Allow);
        assert_eq!(
            a.check(Action::Publish, "s", Some("x"), NOW),
            Check::Refuse(Refusal::Wrong)
        );
    }

    #[tokio::test]
    async fn decide_refuses_when_the_webhook_cannot_be_reached() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hook = Webhook::new(&format!("http://127.0.0.1:{port}/")).unwrap();
        let a = Auth::new(Some("pub"), None, None).with_webhook(Some(hook));
        let from = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert_eq!(
            a.decide(Action::Publish, "s", "whip", from, Some("x"), NOW)
                .await,
            Err(Denied::Refused("webhook_error"))
        );
        assert_eq!(
            a.decide(Action::Publish, "s", "whip", from, Some("pub"), NOW)
                .await,
            Ok(()),
            "the publish token needs no webhook"
        );
        let plain = Auth::new(Some("pub"), None, None);
        assert_eq!(
            plain
                .decide(Action::Publish, "s", "whip", from, None, NOW)
                .await,
            Err(Denied::Refused("missing_token"))
        );
        assert_eq!(
            plain
                .decide(Action::View, "s", "whep", from, None, NOW)
                .await,
            Ok(())
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
