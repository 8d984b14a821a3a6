//! Metric names of the WebRTC session layer, registered at start-up.

/// Sessions opened, by kind (`whip`, `whep`, `ws`).
pub const SESSIONS_OPENED: &str = "cascade_rtc_sessions_opened_total";
/// Sessions closed, by kind and reason.
pub const SESSIONS_CLOSED: &str = "cascade_rtc_sessions_closed_total";
/// Sessions alive, by kind.
pub const SESSIONS: &str = "cascade_rtc_sessions";
/// New sessions refused at admission, by kind and reason
/// (`publishers_full`, `viewers_full`, `per_ip`).
pub const SESSIONS_REFUSED: &str = "cascade_rtc_sessions_refused_total";
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

/// ICE-TCP connections refused at accept, by reason (`per_ip`, `limit`).
pub const TCP_REFUSED: &str = "cascade_rtc_tcp_refused_total";
/// ICE-TCP connections closed, by reason (`peer`, `idle`, `unbound`,
/// `unroutable`, `session_ended`).
pub const TCP_CLOSED: &str = "cascade_rtc_tcp_closed_total";
/// Remote ICE candidates ignored past the per-session cap, by kind.
pub const CANDIDATES_REFUSED: &str = "cascade_rtc_candidates_refused_total";
/// Source addresses in the routing table (all sessions).
pub const ROUTED_ADDRESSES: &str = "cascade_rtc_routed_addresses";
/// A shard or receive task that panicked or stopped (the node then exits).
pub const TASK_FAILURES: &str = "cascade_rtc_task_failures_total";

/// Token refusals by protocol and reason (`missing_token`, `wrong_token`,
/// `rate_limited`).
pub const AUTH_REFUSED: &str = "cascade_auth_refused_total";

/// Auth webhook calls by `result` (`allow`, `deny`, `error`, `timeout`).
pub const WEBHOOK_REQUESTS: &str = "cascade_auth_webhook_requests_total";
/// Auth webhook decisions answered from the cache.
pub const WEBHOOK_CACHE_HITS: &str = "cascade_auth_webhook_cache_hits_total";
/// Publishes/views refused because the webhook's calls in flight were at their cap.
pub const WEBHOOK_BUSY: &str = "cascade_auth_webhook_busy_total";
/// Auth webhook call duration, to the full answer or the timeout.
pub const WEBHOOK_SECONDS: &str = "cascade_auth_webhook_seconds";

/// Registers descriptions.
pub fn describe() {
    metrics::describe_counter!(
        WEBHOOK_REQUESTS,
        "auth webhook calls, by result (allow, deny, error, timeout)"
    );
    metrics::describe_counter!(
        WEBHOOK_CACHE_HITS,
        "auth webhook decisions reused from the cache"
    );
    metrics::describe_counter!(
        WEBHOOK_BUSY,
        "publishes/views refused: auth webhook calls in flight at their cap"
    );
    metrics::describe_histogram!(WEBHOOK_SECONDS, "auth webhook call duration");
    metrics::describe_counter!(
        AUTH_REFUSED,
        "publish/view attempts refused for their token, by protocol and reason"
    );
    metrics::describe_counter!(SESSIONS_OPENED, "webrtc sessions opened");
    metrics::describe_counter!(SESSIONS_CLOSED, "webrtc sessions closed, by reason");
    metrics::describe_counter!(
        SESSIONS_REFUSED,
        "new webrtc sessions refused at admission, by kind and reason (publishers_full, viewers_full, per_ip)"
    );
    metrics::describe_gauge!(SESSIONS, "webrtc sessions alive");
    metrics::describe_counter!(DATAGRAMS_IN, "datagrams received on the media ports");
    metrics::describe_counter!(DATAGRAMS_OUT, "datagrams sent on the media ports");
    metrics::describe_counter!(
        SEND_CALLS,
        "sendmsg calls on the udp port (one gso batch each)"
    );
    metrics::describe_counter!(DATAGRAMS_DROPPED, "datagrams dropped, by reason");
    metrics::describe_counter!(ICE_RESTARTS, "ice restarts through PATCH");
    metrics::describe_counter!(TCP_REFUSED, "ice-tcp connections refused, by reason");
    metrics::describe_counter!(TCP_CLOSED, "ice-tcp connections closed, by reason");
    metrics::describe_counter!(
        CANDIDATES_REFUSED,
        "remote ice candidates ignored past the per-session cap"
    );
    metrics::describe_gauge!(ROUTED_ADDRESSES, "source addresses in the routing table");
    metrics::describe_counter!(TASK_FAILURES, "shard or receive tasks that failed");
    metrics::describe_counter!(HTTP_RESPONSES, "whip/whep signalling responses, by status");
}
