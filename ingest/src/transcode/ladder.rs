//! The running RTMP ABR ladder of one stream (`--abr-ladder`): one ffmpeg
//! child that decodes the published H.264 video once and encodes each step
//! (arguments: [`crate::ladder::args`]). Input is the B-frame re-encode's
//! FLV framing on stdin; each step comes back as FLV on a unix socket of
//! its own (ffmpeg connects to our listener), read into tags by a task per
//! step and turned into frames by a [`Unpipe`] per step (same timeline,
//! SEI restored). Dropping the [`Ladder`] kills ffmpeg and removes the
//! sockets. It takes one slot of `--max-transcodes`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_origin::frame::Frame;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::process::Command;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::pipe::{FlvReader, FlvWriter, Out, Tag, Unpipe};
use super::{output_profile, Error, Settings, INPUT_QUEUE, READ_BUF, STALL, STALL_FRAMES};
use crate::ladder::Step;
use crate::metrics as m;

/// Tags queued from all steps' sockets towards the connection.
const OUTPUT_QUEUE: usize = 64;
/// ffmpeg connects to every step's socket within this after starting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the socket tasks hand to the connection.
#[derive(Debug)]
pub enum LadderEvent {
    /// One FLV tag of step `.0`.
    Tag(usize, Tag),
    /// The child or a step's output is gone: the ladder is over.
    Ended(Error),
}

/// One running ladder (see the module doc).
pub struct Ladder {
    queue: mpsc::Sender<Bytes>,
    writer: FlvWriter,
    unpipes: Vec<Unpipe>,
    started: Vec<bool>,
    waiting_keyframe: bool,
    fed_since_output: Option<Instant>,
    pushed_since_output: u32,
    tasks: Vec<JoinHandle<()>>,
    /// Held for its `Drop`: the socket files go with the ladder.
    #[cfg_attr(not(test), allow(dead_code))]
    sockets: Sockets,
    span: tracing::Span,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Ladder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        metrics::gauge!(m::LADDER_STREAMS).decrement(1.0);
        self.span.in_scope(|| tracing::info!("ladder ended"));
    }
}

impl Ladder {
    /// Starts ffmpeg for a stream whose sequence header is `avcc`, encoding
    /// `steps`, with its sockets in `dir`. Returns the ladder and the
    /// receiver of its output, which the caller polls.
    pub fn spawn(
        settings: &Settings,
        avcc: &[u8],
        steps: &[Step],
        dir: &Path,
    ) -> Result<(Self, mpsc::Receiver<LadderEvent>), Error> {
        let permit = settings
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Limit(settings.max))?;
        let spawn_err = |error| Error::Spawn {
            path: settings.ffmpeg.display().to_string(),
            error,
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx_out, rx_out) = mpsc::channel::<LadderEvent>(OUTPUT_QUEUE);
        // Removed again on every return below, and with the ladder.
        let mut sockets = Sockets(Vec::with_capacity(steps.len()));
        let mut listeners = Vec::with_capacity(steps.len());
        for i in 0..steps.len() {
            let p = dir.join(format!(
                "cascade-ladder-{}-{id}-{i}.sock",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&p);
            listeners.push(UnixListener::bind(&p).map_err(spawn_err)?);
            sockets.0.push(p);
        }
        let outputs: Vec<String> = sockets.0.iter().map(|p| p.display().to_string()).collect();
        let profile = output_profile(avcc.get(1).copied().unwrap_or(100));
        let mut child = Command::new(&settings.ffmpeg)
            .args(crate::ladder::args(profile, steps, &outputs))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let missing = || spawn_err(std::io::Error::other("pipe missing"));
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stderr = child.stderr.take().ok_or_else(missing)?;
        let span = tracing::info_span!("ladder", pid = child.id());
        metrics::gauge!(m::LADDER_STREAMS).increment(1.0);
        span.in_scope(|| {
            let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
            tracing::info!(?names, profile, "ABR ladder started with ffmpeg")
        });
        let (queue, rx_in) = mpsc::channel::<Bytes>(INPUT_QUEUE);
        let mut tasks = vec![
            tokio::spawn(super::write_stdin(stdin, rx_in).instrument(span.clone())),
            tokio::spawn(super::log_stderr(stderr).instrument(span.clone())),
            tokio::spawn(wait_child(child, tx_out.clone()).instrument(span.clone())),
        ];
        for (i, l) in listeners.into_iter().enumerate() {
            tasks.push(tokio::spawn(
                read_step(i, l, tx_out.clone()).instrument(span.clone()),
            ));
        }
        let t = Self {
            queue,
            writer: FlvWriter::new(),
            unpipes: steps.iter().map(|_| Unpipe::new()).collect(),
            started: vec![false; steps.len()],
            waiting_keyframe: true,
            fed_since_output: None,
            pushed_since_output: 0,
            tasks,
            sockets,
            span,
            _permit: permit,
        };
        if t.queue.try_send(FlvWriter::header(avcc)).is_err() {
            return Err(Error::Exited("stdin closed at start".into()));
        }
        Ok((t, rx_out))
    }

    /// Queues one source frame for ffmpeg at `now` (from a keyframe on;
    /// when the queue is full, dropped up to the next keyframe). An error
    /// when nothing came out for [`STALL`] while frames went in.
    pub fn push(&mut self, frame: &Frame, now: Instant) -> Result<(), Error> {
        if self
            .fed_since_output
            .is_some_and(|t| self.pushed_since_output >= STALL_FRAMES && now >= t + STALL)
        {
            return Err(Error::Stalled);
        }
        if self.waiting_keyframe && !frame.keyframe {
            return Ok(());
        }
        match self.queue.try_send(self.writer.frame(frame)) {
            Ok(()) => {
                self.waiting_keyframe = false;
                for u in &mut self.unpipes {
                    u.sent(frame, now);
                }
                self.fed_since_output.get_or_insert(now);
                self.pushed_since_output = self.pushed_since_output.saturating_add(1);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.waiting_keyframe = true;
                metrics::counter!(m::TRANSCODE_DROPPED).increment(1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        Ok(())
    }

    /// The SDP fmtp of step `i`, once its first frame came out.
    pub fn fmtp(&self, i: usize) -> Option<&str> {
        self.unpipes.get(i).and_then(Unpipe::fmtp)
    }

    /// One event: a frame of step `.0` (`.1` true on its first), nothing,
    /// or the error that ends the ladder.
    pub fn output(
        &mut self,
        event: LadderEvent,
        now: Instant,
    ) -> Result<Option<(usize, Frame, bool)>, Error> {
        let (i, tag) = match event {
            LadderEvent::Tag(i, t) => (i, t),
            LadderEvent::Ended(e) => return Err(e),
        };
        let Some(map) = self.writer.map() else {
            return Ok(None);
        };
        let Some(u) = self.unpipes.get_mut(i) else {
            return Ok(None);
        };
        let Some(Out { frame, .. }) = u.tag(&tag, map, now)? else {
            return Ok(None);
        };
        self.fed_since_output = None;
        self.pushed_since_output = 0;
        let first = self.started.get(i).is_some_and(|s| !s);
        if let Some(s) = self.started.get_mut(i) {
            *s = true;
        }
        Ok(Some((i, frame, first)))
    }
}

/// The steps' socket paths, removed when dropped.
struct Sockets(Vec<PathBuf>);

impl Drop for Sockets {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn wait_child(mut child: tokio::process::Child, tx: mpsc::Sender<LadderEvent>) {
    let status = child.wait().await;
    let why = match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    let _ = tx.send(LadderEvent::Ended(Error::Exited(why))).await;
}

async fn read_step(i: usize, l: UnixListener, tx: mpsc::Sender<LadderEvent>) {
    let mut s = match tokio::time::timeout(CONNECT_TIMEOUT, l.accept()).await {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => {
            let e = Error::Exited(format!("step {i} socket: {e}"));
            let _ = tx.send(LadderEvent::Ended(e)).await;
            return;
        }
        Err(_) => {
            let e = Error::Exited(format!("step {i} never connected"));
            let _ = tx.send(LadderEvent::Ended(e)).await;
            return;
        }
    };
    drop(l);
    let mut reader = FlvReader::new();
    let mut buf = vec![0u8; READ_BUF];
    let error = loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => break Error::Exited(format!("step {i} closed its output")),
            Ok(n) => n,
            Err(e) => break Error::Exited(format!("step {i}: {e}")),
        };
        reader.push(buf.get(..n).unwrap_or_default());
        let failed = loop {
            match reader.next_tag() {
                Ok(Some(tag)) => {
                    if tx.send(LadderEvent::Tag(i, tag)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(Error::Output(e)),
            }
        };
        if let Some(e) = failed {
            break e;
        }
    };
    let _ = tx.send(LadderEvent::Ended(error)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps() -> Vec<Step> {
        crate::ladder::Ladder::parse("360p:800,180p:250")
            .unwrap()
            .steps()
            .to_vec()
    }

    #[tokio::test]
    async fn limit_and_spawn_failures_are_errors() {
        let dir = std::env::temp_dir();
        let s = Settings::new(PathBuf::from("/nonexistent/ffmpeg"), 1);
        let e = Ladder::spawn(&s, &[], &steps(), &dir).err().unwrap();
        assert_eq!(e.reason(), "spawn");
        let s = Settings::new(PathBuf::from("/bin/true"), 0);
        let e = Ladder::spawn(&s, &[], &steps(), &dir).err().unwrap();
        assert_eq!(e.reason(), "limit");
    }

    #[tokio::test]
    async fn a_child_that_exits_ends_the_ladder_and_frees_its_slot() {
        // `true` ignores its arguments and exits at once: an ffmpeg that died.
        let dir = std::env::temp_dir();
        let s = Settings::new(PathBuf::from("/bin/true"), 1);
        let (mut l, mut rx) = Ladder::spawn(&s, &[1, 2, 3], &steps(), &dir).unwrap();
        let paths = l.sockets.0.clone();
        assert!(paths.iter().all(|p| p.exists()), "a socket per step");
        let e = loop {
            let ev = rx.recv().await.unwrap();
            if let Err(e) = l.output(ev, Instant::now()) {
                break e;
            }
        };
        assert_eq!(e.reason(), "exit");
        drop(l);
        assert!(paths.iter().all(|p| !p.exists()), "sockets removed");
        assert!(Ladder::spawn(&s, &[], &steps(), &dir).is_ok(), "slot free");
    }

    #[tokio::test]
    async fn no_output_while_frames_go_in_is_a_stall() {
        // `yes` ignores its arguments, never reads stdin and never connects
        // to a step's socket: a hung ffmpeg (killed when the ladder drops).
        // The stall clock runs from the first frame that went in.
        let dir = std::env::temp_dir();
        let s = Settings::new(PathBuf::from("/usr/bin/yes"), 1);
        let (mut l, _rx) = Ladder::spawn(&s, &[1, 2, 3], &steps(), &dir).unwrap();
        let t0 = Instant::now();
        let frame = |keyframe| Frame {
            payload: Bytes::from_static(&[0, 0, 0, 1, 0x65, 0x88]),
            pts: 0,
            dts: 0,
            keyframe,
            ingest_us: 0,
        };
        for i in 0..STALL_FRAMES {
            let at = t0 + Duration::from_millis(u64::from(i) * 33);
            assert!(l.push(&frame(i == 0), at).is_ok());
        }
        assert!(l
            .push(&frame(false), t0 + STALL - Duration::from_millis(1))
            .is_ok());
        let e = l.push(&frame(false), t0 + STALL).unwrap_err();
        assert_eq!(e.reason(), "stall");
    }
}
