//! A plain (unencrypted) RTP sender of the test clip, for servers fed by RTP such as Janus's
//! streaming plugin: H.264 (RFC 6184 single NAL units and FU-A) and Opus, paced in real time,
//! every video frame tagged like the WHIP publisher's so viewers measure the same latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::media::TestMedia;
use crate::tag::{self, Tag};
use crate::{annexb, wallclock_us, Result};

/// Largest RTP payload: fits a 1,200-byte datagram with the 12-byte header.
const MAX_PAYLOAD: usize = 1188;
/// H.264 FU-A NAL unit type.
const FU_A: u8 = 28;

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// Video RTP destination.
    pub video: SocketAddr,
    /// Audio RTP destination.
    pub audio: SocketAddr,
    /// H.264 payload type.
    pub video_pt: u8,
    /// Opus payload type.
    pub audio_pt: u8,
    /// Stop after this long.
    pub duration: Duration,
}

/// RTP payloads of one H.264 access unit (RFC 6184 §5.6 single NAL, §5.8 FU-A).
pub fn h264_payloads(au: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for nal in annexb::nal_units(au) {
        let Some((&header, body)) = nal.split_first() else {
            continue;
        };
        // Access unit delimiters carry nothing a receiver needs.
        if header & 0x1f == 9 {
            continue;
        }
        if nal.len() <= MAX_PAYLOAD {
            out.push(nal.to_vec());
            continue;
        }
        let indicator = (header & 0xe0) | FU_A;
        let chunks: Vec<&[u8]> = body.chunks(MAX_PAYLOAD - 2).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, c) in chunks.into_iter().enumerate() {
            let mut fu = (header & 0x1f) | if i == 0 { 0x80 } else { 0 };
            if i == last {
                fu |= 0x40;
            }
            let mut p = Vec::with_capacity(c.len() + 2);
            p.extend_from_slice(&[indicator, fu]);
            p.extend_from_slice(c);
            out.push(p);
        }
    }
    out
}

fn rtp(pt: u8, marker: bool, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + payload.len());
    p.extend_from_slice(&[0x80, pt | if marker { 0x80 } else { 0 }]);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// Sends the clip in a loop until `duration` ends; returns the video frames sent.
pub async fn run(media: Arc<TestMedia>, o: FeedOptions) -> Result<u64> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    let start = Instant::now();
    let (vssrc, assrc) = (rand::random::<u32>(), rand::random::<u32>());
    let (mut vseq, mut aseq) = (rand::random::<u16>(), rand::random::<u16>());
    let (mut vi, mut ai, mut loops_v, mut loops_a) = (0usize, 0usize, 0u64, 0u64);
    let mut sent = 0u64;
    while start.elapsed() < o.duration {
        let elapsed = start.elapsed();
        let vt = loops_v * media.duration_90k + media.video.get(vi).map_or(0, |f| f.pts_90k);
        let at = loops_a * media.duration_48k + media.audio.get(ai).map_or(0, |f| f.pts_48k);
        let v_due = Duration::from_micros(vt * 1_000_000 / 90_000);
        let a_due = Duration::from_micros(at * 1_000_000 / 48_000);
        let due = v_due.min(a_due);
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
            continue;
        }
        if v_due <= a_due {
            if let Some(f) = media.video.get(vi) {
                let au = tag::insert(
                    &f.annexb,
                    Tag {
                        seq: sent,
                        sent_us: wallclock_us(),
                    },
                );
                let payloads = h264_payloads(&au);
                let n = payloads.len();
                // RTP timestamps wrap modulo 2^32 by design (RFC 3550 §5.1).
                let ts = (vt & 0xffff_ffff) as u32;
                for (i, p) in payloads.iter().enumerate() {
                    let pkt = rtp(o.video_pt, i + 1 == n, vseq, ts, vssrc, p);
                    socket.send_to(&pkt, o.video).await?;
                    vseq = vseq.wrapping_add(1);
                }
                sent += 1;
            }
            vi += 1;
            if vi >= media.video.len() {
                vi = 0;
                loops_v += 1;
            }
        } else {
            if let Some(f) = media.audio.get(ai) {
                let ts = (at & 0xffff_ffff) as u32;
                let pkt = rtp(o.audio_pt, true, aseq, ts, assrc, &f.packet);
                socket.send_to(&pkt, o.audio).await?;
                aseq = aseq.wrapping_add(1);
            }
            ai += 1;
            if ai >= media.audio.len() {
                ai = 0;
                loops_a += 1;
            }
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_large_nal_units() {
        let mut au = vec![0, 0, 0, 1, 0x09, 0xf0];
        au.extend_from_slice(&[0, 0, 0, 1, 0x67, 1, 2, 3]);
        au.extend_from_slice(&[0, 0, 0, 1, 0x65]);
        au.extend(std::iter::repeat_n(0xab, 3000));
        let p = h264_payloads(&au);
        // AUD dropped, SPS whole, IDR in 3 FU-A fragments (start, middle, end).
        assert_eq!(p[0], vec![0x67, 1, 2, 3]);
        assert_eq!(p.len(), 4);
        assert_eq!((p[1][0] & 0x1f, p[1][1]), (FU_A, 0x80 | 5));
        assert_eq!(p[2][1], 5);
        assert_eq!(p[3][1], 0x40 | 5);
        assert!(p.iter().all(|x| x.len() <= MAX_PAYLOAD));
        let body: usize = p[1..].iter().map(|x| x.len() - 2).sum();
        assert_eq!(body, 3000);
    }
}
