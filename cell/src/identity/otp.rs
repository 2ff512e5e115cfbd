//! Sign-in by a one-time code: `POST /v1/auth/otp` sends a code to the
//! email address or phone number, `POST /v1/auth/otp/verify` trades it for
//! a session, as a login does. The code is 6 digits, stored hashed, lives
//! 5 minutes (`auth.otp.ttl`), is used once, takes at most 5 guesses, and only from the
//! client type that asked for it. Both calls spend the identifier's
//! password-reset budgets (codes issued per hour, wrong guesses per day),
//! and an unknown identifier spends them and gets the same answers as a
//! known one, so neither call tells whether an account exists.

use super::service::*;
use crate::clock::now_ms;
use homecell_common::hex::sha256;
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::identifier::{Identifier, Kind};
use std::net::IpAddr;

/// How long a sign-in code is good for, unless the config key `auth.otp.ttl`
/// says otherwise (within 10 s to 15 min).
pub const SIGN_IN_CODE_TTL_MS: i64 = 5 * 60 * 1000;
/// Guesses at one code.
pub const SIGN_IN_CODE_MAX_ATTEMPTS: i64 = 5;

/// Sign-in codes are for the apps. The back office signs in with a
/// password: a code alone would make an admin's mailbox the admin.
fn for_apps(client_type: &str) -> Result<(), CodedError> {
    if client_type == "cms" {
        return Err(CodedError::invalid(
            "the back office (x-client-type: cms) signs in with a password",
        ));
    }
    Ok(())
}

/// The identifier, if a code can be sent to it.
fn reachable(identifier: &str) -> Result<Identifier, CodedError> {
    let id = Identifier::parse(identifier).map_err(|m| CodedError::field("identifier", m))?;
    match id.kind {
        Kind::Email | Kind::Phone => Ok(id),
        _ => Err(CodedError::field(
            "identifier",
            "a code goes to an email address or a phone number",
        )),
    }
}

fn wrong_code() -> CodedError {
    CodedError::new(
        ErrorCode::InvalidCredentials,
        "the code is wrong or has expired",
    )
}

impl Identity {
    fn sign_in_code_ttl_ms(&self) -> i64 {
        self.config_ms("auth.otp.ttl", SIGN_IN_CODE_TTL_MS)
            .clamp(10_000, 15 * 60 * 1000)
    }

    /// Sends a sign-in code, for `client_type` only. Answers nothing either
    /// way.
    pub async fn request_sign_in_code(
        &self,
        identifier: &str,
        client_type: &str,
        ip: Option<IpAddr>,
    ) -> Result<(), CodedError> {
        self.check_ip(ip)?;
        for_apps(client_type)?;
        let id = reachable(identifier)?;
        let Some(user_id) = self.code_recipient(&id).await? else {
            return Ok(());
        };
        let now = now_ms();
        let code = six_digits();
        let code_id = uuid::Uuid::now_v7().to_string();
        let ttl = self.sign_in_code_ttl_ms();
        let payload = code_message(&user_id, &id, &code, now, ttl);
        let created = self
            .store
            .create_sign_in_code(
                &code_id,
                &user_id,
                client_type,
                &sha256(&format!("{code_id}:{code}")),
                now + ttl,
                &payload.to_string(),
                now,
            )
            .await;
        match created {
            // A request at the same moment made the one live code, and it
            // is on its way.
            Ok(()) | Err(crate::db::DbError::Conflict) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Trades a code for a session of `client_type`, one per client type
    /// as every sign-in.
    pub async fn verify_sign_in_code(
        &self,
        identifier: &str,
        code: &str,
        client_type: &str,
        ip: Option<IpAddr>,
    ) -> Result<TokenPair, CodedError> {
        let result = self.code_sign_in(identifier, code, client_type, ip).await;
        crate::metrics::count_login("code", &result);
        result
    }

    async fn code_sign_in(
        &self,
        identifier: &str,
        code: &str,
        client_type: &str,
        ip: Option<IpAddr>,
    ) -> Result<TokenPair, CodedError> {
        self.check_ip(ip)?;
        for_apps(client_type)?;
        let id = reachable(identifier)?;
        if code.len() > 32 {
            return Err(CodedError::field("code", "too long"));
        }
        let user = self
            .store
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?;
        let now = now_ms();
        // The day's budget of wrong guesses, then the code's own five, both
        // reserved before anything is compared.
        self.spend_guess(&reset_budget_key(&id, user.as_deref()), now)
            .await?;
        let Some(user_id) = user else {
            return Err(wrong_code());
        };
        self.use_code(&user_id, code, client_type, now).await?;
        match self.store.user(&user_id).await? {
            Some(u) if u.status == "active" => {}
            _ => {
                return Err(CodedError::new(
                    ErrorCode::AccountDisabled,
                    "this account is disabled",
                ));
            }
        }
        self.start_session(&user_id, client_type).await
    }

    /// Uses up `user_id`'s live code for `client_type` if `code` is it.
    /// The caller spent a guess of the account's budget first.
    async fn use_code(
        &self,
        user_id: &str,
        code: &str,
        client_type: &str,
        now: i64,
    ) -> Result<(), CodedError> {
        let Some((code_id, code_hash)) = self
            .store
            .reserve_sign_in_guess(user_id, client_type, SIGN_IN_CODE_MAX_ATTEMPTS, now)
            .await?
        else {
            return Err(wrong_code());
        };
        let given = sha256(&format!("{code_id}:{}", code.trim()));
        if !constant_time_eq(given.as_bytes(), code_hash.as_bytes()) {
            return Err(wrong_code());
        }
        if !self.store.use_sign_in_code(&code_id, user_id, now).await? {
            return Err(wrong_code());
        }
        Ok(())
    }

    /// A signed-in user's proof by a fresh code (asked with `POST
    /// /v1/auth/otp` from this client), for what needs more than a token:
    /// deleting the account without a password. Within the same budgets.
    pub(super) async fn prove_by_code(&self, p: &Principal, code: &str) -> Result<(), CodedError> {
        if code.len() > 32 {
            return Err(CodedError::field("code", "too long"));
        }
        let now = now_ms();
        self.spend_guess(&super::store::reset_budget_key_of_user(&p.user_id), now)
            .await?;
        self.use_code(&p.user_id, code, &p.client_type, now).await
    }
}
