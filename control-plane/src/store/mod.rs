//! The control plane's redb store: the authoritative state plus the revisioned
//! change log that subscribers replicate.
//!
//! Every mutation runs in one write transaction through [`Store::mutate`]:
//! validation reads and the writes it decides happen under the same lock, the
//! changes are appended to the log under the next revision, and a mutation
//! that fails (or changes nothing) writes nothing at all.
//!
//! Why one file of this length: the tables and the one write path belong
//! together; splitting them would put the one-transaction invariant in two
//! places. Its tests follow the code.

use homecell_proto::control::{
    Change, ChangeSet, ConfigEntry, ConfigHistoryEntry, ConfigKey, DirectoryUser, IdentifierClaim,
    Region, Snapshot, SubscriberStatus, change,
};
use homecell_proto::error::CodedError;
use prost::Message;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use std::path::Path;
use tokio::sync::watch;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REGIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("regions");
const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");
/// (revision, config row key) → ConfigHistoryEntry. Never compacted: it is
/// what rollback reads.
const CONFIG_HISTORY: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("config_history");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const SUBSCRIBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscribers");
/// HMAC(identifier) → IdentifierClaim.
const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// user id → (home region, claims held): the directory's user entries,
/// derived from the claims in the same transactions.
const USERS: TableDefinition<&str, (&str, u32)> = TableDefinition::new("users");
/// For a store recovered from a replica: the first 128 bits of each claim's
/// HMAC (all a replica keeps) → the region that held it. Until that region
/// asserts its claims again, no other region may claim an identifier with
/// that prefix (a rogue cell would otherwise take identifiers the moment
/// the directory comes back empty).
const RESERVED: TableDefinition<u128, &str> = TableDefinition::new("reserved_claims");

const REVISION: &str = "revision";
/// Revisions at or below the floor have been compacted out of the log.
const LOG_FLOOR: &str = "log_floor";
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

mod rebuild;
pub use rebuild::{BACKUP_FORMAT, Rebuilder};

/// A fresh epoch: random and never 0 (0 means "no epoch" on the wire).
pub fn new_epoch() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random source works");
    u64::from_le_bytes(b).max(1)
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

fn storage(e: impl std::fmt::Display) -> CodedError {
    tracing::error!(error = %e, "control-plane store failure");
    CodedError::internal(format!("store failure: {e}"))
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, CodedError> {
    M::decode(bytes).map_err(storage)
}

/// The message stored under `key`, if any.
fn row<M: Message + Default>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<M>, CodedError> {
    let v = t.get(key).map_err(storage)?;
    v.map(|v| decode(v.value())).transpose()
}

/// Every message in a table, in key order.
fn rows<M: Message + Default>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<M>, CodedError> {
    let mut out = Vec::new();
    for r in t.iter().map_err(storage)? {
        out.push(decode(r.map_err(storage)?.1.value())?);
    }
    Ok(out)
}

/// A counter in the meta table (0 when unset).
fn meta_value(meta: &impl ReadableTable<&'static str, u64>, key: &str) -> Result<u64, CodedError> {
    Ok(meta.get(key).map_err(storage)?.map_or(0, |v| v.value()))
}

/// Counts one more claim on `user_id` and homes it in `region`; returns the
/// region the user was homed in before, if the directory held it.
fn count_claim(
    users: &mut redb::Table<&str, (&str, u32)>,
    user_id: &str,
    region: &str,
) -> Result<Option<String>, redb::StorageError> {
    let held = users
        .get(user_id)?
        .map(|v| (v.value().0.to_string(), v.value().1));
    let count = held.as_ref().map_or(0, |h| h.1) + 1;
    users.insert(user_id, (region, count))?;
    Ok(held.map(|h| h.0))
}

pub struct Store {
    db: Database,
    epoch: u64,
    parent: Option<Parent>,
    revision_tx: watch::Sender<u64>,
    /// How many change sets the log keeps before compacting the oldest.
    retain_changes: u64,
}

/// The write side of one mutation. Records every change it makes.
pub struct Tx<'a> {
    txn: &'a WriteTransaction,
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
        row(&self.txn.open_table(REGIONS).map_err(storage)?, id)
    }

    pub fn regions(&self) -> Result<Vec<Region>, CodedError> {
        rows(&self.txn.open_table(REGIONS).map_err(storage)?)
    }

    pub fn put_region(&mut self, mut region: Region) -> Result<Region, CodedError> {
        region.revision = self.revision;
        let mut t = self.txn.open_table(REGIONS).map_err(storage)?;
        t.insert(region.id.as_str(), region.encode_to_vec().as_slice())
            .map_err(storage)?;
        self.changes.push(Change {
            kind: Some(change::Kind::RegionUpserted(region.clone())),
        });
        Ok(region)
    }

    pub fn claim(&self, hmac: &str) -> Result<Option<IdentifierClaim>, CodedError> {
        row(&self.txn.open_table(CLAIMS).map_err(storage)?, hmac)
    }

    /// Stores a new claim (the caller checked the HMAC is free) and counts
    /// it on its user, homing the user at its first claim.
    pub fn put_claim(&mut self, claim: IdentifierClaim) -> Result<(), CodedError> {
        self.txn
            .open_table(CLAIMS)
            .map_err(storage)?
            .insert(claim.hmac.as_str(), claim.encode_to_vec().as_slice())
            .map_err(storage)?;
        let mut users = self.txn.open_table(USERS).map_err(storage)?;
        let before = count_claim(&mut users, &claim.user_id, &claim.region).map_err(storage)?;
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

    /// The region holding a reservation on this HMAC's prefix, if any.
    pub fn reservation(&self, hmac: &str) -> Result<Option<String>, CodedError> {
        let Some(prefix) = hmac_prefix(hmac) else {
            return Ok(None);
        };
        let t = self.txn.open_table(RESERVED).map_err(storage)?;
        let r = t.get(prefix).map_err(storage)?;
        Ok(r.map(|v| v.value().to_string()))
    }

    /// Drops the reservation on this HMAC's prefix (its claim is back).
    pub fn unreserve(&mut self, hmac: &str) -> Result<(), CodedError> {
        if let Some(prefix) = hmac_prefix(hmac) {
            let mut t = self.txn.open_table(RESERVED).map_err(storage)?;
            t.remove(prefix).map_err(storage)?;
        }
        Ok(())
    }

    /// Drops every reservation of `region` (its cell has asserted all its
    /// claims; what is left was released since). Returns how many.
    pub fn drop_reservations(&mut self, region: &str) -> Result<u64, CodedError> {
        let mut t = self.txn.open_table(RESERVED).map_err(storage)?;
        let before = t.len().map_err(storage)?;
        t.retain(|_, r| r != region).map_err(storage)?;
        let dropped = before - t.len().map_err(storage)?;
        self.bookkept |= dropped > 0;
        Ok(dropped)
    }

    /// The region a user is homed in, if the directory holds the user.
    pub fn user_home(&self, user_id: &str) -> Result<Option<String>, CodedError> {
        let users = self.txn.open_table(USERS).map_err(storage)?;
        let home = users.get(user_id).map_err(storage)?;
        Ok(home.map(|v| v.value().0.to_string()))
    }

    /// Points an existing claim at another region.
    pub fn rehome_claim(
        &mut self,
        mut claim: IdentifierClaim,
        region: &str,
    ) -> Result<(), CodedError> {
        claim.region = region.to_string();
        self.txn
            .open_table(CLAIMS)
            .map_err(storage)?
            .insert(claim.hmac.as_str(), claim.encode_to_vec().as_slice())
            .map_err(storage)?;
        self.changes.push(Change {
            kind: Some(change::Kind::IdentifierClaimed(claim)),
        });
        Ok(())
    }

    /// Homes an existing user in another region.
    pub fn rehome_user(&mut self, user_id: &str, region: &str) -> Result<(), CodedError> {
        let mut users = self.txn.open_table(USERS).map_err(storage)?;
        let count = users
            .get(user_id)
            .map_err(storage)?
            .map_or(0, |v| v.value().1);
        users.insert(user_id, (region, count)).map_err(storage)?;
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
        let Some(old) = self
            .txn
            .open_table(CLAIMS)
            .map_err(storage)?
            .remove(hmac)
            .map_err(storage)?
            .map(|v| decode::<IdentifierClaim>(v.value()))
            .transpose()?
        else {
            return Ok(());
        };
        self.changes.push(Change {
            kind: Some(change::Kind::IdentifierReleased(hmac.to_string())),
        });
        let mut users = self.txn.open_table(USERS).map_err(storage)?;
        let held = users
            .get(old.user_id.as_str())
            .map_err(storage)?
            .map(|v| (v.value().0.to_string(), v.value().1));
        match held {
            Some((region, count)) if count > 1 => {
                users
                    .insert(old.user_id.as_str(), (region.as_str(), count - 1))
                    .map_err(storage)?;
            }
            _ => {
                users.remove(old.user_id.as_str()).map_err(storage)?;
                self.changes.push(Change {
                    kind: Some(change::Kind::UserRemoved(old.user_id)),
                });
            }
        }
        Ok(())
    }

    pub fn config(&self, key: &str, region: &str) -> Result<Option<ConfigEntry>, CodedError> {
        row(
            &self.txn.open_table(CONFIG).map_err(storage)?,
            &config_row_key(key, region),
        )
    }

    pub fn config_entries(&self) -> Result<Vec<ConfigEntry>, CodedError> {
        rows(&self.txn.open_table(CONFIG).map_err(storage)?)
    }

    pub fn set_config(&mut self, mut entry: ConfigEntry) -> Result<ConfigEntry, CodedError> {
        entry.revision = self.revision;
        let row = config_row_key(&entry.key, &entry.region);
        self.txn
            .open_table(CONFIG)
            .map_err(storage)?
            .insert(row.as_str(), entry.encode_to_vec().as_slice())
            .map_err(storage)?;
        self.record_history(&row, &entry.key, &entry.region, entry.value.clone())?;
        self.changes.push(Change {
            kind: Some(change::Kind::ConfigSet(entry.clone())),
        });
        Ok(entry)
    }

    pub fn delete_config(&mut self, key: &str, region: &str) -> Result<(), CodedError> {
        let row = config_row_key(key, region);
        self.txn
            .open_table(CONFIG)
            .map_err(storage)?
            .remove(row.as_str())
            .map_err(storage)?;
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
        self.txn
            .open_table(CONFIG_HISTORY)
            .map_err(storage)?
            .insert((self.revision, row), h.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Every config row's state as of `revision`: (key, region) → entry, from
    /// the history table. Refused below the history this store holds.
    pub fn config_at(&self, revision: u64) -> Result<Vec<ConfigHistoryEntry>, CodedError> {
        let floor = meta_value(&self.txn.open_table(META).map_err(storage)?, HISTORY_FLOOR)?;
        if revision < floor {
            return Err(CodedError::new(
                homecell_proto::error::ErrorCode::FailedPrecondition,
                format!("config history before revision {floor} was not recovered"),
            ));
        }
        let t = self.txn.open_table(CONFIG_HISTORY).map_err(storage)?;
        let mut latest = std::collections::BTreeMap::new();
        for row in t
            .range((0u64, "")..=(revision, "\u{10FFFF}"))
            .map_err(storage)?
        {
            let (k, v) = row.map_err(storage)?;
            let (_, rowkey) = k.value();
            latest.insert(rowkey.to_string(), decode::<ConfigHistoryEntry>(v.value())?);
        }
        Ok(latest.into_values().filter(|h| !h.deleted).collect())
    }
}

impl Store {
    pub fn open(path: &Path, retain_changes: u64) -> anyhow::Result<Self> {
        let db = Database::create(path)
            .map_err(|e| anyhow::anyhow!("cannot open the store {}: {e}", path.display()))?;
        let txn = db.begin_write()?;
        let (revision, epoch, parent) = {
            let mut meta = txn.open_table(META)?;
            txn.open_table(REGIONS)?;
            txn.open_table(CONFIG)?;
            txn.open_table(CONFIG_HISTORY)?;
            txn.open_table(CHANGES)?;
            txn.open_table(SUBSCRIBERS)?;
            txn.open_table(RESERVED)?;
            let claims = txn.open_table(CLAIMS)?;
            let mut users = txn.open_table(USERS)?;
            // A store from before the users table: derive it once.
            if users.is_empty()? && !claims.is_empty()? {
                for row in claims.iter()? {
                    let c = IdentifierClaim::decode(row?.1.value())?;
                    count_claim(&mut users, &c.user_id, &c.region)?;
                }
            }
            // A store from before epochs gets its first one here.
            let existing = meta.get(EPOCH)?.map(|v| v.value());
            let epoch = match existing {
                Some(e) => e,
                None => {
                    let e = new_epoch();
                    meta.insert(EPOCH, e)?;
                    e
                }
            };
            let parent = match (meta.get(PARENT_EPOCH)?, meta.get(PARENT_REVISION)?) {
                (Some(e), Some(r)) => Some(Parent {
                    epoch: e.value(),
                    revision: r.value(),
                }),
                _ => None,
            };
            let revision = meta.get(REVISION)?.map(|v| v.value()).unwrap_or(0);
            (revision, epoch, parent)
        };
        txn.commit()?;
        let (revision_tx, _) = watch::channel(revision);
        Ok(Self {
            db,
            epoch,
            parent,
            revision_tx,
            retain_changes: retain_changes.max(1),
        })
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

    /// Notified with each committed revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Runs `f` in one write transaction. Returns its result and the revision
    /// it committed (the current one when `f` changed nothing). On error
    /// nothing is written.
    pub fn mutate<T>(
        &self,
        actor: &str,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, CodedError>,
    ) -> Result<(T, u64), CodedError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let current = meta_value(&txn.open_table(META).map_err(storage)?, REVISION)?;
        let next = current + 1;
        let at_unix_ms = now_ms();
        let mut tx = Tx {
            txn: &txn,
            bookkept: false,
            revision: next,
            at_unix_ms,
            actor,
            changes: Vec::new(),
        };
        let out = f(&mut tx)?;
        let changes = std::mem::take(&mut tx.changes);
        if changes.is_empty() {
            // Bookkeeping that subscribers never see (a recovered store's
            // reservations) commits without a revision.
            if tx.bookkept {
                txn.commit().map_err(storage)?;
            } else {
                txn.abort().map_err(storage)?;
            }
            return Ok((out, current));
        }
        let cs = ChangeSet {
            revision: next,
            changes,
            at_unix_ms,
            actor: actor.to_string(),
        };
        {
            let mut log = txn.open_table(CHANGES).map_err(storage)?;
            log.insert(next, cs.encode_to_vec().as_slice())
                .map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(REVISION, next).map_err(storage)?;
            let floor = meta_value(&meta, LOG_FLOOR)?;
            if next - floor > self.retain_changes {
                let new_floor = next - self.retain_changes;
                log.retain_in(..=new_floor, |_, _| false).map_err(storage)?;
                meta.insert(LOG_FLOOR, new_floor).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        self.revision_tx.send_replace(next);
        Ok((out, next))
    }

    /// Runs read-only `f` against a consistent view (a write transaction that
    /// is then aborted, so reads share the mutation helpers).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, CodedError>,
    ) -> Result<(T, u64), CodedError> {
        let (out, revision) = self.mutate("read", |tx| f(tx))?;
        Ok((out, revision))
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
        let txn = self.db.begin_read().map_err(storage)?;
        let revision = meta_value(&txn.open_table(META).map_err(storage)?, REVISION)?;
        let users = txn.open_table(USERS).map_err(storage)?;
        let claims = txn.open_table(CLAIMS).map_err(storage)?;
        let mut part = Snapshot {
            revision,
            regions: rows(&txn.open_table(REGIONS).map_err(storage)?)?,
            config: rows(&txn.open_table(CONFIG).map_err(storage)?)?,
            more: true,
            users_total: users.len().map_err(storage)?,
            claims_total: claims.len().map_err(storage)?,
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
        for row in users.iter().map_err(storage)? {
            let (id, home) = row.map_err(storage)?;
            part.users.push(DirectoryUser {
                user_id: id.value().to_string(),
                region: home.value().0.to_string(),
            });
            if part.users.len() == rows_per_part && !full(&mut part) {
                return Ok(());
            }
        }
        for row in claims.iter().map_err(storage)? {
            part.claims.push(decode(row.map_err(storage)?.1.value())?);
            if part.users.len() + part.claims.len() >= rows_per_part && !full(&mut part) {
                return Ok(());
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
        let txn = self.db.begin_write().map_err(storage)?;
        let next = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let next = meta_value(&meta, REVISION)? + 1;
            let regions = rows::<Region>(&txn.open_table(REGIONS).map_err(storage)?)?;
            let mut table = txn.open_table(CLAIMS).map_err(storage)?;
            let mut users = txn.open_table(USERS).map_err(storage)?;
            for c in claims {
                if !regions.iter().any(|r| r.id == c.region) {
                    return Err(CodedError::invalid(format!("unknown region {}", c.region)));
                }
                if c.hmac.len() != 64 || c.user_id.is_empty() || c.user_id.len() > 64 {
                    return Err(CodedError::invalid(
                        "a claim needs a 64-hex-digit hmac and a user id",
                    ));
                }
                if table
                    .insert(c.hmac.as_str(), c.encode_to_vec().as_slice())
                    .map_err(storage)?
                    .is_some()
                {
                    return Err(CodedError::new(
                        homecell_proto::error::ErrorCode::AlreadyExists,
                        "an imported identifier is already registered",
                    ));
                }
                count_claim(&mut users, &c.user_id, &c.region).map_err(storage)?;
            }
            let cs = ChangeSet {
                revision: next,
                at_unix_ms: now_ms(),
                actor: "import".into(),
                changes: Vec::new(),
            };
            let mut log = txn.open_table(CHANGES).map_err(storage)?;
            log.retain(|_, _| false).map_err(storage)?;
            log.insert(next, cs.encode_to_vec().as_slice())
                .map_err(storage)?;
            meta.insert(REVISION, next).map_err(storage)?;
            meta.insert(LOG_FLOOR, next).map_err(storage)?;
            next
        };
        txn.commit().map_err(storage)?;
        self.revision_tx.send_replace(next);
        Ok(next)
    }

    /// Change sets after `revision`, at most `max`; `None` when the log no
    /// longer reaches back that far (the caller then sends a snapshot).
    pub fn changes_after(
        &self,
        revision: u64,
        max: usize,
    ) -> Result<Option<Vec<ChangeSet>>, CodedError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let floor = meta_value(&meta, LOG_FLOOR)?;
        let current = meta_value(&meta, REVISION)?;
        if revision < floor || revision > current {
            return Ok(None);
        }
        let log = txn.open_table(CHANGES).map_err(storage)?;
        let mut out = Vec::new();
        for row in log.range(revision + 1..).map_err(storage)?.take(max) {
            out.push(decode(row.map_err(storage)?.1.value())?);
        }
        Ok(Some(out))
    }

    /// Config history, newest first, optionally for one key.
    pub fn config_history(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Vec<ConfigHistoryEntry>, CodedError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(CONFIG_HISTORY).map_err(storage)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(storage)?.rev() {
            let h: ConfigHistoryEntry = decode(row.map_err(storage)?.1.value())?;
            if key.is_empty() || h.key == key {
                out.push(h);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Writes subscriber rows, all in one transaction (one fsync).
    pub fn save_subscribers(&self, rows: &[SubscriberStatus]) -> Result<(), CodedError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut t = txn.open_table(SUBSCRIBERS).map_err(storage)?;
            for s in rows {
                t.insert(s.node_id.as_str(), s.encode_to_vec().as_slice())
                    .map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(())
    }

    pub fn subscribers(&self) -> Result<Vec<SubscriberStatus>, CodedError> {
        let txn = self.db.begin_read().map_err(storage)?;
        rows(&txn.open_table(SUBSCRIBERS).map_err(storage)?)
    }
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

    fn region(id: &str) -> Region {
        Region {
            id: id.into(),
            status: RegionStatus::Active as i32,
            ..Default::default()
        }
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
                let mut claims = txn.open_table(CLAIMS).unwrap();
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
