//! `cascade all`: a WHIP publisher and WHEP viewers on one process — frames
//! decodable in order with audio, mid-GOP joins start at a keyframe, DELETE
//! frees a viewer, and a publisher takeover keeps viewers playing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{assert_good_viewer, media, publish, view, wait_live, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_view() {
    let node = Node::start("all", &[]);
    let p = publish(&node.http, "live1", media(30).await, 0).await;
    wait_live(&node.http, "live1").await;
    let (a, b) = tokio::join!(view(&node.http, "live1", 4), view(&node.http, "live1", 4));
    for r in [&a, &b] {
        assert_good_viewer(r);
        eprintln!(
            "all-in-one viewer: ttff {:?} ms, latency p50 {:?} ms p99 {:?} ms, av drift {:?} ms",
            r.ttff_ms, r.latency_ms_p50, r.latency_ms_p99, r.av_drift_ms
        );
    }
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_gop_join_starts_at_keyframe() {
    let node = Node::start("all", &[]);
    // A 4 s GOP: joining at 1.5 s lands mid-group; the cached group lets the
    // viewer start at once instead of waiting up to 4 s for a keyframe.
    let p = publish(&node.http, "gop", media(120).await, 0).await;
    wait_live(&node.http, "gop").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = view(&node.http, "gop", 3).await;
    assert_eq!(r.first_frame_keyframe, Some(true), "{r:?}");
    assert!(r.seq_gaps.is_empty(), "{:?}", r.seq_gaps);
    let ttff = r.ttff_ms.expect("a first frame");
    eprintln!("mid-GOP join: time to first frame {ttff:.0} ms");
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_frees_the_viewer() {
    let node = Node::start("all", &[]);
    let p = publish(&node.http, "del", media(30).await, 0).await;
    wait_live(&node.http, "del").await;
    let mut o = loadtest::whep::ViewerOptions::new(format!("{}/whep/del", node.http));
    o.duration = Some(Duration::from_secs(30));
    let mut v = loadtest::whep::Viewer::start(o).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), v.wait_connected())
        .await
        .unwrap()
        .unwrap();
    let location = v.location().clone();
    let viewers = |n: &Node| {
        let url = format!("{}/api/streams", n.http);
        async move {
            let v: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            v[0]["viewers"].as_u64().unwrap_or(0)
        }
    };
    assert_eq!(viewers(&node).await, 1);
    let (status, _) = v.delete().await.unwrap();
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(5), async {
        while viewers(&node).await != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("viewer count drops after DELETE");
    // The resource is gone.
    let again = reqwest::Client::new()
        .delete(location.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let _ = p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_keeps_viewers() {
    let node = Node::start("all", &[]);
    let m = media(30).await;
    let p1 = publish(&node.http, "tk", m.clone(), 0).await;
    wait_live(&node.http, "tk").await;
    let viewer = tokio::spawn({
        let base = node.http.clone();
        async move { view(&base, "tk", 6).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The encoder "reconnects": a new publish of the same stream.
    let p2 = publish(&node.http, "tk", m, 1_000_000).await;
    let r = viewer.await.unwrap();
    assert!(r.connected);
    assert_eq!(r.first_frame_keyframe, Some(true));
    assert!(
        r.last_seq.is_some_and(|s| s >= 1_000_000),
        "the viewer stayed and plays the new publisher: {r:?}"
    );
    let _ = p1.stop().await;
    let _ = p2.stop().await;
}
