//! Refusals an encoder sees: wrong or missing token, bad stream name, wrong
//! application, playback. Each ends the connection with an RTMP error status
//! and a log line; ffmpeg reports the failure.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::rtmp::{have_ffmpeg, Client, Server, TOKEN};

use tokio::time::timeout;

/// Runs ffmpeg publishing to `url` and returns its stderr (it must fail).
async fn ffmpeg_refused(url: &str) -> String {
    let out = timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-nostdin",
                "-re",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=160x120:rate=30",
                "-t",
                "2",
                "-c:v",
                "libx264",
                "-f",
                "flv",
                url,
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ffmpeg hung on a refused publish")
    .unwrap();
    assert!(!out.status.success(), "ffmpeg succeeded against a refusal");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn ffmpeg_sees_refusals() {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let server = Server::start().await;
    let a = server.addr;
    let wrong = ffmpeg_refused(&format!("rtmp://{a}/live/cam?token=nope")).await;
    println!("wrong token: {wrong}");
    let missing = ffmpeg_refused(&format!("rtmp://{a}/live/cam")).await;
    println!("missing token: {missing}");
    let name = ffmpeg_refused(&format!("rtmp://{a}/live/b%20d?token={TOKEN}")).await;
    println!("bad name: {name}");
    let app = ffmpeg_refused(&format!("rtmp://{a}/other/cam?token={TOKEN}")).await;
    println!("bad app: {app}");
    assert!(server.registry.names().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn client_gets_status_descriptions() {
    let server = Server::start().await;
    let a = server.addr;
    let e = Client::publish(a, "live", "cam?token=wrong")
        .await
        .err()
        .unwrap();
    assert!(
        e.contains("NetStream.Publish.Unauthorized") && e.contains("token"),
        "{e}"
    );
    let e = Client::publish(a, "live", "cam").await.err().unwrap();
    assert!(e.contains("NetStream.Publish.Unauthorized"), "{e}");
    let e = Client::publish(a, "live", &format!("a/b?token={TOKEN}"))
        .await
        .err()
        .unwrap();
    assert!(e.contains("NetStream.Publish.BadName"), "{e}");
    let e = Client::publish(a, "live", &format!("{}?token={TOKEN}", "x".repeat(65)))
        .await
        .err()
        .unwrap();
    assert!(e.contains("NetStream.Publish.BadName"), "{e}");
    let e = Client::publish(a, "vod", &format!("cam?token={TOKEN}"))
        .await
        .err()
        .unwrap();
    assert!(e.contains("unknown application"), "{e}");
    // The token may also come in the connect URL's query (OBS server field).
    let ok = Client::publish(a, &format!("live?token={TOKEN}"), "cam").await;
    assert!(ok.is_ok());
    // A valid publish still works next to all of this.
    let ok = Client::publish(a, "live", &format!("cam2?token={TOKEN}")).await;
    assert!(ok.is_ok());
    drop(ok);
    server.stop().await;
}
