//! The audit log: who changed what, written in the same transaction as the
//! change itself (identity, money and the host CLI all append to it).

use super::{Datastore, DbResult, On, stmt};

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

/// Appends an `AuditEntry` where `on` says: the caller's transaction, so
/// the entry and the change commit together.
pub async fn insert_audit<'t>(on: impl Into<On<'t>>, e: &AuditEntry<'_>) -> DbResult<()> {
    stmt("INSERT INTO audit_log (id, at, actor, action, target, details) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(e.at)
        .bind(e.actor)
        .bind(e.action)
        .bind(e.target)
        .bind(&e.details)
        .execute(on)
        .await?;
    Ok(())
}

impl Datastore {
    /// Appends an entry on its own.
    pub async fn audit(&self, e: &AuditEntry<'_>) -> DbResult<()> {
        insert_audit(self, e).await
    }

    /// Entries newest first, before the cursor `(at, id)`.
    pub async fn audit_log(
        &self,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> DbResult<Vec<AuditRow>> {
        let (at, id) = before.unwrap_or((i64::MAX, String::new()));
        stmt("SELECT id, at, actor, action, target, details FROM audit_log WHERE (at < $1 OR (at = $1 AND id < $2)) \
              ORDER BY at DESC, id DESC LIMIT $3")
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(self)
        .await
    }
}
