//! The publish state machine of one RTMP connection: media messages through
//! the [`Media`] core, frames held until the catalog is ready, go-live, the
//! B-frame transcode (asked of the shell, fed, its first frame awaited) and
//! the fallback to the source from its next keyframe when the transcode
//! exits, breaks or stalls.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_origin::catalog::Catalog;
use cascade_origin::frame::Frame;

use super::{Now, Output};
use crate::metrics as m;
use crate::rtmp::media::{self, Media, Track};
use crate::transcode::{self, Event, Policy, Reencoder};

/// Frames held while waiting for the second sequence header (~1 s of video
/// and audio at 60 fps); the oldest go first when it overflows.
pub(super) const PENDING_FRAMES: usize = 256;
/// Dropped tags logged at info per connection; later ones at debug.
const BAD_TAG_LOGS: u64 = 5;

/// What a publish needs of a running transcode: the [`Reencoder`] (an
/// ffmpeg child) in production, a script in tests.
pub(in crate::rtmp) trait Transcode: Send {
    /// Queues one source video frame.
    fn push(&mut self, frame: &Frame);
    /// When the transcode counts as stalled if nothing comes out before.
    fn stall_deadline(&self) -> Option<Instant>;
    /// True once a frame came out.
    fn started(&self) -> bool;
    /// The SDP fmtp of the re-encoded video, once known.
    fn fmtp(&self) -> Option<&str>;
    /// One event of its output: a frame, nothing, or the error that ends it.
    fn output(&mut self, event: Event) -> Result<Option<Frame>, transcode::Error>;
}

impl Transcode for Reencoder {
    fn push(&mut self, frame: &Frame) {
        Self::push(self, frame);
    }

    fn stall_deadline(&self) -> Option<Instant> {
        Self::stall_deadline(self)
    }

    fn started(&self) -> bool {
        Self::started(self)
    }

    fn fmtp(&self) -> Option<&str> {
        Self::fmtp(self)
    }

    fn output(&mut self, event: Event) -> Result<Option<Frame>, transcode::Error> {
        Self::output(self, event)
    }
}

/// A publish in progress on a connection.
pub(super) struct Publishing {
    name: String,
    media: Media,
    /// Set once the catalog was ready and the stream went live.
    live: bool,
    pending: VecDeque<(Track, Frame)>,
    bframes_counted: bool,
    jumps_counted: u64,
    /// The B-frame transcode of the video, while it runs.
    transcoder: Option<Box<dyn Transcode>>,
    /// Set once a transcode was considered (it is tried once per publish).
    transcode_tried: bool,
    /// After a failed transcode: source video resumes at a keyframe.
    video_wait_key: bool,
    /// Media messages dropped.
    pub(super) bad_tags: u64,
}

impl Drop for Publishing {
    fn drop(&mut self) {
        if self.bframes_counted {
            metrics::gauge!(m::BFRAMES_STREAMS).decrement(1.0);
        }
    }
}

impl Publishing {
    /// A publish of `name` (validated), waiting for sequence headers.
    pub(super) fn new(name: String) -> Self {
        Self {
            name,
            media: Media::new(),
            live: false,
            pending: VecDeque::new(),
            bframes_counted: false,
            jumps_counted: 0,
            transcoder: None,
            transcode_tried: false,
            video_wait_key: false,
            bad_tags: 0,
        }
    }

    /// The H.264 sequence header (avcC) of the source, if H.264.
    pub(super) fn h264_record(&self) -> Option<Bytes> {
        self.media.h264_record()
    }

    /// True while a transcode runs.
    pub(super) fn transcoding(&self) -> bool {
        self.transcoder.is_some()
    }

    /// When the stream goes live without more input: the header wait of
    /// the media core, converted from the wall clock at `last`.
    pub(super) fn header_deadline(&self, last: Now) -> Option<Instant> {
        if self.live || self.warming() {
            return None;
        }
        let ms = self.media.ready_deadline(last.ms())?;
        Some(last.at + Duration::from_millis(ms.saturating_sub(last.ms())))
    }

    /// When the running transcode counts as stalled.
    pub(super) fn stall_deadline(&self) -> Option<Instant> {
        self.transcoder.as_ref().and_then(|t| t.stall_deadline())
    }

    /// One audio or video message through the media core. `Some` when its
    /// B-frames ask for a transcode ([`Output::StartTranscode`]): its
    /// frames then wait for [`Publishing::transcode_started`], so that the
    /// transcoder gets them.
    pub(super) fn media(
        &mut self,
        now: Now,
        (track, ts, data): (Track, u32, Bytes),
        policy: &Policy,
        outputs: &mut VecDeque<Output>,
    ) -> Option<Vec<(Track, Frame)>> {
        let mut out = Vec::new();
        let r = match track {
            Track::Video => self.media.video(ts, &data, now.ms(), now.wall_us, &mut out),
            Track::Audio => self.media.audio(ts, &data, now.ms(), now.wall_us, &mut out),
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
        if self.media.bframes() && !self.transcode_tried {
            self.transcode_tried = true;
            if let (Policy::Transcode(settings), Some(avcc)) = (policy, self.media.h264_record()) {
                outputs.push_back(Output::StartTranscode {
                    settings: settings.clone(),
                    avcc,
                });
                return Some(out);
            }
        }
        self.publish_media(now, out, outputs);
        None
    }

    /// The shell's answer to [`Output::StartTranscode`], and the frames
    /// that asked for it.
    pub(super) fn transcode_started(
        &mut self,
        now: Now,
        started: Result<Box<dyn Transcode>, transcode::Error>,
        out: Vec<(Track, Frame)>,
        outputs: &mut VecDeque<Output>,
    ) {
        match started {
            Ok(t) => self.transcoder = Some(t),
            Err(e) => {
                metrics::counter!(m::TRANSCODE_FALLBACKS, "reason" => e.reason()).increment(1);
                tracing::warn!(error = %e, "B-frame transcode not started: passing the video through (B-frames dropped at the edge)");
            }
        }
        self.publish_media(now, out, outputs);
    }

    /// One event from the transcoder: a frame to publish, or its end.
    pub(super) fn transcoded(&mut self, now: Now, ev: Event, outputs: &mut VecDeque<Output>) {
        let Some(t) = &mut self.transcoder else {
            return;
        };
        let was_started = t.started();
        let frame = match t.output(ev) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => return self.fall_back(now, e, outputs),
        };
        if !self.live {
            if !was_started {
                // Source video held from before the B-frames showed.
                self.pending.retain(|(t, _)| *t != Track::Video);
            }
            self.hold(Track::Video, frame);
            return self.go_live(now, outputs);
        }
        if !was_started {
            // Late B-frames: the source played so far, switch now.
            self.set_catalog(outputs);
        }
        self.write(vec![(Track::Video, frame)], outputs);
    }

    /// Publishes the stream once the catalog is ready.
    pub(super) fn go_live(&mut self, now: Now, outputs: &mut VecDeque<Output>) {
        if self.live || !self.media.ready(now.ms()) || self.warming() {
            return;
        }
        self.media.take_catalog_changed();
        outputs.push_back(Output::Publish {
            name: self.name.clone(),
            catalog: self.catalog(),
            transcoded: self.transcoder.is_some(),
        });
        self.live = true;
        self.after_media(outputs);
        let pending: Vec<_> = self.pending.drain(..).collect();
        self.write(pending, outputs);
    }

    /// Ends the transcode: the source video is passed through from its
    /// next keyframe (the edge drops its B-frames).
    pub(super) fn fall_back(
        &mut self,
        now: Now,
        e: transcode::Error,
        outputs: &mut VecDeque<Output>,
    ) {
        let Some(t) = self.transcoder.take() else {
            return;
        };
        metrics::counter!(m::TRANSCODE_FALLBACKS, "reason" => e.reason()).increment(1);
        tracing::error!(error = %e, "B-frame transcode failed: passing the video through from its next keyframe (B-frames dropped at the edge)");
        let was_started = t.started();
        drop(t);
        self.video_wait_key = true;
        if self.live {
            if was_started {
                self.set_catalog(outputs);
            }
        } else {
            self.go_live(now, outputs);
        }
    }

    /// Media core output: held until live, then published (the video
    /// through the transcoder while one runs).
    fn publish_media(
        &mut self,
        now: Now,
        out: Vec<(Track, Frame)>,
        outputs: &mut VecDeque<Output>,
    ) {
        let out = self.route(out);
        if !self.live {
            for (track, frame) in out {
                self.hold(track, frame);
            }
            if self.media.ready(now.ms()) {
                self.go_live(now, outputs);
            }
            return;
        }
        self.after_media(outputs);
        self.write(out, outputs);
    }

    /// True while a transcode runs that has not produced a frame yet: the
    /// stream goes live with its first frame (and its fmtp).
    fn warming(&self) -> bool {
        self.transcoder.as_ref().is_some_and(|t| !t.started())
    }

    /// Holds a frame until the stream is live.
    fn hold(&mut self, track: Track, frame: Frame) {
        if self.pending.len() >= PENDING_FRAMES {
            self.pending.pop_front();
        }
        self.pending.push_back((track, frame));
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

    fn set_catalog(&mut self, outputs: &mut VecDeque<Output>) {
        if self.live {
            outputs.push_back(Output::Catalog(self.catalog()));
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
                    if t.started() || !self.live {
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
    fn after_media(&mut self, outputs: &mut VecDeque<Output>) {
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
            self.set_catalog(outputs);
        }
    }

    fn write(&self, frames: Vec<(Track, Frame)>, outputs: &mut VecDeque<Output>) {
        if !self.live {
            return;
        }
        outputs.extend(frames.into_iter().map(|(t, f)| Output::Frame(t, f)));
    }
}
