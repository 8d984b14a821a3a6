//! WHIP/WHEP signalling over HTTP: POST an SDP offer, read the 201 answer, DELETE the resource.
//!
//! The raw helpers return status, headers and body as they came, so tests can check error
//! answers (401, 404, 406, 413, 415, 503) as well as the happy path.

use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use reqwest::Url;

use crate::{Error, Result};

/// Deadline for one signalling request (connect + answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server answered, verbatim.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body as text (lossy UTF-8).
    pub body: String,
    /// The URL that answered: the request's, or where redirects (a `307`
    /// from cascade's `--placement`) led. `Location`s resolve against it.
    pub url: Url,
}

impl Reply {
    /// A header's value as text, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A created WHIP/WHEP session: the answer and where to DELETE it.
#[derive(Debug, Clone)]
pub struct Created {
    /// Absolute URL of the session resource (the `Location` resolved against the request).
    pub location: Url,
    /// The SDP answer.
    pub answer: String,
    /// The `ETag` header, if any.
    pub etag: Option<String>,
}

/// A client with the signalling timeout; cheap to clone.
pub fn client() -> Result<reqwest::Client> {
    client_trusting(None)
}

/// [`client`] that also trusts `root_ca` for `https://` (a private or test
/// CA) besides the system's roots.
pub fn client_trusting(root_ca: Option<&reqwest::Certificate>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
    if let Some(ca) = root_ca {
        b = b.add_root_certificate(ca.clone());
    }
    Ok(b.build()?)
}

/// POST `sdp` to `url` as `application/sdp` (with a Bearer token when given) and return the
/// reply whatever its status.
pub async fn post_offer(url: &str, sdp: &str, token: Option<&str>) -> Result<Reply> {
    post_raw(
        &client()?,
        url,
        "application/sdp",
        sdp.as_bytes().to_vec(),
        token,
    )
    .await
}

/// POST arbitrary bytes with an arbitrary content type (for 413/415 tests).
pub async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<Reply> {
    let mut req = client
        .post(url)
        .header(CONTENT_TYPE, content_type)
        .body(body);
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let final_url = resp.url().clone();
    let body = resp.text().await?;
    Ok(Reply {
        status,
        headers,
        body,
        url: final_url,
    })
}

/// POST an offer and require `201 Created` with a `Location`; anything else is
/// [`Error::Status`] carrying the server's status and body.
pub async fn create_session(
    client: &reqwest::Client,
    url: &str,
    sdp: &str,
    token: Option<&str>,
) -> Result<Created> {
    let reply = post_raw(
        client,
        url,
        "application/sdp",
        sdp.as_bytes().to_vec(),
        token,
    )
    .await?;
    if reply.status != 201 {
        return Err(Error::Status {
            status: reply.status,
            body: reply.body,
        });
    }
    let loc = reply
        .header(LOCATION.as_str())
        .ok_or_else(|| Error::BadAnswer("201 without Location".into()))?;
    // Relative to where the offer landed, after any placement redirect.
    let location = reply
        .url
        .join(loc)
        .map_err(|e| Error::BadAnswer(format!("bad Location: {e}")))?;
    Ok(Created {
        location,
        etag: reply.header("etag").map(str::to_owned),
        answer: reply.body,
    })
}

/// DELETE a session resource; returns the status code.
pub async fn delete(client: &reqwest::Client, location: &Url, token: Option<&str>) -> Result<u16> {
    let mut req = client.delete(location.clone());
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    Ok(req.send().await?.status().as_u16())
}
