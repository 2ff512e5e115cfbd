//! The admin listener every component serves: `/healthz` (the process is up),
//! `/ready` (it can do its job, e.g. a snapshot is loaded) and `/metrics`
//! (Prometheus text). Kept off the public port.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Answers whether the component is ready, and why not.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub fn router(ready: ReadyCheck) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(ready)
}

async fn ready_handler(State(ready): State<ReadyCheck>) -> impl IntoResponse {
    match ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_handler() -> impl IntoResponse {
    let encoder = prometheus::TextEncoder::new();
    let body = encoder
        .encode_to_string(&prometheus::gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

/// Binds the admin listener and serves it until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the admin listener {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, router(ready))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    Ok(local)
}
