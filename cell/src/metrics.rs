//! The cell's own Prometheus metrics (served on the admin port).

use prometheus::IntCounterVec;
use std::sync::LazyLock;

pub static HTTP_RESPONSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_cell_http_responses_total",
            "API responses by status",
        ),
        &["status"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

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
