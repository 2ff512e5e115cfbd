//! Roles as data: the cell's permission catalogue, and the back office's
//! editing of roles from it. Every CMS route names one of these
//! permissions (a test in `http/openapi.rs` holds the two together), and
//! each request checks the caller's roles in the datastore, so an edit
//! counts from the next request on.

use super::service::{ADMIN, Identity, Principal};
use super::store::RoleRow;
use crate::clock::now_ms;
use crate::db::audit::AuditEntry;
use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::BTreeSet;

/// Every permission a role can hold: (name, what it allows).
pub const PERMISSIONS: &[(&str, &str)] = &[
    ("audit:read", "read the audit log"),
    ("broadcast:send", "send messages and broadcasts to users"),
    ("money:adjust", "adjust a user's wallet"),
    ("outbox:manage", "list and re-drive dead notices"),
    ("role:assign", "list roles, grant and revoke them"),
    ("role:edit", "create, edit and delete roles"),
    ("templates:write", "create and replace notice templates"),
    (
        "users:delete",
        "delete accounts (anonymised, as their owners' own deletion)",
    ),
    ("users:disable", "disable and enable accounts"),
    ("users:read", "find and view users"),
];

/// The role every account holds.
const USER: &str = "user";

/// What a built-in role never loses. The admin holds everything: a cell
/// whose admins could not edit roles again could be mended only on its
/// host. Support keeps what the support desk is for.
fn floor(role: &str) -> Vec<&'static str> {
    match role {
        ADMIN => PERMISSIONS.iter().map(|(p, _)| *p).collect(),
        "support" => vec!["users:disable", "users:read"],
        _ => Vec::new(),
    }
}

fn check_name(name: &str) -> Result<(), CodedError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CodedError::field(
            "name",
            "1-32 characters: a-z first, then a-z, 0-9, - or _",
        ))
    }
}

/// The permissions, checked against the catalogue, deduplicated and
/// sorted.
fn check_permissions(permissions: &[String]) -> Result<Vec<String>, CodedError> {
    let mut out = BTreeSet::new();
    for p in permissions {
        if !PERMISSIONS.iter().any(|(known, _)| known == p) {
            return Err(CodedError::field(
                "permissions",
                format!("no permission {p:?} (GET /v1/cms/permissions lists them)"),
            ));
        }
        out.insert(p.clone());
    }
    Ok(out.into_iter().collect())
}

fn check_description(description: &str) -> Result<String, CodedError> {
    let d = description.trim();
    if d.chars().count() > 200 || d.chars().any(char::is_control) {
        return Err(CodedError::field(
            "description",
            "at most 200 characters, no control characters",
        ));
    }
    Ok(d.to_string())
}

impl Identity {
    pub async fn roles(&self) -> Result<Vec<RoleRow>, CodedError> {
        Ok(self.store.roles().await?)
    }

    pub(crate) async fn is_admin(&self, user_id: &str) -> Result<bool, CodedError> {
        Ok(self
            .store
            .roles_of(user_id)
            .await?
            .iter()
            .any(|r| r == ADMIN))
    }

    /// Nobody hands out, edits or takes away more than they hold: without
    /// this, `role:edit` or `role:assign` alone would be a way to become
    /// admin (a role with everything, granted to oneself), or to strip the
    /// admins. Admins hold every permission, so this never stops them.
    pub(crate) async fn check_within(
        &self,
        actor: &Principal,
        permissions: &[String],
    ) -> Result<(), CodedError> {
        let held = self.store.permissions_of_user(&actor.user_id).await?;
        let beyond: Vec<&str> = permissions
            .iter()
            .filter(|p| !held.contains(p))
            .map(String::as_str)
            .collect();
        if beyond.is_empty() {
            Ok(())
        } else {
            Err(CodedError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "this reaches permissions you do not hold: {}",
                    beyond.join(", ")
                ),
            ))
        }
    }

    pub async fn create_role(
        &self,
        actor: &Principal,
        name: &str,
        description: &str,
        permissions: &[String],
    ) -> Result<RoleRow, CodedError> {
        check_name(name)?;
        let role = RoleRow {
            name: name.to_string(),
            description: check_description(description)?,
            builtin: false,
            permissions: check_permissions(permissions)?,
        };
        self.check_within(actor, &role.permissions).await?;
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: "role.create",
            target: Some(name),
            details: serde_json::json!({ "permissions": role.permissions }).to_string(),
        };
        self.store.create_role(&role, &audit).await.map_err(|e| {
            if matches!(e, crate::db::DbError::Conflict) {
                CodedError::new(ErrorCode::AlreadyExists, format!("a role {name:?} exists"))
            } else {
                e.into()
            }
        })?;
        tracing::info!(role = name, "role created");
        Ok(role)
    }

    /// Replaces a role's description and permissions. A built-in role
    /// keeps its floor; the audit entry says what was added and removed.
    pub async fn update_role(
        &self,
        actor: &Principal,
        name: &str,
        description: &str,
        permissions: &[String],
    ) -> Result<RoleRow, CodedError> {
        let before = self
            .store
            .role(name)
            .await?
            .ok_or_else(|| CodedError::not_found(format!("no role {name:?}")))?;
        let role = RoleRow {
            description: check_description(description)?,
            permissions: check_permissions(permissions)?,
            ..before.clone()
        };
        if role.builtin && !self.is_admin(&actor.user_id).await? {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                "only an admin edits a built-in role",
            ));
        }
        // Every account holds `user`, and anyone may register: a
        // permission on it would be everyone's.
        if name == USER && !role.permissions.is_empty() {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "the user role, which every account holds, grants no permission",
            ));
        }
        if role.builtin {
            let missing: Vec<&str> = floor(name)
                .into_iter()
                .filter(|p| !role.permissions.iter().any(|q| q == p))
                .collect();
            if !missing.is_empty() {
                return Err(CodedError::new(
                    ErrorCode::FailedPrecondition,
                    format!("the built-in role {name:?} keeps {}", missing.join(", ")),
                ));
            }
        }
        if role == before {
            return Ok(role);
        }
        // What it held and what it will hold: both within the editor's.
        let reach: Vec<String> = before
            .permissions
            .iter()
            .chain(&role.permissions)
            .cloned()
            .collect();
        self.check_within(actor, &reach).await?;
        let was: BTreeSet<&String> = before.permissions.iter().collect();
        let now: BTreeSet<&String> = role.permissions.iter().collect();
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: "role.update",
            target: Some(name),
            details: serde_json::json!({
                "added": now.difference(&was).collect::<Vec<_>>(),
                "removed": was.difference(&now).collect::<Vec<_>>(),
                "description_changed": role.description != before.description,
            })
            .to_string(),
        };
        self.store.update_role(&role, &audit).await?;
        tracing::info!(role = name, "role updated");
        Ok(role)
    }

    /// Deletes a custom role and every grant of it.
    pub async fn delete_role(&self, actor: &Principal, name: &str) -> Result<(), CodedError> {
        let role = self
            .store
            .role(name)
            .await?
            .ok_or_else(|| CodedError::not_found(format!("no role {name:?}")))?;
        if role.builtin {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                format!("the built-in role {name:?} cannot be deleted"),
            ));
        }
        self.check_within(actor, &role.permissions).await?;
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: "role.delete",
            target: Some(name),
            details: serde_json::json!({ "permissions": role.permissions }).to_string(),
        };
        match self.store.delete_role(name, &audit).await? {
            Some(grants) => {
                tracing::info!(role = name, grants, "role deleted");
                Ok(())
            }
            // Deleted meanwhile.
            None => Err(CodedError::not_found(format!("no role {name:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_permissions_are_checked() {
        assert!(check_name("auditor").is_ok());
        assert!(check_name("read-only_2").is_ok());
        for bad in ["", "Admin", "1st", "a b", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_permissions(&p(&["users:read", "audit:read", "users:read"])).unwrap(),
            p(&["audit:read", "users:read"])
        );
        assert!(check_permissions(&p(&["users:*"])).is_err());
    }

    #[test]
    fn the_admin_floor_is_the_whole_catalogue() {
        assert_eq!(floor(ADMIN).len(), PERMISSIONS.len());
        assert!(floor("user").is_empty());
        let mut sorted: Vec<&str> = PERMISSIONS.iter().map(|(p, _)| *p).collect();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            PERMISSIONS.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            "the catalogue is sorted"
        );
    }
}
