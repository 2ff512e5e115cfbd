//! Moves by the thousand: a batch moves every user of a region through the
//! router while other users' traffic runs, half of them are reversed, and
//! a region is drained, evacuated and retired with no user left behind.

use anyhow::Context;
use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

type Result<T = ()> = anyhow::Result<T>;

const PW: &str = "correct horse battery";

/// Users the batch moves (`HOMECELL_BATCH_USERS` to change it).
fn users() -> usize {
    std::env::var("HOMECELL_BATCH_USERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000)
}

/// Registers `n` users in `region`, a few at a time; their ids.
async fn register(api: &Api, prefix: &str, n: usize) -> Result<Vec<String>> {
    use futures::StreamExt;
    let ids: Vec<Result<String>> = futures::stream::iter(0..n)
        .map(|i| async move {
            let r = api
                .register(&format!("{prefix}{i}@example.com"), PW)
                .await?;
            anyhow::ensure!(r.status == StatusCode::CREATED, "register {i}: {r:?}");
            Ok(r.body["user_id"].as_str().context("user id")?.to_string())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    ids.into_iter().collect()
}

/// Another user's reads and writes, all the while: every one must succeed.
/// Returns the stop switch and the task (its answer: requests, failures).
fn bystander(api: Api) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Result<(u64, u64)>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let (sent, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        while !flag.load(Ordering::Relaxed) {
            let r = api.get("/v1/users/me").await?;
            sent.fetch_add(1, Ordering::Relaxed);
            if r.status != StatusCode::OK {
                failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("bystander: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((sent.into_inner(), failed.into_inner()))
    });
    (stop, task)
}

/// Where a user lives now, by a fresh sign-in through the router.
async fn home_of(api: &Api, email: &str) -> Result<String> {
    let l = api.login(email, PW).await?;
    anyhow::ensure!(l.status == StatusCode::OK, "{email}: {l:?}");
    Ok(l.body["home_region"].as_str().unwrap_or("").to_string())
}

/// Waits until none of `batch`'s moves (its reversals included) is open.
async fn until_settled(c: &Cluster, batch: &str) -> Result {
    use homecell_common::tls::PeerIdentity;
    use homecell_proto::control::ListMovesRequest;
    use homecell_proto::control::move_service_client::MoveServiceClient;
    let channel = c
        .control_plane_as(&PeerIdentity::Operator {
            name: "admin".into(),
        })
        .await?;
    let mut moves = MoveServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let open = moves
            .list_moves(ListMovesRequest {
                batch_id: batch.to_string(),
                open_only: true,
                limit: 1,
                ..Default::default()
            })
            .await?
            .into_inner()
            .moves;
        if open.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "still open: {:?}", open[0]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// Multi-threaded: the CLI blocks its thread while the bystander runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_moves_a_thousand_users_and_a_region_retires_empty() -> Result {
    // One test client signs in as many users: no per-address login limit.
    let c = standard()
        .cell_config("login_attempts_per_ip_per_minute = 100000\n")
        .start()
        .await?;
    // One test client registers them all: no per-address limit.
    let out = c.cli_ok(&[
        "-o",
        "json",
        "config",
        "set",
        "router.rate_limit.registrations_per_ip",
        "0",
    ])?;
    let rev = out.json()?["revision"].as_u64().context("revision")?;
    c.wait_applied(rev, 3, Duration::from_secs(10)).await?;
    let n = users();
    let east = Api::new(&c.router_url(0), "cn-east");
    let west = Api::new(&c.router_url(0), "eu-west");
    let started = Instant::now();
    let moving = register(&east, "batch", n).await?;
    eprintln!("{n} users registered in {:?}", started.elapsed());
    let (other, _) = west.signed_in("bystander@example.com", PW).await?;

    // A region that homes users does not retire.
    let out = c.cli(&["region", "retire", "cn-east"])?;
    assert!(
        !out.success && out.stderr.contains("evacuate it first"),
        "{}",
        out.stderr
    );

    let (stop, traffic) = bystander(other.clone());
    let started = Instant::now();
    let out = c.cli_ok(&[
        "-o", "json", "move", "batch", "--from", "cn-east", "--to", "eu-west", "--rate", "200",
    ])?;
    let took = started.elapsed();
    let p = out.last_json_line()?;
    assert_eq!(p["done"], n as u64, "{p}");
    assert_eq!(p["failed"], 0, "{p}");
    eprintln!(
        "batch of {n}: {took:?}, {:.1} users/s; progress lines: {}",
        n as f64 / took.as_secs_f64(),
        out.stdout.lines().count()
    );
    let batch = p["batch"].as_str().context("batch id")?.to_string();
    for i in (0..n).step_by((n / 20).max(1)) {
        assert_eq!(
            home_of(&east, &format!("batch{i}@example.com")).await?,
            "eu-west"
        );
    }

    // Half of them go back.
    let half = n / 2;
    let out = c.cli_ok(&[
        "-o",
        "json",
        "move",
        "reverse",
        &batch,
        "--limit",
        &half.to_string(),
    ])?;
    let r: Value = serde_json::from_str(&out.stdout)?;
    let reversals: Vec<String> = r["reversals"]
        .as_array()
        .context("reversals")?
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    assert_eq!(reversals.len(), half);
    until_settled(&c, &batch).await?;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = traffic.await??;
    assert!(sent > 0);
    assert_eq!(failed, 0, "the bystander's requests all succeeded ({sent})");
    let back = (0..n)
        .step_by((n / 20).max(1))
        .map(|i| format!("batch{i}@example.com"));
    let mut homes = std::collections::BTreeMap::new();
    for email in back {
        *homes.entry(home_of(&east, &email).await?).or_insert(0) += 1;
    }
    assert_eq!(
        homes.len(),
        2,
        "some users back in cn-east, some still in eu-west: {homes:?}"
    );

    // Drain and retire: eu-west is evacuated, then retires; no user is left.
    let out = c.cli_ok(&[
        "-o", "json", "move", "evacuate", "eu-west", "--to", "cn-east", "--rate", "200",
    ])?;
    let p = out.last_json_line()?;
    assert_eq!(p["failed"], 0, "{p}");
    let out = c.cli_ok(&["region", "retire", "eu-west"])?;
    assert!(out.success, "{}", out.stderr);
    for i in (0..n).step_by((n / 20).max(1)) {
        assert_eq!(
            home_of(&east, &format!("batch{i}@example.com")).await?,
            "cn-east"
        );
    }
    assert_eq!(home_of(&east, "bystander@example.com").await?, "cn-east");
    assert_eq!(moving.len(), n);
    Ok(())
}
