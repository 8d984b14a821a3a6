//! Metric names of the edge (WHEP viewers and the per-track fan-out),
//! registered with descriptions at start-up by [`describe`].

/// Viewers (WHEP sessions) alive on this node.
pub const VIEWERS: &str = "cascade_edge_viewers";
/// WHEP offers answered, by result (`created`, `not_live`, `not_acceptable`,
/// `bad_offer`, `unauthorized`, `full`).
pub const OFFERS: &str = "cascade_edge_whep_offers_total";
/// Viewer sessions ended, by reason (the rtc close reason).
pub const VIEWERS_ENDED: &str = "cascade_edge_viewers_ended_total";
/// Fan-out tasks running (one per stream track with viewers on this node).
pub const FEEDS: &str = "cascade_edge_feeds";
/// Frames packetized (once per track, not per viewer), by kind.
pub const FRAMES_PACKETIZED: &str = "cascade_edge_frames_packetized_total";
/// Frames written to viewers (per viewer), by kind.
pub const FRAMES_OUT: &str = "cascade_edge_frames_out_total";
/// RTP packets written to viewers (per viewer), by kind.
pub const PACKETS_OUT: &str = "cascade_edge_packets_out_total";
/// Keyframe requests sent upstream, by cause (`viewer`, `lag`, `join`,
/// `switch` = a viewer switching rendition, `upstream` = sent by a feed).
pub const KEYFRAME_REQUESTS: &str = "cascade_edge_keyframe_requests_total";
/// Times a lagging viewer skipped to the next keyframe, by cause
/// (`fanout` = broadcast ring overrun, `queue` = str0m send queue too long).
pub const LAG_SKIPS: &str = "cascade_edge_lag_skips_total";
/// Publisher takeovers (timestamp discontinuities) re-based by a fan-out.
pub const REBASES: &str = "cascade_edge_timeline_rebases_total";
/// B-frames a fan-out dropped (edge/src/bframes.rs: Chromium cannot play
/// them), once per track, not per viewer.
pub const BFRAMES_DROPPED: &str = "cascade_edge_bframes_dropped_total";
/// Time to packetize one frame, seconds.
pub const PACKETIZE_SECONDS: &str = "cascade_edge_packetize_seconds";
/// WHEP POST to the first media written to the viewer, seconds.
pub const FIRST_FRAME_SECONDS: &str = "cascade_edge_first_frame_seconds";
/// Ingest wall clock to the moment a live video frame is handed to a
/// viewer's session (sent in the same drain), seconds: the latency the
/// node adds (DESIGN.md goal: p99 ≤ 20 ms). Fast-start backlog excluded.
pub const EGRESS_DELAY_SECONDS: &str = "cascade_edge_egress_delay_seconds";

/// Viewers of streams with renditions, by the rendition they get now:
/// `rendition` is its rank (0 = the default, the best; 1, 2, … lower), not
/// its publisher-chosen name, so the label stays bounded.
pub const RENDITION_VIEWERS: &str = "cascade_edge_rendition_viewers";
/// Rendition switches of viewers, by `direction` (`up`, `down`).
pub const RENDITION_SWITCHES: &str = "cascade_edge_rendition_switches_total";
/// Viewers of streams with renditions that get audio only.
pub const AUDIO_ONLY_VIEWERS: &str = "cascade_edge_audio_only_viewers";
/// Automatic rendition choices, by `direction` (`up`, `down`) and `cause`
/// (`abr::Cause`: `estimate`, `loss`, `delivered`, `queue_lag`, `ladder`),
/// counted whether or not the viewer is on Auto.
pub const ABR_DECISIONS: &str = "cascade_edge_abr_decisions_total";
/// Automatic switches down (or to audio only) that Auto applied on the
/// link's signals before the viewer's send queue lagged
/// (`abr::Switch::avoids_freeze`): stalls avoided. The lags that did happen
/// are [`LAG_SKIPS`].
pub const ABR_FREEZES_AVOIDED: &str = "cascade_edge_abr_freezes_avoided_total";
/// The bandwidth estimate (bit/s) behind each automatic rendition choice.
pub const ABR_ESTIMATE: &str = "cascade_edge_abr_estimate_bps";
/// Viewers' bandwidth estimators restarted after re-probing stagnated
/// (`abr::Output::Reset`).
pub const ABR_RESTARTS: &str = "cascade_edge_abr_estimator_restarts_total";
/// Viewers of streams with renditions whose offer has no transport-wide
/// congestion control extension: no estimate, so Auto plays the best
/// rendition that flows for them.
pub const ABR_NO_FEEDBACK: &str = "cascade_edge_abr_no_feedback_total";
/// Viewers' queued and cached video dropped on a switch down
/// (`viewer::Out::flush_video`).
pub const VIDEO_FLUSHES: &str = "cascade_edge_video_flushes_total";

/// OvenPlayer WebSocket sessions, by result (`created`, `not_live`, ...).
pub const WS_SESSIONS: &str = "cascade_edge_ws_sessions_total";

/// Registers descriptions.
pub fn describe() {
    metrics::describe_counter!(WS_SESSIONS, "ovenplayer websocket sessions, by result");
    metrics::describe_gauge!(VIEWERS, "whep viewers alive on this node");
    metrics::describe_gauge!(
        RENDITION_VIEWERS,
        "viewers by the rank of the rendition they get (0 = default, the best)"
    );
    metrics::describe_counter!(
        RENDITION_SWITCHES,
        "rendition switches of viewers, by direction (up, down)"
    );
    metrics::describe_gauge!(
        AUDIO_ONLY_VIEWERS,
        "viewers of streams with renditions that get audio only"
    );
    metrics::describe_counter!(
        ABR_DECISIONS,
        "automatic rendition choices, by direction (up, down) and cause (estimate, loss, delivered, queue_lag, ladder)"
    );
    metrics::describe_counter!(
        ABR_FREEZES_AVOIDED,
        "automatic switches down (or to audio only) on the link's signals before the viewer's send queue lagged: stalls avoided"
    );
    metrics::describe_histogram!(
        ABR_ESTIMATE,
        "bandwidth estimate (bit/s) behind each automatic rendition switch"
    );
    metrics::describe_counter!(
        ABR_NO_FEEDBACK,
        "viewers of streams with renditions that offered no transport-wide congestion feedback (no estimation)"
    );
    metrics::describe_counter!(
        ABR_RESTARTS,
        "bandwidth estimators restarted after re-probing found no more room"
    );
    metrics::describe_counter!(
        VIDEO_FLUSHES,
        "viewers' queued and cached video dropped on a switch down"
    );
    metrics::describe_counter!(OFFERS, "whep offers answered, by result");
    metrics::describe_counter!(VIEWERS_ENDED, "whep viewer sessions ended, by reason");
    metrics::describe_gauge!(FEEDS, "fan-out tasks running (stream tracks with viewers)");
    metrics::describe_counter!(
        FRAMES_PACKETIZED,
        "frames packetized once per track, by kind"
    );
    metrics::describe_counter!(FRAMES_OUT, "frames written to viewers, by kind");
    metrics::describe_counter!(PACKETS_OUT, "rtp packets written to viewers, by kind");
    metrics::describe_counter!(
        KEYFRAME_REQUESTS,
        "keyframe requests sent upstream, by cause"
    );
    metrics::describe_counter!(
        LAG_SKIPS,
        "lagging viewers skipped to the next keyframe, by cause"
    );
    metrics::describe_counter!(
        REBASES,
        "timestamp discontinuities (publisher takeover) re-based"
    );
    metrics::describe_counter!(
        BFRAMES_DROPPED,
        "b-frames dropped before packetizing (browsers cannot play them)"
    );
    metrics::describe_histogram!(
        PACKETIZE_SECONDS,
        metrics::Unit::Seconds,
        "time to packetize one frame"
    );
    metrics::describe_histogram!(
        FIRST_FRAME_SECONDS,
        metrics::Unit::Seconds,
        "whep post to first media written to the viewer"
    );
    metrics::describe_histogram!(
        EGRESS_DELAY_SECONDS,
        metrics::Unit::Seconds,
        "ingest wall clock to a live video frame handed to a viewer session"
    );
}
