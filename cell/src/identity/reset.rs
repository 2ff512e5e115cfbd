//! Passwords: changing one, and resetting a forgotten one with a one-time
//! code (budgeted per identifier and per account).

use super::password::{self};
use super::service::*;
use crate::clock::now_ms;
use homecell_common::hex::sha256;
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::identifier::Identifier;
use std::net::IpAddr;

impl Identity {
    // ------------------------------------------------------------ one-time codes

    /// Who a new one-time code for `id` (a reset, a sign-in) goes to, once
    /// the identifier's budget of codes allows one: the active account
    /// holding it, or None for an unknown or inactive one, which spends
    /// the budget and is answered alike.
    pub(super) async fn code_recipient(
        &self,
        id: &Identifier,
    ) -> Result<Option<String>, CodedError> {
        let user = self
            .store
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?;
        let key = reset_budget_key(id, user.as_deref());
        if let Err(wait_ms) = self
            .store
            .spend_reset_issue(&key, self.reset_limits(), now_ms())
            .await?
        {
            return Err(reset_budget_spent(wait_ms));
        }
        let Some(user_id) = user else {
            return Ok(None);
        };
        // A user being moved away gets no code from here (it would not
        // move with them): nothing is made, and the answer is the usual
        // one at once, so neither its content nor its timing tells anyone
        // the account exists or is moving. The user asks again, of the
        // new home.
        let moving_away = self.frozen.contains(&user_id)
            || self
                .replica
                .state()
                .user_region(&user_id)
                .is_some_and(|home| home != self.region);
        if moving_away {
            return Ok(None);
        }
        Ok(match self.store.user(&user_id).await? {
            Some(u) if u.status == "active" => Some(user_id),
            _ => None,
        })
    }

    /// Spends one guess of the day's budget under `key`, before any code
    /// is compared.
    pub(super) async fn spend_guess(&self, key: &str, now: i64) -> Result<(), CodedError> {
        match self
            .store
            .spend_reset_guess(key, self.reset_limits(), now)
            .await?
        {
            Ok(()) => Ok(()),
            Err(wait_ms) => Err(reset_budget_spent(wait_ms)),
        }
    }

    // ------------------------------------------------------------ passwords

    pub async fn change_password(
        &self,
        p: &Principal,
        old: &str,
        new: &str,
    ) -> Result<(), CodedError> {
        password::check_policy(new).map_err(|m| CodedError::field("new_password", m))?;
        if self.check_password(&p.user_id, old).await?.is_none() {
            return Err(CodedError::new(
                ErrorCode::InvalidCredentials,
                "the current password is wrong",
            ));
        }
        let now = now_ms();
        let hash = self.hasher.hash(new.to_string()).await?;
        self.store
            .set_password(&p.user_id, &hash, true, Some(&p.sid), now)
            .await?;
        Ok(())
    }

    /// Starts a reset. Answers nothing either way, so callers cannot probe
    /// which identifiers exist.
    pub async fn request_reset(
        &self,
        identifier: &str,
        ip: Option<IpAddr>,
    ) -> Result<(), CodedError> {
        self.check_ip(ip)?;
        let id = Identifier::parse(identifier).map_err(|m| CodedError::field("identifier", m))?;
        let Some(user_id) = self.code_recipient(&id).await? else {
            return Ok(());
        };
        let now = now_ms();
        let code = six_digits();
        let reset_id = uuid::Uuid::now_v7().to_string();
        let payload = serde_json::json!({
            "user_id": user_id,
            "channel": id.kind.as_str(),
            "to": id.value,
            "code": code,
            "expires_at": now + RESET_TTL_MS,
        });
        self.store
            .create_reset(
                &reset_id,
                &user_id,
                &sha256(&format!("{reset_id}:{code}")),
                now + RESET_TTL_MS,
                &payload.to_string(),
                now,
            )
            .await?;
        Ok(())
    }

    pub async fn confirm_reset(
        &self,
        identifier: &str,
        code: &str,
        new_password: &str,
        ip: Option<IpAddr>,
    ) -> Result<(), CodedError> {
        password::check_policy(new_password).map_err(|m| CodedError::field("new_password", m))?;
        let bad = || {
            CodedError::new(
                ErrorCode::InvalidArgument,
                "the code is wrong or has expired",
            )
        };
        let id = Identifier::parse(identifier).map_err(|m| CodedError::field("identifier", m))?;
        self.check_ip(ip)?;
        let user = self
            .store
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?;
        let now = now_ms();
        // The account's daily budget first, then the code's own five
        // guesses, both reserved before anything is compared: a concurrent
        // storm cannot exceed either (docs/SECURITY.md has the arithmetic).
        self.spend_guess(&reset_budget_key(&id, user.as_deref()), now)
            .await?;
        let Some(user_id) = user else {
            return Err(bad());
        };
        // A new password set here after a move copied the account would
        // be left behind: wait for the move, or refuse as retryable.
        self.frozen.wait(&user_id).await?;
        let Some((reset_id, code_hash)) = self
            .store
            .reserve_reset_guess(&user_id, RESET_MAX_ATTEMPTS, now)
            .await?
        else {
            return Err(bad());
        };
        let given = sha256(&format!("{reset_id}:{}", code.trim()));
        if !constant_time_eq(given.as_bytes(), code_hash.as_bytes()) {
            return Err(bad());
        }
        let hash = self.hasher.hash(new_password.to_string()).await?;
        if !self
            .store
            .complete_reset(&reset_id, &user_id, &hash, now)
            .await?
        {
            return Err(bad());
        }
        Ok(())
    }
}
