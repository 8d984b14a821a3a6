//! Node endpoints every role serves: `/healthz`, `/metrics` (Prometheus
//! text), `/api/streams` (JSON), `/api/cluster` (JSON: this node and the
//! nodes it heard of, with tiers and load), `POST /api/drain` (drain as on
//! SIGTERM; only with `--api-token`). With `--api-token`, `/metrics` and
//! `/api/*` answer 401 without `Authorization: Bearer TOKEN`; `/healthz`
//! stays open for load balancers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cascade_origin::Registry;
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
    /// This node in the cluster, for `/api/cluster`.
    pub cluster: Arc<cascade_origin::cluster::Node>,
}

/// The routes.
pub fn router(api: Api) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/streams", get(streams))
        .route("/api/drain", post(drain))
        .route("/api/cluster", get(cluster))
        .route_layer(axum::middleware::from_fn_with_state(
            api.api_token.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(guarded)
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
    let mut res = Json(api.registry.list()).into_response();
    // Dashboards on other origins poll this.
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    res
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
            cluster: Arc::new(cascade_origin::cluster::Node::new("edge", "http://e1:8080")),
        }
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
