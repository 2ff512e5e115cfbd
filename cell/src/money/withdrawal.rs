//! Withdrawals: hold the wallet's money, ask the payment provider to pay it
//! out, then post the hold when the provider says paid, or void it when the
//! provider says failed, in a signed answer (provider.rs). An outcome that
//! stays unknown past `withdrawal_timeout_secs` (a timeout, a 5xx,
//! "processing", an answer that cannot be verified) is never voided: the
//! withdrawal moves to `reconciling`, the money stays held, and the payout
//! is asked again, with backoff, until the provider says paid or failed.
//! Voiding on "unknown" would give the money back for a payout the provider
//! may have made. The step to run next is durable in the operation row
//! (`saga_role = payout`), so a crash between asking and booking only means
//! asking again with the same payout id.

use super::ledger::{Account, Move, Operation, OutboxEvent, Phase, SideEffects, StepUpdate};
use super::provider::Payout;
use super::service::{Money, Outcome, check_amount, operation_id};
use crate::clock::now_ms;
use crate::identity::service::Principal;
use homecell_proto::error::{CodedError, ErrorCode};

#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WithdrawalRequest {
    /// Minor units, > 0.
    pub amount: i64,
    pub currency: String,
}

fn payout_move(op: &Operation, step: &str, phase: Phase) -> Move {
    Move {
        id: format!("{}:{step}", op.id),
        operation_id: op.id.clone(),
        debit: Account::wallet(op.from_user.as_deref().unwrap_or_default(), &op.currency),
        credit: Account::system("withdrawals", &op.currency),
        amount: op.amount,
        phase,
        pending_id: (phase != Phase::Pending).then(|| format!("{}:hold", op.id)),
    }
}

impl Money {
    /// `POST /v1/wallet/withdrawals`: holds the amount and starts the payout.
    pub async fn withdraw(
        &self,
        p: &Principal,
        key: &str,
        req: &WithdrawalRequest,
    ) -> Result<Outcome, CodedError> {
        let Some(provider) = self.withdrawals_via.clone() else {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "withdrawals are not configured in this region",
            ));
        };
        check_amount(req.amount, &req.currency)?;
        let amount = req.amount.to_string();
        let (id, hash) = operation_id("withdrawal", &p.user_id, key, &[&amount, &req.currency]);
        if let Some(stored) = self.stored(&id, &hash).await? {
            return Ok(stored);
        }
        let now = now_ms();
        let op = Operation {
            id,
            kind: "withdrawal".into(),
            actor: p.user_id.clone(),
            request_hash: hash,
            state: "pending".into(),
            from_user: Some(p.user_id.clone()),
            peer_region: None,
            amount: req.amount,
            currency: req.currency.clone(),
            memo: Some(format!("payout via {provider}")),
            saga_role: Some("payout".into()),
            saga_step: Some(provider),
            next_attempt_at: Some(now),
            created_at: now,
            updated_at: now,
            ..Default::default()
        };
        let hold = payout_move(&op, "hold", Phase::Pending);
        let op = self.commit(op, &[hold], &SideEffects::default()).await?;
        if op.state == "pending" {
            let _ = self.kick.send(op.id.clone());
        }
        Ok(Outcome::from(op))
    }

    /// Asks the provider once and books what it decided.
    pub(super) async fn drive_payout(&self, op: &Operation) -> Result<(), CodedError> {
        let provider = op.saga_step.clone().unwrap_or_default();
        let user = op.from_user.as_deref().unwrap_or_default();
        let answer = self
            .providers
            .payout(&provider, &op.id, user, op.amount, &op.currency)
            .await;
        let now = now_ms();
        let from = (op.state.as_str(), Some(provider.as_str()));
        let (state, m, event, reason) = match answer {
            Payout::Succeeded => (
                "posted",
                payout_move(op, "post", Phase::Post),
                Some(OutboxEvent {
                    topic: "money.withdrawn",
                    user_id: user.to_string(),
                    payload: serde_json::json!({
                        "transfer_id": op.id, "amount": op.amount, "currency": op.currency,
                    })
                    .to_string(),
                    trace: homecell_common::trace::current_header(),
                }),
                None,
            ),
            Payout::Undecided(e) => {
                if op.state == "pending" && now - op.created_at > self.withdrawal_timeout_ms {
                    tracing::warn!(withdrawal = %op.id, reason = %e, "withdrawal outcome unknown: reconciling");
                    let to = StepUpdate {
                        state: "reconciling",
                        saga_step: Some(&provider),
                        error_code: None,
                        error_detail: None,
                    };
                    self.ledger
                        .advance(&op.id, from, &to, &[], &SideEffects::default(), now)
                        .await?;
                    return Ok(());
                }
                return self.retry_later(op, &e, now).await;
            }
            Payout::Failed(reason) => {
                tracing::info!(withdrawal = %op.id, reason, "withdrawal voided");
                (
                    "voided",
                    payout_move(op, "void", Phase::Void),
                    None,
                    Some(reason),
                )
            }
        };
        let to = StepUpdate {
            state,
            saga_step: Some("done"),
            error_code: reason
                .as_ref()
                .map(|_| ErrorCode::FailedPrecondition.as_str()),
            error_detail: reason.as_deref(),
        };
        let side = SideEffects { event, audit: None };
        self.ledger
            .advance(&op.id, from, &to, &[m], &side, now)
            .await?;
        Ok(())
    }
}
