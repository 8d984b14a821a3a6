//! `GET /play/{stream}`: the built-in player, one self-contained HTML page
//! (no CDN) that plays the stream over WHEP and retries while it is offline;
//! for streams with renditions a quality menu (Auto + each rendition by its
//! height) drives the WHEP layer endpoint, and the stats show the rendition.
//!
//! In a split cluster the page also asks its edge for the other healthy
//! edges (`GET /play/{stream}/edges`, from the cluster table the origin
//! sends every second) and, when its edge dies, plays on from the first of
//! them that answers: "reconnecting…" in between, same page.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cascade_origin::cluster::{Node, NodeView, FRESH};

const PAGE: &str = include_str!("player.html");
/// At most this many other edges go to a page: enough to get past a few
/// dead ones, small enough to stay a short answer.
const MAX_EDGES: usize = 8;

pub(crate) fn router(cluster: Option<Arc<Node>>) -> Router {
    Router::new()
        .route("/play/{stream}", get(page))
        .route("/play/{stream}/edges", get(edges))
        .with_state(cluster)
}

/// The public URLs of the healthy edges in `views` other than `own`, least
/// loaded first (the order placement prefers), at most [`MAX_EDGES`].
fn other_edges(views: &[NodeView], own: &str) -> Vec<String> {
    let mut v: Vec<&NodeView> = views
        .iter()
        .filter(|n| n.report.node != own && n.report.healthy_edge() && !n.report.url.is_empty())
        .filter(|n| n.last_seen_ms <= FRESH.as_millis() as u64)
        .collect();
    v.sort_by(|a, b| {
        a.report
            .fill()
            .total_cmp(&b.report.fill())
            .then(a.report.cpu_permille.cmp(&b.report.cpu_permille))
            .then(a.report.node.cmp(&b.report.node))
    });
    let mut urls: Vec<String> = Vec::new();
    for n in v {
        let url = n.report.url.trim_end_matches('/').to_string();
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    urls.truncate(MAX_EDGES);
    urls
}

/// `GET /play/{stream}/edges`: `{"edges": [URL, …]}`, where the page goes
/// when this edge stops answering. Public like the redirects of placement
/// that name the same URLs; empty outside a split cluster.
async fn edges(State(cluster): State<Option<Arc<Node>>>, Path(stream): Path<String>) -> Response {
    if !cascade_origin::valid_stream_name(&stream) {
        return (StatusCode::BAD_REQUEST, "bad stream name\n").into_response();
    }
    let list = cluster
        .map(|n| other_edges(&n.snapshot(Instant::now()), n.id()))
        .unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
            // Read by the page from whichever edge it plays on.
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        serde_json::json!({ "edges": list }).to_string(),
    )
        .into_response()
}

async fn page(Path(stream): Path<String>) -> Response {
    if !cascade_origin::valid_stream_name(&stream) {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}\n", cascade_origin::BAD_STREAM_NAME),
        )
            .into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn serves_page_and_refuses_bad_names() {
        let res = router(None)
            .oneshot(Request::get("/play/cam_1").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains("RTCPeerConnection")
                && !body.contains("http://")
                && !body.contains("https://")
        );
        // The quality menu uses the WHEP layer endpoint the 201 links to.
        assert!(body.contains(cascade_rtc::http::LAYER_REL) && body.contains("id=\"quality\""));
        let res = router(None)
            .oneshot(Request::get("/play/a%20b").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
    }

    fn view(node: &str, role: &str, url: &str, sessions: u64, seen_ms: u64) -> NodeView {
        NodeView {
            report: cascade_origin::cluster::Report {
                node: node.into(),
                role: role.into(),
                url: url.into(),
                sessions,
                max_sessions: 100,
                ..Default::default()
            },
            tier: 1,
            last_seen_ms: seen_ms,
            via: cascade_origin::cluster::Via::Upstream,
        }
    }

    #[test]
    fn other_edges_are_the_healthy_ones_least_loaded_first() {
        let mut draining = view("d", "edge", "http://d", 0, 0);
        draining.report.draining = true;
        let views = [
            view("me", "edge", "http://me", 0, 0),
            view("o", "origin", "http://o", 0, 0),
            view("busy", "edge", "http://busy:8080/", 50, 100),
            view("idle", "edge", "http://idle:8080", 1, 100),
            view("stale", "edge", "http://stale", 0, 6_000),
            view("nourl", "edge", "", 0, 0),
            view("full", "edge", "http://full", 100, 0),
            draining,
        ];
        assert_eq!(
            other_edges(&views, "me"),
            ["http://idle:8080", "http://busy:8080"]
        );
        let many: Vec<NodeView> = (0..20)
            .map(|i| view(&format!("e{i}"), "edge", &format!("http://e{i}"), 0, 0))
            .collect();
        assert_eq!(other_edges(&many, "me").len(), MAX_EDGES);
        assert!(other_edges(&[], "me").is_empty());
    }

    #[tokio::test]
    async fn edges_answers_json_with_cors() {
        let node = Arc::new(Node::new("edge", "http://me"));
        let res = router(Some(node))
            .oneshot(
                Request::get("/play/live/edges")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["access-control-allow-origin"], "*");
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({ "edges": [] }));
        let res = router(None)
            .oneshot(
                Request::get("/play/a%20b/edges")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
    }
}
