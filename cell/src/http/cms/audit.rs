//! `/v1/cms/audit`: the audit log, newest first.

use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Query, cursor};
use crate::state::Cell;
use axum::extract::State;
use homecell_proto::error::CodedError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, JsonSchema)]
pub struct AuditQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct AuditView {
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub details: serde_json::Value,
}

#[derive(Serialize, JsonSchema)]
pub struct AuditPage {
    pub items: Vec<AuditView>,
    pub next_cursor: Option<String>,
}

pub async fn audit(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Query(q): Query<AuditQuery>,
) -> ApiResult<axum::Json<AuditPage>> {
    let limit = cursor::limit(q.limit, 50, 200);
    let before = q.cursor.as_deref().map(cursor::decode).transpose()?;
    let rows = cell
        .identity
        .audit_log(before, limit + 1)
        .await
        .map_err(CodedError::from)?;
    let more = rows.len() as i64 > limit;
    let items: Vec<AuditView> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| AuditView {
            details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
            id: r.id,
            at: r.at,
            actor: r.actor,
            action: r.action,
            target: r.target,
        })
        .collect();
    let next_cursor = more
        .then(|| items.last().map(|a| cursor::encode(a.at, &a.id)))
        .flatten();
    Ok(axum::Json(AuditPage { items, next_cursor }))
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/cms/audit", audit)
            .summary("The audit log, newest first")
            .permission("audit:read")
            .returns::<AuditPage>(200)
            .query(&["limit", "cursor"]),
    ]
}
