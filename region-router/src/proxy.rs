//! The router's shared state and a request's routing: which home cell it
//! goes to (from its path, token, small auth body or header; the rules are
//! in decide.rs), or the problem answer it gets instead; and the request's
//! metrics and access line. edge.rs runs the request, forward.rs talks to
//! the cell.

use crate::decide::{self, Basis, Refusal};
use crate::metrics;
use crate::route_key::{self, BodyRoute, MAX_ROUTED_BODY};
use crate::routes::{RouteTable, Upstream};
use arc_swap::ArcSwap;
use bytes::Bytes;
use homecell_common::directory_key::DirectoryKey;
use homecell_common::replica::Replica;
use homecell_common::token_cache::TokenCache;
use homecell_common::trace::TraceParent;
use homecell_proto::ErrorCode;
use homecell_proto::error::{PROBLEM_CONTENT_TYPE, Problem};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::{HttpTask, ServerSession};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the proxy needs to reach cells. The client certificate and the CA
/// are not here but in the proxy's connector (`connector_options`): a
/// per-peer certificate makes Pingora build a TLS configuration for every
/// new connection (so sessions never resume) and hash the certificate, by
/// formatting its serial, on every pool lookup.
pub struct CellClient {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl CellClient {
    pub fn new(t: &crate::config::UpstreamTimeouts) -> Self {
        Self {
            connect_timeout: Duration::from_millis(t.connect_ms),
            read_timeout: Duration::from_millis(t.read_ms),
            idle_timeout: Duration::from_millis(t.idle_ms),
        }
    }
}

/// The proxy's upstream connector: our CA only (no system roots) and our
/// client certificate, loaded once for every connection to every cell.
pub fn connector_options(
    conf: &pingora::server::configuration::ServerConf,
    tls: &homecell_common::tls::TlsPaths,
) -> pingora::connectors::ConnectorOptions {
    let mut o = pingora::connectors::ConnectorOptions::from_server_conf(conf);
    o.ca_file = Some(tls.ca.display().to_string());
    o.cert_key_file = Some((
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
    ));
    o
}

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
    pub limiter: Arc<crate::ratelimit::Limiter>,
}

/// One request's state, from its header to its access line.
pub struct Ctx {
    pub request_id: String,
    /// This hop of the W3C trace: the caller's trace id, our span id.
    pub trace: TraceParent,
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
        Self {
            request_id: headers
                .get("x-request-id")
                .and_then(|v| usable_request_id(v.as_bytes()))
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            trace: TraceParent::continue_from(
                headers.get("traceparent").and_then(|v| v.to_str().ok()),
            ),
            upstream: None,
            basis: Basis::Default,
            started: Instant::now(),
            refused_by: Vec::new(),
            replayed_from: None,
            conceal_home: false,
            client_ip: None,
            route: None,
            body_deadline: None,
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reads a small body that carries a routing key, keeping it for the cell
/// (Pingora replays the retry buffer upstream). Larger bodies are refused.
async fn read_small_body(
    session: &mut ServerSession,
    deadline: Option<tokio::time::Instant>,
) -> std::result::Result<serde_json::Value, Refusal> {
    let too_large = || {
        Refusal::new(
            ErrorCode::PayloadTooLarge,
            format!("this request's body is limited to {MAX_ROUTED_BODY} bytes"),
            None,
        )
    };
    if crate::forward::declared_length(session).is_some_and(|n| n > MAX_ROUTED_BODY) {
        return Err(too_large());
    }
    session.enable_retry_buffering();
    let mut body = Vec::new();
    loop {
        let read = session.read_request_body();
        let read = match deadline {
            Some(at) => match tokio::time::timeout_at(at, read).await {
                Ok(read) => read,
                Err(_) => {
                    return Err(Refusal::new(
                        ErrorCode::InvalidArgument,
                        "the request body did not arrive in time".into(),
                        None,
                    ));
                }
            },
            None => read.await,
        };
        match read {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_ROUTED_BODY {
                    return Err(too_large());
                }
            }
            Ok(None) => break,
            Err(_) => {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "cannot read the request body".into(),
                    None,
                ));
            }
        }
    }
    // Malformed JSON routes by default; the cell answers it properly.
    Ok(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

impl Router {
    /// The client's address: the peer, or behind trusted proxies the first
    /// untrusted `X-Forwarded-For` hop.
    fn client_ip(&self, session: &ServerSession) -> Option<std::net::IpAddr> {
        let peer = session.client_addr().and_then(|a| a.as_inet())?;
        // A proxy may add its own line instead of appending to the
        // client's: every line counts, in order, or a client's forged first
        // line would be taken for the proxy's word.
        let lines: Vec<&str> = session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{fffd}"))
            .collect();
        let joined = (lines.len() > 1).then(|| lines.join(","));
        let xff = joined.as_deref().or(lines.first().copied());
        Some(crate::geo::client_ip(
            peer.ip(),
            xff,
            &self.live.load().trusted_proxies,
        ))
    }

    /// Refuses with 429 past the per-address or per-user limit, if set. An
    /// IPv6 client counts by its /64.
    fn rate_limit(
        &self,
        client_ip: Option<std::net::IpAddr>,
        table: &RouteTable,
        user: Option<&str>,
    ) -> std::result::Result<(), Refusal> {
        let now = now_secs() as u64;
        let over = |what: &str| {
            Refusal::new(
                ErrorCode::TooManyRequests,
                format!("too many requests from this {what}"),
                Some(1),
            )
        };
        if let (Some(limit), Some(ip)) = (table.rate_per_ip, client_ip) {
            let ip = homecell_common::client_addr::limit_key(ip);
            if !self.limiter.allow(&format!("ip:{ip}"), limit, now) {
                return Err(over("address"));
            }
        }
        if let (Some(limit), Some(user)) = (table.rate_per_user, user)
            && !self.limiter.allow(&format!("user:{user}"), limit, now)
        {
            return Err(over("user"));
        }
        Ok(())
    }

    /// Registrations per client address (per /64) per minute: each costs
    /// an argon2 hash at a cell and a directory write at the control plane.
    fn registration_limit(
        &self,
        client_ip: Option<std::net::IpAddr>,
        table: &RouteTable,
    ) -> std::result::Result<(), Refusal> {
        let (Some(limit), Some(ip)) = (table.registrations_per_ip_per_minute, client_ip) else {
            return Ok(());
        };
        let minute = now_secs() as u64 / 60;
        let ip = homecell_common::client_addr::limit_key(ip);
        if self.limiter.allow(&format!("register:{ip}"), limit, minute) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::TooManyRequests,
                "too many registrations from this address".into(),
                Some(60 - now_secs() as u64 % 60),
            ))
        }
    }

    /// Picks the home cell from the request's routing keys (see decide.rs).
    pub async fn route(
        &self,
        session: &mut ServerSession,
        ctx: &mut Ctx,
        table: &RouteTable,
    ) -> std::result::Result<Arc<Upstream>, Refusal> {
        let req = session.req_header();
        // Only the public API is public: cells also serve other cells
        // (gRPC), and the router's own certificate must not lend the
        // internet a way in.
        let grpc = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.as_bytes().get(..16))
            .is_some_and(|t| t.eq_ignore_ascii_case(b"application/grpc"));
        ctx.route = homecell_common::paths::template(req.uri.path());
        if grpc || ctx.route.is_none() {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                "no such route".into(),
                None,
            ));
        }
        let state = self.replica.state();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        let bearer = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let header = match req.headers.get("x-home-region") {
            None => None,
            Some(v) => Some(decide::header_region(v.to_str().unwrap_or("\u{fffd}"))?),
        };
        // A presented token must be valid, whatever else routes the request:
        // an invalid one never reaches a cell.
        let token = match bearer {
            Some(t) => {
                let v = self.tokens.verify(&t, &*state, now_secs()).map_err(|e| {
                    let why = match e {
                        homecell_common::jwt::TokenError::Expired => "the access token has expired",
                        _ => "invalid access token",
                    };
                    Refusal::new(ErrorCode::Unauthenticated, why.into(), None)
                })?;
                Some(v)
            }
            None => None,
        };
        ctx.client_ip = self.client_ip(session);
        self.rate_limit(ctx.client_ip, table, token.as_ref().map(|v| v.sub.as_str()))?;
        // Every registration, with a token or without.
        if route_key::body_route(&method, &path) == Some(BodyRoute::Register) {
            self.registration_limit(ctx.client_ip, table)?;
        }
        // The directory's home for the token's user wins over the claim in
        // the token: it changes when a user moves, the token does not.
        let token_home = token.map(|v| match state.user_region(&v.sub) {
            Some(r) if r != v.home => r.to_string(),
            _ => v.home.clone(),
        });
        let mut registration = false;
        let chosen: Option<(String, Basis)> = if let Some(r) =
            route_key::user_in_path(&path).and_then(|u| state.user_region(u))
        {
            Some((r.to_string(), Basis::UserPath))
        } else if let Some(home) = token_home {
            Some((home, Basis::Token))
        } else if let Some(kind) = route_key::body_route(&method, &path) {
            let body = read_small_body(session, ctx.body_deadline).await?;
            ctx.conceal_home = kind == BodyRoute::Identifier;
            match kind {
                BodyRoute::Identifier => route_key::identifier(&body)
                    .and_then(|id| {
                        state
                            .claim_region(&self.directory_key.hmac(&id))
                            .map(str::to_string)
                    })
                    .map(|r| (r, Basis::Identifier)),
                BodyRoute::Refresh => route_key::refresh_region(&body).map(|r| (r, Basis::Refresh)),
                BodyRoute::Register => {
                    registration = true;
                    // The body's `region`, else `x-home-region`, is the
                    // explicit preference.
                    let pref = route_key::preferred_region(&body).or_else(|| header.clone());
                    let live = self.live.load();
                    let country = match (&live.geo, ctx.client_ip) {
                        (Some(geo), Some(ip)) => geo.country(ip),
                        _ => None,
                    };
                    Some((
                        decide::registration_region(table, pref.as_deref(), country.as_deref()),
                        Basis::Registration,
                    ))
                }
            }
        } else {
            None
        };
        let (region, basis) = match (chosen, header) {
            (Some(c), _) => c,
            (None, Some(h)) => (h, Basis::Header),
            (None, None) => (table.default_region.clone(), Basis::Default),
        };
        ctx.basis = basis;
        decide::admit(table, &self.health, &region, registration)
    }
}

/// A client-sent request id is kept only if it is short and printable.
fn usable_request_id(v: &[u8]) -> Option<String> {
    let ok = !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(v).into_owned())
}

/// Answers with a problem+json body (header and body in one write).
pub async fn respond_problem(
    session: &mut ServerSession,
    ctx: &Ctx,
    refusal: &Refusal,
) -> pingora::Result<()> {
    let mut problem = Problem::new(refusal.code, refusal.detail.clone());
    problem.instance = Some(format!("urn:request:{}", ctx.request_id));
    let body = Bytes::from(problem.to_json());
    let mut resp = ResponseHeader::build(refusal.code.http_status(), Some(5))?;
    resp.insert_header("content-type", PROBLEM_CONTENT_TYPE)?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some(secs) = refusal.retry_after {
        resp.insert_header("retry-after", secs.to_string())?;
    }
    session
        .response_duplex_vec(vec![
            HttpTask::Header(Box::new(resp), false),
            HttpTask::Body(Some(body), true),
        ])
        .await?;
    Ok(())
}

impl Router {
    /// Metrics and the access line. No query string, headers, bodies or
    /// client address (they can carry identifiers or tokens), and the
    /// route's template rather than the path (`/v1/users/{id}`: a path can
    /// carry ids and client-chosen text).
    pub fn log(&self, session: &ServerSession, ctx: &Ctx) {
        let status = session.response_written().map(|r| r.status);
        let region = ctx.upstream.as_ref().map_or("none", |u| u.region.as_str());
        metrics::REQUESTS
            .with_label_values(&[region, status.as_ref().map_or("0", |s| s.as_str())])
            .inc();
        metrics::ROUTED
            .with_label_values(&[ctx.basis.as_str()])
            .inc();
        metrics::DURATION
            .with_label_values(&[region])
            .observe(ctx.started.elapsed().as_secs_f64());
        let req = session.req_header();
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            trace_id = ctx.trace.trace_id_hex(),
            method = %req.method,
            route = ctx.route.unwrap_or("-"),
            status = status.map_or(0, |s| s.as_u16()),
            region,
            routed_by = ctx.basis.as_str(),
            micros = ctx.started.elapsed().as_micros() as u64,
            "request"
        );
    }
}
