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
    /// Records a claim about to be made, and the identifier it replaces
    /// if it is a change.
    pub async fn record_claim(
        &self,
        identifier: &str,
        user_id: &str,
        replaces: Option<&str>,
        now: i64,
    ) -> DbResult<()> {
        stmt("INSERT INTO pending_claims (identifier, user_id, state, created_at, replaces) VALUES ($1, $2, 'pending', $3, $4) ON CONFLICT (identifier, user_id) DO NOTHING")
            .bind(identifier).bind(user_id).bind(now).bind(replaces).execute(&self.db).await?;
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

    /// Records older than `before`.
    pub async fn unsettled_claims(&self, before: i64) -> DbResult<Vec<Unsettled>> {
        stmt(
            "SELECT identifier, user_id, state, replaces FROM pending_claims WHERE created_at < $1 ORDER BY created_at LIMIT 100")
            .bind(before).fetch_all(&self.db).await
    }

    /// Finishes a change whose swap the control plane made but whose
    /// user was not updated (the reconciliation found the old identifier
    /// taken since): the record goes, the new identifier replaces the old.
    pub async fn finish_change(&self, new: &str, old: &str, user_id: &str) -> DbResult<()> {
        let (Some((kind, value)), Some((_, old_value))) =
            (new.split_once(':'), old.split_once(':'))
        else {
            return Err(DbError::Conflict);
        };
        let mut tx = self.db.begin().await?;
        stmt("DELETE FROM pending_claims WHERE identifier = $1 AND user_id = $2")
            .bind(new)
            .bind(user_id)
            .execute(&mut tx)
            .await?;
        let has_old: Option<String> =
            stmt("SELECT value FROM identifiers WHERE user_id = $1 AND kind = $2 AND value = $3")
                .bind(user_id)
                .bind(kind)
                .bind(old_value)
                .scalar_optional(&mut tx)
                .await?;
        let has_new: Option<String> =
            stmt("SELECT value FROM identifiers WHERE user_id = $1 AND kind = $2 AND value = $3")
                .bind(user_id)
                .bind(kind)
                .bind(value)
                .scalar_optional(&mut tx)
                .await?;
        if has_new.is_none() {
            super::store::replace_identifier(&mut tx, user_id, kind, has_old.as_deref(), value)
                .await?;
        }
        tx.commit().await?;
        Ok(())
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

/// A claim record the reconciliation looks at.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Unsettled {
    pub identifier: String,
    pub user_id: String,
    /// `pending` (its request may still settle it) or `releasing`.
    pub state: String,
    /// The identifier this claim replaced in the same revision (a change).
    pub replaces: Option<String>,
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
        for u in self.store.unsettled_claims(before).await? {
            let Unsettled {
                identifier,
                user_id,
                state,
                replaces,
            } = u;
            if state == "pending" && !self.store.begin_release(&identifier, &user_id).await? {
                continue;
            }
            if let Some(old) = replaces {
                released += usize::from(self.unswap(&identifier, &old, &user_id).await?);
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

impl Identity {
    /// An identifier change left unsettled: the control plane may or may
    /// not have swapped `new` for `old`. Swapping back (claim `old`, release
    /// `new`, one revision) restores the user as the cell holds it. If
    /// `old` is someone else's by now, the first swap must have been made
    /// (it released `old`) and `new` is still this user's: the change is
    /// finished here instead. True when the record is settled.
    async fn unswap(&self, new: &str, old: &str, user_id: &str) -> DbResult<bool> {
        let (Some((kind, new_value)), Some((_, old_value))) =
            (new.split_once(':'), old.split_once(':'))
        else {
            self.store.forget_claim(new, user_id).await?;
            return Ok(true);
        };
        // What the cell holds now decides: the old identifier (swap back),
        // the new one (settled), or neither (changed again since, the
        // account deleted or moved): then only `new` is given back, and
        // `old` is not taken again for a user who no longer has it.
        match self
            .store
            .identifier_of_kind(user_id, kind)
            .await?
            .as_deref()
        {
            Some(v) if v == new_value => {
                self.store.forget_claim(new, user_id).await?;
                return Ok(true);
            }
            Some(v) if v == old_value => {}
            _ => {
                return match self.release(new, user_id).await {
                    Ok(()) => Ok(true),
                    Err(s) if s.code() == tonic::Code::PermissionDenied => {
                        self.store.forget_claim(new, user_id).await?;
                        Ok(true)
                    }
                    Err(_) => Ok(false),
                };
            }
        }
        let now = now_ms();
        let req = homecell_proto::control::ClaimIdentifierRequest {
            identifier: old.to_string(),
            user_id: user_id.to_string(),
            region: self.region.clone(),
            not_after_unix_ms: u64::try_from(now).unwrap_or(0)
                + u64::try_from(CLAIM_WAIT.as_millis()).unwrap_or(0),
            replaces: new.to_string(),
        };
        let mut client =
            homecell_proto::control::directory_service_client::DirectoryServiceClient::new(
                self.cp.clone(),
            );
        match tokio::time::timeout(CLAIM_WAIT, client.claim_identifier(req)).await {
            Ok(Ok(_)) => {
                self.store.forget_claim(new, user_id).await?;
                Ok(true)
            }
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => {
                self.store.finish_change(new, old, user_id).await?;
                tracing::info!(user_id, "finished an identifier change left unsettled");
                Ok(true)
            }
            // `new` is another user's: the first swap was never made.
            Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => {
                self.store.forget_claim(new, user_id).await?;
                Ok(true)
            }
            Ok(Err(s)) => {
                tracing::warn!(user_id, error = %s.message(), "cannot settle an identifier change yet");
                Ok(false)
            }
            Err(_) => Ok(false),
        }
    }
}

/// The identity upkeep loop: unsettled claims, spent reset budgets,
/// expired sign-in codes and identifier proofs.
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
        if let Err(e) = identity.store.prune_identifier_proofs(now_ms()).await {
            tracing::warn!(error = %e, "cannot prune expired identifier proofs");
        }
    }
}
