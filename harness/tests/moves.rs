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

/// Signs in, with a deposit, a transfer to a neighbour and an inbox item:
/// a user whose move has something of every kind to carry.
pub async fn a_full_account(
    api: &Api,
    email: &str,
    deposit_event: &str,
) -> Result<(Api, serde_json::Value)> {
    use reqwest::{Method, StatusCode};
    use serde_json::json;
    let (me, login) = api.signed_in(email, PW).await?;
    let user = login["user_id"].as_str().context("user")?.to_string();
    let etag = me
        .get("/v1/users/me")
        .await?
        .header("etag")
        .context("etag")?
        .to_string();
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
    let r = api
        .provider_deposit("testpay", PAY_SECRET, deposit_event, &user, 500)
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    Ok((me, login))
}

/// The money a user holds and sees: (available, history length).
async fn money_view(me: &Api) -> Result<(i64, usize)> {
    let history = me.get("/v1/wallet/transfers").await?;
    anyhow::ensure!(history.status == reqwest::StatusCode::OK, "{history:?}");
    Ok((
        me.available("CNY").await?,
        history.body["items"].as_array().map_or(0, Vec::len),
    ))
}

/// The whole move, as an operator runs it from the control-plane CLI: the
/// account, its money, its history and its sessions reach the new home;
/// the user stays signed in; the audit holds at both ends; and a reversal
/// brings everything back. Refusals change nothing.
#[tokio::test]
async fn a_move_carries_the_account_its_money_and_its_sessions() -> Result<()> {
    use reqwest::StatusCode;
    use serde_json::json;
    let c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {PAY_SECRET:?}\n"))
        .start()
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let (me, login) = a_full_account(&east, "traveller@example.com", "evt-move-1").await?;
    let user = login["user_id"].as_str().context("user")?.to_string();
    let refresh = login["refresh_token"]
        .as_str()
        .context("refresh")?
        .to_string();
    let (_, friend_login) = east.signed_in("friend@example.com", PW).await?;
    let friend = friend_login["user_id"]
        .as_str()
        .context("friend")?
        .to_string();
    let key = "6f1c1d2e-0000-4000-8000-000000000001";
    let r = me
        .transfer(
            key,
            json!({"to_user_id": friend, "amount": 120, "currency": "CNY"}),
        )
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    let before = money_view(&me).await?;
    assert_eq!(before, (380, 2));

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

    // Refusals: an unknown region, an unknown user, the user's own region.
    let revision = c.revision()?;
    for (who, to, why) in [
        (user.as_str(), "nowhere", "does not exist"),
        (
            "0190b5a0-0000-7000-8000-000000000000",
            "eu-west",
            "no such user",
        ),
        (user.as_str(), "cn-east", "already lives in cn-east"),
    ] {
        let out = c.cli(&["move", "user", who, "--to", to])?;
        assert!(!out.success, "moving {who} to {to} should fail");
        assert!(out.stderr.contains(why), "{why}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    }
    assert_eq!(c.revision()?, revision, "refusals change nothing");

    // The move.
    let out = c.cli_ok(&["-o", "json", "move", "user", &user, "--to", "eu-west"])?;
    let done: serde_json::Value = serde_json::from_str(
        out.stdout
            .trim()
            .rsplit("\n{")
            .next()
            .map(|l| {
                if l.starts_with('{') {
                    l.to_string()
                } else {
                    format!("{{{l}")
                }
            })
            .as_deref()
            .unwrap_or(""),
    )
    .with_context(|| out.stdout.clone())?;
    assert_eq!(done["state"], "done", "{}", out.stdout);
    let move_id = done["id"].as_str().context("move id")?.to_string();

    // Still signed in: the old access token reaches the new home, which
    // holds the whole account, its money and its history.
    let profile = me.get("/v1/users/me").await?;
    assert_eq!(profile.status, StatusCode::OK, "{}", profile.body);
    assert_eq!(profile.header("x-home-region"), Some("eu-west"));
    assert_eq!(profile.body["display_name"], "Traveller");
    let addresses = me.get("/v1/users/me/addresses").await?;
    assert_eq!(
        addresses.body["items"][0]["city"], "Paris",
        "{}",
        addresses.body
    );
    let prefs = me.get("/v1/notices/preferences").await?;
    assert!(
        prefs.body.to_string().contains("\"enabled\":false"),
        "{}",
        prefs.body
    );
    assert_eq!(money_view(&me).await?, before, "money and history moved");
    // The same idempotency key at the new home answers the same transfer.
    let r = me
        .transfer(
            key,
            json!({"to_user_id": friend, "amount": 120, "currency": "CNY"}),
        )
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    assert_eq!(
        me.available("CNY").await?,
        380,
        "a retried transfer applied once"
    );
    // The refresh token too: the old home sends it on, the new one rotates it.
    let r = c
        .http()
        .post(format!("{}/v1/auth/refresh", c.router_url(0)))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    let pair: serde_json::Value = r.json().await?;
    assert_eq!(pair["home_region"], "eu-west", "{pair}");
    assert!(
        pair["refresh_token"]
            .as_str()
            .unwrap_or("")
            .starts_with("eu-west~"),
        "{pair}"
    );
    // No role came along: an imported admin would be a way for a cell to
    // mint admins in another region.
    let cms = east
        .as_client("cms")
        .signed_in("traveller@example.com", PW)
        .await?
        .0;
    assert_eq!(
        cms.get("/v1/cms/outbox/dead").await?.status,
        StatusCode::FORBIDDEN
    );

    // Money is conserved at both ends and across them.
    let report = c.audit(&["cn-east", "eu-west"])?;
    assert!(
        report.contains("cn-east↔eu-west CNY: clearing accounts net 0, in flight 0"),
        "{report}"
    );

    // A deposit that reaches the old home is forwarded to the new one.
    let r = east
        .provider_deposit("testpay", PAY_SECRET, "evt-after-move", &user, 300)
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    assert_eq!(me.available("CNY").await?, 680);

    // A second move of the same user while none is open is a new move; the
    // finished one reverses: the user is back with what changed meanwhile.
    let out = c.cli_ok(&["-o", "json", "move", "reverse", &move_id])?;
    assert!(out.stdout.contains("\"state\": \"done\""), "{}", out.stdout);
    let (back, _) = east.signed_in("traveller@example.com", PW).await?;
    let profile = back.get("/v1/users/me").await?;
    assert_eq!(profile.header("x-home-region"), Some("cn-east"));
    assert_eq!(money_view(&back).await?, (680, 3));
    let report = c.audit(&["cn-east", "eu-west"])?;
    assert!(
        report.contains("cn-east↔eu-west CNY: clearing accounts net 0, in flight 0"),
        "{report}"
    );
    // Reversing the reversal's original again is refused: it is not where it was.
    assert!(!c.cli(&["move", "reverse", &move_id])?.success);
    Ok(())
}

/// A batch with `--country` moves only the users whose default address is
/// in that country, and `--limit` bounds it.
#[tokio::test]
async fn a_batch_picks_users_by_country() -> Result<()> {
    use reqwest::StatusCode;
    use serde_json::json;
    let c = standard().start().await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let mut french = Vec::new();
    for (email, country) in [
        ("fr1@example.com", "FR"),
        ("cn1@example.com", "CN"),
        ("fr2@example.com", "FR"),
        ("none@example.com", ""),
        ("fr3@example.com", "FR"),
    ] {
        let (me, _) = east.signed_in(email, PW).await?;
        if !country.is_empty() {
            let addr = json!({"recipient": "R", "line1": "1 Main", "city": "C", "country": country, "is_default": true});
            assert_eq!(
                me.post("/v1/users/me/addresses", addr).await?.status,
                StatusCode::CREATED
            );
        }
        if country == "FR" {
            french.push(email);
        }
    }
    let out = c.cli_ok(&[
        "-o",
        "json",
        "move",
        "batch",
        "--from",
        "cn-east",
        "--to",
        "eu-west",
        "--country",
        "fr",
        "--limit",
        "2",
        "--rate",
        "50",
    ])?;
    let p = out.last_json_line()?;
    assert_eq!(
        (p["done"].as_u64(), p["failed"].as_u64()),
        (Some(2), Some(0)),
        "{p}"
    );
    let mut moved = 0;
    for email in [
        "fr1@example.com",
        "cn1@example.com",
        "fr2@example.com",
        "none@example.com",
        "fr3@example.com",
    ] {
        let l = east.login(email, PW).await?;
        let home = l.body["home_region"].as_str().unwrap_or("").to_string();
        if home == "eu-west" {
            assert!(french.contains(&email), "{email} is not in France");
            moved += 1;
        }
    }
    assert_eq!(moved, 2, "--limit 2");
    Ok(())
}

/// A transfer already on its way when its receiver moves: the sender's
/// cell reaches the old home after the cut-over, which names the new home
/// and holds nothing, and the transfer follows the receiver there, or
/// becomes a transfer within the sender's cell when the receiver moved to
/// it. The money arrives once, and every audit holds.
#[tokio::test]
async fn a_transfer_on_its_way_follows_a_receiver_who_moves() -> Result<()> {
    use serde_json::json;
    let mut c = standard()
        .cell_config(&format!("[payments.testpay]\nsecret = {PAY_SECRET:?}\n"))
        .start()
        .await?;
    c.add_region("us-west", "US")?;
    c.start_cell("us-west").await?;
    // The sender's cell waits before asking the receiver's cell to hold:
    // long enough for both receivers to move meanwhile.
    c.restart_cell_with_failpoints("eu-west", "saga.coordinator.before_peer_hold=10000")
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let west = Api::new(&c.router_url(0), "eu-west");
    let (far, far_login) = east.signed_in("far@example.com", PW).await?;
    let (near, near_login) = east.signed_in("near@example.com", PW).await?;
    let (sender, sender_login) = west.signed_in("sender@example.com", PW).await?;
    let id_of = |v: &serde_json::Value| v["user_id"].as_str().unwrap_or_default().to_string();
    let (far_id, near_id) = (id_of(&far_login), id_of(&near_login));
    let r = west
        .provider_deposit(
            "testpay",
            PAY_SECRET,
            "evt-follow-1",
            &id_of(&sender_login),
            500,
        )
        .await?;
    assert!(r.status.is_success(), "{r:?}");

    let mut transfers = Vec::new();
    for (key, to, amount) in [
        ("6f1c1d2e-0000-4000-8000-0000000000f1", &far_id, 100),
        ("6f1c1d2e-0000-4000-8000-0000000000f2", &near_id, 30),
    ] {
        let r = sender
            .transfer(
                key,
                json!({"to_user_id": to, "amount": amount, "currency": "CNY"}),
            )
            .await?;
        assert!(r.status.is_success(), "{r:?}");
        assert_eq!(r.body["state"], "pending", "{}", r.body);
        transfers.push(
            r.body["transfer_id"]
                .as_str()
                .context("transfer id")?
                .to_string(),
        );
    }
    // One receiver moves to a third region, the other to the sender's.
    let mut moves = Vec::new();
    for (user, to) in [(&far_id, "us-west"), (&near_id, "eu-west")] {
        let out = c.cli_ok(&["-o", "json", "move", "user", user, "--to", to, "--no-wait"])?;
        moves.push(out.json()?["id"].as_str().context("move id")?.to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    for id in &moves {
        while c.cli_ok(&["-o", "json", "move", "status", id])?.json()?["state"] != "done" {
            anyhow::ensure!(Instant::now() < deadline, "move {id} is slow");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Both cut over before the sender's cell asked the old home.
    for id in &transfers {
        let r = sender.get(&format!("/v1/wallet/transfers/{id}")).await?;
        assert_eq!(r.body["state"], "pending", "{}", r.body);
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &transfers {
        loop {
            let r = sender.get(&format!("/v1/wallet/transfers/{id}")).await?;
            if r.body["state"] == "posted" {
                break;
            }
            assert_ne!(r.body["state"], "voided", "{}", r.body);
            anyhow::ensure!(Instant::now() < deadline, "transfer stuck: {}", r.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(sender.available("CNY").await?, 370);
    assert_eq!(far.available("CNY").await?, 100, "at the new home, once");
    assert_eq!(near.available("CNY").await?, 30, "within the sender's cell");
    let seen = far
        .get(&format!("/v1/wallet/transfers/{}", transfers[0]))
        .await?;
    assert_eq!(seen.body["state"], "posted", "{}", seen.body);
    let report = c.audit(&["cn-east", "eu-west", "us-west"])?;
    assert!(report.contains("audit passed"), "{report}");
    Ok(())
}

/// A move whose user has a withdrawal awaiting its provider waits for it
/// to land before it freezes them: meanwhile the user writes as usual and
/// the journal says what the move waits for. Once the provider pays, the
/// move runs, and the withdrawal is in the user's history at the new home.
#[tokio::test]
async fn a_move_waits_unfrozen_for_a_withdrawal_to_land() -> Result<()> {
    use reqwest::{Method, StatusCode};
    use serde_json::json;
    let provider = homecell_harness::provider::TestProvider::start(PAY_SECRET).await?;
    provider.set_processing(Duration::from_secs(3_600));
    let c = standard()
        .cell_config(&format!(
            "withdrawals_via = \"testpay\"\n[payments.testpay]\nsecret = {PAY_SECRET:?}\npayout_url = {:?}\n",
            provider.payout_url()
        ))
        .start()
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let (me, login) = east.signed_in("payee@example.com", PW).await?;
    let user = login["user_id"].as_str().context("user")?.to_string();
    let r = east
        .provider_deposit("testpay", PAY_SECRET, "evt-wait-1", &user, 1_000)
        .await?;
    assert!(r.status.is_success(), "{r:?}");
    // Ending in 7: the provider says "processing" until the test lets it pay.
    let w = me
        .call(
            Method::POST,
            "/v1/wallet/withdrawals",
            Some(json!({"amount": 107, "currency": "CNY"})),
            &[("idempotency-key", "6f1c1d2e-0000-4000-8000-0000000000a7")],
        )
        .await?;
    assert_eq!(w.status, StatusCode::ACCEPTED, "{}", w.body);
    let withdrawal = w.body["transfer_id"].as_str().context("id")?.to_string();

    let out = c.cli_ok(&[
        "-o",
        "json",
        "move",
        "user",
        &user,
        "--to",
        "eu-west",
        "--no-wait",
    ])?;
    let id = out.json()?["id"].as_str().context("move id")?.to_string();
    let status = |c: &Cluster| -> Result<serde_json::Value> {
        c.cli_ok(&["-o", "json", "move", "status", &id])?.json()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = status(&c)?;
        if m["error"]
            .as_str()
            .unwrap_or("")
            .contains("money of the user's in flight")
        {
            assert_eq!(m["state"], "copying", "{m}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the move does not wait: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Not frozen: a write goes through at once, at the old home.
    let started = Instant::now();
    let prefs =
        json!({"preferences": [{"category": "message", "channel": "inbox", "enabled": false}]});
    let r = me
        .call(Method::PUT, "/v1/notices/preferences", Some(prefs), &[])
        .await?;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "held by a freeze"
    );
    assert_eq!(r.header("x-home-region"), Some("cn-east"));

    // The provider pays; the withdrawal lands, then the move runs.
    provider.set_processing(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&c)?["state"] != "done" {
        anyhow::ensure!(Instant::now() < deadline, "not done: {}", status(&c)?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seen = me
        .get(&format!("/v1/wallet/transfers/{withdrawal}"))
        .await?;
    assert_eq!(seen.body["state"], "posted", "{}", seen.body);
    assert_eq!(seen.header("x-home-region"), Some("eu-west"));
    assert_eq!(me.available("CNY").await?, 893);
    assert_eq!(provider.paid(), 107);
    let report = c.audit(&["cn-east", "eu-west"])?;
    assert!(report.contains("audit passed"), "{report}");
    Ok(())
}

/// Mail not yet sent when a user moves goes out once: from the new home
/// after the cut-over, or from the old home when the move is undone (the
/// new home holds an arriving user's mail until the directory homes them
/// there, and drops it with the copy).
#[tokio::test]
async fn unsent_mail_goes_out_once_whether_the_move_finishes_or_is_undone() -> Result<()> {
    let mail_port = homecell_harness::free_port();
    let mut c = standard()
        .cell_config(&format!(
            "[notice]\nemail_from = \"Homecell <no-reply@homecell.test>\"\n[notice.smtp]\nhost = \"127.0.0.1\"\nport = {mail_port}\nsecurity = \"none\"\n"
        ))
        .start()
        .await?;
    // Each move waits after its copy: a window in which the new home holds
    // the unsent mail and the mail server is up.
    c.restart_cell_with_failpoints("cn-east", "move.source.after_import=12000")
        .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    // No mail server yet: each welcome letter fails and waits to be retried.
    let mut users = Vec::new();
    for email in ["undone@example.com", "moved@example.com"] {
        let r = east.register(email, PW).await?;
        users.push(r.body["user_id"].as_str().context("user")?.to_string());
    }
    let mut moves = Vec::new();
    for user in &users {
        let out = c.cli_ok(&[
            "-o",
            "json",
            "move",
            "user",
            user,
            "--to",
            "eu-west",
            "--no-wait",
        ])?;
        moves.push(out.json()?["id"].as_str().context("move id")?.to_string());
    }
    let west = sqlx::SqlitePool::connect(&format!(
        "sqlite:{}",
        c.cell_sqlite_path("eu-west").display()
    ))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    for user in &users {
        loop {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM deliveries WHERE user_id = ? AND state = 'pending'",
            )
            .bind(user)
            .fetch_one(&west)
            .await?;
            if n > 0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "no unsent mail was copied");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mail = homecell_harness::smtp::SmtpSink::start_on(mail_port).await?;
    c.cli_ok(&["move", "cancel", &moves[0]])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, end) in [(&moves[0], "cancelled"), (&moves[1], "done")] {
        loop {
            let m = c.cli_ok(&["-o", "json", "move", "status", id])?.json()?;
            if m["state"] == end && (end == "done" || m["undone"] == true) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "move not {end}: {m}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for email in ["undone@example.com", "moved@example.com"] {
        mail.wait_for(email, "Welcome", Duration::from_secs(60))
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for email in ["undone@example.com", "moved@example.com"] {
        let letters = mail
            .messages()
            .into_iter()
            .filter(|m| m.contains(email) && m.contains("Welcome"))
            .count();
        assert_eq!(letters, 1, "{email}: sent {letters} times");
    }
    Ok(())
}
