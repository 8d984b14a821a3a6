//! Bandwidth estimation reaches the session handler through a real shard:
//! a session built with `cascade_rtc::bwe::enable` (sending video to a
//! full-ICE str0m client over loopback) gets `Event::EgressBitrateEstimate`
//! in `Handler::on_event`; the same session built without it gets none.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade_rtc::{Ctx, Flow, Handler, Server};
use str0m::bwe::BweKind;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind};
use str0m::{Candidate, Event, Rtc};
use tokio::net::UdpSocket;

mod common;

use common::Client;

/// Records the estimates a session's handler is given.
struct Recorder(Arc<Mutex<Vec<u64>>>);

impl Handler for Recorder {
    fn on_event(&mut self, _ctx: &mut Ctx<'_>, event: Event) -> Flow {
        if let Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) = event {
            self.0.lock().unwrap().push(estimate.as_u64());
        }
        Flow::Continue
    }
}

async fn estimates_seen(server: &Server, bwe: bool) -> Vec<u64> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = socket.local_addr().unwrap();
    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();

    let mut cfg = server.rtc_builder();
    if bwe {
        cfg = cascade_rtc::bwe::enable(cfg, cascade_rtc::bwe::INITIAL_ESTIMATE);
    }
    let mut session = cfg.build(Instant::now());
    server.add_local_candidates(&mut session);
    let answer = session
        .sdp_api()
        .accept_offer(SdpOffer::from_sdp_string(&offer.to_sdp_string()).unwrap())
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let _handle = server
        .add(session, "whep", "s", tracing::Span::none(), move |_, _| {
            Box::new(Recorder(log))
        })
        .unwrap();
    let answer = SdpAnswer::from_sdp_string(&answer.to_sdp_string()).unwrap();
    rtc.sdp_api().accept_answer(pending, answer).unwrap();
    let mut client = Client::from_parts(rtc, socket, local);
    assert!(
        client
            .drive(Duration::from_secs(5), |e| matches!(e, Event::Connected))
            .await,
        "connects"
    );
    // The first estimate comes once SRTP keys exist: right after connecting.
    client.drive(Duration::from_millis(500), |_| false).await;
    let v = seen.lock().unwrap().clone();
    v
}

#[tokio::test]
async fn estimates_reach_the_handler_only_with_bwe_enabled() {
    let server = Server::bind(cascade_rtc::Config {
        udp: "127.0.0.1:0".parse().unwrap(),
        tcp: None,
        advertise: vec!["127.0.0.1".parse().unwrap()],
        shards: 1,
        max_sessions: 16,
        ..Default::default()
    })
    .await
    .unwrap();
    let with = estimates_seen(&server, true).await;
    assert!(!with.is_empty(), "no estimate reached the handler");
    assert_eq!(
        with[0],
        cascade_rtc::bwe::INITIAL_ESTIMATE.as_u64(),
        "{with:?}"
    );
    let without = estimates_seen(&server, false).await;
    assert!(without.is_empty(), "{without:?}");
}
