//! The local replica of the control plane's state that every router and cell
//! runs on.
//!
//! - `Watch` streams a snapshot and then deltas; each is written to a local
//!   redb file in one transaction, then published as a new immutable
//!   [`ReplicaState`] behind an `ArcSwap` (readers never take a lock), then
//!   ACKed. A delta that cannot be applied is NACKed and the subscription is
//!   restarted from the last applied revision.
//! - At start the replica loads the persisted copy, so a process restarted
//!   while the control plane is down still serves (static stability).
//! - `ready()` is true once any snapshot is held, persisted or live.

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use homecell_proto::control::{
    Ack, ChangeSet, ConfigEntry, ConfigValue, IdentifierClaim, Nack, Region, Snapshot, Subscribe,
    SubscriberKind, WatchRequest, change, sync_service_client::SyncServiceClient, watch_request,
    watch_response,
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
const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");

/// The replicated state at one revision. Immutable once published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaState {
    pub revision: u64,
    pub regions: BTreeMap<String, Region>,
    /// Keyed by (key, region); region is empty for the global value.
    pub config: BTreeMap<(String, String), ConfigEntry>,
    /// The directory's identifier claims by HMAC. A persistent map: a delta
    /// copies a path, not millions of entries.
    pub claims: imbl::HashMap<String, IdentifierClaim>,
    /// user id → (home region, number of identifiers it holds), derived
    /// from the claims: the directory lookup for user-addressed requests.
    pub users: imbl::HashMap<String, (String, u32)>,
}

impl ReplicaState {
    pub fn from_snapshot(s: Snapshot) -> Self {
        Self {
            revision: s.revision,
            regions: s.regions.into_iter().map(|r| (r.id.clone(), r)).collect(),
            config: s
                .config
                .into_iter()
                .map(|e| ((e.key.clone(), e.region.clone()), e))
                .collect(),
            claims: imbl::HashMap::new(),
            users: imbl::HashMap::new(),
        }
        .with_claims(s.claims)
    }

    fn with_claims(mut self, claims: Vec<IdentifierClaim>) -> Self {
        for c in claims {
            self.add_claim(c);
        }
        self
    }

    fn add_claim(&mut self, c: IdentifierClaim) {
        if let Some(old) = self.claims.insert(c.hmac.clone(), c.clone()) {
            self.drop_user_ref(&old.user_id);
        }
        let entry = self
            .users
            .entry(c.user_id.clone())
            .or_insert((c.region.clone(), 0));
        entry.0 = c.region;
        entry.1 += 1;
    }

    fn remove_claim(&mut self, hmac: &str) {
        if let Some(old) = self.claims.remove(hmac) {
            self.drop_user_ref(&old.user_id);
        }
    }

    fn drop_user_ref(&mut self, user_id: &str) {
        let gone = match self.users.get_mut(user_id) {
            Some(e) => {
                e.1 = e.1.saturating_sub(1);
                e.1 == 0
            }
            None => false,
        };
        if gone {
            self.users.remove(user_id);
        }
    }

    /// The home region of a user, from the directory.
    pub fn user_region(&self, user_id: &str) -> Option<&str> {
        self.users.get(user_id).map(|(r, _)| r.as_str())
    }

    /// Applies one change set; it must follow this state's revision.
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
                Some(change::Kind::IdentifierClaimed(c)) => self.add_claim(c.clone()),
                Some(change::Kind::IdentifierReleased(hmac)) => self.remove_claim(hmac),
                // A kind from a newer control plane: not ours to act on.
                None => tracing::debug!(revision = cs.revision, "skipping an unknown change kind"),
            }
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
}

fn config_row_key(key: &str, region: &str) -> String {
    format!("{key}\u{0}{region}")
}

/// The redb file that holds the last applied state.
struct LocalStore {
    db: Database,
}

impl LocalStore {
    fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)
            .with_context(|| format!("cannot open the local replica {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(META)?;
        txn.open_table(REGIONS)?;
        txn.open_table(CONFIG)?;
        txn.open_table(CLAIMS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    fn load(&self) -> Result<(ReplicaState, Option<String>)> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let revision = match meta.get("revision")? {
            Some(v) => u64::from_le_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| anyhow!("corrupt revision"))?,
            ),
            None => 0,
        };
        let node_id = meta
            .get("node_id")?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        let mut state = ReplicaState {
            revision,
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
        for row in txn.open_table(CLAIMS)?.iter()? {
            let (_, v) = row?;
            state.add_claim(IdentifierClaim::decode(v.value())?);
        }
        Ok((state, node_id))
    }

    fn set_node_id(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("node_id", id.as_bytes())?;
        txn.commit()?;
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
            let mut claims = txn.open_table(CLAIMS)?;
            claims.retain(|_, _| false)?;
            for c in s.claims.values() {
                claims.insert(c.hmac.as_str(), c.encode_to_vec().as_slice())?;
            }
            txn.open_table(META)?
                .insert("revision", s.revision.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies one delta's rows and its revision, in one transaction.
    fn write_delta(&self, cs: &ChangeSet) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut regions = txn.open_table(REGIONS)?;
            let mut config = txn.open_table(CONFIG)?;
            let mut claims = txn.open_table(CLAIMS)?;
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
                    Some(change::Kind::IdentifierClaimed(c)) => {
                        claims.insert(c.hmac.as_str(), c.encode_to_vec().as_slice())?;
                    }
                    Some(change::Kind::IdentifierReleased(hmac)) => {
                        claims.remove(hmac.as_str())?;
                    }
                    None => {}
                }
            }
            txn.open_table(META)?
                .insert("revision", cs.revision.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
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

/// Where and how a replica reaches the control plane.
#[derive(Clone)]
pub struct WatchTarget {
    /// `https://host:port` of the control plane's gRPC listener.
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

    async fn apply_snapshot(&self, snapshot: Snapshot) -> Result<u64> {
        let state = ReplicaState::from_snapshot(snapshot);
        let store = self.store.clone();
        let state =
            tokio::task::spawn_blocking(move || store.write_snapshot(&state).map(|()| state))
                .await??;
        Ok(self.publish(state))
    }

    async fn apply_delta(&self, cs: ChangeSet) -> Result<u64> {
        let mut next = (*self.state()).clone();
        next.apply(&cs)?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.write_delta(&cs)).await??;
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
        let mut backoff = Duration::from_millis(100);
        loop {
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
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
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
                    (s.revision, self.apply_snapshot(s).await)
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
    use homecell_proto::control::{Change, ConfigKey, RegionStatus};

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
        r.apply_snapshot(Snapshot {
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
        })
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
        assert_eq!(again.state().claims["h1"].user_id, "u1");
        assert_eq!(again.state().user_region("u1"), Some("cn-east"));
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
}

#[cfg(test)]
mod directory_tests {
    use super::*;
    use homecell_proto::control::Change;

    fn claim(h: &str, user: &str, region: &str) -> change::Kind {
        change::Kind::IdentifierClaimed(IdentifierClaim {
            hmac: h.into(),
            user_id: user.into(),
            region: region.into(),
        })
    }

    #[test]
    fn users_index_follows_claims() {
        let mut s = ReplicaState::default();
        let cs = |rev, kinds: Vec<change::Kind>| ChangeSet {
            revision: rev,
            changes: kinds
                .into_iter()
                .map(|k| Change { kind: Some(k) })
                .collect(),
            ..Default::default()
        };
        s.apply(&cs(
            1,
            vec![claim("a", "u1", "cn-east"), claim("b", "u1", "cn-east")],
        ))
        .unwrap();
        assert_eq!(s.user_region("u1"), Some("cn-east"));
        s.apply(&cs(2, vec![change::Kind::IdentifierReleased("a".into())]))
            .unwrap();
        assert_eq!(s.user_region("u1"), Some("cn-east"), "still holds b");
        s.apply(&cs(3, vec![change::Kind::IdentifierReleased("b".into())]))
            .unwrap();
        assert_eq!(s.user_region("u1"), None);
        // A claim moving to another user and region follows along.
        s.apply(&cs(
            4,
            vec![claim("c", "u2", "eu-west"), claim("c", "u3", "cn-east")],
        ))
        .unwrap();
        assert_eq!(
            (s.user_region("u2"), s.user_region("u3")),
            (None, Some("cn-east"))
        );
    }
}
