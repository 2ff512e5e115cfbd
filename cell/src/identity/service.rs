//! Identity's rules: registration with a global identifier claim, login with
//! lockout, tokens and sessions, password change and reset, profiles,
//! addresses, account deletion and roles. HTTP handlers call these; the
//! storage layer does the SQL.

use super::keys::Keys;
use super::password::{HashError, Hasher};
use super::store::IdentityStore;
use super::store::{ResetLimits, reset_budget_key_of_user};
use crate::clock::now_ms;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use homecell_common::hex::sha256;
use homecell_common::jwt::{Claims, MAX_ACCESS_TTL_SECS};
use homecell_common::replica::Replica;
use homecell_proto::error::{CodedError, ErrorCode};
use homecell_proto::identifier::Identifier;
use std::net::IpAddr;
use std::sync::Arc;

pub const CLIENT_TYPES: [&str; 4] = ["app", "web", "mp", "cms"];
/// How long a session (its refresh token family) lives at most.
pub(crate) const SESSION_TTL_MS: i64 = 30 * 24 * 3600 * 1000;
pub(super) const RESET_TTL_MS: i64 = 15 * 60 * 1000;
pub(super) const RESET_MAX_ATTEMPTS: i64 = 5;
/// How long a rotated refresh token may be presented again for the same
/// successor: the client lost the answer and retries (docs/SECURITY.md).
pub const REFRESH_GRACE_MS: i64 = 30_000;
pub const MAX_ADDRESSES: i64 = 20;
/// The role that holds every permission.
pub(super) const ADMIN: &str = "admin";

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

pub(super) fn unavailable() -> CodedError {
    CodedError::new(
        ErrorCode::NotReady,
        "registration is unavailable right now; retry shortly",
    )
}

pub(super) fn invalid_credentials() -> CodedError {
    CodedError::new(
        ErrorCode::InvalidCredentials,
        "the identifier or password is wrong",
    )
}

/// Whose reset budget a request spends: the account's when the identifier
/// names one, else the identifier's own, so an unknown identifier is
/// counted, answered and refused exactly as a known one.
pub(super) fn reset_budget_key(id: &Identifier, user_id: Option<&str>) -> String {
    match user_id {
        Some(u) => reset_budget_key_of_user(u),
        None => format!("id:{}", sha256(&id.qualified())),
    }
}

pub(super) fn reset_budget_spent(wait_ms: i64) -> CodedError {
    let secs = u64::try_from((wait_ms + 999) / 1000).unwrap_or(1).max(1);
    CodedError::new(
        ErrorCode::TooManyRequests,
        "too many password reset attempts for this account; retry later",
    )
    .retry_after(secs)
}

pub(super) fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("randomness");
    B64.encode(b)
}

/// Compares without an early exit, so timing does not reveal a prefix.
/// A one-time code: 6 random digits.
/// What the outbox carries for a one-time code good for `ttl_ms` from
/// `now`: the address it goes to (`channel`, `to`: nowhere else) and the
/// message's variables.
pub(super) fn code_message(
    user_id: &str,
    to: &Identifier,
    code: &str,
    now: i64,
    ttl_ms: i64,
) -> serde_json::Value {
    serde_json::json!({
        "user_id": user_id,
        "channel": to.kind.as_str(),
        "to": to.value,
        "code": code,
        "expires_at": now + ttl_ms,
        // For the message: "valid {{minutes}} minutes".
        "minutes": (ttl_ms + 59_999) / 60_000,
    })
}

pub(super) fn six_digits() -> String {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("randomness");
    format!("{:06}", u32::from_le_bytes(b) % 1_000_000)
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts one attempt against `limiter` for the client's address.
pub(super) fn limited(limiter: &IpLimiter, ip: Option<IpAddr>) -> Result<(), CodedError> {
    match ip.map(|ip| limiter.check(ip)) {
        Some(Err(wait)) => Err(CodedError::new(
            ErrorCode::TooManyRequests,
            format!("too many attempts from this address; retry in {wait} s"),
        )
        .retry_after(wait)),
        _ => Ok(()),
    }
}

/// A limit on attempts per client address (per /64 for IPv6) over a
/// sliding minute.
pub struct IpLimiter {
    per_minute: u32,
    counts: homecell_common::sliding_limit::SlidingLimiter<IpAddr>,
}

impl IpLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            counts: Default::default(),
        }
    }

    /// Counts one attempt; Err(seconds to wait) past the limit.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let key = homecell_common::client_addr::limit_key(ip);
        let now = u64::try_from(now_ms()).unwrap_or(0);
        self.counts
            .check(key, self.per_minute, 60_000, now)
            .map_err(|wait_ms| wait_ms.div_ceil(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn ip_limiter_counts_per_address() {
        let l = IpLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!((1..=120).contains(&wait));
        assert!(l.check(b).is_ok(), "other addresses are unaffected");
    }

    #[test]
    pub(super) fn ipv6_counts_per_64() {
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
/// A token whose signature, issuer and expiry hold. The second field
/// names the region a move brought its session from, for a token that
/// region signed before (or just after) the user moved here: its session
/// is this cell's copy (`moving/`), checked in `confirm`.
pub struct Verified(pub(super) Arc<Claims>, pub(super) Option<String>);

pub(super) fn session_ended() -> CodedError {
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
    pub store: IdentityStore,
    pub hasher: Hasher,
    pub keys: Arc<Keys>,
    pub replica: Arc<Replica>,
    /// Calls made while serving a request carry its trace.
    pub cp: homecell_common::traced_grpc::TracedChannel,
    /// Claims fail fast while the control plane is unreachable.
    pub cp_breaker: super::breaker::Breaker,
    pub login_limiter: IpLimiter,
    pub registration_limiter: IpLimiter,
    /// How old an unsettled directory claim must be before the
    /// reconciliation releases it (identity::claims).
    pub claim_settle_ms: i64,
    pub peers: Arc<crate::peers::Peers>,
    /// Access tokens verified before: their Ed25519 check was about a
    /// tenth of the cell's CPU on an authenticated read (bench/HISTORY.md).
    pub tokens: homecell_common::token_cache::TokenCache,
    /// Users being moved away: no session opens for them here meanwhile.
    pub frozen: Arc<crate::moving::frozen::Frozen>,
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

    pub(super) fn config_int(&self, key: &str, default: i64) -> i64 {
        self.replica.state().config_int(key, &self.region, default)
    }

    pub(super) fn config_bool(&self, key: &str, default: bool) -> bool {
        self.replica.state().config_bool(key, &self.region, default)
    }

    pub(super) fn config_ms(&self, key: &str, default_ms: i64) -> i64 {
        self.replica
            .state()
            .config_ms(key, &self.region, default_ms)
    }

    pub(super) fn lockout(&self) -> (i64, i64) {
        (
            self.config_int("auth.lockout.max_failures", 5),
            self.config_ms("auth.lockout.duration", 15 * 60 * 1000),
        )
    }

    pub(super) fn reset_limits(&self) -> ResetLimits {
        ResetLimits {
            codes_per_hour: self.config_int("auth.reset.max_codes_per_hour", 5).max(1),
            failures_per_day: self
                .config_int("auth.reset.max_failures_per_day", 10)
                .max(1),
        }
    }

    pub(super) fn access_ttl_secs(&self) -> i64 {
        (self.config_ms("auth.access_token.ttl", MAX_ACCESS_TTL_SECS * 1000) / 1000)
            .clamp(30, MAX_ACCESS_TTL_SECS)
    }
}
