//! The store read whole for a backup, and a store built whole from a backup
//! or from a subscriber's replica.
//!
//! Both sides are one transaction: a backup is one read transaction (a
//! consistent copy while mutations go on, as a snapshot is), and a rebuilt
//! store is written in one write transaction that commits only once its
//! source was read to the end and checked, so a torn backup leaves no store
//! behind. A rebuilt store has a new epoch and remembers the one it came
//! from ([`Parent`]), so subscribers of the old epoch take a snapshot and
//! those that held more than it are reported.

use super::{
    CHANGES, CLAIMS, CONFIG, CONFIG_HISTORY, EPOCH, HISTORY_FLOOR, LOG_FLOOR, META, PARENT_EPOCH,
    PARENT_REVISION, REGIONS, RESERVED, REVISION, SUBSCRIBERS, Store, USERS, count_claim, decode,
    meta_value, new_epoch, now_ms, storage,
};
use super::{ChangeSet, ConfigEntry, ConfigHistoryEntry, IdentifierClaim, Parent, Region};
use anyhow::{Context, Result, bail};
use homecell_proto::control::{BackupHeader, BackupRecord, BackupTrailer, backup_record};
use homecell_proto::error::CodedError;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use std::path::Path;

/// The backup format this code writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// Sends every row of `table` as a record of `kind`; false once the reader
/// left.
fn send_rows<K: redb::Key + 'static, M: Message + Default>(
    table: &impl ReadableTable<K, &'static [u8]>,
    kind: fn(M) -> backup_record::Kind,
    send: &mut impl FnMut(backup_record::Kind) -> bool,
) -> Result<bool, CodedError> {
    for row in table.iter().map_err(storage)? {
        if !send(kind(decode(row.map_err(storage)?.1.value())?)) {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Store {
    /// Every record of a backup, header first and trailer last, from one
    /// read transaction. `emit` returns false to stop (the reader left).
    pub fn export(&self, mut emit: impl FnMut(BackupRecord) -> bool) -> Result<(), CodedError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let revision = meta_value(&meta, REVISION)?;
        let regions = txn.open_table(REGIONS).map_err(storage)?;
        let config = txn.open_table(CONFIG).map_err(storage)?;
        let history = txn.open_table(CONFIG_HISTORY).map_err(storage)?;
        let claims = txn.open_table(CLAIMS).map_err(storage)?;
        let header = BackupHeader {
            format: BACKUP_FORMAT,
            epoch: self.epoch,
            revision,
            at_unix_ms: now_ms(),
            regions: regions.len().map_err(storage)?,
            config: config.len().map_err(storage)?,
            config_history: history.len().map_err(storage)?,
            claims: claims.len().map_err(storage)?,
        };
        let mut records = 0u64;
        let mut send = |kind: backup_record::Kind| {
            records += 1;
            emit(BackupRecord { kind: Some(kind) })
        };
        if !send(backup_record::Kind::Header(header)) {
            return Ok(());
        }
        use backup_record::Kind;
        let whole = send_rows(&regions, Kind::Region, &mut send)?
            && send_rows(&config, Kind::Config, &mut send)?
            && send_rows(&history, Kind::History, &mut send)?
            && send_rows(&claims, Kind::Claim, &mut send)?;
        if !whole {
            return Ok(());
        }
        let records = records;
        emit(BackupRecord {
            kind: Some(backup_record::Kind::Trailer(BackupTrailer { records })),
        });
        Ok(())
    }

    /// Builds a new store at `path` (which must not exist) from `fill`, in
    /// one transaction: nothing is left at `path` unless `fill` succeeds.
    /// The store starts a new epoch at `parent.revision + 1`, with an empty
    /// change log, and config history reaches back no further than what
    /// `fill` gave.
    pub fn rebuild(
        path: &Path,
        retain_changes: u64,
        parent: Parent,
        fill: impl FnOnce(&mut Rebuilder<'_>) -> Result<()>,
    ) -> Result<Store> {
        if path.exists() {
            bail!(
                "{} already exists; move it aside first (a rebuild never overwrites a store)",
                path.display()
            );
        }
        let partial = path.with_extension("rebuilding");
        let _ = std::fs::remove_file(&partial);
        let built = (|| -> Result<()> {
            let db = Database::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            let txn = db.begin_write()?;
            let revision = parent
                .revision
                .checked_add(1)
                .context("the source's revision is out of range")?;
            let mut r = Rebuilder {
                txn: &txn,
                revision,
                history_floor: None,
            };
            fill(&mut r)?;
            let history_floor = r.history_floor;
            {
                txn.open_table(SUBSCRIBERS)?;
                txn.open_table(RESERVED)?;
                let mut meta = txn.open_table(META)?;
                meta.insert(REVISION, revision)?;
                meta.insert(LOG_FLOOR, revision)?;
                meta.insert(EPOCH, new_epoch())?;
                meta.insert(PARENT_EPOCH, parent.epoch)?;
                meta.insert(PARENT_REVISION, parent.revision)?;
                if let Some(floor) = history_floor {
                    meta.insert(HISTORY_FLOOR, floor)?;
                }
                // The log's one entry: the rebuild itself, so the log's
                // newest revision is the store's.
                let cs = ChangeSet {
                    revision,
                    changes: Vec::new(),
                    at_unix_ms: now_ms(),
                    actor: "rebuild".into(),
                };
                txn.open_table(CHANGES)?
                    .insert(revision, cs.encode_to_vec().as_slice())?;
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, path)
            .with_context(|| format!("cannot move the rebuilt store to {}", path.display()))?;
        Store::open(path, retain_changes)
    }
}

/// The write side of [`Store::rebuild`].
pub struct Rebuilder<'a> {
    txn: &'a WriteTransaction,
    revision: u64,
    history_floor: Option<u64>,
}

impl Rebuilder<'_> {
    /// The revision the rebuilt store starts at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn region(&mut self, r: &Region) -> Result<()> {
        self.txn
            .open_table(REGIONS)?
            .insert(r.id.as_str(), r.encode_to_vec().as_slice())?;
        Ok(())
    }

    pub fn config(&mut self, e: &ConfigEntry) -> Result<()> {
        let row = super::config_row_key(&e.key, &e.region);
        self.txn
            .open_table(CONFIG)?
            .insert(row.as_str(), e.encode_to_vec().as_slice())?;
        Ok(())
    }

    pub fn history(&mut self, h: &ConfigHistoryEntry) -> Result<()> {
        let row = super::config_row_key(&h.key, &h.region);
        self.txn
            .open_table(CONFIG_HISTORY)?
            .insert((h.revision, row.as_str()), h.encode_to_vec().as_slice())?;
        Ok(())
    }

    /// Config history starts at the rebuild: each current row becomes a
    /// history entry at the new revision, and rollback refuses to reach
    /// further back (what it would restore is not known).
    pub fn history_starts_here(&mut self, actor: &str) -> Result<()> {
        let entries: Vec<ConfigEntry> = {
            let t = self.txn.open_table(CONFIG)?;
            let mut v = Vec::new();
            for row in t.iter()? {
                v.push(ConfigEntry::decode(row?.1.value())?);
            }
            v
        };
        for e in entries {
            self.history(&ConfigHistoryEntry {
                key: e.key,
                region: e.region,
                deleted: false,
                value: e.value,
                revision: self.revision,
                at_unix_ms: now_ms(),
                actor: actor.to_string(),
            })?;
        }
        self.history_floor = Some(self.revision);
        Ok(())
    }

    /// A claim, counted on its user. Refuses a second claim of one HMAC,
    /// and a claim for a region the source did not hold (regions come
    /// first in every source).
    pub fn claim(&mut self, c: &IdentifierClaim) -> Result<()> {
        if c.hmac.len() != 64 || c.user_id.is_empty() || c.user_id.len() > 64 {
            bail!("a claim needs a 64-hex-digit hmac and a user id");
        }
        if self
            .txn
            .open_table(REGIONS)?
            .get(c.region.as_str())?
            .is_none()
        {
            bail!(
                "a claim names region {:?}, which the source does not hold",
                c.region
            );
        }
        let replaced = self
            .txn
            .open_table(CLAIMS)?
            .insert(c.hmac.as_str(), c.encode_to_vec().as_slice())?
            .is_some();
        if replaced {
            bail!("the source holds one identifier twice");
        }
        count_claim(&mut self.txn.open_table(USERS)?, &c.user_id, &c.region)?;
        Ok(())
    }

    /// A claim known only by its HMAC's first 128 bits (all a replica
    /// keeps): reserved for `region` until that region asserts it again.
    pub fn reserve(&mut self, prefix: u128, region: &str) -> Result<()> {
        self.txn.open_table(RESERVED)?.insert(prefix, region)?;
        Ok(())
    }

    /// A user's home without its claims (a replica holds no more): counted
    /// as holding none until its cell asserts them again.
    pub fn user(&mut self, user_id: &str, region: &str) -> Result<()> {
        let mut users = self.txn.open_table(USERS)?;
        if users.get(user_id)?.is_none() {
            users.insert(user_id, (region, 0))?;
        }
        Ok(())
    }
}
