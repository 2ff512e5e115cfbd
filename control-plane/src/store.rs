//! The control plane's redb store: the authoritative state plus the revisioned
//! change log that subscribers replicate.
//!
//! Every mutation runs in one write transaction through [`Store::mutate`]:
//! validation reads and the writes it decides happen under the same lock, the
//! changes are appended to the log under the next revision, and a mutation
//! that fails (or changes nothing) writes nothing at all.

use homecell_proto::control::{
    Change, ChangeSet, ConfigEntry, ConfigHistoryEntry, ConfigKey, IdentifierClaim, Region,
    Snapshot, SubscriberStatus, change,
};
use homecell_proto::error::CodedError;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
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

const REVISION: &str = "revision";
/// Revisions at or below the floor have been compacted out of the log.
const LOG_FLOOR: &str = "log_floor";

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

pub struct Store {
    db: Database,
    revision_tx: watch::Sender<u64>,
    /// How many change sets the log keeps before compacting the oldest.
    retain_changes: u64,
}

/// The write side of one mutation. Records every change it makes.
pub struct Tx<'a> {
    txn: &'a WriteTransaction,
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

    pub fn put_claim(&mut self, claim: IdentifierClaim) -> Result<(), CodedError> {
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

    pub fn delete_claim(&mut self, hmac: &str) -> Result<(), CodedError> {
        self.txn
            .open_table(CLAIMS)
            .map_err(storage)?
            .remove(hmac)
            .map_err(storage)?;
        self.changes.push(Change {
            kind: Some(change::Kind::IdentifierReleased(hmac.to_string())),
        });
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
    /// the history table.
    pub fn config_at(&self, revision: u64) -> Result<Vec<ConfigHistoryEntry>, CodedError> {
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
        let revision = {
            let meta = txn.open_table(META)?;
            txn.open_table(REGIONS)?;
            txn.open_table(CONFIG)?;
            txn.open_table(CONFIG_HISTORY)?;
            txn.open_table(CHANGES)?;
            txn.open_table(SUBSCRIBERS)?;
            txn.open_table(CLAIMS)?;
            meta.get(REVISION)?.map(|v| v.value()).unwrap_or(0)
        };
        txn.commit()?;
        let (revision_tx, _) = watch::channel(revision);
        Ok(Self {
            db,
            revision_tx,
            retain_changes: retain_changes.max(1),
        })
    }

    pub fn revision(&self) -> u64 {
        *self.revision_tx.borrow()
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
        let current = txn
            .open_table(META)
            .map_err(storage)?
            .get(REVISION)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0);
        let next = current + 1;
        let at_unix_ms = now_ms();
        let mut tx = Tx {
            txn: &txn,
            revision: next,
            at_unix_ms,
            actor,
            changes: Vec::new(),
        };
        let out = f(&mut tx)?;
        let changes = std::mem::take(&mut tx.changes);
        if changes.is_empty() {
            txn.abort().map_err(storage)?;
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
            let floor = meta
                .get(LOG_FLOOR)
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(0);
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

    pub fn snapshot(&self) -> Result<Snapshot, CodedError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let revision = txn
            .open_table(META)
            .map_err(storage)?
            .get(REVISION)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut snap = Snapshot {
            revision,
            ..Default::default()
        };
        snap.regions = rows(&txn.open_table(REGIONS).map_err(storage)?)?;
        snap.config = rows(&txn.open_table(CONFIG).map_err(storage)?)?;
        snap.claims = rows(&txn.open_table(CLAIMS).map_err(storage)?)?;
        Ok(snap)
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
        let floor = meta
            .get(LOG_FLOOR)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0);
        let current = meta
            .get(REVISION)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0);
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

    pub fn save_subscriber(&self, s: &SubscriberStatus) -> Result<(), CodedError> {
        let txn = self.db.begin_write().map_err(storage)?;
        txn.open_table(SUBSCRIBERS)
            .map_err(storage)?
            .insert(s.node_id.as_str(), s.encode_to_vec().as_slice())
            .map_err(storage)?;
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
}
