//! The `Watch` stream and the subscriber registry behind `status`.
//!
//! Like Envoy's xDS: a subscriber says which revision it holds; the server
//! answers with the deltas after it, or with a snapshot when the log no longer
//! reaches back that far; the subscriber ACKs or NACKs each response.

use crate::store::{Store, now_ms};
use homecell_common::tls::PeerIdentity;
use homecell_proto::control::{
    SubscriberKind, SubscriberStatus, WatchRequest, WatchResponse, watch_request, watch_response,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// Deltas sent per read of the log; a subscriber far behind gets them in batches.
const BATCH: usize = 256;
/// Directory rows per snapshot part: about 1.5 MB, well under gRPC's 4 MiB
/// default message limit.
const SNAPSHOT_PART_ROWS: usize = 10_000;

/// Live view of every subscriber, persisted on each report.
pub struct Subscribers {
    store: Arc<Store>,
    live: Mutex<HashMap<String, SubscriberStatus>>,
}

impl Subscribers {
    pub fn load(store: Arc<Store>) -> anyhow::Result<Self> {
        let mut live = HashMap::new();
        for mut s in store.subscribers().map_err(|e| anyhow::anyhow!("{e}"))? {
            s.connected = false;
            live.insert(s.node_id.clone(), s);
        }
        Ok(Self {
            store,
            live: Mutex::new(live),
        })
    }

    pub fn all(&self) -> Vec<SubscriberStatus> {
        let mut v: Vec<_> = self
            .live
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.kind, &a.region, &a.node_id).cmp(&(b.kind, &b.region, &b.node_id)));
        v
    }

    /// Applies `f` to the node's row and persists it (off the async runtime).
    async fn update(&self, node_id: &str, f: impl FnOnce(&mut SubscriberStatus)) {
        let row = {
            let mut live = self.live.lock().expect("poisoned");
            let row = live
                .entry(node_id.to_string())
                .or_insert_with(|| SubscriberStatus {
                    node_id: node_id.to_string(),
                    ..Default::default()
                });
            f(row);
            row.last_contact_unix_ms = now_ms();
            row.clone()
        };
        let store = self.store.clone();
        let saved = tokio::task::spawn_blocking(move || store.save_subscriber(&row)).await;
        if !matches!(saved, Ok(Ok(()))) {
            tracing::warn!(node_id, "cannot persist subscriber status");
        }
    }
}

/// Checks the Subscribe message against the caller's certificate: a router or
/// cell may only subscribe as itself, for its own region.
fn authorize(caller: &PeerIdentity, kind: SubscriberKind, region: &str) -> Result<(), Status> {
    let ok = match (caller, kind) {
        (PeerIdentity::Router { region: r }, SubscriberKind::Router) => r == region,
        (PeerIdentity::Cell { region: r }, SubscriberKind::Cell) => r == region,
        (PeerIdentity::Operator { .. }, _) => kind != SubscriberKind::Unspecified,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{caller} may not subscribe as {kind:?} for region {region:?}"
        )))
    }
}

pub async fn watch(
    store: Arc<Store>,
    subscribers: Arc<Subscribers>,
    caller: PeerIdentity,
    mut inbound: Streaming<WatchRequest>,
) -> Result<mpsc::Receiver<Result<WatchResponse, Status>>, Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before Subscribe"))?;
    let Some(watch_request::Kind::Subscribe(sub)) = first.kind else {
        return Err(Status::invalid_argument(
            "the first message must be Subscribe",
        ));
    };
    let kind = SubscriberKind::try_from(sub.kind).unwrap_or(SubscriberKind::Unspecified);
    authorize(&caller, kind, &sub.region)?;
    if sub.node_id.is_empty() || sub.node_id.len() > 128 {
        return Err(Status::invalid_argument("node_id must be 1-128 characters"));
    }
    let node_id = sub.node_id.clone();
    subscribers
        .update(&node_id, |s| {
            s.kind = kind as i32;
            s.region = sub.region.clone();
            s.connected = true;
            s.peer_identity = caller.common_name();
        })
        .await;
    tracing::info!(node_id, ?kind, region = %sub.region, from = sub.from_revision, "subscriber connected");

    let (tx, rx) = mpsc::channel(16);
    let sender = tokio::spawn(send_loop(store, sub.from_revision, tx));
    tokio::spawn(async move {
        report_loop(&subscribers, &node_id, &mut inbound).await;
        sender.abort();
        subscribers.update(&node_id, |s| s.connected = false).await;
        tracing::info!(node_id, "subscriber disconnected");
    });
    Ok(rx)
}

/// Sends what the subscriber lacks, then every new revision as it commits.
async fn send_loop(
    store: Arc<Store>,
    from_revision: u64,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let mut revisions = store.subscribe();
    let mut sent = from_revision;
    let mut need_snapshot = from_revision == 0;
    loop {
        let current = *revisions.borrow_and_update();
        if need_snapshot || sent != current {
            let batch = if need_snapshot {
                None
            } else {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.changes_after(sent, BATCH)).await {
                    Ok(Ok(b)) => b,
                    _ => return,
                }
            };
            let responses: Vec<(u64, watch_response::Kind)> = match batch {
                Some(deltas) => deltas
                    .into_iter()
                    .map(|d| (d.revision, watch_response::Kind::Delta(d)))
                    .collect(),
                None => {
                    // Straight from the store's read transaction onto the
                    // stream, a part at a time: memory stays flat however
                    // large the directory.
                    let (s, out) = (store.clone(), tx.clone());
                    let streamed = tokio::task::spawn_blocking(move || {
                        let mut revision = 0;
                        let mut delivered = true;
                        s.snapshot_parts(SNAPSHOT_PART_ROWS, |part| {
                            revision = part.revision;
                            let kind = watch_response::Kind::Snapshot(part);
                            delivered = out
                                .blocking_send(Ok(WatchResponse { kind: Some(kind) }))
                                .is_ok();
                            delivered
                        })
                        .map(|()| delivered.then_some(revision))
                    })
                    .await;
                    let Ok(Ok(Some(revision))) = streamed else {
                        return;
                    };
                    sent = revision;
                    need_snapshot = false;
                    continue;
                }
            };
            need_snapshot = false;
            for (revision, kind) in responses {
                if tx
                    .send(Ok(WatchResponse { kind: Some(kind) }))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = revision;
            }
            continue;
        }
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}

/// Records ACKs and NACKs until the subscriber goes away.
async fn report_loop(
    subscribers: &Subscribers,
    node_id: &str,
    inbound: &mut Streaming<WatchRequest>,
) {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(node_id, error = %e, "watch stream ended");
                return;
            }
        };
        match msg.kind {
            Some(watch_request::Kind::Ack(a)) => {
                subscribers
                    .update(node_id, |s| {
                        s.applied_revision = a.revision;
                        s.last_error.clear();
                    })
                    .await
            }
            Some(watch_request::Kind::Nack(n)) => {
                tracing::warn!(node_id, revision = n.revision, error = %n.error, "subscriber NACKed");
                let mut error = n.error;
                error.truncate(512);
                subscribers.update(node_id, |s| s.last_error = error).await
            }
            _ => {
                tracing::warn!(node_id, "unexpected message on the watch stream");
                return;
            }
        }
    }
}
