//! The identity store's users: creation, lookups, profiles, status and the back office's listing.

use crate::db::Datastore;
use crate::db::{in_tx, on_db};
use crate::identity::claims::settle_claim;

use crate::db::audit::{AuditEntry, insert_audit};

use super::*;
use crate::db::DbResult;

impl Datastore {
    /// Creates a user with one identifier, a password and the `user` role.
    pub async fn create_user(&self, u: &NewUser<'_>) -> DbResult<()> {
        in_tx!(self, tx => {
            settle_claim!(tx, format!("{}:{}", u.kind, u.value), u.id);
            sqlx::query("INSERT INTO users (id, status, display_name, version, created_at, updated_at) VALUES ($1, 'active', $2, 1, $3, $3)")
                .bind(u.id).bind(u.display_name).bind(u.now).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO identifiers (kind, value, user_id) VALUES ($1, $2, $3)")
                .bind(u.kind).bind(u.value).bind(u.id).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO credentials (user_id, password_hash, attempts, updated_at) VALUES ($1, $2, 0, $3)")
                .bind(u.id).bind(u.password_hash).bind(u.now).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, 'user', $2)")
                .bind(u.id).bind(u.now).execute(&mut *tx).await?;
            let welcome = serde_json::json!({ "display_name": u.display_name }).to_string();
            sqlx::query("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, 'user.welcome', $2, $3, $4)")
                .bind(uuid::Uuid::now_v7().to_string()).bind(u.id).bind(welcome).bind(u.now).execute(&mut *tx).await?;
        });
        Ok(())
    }

    /// The user bound to a WeChat openid.
    pub async fn wechat_user(&self, openid: &str) -> DbResult<Option<String>> {
        let row: Option<(String,)> = on_db!(self, p => sqlx::query_as("SELECT user_id FROM wechat_bindings WHERE openid = $1")
            .bind(openid).fetch_optional(p).await?);
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
        in_tx!(self, tx => {
            settle_claim!(tx, format!("wechat:{openid}"), id);
            sqlx::query("INSERT INTO users (id, status, display_name, version, created_at, updated_at) VALUES ($1, 'active', $2, 1, $3, $3)")
                .bind(id).bind(display_name).bind(now).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO wechat_bindings (openid, user_id, created_at) VALUES ($1, $2, $3)")
                .bind(openid).bind(id).bind(now).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, 'user', $2)")
                .bind(id).bind(now).execute(&mut *tx).await?;
            let welcome = serde_json::json!({ "display_name": display_name }).to_string();
            sqlx::query("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, 'user.welcome', $2, $3, $4)")
                .bind(uuid::Uuid::now_v7().to_string()).bind(id).bind(welcome).bind(now).execute(&mut *tx).await?;
        });
        Ok(())
    }

    pub async fn user(&self, id: &str) -> DbResult<Option<User>> {
        let sql = concat!("SELECT ", user_cols!(), " FROM users WHERE id = $1");
        let row: Option<UserTuple> =
            on_db!(self, p => sqlx::query_as(sql).bind(id).fetch_optional(p).await?);
        Ok(row.map(User::from))
    }

    /// A user with roles and identifiers in one statement: the profile
    /// routes need all three, and each statement is a round trip (to
    /// PostgreSQL, or to sqlx's SQLite thread when a point read falls back).
    pub async fn profile(&self, id: &str) -> DbResult<Option<UserProfile>> {
        const SQLITE: &str = concat!(profile_select!(sqlite), " FROM users WHERE id = $1");
        const POSTGRES: &str = concat!(profile_select!(postgres), " FROM users WHERE id = $1");
        self.profile_where(SQLITE, POSTGRES, id, None).await
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
        self.profile_where(
            in_session!(sqlite),
            in_session!(postgres),
            id,
            Some((sid, now)),
        )
        .await
    }

    /// A profile read, the same statement per backend: `$1` the user id,
    /// then `$2` the session's id and `$3` the time if `session` is given.
    /// On SQLite a point read (point.rs), the pool if that cannot answer.
    async fn profile_where(
        &self,
        sqlite: &'static str,
        postgres: &'static str,
        id: &str,
        session: Option<(&str, i64)>,
    ) -> DbResult<Option<UserProfile>> {
        let sql = match self {
            Datastore::Sqlite(..) => sqlite,
            Datastore::Postgres(_) => postgres,
        };
        if let Datastore::Sqlite(_, _, reads) = self {
            let fast = match session {
                Some((sid, now)) => reads.row(
                    sql,
                    rusqlite::named_params! {"$1": id, "$2": sid, "$3": now},
                    profile_row,
                ),
                None => reads.row(sql, rusqlite::named_params! {"$1": id}, profile_row),
            };
            if let Some(row) = fast {
                return row.map(profile_from).transpose();
            }
        }
        let row: Option<ProfileRow> = on_db!(self, p => {
            let q = sqlx::query_as(sql).bind(id);
            let q = match session {
                Some((sid, now)) => q.bind(sid).bind(now),
                None => q,
            };
            q.fetch_optional(p).await?
        });
        row.map(profile_from).transpose()
    }

    /// The user id holding an identifier, if any.
    pub async fn user_by_identifier(&self, kind: &str, value: &str) -> DbResult<Option<String>> {
        let sql = "SELECT user_id FROM identifiers WHERE kind = $1 AND value = $2";
        let row: Option<(String,)> =
            on_db!(self, p => sqlx::query_as(sql).bind(kind).bind(value).fetch_optional(p).await?);
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
        let row: Option<UserTuple> = on_db!(self, p => sqlx::query_as(sql)
            .bind(f.display_name).bind(f.locale).bind(f.bio).bind(f.avatar_url).bind(now).bind(id).bind(expected_version)
            .fetch_optional(p).await?);
        Ok(row.map(User::from))
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
                    " FROM users u WHERE (created_at > $1 OR (created_at = $1 AND id > $2)) \
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
        type Row = user_tuple!(String);
        let sql = match self {
            Datastore::Sqlite(..) => listing!(sqlite),
            Datastore::Postgres(_) => listing!(postgres),
        };
        let rows: Vec<Row> = on_db!(self, p => sqlx::query_as(sql)
            .bind(after_at).bind(&after_id).bind(q).bind(&like).bind(limit).fetch_all(p).await?);
        rows.into_iter()
            .map(|r| {
                let roles = json_column(&r.9)?;
                Ok((user_of!(r), roles))
            })
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
        let changed = in_tx!(self, tx => {
            let r = sqlx::query("UPDATE users SET status = $1, version = version + 1, updated_at = $2 WHERE id = $3 AND status <> 'deleted' AND status <> $1")
                .bind(status).bind(audit.at).bind(id).execute(&mut *tx).await?;
            if status == "disabled" {
                sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = 'disabled' WHERE user_id = $2 AND revoked_at IS NULL")
                    .bind(audit.at).bind(id).execute(&mut *tx).await?;
            }
            let changed = r.rows_affected() == 1;
            if changed {
                insert_audit!(tx, audit);
            }
            changed
        });
        Ok(changed)
    }

    /// Anonymises an account in one transaction: random placeholders for
    /// personal data; no identifiers, credentials, addresses, live sessions,
    /// inbox, notice preferences, deliveries (their recipient addresses and
    /// texts) or undelivered events. The row (and its random id, which
    /// ledgers and the audit log reference) stays. Returns the identifiers it
    /// held, for releasing their directory claims.
    pub async fn anonymise_user(
        &self,
        id: &str,
        placeholder: &str,
        now: i64,
    ) -> DbResult<Vec<(String, String)>> {
        let ids = in_tx!(self, tx => {
            let mut ids: Vec<(String, String)> = sqlx::query_as("SELECT kind, value FROM identifiers WHERE user_id = $1")
                .bind(id).fetch_all(&mut *tx).await?;
            let openids: Vec<(String,)> = sqlx::query_as("SELECT openid FROM wechat_bindings WHERE user_id = $1")
                .bind(id).fetch_all(&mut *tx).await?;
            ids.extend(openids.into_iter().map(|(o,)| ("wechat".to_string(), o)));
            // Their directory claims are to be released: recorded here, so
            // a release that fails is retried (identity::claims).
            for (kind, value) in &ids {
                sqlx::query("INSERT INTO pending_claims (identifier, user_id, state, created_at) VALUES ($1, $2, 'releasing', $3) ON CONFLICT (identifier, user_id) DO UPDATE SET state = 'releasing'")
                    .bind(format!("{kind}:{value}")).bind(id).bind(now).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM wechat_bindings WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("UPDATE users SET status = 'deleted', display_name = $1, locale = NULL, bio = NULL, avatar_url = NULL, version = version + 1, updated_at = $2 WHERE id = $3")
                .bind(placeholder).bind(now).bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM identifiers WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM credentials WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM addresses WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM password_resets WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM user_roles WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = 'deleted' WHERE user_id = $2 AND revoked_at IS NULL")
                .bind(now).bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM outbox WHERE user_id = $1 AND delivered_at IS NULL").bind(id).execute(&mut *tx).await?;
            // Inbox texts name the user ("Welcome, Ana!"); deliveries hold
            // an email address or phone number. A delivery being sent as
            // this commits is marked sent on no row: nothing breaks.
            for sql in [
                "DELETE FROM inbox WHERE user_id = $1",
                "DELETE FROM notice_preferences WHERE user_id = $1",
                "DELETE FROM deliveries WHERE user_id = $1",
            ] {
                sqlx::query(sql).bind(id).execute(&mut *tx).await?;
            }
            ids
        });
        Ok(ids)
    }
}
