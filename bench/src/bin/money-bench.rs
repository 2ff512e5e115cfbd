//! Transfers/s with durable commits, and their latency.
//!
//! `ledger`: the ledger alone, in process, on a real datastore (SQLite with
//! `synchronous=FULL`, or PostgreSQL), as a cell writes it: same-cell
//! transfers from many concurrent senders, each one an operation row, two
//! balance updates, a ledger transfer and an outbox event. On SQLite through
//! the group committer the cell uses; `--no-group` shows the cost of one
//! fsync per transfer.
//!
//! `http`: the whole path. A real cluster (control plane, router, two
//! cells) from HOMECELL_BIN_DIR; same-cell transfers through the router
//! (201 = durable), then cross-cell transfers (202 = step 1 durable), and
//! the time until every cross-cell transfer is posted at both ends.
//!
//! Every answer is checked; failures count as errors, not throughput.

use clap::{Parser, Subcommand};
use homecell_cell::db::Datastore;
use homecell_cell::money::ledger::{
    Account, Ledger, Move, Operation, OutboxEvent, Phase, SideEffects,
};
use homecell_harness::api::Api;
use homecell_harness::{Cluster, start_standard};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The ledger on a datastore, in process.
    Ledger {
        /// sqlite (a temp file) or postgres (a private server started here).
        #[arg(long, default_value = "sqlite")]
        backend: String,
        #[arg(long, default_value_t = 256)]
        workers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// One commit per transfer, even on SQLite.
        #[arg(long)]
        no_group: bool,
    },
    /// Through a router into real cells.
    Http {
        #[arg(long, default_value_t = 64)]
        workers: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.latencies.extend(o.latencies);
    }

    fn report(&mut self, name: &str, secs: f64) {
        self.latencies.sort();
        let l = &self.latencies;
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{name:<24} {:>9.0}/s  ok {:>8}  errors {:>5}  p50 {:>8.2?}  p99 {:>8.2?}",
            self.ok as f64 / secs,
            self.ok,
            self.errors,
            pct(0.50),
            pct(0.99)
        );
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn transfer(id: String, from: &str, to: &str, amount: i64) -> (Operation, Vec<Move>, OutboxEvent) {
    let now = now_ms();
    let op = Operation {
        id: id.clone(),
        kind: "transfer".into(),
        actor: from.into(),
        request_hash: id.clone(),
        state: "posted".into(),
        from_user: Some(from.into()),
        to_user: Some(to.into()),
        amount,
        currency: "CNY".into(),
        created_at: now,
        updated_at: now,
        ..Default::default()
    };
    let m = Move {
        id: format!("{id}:single"),
        operation_id: id,
        debit: Account::wallet(from, "CNY"),
        credit: Account::wallet(to, "CNY"),
        amount,
        phase: Phase::Single,
        pending_id: None,
    };
    let event = OutboxEvent {
        topic: "money.received",
        user_id: to.into(),
        payload: "{}".into(),
        trace: None,
    };
    (op, vec![m], event)
}

async fn ledger(backend: &str, workers: usize, seconds: u64, no_group: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let _pg;
    let db = if backend == "postgres" {
        let pg = homecell_harness::postgres::TempPostgres::start()?;
        let url = pg.create_database("bench")?;
        _pg = pg;
        Datastore::open(&url).await?
    } else {
        Datastore::open(&format!("sqlite:{}", dir.path().join("cell.db").display())).await?
    };
    db.claim_region("bench").await?;
    let grouped = db.single_writer() && !no_group;
    let ledger = if grouped {
        Ledger::new(db.clone())
    } else {
        Ledger::per_statement(db.clone())
    };
    // Each worker sends from its own wallet to one of 1,000 receivers.
    for w in 0..workers {
        let (mut op, moves, _) = transfer(format!("seed-{w}"), "system", &format!("s{w}"), 1 << 40);
        op.from_user = None;
        let mut moves = moves;
        moves[0].debit = Account::system("deposits", "CNY");
        ledger.execute(&op, &moves, &SideEffects::default()).await?;
    }
    let seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (ledger, seq) = (ledger.clone(), seq.clone());
            tokio::spawn(async move {
                let mut o = Outcome::default();
                while Instant::now() < deadline {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let (op, moves, event) = transfer(
                        format!("t-{n}"),
                        &format!("s{w}"),
                        &format!("r{}", n % 1000),
                        1,
                    );
                    let t = Instant::now();
                    let side = SideEffects {
                        event: Some(event),
                        audit: None,
                    };
                    let r = ledger.execute(&op, &moves, &side).await;
                    match r {
                        Ok(()) => {
                            o.ok += 1;
                            o.latencies.push(t.elapsed());
                        }
                        Err(_) => o.errors += 1,
                    }
                }
                o
            })
        })
        .collect();
    let mut total = Outcome::default();
    for t in tasks {
        total.merge(t.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    let mode = if grouped {
        "group commit"
    } else {
        "commit each"
    };
    total.report(&format!("{backend} same-cell ({mode})"), secs);
    let report = homecell_cell::money::audit::audit(std::slice::from_ref(&db)).await?;
    anyhow::ensure!(report.passed(), "audit failed:\n{}", report.render());
    println!("audit passed after the run");
    Ok(())
}

async fn http(workers: usize, seconds: u64) -> anyhow::Result<()> {
    const SECRET: &str = "bench-provider-secret-0123456789";
    let mut c = Cluster::temp()?;
    c.cell_extra_config = format!(
        "login_attempts_per_ip_per_minute = 100000000\n[payments.bench]\nsecret = {SECRET:?}\n"
    );
    start_standard(&mut c).await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;
    let cn = Api::new(&c.router_url(0), "cn-east");
    let eu = Api::new(&c.router_url(0), "eu-west");
    let mut senders = Vec::new();
    for w in 0..workers {
        let (api, login) = cn
            .signed_in(&format!("sender{w}"), "bench password 1")
            .await?;
        let id = login["user_id"].as_str().unwrap_or_default().to_string();
        let r = cn
            .provider_deposit("bench", SECRET, &format!("seed-{w}"), &id, 1 << 40)
            .await?;
        anyhow::ensure!(r.status == 200, "deposit: {}", r.body);
        senders.push(api);
    }
    let (_, near) = cn.signed_in("receiver-cn", "bench password 1").await?;
    let (far_api, far) = eu.signed_in("receiver-eu", "bench password 1").await?;
    let near = near["user_id"].as_str().unwrap_or_default().to_string();
    let far = far["user_id"].as_str().unwrap_or_default().to_string();

    for (name, to, expect) in [
        ("same-cell (201)", &near, 201u16),
        ("cross-cell (202)", &far, 202),
    ] {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let seq = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = senders
            .iter()
            .map(|api| {
                let (api, to, seq) = (api.clone(), to.clone(), seq.clone());
                tokio::spawn(async move {
                    let mut o = Outcome::default();
                    while Instant::now() < deadline {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        let key = format!("00000000-0000-4000-8{:03x}-{n:012x}", expect);
                        let body = json!({"to_user_id": to, "amount": 1, "currency": "CNY"});
                        let t = Instant::now();
                        match api.transfer(&key, body).await {
                            Ok(r) if r.status.as_u16() == expect => {
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
        let mut total = Outcome::default();
        for t in tasks {
            total.merge(t.await?);
        }
        total.report(name, started.elapsed().as_secs_f64());
        if expect == 202 {
            // Until the receiver holds every accepted transfer, posted.
            let want = total.ok as i64;
            loop {
                if far_api.available("CNY").await? >= want {
                    break;
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(seconds * 20),
                    "cross-cell transfers did not settle"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{:<24} {:>9.0}/s  ({} posted at both ends after {secs:.1} s)",
                "cross-cell settled",
                want as f64 / secs,
                want
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {cores} cores");
    match Args::parse().mode {
        Mode::Ledger {
            backend,
            workers,
            seconds,
            no_group,
        } => ledger(&backend, workers, seconds, no_group).await,
        Mode::Http { workers, seconds } => http(workers, seconds).await,
    }
}
