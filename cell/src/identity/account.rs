//! A user's account: profiles, deletion, addresses, and the roles and
//! status the back office sets.

use super::service::*;
use super::store::{Address, User, UserProfile};
use crate::clock::now_ms;
use crate::db::audit::AuditEntry;
use homecell_proto::error::{CodedError, ErrorCode};

/// What a user gives to prove, beyond its token, that the account is
/// theirs.
pub enum Proof<'a> {
    Password(&'a str),
    /// A sign-in code sent to one of its identifiers for this client.
    Code(&'a str),
    /// A fresh `wx.login()` code of the bound WeChat account.
    Wechat(&'a str),
}

impl Identity {
    // ------------------------------------------------------------ users

    /// A live user's profile: the user, roles and identifiers.
    pub async fn profile(&self, id: &str) -> Result<UserProfile, CodedError> {
        match self.store.profile(id).await? {
            Some(p) if p.user.status != "deleted" => Ok(p),
            _ => Err(CodedError::not_found("no such user")),
        }
    }

    pub async fn user(&self, id: &str) -> Result<User, CodedError> {
        match self.store.user(id).await? {
            Some(u) if u.status != "deleted" => Ok(u),
            _ => Err(CodedError::not_found("no such user")),
        }
    }

    /// Anonymises the caller's account once it proves, beyond its token,
    /// that it is the owner: by its password, a fresh sign-in code, or (a
    /// WeChat-only user has neither) a fresh WeChat login code for the
    /// bound openid.
    pub async fn delete_account(
        &self,
        p: &Principal,
        proof: Proof<'_>,
        wechat: Option<&super::wechat::Wechat>,
    ) -> Result<(), CodedError> {
        match proof {
            Proof::Password(password) => {
                if self.check_password(&p.user_id, password).await?.is_none() {
                    return Err(CodedError::new(
                        ErrorCode::InvalidCredentials,
                        "the password is wrong",
                    ));
                }
            }
            Proof::Code(code) => self.prove_by_code(p, code).await?,
            Proof::Wechat(code) => self.prove_by_wechat(wechat, p, code).await?,
        }
        self.erase(&p.user_id, None).await
    }

    /// An admin's deletion of an account (a request that reached support,
    /// a user who cannot sign in): the same anonymisation as the user's
    /// own, with its audit entry in the same transaction. Nobody deletes
    /// themselves here, nor an admin (revoke the role first: that keeps
    /// the last one, where two admins deleting each other at once would
    /// not), nor anyone holding a permission the deleter lacks.
    pub async fn delete_user(&self, actor: &Principal, user_id: &str) -> Result<(), CodedError> {
        self.user(user_id).await?;
        if user_id == actor.user_id {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "delete your own account with DELETE /v1/users/me",
            ));
        }
        if self.is_admin(user_id).await? {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "an admin is not deleted: revoke the admin role first",
            ));
        }
        let held = self.store.permissions_of_user(user_id).await?;
        self.check_within(actor, &held).await?;
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: "user.delete",
            target: Some(user_id),
            details: "{}".into(),
        };
        self.erase(user_id, Some(&audit)).await
    }

    /// Anonymises an account and gives back its directory claims.
    async fn erase(&self, user_id: &str, audit: Option<&AuditEntry<'_>>) -> Result<(), CodedError> {
        let placeholder = format!("deleted-{}", &random_token(9));
        let identifiers = self
            .store
            .anonymise_user(user_id, &placeholder, now_ms(), audit, true)
            .await?;
        for (kind, value) in identifiers {
            let qualified = format!("{kind}:{value}");
            if let Err(e) = self.release(&qualified, user_id).await {
                // The account is gone either way; the reconciliation
                // releases the recorded claim again. Never log the
                // identifier itself.
                tracing::error!(user_id, error = %e.message(), "cannot release a claim of a deleted account");
            }
        }
        tracing::info!(user_id, "account deleted and anonymised");
        Ok(())
    }

    pub async fn add_address(&self, p: &Principal, a: Address) -> Result<Address, CodedError> {
        if self
            .store
            .add_address(&p.user_id, &a, MAX_ADDRESSES)
            .await?
        {
            Ok(self
                .store
                .addresses(&p.user_id)
                .await?
                .into_iter()
                .find(|x| x.id == a.id)
                .unwrap_or(a))
        } else {
            Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                format!("at most {MAX_ADDRESSES} addresses per user"),
            ))
        }
    }

    // ------------------------------------------------------------ roles

    pub async fn set_role(
        &self,
        actor: &Principal,
        user_id: &str,
        role: &str,
        grant: bool,
    ) -> Result<bool, CodedError> {
        self.user(user_id).await?;
        let Some(row) = self.store.role(role).await? else {
            return Err(CodedError::not_found(format!("no role {role:?}")));
        };
        // Granting or revoking a role reaches its permissions.
        self.check_within(actor, &row.permissions).await?;
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: if grant { "role.grant" } else { "role.revoke" },
            target: Some(user_id),
            details: serde_json::json!({ "role": role }).to_string(),
        };
        let changed = self.store.set_role(user_id, role, grant, &audit).await?;
        if !changed
            && !grant
            && role == ADMIN
            && self
                .store
                .roles_of(user_id)
                .await?
                .iter()
                .any(|r| r == ADMIN)
        {
            return Err(CodedError::new(
                ErrorCode::FailedPrecondition,
                "the cell's last admin cannot give up the admin role",
            ));
        }
        Ok(changed)
    }

    /// Disables or enables an account, with its audit entry in the same
    /// transaction (none when nothing changed). Only an admin may change an
    /// admin's status: `users:disable` alone (support) must not be able to
    /// lock the cell's admins out.
    pub async fn set_status(
        &self,
        actor: &Principal,
        user_id: &str,
        enable: bool,
    ) -> Result<(), CodedError> {
        self.user(user_id).await?;
        if self.is_admin(user_id).await? && !self.is_admin(&actor.user_id).await? {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                "only an admin may disable or enable an admin",
            ));
        }
        // Nor anyone holding a permission the actor lacks (a custom role's
        // holder, by support).
        let held = self.store.permissions_of_user(user_id).await?;
        self.check_within(actor, &held).await?;
        let status = if enable { "active" } else { "disabled" };
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: if enable {
                "user.enable"
            } else {
                "user.disable"
            },
            target: Some(user_id),
            details: "{}".into(),
        };
        self.store.set_status(user_id, status, &audit).await?;
        Ok(())
    }
}
