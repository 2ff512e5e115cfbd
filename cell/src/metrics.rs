//! The cell's own Prometheus metrics (served on the admin port).

use homecell_proto::error::CodedError;
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
/// `_OTHER`, and the route a template of ours or `unmatched`, so what a
/// caller sends cannot add series.
pub fn observe_request(
    method: &http::Method,
    route: &str,
    status: http::StatusCode,
    took: std::time::Duration,
) {
    let method = homecell_common::paths::method_name(method);
    HTTP_DURATION
        .with_label_values(&[method, route, status.as_str()])
        .observe(took.as_secs_f64());
}

fn counter(name: &str, help: &str) -> prometheus::IntCounter {
    let c = prometheus::IntCounter::new(name, help).expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

fn gauge(name: &str, help: &str) -> prometheus::IntGauge {
    let g = prometheus::IntGauge::new(name, help).expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(prometheus::Opts::new(name, help), labels)
        .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Histogram {
    let h = prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets),
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(h.clone()));
    h
}

// ---------------------------------------------------------------- identity

/// Sign-ins by method (`password`, `code`) and outcome (`ok` or the error
/// code answered, a fixed set).
pub static LOGINS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "homecell_cell_logins_total",
        "Sign-in attempts by method and outcome",
        &["method", "outcome"],
    )
});

/// Accounts locked by repeated wrong passwords.
pub static LOCKOUTS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    counter(
        "homecell_cell_lockouts_total",
        "Accounts locked after repeated wrong passwords",
    )
});

/// A used refresh token presented again: its session was revoked.
pub static REFRESH_REUSE: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    counter(
        "homecell_cell_refresh_reuse_total",
        "Refresh tokens presented after use (their sessions were ended)",
    )
});

/// Counts a sign-in's outcome.
pub fn count_login<T>(method: &'static str, result: &Result<T, CodedError>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    };
    LOGINS.with_label_values(&[method, outcome]).inc();
}

// ---------------------------------------------------------------- money

/// Money operations by kind and outcome: the operation's state (`posted`,
/// `pending` for one in flight, `failed`) or the error code answered.
pub static MONEY_OPERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "homecell_cell_money_operations_total",
        "Money operations asked for, by kind and outcome",
        &["kind", "outcome"],
    )
});

/// Counts a money operation's outcome and hands the result on.
pub fn count_money(
    kind: &'static str,
    result: Result<crate::money::service::Outcome, CodedError>,
) -> Result<crate::money::service::Outcome, CodedError> {
    let outcome = match &result {
        Ok(o) => match o.op.state.as_str() {
            "posted" => "posted",
            "pending" => "pending",
            "voided" => "voided",
            _ => "failed",
        },
        Err(e) => e.code.as_str(),
    };
    MONEY_OPERATIONS.with_label_values(&[kind, outcome]).inc();
    result
}

// ---------------------------------------------------------------- notices

/// Open event streams (SSE) on this instance.
pub static STREAMS_OPEN: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_streams_open",
        "Event streams (SSE) open on this instance",
    )
});

// ---------------------------------------------------------------- datastore

/// Jobs per SQLite write batch (one transaction, one fsync).
pub static WRITE_BATCH_SIZE: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    histogram(
        "homecell_cell_write_batch_size",
        "Writes committed together in one SQLite transaction",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
    )
});

/// Time a write transaction waited for a pooled connection and its BEGIN.
pub static POOL_WAIT: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    histogram(
        "homecell_cell_pool_wait_seconds",
        "Time a write transaction waited for a datastore connection and its BEGIN",
        vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
    )
});

/// Time a write transaction's commit takes (a SQLite write batch's too).
pub static COMMIT_SECONDS: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    histogram(
        "homecell_cell_commit_duration_seconds",
        "Time to commit a write transaction: the fsync on SQLite, the server's commit on PostgreSQL",
        vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ],
    )
});

// ------------------------------------------- sampled from the datastore (gauges.rs)

pub static OUTBOX_PENDING: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_outbox_pending",
        "Events in the outbox not yet dispatched",
    )
});

pub static OUTBOX_OLDEST_AGE: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_outbox_oldest_age_seconds",
        "Age of the oldest event not yet dispatched (0 when none)",
    )
});

pub static DELIVERIES_PENDING: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_deliveries_pending",
        "Email and SMS deliveries waiting to be sent or retried",
    )
});

pub static DELIVERIES_DEAD: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_deliveries_dead",
        "Deliveries that gave up (the dead-letter queue)",
    )
});

pub static SESSIONS_ACTIVE: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_sessions_active",
        "Sessions neither revoked nor expired",
    )
});

/// Cross-cell transfers not yet finished, by this cell's next step.
pub static TRANSFERS_IN_FLIGHT: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "homecell_cell_transfers_in_flight",
        "Cross-cell transfers this cell coordinates that are not finished, by next step",
        &["step"],
    )
});

pub static TRANSFER_OLDEST_AGE: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_transfer_oldest_in_flight_age_seconds",
        "Age of the oldest unfinished cross-cell transfer (0 when none)",
    )
});

/// Each clearing account's balance (credits minus debits, posted and
/// pending), by peer region and currency.
pub static CLEARING_BALANCE: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "homecell_cell_clearing_balance_minor",
        "Clearing account balance in minor units (credits minus debits), by peer region and currency",
        &["peer", "currency"],
    )
});

pub static AUDIT_OK: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_ledger_audit_ok",
        "Whether the last ledger audit of this cell passed (1) or failed (0)",
    )
});

pub static AUDIT_TIME: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    gauge(
        "homecell_cell_ledger_audit_timestamp_seconds",
        "When the last ledger audit of this cell finished (Unix time)",
    )
});

pub static POOL_CONNECTIONS: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "homecell_cell_pool_connections",
        "Datastore pool connections by state (idle, busy)",
        &["state"],
    )
});

/// Registers every family at start, with the label values known in advance
/// at zero, so `/metrics` shows them (and a dashboard or an alert finds a
/// series) before the first event.
pub fn init() {
    use homecell_proto::error::ErrorCode;
    for method in ["password", "code"] {
        for outcome in ["ok", ErrorCode::InvalidCredentials.as_str()] {
            LOGINS.with_label_values(&[method, outcome]);
        }
    }
    for kind in ["transfer", "deposit", "withdrawal", "adjustment"] {
        MONEY_OPERATIONS.with_label_values(&[kind, "posted"]);
    }
    for channel in ["email", "sms"] {
        for outcome in ["sent", "retry", "dead"] {
            DELIVERIES.with_label_values(&[channel, outcome]);
        }
    }
    for counter in [&LOCKOUTS, &REFRESH_REUSE, &NOTICES_UNRENDERED] {
        LazyLock::force(counter);
    }
    for gauge in [
        &STREAMS_OPEN,
        &OUTBOX_PENDING,
        &OUTBOX_OLDEST_AGE,
        &DELIVERIES_PENDING,
        &DELIVERIES_DEAD,
        &SESSIONS_ACTIVE,
        &TRANSFER_OLDEST_AGE,
    ] {
        LazyLock::force(gauge);
    }
    for h in [&WRITE_BATCH_SIZE, &COMMIT_SECONDS, &POOL_WAIT] {
        LazyLock::force(h);
    }
    LazyLock::force(&HTTP_DURATION);
    LazyLock::force(&CLEARING_BALANCE);
    LazyLock::force(&POOL_CONNECTIONS);
    LazyLock::force(&TRANSFERS_IN_FLIGHT);
}
