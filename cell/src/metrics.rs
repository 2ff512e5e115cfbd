//! The cell's own Prometheus metrics (served on the admin port).

use prometheus::IntCounterVec;
use std::sync::LazyLock;

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(prometheus::Opts::new(name, help), labels).expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

/// Events dropped because a template did not render.
pub static NOTICES_UNRENDERED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    let c = prometheus::IntCounter::new(
        "homecell_cell_notices_unrendered_total",
        "Events that sent nothing because a template did not render",
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

/// Delivery attempts by channel and outcome (sent, retry, dead).
pub static DELIVERIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "homecell_cell_deliveries_total",
        "Notice delivery attempts by channel and outcome",
        &["channel", "outcome"],
    )
});

/// Requests by method, route template (or gRPC method) and status, and
/// how long each took to answer.
pub static HTTP_DURATION: LazyLock<prometheus::HistogramVec> = LazyLock::new(|| {
    let h = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new(
            "homecell_cell_request_duration_seconds",
            "Time to answer a request, by method, route template and status",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["method", "route", "status"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(h.clone()));
    h
});

/// Records one answered request. The method is one HTTP defines or
/// `other`, and the route a template of ours or `unmatched`, so what a
/// caller sends cannot add series.
pub fn observe_request(
    method: &http::Method,
    route: &str,
    status: http::StatusCode,
    took: std::time::Duration,
) {
    let method = match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    HTTP_DURATION
        .with_label_values(&[method, route, status.as_str()])
        .observe(took.as_secs_f64());
}
