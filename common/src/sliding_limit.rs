//! A limit on events per key per window, counted over a sliding window.
//!
//! A fixed window (count per calendar minute) lets a client spend its
//! whole budget in the last second of one window and again in the first
//! second of the next: twice the limit in two seconds. This keeps the
//! count of the current and the previous window and weighs the previous
//! one by how much of it still lies inside the sliding window, the
//! estimate Cloudflare describes for its edge limits: exact for a steady
//! rate, and a burst across a boundary is counted, not forgiven.
//!
//! Refused attempts are not counted: the limit is on what gets through,
//! and `Retry-After` says truly when the next one will.
//!
//! The estimate is not exact: a client that spends the limit at the very
//! end of one window and again, less one, at the very end of the next gets
//! up to twice the limit less one through within one true window, where a
//! fixed window let that happen in any two seconds across a turn.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Mutex;

const SHARDS: usize = 16;
/// Past this many keys in a shard, keys idle for two of their windows are
/// dropped; a shard still over half full after that is emptied. So memory
/// is bounded and each pass over a shard is paid for by half a shard of new
/// keys, at the price of forgetting that shard's counts under a flood of
/// distinct keys.
const MAX_PER_SHARD: usize = 65_536;

/// One key's counts: its window's length and number, then that window's
/// count and the one before's.
#[derive(Clone, Copy)]
struct Counts {
    window_ms: u64,
    window: u64,
    previous: u32,
    current: u32,
}

struct Shard<K> {
    keys: HashMap<K, Counts>,
}

pub struct SlidingLimiter<K> {
    hasher: RandomState,
    shards: Vec<Mutex<Shard<K>>>,
    cap: usize,
}

impl<K: Hash + Eq> Default for SlidingLimiter<K> {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            cap: MAX_PER_SHARD,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        keys: HashMap::new(),
                    })
                })
                .collect(),
        }
    }
}

impl<K: Hash + Eq> SlidingLimiter<K> {
    /// Counts one event for `key` at `now_ms` if fewer than `limit` fell in
    /// the `window_ms` before it; otherwise Err(milliseconds until one
    /// would be allowed). A key must always be asked with the same window.
    pub fn check(&self, key: K, limit: u32, window_ms: u64, now_ms: u64) -> Result<(), u64> {
        let window_ms = window_ms.max(1);
        let window = now_ms / window_ms;
        let into = now_ms % window_ms;
        let shard = (self.hasher.hash_one(&key) as usize) % SHARDS;
        let mut shard = self.shards[shard].lock().expect("poisoned");
        if shard.keys.len() >= self.cap {
            prune(&mut shard.keys, self.cap, now_ms);
        }
        let c = shard.keys.entry(key).or_insert(Counts {
            window_ms,
            window,
            previous: 0,
            current: 0,
        });
        if c.window != window {
            let previous = if c.window + 1 == window { c.current } else { 0 };
            *c = Counts {
                window_ms,
                window,
                previous,
                current: 0,
            };
        }
        // Rounded up: a burst just before the turn of the window still
        // counts whole just after it.
        let weighed = |previous: u32, into: u64| {
            (u64::from(previous) * (window_ms - into)).div_ceil(window_ms)
        };
        if weighed(c.previous, into) + u64::from(c.current) < u64::from(limit) {
            c.current += 1;
            return Ok(());
        }
        Err(wait_ms(*c, limit, window_ms, into))
    }
}

/// Drops the keys idle for two of their own windows (one limiter holds keys
/// of several window lengths); empties the map if that leaves it over half
/// of `cap`.
fn prune<K>(keys: &mut HashMap<K, Counts>, cap: usize, now_ms: u64) {
    keys.retain(|_, c| c.window + 1 >= now_ms / c.window_ms);
    if keys.len() > cap / 2 {
        keys.clear();
    }
}

/// How long until `previous` (weighed) plus `current` drops below `limit`:
/// the first `t` into a window with `ceil(previous * (W - t) / W) < room`,
/// that is `previous * (W - t) <= (room - 1) * W`.
fn wait_ms(c: Counts, limit: u32, window_ms: u64, into: u64) -> u64 {
    let first_allowed = |previous: u64, room: u64| {
        window_ms - ((room - 1) * window_ms / previous.max(1)).min(window_ms)
    };
    let (limit, previous, current) = (
        u64::from(limit),
        u64::from(c.previous),
        u64::from(c.current),
    );
    if limit == 0 {
        return window_ms;
    }
    if current < limit {
        // This window's events stay while the previous window's fade.
        return first_allowed(previous, limit - current)
            .saturating_sub(into)
            .max(1);
    }
    // In the next window, this window's events are the previous ones.
    (window_ms - into) + first_allowed(current, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn counts_per_key() {
        let l = SlidingLimiter::default();
        for _ in 0..3 {
            assert!(l.check("a", 3, MIN, 1_000).is_ok());
        }
        let wait = l.check("a", 3, MIN, 1_000).unwrap_err();
        assert!((1..=2 * MIN).contains(&wait), "{wait}");
        assert!(l.check("b", 3, MIN, 1_000).is_ok(), "keys are independent");
    }

    #[test]
    fn a_burst_across_a_window_boundary_is_counted() {
        let l = SlidingLimiter::default();
        for _ in 0..3 {
            assert!(l.check("a", 3, MIN, MIN - 10).is_ok());
        }
        assert!(
            l.check("a", 3, MIN, MIN + 10).is_err(),
            "a new window does not forgive the burst just before it"
        );
        assert!(l.check("a", 3, MIN, 2 * MIN - 10).is_ok(), "it fades");
    }

    #[test]
    fn the_wait_it_names_is_when_an_attempt_gets_through() {
        for (limit, at) in [(3u32, 0u64), (3, 59_000), (5, 30_000), (1, 12_345)] {
            let l = SlidingLimiter::default();
            let mut now = at;
            let mut through = 0;
            // Keep asking when told to: every answer's wait is honest
            // (the attempt then passes) and not early by more than 1 ms.
            for _ in 0..20 {
                match l.check("k", limit, MIN, now) {
                    Ok(()) => through += 1,
                    Err(wait) => {
                        assert!(
                            l.check("k", limit, MIN, now + wait - 1).is_err(),
                            "limit {limit}: {wait} ms is not too long"
                        );
                        now += wait;
                        assert!(l.check("k", limit, MIN, now).is_ok(), "limit {limit}");
                        through += 1;
                    }
                }
            }
            assert_eq!(through, 20);
            // Over any run, no more than the limit per window plus what
            // the previous window's fading allows.
            assert!(
                now - at >= (20 / u64::from(limit) - 2) * MIN,
                "limit {limit}"
            );
        }
    }

    #[test]
    fn a_prune_judges_each_key_by_its_own_window() {
        let counts = |window_ms: u64, window: u64| Counts {
            window_ms,
            window,
            previous: 0,
            current: 3,
        };
        let mut keys = HashMap::new();
        keys.insert("register:a".to_string(), counts(MIN, 0));
        for i in 0..10 {
            keys.insert(format!("ip:{i}"), counts(1_000, 1));
        }
        prune(&mut keys, 100, 5_000);
        assert_eq!(
            keys.keys().collect::<Vec<_>>(),
            ["register:a"],
            "the one-second keys are idle at 5 s, the one-minute key is not"
        );
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_the_cap() {
        let l = SlidingLimiter {
            cap: 8,
            ..SlidingLimiter::default()
        };
        for i in 0..10_000u64 {
            let _ = l.check(i, 1, MIN, 1_000 + i);
        }
        for s in &l.shards {
            assert!(s.lock().unwrap().keys.len() <= 8);
        }
    }

    #[test]
    fn a_zero_limit_allows_nothing() {
        let l = SlidingLimiter::default();
        assert!(l.check("a", 0, 1_000, 5).is_err());
    }
}
