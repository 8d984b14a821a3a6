//! A track: one writer, many readers, each reader starting at the current
//! group's keyframe and skipping ahead (never queueing) when it falls behind.
//!
//! The producer keeps the current group (keyframe and the frames after it) so
//! a new consumer starts decoding at once: the group cache behind fast start.
//! Frames are fanned out through a bounded ring (`tokio::sync::broadcast`);
//! payloads are `Bytes`, so every reader shares one copy.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use super::catalog::TrackInfo;
use super::frame::Frame;

/// Frames a consumer may fall behind before it skips to the next keyframe:
/// ~8 s of 30 fps video or ~5 s of 20 ms audio. A reader that slow is better
/// served by a fresh keyframe than by a growing backlog.
pub const RING_FRAMES: usize = 256;

/// Bytes the group cache may hold: a 10 s GOP at 12 Mbit/s. Past it the
/// cache stops growing and new consumers wait for the next keyframe.
pub const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;

/// Why a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    /// The producer went away (stream ended) or was replaced by a new
    /// publisher with a different codec.
    #[error("track closed")]
    Closed,
}

struct State {
    info: TrackInfo,
    tx: Option<broadcast::Sender<Frame>>,
    group: Vec<Frame>,
    group_bytes: usize,
    /// False once the current group outgrew the cache (or before the first
    /// keyframe): new consumers then wait for the next keyframe.
    group_complete: bool,
    group_seq: u64,
    generation: u64,
    frames: u64,
    bytes: u64,
    /// `ingest_us` of the last frame written: an edge in Auto mode tells a
    /// rendition that stopped (a simulcast encoder dropping its top layer)
    /// from one that flows, without reading it.
    last_ingest_us: u64,
}

struct Shared {
    state: Mutex<State>,
    keyframe_requests: watch::Sender<u64>,
    /// Viewers watching this track on this node ([`Track::watch`]), for the
    /// per-rendition figures of `/api/streams`.
    watchers: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a writer panicked mid-update; the state is
        // still a valid (if partial) group, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle to a track that is neither a reader nor a writer: used by the
/// registry to create consumers and to hand the track to a new publisher.
#[derive(Clone)]
pub struct Track {
    shared: Arc<Shared>,
}

impl Track {
    /// Creates a track and its first producer.
    pub fn new(info: TrackInfo) -> (Self, Producer) {
        let (tx, _) = broadcast::channel(RING_FRAMES);
        let (kf, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                info,
                tx: Some(tx),
                group: Vec::new(),
                group_bytes: 0,
                group_complete: false,
                group_seq: 0,
                generation: 0,
                frames: 0,
                bytes: 0,
                last_ingest_us: 0,
            }),
            keyframe_requests: kf,
            watchers: AtomicUsize::new(0),
        });
        let producer = Producer {
            shared: shared.clone(),
            generation: 0,
            keyframes: shared.keyframe_requests.subscribe(),
        };
        (Self { shared }, producer)
    }

    /// Hands the track to a new producer (publisher takeover). The previous
    /// producer's writes are ignored from now on; consumers keep reading and
    /// continue with the new producer's next keyframe.
    pub fn take_over(&self, info: TrackInfo) -> Producer {
        let mut st = self.shared.lock();
        st.generation += 1;
        st.info = info;
        // The old group belongs to the old encoder: a consumer joining now
        // must wait for the new one's keyframe.
        st.group.clear();
        st.group_bytes = 0;
        st.group_complete = false;
        if st.tx.is_none() {
            let (tx, _) = broadcast::channel(RING_FRAMES);
            st.tx = Some(tx);
        }
        Producer {
            shared: self.shared.clone(),
            generation: st.generation,
            keyframes: self.shared.keyframe_requests.subscribe(),
        }
    }

    /// A new reader starting at the current group's keyframe.
    pub fn consume(&self) -> Consumer {
        let st = self.shared.lock();
        let backlog: VecDeque<Frame> = if st.group_complete {
            st.group.iter().cloned().collect()
        } else {
            VecDeque::new()
        };
        let waiting = backlog.is_empty();
        // Subscribing under the lock: no frame falls between cache and ring.
        let rx = st.tx.as_ref().map(|tx| tx.subscribe());
        Consumer {
            shared: self.shared.clone(),
            backlog,
            rx,
            waiting_keyframe: waiting,
            skipped: 0,
        }
    }

    /// The track's description.
    pub fn info(&self) -> TrackInfo {
        self.shared.lock().info.clone()
    }

    /// Frames and bytes written so far.
    pub fn totals(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.frames, st.bytes)
    }

    /// `ingest_us` of the last frame written (0 before the first).
    pub fn last_ingest_us(&self) -> u64 {
        self.shared.lock().last_ingest_us
    }

    /// Counts a viewer of this track until the guard drops.
    pub fn watch(&self) -> Watch {
        self.shared.watchers.fetch_add(1, Ordering::Relaxed);
        Watch {
            shared: self.shared.clone(),
        }
    }

    /// Viewers counted by [`Track::watch`].
    pub fn watchers(&self) -> usize {
        self.shared.watchers.load(Ordering::Relaxed)
    }

    /// True while a producer is attached.
    pub fn is_open(&self) -> bool {
        self.shared.lock().tx.is_some()
    }

    /// Asks the producer for a keyframe (PLI towards a WebRTC publisher,
    /// upstream towards the origin over the relay).
    pub fn request_keyframe(&self) {
        self.shared.keyframe_requests.send_modify(|n| *n += 1);
    }
}

/// A viewer of a track, counted while held ([`Track::watch`]).
pub struct Watch {
    shared: Arc<Shared>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The writing end of a track. Dropping it closes the track unless a newer
/// producer took it over.
pub struct Producer {
    shared: Arc<Shared>,
    generation: u64,
    keyframes: watch::Receiver<u64>,
}

/// The producer was replaced by a newer publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("superseded by a newer publisher")]
pub struct Superseded;

impl Producer {
    /// Appends a frame. Fails once another producer took the track over.
    pub fn write(&self, frame: Frame) -> Result<(), Superseded> {
        let mut st = self.shared.lock();
        if st.generation != self.generation {
            return Err(Superseded);
        }
        st.frames += 1;
        st.bytes += frame.payload.len() as u64;
        st.last_ingest_us = frame.ingest_us;
        if frame.keyframe {
            st.group.clear();
            st.group_bytes = 0;
            st.group_complete = true;
            st.group_seq += 1;
        }
        if st.group_complete {
            if st.group_bytes + frame.payload.len() <= MAX_GROUP_BYTES {
                st.group_bytes += frame.payload.len();
                st.group.push(frame.clone());
            } else {
                st.group.clear();
                st.group_bytes = 0;
                st.group_complete = false;
            }
        }
        if let Some(tx) = &st.tx {
            // No receivers is fine: frames still feed the cache.
            let _ = tx.send(frame);
        }
        Ok(())
    }

    /// Updates the description (e.g. new SPS/PPS from the encoder).
    pub fn set_info(&self, info: TrackInfo) {
        let mut st = self.shared.lock();
        if st.generation == self.generation {
            st.info = info;
        }
    }

    /// The track's description.
    pub fn info(&self) -> TrackInfo {
        self.shared.lock().info.clone()
    }

    /// Resolves when a consumer asked for a keyframe since the last call.
    /// Pending forever once every handle is gone, so it is safe in `select!`.
    pub async fn keyframe_requested(&mut self) {
        if self.keyframes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// True if a keyframe was requested since the last check (non-blocking).
    pub fn take_keyframe_request(&mut self) -> bool {
        let changed = self.keyframes.has_changed().unwrap_or(false);
        if changed {
            self.keyframes.borrow_and_update();
        }
        changed
    }

    /// Readers attached to the track now (consumers with a live cursor).
    /// The relay asks upstream only for the renditions someone reads.
    pub fn readers(&self) -> usize {
        self.shared
            .lock()
            .tx
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// Drops the cached group: a new consumer waits for the next keyframe
    /// instead of starting on a group that stopped arriving (the relay no
    /// longer receives this rendition).
    pub fn forget_group(&self) {
        let mut st = self.shared.lock();
        if st.generation == self.generation {
            st.group.clear();
            st.group_bytes = 0;
            st.group_complete = false;
        }
    }

    /// Records that the track's source had a frame at `ingest_us` without
    /// writing one: a rendition upstream sends no frames of while nobody
    /// here reads it still shows as flowing (Auto's silence check).
    pub fn heard(&self, ingest_us: u64) {
        let mut st = self.shared.lock();
        if st.generation == self.generation && ingest_us > st.last_ingest_us {
            st.last_ingest_us = ingest_us;
        }
    }

    /// True while this producer still owns the track.
    pub fn is_current(&self) -> bool {
        self.shared.lock().generation == self.generation
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.generation == self.generation {
            // Dropping the sender ends every consumer once drained.
            st.tx = None;
            st.group.clear();
            st.group_bytes = 0;
            st.group_complete = false;
        }
    }
}

/// A reader of a track with its own cursor.
pub struct Consumer {
    shared: Arc<Shared>,
    backlog: VecDeque<Frame>,
    rx: Option<broadcast::Receiver<Frame>>,
    waiting_keyframe: bool,
    skipped: u64,
}

impl Consumer {
    /// The next frame, waiting for it; `Err` once the track closed.
    pub async fn next(&mut self) -> Result<Frame, Closed> {
        loop {
            if let Some(f) = self.backlog.pop_front() {
                return Ok(f);
            }
            let rx = self.rx.as_mut().ok_or(Closed::Closed)?;
            match rx.recv().await {
                Ok(f) => {
                    if let Some(f) = self.accept(f) {
                        return Ok(f);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::RecvError::Closed) => return Err(Closed::Closed),
            }
        }
    }

    /// The next frame if one is ready; `Ok(None)` when none is.
    pub fn try_next(&mut self) -> Result<Option<Frame>, Closed> {
        loop {
            if let Some(f) = self.backlog.pop_front() {
                return Ok(Some(f));
            }
            let rx = self.rx.as_mut().ok_or(Closed::Closed)?;
            match rx.try_recv() {
                Ok(f) => {
                    if let Some(f) = self.accept(f) {
                        return Ok(Some(f));
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::TryRecvError::Closed) => return Err(Closed::Closed),
            }
        }
    }

    fn accept(&mut self, f: Frame) -> Option<Frame> {
        if self.waiting_keyframe {
            if !f.keyframe {
                self.skipped += 1;
                return None;
            }
            self.waiting_keyframe = false;
        }
        Some(f)
    }

    fn lagged(&mut self, n: u64) {
        // Behind by a whole ring: resume at the next keyframe rather than
        // decode a broken group.
        self.skipped += n;
        self.waiting_keyframe = true;
        self.shared.keyframe_requests.send_modify(|c| *c += 1);
    }

    /// Frames this reader skipped (lagging, or waiting for a keyframe).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True while the reader waits for a keyframe to (re)start.
    pub fn waiting_keyframe(&self) -> bool {
        self.waiting_keyframe && self.backlog.is_empty()
    }

    /// Drops everything buffered and waits for the next keyframe: used by a
    /// viewer that cannot keep up.
    pub fn skip_to_keyframe(&mut self) {
        self.backlog.clear();
        self.waiting_keyframe = true;
        if let Some(rx) = &mut self.rx {
            *rx = rx.resubscribe();
        }
    }

    /// Asks the producer for a keyframe.
    pub fn request_keyframe(&self) {
        self.shared.keyframe_requests.send_modify(|n| *n += 1);
    }

    /// The track's description.
    pub fn info(&self) -> TrackInfo {
        self.shared.lock().info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::catalog::Codec;
    use bytes::Bytes;

    fn info() -> TrackInfo {
        TrackInfo {
            name: "video".into(),
            codec: Codec::H264,
            fmtp: String::new(),
            channels: None,
            bframes: false,
            rendition: None,
        }
    }

    fn frame(n: u64, key: bool) -> Frame {
        Frame {
            payload: Bytes::from(vec![n as u8; 10]),
            pts: n,
            dts: n,
            keyframe: key,
            ingest_us: 0,
        }
    }

    #[test]
    fn late_joiner_starts_at_keyframe() {
        let (track, p) = Track::new(info());
        p.write(frame(0, false)).unwrap(); // before any keyframe: not cached
        p.write(frame(1, true)).unwrap();
        p.write(frame(2, false)).unwrap();
        let mut c = track.consume();
        assert_eq!(c.try_next().unwrap().unwrap().pts, 1);
        assert_eq!(c.try_next().unwrap().unwrap().pts, 2);
        assert_eq!(c.try_next().unwrap(), None);
        p.write(frame(3, false)).unwrap();
        assert_eq!(c.try_next().unwrap().unwrap().pts, 3);
    }

    #[test]
    fn joiner_without_cache_waits_for_keyframe() {
        let (track, p) = Track::new(info());
        let mut c = track.consume();
        p.write(frame(0, false)).unwrap();
        p.write(frame(1, true)).unwrap();
        assert_eq!(c.try_next().unwrap().unwrap().pts, 1);
        assert_eq!(c.skipped(), 1);
    }

    #[test]
    fn lagging_reader_skips_to_next_keyframe() {
        let (track, p) = Track::new(info());
        p.write(frame(0, true)).unwrap();
        let mut c = track.consume();
        assert_eq!(c.try_next().unwrap().unwrap().pts, 0);
        for n in 1..(RING_FRAMES as u64 + 10) {
            p.write(frame(n, false)).unwrap();
        }
        let k = RING_FRAMES as u64 + 10;
        p.write(frame(k, true)).unwrap();
        p.write(frame(k + 1, false)).unwrap();
        assert_eq!(c.try_next().unwrap().unwrap().pts, k);
        assert_eq!(c.try_next().unwrap().unwrap().pts, k + 1);
        assert!(c.skipped() > 0);
    }

    #[test]
    fn drop_closes_and_takeover_continues() {
        let (track, p) = Track::new(info());
        p.write(frame(0, true)).unwrap();
        let mut c = track.consume();
        let p2 = track.take_over(info());
        assert_eq!(p.write(frame(1, false)), Err(Superseded));
        drop(p); // the superseded producer must not close the track
        p2.write(frame(100, true)).unwrap();
        assert_eq!(c.try_next().unwrap().unwrap().pts, 0);
        assert_eq!(c.try_next().unwrap().unwrap().pts, 100);
        drop(p2);
        assert_eq!(c.try_next(), Err(Closed::Closed));
    }

    #[tokio::test]
    async fn keyframe_request_reaches_producer() {
        let (track, mut p) = Track::new(info());
        let c = track.consume();
        assert!(!p.take_keyframe_request());
        c.request_keyframe();
        tokio::time::timeout(std::time::Duration::from_secs(1), p.keyframe_requested())
            .await
            .unwrap();
    }
}
