//! The async shell of one pull: runs the [`Pull`] core on the clock, one
//! retina connection at a time (a task it aborts on [`Action::Disconnect`]),
//! and the stream's [`Publisher`], which outlives connections so viewers
//! stay through a camera reboot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cascade_origin::catalog::Codec;
use cascade_origin::registry::Publisher;
use cascade_origin::Registry;
use futures::StreamExt;
use retina::client::{
    Credentials, InitialTimestampPolicy, PacketItem, PlayOptions, Session, SessionOptions,
    SetupOptions, TeardownPolicy,
};
use retina::codec::{CodecItem, FrameFormat, ParameterSetInsertion, ParametersRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::bframes::Bframes;
use super::core::{Action, Pull, State, Step};
use super::depacketize::{Depacketizer, Kind};
use super::media::{AudioIn, Media, Out};
use super::{Status, Transport};
use crate::audio::g711::Law;
use crate::metrics as m;
use crate::transcode::{self, Event, Policy};

/// Reports a connection sends to its shell; frames are reported with
/// `try_send` (a full queue loses only a liveness tick).
const REPORTS: usize = 64;
/// How often the shell counts the stream's readers (on-demand grace).
const READER_TICK: Duration = Duration::from_secs(1);

/// What a connection attempt reports.
#[derive(Debug)]
enum Report {
    Step(u64, Step),
    Frame(u64),
    Error(u64, String),
}

/// What one pull needs to run.
pub(super) struct Ctx {
    pub(super) name: String,
    /// Without credentials (retina refuses them in the URL).
    pub(super) url: url::Url,
    pub(super) creds: Option<Credentials>,
    pub(super) transport: Transport,
    pub(super) on_demand: bool,
    pub(super) grace: Duration,
    pub(super) registry: Arc<Registry>,
    pub(super) status: Arc<Status>,
    /// What to do with B-frame video (`--bframes`).
    pub(super) bframes: Policy,
}

type Slot = Arc<Mutex<Option<Publisher>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a pull until its task is aborted (DELETE, shutdown).
pub(super) async fn run(ctx: Arc<Ctx>) {
    let mut pull = Pull::new(Instant::now(), ctx.on_demand, ctx.grace);
    let (tx, mut rx) = mpsc::channel::<Report>(REPORTS);
    let slot: Slot = Arc::new(Mutex::new(None));
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(READER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = State::Idle;
    metrics::gauge!(m::RTSP_PULLS, "state" => shown.as_str()).increment(1.0);
    let _gauge = GaugeGuard(Arc::clone(&ctx.status));
    loop {
        perform(&ctx, &mut pull, &mut conn, &slot, &tx);
        let state = pull.state();
        if state != shown {
            metrics::gauge!(m::RTSP_PULLS, "state" => shown.as_str()).decrement(1.0);
            metrics::gauge!(m::RTSP_PULLS, "state" => state.as_str()).increment(1.0);
            match (state, pull.error()) {
                (State::Error, Some(e)) => {
                    tracing::warn!(stream = %ctx.name, url = %ctx.url, error = e, "rtsp pull failed")
                }
                _ => {
                    tracing::info!(stream = %ctx.name, url = %ctx.url, state = state.as_str(), "rtsp pull")
                }
            }
            shown = state;
        }
        ctx.status.set(state, pull.error().map(str::to_string));
        let deadline = pull.poll_timeout();
        tokio::select! {
            biased;
            Some(r) = rx.recv() => {
                let now = Instant::now();
                match r {
                    Report::Step(a, s) => pull.handle_step(now, a, s),
                    Report::Frame(a) => pull.handle_frame(now, a),
                    Report::Error(a, e) => pull.handle_error(now, a, e),
                }
            }
            () = ctx.status.request.notified() => pull.request(Instant::now()),
            _ = tick.tick() => {
                let readers = ctx.registry.subscribers(&ctx.name);
                pull.handle_readers(Instant::now(), readers);
            }
            () = sleep_until(deadline) => pull.handle_timeout(Instant::now()),
        }
    }
}

/// Moves the state gauge off this pull's state when its task ends.
struct GaugeGuard(Arc<Status>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        let state = self.0.state().0;
        metrics::gauge!(m::RTSP_PULLS, "state" => state.as_str()).decrement(1.0);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// A running connection attempt: aborted when dropped.
struct Conn(JoinHandle<()>);

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn perform(
    ctx: &Arc<Ctx>,
    pull: &mut Pull,
    conn: &mut Option<Conn>,
    slot: &Slot,
    tx: &mpsc::Sender<Report>,
) {
    while let Some(action) = pull.poll_action() {
        match action {
            Action::Connect(attempt) => {
                if attempt > 1 {
                    metrics::counter!(m::RTSP_RECONNECTS).increment(1);
                }
                let span = tracing::info_span!("rtsp", stream = %ctx.name, attempt);
                let task = connect(ctx.clone(), attempt, slot.clone(), tx.clone());
                *conn = Some(Conn(tokio::spawn(task.instrument(span))));
            }
            Action::Disconnect => *conn = None,
            Action::Unpublish => {
                if lock(slot).take().is_some() {
                    tracing::info!(stream = %ctx.name, "rtsp stream ended");
                }
            }
        }
    }
}

/// One connection attempt: its outcome goes to the shell as a report.
async fn connect(ctx: Arc<Ctx>, attempt: u64, slot: Slot, tx: mpsc::Sender<Report>) {
    let e = match session(&ctx, attempt, &slot, &tx).await {
        Ok(()) => "the camera ended the stream".to_string(),
        Err(e) => e,
    };
    let _ = tx.send(Report::Error(attempt, e)).await;
}

/// The frame layout we ask retina for: Annex-B with the parameter sets in
/// front of every keyframe (the registry's contract), raw AAC access units.
fn frame_format() -> FrameFormat {
    FrameFormat {
        h26x_framing: retina::codec::h26x::Framing::AnnexB,
        parameter_set_insertion: ParameterSetInsertion::EachKeyFrame,
        aac_framing: retina::codec::aac::Framing::Raw,
    }
}

/// The streams of a presentation we take: the first H.264/H.265 video and
/// the first AAC, G.711 or Opus audio.
struct Plan {
    video: (usize, Codec),
    audio: Option<usize>,
}

fn plan(streams: &[retina::client::Stream]) -> Result<Plan, String> {
    let video = streams.iter().enumerate().find_map(|(i, s)| {
        let codec = match (s.media(), s.encoding_name()) {
            ("video", "h264") => Codec::H264,
            ("video", "h265") => Codec::H265,
            _ => return None,
        };
        Some((i, codec))
    });
    let Some(video) = video else {
        let offered: Vec<String> = streams
            .iter()
            .map(|s| format!("{}/{}", s.media(), s.encoding_name()))
            .collect();
        return Err(format!(
            "no supported video codec (the camera offers {}; cascade takes H.264 or H.265)",
            if offered.is_empty() {
                "nothing".to_string()
            } else {
                offered.join(", ")
            }
        ));
    };
    let audio = streams.iter().position(|s| {
        s.media() == "audio"
            && matches!(
                s.encoding_name(),
                "mpeg4-generic" | "pcmu" | "pcma" | "opus"
            )
    });
    Ok(Plan { video, audio })
}

fn audio_in(s: &retina::client::Stream) -> Result<AudioIn, String> {
    let channels = s.channels().map_or(1, |c| usize::from(c.get()));
    match s.encoding_name() {
        // retina does not pass the fmtp on: mono unless the rtpmap says
        // otherwise (RFC 7587 always writes 2 there), so the browser may
        // down-mix a stereo camera; cameras are mono.
        "opus" => Ok(AudioIn::Opus { stereo: false }),
        "pcmu" | "pcma" => Ok(AudioIn::G711 {
            law: if s.encoding_name() == "pcmu" {
                Law::Mu
            } else {
                Law::A
            },
            rate: s.clock_rate_hz(),
            channels,
        }),
        _ => match s.parameters() {
            Some(ParametersRef::Audio(a)) => Ok(AudioIn::Aac(a.extra_data().to_vec())),
            _ => Err("aac without a usable config in the SDP".into()),
        },
    }
}

async fn session(
    ctx: &Ctx,
    attempt: u64,
    slot: &Slot,
    tx: &mpsc::Sender<Report>,
) -> Result<(), String> {
    let options = SessionOptions::default()
        .creds(ctx.creds.clone())
        .user_agent(format!("cascade/{}", env!("CARGO_PKG_VERSION")))
        .teardown(TeardownPolicy::Auto);
    let mut session = Session::describe(ctx.url.clone(), options)
        .await
        .map_err(|e| describe_error(&e))?;
    let _ = tx.send(Report::Step(attempt, Step::Described)).await;
    let plan = plan(session.streams())?;
    let transport = match ctx.transport {
        Transport::Tcp => retina::client::Transport::Tcp(Default::default()),
        Transport::Udp => retina::client::Transport::Udp(Default::default()),
    };
    let setup = || {
        SetupOptions::default()
            .transport(transport.clone())
            .frame_format(frame_format())
    };
    session
        .setup(plan.video.0, setup())
        .await
        .map_err(|e| format!("SETUP video: {}", first_line(&e)))?;
    let mut audio = None;
    if let Some(i) = plan.audio {
        match audio_in(&session.streams()[i]) {
            Ok(a) => {
                session
                    .setup(i, setup())
                    .await
                    .map_err(|e| format!("SETUP audio: {}", first_line(&e)))?;
                audio = Some(a);
            }
            Err(e) => tracing::warn!(error = %e, "camera audio skipped"),
        }
    }
    let _ = tx.send(Report::Step(attempt, Step::SetUp)).await;
    let playing = session
        .play(PlayOptions::default().initial_timestamp(InitialTimestampPolicy::Permissive))
        .await
        .map_err(|e| format!("PLAY: {}", first_line(&e)))?;
    let _ = tx.send(Report::Step(attempt, Step::Playing)).await;
    let raw = matches!(audio, Some(AudioIn::Opus { .. }));
    let mut media = Media::new(plan.video.1, audio)?;
    let mut source = if raw {
        // retina cannot depacketize Opus and would refuse to demux: every
        // stream goes through our depacketizers.
        tracing::info!("camera audio is Opus: depacketizing its RTP ourselves");
        Source::raw(playing, plan.video, plan.audio)
    } else {
        Source::Demuxed {
            demuxed: Box::new(
                playing
                    .demuxed()
                    .map_err(|e| format!("demux: {}", first_line(&e)))?,
            ),
            video: plan.video.0,
        }
    };
    let mut bframes = Bframes::new(ctx.bframes.clone(), plan.video.1);
    let mut ffmpeg: Option<mpsc::Receiver<Event>> = None;
    let mut items = Vec::new();
    let mut outs = Vec::new();
    loop {
        outs.clear();
        tokio::select! {
            more = source.next(&mut items) => {
                if !more? {
                    return Ok(());
                }
                let wall_us = cascade_origin::wallclock_us();
                for item in items.drain(..) {
                    match item {
                        Item::Video { data, elapsed, key, loss, rfc6381 } => {
                            if let Some(c) = rfc6381 {
                                media.set_rfc6381(&c);
                            }
                            if let Some(o) = media.video(data, elapsed, key, loss, wall_us)? {
                                outs.push(o);
                            }
                        }
                        Item::Audio { data, elapsed, clock } => {
                            media.audio(&data, elapsed, clock, wall_us, &mut outs)?;
                        }
                    }
                }
                if let Some(rx) = bframes.route(media.bframes(), &mut outs) {
                    ffmpeg = Some(rx);
                }
            }
            Some(ev) = recv(&mut ffmpeg) => {
                bframes.output(ev, &mut outs);
            }
            () = sleep_until(bframes.stall_deadline()) => {
                bframes.fall_back(&transcode::Error::Stalled);
            }
        }
        if !bframes.running() {
            ffmpeg = None;
        }
        media.set_video_fmtp(bframes.fmtp());
        write(ctx, slot, &mut media, &outs)?;
        if !outs.is_empty() {
            let _ = tx.try_send(Report::Frame(attempt));
        }
    }
}

/// ffmpeg's next output event, or never when no re-encode runs.
async fn recv(rx: &mut Option<mpsc::Receiver<Event>>) -> Option<Event> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What a connection's source yields, in arrival order.
enum Item {
    Video {
        data: Vec<u8>,
        elapsed: i64,
        key: bool,
        loss: u16,
        /// The codec string when the parameters may have changed.
        rfc6381: Option<String>,
    },
    Audio {
        data: Vec<u8>,
        elapsed: i64,
        clock: u32,
    },
}

/// Frames from retina's depacketizers, or raw RTP through ours (Opus).
// One per connection, never moved in a hot path: size does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Demuxed {
        demuxed: Box<retina::client::Demuxed>,
        video: usize,
    },
    Raw {
        session: std::pin::Pin<Box<Session<retina::client::Playing>>>,
        video: usize,
        audio: Option<usize>,
        video_in: Depacketizer,
        audio_in: Depacketizer,
        /// The codec string last reported.
        rfc6381: Option<String>,
    },
}

impl Source {
    fn raw(
        session: Session<retina::client::Playing>,
        video: (usize, Codec),
        audio: Option<usize>,
    ) -> Self {
        let kind = if video.1 == Codec::H265 {
            Kind::H265
        } else {
            Kind::H264
        };
        let mut video_in = Depacketizer::new(kind);
        let mut rfc6381 = None;
        // The SDP's sprop parameter sets, as retina parsed them.
        if let Some(ParametersRef::Video(p)) = session.streams()[video.0].parameters() {
            let config = match kind {
                Kind::H265 => crate::h264::parse_hvcc(p.extra_data()),
                _ => crate::h264::parse_avcc(p.extra_data()),
            };
            if let Ok(c) = config {
                video_in.set_parameter_sets(c.parameter_sets.iter().map(|b| &b[..]));
            }
            rfc6381 = Some(p.rfc6381_codec().to_string());
        }
        Self::Raw {
            session: Box::pin(session),
            video: video.0,
            audio,
            video_in,
            audio_in: Depacketizer::new(Kind::Opus),
            rfc6381,
        }
    }

    /// Waits for the next frames (cancel-safe: the only await is the
    /// stream's). False when the stream ended.
    async fn next(&mut self, items: &mut Vec<Item>) -> Result<bool, String> {
        match self {
            Self::Demuxed { demuxed, video } => {
                let Some(item) = demuxed.next().await else {
                    return Ok(false);
                };
                match item.map_err(|e| format!("stream: {}", first_line(&e)))? {
                    CodecItem::VideoFrame(f) => {
                        let (elapsed, key, loss) = (
                            f.timestamp().elapsed(),
                            f.is_random_access_point(),
                            f.loss(),
                        );
                        let mut rfc6381 = None;
                        if f.has_new_parameters() || key {
                            if let Some(ParametersRef::Video(p)) =
                                demuxed.streams()[*video].parameters()
                            {
                                rfc6381 = Some(p.rfc6381_codec().to_string());
                            }
                        }
                        items.push(Item::Video {
                            data: f.into_data(),
                            elapsed,
                            key,
                            loss,
                            rfc6381,
                        });
                    }
                    CodecItem::AudioFrame(f) => {
                        let t = f.timestamp();
                        items.push(Item::Audio {
                            data: f.data().to_vec(),
                            elapsed: t.elapsed(),
                            clock: t.clock_rate().get(),
                        });
                    }
                    _ => {}
                }
                Ok(true)
            }
            Self::Raw {
                session,
                video,
                audio,
                video_in,
                audio_in,
                rfc6381,
            } => {
                let Some(item) = session.next().await else {
                    return Ok(false);
                };
                let PacketItem::Rtp(p) = item.map_err(|e| format!("stream: {}", first_line(&e)))?
                else {
                    return Ok(true);
                };
                let t = p.timestamp();
                if p.stream_id() == *video {
                    let dropped = video_in.dropped();
                    video_in.push(p.sequence_number(), t.elapsed(), p.mark(), p.payload());
                    if video_in.dropped() > dropped {
                        metrics::counter!(m::RTSP_DROPPED_UNITS)
                            .increment(video_in.dropped() - dropped);
                    }
                    while let Some(u) = video_in.pop() {
                        if u.keyframe {
                            if let Some(c) = video_in.rfc6381() {
                                *rfc6381 = Some(c);
                            }
                        }
                        items.push(Item::Video {
                            data: u.data,
                            elapsed: u.ts,
                            key: u.keyframe,
                            // Gaps are the depacketizer's business.
                            loss: 0,
                            rfc6381: if u.keyframe { rfc6381.clone() } else { None },
                        });
                    }
                } else if Some(p.stream_id()) == *audio {
                    audio_in.push(p.sequence_number(), t.elapsed(), p.mark(), p.payload());
                    while let Some(u) = audio_in.pop() {
                        items.push(Item::Audio {
                            data: u.data,
                            elapsed: u.ts,
                            clock: t.clock_rate().get(),
                        });
                    }
                }
                Ok(true)
            }
        }
    }
}

/// Publishes (or updates the catalog of) the stream and writes the frames.
fn write(ctx: &Ctx, slot: &Slot, media: &mut Media, outs: &[Out]) -> Result<(), String> {
    let mut slot = lock(slot);
    if let Some(catalog) = media.catalog() {
        match slot.as_mut() {
            Some(p) => p.set_catalog(catalog),
            None => {
                let p = ctx
                    .registry
                    .publish(&ctx.name, catalog, "rtsp")
                    .map_err(|e| format!("publish: {e}"))?;
                *slot = Some(p);
            }
        }
    }
    let Some(p) = slot.as_ref() else {
        return Ok(());
    };
    for o in outs {
        let Some(track) = p.track(o.track) else {
            continue;
        };
        metrics::counter!(m::RTSP_FRAMES, "track" => o.track).increment(1);
        if track.write(o.frame.clone()).is_err() {
            // Another publisher took the name over: leave it to them.
            *slot = None;
            return Err("taken over by another publisher of the same name".into());
        }
    }
    Ok(())
}

/// retina's DESCRIBE errors, with the usual causes said plainly first.
fn describe_error(e: &retina::Error) -> String {
    let text = first_line(e);
    match e.status_code() {
        Some(401) => format!("401 Unauthorized: wrong or missing credentials ({text})"),
        Some(404) => format!("404 Not Found: no such path on the camera ({text})"),
        _ => format!("DESCRIBE: {text}"),
    }
}

/// retina's errors carry connection details on further lines: the API's
/// `error` field keeps the first.
fn first_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_format_is_annexb_with_parameter_sets() {
        let f = frame_format();
        assert_eq!(f.h26x_framing, retina::codec::h26x::Framing::AnnexB);
        assert_eq!(
            f.parameter_set_insertion,
            ParameterSetInsertion::EachKeyFrame
        );
    }
}
