//! Identity's rules: registration with a global identifier claim, login with
//! lockout, tokens and sessions, password change and reset, profiles,
//! addresses, account deletion and roles. HTTP handlers call these; the
//! storage layer does the SQL.

use super::identifier::Identifier;
use super::keys::{Keys, Verifier};
use super::password::{self, HashError, Hasher};
use super::store::{
    Address, NewUser, RefreshOutcome, ResetLimits, Rotation, Session, User, UserProfile,
    reset_budget_key_of_user,
};
use crate::clock::now_ms;
use crate::db::Datastore;
use crate::db::DbError;
use crate::db::audit::AuditEntry;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use homecell_common::hex::sha256;
use homecell_common::jwt::{Claims, MAX_ACCESS_TTL_SECS, TokenError};
use homecell_common::replica::Replica;
use homecell_proto::control::{
    ClaimIdentifierRequest, ReleaseIdentifierRequest,
    directory_service_client::DirectoryServiceClient,
};
use homecell_proto::error::{CodedError, ErrorCode, FieldError};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

pub const CLIENT_TYPES: [&str; 4] = ["app", "web", "mp", "cms"];
/// How long a session (its refresh token family) lives at most.
const SESSION_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
const RESET_TTL_MS: i64 = 15 * 60 * 1000;
const RESET_MAX_ATTEMPTS: i64 = 5;
/// How long a rotated refresh token may be presented again for the same
/// successor: the client lost the answer and retries (docs/SECURITY.md).
pub const REFRESH_GRACE_MS: i64 = 30_000;
pub const MAX_ADDRESSES: i64 = 20;
/// The role that holds every permission.
const ADMIN: &str = "admin";

impl From<DbError> for CodedError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Conflict => CodedError::new(ErrorCode::AlreadyExists, "already exists"),
            DbError::Db(e) => {
                tracing::error!(error = %e, "datastore failure");
                CodedError::internal("datastore failure")
            }
        }
    }
}

impl From<HashError> for CodedError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => CodedError::new(
                ErrorCode::TooManyRequests,
                "too many logins in progress; retry shortly",
            ),
            HashError::Failed(m) => {
                tracing::error!(error = %m, "password hashing failed");
                CodedError::internal("password hashing failed")
            }
        }
    }
}

fn unavailable() -> CodedError {
    CodedError::new(
        ErrorCode::NotReady,
        "registration is unavailable right now; retry shortly",
    )
}

fn invalid_credentials() -> CodedError {
    CodedError::new(
        ErrorCode::InvalidCredentials,
        "the identifier or password is wrong",
    )
}

/// Whose reset budget a request spends: the account's when the identifier
/// names one, else the identifier's own, so an unknown identifier is
/// counted, answered and refused exactly as a known one.
fn reset_budget_key(id: &Identifier, user_id: Option<&str>) -> String {
    match user_id {
        Some(u) => reset_budget_key_of_user(u),
        None => format!("id:{}", sha256(&id.qualified())),
    }
}

fn reset_budget_spent(wait_ms: i64) -> CodedError {
    let secs = u64::try_from((wait_ms + 999) / 1000).unwrap_or(1).max(1);
    CodedError::new(
        ErrorCode::TooManyRequests,
        "too many password reset attempts for this account; retry later",
    )
    .retry_after(secs)
}

fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("randomness");
    B64.encode(b)
}

/// Compares without an early exit, so timing does not reveal a prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts one attempt against `limiter` for the client's address.
fn limited(limiter: &IpLimiter, ip: Option<IpAddr>) -> Result<(), CodedError> {
    match ip.map(|ip| limiter.check(ip)) {
        Some(Err(wait)) => Err(CodedError::new(
            ErrorCode::TooManyRequests,
            format!("too many attempts from this address; retry in {wait} s"),
        )
        .retry_after(wait)),
        _ => Ok(()),
    }
}

/// A fixed-window counter per client address (per /64 for IPv6).
pub struct IpLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<IpAddr, (i64, u32)>>,
}

impl IpLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one attempt; Err(seconds to wait) past the limit.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let minute = now_ms() / 60_000;
        let mut w = self.windows.lock().expect("poisoned");
        if w.len() > 100_000 {
            w.retain(|_, (m, _)| *m == minute);
        }
        let e = w
            .entry(homecell_common::client_addr::limit_key(ip))
            .or_insert((minute, 0));
        if e.0 != minute {
            *e = (minute, 0);
        }
        e.1 += 1;
        if e.1 > self.per_minute {
            Err((60 - (now_ms() / 1000) % 60) as u64)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_limiter_counts_per_address() {
        let l = IpLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!((1..=60).contains(&wait));
        assert!(l.check(b).is_ok(), "other addresses are unaffected");
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = IpLimiter::new(2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check(a).is_ok());
        assert!(l.check(same_64).is_ok());
        assert!(l.check(a).is_err(), "one /64 shares one budget");
        assert!(l.check(other_64).is_ok());
    }
}

/// Who made a request, from a verified access token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub sid: String,
    pub client_type: String,
    pub home: String,
    pub roles: Vec<String>,
    /// When the access token expires (unix seconds).
    pub expires_at: i64,
}

/// An access token that passed [`Identity::verify`], its session not yet
/// checked. It names no one a handler may act for: only
/// [`Identity::confirm`], or a read that checks the session in the same
/// statement, turns it into a user.
pub struct Verified(Arc<Claims>);

fn session_ended() -> CodedError {
    CodedError::new(ErrorCode::Unauthenticated, "the session has ended")
}

/// The home cell serves its own users' data only.
pub fn not_at_home() -> CodedError {
    CodedError::new(
        ErrorCode::FailedPrecondition,
        "this is not the user's home region",
    )
}

#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    pub user_id: String,
    pub home_region: String,
}

pub struct Identity {
    pub region: String,
    pub db: Datastore,
    pub hasher: Hasher,
    pub keys: Arc<Keys>,
    pub replica: Arc<Replica>,
    pub cp: Channel,
    pub login_limiter: IpLimiter,
    pub registration_limiter: IpLimiter,
    /// How old an unsettled directory claim must be before the
    /// reconciliation releases it (identity::claims).
    pub claim_settle_ms: i64,
    pub peers: Arc<crate::peers::Peers>,
    /// Access tokens verified before: their Ed25519 check was about a
    /// tenth of the cell's CPU on an authenticated read (bench/HISTORY.md).
    pub tokens: homecell_common::token_cache::TokenCache,
}

impl Identity {
    /// Counts a login or reset attempt against the client address's limit.
    pub(crate) fn check_ip(&self, ip: Option<IpAddr>) -> Result<(), CodedError> {
        limited(&self.login_limiter, ip)
    }

    /// Counts a registration against the client address's limit.
    pub(crate) fn check_registration_ip(&self, ip: Option<IpAddr>) -> Result<(), CodedError> {
        limited(&self.registration_limiter, ip)
    }

    fn config_int(&self, key: &str, default: i64) -> i64 {
        self.replica.state().config_int(key, &self.region, default)
    }

    fn config_ms(&self, key: &str, default_ms: i64) -> i64 {
        self.replica
            .state()
            .config_ms(key, &self.region, default_ms)
    }

    fn lockout(&self) -> (i64, i64) {
        (
            self.config_int("auth.lockout.max_failures", 5),
            self.config_ms("auth.lockout.duration", 15 * 60 * 1000),
        )
    }

    fn reset_limits(&self) -> ResetLimits {
        ResetLimits {
            codes_per_hour: self.config_int("auth.reset.max_codes_per_hour", 5).max(1),
            failures_per_day: self
                .config_int("auth.reset.max_failures_per_day", 10)
                .max(1),
        }
    }

    fn access_ttl_secs(&self) -> i64 {
        (self.config_ms("auth.access_token.ttl", MAX_ACCESS_TTL_SECS * 1000) / 1000)
            .clamp(30, MAX_ACCESS_TTL_SECS)
    }

    // ------------------------------------------------------------ registration

    pub async fn register(
        &self,
        identifier: &str,
        password: &str,
        display_name: Option<&str>,
    ) -> Result<String, CodedError> {
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
            .db
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?
            .is_some()
        {
            return Err(CodedError::new(
                ErrorCode::AlreadyExists,
                "this identifier is already registered",
            ));
        }
        let hash = self.hasher.hash_registration(password.to_string()).await?;
        // Time-ordered and random: unique across cells without coordination.
        let user_id = uuid::Uuid::now_v7().to_string();
        self.claim(&id.qualified(), &user_id).await?;
        crate::failpoint::hit("identity.register.after_claim");
        let default_name = match id.kind {
            super::identifier::Kind::Username => id.value.clone(),
            _ => format!("user-{}", &user_id[user_id.len() - 6..]),
        };
        let created = self
            .db
            .create_user(&NewUser {
                id: &user_id,
                display_name: display_name.unwrap_or(&default_name),
                kind: id.kind.as_str(),
                value: &id.value,
                password_hash: &hash,
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
        Ok(user_id)
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
        // Recorded first: if this claim is never settled (a crash, a
        // timeout that in fact committed), the reconciliation releases it.
        self.db
            .record_claim(qualified, user_id, now_ms())
            .await
            .map_err(|e| (CodedError::from(e), None))?;
        let req = ClaimIdentifierRequest {
            identifier: qualified.to_string(),
            user_id: user_id.to_string(),
            region: self.region.clone(),
        };
        let mut client = DirectoryServiceClient::new(self.cp.clone());
        match tokio::time::timeout(Duration::from_secs(5), client.claim_identifier(req)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => {
                // Someone else's claim: nothing of ours to release.
                if let Err(e) = self.db.forget_claim(qualified, user_id).await {
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
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), "identifier claim failed");
                Err((unavailable(), None))
            }
            Err(_) => Err((unavailable(), None)),
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
        if let Err(e) = self.db.forget_claim(qualified, user_id).await {
            // The record stays; the reconciliation releases again (a no-op).
            tracing::warn!(error = %e, "cannot forget a released claim");
        }
        Ok(())
    }

    // ------------------------------------------------------------ login and tokens

    pub async fn login(
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
            .db
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
            .db
            .user(&user_id)
            .await?
            .ok_or_else(invalid_credentials)?;
        if user.status != "active" {
            self.db.clear_attempts(&user_id).await?;
            return Err(CodedError::new(
                ErrorCode::AccountDisabled,
                "this account is disabled",
            ));
        }
        // Best effort: argon2 busy now only postpones it to the next login.
        if verified.needs_rehash
            && let Ok(hash) = self.hasher.hash(password.to_string()).await
        {
            self.db
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
    async fn check_password(
        &self,
        user_id: &str,
        password: &str,
    ) -> Result<Option<password::Verified>, CodedError> {
        let (max, lock_ms) = self.lockout();
        let now = now_ms();
        let Some(attempt) = self
            .db
            .reserve_attempt(user_id, max, now + lock_ms, now)
            .await?
        else {
            self.hasher.verify_dummy(password.to_string()).await?;
            return Ok(None);
        };
        let stored = self.db.password_hash(user_id).await?.unwrap_or_default();
        match self.hasher.verify(password.to_string(), stored).await {
            Ok(v) if v.ok => {
                if attempt >= max {
                    // This attempt locked the account before the check;
                    // lift it now, not at the caller's later write, which
                    // may never come (argon2 busy for a new hash).
                    self.db.clear_attempts(user_id).await?;
                }
                Ok(Some(v))
            }
            Ok(_) => {
                if attempt >= max {
                    tracing::warn!(user_id, "account locked after repeated failures");
                }
                Ok(None)
            }
            Err(HashError::Busy) => {
                // Nothing was checked: the attempt is not a failure.
                self.db.refund_attempt(user_id, max).await?;
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
        let replaced = match self.db.open_session(&session, &sha256(&refresh)).await {
            Err(DbError::Conflict) => self.db.open_session(&session, &sha256(&refresh)).await?,
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
    fn new_refresh_token(&self) -> String {
        format!("{}~{}", self.region, random_token(32))
    }

    /// The refresh token that follows `token`: derived from it and a salt
    /// the datastore keeps with its hash, so a retry of a rotation whose
    /// answer was lost gets the same successor again, and neither a copy
    /// of the datastore (no token) nor a stolen token (no salt) can derive
    /// it.
    fn successor(&self, token: &str, salt: &str) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in ["homecell refresh successor", salt, token] {
            ctx.update(part.as_bytes());
            ctx.update(&[0]);
        }
        format!("{}~{}", self.region, B64.encode(ctx.finish()))
    }

    async fn token_pair(
        &self,
        session: &Session,
        refresh: String,
    ) -> Result<TokenPair, CodedError> {
        let roles = self.db.roles_of(&session.user_id).await?;
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
            access_token: signer.sign(&claims),
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
            .db
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
            && state
                .user_region(&claims.sub)
                .is_some_and(|home| home != claims.home)
        {
            return Err(CodedError::new(
                ErrorCode::Unauthenticated,
                "invalid access token",
            ));
        }
        Ok(Verified(claims))
    }

    /// The session check that makes a verified token a [`Principal`]: at
    /// the home cell, that its session is alive (so a logout or a newer
    /// login takes effect on the next request); elsewhere, its home's word.
    pub async fn confirm(&self, token: Verified) -> Result<Principal, CodedError> {
        let claims = token.0;
        if claims.home == self.region {
            if !self
                .db
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
        let c = &token.0;
        self.db
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
        self.db
            .session_alive(&p.sid, &p.user_id, now_ms())
            .await
            .unwrap_or(true)
    }

    /// Refuses unless the caller (at its home cell) holds `permission` now.
    pub async fn require(&self, p: &Principal, permission: &str) -> Result<(), CodedError> {
        if p.home == self.region && self.db.has_permission(&p.user_id, permission).await? {
            Ok(())
        } else {
            Err(CodedError::new(
                ErrorCode::PermissionDenied,
                format!("this needs the {permission} permission"),
            ))
        }
    }

    pub async fn logout(&self, p: &Principal) -> Result<(), CodedError> {
        self.db
            .revoke_session(&p.user_id, &p.sid, "logout", now_ms())
            .await?;
        Ok(())
    }

    pub async fn sessions(&self, p: &Principal) -> Result<Vec<Session>, CodedError> {
        Ok(self.db.sessions_of(&p.user_id, now_ms()).await?)
    }

    pub async fn revoke_session(&self, p: &Principal, sid: &str) -> Result<(), CodedError> {
        if self
            .db
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
            .db
            .revoke_other_sessions(&p.user_id, &p.sid, now_ms())
            .await?)
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
        self.db
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
        let user = self
            .db
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?;
        let now = now_ms();
        let key = reset_budget_key(&id, user.as_deref());
        if let Err(wait_ms) = self
            .db
            .spend_reset_issue(&key, self.reset_limits(), now)
            .await?
        {
            return Err(reset_budget_spent(wait_ms));
        }
        let Some(user_id) = user else {
            return Ok(());
        };
        match self.db.user(&user_id).await? {
            Some(u) if u.status == "active" => {}
            _ => return Ok(()),
        }
        let code = {
            let mut b = [0u8; 4];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .expect("randomness");
            format!("{:06}", u32::from_le_bytes(b) % 1_000_000)
        };
        let reset_id = uuid::Uuid::now_v7().to_string();
        let payload = serde_json::json!({
            "user_id": user_id,
            "channel": id.kind.as_str(),
            "to": id.value,
            "code": code,
            "expires_at": now + RESET_TTL_MS,
        });
        self.db
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
            .db
            .user_by_identifier(id.kind.as_str(), &id.value)
            .await?;
        let now = now_ms();
        // The account's daily budget first, then the code's own five
        // guesses, both reserved before anything is compared: a concurrent
        // storm cannot exceed either (docs/SECURITY.md has the arithmetic).
        let key = reset_budget_key(&id, user.as_deref());
        if let Err(wait_ms) = self
            .db
            .spend_reset_guess(&key, self.reset_limits(), now)
            .await?
        {
            return Err(reset_budget_spent(wait_ms));
        }
        let Some(user_id) = user else {
            return Err(bad());
        };
        let Some((reset_id, code_hash)) = self
            .db
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
            .db
            .complete_reset(&reset_id, &user_id, &hash, now)
            .await?
        {
            return Err(bad());
        }
        Ok(())
    }

    // ------------------------------------------------------------ users

    /// A live user's profile: the user, roles and identifiers.
    pub async fn profile(&self, id: &str) -> Result<UserProfile, CodedError> {
        match self.db.profile(id).await? {
            Some(p) if p.user.status != "deleted" => Ok(p),
            _ => Err(CodedError::not_found("no such user")),
        }
    }

    pub async fn user(&self, id: &str) -> Result<User, CodedError> {
        match self.db.user(id).await? {
            Some(u) if u.status != "deleted" => Ok(u),
            _ => Err(CodedError::not_found("no such user")),
        }
    }

    /// Anonymises the caller's account after checking the password.
    pub async fn delete_account(&self, p: &Principal, password: &str) -> Result<(), CodedError> {
        if self.check_password(&p.user_id, password).await?.is_none() {
            return Err(CodedError::new(
                ErrorCode::InvalidCredentials,
                "the password is wrong",
            ));
        }
        let placeholder = format!("deleted-{}", &random_token(9));
        let identifiers = self
            .db
            .anonymise_user(&p.user_id, &placeholder, now_ms())
            .await?;
        for (kind, value) in identifiers {
            let qualified = format!("{kind}:{value}");
            if let Err(e) = self.release(&qualified, &p.user_id).await {
                // The account is gone either way; the claim stays until an
                // operator reconciles it. Never log the identifier itself.
                tracing::error!(user_id = %p.user_id, error = %e.message(), "cannot release a claim of a deleted account");
            }
        }
        tracing::info!(user_id = %p.user_id, "account deleted and anonymised");
        Ok(())
    }

    pub async fn add_address(&self, p: &Principal, a: Address) -> Result<Address, CodedError> {
        if self.db.add_address(&p.user_id, &a, MAX_ADDRESSES).await? {
            Ok(self
                .db
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
        if !self.db.role_exists(role).await? {
            return Err(CodedError::not_found(format!("no role {role:?}")));
        }
        let audit = AuditEntry {
            at: now_ms(),
            actor: &actor.user_id,
            action: if grant { "role.grant" } else { "role.revoke" },
            target: Some(user_id),
            details: serde_json::json!({ "role": role }).to_string(),
        };
        let changed = self.db.set_role(user_id, role, grant, &audit).await?;
        if !changed
            && !grant
            && role == ADMIN
            && self.db.roles_of(user_id).await?.iter().any(|r| r == ADMIN)
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
        if self.db.roles_of(user_id).await?.iter().any(|r| r == ADMIN)
            && !self
                .db
                .roles_of(&actor.user_id)
                .await?
                .iter()
                .any(|r| r == ADMIN)
        {
            return Err(CodedError::new(
                ErrorCode::PermissionDenied,
                "only an admin may disable or enable an admin",
            ));
        }
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
        self.db.set_status(user_id, status, &audit).await?;
        Ok(())
    }
}
