//! The route table: every route with its method, path, access rule and
//! request/response types. The router is built from it and so is the
//! OpenAPI 3.1 document, so the two cannot disagree.

use super::{auth, cms, me, notices, region, users, wallet};
use crate::state::Cell;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};
use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings};
use serde_json::{Map, Value, json};
use std::sync::Arc;

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// Any valid access token.
    Bearer,
    /// A `cms` client token whose user holds the permission now.
    Permission(&'static str),
}

pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    pub query: &'static [&'static str],
    pub request: Option<SchemaFn>,
    pub response: (u16, Option<SchemaFn>),
    pub handler: MethodRouter<Arc<Cell>>,
}

#[allow(clippy::too_many_arguments)]
fn route<H, T>(
    method: Method,
    path: &'static str,
    summary: &'static str,
    access: Access,
    request: Option<SchemaFn>,
    response: (u16, Option<SchemaFn>),
    handler: H,
) -> Route
where
    H: Handler<T, Arc<Cell>>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
    Route {
        method,
        path,
        summary,
        access,
        query: &[],
        request,
        response,
        handler: on(filter, handler),
    }
}

fn with_query(mut r: Route, query: &'static [&'static str]) -> Route {
    r.query = query;
    r
}

use Access::*;

pub fn routes() -> Vec<Route> {
    vec![
        route(
            Method::GET,
            "/v1/region",
            "This cell's region and replicated config revision",
            Public,
            None,
            (200, Some(s::<region::RegionInfo>)),
            region::region,
        ),
        route(
            Method::GET,
            "/v1/openapi.json",
            "This document",
            Public,
            None,
            (200, None),
            openapi_handler,
        ),
        route(
            Method::GET,
            "/.well-known/jwks.json",
            "The cell's token verification keys",
            Public,
            None,
            (200, None),
            auth::jwks,
        ),
        route(
            Method::POST,
            "/v1/auth/register",
            "Register with a phone, email or username",
            Public,
            Some(s::<auth::RegisterRequest>),
            (201, Some(s::<auth::RegisterResponse>)),
            auth::register,
        ),
        route(
            Method::POST,
            "/v1/auth/wechat",
            "Sign in (or up) from the WeChat mini-program with a wx.login() code (x-client-type: mp); 409 home_elsewhere with x-home-region when the account lives in another region: sign in there with a new code",
            Public,
            Some(s::<auth::WechatLoginRequest>),
            (200, Some(s::<crate::identity::service::TokenPair>)),
            auth::wechat,
        ),
        route(
            Method::POST,
            "/v1/auth/login",
            "Log in (x-client-type: app, web, mp or cms)",
            Public,
            Some(s::<auth::LoginRequest>),
            (200, Some(s::<crate::identity::service::TokenPair>)),
            auth::login,
        ),
        route(
            Method::POST,
            "/v1/auth/refresh",
            "Rotate a refresh token",
            Public,
            Some(s::<auth::RefreshRequest>),
            (200, Some(s::<crate::identity::service::TokenPair>)),
            auth::refresh,
        ),
        route(
            Method::POST,
            "/v1/auth/logout",
            "End this session",
            Bearer,
            None,
            (204, None),
            auth::logout,
        ),
        route(
            Method::GET,
            "/v1/auth/sessions",
            "My sessions",
            Bearer,
            None,
            (200, Some(s::<auth::SessionList>)),
            auth::sessions,
        ),
        route(
            Method::POST,
            "/v1/auth/sessions/revoke-others",
            "End every session but this one",
            Bearer,
            None,
            (200, Some(s::<auth::RevokedCount>)),
            auth::revoke_others,
        ),
        route(
            Method::DELETE,
            "/v1/auth/sessions/{sid}",
            "End one of my sessions",
            Bearer,
            None,
            (204, None),
            auth::revoke_session,
        ),
        route(
            Method::PUT,
            "/v1/auth/password",
            "Change my password (ends my other sessions)",
            Bearer,
            Some(s::<auth::ChangePassword>),
            (204, None),
            auth::change_password,
        ),
        route(
            Method::POST,
            "/v1/auth/password/reset",
            "Request a reset code (answers 202 either way)",
            Public,
            Some(s::<auth::ResetRequest>),
            (202, None),
            auth::request_reset,
        ),
        route(
            Method::PUT,
            "/v1/auth/password/reset",
            "Set a new password with a reset code (ends every session)",
            Public,
            Some(s::<auth::ResetConfirm>),
            (204, None),
            auth::confirm_reset,
        ),
        route(
            Method::GET,
            "/v1/users/me",
            "My profile, with an ETag",
            Bearer,
            None,
            (200, Some(s::<users::Profile>)),
            users::me,
        ),
        route(
            Method::PUT,
            "/v1/users/me",
            "Update my profile (If-Match required)",
            Bearer,
            Some(s::<users::ProfileUpdate>),
            (200, Some(s::<users::Profile>)),
            users::update_me,
        ),
        route(
            Method::DELETE,
            "/v1/users/me",
            "Delete my account (anonymised)",
            Bearer,
            Some(s::<users::DeleteAccount>),
            (204, None),
            users::delete_me,
        ),
        route(
            Method::GET,
            "/v1/users/me/addresses",
            "My addresses",
            Bearer,
            None,
            (200, Some(s::<users::AddressList>)),
            users::addresses,
        ),
        route(
            Method::POST,
            "/v1/users/me/addresses",
            "Add an address",
            Bearer,
            Some(s::<users::AddressInput>),
            (201, Some(s::<crate::identity::store::Address>)),
            users::add_address,
        ),
        route(
            Method::PUT,
            "/v1/users/me/addresses/{id}",
            "Replace an address",
            Bearer,
            Some(s::<users::AddressInput>),
            (200, Some(s::<crate::identity::store::Address>)),
            users::update_address,
        ),
        route(
            Method::DELETE,
            "/v1/users/me/addresses/{id}",
            "Delete an address",
            Bearer,
            None,
            (204, None),
            users::delete_address,
        ),
        route(
            Method::POST,
            "/v1/users/me/addresses/{id}/default",
            "Make an address the default",
            Bearer,
            None,
            (204, None),
            users::default_address,
        ),
        route(
            Method::GET,
            "/v1/users/{id}",
            "A user's public profile",
            Bearer,
            None,
            (200, Some(s::<users::PublicProfile>)),
            users::public_profile,
        ),
        route(
            Method::GET,
            "/v1/me",
            "My profile, wallet balances and unread notice count in one call",
            Bearer,
            None,
            (200, Some(s::<me::Me>)),
            me::me,
        ),
        with_query(
            route(
                Method::GET,
                "/v1/notices",
                "My inbox, newest first (page size depends on the client type)",
                Bearer,
                None,
                (200, Some(s::<notices::InboxPage>)),
                notices::list,
            ),
            &["limit", "cursor", "archived"],
        ),
        route(
            Method::GET,
            "/v1/notices/unread-count",
            "How many inbox items are unread",
            Bearer,
            None,
            (200, Some(s::<notices::UnreadCount>)),
            notices::unread_count,
        ),
        route(
            Method::GET,
            "/v1/notices/stream",
            "New inbox items as server-sent events (event: notice)",
            Bearer,
            None,
            (200, None),
            notices::stream,
        ),
        route(
            Method::POST,
            "/v1/notices/read-all",
            "Mark every inbox item read",
            Bearer,
            None,
            (204, None),
            notices::read_all,
        ),
        route(
            Method::POST,
            "/v1/notices/{id}/read",
            "Mark one inbox item read",
            Bearer,
            None,
            (204, None),
            notices::read,
        ),
        route(
            Method::POST,
            "/v1/notices/{id}/archive",
            "Archive one inbox item",
            Bearer,
            None,
            (204, None),
            notices::archive,
        ),
        route(
            Method::DELETE,
            "/v1/notices/{id}",
            "Delete one inbox item",
            Bearer,
            None,
            (204, None),
            notices::delete,
        ),
        route(
            Method::GET,
            "/v1/notices/preferences",
            "My notice preferences per category and channel",
            Bearer,
            None,
            (200, Some(s::<notices::Preferences>)),
            notices::get_preferences,
        ),
        route(
            Method::PUT,
            "/v1/notices/preferences",
            "Switch categories on or off per channel (security and money always arrive)",
            Bearer,
            Some(s::<notices::Preferences>),
            (204, None),
            notices::put_preferences,
        ),
        route(
            Method::GET,
            "/v1/cms/templates",
            "Every notice template",
            Permission("templates:write"),
            None,
            (200, Some(s::<Vec<crate::notice::store::Template>>)),
            cms::templates::list_templates,
        ),
        route(
            Method::PUT,
            "/v1/cms/templates/{key}/{channel}/{locale}",
            "Create or replace a template ({{variables}} are checked)",
            Permission("templates:write"),
            Some(s::<cms::templates::TemplateBody>),
            (204, None),
            cms::templates::put_template,
        ),
        route(
            Method::DELETE,
            "/v1/cms/templates/{key}/{channel}/{locale}",
            "Delete a template",
            Permission("templates:write"),
            None,
            (204, None),
            cms::templates::delete_template,
        ),
        with_query(
            route(
                Method::GET,
                "/v1/cms/outbox/dead",
                "Deliveries that failed too often (the dead-letter queue)",
                Permission("outbox:manage"),
                None,
                (200, Some(s::<cms::outbox::DeadPage>)),
                cms::outbox::dead_letters,
            ),
            &["limit", "cursor"],
        ),
        route(
            Method::POST,
            "/v1/cms/outbox/dead/{id}/redrive",
            "Send a dead delivery again (never a one-time code: 409 failed_precondition)",
            Permission("outbox:manage"),
            None,
            (204, None),
            cms::outbox::redrive,
        ),
        route(
            Method::POST,
            "/v1/cms/broadcasts",
            "Send a template to every user of this cell, or of one role (paced)",
            Permission("broadcast:send"),
            Some(s::<cms::broadcasts::BroadcastRequest>),
            (202, Some(s::<cms::broadcasts::BroadcastAccepted>)),
            cms::broadcasts::broadcast,
        ),
        route(
            Method::GET,
            "/v1/cms/broadcasts",
            "Recent broadcasts and their progress",
            Permission("broadcast:send"),
            None,
            (200, Some(s::<Vec<crate::notice::store::Broadcast>>)),
            cms::broadcasts::list_broadcasts,
        ),
        route(
            Method::POST,
            "/v1/cms/messages",
            "Send a message to a user of any region (delivered by the user's home cell)",
            Permission("broadcast:send"),
            Some(s::<cms::messages::MessageRequest>),
            (202, Some(s::<cms::messages::MessageSent>)),
            cms::messages::send_message,
        ),
        route(
            Method::GET,
            "/v1/wallet",
            "My balances per currency",
            Bearer,
            None,
            (200, Some(s::<wallet::Wallets>)),
            wallet::balances,
        ),
        route(
            Method::POST,
            "/v1/wallet/transfers",
            "Send money to a user of any region (header Idempotency-Key: a UUID)",
            Bearer,
            Some(s::<crate::money::service::TransferRequest>),
            (201, Some(s::<wallet::TransferAccepted>)),
            wallet::transfer,
        ),
        with_query(
            route(
                Method::GET,
                "/v1/wallet/transfers",
                "My money operations, newest first",
                Bearer,
                None,
                (200, Some(s::<wallet::TransferPage>)),
                wallet::history,
            ),
            &["limit", "cursor", "kind", "state", "currency"],
        ),
        route(
            Method::GET,
            "/v1/wallet/transfers/{id}",
            "One of my money operations, with its state",
            Bearer,
            None,
            (200, Some(s::<wallet::TransferView>)),
            wallet::get_transfer,
        ),
        route(
            Method::POST,
            "/v1/wallet/withdrawals",
            "Withdraw to the payment provider (header Idempotency-Key); 202 while the payout runs",
            Bearer,
            Some(s::<crate::money::withdrawal::WithdrawalRequest>),
            (202, Some(s::<wallet::TransferAccepted>)),
            wallet::withdraw,
        ),
        route(
            Method::POST,
            "/v1/payments/{provider}/callback",
            "A payment provider's signed deposit notification (x-homecell-signature)",
            Public,
            Some(s::<crate::money::provider::Deposit>),
            (200, Some(s::<wallet::TransferAccepted>)),
            wallet::provider_callback,
        ),
        route(
            Method::POST,
            "/v1/cms/users/{id}/wallet/adjustments",
            "Credit or debit a wallet, with a reason (header Idempotency-Key)",
            Permission("money:adjust"),
            Some(s::<crate::money::service::AdjustmentRequest>),
            (201, Some(s::<wallet::TransferAccepted>)),
            wallet::adjust,
        ),
        with_query(
            route(
                Method::GET,
                "/v1/cms/users",
                "List and search users",
                Permission("users:read"),
                None,
                (200, Some(s::<cms::users::CmsUserPage>)),
                cms::users::list_users,
            ),
            &["limit", "cursor", "q"],
        ),
        route(
            Method::GET,
            "/v1/cms/users/{id}",
            "View a user",
            Permission("users:read"),
            None,
            (200, Some(s::<cms::users::CmsUser>)),
            cms::users::get_user,
        ),
        route(
            Method::POST,
            "/v1/cms/users/{id}/disable",
            "Disable an account (ends its sessions)",
            Permission("users:disable"),
            None,
            (204, None),
            cms::users::disable_user,
        ),
        route(
            Method::POST,
            "/v1/cms/users/{id}/enable",
            "Enable an account",
            Permission("users:disable"),
            None,
            (204, None),
            cms::users::enable_user,
        ),
        route(
            Method::PUT,
            "/v1/cms/users/{id}/roles/{role}",
            "Grant a role",
            Permission("role:assign"),
            None,
            (204, None),
            cms::users::grant_role,
        ),
        route(
            Method::DELETE,
            "/v1/cms/users/{id}/roles/{role}",
            "Revoke a role",
            Permission("role:assign"),
            None,
            (204, None),
            cms::users::revoke_role,
        ),
        with_query(
            route(
                Method::GET,
                "/v1/cms/audit",
                "The audit log, newest first",
                Permission("audit:read"),
                None,
                (200, Some(s::<cms::audit::AuditPage>)),
                cms::audit::audit,
            ),
            &["limit", "cursor"],
        ),
    ]
}

async fn openapi_handler() -> axum::Json<Value> {
    axum::Json(document())
}

fn problem_schema() -> Value {
    json!({
        "type": "object",
        "required": ["type", "title", "status", "code"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"type": "string", "description": "Stable error code"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}}
        }
    })
}

/// The OpenAPI 3.1 document of the cell's API (as served through a router).
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut g = SchemaGenerator::new(settings);
    let mut paths: Map<String, Value> = Map::new();
    for r in routes() {
        let mut op = Map::new();
        op.insert("summary".into(), json!(r.summary));
        op.insert(
            "operationId".into(),
            json!(format!("{} {}", r.method, r.path)),
        );
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(r.query.iter().map(
            |q| json!({"name": q, "in": "query", "required": false, "schema": {"type": "string"}}),
        ));
        if r.path.starts_with("/v1/auth/login") {
            params.push(json!({"name": "x-client-type", "in": "header", "required": true, "schema": {"enum": ["app", "web", "mp", "cms"]}}));
        }
        if r.method == Method::PUT && r.path == "/v1/users/me" {
            params.push(json!({"name": "If-Match", "in": "header", "required": true, "schema": {"type": "string"}}));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        match r.access {
            Public => {
                op.insert("security".into(), json!([]));
            }
            Bearer => {}
            Permission(p) => {
                op.insert("x-permission".into(), json!(p));
            }
        }
        if let Some(req) = r.request {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": req(&mut g)}}}),
            );
        }
        let (status, body) = r.response;
        let mut responses = Map::new();
        let ok = match body {
            Some(f) => {
                json!({"description": "OK", "content": {"application/json": {"schema": f(&mut g)}}})
            }
            None => json!({"description": "OK"}),
        };
        responses.insert(status.to_string(), ok);
        responses.insert(
            "default".into(),
            json!({"description": "An error", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
        );
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method.as_str().to_lowercase()] = Value::Object(op);
    }
    let mut schemas = g.take_definitions(true);
    schemas.insert("Problem".into(), problem_schema());
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Homecell cell API", "version": env!("CARGO_PKG_VERSION")},
        "servers": [{"url": "/"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        },
        "security": [{"bearer": []}],
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routers_public_paths_are_exactly_these_routes() {
        let served: std::collections::BTreeSet<&str> = routes().iter().map(|r| r.path).collect();
        let public: std::collections::BTreeSet<&str> = homecell_common::paths::PUBLIC_PATHS
            .iter()
            .copied()
            .collect();
        assert_eq!(served, public, "common/src/paths.rs PUBLIC_PATHS");
    }

    #[test]
    fn every_route_is_documented_once() {
        let doc = document();
        let mut seen = std::collections::HashSet::new();
        for r in routes() {
            assert!(
                seen.insert((r.method.clone(), r.path)),
                "{} {} twice",
                r.method,
                r.path
            );
            let op = &doc["paths"][r.path][r.method.as_str().to_lowercase()];
            assert!(
                op.is_object(),
                "{} {} missing from the document",
                r.method,
                r.path
            );
            assert!(op["responses"]["default"].is_object());
        }
        // Every schema reference resolves.
        let text = doc.to_string();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling $ref {name}"
            );
        }
    }

    #[test]
    fn privileged_routes_name_a_permission() {
        for r in routes() {
            if r.path.starts_with("/v1/cms/") {
                assert!(
                    matches!(r.access, Permission(_)),
                    "{} has no permission",
                    r.path
                );
            }
        }
    }
}
