//! The WHIP/WHEP resource protocol shared by publishers and viewers
//! (RFC 9725 and the WHEP draft): `POST` an offer, get `201` + `Location` +
//! `ETag` + answer (+ `Link: rel="ice-server"`); `PATCH` the resource with
//! trickle candidates (`204`) or new ICE credentials (restart: `200`, new
//! `ETag`); `DELETE` it; `OPTIONS` for CORS preflight. And [`ApiError`], the one place where
//! INTERFACE.md's error table becomes HTTP statuses.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::metrics as m;
use crate::session::{SessionHandle, SessionId};
use crate::{Error, Server};

/// Largest SDP offer or PATCH body accepted (INTERFACE.md: 413 above it).
pub const MAX_BODY: usize = 64 * 1024;
/// Seconds a client is asked to wait when the node is full or draining.
pub const RETRY_AFTER_SECS: u32 = 5;

/// An error answered to a signalling client. Every variant maps to one
/// status of INTERFACE.md's table; the body tells the user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: malformed SDP, bad stream name, offer without usable media.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: unknown stream or session resource.
    #[error("{0}")]
    NotFound(String),
    /// 406: no codec in the offer that the stream can use.
    #[error("{0}")]
    NotAcceptable(String),
    /// 412: `If-Match` does not match the resource's ETag.
    #[error("etag does not match the session's current etag")]
    PreconditionFailed,
    /// 413: body over 64 KiB.
    #[error("body larger than 64 KiB")]
    PayloadTooLarge,
    /// 415: wrong Content-Type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 428: ICE restart without `If-Match`.
    #[error("ice restart needs If-Match")]
    PreconditionRequired,
    /// 429 + Retry-After (seconds): too many wrong tokens from this address.
    #[error("too many wrong tokens from this address, retry in {0} s")]
    TooManyRequests(u64),
    /// 429 + Retry-After: too many sessions from one address.
    #[error("{0}")]
    TooManyFromAddress(&'static str),
    /// 503 + Retry-After: session limit reached or draining.
    #[error("{0}")]
    Unavailable(&'static str),
    /// 500: our bug or a node-wide failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyFromAddress(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = self.to_string();
        body.push('\n');
        let mut res = (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response();
        match self {
            Self::Unavailable(_) | Self::TooManyFromAddress(_) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            Self::TooManyRequests(secs) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::Unauthorized(_) => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        res
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Full => Self::Unavailable("node at its session limit or draining, retry later"),
            Error::TooManyFromAddress => {
                Self::TooManyFromAddress("too many sessions from this address, retry later")
            }
            Error::NoSession => Self::NotFound("no such session".into()),
            Error::Rtc(e) => Self::BadRequest(format!("offer refused: {e}")),
            Error::Io(e) => Self::Internal(e.to_string()),
        }
    }
}

/// A created session, as signalling returns it.
pub struct Created {
    /// The SDP answer.
    pub answer: String,
    /// The session.
    pub handle: SessionHandle,
}

/// Boxed future returned by [`Endpoint::create`].
pub type CreateFuture = Pin<Box<dyn Future<Output = Result<Created, ApiError>> + Send>>;

/// Boxed future returned by [`Endpoint::authorize_from`].
pub type AuthorizeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ApiError>> + Send + 'a>>;

/// What differs between WHIP and WHEP: who may create, and what a session is.
pub trait Endpoint: Send + Sync + 'static {
    /// `"whip"` or `"whep"`: URL prefix and session kind.
    fn kind(&self) -> &'static str;

    /// Checks the credentials of a create request on `stream`
    /// (`Authorization: Bearer` or `?token=`), see [`crate::auth::Auth`].
    fn authorize(&self, stream: &str, token: Option<&str>) -> Result<(), ApiError>;

    /// [`Endpoint::authorize`] for a client at `remote`, which may ask the
    /// auth webhook ([`crate::auth::Auth::decide`]); the default is the
    /// synchronous check.
    fn authorize_from<'a>(
        &'a self,
        stream: &'a str,
        token: Option<&'a str>,
        remote: SocketAddr,
    ) -> AuthorizeFuture<'a> {
        let _ = remote;
        Box::pin(std::future::ready(self.authorize(stream, token)))
    }

    /// False when anyone may create (open viewing): then wrong tokens are
    /// neither counted nor is a banned address refused.
    fn requires_token(&self) -> bool {
        true
    }

    /// Creates a session on `stream` from an SDP offer.
    fn create(&self, stream: String, offer: String) -> CreateFuture;

    /// Extra `Link: <…>; rel="ice-server"` values to send with the answer,
    /// after those of the node's configured servers ([`crate::ice`]).
    fn ice_servers(&self) -> Vec<String> {
        Vec::new()
    }

    /// Extensions of a created session's resource, as `(suffix, rel)`: the
    /// 201 carries `Link: <{session url}{suffix}>; rel="{rel}"` for each
    /// (WHEP's layer endpoint: `("/layer", LAYER_REL)`).
    fn session_links(&self, _session: SessionId) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    /// `POST {session}/layer` (`body` the JSON request) or `GET` (`None`):
    /// the WHEP layer-selection extension. Answers the response body (JSON)
    /// or the error; endpoints without layers answer 404.
    fn layer(&self, _session: SessionId, _body: Option<&[u8]>) -> Result<String, ApiError> {
        Err(ApiError::NotFound(
            "this session has no layer selection (the stream has one rendition)".into(),
        ))
    }

    /// `GET {session}/sse`: the session's server-sent events (WHEP's
    /// `layers` event: what the viewer gets, on every change). Endpoints
    /// without events answer 404.
    fn events(&self, _session: SessionId) -> Result<Events, ApiError> {
        Err(ApiError::NotFound(
            "this session has no events (the stream has one rendition)".into(),
        ))
    }
}

/// The link relation of WHEP's layer-selection extension (earlier WHEP
/// drafts' `urn:ietf:params:whep:ext:core:layer`).
pub const LAYER_REL: &str = "urn:ietf:params:whep:ext:core:layer";

/// The link relation of WHEP's server-sent events extension (earlier WHEP
/// drafts' `urn:ietf:params:whep:ext:core:server-sent-events`).
pub const SSE_REL: &str = "urn:ietf:params:whep:ext:core:server-sent-events";

/// A session's server-sent events: `(event name, data)` items; the stream
/// ends with the session.
pub type Events = std::pin::Pin<Box<dyn futures::Stream<Item = (&'static str, String)> + Send>>;

/// How often an idle event stream carries a comment, so proxies and
/// clients do not time it out.
const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Event names a `POST {session}/sse` may list (the WHEP drafts' JSON
/// array); more entries than this are refused.
const MAX_SSE_EVENTS: usize = 16;

struct Shared {
    endpoint: Arc<dyn Endpoint>,
    server: Server,
}

/// The routes of one endpoint kind: `/{kind}/{stream}` and
/// `/{kind}/{stream}/{session}`.
pub fn router(endpoint: Arc<dyn Endpoint>, server: Server) -> Router {
    let kind = endpoint.kind();
    let shared = Arc::new(Shared { endpoint, server });
    Router::new()
        .route(
            &format!("/{kind}/{{stream}}"),
            post(create).options(preflight),
        )
        .route(
            &format!("/{kind}/{{stream}}/{{session}}"),
            axum::routing::patch(patch)
                .delete(delete)
                .options(preflight_session),
        )
        .route(
            &format!("/{kind}/{{stream}}/{{session}}/layer"),
            post(layer_post).get(layer_get).options(preflight_layer),
        )
        .route(
            &format!("/{kind}/{{stream}}/{{session}}/sse"),
            post(sse_post).get(sse_get).options(preflight_layer),
        )
        .with_state(shared)
        .layer(axum::middleware::from_fn(cors))
}

/// CORS on every response (players on other origins). Written by hand
/// because a generic CORS layer answers preflights itself, without the
/// `Accept-Post` that WHIP/WHEP clients read.
pub async fn cors(req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        origin.unwrap_or_else(|| HeaderValue::from_static("*")),
    );
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link, Accept-Post, Accept-Patch, Retry-After"),
    );
    res
}

/// `OPTIONS /{kind}/{stream}`: CORS preflight for the POST, and the
/// `Accept-Post` WHIP/WHEP clients read.
async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            ("accept-post", "application/sdp"),
            ("access-control-allow-methods", "POST, OPTIONS"),
            (
                "access-control-allow-headers",
                "Authorization, Content-Type, If-Match",
            ),
            ("access-control-max-age", "86400"),
        ],
    )
        .into_response()
}

/// `OPTIONS` on a session resource: preflight for PATCH (with `If-Match`)
/// and DELETE.
async fn preflight_session() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            ("accept-patch", "application/trickle-ice-sdpfrag"),
            ("access-control-allow-methods", "PATCH, DELETE, OPTIONS"),
            (
                "access-control-allow-headers",
                "Authorization, Content-Type, If-Match",
            ),
            ("access-control-max-age", "86400"),
        ],
    )
        .into_response()
}

/// `OPTIONS` on a session's layer endpoint: preflight for its JSON POST.
async fn preflight_layer() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            ("access-control-allow-methods", "GET, POST, OPTIONS"),
            (
                "access-control-allow-headers",
                "Authorization, Content-Type",
            ),
            ("access-control-max-age", "86400"),
        ],
    )
        .into_response()
}

/// The token of a request: `Authorization: Bearer X`, else `?token=X`.
pub fn request_token<'a>(headers: &'a HeaderMap, query: &'a QueryToken) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .or(query.token.as_deref())
}

/// The client's address, a request extension the node sets from its
/// listener's `ConnectInfo` (both plain TCP and TLS).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// The client's IP, from [`ClientAddr`]; unspecified when served without
/// it (router unit tests), which then all share one wrong-token count.
pub fn client_ip(ext: &axum::http::Extensions) -> IpAddr {
    ext.get::<ClientAddr>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

/// The client's address, from [`ClientAddr`]; `0.0.0.0:0` when served
/// without it (router unit tests).
pub fn client_addr(ext: &axum::http::Extensions) -> SocketAddr {
    ext.get::<ClientAddr>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0)
}

/// Runs `check` under the node's wrong-token limit when a token (or the
/// webhook's consent) is `required`: 429 when `ip` is banned, before the
/// check runs (a right token from a banned address is refused too, so
/// 429s tell a guesser nothing, and a banned address cannot make the node
/// call the auth webhook), and a 401 from the check is counted against
/// `ip`. Open endpoints (`required` false) skip both.
pub async fn admit_token(
    server: &Server,
    protocol: &'static str,
    ip: IpAddr,
    token_given: bool,
    required: bool,
    check: impl Future<Output = Result<(), ApiError>>,
) -> Result<(), ApiError> {
    if !required {
        return Ok(());
    }
    let gate = server.auth();
    gate.admit(protocol, ip, std::time::Instant::now())
        .map_err(ApiError::TooManyRequests)?;
    let result = check.await;
    if matches!(result, Err(ApiError::Unauthorized(_))) {
        gate.failed(protocol, token_given, ip, std::time::Instant::now());
    }
    result
}

/// The answer to an [`crate::auth::Auth::decide`] refusal: 401 with
/// `unauthorized` as its text, or 503 when the auth webhook is busy.
pub fn denied(d: crate::auth::Denied, unauthorized: &'static str) -> ApiError {
    match d {
        crate::auth::Denied::Refused(_) => ApiError::Unauthorized(unauthorized),
        crate::auth::Denied::Busy => {
            ApiError::Unavailable("authorization service busy, retry later")
        }
    }
}

/// The `?token=` query parameter.
#[derive(Debug, Default, serde::Deserialize)]
pub struct QueryToken {
    /// The token.
    pub token: Option<String>,
}

/// True when a token was given and it matches `expected`, compared in
/// constant time ([`cascade_media::token::matches`]).
pub fn token_matches(given: Option<&str>, expected: &str) -> bool {
    given.is_some_and(|g| cascade_media::token::matches(g, expected))
}

fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody;
    // Frame by frame rather than `to_bytes`, whose one error cannot tell a
    // body over the cap (413) from one that failed or stalled past the
    // node's body timeout (400).
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame =
            frame.map_err(|_| ApiError::BadRequest("request body not received in time".into()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_BODY {
                return Err(ApiError::PayloadTooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

fn count(kind: &'static str, status: StatusCode) {
    metrics::counter!(m::HTTP_RESPONSES, "kind" => kind, "status" => status.as_str().to_string())
        .increment(1);
}

async fn create(
    State(s): State<Arc<Shared>>,
    Path(stream): Path<String>,
    Query(q): Query<QueryToken>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let kind = s.endpoint.kind();
    let ip = client_ip(req.extensions());
    // Unspecified: served without the client address (router unit tests).
    let peer = (!ip.is_unspecified()).then_some(ip);
    let remote = client_addr(req.extensions());
    let res = create_inner(&s, stream, q, peer, headers, remote, req.into_body()).await;
    let res = match res {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    count(kind, res.status());
    res
}

async fn create_inner(
    s: &Shared,
    stream: String,
    q: QueryToken,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    remote: SocketAddr,
    body: Body,
) -> Result<Response, ApiError> {
    let token = request_token(&headers, &q);
    admit_token(
        &s.server,
        s.endpoint.kind(),
        remote.ip(),
        token.is_some(),
        s.endpoint.requires_token(),
        s.endpoint.authorize_from(&stream, token, remote),
    )
    .await?;
    if !cascade_origin::valid_stream_name(&stream) {
        return Err(ApiError::BadRequest(cascade_origin::BAD_STREAM_NAME.into()));
    }
    if !content_type_is(&headers, "application/sdp") {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/sdp".into(),
        ));
    }
    let kind = s.endpoint.kind();
    let admission = s.server.admit_from(kind, peer)?;
    let body = read_body(body).await?;
    let offer = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::BadRequest("offer is not UTF-8 text".into()))?;
    let created = s.endpoint.create(stream.clone(), offer.clone()).await?;
    let id = created.handle.id();
    s.server.hold(id, admission);
    let etag = s
        .server
        .session(kind, &stream, id)
        .map(|(_, e)| e)
        .unwrap_or_default();
    let answer = crate::sdpfrag::strip_candidate_ufrag(&created.answer);
    let mut res = (StatusCode::CREATED, answer).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/{kind}/{stream}/{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Some(ufrag) = crate::sdpfrag::offer_ufrag(&offer) {
        s.server.set_remote_ufrag(id, ufrag);
    }
    for (suffix, rel) in s.endpoint.session_links(id) {
        let link = format!("</{kind}/{stream}/{id}{suffix}>; rel=\"{rel}\"");
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.append(header::LINK, v);
        }
    }
    let links = s.server.ice_servers().links(crate::ice::unix_now());
    for link in links.into_iter().chain(s.endpoint.ice_servers()) {
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.append(header::LINK, v);
        }
    }
    Ok(res)
}

fn lookup(s: &Shared, stream: &str, session: &str) -> Result<(SessionHandle, String), ApiError> {
    SessionId::parse(session)
        .and_then(|id| s.server.session(s.endpoint.kind(), stream, id))
        .ok_or_else(|| ApiError::NotFound("no such session (it ended or never existed)".into()))
}

async fn delete(
    State(s): State<Arc<Shared>>,
    Path((stream, session)): Path<(String, String)>,
) -> Response {
    let res = match lookup(&s, &stream, &session) {
        Ok((handle, _)) => match handle.close().await {
            Ok(()) => {
                // Barrier: the shard handles commands in order, so once this
                // call comes back the session is gone and a repeated DELETE
                // (or PATCH) finds no resource.
                let _ = handle.with_rtc(|_| ()).await;
                StatusCode::OK.into_response()
            }
            Err(e) => ApiError::from(e).into_response(),
        },
        Err(e) => e.into_response(),
    };
    count(s.endpoint.kind(), res.status());
    res
}

/// A session extension's JSON request: the session, and the body once
/// its type was checked.
async fn json_request(
    s: &Shared,
    stream: &str,
    session: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(SessionHandle, Bytes), ApiError> {
    let (handle, _) = lookup(s, stream, session)?;
    if !content_type_is(headers, "application/json") {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/json".into(),
        ));
    }
    Ok((handle, read_body(body).await?))
}

async fn layer_post(
    State(s): State<Arc<Shared>>,
    Path((stream, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let res = async {
        let (handle, body) = json_request(&s, &stream, &session, &headers, body).await?;
        s.endpoint.layer(handle.id(), Some(&body))
    }
    .await;
    let res = layer_response(res);
    count(s.endpoint.kind(), res.status());
    res
}

async fn layer_get(
    State(s): State<Arc<Shared>>,
    Path((stream, session)): Path<(String, String)>,
) -> Response {
    let res = lookup(&s, &stream, &session).and_then(|(h, _)| s.endpoint.layer(h.id(), None));
    let res = layer_response(res);
    count(s.endpoint.kind(), res.status());
    res
}

/// `POST {session}/sse` with the JSON array of events the player wants
/// (the WHEP drafts' subscription): `201` with the event stream's URL in
/// `Location`. Every event this session has is sent whatever the list
/// says (there is one, `layers`); the list is only checked for shape.
async fn sse_post(
    State(s): State<Arc<Shared>>,
    Path((stream, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let res = async {
        let (handle, body) = json_request(&s, &stream, &session, &headers, body).await?;
        let events: Vec<String> = serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "an event subscription is a JSON array of event names like [\"layers\"]: {e}"
            ))
        })?;
        if events.len() > MAX_SSE_EVENTS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_SSE_EVENTS} event names"
            )));
        }
        // Only to answer 404 for a session without events.
        drop(s.endpoint.events(handle.id())?);
        let location = format!("/{}/{stream}/{session}/sse", s.endpoint.kind());
        Ok((StatusCode::CREATED, [(header::LOCATION, location)]).into_response())
    }
    .await;
    let res = res.unwrap_or_else(IntoResponse::into_response);
    count(s.endpoint.kind(), res.status());
    res
}

/// `GET {session}/sse`: the event stream (`text/event-stream`).
async fn sse_get(
    State(s): State<Arc<Shared>>,
    Path((stream, session)): Path<(String, String)>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    let res = lookup(&s, &stream, &session).and_then(|(h, _)| s.endpoint.events(h.id()));
    let res = match res {
        Ok(events) => {
            let events = events.map(|(name, data)| {
                Ok::<_, std::convert::Infallible>(Event::default().event(name).data(data))
            });
            Sse::new(events)
                .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
                .into_response()
        }
        Err(e) => e.into_response(),
    };
    count(s.endpoint.kind(), res.status());
    res
}

fn layer_response(res: Result<String, ApiError>) -> Response {
    match res {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn patch(
    State(s): State<Arc<Shared>>,
    Path((stream, session)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let res = match patch_inner(&s, &stream, &session, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    count(s.endpoint.kind(), res.status());
    res
}

async fn patch_inner(
    s: &Shared,
    stream: &str,
    session: &str,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (handle, etag) = lookup(s, stream, session)?;
    if !content_type_is(&headers, "application/trickle-ice-sdpfrag") {
        return Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/trickle-ice-sdpfrag".into(),
        ));
    }
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if let Some(m) = if_match {
        if m != "*" && !m.split(',').any(|t| t.trim() == etag) {
            return Err(ApiError::PreconditionFailed);
        }
    }
    let body = read_body(body).await?;
    let frag = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("sdpfrag is not UTF-8 text".into()))?;
    let frag = crate::sdpfrag::Frag::parse(frag);
    let mut candidates = Vec::with_capacity(frag.candidates.len());
    for c in &frag.candidates {
        let parsed = str0m::Candidate::from_sdp_string(c)
            .map_err(|_| ApiError::BadRequest(format!("bad candidate line: {c}")))?;
        candidates.push(parsed);
    }
    // Remote candidates are capped per session (a trickle flood would grow
    // str0m's candidate and pair lists): the excess is ignored, as a
    // candidate str0m cannot pair would be.
    let allowed = s
        .server
        .reserve_candidates(handle.id(), s.endpoint.kind(), candidates.len());
    candidates.truncate(allowed);
    // RFC 8840 fragments repeat the current ufrag; only another one is a
    // restart (RFC 9725 §4.4.2).
    let restart = match &frag.ice_ufrag {
        Some(u) => s.server.remote_ufrag(handle.id()).as_deref() != Some(u.as_str()),
        None => false,
    };
    if !restart {
        for c in candidates {
            handle.add_remote_candidate(c).await?;
        }
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if if_match.is_none() {
        return Err(ApiError::PreconditionRequired);
    }
    let (Some(ufrag), Some(pwd)) = (frag.ice_ufrag.clone(), frag.ice_pwd.clone()) else {
        return Err(ApiError::BadRequest(
            "ice restart needs a=ice-ufrag and a=ice-pwd".into(),
        ));
    };
    let remote = str0m::IceCreds {
        ufrag: ufrag.clone(),
        pass: pwd,
    };
    // str0m restarts ICE only through a full re-offer; a fragment carries
    // just new credentials, so swap them directly: checks with the new
    // ufrag then pass, the DTLS/SRTP context and media flow stay, and a
    // new path is nominated as the client's checks succeed on it.
    let local = handle
        .with_rtc(move |rtc| {
            let local = str0m::IceCreds::new();
            let mut api = rtc.direct_api();
            api.set_local_ice_credentials(local.clone());
            api.set_remote_ice_credentials(remote);
            for c in candidates {
                rtc.add_remote_candidate(c);
            }
            local
        })
        .await?;
    s.server.set_remote_ufrag(handle.id(), ufrag);
    let etag = crate::server::new_etag();
    s.server.set_etag(handle.id(), etag.clone());
    metrics::counter!(m::ICE_RESTARTS, "kind" => s.endpoint.kind()).increment(1);
    let ours: Vec<String> = s
        .server
        .local_candidates()
        .iter()
        .map(|c| c.to_sdp_string())
        .collect();
    let body = crate::sdpfrag::restart_answer(
        &local.ufrag,
        &local.pass,
        frag.media.as_deref(),
        frag.mid.as_deref(),
        &ours,
    );
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/trickle-ice-sdpfrag"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        // The comparison itself is tested in cascade-media.
        assert!(token_matches(Some("abc"), "abc"));
        assert!(!token_matches(Some("abd"), "abc"));
        assert!(!token_matches(None, "abc"));
        assert!(!token_matches(None, ""));
    }

    #[test]
    fn statuses() {
        assert_eq!(ApiError::PayloadTooLarge.status(), 413);
        assert_eq!(ApiError::Unavailable("x").status(), 503);
        let r = ApiError::Unavailable("x").into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
    }
}
