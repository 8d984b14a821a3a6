//! WHEP viewer: a str0m client that offers like a browser, receives and verifies frames.
//!
//! Offer (recvonly: H.264 in several profiles, VP8, Opus) → `POST /whep/{stream}` → answer →
//! ICE + DTLS → depacketized frames checked into a [`ViewerReport`]; the session runs in a tokio task and
//! ends on its duration, `stop()`/`delete()`, or ICE disconnect.

mod check;
mod light;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Url;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Event, IceConnectionState, Rtc, RtcConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use self::check::{is_decodable_start, LiveCounters, SeqGap, ViewerReport};
pub use crate::http::{post_offer, Reply};

use self::check::{Checker, Received};
use self::light::HeaderTap;
use crate::peer::Peer;
use crate::{http, janus, Error, Result};

/// Video codecs a viewer can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    /// H.264 in str0m's browser-like set (baseline, constrained baseline, main, high; both
    /// packetization modes).
    H264,
    /// VP8.
    Vp8,
    /// VP9 (profiles 0 and 2).
    Vp9,
    /// AV1.
    Av1,
    /// H.265 (str0m's; browsers that play it are few, docs/codecs.md).
    H265,
}

/// How a viewer's media travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// A UDP host candidate (the normal case).
    #[default]
    Udp,
    /// ICE-TCP only (an active candidate, RFC 4571 framing): a viewer whose network blocks UDP.
    Tcp,
}

/// How to view.
#[derive(Debug, Clone)]
pub struct ViewerOptions {
    /// `http://HOST:PORT/whep/{stream}`.
    pub url: String,
    /// Viewer token, if the server wants one.
    pub token: Option<String>,
    /// Stop by itself after this long from the POST; `None` runs until stopped.
    pub duration: Option<Duration>,
    /// Deadline for ICE + DTLS after the answer.
    pub connect_timeout: Duration,
    /// Video codecs to offer, in preference order; empty = no video m-line.
    pub video_codecs: Vec<VideoCodec>,
    /// Offer an Opus m-line.
    pub audio: bool,
    /// Local address for the UDP socket.
    pub bind: IpAddr,
    /// Shared live counters (for progress over many viewers).
    pub live: Option<Arc<LiveCounters>>,
    /// Read only the clear RTP headers (no SRTP decryption, no frame checks): a cheap
    /// viewer for load, measuring loss, jitter and packet counts.
    pub headers_only: bool,
    /// UDP or ICE-TCP.
    pub transport: Transport,
    /// Watch this Janus streaming mountpoint instead: `url` is then the Janus HTTP API
    /// (`http://HOST:8088/janus`) and Janus makes the offer ([`crate::janus`]).
    pub janus_mountpoint: Option<u64>,
    /// A CA to trust for an `https://` URL besides the system's roots.
    pub root_ca: Option<reqwest::Certificate>,
    /// Cap what this viewer receives at this many bit/s, like a `tbf` on its link
    /// ([`crate::shaper`]; UDP only). The server then sees a real bottleneck in its
    /// congestion feedback. A capped viewer should not be `headers_only`: str0m must see
    /// every packet to send transport-wide feedback.
    pub cap_bps: Option<u64>,
    /// Offer transport-wide congestion control feedback (str0m's default header
    /// extensions, as browsers do). `false`: a WHEP client without it, which a server
    /// cannot estimate the bandwidth of.
    pub twcc: bool,
}

impl ViewerOptions {
    /// Defaults for `url`: H.264 + VP8 + Opus, no token, until stopped, on 127.0.0.1.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            duration: None,
            connect_timeout: Duration::from_secs(10),
            video_codecs: vec![VideoCodec::H264, VideoCodec::Vp8],
            audio: true,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            live: None,
            headers_only: false,
            transport: Transport::Udp,
            janus_mountpoint: None,
            root_ca: None,
            cap_bps: None,
            twcc: true,
        }
    }
}

/// A browser-like offer as SDP text (no candidates, no session behind it): for tests that
/// only look at the HTTP answer (406 for codecs the stream lacks, 401, 404, …).
pub fn offer_sdp(video_codecs: &[VideoCodec], audio: bool) -> Result<String> {
    let mut rtc = config(video_codecs, audio, true).build(Instant::now());
    let (offer, _, _) = add_media(&mut rtc, !video_codecs.is_empty(), audio)?;
    Ok(offer.to_sdp_string())
}

fn config(video_codecs: &[VideoCodec], audio: bool, twcc: bool) -> RtcConfig {
    let mut cfg = RtcConfig::new().clear_codecs();
    if !twcc {
        let mut exts = ExtensionMap::empty();
        for (id, e) in ExtensionMap::standard().iter() {
            if *e != Extension::TransportSequenceNumber {
                exts.set(id, e.clone());
            }
        }
        cfg = cfg.set_extension_map(exts);
    }
    if audio {
        cfg = cfg.enable_opus(true, false);
    }
    for c in video_codecs {
        cfg = match c {
            VideoCodec::H264 => cfg.enable_h264(true),
            VideoCodec::Vp8 => cfg.enable_vp8(true),
            VideoCodec::Vp9 => cfg.enable_vp9(true),
            VideoCodec::Av1 => cfg.enable_av1(true),
            VideoCodec::H265 => cfg.enable_h265(true),
        };
    }
    cfg
}

type Mids = (Option<Mid>, Option<Mid>);

fn add_media(rtc: &mut Rtc, video: bool, audio: bool) -> Result<(SdpOffer, SdpPendingOffer, Mids)> {
    let mut api = rtc.sdp_api();
    let video =
        video.then(|| api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None));
    let audio =
        audio.then(|| api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None));
    let (offer, pending) = api
        .apply()
        .ok_or_else(|| Error::BadAnswer("offer has no media".into()))?;
    Ok((offer, pending, (video, audio)))
}

/// A running viewer. Dropping it stops the task.
#[derive(Debug)]
pub struct Viewer {
    janus: bool,
    location: Url,
    token: Option<String>,
    client: reqwest::Client,
    cancel: CancellationToken,
    connected: watch::Receiver<bool>,
    task: Option<JoinHandle<Result<ViewerReport>>>,
    duration: Option<Duration>,
    connect_timeout: Duration,
    video_frames: Arc<AtomicU64>,
}

impl Viewer {
    /// Offer, POST, apply the answer and start the session task. A non-201 answer is
    /// [`Error::Status`] with the server's status and body.
    pub async fn start(opts: ViewerOptions) -> Result<Self> {
        let posted = Instant::now();
        let rtc = config(&opts.video_codecs, opts.audio, opts.twcc).build(Instant::now());
        // Bind first: the offer carries the candidates known when it is made.
        let mut peer = match opts.transport {
            Transport::Udp => Peer::bind(rtc, opts.bind)?,
            Transport::Tcp => Peer::tcp(rtc, opts.bind)?,
        };
        if let Some(bps) = opts.cap_bps {
            peer.set_cap(bps);
        }
        let client = http::client_trusting(opts.root_ca.as_ref())?;
        let (answer_sdp, location, mids) = match opts.janus_mountpoint {
            None => {
                let video = !opts.video_codecs.is_empty();
                let (offer, pending, mids) = add_media(&mut peer.rtc, video, opts.audio)?;
                let offer_sdp = offer.to_sdp_string();
                let created =
                    http::create_session(&client, &opts.url, &offer_sdp, opts.token.as_deref())
                        .await?;
                let answer = SdpAnswer::from_sdp_string(&created.answer)
                    .map_err(|e| Error::BadAnswer(format!("answer sdp: {e}")))?;
                peer.rtc.sdp_api().accept_answer(pending, answer)?;
                (created.answer, created.location, mids)
            }
            Some(mountpoint) => {
                let w = janus::watch(&client, &opts.url, mountpoint).await?;
                let offer = SdpOffer::from_sdp_string(&w.offer)
                    .map_err(|e| Error::BadAnswer(format!("janus offer sdp: {e}")))?;
                let answer = peer.rtc.sdp_api().accept_offer(offer)?.to_sdp_string();
                janus::start(&client, &w, &answer).await?;
                let (v, a) = janus::mids(&answer);
                let mids = (
                    v.map(|m| Mid::from(m.as_str())),
                    a.map(|m| Mid::from(m.as_str())),
                );
                (answer, w.session, mids)
            }
        };
        let cancel = CancellationToken::new();
        let (connected_tx, connected) = watch::channel(false);
        let live = opts.live.clone().unwrap_or_default();
        let video_frames = Arc::new(AtomicU64::new(0));
        let session = Session {
            video_frames: Arc::clone(&video_frames),
            peer,
            mids,
            posted,
            duration: opts.duration,
            connect_timeout: opts.connect_timeout,
            cancel: cancel.clone(),
            connected: connected_tx,
            live,
            tap: opts
                .headers_only
                .then(|| HeaderTap::new(&answer_sdp, posted)),
            cap_bps: opts.cap_bps,
        };
        let span = tracing::info_span!("whep_viewer", location = %location);
        let task = tokio::spawn(session.run().instrument(span));
        Ok(Self {
            janus: opts.janus_mountpoint.is_some(),
            location,
            token: opts.token,
            client,
            cancel,
            connected,
            task: Some(task),
            duration: opts.duration,
            connect_timeout: opts.connect_timeout,
            video_frames,
        })
    }

    /// Video frames this viewer has received so far.
    pub fn video_frames(&self) -> u64 {
        self.video_frames.load(Ordering::Relaxed)
    }

    /// Wait until this viewer has received at least `n` video frames, within `limit`.
    pub async fn wait_video_frames(&self, n: u64, limit: Duration) -> Result<()> {
        let poll = async {
            while self.video_frames() < n {
                if self.is_finished() {
                    return Err(Error::Task("viewer ended".into()));
                }
                // Frames come every ~33 ms; polling at 10 ms adds little delay.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        };
        tokio::time::timeout(limit, poll)
            .await
            .map_err(|_| Error::Timeout("viewer video frames"))?
    }

    /// The session resource URL (from `Location`).
    pub fn location(&self) -> &Url {
        &self.location
    }

    /// Wait until ICE + DTLS are up.
    pub async fn wait_connected(&mut self) -> Result<()> {
        let wait = self.connected.wait_for(|c| *c);
        match tokio::time::timeout(self.connect_timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Task("viewer ended before connecting".into())),
            Err(_) => Err(Error::Timeout("viewer connect")),
        }
    }

    /// True once the session task has ended (duration, disconnect or error).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stop now and return what was seen.
    pub async fn stop(mut self) -> Result<ViewerReport> {
        self.cancel.cancel();
        self.join(Duration::from_secs(5)).await
    }

    /// `DELETE` the session, then stop. Returns the DELETE status and the report.
    pub async fn delete(mut self) -> Result<(u16, ViewerReport)> {
        let status = if self.janus {
            janus::destroy(&self.client, &self.location).await
        } else {
            http::delete(&self.client, &self.location, self.token.as_deref()).await
        };
        self.cancel.cancel();
        let report = self.join(Duration::from_secs(5)).await?;
        Ok((status?, report))
    }

    /// Wait for the session to end by itself (its duration, or a disconnect), within `limit`.
    pub async fn finish(mut self, limit: Duration) -> Result<ViewerReport> {
        self.join(limit).await
    }

    /// Wait for the configured duration to run out (plus slack); error if none was set.
    pub async fn finish_duration(self) -> Result<ViewerReport> {
        let Some(d) = self.duration else {
            return Err(Error::Task("finish_duration() needs a duration".into()));
        };
        let limit = d + self.connect_timeout + Duration::from_secs(5);
        self.finish(limit).await
    }

    async fn join(&mut self, limit: Duration) -> Result<ViewerReport> {
        crate::peer::join_task(&mut self.task, limit, "viewer task").await
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Session {
    peer: Peer,
    mids: Mids,
    posted: Instant,
    duration: Option<Duration>,
    connect_timeout: Duration,
    cancel: CancellationToken,
    connected: watch::Sender<bool>,
    live: Arc<LiveCounters>,
    tap: Option<HeaderTap>,
    video_frames: Arc<AtomicU64>,
    cap_bps: Option<u64>,
}

impl Session {
    async fn run(mut self) -> Result<ViewerReport> {
        let mut checker = Checker::default();
        let connect_deadline = self.posted + self.connect_timeout;
        let end_at = self.duration.map(|d| self.posted + d);
        let end = loop {
            let mut disconnected = false;
            let mut connected_now = false;
            let (video_mid, _) = self.mids;
            let posted = self.posted;
            let live = Arc::clone(&self.live);
            let timeout = self
                .peer
                .drain(|e| match e {
                    Event::Connected => connected_now = true,
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        disconnected = true
                    }
                    Event::MediaData(d) => {
                        let now = Instant::now();
                        let f = Received {
                            video: Some(d.mid) == video_mid,
                            codec: d.params.spec().codec,
                            data: &d.data,
                            media_secs: d.time.as_seconds(),
                            rtp_seqs: (**d.seq_range.start(), **d.seq_range.end()),
                            contiguous: d.contiguous,
                            arrival: now,
                            since_post: now - posted,
                        };
                        checker.frame(&f, &live);
                    }
                    _ => {}
                })
                .await?;
            let tapped = self.tap.as_ref().map_or(0, HeaderTap::video_frames);
            self.video_frames
                .store(checker.report.video_frames + tapped, Ordering::Relaxed);
            let now = Instant::now();
            if connected_now && !checker.report.connected {
                checker.report.connected = true;
                checker.report.connect_ms = Some((now - self.posted).as_secs_f64() * 1000.0);
                self.live.connected.fetch_add(1, Ordering::Relaxed);
                let _ = self.connected.send(true);
            }
            if disconnected {
                break "disconnected";
            }
            if self.cancel.is_cancelled() {
                break "stopped";
            }
            if end_at.is_some_and(|e| now >= e) {
                break "duration";
            }
            let mut until = timeout;
            if !checker.report.connected {
                if now > connect_deadline {
                    self.live.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::Timeout("viewer ice/dtls"));
                }
                until = until.min(connect_deadline);
            }
            if let Some(e) = end_at {
                until = until.min(e);
            }
            let live = &self.live;
            let waited = match self.tap.as_mut() {
                Some(tap) => {
                    let mut f = |d: &[u8], now: Instant| tap.packet(d, now, live);
                    tokio::select! {
                        _ = self.cancel.cancelled() => Ok(()),
                        r = self.peer.wait_tapped(until, &mut f) => r,
                    }
                }
                None => tokio::select! {
                    _ = self.cancel.cancelled() => Ok(()),
                    r = self.peer.wait(until) => r,
                },
            };
            waited?;
        };
        if checker.report.connected {
            self.live.connected.fetch_sub(1, Ordering::Relaxed);
        }
        let mut report = checker.finish(end);
        if let Some(tap) = &self.tap {
            tap.finish(&mut report);
        }
        report.cap_bps = self.cap_bps;
        report.cap_dropped = self.peer.cap_dropped();
        tracing::info!(end, video = report.video_frames, "viewer ended");
        Ok(report)
    }
}
