//! Every status of INTERFACE.md's error table, against the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{media, publish, wait_live, Node, TOKEN};
use loadtest::whep::{offer_sdp, VideoCodec};

async fn post(
    url: &str,
    ctype: &str,
    body: impl Into<reqwest::Body>,
    token: Option<&str>,
) -> reqwest::Response {
    let mut rq = reqwest::Client::new()
        .post(url)
        .header("content-type", ctype)
        .body(body);
    if let Some(t) = token {
        rq = rq.bearer_auth(t);
    }
    rq.send().await.unwrap()
}

async fn status_and_text(r: reqwest::Response) -> (u16, String) {
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_errors() {
    let node = Node::start("all", &[]);
    let url = format!("{}/whip/s1", node.http);
    let offer = offer_sdp(&[VideoCodec::H264], true).unwrap();

    let (s, body) = status_and_text(post(&url, "application/sdp", offer.clone(), None).await).await;
    assert_eq!(s, 401, "no token");
    assert!(body.contains("token"), "{body}");
    let (s, _) =
        status_and_text(post(&url, "application/sdp", offer.clone(), Some("wrong")).await).await;
    assert_eq!(s, 401, "wrong token");
    let (s, body) =
        status_and_text(post(&url, "text/plain", offer.clone(), Some(TOKEN)).await).await;
    assert_eq!(s, 415);
    assert!(body.contains("application/sdp"), "{body}");
    let big = "a".repeat(65 * 1024);
    let (s, _) = status_and_text(post(&url, "application/sdp", big, Some(TOKEN)).await).await;
    assert_eq!(s, 413);
    let (s, body) =
        status_and_text(post(&url, "application/sdp", "garbage", Some(TOKEN)).await).await;
    assert_eq!(s, 400, "{body}");
    let bad = format!("{}/whip/bad%20name", node.http);
    let (s, body) =
        status_and_text(post(&bad, "application/sdp", offer.clone(), Some(TOKEN)).await).await;
    assert_eq!(s, 400, "{body}");
    let long = format!("{}/whip/{}", node.http, "a".repeat(65));
    let (s, _) = status_and_text(post(&long, "application/sdp", offer, Some(TOKEN)).await).await;
    assert_eq!(s, 400);
    // A recvonly offer publishes nothing.
    let recv = offer_sdp(&[VideoCodec::H264], true).unwrap();
    let (s, body) = status_and_text(post(&url, "application/sdp", recv, Some(TOKEN)).await).await;
    assert_eq!(s, 400, "recvonly offer to WHIP: {body}");
    // Unknown session resources.
    let r = reqwest::Client::new()
        .delete(format!(
            "{}/whip/s1/00000000000000000000000000000000",
            node.http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Preflight.
    let r = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "http://elsewhere.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(r.headers()["accept-post"], "application/sdp");
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://elsewhere.example"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_errors() {
    let node = Node::start("all", &["--viewer-token", "view-secret"]);
    let url = format!("{}/whep/s2", node.http);
    let h264 = offer_sdp(&[VideoCodec::H264], true).unwrap();

    let (s, _) = status_and_text(post(&url, "application/sdp", h264.clone(), None).await).await;
    assert_eq!(s, 401, "viewer token required when set");
    let (s, body) =
        status_and_text(post(&url, "application/sdp", h264.clone(), Some("view-secret")).await)
            .await;
    assert_eq!(s, 404, "not live: {body}");
    assert!(!body.is_empty());
    // ?token= works where headers cannot be sent.
    let (s, _) = status_and_text(
        post(
            &format!("{url}?token=view-secret"),
            "application/sdp",
            h264.clone(),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(s, 404);

    let p = publish(&node.http, "s2", media(30).await, 0).await;
    wait_live(&node.http, "s2").await;
    let vp8 = offer_sdp(&[VideoCodec::Vp8], false).unwrap();
    let (s, body) =
        status_and_text(post(&url, "application/sdp", vp8, Some("view-secret")).await).await;
    assert_eq!(s, 406, "{body}");
    assert!(
        body.contains("H264"),
        "406 names the stream's codec: {body}"
    );
    let (s, _) = status_and_text(
        post(
            &url,
            "application/x-www-form-urlencoded",
            h264.clone(),
            Some("view-secret"),
        )
        .await,
    )
    .await;
    assert_eq!(s, 415);
    let (s, _) =
        status_and_text(post(&url, "application/sdp", "v=0 nonsense", Some("view-secret")).await)
            .await;
    assert_eq!(s, 400);
    let (s, _) = status_and_text(
        post(
            &url,
            "application/sdp",
            vec![b'x'; 70_000],
            Some("view-secret"),
        )
        .await,
    )
    .await;
    assert_eq!(s, 413);
    let r = post(&url, "application/sdp", h264, Some("view-secret")).await;
    assert_eq!(r.status(), 201);
    assert!(r
        .headers()
        .get("location")
        .is_some_and(|l| l.to_str().unwrap().starts_with("/whep/s2/")));
    assert!(r.headers().get("etag").is_some());
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_node_is_503_with_retry_after() {
    let node = Node::start("all", &["--max-sessions", "1"]);
    let p = publish(&node.http, "s3", media(30).await, 0).await;
    wait_live(&node.http, "s3").await;
    let h264 = offer_sdp(&[VideoCodec::H264], true).unwrap();
    let r = post(
        &format!("{}/whep/s3", node.http),
        "application/sdp",
        h264,
        None,
    )
    .await;
    assert_eq!(r.status(), 503, "the publisher holds the only session");
    assert!(r.headers().get("retry-after").is_some());
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains() {
    let mut node = Node::start("all", &["--drain-timeout", "2s"]);
    let health = format!("{}/healthz", node.http);
    assert_eq!(reqwest::get(&health).await.unwrap().status(), 200);
    let p = publish(&node.http, "s4", media(30).await, 0).await;
    node.terminate();
    // While draining: healthz 503 and new sessions 503 + Retry-After.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reqwest::get(&health).await.unwrap().status(), 503);
    let h264 = offer_sdp(&[VideoCodec::H264], true).unwrap();
    let r = post(
        &format!("{}/whep/s4", node.http),
        "application/sdp",
        h264,
        None,
    )
    .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let code = tokio::task::spawn_blocking(move || node.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "exit 0 after the drain timeout");
    let _ = p.stop().await;
}

/// SIGTERM with a live RTMP publish: it runs on (a viewer keeps getting
/// frames) while a new RTMP publish is refused, and the node exits 0 once
/// the publisher is done, before the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_rtmp_publish_finish_and_refuses_new_ones() {
    let mut node = Node::start("all", &["--drain-timeout", "30s"]);
    let rtmp = node.rtmp.clone().unwrap();
    let url = |s: &str| format!("rtmp://{rtmp}/live/{s}?token={TOKEN}");
    let mut first = common::ffmpeg_publish(&url("r1"), &["-bf", "0"], 6);
    wait_live(&node.http, "r1").await;
    let mut o = loadtest::whep::ViewerOptions::new(format!("{}/whep/r1", node.http));
    o.duration = Some(Duration::from_secs(30));
    let v = loadtest::whep::Viewer::start(o).await.unwrap();
    v.wait_video_frames(5, Duration::from_secs(10))
        .await
        .unwrap();
    node.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = v.video_frames();
    let since = std::time::Instant::now();
    // A new publish is refused: ffmpeg gives up with an error.
    let mut second = common::ffmpeg_publish(&url("r2"), &["-bf", "0"], 3);
    let refused = tokio::time::timeout(Duration::from_secs(15), second.wait())
        .await
        .expect("the refused ffmpeg exits")
        .unwrap();
    assert!(!refused.success(), "publish during a drain must fail");
    // The running publish still flows to its viewer during the drain
    // (looked at 2 s into it: ~60 frames at 30 fps).
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(since.elapsed())).await;
    assert!(
        v.video_frames() > before + 10,
        "frames kept flowing: {} -> {}",
        before,
        v.video_frames()
    );
    let done = tokio::time::timeout(Duration::from_secs(20), first.wait())
        .await
        .expect("the first publish ends")
        .unwrap();
    assert!(done.success(), "the publish that was running completes");
    let code = tokio::task::spawn_blocking(move || node.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "exit 0 once the publisher left");
}
