//! One request's exchange with its home cell: the request header made fit
//! for an HTTP/1.1 hop, the body streamed up (a copy kept for a replay), the
//! answer streamed down (small ones written with their header in one go,
//! server-sent events and large ones as they arrive), the connection given
//! back to the pool.
//!
//! Attempts, at most one of each kind:
//! - a refused connect goes to the region's next instance (the request has
//!   not been sent);
//! - a pooled connection found dead is replaced by a fresh one: always when
//!   writing the request failed with no answer (the cell cannot have read
//!   it whole), and when
//!   it closed with no answer, for requests that are safe to send twice
//!   (an idempotent method, or an `Idempotency-Key` the cell dedupes by);
//!   cells say `Connection: close` on answers that leave a body unread, so
//!   a connection they are about to close is never pooled;
//! - a cell's "this user moved" answer (421 + `x-homecell-moved-to`) sends
//!   the whole request to the new home, once, with `x-homecell-replayed-from`.
//!
//! Why one file of this length: the attempt rules above share one request's
//! state (the body's copy, the pooled connection, the replay), and they are
//! checked by reading them together; the unit tests at the end check the
//! header rules; the attempts are tested end to end
//! (harness/tests/stale_connections.rs, routing.rs).

use crate::decide;
use crate::metrics;
use crate::pool;
use crate::state::{Ctx, Router};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::HttpTask;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v1::client::HttpSession as CellSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::time::Duration;

/// What forwarding needs of the edge (edge.rs): the router's state, the
/// connector to cells, and the body deadline of a request that has none
/// yet.
pub struct Hop<'a> {
    pub router: &'a Router,
    pub connector: &'a TransportConnector,
    pub body_timeout: Duration,
}

/// Where an exchange failed, which decides what the client is told.
pub enum Failure {
    /// No connection to any instance of the cell.
    Connect(Box<Error>),
    /// The cell, after the connection: timeouts, resets, bad answers.
    Cell(Box<Error>),
    /// The client: gone, or sent something unusable.
    Client(Box<Error>),
}

/// On a request replayed to a moved user's new home, and on its answer:
/// the region that answered "moved".
pub const REPLAYED_FROM: &str = "x-homecell-replayed-from";

/// Answers above this size, or without a length, are streamed chunk by
/// chunk; smaller ones are read whole and written with their header.
const WHOLE_ANSWER: usize = 64 * 1024;

/// At most this many `Connection` options are honoured (each names a header
/// to drop); more is refused, as a header this shape is an attack.
const MAX_CONNECTION_OPTIONS: usize = 16;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and proxy credentials: they
/// describe the client's connection to us, never our connection to a cell.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Who sent the request, for the forwarding headers.
pub struct Client {
    pub ip: Option<std::net::IpAddr>,
    pub https: bool,
}

impl Client {
    pub fn of(session: &ServerSession) -> Self {
        Self {
            ip: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            https: session
                .digest()
                .and_then(|d| d.ssl_digest.as_ref())
                .is_some(),
        }
    }
}

/// Our headers, parsed once: a name given as a string is parsed (and a
/// custom one allocated) on every insert.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_HOME_REGION: HeaderName =
    HeaderName::from_static(homecell_proto::error::HOME_REGION_HEADER);
const X_REPLAYED_FROM: HeaderName = HeaderName::from_static(REPLAYED_FROM);
const X_CLIENT_IP: HeaderName =
    HeaderName::from_static(homecell_common::client_addr::CLIENT_IP_HEADER);

/// The client's request as it goes to a cell: HTTP/1.1, hop-by-hop headers
/// and the ones `Connection` names removed, a `Host` for HTTP/2 clients,
/// framing for a body of unknown length, and our own forwarding headers.
///
/// Built afresh rather than cloned and edited: a clone copies the header
/// map and Pingora's map of the names' original case, and our inserts then
/// grow both. Names go to the cell in lower case (HTTP/1.1 names are
/// case-insensitive, and cells are ours).
pub fn upstream_request(
    client_req: &RequestHeader,
    client: &Client,
    ctx: &Ctx,
    has_body: bool,
) -> pingora::Result<RequestHeader> {
    let named: Vec<HeaderName> = client_req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .take(MAX_CONNECTION_OPTIONS + 1)
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    if named.len() > MAX_CONNECTION_OPTIONS {
        return Error::e_explain(ErrorType::InvalidHTTPHeader, "too many Connection options");
    }
    let mut headers = HeaderMap::with_capacity(client_req.headers.len() + 6);
    for (name, value) in &client_req.headers {
        // A 100 Continue goes to the client from us (edge.rs), before the
        // body; only the router marks a replay. Our other headers are
        // inserted below, replacing the client's.
        let dropped = HOP_BY_HOP.contains(&name.as_str())
            || named.contains(name)
            || name == header::EXPECT
            || name == X_REPLAYED_FROM
            || name == X_CLIENT_IP;
        if !dropped {
            headers.append(name.clone(), value.clone());
        }
    }
    if client_req.version == http::Version::HTTP_2
        && !headers.contains_key(header::HOST)
        && let Some(authority) = client_req.uri.authority()
    {
        headers.insert(header::HOST, header_value(authority.as_str())?);
    }
    if has_body && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }

    headers.insert(X_REQUEST_ID, header_value(&ctx.request_id)?);
    // tracestate belongs to the caller's vendors and passes unchanged.
    headers.insert(TRACEPARENT, header_value(ctx.trace.header_value())?);
    if let Some(ip) = client.ip {
        let ip = ip.to_string();
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        headers.insert(X_FORWARDED_FOR, header_value(xff)?);
    }
    // The address the router resolved, never one the client sent.
    if let Some(ip) = ctx.client_ip {
        headers.insert(X_CLIENT_IP, header_value(ip.to_string())?);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if client.https { "https" } else { "http" }),
    );
    if let Some(from) = &ctx.replayed_from {
        headers.insert(X_REPLAYED_FROM, header_value(from.as_str())?);
    }

    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = client_req.method.clone();
    parts.uri = client_req.uri.clone();
    parts.version = http::Version::HTTP_11;
    parts.headers = headers;
    let mut req = RequestHeader::from(parts);
    // The URI serializes an origin-form target byte for byte; any other
    // (absolute-form, or not UTF-8) is sent as the client sent it.
    if req.raw_path() != client_req.raw_path() {
        req.set_raw_path(client_req.raw_path())?;
    }
    Ok(req)
}

fn header_value<T>(v: T) -> pingora::Result<HeaderValue>
where
    HeaderValue: TryFrom<T>,
{
    HeaderValue::try_from(v)
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "invalid header value"))
}

/// The cell's answer as it goes to the client, with our headers: its
/// request id, the replay's provenance, and the region that answered
/// unless the cell named one. Built afresh, as the request is.
fn answer_header(cell: &ResponseHeader, ctx: &Ctx) -> pingora::Result<ResponseHeader> {
    let mut headers = HeaderMap::with_capacity(cell.headers.len() + 3);
    for (name, value) in &cell.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(X_REQUEST_ID, header_value(&ctx.request_id)?);
    if let Some(from) = &ctx.replayed_from {
        headers.insert(X_REPLAYED_FROM, header_value(from.as_str())?);
    }
    if ctx.conceal_home {
        headers.remove(&X_HOME_REGION);
    } else if !headers.contains_key(&X_HOME_REGION)
        && let Some(up) = &ctx.upstream
    {
        headers.insert(X_HOME_REGION, header_value(up.region.as_str())?);
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = cell.status;
    parts.version = cell.version;
    parts.headers = headers;
    Ok(ResponseHeader::from(parts))
}

/// What one attempt came to.
enum Attempt {
    /// The answer went to the client.
    Answered,
    /// The cell said the user moved, and the new home admits the request.
    Replay,
    /// Writing the request failed and nothing came back: the cell has not
    /// read the whole request, so it cannot have acted on it.
    Unsent(Box<Error>),
    /// The connection closed with no answer: the cell may or may not have
    /// read the request.
    StaleConnection(Box<Error>),
}

/// Forwards the request to `ctx.upstream`, following at most one refused
/// connect per instance, one stale pooled connection and one move.
pub async fn forward(
    hop: &Hop<'_>,
    session: &mut ServerSession,
    ctx: &mut Ctx,
) -> Result<(), Failure> {
    let has_body = !session.is_body_empty();
    // The whole body must arrive within the body deadline of its head.
    let body_deadline = ctx
        .body_deadline
        .unwrap_or_else(|| tokio::time::Instant::now() + hop.body_timeout);
    if has_body {
        // A replay resends the body: up to 64 KiB is kept for it.
        session.enable_retry_buffering();
        // A body of known, small length is read whole before a cell
        // connection is taken: a client that sends it slowly holds only
        // its own connection.
        if declared_length(session).is_some_and(|n| n <= WHOLE_BODY) {
            while !session.is_body_done() {
                match read_body(session, body_deadline).await? {
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
    let mut fresh_only = false;
    loop {
        let (mut cell, pool_key, reused) = connect(hop, ctx, fresh_only).await?;
        match attempt(hop, session, ctx, &mut cell, has_body, body_deadline).await {
            Ok(Attempt::Answered) => {
                cell.respect_keepalive();
                if let Some(stream) = cell.reuse().await {
                    let idle = hop.router.live.load().cells.idle_timeout;
                    pool::put(pool_key, stream, idle);
                }
                return Ok(());
            }
            Ok(Attempt::Replay) => continue,
            Ok(Attempt::Unsent(e)) => {
                if reused && !fresh_only && whole(session, has_body) {
                    fresh_only = true;
                    continue;
                }
                return Err(Failure::Cell(e));
            }
            Ok(Attempt::StaleConnection(e)) => {
                if reused && !fresh_only && twice_safe(session, ctx) && whole(session, has_body) {
                    fresh_only = true;
                    continue;
                }
                return Err(Failure::Cell(e));
            }
            Err(f) => return Err(f),
        }
    }
}

/// A connection to one of the region's instances that are up, skipping those
/// that refused this request already.
async fn connect(
    hop: &Hop<'_>,
    ctx: &mut Ctx,
    fresh_only: bool,
) -> Result<(CellSession, u64, bool), Failure> {
    let live = hop.router.live.load();
    let cells = &live.cells;
    loop {
        let up = ctx.upstream.clone().ok_or_else(|| {
            Failure::Connect(Error::explain(
                ErrorType::InternalError,
                "no upstream decided",
            ))
        })?;
        let addr = up
            .pick(|a| hop.router.health.is_up(a), &ctx.refused_by)
            .ok_or_else(|| {
                Failure::Connect(Error::explain(
                    ErrorType::ConnectNoRoute,
                    "no address for the cell",
                ))
            })?;
        let key = pool::key(addr, &up.sni);
        let pooled = if fresh_only {
            None
        } else {
            pool::take(key, cells.idle_timeout)
        };
        let got = match pooled {
            Some(stream) => Ok((stream, true)),
            // Boxed: the TLS handshake's future is about 9 KB, and inline
            // it would make every request's future that large, moved
            // into the heap once per request (bench/HISTORY.md).
            None => Box::pin(new_connection(hop, addr, &up.sni, cells))
                .await
                .map(|s| (s, false)),
        };
        match got {
            Ok((stream, reused)) => {
                let mut cell = CellSession::new(stream);
                cell.read_timeout = Some(cells.read_timeout);
                cell.write_timeout = Some(cells.read_timeout);
                return Ok((cell, key, reused));
            }
            // The instance died since the last health check: the request,
            // not yet sent, goes to the next one.
            Err(e) => {
                ctx.refused_by.push(addr);
                if !up.addrs.iter().any(|a| !ctx.refused_by.contains(a)) {
                    return Err(Failure::Connect(e));
                }
            }
        }
    }
}

/// A new mTLS connection to a cell instance (the connector holds our
/// client certificate and CA).
async fn new_connection(
    hop: &Hop<'_>,
    addr: std::net::SocketAddr,
    sni: &str,
    cells: &crate::live::CellClient,
) -> pingora::Result<pingora::protocols::Stream> {
    // Built from a SocketAddr: HttpPeer::new would panic on a name it
    // cannot resolve.
    let mut peer = HttpPeer::new(addr, true, sni.to_string());
    peer.options.connection_timeout = Some(cells.connect_timeout);
    peer.options.total_connection_timeout = Some(cells.connect_timeout * 2);
    peer.options.idle_timeout = Some(cells.idle_timeout);
    hop.connector.new_stream(&peer).await
}

async fn attempt(
    hop: &Hop<'_>,
    session: &mut ServerSession,
    ctx: &mut Ctx,
    cell: &mut CellSession,
    has_body: bool,
    body_deadline: tokio::time::Instant,
) -> Result<Attempt, Failure> {
    let req = upstream_request(session.req_header(), &Client::of(session), ctx, has_body)
        .map_err(Failure::Client)?;
    if let Err(e) = cell.write_request_header(Box::new(req)).await {
        return Ok(Attempt::Unsent(e));
    }
    // A write that fails means the cell stopped reading before the request
    // was whole: it cannot have acted on it (cells read a body whole before
    // any handler runs, cell/src/http/whole_body.rs), but it may have
    // answered it early (a refusal), and that answer is read and relayed.
    let mut unsent = None;
    if has_body {
        match send_body(session, cell, body_deadline).await {
            Ok(()) => {}
            Err(Failure::Cell(e)) => unsent = Some(e),
            Err(f) => return Err(f),
        }
    }
    let status = loop {
        if let Err(e) = cell.read_response().await {
            // Nothing came back at all: the cell closed an idle connection
            // as we reused it.
            if cell.get_status().is_some() {
                return Err(Failure::Cell(e));
            }
            return match unsent {
                Some(write_error) => Ok(Attempt::Unsent(write_error)),
                None if is_closed(&e) => Ok(Attempt::StaleConnection(e)),
                None => Err(Failure::Cell(e)),
            };
        }
        match cell.get_status().map(|s| s.as_u16()) {
            // Interim answers (103 hints) are not relayed.
            Some(100..=199) => continue,
            Some(s) => break s,
            None => {
                return Err(Failure::Cell(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "no status",
                )));
            }
        }
    };
    if status == 421 && replay_to_new_home(hop, session, ctx, cell, has_body) {
        return Ok(Attempt::Replay);
    }
    relay_answer(session, ctx, cell).await?;
    Ok(Attempt::Answered)
}

/// Whether sending the request twice does what sending it once does: an
/// idempotent method, or a money write, which the cell dedupes by its
/// `Idempotency-Key` (a key on any other route is the client's word only).
fn twice_safe(session: &ServerSession, ctx: &Ctx) -> bool {
    let req = session.req_header();
    req.method.is_idempotent()
        || (req.headers.contains_key(IDEMPOTENCY_KEY)
            && ctx.route.is_some_and(|r| DEDUPED.contains(&r)))
}

/// The routes whose writes the cell dedupes by `Idempotency-Key`.
const DEDUPED: [&str; 3] = [
    "/v1/wallet/transfers",
    "/v1/wallet/withdrawals",
    "/v1/cms/users/{id}/wallet/adjustments",
];

/// A body of at most this declared length is read whole before a cell
/// connection is taken (the retry buffer keeps as much).
const WHOLE_BODY: usize = 64 * 1024;

/// The body length the request declares (`Content-Length`), if it does.
pub(crate) fn declared_length(session: &ServerSession) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// One read of the client's body, within the body deadline.
async fn read_body(
    session: &mut ServerSession,
    deadline: tokio::time::Instant,
) -> Result<Option<bytes::Bytes>, Failure> {
    match tokio::time::timeout_at(deadline, session.read_request_body()).await {
        Ok(read) => read.map_err(Failure::Client),
        Err(_) => Err(Failure::Client(Error::explain(
            ErrorType::ReadTimedout,
            "the request body did not arrive in time",
        ))),
    }
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Whether the whole request is at hand to send again: no body, or one
/// that fit the retry buffer.
fn whole(session: &ServerSession, has_body: bool) -> bool {
    !has_body || !session.retry_buffer_truncated()
}

/// A reset, an early close, or nothing read: what a cell that closed an idle
/// pooled connection looks like from here.
fn is_closed(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

/// The request body: what routing already read (kept in the retry buffer),
/// then the rest as it arrives.
async fn send_body(
    session: &mut ServerSession,
    cell: &mut CellSession,
    deadline: tokio::time::Instant,
) -> Result<(), Failure> {
    // An empty write would end a chunked body at once.
    if let Some(buffered) = session.get_retry_buffer().filter(|b| !b.is_empty()) {
        cell.write_body(&buffered).await.map_err(Failure::Cell)?;
    }
    while !session.is_body_done() {
        match read_body(session, deadline).await? {
            Some(chunk) if chunk.is_empty() => {}
            Some(chunk) => {
                cell.write_body(&chunk).await.map_err(Failure::Cell)?;
            }
            None => break,
        }
    }
    cell.finish_body().await.map_err(Failure::Cell)?;
    Ok(())
}

/// "This user moved" from a cell: true when the request goes again, to the
/// new home. Only once, only with the whole request at hand (no body, or
/// one that fit the retry buffer), and only where the new home admits it.
fn replay_to_new_home(
    hop: &Hop<'_>,
    session: &ServerSession,
    ctx: &mut Ctx,
    cell: &CellSession,
    has_body: bool,
) -> bool {
    if ctx.replayed_from.is_some() || !whole(session, has_body) {
        return false;
    }
    let Some(target) = cell
        .get_header(homecell_proto::error::MOVED_TO_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(from) = ctx.upstream.as_ref().map(|u| u.region.clone()) else {
        return false;
    };
    if target == from {
        return false;
    }
    let table = hop.router.table.load();
    let Ok(up) = decide::admit(&table, &hop.router.health, target, false) else {
        return false;
    };
    metrics::REPLAYS
        .with_label_values(&[from.as_str(), target])
        .inc();
    tracing::info!(request_id = %ctx.request_id, from = %from, to = %target, "user moved: replaying to the new home");
    ctx.upstream = Some(up);
    ctx.refused_by.clear();
    ctx.replayed_from = Some(from);
    true
}

/// The cell's answer to the client. A small answer of known length is read
/// whole and goes out with its header in one write; anything else (events,
/// large or unknown length) is passed on chunk by chunk as it arrives.
async fn relay_answer(
    session: &mut ServerSession,
    ctx: &Ctx,
    cell: &mut CellSession,
) -> Result<(), Failure> {
    let resp = cell
        .resp_header()
        .ok_or_else(|| Failure::Cell(Error::explain(ErrorType::InvalidHTTPHeader, "no header")))?;
    let resp = Box::new(answer_header(resp, ctx).map_err(Failure::Cell)?);
    let small = resp
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n <= WHOLE_ANSWER)
        && !resp.headers.contains_key(header::TRANSFER_ENCODING);
    let mut tasks = Vec::with_capacity(2);
    tasks.push(HttpTask::Header(resp, cell.is_body_done()));
    let mut done = cell.is_body_done();
    if !small && !done {
        // A stream's header goes at once: its first event may be a while
        // coming (a quiet SSE stream only sends its keep-alive every 15 s),
        // and the client is waiting to hear that the stream is open.
        write_down(session, std::mem::take(&mut tasks)).await?;
    }
    while !done {
        let chunk = cell.read_body_bytes().await.map_err(Failure::Cell)?;
        done = chunk.is_none() || cell.is_body_done();
        tasks.push(HttpTask::Body(chunk, done));
        if !small || done {
            write_down(session, std::mem::take(&mut tasks)).await?;
        }
    }
    if !tasks.is_empty() {
        write_down(session, tasks).await?;
    }
    Ok(())
}

async fn write_down(session: &mut ServerSession, tasks: Vec<HttpTask>) -> Result<(), Failure> {
    session
        .response_duplex_vec(tasks)
        .await
        .map(|_| ())
        .map_err(Failure::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        let mut ctx = Ctx::for_request(&RequestHeader::build("GET", b"/", None).unwrap());
        ctx.request_id = "req-1".into();
        ctx
    }

    fn names(req: &RequestHeader) -> Vec<String> {
        let mut n: Vec<String> = req.headers.keys().map(|k| k.to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_stay_behind() {
        let mut req = RequestHeader::build("GET", b"/v1/region", None).unwrap();
        for (k, v) in [
            ("host", "example.com"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic Zm9v"),
            ("expect", "100-continue"),
            // Only the router says a request is a replay.
            ("x-homecell-replayed-from", "eu-west"),
            ("x-forwarded-for", "203.0.113.7"),
            ("accept", "application/json"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let client = Client {
            ip: Some("192.0.2.1".parse().unwrap()),
            https: true,
        };
        let up = upstream_request(&req, &client, &ctx(), false).unwrap();
        assert_eq!(
            names(&up),
            [
                "accept",
                "host",
                "traceparent",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-request-id"
            ]
        );
        assert_eq!(up.headers["x-forwarded-for"], "203.0.113.7, 192.0.2.1");
        assert_eq!(up.headers["x-forwarded-proto"], "https");
        assert_eq!(up.headers["x-request-id"], "req-1");
        assert_eq!(up.version, http::Version::HTTP_11);
        // The client's own request is untouched (a replay builds it again).
        assert!(req.headers.contains_key("x-private"));
    }

    #[test]
    fn an_http2_request_gets_a_host_and_a_body_of_unknown_length_is_chunked() {
        // As Pingora's HTTP/2 server builds it: the authority in the URI.
        let mut req = RequestHeader::build("POST", b"/v1/auth/login", None).unwrap();
        req.set_uri(http::Uri::from_static(
            "https://api.example.com/v1/auth/login",
        ));
        req.set_version(http::Version::HTTP_2);
        let client = Client {
            ip: None,
            https: true,
        };
        let up = upstream_request(&req, &client, &ctx(), true).unwrap();
        assert_eq!(up.version, http::Version::HTTP_11);
        assert_eq!(up.headers["host"], "api.example.com");
        assert_eq!(up.headers["transfer-encoding"], "chunked");
        assert!(!up.headers.contains_key("x-forwarded-for"));

        // With a length, the length frames the body.
        req.insert_header("content-length", "12").unwrap();
        let up = upstream_request(&req, &client, &ctx(), true).unwrap();
        assert!(!up.headers.contains_key("transfer-encoding"));
    }

    #[test]
    fn the_request_target_goes_to_the_cell_as_the_client_sent_it() {
        let client = Client {
            ip: None,
            https: false,
        };
        for target in [
            &b"/v1/users/u1?cursor=a%2Fb&limit=5"[..],
            b"http://api.example.com/v1/region",
            b"/v1/caf\xc3\xa9",
        ] {
            let req = RequestHeader::build("GET", target, None).unwrap();
            let up = upstream_request(&req, &client, &ctx(), false).unwrap();
            assert_eq!(up.raw_path(), target, "{}", target.escape_ascii());
            assert_eq!(up.method, http::Method::GET);
        }
    }

    #[test]
    fn a_request_naming_too_many_connection_options_is_refused() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let many: Vec<String> = (0..=MAX_CONNECTION_OPTIONS)
            .map(|i| format!("x-{i}"))
            .collect();
        req.insert_header("connection", many.join(",")).unwrap();
        let client = Client {
            ip: None,
            https: false,
        };
        let e = upstream_request(&req, &client, &ctx(), false).unwrap_err();
        assert_eq!(*e.etype(), ErrorType::InvalidHTTPHeader);
    }
}
