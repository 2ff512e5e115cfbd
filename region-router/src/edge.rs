//! The router's HTTP service, one request at a time per client connection
//! (an HTTP/1.1 keep-alive connection, or one HTTP/2 stream), on Pingora's
//! server sessions, listeners and mTLS connections to cells:
//!
//! ```text
//! wait for a request: its first byte within the idle timeout (a new
//!   connection: the head deadline), its whole head within the head
//!   deadline of that byte (clients.rs)      (missed: closed)
//! read the request header                  (a malformed one: 400, closed)
//!   ├─ request id, trace context
//!   ├─ route (routing.rs): path, token, small auth bodies, header
//!   │    → a region that admits the request, or a problem answer
//!   ├─ forward (forward.rs) to one of its cell instances; a refused
//!   │    connect tries the next, a "moved" answer replays once
//!   │    → a cell that cannot be reached or answer: a problem answer
//!   └─ count and log (no personal data), keep the connection for the next request
//! ```
//!
//! Why not pingora-proxy's `ProxyHttp`: its general machinery (module
//! contexts, cache and subrequest phases, a channel pair and a joined
//! future per request) cost the router a third more CPU per request than
//! this loop over the same Pingora sessions and connector, which made the
//! difference to nginx (bench/HISTORY.md, "own request loop").

use crate::clients::{Admission, Arrival, ClientLimits};
use crate::decide::{CELL_DOWN_RETRY_AFTER, Refusal};
use crate::forward::{self, Failure};
use crate::metrics;
use crate::problem::respond_problem;
use crate::state::{Ctx, Router};
use async_trait::async_trait;
use homecell_proto::ErrorCode;
use pingora::ErrorType;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v2::server::{H2Options, default_h2_options};
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;

/// Streams at once on one HTTP/2 client connection.
const MAX_STREAMS: u32 = 32;

/// The router's HTTP service: the shared router state and the connector
/// for new mTLS connections to cells (idle ones are in pool.rs, per worker).
pub struct Edge {
    pub router: Router,
    pub connector: TransportConnector,
    /// What one client connection may take (clients.rs).
    pub limits: ClientLimits,
    /// The open client connections, counted against the caps.
    pub admission: Arc<Admission>,
    /// Pingora's settings for HTTP/2 client connections: their idle timeout.
    options: HttpServerOptions,
}

impl Edge {
    pub fn new(
        router: Router,
        options: pingora::connectors::ConnectorOptions,
        limits: ClientLimits,
    ) -> Self {
        let mut server_options = HttpServerOptions::default();
        server_options.h2_idle_timeout = Some(limits.idle());
        Self {
            router,
            connector: TransportConnector::new(Some(options)),
            admission: Admission::new(&limits),
            limits,
            options: server_options,
        }
    }

    /// Routes and forwards one request; whether the client connection can
    /// take another.
    async fn handle(&self, session: &mut ServerSession, ctx: &mut Ctx) -> bool {
        if wants_continue(session) {
            // Pingora ends the keep-alive of a connection whose answer starts
            // before the request body is read; a 100 Continue is no answer.
            session.set_close_on_response_before_downstream_finish(false);
            let sent = session.write_continue_response().await;
            session.set_close_on_response_before_downstream_finish(true);
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot write 100 Continue");
                return false;
            }
        }
        let table = self.router.table.load();
        if table.revision == 0 {
            let r = Refusal {
                code: ErrorCode::NotReady,
                detail: "this router has no routing table yet".into(),
                retry_after: Some(1),
            };
            return answer(session, ctx, &r).await;
        }
        match self.router.route(session, ctx, &table).await {
            Ok(up) => ctx.upstream = Some(up),
            Err(refusal) => return answer(session, ctx, &refusal).await,
        }
        drop(table);
        let hop = forward::Hop {
            router: &self.router,
            connector: &self.connector,
            body_timeout: self.limits.body(),
        };
        match forward::forward(&hop, session, ctx).await {
            Ok(()) => true,
            Err(failure) => self.failed(session, ctx, failure).await,
        }
    }

    /// A request that could not be proxied: a problem answer when nothing
    /// was written yet and the client can use one; the connection is not
    /// reused.
    async fn failed(&self, session: &mut ServerSession, ctx: &Ctx, failure: Failure) -> bool {
        let region = ctx.upstream.as_ref().map_or("", |u| u.region.as_str());
        let refusal = match &failure {
            Failure::Connect(_) => Some(Refusal::new(
                ErrorCode::CellUnavailable,
                format!("the cell of region {region} cannot be reached"),
                Some(CELL_DOWN_RETRY_AFTER),
            )),
            Failure::Cell(e)
                if matches!(
                    e.etype(),
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout
                ) =>
            {
                Some(Refusal::new(
                    ErrorCode::UpstreamTimeout,
                    format!("the cell of region {region} did not answer in time"),
                    None,
                ))
            }
            Failure::Cell(_) => Some(Refusal::new(
                ErrorCode::BadGateway,
                format!("the answer from the cell of region {region} could not be proxied"),
                None,
            )),
            // A header no cell should see (say, one naming too many
            // Connection options) is the client's error, answered.
            Failure::Client(e) if *e.etype() == ErrorType::InvalidHTTPHeader => Some(Refusal::new(
                ErrorCode::InvalidArgument,
                "the request's headers cannot be forwarded".into(),
                None,
            )),
            // The client went away or sent garbage: nothing useful to answer.
            Failure::Client(_) => None,
        };
        match &failure {
            Failure::Connect(e) | Failure::Cell(e) => {
                tracing::warn!(region, request_id = %ctx.request_id, error = %e, "proxy to cell failed");
            }
            Failure::Client(e) => {
                tracing::debug!(request_id = %ctx.request_id, error = %e, "client failed");
            }
        }
        if let Some(refusal) = refusal
            && session.response_written().is_none()
        {
            // The connection closes after this answer: it says so
            // (`Connection: close`), or a client would send its next
            // request on a connection that is going away.
            session.set_keepalive(None);
            let _ = answer(session, ctx, &refusal).await;
        }
        false
    }
}

/// Writes a refusal; whether the connection can be reused.
async fn answer(session: &mut ServerSession, ctx: &Ctx, refusal: &Refusal) -> bool {
    match respond_problem(session, ctx, refusal).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "cannot write the problem answer");
            false
        }
    }
}

/// A client that waits for `100 Continue` before it sends its body gets it
/// from us: cells never see `Expect` (forward.rs), so routing can read a
/// small body and the cell's own answer is the only one relayed.
fn wants_continue(session: &mut ServerSession) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        && !session.is_body_empty()
}

/// Resolves once the server starts shutting down (never if the signal is lost).
pub(crate) async fn shutting_down(shutdown: &ShutdownWatch) {
    let mut watch = shutdown.clone();
    if watch.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Edge {
    /// An HTTP/1.x connection's requests, one after another, until it
    /// closes, fails, idles out or misses a head deadline (clients.rs).
    /// The first byte of a new connection's first request must come within
    /// the head deadline, later ones within the idle timeout; from its
    /// first byte, a whole head within the head deadline.
    pub(crate) async fn serve_http1(
        &self,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
        arrival: &Arrival,
    ) {
        let mut first = true;
        loop {
            let mut session = ServerSession::new_http1(stream);
            // Kept alive, with no per-read timeout of Pingora's: the
            // deadlines below bound the whole wait instead.
            session.set_keepalive(Some(0));
            arrival.arm();
            let wait = if first {
                self.limits.head()
            } else {
                self.limits.idle()
            };
            let read = tokio::select! {
                // A request already buffered is served, even when shutting down.
                biased;
                r = session.read_request() => r,
                missed = deadline(arrival, wait, self.limits.head()) => {
                    metrics::CLIENTS_CLOSED.with_label_values(&[missed]).inc();
                    tracing::debug!(deadline = missed, "client connection closed");
                    return;
                }
                // An idle keep-alive connection closes at shutdown.
                _ = shutting_down(shutdown) => return,
            };
            match self.serve(session, read, shutdown).await {
                Some(next) => stream = next,
                None => return,
            }
            first = false;
        }
    }

    /// One request whose head was read (or failed to be): served, and the
    /// connection given back if it can take another.
    async fn serve(
        &self,
        mut session: ServerSession,
        read: pingora::Result<bool>,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if *e.etype() == ErrorType::InvalidHTTPHeader {
                    let _ = session.respond_error(400).await;
                }
                tracing::debug!(error = %e, "unusable request");
                if !session.is_http2() {
                    session.shutdown().await;
                }
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let mut ctx = Ctx::for_request(session.req_header());
        ctx.body_deadline = Some(tokio::time::Instant::now() + self.limits.body());
        let reuse = self.handle(&mut session, &mut ctx).await;
        self.router.log(&session, &ctx);
        if !reuse {
            // An HTTP/2 stream is reset when dropped unfinished; the
            // connection carries other streams.
            if !session.is_http2() {
                session.shutdown().await;
            }
            return None;
        }
        match session.finish().await {
            Ok(stream) => stream.map(|s| s.into_parts().0),
            Err(e) => {
                tracing::debug!(error = %e, "cannot finish the response");
                None
            }
        }
    }
}

/// Resolves, with the deadline's name, when a client waiting to send a
/// request misses one: no byte within `wait`, or no whole head within
/// `head` of its first byte.
async fn deadline(arrival: &Arrival, wait: Duration, head: Duration) -> &'static str {
    if tokio::time::timeout(wait, arrival.arrived()).await.is_err() {
        return "idle";
    }
    tokio::time::sleep(head).await;
    "head"
}

/// HTTP/2 streams come here, through Pingora's HTTP/2 connection handling
/// (its idle timeout is ours, `server_options`); HTTP/1.x connections are
/// served by `serve_http1`.
#[async_trait]
impl HttpServerApp for Edge {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let read = tokio::select! {
            biased;
            r = session.read_request() => r,
            _ = shutting_down(shutdown) => return None,
        };
        self.serve(session, read, shutdown)
            .await
            .map(|s| ReusedHttpStream::new(s, None))
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }

    /// Pingora's bounded defaults, with fewer streams at once: each stream
    /// holds a connection to a cell, and the per-address cap counts
    /// connections, not streams.
    fn h2_options(&self) -> Option<H2Options> {
        let mut options = default_h2_options();
        options.max_concurrent_streams(MAX_STREAMS);
        Some(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn with the edge's arguments returns.
    fn future_size<'a, F: std::future::Future>(
        _: impl FnOnce(&'a Edge, &'a mut ServerSession, &'a mut Ctx) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_request_future_stays_small() {
        // A request's whole future (routing and forwarding) is moved into
        // the heap once per request: Pingora's async_trait boxes it. A TLS
        // handshake inlined into it made it 10 KB; the connect is boxed
        // (forward.rs).
        let size = future_size(Edge::handle);
        assert!(size < 8 * 1024, "a request's future is {size} bytes");
    }
}
