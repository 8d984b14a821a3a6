//! Malformed and hostile input next to a good ffmpeg stream: a stalled
//! handshake, oversized, truncated and interleaved chunks, unknown message
//! types, garbage FLV tags and random bytes. Each is refused or ignored with
//! a log line, nothing panics, and the good stream keeps flowing.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::media::{collect, wait_live};
use common::rtmp::{
    client_handshake, closed_within, ffmpeg_publish, have_ffmpeg, Client, Encode, Server, TOKEN,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics anywhere in this test binary (connection tasks included).
fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

/// A type-0 chunk (RTMP 1.0 §5.3.1.2.1) with the given length field.
fn chunk0(csid: u8, type_id: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![csid, 0, 0, 0];
    v.extend_from_slice(&len.to_be_bytes()[1..]);
    v.push(type_id);
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

async fn after_handshake(addr: std::net::SocketAddr) -> TcpStream {
    let mut io = TcpStream::connect(addr).await.unwrap();
    client_handshake(&mut io).await;
    io
}

/// Pseudo-random bytes (xorshift), reproducible.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_do_not_disturb_a_good_stream() {
    assert!(have_ffmpeg(), "ffmpeg is required");
    count_panics();
    let server = Server::start().await;
    let addr = server.addr;
    let e = Encode {
        secs: 9,
        bframes: Some(0),
        rate: 48_000,
        channels: 2,
        tone: 1000,
    };
    let mut ff = ffmpeg_publish(&server.url("good"), e);
    let sub = wait_live(&server.registry, "good", Duration::from_secs(15)).await;
    let good = tokio::spawn(collect(sub, Duration::from_secs(30)));

    // A client that stalls mid-handshake is dropped after the deadline.
    let stalled = tokio::spawn(async move {
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.write_all(&[3]).await.unwrap();
        io.write_all(&[0u8; 700]).await.unwrap();
        let t = Instant::now();
        assert!(
            closed_within(&mut io, Duration::from_secs(8)).await,
            "stalled handshake not dropped"
        );
        t.elapsed()
    });

    // A bad handshake version byte.
    let mut io = TcpStream::connect(addr).await.unwrap();
    io.write_all(&[6; 1537]).await.unwrap();
    assert!(
        closed_within(&mut io, Duration::from_secs(3)).await,
        "bad handshake version accepted"
    );

    // Oversized message: a 16 MiB video message is refused at its header.
    let mut io = after_handshake(addr).await;
    io.write_all(&chunk0(4, 9, 0xff_ffff, &[0; 16]))
        .await
        .unwrap();
    assert!(
        closed_within(&mut io, Duration::from_secs(3)).await,
        "oversized message accepted"
    );

    // Oversized command (AMF is parsed recursively: its size is capped).
    let mut io = after_handshake(addr).await;
    io.write_all(&chunk0(3, 20, 100_000, &[0x03; 64]))
        .await
        .unwrap();
    assert!(
        closed_within(&mut io, Duration::from_secs(3)).await,
        "oversized command accepted"
    );

    // A chunk size of zero.
    let mut io = after_handshake(addr).await;
    io.write_all(&chunk0(2, 1, 4, &0u32.to_be_bytes()))
        .await
        .unwrap();
    assert!(
        closed_within(&mut io, Duration::from_secs(3)).await,
        "chunk size 0 accepted"
    );

    // A compressed header on a chunk stream never opened.
    let mut io = after_handshake(addr).await;
    io.write_all(&[0xc7, 1, 2, 3]).await.unwrap();
    assert!(
        closed_within(&mut io, Duration::from_secs(3)).await,
        "headerless chunk accepted"
    );

    // Interleaved chunk streams (a new message while one is incomplete).
    let mut io = after_handshake(addr).await;
    let mut v = chunk0(4, 9, 300, &[0x17; 128]);
    v.extend_from_slice(&chunk0(5, 8, 2, &[0xaf, 1]));
    io.write_all(&v).await.unwrap();
    assert!(
        closed_within(&mut io, Duration::from_secs(3)).await,
        "interleaved chunks accepted"
    );

    // Truncated chunk, then the client vanishes.
    let mut io = after_handshake(addr).await;
    io.write_all(&chunk0(4, 9, 1000, &[0x17; 50]))
        .await
        .unwrap();
    drop(io);

    // Random bytes after the handshake.
    for seed in 1..8u64 {
        let mut io = after_handshake(addr).await;
        let _ = io.write_all(&noise(seed, 4096)).await;
        drop(io);
    }

    // Unknown message types are ignored; the session goes on.
    let mut c = Client::publish(addr, "live", &format!("odd?token={TOKEN}"))
        .await
        .unwrap();
    c.io.write_all(&chunk0(40, 0x42, 3, &[1, 2, 3]))
        .await
        .unwrap();
    c.io.write_all(&chunk0(41, 22, 4, &[0; 4])).await.unwrap(); // aggregate: unsupported
                                                                // Garbage FLV tags: dropped one by one, the connection stays.
    for (i, seed) in (10..60u64).enumerate() {
        let len = 1 + (seed as usize * 37) % 300;
        let kind = if i % 2 == 0 { 8 } else { 9 };
        c.send(kind, i as u32 * 20, Bytes::from(noise(seed, len)))
            .await
            .unwrap();
    }
    // An SPS-less avcC and a frame before any sequence header.
    c.send(
        9,
        2000,
        Bytes::from_static(&[0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1f, 0xff, 0xe0, 0]),
    )
    .await
    .unwrap();
    c.send(
        9,
        2020,
        Bytes::from_static(&[0x17, 1, 0, 0, 0, 0, 0, 0, 1, 0x65]),
    )
    .await
    .unwrap();
    c.send(8, 2040, Bytes::from_static(&[0xaf, 1, 0x21, 0x10]))
        .await
        .unwrap();
    assert!(
        !closed_within(&mut c.io, Duration::from_millis(500)).await,
        "garbage tags closed the session"
    );
    drop(c);

    let stall = stalled.await.unwrap();
    assert!(
        stall >= Duration::from_secs(4),
        "stalled handshake dropped too early: {stall:?}"
    );

    let status = tokio::time::timeout(Duration::from_secs(30), ff.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let seen = good.await.unwrap();
    // The good stream never stalled while all of the above happened.
    let gaps: Vec<Duration> = seen.video.windows(2).map(|w| w[1].at - w[0].at).collect();
    let worst = gaps.iter().max().copied().unwrap_or_default();
    println!(
        "good stream: {} video, {} audio frames, worst gap {worst:?}",
        seen.video.len(),
        seen.audio.len()
    );
    assert!(
        seen.video.len() >= 30 * 7,
        "good stream lost video: {}",
        seen.video.len()
    );
    assert!(
        seen.audio.len() >= 50 * 7,
        "good stream lost audio: {}",
        seen.audio.len()
    );
    assert!(
        worst < Duration::from_millis(500),
        "good stream stalled {worst:?}"
    );
    assert!(seen
        .video
        .windows(2)
        .all(|w| w[1].frame.dts > w[0].frame.dts));
    // The server still takes connections, and nothing panicked.
    let ok = Client::publish(addr, "live", &format!("after?token={TOKEN}")).await;
    assert!(ok.is_ok());
    drop(ok);
    server.stop().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}

#[tokio::test]
async fn deeply_nested_amf_within_the_size_cap_is_survived() {
    count_panics();
    let server = Server::start().await;
    // 4 KiB of nested objects: `00 01 'a' 03` repeated (key "a", object value).
    let mut amf = vec![0x02, 0x00, 0x07];
    amf.extend_from_slice(b"connect");
    amf.extend_from_slice(&[0x00, 0, 0, 0, 0, 0, 0, 0, 0]);
    amf.push(0x03);
    while amf.len() + 4 <= 4096 {
        amf.extend_from_slice(&[0x00, 0x01, b'a', 0x03]);
    }
    let mut io = after_handshake(server.addr).await;
    // Sent in 128-byte chunks (the initial chunk size).
    let mut v = chunk0(3, 20, amf.len() as u32, &amf[..128]);
    for part in amf[128..].chunks(128) {
        v.push(0xc3);
        v.extend_from_slice(part);
    }
    io.write_all(&v).await.unwrap();
    assert!(closed_within(&mut io, Duration::from_secs(5)).await);
    assert!(
        Client::publish(server.addr, "live", &format!("s?token={TOKEN}"))
            .await
            .is_ok()
    );
    server.stop().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    count_panics();
    let server = Server::start().await;
    let mut held = Vec::new();
    for _ in 0..cascade_ingest::rtmp::MAX_CONNECTIONS {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Let the server accept them all before the one too many.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "connection past the limit kept"
    );
    // The held ones are still open (they are in their handshake deadline).
    assert!(!closed_within(&mut held[0], Duration::from_millis(200)).await);
    drop(held);
    // Slots free up: a publish works again.
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(c) = Client::publish(server.addr, "live", &format!("s?token={TOKEN}")).await {
            ok = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok.is_some(), "no slot freed after the clients left");
    drop(ok);
    server.stop().await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a task panicked");
}
