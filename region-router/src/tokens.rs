//! Access-token verification at the edge, with a cache: a repeated token
//! costs a hash and a map lookup instead of an Ed25519 check. Keys come from
//! region metadata (every cell publishes its own); the cache key is the
//! SHA-256 of the whole token, so no part of a token can be swapped.

use homecell_common::jwt::{self, KeySet, TokenError};
use std::collections::HashMap;
use std::sync::Mutex;

const SHARDS: usize = 16;
const MAX_PER_SHARD: usize = 16_384;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user_id: String,
    pub home: String,
    pub exp: i64,
}

pub struct TokenCache {
    shards: Vec<Mutex<HashMap<[u8; 32], Verified>>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl TokenCache {
    /// Verifies `token` (or finds it verified), and checks it has not expired.
    pub fn verify(
        &self,
        token: &str,
        keys: &impl KeySet,
        now: i64,
    ) -> Result<Verified, TokenError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let key: [u8; 32] = digest.as_ref().try_into().expect("32 bytes");
        let shard = &self.shards[key[0] as usize % SHARDS];
        if let Some(v) = shard.lock().expect("poisoned").get(&key) {
            return if v.exp > now {
                Ok(v.clone())
            } else {
                Err(TokenError::Expired)
            };
        }
        let claims = jwt::verify(token, keys, now)?;
        let v = Verified {
            user_id: claims.sub,
            home: claims.home,
            exp: claims.exp,
        };
        let mut map = shard.lock().expect("poisoned");
        if map.len() >= MAX_PER_SHARD {
            map.retain(|_, e| e.exp > now);
            if map.len() >= MAX_PER_SHARD {
                map.clear();
            }
        }
        map.insert(key, v.clone());
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homecell_common::jwt::{Claims, SigningKey};

    struct Keys(Vec<u8>);
    impl KeySet for Keys {
        fn key(&self, kid: &str) -> Option<(Vec<u8>, String)> {
            (kid == "k").then(|| (self.0.clone(), "cell.cn-east".to_string()))
        }
    }

    #[test]
    fn caches_and_still_expires() {
        let (k, _) = SigningKey::generate("k".into()).unwrap();
        let keys = Keys(k.public_key());
        let t = k.sign(&Claims {
            sub: "u".into(),
            home: "cn-east".into(),
            sid: "s".into(),
            ct: "app".into(),
            roles: vec![],
            iss: "cell.cn-east".into(),
            iat: 100,
            exp: 200,
        });
        let cache = TokenCache::default();
        assert_eq!(cache.verify(&t, &keys, 150).unwrap().home, "cn-east");
        // Cached: verified even against an empty key set…
        assert!(cache.verify(&t, &Keys(vec![]), 150).is_ok());
        // …but never past its expiry.
        assert_eq!(cache.verify(&t, &keys, 200), Err(TokenError::Expired));
        assert!(cache.verify(&format!("{t}x"), &keys, 150).is_err());
    }
}
