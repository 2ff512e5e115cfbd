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
use crate::db::DbError;
use futures::FutureExt;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
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
    /// Record a new operation with its moves (`Datastore::execute`).
    Execute {
        op: Box<Operation>,
        moves: Vec<Move>,
        event: Option<OutboxEvent>,
    },
    /// Move an operation on from (state, saga_step) (`Datastore::advance`).
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
    pub fn start(pool: SqlitePool) -> Self {
        let (queue, mut rx) = mpsc::channel::<Pending>(4 * MAX_GROUP);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_GROUP);
            while rx.recv_many(&mut batch, MAX_GROUP).await > 0 {
                // A write that panics costs its group (rolled back, its
                // callers told), not every later money write: the committer
                // lives on, as `TxBatch` does.
                let ran = AssertUnwindSafe(commit(&pool, &batch)).catch_unwind().await;
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

fn in_list<'a>(qb: &mut QueryBuilder<Sqlite>, ids: impl IntoIterator<Item = &'a String>) {
    qb.push(" IN (");
    let mut sep = qb.separated(", ");
    for id in ids {
        sep.push_bind(id.as_str());
    }
    sep.push_unseparated(")");
}

async fn commit(
    pool: &SqlitePool,
    batch: &[Pending],
) -> Result<Vec<LedgerResult<bool>>, sqlx::Error> {
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

    let _writer = crate::db::SQLITE_WRITER.lock().await;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut st = State::default();

    let mut qb = QueryBuilder::new(concat!(
        "SELECT ",
        op_cols!(),
        " FROM money_operations WHERE id"
    ));
    in_list(&mut qb, op_ids.iter().copied());
    for r in qb.build().fetch_all(&mut *tx).await? {
        let op = super::ledger::op_from_row(&r)?;
        st.ops.insert(op.id.clone(), op);
    }
    if !account_ids.is_empty() {
        let mut qb = QueryBuilder::new(
            "SELECT id, kind, owner, currency, debits_pending, debits_posted, credits_pending, credits_posted, created_at FROM ledger_accounts WHERE id",
        );
        in_list(&mut qb, account_ids.iter().copied());
        for r in qb.build().fetch_all(&mut *tx).await? {
            st.accounts.insert(
                r.try_get("id")?,
                Acc {
                    kind: r.try_get("kind")?,
                    owner: r.try_get("owner")?,
                    currency: r.try_get("currency")?,
                    cols: Columns {
                        debits_pending: r.try_get("debits_pending")?,
                        debits_posted: r.try_get("debits_posted")?,
                        credits_pending: r.try_get("credits_pending")?,
                        credits_posted: r.try_get("credits_posted")?,
                    },
                    created_at: r.try_get("created_at")?,
                },
            );
        }
    }
    if !pending_ids.is_empty() {
        let mut qb = QueryBuilder::new(
            "SELECT id, debit_account, credit_account, amount, \
             EXISTS (SELECT 1 FROM ledger_transfers r WHERE r.pending_id = t.id) \
             FROM ledger_transfers t WHERE phase = 'pending' AND id",
        );
        in_list(&mut qb, pending_ids.iter().copied());
        for r in qb.build().fetch_all(&mut *tx).await? {
            let id: String = r.try_get(0)?;
            if r.try_get::<bool, _>(4)? {
                st.resolved.insert(id.clone());
            }
            st.holds
                .insert(id, (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
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

async fn write(tx: &mut sqlx::Transaction<'_, Sqlite>, st: &State) -> Result<(), sqlx::Error> {
    let accounts: Vec<(&String, &Acc)> = st
        .dirty_accounts
        .iter()
        .map(|id| (id, &st.accounts[id]))
        .collect();
    for chunk in accounts.chunks(ROWS) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger_accounts (id, kind, owner, currency, debits_pending, debits_posted, credits_pending, credits_posted, created_at) ",
        );
        qb.push_values(chunk, |mut b, (id, a)| {
            b.push_bind(id.as_str())
                .push_bind(a.kind.as_str())
                .push_bind(a.owner.as_deref())
                .push_bind(a.currency.as_str())
                .push_bind(a.cols.debits_pending)
                .push_bind(a.cols.debits_posted)
                .push_bind(a.cols.credits_pending)
                .push_bind(a.cols.credits_posted)
                .push_bind(a.created_at);
        });
        qb.push(
            " ON CONFLICT (id) DO UPDATE SET debits_pending = excluded.debits_pending, debits_posted = excluded.debits_posted, \
             credits_pending = excluded.credits_pending, credits_posted = excluded.credits_posted",
        );
        qb.build().execute(&mut **tx).await?;
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
        let mut qb = QueryBuilder::<Sqlite>::new(concat!(
            "INSERT INTO money_operations (",
            op_cols!(),
            ") "
        ));
        qb.push_values(chunk, |mut b, o| {
            b.push_bind(o.id.as_str())
                .push_bind(o.kind.as_str())
                .push_bind(o.actor.as_str())
                .push_bind(o.request_hash.as_str())
                .push_bind(o.state.as_str())
                .push_bind(o.from_user.as_deref())
                .push_bind(o.to_user.as_deref())
                .push_bind(o.peer_region.as_deref())
                .push_bind(o.amount)
                .push_bind(o.currency.as_str())
                .push_bind(o.memo.as_deref())
                .push_bind(o.error_code.as_deref())
                .push_bind(o.error_detail.as_deref())
                .push_bind(o.saga_role.as_deref())
                .push_bind(o.saga_step.as_deref())
                .push_bind(o.attempts)
                .push_bind(o.next_attempt_at)
                .push_bind(o.created_at)
                .push_bind(o.updated_at);
        });
        qb.push(
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, saga_step = excluded.saga_step, \
             error_code = excluded.error_code, error_detail = excluded.error_detail, attempts = excluded.attempts, \
             next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at",
        );
        qb.build().execute(&mut **tx).await?;
    }
    for chunk in st.transfers.chunks(ROWS) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger_transfers (id, operation_id, debit_account, credit_account, amount, phase, pending_id, created_at) ",
        );
        qb.push_values(chunk, |mut b, (m, now, op)| {
            b.push_bind(m.id.as_str())
                .push_bind(op.as_str())
                .push_bind(m.debit.id.as_str())
                .push_bind(m.credit.id.as_str())
                .push_bind(m.amount)
                .push_bind(m.phase.as_str())
                .push_bind(m.pending_id.as_deref())
                .push_bind(*now);
        });
        qb.build().execute(&mut **tx).await?;
    }
    for chunk in st.events.chunks(ROWS) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO outbox (id, topic, user_id, payload, created_at) ",
        );
        qb.push_values(chunk, |mut b, (e, now)| {
            b.push_bind(uuid::Uuid::now_v7().to_string())
                .push_bind(e.topic)
                .push_bind(e.user_id.as_str())
                .push_bind(e.payload.as_str())
                .push_bind(*now);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}
