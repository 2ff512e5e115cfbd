//! The route table: every route with its method, path, access rule and
//! request/response types, built per area (`auth.rs`, `users.rs`,
//! `cms/users.rs`, … each export `routes()`) with the small builder below.
//! The router is built from it, with the access rule applied as a layer
//! (`http::router`, `permission.rs`), and so is the OpenAPI 3.1 document,
//! so the three cannot disagree.

use super::{auth, cms, identifiers, me, notices, region, users, wallet};
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
    /// Required request headers, with the values they may take (any, when
    /// none are listed).
    pub headers: Vec<(&'static str, &'static [&'static str])>,
    pub request: Option<SchemaFn>,
    pub response: (u16, Option<SchemaFn>),
    /// Another success answer (a registration that waits for a code: 202).
    pub also: Option<(u16, SchemaFn)>,
    pub handler: MethodRouter<Arc<Cell>>,
}

/// The builder: `Route::put("/v1/users/me", update_me).summary(…)
/// .body::<ProfileUpdate>().returns::<Profile>(200).header("If-Match", &[])`.
/// A route is `Bearer` and answers 200 with no body unless it says
/// otherwise.
impl Route {
    fn new<H, T>(method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<Cell>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        Self {
            method,
            path,
            summary: "",
            access: Access::Bearer,
            query: &[],
            headers: Vec::new(),
            request: None,
            response: (200, None),
            also: None,
            handler: on(filter, handler),
        }
    }

    pub fn get<H: Handler<T, Arc<Cell>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self::new(Method::GET, path, handler)
    }

    pub fn post<H: Handler<T, Arc<Cell>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self::new(Method::POST, path, handler)
    }

    pub fn put<H: Handler<T, Arc<Cell>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self::new(Method::PUT, path, handler)
    }

    pub fn delete<H: Handler<T, Arc<Cell>>, T: 'static>(path: &'static str, handler: H) -> Self {
        Self::new(Method::DELETE, path, handler)
    }

    pub fn summary(mut self, summary: &'static str) -> Self {
        self.summary = summary;
        self
    }

    /// Anyone, without a token.
    pub fn public(mut self) -> Self {
        self.access = Access::Public;
        self
    }

    /// A `cms` session whose user holds `permission` (checked by a layer).
    pub fn permission(mut self, permission: &'static str) -> Self {
        self.access = Access::Permission(permission);
        self
    }

    /// The JSON request body.
    pub fn body<T: JsonSchema>(mut self) -> Self {
        self.request = Some(s::<T>);
        self
    }

    /// The success status and its JSON body.
    pub fn returns<T: JsonSchema>(mut self, status: u16) -> Self {
        self.response = (status, Some(s::<T>));
        self
    }

    /// Another success status and its JSON body.
    pub fn also_returns<T: JsonSchema>(mut self, status: u16) -> Self {
        self.also = Some((status, s::<T>));
        self
    }

    /// The success status, with no body.
    pub fn answers(mut self, status: u16) -> Self {
        self.response = (status, None);
        self
    }

    pub fn query(mut self, names: &'static [&'static str]) -> Self {
        self.query = names;
        self
    }

    /// A header the route requires, and the values it takes (any if none).
    pub fn header(mut self, name: &'static str, values: &'static [&'static str]) -> Self {
        self.headers.push((name, values));
        self
    }
}

use Access::*;

/// Every route of the cell's public API.
pub fn routes() -> Vec<Route> {
    let mut all = vec![
        Route::get("/v1/openapi.json", openapi_handler)
            .summary("This document")
            .public(),
    ];
    all.extend(region::routes());
    all.extend(auth::routes());
    all.extend(users::routes());
    all.extend(identifiers::routes());
    all.extend(me::routes());
    all.extend(notices::routes());
    all.extend(wallet::routes());
    all.extend(cms::routes());
    all
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
        params.extend(r.headers.iter().map(|(name, values)| {
            let schema = if values.is_empty() {
                json!({"type": "string"})
            } else {
                json!({"enum": values})
            };
            json!({"name": name, "in": "header", "required": true, "schema": schema})
        }));
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
        if let Some((status, f)) = r.also {
            responses.insert(
                status.to_string(),
                json!({"description": "OK", "content": {"application/json": {"schema": f(&mut g)}}}),
            );
        }
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

    /// A role can be given every permission a route asks for, and the
    /// catalogue lists nothing no route asks for.
    #[test]
    fn routes_and_the_permission_catalogue_agree() {
        let asked: std::collections::BTreeSet<&str> = routes()
            .iter()
            .filter_map(|r| match r.access {
                Permission(p) => Some(p),
                _ => None,
            })
            .collect();
        let catalogue: std::collections::BTreeSet<&str> = crate::identity::roles::PERMISSIONS
            .iter()
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(asked, catalogue, "identity/roles.rs PERMISSIONS");
    }
}
