//! A subscriber that cannot keep up (tiny flow-control windows, reading
//! nothing for a while) gets old groups reset instead of queued, and never
//! slows down a fast edge subscribed to the same stream.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::sync::Arc;
use std::time::Duration;

use cascade_origin::relay::tls;
use cascade_origin::relay::wire::{read_frame, read_group_header, read_message, Message};
use cascade_origin::{wallclock_us, Error};
use common::*;
use tokio::time::timeout;

const FRAMES: u64 = 300;
const GOP: u64 = 10;

/// A client configuration whose receive windows stand for a slow link.
fn slow_config() -> quinn::ClientConfig {
    let mut config = tls::client_config().unwrap();
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(64_000u32.into());
    t.receive_window(256_000u32.into());
    t.max_concurrent_uni_streams(1024u32.into());
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
    config.transport_config(Arc::new(t));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_gets_resets_and_fast_edge_is_unaffected() {
    let c = Cluster::start().await;
    let publisher = c.ingest.publish("slow", catalog(), "whip").unwrap();
    wait_live(&c.origin, "slow").await;

    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("slow"))
        .await
        .unwrap()
        .unwrap();
    let mut video = sub.track("video").unwrap();

    let conn = raw_connect_with(c.addr.parse().unwrap(), slow_config()).await;
    let (mut send, mut recv) = handshake_ok(&conn, SECRET).await;
    let subscribe = Message::Subscribe {
        id: 0,
        stream: "slow".into(),
        resume: false,
    };
    send.write_all(&subscribe.encode().unwrap()).await.unwrap();
    let ok = timeout(WAIT, read_message(&mut recv))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ok, Message::SubscribeOk { id: 0, .. }));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let fast = tokio::spawn(async move {
        let mut worst = 0;
        for n in 0..FRAMES {
            let f = timeout(WAIT, video.next()).await.unwrap().unwrap();
            assert_eq!(number(&f), n);
            worst = worst.max(wallclock_us().saturating_sub(f.ingest_us));
        }
        worst
    });
    // ~6 Mbit/s for 0.6 s against a subscriber that reads nothing.
    for n in 0..FRAMES {
        let key = n % GOP == 0;
        let f = frame(n, key, if key { 40_000 } else { 8_000 });
        publisher.track("video").unwrap().write(f).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let worst = fast.await.unwrap();
    println!("fast edge worst latency while a slow peer stalls: {worst} µs");
    assert!(worst < 1_000_000, "the fast edge was held back: {worst} µs");

    // Now the slow peer reads what it has: old groups were reset, and the
    // newest group is there.
    let (mut reset, mut newest) = (0, 0);
    while let Ok(Ok(mut uni)) = timeout(Duration::from_millis(500), conn.accept_uni()).await {
        match timeout(Duration::from_millis(500), read_group_header(&mut uni)).await {
            Ok(Ok(_)) => {}
            _ => {
                reset += 1;
                continue;
            }
        }
        loop {
            match timeout(Duration::from_millis(300), read_frame(&mut uni)).await {
                Ok(Ok(Some(f))) => newest = newest.max(number(&f)),
                Ok(Err(Error::Closed)) => {
                    reset += 1;
                    break;
                }
                _ => break,
            }
        }
    }
    println!("slow peer: {reset} groups reset, newest frame {newest}");
    assert!(reset > 0, "no group was reset on the slow link");
    assert!(
        newest >= FRAMES - GOP,
        "the newest group did not arrive: {newest}"
    );
}
