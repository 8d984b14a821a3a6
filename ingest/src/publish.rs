//! The browser publish page `GET /publish/{stream}`: one self-contained
//! HTML/JS file (no CDN, no other request than WHIP itself) that sends the
//! camera or the screen to `/whip/{stream}` with the token the user types
//! (or `?token=`), and shows the connection state and what is being sent.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page; `{stream}` is filled in by JavaScript from the URL, so the
/// bytes are static and nothing from the request is echoed into HTML.
const PAGE: &str = include_str!("publish.html");

/// `GET /publish/{stream}`.
pub fn router() -> Router {
    Router::new().route("/publish/{stream}", get(page))
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
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page needs the camera/microphone/screen of its own origin only.
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn serves_the_page_and_refuses_bad_names() {
        let res = router()
            .oneshot(Request::get("/publish/cam_1").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("/whip/"));
        assert!(
            !html.contains("src=\"http"),
            "self-contained: no external scripts"
        );
        let res = router()
            .oneshot(
                Request::get("/publish/bad%20name")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    }
}
