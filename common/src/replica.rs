//! The local replica of the control plane's state that every router and cell
//! runs on.
//!
//! - `Watch` streams a snapshot (in parts) and then deltas; each is written
//!   to a local redb file in one transaction, then published as a new
//!   immutable [`ReplicaState`] behind an `ArcSwap` (readers never take a
//!   lock), then ACKed. A delta that cannot be applied is NACKed and the
//!   subscription is restarted from the last applied revision.
//! - At start the replica loads the persisted copy, so a process restarted
//!   while the control plane is down still serves (static stability).
//! - `ready()` is true once any snapshot is held, persisted or live.
//! - The directory is compact ([`Directory`]): its base is persisted as a few
//!   large column blobs, the changes since as rows.
//!
//! Why one file of this length: the subscription, the persisted copy and the
//! published state are the one protocol described above, and its tests
//! (persisting, reloading, applying changes) follow the code.

use crate::directory::{self, Base, Directory, Table};
use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use homecell_proto::control::{
    Ack, ChangeSet, ConfigEntry, ConfigValue, Nack, Region, Snapshot, Subscribe, SubscriberKind,
    WatchRequest, change, sync_service_client::SyncServiceClient, watch_request, watch_response,
};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::tls::TlsMaterial;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const REGIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("regions");
const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config");
/// (column, chunk number) → little-endian bytes of the directory's base.
const DIR_BASE: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("directory_base");
/// key → region index, or `REMOVED`: the directory's overlay.
const DIR_USERS: TableDefinition<u128, u16> = TableDefinition::new("directory_users");
const DIR_CLAIMS: TableDefinition<u128, u16> = TableDefinition::new("directory_claims");
/// The claims table of the first format (text rows), dropped on upgrade.
const CLAIMS_V1: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");
const REMOVED: u16 = u16::MAX;
/// Bytes per base chunk.
const CHUNK: usize = 4 << 20;
/// The layout this code writes; a file without it is refetched.
const FORMAT: &[u8] = b"2";
/// redb's page cache: the directory lives in memory anyway, so the cache
/// only needs to hold what one write touches.
const CACHE_BYTES: usize = 16 << 20;

/// The replicated state at one revision. Immutable once published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaState {
    pub revision: u64,
    /// The control-plane store's epoch this state came from (0: none yet).
    pub epoch: u64,
    /// The epoch that store was restored or recovered from (0: it never
    /// was).
    pub parent_epoch: u64,
    pub regions: BTreeMap<String, Region>,
    /// Keyed by (key, region); region is empty for the global value.
    pub config: BTreeMap<(String, String), ConfigEntry>,
    /// Users' and identifiers' home regions.
    pub directory: Directory,
}

/// A snapshot being received, part by part.
pub struct SnapshotParts {
    revision: u64,
    epoch: u64,
    parent: (u64, u64),
    regions: Vec<Region>,
    config: Vec<ConfigEntry>,
    directory: directory::Builder,
}

impl SnapshotParts {
    pub fn new(first: &Snapshot) -> Self {
        Self {
            revision: first.revision,
            epoch: first.epoch,
            parent: (first.parent_epoch, first.parent_revision),
            regions: Vec::new(),
            config: Vec::new(),
            directory: directory::Builder::with_capacity(
                usize::try_from(first.users_total).unwrap_or(0),
                usize::try_from(first.claims_total).unwrap_or(0),
            ),
        }
    }

    /// Adds a part; all parts must carry the same revision.
    pub fn add(&mut self, part: Snapshot) -> Result<()> {
        if part.revision != self.revision || part.epoch != self.epoch {
            bail!(
                "snapshot part of revision {} inside snapshot {}",
                part.revision,
                self.revision
            );
        }
        self.regions.extend(part.regions);
        self.config.extend(part.config);
        for u in part.users {
            self.directory.user(&u.user_id, &u.region);
        }
        for c in part.claims {
            self.directory.claim(&c.hmac, &c.region);
        }
        Ok(())
    }

    /// The epoch and revision the snapshot's store was rebuilt from, if it
    /// was (0, 0 otherwise).
    pub fn parent(&self) -> (u64, u64) {
        self.parent
    }

    pub fn finish(self) -> ReplicaState {
        ReplicaState {
            revision: self.revision,
            epoch: self.epoch,
            parent_epoch: self.parent.0,
            regions: self
                .regions
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect(),
            config: self
                .config
                .into_iter()
                .map(|e| ((e.key.clone(), e.region.clone()), e))
                .collect(),
            directory: self.directory.build(),
        }
    }
}

impl ReplicaState {
    /// A whole snapshot in one message.
    pub fn from_snapshot(s: Snapshot) -> Self {
        let mut parts = SnapshotParts::new(&s);
        parts.add(s).expect("one part has one revision");
        parts.finish()
    }

    /// The home region of a user, from the directory.
    pub fn user_region(&self, user_id: &str) -> Option<&str> {
        self.directory.user_region(user_id)
    }

    /// The home region of an identifier, by its HMAC (hex).
    pub fn claim_region(&self, hmac: &str) -> Option<&str> {
        self.directory.claim_region(hmac)
    }

    /// Applies one change set; it must follow this state's revision. A
    /// directory whose overlay has grown is compacted here.
    pub fn apply(&mut self, cs: &ChangeSet) -> Result<()> {
        if cs.revision <= self.revision {
            bail!(
                "delta {} does not follow the applied revision {}",
                cs.revision,
                self.revision
            );
        }
        for c in &cs.changes {
            match c.kind.as_ref() {
                Some(change::Kind::RegionUpserted(r)) => {
                    self.regions.insert(r.id.clone(), r.clone());
                }
                Some(change::Kind::ConfigSet(e)) => {
                    self.config
                        .insert((e.key.clone(), e.region.clone()), e.clone());
                }
                Some(change::Kind::ConfigDeleted(k)) => {
                    self.config.remove(&(k.key.clone(), k.region.clone()));
                }
                Some(change::Kind::IdentifierClaimed(c)) => {
                    self.directory.set_claim(&c.hmac, &c.region)
                }
                Some(change::Kind::IdentifierReleased(hmac)) => self.directory.remove_claim(hmac),
                Some(change::Kind::UserHomed(u)) => self.directory.set_user(&u.user_id, &u.region),
                Some(change::Kind::UserRemoved(id)) => self.directory.remove_user(id),
                // A kind from a newer control plane: not ours to act on.
                None => tracing::debug!(revision = cs.revision, "skipping an unknown change kind"),
            }
        }
        if self.directory.wants_compaction() {
            self.directory = self.directory.compacted();
        }
        self.revision = cs.revision;
        Ok(())
    }

    /// The value in force for `region`: its override, else the global value.
    pub fn config_value(&self, key: &str, region: &str) -> Option<&ConfigValue> {
        self.config
            .get(&(key.to_string(), region.to_string()))
            .or_else(|| self.config.get(&(key.to_string(), String::new())))
            .and_then(|e| e.value.as_ref())
    }

    /// A positive integer setting for `region`, else `default`.
    pub fn config_int(&self, key: &str, region: &str, default: i64) -> i64 {
        use homecell_proto::control::config_value::Kind;
        match self.config_value(key, region).and_then(|v| v.kind.as_ref()) {
            Some(Kind::IntValue(i)) if *i > 0 => *i,
            _ => default,
        }
    }

    /// A boolean setting for `region`, else `default`.
    pub fn config_bool(&self, key: &str, region: &str, default: bool) -> bool {
        use homecell_proto::control::config_value::Kind;
        match self.config_value(key, region).and_then(|v| v.kind.as_ref()) {
            Some(Kind::BoolValue(b)) => *b,
            _ => default,
        }
    }

    /// A positive duration setting for `region` in milliseconds, else `default_ms`.
    pub fn config_ms(&self, key: &str, region: &str, default_ms: i64) -> i64 {
        use homecell_proto::control::config_value::Kind;
        match self.config_value(key, region).and_then(|v| v.kind.as_ref()) {
            Some(Kind::DurationMs(ms)) if *ms > 0 => i64::try_from(*ms).unwrap_or(i64::MAX),
            _ => default_ms,
        }
    }
}

/// Any cell's published signing key, by kid, with its issuer `cell.<region>`.
impl crate::jwt::KeySet for ReplicaState {
    fn key(&self, kid: &str) -> Option<(Vec<u8>, String)> {
        self.regions.values().find_map(|r| {
            r.signing_keys
                .iter()
                .find(|k| k.kid == kid)
                .map(|k| (k.public_key.clone(), format!("cell.{}", r.id)))
        })
    }

    fn publishes(&self, kid: &str, public_key: &[u8], issuer: &str) -> bool {
        issuer
            .strip_prefix("cell.")
            .and_then(|region| self.regions.get(region))
            .is_some_and(|r| {
                r.signing_keys
                    .iter()
                    .any(|k| k.kid == kid && k.public_key == public_key)
            })
    }
}

fn config_row_key(key: &str, region: &str) -> String {
    format!("{key}\u{0}{region}")
}

/// The redb file that holds the last applied state.
struct LocalStore {
    db: Database,
}

/// Writes `values` as little-endian chunks of at most `CHUNK` bytes under
/// (`name`, 0..), one chunk in memory at a time.
fn write_column<T: Copy, const N: usize>(
    base: &mut redb::Table<(&str, u32), &[u8]>,
    name: &str,
    values: &[T],
    to: fn(T) -> [u8; N],
) -> Result<()> {
    let mut bytes = Vec::with_capacity(CHUNK);
    for (i, chunk) in values.chunks(CHUNK / N).enumerate() {
        bytes.clear();
        for v in chunk {
            bytes.extend_from_slice(&to(*v));
        }
        base.insert((name, i as u32), bytes.as_slice())?;
    }
    Ok(())
}

/// Reads a column written by `write_column` straight into its values.
fn read_column<T, const N: usize>(
    base: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    name: &str,
    from: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    // Two passes, one chunk held at a time: the first sizes the column so it
    // is allocated once (a growing Vec would briefly need twice the room).
    let range = || base.range((name, 0)..=(name, u32::MAX));
    let mut len = 0;
    for row in range()? {
        len += row?.1.value().len() / N;
    }
    let mut out = Vec::with_capacity(len);
    for row in range()? {
        out.extend(
            row?.1
                .value()
                .chunks_exact(N)
                .map(|c| from(c.try_into().expect("N bytes"))),
        );
    }
    Ok(out)
}

/// Reads the state persisted in a replica file that no process holds open
/// (a stopped router's or cell's, or a copy of one): what `control-plane
/// recover --from-replica` rebuilds from.
pub fn read_replica_file(path: &Path) -> Result<ReplicaState> {
    let db = Database::open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => anyhow!(
            "{} is open in a running process; stop it or copy the file from a stopped one",
            path.display()
        ),
        e => anyhow!("cannot open the replica {}: {e}", path.display()),
    })?;
    let (state, _) = LocalStore { db }.load()?;
    if state.revision == 0 {
        bail!("{} holds no control-plane state", path.display());
    }
    Ok(state)
}

impl LocalStore {
    fn open(path: &Path) -> Result<Self> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .with_context(|| format!("cannot open the local replica {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(META)?;
        txn.open_table(REGIONS)?;
        txn.open_table(CONFIG)?;
        txn.open_table(DIR_BASE)?;
        txn.open_table(DIR_USERS)?;
        txn.open_table(DIR_CLAIMS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    fn load(&self) -> Result<(ReplicaState, Option<String>)> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let node_id = meta
            .get("node_id")?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        let current = meta.get("format")?.is_some_and(|v| v.value() == FORMAT);
        let revision = match meta.get("revision")? {
            Some(v) if current => u64::from_le_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| anyhow!("corrupt revision"))?,
            ),
            Some(_) => {
                tracing::info!("the local replica has an older layout; fetching a snapshot");
                return Ok((ReplicaState::default(), node_id));
            }
            None => 0,
        };
        let epoch = match meta.get("epoch")? {
            Some(v) => {
                u64::from_le_bytes(v.value().try_into().map_err(|_| anyhow!("corrupt epoch"))?)
            }
            None => 0,
        };
        let parent_epoch = match meta.get("parent_epoch")? {
            Some(v) => u64::from_le_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| anyhow!("corrupt parent epoch"))?,
            ),
            None => 0,
        };
        let mut state = ReplicaState {
            revision,
            epoch,
            parent_epoch,
            ..Default::default()
        };
        for row in txn.open_table(REGIONS)?.iter()? {
            let (_, v) = row?;
            let r = Region::decode(v.value())?;
            state.regions.insert(r.id.clone(), r);
        }
        for row in txn.open_table(CONFIG)?.iter()? {
            let (_, v) = row?;
            let e = ConfigEntry::decode(v.value())?;
            state.config.insert((e.key.clone(), e.region.clone()), e);
        }
        let names = meta
            .get("region_names")?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned())
            .unwrap_or_default();
        let names: Vec<String> = names
            .split('\n')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        let base = txn.open_table(DIR_BASE)?;
        let table = |k: &str, r: &str| -> Result<Table> {
            let keys = read_column(&base, k, u128::from_le_bytes)?;
            let ixs = read_column(&base, r, u16::from_le_bytes)?;
            if keys.len() != ixs.len() {
                bail!("corrupt directory column {k}");
            }
            Ok(Table::from_columns(keys, ixs))
        };
        let dir_base = Base {
            users: table("user_keys", "user_regions")?,
            claims: table("claim_keys", "claim_regions")?,
        };
        let overlay = |t: TableDefinition<u128, u16>| -> Result<Vec<(u128, Option<u16>)>> {
            let mut rows = Vec::new();
            for row in txn.open_table(t)?.iter()? {
                let (k, v) = row?;
                rows.push((k.value(), (v.value() != REMOVED).then_some(v.value())));
            }
            Ok(rows)
        };
        state.directory =
            Directory::new(names, dir_base).with_overlay(overlay(DIR_USERS)?, overlay(DIR_CLAIMS)?);
        Ok((state, node_id))
    }

    fn set_node_id(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("node_id", id.as_bytes())?;
        txn.commit()?;
        Ok(())
    }

    /// Writes the directory's base (and clears its overlay rows).
    fn write_base(txn: &redb::WriteTransaction, d: &Directory) -> Result<()> {
        let mut base = txn.open_table(DIR_BASE)?;
        base.retain(|_, _| false)?;
        let (uk, ur) = d.base().users.columns();
        let (ck, cr) = d.base().claims.columns();
        write_column(&mut base, "user_keys", uk, u128::to_le_bytes)?;
        write_column(&mut base, "user_regions", ur, u16::to_le_bytes)?;
        write_column(&mut base, "claim_keys", ck, u128::to_le_bytes)?;
        write_column(&mut base, "claim_regions", cr, u16::to_le_bytes)?;
        txn.open_table(DIR_USERS)?.retain(|_, _| false)?;
        txn.open_table(DIR_CLAIMS)?.retain(|_, _| false)?;
        Self::write_overlay(txn, d)
    }

    /// Writes the directory's overlay rows and region names.
    fn write_overlay(txn: &redb::WriteTransaction, d: &Directory) -> Result<()> {
        let (users, claims) = d.overlay();
        for (t, rows) in [(DIR_USERS, users), (DIR_CLAIMS, claims)] {
            let mut table = txn.open_table(t)?;
            for (k, v) in rows {
                table.insert(k, v.unwrap_or(REMOVED))?;
            }
        }
        txn.open_table(META)?
            .insert("region_names", d.names().join("\n").as_bytes())?;
        Ok(())
    }

    /// Replaces everything with a snapshot, in one transaction.
    fn write_snapshot(&self, s: &ReplicaState) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut regions = txn.open_table(REGIONS)?;
            regions.retain(|_, _| false)?;
            for r in s.regions.values() {
                regions.insert(r.id.as_str(), r.encode_to_vec().as_slice())?;
            }
            let mut config = txn.open_table(CONFIG)?;
            config.retain(|_, _| false)?;
            for e in s.config.values() {
                config.insert(
                    config_row_key(&e.key, &e.region).as_str(),
                    e.encode_to_vec().as_slice(),
                )?;
            }
            Self::write_base(&txn, &s.directory)?;
            let _ = txn.delete_table(CLAIMS_V1)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("format", FORMAT)?;
            meta.insert("revision", s.revision.to_le_bytes().as_slice())?;
            meta.insert("epoch", s.epoch.to_le_bytes().as_slice())?;
            meta.insert("parent_epoch", s.parent_epoch.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies one delta's rows and its revision, in one transaction. `next`
    /// is the state after it: its overlay rows (or, when the delta compacted
    /// the directory, its new base) are written.
    fn write_delta(&self, cs: &ChangeSet, next: &ReplicaState, compacted: bool) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut regions = txn.open_table(REGIONS)?;
            let mut config = txn.open_table(CONFIG)?;
            for c in &cs.changes {
                match c.kind.as_ref() {
                    Some(change::Kind::RegionUpserted(r)) => {
                        regions.insert(r.id.as_str(), r.encode_to_vec().as_slice())?;
                    }
                    Some(change::Kind::ConfigSet(e)) => {
                        config.insert(
                            config_row_key(&e.key, &e.region).as_str(),
                            e.encode_to_vec().as_slice(),
                        )?;
                    }
                    Some(change::Kind::ConfigDeleted(k)) => {
                        config.remove(config_row_key(&k.key, &k.region).as_str())?;
                    }
                    _ => {}
                }
            }
            if compacted {
                Self::write_base(&txn, &next.directory)?;
            } else {
                Self::write_delta_rows(&txn, cs, &next.directory)?;
            }
            txn.open_table(META)?
                .insert("revision", cs.revision.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The overlay rows one delta touched, as they stand after it.
    fn write_delta_rows(txn: &redb::WriteTransaction, cs: &ChangeSet, d: &Directory) -> Result<()> {
        let mut users = txn.open_table(DIR_USERS)?;
        let mut claims = txn.open_table(DIR_CLAIMS)?;
        let ix = |region: Option<&str>| {
            region
                .and_then(|r| d.names().iter().position(|n| n == r))
                .map_or(REMOVED, |i| i as u16)
        };
        for c in &cs.changes {
            match c.kind.as_ref() {
                Some(change::Kind::IdentifierClaimed(c)) => {
                    claims.insert(directory::key(&c.hmac), ix(d.claim_region(&c.hmac)))?;
                }
                Some(change::Kind::IdentifierReleased(h)) => {
                    claims.insert(directory::key(h), ix(d.claim_region(h)))?;
                }
                Some(change::Kind::UserHomed(u)) => {
                    users.insert(directory::key(&u.user_id), ix(d.user_region(&u.user_id)))?;
                }
                Some(change::Kind::UserRemoved(id)) => {
                    users.insert(directory::key(id), ix(d.user_region(id)))?;
                }
                _ => {}
            }
        }
        txn.open_table(META)?
            .insert("region_names", d.names().join("\n").as_bytes())?;
        Ok(())
    }
}

static REVISION_GAUGE: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    let g = prometheus::IntGauge::new(
        "homecell_replica_revision",
        "Revision of the control-plane state applied locally",
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});
static CONNECTED_GAUGE: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    let g = prometheus::IntGauge::new(
        "homecell_replica_connected",
        "1 while the Watch stream to the control plane is open",
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(g.clone()));
    g
});
static APPLY_ERRORS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    let c = prometheus::IntCounter::new(
        "homecell_replica_nacks_total",
        "Snapshots or deltas that could not be applied (NACKed)",
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

static EPOCH_CHANGES: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    let c = prometheus::IntCounter::new(
        "homecell_replica_epoch_changes_total",
        "Snapshots of a new control-plane epoch (a restored or recovered store) taken over held state",
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});
static EPOCH_CONFLICTS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    let c = prometheus::IntCounter::new(
        "homecell_replica_epoch_conflicts_total",
        "New-epoch snapshots that replaced state newer than the store they were rebuilt from",
    )
    .expect("valid metric");
    let _ = prometheus::register(Box::new(c.clone()));
    c
});

/// Where and how a replica reaches the control plane.
#[derive(Clone)]
pub struct WatchTarget {
    /// `https://host:port` of the control plane's gRPC listener, or a
    /// comma-separated list of its instances: each new attempt after a
    /// failure goes to the next one.
    pub endpoint: String,
    /// The name the control plane's certificate carries.
    pub server_name: String,
    pub tls: TlsMaterial,
    pub kind: SubscriberKind,
    pub region: String,
}

/// A replica of the control plane's state, persisted and kept current.
pub struct Replica {
    store: Arc<LocalStore>,
    current: ArcSwap<ReplicaState>,
    revision_tx: watch::Sender<u64>,
    node_id: String,
}

impl Replica {
    /// Opens (or creates) the local copy at `path` and loads what it holds.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let store = LocalStore::open(path)?;
        let (state, node_id) = store.load()?;
        let node_id = match node_id {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                store.set_node_id(&id)?;
                id
            }
        };
        REVISION_GAUGE.set(state.revision as i64);
        LazyLock::force(&EPOCH_CHANGES);
        LazyLock::force(&EPOCH_CONFLICTS);
        let (revision_tx, _) = watch::channel(state.revision);
        Ok(Arc::new(Self {
            store: Arc::new(store),
            current: ArcSwap::from_pointee(state),
            revision_tx,
            node_id,
        }))
    }

    /// The current state; cheap, lock-free.
    pub fn state(&self) -> Arc<ReplicaState> {
        self.current.load_full()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// True once a snapshot is held (persisted or received).
    pub fn is_ready(&self) -> bool {
        self.current.load().revision > 0
    }

    /// Notified with each newly applied revision.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Replaces the state with a snapshot. A snapshot of another epoch
    /// (the control plane was restored or recovered) replaces it too, but
    /// never silently: when what this replica held reaches past what the
    /// new store was rebuilt from, the lost revisions are counted and logged
    /// (the control plane's `status` shows them as well).
    async fn apply_snapshot(&self, state: ReplicaState, parent: (u64, u64)) -> Result<u64> {
        let held = self.state();
        if held.epoch != 0 && held.epoch != state.epoch {
            EPOCH_CHANGES.inc();
            let (parent_epoch, parent_revision) = parent;
            let lost = if held.epoch == parent_epoch {
                held.revision > parent_revision
            } else {
                // Not the store this one was rebuilt from: nothing says what
                // it shares with ours, so every revision held is in doubt.
                true
            };
            if lost {
                EPOCH_CONFLICTS.inc();
                tracing::error!(
                    held_epoch = held.epoch,
                    held_revision = held.revision,
                    epoch = state.epoch,
                    rebuilt_from_epoch = parent_epoch,
                    rebuilt_from_revision = parent_revision,
                    "the control plane was restored to an older state than this replica held; \
                     taking its snapshot (the revisions past its source are gone from the directory \
                     until cells assert their claims again)"
                );
            } else {
                tracing::warn!(
                    held_epoch = held.epoch,
                    epoch = state.epoch,
                    "the control plane starts a new epoch; taking its snapshot"
                );
            }
        }
        let store = self.store.clone();
        let state =
            tokio::task::spawn_blocking(move || store.write_snapshot(&state).map(|()| state))
                .await??;
        Ok(self.publish(state))
    }

    async fn apply_delta(&self, cs: ChangeSet) -> Result<u64> {
        let current = self.state();
        let store = self.store.clone();
        // Off the runtime: a compaction is a pass over the whole directory.
        let next = tokio::task::spawn_blocking(move || {
            let mut next = (*current).clone();
            next.apply(&cs)?;
            let compacted = !next.directory.shares_base(&current.directory);
            store.write_delta(&cs, &next, compacted)?;
            anyhow::Ok(next)
        })
        .await??;
        Ok(self.publish(next))
    }

    fn publish(&self, state: ReplicaState) -> u64 {
        let revision = state.revision;
        self.current.store(Arc::new(state));
        REVISION_GAUGE.set(revision as i64);
        self.revision_tx.send_replace(revision);
        revision
    }

    /// Keeps the replica current until `shutdown`: connects, watches, and
    /// reconnects with capped backoff whenever the stream breaks.
    pub async fn run(self: Arc<Self>, target: WatchTarget, shutdown: CancellationToken) {
        let endpoints: Vec<String> = homecell_proto::region::internal_endpoints(&target.endpoint)
            .map(str::to_string)
            .collect();
        let mut next = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            let endpoint = endpoints.get(next % endpoints.len().max(1)).cloned();
            let target = WatchTarget {
                endpoint: endpoint.unwrap_or_else(|| target.endpoint.clone()),
                ..target.clone()
            };
            let attempt = self.watch_once(&target, &shutdown);
            let outcome = tokio::select! {
                r = attempt => r,
                _ = shutdown.cancelled() => return,
            };
            CONNECTED_GAUGE.set(0);
            match outcome {
                Ok(true) => backoff = Duration::from_millis(100),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), endpoint = %target.endpoint, "watch stream to the control plane failed; serving the last applied state")
                }
            }
            // The next attempt goes to the next instance: one that broke
            // the stream (or never answered) is not tried again first. The
            // rest of the list is tried at once; only a whole pass that
            // failed backs off.
            next += 1;
            if !next.is_multiple_of(endpoints.len().max(1)) {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(3));
        }
    }

    /// One subscription. Returns Ok(true) if it made progress before ending.
    async fn watch_once(&self, target: &WatchTarget, shutdown: &CancellationToken) -> Result<bool> {
        let channel = tonic::transport::Endpoint::from_shared(target.endpoint.clone())?
            .tls_config(target.tls.tonic_client(&target.server_name))?
            .connect_timeout(Duration::from_secs(2))
            // A control-plane instance that goes silent (cut off, its
            // host gone) is noticed within 3 s and the next one dialled.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .context("cannot connect")?;
        let mut client = SyncServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<WatchRequest>(16);
        let from_revision = self.state().revision;
        tx.send(WatchRequest {
            kind: Some(watch_request::Kind::Subscribe(Subscribe {
                node_id: self.node_id.clone(),
                kind: target.kind as i32,
                region: target.region.clone(),
                from_revision,
                epoch: self.state().epoch,
            })),
        })
        .await?;
        let mut stream = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        CONNECTED_GAUGE.set(1);
        tracing::info!(from_revision, endpoint = %target.endpoint, "watching the control plane");
        let mut progressed = false;
        let mut parts: Option<SnapshotParts> = None;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = shutdown.cancelled() => return Ok(progressed),
            };
            let Some(msg) = msg else {
                return Ok(progressed);
            };
            let (offered, applied) = match msg.kind {
                Some(watch_response::Kind::Snapshot(s)) => {
                    let (revision, more) = (s.revision, s.more);
                    let assembled = parts.get_or_insert_with(|| SnapshotParts::new(&s));
                    match assembled.add(s) {
                        Ok(()) if more => continue,
                        Ok(()) => {
                            let done = parts.take().expect("parts in progress");
                            let parent = done.parent();
                            (revision, self.apply_snapshot(done.finish(), parent).await)
                        }
                        Err(e) => (revision, Err(e)),
                    }
                }
                Some(watch_response::Kind::Delta(d)) if parts.is_some() => {
                    parts = None;
                    (
                        d.revision,
                        Err(anyhow!("a delta inside an unfinished snapshot")),
                    )
                }
                Some(watch_response::Kind::Delta(d)) => (d.revision, self.apply_delta(d).await),
                None => (0, Err(anyhow!("empty watch response"))),
            };
            let reply = match &applied {
                Ok(revision) => {
                    progressed = true;
                    tracing::debug!(revision, "applied control-plane state");
                    watch_request::Kind::Ack(Ack {
                        revision: *revision,
                    })
                }
                Err(e) => {
                    APPLY_ERRORS.inc();
                    tracing::error!(revision = offered, error = %format!("{e:#}"), "cannot apply control-plane state");
                    watch_request::Kind::Nack(Nack {
                        revision: offered,
                        error: format!("{e:#}"),
                    })
                }
            };
            tx.send(WatchRequest { kind: Some(reply) }).await?;
            if applied.is_err() {
                // Resubscribe from what we hold; the server then sends what fits.
                return Ok(progressed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use homecell_proto::control::{
        Change, ConfigKey, DirectoryUser, IdentifierClaim, RegionStatus,
    };

    fn region(id: &str) -> Region {
        Region {
            id: id.into(),
            status: RegionStatus::Active as i32,
            ..Default::default()
        }
    }

    fn delta(revision: u64, changes: Vec<change::Kind>) -> ChangeSet {
        ChangeSet {
            revision,
            changes: changes
                .into_iter()
                .map(|k| Change { kind: Some(k) })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn persists_and_reloads_snapshot_and_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.redb");
        let r = Replica::open(&path).unwrap();
        assert!(!r.is_ready());
        let node = r.node_id().to_string();
        r.apply_snapshot(
            ReplicaState::from_snapshot(Snapshot {
                revision: 3,
                regions: vec![region("cn-east")],
                config: vec![ConfigEntry {
                    key: "a.b".into(),
                    region: String::new(),
                    value: Some(ConfigValue {
                        kind: Some(homecell_proto::control::config_value::Kind::IntValue(1)),
                    }),
                    revision: 2,
                }],
                claims: vec![IdentifierClaim {
                    hmac: "h1".into(),
                    user_id: "u1".into(),
                    region: "cn-east".into(),
                }],
                users: vec![DirectoryUser {
                    user_id: "u1".into(),
                    region: "cn-east".into(),
                }],
                ..Default::default()
            }),
            (0, 0),
        )
        .await
        .unwrap();
        r.apply_delta(delta(
            4,
            vec![
                change::Kind::RegionUpserted(region("eu-west")),
                change::Kind::ConfigDeleted(ConfigKey {
                    key: "a.b".into(),
                    region: String::new(),
                }),
                change::Kind::UserHomed(DirectoryUser {
                    user_id: "u2".into(),
                    region: "eu-west".into(),
                }),
                change::Kind::IdentifierReleased("h1".into()),
            ],
        ))
        .await
        .unwrap();
        // A stale delta is refused and changes nothing.
        assert!(r.apply_delta(delta(4, vec![])).await.is_err());
        let before = r.state();
        drop(r);

        let again = Replica::open(&path).unwrap();
        assert!(again.is_ready());
        assert_eq!(again.node_id(), node);
        assert_eq!(*again.state(), *before);
        assert_eq!(again.state().revision, 4);
        assert_eq!(again.state().regions.len(), 2);
        assert!(again.state().config.is_empty());
        assert_eq!(again.state().claim_region("h1"), None);
        assert_eq!(again.state().user_region("u1"), Some("cn-east"));
        assert_eq!(again.state().user_region("u2"), Some("eu-west"));
    }

    #[test]
    fn region_override_wins_over_global() {
        let v = |i| ConfigValue {
            kind: Some(homecell_proto::control::config_value::Kind::IntValue(i)),
        };
        let mut s = ReplicaState::default();
        s.apply(&delta(
            1,
            vec![
                change::Kind::ConfigSet(ConfigEntry {
                    key: "k".into(),
                    region: String::new(),
                    value: Some(v(1)),
                    revision: 1,
                }),
                change::Kind::ConfigSet(ConfigEntry {
                    key: "k".into(),
                    region: "eu-west".into(),
                    value: Some(v(2)),
                    revision: 1,
                }),
            ],
        ))
        .unwrap();
        assert_eq!(s.config_value("k", "eu-west"), Some(&v(2)));
        assert_eq!(s.config_value("k", "cn-east"), Some(&v(1)));
        assert_eq!(s.config_value("x", "cn-east"), None);
    }

    #[test]
    fn a_published_key_is_checked_in_place_as_key_finds_it() {
        use crate::jwt::KeySet;
        use homecell_proto::control::SigningKey;
        let mut state = ReplicaState::default();
        for (id, kid) in [("cn-east", "k1"), ("eu-west", "k2")] {
            let mut r = region(id);
            r.signing_keys.push(SigningKey {
                kid: kid.into(),
                public_key: vec![kid.as_bytes()[1]; 32],
                ..Default::default()
            });
            state.regions.insert(id.into(), r);
        }
        let (pk, issuer) = state.key("k2").unwrap();
        assert_eq!(issuer, "cell.eu-west");
        assert!(state.publishes("k2", &pk, &issuer));
        // Another key, another issuer, another kid, or no such region.
        assert!(!state.publishes("k2", &[0; 32], &issuer));
        assert!(!state.publishes("k2", &pk, "cell.cn-east"));
        assert!(!state.publishes("k1", &pk, &issuer));
        assert!(!state.publishes("k2", &pk, "eu-west"));
    }
}

#[cfg(test)]
mod directory_tests {
    use super::*;
    use homecell_proto::control::{Change, DirectoryUser, IdentifierClaim};

    fn cs(revision: u64, kinds: Vec<change::Kind>) -> ChangeSet {
        ChangeSet {
            revision,
            changes: kinds
                .into_iter()
                .map(|k| Change { kind: Some(k) })
                .collect(),
            ..Default::default()
        }
    }

    fn claim(h: &str, user: &str, region: &str) -> change::Kind {
        change::Kind::IdentifierClaimed(IdentifierClaim {
            hmac: h.into(),
            user_id: user.into(),
            region: region.into(),
        })
    }

    fn homed(user: &str, region: &str) -> change::Kind {
        change::Kind::UserHomed(DirectoryUser {
            user_id: user.into(),
            region: region.into(),
        })
    }

    #[test]
    fn users_and_claims_follow_the_changes() {
        let mut s = ReplicaState::default();
        s.apply(&cs(
            1,
            vec![
                claim("a", "u1", "cn-east"),
                homed("u1", "cn-east"),
                claim("b", "u1", "cn-east"),
            ],
        ))
        .unwrap();
        assert_eq!(s.user_region("u1"), Some("cn-east"));
        assert_eq!(s.claim_region("b"), Some("cn-east"));
        s.apply(&cs(2, vec![change::Kind::IdentifierReleased("a".into())]))
            .unwrap();
        assert_eq!(s.claim_region("a"), None);
        s.apply(&cs(
            3,
            vec![
                change::Kind::IdentifierReleased("b".into()),
                change::Kind::UserRemoved("u1".into()),
            ],
        ))
        .unwrap();
        assert_eq!(s.user_region("u1"), None);
    }

    /// Enough deltas to compact the overlay, persisted and reloaded.
    #[tokio::test]
    async fn a_compacted_directory_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.redb");
        let r = Replica::open(&path).unwrap();
        r.apply_snapshot(
            ReplicaState::from_snapshot(Snapshot {
                revision: 1,
                users: vec![DirectoryUser {
                    user_id: "first".into(),
                    region: "cn-east".into(),
                }],
                ..Default::default()
            }),
            (0, 0),
        )
        .await
        .unwrap();
        let user = |n: u32| uuid::Uuid::from_u128(u128::from(n) << 80).to_string();
        let mut revision = 1;
        let mut compactions = 0;
        for batch in 0..40u32 {
            let before = r.state();
            revision += 1;
            let kinds = (0..2_000).map(|i| homed(&user(batch * 2_000 + i), "eu-west"));
            r.apply_delta(cs(revision, kinds.collect())).await.unwrap();
            compactions += usize::from(!r.state().directory.shares_base(&before.directory));
        }
        revision += 1;
        r.apply_delta(cs(revision, vec![change::Kind::UserRemoved(user(5))]))
            .await
            .unwrap();
        assert!(compactions >= 1, "80,000 rows must have compacted once");
        let before = r.state();
        drop(r);
        let again = Replica::open(&path).unwrap().state();
        assert_eq!(again.revision, before.revision);
        for s in [&before, &again] {
            assert_eq!(s.user_region("first"), Some("cn-east"));
            assert_eq!(s.user_region(&user(79_999)), Some("eu-west"));
            assert_eq!(s.user_region(&user(5)), None);
            assert_eq!(s.directory.counts(), (80_000, 0));
        }
    }

    #[test]
    fn snapshot_parts_must_share_a_revision() {
        let first = Snapshot {
            revision: 7,
            more: true,
            ..Default::default()
        };
        let mut parts = SnapshotParts::new(&first);
        parts.add(first).unwrap();
        assert!(
            parts
                .add(Snapshot {
                    revision: 8,
                    ..Default::default()
                })
                .is_err()
        );
    }
}
