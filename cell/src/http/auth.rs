//! `/v1/auth/*` and the JWKS.

use super::Path;
use super::{ApiResult, Auth, ClientIp, ClientType, Json, json};
use crate::http::openapi::Route;
use crate::identity::Registration;
use crate::identity::service::TokenPair;
use crate::state::Cell;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// An E.164 phone (`+8613800000000`), an email, or a username.
    pub identifier: String,
    pub password: String,
    pub display_name: Option<String>,
    /// A region preference; the router decides where the request lands.
    pub region: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct RegisterResponse {
    pub user_id: String,
    pub home_region: String,
}

/// A registration waiting for the code sent to its email or phone.
#[derive(Serialize, JsonSchema)]
pub struct PendingRegistration {
    /// Send it back with the code to `POST /v1/auth/register/verify`.
    pub registration_id: String,
    /// Unix ms; after it the registration is gone and nothing was claimed.
    pub expires_at: i64,
}

/// 201 with the user, or, for an email or phone in a region that asks for
/// proof, 202 with a pending registration: a code went to the identifier.
pub async fn register(
    State(cell): State<Arc<Cell>>,
    ClientIp(ip): ClientIp,
    Json(r): Json<RegisterRequest>,
) -> ApiResult<Response> {
    cell.identity.check_registration_ip(ip)?;
    let registered = cell
        .identity
        .register(&r.identifier, &r.password, r.display_name.as_deref())
        .await?;
    Ok(match registered {
        Registration::Created(user_id) => created(&cell, user_id),
        Registration::Pending {
            registration_id,
            expires_at,
        } => json(
            StatusCode::ACCEPTED,
            &PendingRegistration {
                registration_id,
                expires_at,
            },
        ),
    })
}

fn created(cell: &Cell, user_id: String) -> Response {
    json(
        StatusCode::CREATED,
        &RegisterResponse {
            user_id,
            home_region: cell.region.clone(),
        },
    )
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRegistration {
    pub registration_id: String,
    /// The 6-digit code sent to the identifier.
    pub code: String,
}

pub async fn verify_registration(
    State(cell): State<Arc<Cell>>,
    ClientIp(ip): ClientIp,
    Json(r): Json<VerifyRegistration>,
) -> ApiResult<Response> {
    let user_id = cell
        .identity
        .verify_registration(&r.registration_id, &r.code, ip)
        .await?;
    Ok(created(&cell, user_id))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub identifier: String,
    pub password: String,
}

pub async fn login(
    State(cell): State<Arc<Cell>>,
    ClientType(ct): ClientType,
    ClientIp(ip): ClientIp,
    Json(r): Json<LoginRequest>,
) -> ApiResult<axum::Json<TokenPair>> {
    Ok(axum::Json(
        cell.identity
            .login(&r.identifier, &r.password, ct, ip)
            .await?,
    ))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WechatLoginRequest {
    /// From `wx.login()` in the mini-program.
    pub code: String,
}

/// `POST /v1/auth/wechat` (x-client-type: mp): signs in, or up, with WeChat.
pub async fn wechat(
    State(cell): State<Arc<Cell>>,
    ClientType(ct): ClientType,
    ClientIp(ip): ClientIp,
    Json(r): Json<WechatLoginRequest>,
) -> ApiResult<axum::Json<TokenPair>> {
    cell.identity.check_ip(ip)?;
    let pair = cell
        .identity
        .wechat_login(cell.wechat.as_ref(), &r.code, ct)
        .await?;
    Ok(axum::Json(pair))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

pub async fn refresh(
    State(cell): State<Arc<Cell>>,
    Json(r): Json<RefreshRequest>,
) -> ApiResult<axum::Json<TokenPair>> {
    // A rotation here after a move copied the session would be left behind:
    // wait for the move (then the session lives at the new home).
    if cell.moves.frozen.any() {
        let hash = homecell_common::hex::sha256(&r.refresh_token);
        if let Some(user) = cell.moves.refresh_user(&hash).await {
            cell.moves.frozen.wait(&user).await?;
        }
    }
    match cell.identity.refresh(&r.refresh_token).await {
        Ok(pair) => Ok(axum::Json(pair)),
        // A session a move took to another region: the router replays the
        // refresh there, where the session lives on.
        Err(e) if e.code == homecell_proto::error::ErrorCode::Unauthenticated => {
            let hash = homecell_common::hex::sha256(&r.refresh_token);
            Err(cell.moves.moved_session(&hash).await.unwrap_or(e).into())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn logout(State(cell): State<Arc<Cell>>, Auth(p): Auth) -> ApiResult<StatusCode> {
    cell.identity.logout(&p).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, JsonSchema)]
pub struct SessionView {
    pub id: String,
    pub client_type: String,
    pub created_at: i64,
    pub last_used_at: i64,
    /// True for the session of the token that asked.
    pub current: bool,
}

#[derive(Serialize, JsonSchema)]
pub struct SessionList {
    pub items: Vec<SessionView>,
}

pub async fn sessions(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
) -> ApiResult<axum::Json<SessionList>> {
    let items = cell
        .identity
        .sessions(&p)
        .await?
        .into_iter()
        .map(|s| SessionView {
            current: s.id == p.sid,
            id: s.id,
            client_type: s.client_type,
            created_at: s.created_at,
            last_used_at: s.last_used_at,
        })
        .collect();
    Ok(axum::Json(SessionList { items }))
}

pub async fn revoke_session(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(sid): Path<String>,
) -> ApiResult<StatusCode> {
    cell.identity.revoke_session(&p, &sid).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, JsonSchema)]
pub struct RevokedCount {
    pub revoked: u64,
}

pub async fn revoke_others(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
) -> ApiResult<axum::Json<RevokedCount>> {
    Ok(axum::Json(RevokedCount {
        revoked: cell.identity.revoke_other_sessions(&p).await?,
    }))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    pub old_password: String,
    pub new_password: String,
}

pub async fn change_password(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Json(r): Json<ChangePassword>,
) -> ApiResult<StatusCode> {
    cell.identity
        .change_password(&p, &r.old_password, &r.new_password)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    /// An email address or a phone number.
    pub identifier: String,
}

/// Sends a sign-in code for this client type (`identity/otp.rs`).
pub async fn request_sign_in_code(
    State(cell): State<Arc<Cell>>,
    ClientType(ct): ClientType,
    ClientIp(ip): ClientIp,
    Json(r): Json<CodeRequest>,
) -> ApiResult<StatusCode> {
    cell.identity
        .request_sign_in_code(&r.identifier, ct, ip)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeSignIn {
    pub identifier: String,
    /// The 6 digits sent to it.
    pub code: String,
}

pub async fn verify_sign_in_code(
    State(cell): State<Arc<Cell>>,
    ClientType(ct): ClientType,
    ClientIp(ip): ClientIp,
    Json(r): Json<CodeSignIn>,
) -> ApiResult<axum::Json<TokenPair>> {
    Ok(axum::Json(
        cell.identity
            .verify_sign_in_code(&r.identifier, &r.code, ct, ip)
            .await?,
    ))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub identifier: String,
}

pub async fn request_reset(
    State(cell): State<Arc<Cell>>,
    ClientIp(ip): ClientIp,
    Json(r): Json<ResetRequest>,
) -> ApiResult<StatusCode> {
    cell.identity.request_reset(&r.identifier, ip).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    pub identifier: String,
    pub code: String,
    pub new_password: String,
}

pub async fn confirm_reset(
    State(cell): State<Arc<Cell>>,
    ClientIp(ip): ClientIp,
    Json(r): Json<ResetConfirm>,
) -> ApiResult<StatusCode> {
    cell.identity
        .confirm_reset(&r.identifier, &r.code, &r.new_password, ip)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn jwks(State(cell): State<Arc<Cell>>) -> Response {
    axum::Json(cell.identity.keys.jwks()).into_response()
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/.well-known/jwks.json", jwks)
            .summary("The cell's token verification keys")
            .public(),
        Route::post("/v1/auth/register", register)
            .summary("Register with a phone, email or username")
            .public()
            .body::<RegisterRequest>()
            .returns::<RegisterResponse>(201)
            .also_returns::<PendingRegistration>(202),
        Route::post("/v1/auth/register/verify", verify_registration)
            .summary("Finish a registration with the code sent to its email or phone")
            .public()
            .body::<VerifyRegistration>()
            .returns::<RegisterResponse>(201),
        Route::post("/v1/auth/wechat", wechat)
            .summary("Sign in (or up) from the WeChat mini-program with a wx.login() code (x-client-type: mp); 409 home_elsewhere with x-home-region when the account lives in another region: sign in there with a new code")
            .public()
            .body::<WechatLoginRequest>()
            .returns::<crate::identity::service::TokenPair>(200),
        Route::post("/v1/auth/login", login)
            .summary("Log in (x-client-type: app, web, mp or cms)")
            .public()
            .body::<LoginRequest>()
            .returns::<crate::identity::service::TokenPair>(200)
            .header("x-client-type", &["app", "web", "mp", "cms"]),
        Route::post("/v1/auth/otp", request_sign_in_code)
            .summary("Send a sign-in code to an email address or phone number (answers 202 either way)")
            .public()
            .body::<CodeRequest>()
            .answers(202)
            .header("x-client-type", &["app", "web", "mp", "cms"]),
        Route::post("/v1/auth/otp/verify", verify_sign_in_code)
            .summary("Sign in with the code, from the client type that asked for it")
            .public()
            .body::<CodeSignIn>()
            .returns::<crate::identity::service::TokenPair>(200)
            .header("x-client-type", &["app", "web", "mp", "cms"]),
        Route::post("/v1/auth/refresh", refresh)
            .summary("Rotate a refresh token")
            .public()
            .body::<RefreshRequest>()
            .returns::<crate::identity::service::TokenPair>(200),
        Route::post("/v1/auth/logout", logout)
            .summary("End this session")
            .answers(204),
        Route::get("/v1/auth/sessions", sessions)
            .summary("My sessions")
            .returns::<SessionList>(200),
        Route::post("/v1/auth/sessions/revoke-others", revoke_others)
            .summary("End every session but this one")
            .returns::<RevokedCount>(200),
        Route::delete("/v1/auth/sessions/{sid}", revoke_session)
            .summary("End one of my sessions")
            .answers(204),
        Route::put("/v1/auth/password", change_password)
            .summary("Change my password (ends my other sessions)")
            .body::<ChangePassword>()
            .answers(204),
        Route::post("/v1/auth/password/reset", request_reset)
            .summary("Request a reset code (answers 202 either way)")
            .public()
            .body::<ResetRequest>()
            .answers(202),
        Route::put("/v1/auth/password/reset", confirm_reset)
            .summary("Set a new password with a reset code (ends every session)")
            .public()
            .body::<ResetConfirm>()
            .answers(204),
    ]
}
