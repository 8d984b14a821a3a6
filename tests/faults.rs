//! Faults in a split cluster while viewers watch, with the real binaries:
//! the origin killed (SIGKILL) and restarted on the same port — both edges'
//! viewers keep their WHEP sessions and resume; the ingest killed and
//! restarted with its publisher — viewers resume on the new publish.
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
