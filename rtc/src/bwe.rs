//! Egress bandwidth estimation for viewer sessions that have something to
//! choose from: str0m's send-side estimator fed by transport-wide congestion
//! control feedback (TWCC). Only sessions built with [`enable`] pay for it
//! (the transport sequence header extension on every packet, the receiver's
//! feedback every ~100 ms, str0m's pacer and estimator); a stream with one
//! rendition keeps its sessions exactly as before.
//!
//! Works in RTP mode (`StreamTx::write_rtp`, what the edge viewer uses):
//! str0m stamps the transport sequence number when it polls each packet out
//! of its send queue, whatever the API that queued it, and probes with
//! padding (on the RTX stream when RTX is negotiated, else SSRC-0 probe
//! packets). The estimate arrives as `Event::EgressBitrateEstimate` (str0m's
//! mean of its distinct estimates over the last 3 s) and, unsmoothed, in
//! every `Event::PeerStats` (`bwe_tx`, every [`STATS_INTERVAL`]); the shard
//! forwards both to the session's [`crate::Handler`] like any event. The
//! edge's controller reads the unsmoothed one.
//! `edge/tests/abr_link.rs` measures it over a capped in-memory link.

use std::time::Duration;

use str0m::bwe::Bitrate;
use str0m::rtp::Extension;
use str0m::RtcConfig;

/// The header extension id we offer for the transport sequence number:
/// Chrome's. str0m answers with the offerer's id whatever we put here.
pub const TWCC_EXTENSION_ID: u8 = 3;

/// Where a viewer's estimate starts before any feedback: 1 Mbit/s puts a
/// new viewer on a mid rendition (360p-class) that nearly every link
/// carries, from which it climbs in one up-hold or drops within a second.
pub const INITIAL_ESTIMATE: Bitrate = Bitrate::kbps(1_000);

/// How often a BWE session reports `Event::MediaEgressStats`, whose `loss`
/// (RTCP receiver reports' fraction lost) is the controller's second input:
/// a policer drops without queueing, and a full drop-tail queue holds a
/// constant delay, both of which the delay-based estimate misses. Receivers
/// report video about once a second while nothing is lost, but Chromium
/// sends a report with every NACK, so under loss a fresh one is there at
/// every poll. The first report after a link falls comes once the
/// bottleneck queue has delayed the packets behind the first loss (~0.3 s
/// behind a 300 ms queue); every poll interval adds to that. 500 ms took
/// 0.5–1.5 s from the fall to the decision (Chromium behind a link cut from
/// 4 to 0.4 Mbit/s, tests/browser_abr.rs), 250 ms 0.5–0.9 s, and the second
/// lossy report (the first one often shows only a few losses) a further
/// 250 ms: 100 ms. An event without a new report carries `loss: None` and
/// costs a few comparisons.
pub const STATS_INTERVAL: Duration = Duration::from_millis(100);

/// Turns on TWCC, str0m's bandwidth estimator and egress stats for a session
/// being built. Call it after `set_extension_map`, which would drop the
/// extension again.
pub fn enable(mut cfg: RtcConfig, initial: Bitrate) -> RtcConfig {
    cfg.extension_map()
        .set(TWCC_EXTENSION_ID, Extension::TransportSequenceNumber);
    cfg.enable_bwe(Some(initial))
        .set_stats_interval(Some(STATS_INTERVAL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::rtp::ExtensionMap;

    #[test]
    fn enable_keeps_the_existing_extensions_and_turns_bwe_on() {
        let mut map = ExtensionMap::empty();
        map.set(4, Extension::RtpMid);
        let mut cfg = enable(RtcConfig::new().set_extension_map(map), INITIAL_ESTIMATE);
        assert_eq!(cfg.bwe_initial_bitrate(), Some(INITIAL_ESTIMATE));
        let exts = cfg.extension_map();
        assert_eq!(exts.id_of(Extension::RtpMid), Some(4));
        assert_eq!(
            exts.id_of(Extension::TransportSequenceNumber),
            Some(TWCC_EXTENSION_ID)
        );
    }
}
