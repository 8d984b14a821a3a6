//! How signalling reaches a live viewer's rendition choice: the WHEP layer
//! endpoint and OvenPlayer's `change_rendition` set a [`Target`] on the
//! viewer's [`Control`] and wake its shard; the viewer takes it on its next
//! wake (one atomic load per wake) and reports the rendition it sends
//! through a `watch` channel (OvenPlayer's `rendition_changed`, the player's
//! stats). Only viewers of streams with renditions have one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cascade_rtc::session::SessionId;
use cascade_rtc::Waker;
use tokio::sync::watch;

use super::switch::{Rung, Target};

/// What a viewer gets now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The rendition being sent; `None` while audio only (or before the
    /// first frame).
    pub rendition: Option<String>,
    /// What the viewer asked for.
    pub target: Target,
}

/// The signalling side of one viewer's rendition choice.
pub struct Control {
    /// Changes when a rendition is added (a late simulcast layer).
    renditions: Mutex<Vec<Rung>>,
    request: Mutex<Option<Target>>,
    changed: AtomicBool,
    status: watch::Sender<Status>,
    waker: Waker,
    /// Last explicit wake: a client flooding requests (OvenPlayer's
    /// `change_rendition` has no other limit) must not turn each into a
    /// wake of every session on the shard. Media wakes the shard every
    /// frame anyway; the explicit wake only matters while nothing flows.
    woken: Mutex<Option<Instant>>,
    /// Open server-sent event streams of this viewer (WHEP `/sse`).
    event_streams: Arc<AtomicUsize>,
}

/// At most this many event streams per viewer: a player needs one; each
/// is a connection held open for the session's life.
pub const MAX_EVENT_STREAMS: usize = 2;

/// One open event stream of a viewer, counted until dropped. It holds no
/// reference to the [`Control`], so the stream ends with its viewer.
pub struct EventStream {
    count: Arc<AtomicUsize>,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most one explicit wake per viewer per this interval.
const WAKE_INTERVAL: Duration = Duration::from_millis(100);

impl Control {
    /// A control for a viewer of `renditions` (best first) on the shard
    /// `waker` wakes; it starts on rendition `first` in Auto mode.
    pub fn new(renditions: Vec<Rung>, first: Option<String>, waker: Waker) -> Arc<Self> {
        Arc::new(Self {
            renditions: Mutex::new(renditions),
            request: Mutex::new(None),
            changed: AtomicBool::new(false),
            status: watch::channel(Status {
                rendition: first,
                target: Target::Auto,
            })
            .0,
            waker,
            woken: Mutex::new(None),
            event_streams: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Counts a new event stream; `None` past [`MAX_EVENT_STREAMS`].
    pub fn open_events(&self) -> Option<EventStream> {
        let count = self.event_streams.clone();
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_EVENT_STREAMS).then_some(n + 1)
            })
            .ok()?;
        Some(EventStream { count })
    }

    /// The renditions, best first.
    pub fn renditions(&self) -> Vec<Rung> {
        self.renditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The viewer's side: the ladder changed.
    pub(crate) fn set_renditions(&self, renditions: Vec<Rung>) {
        *self.renditions.lock().unwrap_or_else(|e| e.into_inner()) = renditions;
    }

    fn lock(&self) -> MutexGuard<'_, Option<Target>> {
        self.request.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the viewer for `target`; `Err` names the problem (an unknown
    /// rendition).
    pub fn set(&self, target: Target) -> Result<(), String> {
        if let Target::Fixed(name) = &target {
            let renditions = self.renditions();
            if !renditions.iter().any(|r| &r.name == name) {
                let known: Vec<&str> = renditions.iter().map(|r| r.name.as_str()).collect();
                return Err(format!(
                    "unknown rendition {name:?}: this stream has {} (or auto)",
                    known.join(", ")
                ));
            }
        }
        *self.lock() = Some(target);
        self.changed.store(true, Ordering::Release);
        let now = Instant::now();
        let mut woken = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        if woken.is_none_or(|t| now.saturating_duration_since(t) >= WAKE_INTERVAL) {
            *woken = Some(now);
            self.waker.wake();
        }
        Ok(())
    }

    /// The target set since the last call (the viewer's side).
    pub(crate) fn take(&self) -> Option<Target> {
        if !self.changed.swap(false, Ordering::Acquire) {
            return None;
        }
        self.lock().take()
    }

    /// The viewer's side: what it sends now.
    pub(crate) fn report(&self, status: Status) {
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    /// What the viewer gets now, and its changes.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }
}

/// The controls of this node's viewers by session, for the layer endpoint.
/// Bounded by the viewer limit: an entry lives as long as its viewer.
#[derive(Default)]
pub struct Controls {
    map: Mutex<HashMap<SessionId, Arc<Control>>>,
}

impl Controls {
    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Control>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `control` for session `id` until the guard drops.
    pub fn insert(self: &Arc<Self>, id: SessionId, control: Arc<Control>) -> Registered {
        self.lock().insert(id, control);
        Registered {
            controls: self.clone(),
            id,
        }
    }

    /// The control of session `id`.
    pub fn get(&self, id: SessionId) -> Option<Arc<Control>> {
        self.lock().get(&id).cloned()
    }
}

/// Keeps a control reachable while its viewer lives.
pub struct Registered {
    controls: Arc<Controls>,
    id: SessionId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.controls.lock().remove(&self.id);
    }
}
