//! Load reports over real QUIC: two edges report to the origin, whose table
//! lists them with their tiers and load and forgets one that goes silent;
//! every edge hears the table back (so it can place viewers); two nodes
//! whose relay links point at each other refuse the loop, rarely retried.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_origin::cluster::{LocalLoad, Node};
use cascade_origin::relay::{Client, Limits, Server};
use cascade_origin::Registry;
use common::*;

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn edge_node(url: &str, sessions: u64) -> Arc<Node> {
    let n = Arc::new(Node::new("edge", url));
    n.set_max_sessions(10);
    n.set_local(LocalLoad {
        sessions,
        viewers: sessions,
        streams: vec!["s".into()],
        ..Default::default()
    });
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_report_to_the_origin_and_hear_the_table_back() {
    let origin = Arc::new(Node::new("origin", ""));
    let server = Server::bind_node(
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
        Registry::new(),
        Limits::default(),
        origin.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let e1 = edge_node("http://127.0.0.1:1001", 7);
    let e2 = edge_node("http://127.0.0.1:1002", 1);
    let c1 = Client::connect_node(addr.clone(), SECRET.into(), options(), e1.clone());
    let c2 = Client::connect_node(addr.clone(), SECRET.into(), options(), e2.clone());

    wait_for("both edges in the origin's table", || {
        origin.snapshot(Instant::now()).len() == 3
    })
    .await;
    let snap = origin.snapshot(Instant::now());
    assert_eq!(snap[0].report.node, origin.id());
    assert_eq!(snap[0].tier, 0);
    for v in &snap[1..] {
        assert_eq!(v.tier, 1, "{v:?}");
        assert_eq!(v.report.upstream, vec![origin.id().to_string()]);
        assert_eq!(v.report.streams, vec!["s".to_string()]);
    }
    let sessions: Vec<u64> = snap[1..].iter().map(|v| v.report.sessions).collect();
    assert!(
        sessions.contains(&7) && sessions.contains(&1),
        "{sessions:?}"
    );
    // The origin would place on e2, the less loaded edge.
    assert_eq!(
        origin.best_edge(Instant::now()).map(|r| r.node),
        Some(e2.id().to_string())
    );
    // e1 hears the table and places on e2; e2 places on e1 (never itself).
    wait_for("the table back at the edges", || {
        e1.best_edge(Instant::now()).is_some() && e2.best_edge(Instant::now()).is_some()
    })
    .await;
    assert_eq!(
        e1.best_edge(Instant::now()).map(|r| r.node),
        Some(e2.id().to_string())
    );
    assert_eq!(
        e2.best_edge(Instant::now()).map(|r| r.node),
        Some(e1.id().to_string())
    );
    // Load changes reach the origin within a report interval or two.
    e2.set_local(LocalLoad {
        sessions: 10,
        ..Default::default()
    });
    wait_for("e2 full at the origin", || {
        origin.best_edge(Instant::now()).map(|r| r.node) == Some(e1.id().to_string())
    })
    .await;

    // e1 goes away: gone from the origin's table with its link, not after
    // FRESH (a dead edge is no placement target).
    c1.close();
    let gone = Instant::now();
    wait_for("e1 expired", || {
        !origin
            .snapshot(Instant::now())
            .iter()
            .any(|v| v.report.node == e1.id())
    })
    .await;
    let took = gone.elapsed();
    assert!(took < Duration::from_millis(1500), "gone after {took:?}");
    drop(c2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_pointing_at_each_other_refuse_the_loop() {
    let a = Arc::new(Node::new("edge", ""));
    let b = Arc::new(Node::new("edge", ""));
    let (ra, rb) = (Registry::new(), Registry::new());
    let sa = Server::bind_node(
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
        ra.clone(),
        Limits::default(),
        a.clone(),
    )
    .await
    .unwrap();
    let sb = Server::bind_node(
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
        rb.clone(),
        Limits::default(),
        b.clone(),
    )
    .await
    .unwrap();
    let ca = Client::connect_node(
        sb.local_addr().unwrap().to_string(),
        SECRET.into(),
        options(),
        a.clone(),
    );
    let cb = Client::connect_node(
        sa.local_addr().unwrap().to_string(),
        SECRET.into(),
        options(),
        b.clone(),
    );
    ra.set_upstream(Arc::new(ca.clone()));
    rb.set_upstream(Arc::new(cb.clone()));
    // A viewer's fetch around the loop finds nothing and does not storm:
    // it ends within the fetch timeout.
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), ra.subscribe("s")).await;
    assert!(matches!(r, Ok(Err(_))), "the fetch must fail, not hang");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // Over a few seconds at least one link is refused, and neither side
    // keeps a link up for long: watch who is connected.
    let mut both_up = 0;
    for _ in 0..60 {
        if ca.is_connected() && cb.is_connected() {
            both_up += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        both_up < 30,
        "the loop stayed linked for {both_up} of 60 looks"
    );
    // Neither node takes the other's path as its own for good.
    let tiers = (a.own().upstream.len(), b.own().upstream.len());
    assert!(tiers.0 <= 1 && tiers.1 <= 1, "{tiers:?}");
}
