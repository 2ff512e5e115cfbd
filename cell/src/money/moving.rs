//! A moving user's money: each wallet's balance travels to the new home as
//! a transfer between cells of kind `move`, from the user to the same user,
//! through the clearing accounts like any other (`saga.rs`), so both
//! ledgers and the audit across cells hold at every step.
//!
//! The move drives the first steps itself, because its cut-over is the
//! commit point: before it, the money is held on both sides (`move_hold`,
//! a step the saga worker leaves alone); at the cut-over the move hands the
//! operation to the saga worker to post (`post_peer`); a move undone before
//! it voids the holds (`void_peer`). Every id derives from the move's id
//! and the currency, so a step repeated after a crash names the same
//! operation.

use super::ledger::{LedgerError, Operation, Phase, SideEffects, StepUpdate};
use super::saga::PeerAnswer;
use super::saga_moves::{coordinator_move, hold_move};
use super::service::{Money, derive_id};
use crate::clock::now_ms;
use homecell_common::hex::sha256;
use homecell_proto::error::CodedError;

/// The step a move's money waits in until the cut-over.
const MOVE_HOLD: &str = "move_hold";

/// How a step of the move's money went.
pub enum MoneyStep {
    Done,
    /// The new home refused: the move cannot go on.
    Refused(String),
    /// Not now: try again later.
    Later(String),
}

impl Money {
    fn move_op_id(move_id: &str, currency: &str) -> String {
        derive_id("move", move_id, currency)
    }

    /// The move's operation for each of the user's wallets, where one exists.
    async fn move_ops(&self, move_id: &str, user_id: &str) -> Result<Vec<Operation>, CodedError> {
        let mut ops = Vec::new();
        for b in self.ledger.balances(user_id).await? {
            if let Some(op) = self
                .ledger
                .operation(&Self::move_op_id(move_id, &b.currency))
                .await?
            {
                ops.push(op);
            }
        }
        Ok(ops)
    }

    /// Before the cut-over: holds each wallet's whole balance towards the
    /// new home, here and there. The user is frozen and has nothing in
    /// flight, so the balances stand still.
    pub async fn hold_for_move(
        &self,
        move_id: &str,
        user_id: &str,
        to: &str,
    ) -> Result<MoneyStep, CodedError> {
        for b in self.ledger.balances(user_id).await? {
            let id = Self::move_op_id(move_id, &b.currency);
            let op = match self.ledger.operation(&id).await? {
                Some(op) => op,
                None if b.available <= 0 => continue,
                None => {
                    let op = move_operation(
                        id.clone(),
                        (move_id, user_id, to),
                        &b,
                        &b.currency,
                        MOVE_HOLD,
                        None,
                    );
                    match self
                        .ledger
                        .execute(&op, &[hold_move(&op)], &SideEffects::default())
                        .await
                    {
                        Ok(()) | Err(LedgerError::Exists) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.ledger
                        .operation(&id)
                        .await?
                        .ok_or_else(|| CodedError::internal("move operation vanished"))?
                }
            };
            if op.saga_step.as_deref() != Some(MOVE_HOLD) {
                return Ok(MoneyStep::Refused(format!(
                    "the money of this move is {} already",
                    op.state
                )));
            }
            match self.call_peer("hold", &op).await {
                PeerAnswer::Done => {}
                // A move's own money is never re-aimed (the target holds
                // it before the directory names the target).
                PeerAnswer::Refused(r) | PeerAnswer::Moved(r) => return Ok(MoneyStep::Refused(r)),
                PeerAnswer::Unreachable(e) => return Ok(MoneyStep::Later(e)),
            }
        }
        Ok(MoneyStep::Done)
    }

    /// Moves the move's holds to `step` (with their ledger move) and
    /// wakes the saga worker, which finishes them with the new home.
    async fn release_move_holds(
        &self,
        move_id: &str,
        user_id: &str,
        to: StepUpdate<'_>,
        phase: Phase,
    ) -> Result<(), CodedError> {
        for op in self.move_ops(move_id, user_id).await? {
            if op.saga_step.as_deref() != Some(MOVE_HOLD) {
                continue;
            }
            let step = if phase == Phase::Post { "post" } else { "void" };
            let m = coordinator_move(&op, step, phase);
            self.ledger
                .advance(
                    &op.id,
                    ("pending", Some(MOVE_HOLD)),
                    &to,
                    &[m],
                    &SideEffects::default(),
                    now_ms(),
                )
                .await?;
            let _ = self.kick.send(op.id.clone());
        }
        Ok(())
    }

    /// At the cut-over: the commit point of the move's money.
    pub async fn post_for_move(&self, move_id: &str, user_id: &str) -> Result<(), CodedError> {
        let to = StepUpdate {
            state: "pending",
            saga_step: Some("post_peer"),
            ..Default::default()
        };
        self.release_move_holds(move_id, user_id, to, Phase::Post)
            .await
    }

    /// A move undone before its cut-over: the holds are voided.
    pub async fn void_for_move(&self, move_id: &str, user_id: &str) -> Result<(), CodedError> {
        let to = StepUpdate {
            state: "voided",
            saga_step: Some("void_peer"),
            error_detail: Some("the move was undone"),
            ..Default::default()
        };
        self.release_move_holds(move_id, user_id, to, Phase::Void)
            .await
    }

    /// Whether every operation of the move's money (its holds, and any
    /// sweep after it) is done on both sides.
    pub async fn move_money_settled(
        &self,
        move_id: &str,
        user_id: &str,
    ) -> Result<bool, CodedError> {
        Ok(self
            .ledger
            .operations_from_by(user_id, &format!("move:{move_id}"))
            .await?
            .iter()
            .all(|op| op.saga_step.as_deref().is_none_or(|s| s == "done")))
    }

    /// After the cut-over: money that reached the old wallet anyway (a
    /// write that raced the freeze) follows the user as a transfer of its
    /// own, which the saga worker runs to the end.
    pub async fn sweep_after_move(
        &self,
        move_id: &str,
        user_id: &str,
        to: &str,
    ) -> Result<u32, CodedError> {
        let mut swept = 0;
        for b in self.ledger.balances(user_id).await? {
            if b.available <= 0 {
                continue;
            }
            let key = format!("{}:{}", b.currency, b.available);
            let now = now_ms();
            let op = move_operation(
                derive_id("move-sweep", move_id, &key),
                (move_id, user_id, to),
                &b,
                &key,
                "hold_peer",
                Some(now),
            );
            match self
                .ledger
                .execute(&op, &[hold_move(&op)], &SideEffects::default())
                .await
            {
                Ok(()) => {
                    swept += 1;
                    tracing::warn!(r#move = move_id, currency = %b.currency, "money reached a moved user's old wallet; it follows them");
                    let _ = self.kick.send(op.id.clone());
                }
                Err(LedgerError::Exists) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(swept)
    }
}

/// An operation of a move's money: the user's whole available balance in
/// one currency, from the user here to the same user at `to`, coordinated
/// from here. `tag` tells one of the move's operations from another in the
/// request hash; `next_attempt_at` is None for a step the saga worker
/// leaves alone.
fn move_operation(
    id: String,
    (move_id, user_id, to): (&str, &str, &str),
    b: &super::ledger::Balance,
    tag: &str,
    step: &str,
    next_attempt_at: Option<i64>,
) -> Operation {
    let now = now_ms();
    Operation {
        id,
        kind: "move".into(),
        actor: format!("move:{move_id}"),
        request_hash: sha256(&format!("{move_id}\0{user_id}\0{to}\0{tag}")),
        state: "pending".into(),
        from_user: Some(user_id.to_string()),
        to_user: Some(user_id.to_string()),
        peer_region: Some(to.to_string()),
        amount: b.available,
        currency: b.currency.clone(),
        saga_role: Some("coordinator".into()),
        saga_step: Some(step.into()),
        next_attempt_at,
        created_at: now,
        updated_at: now,
        ..Default::default()
    }
}
