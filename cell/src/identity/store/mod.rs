//! The identity tables, for both backends. Every query is one text (both
//! SQLite and PostgreSQL take `$n` parameters); database errors are
//! translated here, once.

use super::claims::settle_claim;
use crate::db::Datastore;
use crate::db::{in_tx, on_db, write_db};

use crate::db::audit::{AuditEntry, insert_audit};

use crate::db::{DbError, DbResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub status: String,
    pub display_name: String,
    pub locale: Option<String>,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A user with their roles and identifiers (`kind`, `value`), as a profile
/// shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserProfile {
    pub user: User,
    pub roles: Vec<String>,
    pub identifiers: Vec<(String, String)>,
}

/// The tuple type of a `users` row in `user_cols!()` order, followed by
/// the types of any columns a query selects after them.
macro_rules! user_tuple {
    ($($more:ty),*) => {
        (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            i64,
            i64,
            $($more),*
        )
    };
}

/// A `users` row in `user_cols!()` order.
pub(crate) type UserTuple = user_tuple!();

/// The `User` at the head of a row of `user_tuple!(…)` type.
macro_rules! user_of {
    ($r:expr) => {
        User::from(($r.0, $r.1, $r.2, $r.3, $r.4, $r.5, $r.6, $r.7, $r.8))
    };
}

/// The rule of a live session `s` at time `$3`, in both statements that
/// check one (`session_alive`, `profile_in_session`).
macro_rules! live_session {
    () => {
        "s.revoked_at IS NULL AND s.expires_at > $3"
    };
}

impl From<UserTuple> for User {
    fn from(t: UserTuple) -> Self {
        Self {
            id: t.0,
            status: t.1,
            display_name: t.2,
            locale: t.3,
            bio: t.4,
            avatar_url: t.5,
            version: t.6,
            created_at: t.7,
            updated_at: t.8,
        }
    }
}

macro_rules! user_cols {
    () => {
        "id, status, display_name, locale, bio, avatar_url, version, created_at, updated_at"
    };
}
pub(crate) use user_cols;

/// A user's roles, by name, as a JSON array: each backend's aggregate over
/// `user_roles` for the user whose id is `$user` (an SQL expression).
macro_rules! roles_json {
    (sqlite, $user:literal) => {
        concat!(
            "(SELECT json_group_array(role ORDER BY role) FROM user_roles WHERE user_id = ",
            $user,
            ")"
        )
    };
    (postgres, $user:literal) => {
        concat!(
            "(SELECT coalesce(json_agg(role ORDER BY role), '[]')::text FROM user_roles WHERE user_id = ",
            $user,
            ")"
        )
    };
}

/// A profile's columns: the user's, then its roles (by name) and its
/// identifiers (by kind, then value) as JSON arrays, each backend's
/// aggregate. The statement's `$1` is the user's id.
macro_rules! profile_select {
    (sqlite) => {
        concat!(
            "SELECT ",
            user_cols!(),
            ", ",
            roles_json!(sqlite, "$1"),
            ", (SELECT json_group_array(json_array(kind, value) ORDER BY kind, value) FROM identifiers WHERE user_id = $1)"
        )
    };
    (postgres) => {
        concat!(
            "SELECT ",
            user_cols!(),
            ", ",
            roles_json!(postgres, "$1"),
            ", (SELECT coalesce(json_agg(json_build_array(kind, value) ORDER BY kind, value), '[]')::text FROM identifiers WHERE user_id = $1)"
        )
    };
}

fn profile_from(r: ProfileRow) -> DbResult<UserProfile> {
    Ok(UserProfile {
        user: user_of!(r),
        roles: json_column(&r.9)?,
        identifiers: json_column(&r.10)?,
    })
}

/// A list a statement folded into a JSON array (`roles_json!`).
fn json_column<T: serde::de::DeserializeOwned>(text: &str) -> DbResult<T> {
    serde_json::from_str(text).map_err(|e| DbError::Db(sqlx::Error::Decode(e.into())))
}

/// A profile's row: the user's columns, then the two lists.
type ProfileRow = user_tuple!(String, String);

fn profile_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProfileRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

/// The editable part of a profile.
pub struct ProfileFields<'a> {
    pub display_name: &'a str,
    pub locale: Option<&'a str>,
    pub bio: Option<&'a str>,
    pub avatar_url: Option<&'a str>,
}

type KeyTuple = (String, Vec<u8>, Vec<u8>, i64, Option<i64>);

#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub id: &'a str,
    pub display_name: &'a str,
    pub kind: &'a str,
    pub value: &'a str,
    pub password_hash: &'a str,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub client_type: String,
    pub created_at: i64,
    pub last_used_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

type SessionTuple = (String, String, String, i64, i64, i64, Option<i64>);

impl From<SessionTuple> for Session {
    fn from(t: SessionTuple) -> Self {
        Self {
            id: t.0,
            user_id: t.1,
            client_type: t.2,
            created_at: t.3,
            last_used_at: t.4,
            expires_at: t.5,
            revoked_at: t.6,
        }
    }
}

macro_rules! session_cols {
    () => {
        "id, user_id, client_type, created_at, last_used_at, expires_at, revoked_at"
    };
}

/// The statements of a refresh rotation on `$conn` (a connection or a
/// transaction), as a `RefreshOutcome`; `?` passes on database errors. The
/// common case is three statements: mark the token used (remembering its
/// successor), touch its live session, store the successor. A token used
/// before is a repeat when it was rotated less than `$grace` ms ago and its
/// successor is still unused (the client lost the answer and retries); any
/// other reuse revokes the session.
macro_rules! rotate {
    ($conn:ident, $r:expr) => {{
        let r: &Rotation<'_> = $r;
        let marked: Option<String> = sqlx::query_scalar("UPDATE refresh_tokens SET used_at = $1, successor_hash = $3, successor_salt = $4 WHERE token_hash = $2 AND used_at IS NULL RETURNING session_id")
            .bind(r.now).bind(r.old_hash).bind(r.new_hash).bind(r.salt).fetch_optional(&mut *$conn).await?;
        let live_sql = concat!("UPDATE sessions SET last_used_at = $1 WHERE id = $2 AND revoked_at IS NULL AND expires_at > $1 RETURNING ", session_cols!());
        match marked {
            Some(sid) => {
                let live: Option<SessionTuple> = sqlx::query_as(live_sql).bind(r.now).bind(&sid).fetch_optional(&mut *$conn).await?;
                match live {
                    Some(s) => {
                        sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                            .bind(r.new_hash).bind(&sid).bind(r.now).execute(&mut *$conn).await?;
                        RefreshOutcome::Rotated(Session::from(s))
                    }
                    None => RefreshOutcome::Invalid,
                }
            }
            None => {
                let used: Option<(String, Option<i64>, Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT session_id, used_at, successor_hash, successor_salt FROM refresh_tokens WHERE token_hash = $1")
                    .bind(r.old_hash).fetch_optional(&mut *$conn).await?;
                match used {
                    Some((sid, used_at, successor, salt)) => {
                        let recent = used_at.is_some_and(|at| at > r.now - r.grace_ms);
                        let successor_unused = match (&successor, recent) {
                            (Some(h), true) => sqlx::query_scalar::<_, String>("SELECT session_id FROM refresh_tokens WHERE token_hash = $1 AND used_at IS NULL")
                                .bind(h).fetch_optional(&mut *$conn).await?.is_some(),
                            _ => false,
                        };
                        match salt {
                            Some(salt) if successor_unused => {
                                let live: Option<SessionTuple> = sqlx::query_as(live_sql).bind(r.now).bind(&sid).fetch_optional(&mut *$conn).await?;
                                match live {
                                    Some(s) => RefreshOutcome::Repeated(Session::from(s), salt),
                                    None => RefreshOutcome::Invalid,
                                }
                            }
                            _ => {
                                sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = 'refresh_reuse' WHERE id = $2 AND revoked_at IS NULL")
                                    .bind(r.now).bind(&sid).execute(&mut *$conn).await?;
                                RefreshOutcome::Reused
                            }
                        }
                    }
                    None => RefreshOutcome::Invalid,
                }
            }
        }
    }};
}

/// One refresh rotation's inputs: the presented token's hash, its
/// successor's hash and the salt the successor was derived with.
pub struct Rotation<'a> {
    pub old_hash: &'a str,
    pub new_hash: &'a str,
    pub salt: &'a str,
    pub now: i64,
    /// How long a rotated token may be presented again for the same
    /// successor.
    pub grace_ms: i64,
}

/// What a refresh token lookup found.
#[derive(Debug)]
pub enum RefreshOutcome {
    /// Rotated: the session it belongs to.
    Rotated(Session),
    /// Rotated moments ago and its successor not yet used: the session, and
    /// the salt that derives that same successor again.
    Repeated(Session, String),
    /// Unknown token, or its session is over.
    Invalid,
    /// Already used once: the session was revoked.
    Reused,
}

/// A password-reset budget across every code of one account.
#[derive(Debug, Clone, Copy)]
pub struct ResetLimits {
    /// Codes that may be issued per hour.
    pub codes_per_hour: i64,
    /// Wrong guesses allowed per day.
    pub failures_per_day: i64,
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The reset budget of an account.
pub fn reset_budget_key_of_user(user_id: &str) -> String {
    format!("user:{user_id}")
}

#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Address {
    pub id: String,
    pub label: Option<String>,
    pub recipient: String,
    pub phone: Option<String>,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub is_default: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An `addresses` row in `address_cols!()` order.
pub(crate) type AddressTuple = (
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<String>,
    String,
    bool,
    i64,
    i64,
);

impl From<AddressTuple> for Address {
    fn from(t: AddressTuple) -> Self {
        Self {
            id: t.0,
            label: t.1,
            recipient: t.2,
            phone: t.3,
            line1: t.4,
            line2: t.5,
            city: t.6,
            state: t.7,
            postal_code: t.8,
            country: t.9,
            is_default: t.10,
            created_at: t.11,
            updated_at: t.12,
        }
    }
}

macro_rules! address_cols {
    () => {
        "id, label, recipient, phone, line1, line2, city, state, postal_code, country, is_default, created_at, updated_at"
    };
}
pub(crate) use address_cols;

pub struct SigningKeyRow {
    pub kid: String,
    pub private_pkcs8: Vec<u8>,
    pub public_key: Vec<u8>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

impl Datastore {
    // ------------------------------------------------------------ users

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

    // ------------------------------------------------------------ credentials

    pub async fn password_hash(&self, user_id: &str) -> DbResult<Option<String>> {
        let row: Option<(String,)> = on_db!(self, p => sqlx::query_as("SELECT password_hash FROM credentials WHERE user_id = $1")
            .bind(user_id).fetch_optional(p).await?);
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
        let row: Option<(i64,)> = write_db!(self, p => sqlx::query_as(sql).bind(now).bind(user_id).bind(max).bind(lock_until).fetch_optional(p).await?);
        Ok(row.map(|r| r.0))
    }

    /// Gives back a reserved attempt whose check never ran (argon2 was
    /// busy), lifting the lock it may have set.
    pub async fn refund_attempt(&self, user_id: &str, max: i64) -> DbResult<()> {
        write_db!(self, p => {
            sqlx::query("UPDATE credentials SET attempts = attempts - 1, locked_until = CASE WHEN attempts - 1 < $2 THEN NULL ELSE locked_until END WHERE user_id = $1 AND attempts > 0")
            .bind(user_id).bind(max).execute(p).await?;
        });
        Ok(())
    }

    pub async fn clear_attempts(&self, user_id: &str) -> DbResult<()> {
        write_db!(self, p => {
            sqlx::query("UPDATE credentials SET attempts = 0, locked_until = NULL WHERE user_id = $1")
            .bind(user_id).execute(p).await?;
        });
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
        in_tx!(self, tx => {
            sqlx::query("UPDATE credentials SET password_hash = $1, attempts = 0, locked_until = NULL, updated_at = $2 WHERE user_id = $3")
                .bind(hash).bind(now).bind(user_id).execute(&mut *tx).await?;
            if end_sessions {
                sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = 'password' WHERE user_id = $2 AND revoked_at IS NULL AND id <> $3")
                    .bind(now).bind(user_id).bind(keep_session.unwrap_or("")).execute(&mut *tx).await?;
            }
        });
        Ok(())
    }

    // ------------------------------------------------------------ sessions

    /// Opens a session after a successful password check: ends the user's
    /// active session of the same client type, stores the first refresh
    /// token and clears the failed-attempt counter, in one transaction (one
    /// commit per login). Returns the ended session.
    pub async fn open_session(&self, s: &Session, refresh_hash: &str) -> DbResult<Option<String>> {
        let ended = in_tx!(self, tx => {
            // A first login on a client type, by a user who has logged in
            // elsewhere before, is worth a security notice.
            let seen: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT client_type FROM sessions WHERE user_id = $1")
                .bind(&s.user_id).fetch_all(&mut *tx).await?;
            if !seen.is_empty() && !seen.iter().any(|(c,)| *c == s.client_type) {
                let payload = serde_json::json!({ "client_type": s.client_type }).to_string();
                sqlx::query("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, 'auth.new_login', $2, $3, $4)")
                    .bind(uuid::Uuid::now_v7().to_string()).bind(&s.user_id).bind(payload).bind(s.created_at).execute(&mut *tx).await?;
            }
            let ended: Option<(String,)> = sqlx::query_as(
                "UPDATE sessions SET revoked_at = $1, revoke_reason = 'replaced' WHERE user_id = $2 AND client_type = $3 AND revoked_at IS NULL RETURNING id")
                .bind(s.created_at).bind(&s.user_id).bind(&s.client_type).fetch_optional(&mut *tx).await?;
            sqlx::query("INSERT INTO sessions (id, user_id, client_type, created_at, last_used_at, expires_at) VALUES ($1, $2, $3, $4, $4, $5)")
                .bind(&s.id).bind(&s.user_id).bind(&s.client_type).bind(s.created_at).bind(s.expires_at).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                .bind(refresh_hash).bind(&s.id).bind(s.created_at).execute(&mut *tx).await?;
            sqlx::query("UPDATE credentials SET attempts = 0, locked_until = NULL WHERE user_id = $1")
                .bind(&s.user_id).execute(&mut *tx).await?;
            ended.map(|e| e.0)
        });
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
        if let Datastore::Sqlite(_, _, reads) = self
            && let Some(row) = reads.row(
                sql,
                rusqlite::named_params! {"$1": id, "$2": user_id, "$3": now},
                |r| r.get::<_, i64>(0),
            )
        {
            return Ok(row.is_some());
        }
        let row: Option<(i32,)> = on_db!(self, p => sqlx::query_as(sql).bind(id).bind(user_id).bind(now).fetch_optional(p).await?);
        Ok(row.is_some())
    }

    pub async fn sessions_of(&self, user_id: &str, now: i64) -> DbResult<Vec<Session>> {
        let sql = concat!(
            "SELECT ",
            session_cols!(),
            " FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 ORDER BY created_at DESC"
        );
        let rows: Vec<SessionTuple> =
            on_db!(self, p => sqlx::query_as(sql).bind(user_id).bind(now).fetch_all(p).await?);
        Ok(rows.into_iter().map(Session::from).collect())
    }

    /// Ends one of the user's sessions; false if it is not theirs or over.
    pub async fn revoke_session(
        &self,
        user_id: &str,
        sid: &str,
        reason: &str,
        now: i64,
    ) -> DbResult<bool> {
        let r = write_db!(self, p => sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = $2 WHERE id = $3 AND user_id = $4 AND revoked_at IS NULL")
            .bind(now).bind(reason).bind(sid).bind(user_id).execute(p).await?.rows_affected());
        Ok(r == 1)
    }

    pub async fn revoke_other_sessions(
        &self,
        user_id: &str,
        keep: &str,
        now: i64,
    ) -> DbResult<u64> {
        let r = write_db!(self, p => sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = 'revoked' WHERE user_id = $2 AND id <> $3 AND revoked_at IS NULL")
            .bind(now).bind(user_id).bind(keep).execute(p).await?.rows_affected());
        Ok(r)
    }

    /// Rotates a refresh token: marks it used and stores its successor, in
    /// one transaction. A token used twice revokes its session (the family).
    /// On SQLite concurrent rotations share a commit (`TxBatch`).
    pub async fn rotate_refresh(&self, r: &Rotation<'_>) -> DbResult<RefreshOutcome> {
        match self {
            Datastore::Sqlite(_, batch, _) => {
                let (old, new, salt) = (
                    r.old_hash.to_owned(),
                    r.new_hash.to_owned(),
                    r.salt.to_owned(),
                );
                let (now, grace_ms) = (r.now, r.grace_ms);
                batch
                    .run(move |conn| {
                        Box::pin(async move {
                            let r = Rotation {
                                old_hash: &old,
                                new_hash: &new,
                                salt: &salt,
                                now,
                                grace_ms,
                            };
                            Ok(rotate!(conn, &r))
                        })
                    })
                    .await
            }
            Datastore::Postgres(_) => Ok(in_tx!(self, tx => rotate!(tx, r))),
        }
    }

    // ------------------------------------------------------------ password reset

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
        in_tx!(self, tx => {
            // A new code replaces any earlier one.
            sqlx::query("UPDATE password_resets SET used_at = $1 WHERE user_id = $2 AND used_at IS NULL")
                .bind(now).bind(user_id).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO password_resets (id, user_id, code_hash, attempts, created_at, expires_at) VALUES ($1, $2, $3, 0, $4, $5)")
                .bind(id).bind(user_id).bind(code_hash).bind(now).bind(expires_at).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO outbox (id, topic, user_id, payload, created_at) VALUES ($1, 'auth.password_reset', $2, $3, $4)")
                .bind(uuid::Uuid::now_v7().to_string()).bind(user_id).bind(outbox_payload).bind(now).execute(&mut *tx).await?;
        });
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
        Ok(
            write_db!(self, p => sqlx::query_as(sql).bind(user_id).bind(now).bind(max).fetch_optional(p).await?),
        )
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
        let row: Option<(i64,)> = write_db!(self, p => sqlx::query_as(sql).bind(key).bind(now)
            .bind(limits.codes_per_hour).bind(limits.failures_per_day).bind(HOUR_MS).bind(DAY_MS).fetch_optional(p).await?);
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
        let row: Option<(i64,)> = write_db!(self, p => sqlx::query_as(sql).bind(key).bind(now)
            .bind(limits.failures_per_day).bind(DAY_MS).fetch_optional(p).await?);
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
        let row: Option<(i64, i64, i64, i64)> = on_db!(self, p => sqlx::query_as(
            "SELECT issue_window, issued, guess_window, guesses FROM reset_budgets WHERE key = $1")
            .bind(key).fetch_optional(p).await?);
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
        let r = write_db!(self, p => sqlx::query("DELETE FROM reset_budgets WHERE issue_window <= $1 AND guess_window <= $2")
            .bind(now - HOUR_MS).bind(now - DAY_MS).execute(p).await?.rows_affected());
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
        let done = in_tx!(self, tx => {
            let r = sqlx::query("UPDATE password_resets SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                .bind(now).bind(reset_id).execute(&mut *tx).await?;
            if r.rows_affected() == 1 {
                // The right guess is not a failure: give it back.
                sqlx::query("UPDATE reset_budgets SET guesses = guesses - 1 WHERE key = $1 AND guesses > 0")
                    .bind(reset_budget_key_of_user(user_id)).execute(&mut *tx).await?;
                sqlx::query("UPDATE credentials SET password_hash = $1, attempts = 0, locked_until = NULL, updated_at = $2 WHERE user_id = $3")
                    .bind(hash).bind(now).bind(user_id).execute(&mut *tx).await?;
                sqlx::query("UPDATE sessions SET revoked_at = $1, revoke_reason = 'password_reset' WHERE user_id = $2 AND revoked_at IS NULL")
                    .bind(now).bind(user_id).execute(&mut *tx).await?;
                true
            } else {
                false
            }
        });
        Ok(done)
    }

    /// Undelivered outbox entries of a topic (oldest first): (id, user_id, payload).
    pub async fn outbox_pending(
        &self,
        topic: &str,
        limit: i64,
    ) -> DbResult<Vec<(String, Option<String>, String)>> {
        let sql = "SELECT id, user_id, payload FROM outbox WHERE topic = $1 AND delivered_at IS NULL ORDER BY created_at, id LIMIT $2";
        Ok(on_db!(self, p => sqlx::query_as(sql).bind(topic).bind(limit).fetch_all(p).await?))
    }

    // ------------------------------------------------------------ addresses

    pub async fn addresses(&self, user_id: &str) -> DbResult<Vec<Address>> {
        let sql = concat!(
            "SELECT ",
            address_cols!(),
            " FROM addresses WHERE user_id = $1 ORDER BY created_at, id"
        );
        let rows: Vec<AddressTuple> =
            on_db!(self, p => sqlx::query_as(sql).bind(user_id).fetch_all(p).await?);
        Ok(rows.into_iter().map(Address::from).collect())
    }

    /// Adds an address unless the user has `max` already. The first address
    /// becomes the default. Returns false when at the limit.
    pub async fn add_address(&self, user_id: &str, a: &Address, max: i64) -> DbResult<bool> {
        let added = in_tx!(self, tx => {
            let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM addresses WHERE user_id = $1").bind(user_id).fetch_one(&mut *tx).await?;
            if count >= max {
                false
            } else {
                if a.is_default || count == 0 {
                    sqlx::query("UPDATE addresses SET is_default = FALSE WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
                }
                sqlx::query(concat!("INSERT INTO addresses (user_id, ", address_cols!(), ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"))
                    .bind(user_id).bind(&a.id).bind(&a.label).bind(&a.recipient).bind(&a.phone).bind(&a.line1).bind(&a.line2)
                    .bind(&a.city).bind(&a.state).bind(&a.postal_code).bind(&a.country).bind(a.is_default || count == 0)
                    .bind(a.created_at).bind(a.updated_at).execute(&mut *tx).await?;
                true
            }
        });
        Ok(added)
    }

    pub async fn update_address(&self, user_id: &str, a: &Address) -> DbResult<bool> {
        let changed = in_tx!(self, tx => {
            let r = sqlx::query("UPDATE addresses SET label = $1, recipient = $2, phone = $3, line1 = $4, line2 = $5, city = $6, state = $7, postal_code = $8, country = $9, \
                                 is_default = CASE WHEN $10 THEN TRUE ELSE is_default END, updated_at = $11 WHERE id = $12 AND user_id = $13")
                .bind(&a.label).bind(&a.recipient).bind(&a.phone).bind(&a.line1).bind(&a.line2).bind(&a.city).bind(&a.state)
                .bind(&a.postal_code).bind(&a.country).bind(a.is_default).bind(a.updated_at).bind(&a.id).bind(user_id)
                .execute(&mut *tx).await?;
            // Only once the address is known to be the user's: a failed
            // update changes nothing.
            let found = r.rows_affected() == 1;
            if found && a.is_default {
                sqlx::query("UPDATE addresses SET is_default = FALSE WHERE user_id = $1 AND id <> $2").bind(user_id).bind(&a.id).execute(&mut *tx).await?;
            }
            found
        });
        Ok(changed)
    }

    pub async fn set_default_address(&self, user_id: &str, id: &str, now: i64) -> DbResult<bool> {
        let changed = in_tx!(self, tx => {
            let (exists,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM addresses WHERE id = $1 AND user_id = $2").bind(id).bind(user_id).fetch_one(&mut *tx).await?;
            if exists == 1 {
                sqlx::query("UPDATE addresses SET is_default = (id = $1), updated_at = CASE WHEN id = $1 THEN $2 ELSE updated_at END WHERE user_id = $3")
                    .bind(id).bind(now).bind(user_id).execute(&mut *tx).await?;
            }
            exists == 1
        });
        Ok(changed)
    }

    pub async fn delete_address(&self, user_id: &str, id: &str) -> DbResult<bool> {
        let r = write_db!(self, p => sqlx::query("DELETE FROM addresses WHERE id = $1 AND user_id = $2").bind(id).bind(user_id).execute(p).await?.rows_affected());
        Ok(r == 1)
    }

    // ------------------------------------------------------------ RBAC and audit

    pub async fn roles_of(&self, user_id: &str) -> DbResult<Vec<String>> {
        let rows: Vec<(String,)> = on_db!(self, p => sqlx::query_as("SELECT role FROM user_roles WHERE user_id = $1 ORDER BY role")
            .bind(user_id).fetch_all(p).await?);
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    pub async fn has_permission(&self, user_id: &str, permission: &str) -> DbResult<bool> {
        let sql = "SELECT 1 FROM user_roles ur JOIN role_permissions rp ON rp.role = ur.role WHERE ur.user_id = $1 AND rp.permission = $2 LIMIT 1";
        let row: Option<(i32,)> = on_db!(self, p => sqlx::query_as(sql).bind(user_id).bind(permission).fetch_optional(p).await?);
        Ok(row.is_some())
    }

    pub async fn role_exists(&self, role: &str) -> DbResult<bool> {
        let row: Option<(String,)> = on_db!(self, p => sqlx::query_as("SELECT name FROM roles WHERE name = $1").bind(role).fetch_optional(p).await?);
        Ok(row.is_some())
    }

    /// Grants or revokes a role, writing the audit entry in the same
    /// transaction. Returns whether anything changed.
    pub async fn set_role(
        &self,
        user_id: &str,
        role: &str,
        grant: bool,
        audit: &AuditEntry<'_>,
    ) -> DbResult<bool> {
        let changed = in_tx!(self, tx => {
            let r = if grant {
                sqlx::query("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                    .bind(user_id).bind(role).bind(audit.at).execute(&mut *tx).await?
            } else {
                // Never the last active admin's admin role: a cell with no
                // admin can only be mended on its host (`cell grant-role`).
                sqlx::query("DELETE FROM user_roles WHERE user_id = $1 AND role = $2 AND ($2 <> 'admin' OR EXISTS ( \
                             SELECT 1 FROM user_roles r JOIN users u ON u.id = r.user_id \
                             WHERE r.role = 'admin' AND u.status = 'active' AND r.user_id <> $1))")
                    .bind(user_id).bind(role).execute(&mut *tx).await?
            };
            if r.rows_affected() > 0 {
                insert_audit!(tx, audit);
            }
            r.rows_affected() > 0
        });
        Ok(changed)
    }

    // ------------------------------------------------------------ signing keys

    /// Replaces a key's stored form, if it is still `was` (another instance
    /// may have sealed it first); whether it did.
    pub async fn reseal_signing_key(&self, kid: &str, was: &[u8], now: &[u8]) -> DbResult<bool> {
        let n = write_db!(self, p => sqlx::query("UPDATE signing_keys SET private_pkcs8 = $1 WHERE kid = $2 AND private_pkcs8 = $3")
            .bind(now).bind(kid).bind(was).execute(p).await?.rows_affected());
        Ok(n == 1)
    }

    pub async fn signing_keys(&self) -> DbResult<Vec<SigningKeyRow>> {
        let rows: Vec<KeyTuple> = on_db!(self, p => sqlx::query_as(
            "SELECT kid, private_pkcs8, public_key, created_at, retired_at FROM signing_keys ORDER BY created_at")
            .fetch_all(p).await?);
        Ok(rows
            .into_iter()
            .map(|r| SigningKeyRow {
                kid: r.0,
                private_pkcs8: r.1,
                public_key: r.2,
                created_at: r.3,
                retired_at: r.4,
            })
            .collect())
    }

    /// Adds a key and retires every other active one, together.
    pub async fn rotate_signing_key(&self, row: &SigningKeyRow) -> DbResult<()> {
        in_tx!(self, tx => {
            sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL").bind(row.created_at).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO signing_keys (kid, private_pkcs8, public_key, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&row.kid).bind(&row.private_pkcs8).bind(&row.public_key).bind(row.created_at).execute(&mut *tx).await?;
        });
        Ok(())
    }

    /// Drops keys retired before `before` (their tokens have all expired).
    pub async fn drop_retired_keys(&self, before: i64) -> DbResult<u64> {
        let r = write_db!(self, p => sqlx::query("DELETE FROM signing_keys WHERE retired_at IS NOT NULL AND retired_at < $1").bind(before).execute(p).await?.rows_affected());
        Ok(r)
    }
}
