//! The ledger tables, for both backends: accounts, immutable transfers and
//! the operations clients asked for.
//!
//! Its writes go through SQLite's group committer (`group.rs`) or the
//! per-statement path (`per_statement.rs`); both judge every balance change
//! with the one rule (`rule.rs`).

use super::group::{GroupCommit, Step, Write};
use super::per_statement;
use crate::db::audit::AuditEntry;
use crate::db::{Datastore, DbError, Stmt, stmt};

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

/// A message for the notice service, written in the same transaction.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub topic: &'static str,
    pub user_id: String,
    pub payload: String,
    /// The request that caused it (`trace::current_header`), if one did.
    pub trace: Option<String>,
}

/// What else an operation writes in its transaction.
#[derive(Default)]
pub struct SideEffects<'a> {
    pub event: Option<OutboxEvent>,
    pub audit: Option<AuditEntry<'a>>,
}

/// A money operation: what a client asked for and where it stands.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, sqlx::FromRow, serde::Serialize, serde::Deserialize,
)]
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
    /// How many times a transfer between cells was re-aimed at its
    /// receiver's new home (`saga.rs`); absent from older move bundles.
    #[serde(default)]
    pub retargets: i64,
}

macro_rules! op_cols {
    () => {
        "id, kind, actor, request_hash, state, from_user, to_user, peer_region, amount, currency, memo, \
         error_code, error_detail, saga_role, saga_step, attempts, next_attempt_at, created_at, updated_at, retargets"
    };
}
pub(crate) use op_cols;

impl Operation {
    /// Binds the operation's columns, in `op_cols!()` order.
    pub(crate) fn bind_columns(&self, stmt: Stmt) -> Stmt {
        stmt.bind(&self.id)
            .bind(&self.kind)
            .bind(&self.actor)
            .bind(&self.request_hash)
            .bind(&self.state)
            .bind(&self.from_user)
            .bind(&self.to_user)
            .bind(&self.peer_region)
            .bind(self.amount)
            .bind(&self.currency)
            .bind(&self.memo)
            .bind(&self.error_code)
            .bind(&self.error_detail)
            .bind(&self.saga_role)
            .bind(&self.saga_step)
            .bind(self.attempts)
            .bind(self.next_attempt_at)
            .bind(self.created_at)
            .bind(self.updated_at)
            .bind(self.retargets)
    }
}

/// What a conditional step changes on an operation.
#[derive(Debug, Clone, Default)]
pub struct StepUpdate<'a> {
    pub state: &'a str,
    pub saga_step: Option<&'a str>,
    pub error_code: Option<&'a str>,
    pub error_detail: Option<&'a str>,
}

/// Where a re-aimed transfer goes on (`Ledger::retarget`): another cell
/// (`peer_region`, back to its first step) or, for a receiver who moved to
/// this one, nowhere (`None`, and done).
#[derive(Debug, Clone)]
pub struct Retarget<'a> {
    pub peer_region: Option<&'a str>,
    pub state: &'a str,
    pub saga_step: &'a str,
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
            _ => per_statement::execute(&self.db, op, moves, side).await,
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
            _ => per_statement::advance(&self.db, id, from, to, moves, side, now).await,
        }
    }

    /// Re-aims `op`, a transfer between cells at its first step, as `to`
    /// says, applying `moves` with it. False (and nothing written) when
    /// another worker re-aimed or aborted it first.
    pub async fn retarget(
        &self,
        op: &Operation,
        to: &Retarget<'_>,
        moves: &[Move],
        side: &SideEffects<'_>,
        now: i64,
    ) -> LedgerResult<bool> {
        per_statement::retarget(&self.db, op, to, moves, side, now).await
    }

    pub async fn operation(&self, id: &str) -> LedgerResult<Option<Operation>> {
        let sql = concat!(
            "SELECT ",
            op_cols!(),
            " FROM money_operations WHERE id = $1"
        );
        Ok(stmt(sql).bind(id).fetch_optional(&self.db).await?)
    }

    /// The operations `actor` started for `from_user` (a move's, say).
    pub async fn operations_from_by(
        &self,
        from_user: &str,
        actor: &str,
    ) -> LedgerResult<Vec<Operation>> {
        let sql = concat!(
            "SELECT ",
            op_cols!(),
            " FROM money_operations WHERE from_user = $1 AND actor = $2"
        );
        Ok(stmt(sql)
            .bind(from_user)
            .bind(actor)
            .fetch_all(&self.db)
            .await?)
    }

    /// Stores a refused operation so that a repeat gets the same answer.
    /// Returns what is stored under the id (a concurrent success wins).
    pub async fn record_refusal(&self, op: &Operation) -> LedgerResult<Operation> {
        match per_statement::execute(&self.db, op, &[], &SideEffects::default()).await {
            Ok(()) | Err(LedgerError::Exists) => {}
            Err(e) => return Err(e),
        }
        self.operation(&op.id)
            .await?
            .ok_or_else(|| LedgerError::Invariant(format!("operation {} vanished", op.id)))
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
             WHERE (created_at < $2 OR (created_at = $2 AND id < $3)) AND kind <> 'move' \
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
