//! The identity store's sessions: opening, checking, rotating refresh tokens, revoking.

use super::IdentityStore;
use crate::db::stmt;

use super::*;
use crate::db::DbResult;

impl IdentityStore {
    /// Opens a session after a successful password check: ends the user's
    /// active session of the same client type, stores the first refresh
    /// token and clears the failed-attempt counter, in one transaction (one
    /// commit per login). Returns the ended session.
    pub async fn open_session(&self, s: &Session, refresh_hash: &str) -> DbResult<Option<String>> {
        let mut tx = self.db.begin().await?;
        let ended = {
            // A first login on a client type, by a user who has logged in
            // elsewhere before, is worth a security notice.
            let seen: Vec<(String,)> =
                stmt("SELECT DISTINCT client_type FROM sessions WHERE user_id = $1")
                    .bind(&s.user_id)
                    .fetch_all(&mut tx)
                    .await?;
            if !seen.is_empty() && !seen.iter().any(|(c,)| *c == s.client_type) {
                let payload = serde_json::json!({ "client_type": s.client_type }).to_string();
                stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'auth.new_login', $2, $3, $4, $5)")
                .bind(uuid::Uuid::now_v7().to_string()).bind(&s.user_id).bind(payload).bind(s.created_at).bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
            }
            let ended: Option<(String,)> = stmt(
            "UPDATE sessions SET revoked_at = $1, revoke_reason = 'replaced' WHERE user_id = $2 AND client_type = $3 AND revoked_at IS NULL RETURNING id")
            .bind(s.created_at).bind(&s.user_id).bind(&s.client_type).fetch_optional(&mut tx).await?;
            stmt("INSERT INTO sessions (id, user_id, client_type, created_at, last_used_at, expires_at) VALUES ($1, $2, $3, $4, $4, $5)")
            .bind(&s.id).bind(&s.user_id).bind(&s.client_type).bind(s.created_at).bind(s.expires_at).execute(&mut tx).await?;
            stmt("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
            .bind(refresh_hash).bind(&s.id).bind(s.created_at).execute(&mut tx).await?;
            stmt("UPDATE credentials SET attempts = 0, locked_until = NULL WHERE user_id = $1")
                .bind(&s.user_id)
                .execute(&mut tx)
                .await?;
            ended.map(|e| e.0)
        };
        tx.commit().await?;
        Ok(ended)
    }

    /// Whether a session is live and its user active: the check behind every
    /// authenticated request at the home cell.
    pub async fn session_alive(&self, id: &str, user_id: &str, now: i64) -> DbResult<bool> {
        let sql = concat!(
            "SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.id = $1 AND s.user_id = $2 AND u.status = 'active' AND ",
            live_session!()
        );
        let row: Option<(i32,)> = stmt(sql)
            .bind(id)
            .bind(user_id)
            .bind(now)
            .point(&self.db)
            .await?;
        Ok(row.is_some())
    }

    /// [`Self::session_alive`] for a session a move brought from `from`
    /// no earlier than `since`.
    pub async fn moved_session_alive(
        &self,
        id: &str,
        user_id: &str,
        from: &str,
        since: i64,
        now: i64,
    ) -> DbResult<bool> {
        let sql = concat!(
            "SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.id = $1 AND s.user_id = $2 AND u.status = 'active' AND s.moved_from = $4 AND s.moved_at >= $5 AND ",
            live_session!()
        );
        let row: Option<(i32,)> = stmt(sql)
            .bind(id)
            .bind(user_id)
            .bind(now)
            .bind(from)
            .bind(since)
            .fetch_optional(&self.db)
            .await?;
        Ok(row.is_some())
    }

    pub async fn sessions_of(&self, user_id: &str, now: i64) -> DbResult<Vec<Session>> {
        let sql = concat!(
            "SELECT ",
            session_cols!(),
            " FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC"
        );
        let rows: Vec<Session> = stmt(sql)
            .bind(user_id)
            .bind(now)
            .fetch_all(&self.db)
            .await?;
        Ok(rows)
    }

    /// Ends one of the user's sessions; false if it is not theirs or over.
    pub async fn revoke_session(
        &self,
        user_id: &str,
        sid: &str,
        reason: &str,
        now: i64,
    ) -> DbResult<bool> {
        let r = stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = $2 WHERE id = $3 AND user_id = $4 AND revoked_at IS NULL")
            .bind(now).bind(reason).bind(sid).bind(user_id).execute(&self.db).await?;
        Ok(r == 1)
    }

    pub async fn revoke_other_sessions(
        &self,
        user_id: &str,
        keep: &str,
        now: i64,
    ) -> DbResult<u64> {
        let r = stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'revoked' WHERE user_id = $2 AND id <> $3 AND revoked_at IS NULL")
            .bind(now).bind(user_id).bind(keep).execute(&self.db).await?;
        Ok(r)
    }

    /// Rotates a refresh token: marks it used and stores its successor, in
    /// one transaction. A token used twice revokes its session (the family).
    /// On SQLite concurrent rotations share a commit (`TxBatch`).
    pub async fn rotate_refresh(&self, r: &Rotation<'_>) -> DbResult<RefreshOutcome> {
        let (old, new, salt) = (
            r.old_hash.to_owned(),
            r.new_hash.to_owned(),
            r.salt.to_owned(),
        );
        let (now, grace_ms) = (r.now, r.grace_ms);
        self.db
            .write_batched(move |mut conn| {
                Box::pin(async move {
                    let r = Rotation {
                        old_hash: &old,
                        new_hash: &new,
                        salt: &salt,
                        now,
                        grace_ms,
                    };
                    rotate(&mut conn, &r).await
                })
            })
            .await
    }
}
