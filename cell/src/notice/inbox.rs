//! The notice service's side that users see: their inbox, their
//! preferences, and events queued for them. What handlers call; the tables
//! are `store.rs`'s.

use super::Notices;
use super::store::InboxItem;
use crate::db::DbResult;

impl Notices {
    pub async fn inbox_page(
        &self,
        user_id: &str,
        archived: bool,
        after: Option<(i64, String)>,
        limit: i64,
        now: i64,
    ) -> DbResult<Vec<InboxItem>> {
        self.store
            .inbox_page(user_id, archived, after, limit, now)
            .await
    }

    pub async fn unread_count(&self, user_id: &str, now: i64) -> DbResult<i64> {
        self.store.unread_count(user_id, now).await
    }

    /// Sets `read_at` or `archived_at` on one item (or, with no id, on all
    /// unread ones); the number of items changed.
    pub async fn mark_inbox(
        &self,
        user_id: &str,
        id: Option<&str>,
        archive: bool,
        now: i64,
    ) -> DbResult<u64> {
        self.store.mark_inbox(user_id, id, archive, now).await
    }

    pub async fn delete_inbox(&self, user_id: &str, id: &str) -> DbResult<bool> {
        self.store.delete_inbox(user_id, id).await
    }

    pub async fn preferences(&self, user_id: &str) -> DbResult<Vec<(String, String, bool)>> {
        self.store.preferences(user_id).await
    }

    pub async fn set_preferences(
        &self,
        user_id: &str,
        prefs: &[(String, String, bool)],
    ) -> DbResult<()> {
        self.store.set_preferences(user_id, prefs).await
    }

    /// Adds an event; false if its id is already there (triggers are
    /// idempotent by event id).
    pub async fn enqueue_event(
        &self,
        id: &str,
        topic: &str,
        user_id: &str,
        payload: &str,
        now: i64,
    ) -> DbResult<bool> {
        self.store
            .enqueue_event(id, topic, user_id, payload, now)
            .await
    }
}
