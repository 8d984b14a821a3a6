//! H.264 (RFC 6184) and H.265 (RFC 7798) packetization of Annex-B access
//! units: small NAL units (parameter sets, SEI) are aggregated (STAP-A / AP),
//! NAL units that fit go alone, larger ones are fragmented (FU-A / FU) into
//! evenly sized pieces. Access unit delimiters and filler data are dropped.

use std::sync::Arc;

use cascade_media::annexb::nal_units;
use cascade_media::nal::Nal as Flavor;

use super::Payload;

/// NAL units that carry nothing a decoder needs over RTP: access unit
/// delimiters (RTP marks frame ends itself) and filler data.
fn droppable(flavor: Flavor, nal: &[u8]) -> bool {
    let t = flavor.type_of(nal);
    flavor.is_delimiter(t) || flavor.is_filler(t)
}

/// Packetizes one access unit into `out`; the last payload gets the marker.
pub(crate) fn packetize(flavor: Flavor, au: &[u8], max: usize, out: &mut Vec<Payload>) {
    let hdr = flavor.header_len();
    let first = out.len();
    let mut agg: Vec<&[u8]> = Vec::new();
    // Aggregation packet size so far: its header plus 16-bit size + NAL each.
    let mut agg_size = hdr;
    for nal in nal_units(au) {
        if nal.len() <= hdr || droppable(flavor, nal) {
            continue;
        }
        if hdr + 2 + nal.len() <= max {
            if agg_size + 2 + nal.len() > max {
                flush(flavor, &mut agg, out);
                agg_size = hdr;
            }
            agg_size += 2 + nal.len();
            agg.push(nal);
        } else {
            flush(flavor, &mut agg, out);
            agg_size = hdr;
            if nal.len() <= max {
                out.push(payload(nal.to_vec()));
            } else {
                fragment(flavor, nal, max, out);
            }
        }
    }
    flush(flavor, &mut agg, out);
    if out.len() > first {
        if let Some(last) = out.last_mut() {
            last.marker = true;
        }
    }
}

fn payload(v: Vec<u8>) -> Payload {
    Payload {
        data: Arc::from(v),
        marker: false,
    }
}

/// Emits the pending NAL units: one alone, several as STAP-A / AP.
fn flush(flavor: Flavor, agg: &mut Vec<&[u8]>, out: &mut Vec<Payload>) {
    match agg.as_slice() {
        [] => {}
        [one] => out.push(payload(one.to_vec())),
        many => {
            // invariant: every aggregated unit is longer than its NAL header
            // (`packetize` skips shorter ones), so n[0] and n[1] exist.
            let size: usize = many.iter().map(|n| n.len() + 2).sum();
            let mut v = Vec::with_capacity(flavor.header_len() + size);
            match flavor {
                Flavor::H264 => {
                    // F is the OR, NRI the maximum of the aggregated units
                    // (RFC 6184 §5.7.1); type 24 = STAP-A.
                    let f = many.iter().fold(0, |a, n| a | (n[0] & 0x80));
                    let nri = many.iter().map(|n| n[0] & 0x60).max().unwrap_or(0);
                    v.push(f | nri | 24);
                }
                Flavor::H265 => {
                    // RFC 7798 §4.4.2: type 48 = AP; LayerId and TID are the
                    // lowest of the aggregated units; ours share one layer.
                    let b1 = many.iter().map(|n| n[1]).min().unwrap_or(1);
                    v.push((many[0][0] & 0x81) | (48 << 1));
                    v.push(b1);
                }
            }
            for n in many.iter() {
                // invariant: aggregated units are shorter than MAX_PAYLOAD,
                // far below 65,536 bytes.
                let len = u16::try_from(n.len()).unwrap_or(u16::MAX);
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(n);
            }
            out.push(payload(v));
        }
    }
    agg.clear();
}

/// Splits one NAL unit into FU-A (H.264) / FU (H.265) packets of even size.
fn fragment(flavor: Flavor, nal: &[u8], max: usize, out: &mut Vec<Payload>) {
    let hdr = flavor.header_len();
    let (Some(header), Some(body)) = (nal.get(..hdr), nal.get(hdr..)) else {
        return;
    };
    // invariant: `header` is exactly the NAL header (1 byte H.264, 2 bytes
    // H.265), so header[0] and (for H.265) header[1] exist.
    // FU indicator/payload header plus the FU header.
    let fu_hdr = hdr + 1;
    let room = max.saturating_sub(fu_hdr).max(1);
    let n = body.len().div_ceil(room).max(1);
    let chunk = body.len().div_ceil(n).max(1);
    let nal_type = flavor.type_of(nal);
    let count = body.chunks(chunk).count();
    for (i, piece) in body.chunks(chunk).enumerate() {
        let mut v = Vec::with_capacity(fu_hdr + piece.len());
        let (s, e) = (i == 0, i + 1 == count);
        let se = (u8::from(s) << 7) | (u8::from(e) << 6);
        match flavor {
            Flavor::H264 => {
                v.push((header[0] & 0xe0) | 28);
                v.push(se | nal_type);
            }
            Flavor::H265 => {
                v.push((header[0] & 0x81) | (49 << 1));
                v.push(header[1]);
                v.push(se | nal_type);
            }
        }
        v.extend_from_slice(piece);
        out.push(payload(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reassembles H.264 RTP payloads into NAL units (the receiver's side).
    fn depacketize_h264(payloads: &[Payload]) -> Vec<Vec<u8>> {
        let mut nals = Vec::new();
        let mut fu: Vec<u8> = Vec::new();
        for p in payloads {
            let d = &p.data;
            match d[0] & 0x1f {
                24 => {
                    let mut i = 1;
                    while i + 2 <= d.len() {
                        let len = u16::from_be_bytes([d[i], d[i + 1]]) as usize;
                        nals.push(d[i + 2..i + 2 + len].to_vec());
                        i += 2 + len;
                    }
                }
                28 => {
                    let (s, e, t) = (d[1] & 0x80 != 0, d[1] & 0x40 != 0, d[1] & 0x1f);
                    if s {
                        fu = vec![(d[0] & 0xe0) | t];
                    }
                    fu.extend_from_slice(&d[2..]);
                    if e {
                        nals.push(std::mem::take(&mut fu));
                    }
                }
                _ => nals.push(d.to_vec()),
            }
        }
        nals
    }

    fn depacketize_h265(payloads: &[Payload]) -> Vec<Vec<u8>> {
        let mut nals = Vec::new();
        let mut fu: Vec<u8> = Vec::new();
        for p in payloads {
            let d = &p.data;
            match (d[0] >> 1) & 0x3f {
                48 => {
                    let mut i = 2;
                    while i + 2 <= d.len() {
                        let len = u16::from_be_bytes([d[i], d[i + 1]]) as usize;
                        nals.push(d[i + 2..i + 2 + len].to_vec());
                        i += 2 + len;
                    }
                }
                49 => {
                    let (s, e, t) = (d[2] & 0x80 != 0, d[2] & 0x40 != 0, d[2] & 0x3f);
                    if s {
                        fu = vec![(d[0] & 0x81) | (t << 1), d[1]];
                    }
                    fu.extend_from_slice(&d[3..]);
                    if e {
                        nals.push(std::mem::take(&mut fu));
                    }
                }
                _ => nals.push(d.to_vec()),
            }
        }
        nals
    }

    fn annexb(nals: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, n) in nals.iter().enumerate() {
            if i % 2 == 0 {
                v.extend_from_slice(&[0, 0, 0, 1]);
            } else {
                v.extend_from_slice(&[0, 0, 1]);
            }
            v.extend_from_slice(n);
        }
        v
    }

    fn nal(first: u8, len: usize) -> Vec<u8> {
        // Bodies without 0x00 so no start code can appear inside.
        let mut v = vec![first];
        v.extend((0..len - 1).map(|i| (i % 250) as u8 + 1));
        v
    }

    #[test]
    fn h264_round_trip() {
        // SPS, PPS, AUD (dropped), a 5 kB IDR slice, a small slice.
        let sps = nal(0x67, 20);
        let pps = nal(0x68, 5);
        let aud = vec![0x09, 0xf0];
        let idr = nal(0x65, 5000);
        let small = nal(0x41, 300);
        let au = annexb(&[aud, sps.clone(), pps.clone(), idr.clone(), small.clone()]);
        let mut out = Vec::new();
        packetize(Flavor::H264, &au, 1100, &mut out);
        assert_eq!(out[0].data[0] & 0x1f, 24, "sps+pps aggregated in a STAP-A");
        assert!(out.iter().all(|p| p.data.len() <= 1100));
        assert!(out.last().unwrap().marker);
        assert_eq!(out.iter().filter(|p| p.marker).count(), 1);
        assert_eq!(depacketize_h264(&out), vec![sps, pps, idr, small]);
    }

    #[test]
    fn h265_round_trip() {
        let vps = vec![0x40, 0x01, 7, 7, 7];
        let sps = vec![0x42, 0x01, 8, 8];
        let idr = nal(0x26, 4000);
        let mut idr = idr;
        idr[1] = 0x01;
        let au = annexb(&[vps.clone(), sps.clone(), idr.clone()]);
        let mut out = Vec::new();
        packetize(Flavor::H265, &au, 1100, &mut out);
        assert_eq!((out[0].data[0] >> 1) & 0x3f, 48);
        assert!(out.iter().all(|p| p.data.len() <= 1100));
        assert_eq!(depacketize_h265(&out), vec![vps, sps, idr]);
    }
}
