//! Registration: the account, its first identifier and its claim in the
//! global directory (the control plane), and the claims' release when a
//! registration cannot finish.

use super::password::{self};
use super::service::*;
use super::store::NewUser;
use crate::clock::now_ms;
use homecell_proto::control::{
    ClaimIdentifierRequest, ReleaseIdentifierRequest,
    directory_service_client::DirectoryServiceClient,
};
use homecell_proto::error::{CodedError, ErrorCode, FieldError};
use homecell_proto::identifier::Identifier;

/// What a registration did.
pub enum Registration {
    /// The user exists.
    Created(String),
    /// A code went to the identifier; `verify_registration` creates the
    /// user. Nothing is claimed until then.
    Pending {
        registration_id: String,
        expires_at: i64,
    },
}

impl Identity {
    // ------------------------------------------------------------ registration

    /// Registers a user, or, for an email or phone while the region asks
    /// for proof (`auth.register.proof`, on by default), sends a code to it
    /// and creates the user only when the code comes back
    /// (`verify_registration`, proof.rs).
    pub async fn register(
        &self,
        identifier: &str,
        password: &str,
        display_name: Option<&str>,
    ) -> Result<Registration, CodedError> {
        let mut errors = Vec::new();
        let id = Identifier::parse(identifier);
        if let Err(m) = &id {
            errors.push(FieldError {
                field: "identifier".into(),
                message: (*m).into(),
            });
        }
        if let Err(m) = password::check_policy(password) {
            errors.push(FieldError {
                field: "password".into(),
                message: m.into(),
            });
        }
        let display_name = display_name.map(str::trim).filter(|s| !s.is_empty());
        if let Some(n) = display_name
            && (n.chars().count() > 64 || n.chars().any(char::is_control))
        {
            errors.push(FieldError {
                field: "display_name".into(),
                message: "at most 64 printable characters".into(),
            });
        }
        let id = match id {
            Ok(id) if errors.is_empty() => id,
            _ => return Err(CodedError::fields(errors)),
        };
        if id.value == password.trim().to_lowercase() {
            return Err(CodedError::field(
                "password",
                "the password must differ from the identifier",
            ));
        }
        if self
            .store
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?
            .is_some()
        {
            return Err(CodedError::new(
                ErrorCode::AlreadyExists,
                "this identifier is already registered",
            ));
        }
        // Not a hash spent on a registration the control plane cannot take.
        if let Some(secs) = self.cp_breaker.refusing() {
            return Err(unavailable().retry_after(secs));
        }
        let hash = self.hasher.hash_registration(password.to_string()).await?;
        // Time-ordered and random: unique across cells without coordination.
        let user_id = uuid::Uuid::now_v7().to_string();
        if self.proof_required(&id) {
            let (registration_id, expires_at) = self
                .send_proof("register", &user_id, &id, Some(&hash), display_name)
                .await?;
            return Ok(Registration::Pending {
                registration_id,
                expires_at,
            });
        }
        self.create_registered(&id, &user_id, &hash, display_name)
            .await?;
        Ok(Registration::Created(user_id))
    }

    /// Claims the identifier for a new user, then creates the user; gives
    /// the claim back if the user cannot be created.
    pub(super) async fn create_registered(
        &self,
        id: &Identifier,
        user_id: &str,
        hash: &str,
        display_name: Option<&str>,
    ) -> Result<(), CodedError> {
        let user_id = user_id.to_string();
        self.claim(&id.qualified(), &user_id).await?;
        crate::failpoint::hit("identity.register.after_claim");
        let default_name = match id.kind {
            homecell_proto::identifier::Kind::Username => id.value.clone(),
            _ => format!("user-{}", &user_id[user_id.len() - 6..]),
        };
        let created = self
            .store
            .create_user(&NewUser {
                id: &user_id,
                display_name: display_name.unwrap_or(&default_name),
                kind: id.kind.as_str(),
                value: &id.value,
                password_hash: hash,
                now: now_ms(),
            })
            .await;
        if let Err(e) = created {
            // Give the claim back: the user does not exist after all.
            if let Err(re) = self.release(&id.qualified(), &user_id).await {
                tracing::warn!(error = %re, "cannot release a claim after a failed registration");
            }
            return Err(e.into());
        }
        tracing::info!(user_id, kind = id.kind.as_str(), "user registered");
        Ok(())
    }

    pub(crate) async fn claim(&self, qualified: &str, user_id: &str) -> Result<(), CodedError> {
        self.claim_or_holder(qualified, user_id)
            .await
            .map_err(|(e, _)| e)
    }

    /// `claim`, and on `AlreadyExists` the region of the user who holds the
    /// identifier, when the control plane told it. Only for a caller who
    /// proved the identifier is theirs: for anyone else it would say where
    /// an account lives.
    pub(crate) async fn claim_or_holder(
        &self,
        qualified: &str,
        user_id: &str,
    ) -> Result<(), (CodedError, Option<String>)> {
        self.claim_replacing(qualified, None, user_id).await
    }

    /// `claim_or_holder`, and with `replaces` (the user's identifier of
    /// the same kind) its release in the same revision (an identifier
    /// changed). The record names what it replaces: if the change is left
    /// unsettled, the reconciliation swaps it back (claims.rs).
    pub(crate) async fn claim_replacing(
        &self,
        qualified: &str,
        replaces: Option<&str>,
        user_id: &str,
    ) -> Result<(), (CodedError, Option<String>)> {
        if let super::breaker::Permit::Refuse(secs) = self.cp_breaker.permit() {
            return Err((unavailable().retry_after(secs), None));
        }
        // Recorded first: if this claim is never settled (a crash, a
        // timeout that in fact committed), the reconciliation releases it.
        let now = now_ms();
        self.store
            .record_claim(qualified, user_id, replaces, now)
            .await
            .map_err(|e| (CodedError::from(e), None))?;
        let wait = super::claims::CLAIM_WAIT;
        let not_after_unix_ms =
            u64::try_from(now).unwrap_or(0) + u64::try_from(wait.as_millis()).unwrap_or(0);
        let req = ClaimIdentifierRequest {
            identifier: qualified.to_string(),
            user_id: user_id.to_string(),
            region: self.region.clone(),
            not_after_unix_ms,
            replaces: replaces.unwrap_or_default().to_string(),
        };
        let mut client = DirectoryServiceClient::new(self.cp.clone());
        let answer = tokio::time::timeout(wait, client.claim_identifier(req)).await;
        match &answer {
            // Not reached: the call timed out, or never got an answer from
            // any instance.
            Err(_) => self.cp_breaker.missed(),
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => self.cp_breaker.missed(),
            Ok(_) => self.cp_breaker.reached(),
        }
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => {
                // Someone else's claim: nothing of ours to release.
                if let Err(e) = self.store.forget_claim(qualified, user_id).await {
                    tracing::warn!(error = %e, "cannot forget a refused claim");
                }
                let holder = s
                    .metadata()
                    .get(homecell_proto::error::HOME_REGION_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Err((
                    CodedError::new(
                        ErrorCode::AlreadyExists,
                        "this identifier is already registered",
                    ),
                    holder,
                ))
            }
            Ok(Err(s))
                if s.code() == tonic::Code::FailedPrecondition
                    && u64::try_from(now_ms()).unwrap_or(0) < not_after_unix_ms =>
            {
                // Refused as late while this cell's clock says it is not:
                // the control plane's clock is ahead. Every registration
                // fails so until the clocks agree again.
                tracing::error!(
                    error = %s.message(),
                    "the control plane refused a claim as past its deadline before this cell's clock reached it: the clocks disagree (NTP?)"
                );
                Err((unavailable().retry_after(1), None))
            }
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), "identifier claim failed");
                Err((unavailable().retry_after(1), None))
            }
            Err(_) => Err((unavailable().retry_after(1), None)),
        }
    }

    pub(crate) async fn release(
        &self,
        qualified: &str,
        user_id: &str,
    ) -> Result<(), tonic::Status> {
        let req = ReleaseIdentifierRequest {
            identifier: qualified.to_string(),
            user_id: user_id.to_string(),
            region: self.region.clone(),
        };
        DirectoryServiceClient::new(self.cp.clone())
            .release_identifier(req)
            .await?;
        if let Err(e) = self.store.forget_claim(qualified, user_id).await {
            // The record stays; the reconciliation releases again (a no-op).
            tracing::warn!(error = %e, "cannot forget a released claim");
        }
        Ok(())
    }
}
