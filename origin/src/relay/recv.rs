//! Receiving a stream from the peer into a local publisher: a reader task
//! per group stream, and one task per stream that owns the publisher,
//! writes frames in group order, applies catalog updates and sends local
//! keyframe requests back. Dropping the handle ends the local stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tracing::Instrument;

use super::link::Report;
use super::order::Order;
use super::select::{self, Selection};
use super::session::Event;
use super::wire::{self, Heard, MAX_GROUP_BYTES};
use super::{code, AbortOnDrop};
use crate::metrics::{RELAY_FRAMES_DROPPED, RELAY_FRAMES_RECEIVED, RELAY_RENDITIONS_HELD};
use crate::model::catalog::Catalog;
use crate::model::frame::Frame;
use crate::registry::{Publisher, Registry};
use crate::Error;

/// Frames from all group readers of one stream waiting for its task:
/// ~4 s of 60 fps video. Full means the local fan-out stalls; readers then
/// wait and QUIC flow control slows the peer, whose groups get reset.
const MEDIA_QUEUE: usize = 256;
/// A group stream must name its group within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A group may arrive before the control message that announces its
/// stream (streams are not ordered with each other): wait this long.
const ROUTE_WAIT: Duration = Duration::from_secs(2);
/// Least time between two keyframe requests for one track sent upstream:
/// about what an encoder needs to answer one.
const KEYFRAME_SPACING: Duration = Duration::from_millis(500);
/// How often the stream task checks for takeover and idleness.
const TICK: Duration = Duration::from_millis(500);

/// What group readers pass to their stream task.
pub(crate) enum Media {
    /// A frame of a group.
    Frame {
        track: Arc<str>,
        group: u64,
        prev: u64,
        frame: Frame,
    },
    /// The group's stream ended (finished, reset or failed).
    End {
        track: Arc<str>,
        group: u64,
        prev: u64,
    },
}

/// Which local stream task each publication or subscription id feeds.
#[derive(Default)]
pub(crate) struct Routes {
    map: Mutex<HashMap<u64, mpsc::Sender<Media>>>,
    added: Notify,
}

impl Routes {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, mpsc::Sender<Media>>> {
        // Poison means a panic elsewhere mid-insert; the map stays usable.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: u64, tx: mpsc::Sender<Media>) {
        self.lock().insert(id, tx);
        self.added.notify_waiters();
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    async fn wait(&self, id: u64, within: Duration) -> Option<mpsc::Sender<Media>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            // Register before looking so an insert in between wakes us.
            added.as_mut().enable();
            if let Some(tx) = self.lock().get(&id) {
                return Some(tx.clone());
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return None;
            }
        }
    }
}

/// Spaces the keyframe requests sent upstream: at most one per track per
/// `KEYFRAME_SPACING`. One inside the window is deferred to its end, not
/// dropped, so a request is never lost, but many readers joining or lagging
/// at once cost the publisher one keyframe, not a storm of them.
#[derive(Default)]
struct Throttle {
    last: HashMap<String, Instant>,
    due: HashMap<String, Instant>,
}

impl Throttle {
    /// A request for `track`: returns it when it may go now.
    fn request(&mut self, track: String, now: Instant) -> Option<String> {
        match self.last.get(&track) {
            Some(&t) if now < t + KEYFRAME_SPACING => {
                self.due.entry(track).or_insert(t + KEYFRAME_SPACING);
                None
            }
            _ => {
                self.last.insert(track.clone(), now);
                Some(track)
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// Deferred requests whose time has come.
    fn poll(&mut self, now: Instant) -> Vec<String> {
        let ready: Vec<String> = self
            .due
            .iter()
            .filter(|(_, &at)| at <= now)
            .map(|(track, _)| track.clone())
            .collect();
        for track in &ready {
            self.due.remove(track);
            self.last.insert(track.clone(), now);
        }
        ready
    }
}

/// Sleeps until `at`; pending forever without a deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What a stream task needs to stop when nobody reads the stream.
pub(crate) struct Linger {
    pub(crate) registry: Arc<Registry>,
    pub(crate) name: String,
    pub(crate) grace: Duration,
}

/// The handle of a stream being received; dropping it ends the local stream.
pub(crate) struct Incoming {
    id: u64,
    catalog: watch::Sender<Catalog>,
    heard: watch::Sender<Vec<Heard>>,
    routes: Arc<Routes>,
    _task: AbortOnDrop,
}

impl Incoming {
    /// Starts feeding `publisher` from the groups of `id`.
    pub(crate) fn spawn(
        id: u64,
        publisher: Publisher,
        routes: Arc<Routes>,
        events: mpsc::Sender<Event>,
        linger: Option<Linger>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(MEDIA_QUEUE);
        routes.insert(id, tx);
        let (catalog, catalog_rx) = watch::channel(publisher.catalog());
        let (heard, heard_rx) = watch::channel(Vec::new());
        let span = tracing::info_span!("stream", stream = %publisher.name(), id);
        let inputs = Inputs {
            media: rx,
            catalog: catalog_rx,
            heard: heard_rx,
        };
        let task = tokio::spawn(run(id, publisher, inputs, events, linger).instrument(span));
        Self {
            id,
            catalog,
            heard,
            routes,
            _task: AbortOnDrop(task),
        }
    }

    /// Applies a catalog update from the peer.
    pub(crate) fn set_catalog(&self, catalog: Catalog) {
        self.catalog.send_replace(catalog);
    }

    /// Renditions the peer holds back still flow at the source.
    pub(crate) fn heard(&self, tracks: Vec<Heard>) {
        self.heard.send_replace(tracks);
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.routes.remove(self.id);
    }
}

fn track_index(publisher: &mut Publisher) -> HashMap<String, usize> {
    publisher
        .tracks_mut()
        .iter()
        .enumerate()
        .map(|(i, p)| (p.info().name, i))
        .collect()
}

/// Resolves with the name of a track a local reader wants a keyframe of.
async fn keyframe_wanted(publisher: &mut Publisher) -> String {
    let waits = publisher.tracks_mut().iter_mut().map(|p| {
        Box::pin(async move {
            p.keyframe_requested().await;
            p.info().name
        })
    });
    let waits: Vec<_> = waits.collect();
    if waits.is_empty() {
        std::future::pending::<()>().await;
    }
    futures::future::select_all(waits).await.0
}

/// What a stream task hears besides its events channel.
struct Inputs {
    media: mpsc::Receiver<Media>,
    catalog: watch::Receiver<Catalog>,
    heard: watch::Receiver<Vec<Heard>>,
}

/// Keeps `RELAY_RENDITIONS_HELD` true however the stream task ends.
struct HeldGauge(usize);

impl HeldGauge {
    fn set(&mut self, n: usize) {
        let g = metrics::gauge!(RELAY_RENDITIONS_HELD);
        g.increment(n as f64);
        g.decrement(self.0 as f64);
        self.0 = n;
    }
}

impl Drop for HeldGauge {
    fn drop(&mut self) {
        self.set(0);
    }
}

fn has_renditions(publisher: &Publisher) -> bool {
    publisher.catalog().renditions().count() > 1
}

/// The per-rendition subscription: which renditions local readers read,
/// told upstream when it changes; a rendition no longer received forgets
/// its cached group (new readers wait for the frames that come once it is
/// selected again, not a stale picture).
async fn select_renditions(
    id: u64,
    publisher: &mut Publisher,
    selection: &mut Selection,
    gauge: &mut HeldGauge,
    events: &mpsc::Sender<Event>,
) {
    let tracks: Vec<(String, bool, usize)> = publisher
        .tracks_mut()
        .iter()
        .map(|p| {
            let info = p.info();
            (info.name, info.rendition.is_some(), p.readers())
        })
        .collect();
    let change = selection.update(
        Instant::now(),
        tracks.iter().map(|(n, r, c)| (n.as_str(), *r, *c)),
    );
    let Some(change) = change else {
        return;
    };
    for p in publisher.tracks_mut() {
        if change.dropped.contains(&p.info().name) {
            p.forget_group();
        }
    }
    gauge.set(selection.held());
    tracing::debug!(select = ?change.select, dropped = ?change.dropped, "renditions selected upstream");
    let _ = events
        .send(
            Report::Select {
                id,
                tracks: change.select,
            }
            .into(),
        )
        .await;
}

async fn run(
    id: u64,
    mut publisher: Publisher,
    inputs: Inputs,
    events: mpsc::Sender<Event>,
    linger: Option<Linger>,
) {
    let Inputs {
        mut media,
        mut catalog,
        mut heard,
    } = inputs;
    // Only our own subscriptions (a fetched stream, `linger`) select
    // renditions: a peer publishing to us sends all of them, since other
    // nodes fetch from here.
    let mut selecting = linger.is_some() && has_renditions(&publisher);
    let mut selection = Selection::new();
    let mut held_gauge = HeldGauge(0);
    let mut select_tick = tokio::time::interval(select::TICK);
    select_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut index = track_index(&mut publisher);
    let mut orders: HashMap<Arc<str>, Order> = HashMap::new();
    let mut throttle = Throttle::default();
    let mut ready: Vec<(Arc<str>, Frame)> = Vec::new();
    let mut out: Vec<Frame> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    let mut idle_since: Option<Instant> = None;
    loop {
        let deadline = orders
            .values()
            .filter_map(Order::deadline)
            .chain(throttle.deadline())
            .min();
        tokio::select! {
            m = media.recv() => {
                let Some(m) = m else { break };
                let now = Instant::now();
                let (track, dropped) = match m {
                    Media::Frame { track, group, prev, frame } => {
                        metrics::counter!(RELAY_FRAMES_RECEIVED).increment(1);
                        let order = orders.entry(track.clone()).or_default();
                        (track, order.frame(group, prev, frame, now, &mut out))
                    }
                    Media::End { track, group, prev } => {
                        if let Some(order) = orders.get_mut(&track) {
                            order.end(group, prev, now, &mut out);
                        }
                        (track, 0)
                    }
                };
                if dropped > 0 {
                    metrics::counter!(RELAY_FRAMES_DROPPED).increment(1);
                }
                ready.extend(out.drain(..).map(|f| (track.clone(), f)));
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                let now = Instant::now();
                for (track, order) in orders.iter_mut() {
                    if order.expire(now, &mut out) {
                        tracing::debug!(%track, "group abandoned: the next one waited too long");
                        ready.extend(out.drain(..).map(|f| (track.clone(), f)));
                    }
                }
                for track in throttle.poll(now) {
                    let _ = events.send(Report::Keyframe { id, track }.into()).await;
                }
            }
            changed = catalog.changed() => {
                if changed.is_err() {
                    break;
                }
                let c = catalog.borrow_and_update().clone();
                let before = publisher.catalog();
                publisher.set_catalog(c.clone());
                index = track_index(&mut publisher);
                selecting = linger.is_some() && has_renditions(&publisher);
                // A replaced track (new codec) starts empty and its first
                // keyframe may have raced ahead into the old one: ask again.
                for t in &c.tracks {
                    if before.by_name(&t.name).is_none_or(|b| b.codec != t.codec) {
                        if let Some(track) = throttle.request(t.name.clone(), Instant::now()) {
                            let _ = events.send(Report::Keyframe { id, track }.into()).await;
                        }
                    }
                }
            }
            track = keyframe_wanted(&mut publisher) => {
                // Without a session (link lost, stream held for the grace
                // period) there is nobody to ask; the stream stays up.
                if let Some(track) = throttle.request(track, Instant::now()) {
                    let _ = events.send(Report::Keyframe { id, track }.into()).await;
                }
            }
            _ = select_tick.tick(), if selecting => {
                select_renditions(id, &mut publisher, &mut selection, &mut held_gauge, &events).await;
            }
            changed = heard.changed() => {
                if changed.is_err() {
                    break;
                }
                let tracks = heard.borrow_and_update().clone();
                for h in tracks {
                    if let Some(p) = index.get(&h.track).and_then(|&i| publisher.tracks_mut().get(i)) {
                        p.heard(h.ingest_us);
                    }
                }
            }
            _ = tick.tick() => {
                if !publisher.is_current() {
                    break;
                }
                if let Some(l) = &linger {
                    if l.registry.subscribers(&l.name) > 0 {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= l.grace {
                        tracing::debug!(stream = %l.name, "no readers left: unsubscribing");
                        drop(publisher);
                        let _ = events.send(Report::Idle { id }.into()).await;
                        return;
                    }
                }
            }
        }
        let mut superseded = false;
        for (track, frame) in ready.drain(..) {
            let producer = index
                .get(&*track)
                .and_then(|&i| publisher.tracks_mut().get(i));
            if producer.is_some_and(|p| p.write(frame).is_err()) {
                superseded = true;
            }
        }
        if superseded {
            // A newer publisher took the stream over.
            break;
        }
    }
    drop(publisher);
    let _ = events.send(Report::Gone { id }.into()).await;
}

/// Reads one group stream and feeds its frames to the stream it names.
/// Garbage closes the connection; a reset group just ends.
pub(crate) async fn read_group(
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    routes: Arc<Routes>,
) {
    let header =
        match tokio::time::timeout(HEADER_TIMEOUT, wire::read_group_header(&mut recv)).await {
            Ok(Ok(h)) => h,
            Ok(Err(Error::Protocol(reason))) => {
                tracing::debug!(%reason, "bad group header from peer");
                conn.close(code::PROTOCOL, b"bad group header");
                return;
            }
            _ => return,
        };
    let Some(tx) = routes.wait(header.id, ROUTE_WAIT).await else {
        let _ = recv.stop(code::UNKNOWN);
        return;
    };
    let track: Arc<str> = header.track.into();
    let (group, prev) = (header.group, header.prev);
    read_frames(&conn, &mut recv, &tx, &track, (group, prev)).await;
    let _ = tx.send(Media::End { track, group, prev }).await;
}

async fn read_frames(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    tx: &mpsc::Sender<Media>,
    track: &Arc<str>,
    (group, prev): (u64, u64),
) {
    let mut bytes = 0usize;
    loop {
        match wire::read_frame(recv).await {
            Ok(Some(frame)) => {
                bytes = bytes.saturating_add(frame.payload.len());
                if bytes > MAX_GROUP_BYTES {
                    conn.close(code::PROTOCOL, b"group too large");
                    return;
                }
                let m = Media::Frame {
                    track: track.clone(),
                    group,
                    prev,
                    frame,
                };
                if tx.send(m).await.is_err() {
                    let _ = recv.stop(code::UNKNOWN);
                    return;
                }
            }
            Ok(None) => return,
            Err(Error::Protocol(reason)) => {
                tracing::debug!(%reason, "bad frame from peer");
                conn.close(code::PROTOCOL, b"bad frame");
                return;
            }
            // Reset (superseded group) or connection gone.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyframe_requests_are_spaced_not_lost() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert_eq!(t.request("video".into(), now).as_deref(), Some("video"));
        assert_eq!(t.request("video".into(), now + KEYFRAME_SPACING / 4), None);
        assert_eq!(t.request("video".into(), now + KEYFRAME_SPACING / 2), None);
        assert_eq!(t.request("audio".into(), now).as_deref(), Some("audio"));
        assert_eq!(t.deadline(), Some(now + KEYFRAME_SPACING));
        assert!(t.poll(now + KEYFRAME_SPACING / 2).is_empty());
        assert_eq!(t.poll(now + KEYFRAME_SPACING), vec!["video".to_string()]);
        assert_eq!(t.deadline(), None);
        assert_eq!(
            t.request("video".into(), now + KEYFRAME_SPACING * 3)
                .as_deref(),
            Some("video")
        );
    }

    #[tokio::test]
    async fn route_appearing_late_is_found() {
        let routes = Arc::new(Routes::default());
        let r = routes.clone();
        let waiter = tokio::spawn(async move { r.wait(7, Duration::from_secs(2)).await.is_some() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (tx, _rx) = mpsc::channel(1);
        routes.insert(7, tx);
        assert!(tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap());
        assert!(routes.wait(8, Duration::from_millis(10)).await.is_none());
    }
}
