//! The identity store's credentials: password hashes, the lockout counter, identifiers.

use super::IdentityStore;
use crate::db::stmt;

use crate::db::DbResult;

impl IdentityStore {
    pub async fn password_hash(&self, user_id: &str) -> DbResult<Option<String>> {
        let row: Option<(String,)> =
            stmt("SELECT password_hash FROM credentials WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(&self.db)
                .await?;
        Ok(row.map(|r| r.0))
    }

    /// Atomically reserves one password check and settles it in the same
    /// statement: the attempt that reaches `max` locks the account until
    /// `lock_until` before its password is even checked, so no path (a
    /// wrong password, argon2 busy, a datastore error, a dropped request)
    /// can leave the counter at the limit with no lock, which would lock the
    /// account for good. A success clears both (`open_session`,
    /// `set_password`); an argon2 refusal gives the attempt back
    /// (`refund_attempt`). A counter at the limit with no lock in force (a
    /// row from before this rule, or a lowered limit) counts as expired.
    /// None when the account is locked (or has no password): then no check
    /// may run at all, so a concurrent storm cannot exceed the limit.
    pub async fn reserve_attempt(
        &self,
        user_id: &str,
        max: i64,
        lock_until: i64,
        now: i64,
    ) -> DbResult<Option<i64>> {
        macro_rules! fresh {
            () => {
                "((locked_until IS NOT NULL AND locked_until <= $1) OR (locked_until IS NULL AND attempts >= $3))"
            };
        }
        let sql = concat!(
            "UPDATE credentials SET attempts = CASE WHEN ",
            fresh!(),
            " THEN 1 ELSE attempts + 1 END, ",
            "locked_until = CASE WHEN (CASE WHEN ",
            fresh!(),
            " THEN 1 ELSE attempts + 1 END) >= $3 THEN $4 ELSE NULL END ",
            "WHERE user_id = $2 AND (locked_until IS NULL OR locked_until <= $1) RETURNING attempts"
        );
        let row: Option<(i64,)> = stmt(sql)
            .bind(now)
            .bind(user_id)
            .bind(max)
            .bind(lock_until)
            .fetch_optional(self.db.writer())
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Gives back a reserved attempt whose check never ran (argon2 was
    /// busy), lifting the lock it may have set.
    pub async fn refund_attempt(&self, user_id: &str, max: i64) -> DbResult<()> {
        stmt("UPDATE credentials SET attempts = attempts - 1, locked_until = CASE WHEN attempts - 1 < $2 THEN NULL ELSE locked_until END WHERE user_id = $1 AND attempts > 0")
        .bind(user_id).bind(max).execute(&self.db).await?;
        Ok(())
    }

    pub async fn clear_attempts(&self, user_id: &str) -> DbResult<()> {
        stmt("UPDATE credentials SET attempts = 0, locked_until = NULL WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Sets a new password hash; with `end_sessions`, ends every session but
    /// `keep_session`.
    pub async fn set_password(
        &self,
        user_id: &str,
        hash: &str,
        end_sessions: bool,
        keep_session: Option<&str>,
        now: i64,
    ) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        stmt("UPDATE credentials SET password_hash = $1, attempts = 0, locked_until = NULL, updated_at = $2 WHERE user_id = $3")
            .bind(hash).bind(now).bind(user_id).execute(&mut tx).await?;
        if end_sessions {
            stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'password' WHERE user_id = $2 AND revoked_at IS NULL AND id <> $3")
                .bind(now).bind(user_id).bind(keep_session.unwrap_or("")).execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
