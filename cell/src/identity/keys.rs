//! The cell's token signing keys: kept in the datastore (so every instance
//! of a cell signs with the same key), sealed there when the cell has a
//! seal (seal.rs), the newest active one signs, retired ones verify until
//! their tokens have expired. The public halves are published into the
//! region's metadata at the control plane, from where every router and
//! cell learns them.

use super::store::IdentityStore;
use crate::clock::now_ms;
use crate::identity::seal::{self, Seal};
use crate::identity::store::SigningKeyRow;
use anyhow::Result;
use arc_swap::ArcSwap;
use homecell_common::jwt::{self, MAX_ACCESS_TTL_SECS, SigningKey};
use homecell_common::replica::ReplicaState;
use homecell_proto::control::{
    PublishSigningKeysRequest, SigningKey as PublishedKey,
    region_service_client::RegionServiceClient,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// The `cell_info` entry that says this cell's keys are all sealed.
const KEYS_SEALED: &str = "signing_keys_sealed";

/// Retired keys verify this much longer than the longest token lifetime.
const RETIRED_GRACE_MS: i64 = (MAX_ACCESS_TTL_SECS + 60) * 1000;

struct KeySetState {
    signer: Arc<SigningKey>,
    /// Every key that still verifies: (kid, public key, created, retired).
    verifying: Vec<(String, Vec<u8>, i64, Option<i64>)>,
}

pub struct Keys {
    region: String,
    seal: Option<Arc<Seal>>,
    state: ArcSwap<KeySetState>,
}

fn new_key_row(region: &str, seal: Option<&Seal>) -> Result<(SigningKey, SigningKeyRow)> {
    let kid = format!("{region}-{}", uuid::Uuid::now_v7().simple());
    let (key, pkcs8) = SigningKey::generate(kid.clone())?;
    let private_pkcs8 = match seal {
        Some(seal) => seal.seal(&kid, &pkcs8)?,
        None => pkcs8,
    };
    let row = SigningKeyRow {
        public_key: key.public_key(),
        kid,
        private_pkcs8,
        created_at: now_ms(),
        retired_at: None,
    };
    Ok((key, row))
}

/// Generates a new key that signs from now on; the previous one is retired
/// and keeps verifying until its tokens expire.
pub async fn rotate(db: &IdentityStore, region: &str, seal: Option<&Seal>) -> Result<String> {
    let (_, row) = new_key_row(region, seal)?;
    db.rotate_signing_key(&row).await?;
    Ok(row.kid)
}

/// Seals every key stored in the plain (from before the cell had a seal).
pub async fn seal_stored(db: &IdentityStore, seal: &Seal) -> Result<usize> {
    let mut sealed = 0;
    for row in db.signing_keys().await? {
        if !seal::is_sealed(&row.private_pkcs8) {
            let stored = seal.seal(&row.kid, &row.private_pkcs8)?;
            if db
                .reseal_signing_key(&row.kid, &row.private_pkcs8, &stored)
                .await?
            {
                sealed += 1;
            }
        }
    }
    Ok(sealed)
}

async fn load(db: &IdentityStore, region: &str, seal: Option<&Seal>) -> Result<KeySetState> {
    let now = now_ms();
    let mut rows = db.signing_keys().await?;
    if !rows.iter().any(|r| r.retired_at.is_none()) {
        rotate(db, region, seal).await?;
        rows = db.signing_keys().await?;
    }
    let active = rows
        .iter()
        .rev()
        .find(|r| r.retired_at.is_none())
        .ok_or_else(|| anyhow::anyhow!("no active signing key"))?;
    let pkcs8 = seal::unseal(seal, &active.kid, &active.private_pkcs8)?;
    let signer = Arc::new(SigningKey::from_pkcs8(active.kid.clone(), &pkcs8)?);
    let verifying = rows
        .into_iter()
        .filter(|r| r.retired_at.is_none_or(|t| t + RETIRED_GRACE_MS > now))
        .map(|r| (r.kid, r.public_key, r.created_at, r.retired_at))
        .collect();
    Ok(KeySetState { signer, verifying })
}

impl Keys {
    /// The key set in `db`. The first time a cell opens it with a seal,
    /// keys stored plain (from before the cell had one) are sealed, once;
    /// from then on a plain key is refused (`seal::unseal`).
    pub async fn open(db: &IdentityStore, region: &str, seal: Option<Seal>) -> Result<Arc<Self>> {
        if let Some(seal) = &seal
            && db.db.cell_info(KEYS_SEALED).await?.is_none()
        {
            let n = seal_stored(db, seal).await?;
            if n > 0 {
                tracing::info!(keys = n, "sealed signing keys stored in the plain");
            }
            db.db.set_cell_info(KEYS_SEALED, "1").await?;
        }
        let state = load(db, region, seal.as_ref()).await?;
        Ok(Arc::new(Self {
            region: region.to_string(),
            seal: seal.map(Arc::new),
            state: ArcSwap::from_pointee(state),
        }))
    }

    pub fn signer(&self) -> Arc<SigningKey> {
        self.state.load().signer.clone()
    }

    pub fn issuer(&self) -> String {
        format!("cell.{}", self.region)
    }

    /// The JWKS document of this cell.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .state
            .load()
            .verifying
            .iter()
            .map(|(kid, pk, _, _)| jwt::jwk(kid, pk))
            .collect();
        serde_json::json!({ "keys": keys })
    }

    fn published(&self) -> Vec<PublishedKey> {
        self.state
            .load()
            .verifying
            .iter()
            .map(|(kid, pk, created, retired)| PublishedKey {
                kid: kid.clone(),
                alg: "EdDSA".into(),
                public_key: pk.clone(),
                created_unix_ms: *created,
                retired_unix_ms: retired.unwrap_or(0),
            })
            .collect()
    }

    /// Reloads from the datastore (another instance, or `cell keys rotate`,
    /// may have rotated), drops keys past their grace, and publishes the set
    /// to the control plane whenever it differs from what the region's
    /// metadata holds. Runs until `shutdown`.
    pub async fn maintain(
        self: Arc<Self>,
        db: IdentityStore,
        cp: Channel,
        replica: Arc<homecell_common::replica::Replica>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut revisions = replica.subscribe();
        loop {
            // Also wake on replica changes: the first snapshot (so a new cell
            // publishes at once) and any change to our region's metadata.
            tokio::select! {
                _ = tick.tick() => {}
                _ = revisions.changed() => {}
                _ = shutdown.cancelled() => return,
            }
            match load(&db, &self.region, self.seal.as_deref()).await {
                Ok(s) => self.state.store(Arc::new(s)),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot reload signing keys"),
            }
            let _ = db.drop_retired_keys(now_ms() - RETIRED_GRACE_MS).await;
            let want = self.published();
            let have = replica
                .state()
                .regions
                .get(&self.region)
                .map(|r| r.signing_keys.clone())
                .unwrap_or_default();
            if want != have && replica.is_ready() {
                let req = PublishSigningKeysRequest {
                    region: self.region.clone(),
                    keys: want,
                };
                match RegionServiceClient::new(cp.clone())
                    .publish_signing_keys(req)
                    .await
                {
                    Ok(r) => {
                        tracing::info!(revision = r.get_ref().revision, "published signing keys")
                    }
                    Err(e) => tracing::warn!(error = %e.message(), "cannot publish signing keys"),
                }
            }
        }
    }
}

/// Verification keys: this cell's own (known at once), then every region's
/// published keys from the replica.
pub struct Verifier<'a> {
    pub keys: &'a Keys,
    pub replica: &'a ReplicaState,
}

impl jwt::KeySet for Verifier<'_> {
    fn key(&self, kid: &str) -> Option<(Vec<u8>, String)> {
        let local = self.keys.state.load();
        if let Some((_, pk, _, _)) = local.verifying.iter().find(|(k, ..)| k == kid) {
            return Some((pk.clone(), self.keys.issuer()));
        }
        jwt::KeySet::key(self.replica, kid)
    }

    fn publishes(&self, kid: &str, public_key: &[u8], issuer: &str) -> bool {
        let local = self.keys.state.load();
        if let Some((_, pk, _, _)) = local.verifying.iter().find(|(k, ..)| k == kid) {
            return pk == public_key
                && issuer.strip_prefix("cell.") == Some(self.keys.region.as_str());
        }
        jwt::KeySet::publishes(self.replica, kid, public_key, issuer)
    }
}
