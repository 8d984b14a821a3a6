//! Who may do what, against the real binary: `--api-token` on `/api/*`
//! and `/metrics`, wrong tokens rate-limited per IP (429 + Retry-After),
//! signed tokens (`--token-secret`) per stream and action.

#![allow(clippy::unwrap_used)]

mod common;

use common::Node;

async fn get(url: &str, bearer: Option<&str>) -> u16 {
    let mut rq = reqwest::Client::new().get(url);
    if let Some(t) = bearer {
        rq = rq.bearer_auth(t);
    }
    rq.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_guards_api_and_metrics() {
    let open = Node::start("all", &[]);
    assert_eq!(get(&format!("{}/api/streams", open.http), None).await, 200);
    assert_eq!(get(&format!("{}/metrics", open.http), None).await, 200);
    drop(open);

    let node = Node::start("all", &["--api-token", "api-s3cret"]);
    for path in ["/api/streams", "/metrics"] {
        let url = format!("{}{path}", node.http);
        assert_eq!(get(&url, None).await, 401, "{path} without token");
        assert_eq!(get(&url, Some("wrong")).await, 401, "{path} wrong token");
        assert_eq!(
            get(&url, Some("api-s3cret")).await,
            200,
            "{path} right token"
        );
    }
    assert_eq!(get(&format!("{}/healthz", node.http), None).await, 200);
}
