//! Timestamps an encoder may send: a 32-bit wrap (with extended timestamps
//! throughout) and forced jumps (an hour forward, then back to zero). An
//! ffmpeg-made FLV is replayed in real time by our own client with rewritten
//! timestamps; viewers must see monotonic time, no stall, no A/V drift.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::media::{av_drift, collect, ffmpeg_decode, ogg_opus, tone_frequency, wait_live, Seen};
use common::rtmp::{ffmpeg_flv, have_ffmpeg, read_flv, send_paced, Client, Encode, Server, TOKEN};

async fn replay(name: &str, secs: u32, map: impl Fn(u32) -> u32) -> Seen {
    assert!(have_ffmpeg(), "ffmpeg is required");
    let e = Encode {
        secs,
        bframes: None,
        rate: 44_100,
        channels: 2,
        tone: 1000,
    };
    let tags = read_flv(&ffmpeg_flv(e).await);
    let server = Server::start().await;
    let mut c = Client::publish(server.addr, "live", &format!("{name}?token={TOKEN}"))
        .await
        .unwrap();
    let registry = server.registry.clone();
    let name2 = name.to_string();
    let viewer = tokio::spawn(async move {
        let sub = wait_live(&registry, &name2, Duration::from_secs(10)).await;
        collect(sub, Duration::from_secs(u64::from(secs) + 20)).await
    });
    send_paced(&mut c, &tags, map).await.unwrap();
    drop(c);
    let seen = viewer.await.unwrap();
    server.stop().await;
    seen
}

fn check(name: &str, seen: &Seen, max_reanchors: usize) {
    let video: Vec<_> = seen.video.iter().map(|g| &g.frame).collect();
    assert!(video[0].keyframe);
    let steps: Vec<u64> = video
        .windows(2)
        .map(|w| w[1].dts.checked_sub(w[0].dts).expect("dts went back"))
        .collect();
    let max_step = steps.iter().max().copied().unwrap_or(0);
    assert!(steps.iter().all(|&s| s > 0), "dts repeated");
    // 30 fps is 3000 ticks; a rebase may add tens of ms, never seconds.
    assert!(
        max_step < 90 * 200,
        "{name}: video dts step {max_step} ticks"
    );
    let audio: Vec<_> = seen.audio.iter().map(|g| &g.frame).collect();
    let odd: Vec<u64> = audio
        .windows(2)
        .map(|w| w[1].pts.checked_sub(w[0].pts).expect("audio pts went back"))
        .filter(|&s| s != 960)
        .collect();
    println!(
        "{name}: max video dts step {:.1} ms, audio re-anchors {odd:?}",
        max_step as f64 / 90.0
    );
    assert!(odd.len() <= max_reanchors, "{name}: audio steps {odd:?}");
    assert!(
        odd.iter().all(|&s| s > 960 && s < 48 * 200),
        "{name}: audio steps {odd:?}"
    );
    // Viewers never stall.
    for (what, list) in [("video", &seen.video), ("audio", &seen.audio)] {
        let worst = list
            .windows(2)
            .map(|w| w[1].at - w[0].at)
            .max()
            .unwrap_or_default();
        assert!(
            worst < Duration::from_millis(500),
            "{name}: {what} stalled {worst:?}"
        );
    }
    let (drift, windows) = av_drift(seen, Duration::from_secs(1));
    println!(
        "{name}: A/V offsets {windows:.3?}, drift {:.1} ms",
        drift * 1000.0
    );
    assert!(drift < 0.040, "{name}: A/V drift {drift}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_jumps_forward_and_back_are_rebased() {
    // 0–3 s as sent, 3–6 s one hour ahead, then the encoder restarts at 0.
    let seen = replay("jumps", 9, |ts| match ts {
        0..3000 => ts,
        3000..6000 => ts + 3_600_000,
        _ => ts - 6000,
    })
    .await;
    check("jumps", &seen, 2);
    assert!(seen.video.len() >= 30 * 8 && seen.audio.len() >= 50 * 8);
    let packets: Vec<Bytes> = seen.audio.iter().map(|g| g.frame.payload.clone()).collect();
    let freq = tone_frequency(&ffmpeg_decode(ogg_opus(&packets, 2, 312)).await, 48_000);
    assert!((freq - 1000.0).abs() < 20.0, "tone {freq}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_of_32_bit_timestamps_is_seamless() {
    // Start 2.5 s before the 32-bit wrap: every timestamp is extended.
    let seen = replay("wrap", 5, |ts| ts.wrapping_add(u32::MAX - 2500)).await;
    check("wrap", &seen, 0);
    assert!(seen.video.len() >= 30 * 4 && seen.audio.len() >= 50 * 4);
}
