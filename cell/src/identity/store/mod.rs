//! The identity tables, for both backends: the row types and the SQL
//! shared by the statements, which live one file per group of tables.
//! Every query is one text (both SQLite and PostgreSQL take `$n`
//! parameters); database errors are translated here, once.

use crate::db::{Conn, Datastore, DbError, DbResult, PointRecord, stmt};

/// The identity service's tables over the cell's datastore: users and their
/// identifiers, credentials, sessions and refresh tokens, roles, addresses,
/// password resets, signing keys and directory claims.
#[derive(Clone, Debug)]
pub struct IdentityStore {
    pub(in crate::identity) db: Datastore,
}

impl IdentityStore {
    pub fn new(db: Datastore) -> Self {
        Self { db }
    }

    /// The cell's audit log, newest first (`db/audit.rs`): the back
    /// office's page of it.
    pub async fn audit_log(
        &self,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> DbResult<Vec<crate::db::audit::AuditRow>> {
        self.db.audit_log(before, limit).await
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
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

/// A `users` row in `user_cols!()` order: the move bundle's wire form
/// (`moving.rs`, versioned).
pub(crate) type UserTuple = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
);

/// The rule of a live session `s` at time `$3`, in both statements that
/// check one (`session_alive`, `profile_in_session`).
macro_rules! live_session {
    () => {
        "s.revoked_at IS NULL AND s.expires_at > $3"
    };
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
            " AS roles, (SELECT json_group_array(json_array(kind, value) ORDER BY kind, value) FROM identifiers WHERE user_id = $1) AS identifiers"
        )
    };
    (postgres) => {
        concat!(
            "SELECT ",
            user_cols!(),
            ", ",
            roles_json!(postgres, "$1"),
            " AS roles, (SELECT coalesce(json_agg(json_build_array(kind, value) ORDER BY kind, value), '[]')::text FROM identifiers WHERE user_id = $1) AS identifiers"
        )
    };
}

/// A profile's row: the user's columns, then the two lists as JSON.
#[derive(sqlx::FromRow)]
struct ProfileRow {
    #[sqlx(flatten)]
    user: User,
    roles: String,
    identifiers: String,
}

impl ProfileRow {
    fn into_profile(self) -> DbResult<UserProfile> {
        Ok(UserProfile {
            roles: json_column(&self.roles)?,
            identifiers: json_column(&self.identifiers)?,
            user: self.user,
        })
    }
}

/// A list a statement folded into a JSON array (`roles_json!`).
fn json_column<T: serde::de::DeserializeOwned>(text: &str) -> DbResult<T> {
    serde_json::from_str(text).map_err(|e| DbError::Db(sqlx::Error::Decode(e.into())))
}

impl PointRecord for ProfileRow {
    fn from_point(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(ProfileRow {
            user: User {
                id: r.get(0)?,
                status: r.get(1)?,
                display_name: r.get(2)?,
                locale: r.get(3)?,
                bio: r.get(4)?,
                avatar_url: r.get(5)?,
                version: r.get(6)?,
                created_at: r.get(7)?,
                updated_at: r.get(8)?,
            },
            roles: r.get(9)?,
            identifiers: r.get(10)?,
        })
    }
}

/// The editable part of a profile.
pub struct ProfileFields<'a> {
    pub display_name: &'a str,
    pub locale: Option<&'a str>,
    pub bio: Option<&'a str>,
    pub avatar_url: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub id: &'a str,
    pub display_name: &'a str,
    pub kind: &'a str,
    pub value: &'a str,
    pub password_hash: &'a str,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub client_type: String,
    pub created_at: i64,
    pub last_used_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

macro_rules! session_cols {
    () => {
        "id, user_id, client_type, created_at, last_used_at, expires_at, revoked_at"
    };
}

/// The statements of a refresh rotation on `conn` (a transaction's or a
/// batch's). The common case is three statements: mark the token used
/// (remembering its successor), touch its live session, store the
/// successor. A token used before is a repeat when it was rotated less than
/// `grace_ms` ago and its successor is still unused (the client lost the
/// answer and retries); any other reuse revokes the session.
async fn rotate(conn: &mut Conn<'_>, r: &Rotation<'_>) -> DbResult<RefreshOutcome> {
    const LIVE: &str = concat!(
        "UPDATE sessions SET last_used_at = $1 WHERE id = $2 AND revoked_at IS NULL AND expires_at > $1 RETURNING ",
        session_cols!()
    );
    let marked: Option<String> = stmt("UPDATE refresh_tokens SET used_at = $1, successor_hash = $3, successor_salt = $4 WHERE token_hash = $2 AND used_at IS NULL RETURNING session_id")
        .bind(r.now)
        .bind(r.old_hash)
        .bind(r.new_hash)
        .bind(r.salt)
        .scalar_optional(&mut *conn)
        .await?;
    if let Some(sid) = marked {
        let live: Option<Session> = stmt(LIVE)
            .bind(r.now)
            .bind(&sid)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(s) = live else {
            return Ok(RefreshOutcome::Invalid);
        };
        stmt("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
            .bind(r.new_hash)
            .bind(&sid)
            .bind(r.now)
            .execute(&mut *conn)
            .await?;
        return Ok(RefreshOutcome::Rotated(s));
    }
    #[derive(sqlx::FromRow)]
    struct Used {
        session_id: String,
        used_at: Option<i64>,
        successor_hash: Option<String>,
        successor_salt: Option<String>,
    }
    let used: Option<Used> =
        stmt("SELECT session_id, used_at, successor_hash, successor_salt FROM refresh_tokens WHERE token_hash = $1")
            .bind(r.old_hash)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(Used {
        session_id: sid,
        used_at,
        successor_hash: successor,
        successor_salt: salt,
    }) = used
    else {
        return Ok(RefreshOutcome::Invalid);
    };
    let recent = used_at.is_some_and(|at| at > r.now - r.grace_ms);
    let successor_unused = match (&successor, recent) {
        (Some(h), true) => {
            stmt("SELECT session_id FROM refresh_tokens WHERE token_hash = $1 AND used_at IS NULL")
                .bind(h)
                .scalar_optional::<String>(&mut *conn)
                .await?
                .is_some()
        }
        _ => false,
    };
    match salt {
        Some(salt) if successor_unused => {
            let live: Option<Session> = stmt(LIVE)
                .bind(r.now)
                .bind(&sid)
                .fetch_optional(&mut *conn)
                .await?;
            Ok(match live {
                Some(s) => RefreshOutcome::Repeated(s, salt),
                None => RefreshOutcome::Invalid,
            })
        }
        _ => {
            stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'refresh_reuse' WHERE id = $2 AND revoked_at IS NULL")
                .bind(r.now)
                .bind(&sid)
                .execute(&mut *conn)
                .await?;
            Ok(RefreshOutcome::Reused)
        }
    }
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
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    sqlx::FromRow,
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

/// An `addresses` row in `address_cols!()` order, as a move bundle carries
/// it (`moving.rs`: the bundle's wire format is versioned).
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

macro_rules! address_cols {
    () => {
        "id, label, recipient, phone, line1, line2, city, state, postal_code, country, is_default, created_at, updated_at"
    };
}
pub(crate) use address_cols;

#[derive(sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub private_pkcs8: Vec<u8>,
    pub public_key: Vec<u8>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

// The statements, one file per group of tables. Declared after the macros
// above, which they use.
mod addresses;
mod credentials;
mod rbac;
pub use rbac::RoleRow;
mod identifier_proofs;
pub(crate) use identifier_proofs::replace_identifier;
pub use identifier_proofs::{LiveProof, NewProof};
mod reset;
mod sessions;
mod sign_in_codes;
mod signing_keys;
mod users;
