//! `/v1/cms/roles` and `/v1/cms/permissions`: roles as data, edited from
//! the cell's permission catalogue (`identity/roles.rs`).

use crate::http::openapi::Route;
use crate::http::permission::Authorized;
use crate::http::{ApiResult, Json, Path};
use crate::identity::store::RoleRow;
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Serialize, JsonSchema)]
pub struct Role {
    pub name: String,
    pub description: String,
    /// user, support and admin: never deleted, and they keep the
    /// permissions the system needs.
    pub builtin: bool,
    pub permissions: Vec<String>,
}

impl From<RoleRow> for Role {
    fn from(r: RoleRow) -> Self {
        Self {
            name: r.name,
            description: r.description,
            builtin: r.builtin,
            permissions: r.permissions,
        }
    }
}

#[derive(Serialize, JsonSchema)]
pub struct RoleList {
    pub items: Vec<Role>,
}

#[derive(Serialize, JsonSchema)]
pub struct Permission {
    pub name: String,
    pub description: String,
}

#[derive(Serialize, JsonSchema)]
pub struct PermissionList {
    pub items: Vec<Permission>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRole {
    /// 1-32 characters: a-z first, then a-z, 0-9, - or _.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// From `GET /v1/cms/permissions`.
    pub permissions: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleEdit {
    #[serde(default)]
    pub description: String,
    /// The role's whole set of permissions after the edit.
    pub permissions: Vec<String>,
}

pub async fn list_roles(
    State(cell): State<Arc<Cell>>,
    _: Authorized,
) -> ApiResult<axum::Json<RoleList>> {
    let items = cell.identity.roles().await?;
    Ok(axum::Json(RoleList {
        items: items.into_iter().map(Role::from).collect(),
    }))
}

pub async fn list_permissions(_: Authorized) -> ApiResult<axum::Json<PermissionList>> {
    let items = crate::identity::roles::PERMISSIONS
        .iter()
        .map(|(name, description)| Permission {
            name: name.to_string(),
            description: description.to_string(),
        })
        .collect();
    Ok(axum::Json(PermissionList { items }))
}

pub async fn create_role(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Json(req): Json<NewRole>,
) -> ApiResult<(StatusCode, axum::Json<Role>)> {
    let role = cell
        .identity
        .create_role(&p, &req.name, &req.description, &req.permissions)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(role.into())))
}

pub async fn update_role(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path(name): Path<String>,
    Json(req): Json<RoleEdit>,
) -> ApiResult<axum::Json<Role>> {
    let role = cell
        .identity
        .update_role(&p, &name, &req.description, &req.permissions)
        .await?;
    Ok(axum::Json(role.into()))
}

pub async fn delete_role(
    State(cell): State<Arc<Cell>>,
    Authorized(p): Authorized,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    cell.identity.delete_role(&p, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/cms/roles", list_roles)
            .summary("List roles with their permissions")
            .permission("role:assign")
            .returns::<RoleList>(200),
        Route::post("/v1/cms/roles", create_role)
            .summary("Create a role from the permission catalogue")
            .permission("role:edit")
            .body::<NewRole>()
            .returns::<Role>(201),
        Route::put("/v1/cms/roles/{name}", update_role)
            .summary("Replace a role's description and permissions (built-in roles keep what the system needs)")
            .permission("role:edit")
            .body::<RoleEdit>()
            .returns::<Role>(200),
        Route::delete("/v1/cms/roles/{name}", delete_role)
            .summary("Delete a custom role and every grant of it")
            .permission("role:edit")
            .answers(204),
        Route::get("/v1/cms/permissions", list_permissions)
            .summary("The permission catalogue")
            .permission("role:assign")
            .returns::<PermissionList>(200),
    ]
}
