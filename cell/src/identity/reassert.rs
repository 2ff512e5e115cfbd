//! After the control plane was restored from a backup or recovered from a
//! replica, its directory may lack claims this cell made: the ones after
//! the backup, or (from a replica, which keeps only half of each HMAC) all
//! of them. The store then has a new epoch. When this cell's replica first
//! sees one, the cell asserts every claim it holds again, a batch per
//! revision (`ReassertClaims`), and records the epoch as done in its own
//! datastore, so a crash midway starts over and a finished pass is not
//! repeated.
//!
//! The first epoch a cell sees is only recorded, unless that store was
//! itself rebuilt: its claims were made in that store. The last call says
//! so (`last`), and the store drops what it still reserved for this region
//! (a recovered store reserves each claim's HMAC prefix for its region
//! until then). A claim another user now holds (someone registered the
//! identifier in the meantime) is never taken over; the user is logged for
//! the operator, by id only.

use super::service::Identity;
use super::store::IdentityStore;
use crate::db::{DbResult, stmt};
use homecell_proto::control::{
    ClaimIdentifierRequest, ReassertClaimsRequest, directory_service_client::DirectoryServiceClient,
};
use std::time::Duration;

/// Claims per call: the control plane's limit.
const BATCH: i64 = 1_000;
/// The `cell_info` key holding the epoch whose claims this cell has made.
const CLAIMS_EPOCH: &str = "claims_epoch";

/// Where a cell's claims live, each read in key order, a page at a time.
#[derive(Clone, Copy)]
enum Held {
    Identifiers,
    Wechat,
}

impl IdentityStore {
    /// Claims of `held` after the key `after`, in key order: (kind, value,
    /// user id); the identifier claimed is `kind:value`, and (kind, value)
    /// is the next page's key. Row-value comparisons, so each page is an
    /// index range, not a scan from the start.
    async fn held_after(
        &self,
        held: Held,
        after: &(String, String),
    ) -> DbResult<Vec<(String, String, String)>> {
        match held {
            Held::Identifiers => stmt(
                "SELECT i.kind, i.value, i.user_id FROM identifiers i JOIN users u ON u.id = i.user_id \
                 WHERE u.status <> 'deleted' AND (i.kind, i.value) > ($1, $2) \
                 ORDER BY i.kind, i.value LIMIT $3",
            )
            .bind(after.0.as_str())
            .bind(after.1.as_str()),
            Held::Wechat => stmt(
                "SELECT CAST('wechat' AS TEXT), openid, user_id FROM wechat_bindings WHERE openid > $1 \
                 ORDER BY openid LIMIT $2",
            )
            .bind(after.1.as_str()),
        }
        .bind(BATCH)
        .fetch_all(&self.db)
        .await
    }
}

impl Identity {
    async fn reassert_batch(
        &self,
        epoch: u64,
        claims: Vec<(String, String)>,
        last: bool,
    ) -> anyhow::Result<(u32, usize)> {
        let req = ReassertClaimsRequest {
            region: self.region.clone(),
            epoch,
            last,
            claims: claims
                .into_iter()
                .map(|(identifier, user_id)| ClaimIdentifierRequest {
                    identifier,
                    user_id,
                    region: self.region.clone(),
                    not_after_unix_ms: 0,
                    replaces: String::new(),
                })
                .collect(),
        };
        let mut client = DirectoryServiceClient::new(self.cp.clone());
        let r = tokio::time::timeout(Duration::from_secs(30), client.reassert_claims(req))
            .await??
            .into_inner();
        if !r.conflicting_users.is_empty() {
            tracing::error!(users = ?r.conflicting_users, "after the control plane's restore, another user holds an identifier of these users; an operator must decide");
        }
        Ok((r.restored, r.conflicting_users.len()))
    }

    /// Every claim this cell holds, asserted again in `epoch` (the control
    /// plane refuses the pass if its store is rebuilt again meanwhile).
    /// Returns (claims sent, restored, users in conflict).
    pub async fn reassert_claims(&self, epoch: u64) -> anyhow::Result<(usize, u32, usize)> {
        let (mut sent, mut restored, mut conflicts) = (0, 0, 0);
        for held in [Held::Identifiers, Held::Wechat] {
            let mut after = (String::new(), String::new());
            loop {
                let rows = self.store.held_after(held, &after).await?;
                let Some((kind, value, _)) = rows.last().cloned() else {
                    break;
                };
                after = (kind, value);
                sent += rows.len();
                let claims = rows
                    .into_iter()
                    .map(|(kind, value, user)| (format!("{kind}:{value}"), user))
                    .collect();
                let (r, c) = self.reassert_batch(epoch, claims, false).await?;
                (restored, conflicts) = (restored + r, conflicts + c);
            }
        }
        // Everything was sent: what the store still reserves for this
        // region was released since.
        self.reassert_batch(epoch, Vec::new(), true).await?;
        Ok((sent, restored, conflicts))
    }

    /// One check: when the replica holds an epoch this cell has not
    /// asserted its claims in, asserts them and records it.
    async fn reassert_if_new_epoch(&self) -> anyhow::Result<()> {
        let state = self.replica.state();
        if state.epoch == 0 {
            return Ok(());
        }
        let epoch = format!("{:016x}", state.epoch);
        let done = self.store.db.cell_info(CLAIMS_EPOCH).await?;
        if done.as_deref() == Some(epoch.as_str()) {
            return Ok(());
        }
        // A first epoch that is itself a rebuilt store (this cell came up
        // after a restore) may lack this cell's claims too.
        if done.is_some() || state.parent_epoch != 0 {
            tracing::warn!(
                epoch,
                "the control plane starts a new epoch; asserting this cell's claims again"
            );
            let (sent, restored, conflicts) = self.reassert_claims(state.epoch).await?;
            tracing::info!(
                epoch,
                sent,
                restored,
                conflicts,
                "claims asserted in the new epoch"
            );
        }
        self.store.db.set_cell_info(CLAIMS_EPOCH, &epoch).await?;
        Ok(())
    }
}

/// Checks at each applied revision (and every 30 s) until `stop`. A pass
/// that failed is retried after a growing pause (5 s to 5 min), whatever
/// the revisions do: while every cell asserts its claims, revisions come
/// fast, and a failing cell must not resend from the start at each.
pub async fn run<C: AsRef<Identity> + Send + Sync + 'static>(
    owner: std::sync::Arc<C>,
    stop: tokio_util::sync::CancellationToken,
) {
    let identity = owner.as_ref().as_ref();
    let mut revisions = identity.replica.subscribe();
    let mut pause = Duration::from_secs(5);
    loop {
        match identity.reassert_if_new_epoch().await {
            Ok(()) => pause = Duration::from_secs(5),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?pause, "cannot assert claims in the new epoch yet");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(300));
                continue;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = revisions.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}
