//! The users frozen here by a move under way, in memory, so that every
//! write path asks without a query. The table `user_moves` is the truth;
//! every instance of the cell reloads it each second (`worker.rs`), and the
//! instance that freezes or thaws a user updates its own set at once.
//! The move waits out one reload period after freezing before it copies,
//! so no instance still takes writes for the user when it does.
//!
//! A write aimed at a frozen user waits up to [`HOLD`] for the move to
//! end, then is refused as retryable (`user_moving`, 503 + Retry-After):
//! never taken here and then left behind.

use homecell_proto::error::{CodedError, ErrorCode};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a write waits for a move to end before it is refused.
pub const HOLD: Duration = Duration::from_secs(2);

/// How often every instance reloads the set from the datastore.
pub const RELOAD: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Frozen {
    /// user id → the region the user is moving to.
    users: RwLock<HashMap<String, String>>,
    changed: Notify,
}

impl Frozen {
    /// Whether any user is frozen here (the common answer: no).
    pub fn any(&self) -> bool {
        !self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn contains(&self, user_id: &str) -> bool {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        !users.is_empty() && users.contains_key(user_id)
    }

    pub fn insert(&self, user_id: &str, to: &str) {
        self.users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user_id.to_string(), to.to_string());
    }

    pub fn remove(&self, user_id: &str) {
        let removed = self
            .users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(user_id)
            .is_some();
        if removed {
            self.changed.notify_waiters();
        }
    }

    /// Replaces the set with the datastore's.
    pub fn replace(&self, now: HashMap<String, String>) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let thawed = users.keys().any(|u| !now.contains_key(u));
        *users = now;
        drop(users);
        if thawed {
            self.changed.notify_waiters();
        }
    }

    /// Returns once the user is not frozen, or refuses after [`HOLD`].
    pub async fn wait(&self, user_id: &str) -> Result<(), CodedError> {
        if !self.contains(user_id) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + HOLD;
        loop {
            let changed = self.changed.notified();
            if !self.contains(user_id) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(moving());
            }
        }
    }
}

/// The answer to a write aimed at a user who is moving.
pub fn moving() -> CodedError {
    CodedError::new(
        ErrorCode::UserMoving,
        "the account is moving to another region; retry shortly",
    )
    .retry_after(1)
}
