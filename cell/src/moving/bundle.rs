//! Everything a cell keeps about one user, as it travels in a move: read at
//! the old home in one transaction, written at the new one in one
//! transaction. Money is not in it: balances move through the ledgers
//! (`money/moving.rs`); the bundle carries the user's past operations, as
//! history and idempotency records.

use crate::identity::store::{AddressTuple as AddressRow, UserTuple as UserRow};
use crate::money::ledger::Operation;
use serde::{Deserialize, Serialize};

/// Version 2 added sessions, operations, outbox events and deliveries.
pub const BUNDLE_VERSION: u32 = 2;

/// id, event_id, category, title, body, created_at, read_at, archived_at,
/// expires_at.
pub type InboxRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
);

/// A live session: id, client_type, created_at, last_used_at, expires_at.
pub type SessionRow = (String, String, i64, i64, i64);

/// token_hash, session_id, created_at, used_at, successor_hash,
/// successor_salt.
pub type RefreshRow = (
    String,
    String,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// An event not yet dispatched: id, topic, payload, created_at, traceparent.
pub type OutboxRow = (String, String, String, i64, Option<String>);

/// A delivery not yet sent, in the `deliveries` table's columns.
#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub event_id: String,
    pub channel: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub html: Option<String>,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub created_at: i64,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub version: u32,
    /// id, status, display_name, locale, bio, avatar_url, version,
    /// created_at, updated_at.
    pub user: UserRow,
    /// (kind, value).
    pub identifiers: Vec<(String, String)>,
    /// The argon2id hash (absent for WeChat-only accounts).
    pub password_hash: Option<String>,
    pub addresses: Vec<AddressRow>,
    /// (role, granted_at).
    pub roles: Vec<(String, i64)>,
    /// (category, channel, enabled).
    pub preferences: Vec<(String, String, bool)>,
    pub inbox: Vec<InboxRow>,
    /// (openid, created_at).
    pub wechat: Vec<(String, i64)>,
    /// Live sessions and every refresh token of theirs (used ones too, so
    /// a reused token is still caught at the new home).
    pub sessions: Vec<SessionRow>,
    pub refresh_tokens: Vec<RefreshRow>,
    /// Every operation the user took part in, either side.
    pub operations: Vec<Operation>,
    pub outbox: Vec<OutboxRow>,
    pub deliveries: Vec<DeliveryRow>,
}

impl Bundle {
    /// Every directory identifier the user holds, as the control plane
    /// names them (`kind:value`, WeChat bindings as `wechat:<openid>`).
    pub fn qualified_identifiers(&self) -> Vec<String> {
        self.identifiers
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .chain(self.wechat.iter().map(|(o, _)| format!("wechat:{o}")))
            .collect()
    }
}
