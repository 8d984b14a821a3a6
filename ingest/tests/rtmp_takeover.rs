//! An encoder reconnecting (a second publish of a live stream) takes it
//! over: the old connection is closed, viewers stay subscribed and continue
//! on the new publisher's keyframe, the timeline keeps going forward.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use common::media::{collect, wait_live};
use common::rtmp::{
    closed_within, ffmpeg_flv, have_ffmpeg, read_flv, send_paced, Client, Encode, Server, TOKEN,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_publish_takes_over_and_viewers_stay() {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let e = Encode {
        secs: 4,
        bframes: Some(0),
        rate: 48_000,
        channels: 2,
        tone: 1000,
    };
    let tags = read_flv(&ffmpeg_flv(e).await);
    let server = Server::start().await;
    let key = format!("cam?token={TOKEN}");
    let mut a = Client::publish(server.addr, "live", &key).await.unwrap();
    let registry = server.registry.clone();
    let viewer = tokio::spawn(async move {
        let sub = wait_live(&registry, "cam", Duration::from_secs(10)).await;
        collect(sub, Duration::from_secs(30)).await
    });
    let first: Vec<_> = tags.iter().filter(|t| t.ts < 2000).cloned().collect();
    send_paced(&mut a, &first, |t| t).await.unwrap();

    // The "reconnected encoder" publishes the same key.
    let mut b = Client::publish(server.addr, "live", &key).await.unwrap();
    let sender = tokio::spawn(async move {
        send_paced(&mut b, &tags, |t| t).await.unwrap();
        b
    });
    assert!(
        closed_within(&mut a.io, Duration::from_secs(5)).await,
        "old publisher not closed"
    );
    drop(sender.await.unwrap());
    let seen = viewer.await.unwrap();
    server.stop().await;

    // One unbroken subscription saw both publishers: ~2 s, then ~4 s.
    let video: Vec<_> = seen.video.iter().map(|g| &g.frame).collect();
    println!(
        "viewer saw {} video, {} audio frames",
        video.len(),
        seen.audio.len()
    );
    assert!(
        video.len() >= 30 * 5,
        "viewer lost the stream at takeover: {} frames",
        video.len()
    );
    let keyframes = video.iter().filter(|f| f.keyframe).count();
    assert!(keyframes >= 5, "{keyframes} keyframes");
    let back = video.windows(2).filter(|w| w[1].dts < w[0].dts).count();
    assert_eq!(back, 0, "timeline went backwards at takeover");
}
