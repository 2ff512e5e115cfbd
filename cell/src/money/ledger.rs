//! The ledger tables, for both backends: accounts, immutable transfers and
//! the operations clients asked for.
//!
//! On this per-statement path every balance change goes through
//! `apply_moves`: it reads the operation's accounts locked, in account-id
//! order, lets `rule::apply` judge each move, and writes the result. An
//! operation and its transfers commit together or not at all.

use super::group::{GroupCommit, Step, Write};
use super::rule;
use crate::db::audit::{AuditEntry, insert_audit};
use crate::db::{Datastore, DbError, DbResult, Locking, Tx, built, stmt};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("a balance would pass its limit")]
    Overflow,
    /// The operation id exists already: read it and answer from it.
    #[error("operation exists")]
    Exists,
    #[error("ledger invariant broken: {0}")]
    Invariant(String),
    #[error(transparent)]
    Db(DbError),
}

/// A unique index refusing a ledger write means its operation (or
/// transfer) id is taken: the caller answers from what is stored.
impl From<DbError> for LedgerError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Conflict => Self::Exists,
            other => Self::Db(other),
        }
    }
}

pub type LedgerResult<T> = Result<T, LedgerError>;

/// An account, named so its id says what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub kind: &'static str,
    pub owner: Option<String>,
    pub currency: String,
}

impl Account {
    pub fn wallet(user_id: &str, currency: &str) -> Self {
        Self {
            id: format!("wallet:{user_id}:{currency}"),
            kind: "wallet",
            owner: Some(user_id.into()),
            currency: currency.into(),
        }
    }

    /// deposits, withdrawals, adjustments or fees: the cell's side of money
    /// entering or leaving the system.
    pub fn system(kind: &'static str, currency: &str) -> Self {
        Self {
            id: format!("system:{kind}:{currency}"),
            kind,
            owner: None,
            currency: currency.into(),
        }
    }

    /// This cell's account for money in flight with `peer`'s cell.
    pub fn clearing(peer: &str, currency: &str) -> Self {
        Self {
            id: format!("clearing:{peer}:{currency}"),
            kind: "clearing",
            owner: Some(peer.into()),
            currency: currency.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Moves posted money at once.
    Single,
    /// Holds: the debit side can no longer spend it, the credit side sees it
    /// pending.
    Pending,
    /// Completes a hold.
    Post,
    /// Releases a hold.
    Void,
}

impl Phase {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Pending => "pending",
            Self::Post => "post",
            Self::Void => "void",
        }
    }
}

/// One ledger transfer to write.
#[derive(Debug, Clone)]
pub struct Move {
    pub id: String,
    pub operation_id: String,
    pub debit: Account,
    pub credit: Account,
    pub amount: i64,
    pub phase: Phase,
    /// The hold a `Post` or `Void` resolves.
    pub pending_id: Option<String>,
}

impl Move {
    /// A one-step transfer of posted money, named after its operation.
    pub fn single(operation_id: &str, debit: Account, credit: Account, amount: i64) -> Self {
        Self {
            id: format!("{operation_id}:single"),
            operation_id: operation_id.to_string(),
            debit,
            credit,
            amount,
            phase: Phase::Single,
            pending_id: None,
        }
    }
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

/// A message for the notice service, written in the same transaction.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub topic: &'static str,
    pub user_id: String,
    pub payload: String,
}

/// What else an operation writes in its transaction.
#[derive(Default)]
pub struct SideEffects<'a> {
    pub event: Option<OutboxEvent>,
    pub audit: Option<AuditEntry<'a>>,
}

async fn side_effects(tx: &mut Tx, side: &SideEffects<'_>, now: i64) -> DbResult<()> {
    if let Some(e) = &side.event {
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(e.topic)
            .bind(&e.user_id)
            .bind(&e.payload)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(a) = &side.audit {
        insert_audit(&mut *tx, a).await?;
    }
    Ok(())
}

/// A money operation: what a client asked for and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Default, sqlx::FromRow)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub actor: String,
    pub request_hash: String,
    pub state: String,
    pub from_user: Option<String>,
    pub to_user: Option<String>,
    pub peer_region: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub memo: Option<String>,
    pub error_code: Option<String>,
    pub error_detail: Option<String>,
    pub saga_role: Option<String>,
    pub saga_step: Option<String>,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

macro_rules! op_cols {
    () => {
        "id, kind, actor, request_hash, state, from_user, to_user, peer_region, amount, currency, memo, \
         error_code, error_detail, saga_role, saga_step, attempts, next_attempt_at, created_at, updated_at"
    };
}
pub(super) use op_cols;

async fn insert_op(tx: &mut Tx, o: &Operation) -> DbResult<()> {
    stmt(
        "INSERT INTO money_operations (id, kind, actor, request_hash, state, from_user, to_user, peer_region, amount, currency, memo, \
         error_code, error_detail, saga_role, saga_step, attempts, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
    )
    .bind(&o.id)
    .bind(&o.kind)
    .bind(&o.actor)
    .bind(&o.request_hash)
    .bind(&o.state)
    .bind(&o.from_user)
    .bind(&o.to_user)
    .bind(&o.peer_region)
    .bind(o.amount)
    .bind(&o.currency)
    .bind(&o.memo)
    .bind(&o.error_code)
    .bind(&o.error_detail)
    .bind(&o.saga_role)
    .bind(&o.saga_step)
    .bind(o.attempts)
    .bind(o.next_attempt_at)
    .bind(o.created_at)
    .bind(o.updated_at)
    .execute(tx)
    .await?;
    Ok(())
}

/// What a conditional step changes on an operation.
#[derive(Debug, Clone, Default)]
pub struct StepUpdate<'a> {
    pub state: &'a str,
    pub saga_step: Option<&'a str>,
    pub error_code: Option<&'a str>,
    pub error_detail: Option<&'a str>,
}

/// One row of a wallet's balances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub currency: String,
    /// Spendable now: posted credits minus posted and held debits.
    pub available: i64,
    /// Incoming, not yet posted.
    pub pending: i64,
    /// Outgoing, held.
    pub held: i64,
}

/// Which operations a history lists.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter<'a> {
    pub kind: Option<&'a str>,
    pub state: Option<&'a str>,
    pub currency: Option<&'a str>,
    /// (created_at, id) of the last item of the previous page.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

/// The money service's tables over the cell's datastore: accounts,
/// transfers and operations. Its writes take one of two paths with one rule
/// (`rule.rs`): on a single-writer datastore (SQLite) they share commits
/// through the group committer (`group.rs`); otherwise, and for a write
/// that carries an audit entry, each runs its own statements in its own
/// transaction (`apply_moves`).
#[derive(Clone)]
pub struct Ledger {
    db: Datastore,
    group: Option<GroupCommit>,
}

impl Ledger {
    pub fn new(db: Datastore) -> Self {
        let group = db.single_writer().then(|| GroupCommit::start(db.clone()));
        Self { db, group }
    }

    /// The per-statement path alone, for a benchmark or a test that compares
    /// the two.
    pub fn per_statement(db: Datastore) -> Self {
        Self { db, group: None }
    }

    /// Records `op` and applies its moves, committed together. `Exists`
    /// when the id is taken (the caller answers from the stored operation).
    pub async fn execute(
        &self,
        op: &Operation,
        moves: &[Move],
        side: &SideEffects<'_>,
    ) -> LedgerResult<()> {
        match (&self.group, &side.audit) {
            (Some(group), None) => {
                let write = Write::Execute {
                    op: Box::new(op.clone()),
                    moves: moves.to_vec(),
                    event: side.event.clone(),
                };
                group.write(write).await.map(|_| ())
            }
            _ => self.execute_alone(op, moves, side).await,
        }
    }

    /// Moves an operation from (`state`, `saga_step`) to `to` and applies
    /// `moves`, atomically. False (and nothing written) when the operation
    /// is no longer where the caller saw it: another worker got there first.
    pub async fn advance(
        &self,
        id: &str,
        from: (&str, Option<&str>),
        to: &StepUpdate<'_>,
        moves: &[Move],
        side: &SideEffects<'_>,
        now: i64,
    ) -> LedgerResult<bool> {
        match (&self.group, &side.audit) {
            (Some(group), None) => {
                let write = Write::Advance {
                    id: id.to_string(),
                    from: (from.0.to_string(), from.1.map(String::from)),
                    to: Step {
                        state: to.state.to_string(),
                        saga_step: to.saga_step.map(String::from),
                        error_code: to.error_code.map(String::from),
                        error_detail: to.error_detail.map(String::from),
                    },
                    moves: moves.to_vec(),
                    event: side.event.clone(),
                    now,
                };
                group.write(write).await
            }
            _ => self.advance_alone(id, from, to, moves, side, now).await,
        }
    }

    pub async fn operation(&self, id: &str) -> LedgerResult<Option<Operation>> {
        let sql = concat!(
            "SELECT ",
            op_cols!(),
            " FROM money_operations WHERE id = $1"
        );
        Ok(stmt(sql).bind(id).fetch_optional(&self.db).await?)
    }

    /// `execute` in a transaction of its own.
    async fn execute_alone(
        &self,
        op: &Operation,
        moves: &[Move],
        side: &SideEffects<'_>,
    ) -> LedgerResult<()> {
        let now = op.created_at;
        let mut tx = self.db.begin().await?;
        insert_op(&mut tx, op).await?;
        apply_moves(&mut tx, moves, now).await?;
        side_effects(&mut tx, side, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a refused operation so that a repeat gets the same answer.
    /// Returns what is stored under the id (a concurrent success wins).
    pub async fn record_refusal(&self, op: &Operation) -> LedgerResult<Operation> {
        match self.execute_alone(op, &[], &SideEffects::default()).await {
            Ok(()) | Err(LedgerError::Exists) => {}
            Err(e) => return Err(e),
        }
        self.operation(&op.id)
            .await?
            .ok_or_else(|| LedgerError::Invariant(format!("operation {} vanished", op.id)))
    }

    /// `advance` in a transaction of its own.
    async fn advance_alone(
        &self,
        id: &str,
        (state, saga_step): (&str, Option<&str>),
        to: &StepUpdate<'_>,
        moves: &[Move],
        side: &SideEffects<'_>,
        now: i64,
    ) -> LedgerResult<bool> {
        let mut tx = self.db.begin().await?;
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
        if changed != 1 {
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

    /// Counts a failed attempt of a saga step and schedules the next.
    pub async fn reschedule(&self, id: &str, next_attempt_at: i64, now: i64) -> LedgerResult<()> {
        stmt("UPDATE money_operations SET attempts = attempts + 1, next_attempt_at = $1, updated_at = $2 WHERE id = $3")
            .bind(next_attempt_at)
            .bind(now)
            .bind(id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Saga steps (and pending withdrawals) whose time has come.
    pub async fn due_operations(&self, now: i64, limit: i64) -> LedgerResult<Vec<Operation>> {
        let sql = concat!(
            "SELECT ",
            op_cols!(),
            " FROM money_operations WHERE saga_step IS NOT NULL AND saga_step <> 'done' \
             AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2"
        );
        Ok(stmt(sql).bind(now).bind(limit).fetch_all(&self.db).await?)
    }

    /// A user's operations, newest first, either side (a receiver does not
    /// see what was refused before it reached them).
    pub async fn history(
        &self,
        user_id: &str,
        f: &HistoryFilter<'_>,
    ) -> LedgerResult<Vec<Operation>> {
        let (after_at, after_id) = f.after.clone().unwrap_or((i64::MAX, String::new()));
        // Two index range scans merged, rather than an OR the planner may
        // turn into a full scan.
        let sql = concat!(
            "SELECT ",
            op_cols!(),
            " FROM (\
               SELECT * FROM money_operations WHERE from_user = $1 \
               UNION SELECT * FROM money_operations WHERE to_user = $1 AND state <> 'failed') AS mine \
             WHERE (created_at < $2 OR (created_at = $2 AND id < $3)) \
             AND ($4 = '' OR kind = $4) AND ($5 = '' OR state = $5) AND ($6 = '' OR currency = $6) \
             ORDER BY created_at DESC, id DESC LIMIT $7"
        );
        Ok(stmt(sql)
            .bind(user_id)
            .bind(after_at)
            .bind(&after_id)
            .bind(f.kind.unwrap_or(""))
            .bind(f.state.unwrap_or(""))
            .bind(f.currency.unwrap_or(""))
            .bind(f.limit)
            .fetch_all(&self.db)
            .await?)
    }

    /// A user's wallets.
    pub async fn balances(&self, user_id: &str) -> LedgerResult<Vec<Balance>> {
        let sql = "SELECT currency, credits_posted - debits_posted - debits_pending, credits_pending, debits_pending \
                   FROM ledger_accounts WHERE owner = $1 AND kind = 'wallet' ORDER BY currency";
        let rows: Vec<(String, i64, i64, i64)> =
            stmt(sql).bind(user_id).fetch_all(&self.db).await?;
        Ok(rows
            .into_iter()
            .map(|(currency, available, pending, held)| Balance {
                currency,
                available,
                pending,
                held,
            })
            .collect())
    }
}
