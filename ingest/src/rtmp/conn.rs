//! One RTMP connection: handshake under a deadline, then the session loop
//! that authenticates the publish, feeds [`Media`] and writes its frames
//! into the registry until the peer leaves, idles, is taken over or the
//! node shuts down. An H.264 stream with B-frames may have its video go
//! through a [`Transcoder`] (ffmpeg) first; if that fails, the source is
//! passed through from its next keyframe on.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use cascade_origin::catalog::Catalog;
use cascade_origin::frame::Frame;
use cascade_origin::registry::Publisher;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::chunk::Guard;
use super::media::{self, Media, Track};
use super::{
    parse_key, query_token, token_matches, Ctx, Error, APP, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT,
    WRITE_TIMEOUT,
};
use crate::metrics as m;
use crate::transcode::{self, Event, Policy, Transcoder};

/// Bytes read per socket read.
const READ_BUF: usize = 64 * 1024;
/// Frames held while waiting for the second sequence header (~1 s of video
/// and audio at 60 fps); the oldest go first when it overflows.
const PENDING_FRAMES: usize = 256;
/// Dropped tags logged at info per connection; later ones at debug.
const BAD_TAG_LOGS: u64 = 5;

/// A publish in progress on this connection.
struct Publishing {
    name: String,
    media: Media,
    /// Set once the catalog was ready and the stream went live.
    publisher: Option<Publisher>,
    pending: VecDeque<(Track, Frame)>,
    bframes_counted: bool,
    jumps_counted: u64,
    /// The B-frame transcode of the video, while it runs.
    transcoder: Option<Box<Transcoder>>,
    /// Set once a transcode was considered (it is tried once per publish).
    transcode_tried: bool,
    /// After a failed transcode: source video resumes at a keyframe.
    video_wait_key: bool,
}

impl Drop for Publishing {
    fn drop(&mut self) {
        if self.bframes_counted {
            metrics::gauge!(m::BFRAMES_STREAMS).decrement(1.0);
        }
    }
}

pub(super) struct Conn {
    io: TcpStream,
    session: ServerSession,
    guard: Guard,
    ctx: Arc<Ctx>,
    /// Token given in the connect URL's query (`rtmp://h/live?token=T`).
    app_token: Option<String>,
    publish: Option<Publishing>,
    /// Output of the publish's transcoder (a field of its own so the
    /// select loop can wait on it next to the socket).
    transcoded: Option<mpsc::Receiver<Event>>,
    bad_tags: u64,
    unknown_logged: bool,
}

enum Wake {
    Read(usize),
    Shutdown,
    Superseded,
    HeaderWait,
    Transcoded(Option<Event>),
    Stalled,
}

impl Conn {
    /// Runs a connection to its end; `Ok` carries why it ended normally.
    pub(super) async fn run(
        mut io: TcpStream,
        ctx: Arc<Ctx>,
        shutdown: CancellationToken,
    ) -> Result<&'static str, Error> {
        let rest = tokio::select! {
            _ = shutdown.cancelled() => return Ok("shutdown"),
            r = timeout(HANDSHAKE_TIMEOUT, handshake(&mut io)) => r.map_err(|_| Error::HandshakeTimeout)??,
        };
        let (session, results) = ServerSession::new(ServerSessionConfig::new())
            .map_err(|e| Error::Session(e.to_string()))?;
        let mut conn = Self {
            io,
            session,
            guard: Guard::new(),
            ctx,
            app_token: None,
            publish: None,
            transcoded: None,
            bad_tags: 0,
            unknown_logged: false,
        };
        if let Some(reason) = conn.results(results).await? {
            return Ok(reason);
        }
        if let Some(reason) = conn.input(&rest).await? {
            return Ok(reason);
        }
        conn.serve(shutdown).await
    }

    async fn serve(&mut self, shutdown: CancellationToken) -> Result<&'static str, Error> {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let header_wait = self
                .publish
                .as_ref()
                .filter(|p| p.publisher.is_none() && !p.warming())
                .and_then(|p| p.media.ready_deadline(now_ms()))
                .map(|ms| {
                    Instant::now() + std::time::Duration::from_millis(ms.saturating_sub(now_ms()))
                });
            let stall_at = self
                .publish
                .as_ref()
                .and_then(|p| p.transcoder.as_ref())
                .and_then(|t| t.stall_deadline())
                .map(Instant::from_std);
            let publisher = self.publish.as_ref().and_then(|p| p.publisher.as_ref());
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = superseded(publisher) => Wake::Superseded,
                _ = sleep_until(header_wait) => Wake::HeaderWait,
                ev = next_event(&mut self.transcoded) => Wake::Transcoded(ev),
                _ = sleep_until(stall_at) => Wake::Stalled,
                r = timeout(IDLE_TIMEOUT, self.io.read(&mut buf)) => Wake::Read(r.map_err(|_| Error::Idle)??),
            };
            match wake {
                Wake::Shutdown => return Ok("shutdown"),
                Wake::Superseded => return Ok("taken over by a new publisher"),
                Wake::HeaderWait => self.go_live()?,
                Wake::Transcoded(ev) => self.transcoded(ev)?,
                Wake::Stalled => self.fall_back(transcode::Error::Stalled)?,
                Wake::Read(0) => return Ok("closed by peer"),
                Wake::Read(n) => {
                    if let Some(reason) = self.input(buf.get(..n).unwrap_or_default()).await? {
                        return Ok(reason);
                    }
                }
            }
        }
    }

    /// Bytes from the peer: guard, session, then the resulting events.
    async fn input(&mut self, data: &[u8]) -> Result<Option<&'static str>, Error> {
        if data.is_empty() {
            return Ok(None);
        }
        self.guard.feed(data)?;
        let results = self
            .session
            .handle_input(data)
            .map_err(|e| Error::Session(e.to_string()))?;
        self.results(results).await
    }

    async fn results(
        &mut self,
        results: Vec<ServerSessionResult>,
    ) -> Result<Option<&'static str>, Error> {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => self.write(&p.bytes).await?,
                ServerSessionResult::RaisedEvent(e) => {
                    if let Some(reason) = self.event(e).await? {
                        return Ok(Some(reason));
                    }
                }
                ServerSessionResult::UnhandleableMessageReceived(p) => {
                    metrics::counter!(m::RTMP_UNKNOWN_MESSAGES).increment(1);
                    if !std::mem::replace(&mut self.unknown_logged, true) {
                        tracing::info!(
                            type_id = p.type_id,
                            "ignoring rtmp message of unknown type"
                        );
                    }
                }
            }
        }
        Ok(None)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        timeout(WRITE_TIMEOUT, self.io.write_all(bytes))
            .await
            .map_err(|_| Error::WriteTimeout)??;
        Ok(())
    }

    /// Sends an error status for request `id`, then ends the connection.
    async fn refuse(
        &mut self,
        id: u32,
        code: &str,
        text: &str,
        reason: &'static str,
    ) -> Result<Option<&'static str>, Error> {
        if let Ok(results) = self.session.reject_request(id, code, text) {
            for r in results {
                if let ServerSessionResult::OutboundResponse(p) = r {
                    self.write(&p.bytes).await?;
                }
            }
        }
        let _ = self.io.flush().await;
        Err(Error::Refused(reason))
    }

    async fn accept(&mut self, id: u32) -> Result<(), Error> {
        let results = self
            .session
            .accept_request(id)
            .map_err(|e| Error::Session(e.to_string()))?;
        for r in results {
            if let ServerSessionResult::OutboundResponse(p) = r {
                self.write(&p.bytes).await?;
            }
        }
        Ok(())
    }

    async fn event(&mut self, e: ServerSessionEvent) -> Result<Option<&'static str>, Error> {
        match e {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                let (app, query) = app_name.split_once('?').unwrap_or((&app_name, ""));
                if app.trim_end_matches('/') != APP {
                    tracing::info!(app, "rtmp connect refused: unknown application");
                    return self
                        .refuse(
                            request_id,
                            "NetConnection.Connect.Rejected",
                            "unknown application: use /live",
                            "app",
                        )
                        .await;
                }
                self.app_token = query_token(query).map(str::to_string);
                self.accept(request_id).await?;
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => return self.publish_requested(request_id, &stream_key).await,
            ServerSessionEvent::PublishStreamFinished { .. } => return Ok(Some("unpublished")),
            ServerSessionEvent::PlayStreamRequested { request_id, .. } => {
                tracing::info!("rtmp play refused: ingest only");
                return self
                    .refuse(
                        request_id,
                        "NetStream.Play.Failed",
                        "playback over RTMP is not offered: use WHEP",
                        "play",
                    )
                    .await;
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => self.media(Track::Video, timestamp.value, data)?,
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => self.media(Track::Audio, timestamp.value, data)?,
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                tracing::debug!(?metadata, "rtmp metadata");
            }
            // Not the event itself: releaseStream/FCPublish carry the stream
            // key, token included, and tokens are never logged.
            ServerSessionEvent::UnhandleableAmf0Command { command_name, .. } => {
                tracing::trace!(command = %command_name, "rtmp command ignored");
            }
            _ => tracing::trace!("rtmp event ignored"),
        }
        Ok(None)
    }

    async fn publish_requested(
        &mut self,
        id: u32,
        key: &str,
    ) -> Result<Option<&'static str>, Error> {
        if self.publish.is_some() {
            return self
                .refuse(
                    id,
                    "NetStream.Publish.BadName",
                    "this connection is already publishing",
                    "protocol",
                )
                .await;
        }
        let (name, token) = parse_key(key);
        let token = token.or(self.app_token.as_deref());
        // Never log the token, only whether one came.
        if !token.is_some_and(|t| token_matches(t, &self.ctx.token)) {
            tracing::info!(
                token_given = token.is_some(),
                "rtmp publish refused: missing or wrong token"
            );
            return self
                .refuse(
                    id,
                    "NetStream.Publish.Unauthorized",
                    "publish token missing or wrong (key: {stream}?token=TOKEN)",
                    "token",
                )
                .await;
        }
        if !cascade_origin::valid_stream_name(name) {
            tracing::info!("rtmp publish refused: bad stream name");
            return self
                .refuse(
                    id,
                    "NetStream.Publish.BadName",
                    "bad stream name: use 1-64 characters of A-Z a-z 0-9 _ -",
                    "name",
                )
                .await;
        }
        let name = name.to_string();
        tracing::Span::current().record("stream", name.as_str());
        self.accept(id).await?;
        tracing::info!("rtmp publish accepted, waiting for sequence headers");
        self.publish = Some(Publishing {
            name,
            media: Media::new(),
            publisher: None,
            pending: VecDeque::new(),
            bframes_counted: false,
            jumps_counted: 0,
            transcoder: None,
            transcode_tried: false,
            video_wait_key: false,
        });
        Ok(None)
    }

    /// One audio or video message through the media core.
    fn media(&mut self, track: Track, ts: u32, data: Bytes) -> Result<(), Error> {
        let Some(p) = &mut self.publish else {
            return Ok(());
        };
        let mut out = Vec::new();
        let now = now_ms();
        let wall = cascade_origin::wallclock_us();
        let r = match track {
            Track::Video => p.media.video(ts, &data, now, wall, &mut out),
            Track::Audio => p.media.audio(ts, &data, now, wall, &mut out),
        };
        if let Err(e) = r {
            self.bad_tags += 1;
            let reason = match &e {
                media::Error::Flv(_) => "flv",
                media::Error::Bitstream(_) => "bitstream",
                media::Error::Audio(_) => "audio",
                _ => "config",
            };
            metrics::counter!(m::RTMP_BAD_TAGS, "reason" => reason).increment(1);
            if self.bad_tags <= BAD_TAG_LOGS {
                tracing::info!(track = track.name(), error = %e, "dropped rtmp media message");
            } else {
                tracing::debug!(track = track.name(), error = %e, "dropped rtmp media message");
            }
        }
        let Some(p) = &mut self.publish else {
            return Ok(());
        };
        if p.media.bframes() && !p.transcode_tried {
            p.transcode_tried = true;
            if let (Policy::Transcode(settings), Some(avcc)) =
                (&self.ctx.bframes, p.media.h264_record())
            {
                match Transcoder::spawn(settings, &avcc) {
                    Ok((t, rx)) => {
                        p.transcoder = Some(Box::new(t));
                        self.transcoded = Some(rx);
                    }
                    Err(e) => {
                        metrics::counter!(m::TRANSCODE_FALLBACKS, "reason" => e.reason())
                            .increment(1);
                        tracing::warn!(error = %e, "B-frame transcode not started: passing the video through (B-frames dropped at the edge)");
                    }
                }
            }
        }
        let out = p.route(out);
        if p.publisher.is_none() {
            for f in out {
                if p.pending.len() >= PENDING_FRAMES {
                    p.pending.pop_front();
                }
                p.pending.push_back(f);
            }
            if p.media.ready(now) {
                self.go_live()?;
            }
            return Ok(());
        }
        p.after_media();
        p.write(out)
    }

    /// Publishes the stream once the catalog is ready.
    fn go_live(&mut self) -> Result<(), Error> {
        let Some(p) = &mut self.publish else {
            return Ok(());
        };
        if p.publisher.is_some() || !p.media.ready(now_ms()) || p.warming() {
            return Ok(());
        }
        p.media.take_catalog_changed();
        let catalog = p.catalog();
        let publisher = self
            .ctx
            .registry
            .publish(&p.name, catalog.clone(), "rtmp")?;
        let codecs: Vec<String> = catalog.tracks.iter().map(|t| t.codec.to_string()).collect();
        tracing::info!(
            ?codecs,
            transcoded = p.transcoder.is_some(),
            "rtmp stream live"
        );
        metrics::counter!(m::RTMP_PUBLISHES).increment(1);
        p.publisher = Some(publisher);
        p.after_media();
        let pending: Vec<_> = p.pending.drain(..).collect();
        p.write(pending)
    }

    /// One event from the transcoder: a frame to publish, or its end.
    fn transcoded(&mut self, ev: Option<Event>) -> Result<(), Error> {
        let ev = ev.unwrap_or_else(|| {
            Event::Ended(transcode::Error::Exited("output channel closed".into()))
        });
        let Some(t) = self.publish.as_mut().and_then(|p| p.transcoder.as_mut()) else {
            self.transcoded = None;
            return Ok(());
        };
        let was_started = t.started();
        let frame = match t.output(ev) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => return self.fall_back(e),
        };
        let Some(p) = &mut self.publish else {
            return Ok(());
        };
        if p.publisher.is_none() {
            if !was_started {
                // Source video held from before the B-frames showed.
                p.pending.retain(|(t, _)| *t != Track::Video);
            }
            if p.pending.len() >= PENDING_FRAMES {
                p.pending.pop_front();
            }
            p.pending.push_back((Track::Video, frame));
            return self.go_live();
        }
        if !was_started {
            // Late B-frames: the source played so far, switch now.
            p.set_catalog();
        }
        p.write(vec![(Track::Video, frame)])
    }

    /// Ends the transcode: the source video is passed through from its
    /// next keyframe (the edge drops its B-frames).
    fn fall_back(&mut self, e: transcode::Error) -> Result<(), Error> {
        self.transcoded = None;
        let Some(p) = &mut self.publish else {
            return Ok(());
        };
        let Some(t) = p.transcoder.take() else {
            return Ok(());
        };
        metrics::counter!(m::TRANSCODE_FALLBACKS, "reason" => e.reason()).increment(1);
        tracing::error!(error = %e, "B-frame transcode failed: passing the video through from its next keyframe (B-frames dropped at the edge)");
        let was_started = t.started();
        drop(t);
        p.video_wait_key = true;
        if p.publisher.is_some() {
            if was_started {
                p.set_catalog();
            }
            Ok(())
        } else {
            self.go_live()
        }
    }
}

impl Publishing {
    /// True while a transcode runs that has not produced a frame yet: the
    /// stream goes live with its first frame (and its fmtp).
    fn warming(&self) -> bool {
        self.transcoder.as_ref().is_some_and(|t| !t.started())
    }

    /// The media core's catalog, with the transcoder's fmtp on the video
    /// track while its frames are the ones published. `bframes` stays as
    /// the source has it.
    fn catalog(&self) -> Catalog {
        let mut c = self.media.catalog();
        let fmtp = self
            .transcoder
            .as_ref()
            .filter(|t| t.started())
            .and_then(|t| t.fmtp());
        if let Some(fmtp) = fmtp {
            for t in c
                .tracks
                .iter_mut()
                .filter(|t| t.name == Track::Video.name())
            {
                t.fmtp = fmtp.to_string();
            }
        }
        c
    }

    fn set_catalog(&mut self) {
        let catalog = self.catalog();
        if let Some(publisher) = &mut self.publisher {
            tracing::info!(?catalog, "catalog changed");
            publisher.set_catalog(catalog);
        }
    }

    /// Sends video frames into the transcoder when one runs; returns what
    /// is published from the source.
    fn route(&mut self, out: Vec<(Track, Frame)>) -> Vec<(Track, Frame)> {
        let mut keep = Vec::with_capacity(out.len());
        for (track, frame) in out {
            if track == Track::Video {
                if let Some(t) = &mut self.transcoder {
                    t.push(&frame);
                    // Until its first frame the source keeps playing (a
                    // stream that is live already).
                    if t.started() || self.publisher.is_none() {
                        continue;
                    }
                } else if self.video_wait_key {
                    if !frame.keyframe {
                        continue;
                    }
                    self.video_wait_key = false;
                }
            }
            keep.push((track, frame));
        }
        keep
    }

    /// Follows catalog changes, B-frame detection and rebased jumps.
    fn after_media(&mut self) {
        if self.media.bframes() && !self.bframes_counted {
            self.bframes_counted = true;
            metrics::gauge!(m::BFRAMES_STREAMS).increment(1.0);
            tracing::info!("stream has B-frames (composition time offsets)");
        }
        let jumps = self.media.jumps();
        if jumps > self.jumps_counted {
            metrics::counter!(m::TIMESTAMP_JUMPS).increment(jumps - self.jumps_counted);
            tracing::info!(jumps, "publisher timestamp jump rebased");
            self.jumps_counted = jumps;
        }
        if self.media.take_catalog_changed() {
            self.set_catalog();
        }
    }

    fn write(&mut self, frames: Vec<(Track, Frame)>) -> Result<(), Error> {
        let Some(publisher) = &self.publisher else {
            return Ok(());
        };
        for (track, frame) in frames {
            if track == Track::Audio {
                metrics::counter!(m::OPUS_FRAMES).increment(1);
            }
            let Some(producer) = publisher.track(track.name()) else {
                continue;
            };
            if producer.write(frame).is_err() {
                // Taken over: the select loop notices and closes.
                return Ok(());
            }
        }
        Ok(())
    }
}

async fn handshake(io: &mut TcpStream) -> Result<Vec<u8>, Error> {
    let mut hs = Handshake::new(PeerType::Server);
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        let n = io.read(&mut buf).await?;
        if n == 0 && total == 0 {
            return Err(Error::ClosedEarly);
        }
        if n == 0 {
            return Err(Error::Handshake("closed during handshake".into()));
        }
        total += n;
        let r = hs
            .process_bytes(buf.get(..n).unwrap_or_default())
            .map_err(|e| Error::Handshake(e.to_string()))?;
        match r {
            HandshakeProcessResult::InProgress { response_bytes } => {
                io.write_all(&response_bytes).await?
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                io.write_all(&response_bytes).await?;
                return Ok(remaining_bytes);
            }
        }
    }
}

async fn superseded(p: Option<&Publisher>) {
    match p {
        Some(p) => p.superseded().await,
        None => std::future::pending().await,
    }
}

async fn next_event(rx: &mut Option<mpsc::Receiver<Event>>) -> Option<Event> {
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

fn now_ms() -> u64 {
    cascade_origin::wallclock_us() / 1_000
}
