//! The identity store's password resets: codes, attempts and their budgets.

use super::IdentityStore;
use crate::db::stmt;

use super::*;
use crate::db::DbResult;

impl IdentityStore {
    /// Stores a reset code (hashed) and its delivery in the outbox, together.
    pub async fn create_reset(
        &self,
        id: &str,
        user_id: &str,
        code_hash: &str,
        expires_at: i64,
        outbox_payload: &str,
        now: i64,
    ) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        // A new code replaces any earlier one.
        stmt("UPDATE password_resets SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
            .bind(now)
            .bind(user_id)
            .execute(&mut tx)
            .await?;
        stmt("INSERT INTO password_resets (id, user_id, code_hash, attempts, created_at, expires_at) VALUES ($1, $2, $3, 0, $4, $5)")
            .bind(id).bind(user_id).bind(code_hash).bind(now).bind(expires_at).execute(&mut tx).await?;
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'auth.password_reset', $2, $3, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string()).bind(user_id).bind(outbox_payload).bind(now).bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Reserves one guess at a user's live code before it is compared
    /// (single statement, so a concurrent storm cannot exceed `max` per
    /// code): its (id, code_hash), or None when there is no live code or
    /// it has had its `max` guesses.
    pub async fn reserve_reset_guess(
        &self,
        user_id: &str,
        max: i64,
        now: i64,
    ) -> DbResult<Option<(String, String)>> {
        let sql = "UPDATE password_resets SET attempts = attempts + 1 \
                   WHERE user_id = $1 AND used_at IS NULL AND expires_at > $2 AND attempts < $3 \
                   RETURNING id, code_hash";
        stmt(sql)
            .bind(user_id)
            .bind(now)
            .bind(max)
            .fetch_optional(self.db.writer())
            .await
    }

    /// Uses a one-time code up (`mark` sets its `used_at` if still
    /// unset) and gives back to `budget_key` the guess the right code
    /// spent, in one transaction. False when it was used meanwhile.
    pub(super) async fn use_once(&self, mark: crate::db::Stmt, budget_key: &str) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        let used = mark.execute(&mut tx).await? == 1;
        if used {
            stmt("UPDATE reset_budgets SET guesses = guesses - 1 WHERE key = $1 AND guesses > 0")
                .bind(budget_key)
                .execute(&mut tx)
                .await?;
        }
        tx.commit().await?;
        Ok(used)
    }

    /// Counts one code issued against `key`'s budget (`limits`), unless the
    /// hour's codes or the day's wrong guesses are spent: then the time
    /// until the budget that refused opens again, in ms.
    pub async fn spend_reset_issue(
        &self,
        key: &str,
        limits: ResetLimits,
        now: i64,
    ) -> DbResult<Result<(), i64>> {
        let sql = "INSERT INTO reset_budgets (key, issue_window, issued, guess_window, guesses) VALUES ($1, $2, 1, $2, 0) \
                   ON CONFLICT (key) DO UPDATE SET \
                   issue_window = CASE WHEN reset_budgets.issue_window <= $2 - $5 THEN $2 ELSE reset_budgets.issue_window END, \
                   issued = CASE WHEN reset_budgets.issue_window <= $2 - $5 THEN 1 ELSE reset_budgets.issued + 1 END \
                   WHERE (reset_budgets.issue_window <= $2 - $5 OR reset_budgets.issued < $3) \
                   AND (reset_budgets.guess_window <= $2 - $6 OR reset_budgets.guesses < $4) \
                   RETURNING issued";
        let row: Option<(i64,)> = stmt(sql)
            .bind(key)
            .bind(now)
            .bind(limits.codes_per_hour)
            .bind(limits.failures_per_day)
            .bind(HOUR_MS)
            .bind(DAY_MS)
            .fetch_optional(self.db.writer())
            .await?;
        self.budget_answer(row.is_some(), key, limits, now).await
    }

    /// Counts one guess against `key`'s daily budget before the code is
    /// compared; refused like `spend_reset_issue`. A right guess is given
    /// back when the reset completes, so the budget counts wrong ones.
    pub async fn spend_reset_guess(
        &self,
        key: &str,
        limits: ResetLimits,
        now: i64,
    ) -> DbResult<Result<(), i64>> {
        let sql = "INSERT INTO reset_budgets (key, issue_window, issued, guess_window, guesses) VALUES ($1, $2, 0, $2, 1) \
                   ON CONFLICT (key) DO UPDATE SET \
                   guess_window = CASE WHEN reset_budgets.guess_window <= $2 - $4 THEN $2 ELSE reset_budgets.guess_window END, \
                   guesses = CASE WHEN reset_budgets.guess_window <= $2 - $4 THEN 1 ELSE reset_budgets.guesses + 1 END \
                   WHERE reset_budgets.guess_window <= $2 - $4 OR reset_budgets.guesses < $3 \
                   RETURNING guesses";
        let row: Option<(i64,)> = stmt(sql)
            .bind(key)
            .bind(now)
            .bind(limits.failures_per_day)
            .bind(DAY_MS)
            .fetch_optional(self.db.writer())
            .await?;
        self.budget_answer(row.is_some(), key, limits, now).await
    }

    /// A budget's answer: Ok when the spend went through, else how long
    /// until it opens again (ms): the later of the spent windows' ends.
    async fn budget_answer(
        &self,
        spent: bool,
        key: &str,
        limits: ResetLimits,
        now: i64,
    ) -> DbResult<Result<(), i64>> {
        if spent {
            return Ok(Ok(()));
        }
        let row: Option<(i64, i64, i64, i64)> = stmt(
            "SELECT issue_window, issued, guess_window, guesses FROM reset_budgets WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(&self.db)
        .await?;
        let Some((iw, issued, gw, guesses)) = row else {
            return Ok(Err(1000));
        };
        let mut wait: i64 = 1000;
        if issued >= limits.codes_per_hour && iw > now - HOUR_MS {
            wait = wait.max(iw + HOUR_MS - now);
        }
        if guesses >= limits.failures_per_day && gw > now - DAY_MS {
            wait = wait.max(gw + DAY_MS - now);
        }
        Ok(Err(wait))
    }

    /// Drops budgets whose windows have both passed.
    pub async fn prune_reset_budgets(&self, now: i64) -> DbResult<u64> {
        let r = stmt("DELETE FROM reset_budgets WHERE issue_window <= $1 AND guess_window <= $2")
            .bind(now - HOUR_MS)
            .bind(now - DAY_MS)
            .execute(&self.db)
            .await?;
        Ok(r)
    }

    /// Consumes a reset and sets the password, ending every session. False if
    /// the reset was consumed meanwhile (single use).
    pub async fn complete_reset(
        &self,
        reset_id: &str,
        user_id: &str,
        hash: &str,
        now: i64,
    ) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        let done = {
            let r =
                stmt("UPDATE password_resets SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                    .bind(now)
                    .bind(reset_id)
                    .execute(&mut tx)
                    .await?;
            if r == 1 {
                // The right guess is not a failure: give it back.
                stmt(
                    "UPDATE reset_budgets SET guesses = guesses - 1 WHERE key = $1 AND guesses > 0",
                )
                .bind(reset_budget_key_of_user(user_id))
                .execute(&mut tx)
                .await?;
                stmt("UPDATE credentials SET password_hash = $1, attempts = 0, locked_until = NULL, updated_at = $2 WHERE user_id = $3")
                .bind(hash).bind(now).bind(user_id).execute(&mut tx).await?;
                stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'password_reset' WHERE user_id = $2 AND revoked_at IS NULL")
                .bind(now).bind(user_id).execute(&mut tx).await?;
                true
            } else {
                false
            }
        };
        tx.commit().await?;
        Ok(done)
    }

    /// Undelivered outbox entries of a topic (oldest first): (id, user_id, payload).
    pub async fn outbox_pending(
        &self,
        topic: &str,
        limit: i64,
    ) -> DbResult<Vec<(String, Option<String>, String)>> {
        let sql = "SELECT id, user_id, payload FROM outbox WHERE topic = $1 AND delivered_at IS NULL ORDER BY created_at, id LIMIT $2";
        stmt(sql).bind(topic).bind(limit).fetch_all(&self.db).await
    }
}
