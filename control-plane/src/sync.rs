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

/// How often subscriber rows are written to the store. Their ACKs and
/// contacts change the live view at once; persisting every one would cost
/// each subscriber an fsync per revision on the one global writer, so the
/// changed rows are written together at most this often. A crash loses at
/// most this much of `status`'s history, nothing else: the rows are
/// advisory and every subscriber reports again when it reconnects.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Live view of every subscriber; changed rows are persisted together.
pub struct Subscribers {
    store: Arc<Store>,
    /// This instance's id, stamped on the rows it updates.
    instance: String,
    live: Mutex<Live>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Live {
    rows: HashMap<String, SubscriberStatus>,
    /// Rows changed since they were last persisted.
    dirty: std::collections::HashSet<String>,
}

impl Subscribers {
    pub fn load(store: Arc<Store>, instance: &str) -> anyhow::Result<Self> {
        let mut rows = HashMap::new();
        for mut s in store.subscribers().map_err(|e| anyhow::anyhow!("{e}"))? {
            s.connected = false;
            rows.insert(s.node_id.clone(), s);
        }
        Ok(Self {
            store,
            instance: instance.to_string(),
            live: Mutex::new(Live {
                rows,
                ..Default::default()
            }),
            changed: tokio::sync::Notify::new(),
        })
    }

    pub fn all(&self) -> Vec<SubscriberStatus> {
        let mut v: Vec<_> = self
            .live
            .lock()
            .expect("poisoned")
            .rows
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.kind, &a.region, &a.node_id).cmp(&(b.kind, &b.region, &b.node_id)));
        v
    }

    /// Every subscriber, from this instance's live rows and the rows other
    /// instances persisted (`stored`), the fresher of each. With `alive`
    /// (a shared store: the instances seen lately), a row attached to an
    /// instance not in it is shown disconnected: that instance died
    /// without saying so.
    pub fn merged(
        &self,
        stored: Vec<SubscriberStatus>,
        alive: Option<&std::collections::HashSet<&str>>,
    ) -> Vec<SubscriberStatus> {
        let mut rows: HashMap<String, SubscriberStatus> =
            stored.into_iter().map(|s| (s.node_id.clone(), s)).collect();
        // On a shared store only the rows this instance owns are live here:
        // the others were loaded at start and are as old as the stored
        // ones, or older. On its own store every row is this instance's to
        // show, a subscriber gone since an earlier run (another instance
        // name, or none) included.
        let shared = alive.is_some();
        for s in self
            .all()
            .into_iter()
            .filter(|s| !shared || s.instance == self.instance)
        {
            match rows.get(&s.node_id) {
                Some(o) if o.last_contact_unix_ms > s.last_contact_unix_ms => {}
                Some(o) => {
                    // What another instance recorded it ACKing counts too
                    // (each was sent it): it may not have ACKed here yet.
                    let mut s = s;
                    if o.epoch == s.epoch {
                        s.applied_revision = s.applied_revision.max(o.applied_revision);
                    }
                    rows.insert(s.node_id.clone(), s);
                }
                None => {
                    rows.insert(s.node_id.clone(), s);
                }
            }
        }
        let mut v: Vec<_> = rows.into_values().collect();
        if let Some(alive) = alive {
            for s in &mut v {
                if s.instance != self.instance && !alive.contains(s.instance.as_str()) {
                    s.connected = false;
                }
            }
        }
        v.sort_by(|a, b| (a.kind, &a.region, &a.node_id).cmp(&(b.kind, &b.region, &b.node_id)));
        v
    }

    /// Applies `f` to the node's row; the row is persisted with the next
    /// batch.
    fn update(&self, node_id: &str, f: impl FnOnce(&mut SubscriberStatus)) {
        let mut live = self.live.lock().expect("poisoned");
        let row = live
            .rows
            .entry(node_id.to_string())
            .or_insert_with(|| SubscriberStatus {
                node_id: node_id.to_string(),
                ..Default::default()
            });
        f(row);
        row.instance.clone_from(&self.instance);
        row.last_contact_unix_ms = now_ms();
        live.dirty.insert(node_id.to_string());
        drop(live);
        self.changed.notify_one();
    }

    /// Marks the node disconnected from this instance, keeping its last
    /// contact time: on a shared store the instance it moved to has
    /// written a newer row, which this one must not displace.
    fn disconnected(&self, node_id: &str) {
        let mut live = self.live.lock().expect("poisoned");
        if let Some(row) = live.rows.get_mut(node_id) {
            row.connected = false;
            live.dirty.insert(node_id.to_string());
        }
        drop(live);
        self.changed.notify_one();
    }

    /// Writes the changed rows in one transaction; returns how many.
    pub async fn persist(&self) -> usize {
        let rows: Vec<SubscriberStatus> = {
            let mut live = self.live.lock().expect("poisoned");
            let dirty = std::mem::take(&mut live.dirty);
            // In key order: two instances writing overlapping rows then
            // lock them in the same order and never deadlock.
            let mut rows: Vec<SubscriberStatus> = dirty
                .iter()
                .filter_map(|id| live.rows.get(id).cloned())
                .collect();
            rows.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            rows
        };
        if rows.is_empty() {
            return 0;
        }
        let n = rows.len();
        let store = self.store.clone();
        let ids: Vec<String> = rows.iter().map(|r| r.node_id.clone()).collect();
        let saved = tokio::task::spawn_blocking(move || store.save_subscribers(&rows)).await;
        if !matches!(saved, Ok(Ok(()))) {
            // Kept for the next batch.
            tracing::warn!(rows = n, "cannot persist subscriber status");
            self.live.lock().expect("poisoned").dirty.extend(ids);
            self.changed.notify_one();
        }
        n
    }

    /// Persists changed rows, at most once per [`PERSIST_EVERY`], until
    /// `stop`; then once more.
    pub async fn persist_until(&self, stop: homecell_common::shutdown::CancellationToken) {
        loop {
            tokio::select! {
                () = self.changed.notified() => {}
                () = stop.cancelled() => break,
            }
            self.persist().await;
            tokio::select! {
                () = tokio::time::sleep(PERSIST_EVERY) => {}
                () = stop.cancelled() => break,
            }
        }
        self.persist().await;
    }
}

/// What a subscriber lost when it held state of another epoch than the
/// store's: None when it held nothing of another epoch, or nothing past
/// what this store was rebuilt from.
fn conflict(sub_epoch: u64, from_revision: u64, store: &Store) -> Option<String> {
    if sub_epoch == 0 || sub_epoch == store.epoch() || from_revision == 0 {
        return None;
    }
    match store.parent() {
        Some(p) if p.epoch == sub_epoch => (from_revision > p.revision).then(|| {
            format!(
                "held revisions {}..={from_revision} of epoch {sub_epoch:016x}, past the revision {} this store was rebuilt from",
                p.revision + 1,
                p.revision
            )
        }),
        _ => Some(format!(
            "held revision {from_revision} of epoch {sub_epoch:016x}, which this store does not descend from"
        )),
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
    if sub.node_id.is_empty()
        || sub.node_id.len() > 128
        || sub.node_id.chars().any(char::is_control)
    {
        return Err(Status::invalid_argument(
            "node_id must be 1-128 characters, none of them control characters",
        ));
    }
    let node_id = sub.node_id.clone();
    let lost = conflict(sub.epoch, sub.from_revision, &store);
    if let Some(lost) = &lost {
        tracing::error!(node_id, region = %sub.region, conflict = %lost, "a subscriber held state this control plane does not have; sending a snapshot");
    }
    subscribers.update(&node_id, |s| {
        s.kind = kind as i32;
        s.region = sub.region.clone();
        s.connected = true;
        s.peer_identity = caller.common_name();
        // The epoch it holds until it ACKs this store's state.
        s.epoch = sub.epoch;
        // Kept until a later conflict replaces it: the subscriber's
        // reconnect must not wipe what the operator has yet to read.
        if let Some(lost) = lost {
            s.conflict = lost;
        }
    });
    tracing::info!(node_id, ?kind, region = %sub.region, from = sub.from_revision, "subscriber connected");

    let (tx, rx) = mpsc::channel(16);
    let sender = tokio::spawn(send_loop(
        store.clone(),
        sub.from_revision,
        needs_snapshot(sub.epoch, sub.from_revision, &store),
        tx,
    ));
    tokio::spawn(async move {
        let _open = crate::metrics::StreamGuard::open();
        report_loop(&subscribers, &store, &node_id, &mut inbound).await;
        sender.abort();
        subscribers.disconnected(&node_id);
        tracing::info!(node_id, "subscriber disconnected");
    });
    Ok(rx)
}

/// How long a blocking stream (a snapshot, a backup) waits for its reader
/// to take the next part before it gives up. Each waits on a thread of the
/// blocking pool with a read transaction open: a reader that stops reading
/// must not hold them for ever (a few hundred such streams would leave no
/// thread for mutations).
pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `msg` from a blocking thread, waiting at most `stall` for room.
/// False when the reader left or stalled.
pub fn send_within<T>(out: &mpsc::Sender<T>, msg: T, stall: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + stall;
    let mut msg = msg;
    loop {
        match out.try_send(msg) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(m)) => {
                if std::time::Instant::now() >= deadline {
                    tracing::warn!(?stall, "a stream's reader stalled; ending the stream");
                    return false;
                }
                msg = m;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

/// Whether a subscriber must start over from a snapshot. Revisions compare
/// only within one epoch, so one of another epoch must. One of none (0)
/// held state from before epochs existed, which is this very store unless
/// it was rebuilt since: it goes on by deltas, so upgrading does not send
/// every router and cell a snapshot.
fn needs_snapshot(sub_epoch: u64, from_revision: u64, store: &Store) -> bool {
    from_revision == 0
        || match sub_epoch {
            0 => store.parent().is_some(),
            e => e != store.epoch(),
        }
}

/// Sends what the subscriber lacks, then every new revision as it commits.
async fn send_loop(
    store: Arc<Store>,
    from_revision: u64,
    mut need_snapshot: bool,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    let mut revisions = store.subscribe();
    let mut healthy = store.healthy();
    let mut sent = from_revision;
    // On a shared store another instance may have committed past what this
    // one has heard of: the log is read, and if it holds nothing newer yet
    // the loop waits for the next revision instead of asking again.
    let mut caught_up_at = None;
    loop {
        if !*healthy.borrow_and_update() {
            // Cut off from the store: end the stream, so the subscriber
            // attaches to an instance that can serve it.
            let _ = tx
                .send(Err(Status::unavailable(
                    "this control-plane instance cannot reach its store",
                )))
                .await;
            return;
        }
        let current = *revisions.borrow_and_update();
        if need_snapshot || (sent != current && caught_up_at != Some(current)) {
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
                    let Some(permit) = store.stream_permit().await else {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "too many snapshots at once; subscribe again",
                            )))
                            .await;
                        return;
                    };
                    let streamed = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        let mut revision = 0;
                        let mut delivered = true;
                        s.snapshot_parts(SNAPSHOT_PART_ROWS, |part| {
                            revision = part.revision;
                            let kind = watch_response::Kind::Snapshot(part);
                            delivered =
                                send_within(&out, Ok(WatchResponse { kind: Some(kind) }), STALL);
                            delivered
                        })
                        .map(|()| delivered.then_some(revision))
                    })
                    .await;
                    let revision = match streamed {
                        Ok(Ok(Some(revision))) => revision,
                        // The reader left or stalled: nobody to tell.
                        Ok(Ok(None)) => return,
                        failed => {
                            tracing::warn!(?failed, "a snapshot failed");
                            let _ = tx
                                .send(Err(Status::unavailable(
                                    "the snapshot failed; subscribe again",
                                )))
                                .await;
                            return;
                        }
                    };
                    sent = revision;
                    need_snapshot = false;
                    continue;
                }
            };
            need_snapshot = false;
            if responses.is_empty() {
                caught_up_at = Some(current);
            }
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
            changed = healthy.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}

/// Records ACKs and NACKs until the subscriber goes away.
async fn report_loop(
    subscribers: &Subscribers,
    store: &Store,
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
                // Only what this store has sent counts: a subscriber cannot
                // claim a revision it was never given (status is how an
                // operator picks the replica to recover from).
                let revision = a.revision.min(store.revision());
                subscribers.update(node_id, |s| {
                    s.applied_revision = revision;
                    s.epoch = store.epoch();
                    s.last_error.clear();
                })
            }
            Some(watch_request::Kind::Nack(n)) => {
                tracing::warn!(node_id, revision = n.revision, error = %n.error, "subscriber NACKed");
                let mut error = n.error;
                // At a character boundary: a NACK is any subscriber's text.
                let mut end = error.len().min(512);
                while !error.is_char_boundary(end) {
                    end -= 1;
                }
                error.truncate(end);
                subscribers.update(node_id, |s| s.last_error = error)
            }
            _ => {
                tracing::warn!(node_id, "unexpected message on the watch stream");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Location, Parent};
    use std::time::Duration;

    /// A store, and one restored from it at revision 40.
    fn old_and_restored(dir: &std::path::Path) -> (Store, Store) {
        let old = Store::open(&dir.join("a.redb"), 10).unwrap();
        let parent = Parent {
            epoch: old.epoch(),
            revision: 40,
        };
        let new =
            Store::rebuild(&Location::File(dir.join("b.redb")), 10, parent, |_| Ok(())).unwrap();
        (old, new)
    }

    #[test]
    fn a_subscriber_past_the_restored_revision_is_in_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_restored(dir.path());
        // Same epoch, none, or nothing held: no conflict.
        assert_eq!(conflict(new.epoch(), 99, &new), None);
        assert_eq!(conflict(0, 99, &new), None);
        assert_eq!(conflict(old.epoch(), 0, &new), None);
        // The parent epoch up to the restored revision: nothing lost.
        assert_eq!(conflict(old.epoch(), 40, &new), None);
        let lost = conflict(old.epoch(), 45, &new).unwrap();
        assert!(lost.contains("41..=45"), "{lost}");
        // An epoch this store does not descend from: all in doubt.
        assert!(
            conflict(12345, 3, &new)
                .unwrap()
                .contains("does not descend")
        );
    }

    #[test]
    fn a_stalled_reader_releases_the_sending_thread() {
        let (tx, mut rx) = mpsc::channel(1);
        assert!(send_within(&tx, 1, Duration::from_millis(50)));
        let t = std::time::Instant::now();
        assert!(!send_within(&tx, 2, Duration::from_millis(50)), "full");
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(rx.try_recv().ok(), Some(1));
        assert!(send_within(&tx, 3, Duration::from_millis(50)), "room again");
        drop(rx);
        assert!(
            !send_within(&tx, 4, Duration::from_secs(60)),
            "closed: at once"
        );
    }

    #[test]
    fn only_another_epochs_subscriber_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = old_and_restored(dir.path());
        assert!(!needs_snapshot(old.epoch(), 5, &old));
        assert!(needs_snapshot(old.epoch(), 0, &old), "holds nothing");
        assert!(
            !needs_snapshot(0, 5, &old),
            "from before epochs: this store"
        );
        assert!(
            needs_snapshot(0, 5, &new),
            "from before epochs, rebuilt since"
        );
        assert!(needs_snapshot(old.epoch(), 5, &new));
        assert!(!needs_snapshot(new.epoch(), 5, &new));
    }

    #[tokio::test]
    async fn reports_are_persisted_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("a.redb"), 10).unwrap());
        let subs = Subscribers::load(store.clone(), "cp-test").unwrap();
        for n in 0..12 {
            for revision in 1..=50 {
                subs.update(&format!("node-{n}"), |s| s.applied_revision = revision);
            }
        }
        assert!(
            store.subscribers().unwrap().is_empty(),
            "nothing written yet"
        );
        assert_eq!(subs.persist().await, 12, "one row per subscriber, once");
        assert_eq!(subs.persist().await, 0);
        let rows = store.subscribers().unwrap();
        assert_eq!(rows.len(), 12);
        assert!(rows.iter().all(|r| r.applied_revision == 50));
    }

    /// On its own store, a restarted instance (another name: its port
    /// changed) still shows a subscriber that never came back; on a shared
    /// store, rows it only loaded give way to the stored ones.
    #[tokio::test]
    async fn status_keeps_subscribers_of_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("a.redb"), 10).unwrap());
        let before = Subscribers::load(store.clone(), "host:1").unwrap();
        before.update("gone-router", |s| s.applied_revision = 7);
        before.persist().await;
        let after = Subscribers::load(store.clone(), "host:2").unwrap();
        let shown = after.merged(Vec::new(), None);
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(!shown[0].connected && shown[0].applied_revision == 7);
        let alive = std::collections::HashSet::new();
        assert!(after.merged(Vec::new(), Some(&alive)).is_empty());
    }
}
