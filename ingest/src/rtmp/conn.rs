//! One RTMP connection's I/O: the socket, the timer, the registry and the
//! ffmpeg child around the sans-IO [`Session`], which decides everything
//! else (handshake, commands, go-live, transcode fallback, timeouts). The
//! task runs until the session closes it: the peer left, idled, was taken
//! over or refused, or the node shuts down. The byte stream is a plain TCP
//! socket (RTMP) or a TLS stream over one (RTMPS, [`super::tls`]).

use std::net::SocketAddr;
use std::sync::Arc;

use cascade_rtc::auth::{unix_now, Action};

use cascade_origin::frame::Frame;
use cascade_origin::registry::Publisher;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::media::Track;
use super::session::{Now, Output, Session, Transcode};
use super::{Ctx, Error, WRITE_TIMEOUT};
use crate::ladder::{self, Step};
use crate::metrics as m;
use crate::transcode::ladder::{Ladder, LadderEvent};
use crate::transcode::{self, Event, Policy, Reencoder};
use cascade_origin::catalog::{self, Catalog};

/// Bytes read per socket read.
const READ_BUF: usize = 64 * 1024;

pub(super) struct Conn<S> {
    io: S,
    session: Session,
    ctx: Arc<Ctx>,
    /// Set once the session went live.
    publisher: Option<Publisher>,
    /// Output of the publish's transcoder (a field of its own so the
    /// select loop can wait on it next to the socket).
    transcoded: Option<mpsc::Receiver<Event>>,
    /// The `--abr-ladder` of the publish, while it runs.
    ladder: Option<Running>,
    /// Its output (a field of its own for the select loop, as `transcoded`).
    laddered: Option<mpsc::Receiver<LadderEvent>>,
    /// Set once a ladder was considered (once per connection).
    ladder_tried: bool,
    /// The catalog as the session last gave it (before the ladder's tracks).
    catalog: Option<Catalog>,
    /// The client, for the auth webhook.
    peer: SocketAddr,
    /// `rtmp` or `rtmps`, for the auth webhook.
    protocol: &'static str,
}

enum Wake {
    Read(usize),
    Shutdown,
    Superseded,
    Transcoded(Option<Event>),
    Laddered(Option<LadderEvent>),
    Timeout,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Runs a connection to its end; `Ok` carries why it ended normally.
    pub(super) async fn run(
        io: S,
        ctx: Arc<Ctx>,
        peer: SocketAddr,
        protocol: &'static str,
        shutdown: CancellationToken,
    ) -> Result<&'static str, Error> {
        let mut session = Session::new(
            now(),
            ctx.token.clone(),
            ctx.bframes.clone(),
            ctx.publish_timeout,
        );
        session.set_auth(ctx.auth.clone(), peer.ip());
        session.set_tokens(ctx.tokens.clone());
        session.set_draining(ctx.draining.clone());
        let mut conn = Self {
            io,
            session,
            ctx,
            publisher: None,
            transcoded: None,
            ladder: None,
            laddered: None,
            ladder_tried: false,
            catalog: None,
            peer,
            protocol,
        };
        conn.serve(shutdown).await
    }

    /// ```text
    /// loop { drain the session's outputs (write, publish, frames, spawn, close)
    ///        select! { shutdown | superseded | transcoder | session timeout | read } }
    /// ```
    async fn serve(&mut self, shutdown: CancellationToken) -> Result<&'static str, Error> {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            if let Some(reason) = self.drain(&shutdown).await? {
                return Ok(reason);
            }
            if !self.session.transcoding() {
                self.transcoded = None;
            }
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            let publisher = self.publisher.as_ref();
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = superseded(publisher) => Wake::Superseded,
                ev = next_event(&mut self.transcoded) => Wake::Transcoded(ev),
                ev = next_event(&mut self.laddered) => Wake::Laddered(ev),
                _ = sleep_until(deadline) => Wake::Timeout,
                r = self.io.read(&mut buf) => Wake::Read(r?),
            };
            match wake {
                Wake::Shutdown => self.session.handle_shutdown(),
                Wake::Superseded => self.session.handle_superseded(),
                Wake::Transcoded(ev) => {
                    let ev = ev.unwrap_or_else(|| {
                        Event::Ended(transcode::Error::Exited("output channel closed".into()))
                    });
                    self.session.handle_transcoder(now(), ev);
                }
                Wake::Laddered(ev) => {
                    let ev = ev.unwrap_or_else(|| {
                        LadderEvent::Ended(transcode::Error::Exited("output channel closed".into()))
                    });
                    self.ladder_event(ev);
                }
                Wake::Timeout => self.session.handle_timeout(now()),
                Wake::Read(0) => self.session.handle_eof(now()),
                Wake::Read(n) => self
                    .session
                    .handle_input(now(), buf.get(..n).unwrap_or_default()),
            }
        }
    }

    /// Carries out the session's outputs; `Some` when it closed normally.
    async fn drain(&mut self, shutdown: &CancellationToken) -> Result<Option<&'static str>, Error> {
        while let Some(output) = self.session.poll_output() {
            match output {
                Output::Transmit {
                    bytes,
                    handshake_deadline: Some(deadline),
                } => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Some("shutdown")),
                        r = timeout_at(Instant::from_std(deadline), send(&mut self.io, &bytes)) => {
                            r.map_err(|_| Error::HandshakeTimeout)??
                        }
                    }
                }
                Output::Transmit { bytes, .. } => {
                    timeout(WRITE_TIMEOUT, send(&mut self.io, &bytes))
                        .await
                        .map_err(|_| Error::WriteTimeout)??;
                }
                Output::Publish {
                    name,
                    catalog,
                    transcoded,
                } => {
                    let publisher = self.ctx.registry.publish(&name, catalog.clone(), "rtmp")?;
                    let codecs: Vec<String> =
                        catalog.tracks.iter().map(|t| t.codec.to_string()).collect();
                    tracing::info!(?codecs, transcoded, "rtmp stream live");
                    metrics::counter!(m::RTMP_PUBLISHES).increment(1);
                    self.publisher = Some(publisher);
                    self.catalog = Some(catalog);
                }
                Output::Catalog(catalog) => {
                    tracing::info!(?catalog, "catalog changed");
                    self.catalog = Some(catalog);
                    self.republish();
                }
                Output::Frame(track, frame) => self.write_frame(track, frame),
                Output::Authorize { stream, token } => {
                    // The socket is not read meanwhile: the publisher waits
                    // (TCP holds its media), at most the webhook's timeout
                    // or until the publish deadline, whichever is first.
                    let deadline = self.session.poll_timeout().map(Instant::from_std);
                    let decide = self.ctx.tokens.decide(
                        Action::Publish,
                        &stream,
                        self.protocol,
                        self.peer,
                        token.as_deref(),
                        unix_now(),
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Some("shutdown")),
                        _ = sleep_until(deadline) => self.session.handle_timeout(now()),
                        r = decide => self.session.handle_authorized(now(), r),
                    }
                }
                Output::StartTranscode { settings, avcc } => {
                    let started = Reencoder::spawn(&settings, &avcc).map(|(t, rx)| {
                        self.transcoded = Some(rx);
                        Box::new(t) as Box<dyn Transcode>
                    });
                    self.session.handle_transcode(started);
                }
                Output::Close(end) => {
                    if matches!(end, Err(Error::Refused(_))) {
                        let _ = self.io.flush().await;
                    }
                    return end.map(Some);
                }
            }
        }
        Ok(None)
    }

    fn write_frame(&mut self, track: Track, frame: Frame) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        if track == Track::Audio {
            metrics::counter!(m::OPUS_FRAMES).increment(1);
        }
        let ladder_input = (track == Track::Video).then(|| frame.clone());
        if let Some(producer) = publisher.track(track.name()) {
            // An error means taken over: the select loop notices and closes.
            let _ = producer.write(frame);
        }
        if let Some(f) = ladder_input {
            self.feed_ladder(&f);
        }
    }

    /// Starts the ladder at the first published keyframe, then feeds it.
    fn feed_ladder(&mut self, frame: &Frame) {
        if !self.ladder_tried && frame.keyframe && !self.ctx.ladder.is_empty() {
            self.ladder_tried = true;
            self.start_ladder(frame);
        }
        let Some(l) = &mut self.ladder else {
            return;
        };
        if let Err(e) = l.ladder.push(frame, Instant::now().into_std()) {
            self.end_ladder(e);
        }
    }

    fn start_ladder(&mut self, frame: &Frame) {
        let Policy::Transcode(settings) = &self.ctx.bframes else {
            return ladder_refused("no_ffmpeg", "no ffmpeg (--bframes drop or none found)");
        };
        if self.session.transcoding() {
            return ladder_refused("bframes", "the stream's B-frame re-encode runs");
        }
        let Some(avcc) = self.session.h264_record() else {
            return tracing::info!("no ABR ladder: the video is not H.264");
        };
        let Some(size) = crate::dimensions::of_keyframe(catalog::Codec::H264, &frame.payload)
        else {
            return ladder_refused("size", "no picture size in the first keyframe");
        };
        let steps = self.ctx.ladder.steps_for(size.1);
        if steps.is_empty() {
            return tracing::info!(
                height = size.1,
                "no ABR ladder: every step is at or above the source"
            );
        }
        match Ladder::spawn(settings, &avcc, &steps, &std::env::temp_dir()) {
            Ok((ladder, rx)) => {
                self.laddered = Some(rx);
                self.ladder = Some(Running {
                    ladder,
                    fmtps: vec![None; steps.len()],
                    steps,
                    size,
                });
                // Marks the source as a rendition before the steps exist
                // (`ladder::amend`): viewers joining now get an estimator.
                self.republish();
            }
            Err(e) => ladder_refused(e.reason(), &e.to_string()),
        }
    }

    fn ladder_event(&mut self, ev: LadderEvent) {
        let Some(l) = &mut self.ladder else {
            return;
        };
        match l.ladder.output(ev, Instant::now().into_std()) {
            Ok(Some((i, frame, first))) => {
                let Some(step) = l.steps.get(i) else { return };
                let track = catalog::rendition_track(&step.name);
                if first {
                    let fmtp = l.ladder.fmtp(i).map(str::to_string);
                    tracing::info!(rendition = %step.name, ?fmtp, "first ladder frame");
                    if let Some(f) = l.fmtps.get_mut(i) {
                        *f = fmtp;
                    }
                    self.republish();
                }
                if let Some(p) = self.publisher.as_ref().and_then(|p| p.track(&track)) {
                    let _ = p.write(frame);
                }
            }
            Ok(None) => {}
            Err(e) => self.end_ladder(e),
        }
    }

    /// The ladder failed: its tracks end, the source plays on.
    fn end_ladder(&mut self, e: transcode::Error) {
        self.ladder = None;
        self.laddered = None;
        metrics::counter!(m::LADDER_FAILURES, "reason" => e.reason()).increment(1);
        tracing::error!(error = %e, "ABR ladder failed: its renditions end, the source plays on");
        self.republish();
    }

    /// Gives the registry the session's catalog with the ladder's tracks.
    fn republish(&mut self) {
        let (Some(publisher), Some(c)) = (&mut self.publisher, &self.catalog) else {
            return;
        };
        let mut c = c.clone();
        if let Some(l) = &self.ladder {
            ladder::amend(&mut c, &l.steps, &l.fmtps, l.size);
        }
        publisher.set_catalog(c);
    }
}

/// A running ladder and what the catalog needs of it.
struct Running {
    ladder: Ladder,
    steps: Vec<Step>,
    /// Each step's fmtp once its first frame came out.
    fmtps: Vec<Option<String>>,
    /// The source's picture size.
    size: (u32, u32),
}

fn ladder_refused(reason: &'static str, why: &str) {
    metrics::counter!(m::LADDER_FAILURES, "reason" => reason).increment(1);
    tracing::warn!(why, "no ABR ladder for this stream");
}

/// Writes `bytes` and flushes: a TLS stream may keep records it could not
/// write at once until the next write or flush, and the peer waits for them
/// (a no-op on plain TCP).
async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Both clocks the session wants, read once per wakeup.
fn now() -> Now {
    Now {
        at: Instant::now().into_std(),
        wall_us: cascade_origin::wallclock_us(),
    }
}

async fn superseded(p: Option<&Publisher>) {
    match p {
        Some(p) => p.superseded().await,
        None => std::future::pending().await,
    }
}

async fn next_event<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
