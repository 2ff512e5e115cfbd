//! The tables on redb: the embedded single-node engine. The table layouts
//! are the on-disk format of every store written so far; they do not change.

use super::tables::{Read, Result, UserRow, Write};
use homecell_proto::control::{
    ChangeSet, ConfigEntry, ConfigHistoryEntry, IdentifierClaim, MoveBatch, MoveRecord, Region,
    SubscriberStatus,
};
use homecell_proto::error::CodedError;
use prost::Message;
use redb::{
    ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use std::ops::Bound;

pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const REGIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("regions");
pub const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");
/// (revision, config row key) → ConfigHistoryEntry. Never compacted: it is
/// what rollback reads.
pub const CONFIG_HISTORY: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("config_history");
pub const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
pub const SUBSCRIBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscribers");
/// HMAC(identifier) → IdentifierClaim.
pub const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
/// user id → (home region, claims held): the directory's user entries,
/// derived from the claims in the same transactions.
pub const USERS: TableDefinition<&str, (&str, u32)> = TableDefinition::new("users");
/// For a store recovered from a replica: the first 128 bits of each claim's
/// HMAC → the region that held it (see `Tx::reservation`).
pub const RESERVED: TableDefinition<u128, &str> = TableDefinition::new("reserved_claims");
/// Move id → MoveRecord: the move journal.
pub const MOVES: TableDefinition<&str, &[u8]> = TableDefinition::new("moves");
/// User id → the id of the user's open move.
pub const OPEN_MOVES: TableDefinition<&str, &str> = TableDefinition::new("open_moves");
/// Batch id → MoveBatch.
pub const MOVE_BATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("move_batches");

/// Opens every table, so a new file holds them all (and a reader never
/// meets a missing one).
pub fn create_all(txn: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    for t in [REGIONS, CONFIG, SUBSCRIBERS, CLAIMS, MOVES, MOVE_BATCHES] {
        txn.open_table(t)?;
    }
    txn.open_table(META)?;
    txn.open_table(CHANGES)?;
    txn.open_table(CONFIG_HISTORY)?;
    txn.open_table(RESERVED)?;
    txn.open_table(USERS)?;
    txn.open_table(OPEN_MOVES)?;
    Ok(())
}

pub fn storage(e: impl std::fmt::Display) -> CodedError {
    tracing::error!(error = %e, "control-plane store failure");
    CodedError::internal(format!("store failure: {e}"))
}

pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(storage)
}

/// The message stored under `key`, if any.
fn row<M: Message + Default>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<M>> {
    let v = t.get(key).map_err(storage)?;
    v.map(|v| decode(v.value())).transpose()
}

/// Every message in a table, in key order.
fn rows<M: Message + Default>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<M>> {
    let mut out = Vec::new();
    for r in t.iter().map_err(storage)? {
        out.push(decode(r.map_err(storage)?.1.value())?);
    }
    Ok(out)
}

/// The string-keyed range after `after`.
fn after(after: Option<&str>) -> (Bound<&str>, Bound<&str>) {
    (
        after.map_or(Bound::Unbounded, Bound::Excluded),
        Bound::Unbounded,
    )
}

/// A read-only view: snapshots, backups, the log.
pub struct RedbRead(pub ReadTransaction);
/// A write transaction: every mutation, and reads that share its helpers.
pub struct RedbWrite<'a>(pub &'a WriteTransaction);

/// The reads are the same on both kinds of transaction; redb gives them
/// different table types, so one body serves both.
macro_rules! redb_reads {
    ($t:ty) => {
        impl Read for $t {
            fn meta(&self, key: &str) -> Result<u64> {
                let t = self.0.open_table(META).map_err(storage)?;
                Ok(t.get(key).map_err(storage)?.map_or(0, |v| v.value()))
            }
            fn region(&self, id: &str) -> Result<Option<Region>> {
                row(&self.0.open_table(REGIONS).map_err(storage)?, id)
            }
            fn regions(&self) -> Result<Vec<Region>> {
                rows(&self.0.open_table(REGIONS).map_err(storage)?)
            }
            fn claim(&self, hmac: &str) -> Result<Option<IdentifierClaim>> {
                row(&self.0.open_table(CLAIMS).map_err(storage)?, hmac)
            }
            fn user(&self, user_id: &str) -> Result<Option<UserRow>> {
                let t = self.0.open_table(USERS).map_err(storage)?;
                let v = t.get(user_id).map_err(storage)?;
                Ok(v.map(|v| (v.value().0.to_string(), v.value().1)))
            }
            fn reservation(&self, prefix: u128) -> Result<Option<String>> {
                let t = self.0.open_table(RESERVED).map_err(storage)?;
                let v = t.get(prefix).map_err(storage)?;
                Ok(v.map(|v| v.value().to_string()))
            }
            fn config(&self, key: &str) -> Result<Option<ConfigEntry>> {
                row(&self.0.open_table(CONFIG).map_err(storage)?, key)
            }
            fn config_entries(&self) -> Result<Vec<ConfigEntry>> {
                rows(&self.0.open_table(CONFIG).map_err(storage)?)
            }
            fn history_upto(&self, revision: u64) -> Result<Vec<(String, ConfigHistoryEntry)>> {
                let t = self.0.open_table(CONFIG_HISTORY).map_err(storage)?;
                let mut out = Vec::new();
                for r in t
                    .range((0u64, "")..=(revision, "\u{10FFFF}"))
                    .map_err(storage)?
                {
                    let (k, v) = r.map_err(storage)?;
                    out.push((k.value().1.to_string(), decode(v.value())?));
                }
                Ok(out)
            }
            fn history_newest(&self, key: &str, limit: usize) -> Result<Vec<ConfigHistoryEntry>> {
                let t = self.0.open_table(CONFIG_HISTORY).map_err(storage)?;
                let mut out = Vec::new();
                for r in t.iter().map_err(storage)?.rev() {
                    let h: ConfigHistoryEntry = decode(r.map_err(storage)?.1.value())?;
                    if key.is_empty() || h.key == key {
                        out.push(h);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
                Ok(out)
            }
            fn changes_after(&self, revision: u64, max: usize) -> Result<Vec<ChangeSet>> {
                let t = self.0.open_table(CHANGES).map_err(storage)?;
                let mut out = Vec::new();
                for r in t.range(revision + 1..).map_err(storage)?.take(max) {
                    out.push(decode(r.map_err(storage)?.1.value())?);
                }
                Ok(out)
            }
            fn subscribers(&self) -> Result<Vec<SubscriberStatus>> {
                rows(&self.0.open_table(SUBSCRIBERS).map_err(storage)?)
            }
            fn users_len(&self) -> Result<u64> {
                let t = self.0.open_table(USERS).map_err(storage)?;
                t.len().map_err(storage)
            }
            fn claims_len(&self) -> Result<u64> {
                let t = self.0.open_table(CLAIMS).map_err(storage)?;
                t.len().map_err(storage)
            }
            fn history_len(&self) -> Result<u64> {
                let t = self.0.open_table(CONFIG_HISTORY).map_err(storage)?;
                t.len().map_err(storage)
            }
            fn users_page(
                &self,
                from: Option<&str>,
                limit: usize,
            ) -> Result<Vec<(String, String)>> {
                let t = self.0.open_table(USERS).map_err(storage)?;
                let mut out = Vec::new();
                for r in t.range::<&str>(after(from)).map_err(storage)?.take(limit) {
                    let (k, v) = r.map_err(storage)?;
                    out.push((k.value().to_string(), v.value().0.to_string()));
                }
                Ok(out)
            }
            fn claims_page(
                &self,
                from: Option<&str>,
                limit: usize,
            ) -> Result<Vec<IdentifierClaim>> {
                let t = self.0.open_table(CLAIMS).map_err(storage)?;
                let mut out = Vec::new();
                for r in t.range::<&str>(after(from)).map_err(storage)?.take(limit) {
                    out.push(decode(r.map_err(storage)?.1.value())?);
                }
                Ok(out)
            }
            fn history_page(
                &self,
                from: Option<(u64, &str)>,
                limit: usize,
            ) -> Result<Vec<(u64, String, ConfigHistoryEntry)>> {
                let t = self.0.open_table(CONFIG_HISTORY).map_err(storage)?;
                let lower = from.map_or(Bound::Unbounded, Bound::Excluded);
                let mut out = Vec::new();
                for r in t
                    .range::<(u64, &str)>((lower, Bound::Unbounded))
                    .map_err(storage)?
                    .take(limit)
                {
                    let (k, v) = r.map_err(storage)?;
                    let (revision, row) = k.value();
                    out.push((revision, row.to_string(), decode(v.value())?));
                }
                Ok(out)
            }
            fn move_record(&self, id: &str) -> Result<Option<MoveRecord>> {
                row(&self.0.open_table(MOVES).map_err(storage)?, id)
            }
            fn moves_page(&self, from: Option<&str>, limit: usize) -> Result<Vec<MoveRecord>> {
                let t = self.0.open_table(MOVES).map_err(storage)?;
                let mut out = Vec::new();
                for r in t.range::<&str>(after(from)).map_err(storage)?.take(limit) {
                    out.push(decode(r.map_err(storage)?.1.value())?);
                }
                Ok(out)
            }
            fn open_move_of(&self, user_id: &str) -> Result<Option<String>> {
                let t = self.0.open_table(OPEN_MOVES).map_err(storage)?;
                let v = t.get(user_id).map_err(storage)?;
                Ok(v.map(|v| v.value().to_string()))
            }
            fn open_moves_page(&self, from: Option<&str>, limit: usize) -> Result<Vec<MoveRecord>> {
                let open = self.0.open_table(OPEN_MOVES).map_err(storage)?;
                let moves = self.0.open_table(MOVES).map_err(storage)?;
                let mut out = Vec::new();
                for r in open
                    .range::<&str>(after(from))
                    .map_err(storage)?
                    .take(limit)
                {
                    let (_, id) = r.map_err(storage)?;
                    if let Some(m) = row(&moves, id.value())? {
                        out.push(m);
                    }
                }
                Ok(out)
            }
            fn batch(&self, id: &str) -> Result<Option<MoveBatch>> {
                row(&self.0.open_table(MOVE_BATCHES).map_err(storage)?, id)
            }
            fn batches(&self) -> Result<Vec<MoveBatch>> {
                rows(&self.0.open_table(MOVE_BATCHES).map_err(storage)?)
            }
        }
    };
}

redb_reads!(RedbRead);
redb_reads!(RedbWrite<'_>);

impl Write for RedbWrite<'_> {
    fn set_meta(&mut self, key: &str, value: u64) -> Result<()> {
        let mut t = self.0.open_table(META).map_err(storage)?;
        t.insert(key, value).map_err(storage)?;
        Ok(())
    }
    fn put_region(&mut self, r: &Region) -> Result<()> {
        let mut t = self.0.open_table(REGIONS).map_err(storage)?;
        t.insert(r.id.as_str(), r.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }
    fn put_claim(&mut self, c: &IdentifierClaim) -> Result<bool> {
        let mut t = self.0.open_table(CLAIMS).map_err(storage)?;
        let old = t
            .insert(c.hmac.as_str(), c.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(old.is_some())
    }
    fn remove_claim(&mut self, hmac: &str) -> Result<Option<IdentifierClaim>> {
        let mut t = self.0.open_table(CLAIMS).map_err(storage)?;
        let old = t.remove(hmac).map_err(storage)?;
        old.map(|v| decode(v.value())).transpose()
    }
    fn put_user(&mut self, user_id: &str, region: &str, claims: u32) -> Result<()> {
        let mut t = self.0.open_table(USERS).map_err(storage)?;
        t.insert(user_id, (region, claims)).map_err(storage)?;
        Ok(())
    }
    fn remove_user(&mut self, user_id: &str) -> Result<()> {
        let mut t = self.0.open_table(USERS).map_err(storage)?;
        t.remove(user_id).map_err(storage)?;
        Ok(())
    }
    fn reserve(&mut self, prefix: u128, region: &str) -> Result<()> {
        let mut t = self.0.open_table(RESERVED).map_err(storage)?;
        t.insert(prefix, region).map_err(storage)?;
        Ok(())
    }
    fn unreserve(&mut self, prefix: u128) -> Result<()> {
        let mut t = self.0.open_table(RESERVED).map_err(storage)?;
        t.remove(prefix).map_err(storage)?;
        Ok(())
    }
    fn drop_reservations(&mut self, region: &str) -> Result<u64> {
        let mut t = self.0.open_table(RESERVED).map_err(storage)?;
        let before = t.len().map_err(storage)?;
        t.retain(|_, r| r != region).map_err(storage)?;
        Ok(before - t.len().map_err(storage)?)
    }
    fn put_config(&mut self, row: &str, e: &ConfigEntry) -> Result<()> {
        let mut t = self.0.open_table(CONFIG).map_err(storage)?;
        t.insert(row, e.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }
    fn remove_config(&mut self, row: &str) -> Result<()> {
        let mut t = self.0.open_table(CONFIG).map_err(storage)?;
        t.remove(row).map_err(storage)?;
        Ok(())
    }
    fn put_history(&mut self, row: &str, h: &ConfigHistoryEntry) -> Result<()> {
        let mut t = self.0.open_table(CONFIG_HISTORY).map_err(storage)?;
        t.insert((h.revision, row), h.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }
    fn put_change(&mut self, cs: &ChangeSet) -> Result<()> {
        let mut t = self.0.open_table(CHANGES).map_err(storage)?;
        t.insert(cs.revision, cs.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }
    fn trim_changes(&mut self, revision: u64) -> Result<()> {
        let mut t = self.0.open_table(CHANGES).map_err(storage)?;
        t.retain_in(..=revision, |_, _| false).map_err(storage)?;
        Ok(())
    }
    fn put_subscriber(&mut self, s: &SubscriberStatus) -> Result<()> {
        let mut t = self.0.open_table(SUBSCRIBERS).map_err(storage)?;
        t.insert(s.node_id.as_str(), s.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }
    fn put_move(&mut self, m: &MoveRecord) -> Result<()> {
        let mut t = self.0.open_table(MOVES).map_err(storage)?;
        t.insert(m.id.as_str(), m.encode_to_vec().as_slice())
            .map_err(storage)?;
        let mut open = self.0.open_table(OPEN_MOVES).map_err(storage)?;
        if super::tables::move_is_open(m) {
            open.insert(m.user_id.as_str(), m.id.as_str())
                .map_err(storage)?;
        } else {
            let mine = open
                .get(m.user_id.as_str())
                .map_err(storage)?
                .is_some_and(|v| v.value() == m.id);
            if mine {
                open.remove(m.user_id.as_str()).map_err(storage)?;
            }
        }
        Ok(())
    }
    fn put_batch(&mut self, b: &MoveBatch) -> Result<()> {
        let mut t = self.0.open_table(MOVE_BATCHES).map_err(storage)?;
        t.insert(b.id.as_str(), b.encode_to_vec().as_slice())
            .map_err(storage)?;
        Ok(())
    }
}
