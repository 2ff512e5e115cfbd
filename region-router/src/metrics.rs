//! The router's Prometheus metrics (served on the admin port).

use prometheus::{HistogramVec, IntCounterVec};
use std::sync::LazyLock;

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_router_requests_total",
            "Requests by target region and status",
        ),
        &["region", "status"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

pub static CERT_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_router_cert_reloads_total",
            "Reloads of the public TLS certificate, by result",
        ),
        &["result"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_router_config_reloads_total",
            "Configuration reloads (SIGHUP), by result",
        ),
        &["result"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

pub static REPLAYS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_router_replays_total",
            "Requests replayed to a moved user's new home, by the region that answered and the new one",
        ),
        &["from", "to"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

pub static DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    let h = HistogramVec::new(
        prometheus::HistogramOpts::new(
            "homecell_router_request_duration_seconds",
            "Time from request to the end of the response, by target region",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["region"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(h.clone()));
    h
});

pub static ROUTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_router_routed_total",
            "Requests by the routing key that decided them",
        ),
        &["basis"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

pub static WORKER_CONNECTIONS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    let g = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "homecell_router_worker_connections",
            "Client connections open on each worker thread",
        ),
        &["worker"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});

pub static CLIENTS_CLOSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_router_client_connections_closed_total",
            "Client connections the router closed on a limit: refused at accept \
             (total, per_address) or timed out (idle, head, tls_handshake)",
        ),
        &["reason"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});
