//! The cell's HTTP API under `/v1`: errors as problem+json, the extractors
//! every handler shares, and the router, built from one route table that
//! also produces the OpenAPI document (so the two cannot drift apart).

pub mod access;
pub mod auth;
pub mod cms;
pub mod identifiers;
pub mod me;
pub mod notices;
pub mod openapi;
pub mod permission;
pub mod region;
pub mod users;
pub mod wallet;
mod whole_body;

use crate::identity::service::{CLIENT_TYPES, Principal, Verified};
use crate::state::Cell;
use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use homecell_common::tls::PeerIdentity;
use homecell_proto::error::{CodedError, ErrorCode, PROBLEM_CONTENT_TYPE, Problem};
use serde::de::DeserializeOwned;
use std::net::IpAddr;
use std::sync::Arc;

/// Request bodies above this get 413.
pub const MAX_BODY: usize = 64 * 1024;

// A provider's callback the HTTP API took can always be forwarded whole to
// the user's home cell.
const _: () = assert!(MAX_BODY <= crate::grpc::MAX_FORWARDED_BODY);

/// An error answered as problem+json.
#[derive(Debug)]
pub struct ApiError(pub CodedError);

impl From<CodedError> for ApiError {
    fn from(e: CodedError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut p = Problem::new(self.0.code, self.0.message);
        p.errors = self.0.fields;
        let mut r = problem_response(p);
        // Routers replay a request answered so to the region it names.
        if let Some(region) = self.0.moved_to
            && let Ok(v) = header::HeaderValue::from_str(&region)
        {
            r.headers_mut()
                .insert(homecell_proto::error::MOVED_TO_HEADER, v);
        }
        if let Some(secs) = self.0.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        // The client goes there itself (a router keeps this header).
        if let Some(region) = self.0.home_region
            && let Ok(v) = header::HeaderValue::from_str(&region)
        {
            r.headers_mut()
                .insert(homecell_proto::error::HOME_REGION_HEADER, v);
        }
        r
    }
}

pub fn problem_response(p: Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, PROBLEM_CONTENT_TYPE)],
        p.to_json(),
    )
        .into_response()
}

pub fn problem(code: ErrorCode, detail: &str) -> Response {
    ApiError(CodedError::new(code, detail)).into_response()
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The caller, from `Authorization: Bearer <access token>`.
pub struct Auth(pub Principal);

impl FromRequestParts<Arc<Cell>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, cell: &Arc<Cell>) -> Result<Self, ApiError> {
        let Bearer(token) = Bearer::from_request_parts(parts, cell).await?;
        Ok(Self(cell.identity.confirm(token).await?))
    }
}

/// A verified bearer token whose session is yet to be checked, for a route
/// that checks it in its own read (`Identity::own_profile`).
pub struct Bearer(pub Verified);

impl FromRequestParts<Arc<Cell>> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, cell: &Arc<Cell>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                CodedError::new(
                    ErrorCode::Unauthenticated,
                    "a bearer access token is required",
                )
            })?;
        Ok(Self(cell.identity.verify(token.trim())?))
    }
}

/// `x-client-type`: app, web, mp or cms.
pub struct ClientType(pub &'static str);

impl<S: Sync> FromRequestParts<S> for ClientType {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let v = parts
            .headers
            .get("x-client-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        CLIENT_TYPES
            .iter()
            .find(|t| **t == v)
            .map(|t| Self(t))
            .ok_or_else(|| {
                CodedError::field("x-client-type", "must be one of app, web, mp, cms").into()
            })
    }
}

/// The client's address as the router resolved it (through trusted
/// proxies) and always overwrites (`x-homecell-client-ip`): the only
/// address per-address limits count. `X-Forwarded-For`'s last hop would be
/// the router's own peer, a load balancer shared by every client behind it.
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(client_ip(&parts.headers)))
    }
}

fn client_ip(h: &HeaderMap) -> Option<IpAddr> {
    h.get(homecell_common::client_addr::CLIENT_IP_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A query string, refused as problem+json (axum's own rejection is plain
/// text) naming what did not fit.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e| CodedError::invalid(format!("malformed query: {}", e.body_text())).into())
    }
}

/// Path parameters, refused as problem+json like the query.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e| {
                if e.status().is_server_error() {
                    tracing::error!(error = %e.body_text(), "a route's path parameters do not fit its handler");
                    CodedError::internal("path parameters").into()
                } else {
                    CodedError::invalid(format!("malformed path: {}", e.body_text())).into()
                }
            })
    }
}

/// A JSON body: `application/json`, at most `MAX_BODY`, and a clear error
/// naming the field when it does not fit the type.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(
                CodedError::new(ErrorCode::UnsupportedMediaType, "send application/json").into(),
            );
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    CodedError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("the body is over {MAX_BODY} bytes"),
                    )
                } else {
                    CodedError::invalid("cannot read the body")
                }
            })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map(Json).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() || path == "." {
                CodedError::invalid(format!("malformed JSON: {inner}")).into()
            } else {
                CodedError::field(path, inner.to_string()).into()
            }
        })
    }
}

/// A JSON answer with a status.
pub fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, axum::Json(body)).into_response()
}

pub fn router(cell: Arc<Cell>) -> Router {
    let table = openapi::routes();
    let mut r = Router::new();
    for route in table {
        let handler = match route.access {
            openapi::Access::Permission(p) => route.handler.route_layer(
                middleware::from_fn_with_state((cell.clone(), p), permission::require),
            ),
            _ => route.handler,
        };
        r = r.route(route.path, handler);
    }
    // Cell-to-cell gRPC shares the listener (and its mTLS identity check),
    // and admits cells only, whatever the method: a router forwards
    // clients' requests with its own certificate, so anything a router may
    // call is reachable from the internet through it. (Routers also pass
    // only the public API, common/src/paths.rs; this holds without them.)
    let grpc = tonic::service::Routes::new(
        homecell_proto::cell::cell_service_server::CellServiceServer::new(crate::grpc::CellGrpc(
            cell.clone(),
        ))
        // A move's bundle may reach 16 MiB (grpc.rs checks it); tonic's
        // default would refuse anything over 4 MiB.
        .max_decoding_message_size(crate::grpc::MAX_BUNDLE + 64 * 1024),
    )
    .prepare()
    .into_axum_router()
    .layer(middleware::from_fn(require_cell_peer));
    let r = r.merge(grpc.with_state(()));
    // Order matters (outermost last): the identity check runs before any
    // handler; the response headers are added to every answer; a body is
    // read whole before any of it (whole_body.rs);
    // the trace and the access log wrap it all.
    r.fallback(|| async { ApiError(CodedError::not_found("no such route")) })
        .method_not_allowed_fallback(|| async {
            ApiError(CodedError::new(
                ErrorCode::InvalidArgument,
                "method not allowed on this route",
            ))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(cell.clone(), moved_users))
        .layer(middleware::from_fn_with_state(cell.clone(), frozen_users))
        .layer(middleware::from_fn(require_internal_peer))
        .layer(middleware::from_fn_with_state(
            cell.clone(),
            response_headers,
        ))
        .layer(middleware::from_fn(whole_body::read_whole))
        .layer(middleware::from_fn(access::traced))
        .with_state(cell)
}

/// The cell is only reached through routers and other cells (mTLS); any other
/// certificate holder is refused.
async fn require_internal_peer(req: Request, next: Next) -> Response {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity::Router { .. } | PeerIdentity::Cell { .. }) => next.run(req).await,
        // A gRPC caller is told in gRPC's terms.
        _ if grpc => {
            tonic::Status::permission_denied("only cells may call CellService").into_http()
        }
        Some(other) => problem(
            ErrorCode::PermissionDenied,
            &format!("{other} may not call the cell API"),
        ),
        None => problem(
            ErrorCode::Unauthenticated,
            "a client certificate is required",
        ),
    }
}

/// `CellService` is for cells: any other identity is refused before any
/// method runs (each method still checks what its caller may do).
async fn require_cell_peer(req: Request, next: Next) -> Response {
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity::Cell { .. }) => next.run(req).await,
        _ => tonic::Status::permission_denied("only cells may call CellService").into_http(),
    }
}

/// A request about a user the directory homes in another region (the user
/// moved, and the router that sent it is behind) is answered "moved", so
/// the router replays it there.
async fn moved_users(State(cell): State<Arc<Cell>>, req: Request, next: Next) -> Response {
    let elsewhere = homecell_common::paths::user_in_path(req.uri().path()).and_then(|user| {
        let state = cell.replica.state();
        state
            .user_region(user)
            .filter(|home| *home != cell.region)
            .map(str::to_string)
    });
    match elsewhere {
        Some(home) => ApiError(CodedError::moved(&home)).into_response(),
        None => next.run(req).await,
    }
}

/// A write aimed at a user a move has frozen here (the user in the path,
/// else the bearer's) waits for the move to end, then goes on: to "moved"
/// (above) once the user lives elsewhere, so the router replays it at the
/// new home. A move that takes longer answers 503 `user_moving`. Costs
/// nothing while no move is under way.
async fn frozen_users(State(cell): State<Arc<Cell>>, req: Request, next: Next) -> Response {
    let frozen = &cell.moves.frozen;
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) || !frozen.any() {
        return next.run(req).await;
    }
    let user = homecell_common::paths::user_in_path(req.uri().path())
        .map(str::to_string)
        .or_else(|| bearer_subject(&req));
    if let Some(user) = user
        && let Err(e) = frozen.wait(&user).await
    {
        return ApiError(e).into_response();
    }
    next.run(req).await
}

/// The `sub` of a bearer token, unverified: only to find whom a request is
/// about (the handler verifies the token as ever).
fn bearer_subject(req: &Request) -> Option<String> {
    use base64::Engine;
    let token = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Sub {
        sub: String,
    }
    serde_json::from_slice::<Sub>(&bytes).ok().map(|s| s.sub)
}

async fn response_headers(State(cell): State<Arc<Cell>>, req: Request, next: Next) -> Response {
    let request_id = req.headers().get("x-request-id").cloned();
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    // This cell's region, unless the answer names the caller's own home
    // elsewhere (a `home_elsewhere` problem).
    if !h.contains_key(homecell_proto::error::HOME_REGION_HEADER)
        && let Ok(v) = HeaderValue::from_str(&cell.region)
    {
        h.insert(homecell_proto::error::HOME_REGION_HEADER, v);
    }
    if let Some(id) = request_id {
        h.insert("x-request-id", id);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Opaque cursors: base64url of `<i64>:<id>`.
pub mod cursor {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use homecell_proto::error::CodedError;

    pub fn encode(at: i64, id: &str) -> String {
        B64.encode(format!("{at}:{id}"))
    }

    pub fn decode(c: &str) -> Result<(i64, String), CodedError> {
        let bad = || CodedError::invalid("malformed cursor");
        let raw = B64.decode(c).map_err(|_| bad())?;
        let s = String::from_utf8(raw).map_err(|_| bad())?;
        let (at, id) = s.split_once(':').ok_or_else(bad)?;
        Ok((at.parse().map_err(|_| bad())?, id.to_string()))
    }

    /// Cuts rows fetched with `limit + 1` to a page of `limit`, with the
    /// cursor of its last item when more follow.
    pub fn page<T>(
        mut items: Vec<T>,
        limit: i64,
        key: impl Fn(&T) -> (i64, &str),
    ) -> (Vec<T>, Option<String>) {
        let limit = usize::try_from(limit).unwrap_or(0);
        if items.len() <= limit {
            return (items, None);
        }
        items.truncate(limit);
        let next = items.last().map(|i| {
            let (at, id) = key(i);
            encode(at, id)
        });
        (items, next)
    }

    /// `limit` clamped to 1..=max, default `default`.
    pub fn limit(l: Option<i64>, default: i64, max: i64) -> i64 {
        l.unwrap_or(default).clamp(1, max)
    }
}
