//! The directory at scale: how long a new router takes to bootstrap a
//! directory of N users from the control plane, its memory once it has, how
//! fast it restarts from its persisted copy with the control plane down, and
//! how long a lookup takes.
//!
//! 1. A control plane with two regions; stopped; N users (one identifier
//!    each) imported straight into its store (`Store::import_claims`, as an
//!    operator would bring in an existing user base); started again.
//! 2. A new router starts: time from spawn to `/ready` (the whole snapshot
//!    streamed, built and persisted), then its RSS and peak RSS.
//! 3. The running control plane is backed up through the CLI and the file
//!    restored into a new store, both timed.
//! 4. The control plane stops and the router restarts: time to `/ready` from
//!    the persisted copy alone.
//! 5. The router stops; a store is recovered from its replica (timed); the
//!    replica is opened in this process and `--lookups` random user and
//!    identifier lookups are timed one by one.

use anyhow::{Context, Result, bail};
use clap::Parser;
use homecell_common::replica::Replica;
use homecell_control_plane::store::{Location, Store};
use homecell_harness::Cluster;
use homecell_proto::control::IdentifierClaim;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Users in the directory (one claim each).
    #[arg(long, default_value_t = 10_000_000)]
    users: u64,
    /// Lookups to time (each kind).
    #[arg(long, default_value_t = 1_000_000)]
    lookups: u64,
}

/// A deterministic, well-spread stream of 64-bit values (splitmix64).
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// User `n`'s id (a UUIDv7 shape) and its identifier's HMAC (64 hex digits).
fn user(n: u64) -> (String, String) {
    let ms = 1_750_000_000_000u128 + u128::from(n / 16);
    // Version 7, RFC 4122 variant (0b10 in bits 62-63), as cells make them:
    // `recover` reads only such ids back from a replica's keys.
    let id = uuid::Uuid::from_u128(
        ms << 80 | 0x7000u128 << 64 | 0b10u128 << 62 | u128::from(mix(n) >> 2),
    );
    let hmac = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        mix(n ^ 0xa),
        mix(n ^ 0xb),
        mix(n ^ 0xc),
        mix(n ^ 0xd)
    );
    (id.to_string(), hmac)
}

fn region(n: u64) -> &'static str {
    if n.is_multiple_of(2) {
        "cn-east"
    } else {
        "eu-west"
    }
}

/// VmRSS and VmHWM of `pid`, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn wait_ready(cluster: &Cluster, started: Instant, limit: Duration) -> Result<Duration> {
    let url = format!("http://{}/ready", cluster.routers[0].admin);
    loop {
        if let Ok(r) = cluster.http().get(&url).send().await
            && r.status().is_success()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("the router was not ready within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::temp()?;
    cluster.start_control_plane().await?;
    cluster.add_region("cn-east", "CN")?;
    cluster.add_region("eu-west", "DE")?;
    cluster.stop_control_plane();

    let started = Instant::now();
    {
        let store = Store::open(&cluster.root.join("control-plane/control-plane.redb"), 1000)?;
        let batch = 1_000_000;
        for from in (0..args.users).step_by(batch as usize) {
            let to = (from + batch).min(args.users);
            store.import_claims((from..to).map(|n| {
                let (user_id, hmac) = user(n);
                IdentifierClaim {
                    hmac,
                    user_id,
                    region: region(n).into(),
                }
            }))?;
        }
    }
    println!(
        "imported {} users into the control plane's store in {:.1?}",
        args.users,
        started.elapsed()
    );
    cluster.start_control_plane().await?;

    let started = Instant::now();
    cluster.start_router("cn-east", "cn-east").await?;
    let bootstrap = wait_ready(&cluster, started, Duration::from_secs(600)).await?;
    let pid = cluster.routers[0].process.as_ref().context("router")?.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, peak) = rss_mib(pid);
    println!(
        "bootstrap: a new router ready in {bootstrap:.2?}; RSS {rss:.0} MiB (peak {peak:.0} MiB)"
    );

    // Backing up the running control plane, then restoring the file into a
    // new store (what an operator waits for after losing the disk).
    let backup = cluster.root.join("cp.backup");
    let started = Instant::now();
    cluster.cli_ok(&["backup", "--out", backup.to_str().context("path")?])?;
    let backed_up = started.elapsed();
    let size = std::fs::metadata(&backup)?.len() as f64 / (1 << 20) as f64;
    let started = Instant::now();
    homecell_control_plane::backup::restore(
        &backup,
        &Location::File(cluster.root.join("restored.redb")),
        1000,
    )?;
    println!(
        "backup of the running control plane: {backed_up:.1?}, {size:.0} MiB; restore into a new store: {:.1?}",
        started.elapsed()
    );

    cluster.stop_control_plane();
    let started = Instant::now();
    cluster.restart_router(0, "cn-east").await?;
    let restart = wait_ready(&cluster, started, Duration::from_secs(600)).await?;
    let pid = cluster.routers[0].process.as_ref().context("router")?.pid();
    let (rss, peak) = rss_mib(pid);
    println!(
        "restart with the control plane down: ready in {restart:.2?} from the persisted copy; RSS {rss:.0} MiB (peak {peak:.0} MiB)"
    );
    if let Some(mut p) = cluster.routers[0].process.take() {
        p.terminate(Duration::from_secs(5));
    }

    // Recovering a store from the stopped router's replica.
    let started = Instant::now();
    let (_, recovered) = homecell_control_plane::backup::recover(
        &cluster.root.join("router-0/replica.redb"),
        &Location::File(cluster.root.join("recovered.redb")),
        1000,
    )?;
    println!(
        "recover from the router's replica: {:.1?} ({} users, {} unreadable, {} claims reserved)",
        started.elapsed(),
        recovered.users,
        recovered.users_unreadable,
        recovered.claims_not_recoverable
    );
    if recovered.users as u64 != args.users {
        bail!("recovered {} users of {}", recovered.users, args.users);
    }

    let replica = Replica::open(&cluster.root.join("router-0/replica.redb"))?;
    let state = replica.state();
    let (users, claims) = state.directory.counts();
    if users as u64 != args.users || claims as u64 != args.users {
        bail!("the replica holds {users} users and {claims} claims");
    }
    let samples: Vec<u64> = (0..args.lookups)
        .map(|i| mix(i ^ 0x5eed) % args.users)
        .collect();
    for (what, by_user) in [("user id", true), ("identifier HMAC", false)] {
        let keys: Vec<(String, &str)> = samples
            .iter()
            .map(|n| {
                let (id, hmac) = user(*n);
                (if by_user { id } else { hmac }, region(*n))
            })
            .collect();
        let mut times = Vec::with_capacity(keys.len());
        for (k, want) in &keys {
            let t = Instant::now();
            let got = if by_user {
                state.user_region(k)
            } else {
                state.claim_region(k)
            };
            times.push(t.elapsed());
            if got != Some(*want) {
                bail!("{what} lookup answered {got:?}, not {want}");
            }
        }
        times.sort();
        println!(
            "lookup by {what}: p50 {:.2?}  p99 {:.2?}  p99.9 {:.2?}  max {:.2?}  ({} lookups, all correct)",
            percentile(&times, 0.50),
            percentile(&times, 0.99),
            percentile(&times, 0.999),
            times[times.len() - 1],
            times.len()
        );
    }
    Ok(())
}
