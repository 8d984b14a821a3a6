//! A minimal str0m WHEP viewer that records every received frame's arrival
//! instant and RTP media time, for timing checks loadtest's report does not
//! expose (the receiver's playout anchor after fast start).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, RtcConfig};
use tokio::net::UdpSocket;

/// One received frame.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub arrival: Instant,
    pub media_secs: f64,
    pub video: bool,
}

/// Watches `url` for `secs`, then DELETEs the session.
pub async fn watch(url: &str, secs: u64) -> Vec<Sample> {
    let mut rtc = RtcConfig::new()
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false)
        .build(Instant::now());
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local: SocketAddr = sock.local_addr().unwrap();
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let mut api = rtc.sdp_api();
    let vmid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let client = loadtest::http::client().unwrap();
    let created = loadtest::http::create_session(&client, url, &offer.to_sdp_string(), None)
        .await
        .unwrap();
    let answer = SdpAnswer::from_sdp_string(&created.answer).unwrap();
    rtc.sdp_api().accept_answer(pending, answer).unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut samples = Vec::new();
    let mut buf = vec![0u8; 2048];
    while Instant::now() < end {
        let timeout = loop {
            match rtc.poll_output().unwrap() {
                Output::Timeout(t) => break t,
                Output::Transmit(t) => {
                    let _ = sock.send_to(&t.contents, t.destination).await;
                }
                Output::Event(Event::MediaData(d)) => samples.push(Sample {
                    arrival: Instant::now(),
                    media_secs: d.time.as_seconds(),
                    video: d.mid == vmid,
                }),
                Output::Event(_) => {}
            }
        };
        let wait = timeout.min(end).saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, source))) => {
                if let Ok(r) = Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                    rtc.handle_input(Input::Receive(Instant::now(), r)).unwrap();
                }
            }
            _ => rtc.handle_input(Input::Timeout(Instant::now())).unwrap(),
        }
    }
    let _ = loadtest::http::delete(&client, &created.location, None).await;
    samples
}
