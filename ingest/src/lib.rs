//! placeholder

pub mod audio;
pub mod flv;
pub mod h264;
pub mod metrics;
pub mod rtmp;
