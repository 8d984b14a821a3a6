//! `loadtest --viewer-caps` against the real binary: a capped viewer really is
//! held to its cap (its bottleneck drops what overflows, it receives less) and
//! every viewer reports the picture size it was sent. Until the edge has
//! renditions, every viewer gets the one the publisher sends; the summary's
//! `caps` entries are what a rendition run reads.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use clap::Parser;
use common::{publish, wait_live, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_viewers_are_held_to_their_cap_and_report_their_picture() {
    let node = Node::start("all", &[]);
    let clip = loadtest::media::TestMedia::generate(loadtest::media::Options {
        width: 640,
        height: 360,
        video_kbps: 1200,
        ..Default::default()
    })
    .await
    .unwrap();
    let publisher = publish(&node.http, "caps", std::sync::Arc::new(clip), 0).await;
    wait_live(&node.http, "caps").await;
    let url = format!("{}/whep/caps", node.http);
    let args = loadtest::load::Args::try_parse_from([
        "loadtest",
        "--url",
        &url,
        "--viewers",
        "2",
        "--duration",
        "6s",
        "--viewer-caps",
        "300k,none",
        "--full-every",
        "1",
        "--json",
    ])
    .unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(40), loadtest::load::run(&args))
        .await
        .expect("the load run ends in time")
        .expect("the load run works");
    let _ = publisher.stop().await;
    let line = serde_json::to_string(&summary).unwrap();
    eprintln!("{line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let caps = v["caps"].as_array().expect("caps in the summary");
    assert_eq!(caps.len(), 2, "{line}");
    let capped = caps.iter().find(|c| c["cap_bps"] == 300_000).unwrap();
    let free = caps.iter().find(|c| c["cap_bps"].is_null()).unwrap();
    assert_eq!(free["connected"], true, "{line}");
    assert_eq!(free["video_size"], "640x360", "{line}");
    assert_eq!(free["cap_dropped"], 0, "{line}");
    assert_eq!(capped["connected"], true, "{line}");
    // 1.2 Mbit/s into 300 kbit/s: the bottleneck drops most of it, and
    // (one rendition to choose from) hardly a frame arrives whole.
    assert!(capped["cap_dropped"].as_u64().unwrap() > 100, "{line}");
    assert!(
        capped["video_frames"].as_u64().unwrap() < free["video_frames"].as_u64().unwrap(),
        "{line}"
    );
}
