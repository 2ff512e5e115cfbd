//! Moving a user to another region's cell, driven by the old home:
//!
//! 1. **Freeze**: the account is disabled here and its sessions end, so
//!    nothing changes while it is copied. A user who holds money (a wallet
//!    with a balance or anything pending) is refused: money moves by
//!    transfer or withdrawal, never by copying rows.
//! 2. **Copy**: the user's rows (profile, identifiers, password hash,
//!    addresses, roles, notice preferences, inbox, WeChat bindings) go to the new
//!    home in one `ImportUser` call, applied there in one transaction. A
//!    repeated import replaces the previous one. Roles travel in the bundle,
//!    but only those that grant no permission (`user`) are granted at the
//!    new home: a role with CMS permissions is a grant of the region that
//!    gave it, and a cell whose certificate was stolen must not mint an
//!    admin in another region by importing one. An operator grants them
//!    again there (`cell grant-role`).
//! 3. **Re-home**: the control plane's `MoveUser` moves the user and every
//!    identifier to the new region in one revision. From then on routers send
//!    the user to the new home, and this cell answers "moved".
//! 4. **Erase**: the account is anonymised here as an account deletion is,
//!    but its directory claims stay with the user (they moved). Ledger rows,
//!    if any, stay under the random user id.
//!
//! A failure before step 3 thaws the account and changes nothing else that
//! matters (a copy at the new home is never routed to). After step 3 the
//! move has happened; if step 4 fails, running the command again finishes it.
//! Sessions end with the move: the user signs in again, and the login goes
//! to the new home by the directory.

use crate::db::Datastore;
use crate::db::DbResult;
use crate::db::stmt;
use crate::identity::store::{AddressTuple as AddressRow, IdentityStore, UserTuple as UserRow};
use crate::peers::Peers;
use homecell_common::replica::Replica;
use homecell_proto::error::{CodedError, ErrorCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tonic::transport::Channel;

const BUNDLE_VERSION: u32 = 1;

type InboxRow = (
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

/// Everything a cell keeps about one user, as it travels in a move.
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
    /// id, label, recipient, phone, line1, line2, city, state, postal_code,
    /// country, is_default, created_at, updated_at.
    pub addresses: Vec<AddressRow>,
    /// (role, granted_at).
    pub roles: Vec<(String, i64)>,
    /// (category, channel, enabled).
    pub preferences: Vec<(String, String, bool)>,
    /// id, event_id, category, title, body, created_at, read_at,
    /// archived_at, expires_at.
    pub inbox: Vec<InboxRow>,
    /// (openid, created_at).
    pub wechat: Vec<(String, i64)>,
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

impl MoveStore {
    /// True when the user has a wallet with a balance or anything pending.
    pub async fn holds_money(&self, user_id: &str) -> DbResult<bool> {
        let sql = "SELECT COUNT(*) FROM ledger_accounts WHERE kind = 'wallet' AND owner = $1 \
                   AND (credits_posted <> debits_posted OR debits_pending <> 0 OR credits_pending <> 0)";
        let (n,): (i64,) = stmt(sql).bind(user_id).fetch_one(&self.db).await?;
        Ok(n > 0)
    }

    /// Disables an account and ends its sessions; returns the status it
    /// had (None: no such user, or deleted).
    pub async fn freeze_user(&self, id: &str, now: i64) -> DbResult<Option<String>> {
        let mut tx = self.db.begin().await?;
        let status: Option<String> = stmt("SELECT status FROM users WHERE id = $1")
            .bind(id)
            .scalar_optional(&mut tx)
            .await?;
        let Some(status) = status.filter(|s| s != "deleted") else {
            tx.commit().await?;
            return Ok(None);
        };
        stmt("UPDATE users SET status = 'disabled' WHERE id = $1")
            .bind(id)
            .execute(&mut tx)
            .await?;
        stmt("UPDATE sessions SET revoked_at = $1, revoke_reason = 'moved' WHERE user_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
        Ok(Some(status))
    }

    /// Gives a frozen account its status back (a move that did not happen).
    pub async fn thaw_user(&self, id: &str, status: &str) -> DbResult<()> {
        stmt("UPDATE users SET status = $1 WHERE id = $2 AND status = 'disabled'")
            .bind(status)
            .bind(id)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// The user's rows, read in one transaction.
    pub async fn export_user(&self, id: &str) -> DbResult<Option<Bundle>> {
        let mut tx = self.db.begin().await?;
        let user: Option<UserRow> = stmt(concat!(
            "SELECT ",
            crate::identity::store::user_cols!(),
            " FROM users WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut tx)
        .await?;
        let Some(user) = user else {
            tx.commit().await?;
            return Ok(None);
        };
        let bundle = Bundle {
            version: BUNDLE_VERSION,
            user,
            identifiers: stmt("SELECT kind, value FROM identifiers WHERE user_id = $1 ORDER BY kind, value")
                .bind(id).fetch_all(&mut tx).await?,
            password_hash: stmt("SELECT password_hash FROM credentials WHERE user_id = $1")
                .bind(id).scalar_optional(&mut tx).await?,
            addresses: stmt(concat!("SELECT ", crate::identity::store::address_cols!(), " FROM addresses WHERE user_id = $1 ORDER BY created_at, id"))
                .bind(id).fetch_all(&mut tx).await?,
            roles: stmt("SELECT role, granted_at FROM user_roles WHERE user_id = $1 ORDER BY role")
                .bind(id).fetch_all(&mut tx).await?,
            preferences: stmt("SELECT category, channel, enabled FROM notice_preferences WHERE user_id = $1 ORDER BY category, channel")
                .bind(id).fetch_all(&mut tx).await?,
            inbox: stmt("SELECT id, event_id, category, title, body, created_at, read_at, archived_at, expires_at FROM inbox WHERE user_id = $1 ORDER BY created_at, id")
                .bind(id).fetch_all(&mut tx).await?,
            wechat: stmt("SELECT openid, created_at FROM wechat_bindings WHERE user_id = $1 ORDER BY openid")
                .bind(id).fetch_all(&mut tx).await?,
        };
        tx.commit().await?;
        Ok(Some(bundle))
    }

    /// Writes a moved user's rows in one transaction, replacing whatever an
    /// earlier import (or an earlier stay in this region) left.
    pub async fn import_user(&self, b: &Bundle) -> DbResult<()> {
        let id = &b.user.0;
        let mut tx = self.db.begin().await?;
        for sql in [
            "DELETE FROM identifiers WHERE user_id = $1",
            "DELETE FROM credentials WHERE user_id = $1",
            "DELETE FROM addresses WHERE user_id = $1",
            "DELETE FROM user_roles WHERE user_id = $1",
            "DELETE FROM notice_preferences WHERE user_id = $1",
            "DELETE FROM inbox WHERE user_id = $1",
            "DELETE FROM wechat_bindings WHERE user_id = $1",
            "DELETE FROM password_resets WHERE user_id = $1",
            "DELETE FROM sign_in_codes WHERE user_id = $1",
        ] {
            stmt(sql).bind(id).execute(&mut tx).await?;
        }
        let u = &b.user;
        stmt("INSERT INTO users (id, status, display_name, locale, bio, avatar_url, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status, display_name = excluded.display_name, locale = excluded.locale, bio = excluded.bio, \
                     avatar_url = excluded.avatar_url, version = excluded.version, created_at = excluded.created_at, updated_at = excluded.updated_at")
            .bind(&u.0).bind(&u.1).bind(&u.2).bind(&u.3).bind(&u.4).bind(&u.5).bind(u.6).bind(u.7).bind(u.8)
            .execute(&mut tx).await?;
        for (kind, value) in &b.identifiers {
            stmt("INSERT INTO identifiers (kind, value, user_id) VALUES ($1, $2, $3)")
                .bind(kind)
                .bind(value)
                .bind(id)
                .execute(&mut tx)
                .await?;
        }
        if let Some(hash) = &b.password_hash {
            stmt("INSERT INTO credentials (user_id, password_hash, attempts, updated_at) VALUES ($1, $2, 0, $3)")
                .bind(id).bind(hash).bind(u.8).execute(&mut tx).await?;
        }
        for a in &b.addresses {
            stmt("INSERT INTO addresses (id, user_id, label, recipient, phone, line1, line2, city, state, postal_code, country, is_default, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)")
                .bind(&a.0).bind(id).bind(&a.1).bind(&a.2).bind(&a.3).bind(&a.4).bind(&a.5).bind(&a.6).bind(&a.7).bind(&a.8).bind(&a.9).bind(a.10).bind(a.11).bind(a.12)
                .execute(&mut tx).await?;
        }
        // Only the built-in roles that grant no permission here (`user`)
        // come along: the new home's operator grants the others. Not a
        // custom role that is empty now: a sending cell could seed its
        // users into one an admin fills later.
        let mut dropped = 0;
        for (role, at) in &b.roles {
            let granted = stmt("INSERT INTO user_roles (user_id, role, granted_at) SELECT $1, name, $3 FROM roles \
                                       WHERE name = $2 AND builtin AND NOT EXISTS (SELECT 1 FROM role_permissions p WHERE p.role = roles.name)")
                .bind(id).bind(role).bind(at).execute(&mut tx).await?;
            dropped += usize::from(granted == 0);
        }
        if dropped > 0 {
            tracing::warn!(user_id = %id, roles = dropped, "moved user's roles not granted here; grant them again with cell grant-role");
        }
        for (category, channel, enabled) in &b.preferences {
            stmt("INSERT INTO notice_preferences (user_id, category, channel, enabled) VALUES ($1, $2, $3, $4)")
                .bind(id).bind(category).bind(channel).bind(enabled).execute(&mut tx).await?;
        }
        for m in &b.inbox {
            stmt("INSERT INTO inbox (id, user_id, event_id, category, title, body, created_at, read_at, archived_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                .bind(&m.0).bind(id).bind(&m.1).bind(&m.2).bind(&m.3).bind(&m.4).bind(m.5).bind(m.6).bind(m.7).bind(m.8)
                .execute(&mut tx).await?;
        }
        for (openid, at) in &b.wechat {
            stmt("INSERT INTO wechat_bindings (openid, user_id, created_at) VALUES ($1, $2, $3)")
                .bind(openid)
                .bind(id)
                .bind(at)
                .execute(&mut tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Step 4 at the old home: the account anonymised as a deletion would,
    /// in one transaction, inbox and preferences included (the new home
    /// holds them now). Their directory claims moved with the user, so the
    /// identifiers are not released here.
    pub async fn erase_moved_user(&self, id: &str, placeholder: &str, now: i64) -> DbResult<()> {
        self.identity
            .anonymise_user(id, placeholder, now, None)
            .await
            .map(drop)
    }
}

fn internal(e: impl std::fmt::Display) -> CodedError {
    CodedError::new(ErrorCode::Internal, format!("datastore: {e}"))
}

fn precondition(msg: impl Into<String>) -> CodedError {
    CodedError::new(ErrorCode::FailedPrecondition, msg.into())
}

/// A user's rows in every service's tables, as a move reads, writes and
/// erases them (one transaction on each side).
#[derive(Clone, Debug)]
pub struct MoveStore {
    db: Datastore,
    /// Erasing a user who moved away is identity's anonymisation.
    identity: IdentityStore,
}

impl MoveStore {
    pub fn new(db: Datastore) -> Self {
        let identity = IdentityStore::new(db.clone());
        Self { db, identity }
    }
}

/// The move service. A move reads and writes every service's tables of one
/// user (in one transaction on each side), so it is the one part of the
/// cell that holds the datastore for all of them.
pub struct Moves {
    pub(crate) store: MoveStore,
    region: String,
    replica: Arc<Replica>,
    peers: Arc<Peers>,
    /// The control plane, which re-homes the user.
    cp: Channel,
}

impl Moves {
    pub fn new(
        db: Datastore,
        region: &str,
        replica: Arc<Replica>,
        peers: Arc<Peers>,
        cp: Channel,
    ) -> Self {
        Self {
            store: MoveStore::new(db),
            region: region.to_string(),
            replica,
            peers,
            cp,
        }
    }
}

impl Moves {
    /// Checks and applies a bundle pushed by `from` for one of its users.
    pub async fn import_moved_user(
        &self,
        from: &str,
        user_id: &str,
        bundle: &[u8],
    ) -> Result<(), CodedError> {
        let b: Bundle = serde_json::from_slice(bundle)
            .map_err(|e| CodedError::invalid(format!("move bundle: {e}")))?;
        if b.version != BUNDLE_VERSION {
            return Err(CodedError::invalid(format!(
                "move bundle version {} (this cell reads {BUNDLE_VERSION})",
                b.version
            )));
        }
        if b.user.0 != user_id {
            return Err(CodedError::invalid("the bundle is for another user"));
        }
        // Only the user's current home may push it here.
        if self.replica.state().user_region(user_id) != Some(from) {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                format!("the directory does not home this user in {from}"),
            ));
        }
        match self.store.import_user(&b).await {
            Ok(()) => {
                tracing::info!(user_id, from, "moved user imported");
                Ok(())
            }
            Err(crate::db::DbError::Conflict) => Err(CodedError::new(
                ErrorCode::AlreadyExists,
                "an identifier of the user belongs to another user here",
            )),
            Err(e) => Err(internal(e)),
        }
    }

    /// Moves one of this cell's users to `to` (steps 1–4 above); returns
    /// the control plane's revision that re-homed the user.
    pub async fn move_user_out(&self, user_id: &str, to: &str) -> Result<u64, CodedError> {
        use crate::clock::now_ms;
        use homecell_proto::control::{
            MoveUserRequest, RegionStatus, directory_service_client::DirectoryServiceClient,
        };
        if to == self.region {
            return Err(CodedError::invalid("the user already lives here"));
        }
        let state = self.replica.state();
        match state.regions.get(to) {
            None => return Err(CodedError::not_found(format!("no region {to}"))),
            Some(r) if r.status() != RegionStatus::Active => {
                return Err(precondition(format!("region {to} does not take users")));
            }
            Some(_) => {}
        }
        let home = state.user_region(user_id).map(str::to_string);
        let seen_revision = state.revision;
        drop(state);
        let now = now_ms();
        if home.as_deref() == Some(to) {
            // Re-homed by an earlier run that stopped before erasing: finish.
            self.store
                .erase_moved_user(user_id, &format!("moved-{user_id}"), now)
                .await
                .map_err(internal)?;
            return Ok(seen_revision);
        }
        if home.as_deref() != Some(self.region.as_str()) {
            return Err(CodedError::not_found("no such user in this region"));
        }
        if self.store.holds_money(user_id).await.map_err(internal)? {
            return Err(precondition(
                "the user holds money: transfer or withdraw it before a move",
            ));
        }
        let Some(status) = self
            .store
            .freeze_user(user_id, now)
            .await
            .map_err(internal)?
        else {
            return Err(CodedError::not_found("no such user in this region"));
        };
        let moved = async {
            let mut bundle = self
                .store
                .export_user(user_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| CodedError::not_found("no such user in this region"))?;
            bundle.user.1 = status.clone();
            let identifiers = bundle.qualified_identifiers();
            let json = serde_json::to_vec(&bundle).map_err(internal)?;
            self.peers
                .import_user(to, &self.region, user_id, json)
                .await?;
            let req = MoveUserRequest {
                user_id: user_id.to_string(),
                from_region: self.region.clone(),
                to_region: to.to_string(),
                identifiers,
            };
            DirectoryServiceClient::new(self.cp.clone())
                .move_user(req)
                .await
                .map(|r| r.into_inner().revision)
                .map_err(|s| precondition(format!("the control plane refused: {}", s.message())))
        }
        .await;
        let revision = match moved {
            Ok(r) => r,
            Err(e) => {
                if let Err(t) = self.store.thaw_user(user_id, &status).await {
                    tracing::error!(user_id, error = %t, "a move failed and the account stays disabled");
                }
                return Err(e);
            }
        };
        self.store
            .erase_moved_user(user_id, &format!("moved-{user_id}"), now)
            .await
            .map_err(internal)?;
        tracing::info!(user_id, to, revision, "user moved out");
        Ok(revision)
    }
}
