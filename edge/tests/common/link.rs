//! A viewer session and a browser stand-in over a capped link, in memory on
//! virtual time (shared by tests/abr_link.rs and benches/abr.rs).
//!
//! The sender is built like an edge viewer session (ICE-lite, RTP mode, only
//! the offered payload types, MID extension) plus `cascade_rtc::bwe::enable`;
//! the receiver is a full-ICE str0m peer standing in for the browser. Between
//! them a tbf-like link: a bottleneck rate, a drop-tail queue of
//! [`QUEUE_MS`] at that rate, and a fixed one-way delay.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // test harness

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_edge::abr::{Controller, Output as AbrOutput, SentMeter};
use cascade_edge::viewer::{RTX_CACHE_AGE, RTX_CACHE_PACKETS};
use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::format::{Codec, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};

/// The bottleneck's queue, in time at its rate (tbf `latency`).
pub const QUEUE_MS: u64 = 50;
/// One-way propagation delay each way.
pub const DELAY: Duration = Duration::from_millis(20);
pub const FPS: u64 = 30;
pub const MTU_PAYLOAD: usize = 1100;
/// `rtc/src/shard.rs`'s immediate re-polls per drain.
pub const MAX_IMMEDIATE: usize = 64;
/// `rtc/src/shard.rs`'s `NEAR_DUE`: a deadline this close counts as due.
pub const NEAR_DUE: Duration = Duration::from_micros(100);

/// One direction of the link.
pub struct Link {
    /// bit/s; `None` = no bottleneck.
    pub rate: Option<u64>,
    /// When the bottleneck is free again (the last queued packet's departure).
    pub free_at: Option<Instant>,
    /// In flight, by arrival time (FIFO, so already sorted).
    pub flight: VecDeque<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
    pub dropped: u64,
}

impl Link {
    pub fn new(rate: Option<u64>) -> Self {
        Self {
            rate,
            free_at: None,
            flight: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn send(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let arrive = match self.rate {
            None => now + DELAY,
            Some(rate) => {
                let start = self.free_at.map_or(now, |f| f.max(now));
                // Drop tail: the queue holds QUEUE_MS of the link's rate.
                if start.duration_since(now) > Duration::from_millis(QUEUE_MS) {
                    self.dropped += 1;
                    return;
                }
                let tx = Duration::from_nanos(data.len() as u64 * 8 * 1_000_000_000 / rate);
                self.free_at = Some(start + tx);
                start + tx + DELAY
            }
        };
        self.flight.push_back((arrive, from, to, data));
    }

    pub fn next(&self) -> Option<Instant> {
        self.flight.front().map(|f| f.0)
    }
}

/// What crossed the downlink: RTP read from the clear header.
#[derive(Default, Debug)]
pub struct Counts {
    pub media_packets: u64,
    pub with_twcc: u64,
    /// RTX (NACK repair, and padding made of resent packets), bytes.
    pub rtx_bytes: u64,
    /// Packets with the RTP padding bit (blank padding, SSRC-0 probes).
    pub padding_packets: u64,
    pub media_bytes: u64,
}

impl Counts {
    pub fn see(&mut self, d: &[u8], media_pt: u8, twcc_id: u8) {
        if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
            return; // not RTP (STUN, DTLS, RTCP)
        }
        let pt = d[1] & 0x7f;
        let padding = d[0] & 0x20 != 0;
        if padding {
            self.padding_packets += 1;
        } else if pt == media_pt {
            self.media_packets += 1;
            self.media_bytes += d.len() as u64;
            if has_ext(d, twcc_id) {
                self.with_twcc += 1;
            }
        } else {
            self.rtx_bytes += d.len() as u64;
        }
    }
}

/// RFC 8285 one-byte header extension `id` present?
pub fn has_ext(d: &[u8], id: u8) -> bool {
    if d[0] & 0x10 == 0 {
        return false;
    }
    let cc = usize::from(d[0] & 0x0f);
    let at = 12 + 4 * cc;
    if d.len() < at + 4 || d[at..at + 2] != [0xbe, 0xde] {
        return false;
    }
    let words = usize::from(u16::from_be_bytes([d[at + 2], d[at + 3]]));
    let mut i = at + 4;
    let end = (at + 4 + 4 * words).min(d.len());
    while i < end {
        let b = d[i];
        if b == 0 {
            i += 1;
            continue;
        }
        if b >> 4 == id {
            return true;
        }
        i += 1 + usize::from(b & 0x0f) + 1;
    }
    false
}

pub struct Sim {
    pub now: Instant,
    pub start: Instant,
    pub tx: Rtc,
    pub rx: Rtc,
    pub down: Link,
    pub up: Link,
    pub tx_timeout: Instant,
    pub rx_timeout: Instant,
    pub mid: Mid,
    pub pt: Pt,
    pub twcc_id: u8,
    pub seq: u64,
    pub next_frame: Instant,
    pub frame_no: u64,
    /// The rate the sender's "rendition" sends, bit/s.
    pub media_bps: u64,
    /// A sender that adapts like an encoder: media at 85% of the estimate,
    /// at most this.
    pub follow: Option<u64>,
    /// Video loss from receiver reports (time, fraction).
    pub losses: Vec<(Duration, f32)>,
    pub estimates: Vec<(Duration, u64)>,
    pub counts: Counts,
    pub abr: Option<Controller>,
    /// (time, rendition) at each switch.
    pub switches: Vec<(Duration, Option<String>)>,
    pub payload: Arc<[u8]>,
    /// Wall time spent in the sender's str0m calls (what a viewer costs the
    /// edge, the link and the controller excluded).
    pub tx_cpu: Duration,
    /// Timeouts the sender asked for and got (a shard's timer wake-ups).
    pub tx_wakes: u64,
    /// Sender drains that transmitted something, and the RTP datagrams they
    /// sent: their ratio is what one GSO `sendmsg` could carry.
    pub tx_bursts: u64,
    pub tx_rtp_out: u64,
    /// The latest time given to the sender (`Entry::clock` in the shard).
    pub tx_clock: Instant,
    /// The video's rate sent between receiver reports, as the shell
    /// measures it.
    pub sent: SentMeter,
}

pub fn sdp_pt(sdp: &str, codec: &str) -> u8 {
    sdp.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("a=rtpmap:")?;
            let (pt, name) = rest.split_once(' ')?;
            name.starts_with(codec).then(|| pt.parse().unwrap())
        })
        .unwrap()
}

pub fn sdp_rtx(sdp: &str, pt: u8) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.strip_prefix("a=fmtp:")?;
        let (rtx, params) = rest.split_once(' ')?;
        (params.trim() == format!("apt={pt}")).then(|| rtx.parse().unwrap())
    })
}

pub fn sdp_ext(sdp: &str, uri_part: &str) -> u8 {
    sdp.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("a=extmap:")?;
            let (id, uri) = rest.split_once(' ')?;
            uri.contains(uri_part).then(|| id.parse().unwrap())
        })
        .unwrap()
}

impl Sim {
    /// `bwe`: str0m's initial estimate, `None` = BWE off (as today).
    pub fn new(cap: Option<u64>, media_bps: u64, bwe: Option<Bitrate>) -> Self {
        let start = Instant::now();
        let rx_addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let tx_addr: SocketAddr = "10.0.0.2:6000".parse().unwrap();

        // The "browser": full ICE, offers to receive video.
        let mut rx = Rtc::builder().set_rtp_mode(true).build(start);
        rx.add_local_candidate(Candidate::host(rx_addr, "udp").unwrap());
        let mut api = rx.sdp_api();
        let mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let offer_text = offer.to_sdp_string();

        // The "edge viewer": as edge/src/whep.rs builds it.
        let h264 = sdp_pt(&offer_text, "H264/");
        let rtx = sdp_rtx(&offer_text, h264);
        let mut exts = ExtensionMap::empty();
        exts.set(4, Extension::RtpMid);
        let mut cfg = Rtc::builder()
            .set_ice_lite(true)
            .clear_codecs()
            .set_rtp_mode(true)
            .set_extension_map(exts);
        if let Some(initial) = bwe {
            cfg = cascade_rtc::bwe::enable(cfg, initial);
        }
        let fmtp = offer_text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("a=fmtp:{h264} ")))
            .unwrap();
        cfg.codec_config().add_config(
            Pt::from(h264),
            rtx.map(Pt::from),
            Codec::H264,
            Frequency::NINETY_KHZ,
            None,
            FormatParams::parse_line(fmtp),
        );
        let mut tx = cfg.build(start);
        tx.add_local_candidate(Candidate::host(tx_addr, "udp").unwrap());
        let answer = tx
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&offer_text).unwrap())
            .unwrap();
        {
            let mut d = tx.direct_api();
            let s = d.stream_tx_by_mid(mid, None).unwrap();
            s.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, None);
        }
        rx.sdp_api().accept_answer(pending, answer).unwrap();
        let twcc_id = sdp_ext(&offer_text, "transport-wide-cc");

        Self {
            now: start,
            start,
            tx,
            rx,
            down: Link::new(cap),
            up: Link::new(None),
            tx_timeout: start,
            rx_timeout: start,
            mid,
            pt: Pt::from(h264),
            twcc_id,
            seq: 1,
            next_frame: start,
            frame_no: 0,
            media_bps,
            follow: None,
            losses: Vec::new(),
            estimates: Vec::new(),
            counts: Counts::default(),
            abr: None,
            switches: Vec::new(),
            payload: vec![0x41; MTU_PAYLOAD].into(),
            tx_cpu: Duration::ZERO,
            tx_wakes: 0,
            tx_bursts: 0,
            tx_rtp_out: 0,
            tx_clock: start,
            sent: SentMeter::default(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now.duration_since(self.start)
    }

    /// Polls both peers until they wait. The sender is drained as
    /// `Shard::drain` does: a `Timeout` due within [`NEAR_DUE`] is handled at
    /// once (up to [`MAX_IMMEDIATE`] times, the sender's clock never going
    /// back), so what str0m's pacer releases in one go leaves in one batch.
    pub fn drain(&mut self) {
        let t0 = Instant::now();
        let mut rtp_out = 0;
        let mut immediate = 0;
        loop {
            match self.tx.poll_output().unwrap() {
                Output::Timeout(t) => {
                    if t <= self.now + NEAR_DUE && immediate < MAX_IMMEDIATE {
                        immediate += 1;
                        self.tx_clock = self.tx_clock.max(t).max(self.now);
                        self.tx.handle_input(Input::Timeout(self.tx_clock)).unwrap();
                        continue;
                    }
                    self.tx_timeout = t;
                    break;
                }
                Output::Transmit(t) => {
                    let data = t.contents.to_vec();
                    if data.len() > 12 && data[0] >> 6 == 2 && !(192..=223).contains(&data[1]) {
                        rtp_out += 1;
                    }
                    self.counts.see(&data, *self.pt, self.twcc_id);
                    self.down.send(self.now, t.source, t.destination, data);
                }
                Output::Event(Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. })) => {
                    let bps = estimate.as_u64();
                    self.estimates.push((self.elapsed(), bps));
                    if let Some(abr) = &mut self.abr {
                        abr.on_smoothed_estimate(self.now, bps);
                    }
                    if let Some(max) = self.follow {
                        self.media_bps = (bps * 85 / 100).min(max);
                    }
                }
                // As the viewer does: the controller reads str0m's
                // unsmoothed estimate from the stats event.
                Output::Event(Event::PeerStats(st)) => {
                    if let (Some(bps), Some(abr)) = (st.bwe_tx, &mut self.abr) {
                        abr.on_estimate(self.now, bps.as_u64());
                    }
                }
                Output::Event(Event::MediaEgressStats(st)) => {
                    if let Some(loss) = st.loss {
                        self.losses.push((self.elapsed(), loss));
                        let sent = self.sent.rate(st.timestamp, st.bytes);
                        if let Some(abr) = &mut self.abr {
                            abr.on_report(self.now, sent, loss);
                        }
                    }
                }
                Output::Event(_) => {}
            }
        }
        self.tx_cpu += t0.elapsed();
        if rtp_out > 0 {
            self.tx_bursts += 1;
            self.tx_rtp_out += rtp_out;
        }
        loop {
            match self.rx.poll_output().unwrap() {
                Output::Timeout(t) => {
                    self.rx_timeout = t;
                    break;
                }
                Output::Transmit(t) => {
                    self.up
                        .send(self.now, t.source, t.destination, t.contents.to_vec());
                }
                Output::Event(_) => {}
            }
        }
    }

    pub fn abr(&mut self) {
        let Some(abr) = &mut self.abr else {
            return;
        };
        abr.handle_timeout(self.now);
        let mut outs = Vec::new();
        while let Some(o) = abr.poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                AbrOutput::Bitrate { minimum, desired } => self
                    .tx
                    .bwe()
                    .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(desired)),
                AbrOutput::Reset { bps } => self.tx.bwe().reset(Bitrate::bps(bps)),
                AbrOutput::Switch(s) => {
                    let abr = self.abr.as_ref().unwrap();
                    self.media_bps =
                        s.to.as_ref()
                            .and_then(|n| abr.ladder().iter().find(|r| &r.name == n))
                            .map_or(0, |r| r.bps);
                    self.switches.push((self.elapsed(), s.to));
                }
            }
        }
    }

    /// One video frame of the current rate (a keyframe of 4× every 2 s),
    /// written as the edge viewer does.
    pub fn write_frame(&mut self) {
        let per_frame = self.media_bps / 8 / FPS;
        let key = self.frame_no.is_multiple_of(2 * FPS);
        let bytes = if key {
            per_frame * 4
        } else {
            per_frame * 56 / 60
        };
        let packets = bytes.div_ceil(MTU_PAYLOAD as u64);
        let ts = (self.frame_no * 90_000 / FPS) as u32;
        let now = self.now;
        let mut api = self.tx.direct_api();
        let tx = api.stream_tx_by_mid(self.mid, None).unwrap();
        for i in 0..packets {
            tx.write_rtp(
                RtpWrite::new(self.pt, self.seq.into(), ts, now, self.payload.clone())
                    .marker(i + 1 == packets)
                    .nackable(true),
            );
            self.seq += 1;
        }
        self.frame_no += 1;
    }

    /// Runs until `until` (since start).
    pub fn run_until(&mut self, until: Duration) {
        let end = self.start + until;
        while self.now < end {
            let mut next = self.tx_timeout.min(self.rx_timeout).min(self.next_frame);
            for t in [self.down.next(), self.up.next()].into_iter().flatten() {
                next = next.min(t);
            }
            if let Some(t) = self.abr.as_ref().and_then(Controller::poll_timeout) {
                next = next.min(t);
            }
            self.now = next.min(end).max(self.now);
            let now = self.now;
            while self.down.next().is_some_and(|t| t <= now) {
                let (_, from, to, data) = self.down.flight.pop_front().unwrap();
                let r = Receive::new(Protocol::Udp, from, to, &data).unwrap();
                self.rx.handle_input(Input::Receive(now, r)).unwrap();
            }
            let t0 = Instant::now();
            while self.up.next().is_some_and(|t| t <= now) {
                let (_, from, to, data) = self.up.flight.pop_front().unwrap();
                let r = Receive::new(Protocol::Udp, from, to, &data).unwrap();
                self.tx_clock = self.tx_clock.max(now);
                self.tx
                    .handle_input(Input::Receive(self.tx_clock, r))
                    .unwrap();
            }
            if now >= self.tx_timeout {
                self.tx_clock = self.tx_clock.max(now);
                self.tx.handle_input(Input::Timeout(self.tx_clock)).unwrap();
                self.tx_wakes += 1;
            }
            self.tx_cpu += t0.elapsed();
            if now >= self.rx_timeout {
                self.rx.handle_input(Input::Timeout(now)).unwrap();
            }
            if now >= self.next_frame {
                if self.tx.is_connected() && self.media_bps > 0 {
                    let t0 = Instant::now();
                    self.write_frame();
                    self.tx_clock = self.tx_clock.max(now);
                    self.tx.handle_input(Input::Timeout(self.tx_clock)).unwrap();
                    self.tx_cpu += t0.elapsed();
                }
                self.next_frame += Duration::from_millis(1000 / FPS);
            }
            self.drain();
            self.abr();
            self.drain();
        }
    }

    /// The mean estimate over `[from, to)`, bit/s (time-weighted).
    pub fn mean_estimate(&self, from: Duration, to: Duration) -> u64 {
        let mut sum = 0.0;
        let mut last: Option<(Duration, u64)> = None;
        for &(t, e) in self.estimates.iter().chain([(to, 0)].iter()) {
            if let Some((lt, le)) = last {
                let a = lt.max(from);
                let b = t.min(to);
                if b > a {
                    sum += (b - a).as_secs_f64() * le as f64;
                }
            }
            last = Some((t, e));
            if t >= to {
                break;
            }
        }
        (sum / (to - from).as_secs_f64()) as u64
    }

    /// The first time at or after `from` the estimate is within `lo..=hi`.
    pub fn reached(&self, from: Duration, lo: u64, hi: u64) -> Option<Duration> {
        self.estimates
            .iter()
            .find(|(t, e)| *t >= from && (lo..=hi).contains(e))
            .map(|(t, _)| *t - from)
    }

    pub fn set_cap(&mut self, cap: Option<u64>) {
        self.down.rate = cap;
    }

    /// The sender's retransmission cap, as the edge sets it for a session
    /// with an estimator (`viewer::rtx_ratio_cap`).
    pub fn cap_rtx(&mut self, cap: Option<f32>) {
        let mid = self.mid;
        let mut d = self.tx.direct_api();
        d.stream_tx_by_mid(mid, None)
            .unwrap()
            .set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, cap);
    }
}
