//! Every route that names a permission in the route table is guarded by
//! the layer the table applies (cell/src/http/permission.rs), whatever its
//! handler does: read from the OpenAPI document the cells serve (its
//! `x-permission`), each such route refuses a caller without a token
//! (401), a user's app session (403) and a cms session of a user without
//! the permission (403), and lets an admin's cms session through.

use anyhow::{Context, Result};
use homecell_harness::api::Api;
use homecell_harness::standard;
use reqwest::Method;
use serde_json::{Value, json};

const PW: &str = "correct horse battery";

#[tokio::test]
async fn every_route_that_names_a_permission_refuses_whoever_lacks_it() -> Result<()> {
    let c = standard().start().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let doc = api.get("/v1/openapi.json").await?.body;
    let mut guarded = Vec::new();
    for (path, ops) in doc["paths"].as_object().context("paths")? {
        for (method, op) in ops.as_object().context("operations")? {
            if let Some(p) = op.get("x-permission").and_then(Value::as_str) {
                guarded.push((method.to_uppercase(), path.clone(), p.to_string()));
            }
        }
    }
    assert!(guarded.len() >= 15, "only {} guarded routes", guarded.len());

    let (user, _) = api.signed_in("plain@example.com", PW).await?;
    let (staff, _) = api
        .as_client("cms")
        .signed_in("staff@example.com", PW)
        .await?;
    api.register("boss@example.com", PW).await?;
    let out = c.cell_command(
        "cn-east",
        &[
            "grant-role",
            "--identifier",
            "boss@example.com",
            "--role",
            "admin",
        ],
    )?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let (admin, _) = api
        .as_client("cms")
        .signed_in("boss@example.com", PW)
        .await?;

    for (method, template, permission) in &guarded {
        // Any value for the path's parameters: the refusal comes first.
        let path = template
            .split('/')
            .map(|s| if s.starts_with('{') { "x1" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.as_bytes())?;
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        let what = format!("{method} {template} ({permission})");
        let call = async |who: &Api| who.call(method.clone(), &path, body.clone(), &[]).await;
        assert_eq!(call(&api).await?.status, 401, "no token: {what}");
        assert_eq!(call(&user).await?.status, 403, "an app session: {what}");
        let r = call(&staff).await?;
        assert_eq!(r.status, 403, "a cms session without it: {what}");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap_or("")
                .contains(permission.as_str()),
            "the refusal names {permission}: {:?}",
            r.body
        );
        let r = call(&admin).await?;
        assert!(
            ![401, 403].contains(&r.status.as_u16()),
            "an admin is let through {what}: {} {:?}",
            r.status,
            r.body
        );
    }
    Ok(())
}
