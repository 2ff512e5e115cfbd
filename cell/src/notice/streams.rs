//! The open live streams (`GET /v1/notices/stream`) of each user: at most
//! `notice.stream.max_per_user` at once (the oldest closes when another
//! opens), and each one ends when its session does.
//!
//! A stream is one long answer to one authenticated request, so the check
//! every other request gets on arrival is repeated here while it is open:
//! every `RECHECK`, the session must still be alive at home and the token
//! unexpired. That covers every way a session ends (logout, a newer login
//! of the same client type, a password change or reset, disabling or
//! deleting the account, expiry) with one rule and no event to miss.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often an open stream re-checks its session: an ended session's
/// stream closes within this plus one datastore read (docs/SECURITY.md
/// promises 5 s).
pub const RECHECK: Duration = Duration::from_secs(2);

/// Streams one user may hold when the config says nothing.
pub const DEFAULT_MAX_PER_USER: i64 = 5;

#[derive(Default)]
pub struct Streams {
    next: AtomicU64,
    open: Mutex<HashMap<String, VecDeque<(u64, CancellationToken)>>>,
}

/// One open stream's place; dropping it (the client went away, or the
/// stream ended) frees the place.
pub struct Slot {
    streams: Arc<Streams>,
    user_id: String,
    id: u64,
    /// Cancelled when a newer stream of the same user pushes this one out.
    pub closed: CancellationToken,
}

impl Streams {
    /// Opens a stream for `user_id`, closing their oldest ones beyond `max`.
    pub fn open(self: &Arc<Self>, user_id: &str, max: i64) -> Slot {
        let max = usize::try_from(max.max(1)).unwrap_or(1);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let closed = CancellationToken::new();
        let mut open = self.open.lock().expect("poisoned");
        let mine = open.entry(user_id.to_string()).or_default();
        mine.push_back((id, closed.clone()));
        while mine.len() > max {
            if let Some((_, oldest)) = mine.pop_front() {
                oldest.cancel();
            }
        }
        crate::metrics::STREAMS_OPEN.inc();
        Slot {
            streams: self.clone(),
            user_id: user_id.to_string(),
            id,
            closed,
        }
    }

    /// Streams open for `user_id` now.
    pub fn count(&self, user_id: &str) -> usize {
        self.open
            .lock()
            .expect("poisoned")
            .get(user_id)
            .map_or(0, VecDeque::len)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        crate::metrics::STREAMS_OPEN.dec();
        let mut open = self.streams.open.lock().expect("poisoned");
        if let Some(mine) = open.get_mut(&self.user_id) {
            mine.retain(|(id, _)| *id != self.id);
            if mine.is_empty() {
                open.remove(&self.user_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_closes_past_the_cap() {
        let s = Arc::new(Streams::default());
        let a = s.open("u", 2);
        let b = s.open("u", 2);
        let other = s.open("v", 2);
        assert_eq!(s.count("u"), 2);
        let c = s.open("u", 2);
        assert!(a.closed.is_cancelled(), "the oldest was pushed out");
        assert!(!b.closed.is_cancelled() && !c.closed.is_cancelled());
        assert!(!other.closed.is_cancelled(), "other users are unaffected");
        assert_eq!(s.count("u"), 2);
        drop(b);
        drop(c);
        drop(a);
        assert_eq!(s.count("u"), 0);
    }
}
