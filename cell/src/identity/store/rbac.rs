//! The identity store's roles and permissions, audited.

use super::IdentityStore;
use crate::db::stmt;

use crate::db::audit::{AuditEntry, insert_audit};

use crate::db::DbResult;

/// A role as stored: its permissions sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRow {
    pub name: String,
    pub description: String,
    pub builtin: bool,
    pub permissions: Vec<String>,
}

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

    /// Every permission `user_id` holds, through any of its roles.
    pub async fn permissions_of_user(&self, user_id: &str) -> DbResult<Vec<String>> {
        let rows: Vec<(String,)> = stmt(
            "SELECT DISTINCT rp.permission FROM user_roles ur JOIN role_permissions rp ON rp.role = ur.role WHERE ur.user_id = $1 ORDER BY rp.permission",
        )
        .bind(user_id)
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
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

    /// Every role with its permissions, by name.
    pub async fn roles(&self) -> DbResult<Vec<RoleRow>> {
        let rows: Vec<(String, String, bool)> =
            stmt("SELECT name, description, builtin FROM roles ORDER BY name")
                .fetch_all(&self.db)
                .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, description, builtin) in rows {
            let permissions = self.permissions_of(&name).await?;
            out.push(RoleRow {
                name,
                description,
                builtin,
                permissions,
            });
        }
        Ok(out)
    }

    pub async fn role(&self, name: &str) -> DbResult<Option<RoleRow>> {
        let row: Option<(String, String, bool)> =
            stmt("SELECT name, description, builtin FROM roles WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.db)
                .await?;
        let Some((name, description, builtin)) = row else {
            return Ok(None);
        };
        let permissions = self.permissions_of(&name).await?;
        Ok(Some(RoleRow {
            name,
            description,
            builtin,
            permissions,
        }))
    }

    async fn permissions_of(&self, role: &str) -> DbResult<Vec<String>> {
        let rows: Vec<(String,)> =
            stmt("SELECT permission FROM role_permissions WHERE role = $1 ORDER BY permission")
                .bind(role)
                .fetch_all(&self.db)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Creates a custom role with its audit entry; `Conflict` when the
    /// name is taken.
    pub async fn create_role(&self, role: &RoleRow, audit: &AuditEntry<'_>) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        stmt("INSERT INTO roles (name, description, builtin) VALUES ($1, $2, FALSE)")
            .bind(&role.name)
            .bind(&role.description)
            .execute(&mut tx)
            .await?;
        insert_permissions(&mut tx, role).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a role's description and permissions with `role`'s, and
    /// writes `audit` with them, in one transaction. The caller compared
    /// with what it read; a concurrent edit is lost to the later one, and
    /// both are audited.
    pub async fn update_role(&self, role: &RoleRow, audit: &AuditEntry<'_>) -> DbResult<()> {
        let mut tx = self.db.begin().await?;
        stmt("UPDATE roles SET description = $2 WHERE name = $1")
            .bind(&role.name)
            .bind(&role.description)
            .execute(&mut tx)
            .await?;
        stmt("DELETE FROM role_permissions WHERE role = $1")
            .bind(&role.name)
            .execute(&mut tx)
            .await?;
        insert_permissions(&mut tx, role).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes a custom role, its permissions and every grant of it, with
    /// the audit entry. Returns how many users held it, or None when there
    /// is no such custom role.
    pub async fn delete_role(&self, name: &str, audit: &AuditEntry<'_>) -> DbResult<Option<u64>> {
        let mut tx = self.db.begin().await?;
        let grants = stmt("DELETE FROM user_roles WHERE role = $1")
            .bind(name)
            .execute(&mut tx)
            .await?;
        stmt("DELETE FROM role_permissions WHERE role = $1")
            .bind(name)
            .execute(&mut tx)
            .await?;
        let deleted = stmt("DELETE FROM roles WHERE name = $1 AND NOT builtin")
            .bind(name)
            .execute(&mut tx)
            .await?;
        if deleted == 0 {
            // Dropping the transaction rolls the grants back.
            return Ok(None);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(grants))
    }
}

async fn insert_permissions(tx: &mut crate::db::Tx, role: &RoleRow) -> DbResult<()> {
    for p in &role.permissions {
        stmt("INSERT INTO role_permissions (role, permission) VALUES ($1, $2)")
            .bind(&role.name)
            .bind(p)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}
