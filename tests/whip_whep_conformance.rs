//! WHIP (RFC 9725) and WHEP session resources to the letter, against the
//! real binary: every status and header of INTERFACE.md's "Session
//! resources" (201 + Location + ETag, PATCH trickle 204 / ICE restart 200 +
//! new ETag, 412, 428, DELETE 200, OPTIONS with Accept-Post, CORS, Link
//! rel="ice-server" with coturn REST credentials) for both resources.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{media, publish, wait_live, Node, TOKEN};
use loadtest::whep::{offer_sdp, VideoCodec};
use reqwest::{Client, Method, Response};

const ORIGIN: &str = "https://player.example";

struct Kind {
    kind: &'static str,
    offer: String,
    token: Option<&'static str>,
}

fn whip() -> Kind {
    // The viewer offer turned around: the same m-lines, sending.
    let offer = offer_sdp(&[VideoCodec::H264], true)
        .unwrap()
        .replace("a=recvonly", "a=sendonly");
    Kind {
        kind: "whip",
        offer,
        token: Some(TOKEN),
    }
}

fn whep() -> Kind {
    Kind {
        kind: "whep",
        offer: offer_sdp(&[VideoCodec::H264], true).unwrap(),
        token: None,
    }
}

async fn create(node: &Node, k: &Kind, stream: &str) -> Response {
    let mut rq = Client::new()
        .post(format!("{}/{}/{stream}", node.http, k.kind))
        .header("content-type", "application/sdp")
        .header("origin", ORIGIN)
        .body(k.offer.clone());
    if let Some(t) = k.token {
        rq = rq.bearer_auth(t);
    }
    rq.send().await.unwrap()
}

async fn patch(url: &str, if_match: Option<&str>, ctype: &str, body: String) -> Response {
    let mut rq = Client::new()
        .patch(url)
        .header("content-type", ctype)
        .header("origin", ORIGIN)
        .body(body);
    if let Some(m) = if_match {
        rq = rq.header("if-match", m);
    }
    rq.send().await.unwrap()
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn attr<'a>(sdp: &'a str, name: &str) -> &'a str {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .unwrap_or_else(|| panic!("{name} in {sdp}"))
}

/// Everything a session resource must do, for one kind.
async fn resource_protocol(node: &Node, k: &Kind, stream: &str) {
    let base = format!("{}/{}/{stream}", node.http, k.kind);
    let http = Client::new();

    // Preflight of the POST: Accept-Post, the methods and headers a client sends.
    let r = http
        .request(Method::OPTIONS, &base)
        .header("origin", ORIGIN)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "{} preflight {}",
        k.kind,
        r.status()
    );
    assert_eq!(header(&r, "accept-post"), "application/sdp");
    assert_eq!(header(&r, "access-control-allow-origin"), ORIGIN);
    assert!(header(&r, "access-control-allow-methods").contains("POST"));
    let allowed = header(&r, "access-control-allow-headers").to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );

    // Create: 201 + Location + ETag + the answer, CORS exposing what clients read.
    let r = create(node, k, stream).await;
    assert_eq!(r.status(), 201, "{} create", k.kind);
    let location = header(&r, "location").to_string();
    assert!(
        location.starts_with(&format!("/{}/{stream}/", k.kind)),
        "{location}"
    );
    let etag = header(&r, "etag").to_string();
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "strong quoted etag: {etag}"
    );
    assert_eq!(header(&r, "content-type"), "application/sdp");
    assert_eq!(header(&r, "access-control-allow-origin"), ORIGIN);
    let expose = header(&r, "access-control-expose-headers").to_string();
    for h in ["Location", "ETag", "Link"] {
        assert!(expose.contains(h), "expose {h}: {expose}");
    }
    let answer = r.text().await.unwrap();
    assert!(answer.contains("a=ice-lite"), "ice-lite server");
    assert!(
        answer.contains("typ host") && answer.contains("tcptype passive"),
        "udp + passive tcp candidates: {answer}"
    );
    assert!(
        !answer
            .lines()
            .any(|l| l.starts_with("a=candidate") && l.contains(" ufrag ")),
        "no ufrag in candidates"
    );
    let url = format!("{}{location}", node.http);

    // Preflight of PATCH/DELETE with If-Match.
    let r = http
        .request(Method::OPTIONS, &url)
        .header("origin", ORIGIN)
        .header("access-control-request-method", "PATCH")
        .header("access-control-request-headers", "content-type, if-match")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let methods = header(&r, "access-control-allow-methods");
    assert!(
        methods.contains("PATCH") && methods.contains("DELETE"),
        "{methods}"
    );
    assert!(header(&r, "access-control-allow-headers")
        .to_ascii_lowercase()
        .contains("if-match"));
    assert_eq!(
        header(&r, "accept-patch"),
        "application/trickle-ice-sdpfrag"
    );

    // Trickle: the client's current ufrag + candidates → 204, no new ETag.
    let (u, p) = (attr(&k.offer, "a=ice-ufrag:"), attr(&k.offer, "a=ice-pwd:"));
    let trickle = format!(
        "a=ice-ufrag:{u}\r\na=ice-pwd:{p}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n"
    );
    let r = patch(
        &url,
        Some(&etag),
        "application/trickle-ice-sdpfrag",
        trickle.clone(),
    )
    .await;
    assert_eq!(r.status(), 204, "trickle");
    assert!(r.headers().get("etag").is_none(), "204 carries no ETag");
    assert_eq!(header(&r, "access-control-allow-origin"), ORIGIN);
    let r = patch(
        &url,
        Some("*"),
        "application/trickle-ice-sdpfrag",
        trickle.clone(),
    )
    .await;
    assert_eq!(r.status(), 204, "trickle with If-Match: *");
    let r = patch(
        &url,
        Some("\"0000\""),
        "application/trickle-ice-sdpfrag",
        trickle.clone(),
    )
    .await;
    assert_eq!(r.status(), 412, "stale ETag");
    let r = patch(&url, Some(&etag), "application/sdp", trickle.clone()).await;
    assert_eq!(
        r.status(),
        415,
        "PATCH needs application/trickle-ice-sdpfrag"
    );
    let r = patch(
        &url,
        Some(&etag),
        "application/trickle-ice-sdpfrag",
        "a=candidate:garbage\r\n".into(),
    )
    .await;
    assert_eq!(r.status(), 400, "bad candidate line");

    // ICE restart: new credentials → 428 without If-Match, 200 + new ETag with it.
    let restart = "a=ice-ufrag:newu\r\na=ice-pwd:newpasswordnewpassword12\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n".to_string();
    let r = patch(
        &url,
        None,
        "application/trickle-ice-sdpfrag",
        restart.clone(),
    )
    .await;
    assert_eq!(r.status(), 428, "restart without If-Match");
    let r = patch(
        &url,
        Some("\"0000\""),
        "application/trickle-ice-sdpfrag",
        restart.clone(),
    )
    .await;
    assert_eq!(r.status(), 412, "restart with a stale ETag");
    let r = patch(
        &url,
        Some(&etag),
        "application/trickle-ice-sdpfrag",
        restart.clone(),
    )
    .await;
    assert_eq!(r.status(), 200, "restart with the current ETag");
    assert_eq!(
        header(&r, "content-type"),
        "application/trickle-ice-sdpfrag"
    );
    let new_etag = header(&r, "etag").to_string();
    assert!(
        !new_etag.is_empty() && new_etag != etag,
        "new ETag {new_etag}"
    );
    let frag = r.text().await.unwrap();
    assert_ne!(
        attr(&frag, "a=ice-ufrag:"),
        attr(&answer, "a=ice-ufrag:"),
        "server ufrag changes"
    );
    assert!(
        frag.contains("a=ice-pwd:") && frag.contains("a=mid:0") && frag.contains("a=candidate:"),
        "{frag}"
    );
    let r = patch(
        &url,
        Some(&etag),
        "application/trickle-ice-sdpfrag",
        restart.clone(),
    )
    .await;
    assert_eq!(r.status(), 412, "the old ETag is stale after a restart");
    let again = "a=ice-ufrag:newer\r\na=ice-pwd:newerpasswordnewerpass12\r\n".to_string();
    let r = patch(&url, Some("*"), "application/trickle-ice-sdpfrag", again).await;
    assert_eq!(r.status(), 200, "restart with If-Match: *");
    assert_ne!(header(&r, "etag"), new_etag);

    // DELETE → 200, then the resource is gone.
    let r = http
        .delete(&url)
        .header("origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "DELETE");
    assert_eq!(header(&r, "access-control-allow-origin"), ORIGIN);
    let r = http.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 404, "DELETE twice");
    let r = patch(&url, Some("*"), "application/trickle-ice-sdpfrag", trickle).await;
    assert_eq!(r.status(), 404, "PATCH after DELETE");
    let other = format!("{base}/ffffffffffffffffffffffffffffffff");
    assert_eq!(http.delete(&other).send().await.unwrap().status(), 404);
    assert_eq!(
        http.delete(format!("{base}/not-a-session"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http.get(&base).send().await.unwrap().status(),
        405,
        "GET is not a method of the endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_session_resource() {
    let node = Node::start("all", &[]);
    resource_protocol(&node, &whip(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_session_resource() {
    let node = Node::start("all", &[]);
    let media = media(30).await;
    let _publisher = publish(&node.http, "live", media, 0).await;
    wait_live(&node.http, "live").await;
    resource_protocol(&node, &whep(), "live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_servers_as_link_headers_with_turn_rest_credentials() {
    let node = Node::start(
        "all",
        &[
            "--ice-servers",
            "stun:198.18.0.9:3478,turn:198.18.0.9:3478?transport=udp",
            "--turn-secret",
            "turn-secret",
            "--turn-ttl",
            "10m",
        ],
    );
    let media = media(30).await;
    let _publisher = publish(&node.http, "live", media, 0).await;
    wait_live(&node.http, "live").await;
    for k in [whip(), whep()] {
        let stream = if k.kind == "whip" { "other" } else { "live" };
        let r = create(&node, &k, stream).await;
        assert_eq!(r.status(), 201, "{}", k.kind);
        let links: Vec<String> = r
            .headers()
            .get_all("link")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(links.len(), 2, "{links:?}");
        assert_eq!(links[0], "<stun:198.18.0.9:3478>; rel=\"ice-server\"");
        let turn = &links[1];
        assert!(
            turn.starts_with(
                "<turn:198.18.0.9:3478?transport=udp>; rel=\"ice-server\"; username=\""
            ),
            "{turn}"
        );
        assert!(turn.ends_with("; credential-type=\"password\""), "{turn}");
        // coturn REST: username = expiry:random, expiry = now + ttl.
        let user = turn
            .split("username=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let expiry: u64 = user.split(':').next().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            expiry >= now + 590 && expiry <= now + 610,
            "expiry {expiry} vs now {now}"
        );
        let cred = turn
            .split("credential=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(cred.len(), 28, "base64 of a 20-byte HMAC-SHA1: {cred}");
    }
    // Without --ice-servers no Link header at all.
    let plain = Node::start("all", &[]);
    let r = create(&plain, &whip(), "x").await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("link").is_none());
}
