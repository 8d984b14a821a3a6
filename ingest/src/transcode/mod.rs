//! Re-encoding of RTMP H.264 streams with B-frames to H.264 without them,
//! once per stream at ingest: Chromium's WebRTC H.264 decoding does not
//! survive B-frames (docs/bframes.md), and dropping them at the edge costs
//! ~60 % of the frame rate. ffmpeg (Debian's binary, libx264) runs as one
//! supervised child process per stream:
//!
//! ```text
//! Media → Frame → pipe::FlvWriter ─(bounded queue)→ stdin task → ffmpeg
//! ffmpeg → stdout task → pipe::FlvReader ─(bounded channel)→ Conn → pipe::Unpipe → video track
//! ffmpeg → stderr task → tracing (warn, first lines only)
//! ```
//!
//! The child dies with the [`Reencoder`] (`kill_on_drop`, the tasks are
//! aborted): when the stream ends, is taken over, or falls back. A child
//! that exits, writes garbage or stalls ends the transcode and the RTMP
//! connection falls back to passing the source through (B-frames dropped at
//! the edge). If ffmpeg falls behind, input is dropped up to the next
//! keyframe. At most [`Settings::max`] transcodes run per process.

pub mod ladder;
pub mod pipe;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_origin::frame::Frame;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::metrics as m;
use pipe::{FlvReader, FlvWriter, Out, Tag, Unpipe};

/// Default cap on concurrent transcodes per process (each is one libx264
/// encode: ~a core at 720p30 with `veryfast`).
pub const DEFAULT_MAX: usize = 4;
/// Tags queued for ffmpeg's stdin (~1 s at 30 fps); past this, input is
/// dropped up to the next keyframe.
pub const INPUT_QUEUE: usize = 32;
/// Tags queued from ffmpeg's stdout towards the connection.
const OUTPUT_QUEUE: usize = 32;
/// Frames sent without any output for this long: the child is stalled.
pub const STALL: Duration = Duration::from_secs(5);
/// ...and at least this many of them: more than any decoder holds back
/// (H.264's reorder buffer is at most 16 frames), so a publisher that
/// pauses is not mistaken for a stall.
pub const STALL_FRAMES: u32 = 20;
/// ffmpeg stderr lines logged per transcode; the rest are counted.
const STDERR_LINES: u64 = 20;
/// Bytes read from ffmpeg's stdout at a time.
pub(crate) const READ_BUF: usize = 64 * 1024;

/// What to do with RTMP H.264 streams that carry B-frames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Pass them through; the edge drops the B slices.
    #[default]
    Drop,
    /// Re-encode their video without B-frames.
    Transcode(Arc<Settings>),
}

/// How transcodes are run.
#[derive(Debug)]
pub struct Settings {
    /// The ffmpeg binary.
    pub ffmpeg: PathBuf,
    /// Concurrent transcodes allowed.
    pub max: usize,
    pub(crate) slots: Arc<Semaphore>,
}

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        self.ffmpeg == other.ffmpeg && self.max == other.max
    }
}

impl Eq for Settings {}

impl Settings {
    /// Settings for `ffmpeg` with at most `max` transcodes at once.
    pub fn new(ffmpeg: PathBuf, max: usize) -> Self {
        Self {
            ffmpeg,
            max,
            slots: Arc::new(Semaphore::new(max)),
        }
    }
}

/// `configured` if it names an executable file, else the first `ffmpeg` in
/// `search_path` (a `PATH`-style list the binary reads from its environment:
/// library crates read no environment themselves).
pub fn find_ffmpeg(
    configured: Option<&Path>,
    search_path: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    if let Some(p) = configured {
        return is_executable(p).then(|| p.to_path_buf());
    }
    std::env::split_paths(search_path?)
        .map(|d| d.join("ffmpeg"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Why a transcode did not start or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`Settings::max`] transcodes already run.
    #[error("{0} transcodes already running (the limit)")]
    Limit(usize),
    /// ffmpeg could not be started.
    #[error("starting {path}: {error}")]
    Spawn {
        /// The binary.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// ffmpeg exited or closed its output.
    #[error("ffmpeg exited: {0}")]
    Exited(String),
    /// ffmpeg's output could not be parsed.
    #[error("ffmpeg output: {0}")]
    Output(#[from] pipe::Error),
    /// Frames went in and nothing came out for [`STALL`].
    #[error("ffmpeg produced no output for {}s", STALL.as_secs())]
    Stalled,
}

impl Error {
    /// A bounded label for the fallback metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Limit(_) => "limit",
            Self::Spawn { .. } => "spawn",
            Self::Exited(_) => "exit",
            Self::Output(_) => "output",
            Self::Stalled => "stall",
        }
    }
}

/// What the stdout task hands to the connection.
#[derive(Debug)]
pub enum Event {
    /// One FLV tag.
    Tag(Tag),
    /// The child is gone (or its output broke): the transcode is over.
    Ended(Error),
}

/// One running B-frame re-encode (an ffmpeg child making the video
/// B-frame free, see the module doc); dropping it kills ffmpeg. Not to be
/// confused with [`crate::audio::AacToOpus`], the audio transcode.
pub struct Reencoder {
    queue: mpsc::Sender<Bytes>,
    writer: FlvWriter,
    unpipe: Unpipe,
    waiting_keyframe: bool,
    /// Set when a frame went in after the last output: the stall clock.
    fed_since_output: Option<Instant>,
    /// Frames that went in since the last output.
    pushed_since_output: u32,
    started: bool,
    tasks: Vec<JoinHandle<()>>,
    span: tracing::Span,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Reencoder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        metrics::gauge!(m::TRANSCODES).decrement(1.0);
        self.span.in_scope(|| tracing::info!("transcode ended"));
    }
}

/// The x264 profile of the re-encode for a source of H.264 profile
/// `profile_idc`: never above the source's (a Main stream stays Main), and
/// High becomes Main, which every browser lists for receiving (Debian's
/// Chromium lists no High; OvenPlayer's server-made offer must match).
/// x264 at `veryfast` would otherwise pick High (8×8 transform) for any
/// source.
pub fn output_profile(profile_idc: u8) -> &'static str {
    match profile_idc {
        66 => "baseline",
        _ => "main",
    }
}

/// The ffmpeg arguments for an output `profile` (chosen by measurement,
/// docs/bframes.md).
pub fn args(profile: &'static str) -> Vec<&'static str> {
    vec![
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "warning",
        // Start on the first bytes: no probing beyond the sequence header
        // (`-fflags nobuffer` would discard the probed frames instead).
        "-probesize",
        "32",
        "-analyzeduration",
        "0",
        // One decoder thread: frame threads would each add a frame of delay.
        "-threads",
        "1",
        "-f",
        "flv",
        "-i",
        "pipe:0",
        "-map",
        "0:v",
        "-c:v",
        "libx264",
        "-profile:v",
        profile,
        "-preset",
        "veryfast",
        "-tune",
        "zerolatency",
        "-bf",
        "0",
        "-pix_fmt",
        "yuv420p",
        // Keyframes exactly where the source has them (group cache, fast
        // start), no others by scene cut.
        "-force_key_frames",
        "source",
        "-sc_threshold",
        "0",
        "-threads",
        "2",
        // Output keeps each input frame's pts: same timeline as the audio.
        "-copyts",
        "-fps_mode",
        "passthrough",
        // Encode in the input's millisecond time base: with a guessed frame
        // rate ffmpeg would round pts to 1/fps ticks (1 ms off, A/V and the
        // pts matching of pipe::Unpipe).
        "-enc_time_base",
        "-1",
        "-flush_packets",
        "1",
        "-f",
        "flv",
        "pipe:1",
    ]
}

impl Reencoder {
    /// Starts ffmpeg for a stream whose sequence header is `avcc`. Returns
    /// the transcoder and the receiver of its output, which the caller polls.
    pub fn spawn(settings: &Settings, avcc: &[u8]) -> Result<(Self, mpsc::Receiver<Event>), Error> {
        let permit = settings
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Limit(settings.max))?;
        let spawn_err = |error| Error::Spawn {
            path: settings.ffmpeg.display().to_string(),
            error,
        };
        // AVCDecoderConfigurationRecord: version, profile_idc, ...
        let source_profile = avcc.get(1).copied().unwrap_or(100);
        let profile = output_profile(source_profile);
        let mut child = Command::new(&settings.ffmpeg)
            .args(args(profile))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let missing = || spawn_err(std::io::Error::other("pipe missing"));
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let stderr = child.stderr.take().ok_or_else(missing)?;
        let span = tracing::info_span!("transcode", pid = child.id());
        metrics::gauge!(m::TRANSCODES).increment(1.0);
        span.in_scope(|| {
            tracing::info!(
                source_profile_idc = source_profile,
                profile,
                "transcoding B-frame video with ffmpeg"
            )
        });

        let (queue, rx_in) = mpsc::channel::<Bytes>(INPUT_QUEUE);
        let (tx_out, rx_out) = mpsc::channel::<Event>(OUTPUT_QUEUE);
        let tasks = vec![
            tokio::spawn(write_stdin(stdin, rx_in).instrument(span.clone())),
            tokio::spawn(read_stdout(child, stdout, tx_out).instrument(span.clone())),
            tokio::spawn(log_stderr(stderr).instrument(span.clone())),
        ];
        let t = Self {
            queue,
            writer: FlvWriter::new(),
            unpipe: Unpipe::new(),
            waiting_keyframe: true,
            fed_since_output: None,
            pushed_since_output: 0,
            started: false,
            tasks,
            span,
            _permit: permit,
        };
        // The header goes first; the queue is empty, so it fits.
        if t.queue.try_send(FlvWriter::header(avcc)).is_err() {
            return Err(Error::Exited("stdin closed at start".into()));
        }
        Ok((t, rx_out))
    }

    /// Queues one source frame for ffmpeg. Starts at a keyframe; when the
    /// queue is full, drops frames up to the next keyframe.
    pub fn push(&mut self, frame: &Frame) {
        if self.waiting_keyframe && !frame.keyframe {
            if self.started {
                metrics::counter!(m::TRANSCODE_DROPPED).increment(1);
            }
            return;
        }
        let tag = self.writer.frame(frame);
        match self.queue.try_send(tag) {
            Ok(()) => {
                self.waiting_keyframe = false;
                let now = Instant::now();
                self.unpipe.sent(frame, now);
                self.fed_since_output.get_or_insert(now);
                self.pushed_since_output = self.pushed_since_output.saturating_add(1);
                metrics::counter!(m::TRANSCODE_FRAMES, "direction" => "in").increment(1);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.waiting_keyframe {
                    self.span.in_scope(|| {
                        tracing::info!(
                            "ffmpeg falls behind: dropping input up to the next keyframe"
                        )
                    });
                }
                self.waiting_keyframe = true;
                metrics::counter!(m::TRANSCODE_DROPPED).increment(1);
            }
            // The child is gone: its Ended event is on the way.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// When the transcode counts as stalled if nothing comes out before.
    pub fn stall_deadline(&self) -> Option<Instant> {
        self.fed_since_output
            .filter(|_| self.pushed_since_output >= STALL_FRAMES)
            .map(|t| t + STALL)
    }

    /// True once a frame came out.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The SDP fmtp of the re-encoded video, once known.
    pub fn fmtp(&self) -> Option<&str> {
        self.unpipe.fmtp()
    }

    /// One event from the output receiver: a frame for the video track,
    /// nothing (metadata, header), or the error that ends the transcode.
    pub fn output(&mut self, event: Event) -> Result<Option<Frame>, Error> {
        let tag = match event {
            Event::Tag(t) => t,
            Event::Ended(e) => return Err(e),
        };
        let Some(map) = self.writer.map() else {
            return Ok(None);
        };
        let Some(Out { frame, delay }) = self.unpipe.tag(&tag, map, Instant::now())? else {
            return Ok(None);
        };
        self.fed_since_output = None;
        self.pushed_since_output = 0;
        if !self.started {
            self.started = true;
            self.span
                .in_scope(|| tracing::info!(fmtp = ?self.fmtp(), "first transcoded frame"));
        }
        metrics::counter!(m::TRANSCODE_FRAMES, "direction" => "out").increment(1);
        if let Some(d) = delay {
            metrics::histogram!(m::TRANSCODE_DELAY).record(d.as_secs_f64());
        }
        Ok(Some(frame))
    }
}

async fn write_stdin(mut stdin: tokio::process::ChildStdin, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(b) = rx.recv().await {
        if let Err(e) = stdin.write_all(&b).await {
            tracing::debug!(error = %e, "ffmpeg stdin closed");
            return;
        }
    }
    // Sender dropped: closing stdin lets ffmpeg finish on its own.
}

/// Logs the profile-level-id of the re-encode's AVC sequence header (what
/// viewers will be offered).
fn log_output_profile(tag: &Tag) {
    // Video tag, AVC (codec id 7), AVCPacketType 0, then the avcC record.
    let b = &tag.body;
    if tag.kind == 9 && b.len() > 8 && b[0] & 0x0f == 7 && b[1] == 0 {
        tracing::info!(
            profile_level_id = %format!("{:02x}{:02x}{:02x}", b[6], b[7], b[8]),
            "transcode output"
        );
    }
}

async fn read_stdout(
    mut child: Child,
    mut stdout: tokio::process::ChildStdout,
    tx: mpsc::Sender<Event>,
) {
    let mut reader = FlvReader::new();
    let mut buf = vec![0u8; READ_BUF];
    let end = loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) => break Some(Error::Exited(format!("reading its output: {e}"))),
        };
        reader.push(buf.get(..n).unwrap_or_default());
        let mut failed = None;
        loop {
            match reader.next_tag() {
                Ok(Some(tag)) => {
                    log_output_profile(&tag);
                    if tx.send(Event::Tag(tag)).await.is_err() {
                        return; // the transcoder is gone
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(Error::Output(e));
                    break;
                }
            }
        }
        if failed.is_some() {
            break failed;
        }
    };
    let error = match end {
        Some(e) => e,
        None => {
            // Output closed: the child is exiting; give it a moment.
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            Error::Exited(match status {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "closed its output".into(),
            })
        }
    };
    let _ = tx.send(Event::Ended(error)).await;
    // `child` drops here: killed if still running.
}

async fn log_stderr(stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    let mut n = 0u64;
    while let Ok(Some(line)) = lines.next_line().await {
        // Said of every stream: the input is read without probing.
        if line.contains("not enough frames to estimate rate") {
            tracing::debug!(ffmpeg = %line, "ffmpeg");
            continue;
        }
        n += 1;
        if n <= STDERR_LINES {
            tracing::warn!(ffmpeg = %line, "ffmpeg");
        } else if n == STDERR_LINES + 1 {
            tracing::warn!("further ffmpeg messages of this transcode are not logged");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_re_encode_never_raises_the_profile() {
        assert_eq!(output_profile(77), "main");
        assert_eq!(output_profile(100), "main", "High may become Main");
        assert_eq!(output_profile(66), "baseline");
        let a = args("main");
        let i = a.iter().position(|x| *x == "-profile:v").unwrap();
        assert_eq!(a[i + 1], "main");
        assert!(i > a.iter().position(|x| *x == "libx264").unwrap());
    }

    #[test]
    fn finds_binaries_and_refuses_missing_ones() {
        assert_eq!(
            find_ffmpeg(Some(Path::new("/nonexistent/ffmpeg")), None),
            None
        );
        assert_eq!(
            find_ffmpeg(Some(Path::new("/bin/sh")), None),
            Some(PathBuf::from("/bin/sh"))
        );
        let not_executable = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        assert_eq!(find_ffmpeg(Some(&not_executable), None), None);
        // Searched in the given path only.
        let dir = std::ffi::OsString::from("/nonexistent:/also/not");
        assert_eq!(find_ffmpeg(None, Some(&dir)), None);
        assert_eq!(find_ffmpeg(None, None), None);
    }

    #[tokio::test]
    async fn limit_and_spawn_failures_are_errors() {
        let s = Settings::new(PathBuf::from("/nonexistent/ffmpeg"), 1);
        let e = Reencoder::spawn(&s, &[]).err().unwrap();
        assert_eq!(e.reason(), "spawn");
        let s = Settings::new(PathBuf::from("/bin/true"), 0);
        assert_eq!(Reencoder::spawn(&s, &[]).err().unwrap().reason(), "limit");
    }

    #[tokio::test]
    async fn a_child_that_exits_ends_the_transcode() {
        // `true` ignores its arguments and exits at once: an ffmpeg that died.
        let s = Settings::new(PathBuf::from("/bin/true"), 1);
        let (mut t, mut rx) = Reencoder::spawn(&s, &[1, 2, 3]).unwrap();
        let e = loop {
            let ev = rx.recv().await.unwrap();
            if let Err(e) = t.output(ev) {
                break e;
            }
        };
        assert_eq!(e.reason(), "exit");
        drop(t);
        // The slot is free again.
        assert!(Reencoder::spawn(&s, &[]).is_ok());
    }
}
