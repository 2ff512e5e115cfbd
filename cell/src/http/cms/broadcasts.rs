//! `/v1/cms/broadcasts`: a notice to a segment of this cell's users, paced.

use crate::clock::now_ms;
use crate::http::notices::check_name;
use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Json};
use crate::notice::template;
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
pub struct BroadcastRequest {
    /// A template key with at least one template (e.g. `message`).
    pub template_key: String,
    /// The template's variables (text or numbers); `display_name` is each
    /// user's own.
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// Only users with this role; omitted: every active user of the cell.
    pub role: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct BroadcastAccepted {
    pub broadcast_id: String,
}

/// `POST /v1/cms/broadcasts`: a notice to a segment of this cell's users,
/// queued at `notice.broadcast.per_second`. Every template of the key must
/// render with the variables given, or nothing is queued.
pub async fn broadcast(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Json(req): Json<BroadcastRequest>,
) -> ApiResult<Response> {
    check_name("template_key", &req.template_key)?;
    // The system's own messages (codes, security notices) are not the back
    // office's to send: a broadcast of one would look like a real code.
    if req.template_key.starts_with("auth.") {
        return Err(CodedError::field(
            "template_key",
            "auth.* templates are sent by the system only",
        )
        .into());
    }
    let templates = cell
        .notices
        .templates_for(&req.template_key)
        .await
        .map_err(CodedError::from)?;
    if templates.is_empty() {
        return Err(CodedError::not_found("no template with that key").into());
    }
    let mut probe = req.variables.clone();
    probe
        .entry("display_name")
        .or_insert_with(|| serde_json::Value::String("x".into()));
    for t in &templates {
        for text in [&t.subject, &t.body] {
            template::render(text, &probe, false).map_err(|m| {
                CodedError::field(
                    "variables",
                    format!("{} {} {}: {m}", t.key, t.channel, t.locale),
                )
            })?;
        }
    }
    if let Some(role) = &req.role
        && !cell
            .identity
            .role_exists(role)
            .await
            .map_err(CodedError::from)?
    {
        return Err(CodedError::field("role", "no such role").into());
    }
    let payload = serde_json::Value::Object(req.variables).to_string();
    if payload.len() > 16 * 1024 {
        return Err(CodedError::invalid("variables are at most 16 KiB").into());
    }
    let b = crate::notice::store::Broadcast {
        id: uuid::Uuid::now_v7().to_string(),
        template_key: req.template_key,
        role: req.role,
        created_by: p.user_id.clone(),
        created_at: now_ms(),
        queued: 0,
        done_at: None,
    };
    cell.notices
        .create_broadcast(&b, &payload)
        .await
        .map_err(CodedError::from)?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(BroadcastAccepted { broadcast_id: b.id }),
    )
        .into_response())
}

pub async fn list_broadcasts(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
) -> ApiResult<axum::Json<Vec<crate::notice::store::Broadcast>>> {
    Ok(axum::Json(
        cell.notices
            .broadcasts(100)
            .await
            .map_err(CodedError::from)?,
    ))
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/cms/broadcasts", broadcast)
            .summary("Send a template to every user of this cell, or of one role (paced)")
            .permission("broadcast:send")
            .body::<BroadcastRequest>()
            .returns::<BroadcastAccepted>(202),
        Route::get("/v1/cms/broadcasts", list_broadcasts)
            .summary("Recent broadcasts and their progress")
            .permission("broadcast:send")
            .returns::<Vec<crate::notice::store::Broadcast>>(200),
    ]
}
