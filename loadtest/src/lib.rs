//! cascade's WebRTC test clients and load generator: a WHIP publisher and WHEP viewers on str0m.
//!
//! The publisher sends real H.264 + Opus made by Debian's ffmpeg ([`media`]), tagging every video
//! frame with an SEI carrying a sequence number and the send wall clock ([`tag`]); viewers
//! depacketize what they receive and check order, gaps, keyframe start, A/V timing and latency.
//! It deliberately does not decode pictures or audio, and does no trickle ICE.
//!
//! ```no_run
//! # async fn demo() -> loadtest::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use loadtest::{media, whep, whip};
//!
//! let clip = Arc::new(media::TestMedia::generate(media::Options::default()).await?);
//! let mut opts = whip::PublisherOptions::new("http://127.0.0.1:8080/whip/live");
//! opts.token = Some("TOKEN".into());
//! let mut publisher = whip::Publisher::start(opts, clip).await?;
//! publisher.wait_connected().await?;
//!
//! let mut v = whep::ViewerOptions::new("http://127.0.0.1:8080/whep/live");
//! v.duration = Some(Duration::from_secs(5));
//! let report = whep::Viewer::start(v).await?.finish_duration().await?;
//! assert_eq!(report.first_frame_keyframe, Some(true));
//! assert!(report.seq_gaps.is_empty());
//! publisher.delete().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod annexb;
mod error;
pub mod http;
pub mod janus;
pub mod load;
pub mod media;
pub mod ogg;
mod peer;
pub mod picture;
pub mod playing;
mod plot;
pub mod rtp;
pub mod rtpfeed;
pub mod shaper;
pub mod stats;
pub mod tag;
pub mod whep;
pub mod whip;

pub use error::{Error, Result};

/// Wall clock in microseconds since the Unix epoch: the clock shared on loopback by the
/// publisher (stamped into the SEI tag) and the viewer (at arrival).
pub fn wallclock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
