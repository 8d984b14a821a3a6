//! Drives one str0m `Rtc` on its own UDP socket under tokio (client side, full ICE).
//!
//! Loop shape used by the publisher and viewer:
//! `loop { drain() -> events + next timeout; select!{ datagram => handle, deadline => tick } }`.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use crate::{Error, Result};

/// Largest datagram we expect (SRTP over a 1500-byte MTU fits easily).
const RECV_BUF: usize = 2048;

pub(crate) struct Peer {
    pub(crate) rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    buf: Vec<u8>,
}

impl Peer {
    /// Bind a UDP socket on `ip` (port 0) and add it as the host candidate.
    pub(crate) async fn bind(mut rtc: Rtc, ip: IpAddr) -> Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let cand = Candidate::host(local, "udp")
            .map_err(|e| Error::BadAnswer(format!("host candidate: {e}")))?;
        rtc.add_local_candidate(cand);
        Ok(Self {
            rtc,
            socket,
            local,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Poll str0m until it wants to wait: send its datagrams, hand events to `on_event`,
    /// return the instant it next needs a tick.
    pub(crate) async fn drain(&mut self, mut on_event: impl FnMut(Event)) -> Result<Instant> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    // UDP: a failed send is loss, which str0m's retransmissions handle.
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                        tracing::debug!(error = %e, "udp send failed");
                    }
                }
                Output::Event(e) => on_event(e),
            }
        }
    }

    /// Wait for one datagram or until `until`, and feed whichever came first to str0m.
    pub(crate) async fn wait(&mut self, until: Instant) -> Result<()> {
        self.wait_tapped(until, &mut |_, _| false).await
    }

    /// Like [`Self::wait`], but `tap` sees each datagram first and keeps it from str0m by
    /// returning true (header-only viewers take RTP this way and skip SRTP).
    pub(crate) async fn wait_tapped(
        &mut self,
        until: Instant,
        tap: &mut (dyn FnMut(&[u8], Instant) -> bool + Send),
    ) -> Result<()> {
        let sleep = tokio::time::sleep_until(until.into());
        tokio::select! {
            r = self.socket.recv_from(&mut self.buf) => {
                let (n, source) = r?;
                let now = Instant::now();
                let Some(data) = self.buf.get(..n) else {
                    return Ok(());
                };
                if tap(data, now) {
                    return Ok(());
                }
                // Anything str0m cannot classify (not STUN/DTLS/RTP) is dropped.
                // A datagram str0m rejects is the peer's problem, not a reason to end.
                if let Ok(contents) = data.try_into() {
                    let input = Input::Receive(now, Receive {
                        proto: Protocol::Udp,
                        source,
                        destination: self.local,
                        contents,
                    });
                    if let Err(e) = self.rtc.handle_input(input) {
                        tracing::debug!(error = %e, "datagram rejected");
                    }
                }
            }
            _ = sleep => {
                self.rtc.handle_input(Input::Timeout(Instant::now()))?;
            }
        }
        Ok(())
    }
}
