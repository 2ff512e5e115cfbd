//! The router's HTTP service, one request at a time per client connection
//! (an HTTP/1.1 keep-alive connection, or one HTTP/2 stream), on Pingora's
//! server sessions, listeners and mTLS connections to cells:
//!
//! ```text
//! read the request header                  (a malformed one: 400, closed)
//!   ├─ request id, trace context
//!   ├─ route (proxy.rs): path, token, small auth bodies, header
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
//! difference to nginx (bench/README.md, "own request loop").

use crate::decide::{CELL_DOWN_RETRY_AFTER, Refusal};
use crate::forward::{self, Failure};
use crate::proxy::{Ctx, Router, respond_problem};
use async_trait::async_trait;
use homecell_proto::ErrorCode;
use pingora::ErrorType;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::TransportConnector;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use std::sync::Arc;

/// The router's HTTP service: the shared router state and the connector
/// for new mTLS connections to cells (idle ones are in pool.rs, per worker).
pub struct Edge {
    pub router: Router,
    pub connector: TransportConnector,
}

impl Edge {
    pub fn new(router: Router, options: pingora::connectors::ConnectorOptions) -> Self {
        Self {
            router,
            connector: TransportConnector::new(Some(options)),
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
        match forward::forward(self, session, ctx).await {
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

#[async_trait]
impl HttpServerApp for Edge {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let read = tokio::select! {
            // A request already buffered is served, even when shutting down.
            biased;
            r = session.read_request() => r,
            // An idle keep-alive connection closes at shutdown.
            _ = shutting_down(shutdown) => return None,
        };
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
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot finish the response");
                None
            }
        }
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
