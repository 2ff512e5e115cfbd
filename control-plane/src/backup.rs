//! `backup`, `restore` and `recover`: the control plane's state to a file
//! and back, and rebuilt from a subscriber's replica when no backup is left.
//!
//! A backup file is the magic line, then the records the `Backup` RPC
//! streams (each a length-delimited protobuf `BackupRecord`, header first,
//! trailer last), then the SHA-256 of every byte before it. A restore reads
//! it to the end and checks the trailer's count and the digest before it
//! commits anything, so a truncated or altered file restores nothing.

use crate::store::{BACKUP_FORMAT, Location, Parent, Store};
use anyhow::{Context, Result, anyhow, bail, ensure};
use homecell_proto::control::{BackupRecord, backup_record};
use prost::Message;
use ring::digest;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8] = b"homecell control-plane backup\n";
/// No record of ours comes near this; a larger length means a damaged file.
const MAX_RECORD: u64 = 16 << 20;

/// Progress lines on stderr, at most one every two seconds, and the last.
pub struct Progress {
    what: &'static str,
    total: u64,
    done: u64,
    last: Instant,
}

impl Progress {
    pub fn new(what: &'static str, total: u64) -> Self {
        Self {
            what,
            total,
            done: 0,
            last: Instant::now(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() >= Duration::from_secs(2) {
            self.last = Instant::now();
            self.print();
        }
    }

    pub fn finish(&self) {
        self.print();
    }

    fn print(&self) {
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        eprintln!(
            "{}: {} of {} records ({pct}%)",
            self.what, self.done, self.total
        );
    }
}

/// Writes a backup file: to `<out>.partial`, renamed into place only once
/// the trailer and digest are written and synced.
pub struct BackupWriter {
    out: PathBuf,
    partial: PathBuf,
    file: BufWriter<std::fs::File>,
    digest: digest::Context,
    records: u64,
}

impl BackupWriter {
    /// Creates `<out>.<pid>.partial`, readable by its owner only (a backup
    /// holds every identifier's HMAC and every user's home), never
    /// following or replacing an existing file.
    pub fn create(out: &Path) -> Result<Self> {
        if out.exists() {
            bail!("{} already exists; name a new file", out.display());
        }
        let mut name = out.as_os_str().to_owned();
        name.push(format!(".{}.partial", std::process::id()));
        let partial = PathBuf::from(name);
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?
        };
        let mut w = Self {
            out: out.to_path_buf(),
            partial,
            file: BufWriter::new(file),
            digest: digest::Context::new(&digest::SHA256),
            records: 0,
        };
        w.bytes(MAGIC)?;
        Ok(w)
    }

    fn bytes(&mut self, b: &[u8]) -> Result<()> {
        self.digest.update(b);
        self.file.write_all(b)?;
        Ok(())
    }

    /// Appends one record; the trailer must come last.
    pub fn record(&mut self, r: &BackupRecord) -> Result<()> {
        let trailer = matches!(r.kind, Some(backup_record::Kind::Trailer(_)));
        if let Some(backup_record::Kind::Trailer(t)) = &r.kind {
            ensure!(
                t.records == self.records,
                "the control plane sent {} records but counted {}",
                self.records,
                t.records
            );
        }
        self.bytes(&r.encode_length_delimited_to_vec())?;
        if !trailer {
            self.records += 1;
        }
        Ok(())
    }

    /// Writes the digest, syncs, and moves the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        let sum = self.digest.clone().finish();
        self.file.write_all(sum.as_ref())?;
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        // A link, not a rename: it fails if `out` appeared meanwhile, where
        // a rename would replace it. Drop then removes the partial name.
        std::fs::hard_link(&self.partial, &self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        Ok(self.out.clone())
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        // Unfinished (an error, the stream broke): leave no partial file.
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// Reads a backup file's records in order, hashing as it goes.
pub struct BackupReader {
    file: BufReader<std::fs::File>,
    digest: digest::Context,
}

impl BackupReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut r = Self {
            file: BufReader::new(file),
            digest: digest::Context::new(&digest::SHA256),
        };
        let mut magic = vec![0; MAGIC.len()];
        r.exact(&mut magic)
            .ok()
            .filter(|()| magic == MAGIC)
            .ok_or_else(|| anyhow!("{} is not a control-plane backup", path.display()))?;
        Ok(r)
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact(buf)
            .map_err(|_| anyhow!("the backup is truncated"))?;
        self.digest.update(buf);
        Ok(())
    }

    /// The next record.
    pub fn next_record(&mut self) -> Result<BackupRecord> {
        let mut len = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8];
            self.exact(&mut b)?;
            len |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        ensure!(
            len <= MAX_RECORD,
            "the backup is damaged (a record of {len} bytes)"
        );
        let mut buf = vec![0; len as usize];
        self.exact(&mut buf)?;
        BackupRecord::decode(buf.as_slice()).map_err(|_| anyhow!("the backup is damaged"))
    }

    /// After the trailer: the digest must match every byte read, and
    /// nothing may follow it.
    pub fn verify_end(mut self) -> Result<()> {
        let expected = self.digest.finish();
        let mut sum = [0u8; 32];
        self.file
            .read_exact(&mut sum)
            .map_err(|_| anyhow!("the backup is truncated (no checksum)"))?;
        ensure!(
            sum == expected.as_ref(),
            "the backup's checksum does not match: it was altered or damaged"
        );
        let mut rest = [0u8; 1];
        ensure!(
            self.file.read(&mut rest)? == 0,
            "the backup has bytes after its checksum"
        );
        Ok(())
    }
}

/// `control-plane restore`: a new store at `location` from the backup at
/// `from`, in a new epoch. Returns the new store.
pub fn restore(from: &Path, location: &Location, retain_changes: u64) -> Result<Store> {
    let mut reader = BackupReader::open(from)?;
    let header = match reader.next_record()?.kind {
        Some(backup_record::Kind::Header(h)) => h,
        _ => bail!("the backup does not start with its header"),
    };
    ensure!(
        header.format == BACKUP_FORMAT || header.format == 1,
        "backup format {} is not one this version reads (1 or {BACKUP_FORMAT})",
        header.format
    );
    let total = [
        header.config,
        header.config_history,
        header.claims,
        header.moves,
        header.move_batches,
    ]
    .into_iter()
    .try_fold(header.regions, u64::checked_add)
    .context("the backup's header is damaged")?;
    let parent = Parent {
        epoch: header.epoch,
        revision: header.revision,
    };
    let mut progress = Progress::new("restore", total);
    // Everything is checked inside `fill`, before `rebuild` commits: the
    // count, the trailer and the digest over the whole file.
    Store::rebuild(location, retain_changes, parent, move |b| {
        let mut rows = 0u64;
        loop {
            match reader.next_record()?.kind {
                Some(backup_record::Kind::Region(r)) => b.region(&r)?,
                Some(backup_record::Kind::Config(e)) => b.config(&e)?,
                Some(backup_record::Kind::History(h)) => b.history(&h)?,
                Some(backup_record::Kind::Claim(c)) => b.claim(&c)?,
                Some(backup_record::Kind::Move(m)) => b.move_record(&m)?,
                Some(backup_record::Kind::MoveBatch(m)) => b.move_batch(&m)?,
                Some(backup_record::Kind::Trailer(t)) => {
                    ensure!(
                        t.records == rows + 1,
                        "the backup's trailer counts {} records, not {}",
                        t.records,
                        rows + 1
                    );
                    break;
                }
                _ => bail!("the backup is damaged (an unexpected record)"),
            }
            rows += 1;
            progress.add(1);
        }
        progress.finish();
        ensure!(
            rows == total,
            "the backup's header counts {total} rows but it holds {rows}"
        );
        reader.verify_end()
    })
}

/// What `recover` rebuilt, and what it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The replica's epoch and revision: the new store's parent.
    pub from: Parent,
    pub regions: usize,
    pub signing_keys: usize,
    pub config: usize,
    pub users: usize,
    /// Directory users whose key is not a UUID: their id cannot be read
    /// back from the replica's 128-bit key. Their cells assert them again.
    pub users_unreadable: usize,
    /// Claims the replica held: it keeps only half of each HMAC, so none
    /// can be rebuilt from it. Their cells assert them again.
    pub claims_not_recoverable: usize,
}

/// `control-plane recover --from-replica`: a new store at `location` from
/// a router's or cell's replica file, in a new epoch.
///
/// A replica gives back the regions (their signing keys included), every
/// config row in force, and each user's home. It cannot give back:
/// - the claims: a replica keys each by the first 128 bits of its HMAC,
///   and a claim needs all 256; each cell asserts its users' claims again
///   when it sees the new epoch (`ReassertClaims`). Until it has, each
///   prefix stays reserved for its region, so no other region can take the
///   identifier meanwhile;
/// - config history before the recovery: rollback cannot reach past it;
/// - the change log and the subscriber rows: every subscriber takes a
///   snapshot and reports again.
pub fn recover(
    replica: &Path,
    location: &Location,
    retain_changes: u64,
) -> Result<(Store, Recovered)> {
    let state = homecell_common::replica::read_replica_file(replica)?;
    let directory = state.directory.compacted();
    let names = directory.names();
    let (keys, ixs) = directory.base().users.columns();
    let (claims, claim_regions) = directory.base().claims.columns();
    let mut report = Recovered {
        from: Parent {
            epoch: state.epoch,
            revision: state.revision,
        },
        regions: state.regions.len(),
        signing_keys: state.regions.values().map(|r| r.signing_keys.len()).sum(),
        config: state.config.len(),
        users: 0,
        users_unreadable: 0,
        claims_not_recoverable: claims.len(),
    };
    let store = Store::rebuild(location, retain_changes, report.from, |b| {
        for r in state.regions.values() {
            b.region(r)?;
        }
        for e in state.config.values() {
            b.config(e)?;
        }
        b.history_starts_here("recover")?;
        for (prefix, ix) in claims.iter().zip(claim_regions) {
            if let Some(region) = names.get(usize::from(*ix)) {
                b.reserve(*prefix, region)?;
            }
        }
        for (key, ix) in keys.iter().zip(ixs) {
            let id = uuid::Uuid::from_u128(*key);
            let region = names.get(usize::from(*ix));
            let is_uuid = id.get_variant() == uuid::Variant::RFC4122 && id.get_version().is_some();
            match region {
                Some(region) if is_uuid => {
                    b.user(&id.to_string(), region)?;
                    report.users += 1;
                }
                _ => report.users_unreadable += 1,
            }
        }
        Ok(())
    })?;
    Ok((store, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use homecell_proto::control::{ConfigValue, IdentifierClaim, RegionStatus, config_value};

    /// A store with a region, a config row changed twice, and claims.
    fn populated(dir: &Path) -> Store {
        let s = Store::open(&dir.join("a.redb"), 100).unwrap();
        s.mutate("t", |tx| {
            tx.put_region(Region {
                id: "cn-east".into(),
                status: RegionStatus::Active as i32,
                ..Default::default()
            })
        })
        .unwrap();
        for i in [1, 2] {
            s.mutate("t", |tx| {
                tx.set_config(homecell_proto::control::ConfigEntry {
                    key: "auth.session_ttl".into(),
                    region: String::new(),
                    value: Some(ConfigValue {
                        kind: Some(config_value::Kind::IntValue(i)),
                    }),
                    revision: 0,
                })
            })
            .unwrap();
        }
        for n in 0..30u32 {
            s.mutate("t", |tx| {
                tx.put_claim(IdentifierClaim {
                    hmac: format!("{n:064x}"),
                    user_id: format!("u{}", n / 3),
                    region: "cn-east".into(),
                })
            })
            .unwrap();
        }
        s
    }

    fn backup_to(s: &Store, out: &Path) {
        let mut w = BackupWriter::create(out).unwrap();
        s.export(|r| {
            w.record(&r).unwrap();
            true
        })
        .unwrap();
        w.finish().unwrap();
    }

    use homecell_proto::control::Region;

    #[test]
    fn a_backup_restores_the_same_state_in_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let a = populated(dir.path());
        let file = dir.path().join("cp.backup");
        backup_to(&a, &file);
        assert!(BackupWriter::create(&file).is_err(), "never overwrites");

        let b = restore(&file, &Location::File(dir.path().join("b.redb")), 100).unwrap();
        let (sa, sb) = (a.snapshot().unwrap(), b.snapshot().unwrap());
        assert_eq!(sa.regions, sb.regions);
        assert_eq!(sa.config, sb.config);
        assert_eq!(sa.users, sb.users);
        assert_eq!(sa.claims, sb.claims);
        assert_eq!(sb.claims.len(), 30);
        assert_ne!(a.epoch(), b.epoch());
        assert_eq!(
            b.parent(),
            Some(Parent {
                epoch: a.epoch(),
                revision: a.revision()
            })
        );
        assert_eq!(b.revision(), a.revision() + 1);
        assert_eq!(
            b.config_history("", 10).unwrap(),
            a.config_history("", 10).unwrap(),
            "history (what rollback reads) comes back whole"
        );
        // The new store goes on: counts derived from the claims hold.
        b.mutate("t", |tx| tx.delete_claim(&format!("{:064x}", 0)))
            .unwrap();
        assert_eq!(b.snapshot().unwrap().users.len(), 10);
        // Its log starts at the restore: older revisions get a snapshot.
        assert!(b.changes_after(a.revision(), 10).unwrap().is_none());
    }

    #[test]
    fn a_damaged_backup_restores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = populated(dir.path());
        let file = dir.path().join("cp.backup");
        backup_to(&a, &file);
        let good = std::fs::read(&file).unwrap();
        let path = dir.path().join("b.redb");
        let target = Location::File(path.clone());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() - 40].to_vec()),
            ("no checksum", good[..good.len() - 32].to_vec()),
            ("a flipped byte", {
                let mut g = good.clone();
                let i = g.len() / 2;
                g[i] ^= 0x01;
                g
            }),
            ("bytes after the end", [good.as_slice(), b"x"].concat()),
            ("not a backup", b"hello".to_vec()),
        ];
        for (what, bytes) in cases {
            let f = dir.path().join("bad.backup");
            std::fs::write(&f, bytes).unwrap();
            assert!(restore(&f, &target, 100).is_err(), "{what}");
            assert!(!path.exists(), "{what}: no store is left behind");
        }
        // A store that exists is never overwritten.
        restore(&file, &target, 100).unwrap();
        assert!(restore(&file, &target, 100).is_err());
    }
}
