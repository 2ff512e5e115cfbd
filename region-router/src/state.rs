//! The router's shared state (`Router`, one per proxy thread over shared
//! `Arc`s) and one request's state (`Ctx`, from its header to its access
//! line). What a request does with them: `routing.rs` picks its cell,
//! `forward.rs` talks to it, `problem.rs` answers a refusal and
//! `access_log.rs` records it.

use crate::decide::Basis;
use crate::routes::{RouteTable, Upstream};
use arc_swap::ArcSwap;
use homecell_common::directory_key::DirectoryKey;
use homecell_common::replica::Replica;
use homecell_common::token_cache::TokenCache;
use homecell_common::trace::TraceParent;
use pingora::http::RequestHeader;
use std::sync::Arc;
use std::time::Instant;

/// The proxy's state. Every proxy thread has its own `Router` (see lib.rs);
/// all of them share what is behind the `Arc`s.
#[derive(Clone)]
pub struct Router {
    pub table: Arc<ArcSwap<RouteTable>>,
    pub replica: Arc<Replica>,
    pub tokens: Arc<TokenCache>,
    pub directory_key: Arc<DirectoryKey>,
    pub health: Arc<crate::health::Health>,
    /// Settings from the file that reload on SIGHUP (timeouts, GeoIP,
    /// trusted proxies).
    pub live: Arc<ArcSwap<crate::live::Live>>,
    /// The per-address, per-user and registration limits (keys carry
    /// their kind: `ip:`, `user:`, `register:`).
    pub limiter: Arc<homecell_common::sliding_limit::SlidingLimiter<String>>,
}

/// One request's state, from its header to its access line.
pub struct Ctx {
    pub request_id: String,
    /// This hop of the W3C trace: the caller's trace id, our span id.
    pub trace: TraceParent,
    /// The request's exported span (otel.rs), ended with the request.
    pub span: tracing::Span,
    pub upstream: Option<Arc<Upstream>>,
    pub basis: Basis,
    pub started: Instant,
    /// Cell instances this request could not connect to; a retry goes to
    /// another one.
    pub refused_by: Vec<std::net::SocketAddr>,
    /// Set when a cell answered that the user moved and the request is being
    /// replayed to the new home: the region that answered.
    pub replayed_from: Option<String>,
    /// An unauthenticated request routed by the identifier in its body
    /// (login, password reset): its answer must not say which region that
    /// identifier lives in, so it carries no `x-home-region`.
    pub conceal_home: bool,
    /// The client's address, resolved through trusted proxies: what limits
    /// count and what the cell is told (`x-homecell-client-ip`).
    pub client_ip: Option<std::net::IpAddr>,
    /// The public route the path is one of (what the access line names).
    pub route: Option<&'static str>,
    /// When the request's body must have arrived whole (`[clients]
    /// body_timeout_ms` after its head): routing's read of a small body
    /// and forwarding's both stop there.
    pub body_deadline: Option<tokio::time::Instant>,
}

impl Ctx {
    /// The request id (the client's, if usable) and this hop of the trace.
    pub fn for_request(req: &RequestHeader) -> Self {
        let headers = &req.headers;
        let header = headers.get("traceparent").and_then(|v| v.to_str().ok());
        let route = homecell_common::paths::template(req.uri.path());
        let method = homecell_common::paths::method_name(&req.method);
        // Named at once: the exporter takes a span's name when it starts.
        let span = tracing::info_span!(
            target: homecell_common::otel::TARGET,
            "request",
            otel.name = %match route {
                Some(route) => format!("{method} {route}"),
                None => method.to_string(),
            },
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            homecell.region = tracing::field::Empty,
            homecell.routed_by = tracing::field::Empty,
        );
        let caller = header.and_then(TraceParent::parse);
        homecell_common::otel::set_remote_parent(&span, caller);
        let trace = homecell_common::otel::hop(&span, TraceParent::continue_from(caller));
        Self {
            request_id: headers
                .get("x-request-id")
                .and_then(|v| usable_request_id(v.as_bytes()))
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            trace,
            span,
            upstream: None,
            basis: Basis::Default,
            started: Instant::now(),
            refused_by: Vec::new(),
            replayed_from: None,
            conceal_home: false,
            client_ip: None,
            route,
            body_deadline: None,
        }
    }
}

/// A client-sent request id is kept only if it is short and printable.
fn usable_request_id(v: &[u8]) -> Option<String> {
    let ok = !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(v).into_owned())
}
