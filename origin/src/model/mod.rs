//! The data model: a stream's catalog lists tracks; a track is a sequence of
//! groups (a video group starts at a keyframe); a group is a run of frames.

pub mod catalog;
pub mod frame;
pub mod track;
