//! One access unit as it travels from ingest to every viewer.

use bytes::Bytes;

/// One access unit: a whole video picture or one audio packet.
///
/// The payload is shared (`Bytes`), never copied per viewer. Video payloads
/// of H.264/H.265 are Annex-B (start codes), with parameter sets in front of
/// every keyframe so any group decodes on its own. VP8/VP9/AV1 payloads are
/// the codec's frame as RTP would carry it whole (AV1: low-overhead OBUs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The access unit.
    pub payload: Bytes,
    /// Presentation timestamp in the track's clock (90 kHz video, 48 kHz Opus).
    /// All tracks of a stream share one timeline: `pts / clock_rate` is
    /// seconds since the stream's zero, the same zero for audio and video,
    /// so consumers keep lip sync by mapping each track with its own clock.
    pub pts: u64,
    /// Decode timestamp in the track's clock; equals `pts` without B-frames.
    pub dts: u64,
    /// True for a frame that starts a group: a video keyframe (IDR), or any
    /// audio frame.
    pub keyframe: bool,
    /// Ingest wall clock, microseconds since the UNIX epoch, stamped when the
    /// frame entered cascade; used to measure latency end to end.
    pub ingest_us: u64,
}

impl Frame {
    /// Payload size in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// True when the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}
