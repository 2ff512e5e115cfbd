//! The ledger's per-statement write path: each write in a transaction of
//! its own (PostgreSQL, and on SQLite a write that carries an audit entry).
//!
//! Every balance change here goes through `apply_moves`: it reads the
//! operation's accounts locked, in account-id order, lets `rule::apply`
//! judge each move, and writes the result. An operation and its transfers
//! commit together or not at all. The other path, SQLite's group
//! committer, is `group.rs`; `Ledger` (ledger.rs) chooses between them.

use super::ledger::{
    Account, LedgerError, LedgerResult, Move, Operation, Retarget, SideEffects, StepUpdate, op_cols,
};
use super::rule;
use crate::db::audit::insert_audit;
use crate::db::{Datastore, DbResult, Locking, Tx, built, stmt};

/// Records `op` and applies its moves in one transaction of its own.
pub(super) async fn execute(
    db: &Datastore,
    op: &Operation,
    moves: &[Move],
    side: &SideEffects<'_>,
) -> LedgerResult<()> {
    let now = op.created_at;
    let mut tx = db.begin().await?;
    insert_op(&mut tx, op).await?;
    apply_moves(&mut tx, moves, now).await?;
    side_effects(&mut tx, side, now).await?;
    tx.commit().await?;
    Ok(())
}

/// Moves an operation from (`state`, `saga_step`) to `to` and applies
/// `moves` in one transaction of its own; false when it had moved on.
pub(super) async fn advance(
    db: &Datastore,
    id: &str,
    (state, saga_step): (&str, Option<&str>),
    to: &StepUpdate<'_>,
    moves: &[Move],
    side: &SideEffects<'_>,
    now: i64,
) -> LedgerResult<bool> {
    let mut tx = db.begin().await?;
    let changed = stmt(
        "UPDATE money_operations SET state = $1, saga_step = $2, error_code = COALESCE($3, error_code), \
         error_detail = COALESCE($4, error_detail), attempts = 0, next_attempt_at = $5, updated_at = $5 \
         WHERE id = $6 AND state = $7 AND COALESCE(saga_step, '') = $8",
    )
    .bind(to.state)
    .bind(to.saga_step)
    .bind(to.error_code)
    .bind(to.error_detail)
    .bind(now)
    .bind(id)
    .bind(state)
    .bind(saga_step.unwrap_or(""))
    .execute(&mut tx)
    .await?;
    finish_step(tx, changed == 1, moves, side, now).await
}

/// The rest of a conditional step's transaction: its moves and side
/// effects if the operation was where the caller saw it (`matched`), else
/// nothing; committed either way.
async fn finish_step(
    mut tx: Tx,
    matched: bool,
    moves: &[Move],
    side: &SideEffects<'_>,
    now: i64,
) -> LedgerResult<bool> {
    if !matched {
        // Committed, not dropped: a dropped SQLite transaction rolls
        // back after the writer lock is released, and the next writer
        // would meet it in SQLite's busy handler.
        tx.commit().await?;
        return Ok(false);
    }
    apply_moves(&mut tx, moves, now).await?;
    side_effects(&mut tx, side, now).await?;
    tx.commit().await?;
    Ok(true)
}

/// Re-aims a transfer between cells still at its first step (`saga.rs`,
/// `follow_receiver`): its peer and count of re-aims change and `moves`
/// apply, in one transaction of its own; false when another worker re-aimed
/// or aborted it first. Rare, so never through the group committer.
pub(super) async fn retarget(
    db: &Datastore,
    op: &Operation,
    to: &Retarget<'_>,
    moves: &[Move],
    side: &SideEffects<'_>,
    now: i64,
) -> LedgerResult<bool> {
    let mut tx = db.begin().await?;
    let changed = stmt(
        "UPDATE money_operations SET peer_region = $1, retargets = $2, state = $3, saga_step = $4, \
         attempts = 0, next_attempt_at = $5, updated_at = $5 \
         WHERE id = $6 AND state = 'pending' AND saga_step = 'hold_peer' AND retargets = $7",
    )
    .bind(to.peer_region)
    .bind(op.retargets + 1)
    .bind(to.state)
    .bind(to.saga_step)
    .bind(now)
    .bind(&op.id)
    .bind(op.retargets)
    .execute(&mut tx)
    .await?;
    finish_step(tx, changed == 1, moves, side, now).await
}

/// Writes `moves` inside the transaction `tx`, judged by the ledger's one
/// rule (`rule.rs`). A refusal leaves the transaction to be rolled back by
/// the caller's `?`.
async fn apply_moves(tx: &mut Tx, moves: &[Move], now: i64) -> LedgerResult<()> {
    if moves.is_empty() {
        return Ok(());
    }
    let mut accounts: Vec<&Account> = moves.iter().flat_map(|m| [&m.debit, &m.credit]).collect();
    accounts.sort_by(|a, b| a.id.cmp(&b.id));
    accounts.dedup_by(|a, b| a.id == b.id);
    // Every account exists and is read (and, where rows lock, locked) in the
    // byte order of the ids. SQLite reads first and creates only what is
    // missing: its write transaction holds the whole database, and most
    // transfers touch accounts that exist. PostgreSQL creates first, so
    // every transaction takes its inserts' waits before any row lock, in
    // one order. `COLLATE "C"` makes that order the bytes' whatever the
    // database's collation, so every instance, of any version, locks in the
    // one order the inserts before it use; SQLite's ids compare as bytes.
    let (order_and_lock, mut read_first) = match tx.locking() {
        Locking::Database => (" ORDER BY id", true),
        Locking::Rows => (" ORDER BY id COLLATE \"C\" FOR UPDATE", false),
    };
    let select = format!(
        "SELECT id, debits_pending, debits_posted, credits_pending, credits_posted FROM ledger_accounts \
         WHERE id IN ({}){order_and_lock}",
        placeholders(accounts.len(), 1, 1)
    );
    let mut view = rule::View::new();
    loop {
        if !read_first {
            let missing: Vec<&&Account> = accounts
                .iter()
                .filter(|a| !view.contains_key(&a.id))
                .collect();
            // Only placeholders are formatted in.
            let mut insert = built(format!(
                "INSERT INTO ledger_accounts (id, kind, owner, currency, created_at) VALUES {} ON CONFLICT (id) DO NOTHING",
                placeholders(missing.len(), 5, 1)
            ));
            for a in &missing {
                insert = insert
                    .bind(&a.id)
                    .bind(a.kind)
                    .bind(&a.owner)
                    .bind(&a.currency)
                    .bind(now);
            }
            insert.execute(&mut *tx).await?;
        }
        // Only placeholders and a fixed suffix are formatted in.
        let mut read = built(select.clone());
        for a in &accounts {
            read = read.bind(&a.id);
        }
        let rows: Vec<(String, i64, i64, i64, i64)> = read.fetch_all(&mut *tx).await?;
        view.clear();
        for (id, debits_pending, debits_posted, credits_pending, credits_posted) in rows {
            view.insert(
                id,
                rule::Columns {
                    debits_pending,
                    debits_posted,
                    credits_pending,
                    credits_posted,
                },
            );
        }
        if read_first && view.len() < accounts.len() {
            read_first = false;
            continue;
        }
        break;
    }
    for m in moves {
        if let Some(pending) = &m.pending_id {
            let hold: Option<(String, String, i64, bool)> = stmt(
                "SELECT debit_account, credit_account, amount, \
                 EXISTS (SELECT 1 FROM ledger_transfers r WHERE r.pending_id = t.id) \
                 FROM ledger_transfers t WHERE id = $1 AND phase = 'pending'",
            )
            .bind(pending)
            .fetch_optional(&mut *tx)
            .await?;
            rule::resolves(
                m,
                hold.as_ref()
                    .map(|(d, c, a, _)| (d.as_str(), c.as_str(), *a)),
            )?;
            // Resolved already (a retry, or a second worker): the unique
            // index would refuse it too, but only after the balances had
            // been judged on a hold no longer there.
            if hold.is_some_and(|h| h.3) {
                return Err(LedgerError::Exists);
            }
        }
        rule::apply(&mut view, m)?;
    }
    // The rows are locked: writing the judged balances is writing what the
    // rule allowed, nothing else.
    for a in &accounts {
        let c = view[&a.id];
        stmt("UPDATE ledger_accounts SET debits_pending = $1, debits_posted = $2, credits_pending = $3, credits_posted = $4 WHERE id = $5")
            .bind(c.debits_pending)
            .bind(c.debits_posted)
            .bind(c.credits_pending)
            .bind(c.credits_posted)
            .bind(&a.id)
            .execute(&mut *tx)
            .await?;
    }
    for m in moves {
        stmt(
            "INSERT INTO ledger_transfers (id, operation_id, debit_account, credit_account, amount, phase, pending_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&m.id)
        .bind(&m.operation_id)
        .bind(&m.debit.id)
        .bind(&m.credit.id)
        .bind(m.amount)
        .bind(m.phase.as_str())
        .bind(&m.pending_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// `rows` groups of `per` placeholders, `($1, $2), ($3, $4)`, numbered from
/// `$first`; with `per` 1, a plain list.
fn placeholders(rows: usize, per: usize, first: usize) -> String {
    (0..rows)
        .map(|i| {
            let p: Vec<String> = (0..per)
                .map(|j| format!("${}", first + i * per + j))
                .collect();
            if per == 1 {
                p.concat()
            } else {
                format!("({})", p.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn side_effects(tx: &mut Tx, side: &SideEffects<'_>, now: i64) -> DbResult<()> {
    if let Some(e) = &side.event {
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(e.topic)
            .bind(&e.user_id)
            .bind(&e.payload)
            .bind(now)
            .bind(&e.trace)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(a) = &side.audit {
        insert_audit(&mut *tx, a).await?;
    }
    Ok(())
}

async fn insert_op(tx: &mut Tx, o: &Operation) -> DbResult<()> {
    let insert = stmt(concat!(
        "INSERT INTO money_operations (",
        op_cols!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)"
    ));
    o.bind_columns(insert).execute(tx).await?;
    Ok(())
}
