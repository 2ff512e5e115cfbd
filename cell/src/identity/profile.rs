//! Identity's reads and writes of a user's own data that need no rule
//! beyond the store's (profile versions, addresses), and the back office's
//! user listing, audit log and role lookups. What handlers call; the tables
//! are `store.rs`'s.

use super::service::Identity;
use super::store::{Address, ProfileFields, User};
use crate::db::DbResult;
use crate::db::audit::AuditRow;

impl Identity {
    /// Users by creation, after the cursor `(created_at, id)`; `query`
    /// matches an identifier exactly or a display-name prefix.
    pub async fn list_users(
        &self,
        after: Option<(i64, String)>,
        query: Option<&str>,
        limit: i64,
    ) -> DbResult<Vec<(User, Vec<String>)>> {
        self.store.list_users(after, query, limit).await
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
        self.store
            .update_profile(id, expected_version, f, now)
            .await
    }

    pub async fn addresses(&self, user_id: &str) -> DbResult<Vec<Address>> {
        self.store.addresses(user_id).await
    }

    pub async fn update_address(&self, user_id: &str, a: &Address) -> DbResult<bool> {
        self.store.update_address(user_id, a).await
    }

    pub async fn delete_address(&self, user_id: &str, id: &str) -> DbResult<bool> {
        self.store.delete_address(user_id, id).await
    }

    pub async fn set_default_address(&self, user_id: &str, id: &str, now: i64) -> DbResult<bool> {
        self.store.set_default_address(user_id, id, now).await
    }

    pub async fn role_exists(&self, role: &str) -> DbResult<bool> {
        self.store.role_exists(role).await
    }

    /// Entries newest first, before the cursor `(at, id)`.
    pub async fn audit_log(
        &self,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> DbResult<Vec<AuditRow>> {
        self.store.audit_log(before, limit).await
    }

    /// The stored user, whatever their status.
    pub async fn user_row(&self, id: &str) -> DbResult<Option<User>> {
        self.store.user(id).await
    }

    /// Whether a session is live and its user active: the check behind every
    /// authenticated request at the home cell.
    pub async fn session_alive(&self, id: &str, user_id: &str, now: i64) -> DbResult<bool> {
        self.store.session_alive(id, user_id, now).await
    }
}
