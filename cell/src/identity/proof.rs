//! Identifiers proven before they are claimed. A registration by email or
//! phone (while the region asks for proof, `auth.register.proof`, on by
//! default) and a signed-in user's new email or phone both send a code to
//! the identifier; only when it comes back does the cell claim it in the
//! global directory. Nothing is claimed before: a stranger who registers
//! someone else's address holds nothing, and their pending registration
//! expires by itself (`auth.register.pending_ttl`, 15 minutes).
//!
//! The codes are 6 digits, hashed, single use, 5 guesses each, and spend
//! the identifier's one-time-code budgets (codes per hour, wrong guesses
//! per day) as password resets do: docs/SECURITY.md has the arithmetic.
//! A change swaps the claims at the control plane in one revision (the old
//! identifier is released in the revision that claims the new one);
//! removing an email or phone needs a sign-in in the last 10 minutes.

use super::service::*;
use super::store::{NewProof, reset_budget_key_of_user};
use crate::clock::now_ms;
use homecell_common::hex::sha256;
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::identifier::{Identifier, Kind};
use std::net::IpAddr;

/// How long a pending registration (and an identifier change's code)
/// waits for its code, unless `auth.register.pending_ttl` says otherwise
/// (within 10 s to 24 h).
pub const PENDING_TTL_MS: i64 = 15 * 60 * 1000;
/// Guesses at one proof's code.
pub const PROOF_MAX_ATTEMPTS: i64 = 5;
/// How fresh a session must be to add, change or remove an email or
/// phone, unless `auth.recent_sign_in` says otherwise (10 s to 1 h).
pub const RECENT_SIGN_IN_MS: i64 = 10 * 60 * 1000;

fn wrong_code() -> CodedError {
    CodedError::new(
        ErrorCode::InvalidCredentials,
        "the code is wrong or has expired",
    )
}

/// Ids and codes from clients are short; anything longer is refused
/// before it costs a query.
fn bounded(field: &str, value: &str) -> Result<(), CodedError> {
    if value.is_empty() || value.len() > 80 {
        return Err(CodedError::field(field, "1 to 80 characters"));
    }
    Ok(())
}

/// An identifier as the store holds it (already normalised).
fn stored(kind: &str, value: String) -> Result<Identifier, CodedError> {
    let kind = Kind::from_name(kind)
        .ok_or_else(|| CodedError::internal("a stored identifier of no known kind"))?;
    Ok(Identifier { kind, value })
}

impl Identity {
    /// Whether registering `id` waits for a code sent to it.
    pub(super) fn proof_required(&self, id: &Identifier) -> bool {
        matches!(id.kind, Kind::Email | Kind::Phone)
            && self.config_bool("auth.register.proof", true)
    }

    fn pending_ttl_ms(&self) -> i64 {
        self.config_ms("auth.register.pending_ttl", PENDING_TTL_MS)
            .clamp(10_000, 24 * 3600 * 1000)
    }

    /// Spends a code of the identifier's hourly budget, stores the proof
    /// and queues its code to the identifier. Returns the proof's id
    /// (`<region>~<uuid>`: the router takes its verification to this
    /// cell) and when it expires.
    pub(super) async fn send_proof(
        &self,
        purpose: &str,
        user_id: &str,
        id: &Identifier,
        password_hash: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<(String, i64), CodedError> {
        let now = now_ms();
        if let Err(wait_ms) = self
            .store
            .spend_reset_issue(&reset_budget_key(id, None), self.reset_limits(), now)
            .await?
        {
            return Err(reset_budget_spent(wait_ms));
        }
        let ttl = self.pending_ttl_ms();
        let code = six_digits();
        let proof_id = format!("{}~{}", self.region, uuid::Uuid::now_v7());
        let payload = code_message(user_id, id, &code, now, ttl);
        self.store
            .create_proof(
                &NewProof {
                    id: &proof_id,
                    purpose,
                    user_id,
                    kind: id.kind.as_str(),
                    value: &id.value,
                    password_hash,
                    display_name,
                    code_hash: &sha256(&format!("{proof_id}:{code}")),
                    expires_at: now + ttl,
                    now,
                },
                &payload.to_string(),
            )
            .await?;
        Ok((proof_id, now + ttl))
    }

    /// Takes one guess at a proof: the identifier's budget of wrong
    /// guesses, then the proof's own five, both spent before the code is
    /// compared; a right code uses the proof up (single use).
    async fn take_proof(
        &self,
        proof_id: &str,
        purpose: &str,
        user_id: Option<&str>,
        code: &str,
    ) -> Result<super::store::LiveProof, CodedError> {
        bounded("code", code)?;
        let now = now_ms();
        let Some((kind, value)) = self
            .store
            .proof_identifier(proof_id, purpose, PROOF_MAX_ATTEMPTS, now)
            .await?
        else {
            return Err(wrong_code());
        };
        let id = stored(&kind, value)?;
        // Every guess spends the identifier's budget, whoever asks: many
        // throwaway accounts changing to one address share it. A change's
        // guess spends its account's budget too.
        let key = reset_budget_key(&id, None);
        self.spend_guess(&key, now).await?;
        if let Some(u) = user_id {
            self.spend_guess(&reset_budget_key_of_user(u), now).await?;
        }
        let Some(proof) = self
            .store
            .reserve_proof_guess(proof_id, purpose, user_id, PROOF_MAX_ATTEMPTS, now)
            .await?
        else {
            return Err(wrong_code());
        };
        let given = sha256(&format!("{}:{}", proof.id, code.trim()));
        if !constant_time_eq(given.as_bytes(), proof.code_hash.as_bytes()) {
            return Err(wrong_code());
        }
        if !self.store.use_proof(&proof.id, &key, now).await? {
            return Err(wrong_code());
        }
        Ok(proof)
    }

    /// A proof is used up before its claim is made (two verifications of
    /// one code cannot both act), so when the claim fails for a while (the
    /// control plane unreachable: "retry shortly") the proof is given back
    /// for that retry. The retry is the same claim for the same user, so
    /// one that in fact committed is harmless.
    async fn give_back_if_retryable(
        &self,
        proof_id: &str,
        outcome: Result<(), CodedError>,
    ) -> Result<(), CodedError> {
        match outcome {
            Err(e) if e.code == ErrorCode::NotReady => {
                // A newer change proof may have replaced it meanwhile.
                if let Err(re) = self.store.restore_proof(proof_id).await {
                    tracing::warn!(error = %re, "cannot give a proof back for a retry");
                }
                Err(e)
            }
            other => other,
        }
    }

    /// Finishes a pending registration with its code: the identifier is
    /// claimed and the user created as `register` would have. Returns the
    /// user's id.
    pub async fn verify_registration(
        &self,
        registration_id: &str,
        code: &str,
        ip: Option<IpAddr>,
    ) -> Result<String, CodedError> {
        self.check_ip(ip)?;
        bounded("registration_id", registration_id)?;
        let proof = self
            .take_proof(registration_id, "register", None, code)
            .await?;
        let id = stored(&proof.kind, proof.value.clone())?;
        let hash = proof
            .password_hash
            .as_deref()
            .ok_or_else(|| CodedError::internal("a registration proof without a password"))?;
        let created = self
            .create_registered(&id, &proof.user_id, hash, proof.display_name.as_deref())
            .await;
        self.give_back_if_retryable(&proof.id, created).await?;
        Ok(proof.user_id)
    }

    // ------------------------------------------------------------ changes

    /// A session begun in the last 10 minutes: a token alone (a stolen
    /// one) does not repoint or strip the account's ways to sign in.
    async fn require_recent_sign_in(&self, p: &Principal) -> Result<(), CodedError> {
        let now = now_ms();
        let recent = self
            .config_ms("auth.recent_sign_in", RECENT_SIGN_IN_MS)
            .clamp(10_000, 3600 * 1000);
        let fresh = self
            .store
            .sessions_of(&p.user_id, now)
            .await?
            .iter()
            .any(|s| s.id == p.sid && s.created_at > now - recent);
        if fresh {
            return Ok(());
        }
        Err(CodedError::new(
            ErrorCode::RecentSignInRequired,
            "sign in again to change your email or phone (a sign-in in the last 10 minutes, by default)",
        ))
    }

    /// Sends a code to a new email or phone for the signed-in user: the
    /// one of its kind they have (if any) is replaced once it comes back.
    pub async fn request_identifier_change(
        &self,
        p: &Principal,
        identifier: &str,
    ) -> Result<(String, i64), CodedError> {
        self.require_recent_sign_in(p).await?;
        let id = Identifier::parse(identifier).map_err(|m| CodedError::field("identifier", m))?;
        if !matches!(id.kind, Kind::Email | Kind::Phone) {
            return Err(CodedError::field(
                "identifier",
                "an email address or a phone number",
            ));
        }
        // The account's own budget of codes first: one account cannot send
        // codes to numbers without end.
        if let Err(wait_ms) = self
            .store
            .spend_reset_issue(
                &reset_budget_key_of_user(&p.user_id),
                self.reset_limits(),
                now_ms(),
            )
            .await?
        {
            return Err(reset_budget_spent(wait_ms));
        }
        // Whether another account holds it is learnt only after the code
        // proves the caller owns it (the claim is refused then): asking
        // tells nothing about other accounts.
        if self
            .store
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?
            .as_deref()
            == Some(p.user_id.as_str())
        {
            return Err(CodedError::new(
                ErrorCode::AlreadyExists,
                "this identifier is already yours",
            ));
        }
        self.send_proof("change", &p.user_id, &id, None, None).await
    }

    /// Finishes a change with its code: the control plane claims the new
    /// identifier and releases the replaced one in one revision, then the
    /// user's row follows. Returns the new identifier (qualified).
    pub async fn verify_identifier_change(
        &self,
        p: &Principal,
        verification_id: &str,
        code: &str,
    ) -> Result<String, CodedError> {
        bounded("verification_id", verification_id)?;
        let proof = self
            .take_proof(verification_id, "change", Some(&p.user_id), code)
            .await?;
        let id = stored(&proof.kind, proof.value)?;
        let old = self
            .store
            .identifier_of_kind(&p.user_id, id.kind.as_str())
            .await?;
        let replaces = old.as_ref().map(|v| format!("{}:{v}", id.kind.as_str()));
        let swapped = self
            .claim_replacing(&id.qualified(), replaces.as_deref(), &p.user_id)
            .await
            .map_err(|(e, _)| e);
        self.give_back_if_retryable(&proof.id, swapped).await?;
        crate::failpoint::hit("identity.change.after_swap");
        match self
            .store
            .change_identifier(
                &p.user_id,
                id.kind.as_str(),
                old.as_deref(),
                &id.value,
                now_ms(),
            )
            .await
        {
            Ok(()) => {}
            // The reconciliation took it over: it swaps back or finishes.
            Err(crate::db::DbError::Conflict) => return Err(unavailable().retry_after(1)),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(user_id = %p.user_id, kind = id.kind.as_str(), "identifier changed");
        Ok(id.qualified())
    }

    /// Removes the user's email or phone: needs a sign-in in the last 10
    /// minutes, and leaves at least one way to sign in.
    pub async fn remove_identifier(&self, p: &Principal, kind: &str) -> Result<(), CodedError> {
        let kind = match Kind::from_name(kind) {
            Some(k @ (Kind::Email | Kind::Phone)) => k,
            _ => return Err(CodedError::field("kind", "email or phone")),
        };
        self.require_recent_sign_in(p).await?;
        let now = now_ms();
        let Some(value) = self
            .store
            .identifier_of_kind(&p.user_id, kind.as_str())
            .await?
        else {
            return Err(CodedError::not_found(format!(
                "no {} on this account",
                kind.as_str()
            )));
        };
        match self
            .store
            .remove_identifier(&p.user_id, kind.as_str(), &value, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(CodedError::not_found("removed meanwhile")),
            Err(crate::db::DbError::Conflict) => {
                return Err(CodedError::new(
                    ErrorCode::FailedPrecondition,
                    "this is the account's only way to sign in: add another first",
                ));
            }
            Err(e) => return Err(e.into()),
        }
        let qualified = format!("{}:{value}", kind.as_str());
        if let Err(e) = self.release(&qualified, &p.user_id).await {
            // Recorded with the removal: the reconciliation releases it.
            tracing::warn!(error = %e.message(), "cannot release a removed identifier yet");
        }
        Ok(())
    }
}
