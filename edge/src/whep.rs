//! WHEP: a viewer's offer becomes a str0m session (RTP mode) in a shard of
//! the node's [`cascade_rtc::Server`], sending the stream's tracks from the
//! node's fan-out.
//!
//! Create: viewer slot (503) → subscribe (404, may fetch from the origin) →
//! parse the offer (400) → pick codecs against the catalog (406) → build the
//! `Rtc` with only those payload types → accept → hand to a shard.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use cascade_origin::catalog::Codec;
use cascade_origin::Registry;
use cascade_rtc::auth::{unix_now, Action, Auth, Check, Denied};
use cascade_rtc::http::{
    denied, ApiError, AuthorizeFuture, CreateFuture, Created, Endpoint, Events, LAYER_REL, SSE_REL,
};
use cascade_rtc::SessionId;
use str0m::change::SdpOffer;
use str0m::format::{Codec as RtcCodec, FormatParams};
use str0m::media::{Frequency, Mid, Pt};
use str0m::rtp::{Extension, ExtensionMap};

use crate::fanout::Hub;
use crate::metrics as m;
use crate::sdp::{self, Refusal};
use crate::viewer::control::{Control, Controls};
use crate::viewer::switch::Target;
use crate::viewer::{rtx_ratio_cap, Slot, Viewer, RTX_CACHE_AGE, RTX_CACHE_PACKETS};
use crate::Config;

/// The WHEP endpoint of a node.
pub struct Whep {
    pub(crate) registry: Arc<Registry>,
    pub(crate) rtc: cascade_rtc::Server,
    pub(crate) cfg: Config,
    /// Viewer token and signed tokens, from `cfg`.
    pub(crate) auth: Auth,
    hub: Arc<Hub>,
    // Shared with OvenPlayer sessions (`ws`): one viewer limit per node.
    pub(crate) viewers: Arc<AtomicUsize>,
    /// Rendition controls of live viewers, for the layer endpoint.
    pub(crate) controls: Arc<Controls>,
}

impl Whep {
    /// A WHEP endpoint serving `registry`'s streams through `rtc`.
    pub fn new(registry: Arc<Registry>, rtc: cascade_rtc::Server, cfg: Config) -> Self {
        Self {
            registry,
            rtc,
            hub: Arc::new(Hub::new(cfg.bframe_ts)),
            auth: Auth::new(
                None,
                cfg.viewer_token.as_deref(),
                cfg.token_secret.as_deref(),
            )
            .with_webhook(cfg.auth_webhook.clone()),
            cfg,
            viewers: Arc::new(AtomicUsize::new(0)),
            controls: Arc::default(),
        }
    }

    /// Viewers on this node (all streams).
    pub fn viewers(&self) -> usize {
        self.viewers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fan-out hub (feeds running on this node).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

/// The RTP header extensions a viewer session negotiates: only the MID
/// (receivers map packets to transceivers with it). Transport-wide
/// congestion control only where the edge estimates (viewers of streams
/// with renditions: `cascade_rtc::bwe::enable` adds it), because TWCC
/// feedback every ~50 ms per viewer is a fifth of a viewer's cost (DESIGN.md).
/// The id is Chrome's; str0m answers with the offerer's id anyway.
pub(crate) fn viewer_extensions() -> ExtensionMap {
    let mut map = ExtensionMap::empty();
    map.set(4, Extension::RtpMid);
    map
}

/// What a viewer refused for its token is told over WHEP.
const VIEW_UNAUTHORIZED: &str =
    "missing or wrong viewer token: send Authorization: Bearer TOKEN or ?token=TOKEN";

impl Whep {
    /// The full view decision for a client at `remote` over `protocol`
    /// (`whep`, `ws`): built-in tokens, then the auth webhook. With a
    /// webhook to ask, a bad stream name is refused (400) before it is
    /// asked.
    pub(crate) async fn decide_view(
        &self,
        stream: &str,
        protocol: &'static str,
        remote: std::net::SocketAddr,
        token: Option<&str>,
        unauthorized: &'static str,
    ) -> Result<(), ApiError> {
        let now = unix_now();
        if self.auth.check(Action::View, stream, token, now) == Check::Ask
            && !cascade_origin::valid_stream_name(stream)
        {
            return Err(ApiError::BadRequest(cascade_origin::BAD_STREAM_NAME.into()));
        }
        self.auth
            .decide(Action::View, stream, protocol, remote, token, now)
            .await
            .map_err(|d| {
                if let Denied::Refused(reason) = d {
                    tracing::debug!(reason, protocol, "view refused");
                }
                denied(d, unauthorized)
            })
    }
}

fn offer_result(result: &'static str) {
    metrics::counter!(m::OFFERS, "result" => result).increment(1);
}

fn rtc_codec(c: Codec) -> RtcCodec {
    match c {
        Codec::H264 => RtcCodec::H264,
        Codec::H265 => RtcCodec::H265,
        Codec::Vp8 => RtcCodec::Vp8,
        Codec::Vp9 => RtcCodec::Vp9,
        Codec::Av1 => RtcCodec::Av1,
        Codec::Opus => RtcCodec::Opus,
    }
}

impl Endpoint for Whep {
    fn kind(&self) -> &'static str {
        "whep"
    }

    fn authorize(&self, stream: &str, token: Option<&str>) -> Result<(), ApiError> {
        match self.auth.authorize(Action::View, stream, token, unix_now()) {
            Err(why) => {
                tracing::debug!(reason = why.label(), "whep view refused");
                offer_result("unauthorized");
                Err(ApiError::Unauthorized(VIEW_UNAUTHORIZED))
            }
            _ => Ok(()),
        }
    }

    fn authorize_from<'a>(
        &'a self,
        stream: &'a str,
        token: Option<&'a str>,
        remote: std::net::SocketAddr,
    ) -> AuthorizeFuture<'a> {
        Box::pin(async move {
            let r = self
                .decide_view(stream, "whep", remote, token, VIEW_UNAUTHORIZED)
                .await;
            if let Err(e) = &r {
                offer_result(match e {
                    ApiError::Unauthorized(_) => "unauthorized",
                    ApiError::Unavailable(_) => "auth_busy",
                    _ => "bad_request",
                });
            }
            r
        })
    }

    fn requires_token(&self) -> bool {
        self.auth.required(Action::View)
    }

    fn session_links(&self, session: SessionId) -> Vec<(&'static str, &'static str)> {
        if self.controls.get(session).is_some() {
            vec![("/layer", LAYER_REL), ("/sse", SSE_REL)]
        } else {
            Vec::new()
        }
    }

    fn events(&self, session: SessionId) -> Result<Events, ApiError> {
        let control = self.controls.get(session).ok_or_else(|| {
            ApiError::NotFound("this session has no events (the stream has one rendition)".into())
        })?;
        let open = control.open_events().ok_or(ApiError::TooManyFromAddress(
            "at most 2 event streams per session",
        ))?;
        let rx = control.status();
        // Weak: the stream must not keep the viewer's control (and so its
        // status channel) alive; it ends when the viewer does.
        let weak = Arc::downgrade(&control);
        drop(control);
        let events = futures::stream::unfold(
            (rx, weak, true, open),
            |(mut rx, weak, first, open)| async move {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                rx.borrow_and_update();
                let control = weak.upgrade()?;
                let data = layer_json(&control, None);
                drop(control);
                Some((("layers", data), (rx, weak, false, open)))
            },
        );
        Ok(Box::pin(events))
    }

    fn layer(&self, session: SessionId, body: Option<&[u8]>) -> Result<String, ApiError> {
        let control = self.controls.get(session).ok_or_else(|| {
            ApiError::NotFound(
                "this session has no layer selection (the stream has one rendition)".into(),
            )
        })?;
        let asked = match body {
            Some(body) => {
                let target = layer_request(body).map_err(ApiError::BadRequest)?;
                control.set(target.clone()).map_err(ApiError::BadRequest)?;
                Some(target)
            }
            None => None,
        };
        Ok(layer_json(&control, asked))
    }

    fn create(&self, stream: String, offer: String) -> CreateFuture {
        let registry = self.registry.clone();
        let server = self.rtc.clone();
        let hub = self.hub.clone();
        let viewers = self.viewers.clone();
        let controls = self.controls.clone();
        let max = self.cfg.max_viewers;
        let abr = self.cfg.abr;
        let bwe_all = self.cfg.bwe_all;
        Box::pin(async move {
            let posted = Instant::now();
            let Some(slot) = Slot::acquire(&viewers, max) else {
                offer_result("full");
                return Err(ApiError::Unavailable(
                    "edge at its viewer limit, retry later",
                ));
            };
            let subscriber = match registry.subscribe(&stream).await {
                Ok(s) => s,
                Err(cascade_origin::Error::Unavailable) => {
                    offer_result("not_live");
                    return Err(ApiError::Unavailable("origin unreachable, retry later"));
                }
                Err(_) => {
                    offer_result("not_live");
                    return Err(ApiError::NotFound(format!("stream {stream} is not live")));
                }
            };
            let parsed = SdpOffer::from_sdp_string(&offer).map_err(|e| {
                offer_result("bad_offer");
                ApiError::BadRequest(format!("malformed SDP offer: {e}"))
            })?;
            let choices = match sdp::negotiate(&sdp::scan(&offer), &subscriber.catalog()) {
                Ok(c) => c,
                Err(Refusal::NoMedia) => {
                    offer_result("bad_offer");
                    return Err(ApiError::BadRequest(
                        "offer has no recvonly or sendrecv audio/video m-line with a mid".into(),
                    ));
                }
                Err(Refusal::NotAcceptable(what)) => {
                    offer_result("not_acceptable");
                    return Err(ApiError::NotAcceptable(format!(
                        "stream {stream} is {what}; the offer has no codec that plays it"
                    )));
                }
            };
            let mut cfg = server
                .rtc_builder()
                .clear_codecs()
                .set_rtp_mode(true)
                .set_extension_map(viewer_extensions());
            // Streams with renditions: str0m's estimator chooses per viewer,
            // if the viewer can send it transport-wide feedback; a viewer
            // that cannot would stay on the estimator's start forever, so
            // its Auto plays the best rendition that flows instead.
            let mut bwe_start = abr
                .then(|| crate::viewer::bwe_start_of(&subscriber))
                .flatten();
            if !crate::viewer::keeps_feedback(bwe_start.is_some(), &offer, "offer") {
                bwe_start = None;
            }
            // The benchmark knob: estimation for a one-rendition stream too
            // (no controller: nothing to choose), started well above it so
            // the pacer never holds it back.
            let bench = (bwe_all && bwe_start.is_none()).then_some(BWE_ALL_START);
            if let Some(bps) = bwe_start.or(bench) {
                cfg = cascade_rtc::bwe::enable(cfg, str0m::bwe::Bitrate::bps(bps));
            }
            for c in &choices {
                let f = &c.format;
                let clock = if c.track.codec == Codec::Opus {
                    Frequency::FORTY_EIGHT_KHZ
                } else {
                    Frequency::NINETY_KHZ
                };
                // The offered parameters verbatim: str0m then matches them
                // exactly and answers with the offerer's payload type.
                cfg.codec_config().add_config(
                    Pt::from(f.pt),
                    f.rtx.map(Pt::from),
                    rtc_codec(c.track.codec),
                    clock,
                    f.channels,
                    FormatParams::parse_line(&f.fmtp),
                );
            }
            let mut rtc = cfg.build(Instant::now());
            server.add_local_candidates(&mut rtc);
            let answer = rtc.sdp_api().accept_offer(parsed).map_err(|e| {
                offer_result("bad_offer");
                ApiError::BadRequest(format!("offer refused: {e}"))
            })?;
            let span = tracing::info_span!("whep", role = "edge", stream = %stream, session = tracing::field::Empty);
            let mut planned = Vec::new();
            for c in &choices {
                let mid = Mid::from(c.mid.as_str());
                let mut api = rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                    continue;
                };
                tx.set_rtx_cache(
                    RTX_CACHE_PACKETS,
                    RTX_CACHE_AGE,
                    rtx_ratio_cap(bwe_start.or(bench).is_some()),
                );
                planned.push((
                    mid,
                    Pt::from(c.format.pt),
                    c.track.codec.clock_rate(),
                    c.track.name.clone(),
                ));
            }
            if planned.is_empty() {
                offer_result("not_acceptable");
                return Err(ApiError::NotAcceptable(format!(
                    "stream {stream}: no offered m-line could be answered"
                )));
            }
            let codecs: Vec<String> = choices.iter().map(|c| c.track.codec.to_string()).collect();
            let handle = server.add(rtc, "whep", &stream, span.clone(), |id, waker| {
                span.record("session", tracing::field::display(id));
                let mut outs = crate::viewer::outs(&hub, &subscriber, planned, &waker);
                crate::viewer::attach_renditions(
                    &mut outs,
                    &hub,
                    &subscriber,
                    &waker,
                    &controls,
                    id,
                    bwe_start,
                );
                Box::new(Viewer::new(outs, subscriber, slot, span.clone(), posted))
            })?;
            {
                let _g = span.enter();
                tracing::info!(codecs = ?codecs, "viewer started");
            }
            offer_result("created");
            Ok(Created {
                answer: answer.to_sdp_string(),
                handle,
            })
        })
    }
}

/// str0m's starting estimate under the `bwe_all` benchmark knob: twice the
/// benchmark's 2.5 Mbit/s stream.
const BWE_ALL_START: u64 = 5_000_000;

/// The rendition a layer request names. The WHEP drafts' body is
/// `{"mediaId": "…", "encodingId": "<rid>"}` (`mediaId` optional: a viewer
/// has one video m-line); `"auto"` gives the choice back to the server and
/// `"none"` asks for audio only.
pub(crate) fn layer_request(body: &[u8]) -> Result<Target, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Request {
        encoding_id: Option<String>,
        #[serde(default)]
        #[allow(dead_code)]
        media_id: Option<serde_json::Value>,
    }
    let req: Request = serde_json::from_slice(body)
        .map_err(|e| format!("layer request is not JSON like {{\"encodingId\":\"h\"}}: {e}"))?;
    let id = req
        .encoding_id
        .ok_or("layer request needs \"encodingId\": a rendition name, \"auto\" or \"none\"")?;
    Ok(match id.as_str() {
        "auto" => Target::Auto,
        "none" => Target::AudioOnly,
        _ => Target::Fixed(id),
    })
}

/// The layer endpoint's answer: the renditions, what the viewer gets now
/// and what it asked for.
fn layer_json(control: &Control, asked: Option<Target>) -> String {
    let status = control.status().borrow().clone();
    let target = asked.unwrap_or(status.target);
    let target = match &target {
        Target::Auto => "auto",
        Target::AudioOnly => "none",
        Target::Fixed(name) => name.as_str(),
    };
    let renditions: Vec<serde_json::Value> = control
        .renditions()
        .iter()
        .map(|r| {
            serde_json::json!({
                "encodingId": r.name,
                "width": r.width,
                "height": r.height,
                "bitrate": u64::from(r.bitrate_kbps) * 1000,
                "framerate": r.framerate,
            })
        })
        .collect();
    serde_json::json!({
        "current": status.rendition,
        "target": target,
        "renditions": renditions,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_requests_of_the_whep_drafts() {
        assert_eq!(
            layer_request(br#"{"encodingId":"h"}"#),
            Ok(Target::Fixed("h".into()))
        );
        assert_eq!(
            layer_request(br#"{"mediaId":"1","encodingId":"q"}"#),
            Ok(Target::Fixed("q".into()))
        );
        assert_eq!(
            layer_request(br#"{"mediaId":0,"encodingId":"auto"}"#),
            Ok(Target::Auto)
        );
        assert_eq!(
            layer_request(br#"{"encodingId":"none"}"#),
            Ok(Target::AudioOnly)
        );
        assert!(layer_request(br#"{"mediaId":"1"}"#).is_err());
        assert!(layer_request(b"h").is_err());
    }

    proptest::proptest! {
        #[test]
        fn layer_request_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = layer_request(&body);
        }
    }
}
