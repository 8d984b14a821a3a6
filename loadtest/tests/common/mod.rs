//! A tiny in-test WHIP/WHEP server (axum + ICE-lite str0m, one UDP socket per session) that
//! forwards frames from the publisher to every viewer, to prove the clients before cascade exists.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // test harness: a failure should panic the test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::Router;
use str0m::change::SdpOffer;
use str0m::format::PayloadParams;
use str0m::media::{KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Frames in flight from the publisher to viewers; a lagging viewer loses the oldest.
const FRAME_QUEUE: usize = 512;
/// Keyframe requests waiting for the publisher session.
const KEYFRAME_QUEUE: usize = 8;

#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: MediaKind,
    pub params: PayloadParams,
    pub time: MediaTime,
    pub data: Arc<[u8]>,
}

pub struct Server {
    pub addr: SocketAddr,
    pub token: String,
    state: Arc<Shared>,
}

impl Server {
    pub fn whip_url(&self, stream: &str) -> String {
        format!("http://{}/whip/{stream}", self.addr)
    }
    pub fn whep_url(&self, stream: &str) -> String {
        format!("http://{}/whep/{stream}", self.addr)
    }
    pub fn keyframe_requests_sent(&self) -> u64 {
        self.state.kf_sent.load(Ordering::Relaxed)
    }
}

struct Shared {
    token: String,
    next_id: AtomicU64,
    kf_sent: AtomicU64,
    sessions: Mutex<HashMap<String, CancellationToken>>,
    streams: Mutex<HashMap<String, Stream>>,
}

struct Stream {
    frames: broadcast::Sender<Frame>,
    keyframe: mpsc::Sender<()>,
}

pub async fn start(token: &str) -> Server {
    let state = Arc::new(Shared {
        token: token.to_string(),
        next_id: AtomicU64::new(1),
        kf_sent: AtomicU64::new(0),
        sessions: Mutex::default(),
        streams: Mutex::default(),
    });
    let app = Router::new()
        .route("/whip/{stream}", post(whip))
        .route("/whep/{stream}", post(whep))
        .route("/whip/{stream}/{id}", delete(remove))
        .route("/whep/{stream}/{id}", delete(remove))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        addr,
        token: token.to_string(),
        state,
    }
}

async fn answer(offer: &str) -> Result<(Rtc, UdpSocket, String), Response> {
    let offer = SdpOffer::from_sdp_string(offer)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()).into_response())?;
    let mut rtc = RtcConfig::new().set_ice_lite(true).build(Instant::now());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cand = Candidate::host(socket.local_addr().unwrap(), "udp").unwrap();
    rtc.add_local_candidate(cand);
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()).into_response())?;
    Ok((rtc, socket, answer.to_sdp_string()))
}

fn created(state: &Shared, kind: &str, stream: &str, sdp: String) -> (String, Response) {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    let location = format!("/{kind}/{stream}/{id}");
    let resp = (
        StatusCode::CREATED,
        [
            (header::LOCATION, location.clone()),
            (header::CONTENT_TYPE, "application/sdp".into()),
        ],
        sdp,
    )
        .into_response();
    (location, resp)
}

async fn whip(
    State(state): State<Arc<Shared>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {}", state.token)) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    let (rtc, socket, sdp) = match answer(&body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (kf_tx, kf_rx) = mpsc::channel(KEYFRAME_QUEUE);
    let frames = {
        let mut streams = state.streams.lock().unwrap();
        let s = streams.entry(stream.clone()).or_insert_with(|| Stream {
            frames: broadcast::channel(FRAME_QUEUE).0,
            keyframe: kf_tx.clone(),
        });
        s.keyframe = kf_tx;
        s.frames.clone()
    };
    let (location, resp) = created(&state, "whip", &stream, sdp);
    let cancel = CancellationToken::new();
    state
        .sessions
        .lock()
        .unwrap()
        .insert(location, cancel.clone());
    tokio::spawn(run(rtc, socket, cancel, Role::Publisher { frames, kf_rx }));
    resp
}

async fn whep(
    State(state): State<Arc<Shared>>,
    Path(stream): Path<String>,
    body: String,
) -> Response {
    let (frames, kf) = {
        let streams = state.streams.lock().unwrap();
        match streams.get(&stream) {
            Some(s) => (s.frames.subscribe(), s.keyframe.clone()),
            None => return (StatusCode::NOT_FOUND, "stream not live").into_response(),
        }
    };
    let (rtc, socket, sdp) = match answer(&body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if kf.try_send(()).is_ok() {
        state.kf_sent.fetch_add(1, Ordering::Relaxed);
    }
    let (location, resp) = created(&state, "whep", &stream, sdp);
    let cancel = CancellationToken::new();
    state
        .sessions
        .lock()
        .unwrap()
        .insert(location, cancel.clone());
    tokio::spawn(run(rtc, socket, cancel, Role::Viewer { frames }));
    resp
}

async fn remove(
    State(state): State<Arc<Shared>>,
    Path((stream, id)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> StatusCode {
    let kind = if uri.path().starts_with("/whip") {
        "whip"
    } else {
        "whep"
    };
    let key = format!("/{kind}/{stream}/{id}");
    match state.sessions.lock().unwrap().remove(&key) {
        Some(c) => {
            c.cancel();
            StatusCode::OK
        }
        None => StatusCode::NOT_FOUND,
    }
}

enum Role {
    Publisher {
        frames: broadcast::Sender<Frame>,
        kf_rx: mpsc::Receiver<()>,
    },
    Viewer {
        frames: broadcast::Receiver<Frame>,
    },
}

/// One server-side session: drive str0m, forward frames in or out.
async fn run(mut rtc: Rtc, socket: UdpSocket, cancel: CancellationToken, mut role: Role) {
    let local = socket.local_addr().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut mids: HashMap<MediaKind, Mid> = HashMap::new();
    let mut connected = false;
    // A viewer starts at a keyframe: drop video until one arrives.
    let mut waiting_keyframe = true;
    loop {
        let timeout = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => connected = true,
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => return,
                    Event::MediaAdded(m) => {
                        mids.insert(m.kind, m.mid);
                    }
                    Event::MediaData(d) => {
                        if let Role::Publisher { frames, .. } = &role {
                            let kind = if d.params.spec().codec.is_audio() {
                                MediaKind::Audio
                            } else {
                                MediaKind::Video
                            };
                            let _ = frames.send(Frame {
                                kind,
                                params: d.params,
                                time: d.time,
                                data: d.data,
                            });
                        }
                    }
                    _ => {}
                },
                Err(_) => return,
            }
        };
        let sleep = tokio::time::sleep_until(timeout.into());
        let input = match &mut role {
            Role::Publisher { kf_rx, .. } => tokio::select! {
                _ = cancel.cancelled() => return,
                r = socket.recv_from(&mut buf) => Some(r),
                Some(()) = kf_rx.recv() => {
                    if let Some(mid) = mids.get(&MediaKind::Video) {
                        if let Some(mut w) = rtc.writer(*mid) {
                            let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
                        }
                    }
                    continue;
                }
                _ = sleep => None,
            },
            Role::Viewer { frames } => tokio::select! {
                _ = cancel.cancelled() => return,
                r = socket.recv_from(&mut buf) => Some(r),
                f = frames.recv() => {
                    let Ok(f) = f else { continue };
                    if !connected {
                        continue;
                    }
                    let is_key = loadtest::whep::is_decodable_start(f.params.spec().codec, &f.data);
                    if f.kind == MediaKind::Video {
                        if waiting_keyframe && !is_key {
                            continue;
                        }
                        waiting_keyframe = false;
                    }
                    let Some(mid) = mids.get(&f.kind) else { continue };
                    let Some(w) = rtc.writer(*mid) else { continue };
                    let Some(pt) = w.match_params(f.params) else { continue };
                    let _ = w.write(pt, Instant::now(), f.time, f.data);
                    continue;
                }
                _ = sleep => None,
            },
        };
        let now = Instant::now();
        let res = match input {
            Some(Ok((n, source))) => match buf[..n].try_into() {
                Ok(contents) => rtc.handle_input(Input::Receive(
                    now,
                    Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: local,
                        contents,
                    },
                )),
                Err(_) => Ok(()),
            },
            Some(Err(_)) => return,
            None => rtc.handle_input(Input::Timeout(now)),
        };
        if res.is_err() {
            return;
        }
    }
}
