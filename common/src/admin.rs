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

/// The container health check: `GET /ready` on this component's admin
/// listener, with nothing but std (the images carry no curl). An unspecified
/// listen address (`0.0.0.0`, `::`) is probed on loopback. Returns why the
/// component is not ready, if it is not.
pub fn probe_ready(admin: SocketAddr, timeout: std::time::Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut addr = admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    conn.write_all(
        format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    // The status line and the short reason fit in the first KiB.
    let mut head = [0u8; 1024];
    let mut len = 0;
    while len < head.len() {
        match conn.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) => return Err(format!("no answer from {addr}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&head[..len]);
    if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") {
        return Ok(());
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    let status = text.lines().next().unwrap_or("no status line");
    Err(format!("{status}: {body}"))
}

/// `probe_ready` as a process exit status, printing why on failure.
pub fn healthcheck_exit(admin: SocketAddr) -> std::process::ExitCode {
    match probe_ready(admin, std::time::Duration::from_secs(3)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("unhealthy: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}
