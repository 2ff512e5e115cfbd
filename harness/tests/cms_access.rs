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

/// A cms session of boss@example.com, made admin on the cell's host.
async fn admin_session(c: &homecell_harness::Cluster, api: &Api) -> Result<(Api, Value)> {
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
    api.as_client("cms").signed_in("boss@example.com", PW).await
}

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
    let (admin, _) = admin_session(&c, &api).await?;

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

#[tokio::test]
async fn a_custom_role_grants_exactly_its_permissions_from_the_next_request() -> Result<()> {
    let c = standard().start().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let (admin, _) = admin_session(&c, &api).await?;
    let (clerk, me) = api
        .as_client("cms")
        .signed_in("clerk@example.com", PW)
        .await?;
    let clerk_id = me["user_id"].as_str().context("user_id")?.to_string();

    // The catalogue, and a role from it.
    let catalogue = admin.get("/v1/cms/permissions").await?;
    assert_eq!(catalogue.status, 200, "{:?}", catalogue.body);
    assert!(
        catalogue.body["items"]
            .as_array()
            .context("items")?
            .iter()
            .any(|p| p["name"] == "audit:read")
    );
    let r = admin
        .post(
            "/v1/cms/roles",
            json!({"name": "auditor", "description": "reads the audit log", "permissions": ["audit:read"]}),
        )
        .await?;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["permissions"], json!(["audit:read"]));
    let again = admin
        .post(
            "/v1/cms/roles",
            json!({"name": "auditor", "permissions": []}),
        )
        .await?;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (409, "already_exists")
    );
    let unknown = admin
        .post(
            "/v1/cms/roles",
            json!({"name": "bad", "permissions": ["users:*"]}),
        )
        .await?;
    assert_eq!(
        (unknown.status.as_u16(), unknown.code()),
        (400, "invalid_argument")
    );

    let grant = admin
        .call(
            Method::PUT,
            &format!("/v1/cms/users/{clerk_id}/roles/auditor"),
            None,
            &[],
        )
        .await?;
    assert_eq!(grant.status, 204, "{:?}", grant.body);
    // Exactly its permission, in the same session.
    assert_eq!(clerk.get("/v1/cms/audit?limit=1").await?.status, 200);
    assert_eq!(clerk.get("/v1/cms/users?limit=1").await?.status, 403);

    // An edit counts from the next request, without signing in again.
    let edit = admin
        .call(
            Method::PUT,
            "/v1/cms/roles/auditor",
            Some(json!({"description": "reads users", "permissions": ["users:read"]})),
            &[],
        )
        .await?;
    assert_eq!(edit.status, 200, "{:?}", edit.body);
    assert_eq!(clerk.get("/v1/cms/users?limit=1").await?.status, 200);
    assert_eq!(clerk.get("/v1/cms/audit?limit=1").await?.status, 403);

    // No way up: whoever edits or grants roles reaches only what they
    // hold (else a role editor makes a role with everything and takes it).
    let lead = admin
        .post(
            "/v1/cms/roles",
            json!({"name": "lead", "permissions": ["role:assign", "role:edit", "users:read"]}),
        )
        .await?;
    assert_eq!(lead.status, 201, "{:?}", lead.body);
    let grant = admin
        .call(
            Method::PUT,
            &format!("/v1/cms/users/{clerk_id}/roles/lead"),
            None,
            &[],
        )
        .await?;
    assert_eq!(grant.status, 204);
    let refused = [
        clerk
            .post(
                "/v1/cms/roles",
                json!({"name": "everything", "permissions": ["money:adjust"]}),
            )
            .await?,
        clerk
            .call(
                Method::PUT,
                &format!("/v1/cms/users/{clerk_id}/roles/admin"),
                None,
                &[],
            )
            .await?,
        clerk
            .call(
                Method::PUT,
                "/v1/cms/roles/lead",
                Some(json!({"permissions": ["role:assign", "role:edit", "users:read", "money:adjust"]})),
                &[],
            )
            .await?,
        clerk
            .call(Method::DELETE, &format!("/v1/cms/users/{clerk_id}/roles/admin"), None, &[])
            .await?,
    ];
    for r in &refused {
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (403, "permission_denied"),
            "{:?}",
            r.body
        );
    }
    let builtin = clerk
        .call(
            Method::PUT,
            "/v1/cms/roles/user",
            Some(json!({"permissions": ["users:read"]})),
            &[],
        )
        .await?;
    assert_eq!(
        (builtin.status.as_u16(), builtin.code()),
        (403, "permission_denied"),
        "a role editor gives everyone what it holds: {:?}",
        builtin.body
    );
    let within = clerk
        .post(
            "/v1/cms/roles",
            json!({"name": "reader", "permissions": ["users:read"]}),
        )
        .await?;
    assert_eq!(
        within.status, 201,
        "within what it holds: {:?}",
        within.body
    );
    for name in ["reader", "lead"] {
        let r = admin
            .call(Method::DELETE, &format!("/v1/cms/roles/{name}"), None, &[])
            .await?;
        assert_eq!(r.status, 204);
    }

    // The user role, which every account holds (and anyone may register),
    // grants nothing; only an admin edits a built-in role.
    let everyone = admin
        .call(
            Method::PUT,
            "/v1/cms/roles/user",
            Some(json!({"permissions": ["users:read"]})),
            &[],
        )
        .await?;
    assert_eq!(
        (everyone.status.as_u16(), everyone.code()),
        (409, "failed_precondition")
    );

    // Built-in roles keep what the system needs, and stay.
    let strip = admin
        .call(
            Method::PUT,
            "/v1/cms/roles/admin",
            Some(json!({"permissions": ["users:read"]})),
            &[],
        )
        .await?;
    assert_eq!(
        (strip.status.as_u16(), strip.code()),
        (409, "failed_precondition")
    );
    assert!(
        strip.body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("role:edit")
    );
    let gone = admin
        .call(Method::DELETE, "/v1/cms/roles/support", None, &[])
        .await?;
    assert_eq!(gone.status, 409, "{:?}", gone.body);

    // Deleting the custom role takes its grant with it.
    let delete = admin
        .call(Method::DELETE, "/v1/cms/roles/auditor", None, &[])
        .await?;
    assert_eq!(delete.status, 204, "{:?}", delete.body);
    assert_eq!(clerk.get("/v1/cms/users?limit=1").await?.status, 403);
    let roles = admin.get("/v1/cms/roles").await?;
    let names: Vec<&str> = roles.body["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["admin", "support", "user"]);

    // Every change is in the audit log.
    let log = admin.get("/v1/cms/audit?limit=100").await?;
    let actions: Vec<&str> = log.body["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|e| e["target"] == "auditor")
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["role.delete", "role.update", "role.create"]);
    Ok(())
}

/// An admin deletes an account from the back office: anonymised as its
/// owner's own deletion (its sessions end, its identifier is free again),
/// audited. Whoever holds `users:delete` without being an admin cannot
/// delete an admin, and nobody deletes themselves here.
#[tokio::test]
async fn an_admin_deletes_a_user_and_the_identifier_is_free_again() -> Result<()> {
    let c = standard().start().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let (admin, me) = admin_session(&c, &api).await?;
    let admin_id = me["user_id"].as_str().context("user_id")?.to_string();
    let (victim, v) = api.signed_in("leaving@example.com", PW).await?;
    let victim_id = v["user_id"].as_str().context("user_id")?.to_string();
    assert_eq!(victim.get("/v1/users/me").await?.status, 200);

    let r = admin
        .call(
            Method::DELETE,
            &format!("/v1/cms/users/{victim_id}"),
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(
        victim.get("/v1/users/me").await?.status,
        401,
        "its session ended"
    );
    assert_eq!(api.login("leaving@example.com", PW).await?.status, 401);
    assert_eq!(
        api.register("leaving@example.com", PW).await?.status,
        201,
        "the identifier is free again"
    );
    let log = admin.get("/v1/cms/audit?limit=100").await?;
    assert!(
        log.body["items"]
            .as_array()
            .context("items")?
            .iter()
            .any(|e| e["action"] == "user.delete" && e["target"] == victim_id.as_str())
    );

    // Not oneself, not an admin (revoke first: two admins deleting each
    // other at once would leave none), and nobody holding a permission
    // the deleter lacks.
    let grant = async |who: &str, role: &str| {
        admin
            .call(
                Method::PUT,
                &format!("/v1/cms/users/{who}/roles/{role}"),
                None,
                &[],
            )
            .await
    };
    let delete = async |by: &Api, who: &str| {
        by.call(Method::DELETE, &format!("/v1/cms/users/{who}"), None, &[])
            .await
    };
    let r = delete(&admin, &admin_id).await?;
    assert_eq!((r.status.as_u16(), r.code()), (409, "failed_precondition"));
    let (_, other) = api
        .as_client("cms")
        .signed_in("deputy@example.com", PW)
        .await?;
    let deputy = other["user_id"].as_str().context("user_id")?.to_string();
    assert_eq!(grant(&deputy, "admin").await?.status, 204);
    let r = delete(&admin, &deputy).await?;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (409, "failed_precondition"),
        "an admin"
    );

    for (name, permissions) in [
        ("deleter", json!(["users:delete"])),
        ("auditor", json!(["audit:read"])),
    ] {
        let made = admin
            .post(
                "/v1/cms/roles",
                json!({"name": name, "permissions": permissions}),
            )
            .await?;
        assert_eq!(made.status, 201, "{:?}", made.body);
    }
    let (deleter, d) = api
        .as_client("cms")
        .signed_in("deleter@example.com", PW)
        .await?;
    let deleter_id = d["user_id"].as_str().context("user_id")?.to_string();
    assert_eq!(grant(&deleter_id, "deleter").await?.status, 204);
    let (_, a) = api
        .as_client("cms")
        .signed_in("auditor@example.com", PW)
        .await?;
    let auditor = a["user_id"].as_str().context("user_id")?.to_string();
    assert_eq!(grant(&auditor, "auditor").await?.status, 204);
    let r = delete(&deleter, &auditor).await?;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "permission_denied"),
        "the auditor holds audit:read, which the deleter lacks"
    );
    let (_, p) = api.signed_in("plain@example.com", PW).await?;
    let plain = p["user_id"].as_str().context("user_id")?;
    assert_eq!(
        delete(&deleter, plain).await?.status,
        204,
        "within what it holds"
    );
    assert_eq!(admin.get("/v1/cms/roles").await?.status, 200, "still in");
    Ok(())
}

/// The system's messages (auth.*: codes, security notices) are an admin's
/// to edit, and stay security messages: a back-office writer could
/// otherwise rewrite a code's message to ask for the code, or let users
/// opt out of codes.
#[tokio::test]
async fn only_an_admin_edits_the_systems_messages() -> Result<()> {
    let c = standard().start().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let (admin, _) = admin_session(&c, &api).await?;
    let (writer, me) = api
        .as_client("cms")
        .signed_in("writer@example.com", PW)
        .await?;
    let writer_id = me["user_id"].as_str().context("user_id")?.to_string();
    let r = admin
        .post(
            "/v1/cms/roles",
            json!({"name": "copywriter", "permissions": ["templates:write"]}),
        )
        .await?;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let grant = admin
        .call(
            Method::PUT,
            &format!("/v1/cms/users/{writer_id}/roles/copywriter"),
            None,
            &[],
        )
        .await?;
    assert_eq!(grant.status, 204, "{:?}", grant.body);
    let put = |who: &Api, key: &str, category: &str| {
        let who = who.clone();
        let path = format!("/v1/cms/templates/{key}/email/en");
        let body =
            json!({"category": category, "subject": "Your code", "body": "Reply with {{code}}"});
        async move { who.call(Method::PUT, &path, Some(body), &[]).await }
    };
    let r = put(&writer, "auth.password_reset", "security").await?;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (403, "permission_denied"),
        "a writer rewrote a code's message: {:?}",
        r.body
    );
    let r = writer
        .call(
            Method::DELETE,
            "/v1/cms/templates/auth.sign_in_code/email/en",
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(put(&writer, "promo.spring", "marketing").await?.status, 204);
    let r = put(&admin, "auth.password_reset", "marketing").await?;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_argument"));
    assert_eq!(
        put(&admin, "auth.password_reset", "security").await?.status,
        204
    );
    Ok(())
}
