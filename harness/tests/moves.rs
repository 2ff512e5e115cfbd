//! A moved user: the directory re-homes it (the source cell's `MoveUser`),
//! routers with a current directory send its requests to the new home at
//! once, and a router with a stale one is answered "moved" by the old home
//! and replays the request there once, saying so.

use anyhow::{Context, Result};
use homecell_common::tls::{PeerIdentity, Pki, TlsPaths};
use homecell_harness::api::Api;
use homecell_harness::{Cluster, start_standard};
use homecell_proto::control::MoveUserRequest;
use homecell_proto::control::directory_service_client::DirectoryServiceClient;
use std::time::{Duration, Instant};

const PW: &str = "correct horse battery";

/// The directory step of a move, as the source cell calls it.
async fn move_user(c: &Cluster, as_cell: &str, req: MoveUserRequest) -> Result<tonic::Code> {
    let pki = Pki::open_or_create(&c.pki_dir)?;
    let id = PeerIdentity::Cell {
        region: as_cell.into(),
    };
    let paths: TlsPaths = pki.issue(&id, &[])?;
    let channel = tonic::transport::Endpoint::from_shared(c.control_plane_endpoint())?
        .tls_config(paths.load()?.tonic_client("control-plane"))?
        .connect()
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
    let mut c = Cluster::temp()?;
    start_standard(&mut c).await?;
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
    assert_eq!(
        move_user(
            &c,
            "eu-west",
            req("cn-east", "eu-west", &["email:mover@example.com"])
        )
        .await?,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        move_user(
            &c,
            "cn-east",
            req("cn-east", "eu-west", &["email:someone@example.com"])
        )
        .await?,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        move_user(
            &c,
            "eu-west",
            req("eu-west", "cn-east", &["email:mover@example.com"])
        )
        .await?,
        tonic::Code::FailedPrecondition,
        "the user is not homed in eu-west"
    );
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
