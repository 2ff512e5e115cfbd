//! Group commit for SQLite, processed in memory (TigerBeetle's approach).
//!
//! Writes that arrive while a commit is being made wait for the next one.
//! A batch is one `BEGIN IMMEDIATE` transaction: read the operations,
//! accounts and holds the batch touches (three queries), apply every write
//! in arrival order to that in-memory copy with the ledger's one rule
//! (`rule::check` and `rule::resolves`, which the per-statement path uses
//! too; a hold resolved once, operation ids unique and conditional saga
//! steps are the unique indexes and `WHERE` of that path), then write the results with a handful of multi-row statements and
//! commit with one fsync. A refused write changes nothing; the others in the
//! batch are unaffected. Each caller hears back only after the commit that
//! holds its write, so "answered" still means "durable".
//!
//! This is sound because SQLite has one writer: the batch holds the
//! in-process writer lock and SQLite's write lock from the reads to the
//! commit, so nothing changes under it. PostgreSQL (several cell instances,
//! row locks, its own group commit) keeps the per-statement path.

use super::ledger::{LedgerError, LedgerResult, Move, Operation, OutboxEvent, Phase, op_cols};
use super::rule::{self, Columns};
use crate::db::{Datastore, DbError, DbResult, Stmt, Tx, built};
use futures::FutureExt;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use tokio::sync::{mpsc, oneshot};

/// An owned `ledger::StepUpdate`.
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub state: String,
    pub saga_step: Option<String>,
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
}

pub enum Write {
    /// Record a new operation with its moves (`Ledger::execute`).
    Execute {
        op: Box<Operation>,
        moves: Vec<Move>,
        event: Option<OutboxEvent>,
    },
    /// Move an operation on from (state, saga_step) (`Ledger::advance`).
    Advance {
        id: String,
        from: (String, Option<String>),
        to: Step,
        moves: Vec<Move>,
        event: Option<OutboxEvent>,
        now: i64,
    },
}

struct Pending {
    write: Write,
    reply: oneshot::Sender<LedgerResult<bool>>,
}

#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

/// Most writes one transaction takes; keeps every multi-row statement well
/// under SQLite's bound-parameter limit.
const MAX_GROUP: usize = 512;

impl GroupCommit {
    pub fn start(db: Datastore) -> Self {
        let (queue, mut rx) = mpsc::channel::<Pending>(4 * MAX_GROUP);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_GROUP);
            while rx.recv_many(&mut batch, MAX_GROUP).await > 0 {
                // A write that panics costs its group (rolled back, its
                // callers told), not every later money write: the committer
                // lives on, as `TxBatch` does.
                let ran = AssertUnwindSafe(commit(&db, &batch)).catch_unwind().await;
                let Ok(outcome) = ran else {
                    tracing::error!(
                        size = batch.len(),
                        "a grouped money write panicked; its group was rolled back"
                    );
                    for p in batch.drain(..) {
                        let err = sqlx::Error::Protocol("group commit failed".into());
                        let _ = p.reply.send(Err(LedgerError::Db(DbError::Db(err))));
                    }
                    continue;
                };
                match outcome {
                    Ok(results) => {
                        for (p, r) in batch.drain(..).zip(results) {
                            let _ = p.reply.send(r);
                        }
                    }
                    Err(e) => {
                        // A conflict means a unique index refused a write
                        // the group had judged new: a bug in the group.
                        tracing::error!(error = %e, size = batch.len(), "group commit failed");
                        for p in batch.drain(..) {
                            let err = sqlx::Error::Protocol(format!("group commit failed: {e}"));
                            let _ = p.reply.send(Err(LedgerError::Db(DbError::Db(err))));
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Writes and waits until it is durable (or refused). For an `Advance`,
    /// false means the operation had moved on already.
    pub async fn write(&self, write: Write) -> LedgerResult<bool> {
        let (reply, answer) = oneshot::channel();
        let stopped = || LedgerError::Invariant("the group committer stopped".into());
        self.queue
            .send(Pending { write, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

#[derive(Clone)]
struct Acc {
    kind: String,
    owner: Option<String>,
    currency: String,
    cols: Columns,
    created_at: i64,
}

/// The batch's view of the datastore, and what it will write.
#[derive(Default)]
struct State {
    ops: HashMap<String, Operation>,
    accounts: HashMap<String, Acc>,
    /// hold id → (debit, credit, amount)
    holds: HashMap<String, (String, String, i64)>,
    resolved: HashSet<String>,
    dirty_ops: Vec<String>,
    dirty_accounts: HashSet<String>,
    transfers: Vec<(Move, i64, String)>,
    events: Vec<(OutboxEvent, i64)>,
}

impl State {
    /// Applies `moves` all or nothing, with the ledger's rule.
    fn apply(&mut self, moves: &[Move], now: i64) -> LedgerResult<()> {
        // The balances the moves touch, judged on a copy so a refusal of a
        // later move leaves nothing of the earlier ones.
        let mut view = rule::View::new();
        for a in moves.iter().flat_map(|m| [&m.debit, &m.credit]) {
            let cols = self.accounts.get(&a.id).map(|acc| acc.cols);
            view.insert(a.id.clone(), cols.unwrap_or_default());
        }
        let mut new_holds = Vec::new();
        let mut new_resolved = Vec::new();
        for m in moves {
            if let Some(p) = &m.pending_id {
                let hold = self.holds.get(p);
                rule::resolves(m, hold.map(|(d, c, a)| (d.as_str(), c.as_str(), *a)))?;
                if self.resolved.contains(p) || new_resolved.contains(p) {
                    return Err(LedgerError::Exists);
                }
                new_resolved.push(p.clone());
            }
            rule::apply(&mut view, m)?;
            if m.phase == Phase::Pending {
                new_holds.push((
                    m.id.clone(),
                    (m.debit.id.clone(), m.credit.id.clone(), m.amount),
                ));
            }
        }
        for a in moves.iter().flat_map(|m| [&m.debit, &m.credit]) {
            let acc = self.accounts.entry(a.id.clone()).or_insert_with(|| Acc {
                kind: a.kind.to_string(),
                owner: a.owner.clone(),
                currency: a.currency.clone(),
                cols: Columns::default(),
                created_at: now,
            });
            acc.cols = view[&a.id];
            self.dirty_accounts.insert(a.id.clone());
        }
        self.holds.extend(new_holds);
        self.resolved.extend(new_resolved);
        Ok(())
    }

    fn process(&mut self, w: &Write) -> LedgerResult<bool> {
        match w {
            Write::Execute { op, moves, event } => {
                if self.ops.contains_key(&op.id) {
                    return Err(LedgerError::Exists);
                }
                self.apply(moves, op.created_at)?;
                self.ops.insert(op.id.clone(), (**op).clone());
                self.dirty_ops.push(op.id.clone());
                self.record(moves, event, op.created_at);
                Ok(true)
            }
            Write::Advance {
                id,
                from,
                to,
                moves,
                event,
                now,
            } => {
                let at = self
                    .ops
                    .get(id)
                    .map(|o| (o.state.clone(), o.saga_step.clone().unwrap_or_default()));
                let from = (from.0.clone(), from.1.clone().unwrap_or_default());
                if at != Some(from) {
                    return Ok(false);
                }
                self.apply(moves, *now)?;
                let op = self.ops.get_mut(id).expect("checked above");
                op.state = to.state.clone();
                op.saga_step = to.saga_step.clone();
                if to.error_code.is_some() {
                    op.error_code = to.error_code.clone();
                }
                if to.error_detail.is_some() {
                    op.error_detail = to.error_detail.clone();
                }
                op.attempts = 0;
                op.next_attempt_at = Some(*now);
                op.updated_at = *now;
                self.dirty_ops.push(id.clone());
                self.record(moves, event, *now);
                Ok(true)
            }
        }
    }

    fn record(&mut self, moves: &[Move], event: &Option<OutboxEvent>, now: i64) {
        for m in moves {
            self.transfers
                .push((m.clone(), now, m.operation_id.clone()));
        }
        if let Some(e) = event {
            self.events.push((e.clone(), now));
        }
    }
}

/// `rows` groups of `per` anonymous placeholders, `(?, ?), (?, ?)`; with
/// `per` 1, a plain list. The group committer runs only on SQLite
/// (`Datastore::single_writer`), which binds `?` in order; a `$n` is a
/// named parameter there, and sqlx looks every one's name up in a list
/// SQLite keeps, which in a statement of thousands of parameters (500 rows
/// of 19) is quadratic.
fn anonymous(rows: usize, per: usize) -> String {
    let row = vec!["?"; per].join(", ");
    if per == 1 {
        return vec!["?"; rows].join(", ");
    }
    vec![format!("({row})"); rows].join(", ")
}

/// `SELECT … WHERE id` followed by ` IN (…)` of `ids`, bound.
fn in_list<'a>(head: &str, ids: impl ExactSizeIterator<Item = &'a String>) -> Stmt {
    // Only placeholders are formatted in.
    let mut stmt = built(format!("{head} IN ({})", anonymous(ids.len(), 1)));
    for id in ids {
        stmt = stmt.bind(id);
    }
    stmt
}

/// A `ledger_accounts` row as the group reads it.
#[derive(sqlx::FromRow)]
struct AccountRow {
    id: String,
    kind: String,
    owner: Option<String>,
    currency: String,
    debits_pending: i64,
    debits_posted: i64,
    credits_pending: i64,
    credits_posted: i64,
    created_at: i64,
}

async fn commit(db: &Datastore, batch: &[Pending]) -> DbResult<Vec<LedgerResult<bool>>> {
    let mut op_ids: HashSet<&String> = HashSet::new();
    let mut account_ids: HashSet<&String> = HashSet::new();
    let mut pending_ids: HashSet<&String> = HashSet::new();
    for p in batch {
        let (id, moves) = match &p.write {
            Write::Execute { op, moves, .. } => (&op.id, moves),
            Write::Advance { id, moves, .. } => (id, moves),
        };
        op_ids.insert(id);
        for m in moves {
            account_ids.insert(&m.debit.id);
            account_ids.insert(&m.credit.id);
            if let Some(p) = &m.pending_id {
                pending_ids.insert(p);
            }
        }
    }

    let mut tx = db.begin().await?;
    let mut st = State::default();

    let ops: Vec<Operation> = in_list(
        concat!("SELECT ", op_cols!(), " FROM money_operations WHERE id"),
        op_ids.iter().copied(),
    )
    .fetch_all(&mut tx)
    .await?;
    for op in ops {
        st.ops.insert(op.id.clone(), op);
    }
    if !account_ids.is_empty() {
        let rows: Vec<AccountRow> = in_list(
            "SELECT id, kind, owner, currency, debits_pending, debits_posted, credits_pending, credits_posted, created_at FROM ledger_accounts WHERE id",
            account_ids.iter().copied(),
        )
        .fetch_all(&mut tx)
        .await?;
        for r in rows {
            st.accounts.insert(
                r.id,
                Acc {
                    kind: r.kind,
                    owner: r.owner,
                    currency: r.currency,
                    cols: Columns {
                        debits_pending: r.debits_pending,
                        debits_posted: r.debits_posted,
                        credits_pending: r.credits_pending,
                        credits_posted: r.credits_posted,
                    },
                    created_at: r.created_at,
                },
            );
        }
    }
    if !pending_ids.is_empty() {
        let rows: Vec<(String, String, String, i64, bool)> = in_list(
            "SELECT id, debit_account, credit_account, amount, \
             EXISTS (SELECT 1 FROM ledger_transfers r WHERE r.pending_id = t.id) \
             FROM ledger_transfers t WHERE phase = 'pending' AND id",
            pending_ids.iter().copied(),
        )
        .fetch_all(&mut tx)
        .await?;
        for (id, debit, credit, amount, resolved) in rows {
            if resolved {
                st.resolved.insert(id.clone());
            }
            st.holds.insert(id, (debit, credit, amount));
        }
    }

    let results: Vec<LedgerResult<bool>> = batch.iter().map(|p| st.process(&p.write)).collect();
    write(&mut tx, &st).await?;
    tx.commit().await?;
    Ok(results)
}

/// Rows per multi-row statement: 19 columns × 500 stays far below SQLite's
/// bound-parameter limit.
const ROWS: usize = 500;

async fn write(tx: &mut Tx, st: &State) -> DbResult<()> {
    let accounts: Vec<(&String, &Acc)> = st
        .dirty_accounts
        .iter()
        .map(|id| (id, &st.accounts[id]))
        .collect();
    for chunk in accounts.chunks(ROWS) {
        // Only placeholders are formatted in.
        let mut stmt = built(format!(
            "INSERT INTO ledger_accounts (id, kind, owner, currency, debits_pending, debits_posted, credits_pending, credits_posted, created_at) \
             VALUES {} ON CONFLICT (id) DO UPDATE SET debits_pending = excluded.debits_pending, debits_posted = excluded.debits_posted, \
             credits_pending = excluded.credits_pending, credits_posted = excluded.credits_posted",
            anonymous(chunk.len(), 9)
        ));
        for (id, a) in chunk {
            stmt = stmt
                .bind(*id)
                .bind(&a.kind)
                .bind(&a.owner)
                .bind(&a.currency)
                .bind(a.cols.debits_pending)
                .bind(a.cols.debits_posted)
                .bind(a.cols.credits_pending)
                .bind(a.cols.credits_posted)
                .bind(a.created_at);
        }
        stmt.execute(&mut *tx).await?;
    }
    let mut seen = HashSet::new();
    let ops: Vec<&Operation> = st
        .dirty_ops
        .iter()
        .rev()
        .filter(|id| seen.insert(*id))
        .map(|id| &st.ops[id])
        .collect();
    for chunk in ops.chunks(ROWS) {
        let mut stmt = built(format!(
            concat!(
                "INSERT INTO money_operations (",
                op_cols!(),
                ") VALUES {} ON CONFLICT (id) DO UPDATE SET state = excluded.state, saga_step = excluded.saga_step, \
                 error_code = excluded.error_code, error_detail = excluded.error_detail, attempts = excluded.attempts, \
                 next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at"
            ),
            anonymous(chunk.len(), 20)
        ));
        for o in chunk {
            stmt = o.bind_columns(stmt);
        }
        stmt.execute(&mut *tx).await?;
    }
    for chunk in st.transfers.chunks(ROWS) {
        let mut stmt = built(format!(
            "INSERT INTO ledger_transfers (id, operation_id, debit_account, credit_account, amount, phase, pending_id, created_at) VALUES {}",
            anonymous(chunk.len(), 8)
        ));
        for (m, now, op) in chunk {
            stmt = stmt
                .bind(&m.id)
                .bind(op)
                .bind(&m.debit.id)
                .bind(&m.credit.id)
                .bind(m.amount)
                .bind(m.phase.as_str())
                .bind(&m.pending_id)
                .bind(*now);
        }
        stmt.execute(&mut *tx).await?;
    }
    for chunk in st.events.chunks(ROWS) {
        let mut stmt = built(format!(
            "INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES {}",
            anonymous(chunk.len(), 6)
        ));
        for (e, now) in chunk {
            stmt = stmt
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(e.topic)
                .bind(&e.user_id)
                .bind(&e.payload)
                .bind(*now)
                .bind(&e.trace);
        }
        stmt.execute(&mut *tx).await?;
    }
    Ok(())
}
