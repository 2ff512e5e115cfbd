//! A moved user: the directory re-homes it (the source cell's `MoveUser`),
//! routers with a current directory send its requests to the new home at
//! once, and a router with a stale one is answered "moved" by the old home
//! and replays the request there once, saying so.

use anyhow::{Context, Result};
use homecell_common::tls::PeerIdentity;
use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use homecell_proto::control::MoveUserRequest;
use homecell_proto::control::directory_service_client::DirectoryServiceClient;
use std::time::{Duration, Instant};

const PW: &str = "correct horse battery";

/// The directory step of a move, as the source cell calls it.
async fn move_user(c: &Cluster, as_cell: &str, req: MoveUserRequest) -> Result<tonic::Code> {
    let channel = c
        .control_plane_as(&PeerIdentity::Cell {
            region: as_cell.into(),
        })
        .await?;
    Ok(
        match DirectoryServiceClient::new(channel).move_user(req).await {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        },
    )
}

/// Waits until the process behind `admin` has applied `revision`.
async fn until_applied(c: &Cluster, admin: std::net::SocketAddr, revision: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = format!("homecell_replica_revision {revision}");
    loop {
        let m = c
            .http()
            .get(format!("http://{admin}/metrics"))
            .send()
            .await?;
        if m.text().await?.contains(&want) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{admin} is behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_moved_users_requests_reach_the_new_home_once() -> Result<()> {
    let mut c = standard().start().await?;
    let api = Api::new(&c.router_url(0), "cn-east");
    let (_, login) = api.signed_in("mover@example.com", PW).await?;
    let token = login["access_token"].as_str().context("token")?.to_string();
    let user = login["user_id"].as_str().context("user")?.to_string();

    // A second router learns the user, then stops with that directory saved.
    let stale = c.start_router("eu-west", "eu-west").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    until_applied(&c, c.routers[stale].admin, c.revision()?).await?;
    if let Some(mut p) = c.routers[stale].process.take() {
        p.terminate(Duration::from_secs(5));
    }

    let req = |from: &str, to: &str, identifiers: &[&str]| MoveUserRequest {
        user_id: user.clone(),
        from_region: from.into(),
        to_region: to.into(),
        identifiers: identifiers.iter().map(|s| s.to_string()).collect(),
    };
    // Only the source cell may move its user, and only with identifiers it holds.
    let before = c.revision()?;
    for (as_cell, from, to, id, want) in [
        // Another cell, for a user it does not home.
        (
            "eu-west",
            "cn-east",
            "eu-west",
            "email:mover@example.com",
            tonic::Code::PermissionDenied,
        ),
        // The home cell, naming an identifier the user does not hold.
        (
            "cn-east",
            "cn-east",
            "eu-west",
            "email:someone@example.com",
            tonic::Code::PermissionDenied,
        ),
        // A cell acting for itself, for a user homed elsewhere.
        (
            "eu-west",
            "eu-west",
            "cn-east",
            "email:mover@example.com",
            tonic::Code::FailedPrecondition,
        ),
    ] {
        assert_eq!(
            move_user(&c, as_cell, req(from, to, &[id])).await?,
            want,
            "{as_cell}: {from} -> {to}, {id}"
        );
    }
    assert_eq!(c.revision()?, before, "refused moves change nothing");
    assert_eq!(
        move_user(
            &c,
            "cn-east",
            req("cn-east", "eu-west", &["email:mover@example.com"])
        )
        .await?,
        tonic::Code::Ok
    );
    let moved = c.revision()?;
    for admin in [
        c.routers[0].admin,
        c.cells["cn-east"].admin,
        c.cells["eu-west"].admin,
    ] {
        until_applied(&c, admin, moved).await?;
    }

    let http = c.http().clone();
    let get = |url: String| {
        http.get(format!("{url}/v1/users/me"))
            .bearer_auth(&token)
            .header("x-client-type", "app")
            .send()
    };
    // A current router: straight to the new home by the directory, although
    // the token still names cn-east.
    let r = get(c.router_url(0)).await?;
    assert_eq!(r.headers()["x-home-region"], "eu-west");
    assert!(r.headers().get("x-homecell-replayed-from").is_none());

    // A stale router (the control plane down, so it keeps the old map):
    // cn-east answers "moved", the router replays to eu-west once.
    c.stop_control_plane();
    c.restart_router(stale, "eu-west").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    let r = get(c.router_url(stale)).await?;
    assert_eq!(r.headers()["x-home-region"], "eu-west");
    assert_eq!(r.headers()["x-homecell-replayed-from"], "cn-east");
    // With a body too (it fit the retry buffer, so it is sent again whole).
    let r = c
        .http()
        .put(format!("{}/v1/users/me", c.router_url(stale)))
        .bearer_auth(&token)
        .header("x-client-type", "app")
        .header("if-match", "\"1\"")
        .json(&serde_json::json!({"display_name": "Moved"}))
        .send()
        .await?;
    assert_eq!(r.headers()["x-homecell-replayed-from"], "cn-east");
    assert_ne!(r.status(), 421);
    // A path about the user (no token needed to be routed by it).
    let r = c
        .http()
        .get(format!("{}/v1/users/{user}", c.router_url(stale)))
        .bearer_auth(&token)
        .header("x-client-type", "app")
        .send()
        .await?;
    assert_eq!(r.headers()["x-home-region"], "eu-west");
    assert_eq!(r.headers()["x-homecell-replayed-from"], "cn-east");
    let m = c.router_metrics(stale).await?;
    assert!(
        m.contains("homecell_router_replays_total{from=\"cn-east\",to=\"eu-west\"} 3"),
        "{m}"
    );
    Ok(())
}

const PAY_SECRET: &str = "testpay-shared-secret-0123456789";

/// The whole move, as an operator runs it on the old home's host:
/// `cell move-user` freezes the account, copies it to the new home, re-homes
/// it in the directory and erases it here. Refusals change nothing.
#[tokio::test]
async fn cell_move_user_carries_the_account_to_the_new_home() -> Result<()> {
    use reqwest::{Method, StatusCode};
    use serde_json::json;
    let c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {PAY_SECRET:?}\n"))
        .start()
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");

    // A user with a profile, an address and a notice preference.
    let (me, login) = east.signed_in("traveller@example.com", PW).await?;
    let user = login["user_id"].as_str().context("user")?.to_string();
    let profile = me.get("/v1/users/me").await?;
    let etag = profile.header("etag").context("etag")?.to_string();
    let r = me
        .call(
            Method::PUT,
            "/v1/users/me",
            Some(json!({"display_name": "Traveller"})),
            &[("if-match", &etag)],
        )
        .await?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let addr = json!({"recipient": "T", "line1": "1 Rue", "city": "Paris", "country": "FR", "is_default": true});
    assert_eq!(
        me.post("/v1/users/me/addresses", addr).await?.status,
        StatusCode::CREATED
    );
    let prefs =
        json!({"preferences": [{"category": "message", "channel": "inbox", "enabled": false}]});
    let r = me
        .call(Method::PUT, "/v1/notices/preferences", Some(prefs), &[])
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);

    // Refusals: a user holding money, an unknown region, an unknown user.
    let (rich, rich_login) = east.signed_in("rich@example.com", PW).await?;
    let rich_id = rich_login["user_id"].as_str().context("user")?.to_string();
    let r = east
        .provider_deposit("testpay", PAY_SECRET, "evt-move-1", &rich_id, 500)
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    let before = c.revision()?;
    for (who, to, why) in [
        (rich_id.as_str(), "eu-west", "holds money"),
        (user.as_str(), "nowhere", "no region"),
        (
            "0190b5a0-0000-7000-8000-000000000000",
            "eu-west",
            "no such user",
        ),
        (user.as_str(), "cn-east", "already lives here"),
    ] {
        let out = c.cell_command("cn-east", &["move-user", "--user", who, "--to", to])?;
        assert!(!out.success, "moving {who} to {to} should fail");
        assert!(out.stderr.contains(why), "{why}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    }
    assert_eq!(c.revision()?, before, "refusals change nothing");
    assert_eq!(rich.get("/v1/users/me").await?.status, StatusCode::OK);
    assert_eq!(me.get("/v1/users/me").await?.status, StatusCode::OK);

    // An admin of cn-east: the role stays with the region that gave it.
    let out = c.cell_command(
        "cn-east",
        &[
            "grant-role",
            "--identifier",
            "traveller@example.com",
            "--role",
            "admin",
        ],
    )?;
    assert!(out.success, "{}", out.stderr);

    // The move.
    let out = c.cell_command(
        "cn-east",
        &["move-user", "--user", &user, "--to", "eu-west"],
    )?;
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("moved to eu-west"), "{}", out.stdout);

    // The old session ended with the move.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = me.get("/v1/users/me").await?;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "old token still works: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Signing in again, through the same router, reaches the new home,
    // which holds the whole account.
    let (again, login) = east.signed_in("traveller@example.com", PW).await?;
    assert_eq!(login["user_id"], user.as_str());
    let profile = again.get("/v1/users/me").await?;
    assert_eq!(profile.status, StatusCode::OK, "{}", profile.body);
    assert_eq!(profile.header("x-home-region"), Some("eu-west"));
    assert_eq!(profile.body["display_name"], "Traveller");
    let addresses = again.get("/v1/users/me/addresses").await?;
    assert_eq!(
        addresses.body["items"][0]["city"], "Paris",
        "{}",
        addresses.body
    );
    let prefs = again.get("/v1/notices/preferences").await?;
    assert!(
        prefs.body.to_string().contains("\"enabled\":false"),
        "{}",
        prefs.body
    );
    // No role came along: an imported admin would be a way for a cell to
    // mint admins in another region.
    let cms = east
        .as_client("cms")
        .signed_in("traveller@example.com", PW)
        .await?
        .0;
    let r = cms.get("/v1/cms/outbox/dead").await?;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // A deposit that reaches the old home (a provider's callback names no
    // region; cn-east is the default) is forwarded to the new one, not
    // refused: money arriving during or after a move is not stranded.
    let r = east
        .provider_deposit("testpay", PAY_SECRET, "evt-after-move", &user, 300)
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    assert_eq!(again.available("CNY").await?, 300);

    // Running it again finds the move done and succeeds without a change.
    let revision = c.revision()?;
    let out = c.cell_command(
        "cn-east",
        &["move-user", "--user", &user, "--to", "eu-west"],
    )?;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(c.revision()?, revision);

    // The money-holding user was never touched.
    assert_eq!(rich.available("CNY").await?, 500);
    Ok(())
}
