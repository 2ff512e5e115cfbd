//! Login and tokens: password checks with lockout, sessions, access and
//! refresh tokens, refresh rotation, and confirming a token on a request
//! (its session alive, here or at its home cell).

use super::keys::Verifier;
use super::password::{self, HashError};
use super::service::*;
use super::store::{RefreshOutcome, Rotation, Session, UserProfile};
use crate::clock::now_ms;
use crate::db::DbError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use homecell_common::hex::sha256;
use homecell_common::jwt::{Claims, TokenError};
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::identifier::Identifier;
use std::net::IpAddr;
use std::sync::Arc;

impl Identity {
    // ------------------------------------------------------------ login and tokens

    pub async fn login(
        &self,
        identifier: &str,
        password: &str,
        client_type: &str,
        ip: Option<IpAddr>,
    ) -> Result<TokenPair, CodedError> {
        let result = self
            .password_login(identifier, password, client_type, ip)
            .await;
        crate::metrics::count_login("password", &result);
        result
    }

    async fn password_login(
        &self,
        identifier: &str,
        password: &str,
        client_type: &str,
        ip: Option<IpAddr>,
    ) -> Result<TokenPair, CodedError> {
        self.check_ip(ip)?;
        if password.len() > 1024 {
            return Err(CodedError::field("password", "too long"));
        }
        let id = Identifier::parse(identifier).map_err(|m| CodedError::field("identifier", m))?;
        let Some(user_id) = self
            .store
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?
        else {
            // The same work, and the same answer when argon2 is busy, as
            // for an account that exists.
            self.hasher.verify_dummy(password.to_string()).await?;
            return Err(invalid_credentials());
        };
        let Some(verified) = self.check_password(&user_id, password).await? else {
            return Err(invalid_credentials());
        };
        let now = now_ms();
        let user = self
            .store
            .user(&user_id)
            .await?
            .ok_or_else(invalid_credentials)?;
        if user.status != "active" {
            self.store.clear_attempts(&user_id).await?;
            return Err(CodedError::new(
                ErrorCode::AccountDisabled,
                "this account is disabled",
            ));
        }
        // Best effort: argon2 busy now only postpones it to the next login.
        if verified.needs_rehash
            && let Ok(hash) = self.hasher.hash(password.to_string()).await
        {
            self.store
                .set_password(&user_id, &hash, false, None, now)
                .await?;
        }
        self.start_session(&user_id, client_type).await
    }

    /// Checks an account's password under its failed-attempt accounting
    /// (login, password change, account deletion): the attempt is reserved
    /// before argon2 runs and settled on every path (`reserve_attempt`).
    /// None for a wrong password or a locked account, which look alike
    /// after the same work; a success leaves clearing the counter to the
    /// caller's own write (a new session, a new password, a deletion).
    pub(super) async fn check_password(
        &self,
        user_id: &str,
        password: &str,
    ) -> Result<Option<password::Verified>, CodedError> {
        let (max, lock_ms) = self.lockout();
        let now = now_ms();
        let Some(attempt) = self
            .store
            .reserve_attempt(user_id, max, now + lock_ms, now)
            .await?
        else {
            self.hasher.verify_dummy(password.to_string()).await?;
            return Ok(None);
        };
        let stored = self.store.password_hash(user_id).await?.unwrap_or_default();
        match self.hasher.verify(password.to_string(), stored).await {
            Ok(v) if v.ok => {
                if attempt >= max {
                    // This attempt locked the account before the check;
                    // lift it now, not at the caller's later write, which
                    // may never come (argon2 busy for a new hash).
                    self.store.clear_attempts(user_id).await?;
                }
                Ok(Some(v))
            }
            Ok(_) => {
                if attempt >= max {
                    crate::metrics::LOCKOUTS.inc();
                    tracing::warn!(user_id, "account locked after repeated failures");
                }
                Ok(None)
            }
            Err(HashError::Busy) => {
                // Nothing was checked: the attempt is not a failure.
                self.store.refund_attempt(user_id, max).await?;
                Err(HashError::Busy.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a session of `client_type` for a user who just proved who they
    /// are (ending the previous one of that type) and issues its tokens.
    pub(crate) async fn start_session(
        &self,
        user_id: &str,
        client_type: &str,
    ) -> Result<TokenPair, CodedError> {
        // A sign-in during a move waits for it: a session opened here once
        // the user was copied would be left behind. If the user moved, the
        // router replays the sign-in at the new home.
        if self.frozen.contains(user_id) {
            self.frozen.wait(user_id).await?;
            if let Some(home) = self
                .replica
                .state()
                .user_region(user_id)
                .filter(|h| *h != self.region)
            {
                return Err(CodedError::moved(home));
            }
        }
        let now = now_ms();
        let session = Session {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: user_id.to_string(),
            client_type: client_type.to_string(),
            created_at: now,
            last_used_at: now,
            expires_at: now + SESSION_TTL_MS,
            revoked_at: None,
        };
        let refresh = self.new_refresh_token();
        // Two logins of one client type racing on PostgreSQL: the unique
        // index lets one in; the other retries and replaces it.
        let replaced = match self.store.open_session(&session, &sha256(&refresh)).await {
            Err(DbError::Conflict) => self.store.open_session(&session, &sha256(&refresh)).await?,
            other => other?,
        };
        if let Some(old) = replaced {
            tracing::info!(
                user_id,
                client_type,
                ended = old,
                "a new login ended the session of the same client type"
            );
        }
        self.token_pair(&session, refresh).await
    }

    /// `<region>~<256 random bits>`: the prefix lets a router send a refresh
    /// to the home cell without any lookup; only the hash is stored.
    pub(super) fn new_refresh_token(&self) -> String {
        format!("{}~{}", self.region, random_token(32))
    }

    /// The refresh token that follows `token`: derived from it and a salt
    /// the datastore keeps with its hash, so a retry of a rotation whose
    /// answer was lost gets the same successor again, and neither a copy
    /// of the datastore (no token) nor a stolen token (no salt) can derive
    /// it.
    pub(super) fn successor(&self, token: &str, salt: &str) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in ["homecell refresh successor", salt, token] {
            ctx.update(part.as_bytes());
            ctx.update(&[0]);
        }
        format!("{}~{}", self.region, B64.encode(ctx.finish()))
    }

    pub(super) async fn token_pair(
        &self,
        session: &Session,
        refresh: String,
    ) -> Result<TokenPair, CodedError> {
        let roles = self.store.roles_of(&session.user_id).await?;
        let now = now_ms() / 1000;
        let ttl = self.access_ttl_secs();
        let signer = self.keys.signer();
        let claims = Claims {
            sub: session.user_id.clone(),
            home: self.region.clone(),
            sid: session.id.clone(),
            ct: session.client_type.clone(),
            roles,
            iss: self.keys.issuer(),
            iat: now,
            exp: now + ttl,
        };
        Ok(TokenPair {
            access_token: signer.sign(&claims).map_err(|e| {
                tracing::error!(error = %e, "cannot sign an access token");
                CodedError::internal("cannot issue a token")
            })?,
            refresh_token: refresh,
            token_type: "Bearer",
            expires_in: ttl,
            user_id: session.user_id.clone(),
            home_region: self.region.clone(),
        })
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, CodedError> {
        if refresh_token.is_empty() || refresh_token.len() > 256 {
            return Err(CodedError::field("refresh_token", "malformed"));
        }
        let salt = random_token(16);
        let next = self.successor(refresh_token, &salt);
        let outcome = self
            .store
            .rotate_refresh(&Rotation {
                old_hash: &sha256(refresh_token),
                new_hash: &sha256(&next),
                salt: &salt,
                now: now_ms(),
                grace_ms: REFRESH_GRACE_MS,
            })
            .await?;
        match outcome {
            // The rotation checked the session is live; disabling or
            // deleting an account revokes its sessions in the same
            // transaction, so no separate user check is needed.
            RefreshOutcome::Rotated(session) => self.token_pair(&session, next).await,
            RefreshOutcome::Repeated(session, salt) => {
                let again = self.successor(refresh_token, &salt);
                self.token_pair(&session, again).await
            }
            RefreshOutcome::Reused => {
                crate::metrics::REFRESH_REUSE.inc();
                tracing::warn!("refresh token reuse: its session was revoked");
                Err(CodedError::new(
                    ErrorCode::Unauthenticated,
                    "refresh token already used; the session has been ended",
                ))
            }
            RefreshOutcome::Invalid => Err(CodedError::new(
                ErrorCode::Unauthenticated,
                "invalid refresh token",
            )),
        }
    }

    /// The checks of an access token that need no datastore: signature,
    /// issuer and expiry, and that its user has not moved away. `confirm`
    /// then checks its session.
    pub fn verify(&self, bearer: &str) -> Result<Verified, CodedError> {
        let state = self.replica.state();
        let verifier = Verifier {
            keys: &self.keys,
            replica: &state,
        };
        let claims = self
            .tokens
            .verify(bearer, &verifier, now_ms() / 1000)
            .map_err(|e| {
                let why = match e {
                    TokenError::Expired => "the access token has expired",
                    _ => "invalid access token",
                };
                CodedError::new(ErrorCode::Unauthenticated, why)
            })?;
        // A token that names us as home, for a user the directory homes
        // elsewhere: the user moved. The router follows this answer once.
        if claims.home == self.region
            && let Some(home) = state.user_region(&claims.sub)
            && home != self.region
        {
            return Err(CodedError::moved(home));
        }
        // Another region's token for a user the directory homes anywhere
        // but there: its issuer does not speak for that user. A cell's key
        // (stolen, or a rogue cell's) signs for its own region's users
        // only, and no one else's session can vouch for them; a user who
        // moved here from that region has a new session here.
        if claims.home != self.region
            && let Some(home) = state.user_region(&claims.sub)
            && home != claims.home
        {
            // Unless the user moved here from that region: the move
            // brought its sessions, and `confirm` checks the token's is one.
            if home == self.region {
                let from = claims.home.clone();
                let mut here = Arc::unwrap_or_clone(claims);
                here.home = self.region.clone();
                return Ok(Verified(Arc::new(here), Some(from)));
            }
            return Err(CodedError::new(
                ErrorCode::Unauthenticated,
                "invalid access token",
            ));
        }
        Ok(Verified(claims, None))
    }

    /// The session check that makes a verified token a [`Principal`]: at
    /// the home cell, that its session is alive (so a logout or a newer
    /// login takes effect on the next request); elsewhere, its home's word.
    pub async fn confirm(&self, token: Verified) -> Result<Principal, CodedError> {
        let claims = token.0;
        if let Some(from) = &token.1 {
            // A token of the region the session moved from: good while its
            // copy here lives, for one token lifetime after the move (what
            // that region signed before it; never longer, whatever it
            // signs now).
            let since = now_ms() - self.access_ttl_secs() * 1000;
            if !self
                .store
                .moved_session_alive(&claims.sid, &claims.sub, from, since, now_ms())
                .await?
            {
                return Err(session_ended());
            }
        } else if claims.home == self.region {
            if !self
                .store
                .session_alive(&claims.sid, &claims.sub, now_ms())
                .await?
            {
                return Err(session_ended());
            }
        } else {
            use crate::peers::SessionState;
            // Another cell's token: its home cell knows whether the session
            // lives. If that cell cannot be asked, the signature and the
            // (at most 15-minute) expiry still hold: one region's outage
            // must not lock users out of the others.
            let state = self
                .peers
                .session_state(&claims.home, &claims.sid, &claims.sub)
                .await;
            if state == SessionState::Ended {
                return Err(session_ended());
            }
        }
        let claims = Arc::unwrap_or_clone(claims);
        Ok(Principal {
            user_id: claims.sub,
            sid: claims.sid,
            client_type: claims.ct,
            home: claims.home,
            roles: claims.roles,
            expires_at: claims.exp,
        })
    }

    /// The token's own profile (`GET /v1/users/me`, the hottest
    /// authenticated read): at home, the session check and the read are one
    /// statement, where `confirm` then `profile` would be two.
    pub async fn own_profile(&self, token: Verified) -> Result<UserProfile, CodedError> {
        if token.0.home != self.region {
            // Checked as any request is, then refused: the data lives at home.
            self.confirm(token).await?;
            return Err(not_at_home());
        }
        if token.1.is_some() {
            let sid = token.0.sid.clone();
            let p = self.confirm(token).await?;
            return self
                .store
                .profile_in_session(&p.user_id, &sid, now_ms())
                .await?
                .ok_or_else(session_ended);
        }
        let c = &token.0;
        self.store
            .profile_in_session(&c.sub, &c.sid, now_ms())
            .await?
            .ok_or_else(session_ended)
    }

    /// Whether a principal's session still holds, for an answer that
    /// outlives its request (a live stream): the token unexpired and, at
    /// home, the session alive and the account active. A datastore error
    /// keeps the stream; the next check decides.
    pub async fn still_signed_in(&self, p: &Principal) -> bool {
        if p.expires_at <= now_ms() / 1000 {
            return false;
        }
        self.store
            .session_alive(&p.sid, &p.user_id, now_ms())
            .await
            .unwrap_or(true)
    }

    /// Refuses unless the caller (at its home cell) holds `permission` now.
    pub async fn require(&self, p: &Principal, permission: &str) -> Result<(), CodedError> {
        if p.home == self.region && self.store.has_permission(&p.user_id, permission).await? {
            Ok(())
        } else {
            Err(CodedError::new(
                ErrorCode::PermissionDenied,
                format!("this needs the {permission} permission"),
            ))
        }
    }

    pub async fn logout(&self, p: &Principal) -> Result<(), CodedError> {
        self.store
            .revoke_session(&p.user_id, &p.sid, "logout", now_ms())
            .await?;
        Ok(())
    }

    pub async fn sessions(&self, p: &Principal) -> Result<Vec<Session>, CodedError> {
        Ok(self.store.sessions_of(&p.user_id, now_ms()).await?)
    }

    pub async fn revoke_session(&self, p: &Principal, sid: &str) -> Result<(), CodedError> {
        if self
            .store
            .revoke_session(&p.user_id, sid, "revoked", now_ms())
            .await?
        {
            Ok(())
        } else {
            Err(CodedError::not_found("no such session"))
        }
    }

    pub async fn revoke_other_sessions(&self, p: &Principal) -> Result<u64, CodedError> {
        Ok(self
            .store
            .revoke_other_sessions(&p.user_id, &p.sid, now_ms())
            .await?)
    }
}
