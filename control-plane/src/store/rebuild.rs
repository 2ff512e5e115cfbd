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

use super::tables::{Write, count_claim};
use super::{
    CHANGES_FLOOR_KEYS, ChangeSet, ConfigEntry, ConfigHistoryEntry, EPOCH, Engine, HISTORY_FLOOR,
    IdentifierClaim, Location, Outcome, PARENT_EPOCH, PARENT_REVISION, Parent, REVISION, Region,
    Store, new_epoch, now_ms,
};
use anyhow::{Context, Result, bail};
use homecell_proto::control::{BackupHeader, BackupRecord, BackupTrailer, backup_record};
use homecell_proto::error::CodedError;
use std::path::Path;

/// The backup format this code writes. It reads this one and format 1
/// (the same without the move journal).
pub const BACKUP_FORMAT: u32 = 2;

impl Store {
    /// Every record of a backup, header first and trailer last, from one
    /// read transaction. `emit` returns false to stop (the reader left).
    pub fn export(&self, mut emit: impl FnMut(BackupRecord) -> bool) -> Result<(), CodedError> {
        let view = self.view()?;
        let t = view.tables();
        let regions = t.regions()?;
        let config = t.config_entries()?;
        let batches = t.batches()?;
        let mut moves = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = t.moves_page(after.as_deref(), super::PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            moves += page.len() as u64;
        }
        let header = BackupHeader {
            format: BACKUP_FORMAT,
            epoch: self.epoch,
            revision: t.meta(REVISION)?,
            at_unix_ms: now_ms(),
            regions: regions.len() as u64,
            config: config.len() as u64,
            config_history: t.history_len()?,
            claims: t.claims_len()?,
            moves,
            move_batches: batches.len() as u64,
        };
        let mut records = 0u64;
        let mut send = |kind: backup_record::Kind| {
            records += 1;
            emit(BackupRecord { kind: Some(kind) })
        };
        use backup_record::Kind;
        let mut whole = send(Kind::Header(header))
            && regions.into_iter().all(|r| send(Kind::Region(r)))
            && config.into_iter().all(|e| send(Kind::Config(e)));
        let mut after: Option<(u64, String)> = None;
        while whole {
            let page =
                t.history_page(after.as_ref().map(|(r, k)| (*r, k.as_str())), super::PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some((last.0, last.1.clone()));
            whole = page.into_iter().all(|(_, _, h)| send(Kind::History(h)));
        }
        let mut after: Option<String> = None;
        while whole {
            let page = t.claims_page(after.as_deref(), super::PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.hmac.clone());
            whole = page.into_iter().all(|c| send(Kind::Claim(c)));
        }
        let mut after: Option<String> = None;
        while whole {
            let page = t.moves_page(after.as_deref(), super::PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            whole = page.into_iter().all(|m| send(Kind::Move(m)));
        }
        whole = whole && batches.into_iter().all(|b| send(Kind::MoveBatch(b)));
        if !whole {
            return Ok(());
        }
        let records = records;
        emit(BackupRecord {
            kind: Some(backup_record::Kind::Trailer(BackupTrailer { records })),
        });
        Ok(())
    }

    /// Builds a new store at `location` from `fill`, in one transaction:
    /// nothing is left at `location` unless `fill` succeeds. A file must
    /// not exist; a PostgreSQL database must hold no store yet (a fresh
    /// database, or one whose tables are empty). The store starts a new
    /// epoch at `parent.revision + 1`, with an empty change log, and config
    /// history reaches back no further than what `fill` gave.
    ///
    /// PostgreSQL needs a multi-threaded tokio runtime (see `Store::open_at`).
    pub fn rebuild(
        location: &Location,
        retain_changes: u64,
        parent: Parent,
        fill: impl FnOnce(&mut Rebuilder<'_>) -> Result<()>,
    ) -> Result<Store> {
        // Revisions are BIGINT on PostgreSQL: keep them below i64::MAX on
        // both engines, so any store can move to the other.
        let revision = parent
            .revision
            .checked_add(1)
            .filter(|r| *r < i64::MAX as u64)
            .context("the source's revision is out of range")?;
        match location {
            Location::File(path) => {
                rebuild_file(path, revision, parent, fill)?;
                Store::open(path, retain_changes)
            }
            Location::Postgres(url) => {
                let engine =
                    Engine::Postgres(Box::new(super::postgres::Pg::connect_blocking(url)?));
                tokio::task::block_in_place(|| {
                    let mut failed = None;
                    let built = Store::write(&engine, |t| {
                        let held = t.meta(REVISION)? > 0
                            || !t.regions()?.is_empty()
                            || t.claims_len()? > 0;
                        if held {
                            failed = Some(anyhow::anyhow!(
                                "the database already holds a store; rebuild into an empty one"
                            ));
                            return Ok(((), Outcome::Abort));
                        }
                        if let Err(e) = fill_and_finish(t, revision, parent, fill) {
                            failed = Some(e);
                            return Ok(((), Outcome::Abort));
                        }
                        Ok(((), Outcome::Bookkeeping))
                    });
                    match (built, failed) {
                        (_, Some(e)) => Err(e),
                        (Err(e), None) => Err(anyhow::anyhow!("{e}")),
                        (Ok(_), None) => Ok(()),
                    }
                })?;
                Store::on_engine(engine, retain_changes)
            }
        }
    }
}

/// A rebuilt redb file: written under a partial name, moved into place
/// once committed.
fn rebuild_file(
    path: &Path,
    revision: u64,
    parent: Parent,
    fill: impl FnOnce(&mut Rebuilder<'_>) -> Result<()>,
) -> Result<()> {
    if path.exists() {
        bail!(
            "{} already exists; move it aside first (a rebuild never overwrites a store)",
            path.display()
        );
    }
    let partial = path.with_extension("rebuilding");
    let _ = std::fs::remove_file(&partial);
    let built = (|| -> Result<()> {
        let db = redb::Database::create(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let txn = db.begin_write()?;
        {
            super::redb_tables::create_all(&txn)?;
            fill_and_finish(
                &mut super::redb_tables::RedbWrite(&txn),
                revision,
                parent,
                fill,
            )?;
        }
        txn.commit()?;
        Ok(())
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path)
        .with_context(|| format!("cannot move the rebuilt store to {}", path.display()))
}

/// Runs `fill`, then writes the new store's meta and its log's one entry.
fn fill_and_finish(
    t: &mut dyn Write,
    revision: u64,
    parent: Parent,
    fill: impl FnOnce(&mut Rebuilder<'_>) -> Result<()>,
) -> Result<()> {
    let mut r = Rebuilder {
        t,
        revision,
        history_floor: None,
    };
    fill(&mut r)?;
    let history_floor = r.history_floor;
    for key in CHANGES_FLOOR_KEYS {
        t.set_meta(key, revision)?;
    }
    t.set_meta(EPOCH, new_epoch())?;
    t.set_meta(PARENT_EPOCH, parent.epoch)?;
    t.set_meta(PARENT_REVISION, parent.revision)?;
    if let Some(floor) = history_floor {
        t.set_meta(HISTORY_FLOOR, floor)?;
    }
    // The log's one entry: the rebuild itself, so the log's newest
    // revision is the store's.
    t.put_change(&ChangeSet {
        revision,
        changes: Vec::new(),
        at_unix_ms: now_ms(),
        actor: "rebuild".into(),
    })?;
    Ok(())
}

/// The write side of [`Store::rebuild`].
pub struct Rebuilder<'a> {
    t: &'a mut dyn Write,
    revision: u64,
    history_floor: Option<u64>,
}

impl Rebuilder<'_> {
    /// The revision the rebuilt store starts at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn region(&mut self, r: &Region) -> Result<()> {
        Ok(self.t.put_region(r)?)
    }

    pub fn config(&mut self, e: &ConfigEntry) -> Result<()> {
        Ok(self
            .t
            .put_config(&super::config_row_key(&e.key, &e.region), e)?)
    }

    pub fn history(&mut self, h: &ConfigHistoryEntry) -> Result<()> {
        Ok(self
            .t
            .put_history(&super::config_row_key(&h.key, &h.region), h)?)
    }

    /// Config history starts at the rebuild: each current row becomes a
    /// history entry at the new revision, and rollback refuses to reach
    /// further back (what it would restore is not known).
    pub fn history_starts_here(&mut self, actor: &str) -> Result<()> {
        for e in self.t.config_entries()? {
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
        if self.t.region(&c.region)?.is_none() {
            bail!(
                "a claim names region {:?}, which the source does not hold",
                c.region
            );
        }
        if self.t.put_claim(c)? {
            bail!("the source holds one identifier twice");
        }
        count_claim(self.t, &c.user_id, &c.region)?;
        Ok(())
    }

    /// A move of the journal (claims come first: its user is in the
    /// directory).
    pub fn move_record(&mut self, m: &homecell_proto::control::MoveRecord) -> Result<()> {
        if m.id.is_empty() || m.user_id.is_empty() {
            bail!("a move needs an id and a user");
        }
        Ok(self.t.put_move(m)?)
    }

    pub fn move_batch(&mut self, b: &homecell_proto::control::MoveBatch) -> Result<()> {
        if b.id.is_empty() {
            bail!("a batch needs an id");
        }
        Ok(self.t.put_batch(b)?)
    }

    /// A claim known only by its HMAC's first 128 bits (all a replica
    /// keeps): reserved for `region` until that region asserts it again.
    pub fn reserve(&mut self, prefix: u128, region: &str) -> Result<()> {
        Ok(self.t.reserve(prefix, region)?)
    }

    /// A user's home without its claims (a replica holds no more): counted
    /// as holding none until its cell asserts them again.
    pub fn user(&mut self, user_id: &str, region: &str) -> Result<()> {
        if self.t.user(user_id)?.is_none() {
            self.t.put_user(user_id, region, 0)?;
        }
        Ok(())
    }
}
