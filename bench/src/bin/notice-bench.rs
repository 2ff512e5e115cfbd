//! Notice throughput and event-to-inbox delay, on a real SQLite datastore
//! (`synchronous=FULL`) with the cell's own notice worker.
//!
//! 1. drain: a backlog of in-app events, written at once; how fast the
//!    worker turns them into inbox items.
//! 2. steady: events written at a fixed rate, committed every 10 ms as the
//!    cell's own (group-committed) writers do; the delay from each event's
//!    commit to its inbox item, p50 and p99.
//! 3. smtp: a backlog of email events delivered to a real SMTP server
//!    (aiosmtpd on loopback); deliveries/s.

use clap::Parser;
use homecell_cell::db::Datastore;
use homecell_cell::identity::store::{IdentityStore, NewUser};
use homecell_cell::notice::{NoticeConfig, Notices, SmtpConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Users the events are spread over.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Events in the drain phase.
    #[arg(long, default_value_t = 20_000)]
    backlog: usize,
    /// Events per second in the steady phase.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Emails in the SMTP phase (0 skips it).
    #[arg(long, default_value_t = 2_000)]
    emails: usize,
}

fn now_ms() -> i64 {
    homecell_cell::clock::now_ms()
}

async fn count(db: &Datastore, sql: &'static str) -> anyhow::Result<i64> {
    let Datastore::Sqlite(p, ..) = db else {
        anyhow::bail!("sqlite only")
    };
    Ok(sqlx::query_scalar(sql).fetch_one(p).await?)
}

/// Writes `n` events in one transaction.
async fn backlog(
    db: &Datastore,
    topic: &str,
    payload: &str,
    users: usize,
    n: usize,
    tag: &str,
) -> anyhow::Result<()> {
    let Datastore::Sqlite(p, ..) = db else {
        anyhow::bail!("sqlite only")
    };
    let mut tx = p.begin().await?;
    for i in 0..n {
        sqlx::query("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(format!("{tag}-{i}"))
            .bind(topic)
            .bind(format!("u{}", i % users))
            .bind(payload)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn wait_until(
    db: &Datastore,
    sql: &'static str,
    target: i64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while count(db, sql).await? < target {
        anyhow::ensure!(t.elapsed() < limit, "not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir()?;
    let db = Datastore::open(&format!("sqlite:{}", dir.path().join("cell.db").display())).await?;
    db.claim_region("bench").await?;
    let identity = IdentityStore::new(db.clone());
    for i in 0..args.users {
        let id = format!("u{i}");
        let email = format!("u{i}@bench.test");
        identity
            .create_user(&NewUser {
                id: &id,
                display_name: &id,
                kind: "email",
                value: &email,
                password_hash: "x",
                now: now_ms(),
            })
            .await?;
    }
    let mail = if args.emails > 0 {
        Some(homecell_harness::smtp::SmtpSink::start().await?)
    } else {
        None
    };
    let replica = homecell_common::replica::Replica::open(&dir.path().join("replica.redb"))?;
    let config = NoticeConfig {
        email_from: mail
            .as_ref()
            .map(|_| "Bench <bench@bench.test>".to_string()),
        smtp: mail.as_ref().map(|m| SmtpConfig {
            host: "127.0.0.1".into(),
            port: m.port,
            security: "none".into(),
            username: None,
            password_file: None,
        }),
        ..NoticeConfig::default()
    };
    // The users' welcome events are not part of the measurement.
    if let Datastore::Sqlite(p, ..) = &db {
        sqlx::query("UPDATE outbox SET delivered_at = 0")
            .execute(p)
            .await?;
    }
    let notices = Arc::new(Notices::new("bench", db.clone(), replica, config)?);
    let token = tokio_util::sync::CancellationToken::new();
    tokio::spawn(notices.clone().run(token.clone()));
    println!(
        "machine: {cores} cores; SQLite synchronous=FULL; {} users",
        args.users
    );

    // 1. drain
    let base = count(&db, "SELECT COUNT(*) FROM inbox").await?;
    let msg = r#"{"title":"Hello","text":"A message for you"}"#;
    backlog(&db, "message", msg, args.users, args.backlog, "drain").await?;
    let took = wait_until(
        &db,
        "SELECT COUNT(*) FROM inbox",
        base + args.backlog as i64,
        Duration::from_secs(300),
    )
    .await?;
    println!(
        "drain   {:>8.0} in-app notices/s  ({} events in {:.2} s)",
        args.backlog as f64 / took.as_secs_f64(),
        args.backlog,
        took.as_secs_f64()
    );

    // 2. steady rate: events committed every 10 ms in small transactions,
    // as the cell's own writers (group-committed transfers, logins) do.
    let base = count(&db, "SELECT COUNT(*) FROM inbox").await?;
    let ticks = args.seconds * 100;
    let per_tick = (args.rate / 100).max(1) as usize;
    let total = ticks as usize * per_tick;
    let started = Instant::now();
    {
        let Datastore::Sqlite(p, ..) = &db else {
            unreachable!()
        };
        for t in 0..ticks {
            let due = Duration::from_millis(t * 10);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let mut tx = p.begin().await?;
            for k in 0..per_tick {
                let n = t as usize * per_tick + k;
                sqlx::query("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, 'message', $2, $3, $4)")
                    .bind(format!("steady-{n}"))
                    .bind(format!("u{}", n % args.users))
                    .bind(r#"{"title":"Hi","text":"steady"}"#)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
    }
    let offered = started.elapsed();
    wait_until(
        &db,
        "SELECT COUNT(*) FROM inbox",
        base + total as i64,
        Duration::from_secs(120),
    )
    .await?;
    let Datastore::Sqlite(p, ..) = &db else {
        unreachable!()
    };
    let mut delays: Vec<i64> = sqlx::query_scalar(
        "SELECT i.created_at - o.created_at FROM inbox i JOIN outbox o ON o.id = i.event_id WHERE o.id LIKE 'steady-%'",
    )
    .fetch_all(p)
    .await?;
    delays.sort();
    let pct = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)];
    println!(
        "steady  {:>8.0} events/s offered for {:.1} s; event → inbox p50 {} ms, p99 {} ms, max {} ms",
        total as f64 / offered.as_secs_f64(),
        offered.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        delays[delays.len() - 1]
    );

    // 3. email to a real SMTP server
    if args.emails > 0 {
        let Datastore::Sqlite(p, ..) = &db else {
            unreachable!()
        };
        let sent_before: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE state = 'sent'")
                .fetch_one(p)
                .await?;
        let login = r#"{"client_type":"web"}"#;
        backlog(
            &db,
            "auth.new_login",
            login,
            args.users,
            args.emails,
            "mail",
        )
        .await?;
        let took = wait_until(
            &db,
            "SELECT COUNT(*) FROM deliveries WHERE state = 'sent'",
            sent_before + args.emails as i64,
            Duration::from_secs(600),
        )
        .await?;
        println!(
            "smtp    {:>8.0} emails/s to aiosmtpd  ({} in {:.2} s)",
            args.emails as f64 / took.as_secs_f64(),
            args.emails,
            took.as_secs_f64()
        );
    }
    token.cancel();
    Ok(())
}
