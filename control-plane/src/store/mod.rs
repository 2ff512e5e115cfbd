//! The control plane's store: the authoritative state plus the revisioned
//! change log that subscribers replicate, on redb (one file, the embedded
//! default) or on PostgreSQL (shared by several instances).
//!
//! Every mutation runs in one write transaction through [`Store::mutate`]:
//! validation reads and the writes it decides happen under the same lock, the
//! changes are appended to the log under the next revision, and a mutation
//! that fails (or changes nothing) writes nothing at all. The engines differ
//! only below [`tables`]; this module holds the one write path.

use homecell_proto::control::{
    Change, ChangeSet, ConfigEntry, ConfigHistoryEntry, ConfigKey, DirectoryUser, IdentifierClaim,
    MoveBatch, MoveRecord, Region, Snapshot, SubscriberStatus, change,
};
use homecell_proto::error::CodedError;
use redb::{Database, ReadableDatabase};
use std::path::{Path, PathBuf};
use tables::{Read, Write, count_claim};
use tokio::sync::watch;

mod follow;
mod postgres;
mod rebuild;
mod redb_tables;
mod tables;
pub use follow::Instance;
pub use postgres::InstanceRow;
pub use rebuild::{BACKUP_FORMAT, Rebuilder};
use redb_tables::{RedbRead, RedbWrite, storage};
pub use tables::move_is_open;

const REVISION: &str = "revision";
/// Revisions at or below the floor have been compacted out of the log.
const LOG_FLOOR: &str = "log_floor";
/// What a rebuilt store sets to its first revision: its head, and the
/// log's floor (its log holds nothing before).
const CHANGES_FLOOR_KEYS: [&str; 2] = [REVISION, LOG_FLOOR];
/// This store's epoch: random, set when the store is created, restored or
/// recovered. Revisions compare only within one epoch.
const EPOCH: &str = "epoch";
/// For a restored or recovered store: the epoch and revision it was rebuilt
/// from. A subscriber of that epoch holding a later revision lost state.
const PARENT_EPOCH: &str = "parent_epoch";
const PARENT_REVISION: &str = "parent_revision";
/// Config history below this revision is not held (a store recovered from
/// a replica): rollback cannot reach it.
const HISTORY_FLOOR: &str = "history_floor";

/// A fresh epoch: random and never 0 (0 means "no epoch" on the wire).
pub fn new_epoch() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random source works");
    u64::from_le_bytes(b).max(1)
}

/// Where a store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A redb file, this process's alone.
    File(PathBuf),
    /// A PostgreSQL database (its URL), shared by every instance naming it.
    Postgres(String),
}

/// Never the URL: it may hold a password.
impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => f.debug_tuple("File").field(p).finish(),
            Location::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl Location {
    pub fn engine(&self) -> &'static str {
        match self {
            Location::File(_) => "redb",
            Location::Postgres(_) => "postgres",
        }
    }
}

/// Where a restored or recovered store came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub epoch: u64,
    pub revision: u64,
}

/// The part of a claim's HMAC that a replica keeps: its first 128 bits.
pub fn hmac_prefix(hmac: &str) -> Option<u128> {
    hmac.get(..32)
        .and_then(|p| u128::from_str_radix(p, 16).ok())
}

pub fn config_row_key(key: &str, region: &str) -> String {
    format!("{key}\u{0}{region}")
}

enum Engine {
    Redb(Database),
    Postgres(Box<postgres::Pg>),
}

/// One consistent read-only view, on either engine.
enum View {
    Redb(RedbRead),
    Postgres(postgres::PgTx),
}

impl View {
    fn tables(&self) -> &dyn Read {
        match self {
            View::Redb(r) => r,
            View::Postgres(r) => r,
        }
    }
}

pub struct Store {
    engine: Engine,
    epoch: u64,
    parent: Option<Parent>,
    revision_tx: watch::Sender<u64>,
    /// False while this instance cannot reach a shared store: its Watch
    /// streams end, so their subscribers fail over to an instance that can.
    healthy_tx: watch::Sender<bool>,
    /// Snapshots and backups streaming at once: each holds a connection
    /// of the shared store's pool for as long as its reader takes.
    streams: std::sync::Arc<tokio::sync::Semaphore>,
    /// How many change sets the log keeps before compacting the oldest.
    retain_changes: u64,
    /// On redb, the revision known to be on disk. Mutations commit without
    /// an fsync; [`Store::make_durable`] then syncs every commit made so far
    /// in one, so concurrent mutations share an fsync (group commit). No
    /// revision leaves the process (an answer, a delta, a snapshot) before
    /// it is on disk. Held while syncing: who waits here is covered by the
    /// sync that follows.
    durable: std::sync::Mutex<u64>,
}

/// How a write transaction commits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Durable when the commit returns, after waiting for PostgreSQL's
    /// revision lock.
    Revision,
    /// Durable, without the revision lock: rows no subscriber sees.
    Bookkeeping,
    /// A mutation: on redb not yet durable (the caller then calls
    /// [`Store::make_durable`]); on PostgreSQL as `Revision`.
    Grouped,
}

/// The write side of one mutation. Records every change it makes.
pub struct Tx<'a> {
    t: &'a mut dyn Write,
    /// Rows written that are no change to subscribers: committed even when
    /// `changes` is empty.
    bookkept: bool,
    revision: u64,
    at_unix_ms: i64,
    actor: &'a str,
    changes: Vec<Change>,
}

impl Tx<'_> {
    /// The revision this transaction started from.
    pub fn current_revision(&self) -> u64 {
        self.revision - 1
    }

    /// How many changes this transaction has made so far.
    pub fn changes_made(&self) -> usize {
        self.changes.len()
    }

    pub fn region(&self, id: &str) -> Result<Option<Region>, CodedError> {
        self.t.region(id)
    }

    pub fn regions(&self) -> Result<Vec<Region>, CodedError> {
        self.t.regions()
    }

    pub fn put_region(&mut self, mut region: Region) -> Result<Region, CodedError> {
        region.revision = self.revision;
        self.t.put_region(&region)?;
        self.changes.push(Change {
            kind: Some(change::Kind::RegionUpserted(region.clone())),
        });
        Ok(region)
    }

    pub fn claim(&self, hmac: &str) -> Result<Option<IdentifierClaim>, CodedError> {
        self.t.claim(hmac)
    }

    /// Stores a new claim (the caller checked the HMAC is free) and counts
    /// it on its user, homing the user at its first claim.
    pub fn put_claim(&mut self, claim: IdentifierClaim) -> Result<(), CodedError> {
        self.t.put_claim(&claim)?;
        let before = count_claim(self.t, &claim.user_id, &claim.region)?;
        let homed = before.is_none_or(|region| region != claim.region);
        let user = DirectoryUser {
            user_id: claim.user_id.clone(),
            region: claim.region.clone(),
        };
        self.changes.push(Change {
            kind: Some(change::Kind::IdentifierClaimed(claim)),
        });
        if homed {
            self.changes.push(Change {
                kind: Some(change::Kind::UserHomed(user)),
            });
        }
        Ok(())
    }

    /// The region holding a reservation on this HMAC's prefix, if any. For
    /// a store recovered from a replica: until that region asserts its
    /// claims again, no other region may claim an identifier with that
    /// prefix (a rogue cell would otherwise take identifiers the moment the
    /// directory comes back empty).
    pub fn reservation(&self, hmac: &str) -> Result<Option<String>, CodedError> {
        match hmac_prefix(hmac) {
            Some(prefix) => self.t.reservation(prefix),
            None => Ok(None),
        }
    }

    /// Drops the reservation on this HMAC's prefix (its claim is back).
    pub fn unreserve(&mut self, hmac: &str) -> Result<(), CodedError> {
        match hmac_prefix(hmac) {
            Some(prefix) => self.t.unreserve(prefix),
            None => Ok(()),
        }
    }

    /// Drops every reservation of `region` (its cell has asserted all its
    /// claims; what is left was released since). Returns how many.
    pub fn drop_reservations(&mut self, region: &str) -> Result<u64, CodedError> {
        let dropped = self.t.drop_reservations(region)?;
        self.bookkept |= dropped > 0;
        Ok(dropped)
    }

    /// The region a user is homed in, if the directory holds the user.
    pub fn user_home(&self, user_id: &str) -> Result<Option<String>, CodedError> {
        Ok(self.t.user(user_id)?.map(|u| u.0))
    }

    /// Points an existing claim at another region.
    pub fn rehome_claim(
        &mut self,
        mut claim: IdentifierClaim,
        region: &str,
    ) -> Result<(), CodedError> {
        claim.region = region.to_string();
        self.t.put_claim(&claim)?;
        self.changes.push(Change {
            kind: Some(change::Kind::IdentifierClaimed(claim)),
        });
        Ok(())
    }

    /// Homes an existing user in another region.
    pub fn rehome_user(&mut self, user_id: &str, region: &str) -> Result<(), CodedError> {
        let count = self.t.user(user_id)?.map_or(0, |u| u.1);
        self.t.put_user(user_id, region, count)?;
        self.changes.push(Change {
            kind: Some(change::Kind::UserHomed(DirectoryUser {
                user_id: user_id.to_string(),
                region: region.to_string(),
            })),
        });
        Ok(())
    }

    /// Removes a claim; a user whose last claim it was leaves the directory.
    pub fn delete_claim(&mut self, hmac: &str) -> Result<(), CodedError> {
        let Some(old) = self.t.remove_claim(hmac)? else {
            return Ok(());
        };
        self.changes.push(Change {
            kind: Some(change::Kind::IdentifierReleased(hmac.to_string())),
        });
        match self.t.user(&old.user_id)? {
            Some((region, count)) if count > 1 => {
                self.t.put_user(&old.user_id, &region, count - 1)?;
            }
            _ => {
                self.t.remove_user(&old.user_id)?;
                self.changes.push(Change {
                    kind: Some(change::Kind::UserRemoved(old.user_id)),
                });
            }
        }
        Ok(())
    }

    pub fn config(&self, key: &str, region: &str) -> Result<Option<ConfigEntry>, CodedError> {
        self.t.config(&config_row_key(key, region))
    }

    pub fn config_entries(&self) -> Result<Vec<ConfigEntry>, CodedError> {
        self.t.config_entries()
    }

    pub fn set_config(&mut self, mut entry: ConfigEntry) -> Result<ConfigEntry, CodedError> {
        entry.revision = self.revision;
        let row = config_row_key(&entry.key, &entry.region);
        self.t.put_config(&row, &entry)?;
        self.record_history(&row, &entry.key, &entry.region, entry.value.clone())?;
        self.changes.push(Change {
            kind: Some(change::Kind::ConfigSet(entry.clone())),
        });
        Ok(entry)
    }

    pub fn delete_config(&mut self, key: &str, region: &str) -> Result<(), CodedError> {
        let row = config_row_key(key, region);
        self.t.remove_config(&row)?;
        self.record_history(&row, key, region, None)?;
        self.changes.push(Change {
            kind: Some(change::Kind::ConfigDeleted(ConfigKey {
                key: key.to_string(),
                region: region.to_string(),
            })),
        });
        Ok(())
    }

    fn record_history(
        &mut self,
        row: &str,
        key: &str,
        region: &str,
        value: Option<homecell_proto::control::ConfigValue>,
    ) -> Result<(), CodedError> {
        let h = ConfigHistoryEntry {
            key: key.to_string(),
            region: region.to_string(),
            deleted: value.is_none(),
            value,
            revision: self.revision,
            at_unix_ms: self.at_unix_ms,
            actor: self.actor.to_string(),
        };
        self.t.put_history(row, &h)
    }

    /// (user id, home region) after `after`, in user id order.
    pub fn users_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, CodedError> {
        self.t.users_page(after, limit)
    }

    /// The move journal's rows are bookkeeping: no subscriber sees them
    /// (the cut-over's directory change is what they see).
    pub fn move_record(&self, id: &str) -> Result<Option<MoveRecord>, CodedError> {
        self.t.move_record(id)
    }

    pub fn moves_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MoveRecord>, CodedError> {
        self.t.moves_page(after, limit)
    }

    pub fn open_move_of(&self, user_id: &str) -> Result<Option<String>, CodedError> {
        self.t.open_move_of(user_id)
    }

    pub fn open_moves_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MoveRecord>, CodedError> {
        self.t.open_moves_page(after, limit)
    }

    pub fn put_move(&mut self, mut m: MoveRecord) -> Result<MoveRecord, CodedError> {
        m.updated_unix_ms = self.at_unix_ms;
        self.t.put_move(&m)?;
        self.bookkept = true;
        Ok(m)
    }

    pub fn batch(&self, id: &str) -> Result<Option<MoveBatch>, CodedError> {
        self.t.batch(id)
    }

    pub fn batches(&self) -> Result<Vec<MoveBatch>, CodedError> {
        self.t.batches()
    }

    pub fn put_batch(&mut self, b: MoveBatch) -> Result<MoveBatch, CodedError> {
        self.t.put_batch(&b)?;
        self.bookkept = true;
        Ok(b)
    }

    /// When this transaction runs (unix ms).
    pub fn now_unix_ms(&self) -> i64 {
        self.at_unix_ms
    }

    /// Who runs it.
    pub fn actor(&self) -> &str {
        self.actor
    }

    /// Every config row's state as of `revision`: (key, region) → entry, from
    /// the history table. Refused below the history this store holds.
    pub fn config_at(&self, revision: u64) -> Result<Vec<ConfigHistoryEntry>, CodedError> {
        let floor = self.t.meta(HISTORY_FLOOR)?;
        if revision < floor {
            return Err(CodedError::new(
                homecell_proto::error::ErrorCode::FailedPrecondition,
                format!("config history before revision {floor} was not recovered"),
            ));
        }
        let mut latest = std::collections::BTreeMap::new();
        for (row, h) in self.t.history_upto(revision)? {
            latest.insert(row, h);
        }
        Ok(latest.into_values().filter(|h| !h.deleted).collect())
    }
}

/// What a write transaction's body decided.
enum Outcome {
    /// Nothing to keep.
    Abort,
    /// Rows to keep that are no revision.
    Bookkeeping,
    /// A change set, committed as this revision.
    Revision(u64),
}

/// Opens a redb store's tables, deriving what older files lack. Returns
/// the epoch and parent.
fn prepare(t: &mut dyn Write) -> Result<(u64, Option<Parent>), CodedError> {
    // A store from before epochs gets its first one here.
    let epoch = match t.meta(EPOCH)? {
        0 => {
            let e = new_epoch();
            t.set_meta(EPOCH, e)?;
            e
        }
        e => e,
    };
    let parent = match (t.meta(PARENT_EPOCH)?, t.meta(PARENT_REVISION)?) {
        (0, _) => None,
        (epoch, revision) => Some(Parent { epoch, revision }),
    };
    Ok((epoch, parent))
}

impl Store {
    /// Opens (or creates) the store at `location`. PostgreSQL needs a
    /// multi-threaded tokio runtime: its queries block from synchronous code.
    pub async fn open_at(location: &Location, retain_changes: u64) -> anyhow::Result<Self> {
        match location {
            Location::File(path) => Self::open(path, retain_changes),
            Location::Postgres(url) => {
                let engine = Engine::Postgres(Box::new(postgres::Pg::connect(url).await?));
                Self::on_engine(engine, retain_changes)
            }
        }
    }

    /// A store over a connected PostgreSQL database: its epoch is made
    /// here if the database has none yet.
    fn on_engine(engine: Engine, retain_changes: u64) -> anyhow::Result<Self> {
        let ((epoch, parent, revision), _) = tokio::task::block_in_place(|| {
            Self::write(&engine, |t| {
                let (epoch, parent) = prepare(t)?;
                Ok(((epoch, parent, t.meta(REVISION)?), Outcome::Bookkeeping))
            })
        })?;
        Ok(Self::new(engine, epoch, parent, revision, retain_changes))
    }

    /// Opens (or creates) a redb store.
    pub fn open(path: &Path, retain_changes: u64) -> anyhow::Result<Self> {
        let db = Database::create(path)
            .map_err(|e| anyhow::anyhow!("cannot open the store {}: {e}", path.display()))?;
        let txn = db.begin_write()?;
        let (epoch, parent, revision) = {
            redb_tables::create_all(&txn)?;
            derive_users(&txn)?;
            let mut w = RedbWrite(&txn);
            let (epoch, parent) = prepare(&mut w)?;
            (epoch, parent, w.meta(REVISION)?)
        };
        txn.commit()?;
        Ok(Self::new(
            Engine::Redb(db),
            epoch,
            parent,
            revision,
            retain_changes,
        ))
    }

    fn new(
        engine: Engine,
        epoch: u64,
        parent: Option<Parent>,
        revision: u64,
        retain_changes: u64,
    ) -> Self {
        let (revision_tx, _) = watch::channel(revision);
        let (healthy_tx, _) = watch::channel(true);
        let streams = match engine {
            Engine::Redb(_) => tokio::sync::Semaphore::MAX_PERMITS,
            Engine::Postgres(_) => STREAMS_ON_POSTGRES,
        };
        Self {
            streams: std::sync::Arc::new(tokio::sync::Semaphore::new(streams)),
            engine,
            epoch,
            parent,
            revision_tx,
            healthy_tx,
            retain_changes: retain_changes.max(1),
            durable: std::sync::Mutex::new(revision),
        }
    }

    /// "redb" or "postgres".
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::Redb(_) => "redb",
            Engine::Postgres(_) => "postgres",
        }
    }

    pub fn revision(&self) -> u64 {
        *self.revision_tx.borrow()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch and revision this store was restored or recovered from.
    pub fn parent(&self) -> Option<Parent> {
        self.parent
    }

    /// A turn to stream a snapshot or backup (see `streams`), or None
    /// after 10 s of waiting: the caller answers UNAVAILABLE and the
    /// subscriber tries again (or another instance), instead of queueing
    /// behind streams whose readers take their time.
    pub async fn stream_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.streams.clone().acquire_owned(),
        )
        .await
        .ok()
        .map(|p| p.expect("the semaphore is never closed"))
    }

    /// Notified with each committed revision (this instance's, and on
    /// PostgreSQL every instance's once [`Store::follow`] sees it).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Moves the revision subscribers see forward (never back: commits and
    /// notifications from other instances arrive in any order).
    fn advance(&self, revision: u64) {
        self.revision_tx.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }

    /// One write transaction on either engine: `f` reads and writes, and
    /// says whether to keep what it wrote.
    fn write<T>(
        engine: &Engine,
        f: impl FnOnce(&mut dyn Write) -> Result<(T, Outcome), CodedError>,
    ) -> Result<(T, Outcome), CodedError> {
        Self::write_with(engine, Commit::Revision, f)
    }

    /// [`Store::write`], committed as `commit` says.
    fn write_with<T>(
        engine: &Engine,
        commit: Commit,
        f: impl FnOnce(&mut dyn Write) -> Result<(T, Outcome), CodedError>,
    ) -> Result<(T, Outcome), CodedError> {
        match engine {
            Engine::Redb(db) => {
                let mut txn = db.begin_write().map_err(storage)?;
                if commit == Commit::Grouped {
                    txn.set_durability(redb::Durability::None)
                        .map_err(storage)?;
                }
                let (out, outcome) = f(&mut RedbWrite(&txn))?;
                if commit == Commit::Grouped && matches!(outcome, Outcome::Bookkeeping) {
                    // No new revision for make_durable to wait on: this
                    // one syncs itself (and every commit before it).
                    txn.set_durability(redb::Durability::Immediate)
                        .map_err(storage)?;
                }
                match outcome {
                    Outcome::Abort => txn.abort().map_err(storage)?,
                    _ => txn.commit().map_err(storage)?,
                }
                Ok((out, outcome))
            }
            Engine::Postgres(pg) => {
                let mut txn = pg.begin_write(commit != Commit::Bookkeeping)?;
                let (out, outcome) = f(&mut txn)?;
                // Dropping an uncommitted transaction rolls it back.
                if !matches!(outcome, Outcome::Abort) {
                    txn.commit()?;
                }
                Ok((out, outcome))
            }
        }
    }

    /// A consistent read-only view. On redb, of durable state only: a view
    /// that sees a commit not yet synced syncs it first.
    fn view(&self) -> Result<View, CodedError> {
        Ok(match &self.engine {
            Engine::Redb(db) => {
                let view = RedbRead(db.begin_read().map_err(storage)?);
                self.make_durable(view.meta(REVISION)?)?;
                View::Redb(view)
            }
            Engine::Postgres(pg) => View::Postgres(pg.begin_read()?),
        })
    }

    /// On redb: returns once `revision` is on disk, syncing every commit
    /// made so far if it is not yet. Then subscribers may see it. A no-op
    /// on PostgreSQL, whose commits are durable (and grouped) already.
    fn make_durable(&self, revision: u64) -> Result<(), CodedError> {
        let Engine::Redb(db) = &self.engine else {
            return Ok(());
        };
        let mut durable = self
            .durable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *durable >= revision {
            return Ok(());
        }
        // A durable commit makes the non-durable ones before it durable
        // too. It writes the head again so that it is never empty.
        let txn = db.begin_write().map_err(storage)?;
        let head = {
            let mut w = RedbWrite(&txn);
            let head = w.meta(REVISION)?;
            w.set_meta(REVISION, head)?;
            head
        };
        if let Err(e) = txn.commit() {
            // Like PostgreSQL after a failed fsync: what is on disk is
            // unknown, every later write would fail, and reads would show
            // commits that may not be there. Only a restart (redb repairs
            // the file, dropping commits no one outside has seen) is safe.
            tracing::error!(error = %e, "the store could not sync its commits to disk; exiting");
            std::process::exit(70);
        }
        *durable = head;
        drop(durable);
        self.advance(head);
        Ok(())
    }

    /// Runs `f` in one write transaction. Returns its result and the revision
    /// it committed (the current one when `f` changed nothing). On error
    /// nothing is written. Returns (an answer or an error) only once what
    /// `f` saw and wrote is on disk: no caller acts on state a crash could
    /// take back.
    pub fn mutate<T>(
        &self,
        actor: &str,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, CodedError>,
    ) -> Result<(T, u64), CodedError> {
        let mut seen = 0;
        let written = self.mutate_grouped(actor, &mut seen, f);
        // An error may rest on what `f` read: that must be durable too.
        let revision = match &written {
            Ok((_, revision)) => *revision,
            Err(_) => seen,
        };
        self.make_durable(revision)?;
        let (out, revision) = written?;
        self.advance(revision);
        Ok((out, revision))
    }

    /// [`Store::mutate`]'s transaction, committed without waiting for the
    /// disk on redb. Sets `seen` to the revision it started from.
    fn mutate_grouped<T>(
        &self,
        actor: &str,
        seen: &mut u64,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, CodedError>,
    ) -> Result<(T, u64), CodedError> {
        let retain = self.retain_changes;
        let ((out, current), outcome) = Self::write_with(&self.engine, Commit::Grouped, |t| {
            let current = t.meta(REVISION)?;
            *seen = current;
            let next = current + 1;
            let at_unix_ms = now_ms();
            let mut tx = Tx {
                t,
                bookkept: false,
                revision: next,
                at_unix_ms,
                actor,
                changes: Vec::new(),
            };
            let out = f(&mut tx)?;
            let changes = std::mem::take(&mut tx.changes);
            if changes.is_empty() {
                // Bookkeeping that subscribers never see (a recovered
                // store's reservations) commits without a revision.
                let outcome = if tx.bookkept {
                    Outcome::Bookkeeping
                } else {
                    Outcome::Abort
                };
                return Ok(((out, current), outcome));
            }
            let t = tx.t;
            t.put_change(&ChangeSet {
                revision: next,
                changes,
                at_unix_ms,
                actor: actor.to_string(),
            })?;
            t.set_meta(REVISION, next)?;
            let floor = t.meta(LOG_FLOOR)?;
            if next - floor > retain {
                let new_floor = next - retain;
                t.trim_changes(new_floor)?;
                t.set_meta(LOG_FLOOR, new_floor)?;
            }
            Ok(((out, current), Outcome::Revision(next)))
        })?;
        match outcome {
            Outcome::Revision(next) => Ok((out, next)),
            _ => Ok((out, current)),
        }
    }

    /// Runs read-only `f` against a consistent view (a transaction that is
    /// then dropped, so reads share the mutation helpers).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, CodedError>,
    ) -> Result<(T, u64), CodedError> {
        let Engine::Postgres(pg) = &self.engine else {
            // redb: a write transaction, aborted (f changes nothing).
            return self.mutate("read", |tx| f(tx));
        };
        // PostgreSQL: a read-only view, so reads never wait for the
        // revision lock that writers take turns on.
        let mut view = pg.begin_read()?;
        let revision = view.meta(REVISION)?;
        let tx = Tx {
            t: &mut view,
            bookkept: false,
            revision: revision + 1,
            at_unix_ms: now_ms(),
            actor: "read",
            changes: Vec::new(),
        };
        Ok((f(&tx)?, revision))
    }

    /// The whole state in parts of at most `rows_per_part` directory rows,
    /// from one read transaction (a consistent view however long the sending
    /// takes). `emit` returns false to stop early (the subscriber left).
    pub fn snapshot_parts(
        &self,
        rows_per_part: usize,
        mut emit: impl FnMut(Snapshot) -> bool,
    ) -> Result<(), CodedError> {
        let rows_per_part = rows_per_part.max(1);
        let view = self.view()?;
        let t = view.tables();
        let revision = t.meta(REVISION)?;
        let mut part = Snapshot {
            revision,
            regions: t.regions()?,
            config: t.config_entries()?,
            more: true,
            users_total: t.users_len()?,
            claims_total: t.claims_len()?,
            epoch: self.epoch,
            parent_epoch: self.parent.map_or(0, |p| p.epoch),
            parent_revision: self.parent.map_or(0, |p| p.revision),
            ..Default::default()
        };
        let mut full = |part: &mut Snapshot| {
            let next = Snapshot {
                revision,
                epoch: part.epoch,
                parent_epoch: part.parent_epoch,
                parent_revision: part.parent_revision,
                more: true,
                ..Default::default()
            };
            emit(std::mem::replace(part, next))
        };
        let mut after: Option<String> = None;
        loop {
            let page = t.users_page(after.as_deref(), PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (user_id, region) in page {
                part.users.push(DirectoryUser { user_id, region });
                if part.users.len() == rows_per_part && !full(&mut part) {
                    return Ok(());
                }
            }
        }
        let mut after: Option<String> = None;
        loop {
            let page = t.claims_page(after.as_deref(), PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.hmac.clone());
            for claim in page {
                part.claims.push(claim);
                if part.users.len() + part.claims.len() >= rows_per_part && !full(&mut part) {
                    return Ok(());
                }
            }
        }
        part.more = false;
        emit(part);
        Ok(())
    }

    /// The whole state in one message (tests and small tools).
    pub fn snapshot(&self) -> Result<Snapshot, CodedError> {
        let mut whole = Snapshot::default();
        self.snapshot_parts(usize::MAX, |part| {
            whole.revision = part.revision;
            whole.epoch = part.epoch;
            whole.regions.extend(part.regions);
            whole.config.extend(part.config);
            whole.users.extend(part.users);
            whole.claims.extend(part.claims);
            true
        })?;
        Ok(whole)
    }

    /// Loads many claims at once (bringing an existing user base into the
    /// directory): one transaction and one new revision, without a change
    /// per claim. The log is cut at that revision, so every subscriber
    /// catches up by snapshot. Claims whose HMAC is taken are refused, all
    /// or nothing. Returns the new revision.
    pub fn import_claims(
        &self,
        claims: impl IntoIterator<Item = IdentifierClaim>,
    ) -> Result<u64, CodedError> {
        let (next, _) = Self::write(&self.engine, |t| {
            let next = t.meta(REVISION)? + 1;
            let regions = t.regions()?;
            for c in claims {
                if !regions.iter().any(|r| r.id == c.region) {
                    return Err(CodedError::invalid(format!("unknown region {}", c.region)));
                }
                if c.hmac.len() != 64 || c.user_id.is_empty() || c.user_id.len() > 64 {
                    return Err(CodedError::invalid(
                        "a claim needs a 64-hex-digit hmac and a user id",
                    ));
                }
                if t.put_claim(&c)? {
                    return Err(CodedError::new(
                        homecell_proto::error::ErrorCode::AlreadyExists,
                        "an imported identifier is already registered",
                    ));
                }
                count_claim(t, &c.user_id, &c.region)?;
            }
            t.trim_changes(u64::MAX)?;
            t.put_change(&ChangeSet {
                revision: next,
                at_unix_ms: now_ms(),
                actor: "import".into(),
                changes: Vec::new(),
            })?;
            t.set_meta(REVISION, next)?;
            t.set_meta(LOG_FLOOR, next)?;
            Ok((next, Outcome::Revision(next)))
        })?;
        self.advance(next);
        Ok(next)
    }

    /// Change sets after `revision`, at most `max`; `None` when the log no
    /// longer reaches back that far (the caller then sends a snapshot).
    pub fn changes_after(
        &self,
        revision: u64,
        max: usize,
    ) -> Result<Option<Vec<ChangeSet>>, CodedError> {
        let view = self.view()?;
        let t = view.tables();
        let floor = t.meta(LOG_FLOOR)?;
        let current = t.meta(REVISION)?;
        if revision < floor || revision > current {
            return Ok(None);
        }
        Ok(Some(t.changes_after(revision, max)?))
    }

    /// Config history, newest first, optionally for one key.
    pub fn config_history(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Vec<ConfigHistoryEntry>, CodedError> {
        self.view()?.tables().history_newest(key, limit)
    }

    /// Writes subscriber rows, all in one transaction (one fsync).
    pub fn save_subscribers(&self, rows: &[SubscriberStatus]) -> Result<(), CodedError> {
        Self::write_with(&self.engine, Commit::Bookkeeping, |t| {
            for s in rows {
                t.put_subscriber(s)?;
            }
            Ok(((), Outcome::Bookkeeping))
        })?;
        Ok(())
    }

    pub fn subscribers(&self) -> Result<Vec<SubscriberStatus>, CodedError> {
        self.view()?.tables().subscribers()
    }
}

/// Rows per query when a snapshot or backup walks a table.
const PAGE: usize = 1024;
/// Snapshots and backups one instance streams at once from PostgreSQL:
/// well under its pool of 16, so mutations and deltas always get a
/// connection.
const STREAMS_ON_POSTGRES: usize = 6;

/// A redb store from before the users table: derive it once from the claims.
fn derive_users(txn: &redb::WriteTransaction) -> anyhow::Result<()> {
    use redb::{ReadableTable, ReadableTableMetadata};
    use redb_tables::{CLAIMS, USERS};
    if !txn.open_table(USERS)?.is_empty()? || txn.open_table(CLAIMS)?.is_empty()? {
        return Ok(());
    }
    let claims: Vec<IdentifierClaim> = {
        let t = txn.open_table(CLAIMS)?;
        let mut v = Vec::new();
        for row in t.iter()? {
            v.push(redb_tables::decode(row?.1.value())?);
        }
        v
    };
    let mut w = RedbWrite(txn);
    for c in claims {
        count_claim(&mut w, &c.user_id, &c.region)?;
    }
    Ok(())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use homecell_proto::control::RegionStatus;
    use prost::Message;

    fn region(id: &str) -> Region {
        Region {
            id: id.into(),
            status: RegionStatus::Active as i32,
            ..Default::default()
        }
    }

    /// Group commit: a mutation answers only once its revision is synced,
    /// and subscribers never hear of one that is not, however many
    /// threads commit at once.
    #[test]
    fn nothing_leaves_before_it_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(&dir.path().join("cp.redb"), 100).unwrap());
        let synced = |s: &Store| *s.durable.lock().unwrap();
        let heard = s.subscribe();
        std::thread::scope(|scope| {
            for t in 0..8 {
                let s = s.clone();
                scope.spawn(move || {
                    for n in 0..50 {
                        let (_, r) = s
                            .mutate("t", |tx| tx.put_region(region(&format!("r{t}-{n}"))))
                            .unwrap();
                        assert!(synced(&s) >= r, "answered {r} before it was synced");
                    }
                });
            }
            let s = s.clone();
            scope.spawn(move || {
                let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while s.revision() < 400 && std::time::Instant::now() < give_up {
                    let told = *heard.borrow();
                    assert!(
                        told <= synced(&s),
                        "subscribers heard of {told} before it was synced"
                    );
                }
            });
        });
        assert_eq!(s.revision(), 400);
        assert_eq!(synced(&s), 400);
    }

    #[test]
    fn failed_or_empty_mutation_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("cp.redb"), 100).unwrap();
        let (_, r) = s
            .mutate("t", |tx| tx.put_region(region("cn-east")))
            .unwrap();
        assert_eq!(r, 1);
        let err = s.mutate("t", |tx| {
            tx.put_region(region("eu-west"))?;
            Err::<(), _>(CodedError::invalid("no"))
        });
        assert!(err.is_err());
        let (_, r) = s.mutate("t", |_| Ok(())).unwrap();
        assert_eq!(r, 1);
        assert_eq!(s.snapshot().unwrap().regions.len(), 1);
    }

    #[test]
    fn log_is_compacted_and_old_readers_get_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("cp.redb"), 3).unwrap();
        for i in 0..6 {
            s.mutate("t", |tx| tx.put_region(region(&format!("r{i}"))))
                .unwrap();
        }
        assert_eq!(s.revision(), 6);
        assert!(s.changes_after(1, 10).unwrap().is_none());
        let tail = s.changes_after(3, 10).unwrap().unwrap();
        assert_eq!(
            tail.iter().map(|c| c.revision).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        assert!(s.changes_after(7, 10).unwrap().is_none());
    }

    fn claim(hmac: &str, user: &str) -> IdentifierClaim {
        IdentifierClaim {
            hmac: hmac.repeat(64 / hmac.len()),
            user_id: user.into(),
            region: "cn-east".into(),
        }
    }

    fn kinds(s: &Store, revision: u64) -> Vec<change::Kind> {
        s.changes_after(revision - 1, 1).unwrap().unwrap()[0]
            .changes
            .iter()
            .filter_map(|c| c.kind.clone())
            .collect()
    }

    #[test]
    fn a_user_is_homed_by_its_first_claim_and_removed_with_its_last() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("cp.redb"), 100).unwrap();
        s.mutate("t", |tx| tx.put_region(region("cn-east")))
            .unwrap();
        let (_, r) = s.mutate("t", |tx| tx.put_claim(claim("a", "u1"))).unwrap();
        assert!(
            matches!(&kinds(&s, r)[..], [change::Kind::IdentifierClaimed(_), change::Kind::UserHomed(u)] if u.user_id == "u1")
        );
        let (_, r) = s.mutate("t", |tx| tx.put_claim(claim("b", "u1"))).unwrap();
        assert_eq!(kinds(&s, r).len(), 1, "a second claim does not re-home");
        let (_, r) = s
            .mutate("t", |tx| tx.delete_claim(&"a".repeat(64)))
            .unwrap();
        assert_eq!(kinds(&s, r).len(), 1, "u1 still holds b");
        assert_eq!(s.snapshot().unwrap().users.len(), 1);
        let (_, r) = s
            .mutate("t", |tx| tx.delete_claim(&"b".repeat(64)))
            .unwrap();
        assert!(
            matches!(&kinds(&s, r)[..], [change::Kind::IdentifierReleased(_), change::Kind::UserRemoved(u)] if u == "u1")
        );
        assert!(s.snapshot().unwrap().users.is_empty());
    }

    /// A store written before the users table existed gets it on open.
    #[test]
    fn the_users_table_is_derived_from_older_stores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut claims = txn.open_table(redb_tables::CLAIMS).unwrap();
                for (h, u) in [("a", "u1"), ("b", "u1"), ("c", "u2")] {
                    let c = claim(h, u);
                    claims
                        .insert(c.hmac.as_str(), c.encode_to_vec().as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let s = Store::open(&path, 100).unwrap();
        let users = s.snapshot().unwrap().users;
        let ids: Vec<&str> = users.iter().map(|u| u.user_id.as_str()).collect();
        assert_eq!(ids, ["u1", "u2"]);
        // Counts were derived too: u1 leaves only with its second claim.
        let (_, r) = s
            .mutate("t", |tx| tx.delete_claim(&"a".repeat(64)))
            .unwrap();
        assert_eq!(kinds(&s, r).len(), 1);
        let (_, r) = s
            .mutate("t", |tx| tx.delete_claim(&"b".repeat(64)))
            .unwrap();
        assert_eq!(kinds(&s, r).len(), 2);
    }

    #[test]
    fn snapshots_come_in_parts_and_imports_cut_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("cp.redb"), 100).unwrap();
        s.mutate("t", |tx| tx.put_region(region("cn-east")))
            .unwrap();
        let imported: Vec<_> = (0..25u32)
            .map(|i| claim(&format!("{i:02x}"), &format!("u{}", i / 2)))
            .collect();
        let r = s.import_claims(imported.clone()).unwrap();
        assert_eq!(r, 2);
        assert!(
            s.changes_after(1, 10).unwrap().is_none(),
            "behind the import: snapshot"
        );
        assert!(s.import_claims([imported[0].clone()]).is_err(), "taken");
        assert!(
            s.import_claims([IdentifierClaim {
                region: "nowhere".into(),
                ..claim("ff", "x")
            }])
            .is_err()
        );
        let mut parts = Vec::new();
        s.snapshot_parts(10, |p| {
            parts.push(p);
            true
        })
        .unwrap();
        let more: Vec<bool> = parts.iter().map(|p| p.more).collect();
        assert_eq!(more, [true, true, true, false]); // 13 users + 25 claims, 10 a part
        assert_eq!((parts[0].users_total, parts[0].claims_total), (13, 25));
        assert_eq!(parts[0].regions.len(), 1);
        assert!(parts.iter().all(|p| p.revision == r));
        let claims: Vec<_> = parts.iter().flat_map(|p| p.claims.clone()).collect();
        assert_eq!(claims, imported, "every claim once, in key order");
        // A receiver that leaves stops the walk.
        let mut sent = 0;
        s.snapshot_parts(10, |_| {
            sent += 1;
            false
        })
        .unwrap();
        assert_eq!(sent, 1);
    }
}
