//! Node endpoints every role serves: `/healthz`, `/metrics` (Prometheus
//! text), `/api/streams` (JSON), `/api/cluster` (JSON: this node and the
//! nodes it heard of, with tiers and load), `POST /api/drain` (drain as on
//! SIGTERM; only with `--api-token`), and on nodes that pull cameras
//! `/api/pulls` (RTSP pulls: GET lists, POST adds, DELETE removes). With
//! `--api-token`, `/metrics` and the GETs of `/api/*` answer 401 without
//! `Authorization: Bearer TOKEN`; `/healthz` stays open for load
//! balancers. POST and DELETE of `/api/pulls` change what the node
//! publishes, so they take the publish token (or a publish JWT) instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use cascade_ingest::rtsp::{PullConfig, PullError, Pulls, Transport};
use cascade_origin::Registry;
use cascade_rtc::auth::Auth;
use metrics_exporter_prometheus::PrometheusHandle;

/// What the node endpoints read.
#[derive(Clone)]
pub struct Api {
    pub registry: Arc<Registry>,
    pub prometheus: Option<PrometheusHandle>,
    pub draining: Arc<AtomicBool>,
    /// `--api-token`: required on everything but `/healthz` when set.
    pub api_token: Option<Arc<str>>,
    /// Cancelled by `POST /api/drain`: the node drains as on SIGTERM.
    pub drain: tokio_util::sync::CancellationToken,
    /// `--drain-timeout`, reported by `POST /api/drain`.
    pub drain_timeout: std::time::Duration,
    /// RTSP pulls (roles `all` and `ingest`); `None`: `/api/pulls` is 404.
    pub pulls: Option<Arc<Pulls>>,
    /// Who may add or remove pulls: the publish token (or a publish JWT).
    pub publish_auth: Auth,
    /// The node's wrong-token limit (`--auth-max-failures`), shared with
    /// WHIP/WHEP/RTMP; `None` in router unit tests.
    pub auth_gate: Option<cascade_rtc::limit::AuthGate>,
    /// This node in the cluster, for `/api/cluster`.
    pub cluster: Arc<cascade_origin::cluster::Node>,
}

/// The routes.
pub fn router(api: Api) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/streams", get(streams))
        .route("/api/drain", post(drain))
        .route("/api/pulls", get(list_pulls))
        .route("/api/cluster", get(cluster))
        .route_layer(axum::middleware::from_fn_with_state(
            api.api_token.clone(),
            require_token,
        ));
    // Same paths, other methods: the publish token is checked in the handlers.
    let changes = Router::new()
        .route("/api/pulls", axum::routing::post(add_pull))
        .route("/api/pulls/{stream}", delete(remove_pull));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(guarded)
        .merge(changes)
        .with_state(api)
}

/// 401 unless the request carries `Authorization: Bearer` with the API
/// token (compared in constant time); passes everything when none is set.
async fn require_token(
    State(token): State<Option<Arc<str>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(want) = token else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if cascade_rtc::http::token_matches(given, &want) {
        return next.run(req).await;
    }
    let mut res = (StatusCode::UNAUTHORIZED, "missing or wrong API token\n").into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

async fn healthz(State(api): State<Api>) -> Response {
    if api.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    match &api.prometheus {
        Some(p) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            p.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed\n").into_response(),
    }
}

/// `POST /api/drain`: 202 and the node drains (idempotent). Refused with
/// 403 unless `--api-token` is set: an open endpoint that takes a node out
/// of service would let anyone do it.
async fn drain(State(api): State<Api>) -> Response {
    if api.api_token.is_none() {
        return (
            StatusCode::FORBIDDEN,
            "POST /api/drain needs --api-token (send SIGTERM to drain without one)\n",
        )
            .into_response();
    }
    if !api.drain.is_cancelled() {
        tracing::info!("POST /api/drain: draining");
        api.drain.cancel();
    }
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "draining": true,
            "timeout_s": api.drain_timeout.as_secs(),
        })),
    )
        .into_response()
}

/// `GET /api/cluster`: on the origin every node below it, on an edge its
/// own view (its subtree and the table its upstream sent).
async fn cluster(State(api): State<Api>) -> Response {
    let mut res = Json(crate::placement::cluster_json(&api.cluster)).into_response();
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    res
}

async fn streams(State(api): State<Api>) -> Response {
    let list = api.registry.list();
    let mut res = match &api.pulls {
        // Pulled streams carry their pull's state and last error.
        Some(pulls) => {
            let mut rows = serde_json::to_value(&list).unwrap_or_default();
            for row in rows.as_array_mut().into_iter().flatten() {
                let name = row["stream"].as_str().unwrap_or_default().to_string();
                if let Some(p) = pulls.get(&name) {
                    row["pull"] = serde_json::json!({"state": p.state, "error": p.error});
                }
            }
            Json(rows).into_response()
        }
        None => Json(list).into_response(),
    };
    // Dashboards on other origins poll this.
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    res
}

async fn list_pulls(State(api): State<Api>) -> Response {
    match &api.pulls {
        Some(p) => Json(p.list()).into_response(),
        None => (StatusCode::NOT_FOUND, "this role pulls no cameras\n").into_response(),
    }
}

/// The body of `POST /api/pulls`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPull {
    stream: String,
    url: String,
    #[serde(default)]
    on_demand: bool,
    #[serde(default)]
    transport: Transport,
    /// Seconds (on demand: stay connected this long after the last viewer).
    #[serde(default)]
    grace_s: Option<u64>,
}

/// `Ok` when the request carries the publish token or a publish JWT for
/// `stream`; else 401, or 429 once its address sent too many wrong tokens
/// (the node's one count, as on WHIP and RTMP).
fn admit(
    api: &Api,
    stream: &str,
    headers: &axum::http::HeaderMap,
    client: Option<cascade_rtc::http::ClientAddr>,
) -> Result<(), Box<Response>> {
    let ip = client.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let now = std::time::Instant::now();
    if let Some(gate) = &api.auth_gate {
        if let Err(wait) = gate.admit("api", ip, now) {
            let mut res =
                (StatusCode::TOO_MANY_REQUESTS, "too many wrong tokens\n").into_response();
            if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Err(Box::new(res));
        }
    }
    if authorized(api, stream, headers) {
        return Ok(());
    }
    if let Some(gate) = &api.auth_gate {
        gate.failed("api", headers.contains_key(header::AUTHORIZATION), ip, now);
    }
    Err(Box::new(unauthorized()))
}

/// True when the request carries the publish token or a publish JWT for
/// `stream`.
fn authorized(api: &Api, stream: &str, headers: &axum::http::HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let now = cascade_rtc::auth::unix_now();
    api.publish_auth
        .authorize(cascade_rtc::auth::Action::Publish, stream, token, now)
        .is_ok()
}

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized() -> Response {
    let mut res = (StatusCode::UNAUTHORIZED, "missing or wrong publish token\n").into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

async fn add_pull(
    State(api): State<Api>,
    client: Option<axum::Extension<cascade_rtc::http::ClientAddr>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(pulls) = &api.pulls else {
        return (StatusCode::NOT_FOUND, "this role pulls no cameras\n").into_response();
    };
    let new: NewPull = match serde_json::from_slice(&body) {
        Ok(n) => n,
        // serde's message names the field, never echoes the URL.
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad pull: {e}\n")).into_response(),
    };
    if let Err(res) = admit(&api, &new.stream, &headers, client.map(|c| c.0)) {
        return *res;
    }
    let mut config = PullConfig::new(&new.stream, &new.url, new.on_demand);
    config.transport = new.transport;
    if let Some(g) = new.grace_s {
        config.grace = std::time::Duration::from_secs(g.min(86_400));
    }
    match pulls.add(config) {
        Ok(()) => {
            let info = pulls.get(&new.stream);
            (StatusCode::CREATED, Json(info)).into_response()
        }
        Err(e @ PullError::Duplicate(_)) => {
            (StatusCode::CONFLICT, format!("{e}\n")).into_response()
        }
        Err(e @ PullError::TooMany(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn remove_pull(
    State(api): State<Api>,
    Path(stream): Path<String>,
    client: Option<axum::Extension<cascade_rtc::http::ClientAddr>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(pulls) = &api.pulls else {
        return (StatusCode::NOT_FOUND, "this role pulls no cameras\n").into_response();
    };
    if let Err(res) = admit(&api, &stream, &headers, client.map(|c| c.0)) {
        return *res;
    }
    if pulls.remove(&stream) {
        (StatusCode::OK, "removed\n").into_response()
    } else {
        (StatusCode::NOT_FOUND, "no such pull\n").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn api() -> Api {
        Api {
            registry: Registry::new(),
            prometheus: None,
            draining: Arc::new(AtomicBool::new(false)),
            drain: Default::default(),
            drain_timeout: std::time::Duration::from_secs(30),
            api_token: None,
            pulls: None,
            publish_auth: Auth::new(Some("pub"), None, None),
            auth_gate: None,
            cluster: Arc::new(cascade_origin::cluster::Node::new("edge", "http://e1:8080")),
        }
    }

    async fn send(r: &Router, rq: axum::http::request::Builder, body: &str) -> (u16, String) {
        let res = r
            .clone()
            .oneshot(rq.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn pulls_need_the_publish_token_and_hide_passwords() {
        let a = Api {
            pulls: Some(Pulls::new(Registry::new(), 4, true)),
            api_token: Some("apitoken".into()),
            ..api()
        };
        let r = router(a);
        let body =
            r#"{"stream":"cam1","url":"rtsp://admin:hunter2@127.0.0.1:1/x","on_demand":true}"#;
        let post = || Request::post("/api/pulls").header("content-type", "application/json");
        assert_eq!(send(&r, post(), body).await.0, 401);
        assert_eq!(
            send(&r, post().header("authorization", "Bearer apitoken"), body)
                .await
                .0,
            401,
            "the API token does not add pulls"
        );
        let (status, text) = send(&r, post().header("authorization", "Bearer pub"), body).await;
        assert_eq!(status, 201, "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("admin"),
            "{text}"
        );
        let (status, _) = send(&r, post().header("authorization", "Bearer pub"), body).await;
        assert_eq!(status, 409);
        let bad = r#"{"stream":"cam2","url":"http://x/y"}"#;
        let (status, text) = send(&r, post().header("authorization", "Bearer pub"), bad).await;
        assert_eq!(status, 400, "{text}");
        // GET follows the API token.
        assert_eq!(get_status(&r, "/api/pulls", None).await, 401);
        let (status, text) = send(
            &r,
            Request::get("/api/pulls").header("authorization", "Bearer apitoken"),
            "",
        )
        .await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v[0]["stream"], "cam1");
        assert_eq!(v[0]["url"], "rtsp://127.0.0.1:1/x");
        assert_eq!(v[0]["on_demand"], true);
        assert_eq!(v[0]["state"], "idle");
        assert!(v[0]["error"].is_null());
        assert!(!text.contains("hunter2"), "{text}");
        let del = || Request::delete("/api/pulls/cam1");
        assert_eq!(send(&r, del(), "").await.0, 401);
        assert_eq!(
            send(&r, del().header("authorization", "Bearer pub"), "")
                .await
                .0,
            200
        );
        assert_eq!(
            send(&r, del().header("authorization", "Bearer pub"), "")
                .await
                .0,
            404
        );
    }

    #[tokio::test]
    async fn wrong_publish_tokens_on_pulls_are_rate_limited() {
        let r = router(Api {
            pulls: Some(Pulls::new(Registry::new(), 4, true)),
            auth_gate: Some(cascade_rtc::limit::AuthGate::new(2)),
            ..api()
        });
        let del = || Request::delete("/api/pulls/x").header("authorization", "Bearer nope");
        assert_eq!(send(&r, del(), "").await.0, 401);
        assert_eq!(send(&r, del(), "").await.0, 401);
        // Banned now: even the right token waits.
        let ok = Request::delete("/api/pulls/x").header("authorization", "Bearer pub");
        assert_eq!(send(&r, ok, "").await.0, 429);
    }

    async fn get_status(r: &Router, path: &str, bearer: Option<&str>) -> u16 {
        let mut rq = Request::get(path);
        if let Some(t) = bearer {
            rq = rq.header("authorization", format!("Bearer {t}"));
        }
        let res = r
            .clone()
            .oneshot(rq.body(Body::empty()).unwrap())
            .await
            .unwrap();
        res.status().as_u16()
    }

    #[tokio::test]
    async fn api_token_guards_api_and_metrics_not_healthz() {
        let open = router(api());
        assert_eq!(get_status(&open, "/api/streams", None).await, 200);
        let r = router(Api {
            api_token: Some("s3cret".into()),
            ..api()
        });
        assert_eq!(get_status(&r, "/api/streams", None).await, 401);
        assert_eq!(get_status(&r, "/api/streams", Some("wrong")).await, 401);
        assert_eq!(get_status(&r, "/metrics", None).await, 401);
        assert_eq!(get_status(&r, "/api/streams", Some("s3cret")).await, 200);
        assert_eq!(get_status(&r, "/api/cluster", None).await, 401);
        assert_eq!(get_status(&r, "/api/cluster", Some("s3cret")).await, 200);
        // No recorder in unit tests: 404 means the token let it through.
        assert_eq!(get_status(&r, "/metrics", Some("s3cret")).await, 404);
        assert_eq!(get_status(&r, "/healthz", None).await, 200);
    }

    async fn post_status(r: &Router, path: &str, bearer: Option<&str>) -> u16 {
        let mut rq = Request::post(path);
        if let Some(t) = bearer {
            rq = rq.header("authorization", format!("Bearer {t}"));
        }
        let res = r
            .clone()
            .oneshot(rq.body(Body::empty()).unwrap())
            .await
            .unwrap();
        res.status().as_u16()
    }

    #[tokio::test]
    async fn drain_needs_the_api_token_and_is_idempotent() {
        let open = api();
        // No API token configured: nobody may drain over HTTP.
        assert_eq!(
            post_status(&router(open.clone()), "/api/drain", None).await,
            403
        );
        assert!(!open.drain.is_cancelled());
        let a = Api {
            api_token: Some("s3cret".into()),
            ..api()
        };
        let r = router(a.clone());
        assert_eq!(post_status(&r, "/api/drain", None).await, 401);
        assert_eq!(post_status(&r, "/api/drain", Some("wrong")).await, 401);
        assert!(!a.drain.is_cancelled());
        assert_eq!(post_status(&r, "/api/drain", Some("s3cret")).await, 202);
        assert!(a.drain.is_cancelled());
        assert_eq!(post_status(&r, "/api/drain", Some("s3cret")).await, 202);
        assert_eq!(get_status(&r, "/api/drain", Some("s3cret")).await, 405);
    }

    #[tokio::test]
    async fn healthz_turns_503_when_draining() {
        let a = api();
        let r = router(a.clone());
        let res = r
            .clone()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        a.draining.store(true, Ordering::Relaxed);
        let res = r
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
    }

    #[tokio::test]
    async fn streams_lists_live_streams() {
        let a = api();
        let _p = a
            .registry
            .publish("s1", cascade_origin::catalog::Catalog::default(), "whip")
            .unwrap();
        let res = router(a)
            .oneshot(Request::get("/api/streams").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v[0]["stream"], "s1");
        assert_eq!(v[0]["protocol"], "whip");
    }
}
