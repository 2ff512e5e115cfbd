//! The identity store's roles and permissions, audited.

use super::IdentityStore;
use crate::db::stmt;

use crate::db::audit::{AuditEntry, insert_audit};

use crate::db::DbResult;

impl IdentityStore {
    pub async fn roles_of(&self, user_id: &str) -> DbResult<Vec<String>> {
        let rows: Vec<(String,)> =
            stmt("SELECT role FROM user_roles WHERE user_id = $1 ORDER BY role")
                .bind(user_id)
                .fetch_all(&self.db)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    pub async fn has_permission(&self, user_id: &str, permission: &str) -> DbResult<bool> {
        let sql = "SELECT 1 FROM user_roles ur JOIN role_permissions rp ON rp.role = ur.role WHERE ur.user_id = $1 AND rp.permission = $2 LIMIT 1";
        let row: Option<(i32,)> = stmt(sql)
            .bind(user_id)
            .bind(permission)
            .fetch_optional(&self.db)
            .await?;
        Ok(row.is_some())
    }

    pub async fn role_exists(&self, role: &str) -> DbResult<bool> {
        let row: Option<(String,)> = stmt("SELECT name FROM roles WHERE name = $1")
            .bind(role)
            .fetch_optional(&self.db)
            .await?;
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
        let mut tx = self.db.begin().await?;
        let changed = {
            let r = if grant {
                stmt("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(user_id).bind(role).bind(audit.at).execute(&mut tx).await?
            } else {
                // Never the last active admin's admin role: a cell with no
                // admin can only be mended on its host (`cell grant-role`).
                stmt("DELETE FROM user_roles WHERE user_id = $1 AND role = $2 AND ($2 <> 'admin' OR EXISTS ( \
                         SELECT 1 FROM user_roles r JOIN users u ON u.id = r.user_id \
                         WHERE r.role = 'admin' AND u.status = 'active' AND r.user_id <> $1))")
                .bind(user_id).bind(role).execute(&mut tx).await?
            };
            if r > 0 {
                insert_audit(&mut tx, audit).await?;
            }
            r > 0
        };
        tx.commit().await?;
        Ok(changed)
    }
}
