//! Metric names of the WebRTC session layer, registered at start-up.

/// Sessions opened, by kind (`whip`, `whep`, `ws`).
pub const SESSIONS_OPENED: &str = "cascade_rtc_sessions_opened_total";
/// Sessions closed, by kind and reason.
pub const SESSIONS_CLOSED: &str = "cascade_rtc_sessions_closed_total";
/// Sessions alive, by kind.
pub const SESSIONS: &str = "cascade_rtc_sessions";
/// Datagrams received on the media ports.
pub const DATAGRAMS_IN: &str = "cascade_rtc_datagrams_in_total";
/// Datagrams sent.
pub const DATAGRAMS_OUT: &str = "cascade_rtc_datagrams_out_total";
/// `sendmsg` calls on the UDP port: `datagrams_out / send_calls` is the GSO batching factor.
pub const SEND_CALLS: &str = "cascade_rtc_send_calls_total";
/// Datagrams dropped, by reason.
pub const DATAGRAMS_DROPPED: &str = "cascade_rtc_datagrams_dropped_total";
/// Signalling requests answered, by kind and status.
pub const HTTP_RESPONSES: &str = "cascade_rtc_http_responses_total";

/// ICE restarts done through PATCH, by kind.
pub const ICE_RESTARTS: &str = "cascade_rtc_ice_restarts_total";

/// Registers descriptions.
pub fn describe() {
    metrics::describe_counter!(SESSIONS_OPENED, "webrtc sessions opened");
    metrics::describe_counter!(SESSIONS_CLOSED, "webrtc sessions closed, by reason");
    metrics::describe_gauge!(SESSIONS, "webrtc sessions alive");
    metrics::describe_counter!(DATAGRAMS_IN, "datagrams received on the media ports");
    metrics::describe_counter!(DATAGRAMS_OUT, "datagrams sent on the media ports");
    metrics::describe_counter!(
        SEND_CALLS,
        "sendmsg calls on the udp port (one gso batch each)"
    );
    metrics::describe_counter!(DATAGRAMS_DROPPED, "datagrams dropped, by reason");
    metrics::describe_counter!(ICE_RESTARTS, "ice restarts through PATCH");
    metrics::describe_counter!(HTTP_RESPONSES, "whip/whep signalling responses, by status");
}
