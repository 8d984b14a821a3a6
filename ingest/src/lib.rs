//! cascade's ingest: publishers in, registry tracks out.
//!
//! - [`whip`]: WHIP (RFC 9725) publishers on the node's WebRTC sessions
//!   ([`cascade_rtc`]), H.264/VP8/VP9/AV1/H.265 + Opus passed through.
//! - [`rtmp`]: RTMP publishers (OBS, ffmpeg, hardware encoders), FLV parsed
//!   by [`flv`], AAC transcoded to Opus by [`audio`], H.264 with B-frames
//!   re-encoded without them by [`transcode`] (an ffmpeg child).
//! - [`rtsp`]: RTSP pulls from IP cameras (retina), H.264/H.265 with
//!   AAC or G.711 audio turned into Opus by [`audio`].
//! - [`publish`]: the browser publish page `/publish/{stream}` (WHIP from
//!   the camera or the screen), served with the WHIP routes.
//!
//! What this crate does not do: serve viewers or relay between nodes.

pub mod audio;
mod dimensions;
pub mod flv;
pub mod h264;
pub mod ladder;
pub mod metrics;
pub mod publish;
pub mod rtmp;
pub mod rtsp;
mod simulcast;
pub mod transcode;
pub mod whip;
