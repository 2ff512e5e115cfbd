//! Per-request trace context and the access log.
//!
//! Every request (HTTP or the cell-to-cell gRPC sharing the listener) runs
//! inside a span carrying its W3C trace id, and with the trace in a task
//! local so calls to other cells carry it on (`peers::client`). The access
//! log names the route *template*, never the path, query, headers or body,
//! so no identifier or token reaches the log. The same names label the
//! request duration histogram, so its series are as few as the routes.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use homecell_common::tls::PeerIdentity;
use homecell_common::trace::{CURRENT, TraceParent};
use std::time::Instant;
use tracing::Instrument;

/// `CellService`'s methods (proto/proto/homecell/cell/v1/cell.proto; a test
/// keeps the two the same): the only gRPC names a log line, a metric label
/// or a span takes, whatever a caller sends.
pub const CELL_METHODS: &[&str] = &[
    "CheckSession",
    "HoldIncoming",
    "PostIncoming",
    "VoidIncoming",
    "SendNotice",
    "ForwardDeposit",
    "ImportUser",
    "DiscardImport",
];

pub async fn traced(req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    let caller_span = header.and_then(TraceParent::parse);
    let trace = TraceParent::continue_from(caller_span);
    let method = req.method().clone();
    // A gRPC path is the method's name; an HTTP path may hold ids, so it
    // is logged as its template.
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let route = if grpc {
        // Only a method of our own service is named; any other path is
        // the caller's text.
        let path = req.uri().path();
        let ours = path
            .strip_prefix("/homecell.cell.v1.CellService/")
            .is_some_and(|m| CELL_METHODS.contains(&m));
        if ours { path } else { "unmatched" }.to_string()
    } else {
        req.extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str)
            .to_string()
    };
    let caller = req
        .extensions()
        .get::<PeerIdentity>()
        .map(PeerIdentity::common_name)
        .unwrap_or_default();
    // The router's request id (it keeps a client's only when short and
    // printable); anything else a caller sends is not logged.
    let request_id = req
        .headers()
        .get("x-request-id")
        .map(|v| v.as_bytes())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.iter().all(u8::is_ascii_graphic))
        .map(|v| String::from_utf8_lossy(v).into_owned());
    // The exported span (otel.rs), named at once: the exporter takes a
    // span's name when it starts.
    let exported = if grpc {
        tracing::info_span!(
            target: homecell_common::otel::TARGET,
            "request",
            otel.name = route.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = "homecell.cell.v1.CellService",
            rpc.method = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            target: homecell_common::otel::TARGET,
            "request",
            otel.name = %format_args!("{} {route}", homecell_common::paths::method_name(&method)),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = homecell_common::paths::method_name(&method),
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        )
    };
    homecell_common::otel::set_remote_parent(&exported, caller_span);
    let trace = homecell_common::otel::hop(&exported, trace);
    let trace_id = trace.trace_id_hex();
    let span = tracing::info_span!(parent: &exported, "request", trace_id = %trace_id, request_id);
    let started = Instant::now();
    let resp = CURRENT
        .scope(trace, next.run(req).instrument(span.clone()))
        .instrument(exported.clone())
        .await;
    // A gRPC method the service does not have is answered Unimplemented:
    // counted as unmatched, so a caller cannot mint series with names.
    let unimplemented = grpc
        && resp
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"12");
    let served = if unimplemented { "unmatched" } else { &route };
    crate::metrics::observe_request(&method, served, resp.status(), started.elapsed());
    if grpc {
        let name = served.trim_start_matches('/');
        exported.record("rpc.method", name.rsplit('/').next().unwrap_or(name));
        if let Some(code) = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            exported.record("rpc.grpc.status_code", code);
        }
    } else {
        exported.record("http.response.status_code", resp.status().as_u16());
        if resp.status().is_server_error() {
            exported.record("otel.status_code", "ERROR");
        }
    }
    span.in_scope(|| {
        tracing::info!(
            target: "access",
            method = %method,
            route,
            caller,
            status = resp.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "request"
        );
    });
    resp
}

#[cfg(test)]
mod tests {
    /// The `rpc` names of a service in a .proto file.
    pub fn rpcs(proto: &str) -> Vec<String> {
        proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(|m| m.trim().to_string())
            .collect()
    }

    #[test]
    fn the_method_list_is_the_services() {
        let proto = include_str!("../../../proto/proto/homecell/cell/v1/cell.proto");
        let mut want = rpcs(proto);
        let mut have: Vec<String> = super::CELL_METHODS.iter().map(|m| m.to_string()).collect();
        want.sort();
        have.sort();
        assert_eq!(have, want);
    }
}
