//! Node endpoints every role serves: `/healthz`, `/metrics` (Prometheus
//! text), `/api/streams` (JSON).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cascade_origin::Registry;
use metrics_exporter_prometheus::PrometheusHandle;

/// What the node endpoints read.
#[derive(Clone)]
pub struct Api {
    pub registry: Arc<Registry>,
    pub prometheus: Option<PrometheusHandle>,
    pub draining: Arc<AtomicBool>,
}

/// The routes.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/streams", get(streams))
        .with_state(api)
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
        }
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
