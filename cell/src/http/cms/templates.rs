//! `/v1/cms/templates`: the notice templates, per key, channel and locale.

use crate::clock::now_ms;
use crate::http::notices::{changed, check_channel, check_locale, check_name};
use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Json, Path};
use crate::notice::store::Template;
use crate::notice::template;
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use homecell_proto::error::{CodedError, ErrorCode};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;

pub async fn list_templates(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
) -> ApiResult<axum::Json<Vec<Template>>> {
    Ok(axum::Json(
        cell.notices
            .list_templates()
            .await
            .map_err(CodedError::from)?,
    ))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    pub category: String,
    /// The inbox title or email subject ({{variables}} allowed).
    #[serde(default)]
    pub subject: String,
    pub body: String,
}

/// The system's own messages (`auth.*`: one-time codes, security
/// notices) are an admin's to edit: a rewritten one could ask its reader
/// to pass the code on.
async fn system_template(cell: &Cell, user_id: &str, key: &str) -> Result<(), CodedError> {
    if key.starts_with("auth.") && !cell.identity.is_admin(user_id).await? {
        return Err(CodedError::new(
            ErrorCode::PermissionDenied,
            "auth.* templates are an admin's to edit",
        ));
    }
    Ok(())
}

pub async fn put_template(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path((key, channel, locale)): Path<(String, String, String)>,
    Json(req): Json<TemplateBody>,
) -> ApiResult<StatusCode> {
    check_name("key", &key)?;
    check_channel("channel", &channel)?;
    check_locale(&locale)?;
    check_name("category", &req.category)?;
    system_template(&cell, &p.user_id, &key).await?;
    if key.starts_with("auth.") && req.category != "security" {
        // A code a user could opt out of would never reach them.
        return Err(CodedError::field("category", "auth.* templates are security messages").into());
    }
    if req.body.len() > 16 * 1024 || req.subject.len() > 512 {
        return Err(CodedError::invalid("subject ≤ 512 and body ≤ 16384 bytes").into());
    }
    for (field, text) in [("subject", &req.subject), ("body", &req.body)] {
        template::check(text).map_err(|m| CodedError::field(field, m))?;
    }
    let t = Template {
        key,
        channel,
        locale,
        category: req.category,
        subject: req.subject,
        body: req.body,
        updated_at: now_ms(),
        updated_by: p.user_id.clone(),
    };
    cell.notices
        .put_template(&t)
        .await
        .map_err(CodedError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_template(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path((key, channel, locale)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    system_template(&cell, &p.user_id, &key).await?;
    let gone = cell
        .notices
        .delete_template(&key, &channel, &locale)
        .await
        .map_err(CodedError::from)?;
    changed(u64::from(gone))
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/cms/templates", list_templates)
            .summary("Every notice template")
            .permission("templates:write")
            .returns::<Vec<crate::notice::store::Template>>(200),
        Route::put("/v1/cms/templates/{key}/{channel}/{locale}", put_template)
            .summary("Create or replace a template ({{variables}} are checked)")
            .permission("templates:write")
            .body::<TemplateBody>()
            .answers(204),
        Route::delete(
            "/v1/cms/templates/{key}/{channel}/{locale}",
            delete_template,
        )
        .summary("Delete a template")
        .permission("templates:write")
        .answers(204),
    ]
}
