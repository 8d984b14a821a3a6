//! Ingest → origin → edge over real QUIC: frames arrive in order and intact,
//! late subscribers start at a keyframe, keyframe requests travel upstream,
//! takeover and stream end propagate, idle edges unsubscribe.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use cascade_origin::Error;
use common::*;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_in_order_with_late_joiners_and_two_edges() {
    let c = Cluster::start().await;
    let mut publisher = c.ingest.publish("s", catalog(), "whip").unwrap();
    wait_live(&c.origin, "s").await;

    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("s"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sub.catalog(), catalog());
    assert_eq!(sub.protocol(), "whip");
    let mut video = sub.track("video").unwrap();
    let mut audio = sub.track("audio").unwrap();
    // Let the links settle: the edge's subscription is live at the origin.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut sent = Vec::new();
    for n in 0..90u64 {
        let f = frame(n, n % 30 == 0, if n % 30 == 0 { 20_000 } else { 2_000 });
        sent.push(f.clone());
        publisher.track("video").unwrap().write(f).unwrap();
        publisher
            .track("audio")
            .unwrap()
            .write(frame(10_000 + n, true, 100))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for (i, want) in sent.iter().enumerate() {
        let got = timeout(WAIT, video.next()).await.unwrap().unwrap();
        assert_eq!(&got, want, "video frame {i}");
    }
    for n in 0..90u64 {
        let got = timeout(WAIT, audio.next()).await.unwrap().unwrap();
        assert_eq!(number(&got), 10_000 + n);
        assert!(got.keyframe);
    }

    // A late viewer on the same edge starts at the cached group's keyframe.
    let mut late = sub.track("video").unwrap();
    let first = timeout(WAIT, late.next()).await.unwrap().unwrap();
    assert!(first.keyframe);
    assert_eq!(number(&first), 60);

    // A second edge subscribing now gets the origin's cached group first.
    let edge2 = c.edge().await;
    let sub2 = timeout(WAIT, edge2.registry.subscribe("s"))
        .await
        .unwrap()
        .unwrap();
    let mut video2 = sub2.track("video").unwrap();
    let first = timeout(WAIT, video2.next()).await.unwrap().unwrap();
    assert!(first.keyframe);
    assert_eq!(number(&first), 60);
    for n in 61..90 {
        assert_eq!(
            number(&timeout(WAIT, video2.next()).await.unwrap().unwrap()),
            n
        );
    }
    // Both edges keep receiving new frames.
    publisher
        .track("video")
        .unwrap()
        .write(frame(90, false, 500))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        90
    );
    assert_eq!(
        number(&timeout(WAIT, video2.next()).await.unwrap().unwrap()),
        90
    );
    assert_eq!(
        number(&timeout(WAIT, late.next()).await.unwrap().unwrap()),
        61
    );

    // A keyframe request from an edge viewer reaches the ingest producer.
    let producer = publisher.track_mut("video").unwrap();
    producer.take_keyframe_request();
    video.request_keyframe();
    timeout(WAIT, producer.keyframe_requested())
        .await
        .expect("keyframe request did not reach the ingest");

    // The stream ends at the ingest: every edge viewer's track closes.
    drop(publisher);
    assert!(timeout(WAIT, async {
        loop {
            if video.next().await.is_err() {
                break;
            }
        }
    })
    .await
    .is_ok());
    assert!(
        timeout(WAIT, async { while video2.next().await.is_ok() {} })
            .await
            .is_ok()
    );
    wait_gone(&edge.registry, "s").await;
    wait_gone(&c.origin, "s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_takeover_keeps_edge_viewer() {
    let c = Cluster::start().await;
    let first = c.ingest.publish("t", catalog(), "rtmp").unwrap();
    wait_live(&c.origin, "t").await;
    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("t"))
        .await
        .unwrap()
        .unwrap();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    first
        .track("video")
        .unwrap()
        .write(frame(1, true, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        1
    );

    // The encoder reconnects: a new publisher takes over, the old one leaves.
    let second = c.ingest.publish("t", catalog(), "rtmp").unwrap();
    drop(first);
    second
        .track("video")
        .unwrap()
        .write(frame(500, true, 1000))
        .unwrap();
    second
        .track("video")
        .unwrap()
        .write(frame(501, false, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        500
    );
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        501
    );
    assert!(edge.registry.is_live("t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stream_is_not_live_quickly() {
    let c = Cluster::start().await;
    let edge = c.edge().await;
    let started = std::time::Instant::now();
    let r = timeout(WAIT, edge.registry.subscribe("nope"))
        .await
        .unwrap();
    assert!(matches!(r, Err(Error::NotLive)));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_origin_is_not_live_within_the_fetch_timeout() {
    // A bound but silent UDP port: nothing answers QUIC there.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let edge = edge_of(&silent.local_addr().unwrap().to_string(), SECRET).await;
    let started = std::time::Instant::now();
    let r = timeout(WAIT, edge.registry.subscribe("s")).await.unwrap();
    assert!(matches!(r, Err(Error::NotLive)));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_starting_late_is_picked_up() {
    // Reserve a port, free it, start the clients first, then the origin.
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ingest = cascade_origin::Registry::new();
    let uplink =
        cascade_origin::relay::Client::connect_with(addr.to_string(), SECRET.into(), options());
    uplink.uplink(ingest.clone());
    let publisher = ingest.publish("late", catalog(), "whip").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let origin = cascade_origin::Registry::new();
    let _server = cascade_origin::relay::Server::bind(addr, SECRET.into(), origin.clone())
        .await
        .unwrap();
    wait_live(&origin, "late").await;
    let sub = origin.subscribe("late").await.unwrap();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(7, true, 100))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        7
    );
    uplink.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_edge_unsubscribes_after_grace() {
    let c = Cluster::start().await;
    let _publisher = c.ingest.publish("idle", catalog(), "whip").unwrap();
    wait_live(&c.origin, "idle").await;
    let before = c.origin.subscribers("idle");
    let edge = c.edge().await;
    // Many viewers at once: one upstream subscription serves them all.
    let many = futures::future::join_all((0..20).map(|_| edge.registry.subscribe("idle")));
    let subs = timeout(WAIT, many).await.unwrap();
    let subs: Vec<_> = subs.into_iter().map(|s| s.unwrap()).collect();
    assert_eq!(edge.registry.viewers("idle"), 20);
    let one_edge = c.origin.subscribers("idle");
    assert!(one_edge > before);
    let extra = timeout(WAIT, edge.registry.subscribe("idle"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.origin.subscribers("idle"), one_edge);
    assert!(edge.registry.is_live("idle"));
    drop(subs);
    drop(extra);
    // Grace is 300 ms in the harness; checks run every 500 ms.
    wait_gone(&edge.registry, "idle").await;
    // ...and the origin stops sending it.
    timeout(WAIT, async {
        while c.origin.subscribers("idle") != before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("origin still serves the idle edge");
    // Subscribing again fetches it again.
    let sub = timeout(WAIT, edge.registry.subscribe("idle"))
        .await
        .unwrap()
        .unwrap();
    assert!(sub.is_live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascading_edge_serves_a_further_edge() {
    let c = Cluster::start().await;
    let publisher = c.ingest.publish("deep", catalog(), "whip").unwrap();
    wait_live(&c.origin, "deep").await;
    // Tier 1 edge runs its own server; tier 2 fetches from it.
    let tier1 = c.edge().await;
    let server1 = cascade_origin::relay::Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
        tier1.registry.clone(),
    )
    .await
    .unwrap();
    let tier2 = edge_of(&server1.local_addr().unwrap().to_string(), SECRET).await;
    let sub = timeout(WAIT, tier2.registry.subscribe("deep"))
        .await
        .unwrap()
        .unwrap();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(3, true, 100))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        3
    );
    // Tier 1 has no viewers of its own but must keep the stream for tier 2.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(tier1.registry.is_live("deep"));
    publisher
        .track("video")
        .unwrap()
        .write(frame(4, false, 100))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        4
    );
}
