//! Faults in a split cluster while viewers watch, with the real binaries:
//! the origin killed (SIGKILL) and restarted on the same port — both edges'
//! viewers keep their WHEP sessions and resume; the ingest killed and
//! restarted with its publisher — viewers resume on the new publish; the
//! origin killed for good with an `--origin-standby` — both edges' viewers
//! move to the standby in their WHEP sessions, and a new edge comes up
//! through it.
//! Recovery times are printed (frames flowing again after the node is
//! back) and asserted loosely: these machines are noisy.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{media, publish, Node, SECRET};
use loadtest::whep::{Viewer, ViewerOptions};

/// A free UDP port on loopback (for a relay that must come back on it).
fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

async fn viewer(edge: &Node, stream: &str) -> Viewer {
    let mut o = ViewerOptions::new(format!("{}/whep/{stream}", edge.http));
    o.duration = Some(Duration::from_secs(120));
    let v = Viewer::start(o).await.unwrap();
    v.wait_video_frames(10, Duration::from_secs(15))
        .await
        .unwrap();
    v
}

/// Waits until every viewer has had `more` new video frames; returns how
/// long that took.
async fn resumed(viewers: &[&Viewer], more: u64, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let base: Vec<u64> = viewers.iter().map(|v| v.video_frames()).collect();
    loop {
        if viewers
            .iter()
            .zip(&base)
            .all(|(v, b)| v.video_frames() >= b + more)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "viewers did not resume within {limit:?}: frames {:?} (were {base:?})",
            viewers.iter().map(|v| v.video_frames()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no viewer gets frames any more (the fault has bitten).
async fn stalled(viewers: &[&Viewer]) {
    let mut last: Vec<u64> = viewers.iter().map(|v| v.video_frames()).collect();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now: Vec<u64> = viewers.iter().map(|v| v.video_frames()).collect();
        if now == last {
            return;
        }
        last = now;
    }
    panic!("viewers kept receiving frames after the fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_killed_and_restarted_viewers_keep_their_sessions() {
    let quic = format!("127.0.0.1:{}", free_udp_port());
    let origin_args = ["--cluster-secret", SECRET, "--quic", quic.as_str()];
    let origin = Node::start("origin", &origin_args);
    let ingest = Node::start("ingest", &["--cluster-secret", SECRET, "--origin", &quic]);
    let edge1 = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let edge2 = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let _p = publish(&ingest.http, "fault", media(60).await, 0).await;
    common::wait_live(&origin.http, "fault").await;
    let (a, b) = tokio::join!(viewer(&edge1, "fault"), viewer(&edge2, "fault"));

    drop(origin); // SIGKILL
    let killed = Instant::now();
    stalled(&[&a, &b]).await;
    let stall_seen = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(killed.elapsed())).await;
    let origin = Node::start("origin", &origin_args);
    let back = resumed(&[&a, &b], 10, Duration::from_secs(12)).await;
    eprintln!(
        "origin kill -9: viewers stalled {stall_seen:?} after the kill; origin back after {:?}; both edges' viewers resumed {back:?} after the restart",
        Duration::from_secs(2)
    );
    // The same sessions: no new WHEP exchange happened.
    assert!(!a.is_finished() && !b.is_finished());
    // Loose bound (the goal is 3 s, measured figures go to docs).
    assert!(back < Duration::from_secs(10), "resumed after {back:?}");
    drop(origin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_and_restarted_viewers_resume_on_the_new_publish() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().unwrap();
    let ingest_args = ["--cluster-secret", SECRET, "--origin", quic.as_str()];
    let ingest = Node::start("ingest", &ingest_args);
    let edge = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let m = media(60).await;
    let p = publish(&ingest.http, "ing", m.clone(), 0).await;
    common::wait_live(&origin.http, "ing").await;
    let v = viewer(&edge, "ing").await;

    let seq = p.next_seq();
    drop(ingest); // SIGKILL: the publisher's session dies with it
    let _ = p.stop().await;
    stalled(&[&v]).await;
    let ingest = Node::start("ingest", &ingest_args);
    let restarted = Instant::now();
    let _p2 = publish(&ingest.http, "ing", m, seq).await;
    let back = resumed(&[&v], 10, Duration::from_secs(12)).await;
    eprintln!(
        "ingest kill -9: viewer resumed {back:?} after the new publish ({:?} after the ingest restart)",
        restarted.elapsed()
    );
    assert!(!v.is_finished(), "same WHEP session");
}

async fn metrics_text(node: &Node) -> String {
    reqwest::get(format!("{}/metrics", node.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of `name{label}` in a `/metrics` text (0 when absent).
fn series(text: &str, name: &str, label: &str) -> f64 {
    let prefix = format!("{name}{{{label}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_killed_for_good_edges_fail_over_to_the_standby() {
    let primary = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let standby = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let a = primary.quic.clone().unwrap();
    let b = standby.quic.clone().unwrap();
    let pair = [
        "--cluster-secret",
        SECRET,
        "--origin",
        a.as_str(),
        "--origin-standby",
        b.as_str(),
    ];
    let ingest = Node::start("ingest", &pair);
    let edge1 = Node::start("edge", &pair);
    let edge2 = Node::start("edge", &pair);
    let _p = publish(&ingest.http, "standby", media(60).await, 0).await;
    // The ingest uplinks to both: the standby is warm before any fault.
    common::wait_live(&primary.http, "standby").await;
    common::wait_live(&standby.http, "standby").await;
    let (v1, v2) = tokio::join!(viewer(&edge1, "standby"), viewer(&edge2, "standby"));
    let m = metrics_text(&edge1).await;
    assert_eq!(
        series(&m, "cascade_origin_relay_upstream", "origin=\"primary\""),
        1.0,
        "edges start on the primary"
    );

    drop(primary); // SIGKILL, never restarted
    let killed = Instant::now();
    stalled(&[&v1, &v2]).await;
    let stall_seen = killed.elapsed();
    resumed(&[&v1, &v2], 10, Duration::from_secs(20)).await;
    let whole = killed.elapsed();
    eprintln!(
        "origin kill -9 with a standby: viewers stalled {stall_seen:?} after the kill; on both edges they decode again {whole:?} after the kill"
    );
    assert!(!v1.is_finished() && !v2.is_finished(), "same WHEP sessions");
    // Frames keep coming from the standby (not a burst of held ones).
    let more = resumed(&[&v1, &v2], 60, Duration::from_secs(10)).await;
    eprintln!("standby: 60 more frames on both edges in {more:?}");
    assert!(whole < Duration::from_secs(10), "recovered after {whole:?}");
    for e in [&edge1, &edge2] {
        let m = metrics_text(e).await;
        assert_eq!(
            series(&m, "cascade_origin_relay_upstream", "origin=\"standby\""),
            1.0
        );
        assert_eq!(
            series(&m, "cascade_origin_relay_upstream", "origin=\"primary\""),
            0.0
        );
        assert_eq!(
            series(&m, "cascade_origin_relay_failovers_total", "to=\"standby\""),
            1.0
        );
    }

    // A new edge started while the primary is dead comes up via the standby.
    let started = Instant::now();
    let edge3 = Node::start("edge", &pair);
    let v3 = viewer(&edge3, "standby").await;
    eprintln!(
        "new edge with the primary dead: 10 frames {:?} after its start",
        started.elapsed()
    );
    assert!(v3.video_frames() >= 10);
    drop(ingest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_drained_edges_and_viewers_move_to_the_standby() {
    let mut primary = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let standby = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let a = primary.quic.clone().unwrap();
    let b = standby.quic.clone().unwrap();
    let pair = [
        "--cluster-secret",
        SECRET,
        "--origin",
        a.as_str(),
        "--origin-standby",
        b.as_str(),
    ];
    let ingest = Node::start("ingest", &pair);
    let edge = Node::start("edge", &pair);
    let _p = publish(&ingest.http, "drain", media(60).await, 0).await;
    common::wait_live(&standby.http, "drain").await;
    let v = viewer(&edge, "drain").await;

    // SIGTERM: the origin closes its links at once (it has no sessions of
    // its own to wait for); the edge takes that as a lost link.
    primary.terminate();
    let t0 = Instant::now();
    assert_eq!(primary.wait_exit(Duration::from_secs(10)), Some(0));
    let exited = t0.elapsed();
    stalled(&[&v]).await;
    resumed(&[&v], 10, Duration::from_secs(15)).await;
    eprintln!(
        "origin SIGTERM with a standby: exited after {exited:?}; the edge's viewer decodes again {:?} after the signal",
        t0.elapsed()
    );
    assert!(!v.is_finished(), "same WHEP session");
    let m = metrics_text(&edge).await;
    assert_eq!(
        series(&m, "cascade_origin_relay_upstream", "origin=\"standby\""),
        1.0
    );
    drop(ingest);
}

/// Ids of the edges in `GET /api/cluster` of `node`.
async fn edges_known(node: &Node) -> Vec<String> {
    let v: serde_json::Value = reqwest::get(format!("{}/api/cluster", node.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "edge")
        .map(|n| n["node"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_edge_leaves_the_origins_table_with_its_link() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().unwrap();
    let edge = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let t0 = Instant::now();
    while edges_known(&origin).await.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "edge reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(edge); // SIGKILL
    let killed = Instant::now();
    while !edges_known(&origin).await.is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the dead edge stays"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = killed.elapsed();
    eprintln!("edge kill -9: gone from the origin's table (placement) {gone:?} after the kill");
    // Its link's idle timeout (1 s), not the 5 s freshness of reports.
    assert!(gone < Duration::from_secs(4), "gone after {gone:?}");
}
