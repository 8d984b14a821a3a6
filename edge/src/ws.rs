//! OvenPlayer's signalling (OvenMediaEngine's WebSocket protocol) at
//! `/ws/live/{stream}`: the server makes the offer. Client `request_offer` →
//! server `offer` {`id`, `peer_id`: 0, `sdp`: {type, sdp}, `candidates`,
//! `ice_servers` only when configured: OvenPlayer goes relay-only as soon as
//! the key exists} → client `answer` (+ `candidate`s) → media; `stop` or a
//! closed socket ends the session, and an ended session closes the socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cascade_origin::catalog::{Catalog, Codec, Kind, TrackInfo};
use cascade_rtc::http::{request_token, token_matches, ApiError, QueryToken};
use cascade_rtc::SessionHandle;
use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::{Codec as RtcCodec, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, Mid, Pt};
use str0m::{Candidate, Rtc};

use crate::metrics as m;
use crate::viewer::{Out, Slot, Viewer, RTX_CACHE_AGE, RTX_CACHE_PACKETS};
use crate::whep::Whep;

/// A client must ask for its offer this soon after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// And answer it this soon (OvenPlayer answers in milliseconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the socket task checks that its session still lives.
const LIVENESS_TICK: Duration = Duration::from_millis(500);
/// OME's keepalive: reverse proxies close a silent WebSocket (nginx after
/// 60 s), which would end the viewer; OvenPlayer answers `ping` with `pong`.
const PING_EVERY: Duration = Duration::from_secs(20);
/// Largest signalling message accepted (an answer SDP is a few KiB).
const MAX_MESSAGE: usize = 64 * 1024;

/// Payload types of our offer (dynamic range, RFC 3551).
const PT_VIDEO: u8 = 96;
const PT_VIDEO_RTX: u8 = 97;
const PT_AUDIO: u8 = 111;

/// `GET /ws/live/{stream}` (WebSocket upgrade).
pub(crate) fn router(whep: Arc<Whep>) -> Router {
    Router::new()
        .route("/ws/live/{stream}", get(upgrade))
        .with_state(whep)
}

fn result(r: &'static str) {
    metrics::counter!(m::WS_SESSIONS, "result" => r).increment(1);
}

async fn upgrade(
    State(whep): State<Arc<Whep>>,
    Path(stream): Path<String>,
    Query(q): Query<QueryToken>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Browsers cannot put headers on a WebSocket: `?token=` (INTERFACE.md).
    if let Some(expected) = &whep.cfg.viewer_token {
        if !token_matches(request_token(&headers, &q), expected) {
            result("unauthorized");
            return ApiError::Unauthorized(
                "missing or wrong viewer token: add ?token=TOKEN to the URL",
            )
            .into_response();
        }
    }
    if !cascade_origin::valid_stream_name(&stream) {
        return ApiError::BadRequest(
            "bad stream name: use 1-64 characters of A-Z a-z 0-9 _ -".into(),
        )
        .into_response();
    }
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(whep, stream, socket))
}

/// OME's error shape: OvenPlayer shows `error` and closes.
fn error_message(code: u16, text: &str) -> Message {
    Message::Text(json!({ "code": code, "error": text }).to_string().into())
}

async fn recv_json(socket: &mut WebSocket, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, socket.recv())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

async fn session(whep: Arc<Whep>, stream: String, mut socket: WebSocket) {
    let posted = Instant::now();
    match recv_json(&mut socket, REQUEST_TIMEOUT).await {
        Some(v) if v["command"] == "request_offer" => {}
        _ => {
            result("no_request");
            return;
        }
    }
    let id: u32 = rand::random::<u32>() >> 1;
    let handle = match negotiate(&whep, &stream, id, posted, &mut socket).await {
        Ok(h) => h,
        Err((code, text, label)) => {
            result(label);
            let _ = socket.send(error_message(code, &text)).await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    };
    result("created");
    serve(&whep, &stream, handle, socket).await;
}

/// After the answer: trickled candidates, `stop`, the socket closing, or the
/// session ending on its own (stream over, consent lost).
async fn serve(whep: &Whep, stream: &str, handle: SessionHandle, mut socket: WebSocket) {
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                let msg = Message::Text(json!({ "command": "ping" }).to_string().into());
                if socket.send(msg).await.is_err() {
                    break;
                }
            }
            msg = socket.recv() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                match v["command"].as_str() {
                    Some("stop") => break,
                    Some("candidate") => {
                        for c in v["candidates"].as_array().into_iter().flatten() {
                            let line = c["candidate"].as_str().unwrap_or("");
                            let line = line.strip_prefix("a=").unwrap_or(line);
                            if let Ok(c) = Candidate::from_sdp_string(line) {
                                if handle.add_remote_candidate(c).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Some("ping") => {
                        let _ = socket.send(Message::Text(json!({"command": "pong"}).to_string().into())).await;
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                if whep.rtc.session("ws", stream, handle.id()).is_none() {
                    // The session ended on its own: tell the player.
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
    // A closed socket frees the session now (DESIGN.md "Leaving").
    let _ = handle.close().await;
}

/// One track we offer: its catalog entry, payload type and str0m codec.
struct Plan {
    track: TrackInfo,
    pt: u8,
    rtx: Option<u8>,
    codec: RtcCodec,
    clock: Frequency,
    channels: Option<u8>,
    fmtp: String,
    mid: Option<Mid>,
}

/// What we can offer a browser for the catalog's tracks.
fn plans(catalog: &Catalog) -> Vec<Plan> {
    let mut out = Vec::new();
    if let Some(v) = catalog.track(Kind::Video) {
        let (codec, fmtp) = match v.codec {
            Codec::H264 => (
                RtcCodec::H264,
                format!(
                    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={:06x}",
                    v.profile_level_id().unwrap_or(0x42e01f)
                ),
            ),
            Codec::Vp8 => (RtcCodec::Vp8, String::new()),
            Codec::Vp9 => (RtcCodec::Vp9, "profile-id=0".to_string()),
            Codec::H265 => (RtcCodec::H265, v.fmtp.clone()),
            _ => (RtcCodec::Unknown, String::new()),
        };
        if codec != RtcCodec::Unknown {
            out.push(Plan {
                track: v.clone(),
                pt: PT_VIDEO,
                rtx: Some(PT_VIDEO_RTX),
                codec,
                clock: Frequency::NINETY_KHZ,
                channels: None,
                fmtp,
                mid: None,
            });
        }
    }
    if let Some(a) = catalog
        .track(Kind::Audio)
        .filter(|a| a.codec == Codec::Opus)
    {
        out.push(Plan {
            track: a.clone(),
            pt: PT_AUDIO,
            rtx: None,
            codec: RtcCodec::Opus,
            clock: Frequency::FORTY_EIGHT_KHZ,
            channels: Some(2),
            fmtp: "minptime=10;useinbandfec=1".into(),
            mid: None,
        });
    }
    out
}

type Refused = (u16, String, &'static str);

/// Offer → answer → session in a shard.
async fn negotiate(
    whep: &Whep,
    stream: &str,
    id: u32,
    posted: Instant,
    socket: &mut WebSocket,
) -> Result<SessionHandle, Refused> {
    whep.rtc.admit().map_err(|_| {
        (
            503,
            "node at its session limit or draining, retry later".into(),
            "full",
        )
    })?;
    let slot = Slot::acquire(&whep.viewers, whep.cfg.max_viewers).ok_or((
        503,
        "edge at its viewer limit, retry later".into(),
        "full",
    ))?;
    let subscriber = whep
        .registry
        .subscribe(stream)
        .await
        .map_err(|_| (404, format!("stream {stream} is not live"), "not_live"))?;
    let mut plans = plans(&subscriber.catalog());
    if !plans.iter().any(|p| p.track.kind() == Kind::Video) {
        return Err((
            406,
            format!("stream {stream} has no video a browser can play"),
            "not_acceptable",
        ));
    }
    let mut cfg = whep
        .rtc
        .rtc_builder()
        .clear_codecs()
        .set_rtp_mode(true)
        .set_extension_map(crate::whep::viewer_extensions());
    for p in &plans {
        cfg.codec_config().add_config(
            Pt::from(p.pt),
            p.rtx.map(Pt::from),
            p.codec,
            p.clock,
            p.channels,
            FormatParams::parse_line(&p.fmtp),
        );
    }
    let mut rtc = cfg.build(Instant::now());
    whep.rtc.add_local_candidates(&mut rtc);
    let mut api = rtc.sdp_api();
    for p in &mut plans {
        let kind = if p.track.kind() == Kind::Video {
            MediaKind::Video
        } else {
            MediaKind::Audio
        };
        p.mid = Some(api.add_media(
            kind,
            Direction::SendOnly,
            Some(stream.to_string()),
            Some(p.track.name.clone()),
            None,
        ));
    }
    let (offer, pending) =
        api.apply()
            .ok_or((500, "could not build an offer".into(), "internal"))?;
    let sdp = cascade_rtc::sdpfrag::strip_candidate_ufrag(&offer.to_sdp_string());
    let mut msg = json!({
        "command": "offer",
        "id": id,
        "peer_id": 0,
        "sdp": { "type": "offer", "sdp": sdp },
        // Our host candidates are in the SDP already.
        "candidates": [],
    });
    let ice = whep.rtc.ice_servers();
    if !ice.is_empty() {
        let servers: Vec<Value> = ice
            .entries(cascade_rtc::ice::unix_now())
            .into_iter()
            .map(|e| json!({ "urls": [e.urls], "username": e.username, "user_name": e.username, "credential": e.credential }))
            .collect();
        msg["ice_servers"] = Value::from(servers);
    }
    if socket
        .send(Message::Text(msg.to_string().into()))
        .await
        .is_err()
    {
        return Err((499, "client left".into(), "client_left"));
    }
    let answer = loop {
        let v = recv_json(socket, ANSWER_TIMEOUT).await.ok_or((
            408,
            "no answer to the offer".into(),
            "no_answer",
        ))?;
        if v["command"] == "answer" {
            break v;
        }
        if v["command"] == "stop" {
            return Err((499, "client stopped".into(), "client_left"));
        }
    };
    let text = answer["sdp"]["sdp"].as_str().unwrap_or("");
    let answer = SdpAnswer::from_sdp_string(text)
        .map_err(|e| (400, format!("malformed SDP answer: {e}"), "bad_answer"))?;
    accept(
        rtc, pending, answer, plans, whep, stream, subscriber, slot, posted,
    )
}

#[allow(clippy::too_many_arguments)]
fn accept(
    mut rtc: Rtc,
    pending: SdpPendingOffer,
    answer: SdpAnswer,
    plans: Vec<Plan>,
    whep: &Whep,
    stream: &str,
    subscriber: cascade_origin::registry::Subscriber,
    slot: Slot,
    posted: Instant,
) -> Result<SessionHandle, Refused> {
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| (400, format!("answer refused: {e}"), "bad_answer"))?;
    let mut planned = Vec::new();
    for p in &plans {
        let Some(mid) = p.mid else { continue };
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            continue;
        };
        tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, None);
        planned.push((
            mid,
            Pt::from(p.pt),
            p.track.codec.clock_rate(),
            p.track.name.clone(),
        ));
    }
    if planned.is_empty() {
        return Err((
            406,
            "the answer accepts none of the offered media".into(),
            "not_acceptable",
        ));
    }
    let span =
        tracing::info_span!("ws", role = "edge", stream = %stream, session = tracing::field::Empty);
    let hub = whep.hub().clone();
    let handle = whep
        .rtc
        .add(rtc, "ws", stream, span.clone(), |id, waker| {
            span.record("session", tracing::field::display(id));
            let outs = planned
                .into_iter()
                .filter_map(|(mid, pt, clock, track)| {
                    let member = hub.join(&subscriber, &track, &waker)?;
                    Some(Out::new(mid, pt, clock, member))
                })
                .collect();
            Box::new(Viewer::new(outs, subscriber, slot, span.clone(), posted))
        })
        .map_err(|_| (503, "node at its session limit, retry later".into(), "full"))?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(codec: Codec, name: &str, fmtp: &str) -> TrackInfo {
        TrackInfo {
            name: name.into(),
            codec,
            fmtp: fmtp.into(),
            channels: None,
            bframes: false,
        }
    }

    #[test]
    fn offers_h264_with_the_stream_profile_and_opus() {
        let c = Catalog {
            tracks: vec![
                track(
                    Codec::H264,
                    "video",
                    "profile-level-id=640028;packetization-mode=1",
                ),
                track(Codec::Opus, "audio", ""),
            ],
        };
        let p = plans(&c);
        assert_eq!(p.len(), 2);
        assert!(
            p[0].fmtp.contains("profile-level-id=640028"),
            "{}",
            p[0].fmtp
        );
        assert_eq!(p[1].codec, RtcCodec::Opus);
        let av1 = Catalog {
            tracks: vec![track(Codec::Av1, "video", "")],
        };
        assert!(plans(&av1).is_empty());
    }
}
