//! Per-request cost at production data sizes: the same requests on a cell
//! that is empty and on one that holds a million users.
//!
//! Starts a whole local cluster from the binaries in HOMECELL_BIN_DIR (use
//! release builds) and signs in one user per worker. Then, twice (first on
//! the cell as it is, then after filling it), runs five workloads through
//! the router for a fixed time each: password logins, refresh rotations,
//! token-checked `GET /v1/users/me`, same-cell transfers and an inbox page.
//! Each is reported as requests per second and as the cell's own CPU time
//! per request (utime + stime from /proc, so the load generator and the
//! router do not count).
//!
//! The fill writes straight into the cell's SQLite file, in large
//! transactions, while the cell runs (WAL lets it): `--users` users, each
//! with an identifier, a password hash, the `user` role, two sessions (app
//! and web) with a refresh token each, ten posted deposits (an operation
//! and its ledger transfer) and five inbox items. At the defaults that is
//! 1 million users, 2 million sessions, 10 million ledger operations and 5
//! million inbox items. The balances it writes add up, so `cell audit`
//! still passes. Every request is checked: an unexpected answer counts as
//! an error, not as throughput.

use clap::Parser;
use homecell_bench::cpu;
use homecell_harness::api::Api;
use rusqlite::{Connection, params};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Seconds per workload.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Users to add; sessions, operations and inbox items follow from it.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
}

const PW: &str = "bench password 1";
const SECRET: &str = "bench-provider-secret-0123456789";
/// Rows per fill transaction.
const CHUNK: u64 = 20_000;

#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
}

/// One workload's figures.
struct Figures {
    rate: f64,
    cpu_us: f64,
    errors: u64,
}

/// Runs `one` from every worker until the deadline; `one(w)` is worker
/// `w`'s next request and says whether its answer was the expected one.
async fn run<F, Fut>(cell: &[u32], workers: usize, seconds: u64, one: F) -> anyhow::Result<Figures>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let before = cpu::seconds(cell);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let one = one.clone();
            tokio::spawn(async move {
                let mut o = Outcome::default();
                while Instant::now() < deadline {
                    if one(w).await {
                        o.ok += 1;
                    } else {
                        o.errors += 1;
                    }
                }
                o
            })
        })
        .collect();
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await?;
        total.ok += o.ok;
        total.errors += o.errors;
    }
    let used = cpu::seconds(cell) - before;
    Ok(Figures {
        rate: total.ok as f64 / started.elapsed().as_secs_f64(),
        cpu_us: used * 1e6 / total.ok.max(1) as f64,
        errors: total.errors,
    })
}

/// What every workload needs: each worker's identifier, refresh token and
/// user id (the others send it money).
struct Clients {
    names: Vec<String>,
    refresh: Vec<tokio::sync::Mutex<String>>,
    ids: Vec<String>,
}

async fn workloads(
    api: &Api,
    c: &Arc<Clients>,
    cell: &[u32],
    args: &Args,
) -> anyhow::Result<Vec<(&'static str, Figures)>> {
    let (w, s) = (args.workers, args.seconds);
    let mut out = Vec::new();
    let (a, cl) = (api.clone(), c.clone());
    out.push((
        "password login",
        run(cell, w, s, move |i| {
            let (a, cl) = (a.clone(), cl.clone());
            async move { matches!(a.login(&cl.names[i], PW).await, Ok(r) if r.status == 200) }
        })
        .await?,
    ));
    // A fresh refresh token per worker: the login phase replaced them.
    for (i, name) in c.names.iter().enumerate() {
        let l = api.login(name, PW).await?;
        *c.refresh[i].lock().await = l.body["refresh_token"].as_str().unwrap_or("").into();
    }
    let (a, cl) = (api.clone(), c.clone());
    out.push((
        "refresh rotation",
        run(cell, w, s, move |i| {
            let (a, cl) = (a.clone(), cl.clone());
            async move {
                let mut token = cl.refresh[i].lock().await;
                match a
                    .post("/v1/auth/refresh", json!({"refresh_token": *token}))
                    .await
                {
                    Ok(r) if r.status == 200 => {
                        *token = r.body["refresh_token"].as_str().unwrap_or("").into();
                        true
                    }
                    _ => false,
                }
            }
        })
        .await?,
    ));
    // Fresh access tokens for the rest (the sessions were rotated).
    let mut apis = Vec::new();
    for name in &c.names {
        apis.push(api.signed_in(name, PW).await?.0);
    }
    let apis = Arc::new(apis);
    let a = apis.clone();
    out.push((
        "GET /v1/users/me",
        run(cell, w, s, move |i| {
            let a = a.clone();
            async move { matches!(a[i].get("/v1/users/me").await, Ok(r) if r.status == 200) }
        })
        .await?,
    ));
    let (a, cl) = (apis.clone(), c.clone());
    let seq = Arc::new(AtomicU64::new(0));
    out.push((
        "same-cell transfer",
        run(cell, w, s, move |i| {
            let (a, cl, seq) = (a.clone(), cl.clone(), seq.clone());
            async move {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let key = uuid::Uuid::new_v4().to_string();
                let to = &cl.ids[(i + 1 + (n as usize % (cl.ids.len() - 1))) % cl.ids.len()];
                let body = json!({"to_user_id": to, "amount": 1, "currency": "CNY"});
                matches!(a[i].transfer(&key, body).await, Ok(r) if r.status.as_u16() == 201)
            }
        })
        .await?,
    ));
    let a = apis.clone();
    out.push((
        "inbox page (20)",
        run(cell, w, s, move |i| {
            let a = a.clone();
            async move { matches!(a[i].get("/v1/notices?limit=20").await, Ok(r) if r.status == 200) }
        })
        .await?,
    ));
    Ok(out)
}

/// A v7-shaped id: time-ordered, as the cell's own ids are.
fn id(ms: u64, n: u64) -> String {
    uuid::Uuid::from_u128(((ms as u128) << 80) | (0x7 << 76) | (0x8 << 60) | n as u128).to_string()
}

/// Adds the production-size rows to the SQLite file at `path`.
fn fill(path: &std::path::Path, users: u64, hash: &str) -> anyhow::Result<()> {
    let mut db = Connection::open(path)?;
    db.busy_timeout(Duration::from_secs(30))?;
    // This connection's commits need not reach the disk one by one: the
    // fill is redone if the machine stops.
    db.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1000000;")?;
    let base: u64 = 1_700_000_000_000;
    let started = Instant::now();
    let mut done = 0;
    while done < users {
        let end = (done + CHUNK / 20).min(users);
        let tx = db.transaction()?;
        {
            let mut user = tx.prepare_cached("INSERT INTO users (id, status, display_name, version, created_at, updated_at) VALUES (?1, 'active', ?2, 1, ?3, ?3)")?;
            let mut ident = tx.prepare_cached(
                "INSERT INTO identifiers (kind, value, user_id) VALUES ('email', ?1, ?2)",
            )?;
            let mut cred = tx.prepare_cached("INSERT INTO credentials (user_id, password_hash, attempts, updated_at) VALUES (?1, ?2, 0, ?3)")?;
            let mut role = tx.prepare_cached(
                "INSERT INTO user_roles (user_id, role, granted_at) VALUES (?1, 'user', ?2)",
            )?;
            let mut session = tx.prepare_cached("INSERT INTO sessions (id, user_id, client_type, created_at, last_used_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?4, ?5)")?;
            let mut token = tx.prepare_cached("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES (?1, ?2, ?3)")?;
            let mut account = tx.prepare_cached("INSERT INTO ledger_accounts (id, kind, owner, currency, credits_posted, created_at) VALUES (?1, 'wallet', ?2, 'CNY', 10, ?3)")?;
            let mut op = tx.prepare_cached("INSERT INTO money_operations (id, kind, actor, request_hash, state, to_user, amount, currency, created_at, updated_at) VALUES (?1, 'deposit', 'provider:load', ?1, 'posted', ?2, 1, 'CNY', ?3, ?3)")?;
            let mut transfer = tx.prepare_cached("INSERT INTO ledger_transfers (id, operation_id, debit_account, credit_account, amount, phase, created_at) VALUES (?1 || ':single', ?1, 'system:deposits:CNY', ?2, 1, 'single', ?3)")?;
            let mut inbox = tx.prepare_cached("INSERT INTO inbox (id, user_id, event_id, category, title, body, created_at, expires_at) VALUES (?1, ?2, ?1, 'account', 'Welcome', 'Welcome to the service, and thank you for joining.', ?3, ?4)")?;
            for u in done..end {
                let at = base + u * 10;
                let uid = id(at, u);
                user.execute(params![uid, format!("user {u}"), at as i64])?;
                ident.execute(params![format!("load{u}@example.test"), uid])?;
                cred.execute(params![uid, hash, at as i64])?;
                role.execute(params![uid, at as i64])?;
                for (k, ct) in ["app", "web"].into_iter().enumerate() {
                    let sid = id(at + 1, u * 2 + k as u64);
                    let far = (at + 30 * 86_400_000) as i64;
                    session.execute(params![sid, uid, ct, at as i64, far])?;
                    let hash = homecell_common::hex::sha256(&sid);
                    token.execute(params![hash, sid, at as i64])?;
                }
                let wallet = format!("wallet:{uid}:CNY");
                account.execute(params![wallet, uid, at as i64])?;
                for k in 0..10 {
                    let oid = id(at + 2 + k, u * 10 + k);
                    op.execute(params![oid, uid, (at + 2 + k) as i64])?;
                    transfer.execute(params![oid, wallet, (at + 2 + k) as i64])?;
                }
                for k in 0..5 {
                    let iid = id(at + 3 + k, u * 5 + k);
                    inbox.execute(params![iid, uid, (at + 3 + k) as i64, i64::MAX / 2])?;
                }
            }
        }
        tx.commit()?;
        done = end;
        if done % 100_000 == 0 || done == users {
            println!(
                "  filled {done} users in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    // What the deposits took from the system's account.
    db.execute(
        "INSERT INTO ledger_accounts (id, kind, currency, debits_posted, created_at) VALUES ('system:deposits:CNY', 'deposits', 'CNY', ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET debits_posted = debits_posted + ?1",
        params![(users * 10) as i64, base as i64],
    )?;
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")?;
    Ok(())
}

fn table(empty: &[(&str, Figures)], full: &[(&str, Figures)]) {
    println!(
        "\n| workload | empty: /s | full: /s | empty: cell µs per request | full: cell µs per request | full ÷ empty (cost) | errors |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ((name, e), (_, f)) in empty.iter().zip(full) {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} / {} |",
            e.rate,
            f.rate,
            e.cpu_us,
            f.cpu_us,
            f.cpu_us / e.cpu_us,
            e.errors,
            f.errors
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.workers >= 2,
        "at least two workers: they send each other money"
    );
    // Every worker comes from the one address.
    let cluster = homecell_bench::load::one_address_cluster(&format!(
        "[payments.bench]\nsecret = {SECRET:?}\n"
    ))
    .await?;
    cluster.wait_signing_keys(Duration::from_secs(15)).await?;
    let api = Api::new(&cluster.router_url(0), "cn-east");
    let cell = [cluster.cells["cn-east"]
        .process
        .as_ref()
        .map(|p| p.pid())
        .ok_or_else(|| anyhow::anyhow!("the cn-east cell is not running"))?];

    let mut c = Clients {
        names: Vec::new(),
        refresh: Vec::new(),
        ids: Vec::new(),
    };
    for i in 0..args.workers {
        let name = format!("size{i}@bench.test");
        let (_, login) = api.signed_in(&name, PW).await?;
        let uid = login["user_id"].as_str().unwrap_or_default().to_string();
        let r = api
            .provider_deposit("bench", SECRET, &format!("seed-{i}"), &uid, 1 << 40)
            .await?;
        anyhow::ensure!(r.status == 200, "deposit: {}", r.body);
        c.names.push(name);
        c.refresh.push(tokio::sync::Mutex::new(String::new()));
        c.ids.push(uid);
    }
    // Each worker's inbox holds more than a page, on both runs.
    {
        let db = Connection::open(cluster.cell_sqlite_path("cn-east"))?;
        db.busy_timeout(Duration::from_secs(30))?;
        for (w, uid) in c.ids.iter().enumerate() {
            for k in 0..25u64 {
                db.execute(
                    "INSERT INTO inbox (id, user_id, event_id, category, title, body, created_at, expires_at) \
                     VALUES (?1, ?2, ?1, 'account', 'Hello', 'A notice of the kind a user keeps.', ?3, ?4)",
                    params![id(1_790_000_000_000 + k, w as u64 * 100 + k), uid, (1_790_000_000_000 + k) as i64, i64::MAX / 2],
                )?;
            }
        }
    }
    let c = Arc::new(c);
    println!(
        "machine: {} cores; {} workers; {} s per workload",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.workers,
        args.seconds
    );

    println!("empty cell:");
    let empty = workloads(&api, &c, &cell, &args).await?;
    for (name, f) in &empty {
        println!(
            "  {name:<20} {:>8.0}/s  {:>7.0} µs of cell CPU each  errors {}",
            f.rate, f.cpu_us, f.errors
        );
    }

    // The cell's own hash of the bench password: every loaded user has a
    // real argon2id hash, though none will log in.
    let hash: String = {
        let db = Connection::open(cluster.cell_sqlite_path("cn-east"))?;
        db.query_row("SELECT password_hash FROM credentials LIMIT 1", [], |r| {
            r.get(0)
        })?
    };
    println!("filling: {} users", args.users);
    let path = cluster.cell_sqlite_path("cn-east");
    let users = args.users;
    tokio::task::spawn_blocking(move || fill(&path, users, &hash)).await??;
    let size = std::fs::metadata(cluster.cell_sqlite_path("cn-east"))?.len();
    println!(
        "cell datastore: {:.1} GiB",
        size as f64 / (1u64 << 30) as f64
    );

    println!("full cell:");
    let full = workloads(&api, &c, &cell, &args).await?;
    for (name, f) in &full {
        println!(
            "  {name:<20} {:>8.0}/s  {:>7.0} µs of cell CPU each  errors {}",
            f.rate, f.cpu_us, f.errors
        );
    }
    table(&empty, &full);
    Ok(())
}
