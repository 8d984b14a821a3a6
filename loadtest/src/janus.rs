//! Janus streaming-plugin signalling over its HTTP REST API, so the same viewers can watch a
//! Janus mountpoint side by side with a cascade edge: create a session, attach
//! `janus.plugin.streaming`, `watch` (Janus makes the offer), `start` with our answer.
//!
//! Only what a viewer needs; the event long-poll takes the first event carrying a JSEP.

use std::time::{Duration, Instant};

use reqwest::Url;
use serde_json::{json, Value};

use crate::{Error, Result};

/// How long to wait for the plugin's offer (Janus answers `watch` with an ack first).
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// A viewer's Janus session: where to send its answer and how to end it.
#[derive(Debug, Clone)]
pub struct Watch {
    /// `{base}/{session}`: long-poll and `destroy` go here.
    pub session: Url,
    /// `{base}/{session}/{handle}`: plugin messages go here.
    pub handle: Url,
    /// Janus's SDP offer.
    pub offer: String,
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn post(client: &reqwest::Client, url: &Url, body: Value) -> Result<Value> {
    let r = client.post(url.clone()).json(&body).send().await?;
    let status = r.status().as_u16();
    let v: Value = r.json().await?;
    if status != 200 || v["janus"] == "error" {
        return Err(Error::Status {
            status,
            body: v["error"].to_string(),
        });
    }
    Ok(v)
}

fn id(v: &Value) -> Result<u64> {
    v["data"]["id"]
        .as_u64()
        .ok_or_else(|| Error::BadAnswer(format!("janus: no id in {v}")))
}

fn join(base: &Url, part: u64) -> Result<Url> {
    let s = format!("{}/{part}", base.as_str().trim_end_matches('/'));
    Url::parse(&s).map_err(|e| Error::BadAnswer(format!("janus url {s}: {e}")))
}

/// Creates a session on the Janus API at `base` (`http://HOST:8088/janus`), attaches the
/// streaming plugin and asks to watch `mountpoint`; returns Janus's offer.
pub async fn watch(client: &reqwest::Client, base: &str, mountpoint: u64) -> Result<Watch> {
    let base = Url::parse(base).map_err(|e| Error::BadAnswer(format!("janus url: {e}")))?;
    let created = post(
        client,
        &base,
        json!({"janus": "create", "transaction": transaction()}),
    )
    .await?;
    let session = join(&base, id(&created)?)?;
    let attached = post(
        client,
        &session,
        json!({"janus": "attach", "plugin": "janus.plugin.streaming", "transaction": transaction()}),
    )
    .await?;
    let handle = join(&session, id(&attached)?)?;
    post(
        client,
        &handle,
        json!({"janus": "message", "transaction": transaction(),
               "body": {"request": "watch", "id": mountpoint}}),
    )
    .await?;
    let deadline = Instant::now() + OFFER_TIMEOUT;
    loop {
        if Instant::now() >= deadline {
            return Err(Error::Timeout("janus offer"));
        }
        let mut poll = session.clone();
        poll.set_query(Some("maxev=1"));
        let v: Value = client.get(poll).send().await?.json().await?;
        if let Some(sdp) = v["jsep"]["sdp"].as_str() {
            return Ok(Watch {
                session,
                handle,
                offer: sdp.to_string(),
            });
        }
        if v["plugindata"]["data"]["error"].is_string() {
            return Err(Error::Status {
                status: 200,
                body: v["plugindata"]["data"]["error"].to_string(),
            });
        }
    }
}

/// Sends our answer with `start`: Janus then runs ICE/DTLS and streams.
pub async fn start(client: &reqwest::Client, w: &Watch, answer: &str) -> Result<()> {
    post(
        client,
        &w.handle,
        json!({"janus": "message", "transaction": transaction(),
               "body": {"request": "start"},
               "jsep": {"type": "answer", "sdp": answer}}),
    )
    .await?;
    Ok(())
}

/// Ends the Janus session (frees the viewer on the server). Returns 200 when Janus agreed.
pub async fn destroy(client: &reqwest::Client, session: &Url) -> Result<u16> {
    post(
        client,
        session,
        json!({"janus": "destroy", "transaction": transaction()}),
    )
    .await?;
    Ok(200)
}

/// The `a=mid` of the first `m=video` and `m=audio` sections of an SDP.
pub fn mids(sdp: &str) -> (Option<String>, Option<String>) {
    let (mut video, mut audio) = (None, None);
    let mut kind = "";
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            kind = if m.starts_with("video") {
                "video"
            } else if m.starts_with("audio") {
                "audio"
            } else {
                ""
            };
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            let mid = Some(mid.trim().to_string());
            match kind {
                "video" if video.is_none() => video = mid,
                "audio" if audio.is_none() => audio = mid,
                _ => {}
            }
        }
    }
    (video, audio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mids_by_kind() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:v\r\n";
        assert_eq!(mids(sdp), (Some("v".into()), Some("a".into())));
        assert_eq!(mids("v=0\r\n"), (None, None));
    }
}
