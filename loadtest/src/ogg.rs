//! A minimal Ogg reader (RFC 3533) and Opus packet helpers (RFC 7845, RFC 6716 §3.1).
//!
//! Enough to pull the Opus packets of one logical stream out of ffmpeg's `.ogg` output;
//! CRCs are not checked (the file is ours), but malformed input never panics.

/// One Ogg page's header fields that matter here, plus its packets' bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Page<'a> {
    continued: bool,
    serial: u32,
    /// Segment table: lacing values.
    lacing: &'a [u8],
    body: &'a [u8],
}

const CAPTURE: &[u8; 4] = b"OggS";
/// Fixed part of a page header before the segment table (RFC 3533 §6).
const HEADER_LEN: usize = 27;

fn parse_page(data: &[u8]) -> Option<(Page<'_>, &[u8])> {
    if data.get(..4)? != CAPTURE || *data.get(4)? != 0 {
        return None;
    }
    let header_type = *data.get(5)?;
    let serial = u32::from_le_bytes(data.get(14..18)?.try_into().ok()?);
    let nsegs = usize::from(*data.get(26)?);
    let lacing = data.get(HEADER_LEN..HEADER_LEN + nsegs)?;
    let body_len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
    let body_start = HEADER_LEN + nsegs;
    let body = data.get(body_start..body_start + body_len)?;
    let rest = data.get(body_start + body_len..)?;
    Some((
        Page {
            continued: header_type & 1 != 0,
            serial,
            lacing,
            body,
        },
        rest,
    ))
}

/// All packets of the first logical stream in `data`, in order. Stops at the first
/// malformed page (a truncated file yields the packets before it).
pub fn packets(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut serial = None;
    let mut partial: Vec<u8> = Vec::new();
    while let Some((page, next)) = parse_page(rest) {
        rest = next;
        if *serial.get_or_insert(page.serial) != page.serial {
            continue;
        }
        if !page.continued {
            partial.clear();
        }
        let mut offset = 0;
        for &l in page.lacing {
            let len = usize::from(l);
            let Some(seg) = page.body.get(offset..offset + len) else {
                break;
            };
            offset += len;
            partial.extend_from_slice(seg);
            // A lacing value below 255 ends a packet; 255 continues it (maybe on the next page).
            if l < 255 {
                out.push(std::mem::take(&mut partial));
            }
        }
    }
    out
}

/// True for the Opus header packets (`OpusHead`, `OpusTags`) that carry no audio.
pub fn is_opus_header(packet: &[u8]) -> bool {
    packet.starts_with(b"OpusHead") || packet.starts_with(b"OpusTags")
}

/// Samples at 48 kHz in one Opus packet, from its TOC byte and frame count (RFC 6716 §3.1).
pub fn opus_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame sizes per configuration, in 48 kHz samples (Table 2).
    let frame: u32 = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames: u32 = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    Some(frame * frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Build one page holding `segments` (already laced by the caller).
    fn page(serial: u32, continued: bool, lacing: &[u8], body: &[u8]) -> Vec<u8> {
        let mut p = CAPTURE.to_vec();
        p.push(0);
        p.push(u8::from(continued));
        p.extend_from_slice(&[0; 8]); // granule
        p.extend_from_slice(&serial.to_le_bytes());
        p.extend_from_slice(&[0; 8]); // sequence + crc
        p.push(lacing.len() as u8);
        p.extend_from_slice(lacing);
        p.extend_from_slice(body);
        p
    }

    #[test]
    fn reads_packets_across_pages() {
        let big = vec![7u8; 300]; // 255 + 45: spans two pages
        let mut data = page(
            1,
            false,
            &[3, 255],
            &[[1, 2, 3].as_slice(), &big[..255]].concat(),
        );
        data.extend(page(9, false, &[2], &[9, 9])); // other stream: ignored
        data.extend(page(
            1,
            true,
            &[45, 1],
            &[&big[255..], [5].as_slice()].concat(),
        ));
        let p = packets(&data);
        assert_eq!(p, vec![vec![1, 2, 3], big, vec![5]]);
    }

    #[test]
    fn opus_frame_sizes() {
        // config 31 (CELT FB 20 ms), one frame.
        assert_eq!(opus_samples(&[31 << 3]), Some(960));
        // config 1 (SILK NB 20 ms), two frames.
        assert_eq!(opus_samples(&[(1 << 3) | 1]), Some(1920));
        // code 3 with 3 frames of 10 ms (config 30).
        assert_eq!(opus_samples(&[(30 << 3) | 3, 3]), Some(1440));
        assert_eq!(opus_samples(&[]), None);
        assert!(is_opus_header(b"OpusHead\x01\x02"));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = packets(&data);
            let _ = opus_samples(&data);
            let mut paged = CAPTURE.to_vec();
            paged.extend_from_slice(&data);
            let _ = packets(&paged);
        }

        #[test]
        fn round_trips_small_packets(pkts in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..254), 1..20)) {
            let lacing: Vec<u8> = pkts.iter().map(|p| p.len() as u8).collect();
            let data = page(3, false, &lacing, &pkts.concat());
            prop_assert_eq!(packets(&data), pkts);
        }
    }
}
