//! Links that must be refused or closed: wrong cluster secret, garbage on
//! the control stream before and after authentication. Other links stay up.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::time::Duration;

use cascade_origin::relay::wire::read_message;
use cascade_origin::relay::{code, Server};
use cascade_origin::{Error, Registry};
use common::*;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_with_auth_code() {
    let origin = Registry::new();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
        origin.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();

    let conn = raw_connect(addr).await;
    let (_send, mut recv) = handshake(&conn, "wrong").await;
    let r = timeout(WAIT, read_message(&mut recv)).await.unwrap();
    assert!(r.is_err(), "server must not accept a wrong proof");
    let reason = timeout(WAIT, conn.closed()).await.unwrap();
    assert_eq!(close_code(reason), Some(code::AUTH));

    // The right secret by hand is accepted.
    let conn = raw_connect(addr).await;
    let (_send, _recv) = handshake_ok(&conn, SECRET).await;

    // A client with the wrong secret never comes up, and fetches through it
    // report "not live".
    let edge = edge_of(&addr.to_string(), "not-the-secret").await;
    assert!(!edge.client.wait_connected(Duration::from_secs(1)).await);
    let _p = origin.publish("s", catalog(), "whip").unwrap();
    let r = timeout(WAIT, edge.registry.subscribe("s")).await.unwrap();
    assert!(matches!(r, Err(Error::NotLive)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_wrong_secret_is_refused_by_the_client() {
    let origin = Registry::new();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        "server-secret".into(),
        origin,
    )
    .await
    .unwrap();
    let edge = edge_of(&server.local_addr().unwrap().to_string(), SECRET).await;
    assert!(!edge.client.wait_connected(Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_that_connection() {
    let c = Cluster::start().await;
    let publisher = c.ingest.publish("g", catalog(), "whip").unwrap();
    wait_live(&c.origin, "g").await;
    let addr: std::net::SocketAddr = c.addr.parse().unwrap();

    // Garbage instead of Hello.
    let conn = raw_connect(addr).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"\x00\x00\x00\x05hello").await.unwrap();
    let reason = timeout(WAIT, conn.closed()).await.unwrap();
    assert_eq!(close_code(reason), Some(code::PROTOCOL));

    // Garbage after a correct handshake.
    let conn = raw_connect(addr).await;
    let (mut send, _recv) = handshake_ok(&conn, SECRET).await;
    send.write_all(b"\x00\x00\x00\x03{x}").await.unwrap();
    let reason = timeout(WAIT, conn.closed()).await.unwrap();
    assert_eq!(close_code(reason), Some(code::PROTOCOL));

    // An oversized length prefix after a correct handshake.
    let conn = raw_connect(addr).await;
    let (mut send, _recv) = handshake_ok(&conn, SECRET).await;
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let reason = timeout(WAIT, conn.closed()).await.unwrap();
    assert_eq!(close_code(reason), Some(code::PROTOCOL));

    // Garbage on a group stream.
    let conn = raw_connect(addr).await;
    let (_send, _recv) = handshake_ok(&conn, SECRET).await;
    let mut uni = conn.open_uni().await.unwrap();
    // A header naming a track of zero characters.
    uni.write_all(&[0u8; 32]).await.unwrap();
    let reason = timeout(WAIT, conn.closed()).await.unwrap();
    assert_eq!(close_code(reason), Some(code::PROTOCOL));

    // The real links are untouched: the stream still flows to a new edge.
    assert!(c.uplink.is_connected());
    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("g"))
        .await
        .unwrap()
        .unwrap();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(1, true, 100))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_dropped_after_the_auth_deadline() {
    let origin = Registry::new();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), SECRET.into(), origin)
        .await
        .unwrap();
    let conn = raw_connect(server.local_addr().unwrap()).await;
    // Never open the control stream.
    let reason = timeout(Duration::from_secs(8), conn.closed())
        .await
        .unwrap();
    assert_eq!(close_code(reason), Some(code::PROTOCOL));
}
