//! OvenPlayer's signalling (OvenMediaEngine's WebSocket protocol) at
//! `/ws/live/{stream}`: the server makes the offer. Client `request_offer` →
//! server `offer` {`id`, `peer_id`: 0, `sdp`: {type, sdp}, `candidates`,
//! `ice_servers` only when configured: OvenPlayer goes relay-only as soon as
//! the key exists} → client `answer` (+ `candidate`s) → media; `stop` or a
//! closed socket ends the session, and an ended session closes the socket.
//! Streams with renditions: after the answer the server sends the
//! `playlist` notification (OvenPlayer's quality menu), takes
//! `change_rendition` and tells every change with `rendition_changed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cascade_origin::catalog::Kind;
use cascade_rtc::auth::Action;
use cascade_rtc::http::{admit_token, client_addr, request_token, ApiError, QueryToken};
use cascade_rtc::SessionHandle;
use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::FormatParams;
use str0m::media::{Direction, MediaKind, Pt};
use str0m::Rtc;
use tokio::sync::oneshot;

use crate::metrics as m;
use crate::offer;
use crate::viewer::control::{Control, Status};
use crate::viewer::switch::Target;
use crate::viewer::{Slot, Viewer, RTX_CACHE_AGE, RTX_CACHE_PACKETS};
use crate::whep::Whep;
use crate::ws_command::{self, Choice, Command};

/// A client must ask for its offer this soon after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// And answer it this soon (OvenPlayer answers in milliseconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the socket task checks that its session still lives.
const LIVENESS_TICK: Duration = Duration::from_millis(500);
/// OME's keepalive: reverse proxies close a silent WebSocket (nginx after
/// 60 s), which would end the viewer; OvenPlayer answers `ping` with `pong`.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A player whose ICE has not connected this long after its answer is told
/// so (OME error message) and the session ends: a browser that can reach us
/// connects in well under a second, even through TURN.
const CONNECT_REPORT: Duration = Duration::from_secs(8);
/// Largest signalling message accepted (an answer SDP is a few KiB), and
/// largest frame: a bigger frame is refused from its header, unbuffered.
const MAX_MESSAGE: usize = 64 * 1024;

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
    ext: axum::http::Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    // Browsers cannot put headers on a WebSocket: `?token=` (INTERFACE.md).
    let remote = client_addr(&ext);
    let ip = remote.ip();
    let token = request_token(&headers, &q);
    let checked = admit_token(
        &whep.rtc,
        "ws",
        ip,
        token.is_some(),
        whep.auth.required(Action::View),
        whep.decide_view(
            &stream,
            "ws",
            remote,
            token,
            "missing or wrong viewer token: add ?token=TOKEN to the URL",
        ),
    )
    .await;
    if let Err(e) = checked {
        result(match e {
            ApiError::TooManyRequests(_) => "rate_limited",
            ApiError::Unavailable(_) => "auth_busy",
            ApiError::BadRequest(_) => "bad_request",
            _ => "unauthorized",
        });
        return e.into_response();
    }
    if !cascade_origin::valid_stream_name(&stream) {
        return ApiError::BadRequest(cascade_origin::BAD_STREAM_NAME.into()).into_response();
    }
    // The negotiation counts as a session from here (admission applies),
    // until the viewer's own session replaces it or it fails.
    let peer = (!ip.is_unspecified()).then_some(ip);
    let reservation = match whep.rtc.reserve_from("ws", peer) {
        Ok(r) => r,
        Err(e) => {
            result(Refused::NodeFull.label());
            return ApiError::from(e).into_response();
        }
    };
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(whep, stream, socket, reservation))
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

async fn session(
    whep: Arc<Whep>,
    stream: String,
    mut socket: WebSocket,
    reservation: cascade_rtc::Reservation,
) {
    let posted = Instant::now();
    match recv_json(&mut socket, REQUEST_TIMEOUT).await {
        Some(v) if v["command"] == "request_offer" => {}
        _ => {
            result("no_request");
            return;
        }
    }
    let id: u32 = rand::random::<u32>() >> 1;
    let negotiated = match negotiate(&whep, &stream, id, posted, &mut socket, reservation).await {
        Ok(n) => n,
        Err(refused) => {
            result(refused.label());
            match &refused {
                Refused::ClientLeft
                | Refused::NotLive(_)
                | Refused::NodeFull
                | Refused::EdgeFull => {
                    tracing::debug!(stream, reason = %refused, "ws viewer refused");
                }
                _ => tracing::warn!(stream, reason = %refused, "ws viewer refused"),
            }
            let _ = socket
                .send(error_message(refused.code(), &refused.to_string()))
                .await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    };
    result("created");
    if let Some(text) = &negotiated.warning {
        // OvenPlayer ignores notification types it does not know; other
        // clients see why there is no sound.
        let msg = json!({ "command": "notification", "type": "warning", "message": text });
        let _ = socket.send(Message::Text(msg.to_string().into())).await;
    }
    serve(&whep, &stream, negotiated, socket).await;
}

/// After the answer: trickled candidates, `stop`, the socket closing, the
/// session ending on its own (stream over, consent lost), or ICE never
/// connecting, which the player hears about as an error instead of showing a
/// black `playing` until the shard's connect timeout.
async fn serve(whep: &Whep, stream: &str, negotiated: Negotiated, mut socket: WebSocket) {
    let Negotiated {
        handle,
        mut control,
        mut connected,
        ..
    } = negotiated;
    // Streams with renditions: OvenPlayer's quality menu.
    let mut status = None;
    if let Some(c) = &control {
        let Some(s) = send_menu(&mut socket, c).await else {
            let _ = handle.close().await;
            return;
        };
        status = Some(s);
    }
    let mut waiting_connect = true;
    let connect_deadline = tokio::time::sleep(CONNECT_REPORT);
    tokio::pin!(connect_deadline);
    let mut tick = tokio::time::interval(LIVENESS_TICK);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            r = &mut connected, if waiting_connect => {
                waiting_connect = false;
                if r.is_err() {
                    // The viewer ended before connecting; the tick below
                    // notices the session is gone.
                    continue;
                }
            }
            () = &mut connect_deadline, if waiting_connect => {
                let text = format!(
                    "no ICE connection within {} s: the browser could not reach {} (check --advertise, firewalls, or configure TURN)",
                    CONNECT_REPORT.as_secs(),
                    advertised(whep),
                );
                result("not_connected");
                tracing::warn!(stream, session = %handle.id(), reason = %text, "ws viewer never connected");
                let _ = socket.send(error_message(408, &text)).await;
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
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
                match ws_command::parse(text.as_str()) {
                    Command::Stop => break,
                    Command::Candidates(parsed) => {
                        // Capped per session, as for PATCH; the rest is ignored.
                        let allowed = whep.rtc.reserve_candidates(handle.id(), "ws", parsed.len());
                        for c in parsed.into_iter().take(allowed) {
                            if handle.add_remote_candidate(c).await.is_err() {
                                return;
                            }
                        }
                    }
                    Command::Ping => {
                        let _ = socket.send(Message::Text(json!({"command": "pong"}).to_string().into())).await;
                    }
                    Command::ChangeRendition(choice) => {
                        let Some(c) = &control else { continue };
                        if let Err(why) = c.set(change_rendition(choice, c)) {
                            // OvenPlayer only lists what the playlist had;
                            // other clients hear why.
                            let msg = json!({ "command": "notification", "type": "warning", "message": why });
                            let _ = socket.send(json_message(&msg)).await;
                        }
                    }
                    Command::Ignored => {}
                }
            }
            changed = async {
                match status.as_mut() {
                    Some(s) => s.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(s) = status.as_mut().filter(|_| changed.is_ok()) else {
                    status = None;
                    continue;
                };
                let now = s.borrow_and_update().clone();
                if socket.send(json_message(&rendition_changed(&now))).await.is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                if whep.rtc.session("ws", stream, handle.id()).is_none() {
                    // The session ended on its own: tell the player.
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                // A stream that gained renditions after the viewer joined
                // (`viewer::Late` registers the control then): its menu now.
                if control.is_none() {
                    if let Some(c) = whep.controls.get(handle.id()) {
                        let Some(s) = send_menu(&mut socket, &c).await else {
                            break;
                        };
                        status = Some(s);
                        control = Some(c);
                    }
                }
            }
        }
    }
    // A closed socket frees the session now (DESIGN.md "Leaving").
    let _ = handle.close().await;
}

fn json_message(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Sends `control`'s playlist; returns its status, to follow from here on
/// (`None`: the socket is gone).
async fn send_menu(
    socket: &mut WebSocket,
    control: &Control,
) -> Option<tokio::sync::watch::Receiver<Status>> {
    socket.send(json_message(&playlist(control))).await.ok()?;
    let mut status = control.status();
    status.borrow_and_update();
    Some(status)
}

/// OME's `playlist` notification: one rendition per video rendition (each
/// with the audio track), in ladder order, best first; `auto` on.
fn playlist(control: &Control) -> Value {
    let renditions: Vec<Value> = control
        .renditions()
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "video_track": { "video": {
                    "bitrate": u64::from(r.bitrate_kbps) * 1000,
                    "width": r.width,
                    "height": r.height,
                    "framerate": r.framerate,
                }},
                "audio_track": { "audio": { "codec": "opus", "samplerate": 48_000, "channel": 2 } },
            })
        })
        .collect();
    json!({
        "command": "notification",
        "type": "playlist",
        "message": { "renditions": renditions, "auto": true },
    })
}

/// OME's `rendition_changed` notification. OvenPlayer reads the name from
/// `message` and `auto` from the top level; both carry it.
fn rendition_changed(status: &Status) -> Value {
    let auto = status.target == Target::Auto;
    json!({
        "command": "notification",
        "type": "rendition_changed",
        "auto": auto,
        "message": { "rendition_name": status.rendition, "auto": auto },
    })
}

/// The target of OvenPlayer's `change_rendition`: `{rendition_name, auto:
/// false}` picks one; `{auto: true}` hands the choice back; `{auto: false}`
/// alone keeps the rendition it gets now.
fn change_rendition(choice: Choice, control: &Control) -> Target {
    match choice {
        Choice::Named(name) => Target::Fixed(name),
        Choice::Auto => Target::Auto,
        Choice::Hold => {
            let now = control.status().borrow().rendition.clone();
            match now.or_else(|| control.renditions().first().map(|r| r.name.clone())) {
                Some(name) => Target::Fixed(name),
                None => Target::Auto,
            }
        }
    }
}

/// The addresses in our candidates, for an error a user can act on.
fn advertised(whep: &Whep) -> String {
    let udp = whep.rtc.local_udp().port();
    let ips: Vec<String> = whep
        .rtc
        .advertise()
        .iter()
        .map(|ip| format!("{ip}:{udp}"))
        .collect();
    if ips.is_empty() {
        "the server".into()
    } else {
        ips.join(", ")
    }
}

/// The estimate a session built with estimation is reset to when its
/// player's answer drops the feedback extension: far above any rendition,
/// so str0m's pacer never holds the video back.
const NO_FEEDBACK_PACE: u64 = 50_000_000;

/// Offer → answer → session in a shard.
async fn negotiate(
    whep: &Whep,
    stream: &str,
    id: u32,
    posted: Instant,
    socket: &mut WebSocket,
    reservation: cascade_rtc::Reservation,
) -> Result<Negotiated, Refused> {
    let slot = Slot::acquire(&whep.viewers, whep.cfg.max_viewers).ok_or(Refused::EdgeFull)?;
    let subscriber = whep
        .registry
        .subscribe(stream)
        .await
        .map_err(|_| Refused::NotLive(stream.to_string()))?;
    let catalog = subscriber.catalog();
    let mut plans = offer::plans(&catalog);
    if !plans.iter().any(|p| p.kind() == Kind::Video) {
        let what = catalog
            .track(Kind::Video)
            .map_or_else(|| "no video".to_string(), |v| v.codec.to_string());
        return Err(Refused::NoPlayableVideo {
            stream: stream.to_string(),
            what,
        });
    }
    let mut cfg = whep
        .rtc
        .rtc_builder()
        .clear_codecs()
        .set_rtp_mode(true)
        .set_extension_map(crate::whep::viewer_extensions());
    // Streams with renditions: str0m's estimator chooses per viewer.
    let bwe_start = whep
        .cfg
        .abr
        .then(|| crate::viewer::bwe_start_of(&subscriber))
        .flatten();
    if let Some(bps) = bwe_start {
        cfg = cascade_rtc::bwe::enable(cfg, str0m::bwe::Bitrate::bps(bps));
    }
    for p in &plans {
        for f in &p.formats {
            cfg.codec_config().add_config(
                Pt::from(f.pt),
                f.rtx.map(Pt::from),
                p.codec,
                p.clock,
                p.channels,
                FormatParams::parse_line(&f.fmtp),
            );
        }
    }
    let mut rtc = cfg.build(Instant::now());
    whep.rtc.add_local_candidates(&mut rtc);
    let mut api = rtc.sdp_api();
    for p in &mut plans {
        let kind = if p.kind() == Kind::Video {
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
    let (offer, pending) = api
        .apply()
        .ok_or(Refused::Internal("could not build an offer"))?;
    let sdp = offer::spread_candidates(&cascade_rtc::sdpfrag::strip_candidate_ufrag(
        &offer.to_sdp_string(),
    ));
    let mut msg = json!({
        "command": "offer",
        "id": id,
        "peer_id": 0,
        "sdp": { "type": "offer", "sdp": sdp },
        // In the SDP on every m-line too; here as OME sends them, so a player
        // that only looks at the array still gets them.
        "candidates": offer::candidates_json(&sdp),
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
        return Err(Refused::ClientLeft);
    }
    let answer = loop {
        let v = recv_json(socket, ANSWER_TIMEOUT)
            .await
            .ok_or(Refused::NoAnswer)?;
        if v["command"] == "answer" {
            break v;
        }
        if v["command"] == "stop" {
            return Err(Refused::ClientLeft);
        }
    };
    let text = answer["sdp"]["sdp"].as_str().unwrap_or("");
    let rejected = offer::rejected_mids(text);
    // The offer carried the transport-wide congestion extension; a player
    // whose answer drops it sends no feedback, and str0m's estimate would
    // stay at its start (Auto held on the rendition that start fits).
    let feedback = crate::viewer::keeps_feedback(bwe_start.is_some(), text, "answer");
    if bwe_start.is_some() && !feedback {
        // The session was built with estimation: str0m's pacer would hold
        // the video to the start estimate. An estimate no stream reaches
        // unpaces it; estimation and probing need the feedback, so nothing
        // else of them runs.
        rtc.bwe().reset(str0m::bwe::Bitrate::bps(NO_FEEDBACK_PACE));
    }
    let answer = SdpAnswer::from_sdp_string(text).map_err(|e| Refused::BadAnswer(e.to_string()))?;
    accept(
        rtc,
        pending,
        answer,
        &rejected,
        plans,
        whep,
        stream,
        subscriber,
        slot,
        posted,
        reservation,
        bwe_start.filter(|_| feedback),
    )
}

/// A session that is in its shard, and what the player should hear about it.
struct Negotiated {
    handle: SessionHandle,
    /// The viewer's rendition choice, for streams with renditions.
    control: Option<Arc<Control>>,
    /// Fires when ICE and DTLS are up (the viewer's `Event::Connected`).
    connected: oneshot::Receiver<()>,
    /// A track the answer rejected while the rest plays (audio).
    warning: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn accept(
    mut rtc: Rtc,
    pending: SdpPendingOffer,
    answer: SdpAnswer,
    rejected: &[String],
    plans: Vec<offer::Plan>,
    whep: &Whep,
    stream: &str,
    subscriber: cascade_origin::registry::Subscriber,
    slot: Slot,
    posted: Instant,
    reservation: cascade_rtc::Reservation,
    bwe_start: Option<u64>,
) -> Result<Negotiated, Refused> {
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| Refused::BadAnswer(e.to_string()))?;
    let mut planned = Vec::new();
    let mut warning = None;
    for p in &plans {
        let Some(mid) = p.mid else { continue };
        let chosen = if rejected.iter().any(|r| r.as_str() == &*mid) {
            None
        } else {
            rtc.media(mid).and_then(|m| p.chosen(m.remote_pts()))
        };
        let Some(pt) = chosen else {
            // Video decides, as in WHEP: without it the player would show a
            // black `playing` forever.
            if p.kind() == Kind::Video {
                return Err(Refused::VideoRejected(p.describe()));
            }
            let text = format!("the browser rejected the audio ({})", p.describe());
            tracing::warn!(stream, reason = %text, "ws viewer gets video only");
            warning = Some(text);
            continue;
        };
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            continue;
        };
        tx.set_rtx_cache(
            RTX_CACHE_PACKETS,
            RTX_CACHE_AGE,
            crate::viewer::rtx_ratio_cap(bwe_start.is_some()),
        );
        planned.push((mid, pt, p.track.codec.clock_rate(), p.track.name.clone()));
    }
    if planned.is_empty() {
        return Err(Refused::NothingAccepted);
    }
    let span =
        tracing::info_span!("ws", role = "edge", stream = %stream, session = tracing::field::Empty);
    let hub = whep.hub().clone();
    let (tx, connected) = oneshot::channel();
    let codecs: Vec<String> = planned
        .iter()
        .filter_map(|(_, pt, _, track)| {
            let p = plans.iter().find(|p| &p.track.name == track)?;
            let f = p.formats.iter().find(|f| Pt::from(f.pt) == *pt)?;
            Some(format!("{} pt {} {}", p.track.codec, f.pt, f.fmtp))
        })
        .collect();
    // The session takes the reservation's place in the count.
    let held = reservation.release();
    let controls = whep.controls.clone();
    let mut control = None;
    let handle = whep
        .rtc
        .add(rtc, "ws", stream, span.clone(), |id, waker| {
            span.record("session", tracing::field::display(id));
            let mut outs = crate::viewer::outs(&hub, &subscriber, planned, &waker);
            control = crate::viewer::attach_renditions(
                &mut outs,
                &hub,
                &subscriber,
                &waker,
                &controls,
                id,
                bwe_start,
            );
            Box::new(Viewer::new(outs, subscriber, slot, span.clone(), posted).on_connected(tx))
        })
        .map_err(|_| Refused::NodeFull)?;
    if let Some(a) = held {
        whep.rtc.hold(handle.id(), a);
    }
    {
        let _g = span.enter();
        tracing::info!(codecs = ?codecs, "viewer started");
    }
    Ok(Negotiated {
        handle,
        control,
        connected,
        warning,
    })
}

/// Why a WebSocket viewer was not served: one table of OME error codes
/// (HTTP-like, shown by OvenPlayer), metric labels and texts.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("node at its session limit or draining, retry later")]
    NodeFull,
    #[error("edge at its viewer limit, retry later")]
    EdgeFull,
    #[error("stream {0} is not live")]
    NotLive(String),
    #[error("stream {stream} has no video a browser can play ({what})")]
    NoPlayableVideo { stream: String, what: String },
    #[error("client left")]
    ClientLeft,
    #[error("no answer to the offer")]
    NoAnswer,
    #[error("malformed or refused SDP answer: {0}")]
    BadAnswer(String),
    #[error("this browser cannot play the stream's video: it rejected {0}")]
    VideoRejected(String),
    #[error("the answer accepts none of the offered media")]
    NothingAccepted,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Refused {
    /// The `code` of OME's error message.
    fn code(&self) -> u16 {
        match self {
            Self::NodeFull | Self::EdgeFull => 503,
            Self::NotLive(_) => 404,
            Self::NoPlayableVideo { .. } | Self::VideoRejected(_) | Self::NothingAccepted => 406,
            Self::ClientLeft => 499,
            Self::NoAnswer => 408,
            Self::BadAnswer(_) => 400,
            Self::Internal(_) => 500,
        }
    }

    /// The `result` label of `cascade_edge_ws_sessions_total`.
    fn label(&self) -> &'static str {
        match self {
            Self::NodeFull | Self::EdgeFull => "full",
            Self::NotLive(_) => "not_live",
            Self::NoPlayableVideo { .. } | Self::NothingAccepted => "not_acceptable",
            Self::VideoRejected(_) => "video_rejected",
            Self::ClientLeft => "client_left",
            Self::NoAnswer => "no_answer",
            Self::BadAnswer(_) => "bad_answer",
            Self::Internal(_) => "internal",
        }
    }
}
