//! `/v1/users/*`: profiles (with ETag / If-Match), addresses, deletion.

use super::Path;
use super::{ApiError, ApiResult, Auth, Bearer, Json, json};
use crate::clock::now_ms;
use crate::http::openapi::Route;
use crate::identity::service::not_at_home;
use crate::identity::store::{Address, ProfileFields, User, UserProfile};
use crate::state::Cell;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use homecell_proto::error::{CodedError, ErrorCode, FieldError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Serialize, JsonSchema)]
pub struct IdentifierView {
    pub kind: String,
    pub value: String,
}

#[derive(Serialize, JsonSchema)]
pub struct Profile {
    pub id: String,
    pub display_name: String,
    pub locale: Option<String>,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub status: String,
    pub home_region: String,
    pub roles: Vec<String>,
    pub identifiers: Vec<IdentifierView>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Serialize, JsonSchema)]
pub struct PublicProfile {
    pub id: String,
    pub display_name: String,
    pub avatar_url: Option<String>,
    pub bio: Option<String>,
    pub home_region: String,
}

fn etag(u: &User) -> String {
    format!("\"v{}\"", u.version)
}

fn profile_response(cell: &Cell, p: UserProfile) -> Response {
    let tag = etag(&p.user);
    let mut resp = json(StatusCode::OK, &profile(cell, p));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// A user's own profile, with roles and identifiers.
pub(super) fn profile(cell: &Cell, p: UserProfile) -> Profile {
    let UserProfile {
        user: u,
        roles,
        identifiers,
    } = p;
    Profile {
        id: u.id,
        display_name: u.display_name,
        locale: u.locale,
        bio: u.bio,
        avatar_url: u.avatar_url,
        status: u.status,
        home_region: cell.region.clone(),
        roles,
        identifiers: identifiers
            .into_iter()
            .map(|(kind, value)| IdentifierView { kind, value })
            .collect(),
        created_at: u.created_at,
        updated_at: u.updated_at,
    }
}

/// The home cell serves its own users' data only.
pub(super) fn at_home(
    cell: &Cell,
    p: &crate::identity::service::Principal,
) -> Result<(), ApiError> {
    if p.home == cell.region {
        Ok(())
    } else {
        Err(not_at_home().into())
    }
}

pub async fn me(State(cell): State<Arc<Cell>>, Bearer(token): Bearer) -> ApiResult<Response> {
    Ok(profile_response(
        &cell,
        cell.identity.own_profile(token).await?,
    ))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    pub display_name: Option<String>,
    /// BCP 47, e.g. `zh-CN`, `en`.
    pub locale: Option<String>,
    pub bio: Option<String>,
    /// An https URL.
    pub avatar_url: Option<String>,
}

fn check_text(errors: &mut Vec<FieldError>, field: &str, v: Option<&str>, max: usize) {
    if let Some(v) = v
        && (v.chars().count() > max || v.chars().any(|c| c.is_control() && c != '\n'))
    {
        errors.push(FieldError {
            field: field.into(),
            message: format!("at most {max} printable characters"),
        });
    }
}

pub async fn update_me(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    headers: HeaderMap,
    Json(r): Json<ProfileUpdate>,
) -> ApiResult<Response> {
    at_home(&cell, &p)?;
    let Some(if_match) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) else {
        return Err(CodedError::new(
            ErrorCode::PreconditionRequired,
            "send If-Match with the ETag you read",
        )
        .into());
    };
    // Read whole once: the answer shows these roles and identifiers
    // beside the row the update writes.
    let mut current = cell.identity.profile(&p.user_id).await?;
    let expected: i64 = if_match
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .strip_prefix('v')
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| CodedError::new(ErrorCode::PreconditionFailed, "If-Match does not match"))?;
    let mut errors = Vec::new();
    let name = r.display_name.as_deref().map(str::trim);
    if name == Some("") {
        errors.push(FieldError {
            field: "display_name".into(),
            message: "cannot be empty".into(),
        });
    }
    check_text(&mut errors, "display_name", name, 64);
    check_text(&mut errors, "bio", r.bio.as_deref(), 500);
    if let Some(l) = &r.locale
        && (l.len() > 35 || !l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        errors.push(FieldError {
            field: "locale".into(),
            message: "a BCP 47 tag such as zh-CN".into(),
        });
    }
    if let Some(u) = &r.avatar_url
        && (!u.starts_with("https://")
            || u.len() > 2048
            || u.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        errors.push(FieldError {
            field: "avatar_url".into(),
            message: "an https URL".into(),
        });
    }
    if !errors.is_empty() {
        return Err(CodedError::fields(errors).into());
    }
    let updated = cell
        .identity
        .update_profile(
            &p.user_id,
            expected,
            &ProfileFields {
                display_name: name.unwrap_or(&current.user.display_name),
                locale: r.locale.as_deref().or(current.user.locale.as_deref()),
                bio: r.bio.as_deref().or(current.user.bio.as_deref()),
                avatar_url: r
                    .avatar_url
                    .as_deref()
                    .or(current.user.avatar_url.as_deref()),
            },
            now_ms(),
        )
        .await
        .map_err(CodedError::from)?
        .ok_or_else(|| {
            CodedError::new(
                ErrorCode::PreconditionFailed,
                "the profile changed since you read it",
            )
        })?;
    current.user = updated;
    Ok(profile_response(&cell, current))
}

/// Exactly one proof that the account is the caller's.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccount {
    /// The current password.
    pub password: Option<String>,
    /// A sign-in code asked for with `POST /v1/auth/otp` from this client.
    pub code: Option<String>,
    /// A fresh `wx.login()` code (a WeChat-only account).
    pub wechat_code: Option<String>,
}

pub async fn delete_me(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Json(r): Json<DeleteAccount>,
) -> ApiResult<StatusCode> {
    at_home(&cell, &p)?;
    use crate::identity::Proof;
    let proof = match (&r.password, &r.code, &r.wechat_code) {
        (Some(pw), None, None) => Proof::Password(pw),
        (None, Some(code), None) => Proof::Code(code),
        (None, None, Some(code)) => Proof::Wechat(code),
        _ => {
            return Err(
                CodedError::invalid("give exactly one of password, code and wechat_code").into(),
            );
        }
    };
    cell.identity
        .delete_account(&p, proof, cell.wechat.as_ref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn public_profile(
    State(cell): State<Arc<Cell>>,
    Auth(_p): Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let u = cell.identity.user(&id).await?;
    if u.status != "active" {
        return Err(CodedError::not_found("no such user").into());
    }
    Ok(axum::Json(PublicProfile {
        id: u.id,
        display_name: u.display_name,
        avatar_url: u.avatar_url,
        bio: u.bio,
        home_region: cell.region.clone(),
    })
    .into_response())
}

// ---------------------------------------------------------------- addresses

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressInput {
    pub label: Option<String>,
    pub recipient: String,
    pub phone: Option<String>,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    #[serde(default)]
    pub is_default: bool,
}

impl AddressInput {
    fn validate(self, id: String, created_at: i64) -> Result<Address, CodedError> {
        let mut errors = Vec::new();
        let mut required = |field: &str, v: &str| {
            if v.trim().is_empty() {
                errors.push(FieldError {
                    field: field.into(),
                    message: "is required".into(),
                });
            }
        };
        required("recipient", &self.recipient);
        required("line1", &self.line1);
        required("city", &self.city);
        for (f, v, max) in [
            ("label", self.label.as_deref(), 32),
            ("recipient", Some(self.recipient.as_str()), 64),
            ("phone", self.phone.as_deref(), 32),
            ("line1", Some(self.line1.as_str()), 200),
            ("line2", self.line2.as_deref(), 200),
            ("city", Some(self.city.as_str()), 100),
            ("state", self.state.as_deref(), 100),
            ("postal_code", self.postal_code.as_deref(), 20),
        ] {
            check_text(&mut errors, f, v, max);
        }
        let country = match homecell_proto::region::normalize_countries(&[self.country.as_str()]) {
            Ok(mut c) => c.pop().unwrap_or_default(),
            Err(_) => {
                errors.push(FieldError {
                    field: "country".into(),
                    message: "an ISO 3166-1 alpha-2 code".into(),
                });
                String::new()
            }
        };
        if !errors.is_empty() {
            return Err(CodedError::fields(errors));
        }
        let trim = |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        Ok(Address {
            id,
            label: trim(self.label),
            recipient: self.recipient.trim().into(),
            phone: trim(self.phone),
            line1: self.line1.trim().into(),
            line2: trim(self.line2),
            city: self.city.trim().into(),
            state: trim(self.state),
            postal_code: trim(self.postal_code),
            country,
            is_default: self.is_default,
            created_at,
            updated_at: now_ms(),
        })
    }
}

#[derive(Serialize, JsonSchema)]
pub struct AddressList {
    pub items: Vec<Address>,
}

pub async fn addresses(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
) -> ApiResult<axum::Json<AddressList>> {
    at_home(&cell, &p)?;
    let items = cell
        .identity
        .addresses(&p.user_id)
        .await
        .map_err(CodedError::from)?;
    Ok(axum::Json(AddressList { items }))
}

pub async fn add_address(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Json(r): Json<AddressInput>,
) -> ApiResult<Response> {
    at_home(&cell, &p)?;
    let a = r.validate(uuid::Uuid::now_v7().to_string(), now_ms())?;
    let a = cell.identity.add_address(&p, a).await?;
    Ok(json(StatusCode::CREATED, &a))
}

pub async fn update_address(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Json(r): Json<AddressInput>,
) -> ApiResult<Response> {
    at_home(&cell, &p)?;
    let a = r.validate(id.clone(), 0)?;
    if !cell
        .identity
        .update_address(&p.user_id, &a)
        .await
        .map_err(CodedError::from)?
    {
        return Err(CodedError::not_found("no such address").into());
    }
    let all = cell
        .identity
        .addresses(&p.user_id)
        .await
        .map_err(CodedError::from)?;
    let a = all
        .into_iter()
        .find(|x| x.id == id)
        .ok_or_else(|| CodedError::not_found("no such address"))?;
    Ok(json(StatusCode::OK, &a))
}

pub async fn delete_address(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    at_home(&cell, &p)?;
    if cell
        .identity
        .delete_address(&p.user_id, &id)
        .await
        .map_err(CodedError::from)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(CodedError::not_found("no such address").into())
    }
}

pub async fn default_address(
    State(cell): State<Arc<Cell>>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    at_home(&cell, &p)?;
    if cell
        .identity
        .set_default_address(&p.user_id, &id, now_ms())
        .await
        .map_err(CodedError::from)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(CodedError::not_found("no such address").into())
    }
}

/// This area's routes, for the route table (`http/openapi.rs`).
pub fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/users/me", me)
            .summary("My profile, with an ETag")
            .returns::<Profile>(200),
        Route::put("/v1/users/me", update_me)
            .summary("Update my profile (If-Match required)")
            .body::<ProfileUpdate>()
            .returns::<Profile>(200)
            .header("If-Match", &[]),
        Route::delete("/v1/users/me", delete_me)
            .summary("Delete my account (anonymised)")
            .body::<DeleteAccount>()
            .answers(204),
        Route::get("/v1/users/me/addresses", addresses)
            .summary("My addresses")
            .returns::<AddressList>(200),
        Route::post("/v1/users/me/addresses", add_address)
            .summary("Add an address")
            .body::<AddressInput>()
            .returns::<crate::identity::store::Address>(201),
        Route::put("/v1/users/me/addresses/{id}", update_address)
            .summary("Replace an address")
            .body::<AddressInput>()
            .returns::<crate::identity::store::Address>(200),
        Route::delete("/v1/users/me/addresses/{id}", delete_address)
            .summary("Delete an address")
            .answers(204),
        Route::post("/v1/users/me/addresses/{id}/default", default_address)
            .summary("Make an address the default")
            .answers(204),
        Route::get("/v1/users/{id}", public_profile)
            .summary("A user's public profile")
            .returns::<PublicProfile>(200),
    ]
}
