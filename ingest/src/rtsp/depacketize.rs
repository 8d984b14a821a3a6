//! Our own RTP depacketizers for pulls that retina cannot demux: retina 0.4
//! has no Opus depacketizer and its `demuxed()` refuses a session with a
//! stream it cannot depacketize, so a camera sending Opus audio is played
//! un-demuxed (raw [`retina::rtp::ReceivedPacket`]s) and its packets come
//! here. Sans-IO: packets in, access units out, no clock.
//!
//! - Opus (RFC 7587): one Opus packet per RTP payload, passed through.
//! - H.264 (RFC 6184, non-interleaved mode): single NAL unit, STAP-A, FU-A.
//! - H.265 (RFC 7798, no DONL): single NAL unit, AP, FU.
//!
//! Video access units end on the marker bit or a timestamp change. An
//! access unit with a sequence gap (or a broken fragmentation unit) is
//! dropped and nothing is output until the next keyframe, since its
//! references are gone. Keyframes get the latest parameter sets (from the
//! SDP's sprop or seen in-band) in front when they lack them, the
//! registry's contract; a keyframe before any parameter sets is dropped.
//! Output is bounded: an access unit over [`MAX_AU_BYTES`] is dropped, and
//! at most [`MAX_QUEUED`] finished units wait for [`Depacketizer::pop`].

use std::collections::VecDeque;

use cascade_media::annexb;

/// Largest access unit kept (the same cap as [`super::media::MAX_FRAME_BYTES`]).
pub const MAX_AU_BYTES: usize = super::media::MAX_FRAME_BYTES;
/// Finished units waiting to be popped; older ones are dropped beyond it
/// (the shell pops after every packet, so this never fills in practice).
pub const MAX_QUEUED: usize = 16;
/// Largest parameter set kept (SPS/PPS/VPS are tens of bytes).
const MAX_PARAMETER_SET: usize = 4096;
const START: [u8; 4] = [0, 0, 0, 1];

/// Which payload format a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// RFC 6184.
    H264,
    /// RFC 7798.
    H265,
    /// RFC 7587.
    Opus,
}

/// One depacketized unit: an Annex-B access unit or an Opus packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Annex-B (video, parameter sets before keyframes) or an Opus packet.
    pub data: Vec<u8>,
    /// The RTP timestamp of its packets, as the caller gave it (retina's
    /// time since PLAY).
    pub ts: i64,
    /// An IDR/IRAP access unit (always true for audio).
    pub keyframe: bool,
}

/// Parameter sets seen last (from the SDP or in-band).
#[derive(Default, Debug)]
struct ParameterSets {
    vps: Option<Vec<u8>>,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
}

/// The access unit being assembled.
#[derive(Default, Debug)]
struct Building {
    ts: Option<i64>,
    data: Vec<u8>,
    broken: bool,
    keyframe: bool,
    vcl: bool,
    has_vps: bool,
    has_sps: bool,
    has_pps: bool,
}

/// One stream's depacketizer.
#[derive(Debug)]
pub struct Depacketizer {
    kind: Kind,
    next_seq: Option<u16>,
    au: Building,
    /// A fragmentation unit in progress: its NAL unit so far.
    fu: Option<Vec<u8>>,
    params: ParameterSets,
    need_keyframe: bool,
    out: VecDeque<Unit>,
    dropped: u64,
}

impl Depacketizer {
    /// A depacketizer for `kind` that waits for a keyframe first.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            next_seq: None,
            au: Building::default(),
            fu: None,
            params: ParameterSets::default(),
            need_keyframe: true,
            out: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Parameter sets from the SDP (`sprop-parameter-sets`, `sprop-vps/sps/pps`),
    /// NAL units without start codes; in-band ones replace them later.
    pub fn set_parameter_sets<'a>(&mut self, sets: impl IntoIterator<Item = &'a [u8]>) {
        for nal in sets {
            self.remember(nal);
        }
    }

    /// Access units dropped so far (gaps, broken fragments, oversize,
    /// waiting for a keyframe).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The RFC 6381 codec string of the latest SPS (`avc1.PPCCLL`,
    /// `hvc1.P`), for the published fmtp.
    pub fn rfc6381(&self) -> Option<String> {
        let sps = self.params.sps.as_deref()?;
        match self.kind {
            Kind::H264 => {
                let b = sps.get(1..4)?;
                Some(format!("avc1.{:02X}{:02X}{:02X}", b[0], b[1], b[2]))
            }
            // NAL header (2), vps id/sub-layers/nesting (1), then
            // profile_space(2) tier(1) profile_idc(5).
            Kind::H265 => sps.get(3).map(|b| format!("hvc1.{}", b & 0x1f)),
            Kind::Opus => None,
        }
    }

    /// The next finished unit.
    pub fn pop(&mut self) -> Option<Unit> {
        self.out.pop_front()
    }

    /// One RTP packet: sequence number, timestamp, marker bit and payload.
    pub fn push(&mut self, seq: u16, ts: i64, marker: bool, payload: &[u8]) {
        let gap = self.next_seq.is_some_and(|n| n != seq);
        self.next_seq = Some(seq.wrapping_add(1));
        if self.kind == Kind::Opus {
            if !payload.is_empty() && payload.len() <= MAX_AU_BYTES {
                self.emit(Unit {
                    data: payload.to_vec(),
                    ts,
                    keyframe: true,
                });
            }
            return;
        }
        if gap {
            // What was lost belonged to the unit being built (if any) or
            // started this one: neither is whole.
            self.au.broken = true;
            self.fu = None;
        }
        if self.au.ts.is_some_and(|t| t != ts) {
            // A new timestamp without the last unit's marker (lost, or a
            // camera that does not set it): the last unit is complete.
            self.finish();
            self.au.broken = gap;
        }
        self.au.ts = Some(ts);
        match self.kind {
            Kind::H264 => self.h264(payload),
            Kind::H265 => self.h265(payload),
            Kind::Opus => {}
        }
        if marker {
            self.finish();
        }
    }

    fn h264(&mut self, p: &[u8]) {
        let Some(&head) = p.first() else {
            return;
        };
        match head & 0x1f {
            1..=23 => self.nal(p),
            // STAP-A: 16-bit sizes and NAL units.
            24 => self.aggregate(p.get(1..).unwrap_or_default()),
            // FU-A.
            28 => {
                let Some(&fu) = p.get(1) else {
                    return self.broken();
                };
                let header = [(head & 0xe0) | (fu & 0x1f)];
                self.fragment(fu & 0x80 != 0, fu & 0x40 != 0, &header, p.get(2..));
            }
            // STAP-B, MTAP, FU-B (interleaved mode only) and reserved
            // types: not a camera's; the unit cannot be whole.
            _ => self.broken(),
        }
    }

    fn h265(&mut self, p: &[u8]) {
        let (Some(&h0), Some(&h1)) = (p.first(), p.get(1)) else {
            return;
        };
        match (h0 >> 1) & 0x3f {
            0..=47 => self.nal(p),
            // AP: 16-bit sizes and NAL units (no DONL: sprop-max-don-diff 0).
            48 => self.aggregate(p.get(2..).unwrap_or_default()),
            // FU: the payload header with the FU's type put back.
            49 => {
                let Some(&fu) = p.get(2) else {
                    return self.broken();
                };
                let header = [(h0 & 0x81) | ((fu & 0x3f) << 1), h1];
                self.fragment(fu & 0x80 != 0, fu & 0x40 != 0, &header, p.get(3..));
            }
            // PACI and reserved.
            _ => self.broken(),
        }
    }

    fn aggregate(&mut self, mut rest: &[u8]) {
        while !rest.is_empty() {
            let Some(len) = rest
                .get(..2)
                .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
            else {
                return self.broken();
            };
            let Some(nal) = rest.get(2..2 + len) else {
                return self.broken();
            };
            self.nal(nal);
            rest = rest.get(2 + len..).unwrap_or_default();
        }
    }

    fn fragment(&mut self, start: bool, end: bool, header: &[u8], body: Option<&[u8]>) {
        let Some(body) = body else {
            return self.broken();
        };
        if start {
            if self.fu.is_some() {
                // The previous fragment never ended.
                self.au.broken = true;
            }
            let mut nal = Vec::with_capacity(header.len() + body.len());
            nal.extend_from_slice(header);
            nal.extend_from_slice(body);
            self.fu = Some(nal);
        } else {
            let Some(nal) = &mut self.fu else {
                // A middle or end without its start.
                return self.broken();
            };
            if nal.len() + body.len() > MAX_AU_BYTES {
                self.fu = None;
                return self.broken();
            }
            nal.extend_from_slice(body);
        }
        if end {
            if let Some(nal) = self.fu.take() {
                self.nal(&nal);
            }
        }
    }

    fn broken(&mut self) {
        self.au.broken = true;
    }

    /// NAL type and role: (is VCL, is keyframe, parameter set slot 0/1/2
    /// for VPS/SPS/PPS).
    fn classify(&self, nal: &[u8]) -> (bool, bool, Option<u8>) {
        let Some(&h) = nal.first() else {
            return (false, false, None);
        };
        match self.kind {
            Kind::H264 => {
                let t = h & 0x1f;
                let ps = match t {
                    7 => Some(1),
                    8 => Some(2),
                    _ => None,
                };
                ((1..=5).contains(&t), t == 5, ps)
            }
            Kind::H265 => {
                let t = (h >> 1) & 0x3f;
                let ps = match t {
                    32 => Some(0),
                    33 => Some(1),
                    34 => Some(2),
                    _ => None,
                };
                (t < 32, (16..=21).contains(&t), ps)
            }
            Kind::Opus => (false, false, None),
        }
    }

    /// Keeps a parameter set as the latest of its kind.
    fn remember(&mut self, nal: &[u8]) {
        if nal.len() > MAX_PARAMETER_SET || nal.len() < 2 {
            return;
        }
        let slot = match self.classify(nal).2 {
            Some(0) => &mut self.params.vps,
            Some(1) => &mut self.params.sps,
            Some(2) => &mut self.params.pps,
            _ => return,
        };
        *slot = Some(nal.to_vec());
    }

    fn nal(&mut self, nal: &[u8]) {
        if nal.is_empty() {
            return;
        }
        let (vcl, key, ps) = self.classify(nal);
        if ps.is_some() && !self.au.broken {
            self.remember(nal);
        }
        match ps {
            Some(0) => self.au.has_vps = true,
            Some(1) => self.au.has_sps = true,
            Some(2) => self.au.has_pps = true,
            _ => {}
        }
        self.au.vcl |= vcl;
        self.au.keyframe |= key;
        if self.au.data.len() + START.len() + nal.len() > MAX_AU_BYTES {
            self.au.broken = true;
            self.au.data = Vec::new();
            return;
        }
        if !self.au.broken {
            self.au.data.extend_from_slice(&START);
            self.au.data.extend_from_slice(nal);
        }
    }

    /// Ends the access unit being built: out if whole and decodable.
    fn finish(&mut self) {
        let au = std::mem::take(&mut self.au);
        if self.fu.take().is_some() {
            // The fragment did not end within its unit.
            return self.drop_unit();
        }
        let Some(ts) = au.ts else {
            return;
        };
        if au.broken {
            return self.drop_unit();
        }
        if !au.vcl {
            // Parameter sets or SEI alone: kept, nothing to show.
            return;
        }
        if !au.keyframe {
            if self.need_keyframe {
                self.dropped += 1;
                return;
            }
            return self.emit(Unit {
                data: au.data,
                ts,
                keyframe: false,
            });
        }
        let mut front = Vec::new();
        let h265 = self.kind == Kind::H265;
        let mut complete = true;
        if (h265 && !au.has_vps) || !au.has_sps || !au.has_pps {
            // All of them, in decoding order (a PPS names its SPS): those
            // the unit has are the latest too, a repeat is harmless.
            let sets = [
                h265.then_some(&self.params.vps),
                Some(&self.params.sps),
                Some(&self.params.pps),
            ];
            for set in sets.into_iter().flatten() {
                match set {
                    Some(set) => {
                        front.extend_from_slice(&START);
                        front.extend_from_slice(set);
                    }
                    None => complete = false,
                }
            }
        }
        // Without parameter sets a keyframe is not decodable.
        if !complete || front.len() + au.data.len() > MAX_AU_BYTES {
            return self.drop_unit();
        }
        front.extend_from_slice(&au.data);
        self.need_keyframe = false;
        self.emit(Unit {
            data: front,
            ts,
            keyframe: true,
        });
    }

    fn drop_unit(&mut self) {
        self.dropped += 1;
        self.need_keyframe = true;
    }

    fn emit(&mut self, unit: Unit) {
        if self.out.len() >= MAX_QUEUED {
            self.out.pop_front();
            self.dropped += 1;
        }
        self.out.push_back(unit);
    }
}

/// Parameter sets of an Annex-B blob (e.g. from an avcC/hvcC converted by
/// [`crate::h264`]), as NAL units.
pub fn nal_units(annexb_data: &[u8]) -> Vec<&[u8]> {
    annexb::nal_units(annexb_data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1e, 0xaa];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];
    const IDR: &[u8] = &[0x65, 0x88, 0x84, 0x00];
    const P: &[u8] = &[0x41, 0x9a, 0x02];

    fn units(d: &mut Depacketizer) -> Vec<Unit> {
        std::iter::from_fn(|| d.pop()).collect()
    }

    fn annexb(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter().flat_map(|n| [&START[..], n].concat()).collect()
    }

    fn stap(nals: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![0x78];
        for n in nals {
            p.extend_from_slice(&(n.len() as u16).to_be_bytes());
            p.extend_from_slice(n);
        }
        p
    }

    #[test]
    fn h264_single_stap_and_fu() {
        let mut d = Depacketizer::new(Kind::H264);
        // STAP-A with SPS+PPS, then the IDR in three FU-A fragments.
        d.push(1, 0, false, &stap(&[SPS, PPS]));
        d.push(2, 0, false, &[0x7c, 0x85, 0x88]);
        d.push(3, 0, false, &[0x7c, 0x05, 0x84]);
        d.push(4, 0, true, &[0x7c, 0x45, 0x00]);
        d.push(5, 3000, true, P);
        let u = units(&mut d);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].data, annexb(&[SPS, PPS, IDR]));
        assert!(u[0].keyframe);
        assert_eq!(u[1].data, annexb(&[P]));
        assert_eq!((u[1].ts, u[1].keyframe), (3000, false));
        assert_eq!(d.rfc6381().as_deref(), Some("avc1.42C01E"));
    }

    #[test]
    fn parameter_sets_go_in_front_of_keyframes_that_lack_them() {
        let mut d = Depacketizer::new(Kind::H264);
        // A keyframe before any parameter sets is not decodable.
        d.push(1, 0, true, IDR);
        assert!(units(&mut d).is_empty());
        d.set_parameter_sets([SPS, PPS]);
        d.push(2, 3000, true, IDR);
        let u = units(&mut d);
        assert_eq!(u[0].data, annexb(&[SPS, PPS, IDR]));
        // In-band ones replace the SDP's.
        let sps2 = &[0x67, 0x64, 0x00, 0x1f];
        d.push(3, 6000, false, sps2);
        d.push(4, 6000, true, IDR);
        let u = units(&mut d);
        assert_eq!(u[0].data, annexb(&[sps2, PPS, sps2, IDR]));
        assert_eq!(d.rfc6381().as_deref(), Some("avc1.64001F"));
    }

    #[test]
    fn timestamp_change_ends_a_unit_without_marker() {
        let mut d = Depacketizer::new(Kind::H264);
        d.set_parameter_sets([SPS, PPS]);
        d.push(1, 0, false, IDR);
        d.push(2, 3000, false, P);
        d.push(3, 6000, false, P);
        let u = units(&mut d);
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].ts, 3000);
    }

    #[test]
    fn a_gap_drops_the_unit_and_waits_for_a_keyframe() {
        let mut d = Depacketizer::new(Kind::H264);
        d.set_parameter_sets([SPS, PPS]);
        d.push(1, 0, true, IDR);
        d.push(2, 3000, true, P);
        // 3 lost: the P at 6000 started there.
        d.push(4, 6000, true, &[0x7c, 0x41, 0x01]);
        d.push(5, 9000, true, P);
        d.push(6, 12000, true, IDR);
        d.push(7, 15000, true, P);
        let ts: Vec<i64> = units(&mut d).iter().map(|u| u.ts).collect();
        assert_eq!(ts, vec![0, 3000, 12000, 15000]);
        assert_eq!(d.dropped(), 2);
    }

    #[test]
    fn h265_single_ap_and_fu() {
        let vps: &[u8] = &[0x40, 0x01, 0x0c];
        let sps: &[u8] = &[0x42, 0x01, 0x01, 0x01, 0x60];
        let pps: &[u8] = &[0x44, 0x01, 0xc1];
        let idr: &[u8] = &[0x26, 0x01, 0xaf, 0x01, 0x02];
        let trail: &[u8] = &[0x02, 0x01, 0xd0];
        let mut d = Depacketizer::new(Kind::H265);
        let mut ap = vec![0x60, 0x01];
        for n in [vps, sps, pps] {
            ap.extend_from_slice(&(n.len() as u16).to_be_bytes());
            ap.extend_from_slice(n);
        }
        d.push(10, 0, false, &ap);
        // FU of type 19 (IDR_W_RADL): payload header type 49.
        d.push(11, 0, false, &[0x62, 0x01, 0x80 | 19, 0xaf]);
        d.push(12, 0, true, &[0x62, 0x01, 0x40 | 19, 0x01, 0x02]);
        d.push(13, 3000, true, trail);
        let u = units(&mut d);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].data, annexb(&[vps, sps, pps, idr]));
        assert!(u[0].keyframe && !u[1].keyframe);
        assert_eq!(d.rfc6381().as_deref(), Some("hvc1.1"));
    }

    #[test]
    fn opus_packets_pass_through() {
        let mut d = Depacketizer::new(Kind::Opus);
        d.push(1, 0, true, &[0xfc, 1, 2]);
        d.push(5, 960, false, &[0xfc, 3]);
        d.push(6, 1920, false, &[]);
        let u = units(&mut d);
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].data, vec![0xfc, 3]);
        assert_eq!(u[1].ts, 960);
    }

    proptest::proptest! {
        /// Any packets (payload types, fragments, sizes, sequence numbers,
        /// timestamps): no panic, every unit within the cap, the queue
        /// bounded, and every video keyframe out has an SPS and a PPS.
        #[test]
        fn arbitrary_packets(
            kind in proptest::sample::select(vec![Kind::H264, Kind::H265, Kind::Opus]),
            packets in proptest::collection::vec(
                (0u16..8, 0i64..4, proptest::bool::ANY,
                 proptest::collection::vec(proptest::num::u8::ANY, 0..48)),
                0..96),
        ) {
            let mut d = Depacketizer::new(kind);
            let mut seq = 0u16;
            for (step, ts, marker, payload) in packets {
                seq = seq.wrapping_add(step);
                d.push(seq, ts, marker, &payload);
                proptest::prop_assert!(d.out.len() <= MAX_QUEUED);
                if step % 3 == 0 {
                    while let Some(u) = d.pop() {
                        proptest::prop_assert!(u.data.len() <= MAX_AU_BYTES);
                        if u.keyframe && kind != Kind::Opus {
                            let sps = if kind == Kind::H264 { 7 } else { 33 };
                            let has = nal_units(&u.data).iter().any(|n| match kind {
                                Kind::H264 => n[0] & 0x1f == sps,
                                _ => (n[0] >> 1) & 0x3f == sps,
                            });
                            proptest::prop_assert!(has);
                        }
                    }
                }
            }
        }

        /// One big access unit in FU-A fragments never grows past the cap.
        #[test]
        fn oversized_units_are_dropped(n in 1usize..4) {
            let mut d = Depacketizer::new(Kind::H264);
            d.set_parameter_sets([SPS, PPS]);
            let chunk = vec![0u8; 1 << 20];
            let frags = 4 * n + 1;
            for i in 0..frags {
                let fu = 0x05 | if i == 0 { 0x80 } else { 0 } | if i == frags - 1 { 0x40 } else { 0 };
                let mut p = vec![0x7c, fu];
                p.extend_from_slice(&chunk);
                d.push(i as u16, 0, i == frags - 1, &p);
            }
            proptest::prop_assert!(d.pop().is_none());
            proptest::prop_assert!(d.fu.is_none());
        }
    }
}
