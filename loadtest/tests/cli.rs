//! The `loadtest` binary against the in-test server: viewers connect, receive without loss, and
//! the last stdout line is the JSON summary issue 6 specifies.

// Helpers outside #[test] fns too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use tokio::time::timeout;

const VIEWERS: u32 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_viewers_receive_without_loss() {
    let server = common::start("tok").await;
    let dir = std::env::temp_dir().join(format!("loadtest-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (csv, svg) = (dir.join("series.csv"), dir.join("series.svg"));
    let out = timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args(["--url", &server.whep_url("load")])
            .args(["--viewers", &VIEWERS.to_string(), "--duration", "5s"])
            .args(["--ramp", "100", "--full-every", "5", "--json"])
            .args([
                "--publish",
                &server.whip_url("load"),
                "--publish-token",
                "tok",
            ])
            .args(["--video-kbps", "1000", "--gop", "15"])
            .arg("--csv")
            .arg(&csv)
            .arg("--svg")
            .arg(&svg)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("connected="), "no progress lines: {stderr}");
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    eprintln!("{last}");
    assert_eq!(v["viewers_connected"], u64::from(VIEWERS), "{last}");
    assert_eq!(v["packets_lost"], 0, "{last}");
    assert!(v["packets_received"].as_u64().unwrap() > 1000, "{last}");
    for k in [
        "ttff_ms_p50",
        "ttff_ms_p95",
        "latency_ms_p50",
        "latency_ms_p99",
    ] {
        assert!(v[k].as_f64().is_some(), "{k} missing: {last}");
    }
    assert_eq!(v["first_frame_keyframe_pct"], 100.0, "{last}");
    assert_eq!(v["viewers_full"], u64::from(VIEWERS / 5), "{last}");
    assert!(v["jitter_ms_p95"].as_f64().is_some(), "{last}");
    assert!(
        v["publisher_video_frames"].as_u64().unwrap() >= 150,
        "{last}"
    );
    let series = std::fs::read_to_string(&csv).unwrap();
    assert!(series.lines().count() >= 4, "{series}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"));
    std::fs::remove_dir_all(&dir).unwrap();
}
