//! A cell of several stateless instances over one PostgreSQL, with the
//! router balancing across the live ones (the documented production layout
//! for a busy region; see docs/OPERATIONS.md).

use anyhow::Result;
use homecell_harness::api::Api;
use homecell_harness::postgres::TempPostgres;
use homecell_harness::{CellInstance, Cluster};
use reqwest::StatusCode;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SECRET: &str = "whsec-instances-test-secret-0001";

/// Responses an instance has served, from its own metrics.
async fn served(http: &reqwest::Client, admin: SocketAddr) -> Result<f64> {
    let text = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("homecell_cell_request_duration_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A fresh Idempotency-Key (a v4 UUID).
fn key() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// cn-east on SQLite, eu-west as two instances over one PostgreSQL (the
/// region's internal endpoint lists both), and a router; ready.
async fn two_instance_cluster(
    cell_extra_config: String,
) -> Result<(TempPostgres, Cluster, CellInstance)> {
    let pg = TempPostgres::start()?;
    let url = pg.create_database("cell_eu_west")?;
    let mut c = Cluster::temp()?;
    c.cell_extra_config = cell_extra_config;
    c.start_control_plane().await?;
    c.add_region("cn-east", "CN")?;
    c.add_region("eu-west", "DE")?;
    c.cell_mut("eu-west").unwrap().database_url = Some(url);
    c.start_cell("eu-west").await?;
    let second = c.start_cell_instance("eu-west", 1).await?;
    let endpoints = format!("https://{},https://{}", c.cells["eu-west"].api, second.api);
    c.cli_ok(&[
        "region",
        "update",
        "eu-west",
        "--internal-endpoint",
        &endpoints,
    ])?;
    c.start_cell("cn-east").await?;
    c.start_router("cn-east", "cn-east").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;
    Ok((pg, c, second))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_cell_runs_as_several_instances_behind_the_router() -> Result<()> {
    let (_pg, mut c, second) =
        two_instance_cluster(format!("[payments.testpay]\nsecret = {SECRET:?}\n")).await?;
    let first = (c.cells["eu-west"].api, c.cells["eu-west"].admin);

    let eu = Api::new(&c.router_url(0), "eu-west");
    let (alice, login) = eu
        .signed_in("alice@example.com", "correct horse battery")
        .await?;
    let alice_id = login["user_id"].as_str().unwrap().to_string();
    let (_, bob) = eu
        .signed_in("bob@example.com", "correct horse battery")
        .await?;
    let bob_id = bob["user_id"].as_str().unwrap().to_string();
    let d = eu
        .provider_deposit("testpay", SECRET, "evt-1", &alice_id, 10_000)
        .await?;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);

    // Both instances take requests, and either accepts the other's tokens
    // and sees the other's writes (one datastore).
    let (a0, b0) = (
        served(c.http(), first.1).await?,
        served(c.http(), second.admin).await?,
    );
    for _ in 0..20 {
        let me = alice.get("/v1/me").await?;
        assert_eq!(me.status, StatusCode::OK, "{}", me.body);
        assert_eq!(alice.available("CNY").await?, 10_000);
    }
    let (a1, b1) = (
        served(c.http(), first.1).await?,
        served(c.http(), second.admin).await?,
    );
    assert!(
        a1 - a0 >= 10.0 && b1 - b0 >= 10.0,
        "the router balances: first +{}, second +{}",
        a1 - a0,
        b1 - b0
    );

    // The first instance dies: the second serves every request, the same
    // transfer retried lands once.
    c.kill_cell("eu-west");
    let killed = Instant::now();
    let body = json!({"to_user_id": bob_id, "amount": 700, "currency": "CNY"});
    let k = key();
    let t = alice.transfer(&k, body.clone()).await?;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.body);
    for _ in 0..20 {
        let r = alice.get("/v1/me").await?;
        assert_eq!(r.status, StatusCode::OK, "after the kill: {}", r.body);
        let again = alice.transfer(&k, body.clone()).await?;
        assert_eq!(again.body["transfer_id"], t.body["transfer_id"]);
    }
    assert_eq!(alice.available("CNY").await?, 9_300);
    eprintln!("served on through the kill ({:?})", killed.elapsed());

    // It comes back, the other dies: still one cell, nothing lost.
    c.start_cell("eu-west").await?;
    c.wait_http_ok(
        &format!("http://{}/ready", first.1),
        Duration::from_secs(20),
        "first instance",
    )
    .await?;
    let mut second = second;
    second.process.kill();
    for n in 0..20 {
        let r = alice.get("/v1/me").await?;
        assert_eq!(r.status, StatusCode::OK, "request {n}: {}", r.body);
    }
    let t2 = alice
        .transfer(
            &key(),
            json!({"to_user_id": bob_id, "amount": 300, "currency": "CNY"}),
        )
        .await?;
    assert_eq!(t2.status, StatusCode::CREATED, "{}", t2.body);
    assert_eq!(alice.available("CNY").await?, 9_000);
    let report = c.cell_command("eu-west", &["audit"])?;
    assert!(report.success, "{}{}", report.stdout, report.stderr);
    Ok(())
}

/// Reads a live stream until it has shown every one of `want`.
async fn sees_all(stream: &mut reqwest::Response, want: &[&str], what: &str) -> Result<()> {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !want.iter().all(|w| seen.contains(w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "{what}: wanted {want:?}, got {seen:?}");
        if let Ok(Some(chunk)) = tokio::time::timeout(left, stream.chunk()).await? {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn live_events_reach_streams_on_every_instance() -> Result<()> {
    let (_pg, c, _second) = two_instance_cluster(String::new()).await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let (alice, _) = eu
        .signed_in("alice@example.com", "correct horse battery")
        .await?;

    // Two streams of hers: the router takes the instances in turn, so one
    // stream is on each, whichever instance's worker writes her notices.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let s = c
            .http()
            .get(format!("{}/v1/notices/stream", c.router_url(0)))
            .header("x-client-type", "app")
            .bearer_auth(alice.token.as_deref().unwrap())
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        assert_eq!(s.status(), StatusCode::OK);
        streams.push(s);
    }
    // Sign-ins on two new client types: a security notice each.
    for client in ["web", "mp"] {
        let r = eu
            .as_client(client)
            .login("alice@example.com", "correct horse battery")
            .await?;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let want = ["new web client", "new mp client"];
    for (i, s) in streams.iter_mut().enumerate() {
        sees_all(s, &want, &format!("stream {i}")).await?;
    }
    Ok(())
}

/// Both instances of a region run its move worker and race for each
/// move's steps: a batch moved out of it still moves every user once, with
/// their money, and the audit holds at both ends and across them.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_move_a_batch_out_together() -> Result<()> {
    let (_pg, c, _second) =
        two_instance_cluster(format!("[payments.testpay]\nsecret = {SECRET:?}\n")).await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let mut users = Vec::new();
    for i in 0..24 {
        let (me, login) = eu
            .signed_in(&format!("mover{i}@example.com"), "correct horse battery")
            .await?;
        let id = login["user_id"].as_str().unwrap_or_default().to_string();
        let d = eu
            .provider_deposit("testpay", SECRET, &format!("evt-m{i}"), &id, 100 + i)
            .await?;
        assert_eq!(d.status, StatusCode::OK, "{}", d.body);
        users.push((me, 100 + i));
    }
    let out = c.cli_ok(&[
        "-o", "json", "move", "batch", "--from", "eu-west", "--to", "cn-east", "--rate", "50",
    ])?;
    let p = out.last_json_line()?;
    assert_eq!(
        (p["done"].as_u64(), p["failed"].as_u64()),
        (Some(24), Some(0)),
        "{p}"
    );
    for (me, amount) in &users {
        let r = me.get("/v1/users/me").await?;
        assert_eq!(r.header("x-home-region"), Some("cn-east"), "{}", r.body);
        assert_eq!(me.available("CNY").await?, *amount);
    }
    let report = c.audit(&["eu-west", "cn-east"])?;
    assert!(report.contains("audit passed"), "{report}");
    Ok(())
}
