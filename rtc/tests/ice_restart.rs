//! The WHIP/WHEP resource protocol against a real full-ICE str0m client over
//! loopback UDP: create (201 + Location + ETag + Link), trickle (204), ICE
//! restart through PATCH (428 without If-Match, 412 on a stale ETag, 200 +
//! new credentials + new ETag), the client reconnecting with the new
//! credentials, and the session still answering DELETE afterwards.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use cascade_rtc::ice::{IceServers, Url};
use cascade_rtc::Server;
use str0m::change::SdpAnswer;
use str0m::{Candidate, Event, IceConnectionState, Rtc};
use tokio::net::UdpSocket;
use tower::ServiceExt;

mod common;

use common::{attr, Client, Test};

async fn call(app: &axum::Router, req: Request<Body>) -> (Response<Body>, String) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (
        Response::from_parts(parts, Body::empty()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn patch(url: &str, if_match: Option<&str>, body: String) -> Request<Body> {
    let mut b = Request::patch(url).header("content-type", "application/trickle-ice-sdpfrag");
    if let Some(m) = if_match {
        b = b.header("if-match", m);
    }
    b.body(Body::from(body)).unwrap()
}

fn replace_creds(sdp: &str, ufrag: &str, pwd: &str) -> String {
    sdp.lines()
        .map(|l| {
            if l.starts_with("a=ice-ufrag:") {
                format!("a=ice-ufrag:{ufrag}")
            } else if l.starts_with("a=ice-pwd:") {
                format!("a=ice-pwd:{pwd}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
        + "\r\n"
}

#[tokio::test]
async fn trickle_and_ice_restart_with_a_full_ice_client() {
    let server = Server::bind(cascade_rtc::Config {
        udp: "127.0.0.1:0".parse().unwrap(),
        tcp: None,
        advertise: vec!["127.0.0.1".parse().unwrap()],
        shards: 1,
        max_sessions: 16,
        ice: IceServers {
            urls: vec![
                Url::parse("stun:198.18.0.1:3478").unwrap(),
                Url::parse("turn:198.18.0.1:3478?transport=udp").unwrap(),
            ],
            turn_secret: Some("secret".into()),
            turn_ttl: Duration::from_secs(600),
        },
        gso: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let app = cascade_rtc::http::router(
        Arc::new(Test {
            server: server.clone(),
        }),
        server.clone(),
    );

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = socket.local_addr().unwrap();
    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_channel("x".into());
    let (offer, pending) = api.apply().unwrap();
    let offer_text = offer.to_sdp_string();

    let (res, answer) = call(
        &app,
        Request::post("/whep/s1")
            .header("content-type", "application/sdp")
            .header("origin", "https://player.example")
            .body(Body::from(offer_text.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED, "{answer}");
    let h = res.headers();
    let location = h["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/whep/s1/"), "{location}");
    let etag = h["etag"].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "quoted etag {etag}"
    );
    assert_eq!(h["access-control-allow-origin"], "https://player.example");
    let expose = h["access-control-expose-headers"].to_str().unwrap();
    for e in ["Location", "ETag", "Link"] {
        assert!(expose.contains(e), "{expose}");
    }
    let links: Vec<&str> = h
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");
    assert_eq!(links[0], "<stun:198.18.0.1:3478>; rel=\"ice-server\"");
    assert!(
        links[1].contains("username=\"") && links[1].contains("credential-type=\"password\""),
        "{links:?}"
    );

    rtc.sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    let mut client = Client::from_parts(rtc, socket, local);
    assert!(
        client
            .drive(Duration::from_secs(10), |e| matches!(e, Event::Connected))
            .await,
        "client connects"
    );

    // Trickle with the current ufrag (RFC 8840 fragments repeat it): 204, no ETag.
    let ufrag = attr(&offer_text, "a=ice-ufrag:").to_string();
    let pwd = attr(&offer_text, "a=ice-pwd:").to_string();
    let frag = format!(
        "a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n"
    );
    let (res, _) = call(&app, patch(&location, Some(&etag), frag.clone())).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(
        res.headers().get("etag").is_none(),
        "trickle keeps the etag"
    );
    let (res, _) = call(&app, patch(&location, None, frag.clone())).await;
    assert_eq!(
        res.status(),
        StatusCode::NO_CONTENT,
        "trickle without If-Match is accepted"
    );
    let (res, _) = call(&app, patch(&location, Some("\"nope\""), frag)).await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED);

    // ICE restart: the client makes new credentials.
    let mut api = client.rtc.sdp_api();
    api.ice_restart(true);
    let (offer, pending) = api.apply().unwrap();
    let offer_text = offer.to_sdp_string();
    let (nu, np) = (
        attr(&offer_text, "a=ice-ufrag:"),
        attr(&offer_text, "a=ice-pwd:"),
    );
    assert_ne!(nu, ufrag);
    let frag = format!("a=ice-ufrag:{nu}\r\na=ice-pwd:{np}\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n");
    let (res, _) = call(&app, patch(&location, None, frag.clone())).await;
    assert_eq!(
        res.status(),
        StatusCode::PRECONDITION_REQUIRED,
        "restart needs If-Match"
    );
    let (res, body) = call(&app, patch(&location, Some("\"stale\""), frag.clone())).await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED, "{body}");
    let (res, body) = call(&app, patch(&location, Some("*"), frag)).await;
    assert_eq!(res.status(), StatusCode::OK, "{body}");
    assert_eq!(
        res.headers()["content-type"],
        "application/trickle-ice-sdpfrag"
    );
    let new_etag = res.headers()["etag"].to_str().unwrap().to_string();
    assert_ne!(new_etag, etag);
    let (su, sp) = (attr(&body, "a=ice-ufrag:"), attr(&body, "a=ice-pwd:"));
    assert_ne!(su, attr(&answer, "a=ice-ufrag:"), "server ufrag changes");
    assert!(
        body.contains("a=mid:0") && body.contains("a=candidate:"),
        "{body}"
    );

    let answer = SdpAnswer::from_sdp_string(&replace_creds(&answer, su, sp)).unwrap();
    client.rtc.sdp_api().accept_answer(pending, answer).unwrap();
    assert!(
        client
            .drive(Duration::from_secs(10), |e| matches!(
                e,
                Event::IceConnectionStateChange(
                    IceConnectionState::Connected | IceConnectionState::Completed
                )
            ))
            .await,
        "client reconnects with the new credentials"
    );

    // The old ETag is gone; the new one works.
    let frag = format!("a=ice-ufrag:{nu}\r\na=ice-pwd:{np}\r\n");
    let (res, _) = call(&app, patch(&location, Some(&etag), frag.clone())).await;
    assert_eq!(res.status(), StatusCode::PRECONDITION_FAILED);
    let (res, _) = call(&app, patch(&location, Some(&new_etag), frag)).await;
    assert_eq!(
        res.status(),
        StatusCode::NO_CONTENT,
        "same ufrag again is trickle"
    );

    // Still connected a while later (consent with the new credentials holds).
    let mut disconnected = false;
    client
        .drive(Duration::from_secs(2), |e| {
            disconnected |= matches!(
                e,
                Event::IceConnectionStateChange(IceConnectionState::Disconnected)
            );
            false
        })
        .await;
    assert!(!disconnected);
    assert_eq!(server.sessions(), 1);

    let (res, _) = call(
        &app,
        Request::delete(&location).body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let (res, _) = call(
        &app,
        Request::delete(&location).body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}
