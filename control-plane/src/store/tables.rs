//! The store's tables as one transaction sees them, whichever engine holds
//! them: redb (one file, the embedded default) or PostgreSQL (shared by
//! several control-plane instances).
//!
//! Everything above this layer (a mutation's checks, the change it records,
//! the users counted from claims, snapshots, backups and rebuilds) is
//! written once against these two traits. Each engine only maps a row to
//! its tables; neither decides anything.

use homecell_proto::control::{
    ChangeSet, ConfigEntry, ConfigHistoryEntry, IdentifierClaim, MoveBatch, MoveRecord, Region,
    SubscriberStatus,
};
use homecell_proto::error::CodedError;

pub type Result<T> = std::result::Result<T, CodedError>;

/// A user's directory entry: home region and how many claims it holds.
pub type UserRow = (String, u32);

/// What one transaction can read. Pages are in key order, after the given
/// key (from the start for `None`), so long walks keep memory flat.
pub trait Read {
    /// A counter in the meta table (0 when unset).
    fn meta(&self, key: &str) -> Result<u64>;
    fn region(&self, id: &str) -> Result<Option<Region>>;
    fn regions(&self) -> Result<Vec<Region>>;
    fn claim(&self, hmac: &str) -> Result<Option<IdentifierClaim>>;
    fn user(&self, user_id: &str) -> Result<Option<UserRow>>;
    fn reservation(&self, prefix: u128) -> Result<Option<String>>;
    fn config(&self, row: &str) -> Result<Option<ConfigEntry>>;
    fn config_entries(&self) -> Result<Vec<ConfigEntry>>;
    /// History rows at or below `revision`, in (revision, row) order.
    fn history_upto(&self, revision: u64) -> Result<Vec<(String, ConfigHistoryEntry)>>;
    /// History rows newest first, for one key or every key when empty.
    fn history_newest(&self, key: &str, limit: usize) -> Result<Vec<ConfigHistoryEntry>>;
    /// Change sets after `revision`, at most `max`, in order.
    fn changes_after(&self, revision: u64, max: usize) -> Result<Vec<ChangeSet>>;
    fn subscribers(&self) -> Result<Vec<SubscriberStatus>>;

    fn users_len(&self) -> Result<u64>;
    fn claims_len(&self) -> Result<u64>;
    fn history_len(&self) -> Result<u64>;
    /// (user id, home region) after `after`.
    fn users_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, String)>>;
    fn claims_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<IdentifierClaim>>;
    fn history_page(
        &self,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<(u64, String, ConfigHistoryEntry)>>;

    /// The move journal (see `crate::moves`).
    fn move_record(&self, id: &str) -> Result<Option<MoveRecord>>;
    /// Every move, in id order, after `after`.
    fn moves_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<MoveRecord>>;
    /// The open move of a user (not done or cancelled), if any.
    fn open_move_of(&self, user_id: &str) -> Result<Option<String>>;
    /// Every open move, in user id order, after `after`.
    fn open_moves_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<MoveRecord>>;
    fn batch(&self, id: &str) -> Result<Option<MoveBatch>>;
    fn batches(&self) -> Result<Vec<MoveBatch>>;
}

/// What a write transaction can change, on top of reading.
pub trait Write: Read {
    fn set_meta(&mut self, key: &str, value: u64) -> Result<()>;
    fn put_region(&mut self, r: &Region) -> Result<()>;
    /// Stores a claim; true when the HMAC was already held (and replaced).
    fn put_claim(&mut self, c: &IdentifierClaim) -> Result<bool>;
    fn remove_claim(&mut self, hmac: &str) -> Result<Option<IdentifierClaim>>;
    fn put_user(&mut self, user_id: &str, region: &str, claims: u32) -> Result<()>;
    fn remove_user(&mut self, user_id: &str) -> Result<()>;
    fn reserve(&mut self, prefix: u128, region: &str) -> Result<()>;
    fn unreserve(&mut self, prefix: u128) -> Result<()>;
    /// Drops every reservation of `region`; returns how many.
    fn drop_reservations(&mut self, region: &str) -> Result<u64>;
    fn put_config(&mut self, row: &str, e: &ConfigEntry) -> Result<()>;
    fn remove_config(&mut self, row: &str) -> Result<()>;
    fn put_history(&mut self, row: &str, h: &ConfigHistoryEntry) -> Result<()>;
    /// Appends a change set to the log (and tells other instances of it).
    fn put_change(&mut self, cs: &ChangeSet) -> Result<()>;
    /// Drops the log's change sets at or below `revision` (all for `MAX`).
    fn trim_changes(&mut self, revision: u64) -> Result<()>;
    fn put_subscriber(&mut self, s: &SubscriberStatus) -> Result<()>;
    /// Stores a move, and keeps the index of open moves by user with it.
    fn put_move(&mut self, m: &MoveRecord) -> Result<()>;
    fn put_batch(&mut self, b: &MoveBatch) -> Result<()>;
}

/// A move the source still has work for: not done, and not cancelled and
/// undone.
pub fn move_is_open(m: &MoveRecord) -> bool {
    use homecell_proto::control::MoveState;
    match m.state() {
        MoveState::Done => false,
        MoveState::Cancelled => !m.undone,
        _ => true,
    }
}

/// Counts one more claim on `user_id` and homes it in `region`; returns the
/// region the user was homed in before, if the directory held it.
pub fn count_claim(t: &mut dyn Write, user_id: &str, region: &str) -> Result<Option<String>> {
    let held = t.user(user_id)?;
    let count = held.as_ref().map_or(0, |h| h.1) + 1;
    t.put_user(user_id, region, count)?;
    Ok(held.map(|h| h.0))
}
