//! Password logins/s and refreshes/s through a router into one cell.
//!
//! Starts a whole local cluster from the binaries in HOMECELL_BIN_DIR (use
//! release builds), registers one user per worker, then runs each phase for
//! a fixed time with a fixed number of concurrent workers. Every request is
//! checked: a non-200 answer counts as an error, not as throughput.
//!
//! Two "per core" figures: the rate divided by the machine's cores (the
//! client, router and control plane share them), and the rate per second of
//! CPU the cell itself used (utime + stime from /proc), which is how sizing
//! guides such as Keycloak's count a vCPU.

use clap::Parser;
use homecell_bench::cpu;
use homecell_harness::api::Api;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

const PW: &str = "bench password 1";

struct Outcome {
    ok: u64,
    errors: u64,
    latencies: Vec<Duration>,
}

fn report(name: &str, o: &Outcome, secs: f64, cores: usize, cell_cpu: f64) {
    let mut l = o.latencies.clone();
    l.sort();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let rate = o.ok as f64 / secs;
    println!(
        "{name:<9} {rate:>9.1}/s total  {:>8.1}/s per machine core  {:>8.1}/s per cell CPU-second ({:.0}% of a core)  ok {:>7}  errors {:>4}  p50 {:>7.1?}  p99 {:>7.1?}",
        rate / cores as f64,
        o.ok as f64 / cell_cpu,
        100.0 * cell_cpu / secs,
        o.ok,
        o.errors,
        pct(0.50),
        pct(0.99)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // One client address sends everything: the per-address limits on
    // logins and registrations are lifted.
    let cluster = homecell_bench::load::one_address_cluster("").await?;
    let api = Api::new(&cluster.router_url(0), "cn-east");
    let cell = [cluster.cells["cn-east"]
        .process
        .as_ref()
        .map(|p| p.pid())
        .ok_or_else(|| anyhow::anyhow!("the cn-east cell is not running"))?];

    let mut users = Vec::new();
    for i in 0..args.workers {
        let (_, login) = api.signed_in(&format!("bench{i}"), PW).await?;
        users.push((
            format!("bench{i}"),
            login["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ));
    }
    println!(
        "machine: {cores} cores; workers: {}; {} s per phase; argon2id m=19456 t=2 p=1",
        args.workers, args.seconds
    );

    // Phase 1: password logins.
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let cpu_before = cpu::seconds(&cell);
    let tasks: Vec<_> = users
        .iter()
        .map(|(name, _)| {
            let api = api.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let mut o = Outcome {
                    ok: 0,
                    errors: 0,
                    latencies: Vec::new(),
                };
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match api.login(&name, PW).await {
                        Ok(r) if r.status == 200 => {
                            o.ok += 1;
                            o.latencies.push(t.elapsed());
                        }
                        _ => o.errors += 1,
                    }
                }
                o
            })
        })
        .collect();
    let mut logins = Outcome {
        ok: 0,
        errors: 0,
        latencies: Vec::new(),
    };
    let mut fresh = Vec::new();
    for t in tasks {
        let o = t.await?;
        logins.ok += o.ok;
        logins.errors += o.errors;
        logins.latencies.extend(o.latencies);
    }
    let cell_cpu = cpu::seconds(&cell) - cpu_before;
    report(
        "logins",
        &logins,
        started.elapsed().as_secs_f64(),
        cores,
        cell_cpu,
    );

    // Each worker needs a live refresh token of its own: log in once more.
    for (name, _) in &users {
        let l = api.login(name, PW).await?;
        fresh.push(
            l.body["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }

    // Phase 2: refresh-token rotations (each uses the token the last returned).
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let cpu_before = cpu::seconds(&cell);
    let tasks: Vec<_> = fresh
        .into_iter()
        .map(|mut token| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut o = Outcome {
                    ok: 0,
                    errors: 0,
                    latencies: Vec::new(),
                };
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match api
                        .post(
                            "/v1/auth/refresh",
                            serde_json::json!({"refresh_token": token}),
                        )
                        .await
                    {
                        Ok(r) if r.status == 200 => {
                            o.ok += 1;
                            o.latencies.push(t.elapsed());
                            token = r.body["refresh_token"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string();
                        }
                        _ => {
                            o.errors += 1;
                            break;
                        }
                    }
                }
                o
            })
        })
        .collect();
    let mut refreshes = Outcome {
        ok: 0,
        errors: 0,
        latencies: Vec::new(),
    };
    for t in tasks {
        let o = t.await?;
        refreshes.ok += o.ok;
        refreshes.errors += o.errors;
        refreshes.latencies.extend(o.latencies);
    }
    let cell_cpu = cpu::seconds(&cell) - cpu_before;
    report(
        "refreshes",
        &refreshes,
        started.elapsed().as_secs_f64(),
        cores,
        cell_cpu,
    );
    Ok(())
}
