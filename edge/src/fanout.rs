//! Packetize once, send many: one feed task per (stream, track) on this node
//! reads the track's consumer, packetizes every frame once, keeps the
//! packetized current group for fast start and publishes frames to viewers
//! through a bounded broadcast ring, waking each shard that has viewers.
//!
//! Feed loop: `select! { stop (last viewer left), keyframe wanted, next frame }`
//! → map to the edge timeline → packetize → cache + publish → wake shards.
//! The task ends when the track closes (stream over) or its last viewer leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cascade_origin::catalog::{Codec, Kind};
use cascade_origin::frame::Frame;
use cascade_origin::registry::Subscriber;
use cascade_origin::track::Consumer;
use cascade_rtc::Waker;
use tokio::sync::{broadcast, Notify};
use tracing::Instrument;

use crate::bframes::{is_h264_b_slice, BframeTs};
use crate::metrics as m;
use crate::packetize::{Packetizer, Payload};

/// Frames a viewer may fall behind the feed before it skips to the next
/// keyframe: ~4 s of 30 fps video or ~2.5 s of 20 ms Opus. Packets are
/// `Arc`s, so the ring costs pointers, not payload copies.
pub const FANOUT_FRAMES: usize = 128;
/// Bytes of packetized group kept for fast start; past this a new viewer
/// waits for the next keyframe (the origin's cache has the same limit).
pub const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// At most one keyframe request upstream per this interval: a burst of
/// joining or lagging viewers needs one keyframe, not one each.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);
/// A decode-timestamp step larger than this (or any step backwards) is a
/// new publisher's timeline (takeover), not a gap in one encoder's output.
const MAX_STEP: Duration = Duration::from_secs(5);

/// A viewer's end of a feed's ring.
pub type Receiver = broadcast::Receiver<Arc<PacketizedFrame>>;

/// One frame, packetized once, shared by every viewer.
#[derive(Debug)]
pub struct PacketizedFrame {
    /// The RTP payloads, last one marked for video.
    pub payloads: Vec<Payload>,
    /// Presentation time on the edge timeline (track clock): continuous and
    /// monotonic across publisher takeovers. Viewers add their own offset.
    pub ts: u64,
    /// A video keyframe (or any audio frame).
    pub keyframe: bool,
    /// Ingest wall clock, µs since the UNIX epoch.
    pub ingest_us: u64,
    /// `ts` as a local instant (for RTCP sender reports / A/V sync).
    pub wallclock: Instant,
}

impl PacketizedFrame {
    fn bytes(&self) -> usize {
        self.payloads.iter().map(|p| p.data.len()).sum()
    }
}

/// Maps a publisher's timestamps to the edge timeline, re-basing on jumps.
#[derive(Debug)]
pub(crate) struct Timeline {
    clock: u64,
    offset: i128,
    last: Option<(u64, i128, u64)>,
}

impl Timeline {
    pub(crate) fn new(clock: u32) -> Self {
        Self {
            clock: u64::from(clock),
            offset: 0,
            last: None,
        }
    }

    /// The frame's pts on the edge timeline, and whether a new timeline
    /// (publisher takeover) started with it.
    pub(crate) fn map(&mut self, dts: u64, pts: u64, ingest_us: u64) -> (u64, bool) {
        let max_step = u128::from(self.clock) * MAX_STEP.as_millis() / 1000;
        let mut jumped = false;
        if let Some((last_dts, last_mapped, last_us)) = self.last {
            let forward = u128::from(dts.saturating_sub(last_dts));
            if dts < last_dts || forward > max_step {
                // Continue by the wall time between the two frames, so audio
                // and video (re-based independently) stay in step.
                let wall_us = u128::from(ingest_us.saturating_sub(last_us));
                let ticks =
                    (wall_us * u128::from(self.clock) / 1_000_000).clamp(1, max_step.max(1));
                let ticks = i128::try_from(ticks).unwrap_or(1);
                self.offset = last_mapped + ticks - i128::from(dts);
                jumped = true;
            }
        }
        let mapped_dts = i128::from(dts) + self.offset;
        self.last = Some((dts, mapped_dts, ingest_us));
        let ts = (i128::from(pts) + self.offset).max(0);
        (u64::try_from(ts).unwrap_or(u64::MAX), jumped)
    }

    /// The decode timestamp of the last mapped frame on the edge timeline.
    pub(crate) fn dts(&self) -> u64 {
        self.last.map_or(0, |(_, mapped, _)| {
            u64::try_from(mapped.max(0)).unwrap_or(u64::MAX)
        })
    }
}

struct State {
    /// `None` once the feed ended (stream over): receivers then see `Closed`.
    tx: Option<broadcast::Sender<Arc<PacketizedFrame>>>,
    group: Vec<Arc<PacketizedFrame>>,
    group_bytes: usize,
    /// Wakers of the shards holding viewers, with how many viewers each.
    wakers: Vec<(Waker, usize)>,
    viewers: usize,
}

/// One (stream, track) being served on this node.
pub struct Feed {
    stream: String,
    track: String,
    kind: Kind,
    state: Mutex<State>,
    keyframe: Notify,
    stop: Notify,
}

impl Feed {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Poison means a panic mid-update; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached group (keyframe first) and a receiver for what follows;
    /// `None` when the feed has ended.
    pub fn subscribe(&self) -> Option<(Vec<Arc<PacketizedFrame>>, Receiver)> {
        let st = self.lock();
        // Under the lock: no frame falls between the cache and the ring.
        let rx = st.tx.as_ref()?.subscribe();
        Some((st.group.clone(), rx))
    }

    /// Asks the publisher for a keyframe (rate-limited by the feed task).
    pub fn request_keyframe(&self) {
        self.keyframe.notify_one();
    }

    /// Audio or video.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Publishes a packetized frame: cache, ring, wake the shards.
    pub fn publish(&self, frame: Arc<PacketizedFrame>) {
        let mut st = self.lock();
        if frame.keyframe {
            st.group.clear();
            st.group_bytes = 0;
        }
        let size = frame.bytes();
        if !st.group.is_empty() || frame.keyframe {
            if st.group_bytes + size <= MAX_GROUP_BYTES {
                st.group_bytes += size;
                st.group.push(frame.clone());
            } else {
                st.group.clear();
                st.group_bytes = 0;
            }
        }
        if let Some(tx) = &st.tx {
            let _ = tx.send(frame);
        }
        for (w, _) in &st.wakers {
            w.wake();
        }
    }

    /// Drops the timeline's cached group (a new publisher's frames follow).
    fn reset_group(&self) {
        let mut st = self.lock();
        st.group.clear();
        st.group_bytes = 0;
    }

    pub(crate) fn end(&self) {
        let mut st = self.lock();
        st.tx = None;
        st.group.clear();
        for (w, _) in &st.wakers {
            w.wake();
        }
    }

    fn ended(&self) -> bool {
        self.lock().tx.is_none()
    }

    /// A feed with no task behind it, for benches and tests that publish
    /// frames by hand.
    pub fn detached(stream: &str, track: &str, kind: Kind) -> Arc<Self> {
        Arc::new(Self {
            stream: stream.into(),
            track: track.into(),
            kind,
            state: Mutex::new(State {
                tx: Some(broadcast::channel(FANOUT_FRAMES).0),
                group: Vec::new(),
                group_bytes: 0,
                wakers: Vec::new(),
                viewers: 0,
            }),
            keyframe: Notify::new(),
            stop: Notify::new(),
        })
    }
}

/// The feeds of this node by (stream, track).
#[derive(Default)]
pub struct Hub {
    feeds: Mutex<HashMap<(String, String), Arc<Feed>>>,
}

/// A viewer's hold on a feed; dropping it leaves (the last one stops the feed).
pub struct Member {
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    waker: Waker,
}

impl Member {
    /// The feed.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.hub.leave(&self.feed, &self.waker);
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<Feed>>> {
        self.feeds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds running on this node.
    pub fn feeds(&self) -> usize {
        self.lock().len()
    }

    /// Joins the feed of `track` of the subscribed stream, starting it (one
    /// task reading one consumer) if this is its first viewer.
    pub fn join(self: &Arc<Self>, sub: &Subscriber, track: &str, waker: &Waker) -> Option<Member> {
        let key = (sub.name().to_string(), track.to_string());
        let mut feeds = self.lock();
        let feed = match feeds.get(&key) {
            Some(f) if !f.ended() => f.clone(),
            _ => {
                let consumer = sub.track(track)?;
                let info = consumer.info();
                let packetizer = Packetizer::new(info.codec)?;
                let feed = Feed::detached(&key.0, track, info.kind());
                feeds.insert(key, feed.clone());
                let span = tracing::info_span!("feed", role = "edge", stream = %feed.stream, track = %feed.track);
                tokio::spawn(
                    run(self.clone(), feed.clone(), consumer, packetizer, info.codec)
                        .instrument(span),
                );
                metrics::gauge!(m::FEEDS).increment(1.0);
                feed
            }
        };
        {
            let mut st = feed.lock();
            st.viewers += 1;
            match st.wakers.iter_mut().find(|(w, _)| w.same_shard(waker)) {
                Some((_, n)) => *n += 1,
                None => st.wakers.push((waker.clone(), 1)),
            }
        }
        drop(feeds);
        Some(Member {
            hub: self.clone(),
            feed,
            waker: waker.clone(),
        })
    }

    fn leave(&self, feed: &Arc<Feed>, waker: &Waker) {
        let mut feeds = self.lock();
        let mut st = feed.lock();
        st.viewers = st.viewers.saturating_sub(1);
        if let Some(i) = st.wakers.iter().position(|(w, _)| w.same_shard(waker)) {
            if let Some((_, n)) = st.wakers.get_mut(i) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.wakers.swap_remove(i);
                }
            }
        }
        if st.viewers == 0 {
            drop(st);
            remove(&mut feeds, feed);
            feed.stop.notify_one();
        }
    }
}

fn remove(feeds: &mut HashMap<(String, String), Arc<Feed>>, feed: &Arc<Feed>) {
    let key = (feed.stream.clone(), feed.track.clone());
    if feeds.get(&key).is_some_and(|f| Arc::ptr_eq(f, feed)) {
        feeds.remove(&key);
    }
}

/// Packetizes one origin frame on the edge timeline (the feed task's step,
/// public for the bench).
pub fn packetize_frame(
    p: &mut Packetizer,
    frame: &Frame,
    ts: u64,
    anchor: Instant,
    clock: u32,
) -> PacketizedFrame {
    let payloads = p.packetize(&frame.payload, frame.keyframe);
    let micros = u128::from(ts) * 1_000_000 / u128::from(clock.max(1));
    // Publisher timestamps are input: never let them overflow the instant.
    let after = Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX));
    let wallclock = anchor.checked_add(after).unwrap_or(anchor);
    PacketizedFrame {
        payloads,
        ts,
        keyframe: frame.keyframe,
        ingest_us: frame.ingest_us,
        wallclock,
    }
}

async fn run(
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    mut consumer: Consumer,
    mut packetizer: Packetizer,
    codec: Codec,
) {
    let clock = codec.clock_rate();
    let kind = if feed.kind == Kind::Video {
        "video"
    } else {
        "audio"
    };
    let mut timeline = Timeline::new(clock);
    // How B-frames get their RTP timestamps (bframes.rs); frames without
    // B-frames (pts = dts) come out the same under every method.
    let method = if codec == Codec::H264 {
        BframeTs::current()
    } else {
        BframeTs::Pts
    };
    // pts − dts of the timeline's first frame (a keyframe): shifts dts-based
    // timestamps onto the presentation clock the audio uses.
    let mut reorder: Option<u64> = None;
    let mut anchor: Option<Instant> = None;
    let mut waiting_keyframe = false;
    let mut wanted = false;
    let mut last_request: Option<Instant> = None;
    tracing::debug!(codec = %codec, "feed started");
    let reason = loop {
        let retry_at = last_request.map_or_else(Instant::now, |t| t + KEYFRAME_INTERVAL);
        tokio::select! {
            biased;
            _ = feed.stop.notified() => break "no viewers",
            _ = feed.keyframe.notified() => wanted = true,
            _ = tokio::time::sleep_until(retry_at.into()), if wanted => {}
            next = consumer.next() => {
                let Ok(frame) = next else { break "stream ended" };
                let (pts_ts, jumped) = timeline.map(frame.dts, frame.pts, frame.ingest_us);
                if jumped {
                    reorder = None;
                    // A new publisher: its frames decode only from its keyframe.
                    metrics::counter!(m::REBASES, "kind" => kind).increment(1);
                    tracing::info!("timeline re-based (publisher takeover)");
                    feed.reset_group();
                    waiting_keyframe = feed.kind == Kind::Video;
                }
                if waiting_keyframe && !frame.keyframe {
                    continue;
                }
                waiting_keyframe = false;
                if method == BframeTs::DropB && is_h264_b_slice(&frame.payload) {
                    metrics::counter!(m::BFRAMES_DROPPED).increment(1);
                    continue;
                }
                let ts = match method {
                    // Without B slices the rest is in presentation order:
                    // pts is monotonic and keeps A/V sync exact.
                    BframeTs::Pts | BframeTs::DropB => pts_ts,
                    BframeTs::Dts => {
                        let delay = *reorder.get_or_insert(frame.pts.saturating_sub(frame.dts));
                        timeline.dts().saturating_add(delay)
                    }
                };
                let anchor = *anchor.get_or_insert_with(|| anchor_of(&frame, clock));
                let started = Instant::now();
                let out = packetize_frame(&mut packetizer, &frame, ts, anchor, clock);
                metrics::histogram!(m::PACKETIZE_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::FRAMES_PACKETIZED, "kind" => kind).increment(1);
                feed.publish(Arc::new(out));
            }
        }
        let now = Instant::now();
        if wanted && last_request.is_none_or(|t| now >= t + KEYFRAME_INTERVAL) {
            consumer.request_keyframe();
            metrics::counter!(m::KEYFRAME_REQUESTS, "cause" => "upstream").increment(1);
            last_request = Some(now);
            wanted = false;
        }
    };
    feed.end();
    remove(&mut hub.lock(), &feed);
    metrics::gauge!(m::FEEDS).decrement(1.0);
    tracing::debug!(reason, "feed ended");
}

/// The local instant of the stream timeline's zero, from a frame's ingest
/// wall clock: `ts / clock` after it is the frame's capture instant.
fn anchor_of(frame: &Frame, clock: u32) -> Instant {
    let now = Instant::now();
    let age = Duration::from_micros(cascade_origin::wallclock_us().saturating_sub(frame.ingest_us));
    let media = Duration::from_micros(
        u64::try_from(u128::from(frame.pts) * 1_000_000 / u128::from(clock.max(1))).unwrap_or(0),
    );
    now.checked_sub(age.saturating_add(media))
        .or_else(|| now.checked_sub(age))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_continues_across_takeover() {
        let mut t = Timeline::new(90_000);
        assert_eq!(t.map(0, 0, 1_000_000), (0, false));
        assert_eq!(t.map(3000, 3000, 1_033_333), (3000, false));
        // New publisher restarts at 0, 100 ms of wall time later.
        let (ts, jumped) = t.map(0, 0, 1_133_333);
        assert!(jumped);
        assert_eq!(ts, 3000 + 9000);
        assert_eq!(t.map(3000, 3000, 1_166_666), (15_000, false));
        // A forward jump of an hour is a new timeline too.
        let (ts, jumped) = t.map(3000 + 90_000 * 3600, 3000 + 90_000 * 3600, 1_200_000);
        assert!(jumped);
        assert!(ts > 15_000 && ts < 15_000 + 90_000);
    }

    proptest::proptest! {
        /// Whatever timestamps publishers send (jumps, wraps, takeovers), the
        /// edge timeline never goes backwards and never panics.
        #[test]
        fn timeline_is_monotonic(steps in proptest::collection::vec((proptest::prelude::any::<u64>(), 0u64..10_000_000), 1..200)) {
            let mut t = Timeline::new(90_000);
            let mut last = None;
            for (dts, us) in steps {
                let (ts, _) = t.map(dts, dts, us);
                if let Some(l) = last {
                    proptest::prop_assert!(ts >= l, "{ts} after {l}");
                }
                last = Some(ts);
            }
        }
    }

    #[test]
    fn extreme_timestamps_do_not_overflow_the_clock() {
        let mut p = Packetizer::new(Codec::Opus).unwrap();
        let f = Frame {
            payload: bytes::Bytes::from_static(b"x"),
            pts: u64::MAX,
            dts: u64::MAX,
            keyframe: true,
            ingest_us: 0,
        };
        let anchor = anchor_of(&f, 48_000);
        let out = packetize_frame(&mut p, &f, u64::MAX, anchor, 48_000);
        assert_eq!(out.payloads.len(), 1);
    }

    #[test]
    fn dts_follows_the_timeline() {
        let mut t = Timeline::new(90_000);
        t.map(1000, 7000, 0);
        assert_eq!(t.dts(), 1000);
        t.map(4000, 4000, 33_000);
        assert_eq!(t.dts(), 4000);
        // Takeover: the new timeline continues after the old one.
        t.map(0, 6000, 66_000);
        assert_eq!(t.dts(), 4000 + 2970);
    }

    #[test]
    fn timeline_keeps_bframe_pts() {
        let mut t = Timeline::new(90_000);
        // Decode order I P B: pts 0, 6000, 3000 with dts 0, 3000, 6000... shifted.
        assert_eq!(t.map(0, 3000, 0).0, 3000);
        assert_eq!(t.map(3000, 9000, 0).0, 9000);
        assert_eq!(t.map(6000, 6000, 0).0, 6000);
    }

    #[tokio::test]
    async fn group_cache_starts_at_keyframe() {
        let feed = Feed::detached("s", "video", Kind::Video);
        let f = |ts, keyframe| {
            Arc::new(PacketizedFrame {
                payloads: vec![],
                ts,
                keyframe,
                ingest_us: 0,
                wallclock: Instant::now(),
            })
        };
        feed.publish(f(0, false));
        assert!(feed.subscribe().unwrap().0.is_empty());
        feed.publish(f(1, true));
        feed.publish(f(2, false));
        let (group, mut rx) = feed.subscribe().unwrap();
        assert_eq!(group.iter().map(|f| f.ts).collect::<Vec<_>>(), vec![1, 2]);
        feed.publish(f(3, false));
        assert_eq!(rx.try_recv().unwrap().ts, 3);
        feed.end();
        assert!(feed.subscribe().is_none());
    }
}
