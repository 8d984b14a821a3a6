//! Clear RTP header reading (RFC 3550 §5.1) and per-SSRC loss/jitter accounting (Appendix A).
//!
//! Header-only viewers read just these fields from SRTP packets (the header is not encrypted)
//! and skip decryption, so one machine can run many more of them.

/// The fields of an RTP fixed header that loss and jitter need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Marker bit (last packet of a video frame).
    pub marker: bool,
    /// Payload type.
    pub pt: u8,
    /// Sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Synchronization source.
    pub ssrc: u32,
}

/// Parse an RTP (not RTCP) packet's fixed header; `None` for anything else. RTCP is told apart
/// by its packet types 192..=223 in the second byte (RFC 5761 §4).
pub fn parse(data: &[u8]) -> Option<Header> {
    let b0 = *data.first()?;
    let b1 = *data.get(1)?;
    if b0 >> 6 != 2 || (192..=223).contains(&b1) {
        return None;
    }
    Some(Header {
        marker: b1 & 0x80 != 0,
        pt: b1 & 0x7f,
        seq: u16::from_be_bytes([*data.get(2)?, *data.get(3)?]),
        timestamp: u32::from_be_bytes(data.get(4..8)?.try_into().ok()?),
        ssrc: u32::from_be_bytes(data.get(8..12)?.try_into().ok()?),
    })
}

/// Loss and interarrival jitter of one SSRC.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    first: Option<i64>,
    max: i64,
    received: u64,
    last_transit: Option<f64>,
    jitter: f64,
}

impl SeqTracker {
    /// Account one packet arriving at `arrival_secs` (any monotonic origin) on a `clock` Hz
    /// media clock.
    pub fn update(&mut self, seq: u16, timestamp: u32, arrival_secs: f64, clock: u32) {
        // Extend the 16-bit sequence around the highest seen so far (wrap and reordering).
        let ext = match self.first {
            None => {
                self.first = Some(i64::from(seq));
                self.max = i64::from(seq);
                i64::from(seq)
            }
            Some(_) => {
                let low = u16::try_from(self.max.rem_euclid(1 << 16)).unwrap_or(0);
                let d = i64::from(seq.wrapping_sub(low));
                // Forward if within half the sequence space, else a late (reordered) packet.
                self.max + if d < 1 << 15 { d } else { d - (1 << 16) }
            }
        };
        self.max = self.max.max(ext);
        self.received += 1;
        if clock > 0 {
            // RFC 3550 A.8: J += (|D| - J) / 16, D from transit time differences.
            let transit = arrival_secs - f64::from(timestamp) / f64::from(clock);
            if let Some(prev) = self.last_transit {
                let mut d = (transit - prev).abs();
                // A timestamp wrap shows as a jump of 2^32 ticks: not jitter.
                let wrap = f64::from(u32::MAX) / f64::from(clock);
                if d > wrap / 2.0 {
                    d = (d - wrap).abs();
                }
                self.jitter += (d - self.jitter) / 16.0;
            }
            self.last_transit = Some(transit);
        }
    }

    /// Packets received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Packets expected from the sequence span minus those received (never negative).
    pub fn lost(&self) -> u64 {
        let Some(first) = self.first else {
            return 0;
        };
        let expected = u64::try_from(self.max - first + 1).unwrap_or(0);
        expected.saturating_sub(self.received)
    }

    /// Interarrival jitter in ms.
    pub fn jitter_ms(&self) -> f64 {
        self.jitter * 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(pt: u8, seq: u16, ts: u32) -> Vec<u8> {
        let mut p = vec![0x80, pt | 0x80];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend_from_slice(&[1, 2, 3]);
        p
    }

    #[test]
    fn parses_rtp_and_rejects_rtcp() {
        let h = parse(&packet(96, 65535, 9)).unwrap();
        assert_eq!(
            (h.pt, h.seq, h.timestamp, h.ssrc, h.marker),
            (96, 65535, 9, 7, true)
        );
        // RTCP receiver report: packet type 201.
        assert_eq!(parse(&[0x81, 201, 0, 7, 0, 0, 0, 1, 0, 0, 0, 2]), None);
        assert_eq!(parse(&[0x80, 96, 0]), None);
    }

    #[test]
    fn counts_loss_across_wrap_and_reordering() {
        let mut t = SeqTracker::default();
        for (i, seq) in [65533u16, 65534, 0, 65535, 2, 3].into_iter().enumerate() {
            t.update(seq, i as u32 * 3000, i as f64 / 30.0, 90_000);
        }
        assert_eq!(t.received(), 6);
        assert_eq!(t.lost(), 1); // seq 1
        assert!(t.jitter_ms() < 1.0);
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64),
                        seqs in proptest::collection::vec(any::<(u16, u32)>(), 0..64)) {
            let _ = parse(&data);
            let mut t = SeqTracker::default();
            for (i, (s, ts)) in seqs.into_iter().enumerate() {
                t.update(s, ts, i as f64, 48_000);
            }
            let _ = (t.lost(), t.jitter_ms());
        }
    }
}
