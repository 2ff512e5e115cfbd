//! The identity store's sign-in codes: one live code per user, bound to a
//! client type, hashed, single use.

use super::IdentityStore;
use super::reset_budget_key_of_user;
use crate::db::{DbResult, stmt};

impl IdentityStore {
    /// Stores a sign-in code (hashed) and its delivery in the outbox,
    /// together. A new code replaces any earlier one.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_sign_in_code(
        &self,
        id: &str,
        user_id: &str,
        client_type: &str,
        code_hash: &str,
        expires_at: i64,
        outbox_payload: &str,
        now: i64,
    ) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        stmt("UPDATE sign_in_codes SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
            .bind(now)
            .bind(user_id)
            .execute(&mut tx)
            .await?;
        stmt("INSERT INTO sign_in_codes (id, user_id, client_type, code_hash, attempts, created_at, expires_at) VALUES ($1, $2, $3, $4, 0, $5, $6)")
            .bind(id).bind(user_id).bind(client_type).bind(code_hash).bind(now).bind(expires_at)
            .execute(&mut tx).await?;
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'auth.sign_in_code', $2, $3, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string()).bind(user_id).bind(outbox_payload).bind(now)
            .bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Reserves one guess at a user's live code for `client_type` before
    /// it is compared (one statement: a concurrent storm cannot exceed
    /// `max` per code): its (id, code_hash), or None when there is none.
    pub async fn reserve_sign_in_guess(
        &self,
        user_id: &str,
        client_type: &str,
        max: i64,
        now: i64,
    ) -> DbResult<Option<(String, String)>> {
        stmt(
            "UPDATE sign_in_codes SET attempts = attempts + 1 \
             WHERE user_id = $1 AND client_type = $2 AND used_at IS NULL AND expires_at > $3 AND attempts < $4 \
             RETURNING id, code_hash",
        )
        .bind(user_id)
        .bind(client_type)
        .bind(now)
        .bind(max)
        .fetch_optional(self.db.writer())
        .await
    }

    /// Uses a code up, giving back the guess the right one spent. False
    /// when it was used meanwhile (single use).
    pub async fn use_sign_in_code(&self, id: &str, user_id: &str, now: i64) -> DbResult<bool> {
        let mark = stmt("UPDATE sign_in_codes SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
            .bind(now)
            .bind(id);
        self.use_once(mark, &reset_budget_key_of_user(user_id))
            .await
    }

    /// Deletes the codes past their expiry, used or not: nothing reads
    /// them again. Returns how many.
    pub async fn prune_sign_in_codes(&self, now: i64) -> DbResult<u64> {
        stmt("DELETE FROM sign_in_codes WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.db)
            .await
    }
}
