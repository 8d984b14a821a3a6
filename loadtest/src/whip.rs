//! WHIP publisher: a str0m client that publishes the looping test clip in real time.
//!
//! Offer (sendonly H.264 of the clip's profile + Opus) → `POST /whip/{stream}` → answer →
//! ICE (we are the full, controlling agent) + DTLS → frames paced by their timestamps, each
//! video frame tagged ([`crate::tag`]). Keyframe requests are counted (a file cannot honour them).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Url;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::{Event, IceConnectionState, Input, Rtc, RtcConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::http::{post_offer, Reply};
use crate::media::{Profile, TestMedia};
use crate::peer::Peer;
use crate::tag::{self, Tag};
use crate::{http, wallclock_us, Error, Result};

/// Payload type we offer for H.264 (and its RTX), as browsers use dynamic ones.
const PT_H264: u8 = 102;
const PT_H264_RTX: u8 = 103;
/// Immediate timeouts handled per loop turn before falling back to the timer (str0m asks
/// for `Timeout(now)` once or twice after a write; the bound keeps a bug from spinning).
const MAX_IMMEDIATE: usize = 8;

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// `http://HOST:PORT/whip/{stream}`.
    pub url: String,
    /// Publish token (sent as `Authorization: Bearer`).
    pub token: Option<String>,
    /// Stop by itself after this long of sending; `None` runs until stopped.
    pub duration: Option<Duration>,
    /// Deadline for ICE + DTLS after the answer.
    pub connect_timeout: Duration,
    /// Sequence number of the first tagged frame (continue a sequence across a takeover).
    pub seq_start: u64,
    /// Local address for the UDP socket.
    pub bind: IpAddr,
    /// Send the Opus track too.
    pub audio: bool,
    /// Put the SEI tag (sequence, send time) into every video frame.
    pub tag: bool,
    /// A CA to trust for an `https://` URL besides the system's roots.
    pub root_ca: Option<reqwest::Certificate>,
}

impl PublisherOptions {
    /// Defaults for `url`: no token, runs until stopped, 10 s to connect, on 127.0.0.1.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            duration: None,
            connect_timeout: Duration::from_secs(10),
            seq_start: 0,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            audio: true,
            tag: true,
            root_ca: None,
        }
    }
}

/// What a publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublisherReport {
    /// ICE + DTLS completed.
    pub connected: bool,
    /// From POST to DTLS connected.
    pub connect_time: Option<Duration>,
    /// Video frames written.
    pub video_frames: u64,
    /// Keyframes among them.
    pub keyframes: u64,
    /// Opus packets written.
    pub audio_frames: u64,
    /// PLI/FIR received from the server.
    pub keyframe_requests: u64,
    /// Sequence number the next frame would have carried.
    pub next_seq: u64,
    /// Why it ended: "duration", "stopped" or "disconnected".
    pub end: &'static str,
}

/// A publisher's offer as SDP text (no candidates, no session behind it): for tests that
/// only look at the HTTP answer (401, 400, 415, 413, …).
pub fn offer_sdp(profile: Profile, audio: bool) -> Result<String> {
    let mut rtc = config(profile).build(Instant::now());
    let (offer, ..) = add_media(&mut rtc, audio)?;
    Ok(offer.to_sdp_string())
}

fn config(profile: Profile) -> RtcConfig {
    let mut cfg = RtcConfig::new().clear_codecs().enable_opus(true, false);
    cfg.codec_config().add_h264(
        PT_H264.into(),
        Some(PT_H264_RTX.into()),
        true,
        profile.profile_level_id(),
    );
    cfg
}

fn add_media(rtc: &mut Rtc, audio: bool) -> Result<(SdpOffer, SdpPendingOffer, Mid, Option<Mid>)> {
    let mut api = rtc.sdp_api();
    let msid = Some("cascade-loadtest".to_string());
    let video = api.add_media(
        MediaKind::Video,
        Direction::SendOnly,
        msid.clone(),
        Some("video".into()),
        None,
    );
    let audio = audio.then(|| {
        api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            msid,
            Some("audio".into()),
            None,
        )
    });
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| Error::BadAnswer("nothing to offer".into()))?;
    Ok((offer, pending, video, audio))
}

/// A running publisher (its session runs in a tokio task). Dropping it stops the task.
#[derive(Debug)]
pub struct Publisher {
    location: Url,
    token: Option<String>,
    client: reqwest::Client,
    cancel: CancellationToken,
    connected: watch::Receiver<bool>,
    task: Option<JoinHandle<Result<PublisherReport>>>,
    duration: Option<Duration>,
    connect_timeout: Duration,
    next_seq: Arc<AtomicU64>,
}

impl Publisher {
    /// Offer, POST, apply the answer and start the session task. Returns once the server
    /// answered `201`; a non-201 answer is [`Error::Status`].
    pub async fn start(opts: PublisherOptions, media: Arc<TestMedia>) -> Result<Self> {
        let posted = Instant::now();
        let cfg = config(media.options.profile);
        let mut peer = Peer::bind(cfg.build(Instant::now()), opts.bind)?;
        let (offer, pending, video_mid, audio_mid) = add_media(&mut peer.rtc, opts.audio)?;
        let client = http::client_trusting(opts.root_ca.as_ref())?;
        let created = http::create_session(
            &client,
            &opts.url,
            &offer.to_sdp_string(),
            opts.token.as_deref(),
        )
        .await?;
        let answer = SdpAnswer::from_sdp_string(&created.answer)
            .map_err(|e| Error::BadAnswer(format!("answer sdp: {e}")))?;
        peer.rtc.sdp_api().accept_answer(pending, answer)?;
        let video_pt = negotiated_pt(&mut peer, video_mid, Codec::H264)?;
        let audio = match audio_mid {
            Some(mid) => Some((mid, negotiated_pt(&mut peer, mid, Codec::Opus)?)),
            None => None,
        };
        let cancel = CancellationToken::new();
        let (connected_tx, connected) = watch::channel(false);
        let next_seq = Arc::new(AtomicU64::new(opts.seq_start));
        let session = Session {
            next_seq: Arc::clone(&next_seq),
            peer,
            media,
            video: (video_mid, video_pt),
            audio,
            opts: opts.clone(),
            posted,
            cancel: cancel.clone(),
            connected: connected_tx,
        };
        let span = tracing::info_span!("whip_publisher", location = %created.location);
        let task = tokio::spawn(session.run().instrument(span));
        Ok(Self {
            location: created.location,
            token: opts.token,
            client,
            cancel,
            connected,
            task: Some(task),
            duration: opts.duration,
            connect_timeout: opts.connect_timeout,
            next_seq,
        })
    }

    /// The tag sequence number the next video frame will carry (frames sent so far +
    /// `seq_start`): a takeover publisher can continue from here.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// The session resource URL (from `Location`).
    pub fn location(&self) -> &Url {
        &self.location
    }

    /// Wait until ICE + DTLS are up (media flows from then on).
    pub async fn wait_connected(&mut self) -> Result<()> {
        let wait = self.connected.wait_for(|c| *c);
        match tokio::time::timeout(self.connect_timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Task("publisher ended before connecting".into())),
            Err(_) => Err(Error::Timeout("publisher connect")),
        }
    }

    /// Stop sending without telling the server (like an encoder that vanished).
    pub async fn stop(mut self) -> Result<PublisherReport> {
        self.cancel.cancel();
        self.join(Duration::from_secs(5)).await
    }

    /// `DELETE` the session, then stop. Returns the DELETE status and the report.
    pub async fn delete(mut self) -> Result<(u16, PublisherReport)> {
        let status = http::delete(&self.client, &self.location, self.token.as_deref()).await;
        self.cancel.cancel();
        let report = self.join(Duration::from_secs(5)).await?;
        Ok((status?, report))
    }

    /// Wait for the configured duration to run out (error if none was set).
    pub async fn finish(mut self) -> Result<PublisherReport> {
        let Some(d) = self.duration else {
            return Err(Error::Task("finish() needs a duration".into()));
        };
        self.join(d + self.connect_timeout + Duration::from_secs(5))
            .await
    }

    async fn join(&mut self, limit: Duration) -> Result<PublisherReport> {
        crate::peer::join_task(&mut self.task, limit, "publisher task").await
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The payload type the answer kept for `codec` on `mid`.
pub(crate) fn negotiated_pt(peer: &mut Peer, mid: Mid, codec: Codec) -> Result<Pt> {
    let writer = peer
        .rtc
        .writer(mid)
        .ok_or_else(|| Error::BadAnswer(format!("answer rejected m-line {mid}")))?;
    let pt = writer
        .payload_params()
        .find(|p| p.spec().codec == codec)
        .map(|p| p.pt());
    pt.ok_or_else(|| Error::BadAnswer(format!("answer has no {codec:?}")))
}

struct Session {
    peer: Peer,
    media: Arc<TestMedia>,
    video: (Mid, Pt),
    audio: Option<(Mid, Pt)>,
    opts: PublisherOptions,
    posted: Instant,
    cancel: CancellationToken,
    connected: watch::Sender<bool>,
    next_seq: Arc<AtomicU64>,
}

/// Where the pacer is in the looping clip.
#[derive(Default)]
struct Cursor {
    index: usize,
    loops: u64,
}

impl Session {
    async fn run(mut self) -> Result<PublisherReport> {
        let mut report = PublisherReport {
            next_seq: self.opts.seq_start,
            ..Default::default()
        };
        let connect_deadline = Instant::now() + self.opts.connect_timeout;
        let mut t0: Option<Instant> = None;
        let (mut vcur, mut acur) = (Cursor::default(), Cursor::default());
        loop {
            let mut disconnected = false;
            let mut connected_now = false;
            let mut immediate = 0;
            let timeout = loop {
                let timeout = self.peer.drain(|e| match e {
                    Event::Connected => connected_now = true,
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        disconnected = true
                    }
                    Event::KeyframeRequest(_) => report.keyframe_requests += 1,
                    _ => {}
                });
                let timeout = timeout.await?;
                // After a write str0m asks for `Timeout(now)`: it hands out queued packets
                // only after a timeout. Left to the tokio timer (1 ms ticks, rounded up),
                // every frame left ~1.3 ms late (measured: docs/benchmarks.md, "Where the
                // flat 10 ms went"), which the latency figures then charged to the server.
                let now = Instant::now();
                if timeout > now || immediate == MAX_IMMEDIATE {
                    break timeout;
                }
                immediate += 1;
                self.peer.rtc.handle_input(Input::Timeout(now))?;
            };
            let now = Instant::now();
            if connected_now && t0.is_none() {
                t0 = Some(now);
                report.connected = true;
                report.connect_time = Some(now - self.posted);
                let _ = self.connected.send(true);
                tracing::info!("connected");
            }
            if disconnected {
                report.end = "disconnected";
                break;
            }
            if self.cancel.is_cancelled() {
                report.end = "stopped";
                break;
            }
            let Some(start) = t0 else {
                if now > connect_deadline {
                    return Err(Error::Timeout("publisher ice/dtls"));
                }
                self.wait(timeout.min(connect_deadline)).await?;
                continue;
            };
            if self.opts.duration.is_some_and(|d| now >= start + d) {
                report.end = "duration";
                break;
            }
            let wrote = self.write_due(start, now, &mut vcur, &mut acur, &mut report)?;
            if wrote {
                continue; // drain what we just wrote before sleeping
            }
            let next = self.next_due(start, &vcur, &acur);
            self.wait(timeout.min(next)).await?;
        }
        tracing::info!(
            end = report.end,
            frames = report.video_frames,
            "publisher ended"
        );
        Ok(report)
    }

    async fn wait(&mut self, until: Instant) -> Result<()> {
        tokio::select! {
            _ = self.cancel.cancelled() => Ok(()),
            r = self.peer.wait(until) => r,
        }
    }

    fn video_time(&self, c: &Cursor) -> u64 {
        let pts = self.media.video.get(c.index).map_or(0, |f| f.pts_90k);
        c.loops * self.media.duration_90k + pts
    }

    fn audio_time(&self, c: &Cursor) -> u64 {
        let pts = self.media.audio.get(c.index).map_or(0, |f| f.pts_48k);
        c.loops * self.media.duration_48k + pts
    }

    fn next_due(&self, start: Instant, v: &Cursor, a: &Cursor) -> Instant {
        let vt = start + Duration::from_micros(self.video_time(v) * 1_000_000 / 90_000);
        if self.audio.is_none() {
            return vt;
        }
        let at = start + Duration::from_micros(self.audio_time(a) * 1_000_000 / 48_000);
        vt.min(at)
    }

    /// Write every frame whose time has come; true if anything was written.
    fn write_due(
        &mut self,
        start: Instant,
        now: Instant,
        v: &mut Cursor,
        a: &mut Cursor,
        report: &mut PublisherReport,
    ) -> Result<bool> {
        let elapsed = now - start;
        let mut wrote = false;
        let (vmid, vpt) = self.video;
        while Duration::from_micros(self.video_time(v) * 1_000_000 / 90_000) <= elapsed {
            let Some(frame) = self.media.video.get(v.index) else {
                break;
            };
            let t = Tag {
                seq: report.next_seq,
                sent_us: wallclock_us(),
            };
            let data = if self.opts.tag {
                tag::insert(&frame.annexb, t)
            } else {
                frame.annexb.to_vec()
            };
            let time = MediaTime::new(self.video_time(v), Frequency::NINETY_KHZ);
            let keyframe = frame.keyframe;
            let writer = self
                .peer
                .rtc
                .writer(vmid)
                .ok_or_else(|| Error::Task("video writer gone".into()))?;
            writer.write(vpt, now, time, data)?;
            report.video_frames += 1;
            report.keyframes += u64::from(keyframe);
            report.next_seq += 1;
            self.next_seq.store(report.next_seq, Ordering::Relaxed);
            wrote = true;
            advance(v, self.media.video.len());
        }
        if let Some((amid, apt)) = self.audio {
            while Duration::from_micros(self.audio_time(a) * 1_000_000 / 48_000) <= elapsed {
                let Some(frame) = self.media.audio.get(a.index) else {
                    break;
                };
                let time = MediaTime::new(self.audio_time(a), Frequency::FORTY_EIGHT_KHZ);
                let data = frame.packet.to_vec();
                let writer = self
                    .peer
                    .rtc
                    .writer(amid)
                    .ok_or_else(|| Error::Task("audio writer gone".into()))?;
                writer.write(apt, now, time, data)?;
                report.audio_frames += 1;
                wrote = true;
                advance(a, self.media.audio.len());
            }
        }
        Ok(wrote)
    }
}

fn advance(c: &mut Cursor, len: usize) {
    c.index += 1;
    if c.index >= len {
        c.index = 0;
        c.loops += 1;
    }
}
