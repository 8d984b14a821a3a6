//! `--abr-ladder` in Chromium (issue 14): ffmpeg publishes 1280×720 over
//! RTMP into cascade (in a network namespace, as the other browser tests),
//! which adds 360p and 180p; headless Chromium plays the player page and its
//! quality menu lists Auto and the three renditions. Auto (the bandwidth
//! estimate's choice) starts low and climbs to the source on this unlimited
//! link; picking 360p, 180p and Auto again changes the decoded frame height
//! (getStats) and frames keep coming after each switch: each rendition
//! plays in Chromium.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

#[allow(dead_code)] // shared with tests/browser.rs, which uses all of it
#[path = "browser/netns.rs"]
mod netns;

use std::time::Duration;

use netns::{Cascade, Netns, Proc, CASCADE_IP, TOKEN};
use serde_json::json;

#[test]
fn rtmp_ladder_renditions_play_in_chromium() {
    let Some(ns) = Netns::create("ladder") else {
        return;
    };
    let rtmp = format!("{CASCADE_IP}:1935");
    let cascade = Cascade::start(&ns, &["--rtmp", &rtmp, "--abr-ladder", "360p:800,180p:250"]);
    let mut c = ns.cmd("ffmpeg");
    c.args(["-hide_banner", "-loglevel", "error", "-re"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=1280x720:rate=30:duration=60",
        ])
        .args([
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=1000:sample_rate=48000:duration=60",
        ])
        .args([
            "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast",
        ])
        .args([
            "-g", "60", "-bf", "0", "-b:v", "2500k", "-pix_fmt", "yuv420p",
        ])
        .args(["-c:a", "aac", "-ac", "2", "-f", "flv"])
        .arg(format!("rtmp://{rtmp}/live/ladder?token={TOKEN}"))
        .stdin(std::process::Stdio::null());
    let _ff = Proc::spawn(c);
    // Live, and the steps' first frames out of ffmpeg.
    std::thread::sleep(Duration::from_secs(5));
    let v = ns.run_browser(
        json!({
            "kind": "player-menu", "base": cascade.base, "stream": "ladder",
            // Auto (per-viewer estimation, the default) starts low and
            // climbs to the source on this unlimited link.
            "autoWant": 720, "autoWaitSecs": 20,
            "switchTo": [["360p", 360], ["180p", 180], ["auto", 720]],
            "timeoutSecs": 80,
        }),
        Duration::from_secs(100),
    );
    eprintln!("{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        v["viewer"]["size"], "1280x720",
        "Auto climbs to the source: {v}"
    );
    eprintln!(
        "Auto at 720p by {} ms after the first frame",
        v["viewer"]["atMs"]
    );
    let menu: Vec<&str> = v["menu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(menu.len(), 4, "Auto + source, 360p, 180p: {v}");
    for s in v["switches"].as_array().unwrap() {
        assert_eq!(s["height"], s["want"], "{v}");
        assert!(
            s["framesNextSecond"].as_u64().unwrap() > 15,
            "plays on: {v}"
        );
        eprintln!("menu {} → {}p in {} ms", s["value"], s["want"], s["ms"]);
    }
}
