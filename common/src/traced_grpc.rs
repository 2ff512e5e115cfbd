//! gRPC with the trace carried across: [`TracedChannel`] on the calling
//! side, [`TracedServer`] on the serving side (the control plane; a cell's
//! shared listener has its own, `cell/src/http/access.rs`).
//!
//! Each call made while a task serves a request is a client span (exported
//! when spans are, see `otel.rs`) whose id goes out in the W3C
//! `traceparent` metadata, so the server's span names it as its parent and
//! one trace follows a request from the router across cells and to the
//! control plane. Calls made outside a request (background work) carry
//! nothing.

use crate::trace::CURRENT;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tracing::Instrument;
use tracing::instrument::Instrumented;

#[derive(Clone, Debug)]
pub struct TracedChannel(Channel);

impl TracedChannel {
    pub fn new(channel: Channel) -> Self {
        Self(channel)
    }
}

/// The call's future, boxed: every future a handler might await is part of
/// the handler's own (a session check's gRPC call is inside every
/// authenticated request's), so a large one here would make every request
/// copy more.
type CallFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<http::Response<Body>, tonic::transport::Error>>
            + Send,
    >,
>;

impl tower::Service<http::Request<Body>> for TracedChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let Ok(current) = CURRENT.try_with(|t| *t) else {
            return Box::pin(self.0.call(req));
        };
        // Our own services' paths: `/<package.Service>/<Method>`.
        let span = rpc_span(req.uri().path().trim_start_matches('/'), "client");
        let hop = crate::otel::hop(&span, current.child());
        if let Ok(v) = hop.header_value().parse() {
            req.headers_mut().insert("traceparent", v);
        }
        Box::pin(self.0.call(req).instrument(span))
    }
}

/// A server's calls as spans, children of the caller's `traceparent`: only
/// while spans are exported (the server logs its own way). A span is named
/// by its method only if the method is one of `known` (`/package.Service/
/// Method` paths), else `unmatched`: a caller's text never names one.
#[derive(Clone, Debug)]
pub struct TracedServer<S> {
    inner: S,
    known: &'static [&'static str],
}

impl<S> TracedServer<S> {
    pub fn new(inner: S, known: &'static [&'static str]) -> Self {
        Self { inner, known }
    }
}

impl<S, B> tower::Service<http::Request<B>> for TracedServer<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !crate::otel::enabled() {
            return self.inner.call(req).instrument(tracing::Span::none());
        }
        let path = self
            .known
            .iter()
            .find(|k| **k == req.uri().path())
            .map_or("unmatched", |k| k.trim_start_matches('/'));
        let span = rpc_span(path, "server");
        let parent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::trace::TraceParent::parse);
        crate::otel::set_remote_parent(&span, parent);
        self.inner.call(req).instrument(span)
    }
}

/// A gRPC call's exported span, by the conventions: `path` is
/// `package.Service/Method`, `kind` is `client` or `server`.
fn rpc_span(path: &str, kind: &'static str) -> tracing::Span {
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    tracing::info_span!(
        target: crate::otel::TARGET,
        "rpc",
        otel.name = %path,
        otel.kind = kind,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    )
}
