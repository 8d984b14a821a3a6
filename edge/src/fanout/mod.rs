//! Packetize once, send many: one feed task per (stream, track) on this node
//! reads the track's consumer, packetizes every frame once, keeps the
//! packetized current group for fast start and publishes frames to viewers
//! through a bounded broadcast ring, waking each shard that has viewers.
//!
//! Feed task: `select! { stop (last viewer left), keyframe wanted, keyframe
//! retry timer, next frame }` → the sans-IO core (`feed.rs`: edge timeline,
//! B-frames, packetizing, keyframe rate limit) → drain its outputs: cache +
//! publish + wake shards, keyframe requests upstream, metrics. The task ends
//! when the track closes (stream over) or its last viewer leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cascade_origin::catalog::{Codec, Kind};
use cascade_origin::registry::Subscriber;
use cascade_origin::track::Consumer;
use cascade_rtc::Waker;
use tokio::sync::{broadcast, Notify};
use tracing::Instrument;

use crate::bframes::BframeTs;
use crate::metrics as m;
use crate::packetize::Payload;

mod feed;

pub use feed::packetize_frame;

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
    /// Payload bytes of the frame.
    pub fn bytes(&self) -> usize {
        self.payloads.iter().map(|p| p.data.len()).sum()
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

    /// Wakes the shards of this feed's viewers without a frame: a rendition
    /// that went silent (its viewers in Auto mode fall back to another).
    fn wake_all(&self) {
        for (w, _) in &self.lock().wakers {
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
    /// How feeds of H.264 tracks stamp (or drop) B-frames ([`crate::Config`]).
    bframe_ts: BframeTs,
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
    /// A hub whose H.264 feeds handle B-frames by `bframe_ts`.
    pub fn new(bframe_ts: BframeTs) -> Self {
        Self {
            feeds: Mutex::default(),
            bframe_ts,
        }
    }

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
                let core = feed::Core::new(info.codec, self.bframe_ts)?;
                let feed = Feed::detached(&key.0, track, info.kind());
                feeds.insert(key, feed.clone());
                let span = tracing::info_span!("feed", role = "edge", stream = %feed.stream, track = %feed.track);
                tokio::spawn(
                    run(
                        self.clone(),
                        feed.clone(),
                        consumer,
                        core,
                        info.codec,
                        info.rendition.is_some(),
                    )
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

/// The feed task: waits on its inputs, hands them to the core with the
/// time, then does what the core asks (see the module header).
async fn run(
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    mut consumer: Consumer,
    mut core: feed::Core,
    codec: Codec,
    renditions: bool,
) {
    let kind = if feed.kind == Kind::Video {
        "video"
    } else {
        "audio"
    };
    tracing::debug!(codec = %codec, "feed started");
    // A rendition's viewers learn of its silence on their wakes: with no
    // frame to wake them, the feed wakes them every STALL.
    let mut silence_at = renditions.then(|| Instant::now() + crate::viewer::switch::STALL);
    let reason = loop {
        let retry_at = core.poll_timeout();
        // Time the core took for a frame: packetizing, mostly.
        let mut packetized = None;
        tokio::select! {
            biased;
            _ = feed.stop.notified() => break "no viewers",
            _ = feed.keyframe.notified() => core.request_keyframe(Instant::now()),
            _ = sleep_until(retry_at) => core.handle_timeout(Instant::now()),
            _ = sleep_until(silence_at) => {
                feed.wake_all();
                silence_at = Some(Instant::now() + crate::viewer::switch::STALL);
            }
            next = consumer.next() => {
                let Ok(frame) = next else { break "stream ended" };
                if let Some(at) = &mut silence_at {
                    *at = Instant::now() + crate::viewer::switch::STALL;
                }
                let started = Instant::now();
                core.handle_frame(started, cascade_origin::wallclock_us(), &frame);
                packetized = Some(started.elapsed());
            }
        }
        while let Some(out) = core.poll_output() {
            match out {
                feed::Output::Rebased => {
                    metrics::counter!(m::REBASES, "kind" => kind).increment(1);
                    tracing::info!("timeline re-based (publisher takeover)");
                    feed.reset_group();
                }
                feed::Output::BframeDropped => {
                    metrics::counter!(m::BFRAMES_DROPPED).increment(1);
                }
                feed::Output::Frame(frame) => {
                    if let Some(d) = packetized {
                        metrics::histogram!(m::PACKETIZE_SECONDS).record(d.as_secs_f64());
                    }
                    metrics::counter!(m::FRAMES_PACKETIZED, "kind" => kind).increment(1);
                    feed.publish(Arc::new(frame));
                }
                feed::Output::RequestKeyframe => {
                    consumer.request_keyframe();
                    metrics::counter!(m::KEYFRAME_REQUESTS, "cause" => "upstream").increment(1);
                }
            }
        }
    };
    feed.end();
    remove(&mut hub.lock(), &feed);
    metrics::gauge!(m::FEEDS).decrement(1.0);
    tracing::debug!(reason, "feed ended");
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
