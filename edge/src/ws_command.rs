//! What an OvenPlayer client may say once its session runs (after the
//! answer), parsed without I/O: every text frame becomes one [`Command`],
//! malformed or unknown input becomes [`Command::Ignored`] — never a panic,
//! never unbounded work. The shell (`ws.rs`) acts on the result.
//!
//! Bounds: a frame is at most 64 KiB (refused by the WebSocket layer before
//! this); at most [`MAX_CANDIDATES_PER_COMMAND`] candidates of one
//! `candidate` command are parsed (the per-session cap applies on top);
//! a rendition name longer than [`MAX_RENDITION_NAME`] is ignored.

use serde_json::Value;
use str0m::Candidate;

/// Candidates looked at in one `candidate` command; the rest of its array
/// is not parsed at all.
pub(crate) const MAX_CANDIDATES_PER_COMMAND: usize = 32;
/// Longer rendition names cannot exist (stream-name alphabet, 64).
pub(crate) const MAX_RENDITION_NAME: usize = 64;

/// One client command.
#[derive(Debug, PartialEq)]
pub(crate) enum Command {
    /// `{"command":"stop"}`: end the session.
    Stop,
    /// `{"command":"ping"}`: answer `pong`.
    Ping,
    /// `{"command":"candidate","candidates":[{"candidate":"…"},…]}`: the
    /// ones that parse, at most [`MAX_CANDIDATES_PER_COMMAND`].
    Candidates(Vec<Candidate>),
    /// `{"command":"change_rendition", …}`: OvenPlayer's quality menu.
    ChangeRendition(Choice),
    /// Anything else: not JSON, no `command`, unknown command, bad fields.
    Ignored,
}

/// What a `change_rendition` asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// `"rendition_name": NAME`.
    Named(String),
    /// `"auto": true` (or nothing usable).
    Auto,
    /// `"auto": false` without a name: stay on what is sent now.
    Hold,
}

/// Parses one text frame.
pub(crate) fn parse(text: &str) -> Command {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Command::Ignored;
    };
    match v.get("command").and_then(Value::as_str) {
        Some("stop") => Command::Stop,
        Some("ping") => Command::Ping,
        Some("candidate") => Command::Candidates(candidates(&v)),
        Some("change_rendition") => change_rendition(&v),
        _ => Command::Ignored,
    }
}

fn candidates(v: &Value) -> Vec<Candidate> {
    v.get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(MAX_CANDIDATES_PER_COMMAND)
        .filter_map(|c| {
            let line = c.get("candidate").and_then(Value::as_str)?;
            Candidate::from_sdp_string(line.strip_prefix("a=").unwrap_or(line)).ok()
        })
        .collect()
}

fn change_rendition(v: &Value) -> Command {
    if let Some(name) = v.get("rendition_name").and_then(Value::as_str) {
        if name.is_empty() || name.len() > MAX_RENDITION_NAME {
            return Command::Ignored;
        }
        return Command::ChangeRendition(Choice::Named(name.to_string()));
    }
    if v.get("auto").and_then(Value::as_bool) == Some(false) {
        return Command::ChangeRendition(Choice::Hold);
    }
    Command::ChangeRendition(Choice::Auto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CANDIDATE: &str = "candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host";

    #[test]
    fn the_commands_ovenplayer_sends() {
        assert_eq!(parse(r#"{"command":"stop","id":1}"#), Command::Stop);
        assert_eq!(parse(r#"{"command":"ping"}"#), Command::Ping);
        let c = format!(
            r#"{{"command":"candidate","id":1,"candidates":[{{"candidate":"a={CANDIDATE}","sdpMLineIndex":0}},{{"candidate":"garbage"}},{{"x":1}}]}}"#
        );
        match parse(&c) {
            Command::Candidates(v) => assert_eq!(v.len(), 1),
            o => panic!("{o:?}"),
        }
        assert_eq!(
            parse(r#"{"command":"change_rendition","id":1,"rendition_name":"720p"}"#),
            Command::ChangeRendition(Choice::Named("720p".into()))
        );
        assert_eq!(
            parse(r#"{"command":"change_rendition","id":1,"auto":true}"#),
            Command::ChangeRendition(Choice::Auto)
        );
        assert_eq!(
            parse(r#"{"command":"change_rendition","id":1,"auto":false}"#),
            Command::ChangeRendition(Choice::Hold)
        );
    }

    #[test]
    fn bad_input_is_ignored() {
        for t in [
            "",
            "not json",
            "[]",
            "42",
            r#"{"command":7}"#,
            r#"{"command":"offer"}"#,
            r#"{"cmd":"stop"}"#,
            r#"{"command":"candidate","candidates":"x"}"#,
        ] {
            assert!(
                matches!(parse(t), Command::Ignored | Command::Candidates(_)),
                "{t}"
            );
        }
        let long = "x".repeat(MAX_RENDITION_NAME + 1);
        let t = format!(r#"{{"command":"change_rendition","rendition_name":"{long}"}}"#);
        assert_eq!(parse(&t), Command::Ignored);
    }

    #[test]
    fn a_candidate_flood_in_one_command_is_cut_before_parsing() {
        let one = format!(r#"{{"candidate":"{CANDIDATE}"}}"#);
        let many = vec![one; 1000].join(",");
        let t = format!(r#"{{"command":"candidate","candidates":[{many}]}}"#);
        match parse(&t) {
            Command::Candidates(v) => assert_eq!(v.len(), MAX_CANDIDATES_PER_COMMAND),
            o => panic!("{o:?}"),
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,512}") {
            let _ = parse(&s);
        }

        #[test]
        fn json_shaped_commands_never_panic_and_stay_bounded(
            cmd in "(stop|ping|candidate|change_rendition|offer|answer|[a-z_]{0,12})",
            fields in proptest::collection::vec(
                ("(candidates|candidate|rendition_name|auto|id|sdpMLineIndex|[a-z]{1,6})",
                 "(\"[^\"\\\\]{0,80}\"|[0-9]{1,20}|true|false|null|\\[\\]|\\{\\}|\\[\\{\"candidate\":\"[ -~&&[^\"\\\\]]{0,90}\"\\}\\])"),
                0..6),
        ) {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let text = format!("{{\"command\":\"{cmd}\"{}{}}}", if body.is_empty() { "" } else { "," }, body.join(","));
            match parse(&text) {
                Command::Candidates(v) => prop_assert!(v.len() <= MAX_CANDIDATES_PER_COMMAND),
                Command::ChangeRendition(Choice::Named(n)) => {
                    prop_assert!(!n.is_empty() && n.len() <= MAX_RENDITION_NAME)
                }
                _ => {}
            }
        }
    }
}
