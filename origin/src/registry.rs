//! The streams of one node by name: publish (with takeover), subscribe
//! (locally, or on demand from an upstream node), and per-stream figures.
//!
//! The registry is the only meeting point of ingest and edge: in `cascade
//! all` both use one registry in-process; split across machines, the relay
//! client publishes an ingest's streams into the origin's registry and feeds
//! an edge's registry on demand (see [`Upstream`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::model::catalog::Catalog;
use crate::model::track::{Consumer, Producer, Track};
use crate::{valid_stream_name, Error, Result};

/// Announcements buffered for slow listeners (the relay uplink); a lagging
/// listener rescans [`Registry::names`].
const ANNOUNCE_CAPACITY: usize = 64;

/// Where streams that are not local come from: the relay client of an edge.
pub trait Upstream: Send + Sync + 'static {
    /// Makes `name` live in `registry` (publishing it there, fed from
    /// upstream), or fails with [`Error::NotLive`]. Called for each local
    /// miss; implementations deduplicate concurrent fetches.
    fn fetch(
        &self,
        registry: Arc<Registry>,
        name: String,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send>>;
}

/// Streams this node can start itself when a viewer asks (RTSP pulls
/// configured on demand). Consulted on a local miss before [`Upstream`].
pub trait Sources: Send + Sync + 'static {
    /// `None` when `name` is not a source of this node; else a future that
    /// starts it and resolves once it is live in the registry (or fails with
    /// [`Error::NotLive`] after a bounded wait).
    fn start(&self, name: &str) -> Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>>;
}

struct Entry {
    name: String,
    catalog: watch::Sender<Catalog>,
    tracks: Mutex<HashMap<String, Track>>,
    /// Bumped on every publish; the current publisher holds the same number.
    generation: watch::Sender<u64>,
    protocol: Mutex<String>,
    /// The current publisher is a relay link (the stream is another
    /// node's), not a publisher of this node.
    relayed: std::sync::atomic::AtomicBool,
    started: Instant,
    viewers: AtomicUsize,
    /// Relay subscribers (other nodes fed from this one), not counted as viewers.
    relays: AtomicUsize,
    /// Live until the current publisher leaves.
    live: watch::Sender<bool>,
    rate: Mutex<RateWindow>,
    /// Per rendition track, like `rate`.
    track_rates: Mutex<HashMap<String, RateWindow>>,
}

struct RateWindow {
    at: Instant,
    bytes: u64,
    bps: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poison means a panic elsewhere mid-update; the maps stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Entry {
    fn counter(&self, viewer: bool) -> &AtomicUsize {
        if viewer {
            &self.viewers
        } else {
            &self.relays
        }
    }

    fn total_bytes(&self) -> u64 {
        lock(&self.tracks).values().map(|t| t.totals().1).sum()
    }
}

/// The streams of one node.
pub struct Registry {
    streams: Mutex<HashMap<String, Arc<Entry>>>,
    upstream: OnceLock<Arc<dyn Upstream>>,
    announce: broadcast::Sender<String>,
    sources: OnceLock<Arc<dyn Sources>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            streams: Mutex::new(HashMap::new()),
            upstream: OnceLock::new(),
            announce: broadcast::channel(ANNOUNCE_CAPACITY).0,
            sources: OnceLock::new(),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets where local misses are fetched from (once; later calls are ignored).
    pub fn set_upstream(&self, upstream: Arc<dyn Upstream>) {
        let _ = self.upstream.set(upstream);
    }

    /// Sets the streams this node starts on demand (once; later calls are
    /// ignored).
    pub fn set_sources(&self, sources: Arc<dyn Sources>) {
        let _ = self.sources.set(sources);
    }

    /// Publishes `name`. A live stream of that name is taken over: its
    /// viewers stay and continue with the new publisher's frames; tracks
    /// whose codec changed are replaced (their readers end).
    pub fn publish(
        self: &Arc<Self>,
        name: &str,
        catalog: Catalog,
        protocol: &str,
    ) -> Result<Publisher> {
        self.publish_as(name, catalog, protocol, false)
    }

    /// [`Registry::publish`] for a relay link feeding this node another
    /// node's stream: `protocol` is how it reached that node, and the
    /// stream is marked relayed ([`StreamStats::relayed`]), so a drain does
    /// not wait for it and events report its publishes once, where they
    /// happen.
    pub fn publish_relayed(
        self: &Arc<Self>,
        name: &str,
        catalog: Catalog,
        protocol: &str,
    ) -> Result<Publisher> {
        self.publish_as(name, catalog, protocol, true)
    }

    fn publish_as(
        self: &Arc<Self>,
        name: &str,
        catalog: Catalog,
        protocol: &str,
        relayed: bool,
    ) -> Result<Publisher> {
        if !valid_stream_name(name) {
            return Err(Error::BadStreamName);
        }
        let mut streams = lock(&self.streams);
        let (entry, fresh) = match streams.get(name) {
            Some(e) => (e.clone(), false),
            None => {
                let e = Arc::new(Entry {
                    name: name.to_string(),
                    catalog: watch::channel(Catalog::default()).0,
                    tracks: Mutex::new(HashMap::new()),
                    generation: watch::channel(0).0,
                    protocol: Mutex::new(String::new()),
                    relayed: std::sync::atomic::AtomicBool::new(false),
                    started: Instant::now(),
                    viewers: AtomicUsize::new(0),
                    relays: AtomicUsize::new(0),
                    live: watch::channel(true).0,
                    rate: Mutex::new(RateWindow {
                        at: Instant::now(),
                        bytes: 0,
                        bps: 0,
                    }),
                    track_rates: Mutex::new(HashMap::new()),
                });
                streams.insert(name.to_string(), e.clone());
                (e, true)
            }
        };
        let mut generation = 0;
        entry.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        *lock(&entry.protocol) = protocol.to_string();
        entry.relayed.store(relayed, Ordering::Relaxed);
        let producers = install_tracks(&entry, &catalog);
        entry.catalog.send_replace(catalog);
        entry.live.send_replace(true);
        drop(streams);
        if fresh {
            let _ = self.announce.send(name.to_string());
        } else {
            tracing::info!(stream = name, protocol, "publisher takeover");
        }
        Ok(Publisher {
            registry: self.clone(),
            entry,
            generation,
            producers,
        })
    }

    /// A subscriber of `name`, fetching it from upstream when not local.
    /// Counts as a viewer in [`Registry::list`].
    pub async fn subscribe(self: &Arc<Self>, name: &str) -> Result<Subscriber> {
        self.subscribe_inner(name, true).await
    }

    /// Like [`Registry::subscribe`] but not counted as a viewer: for relay
    /// links forwarding the stream to another node.
    pub async fn subscribe_relay(self: &Arc<Self>, name: &str) -> Result<Subscriber> {
        self.subscribe_inner(name, false).await
    }

    async fn subscribe_inner(self: &Arc<Self>, name: &str, viewer: bool) -> Result<Subscriber> {
        if !valid_stream_name(name) {
            return Err(Error::BadStreamName);
        }
        if let Some(s) = self.local(name, viewer) {
            return Ok(s);
        }
        if let Some(start) = self.sources.get().and_then(|s| s.start(name)) {
            start.await?;
            return self.local(name, viewer).ok_or(Error::NotLive);
        }
        let upstream = self.upstream.get().cloned().ok_or(Error::NotLive)?;
        upstream.fetch(self.clone(), name.to_string()).await?;
        self.local(name, viewer).ok_or(Error::NotLive)
    }

    /// A subscriber of a stream that is live on this node, without fetching.
    pub fn subscribe_local(&self, name: &str) -> Option<Subscriber> {
        self.local(name, true)
    }

    fn local(&self, name: &str, viewer: bool) -> Option<Subscriber> {
        let entry = lock(&self.streams).get(name).cloned()?;
        if !*entry.live.borrow() {
            return None;
        }
        entry.counter(viewer).fetch_add(1, Ordering::Relaxed);
        Some(Subscriber { entry, viewer })
    }

    /// True when `name` is live on this node.
    pub fn is_live(&self, name: &str) -> bool {
        lock(&self.streams)
            .get(name)
            .is_some_and(|e| *e.live.borrow())
    }

    /// Viewers of `name` on this node (0 when unknown).
    pub fn viewers(&self, name: &str) -> usize {
        lock(&self.streams)
            .get(name)
            .map_or(0, |e| e.viewers.load(Ordering::Relaxed))
    }

    /// Readers of `name` on this node: viewers plus relay subscribers (other
    /// nodes fed from this one). An edge keeps an upstream subscription while
    /// this is non-zero.
    pub fn subscribers(&self, name: &str) -> usize {
        lock(&self.streams).get(name).map_or(0, |e| {
            e.viewers.load(Ordering::Relaxed) + e.relays.load(Ordering::Relaxed)
        })
    }

    /// Names of the live streams.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.streams).keys().cloned().collect();
        v.sort();
        v
    }

    /// New streams as they are published (not takeovers).
    pub fn announcements(&self) -> broadcast::Receiver<String> {
        self.announce.subscribe()
    }

    /// Figures for every live stream, for `/api/streams`.
    pub fn list(&self) -> Vec<StreamStats> {
        let entries: Vec<Arc<Entry>> = lock(&self.streams).values().cloned().collect();
        let mut out: Vec<StreamStats> = entries.iter().map(|e| stats(e)).collect();
        out.sort_by(|a, b| a.stream.cmp(&b.stream));
        out
    }
}

fn install_tracks(entry: &Entry, catalog: &Catalog) -> Vec<Producer> {
    let mut tracks = lock(&entry.tracks);
    let mut producers = Vec::with_capacity(catalog.tracks.len());
    let mut keep = HashMap::new();
    for info in &catalog.tracks {
        let producer = match tracks.remove(&info.name) {
            Some(t) if t.info().codec == info.codec && t.is_open() => {
                let p = t.take_over(info.clone());
                keep.insert(info.name.clone(), t);
                p
            }
            _ => {
                let (t, p) = Track::new(info.clone());
                keep.insert(info.name.clone(), t);
                p
            }
        };
        producers.push(producer);
    }
    *tracks = keep;
    producers
}

/// Bits per second since the window's last reading.
fn rate(w: &mut RateWindow, bytes: u64, started: Instant) -> u64 {
    let dt = w.at.elapsed().as_secs_f64();
    // Recompute at most every second; between calls report the last rate
    // so quick successive polls do not read noise.
    if dt >= 1.0 {
        w.bps = ((bytes.saturating_sub(w.bytes)) as f64 * 8.0 / dt) as u64;
        w.at = Instant::now();
        w.bytes = bytes;
    } else if w.bps == 0 && started.elapsed().as_secs_f64() > 0.0 {
        w.bps = (bytes as f64 * 8.0 / started.elapsed().as_secs_f64().max(1.0)) as u64;
    }
    w.bps
}

fn stats(e: &Entry) -> StreamStats {
    let catalog = e.catalog.borrow().clone();
    let bytes = e.total_bytes();
    let bps = rate(&mut lock(&e.rate), bytes, e.started);
    let renditions = {
        let tracks = lock(&e.tracks);
        let mut rates = lock(&e.track_rates);
        catalog
            .renditions()
            .filter_map(|info| {
                let r = info.rendition.as_ref()?;
                let t = tracks.get(&info.name)?;
                let w = rates.entry(info.name.clone()).or_insert(RateWindow {
                    at: e.started,
                    bytes: 0,
                    bps: 0,
                });
                Some(RenditionStats {
                    name: r.name.clone(),
                    track: info.name.clone(),
                    width: r.width,
                    height: r.height,
                    framerate: r.framerate,
                    bitrate_bps: rate(w, t.totals().1, e.started),
                    viewers: t.watchers(),
                })
            })
            .collect()
    };
    StreamStats {
        renditions,
        stream: e.name.clone(),
        protocol: lock(&e.protocol).clone(),
        codecs: catalog.tracks.iter().map(|t| t.codec.to_string()).collect(),
        bframes: catalog.tracks.iter().any(|t| t.bframes),
        bitrate_bps: bps,
        viewers: e.viewers.load(Ordering::Relaxed),
        uptime_s: e.started.elapsed().as_secs(),
        relayed: e.relayed.load(Ordering::Relaxed),
    }
}

/// One row of `/api/streams`.
#[derive(Clone, Debug, Serialize)]
pub struct StreamStats {
    /// Stream name.
    pub stream: String,
    /// How the publisher reached cascade: `whip`, `rtmp`, `rtsp`, `relay`.
    pub protocol: String,
    /// Codec names of the tracks.
    pub codecs: Vec<String>,
    /// True when the video carries B-frames.
    pub bframes: bool,
    /// Incoming bitrate, bits per second.
    pub bitrate_bps: u64,
    /// Viewers on this node.
    pub viewers: usize,
    /// Seconds since the stream went live.
    pub uptime_s: u64,
    /// True when another node publishes it and a relay link feeds it here
    /// (an edge's streams, an origin's streams from its ingests).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relayed: bool,
    /// The video renditions (empty for a stream with one video track).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<RenditionStats>,
}

/// One rendition in `/api/streams`.
#[derive(Clone, Debug, Serialize)]
pub struct RenditionStats {
    /// The rendition's name (simulcast rid or ladder step).
    pub name: String,
    /// Its video track.
    pub track: String,
    /// Picture width, 0 when unknown.
    pub width: u32,
    /// Picture height, 0 when unknown.
    pub height: u32,
    /// Frames per second, 0 when unknown.
    pub framerate: u32,
    /// Incoming bitrate of this rendition, bits per second.
    pub bitrate_bps: u64,
    /// Viewers on this node watching this rendition now.
    pub viewers: usize,
}

/// The publisher of a stream: holds one producer per track.
pub struct Publisher {
    registry: Arc<Registry>,
    entry: Arc<Entry>,
    generation: u64,
    producers: Vec<Producer>,
}

impl Publisher {
    /// The stream name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The producer of a track by name.
    pub fn track(&self, name: &str) -> Option<&Producer> {
        self.producers.iter().find(|p| p.info().name == name)
    }

    /// The producer of a track by name, mutable (to await keyframe requests).
    pub fn track_mut(&mut self, name: &str) -> Option<&mut Producer> {
        self.producers.iter_mut().find(|p| p.info().name == name)
    }

    /// All producers, in catalog order.
    pub fn tracks_mut(&mut self) -> &mut [Producer] {
        &mut self.producers
    }

    /// Replaces the catalog (parameter sets changed, a track appeared).
    /// Tracks whose codec is unchanged keep their readers.
    pub fn set_catalog(&mut self, catalog: Catalog) {
        if !self.is_current() {
            return;
        }
        let mut tracks = lock(&self.entry.tracks);
        let mut producers = Vec::new();
        for info in &catalog.tracks {
            let existing = self
                .producers
                .iter()
                .position(|p| p.info().name == info.name && p.info().codec == info.codec);
            match existing {
                Some(i) => {
                    let p = self.producers.swap_remove(i);
                    p.set_info(info.clone());
                    producers.push(p);
                }
                None => {
                    let (t, p) = Track::new(info.clone());
                    tracks.insert(info.name.clone(), t);
                    producers.push(p);
                }
            }
        }
        tracks.retain(|n, _| catalog.by_name(n).is_some());
        drop(tracks);
        // Producers left over belong to dropped tracks: dropping closes them.
        self.producers = producers;
        self.entry.catalog.send_replace(catalog);
    }

    /// The current catalog.
    pub fn catalog(&self) -> Catalog {
        self.entry.catalog.borrow().clone()
    }

    /// True while no newer publisher took the stream over.
    pub fn is_current(&self) -> bool {
        *self.entry.generation.borrow() == self.generation
    }

    /// Resolves when a newer publisher takes the stream over.
    pub async fn superseded(&self) {
        let mut rx = self.entry.generation.subscribe();
        loop {
            if *rx.borrow_and_update() != self.generation {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if !self.is_current() {
            return;
        }
        // Producers close their tracks as they drop; the stream leaves the
        // registry so a WHEP offer for it gets 404 until someone publishes.
        self.producers.clear();
        self.entry.live.send_replace(false);
        let mut streams = lock(&self.registry.streams);
        if streams
            .get(&self.entry.name)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            streams.remove(&self.entry.name);
        }
        tracing::debug!(stream = %self.entry.name, "stream ended");
    }
}

/// A reader of a stream: its catalog and consumers of its tracks.
pub struct Subscriber {
    entry: Arc<Entry>,
    viewer: bool,
}

impl Subscriber {
    /// The stream name.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The current catalog.
    pub fn catalog(&self) -> Catalog {
        self.entry.catalog.borrow().clone()
    }

    /// How the stream reached cascade (`whip`, `rtmp`, ...), as published.
    pub fn protocol(&self) -> String {
        lock(&self.entry.protocol).clone()
    }

    /// Watches catalog changes.
    pub fn catalog_watch(&self) -> watch::Receiver<Catalog> {
        self.entry.catalog.subscribe()
    }

    /// A consumer of the named track, starting at the current group.
    pub fn track(&self, name: &str) -> Option<Consumer> {
        lock(&self.entry.tracks).get(name).map(Track::consume)
    }

    /// True while the stream has a publisher.
    pub fn is_live(&self) -> bool {
        *self.entry.live.borrow()
    }

    /// `ingest_us` of the named track's last frame (0 before the first);
    /// `None` for an unknown track.
    pub fn last_ingest_us(&self, track: &str) -> Option<u64> {
        lock(&self.entry.tracks)
            .get(track)
            .map(Track::last_ingest_us)
    }

    /// Frames and bytes the named track received on this node so far
    /// (on an edge: what the relay delivered; a rendition nobody here
    /// reads is held back upstream and stops counting).
    pub fn track_totals(&self, track: &str) -> Option<(u64, u64)> {
        lock(&self.entry.tracks).get(track).map(Track::totals)
    }

    /// Counts a viewer of the named track (a rendition) until the guard
    /// drops: `/api/streams` lists viewers per rendition.
    pub fn watch(&self, track: &str) -> Option<crate::track::Watch> {
        lock(&self.entry.tracks).get(track).map(Track::watch)
    }

    /// Resolves when the stream's publisher leaves for good.
    pub async fn ended(&self) {
        let mut rx = self.entry.live.subscribe();
        while *rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Clone for Subscriber {
    fn clone(&self) -> Self {
        self.entry
            .counter(self.viewer)
            .fetch_add(1, Ordering::Relaxed);
        Self {
            entry: self.entry.clone(),
            viewer: self.viewer,
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.entry
            .counter(self.viewer)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::catalog::{Codec, TrackInfo};
    use crate::model::frame::Frame;
    use bytes::Bytes;

    fn catalog(codec: Codec) -> Catalog {
        Catalog {
            tracks: vec![TrackInfo {
                name: "video".into(),
                codec,
                fmtp: String::new(),
                channels: None,
                bframes: false,
                rendition: None,
            }],
        }
    }

    fn frame(pts: u64, keyframe: bool) -> Frame {
        Frame {
            payload: Bytes::from_static(b"x"),
            pts,
            dts: pts,
            keyframe,
            ingest_us: 0,
        }
    }

    #[tokio::test]
    async fn publish_subscribe_end() {
        let r = Registry::new();
        assert!(matches!(r.subscribe("s").await, Err(Error::NotLive)));
        assert!(matches!(
            r.publish("bad name", catalog(Codec::H264), "whip"),
            Err(Error::BadStreamName)
        ));
        let p = r.publish("s", catalog(Codec::H264), "whip").unwrap();
        let s = r.subscribe("s").await.unwrap();
        assert_eq!(r.viewers("s"), 1);
        let mut c = s.track("video").unwrap();
        p.track("video").unwrap().write(frame(1, true)).unwrap();
        assert_eq!(c.next().await.unwrap().pts, 1);
        assert_eq!(r.list()[0].codecs, vec!["H264"]);
        drop(p);
        assert!(c.next().await.is_err());
        assert!(!r.is_live("s"));
        s.ended().await;
        drop(s);
        assert!(r.names().is_empty());
    }

    #[tokio::test]
    async fn takeover_keeps_viewers() {
        let r = Registry::new();
        let p1 = r.publish("s", catalog(Codec::H264), "rtmp").unwrap();
        p1.track("video").unwrap().write(frame(1, true)).unwrap();
        let s = r.subscribe("s").await.unwrap();
        let mut c = s.track("video").unwrap();
        assert_eq!(c.next().await.unwrap().pts, 1);
        let p2 = r.publish("s", catalog(Codec::H264), "rtmp").unwrap();
        p1.superseded().await;
        assert!(!p1.is_current());
        drop(p1); // must not end the stream
        assert!(r.is_live("s"));
        p2.track("video").unwrap().write(frame(500, true)).unwrap();
        assert_eq!(c.next().await.unwrap().pts, 500);
    }

    #[tokio::test]
    async fn takeover_with_new_codec_replaces_track() {
        let r = Registry::new();
        let p1 = r.publish("s", catalog(Codec::H264), "whip").unwrap();
        let s = r.subscribe("s").await.unwrap();
        let mut c = s.track("video").unwrap();
        let _p2 = r.publish("s", catalog(Codec::Vp8), "whip").unwrap();
        drop(p1);
        assert!(c.next().await.is_err());
        assert_eq!(s.catalog().tracks[0].codec, Codec::Vp8);
    }

    #[tokio::test]
    async fn relay_readers_count_as_subscribers_not_viewers() {
        let r = Registry::new();
        let _p = r.publish("s", catalog(Codec::H264), "whip").unwrap();
        let relay = r.subscribe_relay("s").await.unwrap();
        let relay2 = relay.clone();
        assert_eq!((r.viewers("s"), r.subscribers("s")), (0, 2));
        let viewer = r.subscribe("s").await.unwrap();
        assert_eq!((r.viewers("s"), r.subscribers("s")), (1, 3));
        assert_eq!(viewer.protocol(), "whip");
        drop((relay, relay2, viewer));
        assert_eq!((r.viewers("s"), r.subscribers("s")), (0, 0));
    }

    struct FakeUpstream;
    impl Upstream for FakeUpstream {
        fn fetch(
            &self,
            registry: Arc<Registry>,
            name: String,
        ) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> {
            Box::pin(async move {
                if name == "remote" {
                    let p = registry.publish(&name, catalog(Codec::H264), "relay")?;
                    // Leak on purpose for the test: keeps the stream live.
                    std::mem::forget(p);
                    Ok(())
                } else {
                    Err(Error::NotLive)
                }
            })
        }
    }

    struct FakeSources;
    impl Sources for FakeSources {
        fn start(&self, name: &str) -> Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>> {
            (name == "cam").then(|| {
                Box::pin(async { Err(Error::NotLive) })
                    as Pin<Box<dyn Future<Output = Result<()>> + Send>>
            })
        }
    }

    #[tokio::test]
    async fn sources_are_asked_before_the_upstream() {
        let r = Registry::new();
        r.set_upstream(Arc::new(FakeUpstream));
        r.set_sources(Arc::new(FakeSources));
        // A source that fails does not fall through to the upstream.
        assert!(matches!(r.subscribe("cam").await, Err(Error::NotLive)));
        assert!(r.subscribe("remote").await.is_ok());
        // A live source is a local hit: not asked.
        let _p = r.publish("cam", catalog(Codec::H264), "rtsp").unwrap();
        assert!(r.subscribe("cam").await.is_ok());
    }

    #[tokio::test]
    async fn upstream_fetch_on_miss() {
        let r = Registry::new();
        r.set_upstream(Arc::new(FakeUpstream));
        assert!(r.subscribe("remote").await.is_ok());
        assert!(matches!(r.subscribe("other").await, Err(Error::NotLive)));
    }
}
