//! Links that drop and come back, and catalogs that change mid-stream:
//! viewers on the edge keep their tracks through a link blip, and see
//! catalog updates and codec changes.

mod common;

use std::time::Duration;

use cascade_origin::catalog::Codec;
use cascade_origin::relay::{Client, Server};
use cascade_origin::Registry;
use common::*;
use tokio::time::timeout;

async fn wait_reconnected(client: &cascade_origin::relay::Client) {
    timeout(WAIT, async {
        while client.is_connected() {
            client.reconnect();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("link did not drop");
    assert!(client.wait_connected(WAIT).await, "link did not come back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_blips_keep_edge_viewers() {
    let c = Cluster::start().await;
    let publisher = c.ingest.publish("blip", catalog(), "whip").unwrap();
    wait_live(&c.origin, "blip").await;
    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("blip"))
        .await
        .unwrap()
        .unwrap();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(1, true, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        1
    );

    // The ingest's link drops and comes back: the origin holds the stream
    // and the reconnected ingest takes it over.
    wait_reconnected(&c.uplink).await;
    assert!(edge.registry.is_live("blip"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(2, true, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        2
    );

    // The edge's link drops and comes back: it fetches the stream again.
    wait_reconnected(&edge.client).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(3, true, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        3
    );
    assert!(sub.is_live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_updates_and_codec_changes_reach_the_edge() {
    let c = Cluster::start().await;
    let mut publisher = c.ingest.publish("cat", catalog(), "rtmp").unwrap();
    wait_live(&c.origin, "cat").await;
    let edge = c.edge().await;
    let sub = timeout(WAIT, edge.registry.subscribe("cat"))
        .await
        .unwrap()
        .unwrap();
    let mut catalogs = sub.catalog_watch();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // New parameter sets, same codec: the track and its readers stay.
    let mut updated = catalog();
    updated.tracks[0].fmtp = "profile-level-id=640028;packetization-mode=1".into();
    publisher.set_catalog(updated.clone());
    timeout(WAIT, catalogs.wait_for(|c| *c == updated))
        .await
        .unwrap()
        .unwrap();
    publisher
        .track("video")
        .unwrap()
        .write(frame(10, true, 500))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        10
    );

    // A codec change replaces the track: old readers end, new ones read.
    let mut vp8 = updated.clone();
    vp8.tracks[0].codec = Codec::Vp8;
    vp8.tracks[0].fmtp = String::new();
    publisher.set_catalog(vp8.clone());
    timeout(WAIT, catalogs.wait_for(|c| *c == vp8))
        .await
        .unwrap()
        .unwrap();
    assert!(timeout(WAIT, video.next()).await.unwrap().is_err());
    let mut video = sub.track("video").unwrap();
    assert_eq!(video.info().codec, Codec::Vp8);
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(11, true, 500))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        11
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_restart_keeps_edge_viewers() {
    init_tracing();
    let origin = Registry::new();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
        origin.clone(),
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let ingest = Registry::new();
    let uplink = Client::connect_with(addr.to_string(), SECRET.into(), options());
    uplink.uplink(ingest.clone());
    let publisher = ingest.publish("restart", catalog(), "whip").unwrap();
    wait_live(&origin, "restart").await;
    let edge = edge_of(&addr.to_string(), SECRET).await;
    let sub = timeout(WAIT, edge.registry.subscribe("restart"))
        .await
        .unwrap()
        .unwrap();
    let mut video = sub.track("video").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(1, true, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        1
    );

    // The origin goes away and a fresh one (empty registry) takes its port.
    drop(server);
    let origin = Registry::new();
    let _server = timeout(WAIT, async {
        loop {
            match Server::bind(addr, SECRET.into(), origin.clone()).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("port not released");
    // The ingest republishes; the edge asks again until the stream is back.
    wait_live(&origin, "restart").await;
    timeout(WAIT, async {
        while origin.subscribers("restart") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("edge did not subscribe again");
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .track("video")
        .unwrap()
        .write(frame(2, true, 1000))
        .unwrap();
    assert_eq!(
        number(&timeout(WAIT, video.next()).await.unwrap().unwrap()),
        2
    );
    assert!(sub.is_live());
    uplink.close();
}
