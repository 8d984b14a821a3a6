//! A sans-IO guard that walks the RTMP chunk stream (RTMP 1.0 §5.3) ahead of
//! rml_rtmp's deserializer and refuses what it would mishandle: oversized or
//! interleaved messages, absurd chunk sizes, malformed extended timestamps.
//!
//! rml_rtmp buffers a whole message before it looks at it, keeps one partial
//! message for all chunk streams, and underflows on some malformed headers;
//! this guard sees the same bytes first and ends the connection instead.

use std::collections::HashMap;

/// Largest audio/video message: a 4K keyframe at a high bitrate fits; the
/// deserializer buffers a whole message, so this bounds memory per publisher.
pub const MAX_MEDIA_MESSAGE: u32 = 8 * 1024 * 1024;
/// Largest AMF command/data message. Real ones are under 1 KiB; the AMF0
/// parser recurses per nesting level, so size also bounds its stack depth.
pub const MAX_COMMAND_MESSAGE: u32 = 4 * 1024;
/// Largest protocol control message (types 1–6 carry at most 10 bytes).
pub const MAX_CONTROL_MESSAGE: u32 = 64;
/// Largest message of any other type; such messages are dropped anyway.
pub const MAX_OTHER_MESSAGE: u32 = 64 * 1024;
/// Largest message of any type before the connection is authorised (a
/// publish with a valid token): commands and control messages are far
/// smaller, so an anonymous peer can make the deserializer buffer no more
/// than this.
pub const MAX_UNAUTHORISED_MESSAGE: u32 = 64 * 1024;
/// Largest chunk size a peer may set. Encoders use 4096 to 65536.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Chunk streams one connection may use; encoders use four or five.
pub const MAX_CHUNK_STREAMS: usize = 64;

/// The chunk size every connection starts with (RTMP 1.0 §5.4.1).
const INITIAL_CHUNK_SIZE: u32 = 128;
/// A 24-bit timestamp field at this value means "extended timestamp follows".
const EXTENDED: u32 = 0x00ff_ffff;
/// Longest chunk header: 3-byte basic header, 11-byte message header,
/// 4-byte extended timestamp.
const MAX_HEADER: usize = 18;

/// Why the chunk stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message is larger than its type allows.
    #[error("message of type {type_id} too large: {len} bytes")]
    Oversized {
        /// Message type id.
        type_id: u8,
        /// Announced length.
        len: u32,
    },
    /// A compressed header referred to a chunk stream never opened.
    #[error("chunk stream {0} used before a full header")]
    NoPrevious(u32),
    /// A new message started while another was incomplete.
    #[error("interleaved chunk streams")]
    Interleaved,
    /// The peer set a chunk size outside 1..=MAX_CHUNK_SIZE.
    #[error("bad chunk size {0}")]
    ChunkSize(u32),
    /// An extended timestamp smaller than the 24-bit escape value.
    #[error("bad extended timestamp")]
    ExtendedTimestamp,
    /// Too many chunk streams in use.
    #[error("too many chunk streams")]
    TooManyStreams,
}

#[derive(Clone, Copy)]
struct Header {
    ts_field: u32,
    len: u32,
    type_id: u8,
}

/// The message being received: its chunk stream, type and bytes still due.
#[derive(Clone, Copy)]
struct InFlight {
    csid: u32,
    type_id: u8,
    remaining: u32,
}

/// Mirrors the chunk layer of one connection (after the handshake).
pub struct Guard {
    chunk_size: u32,
    previous: HashMap<u32, Header>,
    header: Vec<u8>,
    in_flight: Option<InFlight>,
    /// Payload bytes left in the current chunk.
    chunk_left: u32,
    /// First bytes of a Set Chunk Size message, to follow the size change.
    capture: Vec<u8>,
    /// Message type ids seen that neither rml_rtmp nor we handle.
    unknown_types: u64,
    /// Set once a publish was accepted: media messages may then be large.
    authorised: bool,
}

impl Default for Guard {
    fn default() -> Self {
        Self::new()
    }
}

impl Guard {
    /// A guard for a fresh connection.
    pub fn new() -> Self {
        Self {
            chunk_size: INITIAL_CHUNK_SIZE,
            previous: HashMap::new(),
            header: Vec::with_capacity(MAX_HEADER),
            in_flight: None,
            chunk_left: 0,
            capture: Vec::with_capacity(4),
            unknown_types: 0,
            authorised: false,
        }
    }

    /// The peer is authorised (its publish was accepted): media messages up
    /// to [`MAX_MEDIA_MESSAGE`] from now on, [`MAX_UNAUTHORISED_MESSAGE`]
    /// before.
    pub fn authorise(&mut self) {
        self.authorised = true;
    }

    /// Messages of types no one handles seen so far.
    pub fn unknown_types(&self) -> u64 {
        self.unknown_types
    }

    /// Checks the next bytes of the stream; on `Err` the connection must end.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            if self.chunk_left > 0 {
                let n = data.len().min(self.chunk_left as usize);
                let (payload, rest) = data.split_at(n);
                if self.in_flight.is_some_and(|m| m.type_id == 1) && self.capture.len() < 4 {
                    let want = (4 - self.capture.len()).min(payload.len());
                    self.capture.extend_from_slice(&payload[..want]);
                }
                data = rest;
                // invariant: n <= chunk_left, which is a u32.
                self.chunk_left -= n as u32;
                if self.chunk_left == 0 {
                    self.end_chunk()?;
                }
                continue;
            }
            let Some((&b, rest)) = data.split_first() else {
                break;
            };
            data = rest;
            self.header.push(b);
            if let Some(chunk_len) = self.try_header()? {
                self.header.clear();
                self.chunk_left = chunk_len;
                if chunk_len == 0 {
                    self.end_chunk()?;
                }
            }
        }
        Ok(())
    }

    /// Parses the buffered header bytes; `None` until they are complete.
    fn try_header(&mut self) -> Result<Option<u32>, Error> {
        let h = &self.header;
        let Some(&b0) = h.first() else {
            return Ok(None);
        };
        let fmt = b0 >> 6;
        let (csid, mut at) = match b0 & 0x3f {
            0 => match h.get(1) {
                Some(&b) => (u32::from(b) + 64, 2),
                None => return Ok(None),
            },
            1 => match (h.get(1), h.get(2)) {
                (Some(&lo), Some(&hi)) => (u32::from(hi) * 256 + u32::from(lo) + 64, 3),
                _ => return Ok(None),
            },
            n => (u32::from(n), 1),
        };
        let previous = self.previous.get(&csid).copied();
        let mut header = match (fmt, previous) {
            (0, _) => Header {
                ts_field: 0,
                len: 0,
                type_id: 0,
            },
            (_, Some(p)) => p,
            (_, None) => return Err(Error::NoPrevious(csid)),
        };
        let body = match fmt {
            0 => 11,
            1 => 7,
            2 => 3,
            _ => 0,
        };
        let Some(fields) = h.get(at..at + body) else {
            return Ok(None);
        };
        if body >= 3 {
            header.ts_field = u24(&fields[0..3]);
        }
        if body >= 7 {
            header.len = u24(&fields[3..6]);
            header.type_id = fields[6];
        }
        at += body;
        if header.ts_field >= EXTENDED {
            let Some(ext) = h.get(at..at + 4) else {
                return Ok(None);
            };
            let ext = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]);
            // rml_rtmp subtracts the escape value from a delta's extended
            // field; a smaller value would underflow there.
            if fmt != 0 && self.in_flight.is_none() && ext < EXTENDED {
                return Err(Error::ExtendedTimestamp);
            }
        }
        if self.previous.len() >= MAX_CHUNK_STREAMS && !self.previous.contains_key(&csid) {
            return Err(Error::TooManyStreams);
        }
        self.previous.insert(csid, header);
        let remaining = match self.in_flight {
            Some(m) if m.csid == csid && fmt == 3 => m.remaining,
            Some(_) => return Err(Error::Interleaved),
            None => {
                check_size(header.type_id, header.len, self.authorised)?;
                if !known_type(header.type_id) {
                    self.unknown_types += 1;
                }
                self.capture.clear();
                self.in_flight = Some(InFlight {
                    csid,
                    type_id: header.type_id,
                    remaining: header.len,
                });
                header.len
            }
        };
        Ok(Some(remaining.min(self.chunk_size)))
    }

    /// A chunk's payload ended: maybe the message too.
    fn end_chunk(&mut self) -> Result<(), Error> {
        let Some(mut m) = self.in_flight else {
            return Ok(());
        };
        let chunk = m.remaining.min(self.chunk_size);
        m.remaining -= chunk;
        if m.remaining > 0 {
            self.in_flight = Some(m);
            return Ok(());
        }
        self.in_flight = None;
        if m.type_id == 1 {
            // rml_rtmp applies the new size as soon as the message completes.
            let c = &self.capture;
            let size = match c.get(..4) {
                Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                None => return Err(Error::ChunkSize(0)),
            };
            if !(1..=MAX_CHUNK_SIZE).contains(&size) {
                return Err(Error::ChunkSize(size));
            }
            self.chunk_size = size;
        }
        Ok(())
    }
}

fn u24(b: &[u8]) -> u32 {
    b.iter().take(3).fold(0, |v, &x| v << 8 | u32::from(x))
}

fn known_type(type_id: u8) -> bool {
    matches!(type_id, 1..=6 | 8 | 9 | 15 | 17 | 18 | 20)
}

fn check_size(type_id: u8, len: u32, authorised: bool) -> Result<(), Error> {
    let max = match type_id {
        1..=6 => MAX_CONTROL_MESSAGE,
        8 | 9 if authorised => MAX_MEDIA_MESSAGE,
        8 | 9 => MAX_UNAUTHORISED_MESSAGE,
        15..=20 => MAX_COMMAND_MESSAGE,
        _ => MAX_OTHER_MESSAGE,
    };
    if len > max {
        return Err(Error::Oversized { type_id, len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full(csid: u8, ts: u32, type_id: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![csid];
        v.extend_from_slice(&ts.to_be_bytes()[1..]);
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        v.push(type_id);
        v.extend_from_slice(&[1, 0, 0, 0]);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn chunked_message_and_chunk_size_change() {
        let mut g = Guard::new();
        // 300 bytes at chunk size 128: a full chunk then two type-3 chunks.
        let payload = vec![0u8; 300];
        let mut v = full(4, 0, 9, &payload[..128]);
        v[5] = 0x01; // length 300 = 0x00012c
        v[6] = 0x2c;
        v.push(0xc4);
        v.extend_from_slice(&payload[128..256]);
        v.push(0xc4);
        v.extend_from_slice(&payload[256..]);
        g.feed(&v).unwrap();
        g.feed(&full(2, 0, 1, &4096u32.to_be_bytes())).unwrap();
        assert_eq!(g.chunk_size, 4096);
        // Byte by byte gives the same result.
        let mut g2 = Guard::new();
        for b in full(2, 0, 1, &4096u32.to_be_bytes()) {
            g2.feed(&[b]).unwrap();
        }
        assert_eq!(g2.chunk_size, 4096);
    }

    #[test]
    fn refusals() {
        let mut g = Guard::new();
        g.authorise();
        let mut big = full(4, 0, 9, &[]);
        big[4..7].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(g.feed(&big), Err(Error::Oversized { .. })));
        let mut g = Guard::new();
        assert_eq!(g.feed(&[0xc5]), Err(Error::NoPrevious(5)));
        let mut g = Guard::new();
        assert_eq!(
            g.feed(&full(2, 0, 1, &0u32.to_be_bytes())),
            Err(Error::ChunkSize(0))
        );
        let mut g = Guard::new();
        let mut v = full(4, 0, 9, &[0; 10]);
        v[6] = 200; // announce 200 bytes, send 128 then start another message
        v.truncate(12);
        v.extend_from_slice(&[0; 128]);
        v.extend_from_slice(&full(5, 0, 8, &[1]));
        assert_eq!(g.feed(&v), Err(Error::Interleaved));
        let mut g = Guard::new();
        let mut cmd = full(3, 0, 20, &[]);
        cmd[4..7].copy_from_slice(&[0, 0x20, 0]);
        assert!(matches!(g.feed(&cmd), Err(Error::Oversized { .. })));
    }

    /// An announced media message of `len` bytes (header only).
    fn media_header(len: u32) -> Vec<u8> {
        let mut v = full(4, 0, 9, &[]);
        v[4..7].copy_from_slice(&len.to_be_bytes()[1..]);
        v
    }

    #[test]
    fn small_messages_until_authorised() {
        // Before the publish is accepted: 64 KiB at most, even for media.
        let mut g = Guard::new();
        g.feed(&media_header(MAX_UNAUTHORISED_MESSAGE)).unwrap();
        let mut g = Guard::new();
        assert_eq!(
            g.feed(&media_header(MAX_UNAUTHORISED_MESSAGE + 1)),
            Err(Error::Oversized {
                type_id: 9,
                len: MAX_UNAUTHORISED_MESSAGE + 1
            })
        );
        let mut g = Guard::new();
        assert!(g.feed(&media_header(MAX_MEDIA_MESSAGE)).is_err(), "8 MiB");
        // After: keyframes up to 8 MiB, not more.
        let mut g = Guard::new();
        g.authorise();
        g.feed(&media_header(MAX_MEDIA_MESSAGE)).unwrap();
        let mut g = Guard::new();
        g.authorise();
        assert!(g.feed(&media_header(MAX_MEDIA_MESSAGE + 1)).is_err());
        // Other types keep their own caps either way.
        let mut g = Guard::new();
        g.authorise();
        let mut other = full(3, 0, 22, &[]);
        other[4..7].copy_from_slice(&(MAX_OTHER_MESSAGE + 1).to_be_bytes()[1..]);
        assert!(g.feed(&other).is_err());
    }

    #[test]
    fn extended_timestamps() {
        let mut g = Guard::new();
        let mut v = vec![4, 0xff, 0xff, 0xff, 0, 0, 1, 9, 1, 0, 0, 0];
        v.extend_from_slice(&0x0100_0000u32.to_be_bytes());
        v.push(7);
        // A type-3 message inheriting the escape carries an extended field.
        v.push(0xc4);
        v.extend_from_slice(&0x0100_0000u32.to_be_bytes());
        v.push(8);
        g.feed(&v).unwrap();
        let mut bad = vec![0x84, 0xff, 0xff, 0xff];
        bad.extend_from_slice(&5u32.to_be_bytes());
        assert_eq!(g.feed(&bad), Err(Error::ExtendedTimestamp));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048), authorised: bool) {
            let mut g = Guard::new();
            if authorised {
                g.authorise();
            }
            let _ = g.feed(&data);
        }
    }
}
