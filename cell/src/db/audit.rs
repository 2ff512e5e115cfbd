//! The audit log: who changed what, written in the same transaction as the
//! change itself (identity, money and the host CLI all append to it).

use super::{Datastore, DbResult};
use crate::db::{in_tx, on_db};

/// One entry to append.
pub struct AuditEntry<'a> {
    pub at: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    /// JSON.
    pub details: String,
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub details: String,
}

/// Appends an `AuditEntry` inside the caller's transaction `$tx`.
macro_rules! insert_audit {
    ($tx:ident, $e:expr) => {
        sqlx::query("INSERT INTO audit_log (id, at, actor, action, target, details) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind($e.at)
            .bind($e.actor)
            .bind($e.action)
            .bind($e.target)
            .bind(&$e.details)
            .execute(&mut *$tx)
            .await?
    };
}
pub(crate) use insert_audit;

impl Datastore {
    /// Appends an entry on its own.
    pub async fn audit(&self, e: &AuditEntry<'_>) -> DbResult<()> {
        in_tx!(self, tx => { insert_audit!(tx, e); });
        Ok(())
    }

    /// Entries newest first, before the cursor `(at, id)`.
    pub async fn audit_log(
        &self,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> DbResult<Vec<AuditRow>> {
        let (at, id) = before.unwrap_or((i64::MAX, String::new()));
        let sql = "SELECT id, at, actor, action, target, details FROM audit_log WHERE (at < $1 OR (at = $1 AND id < $2)) \
                   ORDER BY at DESC, id DESC LIMIT $3";
        Ok(
            on_db!(self, p => sqlx::query_as(sql).bind(at).bind(&id).bind(limit).fetch_all(p).await?),
        )
    }
}
