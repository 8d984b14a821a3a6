//! Limits of the WebRTC layer under abuse, against a real `Server` on
//! loopback: forged STUN from many source ports learns no address, remote
//! candidates per session are capped, ICE-TCP connections are capped per IP,
//! closed when unbound, idle or when their session ends, and a panicking
//! shard is reported with the session count corrected.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use cascade_rtc::{Limits, Server, SessionId};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use str0m::change::SdpAnswer;
use str0m::{Event, IceConnectionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tower::ServiceExt;

mod common;

use common::{attr, Client, Test};

async fn server(limits: Limits, tcp: bool) -> (Server, axum::Router) {
    let server = Server::bind(cascade_rtc::Config {
        udp: "127.0.0.1:0".parse().unwrap(),
        tcp: tcp.then(|| "127.0.0.1:0".parse().unwrap()),
        advertise: vec!["127.0.0.1".parse().unwrap()],
        shards: 1,
        max_sessions: 64,
        limits,
        ..Default::default()
    })
    .await
    .unwrap();
    let app = cascade_rtc::http::router(
        Arc::new(Test {
            server: server.clone(),
        }),
        server.clone(),
    );
    (server, app)
}

/// A session created over WHEP for a client offer: (location, answer).
async fn create(app: &axum::Router, offer: &str) -> (String, String) {
    let res = app
        .clone()
        .oneshot(
            Request::post("/whep/s1")
                .header("content-type", "application/sdp")
                .body(Body::from(offer.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (location, String::from_utf8(body.to_vec()).unwrap())
}

fn sha1_hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// A binding request `username` signed with `pass`.
fn binding(username: &str, pass: &str) -> Vec<u8> {
    let msg = str0m::ice::StunMessage::binding_request(
        username,
        str0m::ice::TransId::new(),
        true,
        rand_u64(),
        1234,
        false,
    );
    let mut buf = vec![0u8; 1500];
    let n = msg
        .to_bytes(Some(pass.as_bytes()), &mut buf, sha1_hmac)
        .unwrap();
    buf.truncate(n);
    buf
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        .into()
}

/// A full-ICE str0m client on loopback UDP with a data channel offer.
/// 50,000 binding requests with the session's ufrag but a wrong password,
/// from ever new source ports, at a bounded rate: no address is learnt, the
/// connected client stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stun_from_random_ports_learns_nothing() {
    let (server, app) = server(Limits::default(), false).await;
    let (mut client, offer, pending) = Client::new().await;
    let (location, answer) = create(&app, &offer).await;
    client
        .rtc
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
        .unwrap();
    assert!(
        client
            .drive(Duration::from_secs(10), |e| matches!(e, Event::Connected))
            .await
    );
    assert_eq!(server.routed_addresses(), 1, "the client's verified path");
    let username = format!(
        "{}:{}",
        attr(&answer, "a=ice-ufrag:"),
        attr(&offer, "a=ice-ufrag:")
    );
    let target = server.local_udp();
    let flood = tokio::spawn(async move {
        let started = Instant::now();
        let mut sent = 0u32;
        // 500 sockets (source ports) × 100 requests, 5,000 a second.
        for _ in 0..500 {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            for _ in 0..100 {
                let m = binding(&username, "wrong-password-wrong-pwd");
                let _ = s.send_to(&m, target).await;
                sent += 1;
            }
            let due = started + Duration::from_millis(u64::from(sent) / 5);
            tokio::time::sleep_until(due.into()).await;
        }
        (sent, started.elapsed())
    });
    // The client keeps its consent checks going through the flood.
    let mut max_routes = 0;
    while !flood.is_finished() {
        client.drive(Duration::from_millis(200), |_| false).await;
        max_routes = max_routes.max(server.routed_addresses());
    }
    let (sent, took) = flood.await.unwrap();
    client.drive(Duration::from_secs(2), |_| false).await;
    eprintln!(
        "forged stun: {sent} requests in {:.1} s, routed addresses max {max_routes}",
        took.as_secs_f64()
    );
    assert_eq!(sent, 50_000);
    assert_eq!(max_routes, 1, "no forged source learnt");
    let up = client
        .states
        .iter()
        .position(|s| {
            matches!(
                s,
                IceConnectionState::Connected | IceConnectionState::Completed
            )
        })
        .expect("connected");
    assert!(
        !client.states[up..].iter().any(|s| matches!(
            s,
            IceConnectionState::Disconnected | IceConnectionState::Checking
        )),
        "client stayed connected: {:?}",
        client.states
    );
    let id = SessionId::parse(location.rsplit('/').next().unwrap()).unwrap();
    assert!(server.session("whep", "s1", id).is_some(), "session alive");
}

/// Remote candidates over PATCH are capped per session: the excess is
/// ignored (204) and counted.
#[tokio::test]
async fn trickle_candidates_are_capped_per_session() {
    let limits = Limits {
        max_remote_candidates: 5,
        ..Default::default()
    };
    let (server, app) = server(limits, false).await;
    let (_client, offer, _pending) = Client::new().await;
    let (location, _) = create(&app, &offer).await;
    let id = SessionId::parse(location.rsplit('/').next().unwrap()).unwrap();
    let ufrag = attr(&offer, "a=ice-ufrag:");
    for round in 0..10u16 {
        let mut frag = format!("a=ice-ufrag:{ufrag}\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n");
        for i in 0..3u16 {
            frag.push_str(&format!(
                "a=candidate:{round}{i} 1 udp 2130706431 127.0.0.1 {} typ host\r\n",
                10_000 + round * 10 + i
            ));
        }
        let res = app
            .clone()
            .oneshot(
                Request::patch(&location)
                    .header("content-type", "application/trickle-ice-sdpfrag")
                    .body(Body::from(frag))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(
        server.reserve_candidates(id, "whep", 1),
        0,
        "30 sent, 5 taken, none left"
    );
}

async fn tcp_from(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((ip, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// Seconds until the server closes `c` (EOF or reset), up to `limit`.
async fn closed_within(c: &mut TcpStream, limit: Duration) -> Option<f64> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t0 + limit).into(), c.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed().as_secs_f64()),
            Ok(Ok(_)) => {}
        }
    }
}

fn framed(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_connections_are_capped_bound_and_closed_with_their_session() {
    let limits = Limits {
        tcp_per_ip: 3,
        tcp_idle: Duration::from_secs(2),
        ..Default::default()
    };
    let (server, app) = server(limits, true).await;
    let tcp = server.local_tcp().unwrap();

    // Per IP: the fourth connection from one address is closed at once,
    // another address still gets in.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tcp_from([127, 0, 0, 7], tcp).await);
    }
    let mut fourth = tcp_from([127, 0, 0, 7], tcp).await;
    let refused = closed_within(&mut fourth, Duration::from_secs(2)).await;
    assert!(refused.is_some_and(|s| s < 1.0), "refused: {refused:?}");
    let mut other = tcp_from([127, 0, 0, 8], tcp).await;
    // Silent connections are closed once unbound for 10 s (the idle timeout
    // of 2 s comes first here: nothing was read).
    let idle = closed_within(&mut other, Duration::from_secs(12)).await;
    assert!(idle.is_some_and(|s| s >= 1.5), "idle close: {idle:?}");
    for mut c in held {
        assert!(closed_within(&mut c, Duration::from_secs(3))
            .await
            .is_some());
    }

    // A forged check over TCP does not bind the connection: closed at the
    // 10 s bind deadline even though it keeps talking.
    let (_client, offer, _pending) = Client::new().await;
    let (location, answer) = create(&app, &offer).await;
    let username = format!(
        "{}:{}",
        attr(&answer, "a=ice-ufrag:"),
        attr(&offer, "a=ice-ufrag:")
    );
    let pass = attr(&answer, "a=ice-pwd:").to_string();
    let mut forged = tcp_from([127, 0, 0, 9], tcp).await;
    let t0 = Instant::now();
    let mut closed_at = None;
    while t0.elapsed() < Duration::from_secs(13) {
        let m = framed(&binding(&username, "wrong-password-wrong-pwd"));
        if forged.write_all(&m).await.is_err() {
            closed_at = Some(t0.elapsed());
            break;
        }
        if closed_within(&mut forged, Duration::from_secs(1))
            .await
            .is_some()
        {
            closed_at = Some(t0.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("unbound connection closed");
    assert!(
        closed_at >= Duration::from_secs(9) && closed_at < Duration::from_secs(12),
        "{closed_at:?}"
    );
    assert_eq!(server.routed_addresses(), 0);

    // A verified check binds it; deleting the session closes it.
    let mut bound = tcp_from([127, 0, 0, 10], tcp).await;
    bound
        .write_all(&framed(&binding(&username, &pass)))
        .await
        .unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), bound.read_exact(&mut len))
        .await
        .expect("binding answered over tcp")
        .unwrap();
    assert_eq!(server.routed_addresses(), 1);
    let res = app
        .clone()
        .oneshot(Request::delete(&location).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let gone = closed_within(&mut bound, Duration::from_secs(3)).await;
    assert!(
        gone.is_some_and(|s| s < 1.0),
        "closed with its session: {gone:?}"
    );
    assert_eq!(server.routed_addresses(), 0);
}

/// A shard that panics is reported (the node exits on it), its sessions
/// leave the count, and placement no longer chooses it.
#[tokio::test]
async fn a_panicking_shard_is_reported_and_its_count_corrected() {
    let limits = Limits {
        panic_shard_after: Some(1),
        ..Default::default()
    };
    let (server, app) = server(limits, false).await;
    let (_c1, offer1, _p1) = Client::new().await;
    create(&app, &offer1).await;
    assert_eq!(server.sessions(), 1);
    // The second add panics the (only) shard.
    let (_c2, offer2, _p2) = Client::new().await;
    create(&app, &offer2).await;
    let why = tokio::time::timeout(Duration::from_secs(5), server.failed())
        .await
        .expect("failure reported");
    assert!(why.contains("shard 0 panicked"), "{why}");
    assert_eq!(server.sessions(), 0, "its sessions left the count");
    // No live shard left: refused, not queued to a dead one.
    let (_c3, offer3, _p3) = Client::new().await;
    let res = app
        .clone()
        .oneshot(
            Request::post("/whep/s1")
                .header("content-type", "application/sdp")
                .body(Body::from(offer3))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// Publishers have a pool of their own, viewers fill theirs, and one
/// address holds at most its share of either; places come back when the
/// admission (or, once held, the session) goes.
#[tokio::test]
async fn admission_pools_and_per_ip_cap() {
    use cascade_rtc::Error;
    let server = Server::bind(cascade_rtc::Config {
        udp: "127.0.0.1:0".parse().unwrap(),
        tcp: None,
        advertise: vec!["127.0.0.1".parse().unwrap()],
        shards: 1,
        max_sessions: 3,
        limits: Limits {
            max_publishers: 2,
            sessions_per_ip: 2,
            ..Limits::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let ip = |n: u8| Some(std::net::IpAddr::from([10, 0, 0, n]));
    // One address: two sessions, then TooManyFromAddress.
    let a1 = server.admit_from("whep", ip(1)).unwrap();
    let _a2 = server.admit_from("whep", ip(1)).unwrap();
    assert!(matches!(
        server.admit_from("whep", ip(1)),
        Err(Error::TooManyFromAddress)
    ));
    drop(a1);
    let _a3 = server.admit_from("whep", ip(1)).unwrap();
    // Viewers (sessions and WebSocket reservations; a WHEP admission is
    // counted once its session is added) fill their pool of 3...
    let _r1 = server.reserve_from("ws", ip(2)).unwrap();
    let _r2 = server.reserve_from("ws", ip(2)).unwrap();
    let _r3 = server.reserve_from("ws", ip(7)).unwrap();
    assert!(matches!(server.reserve_from("ws", ip(3)), Err(Error::Full)));
    assert!(matches!(server.admit(), Err(Error::Full)));
    // ...and publishers still have theirs (2), whatever the viewers hold.
    let p1 = server.admit_from("whip", ip(4)).unwrap();
    let _p2 = server.admit_from("whip", ip(5)).unwrap();
    assert!(matches!(server.admit_from("whip", ip(6)), Err(Error::Full)));
    drop(p1);
    let _p3 = server.admit_from("whip", ip(6)).unwrap();
    // An unknown address is only pooled.
    assert!(matches!(server.admit_from("whep", None), Err(Error::Full)));
}
