//! The operator's `backup`, `restore` and `recover` commands. `backup` asks
//! a running control plane (with the operator's certificate); `restore` and
//! `recover` write a new store on the control plane's host while it is
//! stopped, since the store file is its process's alone.

use crate::backup::{BackupWriter, Progress, Recovered};
use crate::cli::{Connection, Output, print_json, print_pairs};
use crate::store::{Location, Store};
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use homecell_proto::control::{BackupRequest, backup_record, backup_service_client};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Where `restore` and `recover` write: the data directory of a stopped
/// control plane, given directly or through its configuration file.
#[derive(Debug, Args, Clone)]
pub struct StoreTarget {
    /// The control plane's data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The control plane's configuration (its data_dir and retain_changes).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl StoreTarget {
    /// The store to create and the log length to keep.
    fn resolve(&self) -> Result<(Location, u64)> {
        let c = match (&self.data_dir, &self.config) {
            (Some(dir), _) => {
                homecell_common::key_file::create_private_dir(dir)?;
                return Ok((Location::File(dir.join(crate::serve::STORE_FILE)), 10_000));
            }
            (None, Some(file)) => crate::serve::ServeConfig::load(Some(file))?,
            (None, None) => bail!("name the store: --data-dir DIR or --config FILE"),
        };
        if c.store.postgres.is_none() {
            homecell_common::key_file::create_private_dir(&c.data_dir)?;
        }
        Ok((c.location(), c.retain_changes))
    }
}

/// How `restore` and `recover` name the store they wrote (never a
/// PostgreSQL URL: it may hold a password).
fn describe(location: &Location) -> String {
    match location {
        Location::File(path) => path.display().to_string(),
        Location::Postgres(_) => "postgres (from the configuration)".into(),
    }
}

/// Backups named by `--out-dir`: `control-plane-<UTC time>.backup`, which
/// sort by time.
const PREFIX: &str = "control-plane-";
const SUFFIX: &str = ".backup";

fn named_in(dir: &Path) -> PathBuf {
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    dir.join(format!("{PREFIX}{}{SUFFIX}", at.replace(':', "")))
}

/// Deletes all but the newest `keep` backups named by `--out-dir` in `dir`.
fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        .collect();
    names.sort();
    let old = names.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for n in &names[..old] {
        let p = dir.join(n);
        std::fs::remove_file(&p)?;
        removed.push(p);
    }
    Ok(removed)
}

pub async fn backup(
    conn: &Connection,
    out: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    keep: Option<u32>,
) -> Result<()> {
    let out = match (out, &out_dir) {
        (Some(out), _) => out,
        (None, Some(dir)) => named_in(dir),
        (None, None) => bail!("name the backup: --out FILE or --out-dir DIR"),
    };
    let mut writer = BackupWriter::create(&out)?;
    let mut client = backup_service_client::BackupServiceClient::new(conn.channel().await?);
    let mut stream = client.backup(BackupRequest {}).await?.into_inner();
    let mut header = None;
    let mut progress = Progress::new("backup", 0);
    let mut ended = false;
    while let Some(chunk) = stream.message().await? {
        for record in chunk.records {
            ensure!(!ended, "the control plane sent records after the trailer");
            match &record.kind {
                Some(backup_record::Kind::Header(h)) if header.is_none() => {
                    progress =
                        Progress::new("backup", h.regions + h.config + h.config_history + h.claims);
                    header = Some(*h);
                }
                Some(backup_record::Kind::Trailer(_)) => ended = true,
                _ if header.is_none() => bail!("the backup stream did not start with its header"),
                _ => progress.add(1),
            }
            writer.record(&record)?;
        }
    }
    ensure!(ended, "the backup stream ended early; nothing was written");
    let h = header.context("the backup stream had no header; nothing was written")?;
    let path = writer.finish()?;
    progress.finish();
    // Older backups go only once this one is safely in place.
    if let (Some(dir), Some(keep)) = (&out_dir, keep) {
        for p in prune(dir, keep as usize)? {
            eprintln!("removed {}", p.display());
        }
    }
    match conn.output {
        Output::Json => print_json(&json!({
            "file": path,
            "epoch": format!("{:016x}", h.epoch),
            "revision": h.revision,
            "regions": h.regions,
            "config": h.config,
            "config_history": h.config_history,
            "claims": h.claims,
        })),
        Output::Table => print_pairs(&[
            ("file", path.display().to_string()),
            ("epoch", format!("{:016x}", h.epoch)),
            ("revision", h.revision.to_string()),
            ("regions", h.regions.to_string()),
            ("config", h.config.to_string()),
            ("config history", h.config_history.to_string()),
            ("claims", h.claims.to_string()),
        ]),
    }
    Ok(())
}

pub fn restore(from: &Path, target: &StoreTarget, output: Output) -> Result<()> {
    let (location, retain) = target.resolve()?;
    let store = crate::backup::restore(from, &location, retain)?;
    let parent = store.parent().expect("a restored store has a parent");
    let mut s = Default::default();
    store.snapshot_parts(1, |first| {
        s = first;
        false
    })?;
    let s: homecell_proto::control::Snapshot = s;
    let rows = [
        ("store", describe(&location)),
        ("from epoch", format!("{:016x}", parent.epoch)),
        ("from revision", parent.revision.to_string()),
        ("epoch", format!("{:016x}", store.epoch())),
        ("revision", store.revision().to_string()),
        ("regions", s.regions.len().to_string()),
        ("config", s.config.len().to_string()),
        ("users", s.users_total.to_string()),
        ("claims", s.claims_total.to_string()),
    ];
    print_rows(output, &rows);
    Ok(())
}

pub fn recover(replica: &Path, target: &StoreTarget, output: Output) -> Result<()> {
    let (location, retain) = target.resolve()?;
    let (store, r): (Store, Recovered) = crate::backup::recover(replica, &location, retain)?;
    let rows = [
        ("store", describe(&location)),
        ("from epoch", format!("{:016x}", r.from.epoch)),
        ("from revision", r.from.revision.to_string()),
        ("epoch", format!("{:016x}", store.epoch())),
        ("revision", store.revision().to_string()),
        ("regions", r.regions.to_string()),
        ("signing keys", r.signing_keys.to_string()),
        ("config", r.config.to_string()),
        ("users", r.users.to_string()),
        ("users not readable", r.users_unreadable.to_string()),
        ("claims to reassert", r.claims_not_recoverable.to_string()),
    ];
    print_rows(output, &rows);
    if output == Output::Table {
        eprintln!(
            "the claims come back as each cell sees the new epoch and asserts its users' claims again; \
             watch `control-plane status` and the cells' logs"
        );
    }
    Ok(())
}

fn print_rows(output: Output, rows: &[(&str, String)]) {
    match output {
        Output::Json => print_json(&serde_json::Value::Object(
            rows.iter()
                .map(|(k, v)| (k.replace(' ', "_"), json!(v)))
                .collect(),
        )),
        Output::Table => print_pairs(rows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_dir_names_sort_by_time_and_prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let name = named_in(dir.path());
        let n = name.file_name().unwrap().to_str().unwrap();
        assert!(
            n.starts_with(PREFIX) && n.ends_with(SUFFIX) && !n.contains(':'),
            "{n}"
        );
        for t in ["20261201T000000Z", "20261203T000000Z", "20261202T000000Z"] {
            std::fs::write(dir.path().join(format!("{PREFIX}{t}{SUFFIX}")), b"x").unwrap();
        }
        std::fs::write(dir.path().join("unrelated.backup"), b"x").unwrap();
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(
            removed,
            [dir.path().join(format!("{PREFIX}20261201T000000Z{SUFFIX}"))]
        );
        assert!(dir.path().join("unrelated.backup").exists());
        assert_eq!(prune(dir.path(), 2).unwrap(), Vec::<PathBuf>::new());
    }
}
