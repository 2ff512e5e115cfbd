//! Per-client-address and per-user request limits at the edge, in requests
//! per second (one-second windows). The limits come from control-plane
//! config (`router.rate_limit.per_ip`, `router.rate_limit.per_user`) through
//! the routing table, so a change applies without a restart; unset means
//! unlimited.

use std::collections::HashMap;
use std::sync::Mutex;

const SHARDS: usize = 16;
const MAX_PER_SHARD: usize = 65_536;

pub struct Limiter {
    shards: Vec<Mutex<HashMap<String, (u64, u32)>>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Limiter {
    /// Counts one request for `key` in second `now`; false when over `limit`.
    pub fn allow(&self, key: &str, limit: u32, now: u64) -> bool {
        let shard = key
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % SHARDS;
        let mut map = self.shards[shard].lock().expect("poisoned");
        if map.len() >= MAX_PER_SHARD {
            map.retain(|_, (second, _)| *second == now);
        }
        let entry = map.entry(key.to_string()).or_insert((now, 0));
        if entry.0 != now {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key_per_second() {
        let l = Limiter::default();
        assert!(l.allow("ip:a", 2, 10));
        assert!(l.allow("ip:a", 2, 10));
        assert!(!l.allow("ip:a", 2, 10));
        assert!(l.allow("ip:b", 2, 10), "keys are independent");
        assert!(l.allow("ip:a", 2, 11), "a new second starts afresh");
    }
}
