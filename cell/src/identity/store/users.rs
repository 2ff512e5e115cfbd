//! The identity store's users: creation, lookups, profiles, status and the back office's listing.

use super::IdentityStore;
use crate::db::{stmt, stmt_each};
use crate::identity::claims::settle_claim;

use crate::db::audit::{AuditEntry, insert_audit};

use super::*;
use crate::db::DbResult;

impl IdentityStore {
    /// Creates a user with one identifier, a password and the `user` role.
    pub async fn create_user(&self, u: &NewUser<'_>) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        settle_claim(&mut tx, &format!("{}:{}", u.kind, u.value), u.id).await?;
        stmt("INSERT INTO users (id, status, display_name, version, created_at, updated_at) VALUES ($1, 'active', $2, 1, $3, $3)")
            .bind(u.id).bind(u.display_name).bind(u.now).execute(&mut tx).await?;
        stmt("INSERT INTO identifiers (kind, value, user_id) VALUES ($1, $2, $3)")
            .bind(u.kind)
            .bind(u.value)
            .bind(u.id)
            .execute(&mut tx)
            .await?;
        stmt("INSERT INTO credentials (user_id, password_hash, attempts, updated_at) VALUES ($1, $2, 0, $3)")
            .bind(u.id).bind(u.password_hash).bind(u.now).execute(&mut tx).await?;
        stmt("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, 'user', $2)")
            .bind(u.id)
            .bind(u.now)
            .execute(&mut tx)
            .await?;
        let welcome = serde_json::json!({ "display_name": u.display_name }).to_string();
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'user.welcome', $2, $3, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string()).bind(u.id).bind(welcome).bind(u.now).bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user bound to a WeChat openid.
    pub async fn wechat_user(&self, openid: &str) -> DbResult<Option<String>> {
        let row: Option<(String,)> = stmt("SELECT user_id FROM wechat_bindings WHERE openid = $1")
            .bind(openid)
            .fetch_optional(&self.db)
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// A new user signing in with WeChat: no password, one binding.
    pub async fn create_wechat_user(
        &self,
        id: &str,
        display_name: &str,
        openid: &str,
        now: i64,
    ) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        settle_claim(&mut tx, &format!("wechat:{openid}"), id).await?;
        stmt("INSERT INTO users (id, status, display_name, version, created_at, updated_at) VALUES ($1, 'active', $2, 1, $3, $3)")
            .bind(id).bind(display_name).bind(now).execute(&mut tx).await?;
        stmt("INSERT INTO wechat_bindings (openid, user_id, created_at) VALUES ($1, $2, $3)")
            .bind(openid)
            .bind(id)
            .bind(now)
            .execute(&mut tx)
            .await?;
        stmt("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, 'user', $2)")
            .bind(id)
            .bind(now)
            .execute(&mut tx)
            .await?;
        let welcome = serde_json::json!({ "display_name": display_name }).to_string();
        stmt("INSERT INTO outbox (id, topic, user_id, payload, created_at, traceparent) VALUES ($1, 'user.welcome', $2, $3, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string()).bind(id).bind(welcome).bind(now).bind(homecell_common::trace::current_header()).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn user(&self, id: &str) -> DbResult<Option<User>> {
        stmt(concat!(
            "SELECT ",
            user_cols!(),
            " FROM users WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db)
        .await
    }

    /// A user with roles and identifiers in one statement: the profile
    /// routes need all three, and each statement is a round trip (to
    /// PostgreSQL, or to sqlx's SQLite thread when a point read falls back).
    pub async fn profile(&self, id: &str) -> DbResult<Option<UserProfile>> {
        const SQLITE: &str = concat!(profile_select!(sqlite), " FROM users WHERE id = $1");
        const POSTGRES: &str = concat!(profile_select!(postgres), " FROM users WHERE id = $1");
        let row: Option<ProfileRow> = stmt_each(SQLITE, POSTGRES).bind(id).point(&self.db).await?;
        row.map(ProfileRow::into_profile).transpose()
    }

    /// `profile`, only while session `sid` of this active user lives (what
    /// `session_alive` checks), in the same statement.
    pub async fn profile_in_session(
        &self,
        id: &str,
        sid: &str,
        now: i64,
    ) -> DbResult<Option<UserProfile>> {
        macro_rules! in_session {
            ($backend:ident) => {
                concat!(
                    profile_select!($backend),
                    " FROM users WHERE id = $1 AND status = 'active' AND EXISTS \
                     (SELECT 1 FROM sessions s WHERE s.id = $2 AND s.user_id = $1 AND ",
                    live_session!(),
                    ")"
                )
            };
        }
        let row: Option<ProfileRow> = stmt_each(in_session!(sqlite), in_session!(postgres))
            .bind(id)
            .bind(sid)
            .bind(now)
            .point(&self.db)
            .await?;
        row.map(ProfileRow::into_profile).transpose()
    }

    /// The user id holding an identifier, if any.
    pub async fn user_by_identifier(&self, kind: &str, value: &str) -> DbResult<Option<String>> {
        let sql = "SELECT user_id FROM identifiers WHERE kind = $1 AND value = $2";
        let row: Option<(String,)> = stmt(sql)
            .bind(kind)
            .bind(value)
            .fetch_optional(&self.db)
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Updates the profile if `expected_version` is current; returns the new
    /// row, or None on a version mismatch.
    pub async fn update_profile(
        &self,
        id: &str,
        expected_version: i64,
        f: &ProfileFields<'_>,
        now: i64,
    ) -> DbResult<Option<User>> {
        let sql = concat!(
            "UPDATE users SET display_name = $1, locale = $2, bio = $3, avatar_url = $4, version = version + 1, updated_at = $5 \
             WHERE id = $6 AND version = $7 AND status = 'active' RETURNING ",
            user_cols!()
        );
        stmt(sql)
            .bind(f.display_name)
            .bind(f.locale)
            .bind(f.bio)
            .bind(f.avatar_url)
            .bind(now)
            .bind(id)
            .bind(expected_version)
            .fetch_optional(self.db.writer())
            .await
    }

    /// Users by creation, after the cursor `(created_at, id)`; `query`
    /// matches an identifier exactly or a display-name prefix.
    pub async fn list_users(
        &self,
        after: Option<(i64, String)>,
        query: Option<&str>,
        limit: i64,
    ) -> DbResult<Vec<(User, Vec<String>)>> {
        let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
        // Each user with its roles, in the one statement: a page is one
        // round trip, not one per user.
        macro_rules! listing {
            ($backend:ident) => {
                concat!(
                    "SELECT ",
                    user_cols!(),
                    ", ",
                    roles_json!($backend, "u.id"),
                    " AS roles FROM users u WHERE (created_at > $1 OR (created_at = $1 AND id > $2)) \
                     AND ($3 = '' OR display_name LIKE $4 ESCAPE '\\' OR EXISTS (SELECT 1 FROM identifiers i WHERE i.user_id = u.id AND i.value = $3)) \
                     ORDER BY created_at, id LIMIT $5"
                )
            };
        }
        let q = query.unwrap_or("");
        let like = format!(
            "{}%",
            q.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            user: User,
            roles: String,
        }
        let rows: Vec<Row> = stmt_each(listing!(sqlite), listing!(postgres))
            .bind(after_at)
            .bind(&after_id)
            .bind(q)
            .bind(&like)
            .bind(limit)
            .fetch_all(&self.db)
            .await?;
        rows.into_iter()
            .map(|r| Ok((r.user, json_column(&r.roles)?)))
            .collect()
    }

    /// Sets `status` (active/disabled) and, when that changed anything,
    /// writes `audit` in the same transaction; a disabled account's
    /// sessions end. True when the status changed.
    pub async fn set_status(
        &self,
        id: &str,
        status: &str,
        audit: &AuditEntry<'_>,
    ) -> DbResult<bool> {
        let mut tx = self.db.begin().await?;
        let changed = {
            let r = stmt("UPDATE users SET status = $1, version = version + 1, updated_at = $2 WHERE id = $3 AND status <> 'deleted' AND status <> $1")
            .bind(status).bind(audit.at).bind(id).execute(&mut tx).await?;
            if status == "disabled" {
                stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'disabled' WHERE user_id = $2 AND revoked_at IS NULL")
                .bind(audit.at).bind(id).execute(&mut tx).await?;
            }
            let changed = r == 1;
            if changed {
                insert_audit(&mut tx, audit).await?;
            }
            changed
        };
        tx.commit().await?;
        Ok(changed)
    }

    /// Anonymises an account in one transaction: random placeholders for
    /// personal data; no identifiers, credentials, addresses, live sessions,
    /// inbox, notice preferences, deliveries (their recipient addresses and
    /// texts) or undelivered events. The row (and its random id, which
    /// ledgers and the audit log reference) stays. Returns the identifiers it
    /// held, for releasing their directory claims.
    ///
    /// `release_claims` is false for a user who moved away: their claims
    /// moved with them and are not this region's to release.
    pub async fn anonymise_user(
        &self,
        id: &str,
        placeholder: &str,
        now: i64,
        audit: Option<&AuditEntry<'_>>,
        release_claims: bool,
    ) -> DbResult<Vec<(String, String)>> {
        let mut tx = self.db.begin().await?;
        if let Some(audit) = audit {
            insert_audit(&mut tx, audit).await?;
        }
        let ids = {
            let mut ids: Vec<(String, String)> =
                stmt("SELECT kind, value FROM identifiers WHERE user_id = $1")
                    .bind(id)
                    .fetch_all(&mut tx)
                    .await?;
            let openids: Vec<(String,)> =
                stmt("SELECT openid FROM wechat_bindings WHERE user_id = $1")
                    .bind(id)
                    .fetch_all(&mut tx)
                    .await?;
            ids.extend(openids.into_iter().map(|(o,)| ("wechat".to_string(), o)));
            // Their directory claims are to be released: recorded here, so
            // a release that fails is retried (identity::claims).
            for (kind, value) in ids.iter().filter(|_| release_claims) {
                stmt("INSERT INTO pending_claims (identifier, user_id, state, created_at) VALUES ($1, $2, 'releasing', $3) ON CONFLICT (identifier, user_id) DO UPDATE SET state = 'releasing'")
                .bind(format!("{kind}:{value}")).bind(id).bind(now).execute(&mut tx).await?;
            }
            stmt("DELETE FROM wechat_bindings WHERE user_id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
            stmt("UPDATE users SET status = 'deleted', display_name = $1, locale = NULL, bio = NULL, avatar_url = NULL, version = version + 1, updated_at = $2 WHERE id = $3")
            .bind(placeholder).bind(now).bind(id).execute(&mut tx).await?;
            stmt("DELETE FROM identifiers WHERE user_id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
            stmt("DELETE FROM credentials WHERE user_id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
            stmt("DELETE FROM addresses WHERE user_id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
            for sql in [
                "DELETE FROM password_resets WHERE user_id = $1",
                "DELETE FROM sign_in_codes WHERE user_id = $1",
            ] {
                stmt(sql).bind(id).execute(&mut tx).await?;
            }
            stmt("DELETE FROM user_roles WHERE user_id = $1")
                .bind(id)
                .execute(&mut tx)
                .await?;
            stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'deleted' WHERE user_id = $2 AND revoked_at IS NULL")
            .bind(now).bind(id).execute(&mut tx).await?;
            stmt("DELETE FROM outbox WHERE user_id = $1 AND delivered_at IS NULL")
                .bind(id)
                .execute(&mut tx)
                .await?;
            // Inbox texts name the user ("Welcome, Ana!"); deliveries hold
            // an email address or phone number. A delivery being sent as
            // this commits is marked sent on no row: nothing breaks.
            for sql in [
                "DELETE FROM inbox WHERE user_id = $1",
                "DELETE FROM notice_preferences WHERE user_id = $1",
                "DELETE FROM deliveries WHERE user_id = $1",
            ] {
                stmt(sql).bind(id).execute(&mut tx).await?;
            }
            ids
        };
        tx.commit().await?;
        Ok(ids)
    }
}
