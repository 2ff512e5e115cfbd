//! A request's routing: gather its routing keys (the path's user and the
//! token from the directory, a small auth body, GeoIP for a registration),
//! count it against the rate limits, let `decide::choose` pick the region
//! and `decide::admit` the cell. The rules themselves are in `decide.rs`,
//! pure and tested there.

use crate::decide::{self, BodyKey, Keys, Refusal};
use crate::route_key::{self, BodyRoute, MAX_ROUTED_BODY};
use crate::routes::{RouteTable, Upstream};
use crate::state::{Ctx, Router};
use homecell_proto::ErrorCode;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    /// Refuses with 429 past the per-address or per-user limit, if set
    /// (requests per second, from `router.rate_limit.per_ip` and
    /// `per_user` through the routing table, so a change applies without
    /// a restart). An IPv6 client counts by its /64.
    fn rate_limit(
        &self,
        client_ip: Option<std::net::IpAddr>,
        table: &RouteTable,
        user: Option<&str>,
    ) -> std::result::Result<(), Refusal> {
        let now = now_ms();
        let over = |what: &str, wait_ms: u64| {
            Refusal::new(
                ErrorCode::TooManyRequests,
                format!("too many requests from this {what}"),
                Some(wait_ms.div_ceil(1000)),
            )
        };
        if let (Some(limit), Some(ip)) = (table.rate_per_ip, client_ip) {
            let ip = homecell_common::client_addr::limit_key(ip);
            self.limiter
                .check(format!("ip:{ip}"), limit, 1000, now)
                .map_err(|wait| over("address", wait))?;
        }
        if let (Some(limit), Some(user)) = (table.rate_per_user, user) {
            self.limiter
                .check(format!("user:{user}"), limit, 1000, now)
                .map_err(|wait| over("user", wait))?;
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
        let ip = homecell_common::client_addr::limit_key(ip);
        self.limiter
            .check(format!("register:{ip}"), limit, 60_000, now_ms())
            .map_err(|wait| {
                Refusal::new(
                    ErrorCode::TooManyRequests,
                    "too many registrations from this address".into(),
                    Some(wait.div_ceil(1000)),
                )
            })
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
        let mut keys = Keys {
            path_user: route_key::user_in_path(&path).and_then(|u| state.user_region(u)),
            token: token
                .as_ref()
                .map(|v| (v.home.as_str(), state.user_region(&v.sub))),
            body: None,
            header: header.as_deref(),
        };
        if keys.body_can_decide()
            && let Some(kind) = route_key::body_route(&method, &path)
        {
            let body = read_small_body(session, ctx.body_deadline).await?;
            ctx.conceal_home = kind == BodyRoute::Identifier;
            keys.body = Some(match kind {
                BodyRoute::Identifier => {
                    BodyKey::Identifier(route_key::identifier(&body).and_then(|id| {
                        state
                            .claim_region(&self.directory_key.hmac(&id))
                            .map(str::to_string)
                    }))
                }
                BodyRoute::Refresh => BodyKey::Refresh(route_key::refresh_region(&body)),
                BodyRoute::Verification => {
                    BodyKey::Verification(route_key::registration_region(&body))
                }
                BodyRoute::Register => BodyKey::Register {
                    preference: route_key::preferred_region(&body),
                    country: match (&self.live.load().geo, ctx.client_ip) {
                        (Some(geo), Some(ip)) => geo.country(ip),
                        _ => None,
                    },
                },
            });
        }
        let choice = decide::choose(&keys, table);
        ctx.basis = choice.basis;
        decide::admit(table, &self.health, &choice.region, choice.registration)
    }
}
