//! A finished request's metrics and access line.

use crate::metrics;
use crate::state::{Ctx, Router};
use pingora::protocols::http::ServerSession;

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
        let span = &ctx.span;
        if let Some(s) = status {
            span.record("http.response.status_code", s.as_u16());
            if s.is_server_error() {
                span.record("otel.status_code", "ERROR");
            }
        }
        span.record("homecell.region", region);
        span.record("homecell.routed_by", ctx.basis.as_str());
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
