//! Money operations: validation, idempotency, and the ledger moves each one
//! makes. Cross-cell transfers start here and are driven by `saga`.
//!
//! Idempotency: an operation's id is derived from (kind, actor, client key),
//! so a repeat finds the stored operation by primary key. The stored request
//! hash tells a true repeat (answered with the original outcome, refusals
//! included) from a reused key (422).

use super::currency;
use super::ledger::{Account, Ledger, LedgerError, Move, Operation, OutboxEvent, SideEffects};
use crate::clock::now_ms;
use crate::db::audit::AuditEntry;
use crate::identity::service::Principal;
use crate::identity::store::IdentityStore;
use homecell_common::hex::sha256;
use homecell_common::replica::Replica;
use homecell_proto::error::{CodedError, ErrorCode};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Namespace of derived operation ids (UUIDv5).
const OP_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a0c_61e1_4d2f_4b7e_9f0e_8d1c_2b3a_4c5d);

pub const MAX_MEMO: usize = 200;

pub struct Money {
    pub region: String,
    pub ledger: Ledger,
    /// Who a user is, and whether active (identity's table).
    pub users: IdentityStore,
    pub replica: Arc<Replica>,
    pub peers: Arc<crate::peers::Peers>,
    /// Wakes the saga worker for a transfer that just started.
    pub kick: mpsc::UnboundedSender<String>,
    /// Payment providers this cell accepts callbacks from.
    pub providers: super::provider::Providers,
    /// How long the coordinator keeps trying to place the receiver's hold
    /// before it voids the transfer.
    pub hold_timeout_ms: i64,
    /// The provider that pays withdrawals out (none: withdrawals are off).
    pub withdrawals_via: Option<String>,
    /// How long a provider may stay undecided before a withdrawal is
    /// `reconciling` (withdrawal.rs).
    pub withdrawal_timeout_ms: i64,
    /// Users being moved away: money aimed at them waits or is refused
    /// as retryable (`moving/frozen.rs`).
    pub frozen: Arc<crate::moving::frozen::Frozen>,
}

#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub to_user_id: String,
    /// Minor units (fen, cents), > 0.
    pub amount: i64,
    /// ISO 4217, e.g. CNY.
    pub currency: String,
    pub memo: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// Minor units: positive credits the wallet, negative debits it.
    pub amount: i64,
    pub currency: String,
    /// Why: kept in the audit log.
    pub reason: String,
}

/// Where a client's money operation ended up.
pub struct Outcome {
    pub op: Operation,
    /// Cross-cell transfers answer 202 (in flight), all else 201.
    pub in_flight: bool,
}

impl From<Operation> for Outcome {
    fn from(op: Operation) -> Self {
        let in_flight = op.peer_region.is_some() || op.kind == "withdrawal";
        Self { op, in_flight }
    }
}

pub fn derive_id(kind: &str, actor: &str, key: &str) -> String {
    uuid::Uuid::new_v5(&OP_NAMESPACE, format!("{kind}\0{actor}\0{key}").as_bytes()).to_string()
}

/// The id of an operation and the hash of its request's `parts`.
pub(super) fn operation_id(kind: &str, actor: &str, key: &str, parts: &[&str]) -> (String, String) {
    (derive_id(kind, actor, key), sha256(&parts.join("\0")))
}

/// An `Idempotency-Key` must be a UUID.
pub fn parse_key(key: Option<&str>) -> Result<String, CodedError> {
    let key = key
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            CodedError::field(
                "Idempotency-Key",
                "this write needs an Idempotency-Key header (a UUID)",
            )
        })?;
    uuid::Uuid::parse_str(key)
        .map(|u| u.to_string())
        .map_err(|_| CodedError::field("Idempotency-Key", "must be a UUID"))
}

pub(super) fn check_amount(amount: i64, currency: &str) -> Result<(), CodedError> {
    currency::validate(amount, currency).map_err(|(f, m)| CodedError::field(f, m))
}

impl From<LedgerError> for CodedError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InsufficientFunds => CodedError::new(
                ErrorCode::InsufficientFunds,
                "the available balance does not cover the amount",
            ),
            LedgerError::Overflow => CodedError::new(
                ErrorCode::FailedPrecondition,
                "the receiving balance would pass its limit",
            ),
            LedgerError::Exists => CodedError::new(ErrorCode::AlreadyExists, "already exists"),
            LedgerError::Invariant(m) => {
                tracing::error!(error = %m, "ledger invariant");
                CodedError::internal("ledger invariant broken")
            }
            LedgerError::Db(e) => e.into(),
        }
    }
}

/// The stored outcome of an operation, for a repeat of the same request.
fn replay(op: Operation, hash: &str) -> Result<Operation, CodedError> {
    if op.request_hash != hash {
        return Err(CodedError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used for a different request",
        ));
    }
    if op.state == "failed" {
        let code = op
            .error_code
            .as_deref()
            .and_then(|c| serde_json::from_value(serde_json::Value::String(c.into())).ok())
            .unwrap_or(ErrorCode::FailedPrecondition);
        return Err(CodedError::new(
            code,
            op.error_detail.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok(op)
}

/// Refusals that depend on the state of the ledger are stored, so a repeat
/// gets the same answer even after the state changed.
fn refusal(mut op: Operation, e: &CodedError) -> Operation {
    op.state = "failed".into();
    op.error_code = Some(e.code.as_str().into());
    op.error_detail = Some(e.message.clone());
    op.saga_role = None;
    op.saga_step = None;
    op.next_attempt_at = None;
    op
}

impl Money {
    /// Writes `op` with `moves`; a taken id answers from what is stored; a
    /// refusal of the ledger is stored and answered.
    pub(super) async fn commit(
        &self,
        op: Operation,
        moves: &[Move],
        side: &SideEffects<'_>,
    ) -> Result<Operation, CodedError> {
        match self.ledger.execute(&op, moves, side).await {
            Ok(()) => Ok(op),
            Err(LedgerError::Exists) => {
                let hash = op.request_hash.clone();
                let stored = self.ledger.operation(&op.id).await?.ok_or_else(|| {
                    CodedError::internal("an operation vanished after a conflict")
                })?;
                replay(stored, &hash)
            }
            Err(e @ (LedgerError::InsufficientFunds | LedgerError::Overflow)) => {
                let err = CodedError::from(e);
                let hash = op.request_hash.clone();
                let stored = self.ledger.record_refusal(&refusal(op, &err)).await?;
                replay(stored, &hash)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The stored outcome under `id`, if the operation exists.
    pub(super) async fn stored(&self, id: &str, hash: &str) -> Result<Option<Outcome>, CodedError> {
        match self.ledger.operation(id).await? {
            Some(op) => replay(op, hash).map(|op| Some(op.into())),
            None => Ok(None),
        }
    }

    /// The home region of a user: this cell if the user lives here.
    async fn home_of(&self, user_id: &str) -> Result<Option<String>, CodedError> {
        // The directory first: a user homed elsewhere lives there, even
        // with a row here (one who moved away, or one arriving by a move
        // that has not cut over yet).
        if let Some(home) = self.replica.state().user_region(user_id)
            && home != self.region
        {
            return Ok(Some(home.to_string()));
        }
        // An erased row is a user who left (moved away, or deleted): the
        // directory says where they live now, if anywhere.
        if let Some(u) = self.users.user(user_id).await?
            && u.status != "deleted"
        {
            return Ok((u.status == "active").then(|| self.region.clone()));
        }
        Ok(self
            .replica
            .state()
            .user_region(user_id)
            .filter(|r| *r != self.region)
            .map(String::from))
    }

    /// `POST /v1/wallet/transfers`.
    pub async fn transfer(
        &self,
        p: &Principal,
        key: &str,
        req: &TransferRequest,
    ) -> Result<Outcome, CodedError> {
        check_amount(req.amount, &req.currency)?;
        let to = req.to_user_id.trim();
        if to.is_empty() || to.len() > 64 {
            return Err(CodedError::field("to_user_id", "must be a user id"));
        }
        if to == p.user_id {
            return Err(CodedError::field(
                "to_user_id",
                "cannot transfer to yourself",
            ));
        }
        let memo = req.memo.as_deref().map(str::trim).filter(|m| !m.is_empty());
        if memo.is_some_and(|m| m.chars().count() > MAX_MEMO) {
            return Err(CodedError::field(
                "memo",
                format!("at most {MAX_MEMO} characters"),
            ));
        }
        let amount = req.amount.to_string();
        let parts = [to, &amount, &req.currency, memo.unwrap_or("")];
        let (id, hash) = operation_id("transfer", &p.user_id, key, &parts);
        if let Some(stored) = self.stored(&id, &hash).await? {
            return Ok(stored);
        }
        // Either side being moved: wait, or refuse as retryable.
        self.frozen.wait(&p.user_id).await?;
        self.frozen.wait(to).await?;
        let now = now_ms();
        let mut op = Operation {
            id: id.clone(),
            kind: "transfer".into(),
            actor: p.user_id.clone(),
            request_hash: hash.clone(),
            state: "posted".into(),
            from_user: Some(p.user_id.clone()),
            to_user: Some(to.into()),
            amount: req.amount,
            currency: req.currency.clone(),
            memo: memo.map(String::from),
            created_at: now,
            updated_at: now,
            ..Default::default()
        };
        let Some(home) = self.home_of(to).await? else {
            let err = CodedError::not_found("no such receiver");
            let stored = self.ledger.record_refusal(&refusal(op, &err)).await?;
            return replay(stored, &hash).map(Outcome::from);
        };
        if home == self.region {
            let event = received_event(&op);
            let m = Move::single(
                &id,
                Account::wallet(&p.user_id, &req.currency),
                Account::wallet(to, &req.currency),
                req.amount,
            );
            let side = SideEffects {
                event: Some(event),
                audit: None,
            };
            return Ok(self.commit(op, &[m], &side).await?.into());
        }
        // Saga step 1: hold the sender's money towards the peer's clearing
        // account. The worker takes it from here.
        op.state = "pending".into();
        op.peer_region = Some(home.clone());
        op.saga_role = Some("coordinator".into());
        op.saga_step = Some("hold_peer".into());
        op.next_attempt_at = Some(now);
        let m = super::saga_moves::hold_move(&op);
        let op = self.commit(op, &[m], &SideEffects::default()).await?;
        crate::failpoint::hit("saga.coordinator.after_hold");
        if op.saga_step.as_deref() == Some("hold_peer") {
            let _ = self.kick.send(op.id.clone());
        }
        Ok(op.into())
    }

    /// `POST /v1/cms/users/{id}/wallet/adjustments`: a correction by an
    /// operator, written with its audit entry in one transaction.
    pub async fn adjust(
        &self,
        operator: &Principal,
        user_id: &str,
        key: &str,
        req: &AdjustmentRequest,
    ) -> Result<Outcome, CodedError> {
        if req.amount == 0 {
            return Err(CodedError::field("amount", "must not be zero"));
        }
        check_amount(req.amount.checked_abs().unwrap_or(-1), &req.currency)?;
        let reason = req.reason.trim();
        if reason.is_empty() || reason.chars().count() > MAX_MEMO {
            return Err(CodedError::field(
                "reason",
                format!("say why, in at most {MAX_MEMO} characters"),
            ));
        }
        match self.users.user(user_id).await? {
            Some(u) if u.status != "deleted" => {}
            _ => return Err(CodedError::not_found("no such user in this region")),
        }
        let amount = req.amount.to_string();
        let parts = [user_id, &amount, &req.currency, reason];
        let (id, hash) = operation_id("adjustment", &operator.user_id, key, &parts);
        if let Some(stored) = self.stored(&id, &hash).await? {
            return Ok(stored);
        }
        let now = now_ms();
        let wallet = Account::wallet(user_id, &req.currency);
        let system = Account::system("adjustments", &req.currency);
        let (debit, credit) = if req.amount > 0 {
            (system, wallet)
        } else {
            (wallet, system)
        };
        let op = Operation {
            id: id.clone(),
            kind: "adjustment".into(),
            actor: operator.user_id.clone(),
            request_hash: hash,
            state: "posted".into(),
            from_user: (req.amount < 0).then(|| user_id.to_string()),
            to_user: (req.amount > 0).then(|| user_id.to_string()),
            amount: req.amount.abs(),
            currency: req.currency.clone(),
            memo: Some(reason.into()),
            created_at: now,
            updated_at: now,
            ..Default::default()
        };
        let m = Move::single(&id, debit, credit, req.amount.abs());
        let side = SideEffects {
            event: None,
            audit: Some(AuditEntry {
                at: now,
                actor: &operator.user_id,
                action: "wallet.adjust",
                target: Some(user_id),
                details: serde_json::json!({
                    "operation_id": id,
                    "amount": req.amount,
                    "currency": req.currency,
                    "reason": reason,
                })
                .to_string(),
            }),
        };
        Ok(self.commit(op, &[m], &side).await?.into())
    }

    /// A verified deposit notification from a payment provider. `signed` is
    /// the notification as the provider sent it, when it came from the
    /// provider: only then is a deposit for a user of another region passed
    /// on to their home (with it, so the home verifies it too); one that
    /// was passed on already is never passed on again.
    pub async fn deposit(
        &self,
        provider: &str,
        d: &super::provider::Deposit,
        signed: Option<&super::provider::Signed>,
    ) -> Result<Outcome, CodedError> {
        check_amount(d.amount, &d.currency)?;
        if d.event_id.is_empty() || d.event_id.len() > 128 {
            return Err(CodedError::field("event_id", "1 to 128 characters"));
        }
        let actor = format!("provider:{provider}");
        let amount = d.amount.to_string();
        let parts = [d.user_id.as_str(), &amount, &d.currency];
        let (id, hash) = operation_id("deposit", &actor, &d.event_id, &parts);
        if let Some(stored) = self.stored(&id, &hash).await? {
            return Ok(stored);
        }
        self.frozen.wait(&d.user_id).await?;
        let homed_elsewhere = self
            .replica
            .state()
            .user_region(&d.user_id)
            .is_some_and(|h| h != self.region);
        match self.users.user(&d.user_id).await? {
            Some(u) if u.status != "deleted" && !homed_elsewhere => {}
            // Not here (any more): a user who moved away leaves an erased
            // row behind, and their deposit goes to the new home; one the
            // directory still homes here is gone (404).
            _ => match signed {
                Some(signed) => return self.forward_deposit(provider, d, signed).await,
                None => return Err(CodedError::not_found("no such user here")),
            },
        }
        let now = now_ms();
        let op = Operation {
            id: id.clone(),
            kind: "deposit".into(),
            actor,
            request_hash: hash,
            state: "posted".into(),
            to_user: Some(d.user_id.clone()),
            amount: d.amount,
            currency: d.currency.clone(),
            memo: Some(format!("{provider} {}", d.event_id)),
            created_at: now,
            updated_at: now,
            ..Default::default()
        };
        let m = Move::single(
            &id,
            Account::system("deposits", &d.currency),
            Account::wallet(&d.user_id, &d.currency),
            d.amount,
        );
        let side = SideEffects {
            event: Some(OutboxEvent {
                topic: "money.deposited",
                user_id: d.user_id.clone(),
                payload: op_payload(&op),
                trace: homecell_common::trace::current_header(),
            }),
            audit: None,
        };
        Ok(self.commit(op, &[m], &side).await?.into())
    }

    /// A deposit for a user of another region: the callback was verified
    /// here; the user's home cell verifies it again and books it
    /// (idempotent there by event id).
    async fn forward_deposit(
        &self,
        provider: &str,
        d: &super::provider::Deposit,
        signed: &super::provider::Signed,
    ) -> Result<Outcome, CodedError> {
        let home = self
            .replica
            .state()
            .user_region(&d.user_id)
            .filter(|r| *r != self.region)
            .map(String::from)
            .ok_or_else(|| CodedError::not_found("no such user"))?;
        let req = homecell_proto::cell::ForwardDepositRequest {
            provider: provider.to_string(),
            body: signed.body.to_vec(),
            signature: signed.signature.clone(),
            from_region: self.region.clone(),
        };
        let (id, state) = self.peers.forward_deposit(&home, req).await?;
        tracing::info!(home, transfer = %id, "deposit forwarded to the user's home cell");
        Ok(Outcome::from(Operation {
            id,
            kind: "deposit".into(),
            state,
            ..Default::default()
        }))
    }

    /// One of the caller's operations (either side).
    pub async fn get(&self, p: &Principal, id: &str) -> Result<Operation, CodedError> {
        let op = self
            .ledger
            .operation(id)
            .await?
            .ok_or_else(|| CodedError::not_found("no such transfer"))?;
        let mine = op.from_user.as_deref() == Some(&p.user_id)
            || op.to_user.as_deref() == Some(&p.user_id);
        if !mine {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                "this transfer is not yours",
            ));
        }
        Ok(op)
    }
}

/// The notice event for a receiver, as JSON (no personal data beyond ids).
pub fn received_event(op: &Operation) -> OutboxEvent {
    OutboxEvent {
        topic: "money.received",
        user_id: op.to_user.clone().unwrap_or_default(),
        payload: op_payload(op),
        trace: homecell_common::trace::current_header(),
    }
}

fn op_payload(op: &Operation) -> String {
    serde_json::json!({
        "transfer_id": op.id,
        "from_user_id": op.from_user,
        "amount": op.amount,
        "currency": op.currency,
    })
    .to_string()
}
