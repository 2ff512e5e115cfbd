//! Verified access tokens, remembered: a repeated token costs a SHA-256 and
//! a map lookup instead of an Ed25519 check. The router and the cells both
//! verify every token they are shown, so both keep one.
//!
//! The cache key is the SHA-256 of the whole token, so no part of a token
//! can be swapped. A remembered token is still checked on every use against
//! its expiry and against the key set: it is accepted only while the key
//! that signed it is still published, unchanged and for the same issuer, so
//! retiring a key ends its tokens at once, remembered or not.

use crate::jwt::{self, Claims, KeySet, TokenError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Shards, so that concurrent requests rarely wait on one lock.
const SHARDS: usize = 16;
/// Tokens remembered per shard. Past this the expired ones are dropped, and
/// if that is not enough, all of them (they verify again).
const MAX_PER_SHARD: usize = 16_384;

/// A verified token: its claims (shared, so a hit copies no strings) and
/// the key that signed it.
struct Entry {
    claims: Arc<Claims>,
    kid: String,
    public_key: Vec<u8>,
}

/// Lookups answered from the cache, and those that verified the signature
/// (`homecell_token_cache_lookups_total{result}`: the hit ratio).
static LOOKUPS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    let c = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "homecell_token_cache_lookups_total",
            "Access-token checks answered from the cache (hit) or by verifying the signature (miss)",
        ),
        &["result"],
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});
static HITS: std::sync::LazyLock<prometheus::IntCounter> =
    std::sync::LazyLock::new(|| LOOKUPS.with_label_values(&["hit"]));
static MISSES: std::sync::LazyLock<prometheus::IntCounter> =
    std::sync::LazyLock::new(|| LOOKUPS.with_label_values(&["miss"]));

pub struct TokenCache {
    shards: Vec<Mutex<HashMap<[u8; 32], Entry>>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl TokenCache {
    /// The claims of `token` if it is valid now (as `jwt::verify` decides),
    /// from memory when this token was verified before.
    pub fn verify(
        &self,
        token: &str,
        keys: &impl KeySet,
        now: i64,
    ) -> Result<Arc<Claims>, TokenError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let key: [u8; 32] = digest.as_ref().try_into().expect("32 bytes");
        let shard = &self.shards[key[0] as usize % SHARDS];
        {
            let mut map = shard.lock().expect("poisoned");
            if let Some(e) = map.get(&key) {
                if e.claims.exp <= now {
                    return Err(TokenError::Expired);
                }
                if keys.publishes(&e.kid, &e.public_key, &e.claims.iss) {
                    HITS.inc();
                    return Ok(e.claims.clone());
                }
                // Its key was retired or replaced: verify it afresh, which
                // refuses it unless a published key still signs it.
                map.remove(&key);
            }
        }
        MISSES.inc();
        let v = jwt::verify_with_key(token, keys, now)?;
        let claims = Arc::new(v.claims);
        let mut map = shard.lock().expect("poisoned");
        if map.len() >= MAX_PER_SHARD {
            map.retain(|_, e| e.claims.exp > now);
            if map.len() >= MAX_PER_SHARD {
                map.clear();
            }
        }
        map.insert(
            key,
            Entry {
                claims: claims.clone(),
                kid: v.kid,
                public_key: v.public_key,
            },
        );
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::SigningKey;
    use std::cell::{Cell, RefCell};

    /// One published key, which a test can retire or replace, counting
    /// the lookups a full verification makes.
    #[derive(Default)]
    struct Keys {
        published: RefCell<Option<Vec<u8>>>,
        lookups: Cell<usize>,
    }
    impl Keys {
        fn with(public_key: Vec<u8>) -> Self {
            let keys = Self::default();
            keys.published.replace(Some(public_key));
            keys
        }
    }
    impl KeySet for Keys {
        fn key(&self, kid: &str) -> Option<(Vec<u8>, String)> {
            self.lookups.set(self.lookups.get() + 1);
            let k = self.published.borrow().clone()?;
            (kid == "k").then(|| (k, "cell.cn-east".to_string()))
        }
        fn publishes(&self, kid: &str, public_key: &[u8], issuer: &str) -> bool {
            kid == "k"
                && issuer == "cell.cn-east"
                && self.published.borrow().as_deref() == Some(public_key)
        }
    }

    fn token(k: &SigningKey) -> String {
        k.sign(&Claims {
            sub: "u".into(),
            home: "cn-east".into(),
            sid: "s".into(),
            ct: "app".into(),
            roles: vec!["support".into()],
            iss: "cell.cn-east".into(),
            iat: 100,
            exp: 200,
        })
        .unwrap()
    }

    #[test]
    fn remembers_a_token_but_still_expires_it() {
        let (k, _) = SigningKey::generate("k".into()).unwrap();
        let keys = Keys::with(k.public_key());
        let t = token(&k);
        let cache = TokenCache::default();
        let claims = cache.verify(&t, &keys, 150).unwrap();
        assert_eq!((claims.home.as_str(), claims.roles.len()), ("cn-east", 1));
        assert_eq!(keys.lookups.get(), 1);
        // Remembered: no second verification.
        assert_eq!(cache.verify(&t, &keys, 150).unwrap(), claims);
        assert_eq!(keys.lookups.get(), 1);
        assert_eq!(cache.verify(&t, &keys, 200), Err(TokenError::Expired));
        assert!(cache.verify(&format!("{t}x"), &keys, 150).is_err());
    }

    #[test]
    fn a_remembered_token_ends_with_its_key() {
        let (k, _) = SigningKey::generate("k".into()).unwrap();
        let keys = Keys::with(k.public_key());
        let t = token(&k);
        let cache = TokenCache::default();
        assert!(cache.verify(&t, &keys, 150).is_ok());

        // Retired: refused at once, though remembered.
        keys.published.replace(None);
        assert_eq!(cache.verify(&t, &keys, 150), Err(TokenError::UnknownKey));

        // Replaced under the same kid: the old key's token does not verify.
        let (other, _) = SigningKey::generate("k".into()).unwrap();
        keys.published.replace(Some(other.public_key()));
        assert_eq!(cache.verify(&t, &keys, 150), Err(TokenError::Signature));

        // Published again: verified again.
        keys.published.replace(Some(k.public_key()));
        assert!(cache.verify(&t, &keys, 150).is_ok());
    }
}
