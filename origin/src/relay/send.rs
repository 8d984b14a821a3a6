//! Sending a local stream to the peer. One task per stream (catalog changes,
//! the end, keyframe requests coming back), one per track (cutting frames
//! into groups), one per group (its own unidirectional stream).
//!
//! Policy: every frame is written as it arrives; each group gets a higher
//! priority than the ones before it; a group still not delivered (all its
//! data acknowledged) 500 ms after the next group of its track started is
//! reset, never queued behind.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::link::Report;
use super::session::Event;
use super::wire::{encode_frame_header, GroupHeader, Heard, MAX_GROUP_BYTES, MAX_TRACKS};
use super::{code, AbortOnDrop};
use crate::metrics::{RELAY_FRAMES_SENT, RELAY_GROUPS_RESET, RELAY_GROUPS_SENT, RELAY_SELECTS};
use crate::model::catalog::{Kind, TrackInfo};
use crate::model::frame::Frame;
use crate::model::track::Consumer;
use crate::registry::Subscriber;

/// Keyframe requests from the peer waiting for the stream task; requests
/// are idempotent, so a full queue just drops the extra ones.
const KEYFRAME_QUEUE: usize = 16;
/// Frames of one group waiting for its writer: ~8 s of 30 fps video. The
/// writer only waits on QUIC flow control, so a full queue means the link
/// is hopelessly behind and the group is reset.
const GROUP_QUEUE: usize = 256;
/// An audio run (group) closes after this many frames: 500 ms of 20 ms Opus.
const AUDIO_RUN_FRAMES: usize = 25;
/// ...or after this long, whichever comes first.
const AUDIO_RUN: Duration = Duration::from_millis(500);
/// Audio groups outrank video groups: they are small and a gap is audible.
const AUDIO_PRIORITY: i32 = 1 << 30;
/// How long a group may still take to be delivered (acknowledged) once a
/// newer group of its track started: far above a healthy link's RTT plus
/// ACK delay and a busy node's scheduling delays, far below what a viewer
/// would wait for. Past it the link is behind and the group is reset.
const SUPERSEDED_GRACE: Duration = Duration::from_millis(500);
/// How long a finished group waits for its acknowledgement before the
/// writer gives up watching it.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// At the end of a stream, how long the last groups may take to drain
/// before `Ended` is sent.
const TAIL_WAIT: Duration = Duration::from_secs(1);
/// While renditions are held back (the peer reads none of their frames),
/// how often the peer hears when each last had a frame: well inside the
/// edge's 1 s silence threshold (`STALL`), so a flowing rendition never
/// looks silent there.
const HEARD_INTERVAL: Duration = Duration::from_millis(250);

/// The handle of a stream being sent; dropping it stops the sending and
/// resets the groups in flight.
pub(crate) struct Outgoing {
    keyframes: mpsc::Sender<String>,
    /// The renditions the peer reads (`None`: all, until it says).
    select: watch::Sender<Option<HashSet<String>>>,
    live: Subscriber,
    _task: AbortOnDrop,
}

impl Outgoing {
    /// Starts sending `subscriber`'s tracks to the peer as publication or
    /// subscription `id`.
    pub(crate) fn spawn(
        id: u64,
        subscriber: Subscriber,
        conn: quinn::Connection,
        seq: Arc<AtomicU64>,
        events: mpsc::Sender<Event>,
        resume: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel(KEYFRAME_QUEUE);
        let (select, select_rx) = watch::channel(None);
        let live = subscriber.clone();
        let span = tracing::info_span!("stream", stream = %subscriber.name(), id);
        let ctx = TrackCtx { id, conn, seq };
        let task =
            tokio::spawn(run(subscriber, ctx, rx, select_rx, events, resume).instrument(span));
        Self {
            keyframes: tx,
            select,
            live,
            _task: AbortOnDrop(task),
        }
    }

    /// Passes a keyframe request from the peer to the local track.
    pub(crate) fn request_keyframe(&self, track: String) {
        let _ = self.keyframes.try_send(track);
    }

    /// The peer reads only these renditions now (`Message::Select`).
    pub(crate) fn select(&self, tracks: Vec<String>) {
        let tracks: HashSet<String> = tracks.into_iter().take(MAX_TRACKS).collect();
        self.select.send_if_modified(|s| {
            let changed = s.as_ref() != Some(&tracks);
            *s = Some(tracks);
            changed
        });
    }

    /// True while the local stream has a publisher.
    pub(crate) fn is_live(&self) -> bool {
        self.live.is_live()
    }
}

/// True when `info`'s frames go to the peer: every track without a
/// rendition, and the renditions it reads (all until it said which).
fn selected(info: &TrackInfo, select: &Option<HashSet<String>>) -> bool {
    info.rendition.is_none() || select.as_ref().is_none_or(|s| s.contains(&info.name))
}

/// The catalog's tracks the peer gets frames of, and those held back.
fn split(catalog: &[TrackInfo], select: &Option<HashSet<String>>) -> (Vec<TrackInfo>, Vec<String>) {
    let (send, held): (Vec<_>, Vec<_>) = catalog.iter().cloned().partition(|t| selected(t, select));
    (send, held.into_iter().map(|t| t.name).collect())
}

async fn run(
    subscriber: Subscriber,
    ctx: TrackCtx,
    mut keyframes: mpsc::Receiver<String>,
    mut select_rx: watch::Receiver<Option<HashSet<String>>>,
    events: mpsc::Sender<Event>,
    resume: bool,
) {
    let id = ctx.id;
    let mut catalog_rx = subscriber.catalog_watch();
    let mut catalog = catalog_rx.borrow_and_update().clone();
    let mut select = select_rx.borrow_and_update().clone();
    let mut tracks: HashMap<String, (TrackInfo, AbortOnDrop)> = HashMap::new();
    let (send, mut held) = split(&catalog.tracks, &select);
    sync_tracks(&mut tracks, &send, &subscriber, &ctx, resume);
    let mut heard = tokio::time::interval(HEARD_INTERVAL);
    heard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = subscriber.ended() => break,
            changed = catalog_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                catalog = catalog_rx.borrow_and_update().clone();
                let send;
                (send, held) = split(&catalog.tracks, &select);
                sync_tracks(&mut tracks, &send, &subscriber, &ctx, false);
                if events.send(Report::Catalog { id, catalog: catalog.clone() }.into()).await.is_err() {
                    return;
                }
            }
            changed = select_rx.changed() => {
                if changed.is_err() {
                    // The handle is gone: the stream task is being aborted.
                    std::future::pending::<()>().await;
                }
                select = select_rx.borrow_and_update().clone();
                let before: HashSet<String> = tracks.keys().cloned().collect();
                let send;
                (send, held) = split(&catalog.tracks, &select);
                sync_tracks(&mut tracks, &send, &subscriber, &ctx, false);
                for t in send.iter().filter(|t| !before.contains(&t.name)) {
                    // A rendition the peer reads again is for a viewer
                    // switching to it: its next keyframe should be near.
                    if let Some(c) = subscriber.track(&t.name) {
                        c.request_keyframe();
                    }
                }
                tracing::debug!(sending = send.len(), held = held.len(), "peer selected renditions");
                metrics::counter!(RELAY_SELECTS).increment(1);
            }
            _ = heard.tick(), if !held.is_empty() => {
                let tracks: Vec<Heard> = held
                    .iter()
                    .filter_map(|t| {
                        let ingest_us = subscriber.last_ingest_us(t).filter(|&us| us > 0)?;
                        Some(Heard { track: t.clone(), ingest_us })
                    })
                    .collect();
                // Best effort: the next tick says it again.
                if !tracks.is_empty() {
                    let _ = events.try_send(Report::Heard { id, tracks }.into());
                }
            }
            Some(track) = keyframes.recv() => {
                if let Some(c) = subscriber.track(&track) {
                    c.request_keyframe();
                }
            }
        }
    }
    // The producers are gone; let the track tasks send what they still hold.
    let drain = futures::future::join_all(tracks.values_mut().map(|(_, t)| &mut t.0));
    let _ = tokio::time::timeout(TAIL_WAIT, drain).await;
    let _ = events.send(Report::Ended { id }.into()).await;
}

struct TrackCtx {
    id: u64,
    conn: quinn::Connection,
    seq: Arc<AtomicU64>,
}

/// Starts a track task per new (or re-created: codec changed) track and
/// stops the tasks of tracks the catalog no longer lists. With `resume` the
/// peer already has the current group: start at the next keyframe.
fn sync_tracks(
    running: &mut HashMap<String, (TrackInfo, AbortOnDrop)>,
    wanted: &[TrackInfo],
    subscriber: &Subscriber,
    ctx: &TrackCtx,
    resume: bool,
) {
    running.retain(|name, _| wanted.iter().any(|t| &t.name == name));
    for info in wanted {
        let keep = running
            .get(&info.name)
            .is_some_and(|(old, task)| old.codec == info.codec && !task.0.is_finished());
        if keep {
            continue;
        }
        let Some(mut consumer) = subscriber.track(&info.name) else {
            continue;
        };
        if resume {
            consumer.skip_to_keyframe();
            consumer.request_keyframe();
        }
        let task = tokio::spawn(
            run_track(
                ctx.id,
                info.name.clone(),
                info.kind() == Kind::Audio,
                consumer,
                ctx.conn.clone(),
                ctx.seq.clone(),
            )
            .in_current_span(),
        );
        running.insert(info.name.clone(), (info.clone(), AbortOnDrop(task)));
    }
}

fn priority(group: u64, audio: bool) -> i32 {
    let p = i32::try_from(group.min((AUDIO_PRIORITY - 1) as u64)).unwrap_or(AUDIO_PRIORITY - 1);
    if audio {
        p + AUDIO_PRIORITY
    } else {
        p
    }
}

/// Cuts one track into groups. Aborting the task resets its groups.
async fn run_track(
    id: u64,
    name: String,
    audio: bool,
    mut consumer: Consumer,
    conn: quinn::Connection,
    seq: Arc<AtomicU64>,
) {
    let cancel = CancellationToken::new();
    let guard = cancel.clone().drop_guard();
    let mut current: Option<Group> = None;
    // The track's previous group on this link, named in each header so the
    // receiver can restore the order whatever order streams arrive in.
    let mut prev = 0;
    while let Ok(frame) = consumer.next().await {
        let starts = frame.keyframe
            && current.as_ref().is_none_or(|g| {
                !audio || g.frames >= AUDIO_RUN_FRAMES || g.started.elapsed() >= AUDIO_RUN
            });
        if starts {
            if let Some(mut cur) = current.take() {
                // No more frames for it; what it has not delivered within
                // `SUPERSEDED_GRACE` from now is abandoned by its writer.
                cur.close();
                cur.superseded.cancel();
            }
            let group = seq.fetch_add(1, Ordering::Relaxed);
            let header = GroupHeader {
                id,
                group,
                prev,
                track: name.clone(),
            };
            prev = group;
            let Ok(header) = header.encode() else {
                return;
            };
            current = Some(Group::open(&conn, header, priority(group, audio), &cancel));
        }
        // Before the first keyframe (or after a reset) wait for the next one.
        let Some(group) = current.as_mut() else {
            continue;
        };
        if !group.push(frame) {
            group.reset();
            current = None;
        }
    }
    // The track ended: let the last groups finish rather than reset them.
    guard.disarm();
}

/// The track task's handle on one group's writer.
struct Group {
    tx: Option<mpsc::Sender<Frame>>,
    cancel: CancellationToken,
    /// Fired when the next group starts: the writer must drain soon.
    superseded: CancellationToken,
    /// Set when the writer is done: all data acknowledged, or it gave up.
    done: Arc<AtomicBool>,
    frames: usize,
    bytes: usize,
    started: Instant,
}

impl Group {
    fn open(
        conn: &quinn::Connection,
        header: Bytes,
        priority: i32,
        parent: &CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(GROUP_QUEUE);
        let cancel = parent.child_token();
        let done = Arc::new(AtomicBool::new(false));
        let superseded = CancellationToken::new();
        tokio::spawn(write_group(
            conn.clone(),
            header,
            priority,
            rx,
            Signals {
                cancel: cancel.clone(),
                superseded: superseded.clone(),
            },
            done.clone(),
        ));
        Self {
            tx: Some(tx),
            cancel,
            superseded,
            done,
            frames: 0,
            bytes: 0,
            started: Instant::now(),
        }
    }

    /// Hands a frame to the writer; false when the group overflowed.
    fn push(&mut self, frame: Frame) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        if self.bytes + frame.payload.len() > MAX_GROUP_BYTES {
            return false;
        }
        self.bytes += frame.payload.len();
        self.frames += 1;
        tx.try_send(frame).is_ok()
    }

    /// No more frames: the writer finishes the stream once drained.
    fn close(&mut self) {
        self.tx = None;
    }

    /// Abandons the group if it is not fully delivered yet.
    fn reset(&self) {
        if !self.done.load(Ordering::Relaxed) {
            metrics::counter!(RELAY_GROUPS_RESET).increment(1);
            self.cancel.cancel();
        }
    }
}

/// Marks a group's writer done however it exits.
struct DoneOnDrop(Arc<AtomicBool>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What can stop a group writer early.
struct Signals {
    /// Abandon now (aborted, overflowed, or two groups behind).
    cancel: CancellationToken,
    /// A newer group started: unless delivered within `SUPERSEDED_GRACE`,
    /// the group is abandoned.
    superseded: CancellationToken,
}

async fn write_group(
    conn: quinn::Connection,
    header: Bytes,
    priority: i32,
    mut rx: mpsc::Receiver<Frame>,
    signals: Signals,
    done: Arc<AtomicBool>,
) {
    let _done = DoneOnDrop(done);
    let Signals { cancel, superseded } = signals;
    let drained = async {
        superseded.cancelled().await;
        tokio::time::sleep(SUPERSEDED_GRACE).await;
    };
    tokio::pin!(drained);
    let mut send = tokio::select! {
        biased;
        _ = cancel.cancelled() => return,
        _ = &mut drained => return,
        s = conn.open_uni() => match s {
            Ok(s) => s,
            Err(_) => return,
        },
    };
    let _ = send.set_priority(priority);
    metrics::counter!(RELAY_GROUPS_SENT).increment(1);
    let mut chunks = vec![header];
    loop {
        let written = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                let _ = send.reset(code::SUPERSEDED);
                return;
            }
            _ = &mut drained => {
                tracing::debug!("group reset: not delivered in time");
                metrics::counter!(RELAY_GROUPS_RESET).increment(1);
                let _ = send.reset(code::SUPERSEDED);
                return;
            }
            w = send.write_all_chunks(&mut chunks) => w,
        };
        if written.is_err() {
            // Stopped by the peer, or the connection is gone.
            return;
        }
        let frame = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                let _ = send.reset(code::SUPERSEDED);
                return;
            }
            f = rx.recv() => f,
        };
        let Some(frame) = frame else {
            break;
        };
        chunks.clear();
        if let Ok(head) = encode_frame_header(&frame) {
            chunks.push(head);
            chunks.push(frame.payload);
            metrics::counter!(RELAY_FRAMES_SENT).increment(1);
        }
    }
    let _ = send.finish();
    let acked = send.stopped();
    tokio::select! {
        _ = acked => {}
        _ = cancel.cancelled() => {
            let _ = send.reset(code::SUPERSEDED);
        }
        _ = &mut drained => {
            tracing::debug!("group reset: not acknowledged in time");
            metrics::counter!(RELAY_GROUPS_RESET).increment(1);
            let _ = send.reset(code::SUPERSEDED);
        }
        _ = tokio::time::sleep(ACK_WAIT) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_groups_rank_higher_and_audio_above_video() {
        assert!(priority(2, false) > priority(1, false));
        assert!(priority(0, true) > priority(1_000_000, false));
        assert_eq!(priority(u64::MAX, false), AUDIO_PRIORITY - 1);
        assert_eq!(priority(u64::MAX, true), i32::MAX);
    }
}
