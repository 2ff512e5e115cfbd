//! Moves of users between regions, on the standard cluster (release
//! binaries: `cargo build --release --workspace`, then run this with
//! `HOMECELL_BIN_DIR=target/release`):
//!
//! 1. heavy: `--heavy` users of cn-east, each with `--items` deposits (each
//!    one a ledger operation and an inbox item), moved to eu-west by one
//!    batch at `--heavy-rate`; users moved per second.
//! 2. bystanders: `--clients` users of eu-west read their profile through
//!    the router for `--seconds`, first with no move, then while a batch of
//!    `--light` users moves at the default rate (10/s); p50 and p99 of both.
//! 3. evacuation: `--evacuate` users registered in eu-west, then
//!    `move evacuate eu-west --to cn-east`; its progress lines as printed.

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use homecell_harness::Cluster;
use homecell_harness::api::Api;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 50)]
    heavy: usize,
    #[arg(long, default_value_t = 100)]
    items: usize,
    #[arg(long, default_value_t = 100)]
    heavy_rate: u32,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 200)]
    light: usize,
    #[arg(long, default_value_t = 10_000)]
    evacuate: usize,
}

const PW: &str = "correct horse battery";
const SECRET: &str = "testpay-shared-secret-0123456789";

async fn register(api: &Api, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let ids: Vec<anyhow::Result<String>> = futures::stream::iter(0..n)
        .map(|i| async move {
            let r = api
                .register(&format!("{prefix}{i}@example.com"), PW)
                .await?;
            anyhow::ensure!(r.status.as_u16() == 201, "register {i}: {r:?}");
            Ok(r.body["user_id"].as_str().context("id")?.to_string())
        })
        .buffer_unordered(16)
        .collect()
        .await;
    ids.into_iter().collect()
}

/// Runs a batch command and returns its wall time and last progress line.
async fn batch(c: &Cluster, args: &[&str]) -> anyhow::Result<(Duration, String, String)> {
    let cli = c.cli_path();
    let mut cmd = std::process::Command::new(cli);
    cmd.args(["-o", "json"]).args(args);
    cmd.env(
        "HOMECELL_CONTROL_PLANE",
        format!("https://{}", c.control_plane.grpc),
    );
    cmd.env("HOMECELL_PKI_DIR", &c.pki_dir);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or("").to_string();
    Ok((started.elapsed(), last, stdout))
}

/// Profile reads by `apis` until `stop`; their latencies.
async fn read_load(apis: Vec<Api>, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let tasks: Vec<_> = apis
        .into_iter()
        .map(|api| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = api
                        .get("/v1/users/me")
                        .await
                        .is_ok_and(|r| r.status.as_u16() == 200);
                    if ok {
                        lat.push(t.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort();
    all
}

fn pct(lat: &[Duration], p: f64) -> Duration {
    lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let c = homecell_bench::load::one_address_cluster(&format!(
        "[payments.testpay]\nsecret = {SECRET:?}\n"
    ))
    .await?;
    let east = Api::new(&c.router_url(0), "cn-east");
    let west = Api::new(&c.router_url(0), "eu-west");

    // 1. heavy users.
    let heavy = register(&east, "heavy", a.heavy).await?;
    let deposits: Vec<(String, usize)> = heavy
        .iter()
        .flat_map(|u| (0..a.items).map(move |i| (u.clone(), i)))
        .collect();
    futures::stream::iter(deposits)
        .map(|(u, i)| {
            let east = east.clone();
            async move {
                let r = east
                    .provider_deposit("testpay", SECRET, &format!("{u}-{i}"), &u, 100)
                    .await?;
                anyhow::ensure!(r.status.is_success(), "{r:?}");
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<anyhow::Result<()>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<()>>()?;
    // Let the inbox items land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rate = a.heavy_rate.to_string();
    let (took, last, _) = batch(
        &c,
        &[
            "move", "batch", "--from", "cn-east", "--to", "eu-west", "--rate", &rate,
        ],
    )
    .await?;
    println!(
        "heavy: {} users with {} operations and inbox items each moved in {:.1} s: {:.1} users/s\n  {last}",
        a.heavy,
        a.items,
        took.as_secs_f64(),
        a.heavy as f64 / took.as_secs_f64()
    );

    // 2. bystanders' latency, without and during a batch.
    let mut apis = Vec::new();
    for i in 0..a.clients {
        apis.push(
            west.signed_in(&format!("bystander{i}@example.com"), PW)
                .await?
                .0,
        );
    }
    register(&east, "light", a.light).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(read_load(apis.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let quiet = load.await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(read_load(apis, stop.clone()));
    let started = Instant::now();
    let (_, last, _) = batch(
        &c,
        &["move", "batch", "--from", "cn-east", "--to", "eu-west"],
    )
    .await?;
    let moving = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let busy = load.await?;
    println!(
        "bystanders ({} clients): no move p50 {:?} p99 {:?} ({} requests in {} s); during a batch of {} at the default rate ({:.1} s) p50 {:?} p99 {:?} ({} requests): p99 ×{:.2}\n  {last}",
        a.clients,
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        quiet.len(),
        a.seconds,
        a.light,
        moving.as_secs_f64(),
        pct(&busy, 0.5),
        pct(&busy, 0.99),
        busy.len(),
        pct(&busy, 0.99).as_secs_f64() / pct(&quiet, 0.99).as_secs_f64().max(1e-9)
    );

    // 3. evacuation.
    if a.evacuate > 0 {
        let started = Instant::now();
        register(&west, "evac", a.evacuate).await?;
        println!(
            "evacuation: {} users registered in {:.0} s",
            a.evacuate,
            started.elapsed().as_secs_f64()
        );
        let (took, _, out) = batch(
            &c,
            &[
                "move", "evacuate", "eu-west", "--to", "cn-east", "--rate", "1000",
            ],
        )
        .await?;
        println!("evacuation progress:\n{out}");
        println!("evacuation: eu-west emptied in {:.1} s", took.as_secs_f64());
    }
    Ok(())
}
