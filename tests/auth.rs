//! Who may do what, against the real binary: `--api-token` on `/api/*`
//! and `/metrics`, wrong tokens rate-limited per IP (429 + Retry-After),
//! signed tokens (`--token-secret`) per stream and action.

#![allow(clippy::unwrap_used)]

mod common;
mod rtmp_client;

use common::Node;

async fn get(url: &str, bearer: Option<&str>) -> u16 {
    let mut rq = reqwest::Client::new().get(url);
    if let Some(t) = bearer {
        rq = rq.bearer_auth(t);
    }
    rq.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_guards_api_and_metrics() {
    let open = Node::start("all", &[]);
    assert_eq!(get(&format!("{}/api/streams", open.http), None).await, 200);
    assert_eq!(get(&format!("{}/metrics", open.http), None).await, 200);
    drop(open);

    let node = Node::start("all", &["--api-token", "api-s3cret"]);
    for path in ["/api/streams", "/metrics"] {
        let url = format!("{}{path}", node.http);
        assert_eq!(get(&url, None).await, 401, "{path} without token");
        assert_eq!(get(&url, Some("wrong")).await, 401, "{path} wrong token");
        assert_eq!(
            get(&url, Some("api-s3cret")).await,
            200,
            "{path} right token"
        );
    }
    assert_eq!(get(&format!("{}/healthz", node.http), None).await, 200);
}

async fn whip(http: &str, stream: &str, token: &str, from: [u8; 4]) -> reqwest::Response {
    let offer = loadtest::whip::offer_sdp(loadtest::media::Profile::default(), true).unwrap();
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap()
        .post(format!("{http}/whip/{stream}"))
        .header("content-type", "application/sdp")
        .bearer_auth(token)
        .body(offer)
        .send()
        .await
        .unwrap()
}

/// 1,000 wrong WHIP tokens from one address: 401 for the first ten, then
/// 429 with Retry-After; the right token from that address is refused too
/// (the ban is on the address), another address still publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_are_rate_limited_per_address() {
    let node = Node::start("all", &[]);
    let mut statuses = Vec::new();
    // One client (keep-alive) and one offer: the figure is the server's.
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 1]))
        .build()
        .unwrap();
    let offer = loadtest::whip::offer_sdp(loadtest::media::Profile::default(), true).unwrap();
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        let r = client
            .post(format!("{}/whip/s1", node.http))
            .header("content-type", "application/sdp")
            .bearer_auth("wrong")
            .body(offer.clone())
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        if s == 429 {
            let secs: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&secs), "Retry-After {secs}");
        }
        statuses.push(s);
    }
    let took = started.elapsed();
    assert!(
        statuses[..10].iter().all(|s| *s == 401),
        "{:?}",
        &statuses[..12]
    );
    assert!(
        statuses[10..].iter().all(|s| *s == 429),
        "{:?}",
        &statuses[..12]
    );
    eprintln!("1000 wrong tokens answered in {took:?}");

    let r = whip(&node.http, "s1", common::TOKEN, [127, 0, 0, 1]).await;
    assert_eq!(r.status(), 429, "right token from a banned address");
    let r = whip(&node.http, "s1", common::TOKEN, [127, 0, 0, 2]).await;
    assert_eq!(r.status(), 201, "another address publishes");

    let text = reqwest::get(format!("{}/metrics", node.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let limited: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("cascade_auth_refused_total")
                && l.contains("protocol=\"whip\"")
                && l.contains("reason=\"rate_limited\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(limited, 991.0, "{text}");
}

const SECRET: &str = "test-token-secret-0123456789abcdef";

/// A signed token as an operator's backend would mint it.
fn jwt(sub: &str, act: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "act": act, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// `--token-secret`: a publish JWT for `a` publishes `a` over WHIP and
/// RTMP, not `b`; a view JWT does not publish; WHEP (viewer token set)
/// takes a view JWT for the stream, not one for another stream. The
/// static tokens still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_tokens_per_stream_and_action() {
    let node = Node::start(
        "all",
        &[
            "--token-secret",
            SECRET,
            "--viewer-token",
            "view-static",
            // Refusals below must stay 401s.
            "--auth-max-failures",
            "0",
        ],
    );
    let lo = [127, 0, 0, 1];
    // WHIP.
    let r = whip(&node.http, "a", &jwt("a", "publish"), lo).await;
    assert_eq!(r.status(), 201, "publish JWT for its stream");
    let r = whip(&node.http, "b", &jwt("a", "publish"), lo).await;
    assert_eq!(r.status(), 401, "publish JWT for another stream");
    let r = whip(&node.http, "c", &jwt("c", "view"), lo).await;
    assert_eq!(r.status(), 401, "view JWT cannot publish");
    let r = whip(&node.http, "d", &jwt("*", "publish"), lo).await;
    assert_eq!(r.status(), 201, "publish JWT for every stream");
    let r = whip(&node.http, "e", common::TOKEN, lo).await;
    assert_eq!(r.status(), 201, "static publish token");

    // RTMP: `?token=JWT` in the stream key.
    let rtmp = node.rtmp.clone().unwrap();
    let _ok =
        rtmp_client::Client::publish(&rtmp, "live", &format!("r1?token={}", jwt("r1", "publish")))
            .await;
    let (addr, key) = (rtmp.clone(), format!("r2?token={}", jwt("r1", "publish")));
    let refused = tokio::spawn(async move {
        rtmp_client::Client::publish(&addr, "live", &key).await;
    })
    .await;
    assert!(
        refused.is_err(),
        "RTMP publish with a JWT for another stream is refused"
    );

    // WHEP: a view JWT for the stream.
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    let whep = |stream: &str, token: String| {
        reqwest::Client::new()
            .post(format!("{}/whep/{stream}", node.http))
            .header("content-type", "application/sdp")
            .bearer_auth(token)
            .body(offer.clone())
            .send()
    };
    let r = whep("a", jwt("b", "view")).await.unwrap();
    assert_eq!(r.status(), 401, "view JWT for another stream");
    let r = whep("a", jwt("a", "publish")).await.unwrap();
    assert_eq!(r.status(), 401, "publish JWT cannot view");
    let r = whep("a", jwt("a", "view")).await.unwrap();
    assert_ne!(
        r.status(),
        401,
        "view JWT for its stream passes the token check"
    );
    assert!(
        r.status().is_success() || r.status() == 404,
        "{}",
        r.status()
    );
    let r = whep("a", "view-static".into()).await.unwrap();
    assert_ne!(r.status(), 401, "static viewer token");
}
