//! `/v1/cms/users`: finding, disabling, enabling and deleting users, and
//! their roles.

use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Path, Query, cursor};
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use homecell_proto::error::{CodedError, ErrorCode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, JsonSchema)]
pub struct ListQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    /// An exact identifier (normalised) or a display-name prefix.
    pub q: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct CmsUser {
    pub id: String,
    pub display_name: String,
    pub status: String,
    pub roles: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Serialize, JsonSchema)]
pub struct CmsUserPage {
    pub items: Vec<CmsUser>,
    pub next_cursor: Option<String>,
}

fn view(u: crate::identity::store::User, roles: Vec<String>) -> CmsUser {
    CmsUser {
        id: u.id,
        display_name: u.display_name,
        status: u.status,
        roles,
        created_at: u.created_at,
        updated_at: u.updated_at,
    }
}

pub async fn list_users(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<CmsUserPage>> {
    let limit = cursor::limit(q.limit, 50, 200);
    let after = q.cursor.as_deref().map(cursor::decode).transpose()?;
    let search =
        q.q.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.to_lowercase());
    if search.as_ref().is_some_and(|s| s.len() > 320) {
        return Err(CodedError::invalid("q is too long").into());
    }
    let rows = cell
        .identity
        .list_users(after, search.as_deref(), limit + 1)
        .await
        .map_err(CodedError::from)?;
    let more = rows.len() as i64 > limit;
    let items: Vec<CmsUser> = rows
        .into_iter()
        .take(limit as usize)
        .map(|(u, roles)| view(u, roles))
        .collect();
    let next_cursor = more
        .then(|| items.last().map(|u| cursor::encode(u.created_at, &u.id)))
        .flatten();
    Ok(axum::Json(CmsUserPage { items, next_cursor }))
}

pub async fn get_user(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<CmsUser>> {
    let p = cell.identity.profile(&id).await?;
    Ok(axum::Json(view(p.user, p.roles)))
}

pub async fn disable_user(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if id == p.user_id {
        return Err(
            CodedError::new(ErrorCode::FailedPrecondition, "you cannot disable yourself").into(),
        );
    }
    cell.identity.set_status(&p, &id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn enable_user(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    cell.identity.set_status(&p, &id, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes an account as its owner's own deletion does (anonymised, its
/// identifiers given back), audited.
pub async fn delete_user(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    cell.identity.delete_user(&p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn grant_role(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path((id, role)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    cell.identity.set_role(&p, &id, &role, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn revoke_role(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path((id, role)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    if role == "user" {
        return Err(CodedError::new(
            ErrorCode::FailedPrecondition,
            "every account keeps the user role",
        )
        .into());
    }
    cell.identity.set_role(&p, &id, &role, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/cms/users", list_users)
            .summary("List and search users")
            .permission("users:read")
            .returns::<CmsUserPage>(200)
            .query(&["limit", "cursor", "q"]),
        Route::get("/v1/cms/users/{id}", get_user)
            .summary("View a user")
            .permission("users:read")
            .returns::<CmsUser>(200),
        Route::delete("/v1/cms/users/{id}", delete_user)
            .summary("Delete an account (anonymised, its identifiers freed; only an admin deletes an admin)")
            .permission("users:delete")
            .answers(204),
        Route::post("/v1/cms/users/{id}/disable", disable_user)
            .summary("Disable an account (ends its sessions)")
            .permission("users:disable")
            .answers(204),
        Route::post("/v1/cms/users/{id}/enable", enable_user)
            .summary("Enable an account")
            .permission("users:disable")
            .answers(204),
        Route::put("/v1/cms/users/{id}/roles/{role}", grant_role)
            .summary("Grant a role")
            .permission("role:assign")
            .answers(204),
        Route::delete("/v1/cms/users/{id}/roles/{role}", revoke_role)
            .summary("Revoke a role")
            .permission("role:assign")
            .answers(204),
    ]
}
