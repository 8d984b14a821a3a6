//! A minimal RTMP publisher for the root tests (the root package has no
//! rml_rtmp): plain handshake, connect / createStream / publish, chunked
//! FLV tag bodies; replays an FLV that Debian's ffmpeg encoded, in real time,
//! with our SEI tag (loadtest::tag: sequence + send wall clock) in every AVC
//! access unit so viewers can measure publish → viewer latency.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Chunk size we announce: frames go out in few chunks.
const CHUNK: usize = 4096;
/// Any single network wait of the client.
const WAIT: Duration = Duration::from_secs(10);

/// One FLV tag: 8 audio, 9 video; timestamp in ms; body.
pub struct Tag {
    pub kind: u8,
    pub ts: u32,
    pub data: Vec<u8>,
}

pub fn read_flv(file: &[u8]) -> Vec<Tag> {
    assert_eq!(&file[..3], b"FLV");
    let mut at = u32::from_be_bytes(file[5..9].try_into().unwrap()) as usize + 4;
    let mut tags = Vec::new();
    while at + 11 <= file.len() {
        let h = &file[at..at + 11];
        let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let end = at + 11 + size;
        if end > file.len() {
            break;
        }
        if h[0] == 8 || h[0] == 9 {
            tags.push(Tag {
                kind: h[0],
                ts,
                data: file[at + 11..end].to_vec(),
            });
        }
        at = end + 4;
    }
    tags
}

/// `secs` of testsrc2 + a tone as FLV (x264 veryfast, 2 s GOP, AAC).
pub async fn encode_flv(secs: u32, extra: &[&str]) -> Vec<u8> {
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=640x360:rate=30:duration={secs}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!(
            "sine=frequency=1000:sample_rate=48000:duration={secs}"
        ))
        .args(["-c:v", "libx264", "-preset", "veryfast", "-g", "60"])
        .args(["-pix_fmt", "yuv420p"])
        .args(extra)
        .args(["-c:a", "aac", "-ac", "2", "-f", "flv", "pipe:1"])
        .output()
        .await
        .expect("ffmpeg runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

// AMF0, just what publishing needs.
fn amf_str(out: &mut Vec<u8>, s: &str) {
    out.push(0x02);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn amf_num(out: &mut Vec<u8>, n: f64) {
    out.push(0x00);
    out.extend_from_slice(&n.to_be_bytes());
}

fn amf_obj(out: &mut Vec<u8>, fields: &[(&str, &str)]) {
    out.push(0x03);
    for (k, v) in fields {
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        amf_str(out, v);
    }
    out.extend_from_slice(&[0, 0, 9]);
}

/// One RTMP message as chunks (type-0 header, then type-3 continuations).
fn chunks(csid: u8, ts: u32, type_id: u8, msid: u32, payload: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 16 + payload.len() / size);
    out.push(csid);
    out.extend_from_slice(&ts.to_be_bytes()[1..]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(type_id);
    out.extend_from_slice(&msid.to_le_bytes());
    for (i, part) in payload.chunks(size).enumerate() {
        if i > 0 {
            out.push(0xC0 | csid);
        }
        out.extend_from_slice(part);
    }
    out
}

/// A publishing RTMP client: plain handshake, connect, createStream, publish.
pub struct Client {
    io: TcpStream,
    seen: Vec<u8>,
}

impl Client {
    pub async fn publish(addr: &str, app: &str, key: &str) -> Self {
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.set_nodelay(true).unwrap();
        let mut c1 = vec![0u8; 1537];
        c1[0] = 3;
        for (i, b) in c1.iter_mut().enumerate().skip(9) {
            *b = (i * 7 + 13) as u8;
        }
        io.write_all(&c1).await.unwrap();
        let mut s = vec![0u8; 1 + 1536 + 1536];
        tokio::time::timeout(WAIT, io.read_exact(&mut s))
            .await
            .unwrap()
            .unwrap();
        io.write_all(&s[1..1537]).await.unwrap(); // C2 echoes S1
        let mut c = Self {
            io,
            seen: Vec::new(),
        };
        c.send(2, 0, 1, 0, &(CHUNK as u32).to_be_bytes(), 128).await;
        let mut cmd = Vec::new();
        amf_str(&mut cmd, "connect");
        amf_num(&mut cmd, 1.0);
        let tc = format!("rtmp://{addr}/{app}");
        amf_obj(
            &mut cmd,
            &[("app", app), ("type", "nonprivate"), ("tcUrl", &tc)],
        );
        c.send(3, 0, 20, 0, &cmd, CHUNK).await;
        c.until("NetConnection.Connect.Success").await;
        let mut cmd = Vec::new();
        amf_str(&mut cmd, "createStream");
        amf_num(&mut cmd, 2.0);
        cmd.push(0x05);
        c.send(3, 0, 20, 0, &cmd, CHUNK).await;
        let results = c.count("_result");
        while c.count("_result") == results {
            c.read_some().await;
        }
        let mut cmd = Vec::new();
        amf_str(&mut cmd, "publish");
        amf_num(&mut cmd, 3.0);
        cmd.push(0x05);
        amf_str(&mut cmd, key);
        amf_str(&mut cmd, "live");
        // rml_rtmp numbers streams from 1.
        c.send(3, 0, 20, 1, &cmd, CHUNK).await;
        c.until("NetStream.Publish.Start").await;
        c
    }

    async fn send(&mut self, csid: u8, ts: u32, type_id: u8, msid: u32, p: &[u8], size: usize) {
        let bytes = chunks(csid, ts, type_id, msid, p, size);
        self.io.write_all(&bytes).await.unwrap();
    }

    fn count(&self, what: &str) -> usize {
        self.seen
            .windows(what.len())
            .filter(|w| *w == what.as_bytes())
            .count()
    }

    async fn read_some(&mut self) {
        let mut buf = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.io.read(&mut buf))
            .await
            .expect("server answers")
            .unwrap();
        assert!(
            n > 0,
            "server closed: {}",
            String::from_utf8_lossy(&self.seen)
        );
        self.seen.extend_from_slice(&buf[..n]);
    }

    async fn until(&mut self, what: &str) {
        while self.count(what) == 0 {
            self.read_some().await;
        }
    }

    /// Discards what the server sends (acknowledgements), without blocking.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.io.try_read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// Replays `tags` in real time (by FLV timestamp); every AVC NALU tag gets
/// an SEI tag with the wall clock just before its bytes are written.
pub async fn replay(mut c: Client, tags: Vec<Tag>) {
    let start = tokio::time::Instant::now();
    let mut seq = 0u64;
    for t in tags {
        tokio::time::sleep_until(start + Duration::from_millis(u64::from(t.ts))).await;
        let mut body = t.data;
        // AVC (codec 7), AVCPacketType 1 (NALUs): SEI as the first NAL unit.
        if t.kind == 9 && body.len() > 5 && body[0] & 0x0f == 7 && body[1] == 1 {
            let sei = loadtest::tag::sei_nal(loadtest::tag::Tag {
                seq,
                sent_us: cascade_origin::wallclock_us(),
            });
            seq += 1;
            let mut tagged = body[..5].to_vec();
            tagged.extend_from_slice(&(sei.len() as u32).to_be_bytes());
            tagged.extend_from_slice(&sei);
            tagged.extend_from_slice(&body[5..]);
            body = tagged;
        }
        let csid = if t.kind == 8 { 4 } else { 6 };
        c.send(csid, t.ts, t.kind, 1, &body, CHUNK).await;
        c.drain();
    }
}

/// `secs` of testsrc2 (320×240, 30 fps, 1 s GOP) as enhanced-RTMP video tags,
/// as OBS sends them: AV1 (`av01`) or HEVC (`hvc1`, no B-frames). The first
/// tag is the sequence start (av1C / hvcC), then one coded frame per tag.
/// Debian's ffmpeg 5.1 cannot mux E-RTMP, so the tags are packed here.
pub async fn encode_enhanced(hevc: bool, secs: u32) -> Vec<Tag> {
    let codec: &[&str] = if hevc {
        &[
            "-c:v",
            "libx265",
            "-bf",
            "0",
            "-x265-params",
            "log-level=error",
        ]
    } else {
        &["-c:v", "libaom-av1", "-usage", "realtime", "-cpu-used", "8"]
    };
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=320x240:rate=30:duration={secs}"))
        .args(["-pix_fmt", "yuv420p", "-g", "30", "-b:v", "400k"])
        .args(codec)
        .args(["-f", if hevc { "hevc" } else { "obu" }, "pipe:1"])
        .output()
        .await
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (fourcc, config, units) = if hevc {
        hevc_units(&out.stdout)
    } else {
        av1_units(&out.stdout)
    };
    let mut seq_start = vec![0x90];
    seq_start.extend_from_slice(fourcc);
    seq_start.extend_from_slice(&config);
    let mut tags = vec![Tag {
        kind: 9,
        ts: 0,
        data: seq_start,
    }];
    for (i, (key, unit)) in units.into_iter().enumerate() {
        // CodedFramesX (3) for HEVC: no composition offset; AV1 uses 1.
        let mut data = vec![0x80 | if key { 0x10 } else { 0x20 } | if hevc { 3 } else { 1 }];
        data.extend_from_slice(fourcc);
        data.extend_from_slice(&unit);
        tags.push(Tag {
            kind: 9,
            ts: (i as u32) * 1000 / 30,
            data,
        });
    }
    tags
}

/// FourCC, configuration record, (keyframe, coded frame) per picture.
type Packed = (&'static [u8; 4], Vec<u8>, Vec<(bool, Vec<u8>)>);

/// av1C + temporal units (temporal delimiters and sequence headers dropped).
fn av1_units(mut data: &[u8]) -> Packed {
    let mut config = vec![0x81, 0x00, 0x0c, 0x00]; // av1C: version 1, profile 0
    let mut units: Vec<(bool, Vec<u8>)> = Vec::new();
    while let Some(&h) = data.first() {
        let mut at = 1 + usize::from(h & 0x04 != 0);
        let mut size = 0usize;
        for i in 0..8 {
            let b = data[at];
            at += 1;
            size |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        let (obu, rest) = data.split_at(at + size);
        data = rest;
        match (h >> 3) & 0x0f {
            2 => units.push((false, Vec::new())),
            1 => {
                if config.len() == 4 {
                    config.extend_from_slice(obu);
                }
                if let Some((key, _)) = units.last_mut() {
                    *key = true;
                }
            }
            _ => {
                if let Some((_, tu)) = units.last_mut() {
                    tu.extend_from_slice(obu);
                }
            }
        }
    }
    (b"av01", config, units)
}

/// hvcC (VPS/SPS/PPS) + length-prefixed access units.
fn hevc_units(stream: &[u8]) -> Packed {
    let mut nals = Vec::new();
    let mut i = 0;
    let mut start = None;
    while i + 3 <= stream.len() {
        if stream[i..i + 3] == [0, 0, 1] {
            if let Some(s) = start {
                let mut end = i;
                while end > s && stream[end - 1] == 0 {
                    end -= 1;
                }
                nals.push(&stream[s..end]);
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        nals.push(&stream[s..]);
    }
    let kind = |n: &[u8]| (n[0] >> 1) & 0x3f;
    let params: Vec<&[u8]> = nals
        .iter()
        .copied()
        .filter(|n| (32..=34).contains(&kind(n)))
        .take(3)
        .collect();
    // hvcC: version, profile (Main), 19 bytes the ingest does not read, length size 4.
    let mut config = vec![1, 1];
    config.extend_from_slice(&[0; 19]);
    config.extend_from_slice(&[0xff, 3]);
    for p in &params {
        config.push(0x80 | kind(p));
        config.extend_from_slice(&1u16.to_be_bytes());
        config.extend_from_slice(&(p.len() as u16).to_be_bytes());
        config.extend_from_slice(p);
    }
    let mut units: Vec<(bool, Vec<u8>)> = Vec::new();
    for n in nals.iter().filter(|n| n.len() > 2) {
        let t = kind(n);
        if (32..=35).contains(&t) {
            continue;
        }
        if t < 32 && n[2] & 0x80 != 0 {
            units.push((false, Vec::new()));
        }
        let Some((key, au)) = units.last_mut() else {
            continue;
        };
        *key |= (16..=21).contains(&t);
        au.extend_from_slice(&(n.len() as u32).to_be_bytes());
        au.extend_from_slice(n);
    }
    (b"hvc1", config, units)
}
