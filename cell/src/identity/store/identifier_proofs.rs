//! The identity store's identifier proofs: a code sent to an email address
//! or phone number that must come back before it is claimed (a
//! registration, a signed-in user's new identifier). Hashed, single use,
//! expiring; a registration's row also holds what creates the user.

use super::IdentityStore;
use crate::db::{DbError, DbResult, Tx, stmt};

/// A proof about to be sent.
pub struct NewProof<'a> {
    pub id: &'a str,
    /// `register` or `change`.
    pub purpose: &'a str,
    /// The user to be created, or the one changing an identifier.
    pub user_id: &'a str,
    pub kind: &'a str,
    pub value: &'a str,
    pub password_hash: Option<&'a str>,
    pub display_name: Option<&'a str>,
    pub code_hash: &'a str,
    pub expires_at: i64,
    pub now: i64,
}

/// A live proof, with a guess reserved at it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LiveProof {
    pub id: String,
    pub user_id: String,
    pub kind: String,
    pub value: String,
    pub password_hash: Option<String>,
    pub display_name: Option<String>,
    pub code_hash: String,
}

impl IdentityStore {
    /// Stores a proof (its code hashed) and the code's delivery in the
    /// outbox, together. A user's new `change` proof replaces any earlier
    /// one; a registration's stands beside others for the same identifier
    /// (a stranger's must not displace the owner's).
    pub async fn create_proof(&self, p: &NewProof<'_>, outbox_payload: &str) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        if p.purpose == "change" {
            stmt("UPDATE identifier_proofs SET used_at = $1 WHERE user_id = $2 AND purpose = 'change' AND used_at IS NULL")
                .bind(p.now).bind(p.user_id).execute(&mut tx).await?;
        }
        stmt("INSERT INTO identifier_proofs (id, purpose, user_id, kind, value, password_hash, display_name, code_hash, attempts, created_at, expires_at) \
              VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10)")
            .bind(p.id).bind(p.purpose).bind(p.user_id).bind(p.kind).bind(p.value)
            .bind(p.password_hash).bind(p.display_name).bind(p.code_hash).bind(p.now).bind(p.expires_at)
            .execute(&mut tx).await?;
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'auth.identifier_code', $2, $3, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string()).bind(p.user_id).bind(outbox_payload).bind(p.now)
            .bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The identifier (kind, value) a live proof is for, read before a
    /// guess is spent: the guess is charged to that identifier's budget.
    /// A proof whose guesses are spent is not read: guesses at it cost
    /// no budget.
    pub async fn proof_identifier(
        &self,
        id: &str,
        purpose: &str,
        max: i64,
        now: i64,
    ) -> DbResult<Option<(String, String)>> {
        stmt("SELECT kind, value FROM identifier_proofs WHERE id = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3 AND attempts < $4")
            .bind(id).bind(purpose).bind(now).bind(max).fetch_optional(&self.db).await
    }

    /// Reserves one guess at a live proof before its code is compared (one
    /// statement: a concurrent storm cannot exceed `max`). `user_id`, when
    /// given, must be the proof's (a change is its user's alone).
    pub async fn reserve_proof_guess(
        &self,
        id: &str,
        purpose: &str,
        user_id: Option<&str>,
        max: i64,
        now: i64,
    ) -> DbResult<Option<LiveProof>> {
        stmt(
            "UPDATE identifier_proofs SET attempts = attempts + 1 \
             WHERE id = $1 AND purpose = $2 AND ($3 = '' OR user_id = $3) \
             AND used_at IS NULL AND expires_at > $4 AND attempts < $5 \
             RETURNING id, user_id, kind, value, password_hash, display_name, code_hash",
        )
        .bind(id)
        .bind(purpose)
        .bind(user_id.unwrap_or(""))
        .bind(now)
        .bind(max)
        .fetch_optional(self.db.writer())
        .await
    }

    /// Uses a proof up, giving back the guess the right code spent from
    /// `budget_key`. False when it was used meanwhile (single use).
    pub async fn use_proof(&self, id: &str, budget_key: &str, now: i64) -> DbResult<bool> {
        let mark =
            stmt("UPDATE identifier_proofs SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                .bind(now)
                .bind(id);
        self.use_once(mark, budget_key).await
    }

    /// Makes a used proof usable again (its claim could not be made yet;
    /// identity/proof.rs says why that is safe). Its guesses stay spent.
    pub async fn restore_proof(&self, id: &str) -> DbResult<()> {
        stmt("UPDATE identifier_proofs SET used_at = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Deletes the proofs past their expiry, used or not: nothing reads
    /// them again, and a registration's password hash goes with them.
    /// Returns how many.
    pub async fn prune_identifier_proofs(&self, now: i64) -> DbResult<u64> {
        stmt("DELETE FROM identifier_proofs WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.db)
            .await
    }

    /// The user's identifier of `kind`, if any (one email and one phone
    /// each: a change replaces it).
    pub async fn identifier_of_kind(&self, user_id: &str, kind: &str) -> DbResult<Option<String>> {
        let row: Option<(String,)> = stmt(
            "SELECT value FROM identifiers WHERE user_id = $1 AND kind = $2 ORDER BY value LIMIT 1",
        )
        .bind(user_id)
        .bind(kind)
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// A proven change, after the control plane swapped the claims:
    /// settles the new claim's record (refused when the reconciliation
    /// has taken it over), replaces the old identifier of its kind, and
    /// tells the old one.
    pub async fn change_identifier(
        &self,
        user_id: &str,
        kind: &str,
        old: Option<&str>,
        new: &str,
        now: i64,
    ) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        lock_user(&mut tx, user_id).await?;
        crate::identity::claims::settle_claim(&mut tx, &format!("{kind}:{new}"), user_id).await?;
        // What the swap replaced must still be what the user has: a change
        // made meanwhile (another proof) refuses this one, and the
        // reconciliation gives its claim back.
        let now_held: Option<String> = stmt(
            "SELECT value FROM identifiers WHERE user_id = $1 AND kind = $2 ORDER BY value LIMIT 1",
        )
        .bind(user_id)
        .bind(kind)
        .scalar_optional(&mut tx)
        .await?;
        if now_held.as_deref() != old {
            return Err(DbError::Conflict);
        }
        replace_identifier(&mut tx, user_id, kind, old, new).await?;
        if let Some(old) = old {
            // The old address hears of it: if the change was not its
            // owner's doing, they learn while they can still act.
            let notice = serde_json::json!({ "channel": kind, "to": old, "kind": kind });
            stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'auth.identifier_changed', $2, $3, $4, $5)")
                .bind(uuid::Uuid::now_v7().to_string()).bind(user_id).bind(notice.to_string()).bind(now)
                .bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes an identifier and records its claim for release, in one
    /// transaction: the release that follows, or the reconciliation if
    /// that fails, gives it back to the directory.
    ///
    /// Refused (`Conflict`) when it is the user's last way to sign in,
    /// counted under the user's row lock: two removals at once cannot
    /// both pass.
    pub async fn remove_identifier(
        &self,
        user_id: &str,
        kind: &str,
        value: &str,
        now: i64,
    ) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        lock_user(&mut tx, user_id).await?;
        let ways: i64 = stmt("SELECT (SELECT COUNT(*) FROM identifiers WHERE user_id = $1) + (SELECT COUNT(*) FROM wechat_bindings WHERE user_id = $1)")
            .bind(user_id)
            .scalar(&mut tx)
            .await?;
        if ways < 2 {
            return Err(DbError::Conflict);
        }
        let n = stmt("DELETE FROM identifiers WHERE user_id = $1 AND kind = $2 AND value = $3")
            .bind(user_id)
            .bind(kind)
            .bind(value)
            .execute(&mut tx)
            .await?;
        if n == 1 {
            stmt("INSERT INTO pending_claims (identifier, user_id, state, created_at) VALUES ($1, $2, 'releasing', $3) \
                  ON CONFLICT (identifier, user_id) DO UPDATE SET state = 'releasing'")
                .bind(format!("{kind}:{value}")).bind(user_id).bind(now).execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }
}

/// Takes the user's row lock for the rest of the transaction (PostgreSQL
/// readers of the row are not blocked; SQLite has one writer anyway), so
/// that checks of the user's identifiers and the writes after them are
/// not interleaved with another request's.
async fn lock_user(tx: &mut Tx, user_id: &str) -> DbResult<()> {
    stmt("UPDATE users SET version = version WHERE id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The old identifier of `kind` (if any) gives way to the new one.
pub(crate) async fn replace_identifier(
    tx: &mut Tx,
    user_id: &str,
    kind: &str,
    old: Option<&str>,
    new: &str,
) -> DbResult<()> {
    if let Some(old) = old {
        stmt("DELETE FROM identifiers WHERE user_id = $1 AND kind = $2 AND value = $3")
            .bind(user_id)
            .bind(kind)
            .bind(old)
            .execute(&mut *tx)
            .await?;
    }
    stmt("INSERT INTO identifiers (kind, value, user_id) VALUES ($1, $2, $3)")
        .bind(kind)
        .bind(new)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
