//! The notice service's back office: templates, broadcasts and the
//! dead-letter queue, for the CMS routes (`http/cms/`).

use super::Notices;
use super::store::{Broadcast, Delivery, Redrive, Template};
use crate::db::DbResult;

impl Notices {
    pub async fn list_templates(&self) -> DbResult<Vec<Template>> {
        self.store.list_templates().await
    }

    pub async fn put_template(&self, t: &Template) -> DbResult<()> {
        self.store.put_template(t).await
    }

    pub async fn delete_template(&self, key: &str, channel: &str, locale: &str) -> DbResult<bool> {
        self.store.delete_template(key, channel, locale).await
    }

    pub async fn templates_for(&self, key: &str) -> DbResult<Vec<Template>> {
        self.store.templates_for(key).await
    }

    pub async fn create_broadcast(&self, b: &Broadcast, payload: &str) -> DbResult<()> {
        self.store.create_broadcast(b, payload).await
    }

    pub async fn broadcasts(&self, limit: i64) -> DbResult<Vec<Broadcast>> {
        self.store.broadcasts(limit).await
    }

    pub async fn dead_deliveries(
        &self,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> DbResult<Vec<Delivery>> {
        self.store.dead_deliveries(after, limit).await
    }

    /// Puts a dead delivery back in the queue with a fresh attempt count,
    /// unless it carried a one-time code (its text is gone, above, and a
    /// code sent late is one the user may no longer expect).
    pub async fn redrive(&self, id: &str, now: i64) -> DbResult<Redrive> {
        self.store.redrive(id, now).await
    }
}
