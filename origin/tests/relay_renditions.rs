//! A stream with three renditions (each its own video track, `rendition`
//! set in the catalog) crosses ingest → origin → edge over real QUIC: the
//! catalog arrives whole, every rendition's frames arrive in order, and a
//! keyframe request on one rendition's track reaches that track's producer
//! only (a WHIP ingest turns it into a PLI for that rid).
//!
//! The edge subscribes per stream: all renditions cross to an edge that
//! has viewers of any of them (a per-rendition subscription is future work,
//! see docs/quality.md).
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
