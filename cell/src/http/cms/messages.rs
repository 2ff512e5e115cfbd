//! `/v1/cms/messages`: a message to one user, in whichever cell is their
//! home.

use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Json};
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use homecell_proto::error::CodedError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    pub to_user_id: String,
    pub title: String,
    pub text: String,
}

#[derive(Serialize, JsonSchema)]
pub struct MessageSent {
    pub event_id: String,
    /// The region of the user's home cell, where the notice was queued.
    pub region: String,
}

/// `POST /v1/cms/messages`: a message to one user, in whichever cell is
/// their home (cell to cell over gRPC). The path names no user, so the
/// router sends it to the operator's own cell, where the permission lives.
pub async fn send_message(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Json(req): Json<MessageRequest>,
) -> ApiResult<Response> {
    let user_id = req.to_user_id.trim().to_string();
    let title = req.title.trim();
    let text = req.text.trim();
    if title.is_empty()
        || title.chars().count() > 200
        || text.is_empty()
        || text.chars().count() > 4000
    {
        return Err(CodedError::invalid("title is 1–200 and text 1–4000 characters").into());
    }
    let event_id = uuid::Uuid::now_v7().to_string();
    let payload = serde_json::json!({"title": title, "text": text}).to_string();
    let region = cell
        .deliver_event(&event_id, "message", &user_id, &payload)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(MessageSent { event_id, region }),
    )
        .into_response())
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/cms/messages", send_message)
            .summary("Send a message to a user of any region (delivered by the user's home cell)")
            .permission("broadcast:send")
            .body::<MessageRequest>()
            .returns::<MessageSent>(202),
    ]
}
