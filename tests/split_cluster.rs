//! The roles as separate processes: origin + ingest + two edges over QUIC.
//! A WHIP publish on the ingest plays on both edges.

#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_good_viewer, media, publish, view, Node, SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_ingest_two_edges() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin
        .quic
        .clone()
        .expect("origin prints its relay address");
    let ingest = Node::start("ingest", &["--cluster-secret", SECRET, "--origin", &quic]);
    let edge1 = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let edge2 = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &quic]);
    let p = publish(&ingest.http, "split", media(30).await, 0).await;
    common::wait_live(&origin.http, "split").await;
    let (a, b) = tokio::join!(view(&edge1.http, "split", 4), view(&edge2.http, "split", 4));
    for r in [&a, &b] {
        assert_good_viewer(r);
        eprintln!(
            "split viewer: ttff {:?} ms, latency p50 {:?} ms p99 {:?} ms",
            r.ttff_ms, r.latency_ms_p50, r.latency_ms_p99
        );
    }
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_with_wrong_secret_sees_nothing() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().unwrap();
    let ingest = Node::start("ingest", &["--cluster-secret", SECRET, "--origin", &quic]);
    let bad_edge = Node::start(
        "edge",
        &[
            "--cluster-secret",
            "another-secret-0123456789abcdef-0123",
            "--origin",
            &quic,
        ],
    );
    let p = publish(&ingest.http, "sec", media(30).await, 0).await;
    common::wait_live(&origin.http, "sec").await;
    let r = loadtest::http::post_offer(
        &format!("{}/whep/sec", bad_edge.http),
        &loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        r.status, 404,
        "an edge that cannot authenticate serves nothing"
    );
    let _ = p.stop().await;
}

#[test]
fn split_roles_refuse_to_start_without_secret() {
    for role in ["origin", "ingest", "edge"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args([role, "--origin", "127.0.0.1:4433"])
            .env_remove("CASCADE_CLUSTER_SECRET")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{role} must refuse to start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cluster-secret"), "{role}: {err}");
    }
}

#[test]
fn short_secret_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["origin", "--cluster-secret", "short"])
        .env_remove("CASCADE_CLUSTER_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a short secret must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32 characters"), "{err}");
    assert!(err.contains("cascade secret"), "{err}");
}

#[test]
fn secret_prints_a_fresh_one() {
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .arg("secret")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let (a, b) = (run(), run());
    let secret = a.trim_end();
    assert_eq!(secret.len(), 64, "{a:?}");
    assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()), "{a:?}");
    assert_ne!(a, b, "fresh each time");
}

/// Three tiers: origin → edge (serving the relay too, `--quic`) → edge. A
/// viewer of the last tier plays what the ingest publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tier_chain_plays() {
    let origin = Node::start(
        "origin",
        &["--cluster-secret", SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().unwrap();
    let ingest = Node::start("ingest", &["--cluster-secret", SECRET, "--origin", &quic]);
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
    let mid_quic = mid.quic.clone().expect("the middle edge serves the relay");
    let leaf = Node::start("edge", &["--cluster-secret", SECRET, "--origin", &mid_quic]);
    let p = publish(&ingest.http, "tiers", media(30).await, 0).await;
    common::wait_live(&origin.http, "tiers").await;
    let r = view(&leaf.http, "tiers", 4).await;
    assert_good_viewer(&r);
    eprintln!(
        "3-tier viewer: ttff {:?} ms, latency p50 {:?} ms p99 {:?} ms",
        r.ttff_ms, r.latency_ms_p50, r.latency_ms_p99
    );
    // The middle tier holds the stream for the leaf (a relay subscriber,
    // not a viewer of its own).
    let mid_streams: serde_json::Value = reqwest::get(format!("{}/api/streams", mid.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        mid_streams
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["stream"] == "tiers"),
        "{mid_streams}"
    );
    let _ = p.stop().await;
}
