//! RTSP pull: cascade connects to IP cameras (which cannot push WHIP or
//! RTMP) and publishes each as a normal stream, `Registry::publish(name,
//! catalog, "rtsp")`, so WHEP, the player page and OvenPlayer play it.
//!
//! - [`Pulls`]: the pulls of a node by stream name (from `[[pull]]` in the
//!   TOML file and `POST/DELETE /api/pulls`), their status for `GET
//!   /api/pulls`, and the registry's on-demand [`Sources`] hook.
//! - [`core`]: the sans-IO state machine (idle/connecting/live/error,
//!   backoff, step deadlines, stall detection, on-demand grace).
//! - `shell`: one task per pull running the core and a retina client.
//! - [`media`]: retina frames → registry frames (timeline, B-frame dts,
//!   AAC/G.711 → Opus through [`crate::audio`], Opus passed through).
//! - [`depacketize`]: our RTP depacketizers (H.264, H.265, Opus) for
//!   cameras with Opus audio, which retina cannot demux.
//! - `bframes`: B-frame cameras through the RTMP path's ffmpeg re-encode
//!   under `--bframes transcode`.
//!
//! Credentials in a URL are taken out before anything keeps or logs it:
//! retina gets them apart (Basic or Digest, as the camera asks), the API
//! and logs see the URL without them.

mod bframes;
pub mod core;
pub mod depacketize;
pub mod media;
mod shell;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cascade_origin::registry::Sources;
use cascade_origin::{valid_stream_name, Registry};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::transcode::Policy;

pub use self::core::State;

/// Pulls one node runs at most (file and API together).
pub const DEFAULT_MAX_PULLS: usize = 256;
/// Longest URL accepted.
const MAX_URL: usize = 2048;

/// How RTP reaches us from the camera.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Interleaved in the RTSP TCP connection: through NAT and firewalls,
    /// no loss. The default.
    #[default]
    Tcp,
    /// RTP/UDP: for LANs; retina drops reordered packets.
    Udp,
}

/// One pull as configured. Its `Debug` shows the URL without credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct PullConfig {
    /// The stream name it publishes.
    pub stream: String,
    /// `rtsp://[user:pass@]host[:port]/path`.
    pub url: String,
    /// Connect on the first viewer, disconnect `grace` after the last.
    pub on_demand: bool,
    /// RTP transport.
    pub transport: Transport,
    /// On demand: how long to stay connected after the last viewer left.
    pub grace: Duration,
}

impl std::fmt::Debug for PullConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url =
            split_url(&self.url).map_or_else(|_| "(invalid)".to_string(), |s| s.url.to_string());
        f.debug_struct("PullConfig")
            .field("stream", &self.stream)
            .field("url", &url)
            .field("on_demand", &self.on_demand)
            .field("transport", &self.transport)
            .field("grace", &self.grace)
            .finish()
    }
}

impl PullConfig {
    /// A pull with the defaults (TCP, 10 s grace).
    pub fn new(stream: &str, url: &str, on_demand: bool) -> Self {
        Self {
            stream: stream.into(),
            url: url.into(),
            on_demand,
            transport: Transport::Tcp,
            grace: core::DEFAULT_GRACE,
        }
    }
}

/// Why a pull was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// Not a valid stream name.
    #[error("bad stream name {0:?}: 1-64 characters A-Z a-z 0-9 _ -")]
    BadName(String),
    /// Not an `rtsp://` / `rtsps://` URL with a host.
    #[error("bad url for {0}: {1}")]
    BadUrl(String, String),
    /// A pull of that name exists.
    #[error("a pull for stream {0} exists already")]
    Duplicate(String),
    /// The node's pull limit is reached.
    #[error("at most {0} pulls")]
    TooMany(usize),
}

/// A URL split into what may be shown and what may not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitUrl {
    /// The URL without user and password: safe for logs and the API.
    pub url: url::Url,
    /// The credentials, if the URL had any.
    pub creds: Option<retina::client::Credentials>,
}

/// Parses an `rtsp://` or `rtsps://` URL and takes the credentials out.
/// (retina speaks plain `rtsp://` only: `rtsps://` is accepted here and
/// fails at connect with a clear error.)
pub fn split_url(raw: &str) -> Result<SplitUrl, String> {
    if raw.len() > MAX_URL {
        return Err(format!("longer than {MAX_URL} characters"));
    }
    let mut url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "rtsp" | "rtsps") {
        return Err("must start with rtsp:// or rtsps://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    let creds = if url.username().is_empty() && url.password().is_none() {
        None
    } else {
        Some(retina::client::Credentials {
            username: percent_decode(url.username()),
            password: percent_decode(url.password().unwrap_or("")),
        })
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(SplitUrl { url, creds })
}

/// `%XX` escapes of a URL's user or password (`p%40ss` is `p@ss`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied(), b.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(v as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One row of `GET /api/pulls`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PullInfo {
    /// The stream name.
    pub stream: String,
    /// The URL without user and password.
    pub url: String,
    /// Connects on demand.
    pub on_demand: bool,
    /// `idle`, `connecting`, `live` or `error`.
    pub state: &'static str,
    /// The last error, until the pull goes live again.
    pub error: Option<String>,
}

/// The live status of one pull, written by its task.
pub(crate) struct Status {
    state: watch::Sender<(State, Option<String>)>,
    /// A viewer asked for the stream (on demand).
    request: Notify,
}

impl Status {
    fn new() -> Self {
        Self {
            state: watch::channel((State::Idle, None)).0,
            request: Notify::new(),
        }
    }

    fn set(&self, state: State, error: Option<String>) {
        self.state.send_if_modified(|cur| {
            let changed = cur.0 != state || cur.1 != error;
            *cur = (state, error);
            changed
        });
    }

    fn state(&self) -> (State, Option<String>) {
        self.state.borrow().clone()
    }
}

struct Entry {
    config: PullConfig,
    shown_url: String,
    status: Arc<Status>,
    task: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The task owns the publisher and the connection: both go with it.
        self.task.abort();
    }
}

/// The pulls of one node.
pub struct Pulls {
    registry: Arc<Registry>,
    pulls: Mutex<HashMap<String, Entry>>,
    max: usize,
    /// False on an `ingest` node of a split cluster: the origin cannot ask
    /// it to start a pull, so on-demand pulls run always-on there.
    on_demand_allowed: bool,
    /// B-frame policy of pulls added from now on ([`Pulls::set_bframes`]).
    bframes: Mutex<Policy>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pulls {
    /// No pulls yet; at most `max`. Registers itself as the registry's
    /// on-demand [`Sources`] when on-demand is allowed.
    pub fn new(registry: Arc<Registry>, max: usize, on_demand_allowed: bool) -> Arc<Self> {
        let pulls = Arc::new(Self {
            registry: registry.clone(),
            pulls: Mutex::new(HashMap::new()),
            max,
            on_demand_allowed,
            bframes: Mutex::new(Policy::Drop),
        });
        if on_demand_allowed {
            registry.set_sources(Arc::new(Hook(Arc::downgrade(&pulls))));
        }
        pulls
    }

    /// What pulls added from now on do with B-frame video: like RTMP's
    /// `--bframes` (default [`Policy::Drop`], the edge drops B slices).
    pub fn set_bframes(&self, policy: Policy) {
        *lock(&self.bframes) = policy;
    }

    /// Validates and starts a pull (needs a tokio runtime).
    pub fn add(&self, config: PullConfig) -> Result<(), PullError> {
        let name = config.stream.clone();
        if !valid_stream_name(&name) {
            return Err(PullError::BadName(name));
        }
        let split = split_url(&config.url).map_err(|e| PullError::BadUrl(name.clone(), e))?;
        let mut pulls = lock(&self.pulls);
        if pulls.contains_key(&name) {
            return Err(PullError::Duplicate(name));
        }
        if pulls.len() >= self.max {
            return Err(PullError::TooMany(self.max));
        }
        let status = Arc::new(Status::new());
        let on_demand = config.on_demand && self.on_demand_allowed;
        if config.on_demand && !on_demand {
            tracing::warn!(stream = %name, "on-demand pull runs always-on on an ingest node (the origin cannot start it)");
        }
        let ctx = Arc::new(shell::Ctx {
            name: name.clone(),
            url: split.url.clone(),
            creds: split.creds,
            transport: config.transport,
            on_demand,
            grace: config.grace,
            registry: self.registry.clone(),
            status: status.clone(),
            bframes: lock(&self.bframes).clone(),
        });
        let span = tracing::info_span!("rtsp_pull", stream = %name);
        let task = tokio::spawn(shell::run(ctx).instrument(span));
        tracing::info!(stream = %name, url = %split.url, on_demand, "rtsp pull added");
        pulls.insert(
            name,
            Entry {
                config,
                shown_url: split.url.to_string(),
                status,
                task,
            },
        );
        Ok(())
    }

    /// Stops and forgets a pull; its stream ends. False when unknown.
    pub fn remove(&self, stream: &str) -> bool {
        let removed = lock(&self.pulls).remove(stream);
        if removed.is_some() {
            tracing::info!(stream, "rtsp pull removed");
        }
        removed.is_some()
    }

    /// Every pull, sorted by stream name.
    pub fn list(&self) -> Vec<PullInfo> {
        let pulls = lock(&self.pulls);
        let mut v: Vec<PullInfo> = pulls.values().map(info).collect();
        v.sort_by(|a, b| a.stream.cmp(&b.stream));
        v
    }

    /// One pull.
    pub fn get(&self, stream: &str) -> Option<PullInfo> {
        lock(&self.pulls).get(stream).map(info)
    }

    /// Waits up to [`core::START_WAIT`] for an on-demand pull to go live
    /// after asking it to start.
    async fn start(status: Arc<Status>, registry: Arc<Registry>, name: String) -> bool {
        let mut rx = status.state.subscribe();
        status.request.notify_one();
        let wait = async {
            loop {
                if rx.borrow_and_update().0 == State::Live && registry.is_live(&name) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(core::START_WAIT, wait).await.is_ok()
    }
}

fn info(e: &Entry) -> PullInfo {
    let (state, error) = e.status.state();
    PullInfo {
        stream: e.config.stream.clone(),
        url: e.shown_url.clone(),
        on_demand: e.config.on_demand,
        state: state.as_str(),
        error,
    }
}

/// The registry's view of [`Pulls`] (weak: the registry must not keep the
/// pulls alive).
struct Hook(std::sync::Weak<Pulls>);

impl Sources for Hook {
    fn start(
        &self,
        name: &str,
    ) -> Option<Pin<Box<dyn Future<Output = cascade_origin::Result<()>> + Send>>> {
        let pulls = self.0.upgrade()?;
        let status = {
            let map = lock(&pulls.pulls);
            let entry = map.get(name)?;
            // Always-on pulls are trying already: a miss is a plain 404.
            if !entry.config.on_demand {
                return None;
            }
            entry.status.clone()
        };
        let registry = pulls.registry.clone();
        let name = name.to_string();
        Some(Box::pin(async move {
            if Pulls::start(status, registry, name).await {
                Ok(())
            } else {
                Err(cascade_origin::Error::NotLive)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_split_off() {
        let s = split_url("rtsp://admin:p%40ss@10.0.0.5:554/Streaming/101").unwrap();
        assert_eq!(s.url.as_str(), "rtsp://10.0.0.5:554/Streaming/101");
        let c = s.creds.unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("admin", "p@ss")
        );
        let c = PullConfig::new("c", "rtsp://admin:p%40ss@10.0.0.5/x", false);
        assert!(!format!("{c:?}").contains("p%40ss"));
        let s = split_url("rtsp://cam/live").unwrap();
        assert!(s.creds.is_none());
        assert!(split_url("rtsps://u@cam/x").unwrap().creds.is_some());
        assert!(split_url("http://cam/x").is_err());
        assert!(split_url("rtsp:///x").is_err());
        assert!(split_url("not a url").is_err());
        assert!(split_url(&format!("rtsp://cam/{}", "x".repeat(MAX_URL))).is_err());
    }

    proptest::proptest! {
        /// Any text: no panic, and a password never survives into the
        /// URL that is shown.
        #[test]
        fn split_url_never_panics_nor_leaks(
            user in "[a-zA-Z0-9%]{0,12}",
            pass in "[a-zA-Z0-9%!$]{1,16}",
            rest in "\\PC{0,64}",
        ) {
            let _ = split_url(&rest);
            let raw = format!("rtsp://{user}:{pass}@cam.example/{rest}");
            if let Ok(s) = split_url(&raw) {
                proptest::prop_assert_eq!(s.url.password(), None);
                proptest::prop_assert!(s.url.username().is_empty());
                proptest::prop_assert!(s.creds.is_some());
            }
        }
    }

    #[tokio::test]
    async fn add_validates_and_lists_without_the_password() {
        let pulls = Pulls::new(Registry::new(), 2, true);
        let bad = PullConfig::new("bad name", "rtsp://cam/x", true);
        assert!(matches!(pulls.add(bad), Err(PullError::BadName(_))));
        let bad = PullConfig::new("cam1", "http://cam/x", true);
        assert!(matches!(pulls.add(bad), Err(PullError::BadUrl(..))));
        let ok = PullConfig::new("cam1", "rtsp://user:secret@127.0.0.1:1/x", true);
        pulls.add(ok.clone()).unwrap();
        assert_eq!(pulls.add(ok), Err(PullError::Duplicate("cam1".into())));
        pulls
            .add(PullConfig::new("cam2", "rtsp://127.0.0.1:1/y", true))
            .unwrap();
        let third = PullConfig::new("cam3", "rtsp://127.0.0.1:1/z", true);
        assert_eq!(pulls.add(third), Err(PullError::TooMany(2)));
        let list = pulls.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].url, "rtsp://127.0.0.1:1/x");
        assert_eq!(list[0].state, "idle", "on demand: nobody asked");
        let text = serde_json::to_string(&list).unwrap();
        assert!(!text.contains("secret") && !text.contains("user"), "{text}");
        assert!(pulls.remove("cam1"));
        assert!(!pulls.remove("cam1"));
        assert_eq!(pulls.list().len(), 1);
    }

    #[tokio::test]
    async fn a_dead_port_is_an_error_state() {
        // A port nothing listens on: bind, note, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pulls = Pulls::new(Registry::new(), 4, true);
        pulls
            .add(PullConfig::new(
                "cam",
                &format!("rtsp://u:pw@127.0.0.1:{port}/x"),
                false,
            ))
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let p = pulls.get("cam").unwrap();
            if p.state == "error" {
                let e = p.error.unwrap();
                assert!(!e.contains("pw"), "{e}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{p:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
