//! Metric names of the relay, registered with descriptions at start-up.

/// Relay links currently up, by direction (`in`: accepted, `out`: connected).
pub const RELAY_LINKS: &str = "cascade_origin_relay_links";
/// Groups sent over the relay.
pub const RELAY_GROUPS_SENT: &str = "cascade_origin_relay_groups_sent_total";
/// Groups reset (abandoned) because a newer one superseded them.
pub const RELAY_GROUPS_RESET: &str = "cascade_origin_relay_groups_reset_total";
/// Frames sent over the relay.
pub const RELAY_FRAMES_SENT: &str = "cascade_origin_relay_frames_sent_total";
/// Frames received over the relay.
pub const RELAY_FRAMES_RECEIVED: &str = "cascade_origin_relay_frames_received_total";
/// Frames received too late (their group was already superseded) and dropped.
pub const RELAY_FRAMES_DROPPED: &str = "cascade_origin_relay_frames_dropped_total";
/// Relay connections refused, by reason (`auth`, `protocol`, `timeout`,
/// `busy`, `version`, `handshakes`, `handshakes_per_source`, `loop`: the
/// link would close a loop of relay links, counted by the end that saw it).
pub const RELAY_REFUSED: &str = "cascade_origin_relay_refused_total";
/// Relay links closed because the peer broke the protocol after authenticating.
pub const RELAY_PROTOCOL_ERRORS: &str = "cascade_origin_relay_protocol_errors_total";

/// Relay handshakes in progress (peers not yet authenticated).
pub const RELAY_HANDSHAKES: &str = "cascade_origin_relay_handshakes";
/// Relay connection attempts asked to validate their address (QUIC Retry).
pub const RELAY_RETRIES: &str = "cascade_origin_relay_retries_total";
/// Streams refused on a link that stays up, by reason (`catalog`).
pub const RELAY_STREAMS_REFUSED: &str = "cascade_origin_relay_streams_refused_total";
/// Rendition selections received from subscribers (`Select`: the renditions
/// a subscribing node reads changed; the others are held back).
pub const RELAY_SELECTS: &str = "cascade_origin_relay_selects_total";
/// Renditions of relayed streams this node receives no frames of because
/// nobody here reads them (per-rendition subscription).
pub const RELAY_RENDITIONS_HELD: &str = "cascade_origin_relay_renditions_held";
/// Whether this node's relay link to an upstream origin is up (1) or not
/// (0), by `origin` (`primary`: `--origin`, `standby`: `--origin-standby`).
pub const RELAY_UPSTREAM: &str = "cascade_origin_relay_upstream";
/// Relay links that came up to another origin than the previous link (an
/// edge moving to the standby or back), by `to` (`primary`, `standby`).
pub const RELAY_FAILOVERS: &str = "cascade_origin_relay_failovers_total";

/// Registers descriptions for the relay's metrics.
pub fn describe() {
    metrics::describe_gauge!(RELAY_LINKS, "relay links currently up");
    metrics::describe_counter!(RELAY_GROUPS_SENT, "groups sent over the relay");
    metrics::describe_counter!(
        RELAY_GROUPS_RESET,
        "groups reset because a newer group superseded them"
    );
    metrics::describe_counter!(RELAY_FRAMES_SENT, "frames sent over the relay");
    metrics::describe_counter!(RELAY_FRAMES_RECEIVED, "frames received over the relay");
    metrics::describe_counter!(
        RELAY_FRAMES_DROPPED,
        "frames received after their group was superseded"
    );
    metrics::describe_counter!(RELAY_REFUSED, "relay connections refused");
    metrics::describe_counter!(
        RELAY_PROTOCOL_ERRORS,
        "relay links closed for protocol violations"
    );
    metrics::describe_gauge!(RELAY_HANDSHAKES, "relay handshakes in progress");
    metrics::describe_counter!(RELAY_RETRIES, "relay connection attempts sent a QUIC Retry");
    metrics::describe_counter!(
        RELAY_STREAMS_REFUSED,
        "relay streams refused while their link stays up"
    );
    metrics::describe_counter!(
        RELAY_SELECTS,
        "rendition selections received from subscribing nodes"
    );
    metrics::describe_gauge!(
        RELAY_RENDITIONS_HELD,
        "renditions of relayed streams not received because nobody here reads them"
    );
    metrics::describe_gauge!(
        RELAY_UPSTREAM,
        "relay link to the primary or standby origin up (1) or not (0)"
    );
    metrics::describe_counter!(
        RELAY_FAILOVERS,
        "relay links that came up to another origin than the previous one"
    );
}
