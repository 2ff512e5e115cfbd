//! The cell's HTTP API under `/v1`. Every response carries `x-home-region`;
//! every error is `application/problem+json` with a stable code.

use crate::state::Cell;
use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use homecell_common::tls::PeerIdentity;
use homecell_proto::error::{CodedError, ErrorCode, PROBLEM_CONTENT_TYPE, Problem};
use homecell_proto::region::status_name;
use serde_json::json;
use std::sync::Arc;

/// An error answered as problem+json.
pub struct ApiError(pub CodedError);

impl From<CodedError> for ApiError {
    fn from(e: CodedError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem(self.0.code, &self.0.message)
    }
}

pub fn problem(code: ErrorCode, detail: &str) -> Response {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, PROBLEM_CONTENT_TYPE)],
        Problem::new(code, detail).to_json(),
    )
        .into_response()
}

pub fn router(cell: Arc<Cell>) -> Router {
    // Order matters: the identity check runs before any handler; the
    // response headers are added to every answer, errors included.
    Router::new()
        .route("/v1/region", get(region))
        .fallback(|| async { ApiError(CodedError::not_found("no such route")) })
        .layer(middleware::from_fn(require_internal_peer))
        .layer(middleware::from_fn_with_state(
            cell.clone(),
            response_headers,
        ))
        .with_state(cell)
}

/// The cell is only reached through routers and other cells (mTLS); any other
/// certificate holder is refused.
async fn require_internal_peer(req: Request, next: Next) -> Response {
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity::Router { .. } | PeerIdentity::Cell { .. }) => next.run(req).await,
        Some(other) => problem(
            ErrorCode::PermissionDenied,
            &format!("{other} may not call the cell API"),
        ),
        None => problem(
            ErrorCode::Unauthenticated,
            "a client certificate is required",
        ),
    }
}

async fn response_headers(State(cell): State<Arc<Cell>>, req: Request, next: Next) -> Response {
    let request_id = req.headers().get("x-request-id").cloned();
    let mut resp = next.run(req).await;
    crate::metrics::HTTP_RESPONSES
        .with_label_values(&[resp.status().as_str()])
        .inc();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&cell.region) {
        h.insert("x-home-region", v);
    }
    if let Some(id) = request_id {
        h.insert("x-request-id", id);
    }
    resp
}

/// This cell's region and the control-plane revision its replica holds.
async fn region(State(cell): State<Arc<Cell>>) -> Result<Json<serde_json::Value>, ApiError> {
    let state = cell.replica.state();
    let Some(region) = state.regions.get(&cell.region) else {
        return Err(ApiError(CodedError::new(
            ErrorCode::NotReady,
            format!("region {} is not in this cell's replica yet", cell.region),
        )));
    };
    Ok(Json(json!({
        "region": region.id,
        "display_name": region.display_name,
        "status": status_name(region.status()),
        "countries": region.countries,
        "config_revision": state.revision,
        "datastore": cell.db.backend(),
    })))
}
