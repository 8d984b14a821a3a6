//! The relay's wire format: length-prefixed JSON control messages on one
//! bidirectional stream, and binary group streams (header, then frames) on
//! unidirectional streams. Pure encoders/decoders plus thin quinn readers.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::cluster::{validate_path, validate_reports, Report};
use crate::model::catalog::Catalog;
use crate::model::frame::Frame;
use crate::{valid_stream_name, Error, ProtocolError, Result};

/// Largest control message body: a catalog with parameter sets fits many
/// times over; anything bigger is a broken or hostile peer.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest frame payload: an 8K intra picture at a high bitrate stays below.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Largest group on the wire: twice the origin's group cache, so a group the
/// cache holds always crosses a link.
pub const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Tracks a catalog may list: video + audio today, simulcast layers later.
pub const MAX_TRACKS: usize = 16;
/// Bytes of an fmtp value (H.265 parameter sets are the largest we carry).
const MAX_FMTP: usize = 4096;
/// Characters of a protocol label (`whip`, `rtmp`, `rtsp`, `relay`).
pub const MAX_LABEL: usize = 16;
/// Bytes of a track name.
pub const MAX_TRACK_NAME: usize = 64;
/// Fixed part of a frame on a group stream: flags, pts, dts, ingest_us, length.
pub const FRAME_HEADER: usize = 1 + 8 + 8 + 8 + 4;
/// Fixed part of a group header: id, group sequence, previous group, track name length.
pub const GROUP_HEADER_FIXED: usize = 8 + 8 + 8 + 1;
/// Version spoken in `Hello` (the ALPN carries it too). 2: proofs bound to
/// the TLS session, the connecting side proves itself first.
pub const VERSION: u32 = 2;

const FLAG_KEYFRAME: u8 = 0x01;

/// A 32-byte random challenge, hex on the wire.
pub type Nonce = [u8; 32];

/// One control message. Ids are chosen by whoever sends `Publish` or
/// `Subscribe` (even ids by the connecting side, odd by the accepting side),
/// so every later message names its publication or subscription by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are ignored so a later minor revision can add optional
// fields without breaking older nodes; unknown types are errors.
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Connecting side opens: protocol version and its challenge.
    Hello {
        /// Protocol version, [`VERSION`].
        version: u32,
        /// Challenge for the accepting side.
        #[serde(with = "hex_nonce")]
        nonce: Nonce,
    },
    /// Accepting side challenges back; it proves nothing yet (the
    /// connecting side proves itself first, see `auth`).
    Challenge {
        /// Challenge for the connecting side.
        #[serde(with = "hex_nonce")]
        nonce: Nonce,
    },
    /// Connecting side answers the challenge.
    Auth {
        /// HMAC proving the connecting side knows the secret, bound to
        /// this connection.
        #[serde(with = "hex_nonce")]
        proof: [u8; 32],
    },
    /// The connecting side is authenticated; the accepting side proves
    /// itself in turn.
    AuthOk {
        /// HMAC proving the accepting side knows the secret, bound to this
        /// connection.
        #[serde(with = "hex_nonce")]
        proof: [u8; 32],
    },
    /// The sender publishes a stream to the receiver.
    Publish {
        /// Publication id.
        id: u64,
        /// Stream name.
        stream: String,
        /// How the stream reached cascade (`whip`, `rtmp`...).
        protocol: String,
        /// Tracks and codec parameters.
        catalog: Catalog,
    },
    /// The catalog of a publication or subscription changed.
    CatalogUpdate {
        /// Publication or subscription id.
        id: u64,
        /// The new catalog.
        catalog: Catalog,
    },
    /// The sender wants a stream from the receiver.
    Subscribe {
        /// Subscription id.
        id: u64,
        /// Stream name.
        stream: String,
        /// True when re-subscribing after a lost link: the subscriber has
        /// already seen the current group, so start at the next keyframe.
        #[serde(default)]
        resume: bool,
    },
    /// Answer to `Subscribe`: the stream is live; groups follow.
    SubscribeOk {
        /// Subscription id.
        id: u64,
        /// Tracks and codec parameters.
        catalog: Catalog,
        /// How the stream reached cascade.
        protocol: String,
    },
    /// Answer to `Subscribe`: no such live stream.
    NotFound {
        /// Subscription id.
        id: u64,
    },
    /// The subscriber no longer wants the stream.
    Unsubscribe {
        /// Subscription id.
        id: u64,
    },
    /// A reader of the stream wants a keyframe on a track.
    KeyframeRequest {
        /// Publication or subscription id.
        id: u64,
        /// Track name.
        track: String,
    },
    /// The stream ended at its source.
    Ended {
        /// Publication or subscription id.
        id: u64,
    },
    /// The subscriber of `id` reads only these renditions (video tracks
    /// with a `rendition`) now; the sender stops sending the others until a
    /// later `Select` names them. Tracks without a rendition are always
    /// sent, and so is everything until the first `Select`.
    Select {
        /// Subscription id.
        id: u64,
        /// Track names, at most [`MAX_TRACKS`].
        #[serde(default)]
        tracks: Vec<String>,
    },
    /// The sender of `id`, while it holds back renditions the subscriber
    /// does not read: when each last had a frame at the source, so the
    /// subscriber can tell a rendition that flows from one that stopped.
    Heard {
        /// Subscription id.
        id: u64,
        /// At most [`MAX_TRACKS`] tracks.
        #[serde(default)]
        tracks: Vec<Heard>,
    },
    /// Connecting side, every `cluster::REPORT_INTERVAL`: its load report
    /// first, then those of the nodes below it (placement, loop refusal).
    Load {
        /// At most `cluster::MAX_REPORT_NODES` reports.
        #[serde(default)]
        nodes: Vec<Report>,
    },
    /// Accepting side, answering `Load`: its upstream path and its table.
    Cluster {
        /// Node ids from the origin down to the sender, the sender last.
        #[serde(default)]
        path: Vec<String>,
        /// The sender's report first, then the nodes it heard of.
        #[serde(default)]
        nodes: Vec<Report>,
    },
}

/// A held-back track's last frame at its source (`Message::Heard`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heard {
    /// Track name.
    pub track: String,
    /// `ingest_us` of its last frame (wall clock at ingest, microseconds).
    pub ingest_us: u64,
}

mod hex_nonce {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <&str>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// The protocol label rule, one for the codec (both directions) and the
/// session: 1–[`MAX_LABEL`] characters of `[A-Za-z0-9-]`.
pub fn valid_label(label: &str) -> bool {
    (1..=MAX_LABEL).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Longest rendition name: `video-` plus it stays a valid track name.
pub const MAX_RENDITION_NAME: usize = 64 - "video-".len();

/// True for a track name we accept: same alphabet as stream names.
pub fn valid_track_name(name: &str) -> bool {
    valid_stream_name(name)
}

/// Checks a catalog against the caps (tracks, names, fmtp). Not part of
/// decoding: a catalog concerns one stream, so the link refuses that stream
/// and keeps the others (`link`); both ends check it.
pub fn check_catalog(c: &Catalog) -> Result<(), ProtocolError> {
    if c.tracks.len() > MAX_TRACKS {
        return Err(ProtocolError::TooManyTracks {
            count: c.tracks.len(),
            max: MAX_TRACKS,
        });
    }
    for t in &c.tracks {
        if !valid_track_name(&t.name) {
            return Err(ProtocolError::BadTrackName);
        }
        if let Some(r) = &t.rendition {
            // The name picks a rendition in URLs and JSON and forms the
            // track name `video-<name>` (≤ 64 characters with the prefix).
            if !valid_stream_name(&r.name)
                || r.name.len() > MAX_RENDITION_NAME
                || t.kind() != crate::catalog::Kind::Video
            {
                return Err(ProtocolError::BadRendition);
            }
        }
        if t.fmtp.len() > MAX_FMTP {
            return Err(ProtocolError::FmtpTooLong {
                len: t.fmtp.len(),
                max: MAX_FMTP,
            });
        }
    }
    Ok(())
}

/// A list of track names in `Select`/`Heard`: bounded like a catalog.
fn check_track_list<'a>(count: usize, mut names: impl Iterator<Item = &'a str>) -> Result<()> {
    if count > MAX_TRACKS {
        return Err(ProtocolError::TooManyTracks {
            count,
            max: MAX_TRACKS,
        }
        .into());
    }
    if names.all(valid_track_name) {
        Ok(())
    } else {
        Err(ProtocolError::BadTrackName.into())
    }
}

fn check_label(label: &str) -> Result<(), ProtocolError> {
    if valid_label(label) {
        Ok(())
    } else {
        Err(ProtocolError::BadLabel)
    }
}

/// The type names of [`Message`] on the wire, to tell an unknown type (a
/// newer peer) from a malformed message.
const MESSAGE_TYPES: [&str; 16] = [
    "hello",
    "challenge",
    "auth",
    "auth_ok",
    "publish",
    "catalog_update",
    "subscribe",
    "subscribe_ok",
    "not_found",
    "unsubscribe",
    "keyframe_request",
    "ended",
    "load",
    "cluster",
    "select",
    "heard",
];

/// Why a body did not decode: an unknown type, or malformed JSON.
fn decode_error(body: &[u8], e: serde_json::Error) -> ProtocolError {
    #[derive(Deserialize)]
    struct Tagged {
        #[serde(rename = "type")]
        kind: String,
    }
    match serde_json::from_slice::<Tagged>(body) {
        Ok(t) if !MESSAGE_TYPES.contains(&t.kind.as_str()) => {
            // The name comes from the peer: keep the log line short.
            ProtocolError::UnknownMessage(t.kind.chars().take(32).collect())
        }
        _ => ProtocolError::MalformedMessage(e),
    }
}

impl Message {
    /// The message's type as on the wire, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Challenge { .. } => "challenge",
            Self::Auth { .. } => "auth",
            Self::AuthOk { .. } => "auth_ok",
            Self::Publish { .. } => "publish",
            Self::CatalogUpdate { .. } => "catalog_update",
            Self::Subscribe { .. } => "subscribe",
            Self::SubscribeOk { .. } => "subscribe_ok",
            Self::NotFound { .. } => "not_found",
            Self::Unsubscribe { .. } => "unsubscribe",
            Self::KeyframeRequest { .. } => "keyframe_request",
            Self::Ended { .. } => "ended",
            Self::Load { .. } => "load",
            Self::Cluster { .. } => "cluster",
            Self::Select { .. } => "select",
            Self::Heard { .. } => "heard",
        }
    }

    /// Checks what serde cannot: names, sizes, labels. Catalogs are left to
    /// [`check_catalog`], per stream.
    fn validate(&self) -> Result<()> {
        match self {
            Self::Hello { version, .. } if *version != VERSION => {
                Err(ProtocolError::VersionMismatch {
                    ours: VERSION,
                    theirs: *version,
                }
                .into())
            }
            Self::Publish {
                stream, protocol, ..
            } => {
                if !valid_stream_name(stream) {
                    return Err(Error::BadStreamName);
                }
                Ok(check_label(protocol)?)
            }
            Self::SubscribeOk { protocol, .. } => Ok(check_label(protocol)?),
            Self::Subscribe { stream, .. } if !valid_stream_name(stream) => {
                Err(Error::BadStreamName)
            }
            Self::KeyframeRequest { track, .. } if !valid_track_name(track) => {
                Err(ProtocolError::BadTrackName.into())
            }
            Self::Load { nodes } => Ok(validate_reports(nodes)?),
            Self::Select { tracks, .. } => {
                check_track_list(tracks.len(), tracks.iter().map(String::as_str))
            }
            Self::Heard { tracks, .. } => {
                check_track_list(tracks.len(), tracks.iter().map(|h| h.track.as_str()))
            }
            Self::Cluster { path, nodes } => {
                validate_path(path)?;
                Ok(validate_reports(nodes)?)
            }
            _ => Ok(()),
        }
    }

    /// The message with its 4-byte big-endian length prefix. A protocol
    /// label is held to the same rule as on decoding, so a label the peer
    /// would refuse fails here, on the node that has it wrong.
    pub fn encode(&self) -> Result<Bytes> {
        if let Self::Publish { protocol, .. } | Self::SubscribeOk { protocol, .. } = self {
            check_label(protocol)?;
        }
        let body = serde_json::to_vec(self).map_err(ProtocolError::Encode)?;
        let too_large = || ProtocolError::MessageTooLarge {
            len: body.len(),
            max: MAX_MESSAGE,
        };
        if body.len() > MAX_MESSAGE {
            return Err(too_large().into());
        }
        let len = u32::try_from(body.len()).map_err(|_| too_large())?;
        let mut out = BytesMut::with_capacity(4 + body.len());
        out.put_u32(len);
        out.put_slice(&body);
        Ok(out.freeze())
    }

    /// Decodes one message body (without its length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Self> {
        if body.len() > MAX_MESSAGE {
            return Err(ProtocolError::MessageTooLarge {
                len: body.len(),
                max: MAX_MESSAGE,
            }
            .into());
        }
        let msg: Self = serde_json::from_slice(body).map_err(|e| decode_error(body, e))?;
        msg.validate()?;
        Ok(msg)
    }

    /// Decodes one length-prefixed message from the front of `buf`:
    /// `Ok(None)` when more bytes are needed, else the message and the bytes used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>> {
        let Some(len) = message_len(buf)? else {
            return Ok(None);
        };
        let Some(body) = buf.get(4..4 + len) else {
            return Ok(None);
        };
        Ok(Some((Self::decode_body(body)?, 4 + len)))
    }
}

/// The body length announced by a message prefix, checked against the cap.
fn message_len(buf: &[u8]) -> Result<Option<usize>> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut be = [0u8; 4];
    be.copy_from_slice(prefix);
    let announced = u32::from_be_bytes(be);
    let too_large = || ProtocolError::MessageTooLarge {
        len: usize::try_from(announced).unwrap_or(usize::MAX),
        max: MAX_MESSAGE,
    };
    let len = usize::try_from(announced).map_err(|_| too_large())?;
    if len > MAX_MESSAGE {
        return Err(too_large().into());
    }
    Ok(Some(len))
}

/// The header opening every group stream. On the wire (big-endian):
/// `id: u64 | group: u64 | prev: u64 | track_len: u8 | track: [u8; track_len]`, then
/// frames until the stream ends, each
/// `flags: u8 (bit 0 keyframe) | pts: u64 | dts: u64 | ingest_us: u64 |
/// len: u32 | payload: [u8; len]`. Control messages on the bidirectional
/// stream are `len: u32 | JSON body` ([`Message`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    /// Publication or subscription id the group belongs to.
    pub id: u64,
    /// Group sequence, increasing per connection from 1: a receiver drops
    /// frames of a group older than the newest it passed on the same track.
    pub group: u64,
    /// The sequence of the track's previous group on this link, 0 for the
    /// first: the receiver waits for that one to end before passing this
    /// one on, whatever order the streams arrive in.
    pub prev: u64,
    /// Track name.
    pub track: String,
}

impl GroupHeader {
    /// Encodes the header.
    pub fn encode(&self) -> Result<Bytes> {
        let len = u8::try_from(self.track.len()).map_err(|_| ProtocolError::BadTrackName)?;
        if !valid_track_name(&self.track) {
            return Err(ProtocolError::BadTrackName.into());
        }
        let mut out = BytesMut::with_capacity(GROUP_HEADER_FIXED + self.track.len());
        out.put_u64(self.id);
        out.put_u64(self.group);
        out.put_u64(self.prev);
        out.put_u8(len);
        out.put_slice(self.track.as_bytes());
        Ok(out.freeze())
    }

    /// Decodes a header from the front of `buf`: `Ok(None)` when more bytes
    /// are needed, else the header and the bytes used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>> {
        let Some(fixed) = buf.get(..GROUP_HEADER_FIXED) else {
            return Ok(None);
        };
        let (id, rest) = split_u64(fixed);
        let (group, rest) = split_u64(rest);
        let (prev, rest) = split_u64(rest);
        let name_len = usize::from(rest.first().copied().unwrap_or(0));
        if name_len == 0 || name_len > MAX_TRACK_NAME {
            return Err(ProtocolError::BadTrackName.into());
        }
        let Some(name) = buf.get(GROUP_HEADER_FIXED..GROUP_HEADER_FIXED + name_len) else {
            return Ok(None);
        };
        let track = std::str::from_utf8(name).map_err(|_| ProtocolError::BadTrackName)?;
        if !valid_track_name(track) {
            return Err(ProtocolError::BadTrackName.into());
        }
        let header = Self {
            id,
            group,
            prev,
            track: track.to_string(),
        };
        Ok(Some((header, GROUP_HEADER_FIXED + name_len)))
    }
}

/// Reads a big-endian u64 off the front of a slice (zero-padded when short,
/// which callers exclude by slicing exact lengths first).
fn split_u64(buf: &[u8]) -> (u64, &[u8]) {
    let mut be = [0u8; 8];
    let n = buf.len().min(8);
    be[..n].copy_from_slice(&buf[..n]);
    (u64::from_be_bytes(be), &buf[n..])
}

/// The fixed header of a frame on a group stream.
pub fn encode_frame_header(frame: &Frame) -> Result<Bytes> {
    let len = u32::try_from(frame.payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or(ProtocolError::FrameTooLarge {
            len: frame.payload.len(),
            max: MAX_FRAME,
        })?;
    let mut out = BytesMut::with_capacity(FRAME_HEADER);
    out.put_u8(if frame.keyframe { FLAG_KEYFRAME } else { 0 });
    out.put_u64(frame.pts);
    out.put_u64(frame.dts);
    out.put_u64(frame.ingest_us);
    out.put_u32(len);
    Ok(out.freeze())
}

/// A frame header as decoded: the frame without its payload, and the
/// payload's length still to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Keyframe flag.
    pub keyframe: bool,
    /// Presentation timestamp.
    pub pts: u64,
    /// Decode timestamp.
    pub dts: u64,
    /// Ingest wall clock, µs.
    pub ingest_us: u64,
    /// Payload length, at most [`MAX_FRAME`].
    pub len: usize,
}

impl FrameHeader {
    /// Decodes the fixed frame header.
    pub fn decode(buf: &[u8; FRAME_HEADER]) -> Result<Self> {
        let flags = buf[0];
        if flags & !FLAG_KEYFRAME != 0 {
            return Err(ProtocolError::UnknownFrameFlags(flags).into());
        }
        let (pts, rest) = split_u64(&buf[1..]);
        let (dts, rest) = split_u64(rest);
        let (ingest_us, rest) = split_u64(rest);
        let mut be = [0u8; 4];
        be.copy_from_slice(rest);
        let announced = u32::from_be_bytes(be);
        let too_large = || ProtocolError::FrameTooLarge {
            len: usize::try_from(announced).unwrap_or(usize::MAX),
            max: MAX_FRAME,
        };
        let len = usize::try_from(announced).map_err(|_| too_large())?;
        if len > MAX_FRAME {
            return Err(too_large().into());
        }
        Ok(Self {
            keyframe: flags & FLAG_KEYFRAME != 0,
            pts,
            dts,
            ingest_us,
            len,
        })
    }

    /// The frame with its payload.
    pub fn with_payload(self, payload: Bytes) -> Frame {
        Frame {
            payload,
            pts: self.pts,
            dts: self.dts,
            keyframe: self.keyframe,
            ingest_us: self.ingest_us,
        }
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when more bytes
/// are needed, else the frame and the bytes used.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>> {
    let Some(head) = buf.get(..FRAME_HEADER) else {
        return Ok(None);
    };
    let mut fixed = [0u8; FRAME_HEADER];
    fixed.copy_from_slice(head);
    let h = FrameHeader::decode(&fixed)?;
    let Some(payload) = buf.get(FRAME_HEADER..FRAME_HEADER + h.len) else {
        return Ok(None);
    };
    Ok(Some((
        h.with_payload(Bytes::copy_from_slice(payload)),
        FRAME_HEADER + h.len,
    )))
}

fn read_error(e: quinn::ReadExactError) -> Error {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => ProtocolError::StreamEndedEarly.into(),
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            Error::Connection(c)
        }
        // The sender abandoned the stream (a superseded group): not garbage.
        quinn::ReadExactError::ReadError(quinn::ReadError::Reset(_)) => Error::Closed,
        quinn::ReadExactError::ReadError(e) => ProtocolError::Read(e).into(),
    }
}

/// Reads one control message.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Message> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(read_error)?;
    let len = message_len(&prefix)?.unwrap_or(0);
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(read_error)?;
    Message::decode_body(&body)
}

/// Reads a group header.
pub async fn read_group_header(recv: &mut quinn::RecvStream) -> Result<GroupHeader> {
    let mut buf = [0u8; GROUP_HEADER_FIXED + MAX_TRACK_NAME];
    let fixed = buf
        .get_mut(..GROUP_HEADER_FIXED)
        .ok_or(ProtocolError::BadGroupHeader)?;
    recv.read_exact(fixed).await.map_err(read_error)?;
    let name_len = usize::from(buf[GROUP_HEADER_FIXED - 1]).min(MAX_TRACK_NAME);
    let name = buf
        .get_mut(GROUP_HEADER_FIXED..GROUP_HEADER_FIXED + name_len)
        .ok_or(ProtocolError::BadGroupHeader)?;
    recv.read_exact(name).await.map_err(read_error)?;
    match GroupHeader::decode(&buf[..GROUP_HEADER_FIXED + name_len])? {
        Some((h, _)) => Ok(h),
        None => Err(ProtocolError::BadGroupHeader.into()),
    }
}

/// Reads the next frame of a group: `Ok(None)` at a clean end of the group.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>> {
    let mut head = [0u8; FRAME_HEADER];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_error(e)),
    }
    let h = FrameHeader::decode(&head)?;
    // Memory grows only as data arrives (never trust the announced length),
    // and a frame that arrives in one chunk is used as is, without a copy.
    let mut remaining = h.len;
    let mut single: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while remaining > 0 {
        let chunk = recv
            .read_chunk(remaining, true)
            .await
            .map_err(|e| read_error(quinn::ReadExactError::ReadError(e)))?
            .ok_or(ProtocolError::StreamEndedEarly)?;
        let bytes = chunk.bytes;
        remaining = remaining.saturating_sub(bytes.len());
        match single.take() {
            None if joined.is_empty() && remaining == 0 => single = Some(bytes),
            None => joined.extend_from_slice(&bytes),
            Some(first) => {
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&bytes);
            }
        }
    }
    let payload = single.unwrap_or_else(|| joined.freeze());
    Ok(Some(h.with_payload(payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::catalog::{Codec, TrackInfo};
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,64}"
    }

    fn rendition() -> impl Strategy<Value = crate::model::catalog::Rendition> {
        (
            ".{0,70}",
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        )
            .prop_map(|(name, width, height, bitrate_kbps, framerate)| {
                crate::model::catalog::Rendition {
                    name,
                    width,
                    height,
                    bitrate_kbps,
                    framerate,
                }
            })
    }

    fn catalog() -> impl Strategy<Value = Catalog> {
        let codec = prop_oneof![
            Just(Codec::H264),
            Just(Codec::H265),
            Just(Codec::Vp8),
            Just(Codec::Vp9),
            Just(Codec::Av1),
            Just(Codec::Opus)
        ];
        let track = (
            name(),
            codec,
            ".{0,40}",
            proptest::option::of(any::<u8>()),
            any::<bool>(),
            proptest::option::of(rendition()),
        )
            .prop_map(
                |(name, codec, fmtp, channels, bframes, rendition)| TrackInfo {
                    name,
                    codec,
                    fmtp,
                    channels,
                    bframes,
                    rendition,
                },
            );
        proptest::collection::vec(track, 0..4).prop_map(|tracks| Catalog { tracks })
    }

    fn message() -> impl Strategy<Value = Message> {
        let proto = "[A-Za-z0-9-]{1,16}";
        prop_oneof![
            any::<[u8; 32]>().prop_map(|nonce| Message::Hello {
                version: VERSION,
                nonce
            }),
            any::<[u8; 32]>().prop_map(|nonce| Message::Challenge { nonce }),
            any::<[u8; 32]>().prop_map(|proof| Message::Auth { proof }),
            any::<[u8; 32]>().prop_map(|proof| Message::AuthOk { proof }),
            (any::<u64>(), name(), proto, catalog()).prop_map(|(id, stream, protocol, catalog)| {
                Message::Publish {
                    id,
                    stream,
                    protocol,
                    catalog,
                }
            }),
            (any::<u64>(), catalog())
                .prop_map(|(id, catalog)| Message::CatalogUpdate { id, catalog }),
            (any::<u64>(), name(), any::<bool>())
                .prop_map(|(id, stream, resume)| Message::Subscribe { id, stream, resume }),
            (any::<u64>(), catalog(), proto).prop_map(|(id, catalog, protocol)| {
                Message::SubscribeOk {
                    id,
                    catalog,
                    protocol,
                }
            }),
            any::<u64>().prop_map(|id| Message::NotFound { id }),
            any::<u64>().prop_map(|id| Message::Unsubscribe { id }),
            (any::<u64>(), name()).prop_map(|(id, track)| Message::KeyframeRequest { id, track }),
            any::<u64>().prop_map(|id| Message::Ended { id }),
            proptest::collection::vec(report(), 0..4).prop_map(|nodes| Message::Load { nodes }),
            (
                proptest::collection::vec(node_id(), 0..8),
                proptest::collection::vec(report(), 0..4)
            )
                .prop_map(|(path, nodes)| Message::Cluster { path, nodes }),
            (
                any::<u64>(),
                proptest::collection::vec(name(), 0..=MAX_TRACKS)
            )
                .prop_map(|(id, tracks)| Message::Select { id, tracks }),
            (
                any::<u64>(),
                proptest::collection::vec((name(), any::<u64>()), 0..=MAX_TRACKS)
            )
                .prop_map(|(id, t)| Message::Heard {
                    id,
                    tracks: t
                        .into_iter()
                        .map(|(track, ingest_us)| Heard { track, ingest_us })
                        .collect(),
                }),
        ]
    }

    fn node_id() -> impl Strategy<Value = String> {
        "[0-9a-f]{1,32}"
    }

    fn report() -> impl Strategy<Value = Report> {
        (
            node_id(),
            "(edge|origin|ingest)",
            "(|https?://[a-z0-9.:]{1,40})",
            any::<(u64, u64, u64, u64, u32, bool, u64)>(),
            proptest::collection::vec(name(), 0..4),
            proptest::collection::vec(node_id(), 0..4),
        )
            .prop_map(|(node, role, url, n, streams, upstream)| Report {
                node,
                role,
                url,
                viewers: n.0,
                sessions: n.1,
                max_sessions: n.2,
                egress_bps: n.3,
                cpu_permille: n.4,
                draining: n.5,
                stream_count: n.6,
                streams,
                upstream,
                age_ms: n.6 % 10_000,
            })
    }

    fn frame() -> impl Strategy<Value = Frame> {
        (
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(p, pts, dts, keyframe, ingest_us)| Frame {
                payload: Bytes::from(p),
                pts,
                dts,
                keyframe,
                ingest_us,
            })
    }

    proptest! {
        #[test]
        fn message_roundtrip(m in message()) {
            let bytes = m.encode().unwrap();
            // `kind` names the type as serde tags it, and it is a known one.
            let json: serde_json::Value = serde_json::from_slice(&bytes[4..]).unwrap();
            prop_assert_eq!(json["type"].as_str(), Some(m.kind()));
            prop_assert!(MESSAGE_TYPES.contains(&m.kind()));
            let (back, used) = Message::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(back, m);
            prop_assert_eq!(used, bytes.len());
            // Every strict prefix asks for more bytes rather than failing.
            let cut = bytes.len() / 2;
            prop_assert!(Message::decode(&bytes[..cut]).unwrap().is_none());
        }

        #[test]
        fn catalog_check_accepts_exactly_valid_renditions(c in catalog()) {
            let ok = c.tracks.len() <= MAX_TRACKS
                && c.tracks.iter().all(|t| {
                    valid_track_name(&t.name)
                        && t.fmtp.len() <= MAX_FMTP
                        && t.rendition.as_ref().is_none_or(|r| {
                            valid_stream_name(&r.name)
                                && r.name.len() <= MAX_RENDITION_NAME
                                && t.codec != Codec::Opus
                        })
                });
            prop_assert_eq!(check_catalog(&c).is_ok(), ok);
            if let Some(t) = c.tracks.iter().find(|t| t.rendition.is_some()) {
                if ok {
                    let r = t.rendition.as_ref().map(|r| r.name.as_str()).unwrap_or("");
                    prop_assert!(valid_track_name(&crate::model::catalog::rendition_track(r)));
                }
            }
        }

        #[test]
        fn select_and_heard_lists_are_bounded_and_named(
            names in proptest::collection::vec(".{0,70}", 0..=MAX_TRACKS + 2),
            heard in any::<bool>(),
        ) {
            let m = if heard {
                Message::Heard {
                    id: 2,
                    tracks: names
                        .iter()
                        .map(|t| Heard { track: t.clone(), ingest_us: 1 })
                        .collect(),
                }
            } else {
                Message::Select { id: 2, tracks: names.clone() }
            };
            let ok = names.len() <= MAX_TRACKS && names.iter().all(|n| valid_track_name(n));
            let body = serde_json::to_vec(&m).unwrap();
            prop_assert_eq!(Message::decode_body(&body).is_ok(), ok);
        }

        #[test]
        fn cluster_json_garbage_never_panics(s in "\\{\"type\":\"(load|cluster)\",\"(nodes|path)\":\\[(\"[0-9a-f]{0,40}\"|\\{\"node\":\"[0-9a-zA-Z]{0,40}\"(,\"[a-z_]{1,12}\":(\"[^\"]{0,30}\"|[0-9]{1,22}|true|\\[\\]))*\\})?\\]\\}") {
            let _ = Message::decode_body(s.as_bytes());
        }

        #[test]
        fn message_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&buf);
            let _ = Message::decode_body(&buf);
        }

        #[test]
        fn message_json_garbage_never_panics(s in "\\{\"type\":\"[a-z_]{0,16}\"(,\"[a-z]{1,8}\":(\"[0-9a-f]{0,70}\"|[0-9]{1,25}|\\{\\}|\\[\\]))*\\}") {
            let _ = Message::decode_body(s.as_bytes());
        }

        #[test]
        fn group_header_roundtrip(id in any::<u64>(), group in any::<u64>(), prev in any::<u64>(), track in name()) {
            let h = GroupHeader { id, group, prev, track };
            let bytes = h.encode().unwrap();
            let (back, used) = GroupHeader::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(used, bytes.len());
            prop_assert!(GroupHeader::decode(&bytes[..bytes.len() - 1]).unwrap().is_none());
        }

        #[test]
        fn group_header_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = GroupHeader::decode(&buf);
        }

        #[test]
        fn frame_roundtrip(f in frame()) {
            let mut bytes = encode_frame_header(&f).unwrap().to_vec();
            bytes.extend_from_slice(&f.payload);
            let (back, used) = decode_frame(&bytes).unwrap().unwrap();
            prop_assert_eq!(back, f);
            prop_assert_eq!(used, bytes.len());
            prop_assert!(decode_frame(&bytes[..bytes.len() - 1]).unwrap().is_none());
        }

        #[test]
        fn frame_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&buf);
            if let Some(head) = buf.get(..FRAME_HEADER) {
                let mut fixed = [0u8; FRAME_HEADER];
                fixed.copy_from_slice(head);
                let _ = FrameHeader::decode(&fixed);
            }
        }
    }

    fn publish(protocol: &str) -> Message {
        Message::Publish {
            id: 2,
            stream: "s".into(),
            protocol: protocol.into(),
            catalog: Catalog::default(),
        }
    }

    /// The body of `msg` with its protocol label replaced, bypassing the encoder.
    fn with_label(msg: &Message, label: &str) -> Vec<u8> {
        let mut json = serde_json::to_value(msg).unwrap();
        json["protocol"] = label.into();
        serde_json::to_vec(&json).unwrap()
    }

    fn protocol_error(r: Result<impl std::fmt::Debug>) -> ProtocolError {
        match r {
            Err(Error::Protocol(e)) => e,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn label_rule() {
        assert!(valid_label("whip"));
        assert!(valid_label("a"));
        assert!(valid_label("rtmp-2"));
        assert!(valid_label(&"a".repeat(MAX_LABEL)));
        assert!(!valid_label(""));
        assert!(!valid_label(&"a".repeat(MAX_LABEL + 1)));
        assert!(!valid_label("a b"));
        assert!(!valid_label("a_b"));
        assert!(!valid_label("é"));
    }

    #[test]
    fn labels_are_checked_by_encoder_and_decoder() {
        let ok = Message::SubscribeOk {
            id: 1,
            catalog: Catalog::default(),
            protocol: "rtmp".into(),
        };
        for msg in [publish("whip"), ok] {
            assert!(Message::decode_body(&with_label(&msg, "relay")).is_ok());
            for bad in ["", "seventeen-chars-x", "no space"] {
                let e = protocol_error(Message::decode_body(&with_label(&msg, bad)));
                assert!(matches!(e, ProtocolError::BadLabel), "{bad:?}: {e}");
            }
        }
        for bad in ["", "seventeen-chars-x", "no space"] {
            let e = protocol_error(publish(bad).encode());
            assert!(matches!(e, ProtocolError::BadLabel), "{bad:?}: {e}");
        }
        assert!(publish(&"a".repeat(MAX_LABEL)).encode().is_ok());
    }

    #[test]
    fn errors_name_their_cause() {
        let hello = serde_json::json!({"type": "hello", "version": 1, "nonce": "00".repeat(32)});
        let hello = serde_json::to_vec(&hello).unwrap();
        assert!(matches!(
            protocol_error(Message::decode_body(&hello)),
            ProtocolError::VersionMismatch {
                ours: VERSION,
                theirs: 1
            }
        ));
        let unknown = protocol_error(Message::decode_body(br#"{"type":"teleport","id":4}"#));
        assert!(matches!(&unknown, ProtocolError::UnknownMessage(t) if t == "teleport"));
        assert_eq!(
            unknown.to_string(),
            "unknown control message type \"teleport\""
        );
        let missing = br#"{"type":"ended"}"#;
        assert!(matches!(
            protocol_error(Message::decode_body(missing)),
            ProtocolError::MalformedMessage(_)
        ));
        assert!(matches!(
            protocol_error(Message::decode_body(b"not json")),
            ProtocolError::MalformedMessage(_)
        ));
        assert!(matches!(
            protocol_error(Message::decode(&[0xff, 0xff, 0xff, 0xff])),
            ProtocolError::MessageTooLarge {
                len: 0xffff_ffff,
                max: MAX_MESSAGE
            }
        ));
        let mut head = [0u8; FRAME_HEADER];
        head[0] = 0x80;
        assert!(matches!(
            protocol_error(FrameHeader::decode(&head)),
            ProtocolError::UnknownFrameFlags(0x80)
        ));
        head[0] = 0;
        head[FRAME_HEADER - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            protocol_error(FrameHeader::decode(&head)),
            ProtocolError::FrameTooLarge { max: MAX_FRAME, .. }
        ));
        let header = GroupHeader {
            id: 0,
            group: 1,
            prev: 0,
            track: "a b".into(),
        };
        assert!(matches!(
            protocol_error(header.encode()),
            ProtocolError::BadTrackName
        ));
        let catalog = Catalog {
            tracks: vec![
                crate::model::catalog::TrackInfo {
                    name: "video".into(),
                    codec: Codec::H264,
                    fmtp: String::new(),
                    channels: None,
                    bframes: false,
                    rendition: None,
                };
                MAX_TRACKS + 1
            ],
        };
        // A catalog over the caps still decodes (it concerns one stream,
        // which the link refuses); the check names the problem.
        let update = Message::CatalogUpdate { id: 1, catalog };
        let (back, _) = Message::decode(&update.encode().unwrap()).unwrap().unwrap();
        let Message::CatalogUpdate { catalog, .. } = back else {
            panic!("catalog update expected");
        };
        assert!(matches!(
            check_catalog(&catalog),
            Err(ProtocolError::TooManyTracks {
                count: 17,
                max: MAX_TRACKS
            })
        ));
    }

    #[test]
    fn rendition_names_are_checked() {
        use crate::model::catalog::{rendition_track, Rendition};
        let track = |codec, name: &str| TrackInfo {
            name: "video-x".into(),
            codec,
            fmtp: String::new(),
            channels: None,
            bframes: false,
            rendition: Some(Rendition {
                name: name.into(),
                width: 640,
                height: 360,
                bitrate_kbps: 800,
                framerate: 30,
            }),
        };
        let check = |t| check_catalog(&Catalog { tracks: vec![t] });
        assert!(check(track(Codec::H264, "h")).is_ok());
        assert!(check(track(Codec::Vp8, "720p")).is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(MAX_RENDITION_NAME + 1)] {
            assert!(
                matches!(
                    check(track(Codec::H264, bad)),
                    Err(ProtocolError::BadRendition)
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check(track(Codec::Opus, "h")),
            Err(ProtocolError::BadRendition)
        ));
        let longest = "x".repeat(MAX_RENDITION_NAME);
        assert!(valid_track_name(&rendition_track(&longest)));
    }

    #[test]
    fn limits_are_enforced() {
        let mut big = vec![0xff, 0xff, 0xff, 0xff];
        big.extend_from_slice(b"{}");
        assert!(Message::decode(&big).is_err());
        let mut head = [0u8; FRAME_HEADER];
        head[FRAME_HEADER - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(FrameHeader::decode(&head).is_err());
        head[0] = 0x80;
        assert!(FrameHeader::decode(&head).is_err());
        let bad = Message::Subscribe {
            id: 1,
            stream: "a b".into(),
            resume: false,
        };
        let bytes = bad.encode().unwrap();
        assert!(Message::decode(&bytes).is_err());
        let hello = br#"{"type":"hello","version":1,"nonce":"00"}"#;
        assert!(Message::decode_body(hello).is_err());
        // Forward compatible: extra fields are ignored, unknown types refused.
        let extra = br#"{"type":"ended","id":4,"reason":"later revision"}"#;
        assert_eq!(
            Message::decode_body(extra).unwrap(),
            Message::Ended { id: 4 }
        );
        assert!(Message::decode_body(br#"{"type":"teleport","id":4}"#).is_err());
    }

    #[test]
    fn load_reports_are_validated_and_bounded() {
        // Fields a later version adds are ignored; missing ones default.
        let min = br#"{"type":"load","nodes":[{"node":"0a","future":1}]}"#;
        let Message::Load { nodes } = Message::decode_body(min).unwrap() else {
            panic!("load expected");
        };
        assert_eq!(nodes[0].node, "0a");
        assert_eq!(nodes[0].upstream, Vec::<String>::new());
        for bad in [
            r#"{"type":"load","nodes":[{"node":"XY"}]}"#,
            r#"{"type":"load","nodes":[{"node":"0a","url":"file:///etc"}]}"#,
            r#"{"type":"load","nodes":[{"node":"0a","streams":["a b"]}]}"#,
            r#"{"type":"cluster","path":["not hex"],"nodes":[]}"#,
        ] {
            assert!(
                matches!(
                    protocol_error(Message::decode_body(bad.as_bytes())),
                    ProtocolError::BadReport(_)
                ),
                "{bad}"
            );
        }
        // The largest message the caps allow fits the wire's limit.
        let big = Report {
            node: "f".repeat(crate::cluster::MAX_ID),
            role: "ingest".into(),
            url: format!("https://{}", "a".repeat(crate::cluster::MAX_URL - 8)),
            viewers: u64::MAX,
            sessions: u64::MAX,
            max_sessions: u64::MAX,
            egress_bps: u64::MAX,
            cpu_permille: u32::MAX,
            draining: true,
            streams: vec!["s".repeat(64); crate::cluster::MAX_STREAMS],
            stream_count: u64::MAX,
            upstream: vec!["f".repeat(crate::cluster::MAX_ID); crate::cluster::MAX_TIERS],
            age_ms: u64::MAX,
        };
        let msg = Message::Cluster {
            path: vec!["f".repeat(crate::cluster::MAX_ID); crate::cluster::MAX_TIERS],
            nodes: vec![big; crate::cluster::MAX_REPORT_NODES],
        };
        let bytes = msg.encode().unwrap();
        assert!(bytes.len() <= MAX_MESSAGE + 4);
        assert_eq!(Message::decode(&bytes).unwrap().unwrap().0, msg);
    }
}
