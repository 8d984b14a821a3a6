//! The sans-IO half of the B-frame transcoder: our frames to an FLV byte
//! stream for ffmpeg's stdin ([`FlvWriter`]), ffmpeg's FLV stdout back to
//! tags ([`FlvReader`]) and to frames on the publisher's timeline
//! ([`Unpipe`]). No process, no socket, no clock: unit-tested here.
//!
//! Timestamps: ffmpeg runs with `-copyts`, so an output frame keeps the
//! presentation time of the input frame it was encoded from. The pipe
//! carries milliseconds relative to a base ([`TsMap`]) a little before the
//! first frame, so that FLV's 32-bit timestamps stay small and positive;
//! adding the base back puts the output on the publisher's timeline, the
//! same one the audio is on (A/V sync unchanged).
//!
//! User-data SEI of a source frame (captions, frame tags such as
//! loadtest's latency tag) would be lost by the re-encode: [`Unpipe`] puts
//! them back into the output frame with the same pts.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use cascade_media::annexb;
use cascade_media::nal::h264 as nal_h264;
use cascade_origin::frame::Frame;

use crate::flv::{self, Video, VideoCodec};
use crate::h264;

/// FLV tag type of video.
const TAG_VIDEO: u8 = 9;
/// Bytes of an FLV tag header.
const TAG_HEADER: usize = 11;
/// Largest tag accepted from ffmpeg (a 4K keyframe is far below this).
pub const MAX_TAG: usize = 8 * 1024 * 1024;
/// The base sits this far before the first frame's dts: room for negative
/// composition offsets and for frames that step back a little.
pub const LEAD_MS: u64 = 1_000;
/// Video clock per ms (frames carry 90 kHz timestamps).
const PER_MS: u64 = 90;
/// Frames remembered between stdin and stdout (their ingest time and when
/// they went in); older ones are forgotten first.
pub const IN_FLIGHT: usize = 256;

/// Why the pipe's bytes could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The stream does not start with an FLV header.
    #[error("not an FLV stream")]
    NotFlv,
    /// A tag is larger than [`MAX_TAG`].
    #[error("FLV tag of {0} bytes is too large")]
    TooLarge(usize),
    /// A tag body could not be parsed.
    #[error("flv: {0}")]
    Flv(#[from] flv::Error),
    /// The H.264 configuration or access unit is malformed.
    #[error("bitstream: {0}")]
    Bitstream(#[from] h264::Error),
    /// A frame came before the sequence header, or in another codec.
    #[error("unexpected video from ffmpeg: {0}")]
    Unexpected(&'static str),
}

/// Publisher timeline (ms) ⇄ pipe timestamps (ms since the base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsMap {
    base_ms: u64,
}

impl TsMap {
    /// A map whose base lies [`LEAD_MS`] before `first_dts_ms`.
    pub fn new(first_dts_ms: u64) -> Self {
        Self {
            base_ms: first_dts_ms.saturating_sub(LEAD_MS),
        }
    }

    /// A timeline time to a pipe timestamp (saturating at both ends).
    pub fn to_pipe(&self, ms: u64) -> u32 {
        u32::try_from(ms.saturating_sub(self.base_ms)).unwrap_or(u32::MAX)
    }

    /// A pipe timestamp back to the timeline.
    pub fn from_pipe(&self, ms: u64) -> u64 {
        self.base_ms.saturating_add(ms)
    }
}

/// Our H.264 frames (Annex-B, 90 kHz) as an FLV stream of legacy AVC tags.
#[derive(Debug)]
pub struct FlvWriter {
    map: Option<TsMap>,
}

impl Default for FlvWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FlvWriter {
    /// A writer whose timestamp base is set by its first frame.
    pub fn new() -> Self {
        Self { map: None }
    }

    /// The timestamp map, once the first frame set it.
    pub fn map(&self) -> Option<TsMap> {
        self.map
    }

    /// The FLV header (video only) and the AVC sequence header tag.
    pub fn header(avcc: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(13 + TAG_HEADER + 5 + avcc.len() + 4);
        out.put_slice(b"FLV");
        out.put_u8(1); // version
        out.put_u8(0x01); // video only
        out.put_u32(9); // header size
        out.put_u32(0); // PreviousTagSize0
        let mut body = BytesMut::with_capacity(5 + avcc.len());
        body.put_slice(&[0x17, 0, 0, 0, 0]);
        body.put_slice(avcc);
        put_tag(&mut out, 0, &body);
        out.freeze()
    }

    /// One frame as a video tag: dts as the tag time, pts − dts as the
    /// composition offset, NAL units with 4-byte lengths.
    pub fn frame(&mut self, frame: &Frame) -> Bytes {
        let dts_ms = frame.dts / PER_MS;
        let pts_ms = frame.pts / PER_MS;
        let map = *self.map.get_or_insert_with(|| TsMap::new(dts_ms));
        let cts = i64::try_from(pts_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(dts_ms).unwrap_or(i64::MAX))
            .clamp(-(1 << 23), (1 << 23) - 1);
        let units = annexb::nal_units(&frame.payload);
        let size: usize = units.iter().map(|u| u.len() + 4).sum();
        let mut body = BytesMut::with_capacity(5 + size);
        body.put_u8(if frame.keyframe { 0x17 } else { 0x27 });
        body.put_u8(1);
        // invariant: cts is clamped to the signed 24-bit range.
        body.put_slice(&(cts as i32).to_be_bytes()[1..]);
        for u in units {
            body.put_u32(u32::try_from(u.len()).unwrap_or(u32::MAX));
            body.put_slice(u);
        }
        let mut out = BytesMut::with_capacity(TAG_HEADER + body.len() + 4);
        put_tag(&mut out, map.to_pipe(dts_ms), &body);
        out.freeze()
    }
}

fn put_tag(out: &mut BytesMut, ts: u32, body: &[u8]) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX) & 0x00ff_ffff;
    out.put_u8(TAG_VIDEO);
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_slice(&ts.to_be_bytes()[1..]);
    out.put_u8((ts >> 24) as u8);
    out.put_slice(&[0, 0, 0]);
    out.put_slice(body);
    out.put_u32(len + TAG_HEADER as u32);
}

/// One FLV tag read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    /// 8 audio, 9 video, 18 script data.
    pub kind: u8,
    /// Timestamp in ms (with the extension byte).
    pub ts: u32,
    /// The tag body.
    pub body: Bytes,
}

/// An FLV byte stream to tags, fed in pieces as they come off a pipe.
#[derive(Debug, Default)]
pub struct FlvReader {
    buf: BytesMut,
    header_done: bool,
}

impl FlvReader {
    /// A reader expecting the FLV header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the pipe.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete tag, `Ok(None)` when more bytes are needed.
    pub fn next_tag(&mut self) -> Result<Option<Tag>, Error> {
        if !self.header_done {
            // "FLV", version, flags, u32 header size, then PreviousTagSize0.
            if self.buf.len() < 9 {
                return Ok(None);
            }
            if self.buf.get(..3) != Some(b"FLV".as_slice()) {
                return Err(Error::NotFlv);
            }
            let size = self
                .buf
                .get(5..9)
                .map_or(9, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if !(9..=1024).contains(&size) {
                return Err(Error::NotFlv);
            }
            if self.buf.len() < size + 4 {
                return Ok(None);
            }
            let _ = self.buf.split_to(size + 4);
            self.header_done = true;
        }
        let Some(h) = self.buf.get(..TAG_HEADER) else {
            return Ok(None);
        };
        let kind = h[0] & 0x1f;
        let len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
        let ts =
            u32::from(h[7]) << 24 | u32::from(h[4]) << 16 | u32::from(h[5]) << 8 | u32::from(h[6]);
        if len > MAX_TAG {
            return Err(Error::TooLarge(len));
        }
        if self.buf.len() < TAG_HEADER + len + 4 {
            return Ok(None);
        }
        let _ = self.buf.split_to(TAG_HEADER);
        let body = self.buf.split_to(len).freeze();
        let _ = self.buf.split_to(4); // PreviousTagSize
        Ok(Some(Tag { kind, ts, body }))
    }
}

/// A frame that went into ffmpeg and has not come out yet.
#[derive(Clone, Debug)]
struct Sent {
    pts: u64,
    ingest_us: u64,
    at: Instant,
    sei: Vec<Bytes>,
}

/// x264's own user-data SEI (its version and options): never carried over,
/// decoders key bug workarounds on the encoder build it names.
const X264_UUID: [u8; 16] = [
    0xdc, 0x45, 0xe9, 0xbd, 0xe6, 0xd9, 0x48, 0xb7, 0x96, 0x2c, 0xd8, 0x20, 0xd9, 0x23, 0xee, 0xef,
];

/// SEI NAL units of an Annex-B access unit whose first message is user
/// data: payload type 4 (registered ITU-T T.35: CEA-608/708 captions) or
/// 5 (unregistered: application tags), x264's own excepted.
pub fn user_data_sei(au: &[u8]) -> Vec<Bytes> {
    annexb::nal_units(au)
        .into_iter()
        .filter(|n| nal_h264::nal_type(n) == nal_h264::SEI)
        .filter(|n| match n.get(1) {
            Some(4) => true,
            // Type 5, then the payload size byte, then the UUID.
            Some(5) => n.get(3..19) != Some(X264_UUID.as_slice()),
            _ => false,
        })
        .map(Bytes::copy_from_slice)
        .collect()
}

/// `au` with `sei` NAL units put in front of its first coded slice.
fn with_sei(au: &Bytes, sei: &[Bytes]) -> Bytes {
    if sei.is_empty() {
        return au.clone();
    }
    let units = annexb::nal_units(au);
    let extra: usize = sei.iter().map(|n| n.len() + 4).sum();
    let mut out = BytesMut::with_capacity(au.len() + extra + 4 * units.len());
    let mut done = false;
    for u in units {
        if !done && nal_h264::is_vcl(nal_h264::nal_type(u)) {
            for n in sei {
                out.put_slice(&annexb::START_CODE);
                out.put_slice(n);
            }
            done = true;
        }
        out.put_slice(&annexb::START_CODE);
        out.put_slice(u);
    }
    out.freeze()
}

/// ffmpeg's output tags to frames on the publisher's timeline, each given
/// back the ingest time of the input frame with the same pts.
#[derive(Debug, Default)]
pub struct Unpipe {
    config: Option<h264::Config>,
    sent: VecDeque<Sent>,
    /// Last output tag time, unwrapped past 32 bits.
    last_ts: Option<(u32, u64)>,
}

/// A frame out of ffmpeg.
#[derive(Clone, Debug)]
pub struct Out {
    /// The frame, pts = dts (no B-frames), on the publisher's timeline.
    pub frame: Frame,
    /// How long its input frame spent in ffmpeg, when it was matched.
    pub delay: Option<std::time::Duration>,
}

impl Unpipe {
    /// Waiting for ffmpeg's sequence header.
    pub fn new() -> Self {
        Self::default()
    }

    /// The SDP fmtp of ffmpeg's output, once its sequence header came.
    pub fn fmtp(&self) -> Option<&str> {
        self.config.as_ref().map(|c| c.fmtp.as_str())
    }

    /// Remembers a frame that was queued for ffmpeg.
    pub fn sent(&mut self, frame: &Frame, at: Instant) {
        if self.sent.len() >= IN_FLIGHT {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent {
            pts: frame.pts,
            ingest_us: frame.ingest_us,
            at,
            sei: user_data_sei(&frame.payload),
        });
    }

    /// Frames queued for ffmpeg and not seen back.
    pub fn in_flight(&self) -> usize {
        self.sent.len()
    }

    /// One output tag; `Ok(None)` for tags that carry no frame (metadata,
    /// the sequence header).
    pub fn tag(&mut self, tag: &Tag, map: TsMap, now: Instant) -> Result<Option<Out>, Error> {
        if tag.kind != TAG_VIDEO {
            return Ok(None);
        }
        match flv::parse_video(&tag.body)? {
            Video::Config {
                codec: VideoCodec::H264,
                record,
            } => {
                self.config = Some(h264::parse_avcc(&record)?);
                Ok(None)
            }
            Video::Frame {
                codec: VideoCodec::H264,
                cts,
                data,
                ..
            } => {
                let Some(config) = &self.config else {
                    return Err(Error::Unexpected("frame before sequence header"));
                };
                let au = h264::to_annexb(&data, config)?;
                let ts = self.extend_timestamp(tag.ts);
                let pts_ms = map.from_pipe(ts.saturating_add_signed(i64::from(cts)));
                let pts = pts_ms * PER_MS;
                let (ingest_us, delay, payload) = match self.take_sent(pts) {
                    Some(s) => (
                        s.ingest_us,
                        Some(now.saturating_duration_since(s.at)),
                        with_sei(&au.payload, &s.sei),
                    ),
                    None => (cascade_origin::wallclock_us(), None, au.payload),
                };
                Ok(Some(Out {
                    frame: Frame {
                        payload,
                        pts,
                        // Output has no B-frames: decode order is
                        // presentation order.
                        dts: pts,
                        keyframe: au.keyframe,
                        ingest_us,
                    },
                    delay,
                }))
            }
            Video::End | Video::Ignored(_) => Ok(None),
            Video::Config { .. } | Video::Frame { .. } => Err(Error::Unexpected("not H.264")),
        }
    }

    /// Extends a 32-bit FLV millisecond timestamp (it wraps after ~49 days,
    /// and ffmpeg writes it modulo 2^32) to a 64-bit one that keeps counting.
    fn extend_timestamp(&mut self, ts: u32) -> u64 {
        let out = match self.last_ts {
            None => u64::from(ts),
            Some((raw, ext)) => ext.saturating_add_signed(i64::from(ts.wrapping_sub(raw) as i32)),
        };
        self.last_ts = Some((ts, out));
        out
    }

    /// The input frame with this pts; frames sent before it in presentation
    /// order and never seen back (ffmpeg dropped them) are forgotten.
    fn take_sent(&mut self, pts: u64) -> Option<Sent> {
        let i = self.sent.iter().position(|s| s.pts == pts)?;
        let s = self.sent.remove(i);
        self.sent.retain(|s| s.pts > pts);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Annex-B units of `payload` (test helper and for callers checking output).
    fn nal_types(payload: &[u8]) -> Vec<u8> {
        annexb::nal_units(payload)
            .iter()
            .filter_map(|u| u.first().map(|b| b & 0x1f))
            .collect()
    }

    /// True when `payload` starts with an Annex-B start code.
    fn is_annexb(payload: &[u8]) -> bool {
        payload.starts_with(&[0, 0, 0, 1]) || payload.starts_with(&[0, 0, 1])
    }

    fn frame(pts_ms: u64, dts_ms: u64, key: bool, nal: u8) -> Frame {
        let mut p = vec![0, 0, 0, 1];
        if key {
            p.extend_from_slice(&[0x67, 0x64, 0, 0x1f, 0, 0, 0, 1, 0x68, 0xee, 0, 0, 0, 1]);
        }
        p.extend_from_slice(&[nal, 0x88, 0x80]);
        Frame {
            payload: Bytes::from(p),
            pts: pts_ms * 90,
            dts: dts_ms * 90,
            keyframe: key,
            ingest_us: pts_ms * 1_000,
        }
    }

    fn avcc() -> Vec<u8> {
        vec![
            1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x64, 0, 0x1f, 1, 0, 2, 0x68, 0xee,
        ]
    }

    #[test]
    fn timestamp_map_round_trips_and_saturates() {
        let m = TsMap::new(1_700_000_000_000);
        assert_eq!(m.to_pipe(1_700_000_000_000), 1_000);
        assert_eq!(m.from_pipe(1_066), 1_700_000_000_066);
        assert_eq!(m.to_pipe(0), 0, "before the base saturates at 0");
        assert_eq!(TsMap::new(10).to_pipe(10), 10, "base never below 0");
    }

    #[test]
    fn writer_output_reads_back_as_the_same_frames() {
        let mut w = FlvWriter::new();
        let mut bytes = FlvWriter::header(&avcc()).to_vec();
        // x264 decode order: I (pts 66), P (pts 166), B (pts 100), B (pts 133).
        let frames = [
            frame(1_066, 1_000, true, 0x65),
            frame(1_166, 1_033, false, 0x41),
            frame(1_100, 1_066, false, 0x01),
            frame(1_133, 1_100, false, 0x01),
        ];
        for f in &frames {
            bytes.extend_from_slice(&w.frame(f));
        }
        let map = w.map().unwrap();
        // Read back in odd-sized pieces, as a pipe delivers them.
        let mut r = FlvReader::new();
        let mut tags = Vec::new();
        for chunk in bytes.chunks(7) {
            r.push(chunk);
            while let Some(t) = r.next_tag().unwrap() {
                tags.push(t);
            }
        }
        assert_eq!(tags.len(), 5);
        assert!(tags.iter().all(|t| t.kind == TAG_VIDEO));
        assert_eq!(tags[1].ts, 1_000, "first dts sits LEAD_MS after the base");
        let now = Instant::now();
        let mut u = Unpipe::new();
        for f in &frames {
            u.sent(f, now);
        }
        assert_eq!(u.in_flight(), 4);
        assert!(u.tag(&tags[0], map, now).unwrap().is_none());
        assert_eq!(
            u.fmtp(),
            Some("profile-level-id=64001f;packetization-mode=1")
        );
        // ffmpeg gives them back in presentation order (no B-frames).
        let order = [0, 2, 3, 1];
        let outs: Vec<Out> = order
            .iter()
            .map(|&i| u.tag(&tags[i + 1], map, now).unwrap().unwrap())
            .collect();
        for (o, f) in outs.iter().zip(order.map(|i| &frames[i])) {
            assert_eq!(o.frame.pts, f.pts, "pts restored on the timeline");
            assert_eq!(o.frame.dts, f.pts);
            assert_eq!(o.frame.keyframe, f.keyframe);
            assert_eq!(o.frame.ingest_us, f.ingest_us, "ingest time carried over");
            assert!(o.delay.is_some());
            assert!(is_annexb(&o.frame.payload));
        }
        assert_eq!(nal_types(&outs[0].frame.payload), vec![7, 8, 5]);
        assert_eq!(nal_types(&outs[3].frame.payload), vec![1]);
        assert_eq!(u.in_flight(), 0);
    }

    #[test]
    fn unmatched_frames_are_forgotten_in_presentation_order() {
        let now = Instant::now();
        let mut u = Unpipe::new();
        for pts in [100, 200, 300] {
            u.sent(&frame(pts, pts, false, 0x41), now);
        }
        // 100 never came back (dropped by ffmpeg): gone once 200 is out.
        assert_eq!(u.take_sent(200 * 90).map(|s| s.pts), Some(200 * 90));
        assert_eq!(u.in_flight(), 1);
        assert!(u.take_sent(999).is_none());
        for i in 0..(IN_FLIGHT as u64 + 10) {
            u.sent(&frame(1_000 + i, 1_000 + i, false, 0x41), now);
        }
        assert_eq!(u.in_flight(), IN_FLIGHT, "bounded");
    }

    #[test]
    fn user_data_sei_is_carried_over() {
        let tag = [
            6u8, 5, 17, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 42, 0x80,
        ];
        let mut x264 = vec![6u8, 5, 40];
        x264.extend_from_slice(&X264_UUID);
        x264.extend_from_slice(b"x264 - core 164");
        let captions = [6u8, 4, 3, 0xb5, 0, 0x31, 0x80];
        let timing = [6u8, 1, 1, 0, 0x80];
        let mut au = Vec::new();
        for n in [&tag[..], &x264, &captions, &timing, &[0x65, 0x88]] {
            au.extend_from_slice(&[0, 0, 0, 1]);
            au.extend_from_slice(n);
        }
        let sei = user_data_sei(&au);
        assert_eq!(
            sei,
            vec![
                Bytes::copy_from_slice(&tag),
                Bytes::copy_from_slice(&captions)
            ]
        );
        let mut out = vec![0, 0, 0, 1, 0x67, 0x64, 0, 0, 0, 1, 0x68, 0xee];
        out.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88]);
        let out = with_sei(&Bytes::from(out), &sei);
        assert_eq!(nal_types(&out), vec![7, 8, 6, 6, 5]);
        let now = Instant::now();
        let mut u = Unpipe::new();
        let mut f = frame(1_000, 1_000, true, 0x65);
        f.payload = Bytes::from(au);
        u.sent(&f, now);
        let mut w = FlvWriter::new();
        let mut r = FlvReader::new();
        r.push(&FlvWriter::header(&avcc()));
        r.push(&w.frame(&frame(1_000, 1_000, true, 0x65)));
        let map = w.map().unwrap();
        let t = r.next_tag().unwrap().unwrap();
        u.tag(&t, map, now).unwrap();
        let t = r.next_tag().unwrap().unwrap();
        let o = u.tag(&t, map, now).unwrap().unwrap();
        assert_eq!(nal_types(&o.frame.payload), vec![7, 8, 6, 6, 5]);
    }

    #[test]
    fn negative_offsets_and_wrapping_output() {
        let mut w = FlvWriter::new();
        let f = frame(5_000, 5_040, false, 0x41);
        let tag = w.frame(&f);
        let mut r = FlvReader::new();
        r.push(b"FLV\x01\x01\x00\x00\x00\x09\x00\x00\x00\x00");
        r.push(&tag);
        let t = r.next_tag().unwrap().unwrap();
        let Video::Frame { cts, .. } = flv::parse_video(&t.body).unwrap() else {
            panic!("frame")
        };
        assert_eq!(cts, -40);
        let mut u = Unpipe::new();
        assert_eq!(u.extend_timestamp(u32::MAX - 5), u64::from(u32::MAX - 5));
        assert_eq!(u.extend_timestamp(10), u64::from(u32::MAX) + 11);
    }

    #[test]
    fn reader_refuses_garbage() {
        let mut r = FlvReader::new();
        r.push(b"NOTFLV...........");
        assert_eq!(r.next_tag(), Err(Error::NotFlv));
        let mut r = FlvReader::new();
        r.push(b"FLV\x01\x01\x00\x00\x00\x09\x00\x00\x00\x00");
        r.push(&[9, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.next_tag(), Err(Error::TooLarge(0xff_ffff)));
        let mut u = Unpipe::new();
        let t = Tag {
            kind: TAG_VIDEO,
            ts: 0,
            body: Bytes::from_static(&[0x27, 1, 0, 0, 0, 0, 0, 0, 1, 0x41]),
        };
        assert!(u.tag(&t, TsMap::new(0), Instant::now()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn reader_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..40), 0..20)) {
            let mut r = FlvReader::new();
            r.push(b"FLV\x01\x01\x00\x00\x00\x09\x00\x00\x00\x00");
            let mut u = Unpipe::new();
            for c in chunks {
                r.push(&c);
                while let Ok(Some(t)) = r.next_tag() {
                    let _ = u.tag(&t, TsMap::new(0), Instant::now());
                }
            }
        }
    }
}
