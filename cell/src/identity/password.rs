//! Password hashing: argon2id at OWASP's parameters (19 MiB, t=2, p=1), on
//! the blocking pool, with a cap on concurrent hashes so a login storm queues
//! instead of exhausting memory.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

/// A password policy failure, safe to show.
pub fn check_policy(password: &str) -> Result<(), &'static str> {
    let n = password.chars().count();
    if n < 8 {
        return Err("a password needs at least 8 characters");
    }
    if n > 128 {
        return Err("a password has at most 128 characters");
    }
    if password.trim().is_empty() {
        return Err("a password cannot be only spaces");
    }
    Ok(())
}

/// A permit, waiting at most `wait` for one.
async fn acquire(
    permits: &Arc<Semaphore>,
    wait: Duration,
) -> Result<tokio::sync::OwnedSemaphorePermit, HashError> {
    tokio::time::timeout(wait, permits.clone().acquire_owned())
        .await
        .map_err(|_| HashError::Busy)?
        .map_err(|_| HashError::Busy)
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("too many password checks in progress")]
    Busy,
    #[error("hashing failed: {0}")]
    Failed(String),
}

#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// How long a hash waits for a permit before the caller gets 429.
    wait: Duration,
    /// Registrations hold at most half the permits, so a registration
    /// flood cannot take argon2 from the logins of existing users.
    registrations: Arc<Semaphore>,
    /// A hash of a random password, verified against for unknown accounts so
    /// they take as long as known ones.
    dummy: Arc<String>,
}

fn argon() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None).expect("valid parameters"),
    )
}

fn hash_blocking(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Failed(e.to_string()))
}

/// Whether a stored hash uses other parameters than today's (then it is
/// re-hashed at the next successful login).
fn outdated(hash: &PasswordHash<'_>) -> bool {
    let p = |name: &str| hash.params.get_decimal(name);
    hash.algorithm.as_str() != "argon2id"
        || hash.version != Some(0x13)
        || p("m") != Some(MEMORY_KIB)
        || p("t") != Some(ITERATIONS)
        || p("p") != Some(PARALLELISM)
}

pub struct Verified {
    pub ok: bool,
    pub needs_rehash: bool,
}

impl Hasher {
    pub fn new(max_concurrent: usize) -> Self {
        Self::with_wait(max_concurrent, Duration::from_secs(5))
    }

    /// `new`, with how long a hash may wait for a permit.
    pub fn with_wait(max_concurrent: usize, wait: Duration) -> Self {
        let dummy = hash_blocking(&uuid::Uuid::new_v4().to_string()).expect("hashing works");
        let n = max_concurrent.max(1);
        Self {
            permits: Arc::new(Semaphore::new(n)),
            wait,
            registrations: Arc::new(Semaphore::new((n / 2).max(1))),
            dummy: Arc::new(dummy),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = acquire(&self.permits, self.wait).await?;
        let out = tokio::task::spawn_blocking(move || {
            let out = f();
            drop(permit);
            out
        })
        .await
        .map_err(|e| HashError::Failed(e.to_string()))?;
        Ok(out)
    }

    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move || hash_blocking(&password)).await?
    }

    /// `hash` for a new account, within the registrations' share.
    pub async fn hash_registration(&self, password: String) -> Result<String, HashError> {
        let _share = acquire(&self.registrations, self.wait).await?;
        self.hash(password).await
    }

    pub async fn verify(&self, password: String, stored: String) -> Result<Verified, HashError> {
        self.run(move || match PasswordHash::new(&stored) {
            Ok(h) => {
                let ok = if h.algorithm.as_str().starts_with("argon2") {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                } else {
                    false
                };
                Verified {
                    ok,
                    needs_rehash: ok && outdated(&h),
                }
            }
            Err(_) => Verified {
                ok: false,
                needs_rehash: false,
            },
        })
        .await
    }

    /// Spends the time of a real check, for accounts that do not exist or
    /// are locked; busy as a real check would be, so the answer under load
    /// does not tell them apart.
    pub async fn verify_dummy(&self, password: String) -> Result<(), HashError> {
        let dummy = self.dummy.to_string();
        self.verify(password, dummy).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_upgrade() {
        let h = Hasher::new(2);
        let stored = h.hash("correct horse".into()).await.unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let v = h
            .verify("correct horse".into(), stored.clone())
            .await
            .unwrap();
        assert!(v.ok && !v.needs_rehash);
        assert!(!h.verify("wrong horse".into(), stored).await.unwrap().ok);
        // A hash with weaker parameters verifies and asks to be upgraded.
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(4096, 1, 1, None).unwrap(),
        )
        .hash_password(
            b"correct horse",
            &SaltString::generate(&mut argon2::password_hash::rand_core::OsRng),
        )
        .unwrap()
        .to_string();
        let v = h.verify("correct horse".into(), weak).await.unwrap();
        assert!(v.ok && v.needs_rehash);
        assert!(!h.verify("x".into(), "not a hash".into()).await.unwrap().ok);
    }
}
