//! `--events-webhook` and `POST /api/drain` with the real binary: a test
//! HTTP receiver records the batches while a WHIP publisher goes live, a
//! WHEP viewer watches and leaves, the publisher leaves and the node drains;
//! a receiver that never answers costs the media nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use common::{media, publish, view, wait_live, Node};
use serde_json::Value;

type Seen = Arc<Mutex<Vec<Value>>>;

/// Starts a receiver on loopback; `delay` holds every answer that long.
async fn receiver(delay: Duration) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route(
            "/events",
            post(
                |State((seen, delay)): State<(Seen, Duration)>, Json(v): Json<Value>| async move {
                    seen.lock().unwrap().push(v);
                    tokio::time::sleep(delay).await;
                    "ok"
                },
            ),
        )
        .with_state((seen.clone(), delay));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/events"), seen)
}

/// Every event received so far, flattened out of their batches.
fn events(seen: &Seen) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
        .collect()
}

async fn wait_for(seen: &Seen, what: impl Fn(&Value) -> bool, label: &str) -> Value {
    for _ in 0..200 {
        if let Some(e) = events(seen).into_iter().find(&what) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {label} event; got {:?}", events(seen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_viewers_and_drain_reach_the_webhook() {
    let (url, seen) = receiver(Duration::ZERO).await;
    let mut node = Node::start(
        "all",
        &[
            "--events-webhook",
            &url,
            "--api-token",
            "api-secret",
            "--drain-timeout",
            "20s",
        ],
    );
    let m = media(30).await;
    let publisher = publish(&node.http, "evt", m, 0).await;
    // (`/api/streams` needs the API token here: the event says it is live.)
    let start = wait_for(
        &seen,
        |e| e["type"] == "publish_start" && e["stream"] == "evt",
        "publish_start",
    )
    .await;
    assert_eq!(start["protocol"], "whip");
    assert!(start["at"].as_u64().unwrap() > 1_700_000_000_000, "{start}");
    let batch = seen.lock().unwrap()[0].clone();
    assert!(
        batch["node"].as_str().unwrap().starts_with("all "),
        "{batch}"
    );

    let viewer = loadtest::whep::Viewer::start(loadtest::whep::ViewerOptions::new(format!(
        "{}/whep/evt",
        node.http
    )))
    .await
    .unwrap();
    viewer
        .wait_video_frames(10, Duration::from_secs(10))
        .await
        .unwrap();
    wait_for(
        &seen,
        |e| e["type"] == "viewers" && e["stream"] == "evt" && e["delta"] == 1,
        "viewer join",
    )
    .await;
    let (status, _) = viewer.delete().await.unwrap();
    assert_eq!(status, 200);
    wait_for(
        &seen,
        |e| e["type"] == "viewers" && e["viewers"] == 0 && e["delta"] == -1,
        "viewer leave",
    )
    .await;

    // Drain over HTTP: a wrong token changes nothing, the right one drains.
    let http = reqwest::Client::new();
    let drain = |t: &'static str| {
        http.post(format!("{}/api/drain", node.http))
            .bearer_auth(t)
            .send()
    };
    assert_eq!(drain("wrong").await.unwrap().status(), 401);
    let health = reqwest::get(format!("{}/healthz", node.http))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let r = drain("api-secret").await.unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["timeout_s"], 20);
    let d = wait_for(&seen, |e| e["type"] == "drain", "drain").await;
    assert_eq!(d["timeout_s"], 20);
    let health = reqwest::get(format!("{}/healthz", node.http))
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    // The publisher keeps the node in its drain; when it leaves, the node
    // reports the stop and exits 0 long before the 20 s deadline.
    let (status, _) = publisher.delete().await.unwrap();
    assert_eq!(status, 200);
    wait_for(
        &seen,
        |e| e["type"] == "publish_stop" && e["stream"] == "evt",
        "publish_stop",
    )
    .await;
    let code = tokio::task::spawn_blocking(move || node.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "exit 0 once the last publisher left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_costs_the_media_nothing() {
    let (url, seen) = receiver(Duration::from_secs(3600)).await;
    let node = Node::start("all", &["--events-webhook", &url]);
    let m = media(30).await;
    let _publisher = publish(&node.http, "slow", m, 0).await;
    wait_live(&node.http, "slow").await;
    let report = view(&node.http, "slow", 3).await;
    common::assert_good_viewer(&report);
    // The first batch arrived (and hangs); the node gave up on it after 2 s
    // and counted the failure.
    wait_for(&seen, |e| e["type"] == "publish_start", "publish_start").await;
    let mut failed = 0.0;
    for _ in 0..100 {
        let text = reqwest::get(format!("{}/metrics", node.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        failed = common::metric_sum(&text, "cascade_events_posts_total{result=\"error\"}");
        if failed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed >= 1.0, "a hung POST is abandoned and counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_state_changes_reach_the_webhook() {
    let (url, seen) = receiver(Duration::ZERO).await;
    let node = Node::start("all", &["--events-webhook", &url]);
    let http = reqwest::Client::new();
    // A camera that is not there: nothing listens on port 1.
    let r = http
        .post(format!("{}/api/pulls", node.http))
        .bearer_auth(common::TOKEN)
        .json(&serde_json::json!({"stream": "cam", "url": "rtsp://user:secret@127.0.0.1:1/x"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let e = wait_for(
        &seen,
        |e| e["type"] == "pull" && e["stream"] == "cam" && e["state"] == "error",
        "pull error",
    )
    .await;
    assert!(e["error"].as_str().is_some_and(|t| !t.is_empty()), "{e}");
    // Credentials never leave the node, events included.
    assert!(!format!("{:?}", events(&seen)).contains("secret"));
    let r = http
        .delete(format!("{}/api/pulls/cam", node.http))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    wait_for(
        &seen,
        |e| e["type"] == "pull" && e["stream"] == "cam" && e["state"] == "removed",
        "pull removed",
    )
    .await;
}
