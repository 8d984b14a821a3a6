//! `--auth-webhook` against the real binary: a small HTTP server in the
//! test plays the operator's auth service, records every body it is sent
//! and answers by stream name (`ok…` 200, `no…` 403, `hang…` never). WHIP,
//! RTMP (ffmpeg), WHEP (a real viewer) and the OvenPlayer WebSocket are
//! decided by it; the operator's own tokens pass without a call; a silent
//! service refuses after ~2 s; identical requests within 10 s cost one call.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use common::{ffmpeg_publish, metric_sum, wait_live, Node, TOKEN};
use serde_json::Value;

/// The test's auth service: every body received, in order.
#[derive(Clone, Default)]
struct Hook(Arc<Mutex<Vec<Value>>>);

impl Hook {
    /// Serves on loopback; returns its URL.
    async fn start(&self) -> String {
        async fn decide(State(h): State<Hook>, Json(body): Json<Value>) -> StatusCode {
            let stream = body["stream"].as_str().unwrap_or_default().to_string();
            h.0.lock().unwrap().push(body);
            if stream.starts_with("ok") {
                StatusCode::OK
            } else if stream.starts_with("hang") {
                tokio::time::sleep(Duration::from_secs(60)).await;
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            }
        }
        let app = Router::new()
            .route("/auth", post(decide))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/auth", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// Bodies received about `stream`.
    fn calls(&self, stream: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b["stream"] == stream)
            .cloned()
            .collect()
    }
}

async fn whip(http: &str, stream: &str, token: &str) -> u16 {
    let offer = loadtest::whip::offer_sdp(loadtest::media::Profile::default(), true).unwrap();
    reqwest::Client::new()
        .post(format!("{http}/whip/{stream}"))
        .header("content-type", "application/sdp")
        .bearer_auth(token)
        .body(offer)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn whep(http: &str, stream: &str, token: Option<&str>) -> u16 {
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    let mut rq = reqwest::Client::new()
        .post(format!("{http}/whep/{stream}"))
        .header("content-type", "application/sdp")
        .body(offer);
    if let Some(t) = token {
        rq = rq.bearer_auth(t);
    }
    rq.send().await.unwrap().status().as_u16()
}

/// A WebSocket upgrade request as a browser sends it; the status of the
/// answer (101 when upgraded).
async fn ws(http: &str, stream: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{http}/ws/live/{stream}?token={token}"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn metrics(http: &str) -> String {
    reqwest::get(format!("{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn start_node(url: &str) -> Node {
    // Refusals below must stay 401s, not turn into 429s.
    Node::start("all", &["--auth-webhook", url, "--auth-max-failures", "0"])
}

/// WHIP, WHEP and the WebSocket: the webhook allows and refuses, gets the
/// contract's body, is not asked about the operator's token, and answers
/// identical requests from its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_whep_and_ws_ask_the_webhook() {
    let hook = Hook::default();
    let node = start_node(&hook.start().await);
    let http = &node.http;

    // WHIP, allowed: the body carries every field of the contract.
    assert_eq!(whip(http, "ok-pub", "user-token").await, 201);
    let calls = hook.calls("ok-pub");
    assert_eq!(calls.len(), 1, "{calls:?}");
    let b = &calls[0];
    assert_eq!(b["action"], "publish");
    assert_eq!(b["protocol"], "whip");
    assert_eq!(b["token"], "user-token");
    let remote = b["remote_addr"].as_str().unwrap();
    let addr: std::net::SocketAddr = remote.parse().unwrap();
    assert_eq!(
        addr.ip(),
        std::net::IpAddr::from([127, 0, 0, 1]),
        "{remote}"
    );
    assert_ne!(addr.port(), 0);
    assert_eq!(
        b.as_object().unwrap().len(),
        5,
        "exactly action, stream, protocol, remote_addr, token: {b}"
    );

    // WHIP, refused; again within 10 s: the cached refusal, no call.
    assert_eq!(whip(http, "no-pub", "user-token").await, 401);
    assert_eq!(whip(http, "no-pub", "user-token").await, 401);
    assert_eq!(
        hook.calls("no-pub").len(),
        1,
        "second answer from the cache"
    );
    // Another token is another question.
    assert_eq!(whip(http, "no-pub", "other-token").await, 401);
    assert_eq!(hook.calls("no-pub").len(), 2);

    // The operator's publish token: no call, even for a refused name.
    assert_eq!(whip(http, "no-own", TOKEN).await, 201);
    assert!(hook.calls("no-own").is_empty());

    // WHEP and the WebSocket on a live stream (published with the
    // operator's token, so without a call).
    let media = common::media(30).await;
    let _publisher = common::publish(http, "ok-live", media, 0).await;
    wait_live(http, "ok-live").await;
    let mut o = loadtest::whep::ViewerOptions::new(format!("{http}/whep/ok-live"));
    o.token = Some("viewer-token".into());
    o.duration = Some(Duration::from_secs(3));
    let viewer = loadtest::whep::Viewer::start(o)
        .await
        .expect("the webhook allows the view");
    let report = tokio::time::timeout(Duration::from_secs(25), viewer.finish_duration())
        .await
        .unwrap()
        .unwrap();
    assert!(report.connected && report.video_frames > 10, "{report:?}");
    let calls = hook.calls("ok-live");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["action"], "view");
    assert_eq!(calls[0]["protocol"], "whep");
    assert_eq!(calls[0]["token"], "viewer-token");

    // WHEP refused; without a token the body says null. Viewing is closed
    // although --viewer-token is unset.
    assert_eq!(whep(http, "no-view", None).await, 401);
    let calls = hook.calls("no-view");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["token"], Value::Null);
    assert_eq!(calls[0]["protocol"], "whep");

    // The OvenPlayer WebSocket: refused before the upgrade, allowed to it.
    assert_eq!(ws(http, "no-ws", "t").await, 401);
    assert_eq!(ws(http, "ok-live", "ws-token").await, 101);
    for (stream, n) in [("no-ws", 1), ("ok-live", 2)] {
        let calls = hook.calls(stream);
        assert_eq!(calls.len(), n, "{stream}: {calls:?}");
        let last = calls.last().unwrap();
        assert_eq!(last["protocol"], "ws", "{stream}");
        assert_eq!(last["action"], "view", "{stream}");
    }

    let m = metrics(http).await;
    assert!(metric_sum(&m, "cascade_auth_webhook_cache_hits_total") >= 1.0);
    assert!(m.contains("cascade_auth_webhook_requests_total{result=\"allow\"}"));
    assert!(m.contains("cascade_auth_webhook_requests_total{result=\"deny\"}"));
    assert!(metric_sum(&m, "cascade_auth_webhook_seconds_count") >= 5.0);
}

/// RTMP from ffmpeg: an allowed key goes live; a refused one is told
/// `NetStream.Publish.Unauthorized` (ffmpeg exits with an error) and never
/// appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_publish_asks_the_webhook() {
    let hook = Hook::default();
    let node = start_node(&hook.start().await);
    let rtmp = node.rtmp.clone().unwrap();

    let mut ok = ffmpeg_publish(&format!("rtmp://{rtmp}/live/ok-rtmp?token=enc"), &[], 8);
    wait_live(&node.http, "ok-rtmp").await;
    let calls = hook.calls("ok-rtmp");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["action"], "publish");
    assert_eq!(calls[0]["protocol"], "rtmp");
    assert_eq!(calls[0]["token"], "enc");
    assert!(calls[0]["remote_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    let mut no = ffmpeg_publish(&format!("rtmp://{rtmp}/live/no-rtmp?token=enc"), &[], 8);
    let status = tokio::time::timeout(Duration::from_secs(20), no.wait())
        .await
        .expect("ffmpeg gives up on a refused publish")
        .unwrap();
    assert!(!status.success(), "refused publish: {status:?}");
    assert_eq!(hook.calls("no-rtmp").len(), 1);
    let streams: Value = reqwest::get(format!("{}/api/streams", node.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !streams.to_string().contains("no-rtmp"),
        "refused stream is not live: {streams}"
    );
    let _ = ok.kill().await;
}

/// An auth service that never answers refuses after its 2 s timeout (the
/// publisher is not held longer); one that cannot be reached refuses at
/// once. Both are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_dead_webhook_refuses() {
    let hook = Hook::default();
    let node = start_node(&hook.start().await);
    let started = Instant::now();
    assert_eq!(whip(&node.http, "hang-1", "t").await, 401);
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_secs(6),
        "refused after the 2 s timeout, took {took:?}"
    );
    assert_eq!(hook.calls("hang-1").len(), 1);
    let m = metrics(&node.http).await;
    assert!(m.contains("cascade_auth_webhook_requests_total{result=\"timeout\"} 1"));
    // The operator's token still publishes while the service hangs.
    assert_eq!(whip(&node.http, "hang-own", TOKEN).await, 201);
    drop(node);

    // Nothing listens on the URL's port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = start_node(&format!("http://127.0.0.1:{port}/auth"));
    let started = Instant::now();
    assert_eq!(whip(&node.http, "any", "t").await, 401);
    assert!(started.elapsed() < Duration::from_millis(1500));
    let m = metrics(&node.http).await;
    assert!(m.contains("cascade_auth_webhook_requests_total{result=\"error\"} 1"));
}
