//! Measures (does not assert) the latency the relay adds on loopback: frame
//! written on the ingest registry → read from the origin registry (one hop)
//! and from the edge registry (two hops). Run with `--nocapture` to see it.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use cascade_origin::wallclock_us;
use common::*;
use tokio::time::timeout;

const FRAMES: u64 = 1000;
/// 30 fps GOPs of 1 s.
const GOP: u64 = 30;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_two_hop_latency_on_loopback() {
    let c = Cluster::start().await;
    let publisher = c.ingest.publish("lat", catalog(), "whip").unwrap();
    wait_live(&c.origin, "lat").await;
    let edge = c.edge().await;
    let at_edge = timeout(WAIT, edge.registry.subscribe("lat"))
        .await
        .unwrap()
        .unwrap();
    let at_origin = timeout(WAIT, c.origin.subscribe("lat"))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let read = |sub: cascade_origin::registry::Subscriber, where_: &'static str| {
        tokio::spawn(async move {
            let mut video = sub.track("video").unwrap();
            let mut lat = Vec::with_capacity(FRAMES as usize);
            for n in 0..FRAMES {
                let f = timeout(WAIT, video.next())
                    .await
                    .unwrap_or_else(|_| panic!("{where_}: frame {n} never came"))
                    .unwrap();
                assert_eq!(number(&f), n, "{where_}: frames out of order");
                lat.push(wallclock_us().saturating_sub(f.ingest_us));
            }
            lat.sort_unstable();
            lat
        })
    };
    let edge_reader = read(at_edge, "edge");
    let origin_reader = read(at_origin, "origin");

    // ~2.5 Mbit/s video at 30 fps sent at 500 fps to keep the test short;
    // RELAY_LATENCY_FPS=30 paces it like a live encoder (33 s).
    let fps: u64 = std::env::var("RELAY_LATENCY_FPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&f| f > 0)
        .unwrap_or(500);
    let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / fps));
    for n in 0..FRAMES {
        pace.tick().await;
        let key = n % GOP == 0;
        let f = frame(n, key, if key { 60_000 } else { 8_000 });
        publisher.track("video").unwrap().write(f).unwrap();
    }
    let one = origin_reader.await.unwrap();
    let two = edge_reader.await.unwrap();
    println!(
        "relay latency over {FRAMES} frames: ingest→origin p50 {} µs p99 {} µs max {} µs; ingest→edge p50 {} µs p99 {} µs max {} µs",
        percentile(&one, 0.5),
        percentile(&one, 0.99),
        one.last().copied().unwrap_or(0),
        percentile(&two, 0.5),
        percentile(&two, 0.99),
        two.last().copied().unwrap_or(0),
    );
}
