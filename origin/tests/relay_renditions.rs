//! A stream with three renditions (each its own video track, `rendition`
//! set in the catalog) crosses ingest → origin → edge over real QUIC: the
//! catalog arrives whole, every rendition's frames arrive in order, and a
//! keyframe request on one rendition's track reaches that track's producer
//! only (a WHIP ingest turns it into a PLI for that rid).
//!
//!
//! Per-rendition subscription: an edge receives only the renditions
//! something there reads (plus audio), and still knows which of the others
//! flow at the source (`Heard`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cascade_origin::catalog::{rendition_track, Catalog, Rendition, VIDEO};
use common::*;
use tokio::time::timeout;

fn ladder() -> Catalog {
    let mut c = catalog();
    let video = c.tracks.remove(0);
    let mut tracks = Vec::new();
    for (i, (name, w, h)) in [("f", 1280, 720), ("h", 640, 360), ("q", 320, 180)]
        .into_iter()
        .enumerate()
    {
        let mut t = video.clone();
        t.name = if i == 0 {
            VIDEO.to_string()
        } else {
            rendition_track(name)
        };
        t.rendition = Some(Rendition {
            name: name.into(),
            width: w,
            height: h,
            bitrate_kbps: 2500 >> (2 * i),
            framerate: 30,
        });
        tracks.push(t);
    }
    tracks.extend(c.tracks);
    Catalog { tracks }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_renditions_cross_the_relay() {
    let c = Cluster::start().await;
    let mut publisher = c.ingest.publish("ladder", ladder(), "whip").unwrap();
    wait_live(&c.origin, "ladder").await;
    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("ladder"))
        .await
        .unwrap()
        .unwrap();
    let cat = sub.catalog();
    assert_eq!(cat, ladder());
    assert_eq!(cat.renditions().count(), 3);
    assert_eq!(cat.rendition("q").unwrap().name, "video-q");
    let names = ["video", "video-h", "video-q"];
    let mut readers: Vec<_> = names.iter().map(|n| sub.track(n).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for n in 0..60u64 {
        for (r, name) in names.iter().enumerate() {
            let f = frame(n + 1000 * r as u64, n % 30 == 0, 4000 >> r);
            publisher.track(name).unwrap().write(f).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for (r, reader) in readers.iter_mut().enumerate() {
        for n in 0..60u64 {
            let got = timeout(WAIT, reader.next()).await.unwrap().unwrap();
            assert_eq!(number(&got), n + 1000 * r as u64, "rendition {r}");
        }
    }
    // The edge's last-frame clock per rendition (Auto's silence check).
    assert!(sub.last_ingest_us("video-h").unwrap() > 0);

    // A keyframe request on video-h reaches video-h's producer only.
    for name in names {
        publisher.track_mut(name).unwrap().take_keyframe_request();
    }
    readers[1].request_keyframe();
    timeout(
        WAIT,
        publisher.track_mut("video-h").unwrap().keyframe_requested(),
    )
    .await
    .expect("the request crosses the relay to its rendition");
    assert!(!publisher
        .track_mut("video")
        .unwrap()
        .take_keyframe_request());
    assert!(!publisher
        .track_mut("video-q")
        .unwrap()
        .take_keyframe_request());
}

/// Writes numbered frames to every track of `ladder()` every 20 ms (a
/// keyframe every 10th) until dropped.
fn feed(publisher: cascade_origin::registry::Publisher) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in 0u64.. {
            for name in ["video", "video-h", "video-q", "audio"] {
                let f = frame(n, n % 10 == 0 || name == "audio", 1000);
                if publisher.track(name).unwrap().write(f).is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

fn totals(sub: &cascade_origin::registry::Subscriber, track: &str) -> u64 {
    sub.track_totals(track).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_receives_only_the_renditions_read_there() {
    let c = Cluster::start().await;
    let publisher = c.ingest.publish("sel", ladder(), "whip").unwrap();
    wait_live(&c.origin, "sel").await;
    let writer = feed(publisher);
    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("sel"))
        .await
        .unwrap()
        .unwrap();
    // One reader, of the lowest rendition (a phone on a slow link).
    let mut q = sub.track("video-q").unwrap();
    // Every rendition flows for the first 2 s (the first viewer's choice
    // plays at once), then the unread ones are held back upstream.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before = [
        totals(&sub, "video"),
        totals(&sub, "video-h"),
        totals(&sub, "video-q"),
        totals(&sub, "audio"),
    ];
    assert!(before[0] > 0, "the top rendition flowed at first");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = [
        totals(&sub, "video"),
        totals(&sub, "video-h"),
        totals(&sub, "video-q"),
        totals(&sub, "audio"),
    ];
    assert_eq!(after[0], before[0], "unread top rendition still received");
    assert_eq!(after[1], before[1], "unread mid rendition still received");
    assert!(
        after[2] >= before[2] + 30,
        "the read rendition flows: {before:?} → {after:?}"
    );
    assert!(
        after[3] >= before[3] + 30,
        "audio always flows: {before:?} → {after:?}"
    );
    // The held-back renditions still look alive here (Auto's silence check).
    let seen = sub.last_ingest_us("video-h").unwrap();
    assert!(
        cascade_origin::wallclock_us().saturating_sub(seen) < 1_000_000,
        "the held rendition looks silent here"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        sub.last_ingest_us("video-h").unwrap() > seen,
        "the edge hears that the held rendition flows"
    );
    // The q reader read on all along, in order.
    let mut last = None;
    while let Ok(Some(f)) = q.try_next() {
        if let Some(l) = last {
            assert!(number(&f) > l);
        }
        last = Some(number(&f));
    }
    assert!(last.is_some());

    // A viewer switches to the mid rendition: it is asked for at once, and
    // its first frame here is a keyframe (no stale cached picture).
    let mut h = sub.track("video-h").unwrap();
    let first = timeout(Duration::from_secs(3), h.next())
        .await
        .expect("a held rendition comes back when read")
        .unwrap();
    assert!(first.keyframe);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(totals(&sub, "video-h") > after[1] + 10);
    assert_eq!(totals(&sub, "video"), after[0], "top still held");
    writer.abort();
}
