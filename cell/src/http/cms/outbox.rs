//! `/v1/cms/outbox`: the dead-letter queue of deliveries, and redriving one.

use crate::clock::now_ms;
use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Path, Query, cursor};
use crate::notice::store::{Delivery, Redrive};
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use homecell_proto::error::{CodedError, ErrorCode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Serialize, JsonSchema)]
pub struct DeadPage {
    pub items: Vec<Delivery>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

pub async fn dead_letters(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<DeadPage>> {
    let limit = cursor::limit(q.limit, 50, 200);
    let after = q.cursor.as_deref().map(cursor::decode).transpose()?;
    let rows = cell
        .notices
        .dead_deliveries(after, limit + 1)
        .await
        .map_err(CodedError::from)?;
    let (items, next_cursor) = cursor::page(rows, limit, |d| (d.created_at, &d.id));
    Ok(axum::Json(DeadPage { items, next_cursor }))
}

pub async fn redrive(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let done = cell
        .notices
        .redrive(&id, now_ms())
        .await
        .map_err(CodedError::from)?;
    match done {
        Redrive::Queued => {}
        Redrive::NotDead => {
            return Err(CodedError::not_found("no dead delivery with that id").into());
        }
        Redrive::OneTimeCode => {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "a one-time code is never sent again: the user asks for a new one",
            )
            .into());
        }
    }
    cell.notices.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/cms/outbox/dead", dead_letters)
            .summary("Deliveries that failed too often (the dead-letter queue)")
            .permission("outbox:manage")
            .returns::<DeadPage>(200)
            .query(&["limit", "cursor"]),
        Route::post("/v1/cms/outbox/dead/{id}/redrive", redrive)
            .summary("Send a dead delivery again (never a one-time code: 409 failed_precondition)")
            .permission("outbox:manage")
            .answers(204),
    ]
}
