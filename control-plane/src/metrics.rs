//! The control plane's Prometheus metrics (served on the admin port): its
//! revision and how long mutations take, its subscribers by state and how
//! far behind they are, claims, and open Watch streams.

use homecell_proto::control::SubscriberKind;
use prometheus::{Histogram, IntCounterVec, IntGauge, IntGaugeVec};
use std::sync::LazyLock;
use std::time::Duration;

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

pub static REVISION: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "homecell_cp_revision",
            "The newest revision this instance holds",
        )
        .expect("valid metric"),
    )
});

pub static MUTATION_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "homecell_cp_mutation_duration_seconds",
                "Time to commit a mutation durably (claims, moves, config, regions)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric"),
    )
});

/// Identifier claims by outcome: `ok` or the gRPC code answered.
pub static CLAIMS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            prometheus::Opts::new("homecell_cp_claims_total", "Identifier claims by outcome"),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

pub static WATCH_STREAMS: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "homecell_cp_watch_streams",
            "Watch streams open on this instance",
        )
        .expect("valid metric"),
    )
});

pub static SUBSCRIBERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            prometheus::Opts::new(
                "homecell_cp_subscribers",
                "Subscribers this instance knows, by kind, region and state",
            ),
            &["kind", "region", "state"],
        )
        .expect("valid metric"),
    )
});

/// A subscriber's node id is its own choice, so it is not a label: each
/// kind and region reports its furthest-behind connected subscriber.
pub static SUBSCRIBER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            prometheus::Opts::new(
                "homecell_cp_subscriber_lag_revisions",
                "Revisions the furthest-behind connected subscriber of a kind and region lacks",
            ),
            &["kind", "region"],
        )
        .expect("valid metric"),
    )
});

/// Counts a claim's outcome.
pub fn count_claim<T>(result: &Result<T, tonic::Status>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(s) => grpc_code(s.code()),
    };
    CLAIMS.with_label_values(&[outcome]).inc();
}

fn grpc_code(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        AlreadyExists => "already_exists",
        FailedPrecondition => "failed_precondition",
        PermissionDenied => "permission_denied",
        InvalidArgument => "invalid_argument",
        NotFound => "not_found",
        Unavailable => "unavailable",
        DeadlineExceeded => "deadline_exceeded",
        ResourceExhausted => "resource_exhausted",
        _ => "error",
    }
}

/// One open Watch stream, counted while it lives.
pub struct StreamGuard;

impl StreamGuard {
    pub fn open() -> Self {
        WATCH_STREAMS.inc();
        Self
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        WATCH_STREAMS.dec();
    }
}

/// Samples the revision and the subscribers every few seconds.
pub async fn sample(
    store: std::sync::Arc<crate::store::Store>,
    subscribers: std::sync::Arc<crate::sync::Subscribers>,
    token: homecell_common::shutdown::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let revision = store.revision();
        REVISION.set(i64::try_from(revision).unwrap_or(i64::MAX));
        SUBSCRIBERS.reset();
        SUBSCRIBER_LAG.reset();
        for s in subscribers.all() {
            let kind = match SubscriberKind::try_from(s.kind) {
                Ok(SubscriberKind::Router) => "router",
                Ok(SubscriberKind::Cell) => "cell",
                _ => "other",
            };
            let state = if s.connected {
                "connected"
            } else {
                "disconnected"
            };
            SUBSCRIBERS
                .with_label_values(&[kind, &s.region, state])
                .inc();
            if s.connected {
                let lag =
                    i64::try_from(revision.saturating_sub(s.applied_revision)).unwrap_or(i64::MAX);
                let g = SUBSCRIBER_LAG.with_label_values(&[kind, &s.region]);
                if lag > g.get() {
                    g.set(lag);
                }
            }
        }
    }
}

/// Registers every family at start, so `/metrics` shows them before the
/// first event.
pub fn init() {
    for g in [&REVISION, &WATCH_STREAMS] {
        LazyLock::force(g);
    }
    LazyLock::force(&MUTATION_SECONDS);
    CLAIMS.with_label_values(&["ok"]);
    LazyLock::force(&SUBSCRIBERS);
    LazyLock::force(&SUBSCRIBER_LAG);
}
