//! The directory claims a cell makes (registration, WeChat sign-up) and
//! gives back (a failed sign-up, a deleted account), kept so that none is
//! left behind. A claim is recorded (`pending`) before the control plane is
//! asked; the transaction that creates the user removes the record, and a
//! release that the control plane confirmed removes it too. Whatever stays
//! (a crash between the claim and the insert, a control plane that timed
//! out, a release that failed) is released by `reconcile`, which first
//! marks the record `releasing`: from then on the user it was for can no
//! longer be created, so a slow registration and the reconciliation never
//! both win.

use super::service::Identity;
use super::store::IdentityStore;
use crate::clock::now_ms;
use crate::db::{DbError, DbResult};
use crate::db::{Tx, stmt};
use std::time::Duration;

/// How often the reconciliation (and the reset-budget pruning) runs, at
/// most.
const EVERY: Duration = Duration::from_secs(30);

/// How long a registration waits for its claim. The claim carries the
/// same deadline (`not_after_unix_ms`), past which the control plane
/// refuses it: one delayed in the network cannot land later.
pub(crate) const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// How far the cell's and the control plane's clocks may disagree.
pub const CLOCK_SKEW_SECS: u64 = 5;

/// The least `unsettled_claims_release_after_secs`: a claim's deadline
/// plus the clocks' disagreement. A release sent sooner could come before
/// a claim that still lands, leaving the identifier taken by no user.
pub const MIN_SETTLE_SECS: u64 = CLAIM_WAIT.as_secs() + CLOCK_SKEW_SECS;

impl IdentityStore {
    /// Records a claim about to be made.
    pub async fn record_claim(&self, identifier: &str, user_id: &str, now: i64) -> DbResult<()> {
        stmt("INSERT INTO pending_claims (identifier, user_id, state, created_at) VALUES ($1, $2, 'pending', $3) ON CONFLICT (identifier, user_id) DO NOTHING")
            .bind(identifier).bind(user_id).bind(now).execute(&self.db).await?;
        Ok(())
    }

    /// Forgets a record: the claim was refused, or released.
    pub async fn forget_claim(&self, identifier: &str, user_id: &str) -> DbResult<()> {
        stmt("DELETE FROM pending_claims WHERE identifier = $1 AND user_id = $2")
            .bind(identifier)
            .bind(user_id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Records older than `before`: (identifier, user_id, state).
    pub async fn unsettled_claims(&self, before: i64) -> DbResult<Vec<(String, String, String)>> {
        stmt(
            "SELECT identifier, user_id, state FROM pending_claims WHERE created_at < $1 ORDER BY created_at LIMIT 100")
            .bind(before).fetch_all(&self.db).await
    }

    /// Takes a record over for release; false when its registration settled
    /// it meanwhile.
    pub async fn begin_release(&self, identifier: &str, user_id: &str) -> DbResult<bool> {
        let r = stmt(
            "UPDATE pending_claims SET state = 'releasing' WHERE identifier = $1 AND user_id = $2",
        )
        .bind(identifier)
        .bind(user_id)
        .execute(&self.db)
        .await?;
        Ok(r == 1)
    }
}

/// Inside the transaction that creates a user: settles the record of its
/// claim. Refuses (rolling the transaction back) when the reconciliation
/// has taken the record over to release the claim. No record (a user made
/// by a host command) passes.
pub(crate) async fn settle_claim(tx: &mut Tx, identifier: &str, user_id: &str) -> DbResult<()> {
    let state: Option<String> =
        stmt("DELETE FROM pending_claims WHERE identifier = $1 AND user_id = $2 RETURNING state")
            .bind(identifier)
            .bind(user_id)
            .scalar_optional(tx)
            .await?;
    if state.as_deref() == Some("releasing") {
        return Err(DbError::Conflict);
    }
    Ok(())
}

impl Identity {
    /// One pass: releases every claim left unsettled for
    /// `claim_settle_ms` (a registration younger than that may still
    /// finish: its claim waits at most 5 s, then one insert). Returns how
    /// many were released.
    pub async fn reconcile_claims(&self) -> DbResult<usize> {
        let mut released = 0;
        let before = now_ms() - self.claim_settle_ms;
        for (identifier, user_id, state) in self.store.unsettled_claims(before).await? {
            if state == "pending" && !self.store.begin_release(&identifier, &user_id).await? {
                continue;
            }
            match self.release(&identifier, &user_id).await {
                Ok(()) => released += 1,
                // Held by someone else: nothing of ours to give back.
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    self.store.forget_claim(&identifier, &user_id).await?;
                }
                Err(s) => {
                    tracing::warn!(user_id, error = %s.message(), "cannot release an unsettled claim yet");
                }
            }
        }
        Ok(released)
    }
}

/// The identity upkeep loop: unsettled claims, spent reset budgets,
/// expired sign-in codes.
pub async fn run<C: AsRef<Identity> + Send + Sync + 'static>(
    owner: std::sync::Arc<C>,
    stop: tokio_util::sync::CancellationToken,
) {
    let identity = owner.as_ref().as_ref();
    let settle = Duration::from_millis(u64::try_from(identity.claim_settle_ms).unwrap_or(0));
    let mut every = tokio::time::interval(EVERY.min(settle).max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match identity.reconcile_claims().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released unsettled directory claims"),
            Err(DbError::Db(e)) => tracing::warn!(error = %e, "claim reconciliation failed"),
            Err(DbError::Conflict) => {}
        }
        if let Err(e) = identity.store.prune_reset_budgets(now_ms()).await {
            tracing::warn!(error = %e, "cannot prune reset budgets");
        }
        if let Err(e) = identity.store.prune_sign_in_codes(now_ms()).await {
            tracing::warn!(error = %e, "cannot prune expired sign-in codes");
        }
    }
}
