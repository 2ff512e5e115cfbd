//! Identity end to end, through the router into real cells.
//!
//! Why one file of this length: one area's end-to-end tests share their
//! fixtures (the cluster helpers and clients above the tests), and each test
//! starts its own processes, so they stay independent.

use homecell_harness::api::Api;
use homecell_harness::smtp::SmtpSink;
use homecell_harness::{Cluster, standard};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";

async fn cluster() -> Result<(Cluster, Api, Api)> {
    cluster_with("").await
}

async fn cluster_with(cell_config: &str) -> Result<(Cluster, Api, Api)> {
    let c = standard().cell_config(cell_config).start().await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    Ok((c, cn, eu))
}

/// The reset code mailed to `to`, as it arrived at the SMTP server.
async fn reset_code(mail: &SmtpSink, to: &str) -> Result<String> {
    let m = mail
        .wait_for(to, "Your code is", Duration::from_secs(15))
        .await?;
    let at = m.find("Your code is ").unwrap() + "Your code is ".len();
    Ok(m[at..at + 6].to_string())
}

#[tokio::test]
async fn register_login_refresh_profile_logout() -> Result {
    let (_c, cn, eu) = cluster().await?;
    let r = cn.register("Alice@Example.com", PW).await?;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["home_region"], "cn-east");
    let user_id = r.body["user_id"].as_str().unwrap().to_string();

    // The identifier is taken in every region, whatever its case.
    assert_eq!(
        cn.register("alice@example.com", PW).await?.status,
        StatusCode::CONFLICT
    );
    let r = eu.register("ALICE@example.com", PW).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::CONFLICT, "already_exists")
    );
    // Nor does it say where the account lives (only a WeChat sign-in,
    // whose code proves the account is the caller's, learns that).
    assert_eq!(r.header("x-home-region"), Some("eu-west"));

    let l = cn.login("alice@example.com", PW).await?;
    assert_eq!(l.status, StatusCode::OK, "{}", l.body);
    assert_eq!(l.body["token_type"], "Bearer");
    assert_eq!(l.body["user_id"], user_id.as_str());
    assert!(l.body["expires_in"].as_i64().unwrap() <= 900);
    let me = cn.with_token(l.body["access_token"].as_str().unwrap());

    let p = me.get("/v1/users/me").await?;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.body["identifiers"][0]["value"], "alice@example.com");
    assert_eq!(p.body["roles"], json!(["user"]));
    let etag = p.header("etag").unwrap().to_string();

    // If-Match: required, checked, and the ETag moves.
    let upd = json!({"display_name": "Alice", "locale": "zh-CN"});
    let r = me
        .call(Method::PUT, "/v1/users/me", Some(upd.clone()), &[])
        .await?;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (428, "precondition_required")
    );
    let r = me
        .call(
            Method::PUT,
            "/v1/users/me",
            Some(upd.clone()),
            &[("if-match", &etag)],
        )
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["display_name"], "Alice");
    assert_ne!(r.header("etag"), Some(etag.as_str()));
    // The answer is the whole profile, as a read gives it.
    assert_eq!(r.body["roles"], json!(["user"]));
    assert_eq!(r.body["identifiers"][0]["value"], "alice@example.com");
    let again = me.get("/v1/users/me").await?;
    assert_eq!(again.header("etag"), r.header("etag"));
    let r = me
        .call(
            Method::PUT,
            "/v1/users/me",
            Some(upd),
            &[("if-match", &etag)],
        )
        .await?;
    assert_eq!((r.status.as_u16(), r.code()), (412, "precondition_failed"));

    // Public profile, from a user of another region, with that region's token.
    let (bob, _) = eu.signed_in("bob_eu", PW).await?;
    // Routed to alice's home (x-home-region), with bob's eu-west token.
    let bob_cn = Api {
        region: "cn-east".into(),
        ..bob.clone()
    };
    let r = bob_cn.get(&format!("/v1/users/{user_id}")).await?;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a cn-east cell accepts an eu-west token: {}",
        r.body
    );
    assert_eq!(r.body["display_name"], "Alice");
    assert!(
        r.body.get("identifiers").is_none(),
        "the public profile holds no identifiers"
    );

    // Refresh rotates; a reused refresh token ends the whole family.
    let r1 = l.body["refresh_token"].as_str().unwrap().to_string();
    let f = cn
        .post("/v1/auth/refresh", json!({"refresh_token": r1}))
        .await?;
    assert_eq!(f.status, StatusCode::OK, "{}", f.body);
    let r2 = f.body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r2);
    // r2 moves on to r3; r1, two behind now, is reuse.
    let f = cn
        .post("/v1/auth/refresh", json!({"refresh_token": r2}))
        .await?;
    assert_eq!(f.status, StatusCode::OK, "{}", f.body);
    let r3 = f.body["refresh_token"].as_str().unwrap().to_string();
    let reuse = cn
        .post("/v1/auth/refresh", json!({"refresh_token": r1}))
        .await?;
    assert_eq!(reuse.status, StatusCode::UNAUTHORIZED);
    let after = cn
        .post("/v1/auth/refresh", json!({"refresh_token": r3}))
        .await?;
    assert_eq!(
        after.status,
        StatusCode::UNAUTHORIZED,
        "the family is revoked"
    );
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );

    // Log in again, list sessions, log out.
    let (me, _) = cn.signed_in("alice@example.com", PW).await?;
    let s = me.get("/v1/auth/sessions").await?;
    assert_eq!(s.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(s.body["items"][0]["current"], true);
    assert_eq!(
        me.call(Method::POST, "/v1/auth/logout", None, &[])
            .await?
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );
    Ok(())
}

#[tokio::test]
async fn a_new_login_on_the_same_client_type_ends_the_old_session() -> Result {
    let (_c, cn, _) = cluster().await?;
    let (app1, _) = cn.signed_in("+8613800000001", PW).await?;
    let (web, _) = cn.as_client("web").signed_in("+8613800000001", PW).await?;
    assert_eq!(app1.get("/v1/users/me").await?.status, StatusCode::OK);
    let (app2, _) = cn.signed_in("+86 138 0000 0001", PW).await?;
    let r = app1.get("/v1/users/me").await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthenticated")
    );
    assert_eq!(app2.get("/v1/users/me").await?.status, StatusCode::OK);
    assert_eq!(
        web.get("/v1/users/me").await?.status,
        StatusCode::OK,
        "other client types are untouched"
    );
    // Revoke all others from the web session.
    let r = web
        .call(Method::POST, "/v1/auth/sessions/revoke-others", None, &[])
        .await?;
    assert_eq!(r.body["revoked"], 1);
    assert_eq!(
        app2.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );
    Ok(())
}

#[tokio::test]
async fn lockout_after_failures_and_the_same_answer_for_unknown_accounts() -> Result {
    let (c, cn, _) = cluster().await?;
    c.cli_ok(&["config", "set", "auth.lockout.max_failures", "3"])?;
    let rev = c.revision()?;
    c.wait_applied(rev, 3, Duration::from_secs(5)).await?;
    cn.register("carol", PW).await?;
    let unknown = cn.login("nobody-here", "wrong password").await?;
    let wrong = cn.login("carol", "wrong password").await?;
    assert_eq!(unknown.status, wrong.status);
    assert_eq!(unknown.body["code"], wrong.body["code"]);
    assert_eq!(unknown.body["detail"], wrong.body["detail"]);
    // A concurrent storm of wrong passwords…
    let storm =
        futures::future::join_all((0..12).map(|_| cn.login("carol", "wrong password"))).await;
    assert!(
        storm
            .iter()
            .all(|r| r.as_ref().unwrap().status == StatusCode::UNAUTHORIZED)
    );
    // …locks the account: the right password is refused too, with the same answer.
    let r = cn.login("carol", PW).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_credentials")
    );
    assert_eq!(r.body["detail"], wrong.body["detail"]);
    Ok(())
}

#[tokio::test]
async fn password_reset_by_code() -> Result {
    let mail = SmtpSink::start().await?;
    let (_c, cn, _) = cluster_with(&mail.cell_config()).await?;
    let (old, _) = cn.signed_in("dave@example.com", PW).await?;
    // 202 whether or not the account exists.
    let a = cn
        .post(
            "/v1/auth/password/reset",
            json!({"identifier": "dave@example.com"}),
        )
        .await?;
    let b = cn
        .post(
            "/v1/auth/password/reset",
            json!({"identifier": "ghost@example.com"}),
        )
        .await?;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    let code = reset_code(&mail, "dave@example.com").await?;
    assert_eq!(code.len(), 6);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let r = cn
        .call(Method::PUT, "/v1/auth/password/reset", Some(json!({"identifier": "dave@example.com", "code": wrong, "new_password": "new password 1"})), &[])
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let body =
        json!({"identifier": "dave@example.com", "code": code, "new_password": "new password 1"});
    let r = cn
        .call(
            Method::PUT,
            "/v1/auth/password/reset",
            Some(body.clone()),
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(
        old.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED,
        "every session ended"
    );
    let r = cn
        .call(Method::PUT, "/v1/auth/password/reset", Some(body), &[])
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "single use");
    assert_eq!(
        cn.login("dave@example.com", PW).await?.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        cn.login("dave@example.com", "new password 1").await?.status,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn account_deletion_anonymises_and_releases_the_identifier() -> Result {
    let (_c, cn, eu) = cluster().await?;
    let (me, login) = cn.signed_in("erin@example.com", PW).await?;
    let user_id = login["user_id"].as_str().unwrap().to_string();
    let addr = json!({"recipient": "Erin", "line1": "1 Bund", "city": "Shanghai", "country": "cn"});
    assert_eq!(
        me.post("/v1/users/me/addresses", addr).await?.status,
        StatusCode::CREATED
    );
    let r = me
        .call(
            Method::DELETE,
            "/v1/users/me",
            Some(json!({"password": "wrong one!"})),
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = me
        .call(
            Method::DELETE,
            "/v1/users/me",
            Some(json!({"password": PW})),
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        cn.login("erin@example.com", PW).await?.status,
        StatusCode::UNAUTHORIZED
    );
    let (other, _) = cn.signed_in("frank@example.com", PW).await?;
    assert_eq!(
        other.get(&format!("/v1/users/{user_id}")).await?.status,
        StatusCode::NOT_FOUND
    );
    // The identifier is free again, in any region.
    assert_eq!(
        eu.register("erin@example.com", PW).await?.status,
        StatusCode::CREATED
    );
    Ok(())
}

#[tokio::test]
async fn addresses_are_bounded_and_have_one_default() -> Result {
    let (_c, cn, _) = cluster().await?;
    let (me, _) = cn.signed_in("gina", PW).await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = me
            .post("/v1/users/me/addresses", json!({"recipient": format!("G{i}"), "line1": "x", "city": "y", "country": "DE", "is_default": i == 3}))
            .await?;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    let r = me
        .post(
            "/v1/users/me/addresses",
            json!({"recipient": "x", "line1": "x", "city": "y", "country": "DE"}),
        )
        .await?;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let bad = me
        .post(
            "/v1/users/me/addresses",
            json!({"recipient": "", "line1": "x", "city": "y", "country": "XX"}),
        )
        .await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> = bad.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["recipient", "country"]);
    let list = me.get("/v1/users/me/addresses").await?;
    let defaults: Vec<_> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["is_default"] == true)
        .collect();
    assert_eq!(defaults.len(), 1);
    assert_eq!(defaults[0]["id"], ids[3].as_str());
    let r = me
        .call(
            Method::POST,
            &format!("/v1/users/me/addresses/{}/default", ids[7]),
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = me
        .call(
            Method::PUT,
            &format!("/v1/users/me/addresses/{}", ids[0]),
            Some(json!({"recipient": "New", "line1": "z", "city": "y", "country": "FR"})),
            &[],
        )
        .await?;
    assert_eq!(
        (r.status, r.body["country"].as_str()),
        (StatusCode::OK, Some("FR"))
    );
    assert_eq!(
        me.call(
            Method::DELETE,
            &format!("/v1/users/me/addresses/{}", ids[0]),
            None,
            &[]
        )
        .await?
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        me.call(
            Method::DELETE,
            &format!("/v1/users/me/addresses/{}", ids[0]),
            None,
            &[]
        )
        .await?
        .status,
        StatusCode::NOT_FOUND
    );
    Ok(())
}

#[tokio::test]
async fn rbac_and_cms() -> Result {
    let (c, cn, _) = cluster().await?;
    let (_, henry) = cn.signed_in("henry@example.com", PW).await?;
    let henry_id = henry["user_id"].as_str().unwrap().to_string();
    let (plain_cms, _) = cn.as_client("cms").signed_in("ivy@example.com", PW).await?;
    let r = plain_cms.get("/v1/cms/users").await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "permission_denied")
    );

    // The first admin is made on the cell host.
    let out = c.cell_command(
        "cn-east",
        &[
            "grant-role",
            "--identifier",
            "IVY@example.com",
            "--role",
            "admin",
        ],
    )?;
    assert!(out.success, "{}", out.stderr);
    let (admin, _) = cn.as_client("cms").signed_in("ivy@example.com", PW).await?;
    let (admin_app, _) = cn.signed_in("ivy@example.com", PW).await?;
    assert_eq!(
        admin_app.get("/v1/cms/users").await?.status,
        StatusCode::FORBIDDEN,
        "CMS needs a cms session"
    );

    let page = admin.get("/v1/cms/users?limit=1").await?;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(page.body["items"].as_array().unwrap().len(), 1);
    let next = page.body["next_cursor"].as_str().unwrap();
    let page2 = admin
        .get(&format!("/v1/cms/users?limit=1&cursor={next}"))
        .await?;
    assert_ne!(page2.body["items"][0]["id"], page.body["items"][0]["id"]);
    let found = admin.get("/v1/cms/users?q=henry@example.com").await?;
    assert_eq!(found.body["items"][0]["id"], henry_id.as_str());
    assert_eq!(found.body["items"][0]["roles"], json!(["user"]));
    assert_eq!(
        admin.get("/v1/cms/users?cursor=%%%").await?.status,
        StatusCode::BAD_REQUEST
    );

    // Disable ends the user's sessions; enable lets them back in.
    let (henry_app, _) = cn.signed_in("henry@example.com", PW).await?;
    let r = admin
        .call(
            Method::POST,
            &format!("/v1/cms/users/{henry_id}/disable"),
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        henry_app.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );
    let r = cn.login("henry@example.com", PW).await?;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "account_disabled")
    );
    admin
        .call(
            Method::POST,
            &format!("/v1/cms/users/{henry_id}/enable"),
            None,
            &[],
        )
        .await?;
    assert_eq!(
        cn.login("henry@example.com", PW).await?.status,
        StatusCode::OK
    );

    // Roles: support may read users but not assign roles; revocation bites at once.
    let r = admin
        .call(
            Method::PUT,
            &format!("/v1/cms/users/{henry_id}/roles/support"),
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // The page and the single view carry the roles as they are now.
    let found = admin.get("/v1/cms/users?q=henry@example.com").await?;
    assert_eq!(found.body["items"][0]["roles"], json!(["support", "user"]));
    let one = admin.get(&format!("/v1/cms/users/{henry_id}")).await?;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert_eq!(one.body["roles"], json!(["support", "user"]));
    let (support, _) = cn
        .as_client("cms")
        .signed_in("henry@example.com", PW)
        .await?;
    assert_eq!(support.get("/v1/cms/users").await?.status, StatusCode::OK);
    let r = support
        .call(
            Method::PUT,
            &format!("/v1/cms/users/{henry_id}/roles/admin"),
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        support.get("/v1/cms/audit").await?.status,
        StatusCode::FORBIDDEN
    );
    admin
        .call(
            Method::DELETE,
            &format!("/v1/cms/users/{henry_id}/roles/support"),
            None,
            &[],
        )
        .await?;
    assert_eq!(
        support.get("/v1/cms/users").await?.status,
        StatusCode::FORBIDDEN
    );
    let r = admin
        .call(
            Method::PUT,
            &format!("/v1/cms/users/{henry_id}/roles/overlord"),
            None,
            &[],
        )
        .await?;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let audit = admin.get("/v1/cms/audit").await?;
    let actions: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for want in ["user.disable", "user.enable", "role.grant", "role.revoke"] {
        assert!(actions.contains(&want), "{want} not audited: {actions:?}");
    }
    Ok(())
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid_and_publishes_the_new_key() -> Result {
    let (c, cn, eu) = cluster().await?;
    let (before, _) = cn.signed_in("kim", PW).await?;
    let jwks = cn.get("/.well-known/jwks.json").await?;
    let kids_before: Vec<String> = jwks.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kids_before.len(), 1);
    let out = c.cell_command("cn-east", &["rotate-keys"])?;
    assert!(out.success, "{}", out.stderr);
    // Within seconds the cell signs with the new key, and publishes both.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = c
            .cli_ok(&["-o", "json", "region", "show", "cn-east"])?
            .json()?;
        if v["signing_keys"].as_array().map_or(0, |k| k.len()) == 2 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "new key not published: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (after, login) = cn.as_client("web").signed_in("kim", PW).await?;
    let header = login["access_token"]
        .as_str()
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .to_string();
    let header: serde_json::Value = serde_json::from_slice(&base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        header,
    )?)?;
    assert!(
        !kids_before.contains(&header["kid"].as_str().unwrap().to_string()),
        "still signing with the old key"
    );
    assert_eq!(
        before.get("/v1/users/me").await?.status,
        StatusCode::OK,
        "old tokens verify until they expire"
    );
    assert_eq!(after.get("/v1/users/me").await?.status, StatusCode::OK);
    // Another region's cell verifies the new key from region metadata.
    let kim_id = login["user_id"].as_str().unwrap();
    let (lee, _) = eu.signed_in("lee", PW).await?;
    let lee_id = lee.get("/v1/users/me").await?.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cross = Api {
        region: "eu-west".into(),
        ..after.clone()
    };
    assert_eq!(
        cross.get(&format!("/v1/users/{lee_id}")).await?.status,
        StatusCode::OK
    );
    let lee_cn = Api {
        region: "cn-east".into(),
        ..lee.clone()
    };
    assert_eq!(
        lee_cn.get(&format!("/v1/users/{kim_id}")).await?.status,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn forged_and_broken_tokens_are_refused() -> Result {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let (_c, cn, _) = cluster().await?;
    let (me, login) = cn.signed_in("mia", PW).await?;
    let token = login["access_token"].as_str().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let claims: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1])?)?;
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(parts[0])?)?;
    let kid = header["kid"].as_str().unwrap();
    let enc = |v: &serde_json::Value| B64.encode(serde_json::to_vec(v).unwrap());

    let mut forged = Vec::new();
    // alg: none
    forged.push(format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "kid": kid})),
        parts[1]
    ));
    // HS256 keyed with the cell's public key (the classic confusion).
    let jwks = cn.get("/.well-known/jwks.json").await?;
    let x = B64.decode(jwks.body["keys"][0]["x"].as_str().unwrap())?;
    let hs_input = format!("{}.{}", enc(&json!({"alg": "HS256", "kid": kid})), parts[1]);
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &x),
        hs_input.as_bytes(),
    );
    forged.push(format!("{hs_input}.{}", B64.encode(mac.as_ref())));
    // Tampered claims (an admin role) under the original signature.
    let mut admin = claims.clone();
    admin["roles"] = json!(["admin"]);
    forged.push(format!("{}.{}.{}", parts[0], enc(&admin), parts[2]));
    // Expired, re-signed by a key nobody published (unknown kid).
    let other = ring::signature::Ed25519KeyPair::from_pkcs8(
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    let sign = |h: serde_json::Value, c: serde_json::Value| {
        let input = format!("{}.{}", enc(&h), enc(&c));
        let sig = other.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.as_ref()))
    };
    forged.push(sign(
        json!({"alg": "EdDSA", "kid": "rogue"}),
        claims.clone(),
    ));
    // The real kid, but signed by another key.
    forged.push(sign(json!({"alg": "EdDSA", "kid": kid}), claims.clone()));
    // Unknown issuer under an unknown key.
    let mut iss = claims.clone();
    iss["iss"] = json!("cell.evil");
    forged.push(sign(json!({"alg": "EdDSA", "kid": "evil-1"}), iss));
    let mut expired = claims.clone();
    expired["exp"] = json!(1);
    forged.push(format!("{}.{}.{}", parts[0], enc(&expired), parts[2]));
    forged.push("not-a-jwt".into());
    forged.push(format!("{token}x"));

    for f in &forged {
        let r = me.with_token(f).get("/v1/users/me").await?;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNAUTHORIZED, "unauthenticated"),
            "accepted: {f}"
        );
    }
    assert_eq!(
        me.get("/v1/users/me").await?.status,
        StatusCode::OK,
        "the genuine token still works"
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() -> Result {
    let (_c, cn, _) = cluster().await?;
    // Validation names the fields.
    let r = cn
        .post(
            "/v1/auth/register",
            json!({"identifier": "not an email@", "password": "short"}),
        )
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["identifier", "password"]);
    // Unknown and mistyped fields.
    let r = cn
        .post(
            "/v1/auth/register",
            json!({"identifier": "nina", "password": PW, "admin": true}),
        )
        .await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = cn
        .post(
            "/v1/auth/register",
            json!({"identifier": 42, "password": PW}),
        )
        .await?;
    assert_eq!(
        (r.status, r.body["errors"][0]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("identifier"))
    );
    // Injection-shaped strings are refused or stored as plain data.
    for hostile in [
        "' OR '1'='1",
        "robert'); DROP TABLE users;--",
        "<script>alert(1)</script>",
        "${jndi:ldap://x}",
        "../../etc/passwd",
        "\u{0000}",
    ] {
        let r = cn.register(hostile, PW).await?;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{hostile:?}: {}", r.body);
        let r = cn.login(hostile, PW).await?;
        assert!(r.status.is_client_error(), "{hostile:?}");
    }
    let r = cn.post("/v1/auth/register", json!({"identifier": "oscar", "password": PW, "display_name": "<b>'; DROP TABLE users;--</b>"})).await?;
    assert_eq!(r.status, StatusCode::CREATED);
    let (me, _) = cn.signed_in("oscar", PW).await?;
    assert_eq!(
        me.get("/v1/users/me").await?.body["display_name"],
        "<b>'; DROP TABLE users;--</b>"
    );
    // Oversize body, wrong content type, malformed JSON.
    let big = "x".repeat(70 * 1024);
    let r = cn
        .post(
            "/v1/auth/register",
            json!({"identifier": "p", "password": big}),
        )
        .await?;
    assert_eq!((r.status.as_u16(), r.code()), (413, "payload_too_large"));
    let r = cn
        .http
        .post(format!("{}/v1/auth/login", cn.base))
        .header("x-home-region", "cn-east")
        .header("x-client-type", "app")
        .header("content-type", "text/plain")
        .body("identifier=oscar")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 415);
    let r = cn
        .http
        .post(format!("{}/v1/auth/login", cn.base))
        .header("x-home-region", "cn-east")
        .header("x-client-type", "app")
        .header("content-type", "application/json")
        .body("{\"identifier\": ")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    // A missing or unknown client type.
    let r = cn.as_client("tv").login("oscar", PW).await?;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Unknown routes and the OpenAPI document.
    assert_eq!(cn.get("/v1/nope").await?.status, StatusCode::NOT_FOUND);
    let doc = cn.get("/v1/openapi.json").await?;
    assert_eq!(doc.body["openapi"], "3.1.0");
    assert!(doc.body["paths"]["/v1/auth/login"]["post"].is_object());
    Ok(())
}

#[tokio::test]
async fn an_ended_session_is_refused_by_other_cells_within_five_seconds() -> Result {
    let (_c, cn, eu) = cluster().await?;
    let (target, login) = cn.signed_in("quinn", PW).await?;
    let quinn_id = login["user_id"].as_str().unwrap().to_string();
    let _ = target;
    let (old, _) = eu.signed_in("rosa", PW).await?;
    // rosa's eu-west token, used at the cn-east cell.
    let old_at_cn = Api {
        region: "cn-east".into(),
        ..old.clone()
    };
    assert_eq!(
        old_at_cn
            .get(&format!("/v1/users/{quinn_id}"))
            .await?
            .status,
        StatusCode::OK
    );
    // A new login on the same client type ends the old session at home…
    eu.signed_in("rosa", PW).await?;
    let ended = std::time::Instant::now();
    assert_eq!(
        old.get("/v1/users/me").await?.status,
        StatusCode::UNAUTHORIZED
    );
    // …and at the other cell within 5 seconds.
    loop {
        let r = old_at_cn.get(&format!("/v1/users/{quinn_id}")).await?;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(5),
            "still accepted after {:?}",
            ended.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
