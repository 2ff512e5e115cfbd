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
