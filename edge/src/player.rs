//! `GET /play/{stream}`: the built-in player, one self-contained HTML page
//! (no CDN) that plays the stream over WHEP and retries while it is offline;
//! for streams with renditions a quality menu (Auto + each rendition by its
//! height) drives the WHEP layer endpoint, and the stats show the rendition.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("player.html");

pub(crate) fn router() -> Router {
    Router::new().route("/play/{stream}", get(page))
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
        let res = router()
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
        let res = router()
            .oneshot(Request::get("/play/a%20b").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
    }
}
