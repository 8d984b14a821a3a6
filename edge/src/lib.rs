//! cascade's edge: WHEP viewers served from the node's stream registry, and
//! the built-in player page.
//!
//! - [`router`]: `POST /whep/{stream}` (+ session resources, through
//!   [`cascade_rtc::http::router`]) and `GET /play/{stream}`.
//! - [`whep`]: offer → codec choice against the stream's catalog → a str0m
//!   session in RTP mode on a shard of the node's [`cascade_rtc::Server`].
//! - [`fanout`]: packetize once, send many: one task per (stream, track) on
//!   this node packetizes each frame once ([`packetize`]) and keeps the
//!   packetized current group for fast start; [`viewer`] handlers write the
//!   shared payloads with their own sequence numbers and timestamp offsets.
//!
//! What this crate does not do: own sockets or shards (`cascade-rtc` does),
//! fetch streams from the origin (the registry's upstream does), transcode.
#![warn(missing_docs)]

pub mod abr;
pub mod bframes;
pub mod fanout;
pub mod metrics;
mod offer;
pub mod packetize;
mod player;
mod sdp;
pub mod viewer;
pub mod whep;
mod ws;
mod ws_command;

use std::sync::Arc;

use cascade_origin::Registry;

/// What the edge needs to know.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// When set, viewers must present it (`Authorization: Bearer` or `?token=`).
    pub viewer_token: Option<String>,
    /// Viewers this node serves before answering 503 (0 = no limit of its
    /// own; the rtc server's session limit still applies).
    pub max_viewers: usize,
    /// How H.264 tracks with B-frames are stamped or thinned for viewers
    /// ([`bframes::BframeTs::DEFAULT`] unless overridden for a measurement).
    pub bframe_ts: bframes::BframeTs,
    /// `--token-secret`: signed view tokens (JWT HS256) are accepted where
    /// the viewer token is.
    pub token_secret: Option<String>,
    /// `--auth-webhook`: decides every view the viewer token or a signed
    /// token does not allow (viewing is closed when it is set).
    pub auth_webhook: Option<cascade_rtc::webhook::Webhook>,
    /// `--abr`: viewers of streams with renditions get a bandwidth
    /// estimate (str0m's, from TWCC feedback) and the automatic rendition
    /// choice of [`abr`]. Off: Auto stays on the best rendition that flows
    /// (and falls back while it is silent); no TWCC, no pacer.
    pub abr: bool,
    /// Benchmark knob (`CASCADE_EDGE_BWE_ALL`, not an operator option):
    /// every WHEP viewer session gets str0m's estimator (TWCC feedback,
    /// pacer), renditions or not, so the CPU cost of estimation can be
    /// measured side by side on a one-rendition benchmark stream.
    pub bwe_all: bool,
    /// This node in the cluster (split cluster only): the player page asks
    /// it for the other healthy edges, where it goes when this edge dies.
    pub cluster: Option<Arc<cascade_origin::cluster::Node>>,
}

/// The edge's routes: WHEP (`/whep/{stream}` and its session resources) and
/// the player page (`/play/{stream}`), OvenPlayer's WebSocket signalling
/// (`/ws/live/{stream}`, see `ws.rs`).
pub fn router(registry: Arc<Registry>, rtc: cascade_rtc::Server, cfg: Config) -> axum::Router {
    let cluster = cfg.cluster.clone();
    let whep = Arc::new(whep::Whep::new(registry, rtc.clone(), cfg));
    cascade_rtc::http::router(whep.clone(), rtc)
        .merge(player::router(cluster))
        .merge(ws::router(whep))
}
