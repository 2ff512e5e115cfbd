//! `/v1/users/me/identifiers`: adding or changing an email or phone (with
//! a code sent to it) and removing one (with a recent sign-in).

use super::{ApiResult, Auth, ClientIp, Json, Path, json};
use crate::http::openapi::Route;
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIdentifier {
    /// An email address or an E.164 phone number. It replaces the one of
    /// its kind the account has, if any.
    pub identifier: String,
}

#[derive(Serialize, JsonSchema)]
pub struct PendingChange {
    /// Send it back with the code to `POST /v1/users/me/identifiers/verify`.
    pub verification_id: String,
    /// Unix ms.
    pub expires_at: i64,
}

pub async fn add(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    ClientIp(ip): ClientIp,
    Json(r): Json<NewIdentifier>,
) -> ApiResult<Response> {
    super::users::at_home(&cell, &p)?;
    // A code sent, as a registration sends one: the same per-address
    // limit, beside the account's and the identifier's budgets.
    cell.identity.check_registration_ip(ip)?;
    let (verification_id, expires_at) = cell
        .identity
        .request_identifier_change(&p, &r.identifier)
        .await?;
    Ok(json(
        StatusCode::ACCEPTED,
        &PendingChange {
            verification_id,
            expires_at,
        },
    ))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyChange {
    pub verification_id: String,
    /// The 6-digit code sent to the new identifier.
    pub code: String,
}

#[derive(Serialize, JsonSchema)]
pub struct Changed {
    /// `kind:value`, now the account's.
    pub identifier: String,
}

pub async fn verify(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    ClientIp(ip): ClientIp,
    Json(r): Json<VerifyChange>,
) -> ApiResult<axum::Json<Changed>> {
    super::users::at_home(&cell, &p)?;
    // A guess, as a registration's verification is: the per-address limit.
    cell.identity.check_ip(ip)?;
    let identifier = cell
        .identity
        .verify_identifier_change(&p, &r.verification_id, &r.code)
        .await?;
    Ok(axum::Json(Changed { identifier }))
}

pub async fn remove(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(kind): Path<String>,
) -> ApiResult<StatusCode> {
    super::users::at_home(&cell, &p)?;
    cell.identity.remove_identifier(&p, &kind).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::post("/v1/users/me/identifiers", add)
            .summary("Add or change my email or phone: sends a code to it (202)")
            .body::<NewIdentifier>()
            .returns::<PendingChange>(202),
        Route::post("/v1/users/me/identifiers/verify", verify)
            .summary("Finish adding or changing an identifier with the code sent to it")
            .body::<VerifyChange>()
            .returns::<Changed>(200),
        Route::delete("/v1/users/me/identifiers/{kind}", remove)
            .summary("Remove my email or phone (kind: email or phone; needs a sign-in in the last 10 minutes)")
            .answers(204),
    ]
}
