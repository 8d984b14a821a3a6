//! Metric names of the ingest, registered with descriptions at start-up.
//! Labels are bounded: `protocol` (`rtmp`, `whip`) and `reason` (a fixed set
//! of words per metric).

/// RTMP connections currently open.
pub const RTMP_CONNECTIONS: &str = "cascade_ingest_rtmp_connections";
/// RTMP connections accepted.
pub const RTMP_ACCEPTED: &str = "cascade_ingest_rtmp_connections_total";
/// RTMP connections or publishes refused, by `reason` (`limit`, `handshake`,
/// `app`, `token`, `name`, `protocol`, `play`, `idle`).
pub const RTMP_REFUSED: &str = "cascade_ingest_rtmp_refused_total";
/// RTMP publishes that went live.
pub const RTMP_PUBLISHES: &str = "cascade_ingest_rtmp_publishes_total";
/// FLV tags dropped, by `reason` (`flv`, `bitstream`, `audio`, `config`).
pub const RTMP_BAD_TAGS: &str = "cascade_ingest_rtmp_bad_tags_total";
/// RTMP messages of types we do not handle, ignored.
pub const RTMP_UNKNOWN_MESSAGES: &str = "cascade_ingest_rtmp_unknown_messages_total";
/// Timestamp jumps rebased.
pub const TIMESTAMP_JUMPS: &str = "cascade_ingest_timestamp_jumps_total";
/// Live streams whose video has B-frames.
pub const BFRAMES_STREAMS: &str = "cascade_ingest_bframes_streams";
/// Opus frames produced by the AAC transcoder.
pub const OPUS_FRAMES: &str = "cascade_ingest_opus_frames_total";

/// B-frame transcodes (ffmpeg children) running.
pub const TRANSCODES: &str = "cascade_ingest_transcodes";
/// Frames into and out of the transcoders, by `direction` (`in`, `out`).
pub const TRANSCODE_FRAMES: &str = "cascade_ingest_transcode_frames_total";
/// Source frames not transcoded because ffmpeg fell behind.
pub const TRANSCODE_DROPPED: &str = "cascade_ingest_transcode_dropped_frames_total";
/// B-frame streams passed through instead of transcoded, by `reason`
/// (`limit`, `spawn`, `exit`, `output`, `stall`).
pub const TRANSCODE_FALLBACKS: &str = "cascade_ingest_transcode_fallbacks_total";
/// Time a frame spends in ffmpeg (stdin queue to parsed output), seconds.
pub const TRANSCODE_DELAY: &str = "cascade_ingest_transcode_delay_seconds";
/// RTMP streams with a running ABR ladder (`--abr-ladder`).
pub const LADDER_STREAMS: &str = "cascade_ingest_ladder_streams";
/// ABR ladders that did not start or ended early, by `reason`.
pub const LADDER_FAILURES: &str = "cascade_ingest_ladder_failures_total";

/// WHIP sessions created.
pub const WHIP_SESSIONS: &str = "cascade_ingest_whip_sessions_total";
/// WHIP sessions ended, by `reason` (the rtc close reasons).
pub const WHIP_ENDED: &str = "cascade_ingest_whip_ended_total";
/// Frames received from WHIP publishers, by `track`.
pub const WHIP_FRAMES: &str = "cascade_ingest_whip_frames_total";
/// Keyframe requests (PLI) sent to WHIP publishers.
pub const WHIP_PLI: &str = "cascade_ingest_whip_pli_total";
/// Simulcast layers published as renditions (one per layer at go-live).
pub const WHIP_RENDITIONS: &str = "cascade_ingest_whip_renditions_total";
/// Catalog updates carrying simulcast renditions' live bitrates.
pub const WHIP_RATE_UPDATES: &str = "cascade_ingest_whip_rate_updates_total";
/// Frames of simulcast layers that started after go-live (or past the
/// layer cap), dropped at ingest.
pub const WHIP_SIMULCAST_DROPPED: &str = "cascade_ingest_whip_simulcast_dropped_frames_total";

/// RTSP pulls by `state` (`idle`, `connecting`, `live`, `error`).
pub const RTSP_PULLS: &str = "cascade_rtsp_pulls";
/// RTSP connection attempts after the first one of a pull (reconnects).
pub const RTSP_RECONNECTS: &str = "cascade_rtsp_reconnects_total";
/// Frames published from RTSP pulls, by `track` (`video`, `audio`).
pub const RTSP_FRAMES: &str = "cascade_rtsp_frames_total";
/// Video access units our RTP depacketizer dropped (Opus cameras: a
/// sequence gap, a broken fragment, over 4 MiB, waiting for a keyframe).
pub const RTSP_DROPPED_UNITS: &str = "cascade_rtsp_dropped_units_total";

/// Registers descriptions for the ingest's metrics.
pub fn describe() {
    metrics::describe_counter!(WHIP_SESSIONS, "WHIP sessions created");
    metrics::describe_counter!(WHIP_ENDED, "WHIP sessions ended, by reason");
    metrics::describe_counter!(
        WHIP_FRAMES,
        "frames received from WHIP publishers, by track"
    );
    metrics::describe_counter!(WHIP_PLI, "keyframe requests sent to WHIP publishers");
    metrics::describe_counter!(WHIP_RENDITIONS, "simulcast layers published as renditions");
    metrics::describe_counter!(
        WHIP_RATE_UPDATES,
        "catalog updates with the simulcast renditions' live bitrates"
    );
    metrics::describe_counter!(
        WHIP_SIMULCAST_DROPPED,
        "frames of simulcast layers that started after go-live, dropped at ingest"
    );
    metrics::describe_gauge!(RTSP_PULLS, "RTSP pulls by state");
    metrics::describe_counter!(
        RTSP_RECONNECTS,
        "RTSP connection attempts after a pull's first one"
    );
    metrics::describe_counter!(RTSP_FRAMES, "frames published from RTSP pulls, by track");
    metrics::describe_counter!(
        RTSP_DROPPED_UNITS,
        "video access units dropped by the RTSP depacketizer (gap, broken fragment, oversize, before a keyframe)"
    );
    metrics::describe_gauge!(RTMP_CONNECTIONS, "RTMP connections currently open");
    metrics::describe_counter!(RTMP_ACCEPTED, "RTMP connections accepted");
    metrics::describe_counter!(
        RTMP_REFUSED,
        "RTMP connections or publishes refused, by reason"
    );
    metrics::describe_counter!(RTMP_PUBLISHES, "RTMP publishes that went live");
    metrics::describe_counter!(
        RTMP_BAD_TAGS,
        "FLV tags dropped as malformed or unusable, by reason"
    );
    metrics::describe_counter!(
        RTMP_UNKNOWN_MESSAGES,
        "RTMP messages of unhandled types, ignored"
    );
    metrics::describe_counter!(TIMESTAMP_JUMPS, "publisher timestamp jumps rebased");
    metrics::describe_gauge!(BFRAMES_STREAMS, "live streams whose video carries B-frames");
    metrics::describe_counter!(OPUS_FRAMES, "Opus frames produced from AAC");
    metrics::describe_gauge!(TRANSCODES, "B-frame transcodes (ffmpeg children) running");
    metrics::describe_gauge!(LADDER_STREAMS, "RTMP streams with a running ABR ladder");
    metrics::describe_counter!(
        LADDER_FAILURES,
        "ABR ladders not started or ended early (the source plays on), by reason"
    );
    metrics::describe_counter!(
        TRANSCODE_FRAMES,
        "frames into and out of the B-frame transcoders, by direction"
    );
    metrics::describe_counter!(
        TRANSCODE_DROPPED,
        "source frames not transcoded because ffmpeg fell behind"
    );
    metrics::describe_counter!(
        TRANSCODE_FALLBACKS,
        "B-frame streams passed through instead of transcoded, by reason"
    );
    metrics::describe_histogram!(
        TRANSCODE_DELAY,
        "time a frame spends in the B-frame transcoder, seconds"
    );
}
