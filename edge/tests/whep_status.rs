//! Every WHEP error status of INTERFACE.md's table, over a real socket:
//! 404 not live, 406 codec, 400 malformed, 415 content type, 413 body size,
//! 401 viewer token, 503 + Retry-After at the viewer limit.
#![allow(clippy::unwrap_used)]

mod common;

use common::{media, Edge, Publisher};
use loadtest::http::{client, post_offer, post_raw};
use loadtest::whep::{offer_sdp, VideoCodec, Viewer, ViewerOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_errors() {
    let edge = Edge::start(Default::default()).await;
    let _p = Publisher::start(&edge.registry, "live", media(30).await, 0);
    let good = offer_sdp(&[VideoCodec::H264], true).unwrap();

    let r = post_offer(&edge.whep_url("nothere"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("not live"), "{}", r.body);

    let vp8 = offer_sdp(&[VideoCodec::Vp8], true).unwrap();
    let r = post_offer(&edge.whep_url("live"), &vp8, None)
        .await
        .unwrap();
    assert_eq!(r.status, 406, "{}", r.body);
    assert!(
        r.body.contains("H264"),
        "406 names the stream's codec: {}",
        r.body
    );

    let r = post_offer(&edge.whep_url("live"), "v=0\r\nthis is not sdp\r\n", None)
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);

    let r = post_raw(
        &client().unwrap(),
        &edge.whep_url("live"),
        "text/plain",
        good.clone().into_bytes(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 415);

    let big = format!(
        "{good}{}",
        "a=x-padding:xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
            .repeat(1000)
    );
    let r = post_offer(&edge.whep_url("live"), &big, None)
        .await
        .unwrap();
    assert_eq!(r.status, 413);

    let r = post_offer(&edge.whep_url("bad%20name"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    // The good offer still works after all that.
    let r = post_offer(&edge.whep_url("live"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.header("location").unwrap().starts_with("/whep/live/"));
    assert_eq!(r.header("content-type"), Some("application/sdp"));
    assert!(r.header("etag").is_some());
    // The answer: only what we send (one H.264 PT + RTX, Opus), our host
    // candidate, MID but no transport-wide-cc (no feedback we would ignore).
    let answer = &r.body;
    assert!(
        answer.contains("a=candidate:") && answer.contains("127.0.0.1"),
        "{answer}"
    );
    assert!(
        answer.contains("urn:ietf:params:rtp-hdrext:sdes:mid"),
        "{answer}"
    );
    assert!(!answer.contains("transport-wide-cc"), "{answer}");
    assert_eq!(answer.matches(" H264/90000").count(), 1, "{answer}");
    assert!(answer.contains("a=sendonly"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_token() {
    let edge = Edge::start(cascade_edge::Config {
        viewer_token: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    let _p = Publisher::start(&edge.registry, "tok", media(30).await, 0);
    let good = offer_sdp(&[VideoCodec::H264], true).unwrap();
    let url = edge.whep_url("tok");
    assert_eq!(post_offer(&url, &good, None).await.unwrap().status, 401);
    assert_eq!(
        post_offer(&url, &good, Some("wrong")).await.unwrap().status,
        401
    );
    assert_eq!(
        post_offer(&url, &good, Some("s3cret"))
            .await
            .unwrap()
            .status,
        201
    );
    let r = post_offer(&format!("{url}?token=s3cret"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_limit_answers_503_with_retry_after() {
    let edge = Edge::start(cascade_edge::Config {
        max_viewers: 1,
        ..Default::default()
    })
    .await;
    let _p = Publisher::start(&edge.registry, "full", media(30).await, 0);
    let mut first = Viewer::start(ViewerOptions::new(edge.whep_url("full")))
        .await
        .unwrap();
    first.wait_connected().await.unwrap();
    let good = offer_sdp(&[VideoCodec::H264], true).unwrap();
    let r = post_offer(&edge.whep_url("full"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    // A refused offer must not leak a slot: after the first leaves, one fits.
    let (status, _) = first.delete().await.unwrap();
    assert_eq!(status, 200);
    let ok = common::eventually(std::time::Duration::from_secs(3), || {
        edge.rtc.sessions() == 0
    })
    .await;
    assert!(ok);
    let r = post_offer(&edge.whep_url("full"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_session_limit_answers_503() {
    let edge = Edge::start_with(Default::default(), 1).await;
    let _p = Publisher::start(&edge.registry, "node", media(30).await, 0);
    let good = offer_sdp(&[VideoCodec::H264], true).unwrap();
    assert_eq!(
        post_offer(&edge.whep_url("node"), &good, None)
            .await
            .unwrap()
            .status,
        201
    );
    let r = post_offer(&edge.whep_url("node"), &good, None)
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
}
