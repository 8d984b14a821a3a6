//! Shared by the rtc integration tests: a minimal "whep" endpoint whose
//! sessions send nothing, and a full-ICE str0m client on a loopback UDP
//! socket.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // test harness

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cascade_rtc::http::{ApiError, CreateFuture, Created, Endpoint};
use cascade_rtc::{Ctx, Flow, Handler, Server};
use str0m::change::{SdpOffer, SdpPendingOffer};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;

pub struct Nop;

impl Handler for Nop {
    fn on_event(&mut self, _ctx: &mut Ctx<'_>, _event: Event) -> Flow {
        Flow::Continue
    }
}

/// Any offer becomes a session that sends nothing.
pub struct Test {
    pub server: Server,
}

impl Endpoint for Test {
    fn kind(&self) -> &'static str {
        "whep"
    }

    fn authorize(&self, _stream: &str, _token: Option<&str>) -> Result<(), ApiError> {
        Ok(())
    }

    fn create(&self, stream: String, offer: String) -> CreateFuture {
        let server = self.server.clone();
        Box::pin(async move {
            let offer = SdpOffer::from_sdp_string(&offer)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            let mut rtc = server.rtc_builder().build(Instant::now());
            server.add_local_candidates(&mut rtc);
            let answer = rtc
                .sdp_api()
                .accept_offer(offer)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            let handle = server.add(rtc, "whep", &stream, tracing::Span::none(), |_, _| {
                Box::new(Nop)
            })?;
            Ok(Created {
                answer: answer.to_sdp_string(),
                handle,
            })
        })
    }
}

pub fn attr<'a>(sdp: &'a str, name: &str) -> &'a str {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .unwrap_or_else(|| panic!("{name} in {sdp}"))
}

pub struct Client {
    pub rtc: Rtc,
    pub socket: UdpSocket,
    pub local: SocketAddr,
    /// ICE connection states seen, in order.
    pub states: Vec<IceConnectionState>,
}

impl Client {
    /// A client offering one data channel, with its offer text.
    pub async fn new() -> (Self, String, SdpPendingOffer) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = Rtc::builder().build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_channel("x".into());
        let (offer, pending) = api.apply().unwrap();
        let c = Self {
            rtc,
            socket,
            local,
            states: Vec::new(),
        };
        (c, offer.to_sdp_string(), pending)
    }

    /// A client around an `Rtc` the test built itself.
    pub fn from_parts(rtc: Rtc, socket: UdpSocket, local: SocketAddr) -> Self {
        Self {
            rtc,
            socket,
            local,
            states: Vec::new(),
        }
    }

    /// Drives the client for `within`, or until `done`.
    pub async fn drive(&mut self, within: Duration, mut done: impl FnMut(&Event) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 2048];
        loop {
            let next = loop {
                match self.rtc.poll_output().unwrap() {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        let _ = self.socket.send_to(&t.contents, t.destination).await;
                    }
                    Output::Event(e) => {
                        if let Event::IceConnectionStateChange(s) = &e {
                            self.states.push(*s);
                        }
                        if done(&e) {
                            return true;
                        }
                    }
                }
            };
            if Instant::now() > deadline {
                return false;
            }
            let until = next.min(deadline);
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => {
                    let (n, source) = r.unwrap();
                    if let Ok(contents) = buf[..n].try_into() {
                        let _ = self.rtc.handle_input(Input::Receive(Instant::now(), Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: self.local,
                            contents,
                        }));
                    }
                }
                _ = tokio::time::sleep_until(until.into()) => {
                    self.rtc.handle_input(Input::Timeout(Instant::now())).unwrap();
                }
            }
        }
    }
}
