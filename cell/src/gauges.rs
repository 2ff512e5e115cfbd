//! What the datastore holds, sampled for `/metrics`: the outbox's depth and
//! the age of its oldest event, deliveries waiting and dead, live sessions,
//! unfinished cross-cell transfers and the oldest one's age, clearing
//! balances, the pool's connections, and, less often, the ledger audit.
//!
//! Sampled on a timer rather than at scrape time: a scrape (or a stranger
//! who reaches the admin port) never costs the datastore a query, and
//! several instances of one cell sample the same rows, so alerts on these
//! take the `max` over a region's instances.

use crate::db::{Datastore, stmt};
use crate::metrics as m;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the counts are read: well under any alert's `for`.
const EVERY: Duration = Duration::from_secs(15);

/// The steps a coordinator takes for a cross-cell transfer; a withdrawal's
/// step names its payout provider and counts as `payout`.
const STEPS: &[&str] = &["hold_peer", "post_peer", "void_peer"];

pub async fn run(db: Datastore, audit_every: Option<Duration>, token: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut audited: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sample(&db).await {
            tracing::warn!(error = %e, "cannot sample the datastore for metrics");
        }
        if let Some(every) = audit_every
            && audited.is_none_or(|at| at.elapsed() >= every)
        {
            audited = Some(tokio::time::Instant::now());
            audit(&db).await;
        }
    }
}

async fn sample(db: &Datastore) -> anyhow::Result<()> {
    let now = crate::clock::now_ms();
    let age = |oldest: Option<i64>| oldest.map_or(0, |t| (now - t).max(0) / 1000);

    let (pending, oldest): (i64, Option<i64>) =
        stmt("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE delivered_at IS NULL")
            .fetch_one(db)
            .await?;
    m::OUTBOX_PENDING.set(pending);
    m::OUTBOX_OLDEST_AGE.set(age(oldest));

    // One query per state, each on its partial index (deliveries_due,
    // deliveries_dead): sent rows, the most by far, are never read.
    let pending: i64 = stmt("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
        .scalar(db)
        .await?;
    m::DELIVERIES_PENDING.set(pending);
    let dead: i64 = stmt("SELECT COUNT(*) FROM deliveries WHERE state = 'dead'")
        .scalar(db)
        .await?;
    m::DELIVERIES_DEAD.set(dead);

    // On sessions_live (migration 0013): ended sessions are not read.
    let sessions: i64 =
        stmt("SELECT COUNT(*) FROM sessions WHERE revoked_at IS NULL AND expires_at > $1")
            .bind(now)
            .scalar(db)
            .await?;
    m::SESSIONS_ACTIVE.set(sessions);

    let in_flight: Vec<(String, String, i64, i64)> = stmt(
        "SELECT kind, saga_step, COUNT(*), MIN(created_at) FROM money_operations \
         WHERE saga_step IS NOT NULL AND saga_step <> 'done' GROUP BY kind, saga_step",
    )
    .fetch_all(db)
    .await?;
    m::TRANSFERS_IN_FLIGHT.reset();
    for step in STEPS.iter().chain(&["payout", "other"]) {
        m::TRANSFERS_IN_FLIGHT.with_label_values(&[step]).set(0);
    }
    let mut oldest = None::<i64>;
    for (kind, step, n, first) in &in_flight {
        let label = if kind == "withdrawal" {
            "payout"
        } else {
            STEPS
                .iter()
                .find(|s| *s == step)
                .copied()
                .unwrap_or("other")
        };
        m::TRANSFERS_IN_FLIGHT.with_label_values(&[label]).add(*n);
        oldest = Some(oldest.map_or(*first, |o| o.min(*first)));
    }
    m::TRANSFER_OLDEST_AGE.set(age(oldest));

    // Peers are regions, currencies the configured ones: few series. A
    // region gone from the ledger leaves the gauge with it. On
    // ledger_accounts_clearing (migration 0013), not the wallets.
    let clearing: Vec<(Option<String>, String, i64)> = stmt(
        "SELECT owner, currency, credits_posted - debits_posted FROM ledger_accounts \
         WHERE kind = 'clearing'",
    )
    .fetch_all(db)
    .await?;
    m::CLEARING_BALANCE.reset();
    for (peer, currency, balance) in &clearing {
        m::CLEARING_BALANCE
            .with_label_values(&[peer.as_deref().unwrap_or("unknown"), currency])
            .set(*balance);
    }

    let (size, idle) = db.pool_connections();
    let idle = i64::try_from(idle).unwrap_or(i64::MAX);
    m::POOL_CONNECTIONS.with_label_values(&["idle"]).set(idle);
    m::POOL_CONNECTIONS
        .with_label_values(&["busy"])
        .set(i64::from(size) - idle);
    Ok(())
}

/// This cell's own ledger audit (`cell audit` without peers): the gauges
/// say whether it passed and when; a failure is logged with its findings.
async fn audit(db: &Datastore) {
    match crate::money::audit::audit(std::slice::from_ref(db)).await {
        Ok(report) => {
            let passed = report.passed();
            m::AUDIT_OK.set(i64::from(passed));
            m::AUDIT_TIME.set(crate::clock::now_ms() / 1000);
            if !passed {
                // The findings name accounts (user ids): `cell audit` shows
                // them to the operator, not the log.
                tracing::error!(
                    "the ledger audit FAILED; run `cell audit` on this cell's host for the findings"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot run the ledger audit"),
    }
}
