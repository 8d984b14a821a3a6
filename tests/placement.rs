//! Placement, `/api/cluster` and loop refusal with the real binaries:
//! origin + ingest + two edges with `--placement`; a full edge answers a
//! WHEP POST with `307` to the other edge and the Rust viewer plays there;
//! the origin sends viewers to an edge; `/api/cluster` lists the nodes with
//! tiers and load. Two edges whose `--origin` point at each other refuse
//! the loop, rarely retried, and a viewer there gets 404 in bounded time.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{assert_good_viewer, media, metric_sum, publish, view, Node, SECRET};

async fn json(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/api/cluster` on `base` until `ok` holds; returns the last answer.
async fn wait_cluster(
    base: &str,
    what: &str,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = json(&format!("{base}/api/cluster")).await;
        if ok(v["nodes"].as_array().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node_url<'a>(nodes: &'a [serde_json::Value], url: &str) -> Option<&'a serde_json::Value> {
    nodes.iter().find(|n| n["url"] == url)
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn post_whep(client: &reqwest::Client, url: &str) -> reqwest::Response {
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    client
        .post(url)
        .header("content-type", "application/sdp")
        .body(offer)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_edge_places_viewers_on_the_other_and_the_origin_sees_both() {
    let origin = Node::start(
        "origin",
        &[
            "--cluster-secret",
            SECRET,
            "--quic",
            "127.0.0.1:0",
            "--placement",
        ],
    );
    let quic = origin.quic.clone().unwrap();
    let ingest = Node::start("ingest", &["--cluster-secret", SECRET, "--origin", &quic]);
    let edge1 = Node::start(
        "edge",
        &[
            "--cluster-secret",
            SECRET,
            "--origin",
            &quic,
            "--placement",
            "--max-sessions",
            "2",
        ],
    );
    let p = publish(&ingest.http, "placed", media(30).await, 0).await;
    common::wait_live(&origin.http, "placed").await;
    // Two viewers fill edge1 (--max-sessions 2) before edge2 exists: with
    // a known edge less loaded by more than the margin, edge1 would place
    // the second one there already (reason "load").
    let (mut a, mut b) = (None, None);
    for slot in [&mut a, &mut b] {
        let mut o = loadtest::whep::ViewerOptions::new(format!("{}/whep/placed", edge1.http));
        o.duration = Some(Duration::from_secs(15));
        *slot = Some(loadtest::whep::Viewer::start(o).await.unwrap());
    }
    let edge2 = Node::start(
        "edge",
        &["--cluster-secret", SECRET, "--origin", &quic, "--placement"],
    );
    let listed = Instant::now();

    // The origin's table: itself at tier 0, the ingest and both edges at 1.
    let v = wait_cluster(
        &origin.http,
        "origin lists both edges and the stream",
        |n| {
            node_url(n, &edge1.http).is_some_and(|e| e["sessions"] == 2)
                && node_url(n, &edge2.http).is_some()
                && n.iter()
                    .any(|r| r["role"] == "ingest" && r["streams"][0] == "placed")
        },
    )
    .await;
    eprintln!(
        "placement: origin's table complete {:?} after edge2 started",
        listed.elapsed()
    );
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes[0]["role"], "origin");
    assert_eq!(nodes[0]["tier"], 0);
    assert_eq!(nodes.len(), 4, "{v:#}");
    assert_eq!(node_url(nodes, &edge1.http).unwrap()["sessions"], 2);
    for n in &nodes[1..] {
        assert_eq!(n["tier"], 1, "{n}");
        assert_eq!(n["upstream"][0], nodes[0]["node"], "{n}");
    }
    let ingest_row = nodes.iter().find(|n| n["role"] == "ingest").unwrap();
    assert_eq!(ingest_row["streams"][0], "placed");
    assert_eq!(node_url(nodes, &edge1.http).unwrap()["max_sessions"], 2);

    // edge1 knows edge2 from the origin's table.
    wait_cluster(&edge1.http, "edge1 hears of edge2", |n| {
        node_url(n, &edge2.http).is_some_and(|e| e["max_sessions"].as_u64() > Some(0))
    })
    .await;

    // A third POST to edge1: 307 to edge2, query string kept.
    let t = Instant::now();
    let r = post_whep(
        &no_redirects(),
        &format!("{}/whep/placed?token=abc", edge1.http),
    )
    .await;
    assert_eq!(r.status(), 307);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("{}/whep/placed?token=abc", edge2.http)
    );
    eprintln!("placement: 307 answered in {:?}", t.elapsed());
    // The Rust viewer follows it and plays on edge2.
    let third = view(&edge1.http, "placed", 4).await;
    assert_good_viewer(&third);
    eprintln!(
        "placement: viewer placed on edge2 via 307: ttff {:?} ms",
        third.ttff_ms
    );
    let m1 = metrics(&edge1.http).await;
    assert!(
        metric_sum(&m1, "cascade_placement_redirects_total") >= 2.0,
        "{m1}"
    );
    let placed: Vec<&str> = m1
        .lines()
        .filter(|l| l.starts_with("cascade_placement") || l.starts_with("cascade_rtc_sessions"))
        .collect();
    assert!(
        m1.contains(r#"cascade_placement_redirects_total{reason="full"}"#),
        "{placed:?}"
    );

    // The origin serves no viewers: it sends them to the least loaded edge.
    let r = post_whep(&no_redirects(), &format!("{}/whep/placed", origin.http)).await;
    assert_eq!(r.status(), 307);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("{}/whep/placed", edge2.http)
    );
    // The origin's table shows edge1's load: two viewers sending media.
    let v = wait_cluster(&origin.http, "edge1 full and sending at the origin", |n| {
        node_url(n, &edge1.http).is_some_and(|e| {
            e["sessions"] == 2
                && e["viewers"] == 2
                && e["egress_bps"].as_u64() > Some(100_000)
                && e["cpu_permille"].is_u64()
        })
    })
    .await;
    let e1 = node_url(v["nodes"].as_array().unwrap(), &edge1.http).unwrap();
    eprintln!(
        "placement: edge1 as the origin sees it: egress {} bit/s, cpu {} per mille, last seen {} ms ago",
        e1["egress_bps"], e1["cpu_permille"], e1["last_seen_ms"]
    );

    for v in [a, b].into_iter().flatten() {
        let r = tokio::time::timeout(Duration::from_secs(30), v.finish_duration())
            .await
            .unwrap()
            .unwrap();
        assert_good_viewer(&r);
    }
    let _ = p.stop().await;
}

/// Two UDP ports free now, for nodes that must know each other's address
/// before either starts.
fn free_udp_ports() -> (u16, u16) {
    let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_pointing_at_each_other_refuse_the_loop() {
    let (pa, pb) = free_udp_ports();
    let (qa, qb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let a = Node::start(
        "edge",
        &["--cluster-secret", SECRET, "--quic", &qa, "--origin", &qb],
    );
    let b = Node::start(
        "edge",
        &["--cluster-secret", SECRET, "--quic", &qb, "--origin", &qa],
    );
    let refused = |a: &str, b: &str| {
        metric_sum(a, "cascade_origin_relay_refused_total")
            + metric_sum(b, "cascade_origin_relay_refused_total")
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let (ma, mb) = (metrics(&a.http).await, metrics(&b.http).await);
        if ma.contains(r#"reason="loop""#) || mb.contains(r#"reason="loop""#) {
            break;
        }
        assert!(Instant::now() < deadline, "no loop refusal: {ma}\n{mb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "loop: first refusal seen {:?} after start",
        started.elapsed()
    );
    let first = refused(&metrics(&a.http).await, &metrics(&b.http).await);
    // A viewer there: not found in bounded time, however the links stand.
    let t = Instant::now();
    let r = post_whep(&no_redirects(), &format!("{}/whep/nowhere", a.http)).await;
    assert_eq!(r.status(), 404);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    eprintln!("loop: a viewer's POST got 404 in {:?}", t.elapsed());
    // Bounded attempts: a refused loop is retried after 5 s, not in a storm.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let later = refused(&metrics(&a.http).await, &metrics(&b.http).await);
    eprintln!("loop: {} refusals in the next 10 s", later - first);
    assert!(
        later - first <= 8.0,
        "{} loop refusals in 10 s: retried too often",
        later - first
    );
    // Neither edge believes it sits below a chain through itself.
    for n in [&a, &b] {
        let v = json(&format!("{}/api/cluster", n.http)).await;
        assert!(v["nodes"][0]["tier"].as_u64().unwrap() <= 1, "{v:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_tier_chain_shows_its_tiers() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().unwrap();
    let mid = Node::start(
        "edge",
        &[
            "--cluster-secret",
            SECRET,
            "--origin",
            &quic,
            "--quic",
            "127.0.0.1:0",
        ],
    );
    let mid_quic = mid.quic.clone().unwrap();
    let leaf = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &mid_quic]);
    let v = wait_cluster(&origin.http, "the leaf at tier 2", |n| {
        node_url(n, &leaf.http).is_some_and(|l| l["tier"] == 2)
            && node_url(n, &mid.http).is_some_and(|m| m["tier"] == 1)
    })
    .await;
    let nodes = v["nodes"].as_array().unwrap();
    let (o, m) = (
        &nodes[0]["node"],
        &node_url(nodes, &mid.http).unwrap()["node"],
    );
    assert_eq!(
        node_url(nodes, &leaf.http).unwrap()["upstream"],
        serde_json::json!([o, m])
    );
    // The leaf sees itself at tier 2 and knows the mid-tier edge.
    let v = wait_cluster(&leaf.http, "the leaf's own view", |n| {
        n[0]["tier"] == 2 && node_url(n, &mid.http).is_some()
    })
    .await;
    assert_eq!(v["nodes"][0]["url"], leaf.http);
}
