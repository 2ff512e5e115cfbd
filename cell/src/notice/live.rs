//! New inbox items to live streams (`GET /v1/notices/stream`) on every
//! instance of the cell, not only the one whose worker wrote them.
//!
//! Each instance hands its own new items to its streams directly. On
//! PostgreSQL, where one cell runs as several instances, it also announces
//! them with `NOTIFY` on one channel after the commit, and every instance
//! `LISTEN`s and hands on what the others wrote. A notification carries the
//! item itself, or only its id when the item is too large for one (8000
//! bytes), and then the listener reads it. Live delivery is best effort, as
//! before: the inbox has every item, and a listener that lost its
//! connection reconnects (sqlx) and misses what came meanwhile. On SQLite a
//! cell is one instance and nothing is announced.

use super::Live;
use super::Notices;
use super::store::InboxItem;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, LazyLock};
use tokio_util::sync::CancellationToken;

const CHANNEL: &str = "homecell_inbox";

/// PostgreSQL refuses a payload of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;

/// This process, so an instance skips its own announcements.
static INSTANCE: LazyLock<String> = LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());

#[derive(Serialize, Deserialize)]
struct Announcement {
    from: String,
    user_id: String,
    /// The item, or only its id when the item is too large to carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    item: Option<InboxItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

fn payload(live: &Live) -> Option<String> {
    let whole = Announcement {
        from: INSTANCE.clone(),
        user_id: live.user_id.clone(),
        item: Some(live.item.clone()),
        id: None,
    };
    let text = serde_json::to_string(&whole).ok()?;
    if text.len() <= MAX_PAYLOAD {
        return Some(text);
    }
    serde_json::to_string(&Announcement {
        item: None,
        id: Some(live.item.id.clone()),
        ..whole
    })
    .ok()
}

impl Notices {
    /// Hands new items to this instance's streams and, on PostgreSQL,
    /// announces them to the other instances (one statement for the batch).
    pub async fn publish(&self, items: Vec<Live>) {
        if items.is_empty() {
            return;
        }
        if self.store.is_shared() {
            let payloads: Vec<String> = items.iter().filter_map(payload).collect();
            if let Err(e) = self.store.announce(CHANNEL, &payloads).await {
                tracing::warn!(error = %e, "cannot announce new inbox items to the other instances");
            }
        }
        for live in items {
            let _ = self.live.send(live);
        }
    }

    /// On PostgreSQL: hands the other instances' new items to this
    /// instance's streams until `token` is cancelled.
    pub async fn relay_announcements(self: Arc<Self>, token: CancellationToken) {
        let mut listener = loop {
            let Some(listening) = self.store.listen(CHANNEL).await else {
                return;
            };
            match listening {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other instances' inbox items; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        _ = token.cancelled() => return,
                    }
                }
            }
        };
        loop {
            let note = tokio::select! {
                n = listener.recv() => n,
                _ = token.cancelled() => return,
            };
            let note = match note {
                Ok(n) => n,
                Err(e) => {
                    // sqlx reconnects on the next recv; pause so a database
                    // that is down is not spun on.
                    tracing::warn!(error = %e, "inbox announcements interrupted");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            };
            let Ok(a) = serde_json::from_str::<Announcement>(&note) else {
                tracing::warn!("an inbox announcement that does not parse: ignored");
                continue;
            };
            if a.from == *INSTANCE {
                continue;
            }
            let item = match (a.item, a.id) {
                (Some(item), _) => Some(item),
                (None, Some(id)) => self.store.inbox_item(&a.user_id, &id).await.ok().flatten(),
                (None, None) => None,
            };
            if let Some(item) = item {
                let _ = self.live.send(Live {
                    user_id: a.user_id,
                    item,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(body: &str) -> Live {
        Live {
            user_id: "u1".into(),
            item: InboxItem {
                id: "i1".into(),
                category: "account".into(),
                title: "t".into(),
                body: body.into(),
                created_at: 1,
                read_at: None,
                archived_at: None,
            },
        }
    }

    #[test]
    fn small_items_travel_whole_and_large_ones_by_id() {
        let small: Announcement = serde_json::from_str(&payload(&live("hello")).unwrap()).unwrap();
        assert_eq!(small.item.map(|i| i.body).as_deref(), Some("hello"));
        assert_eq!(small.from, *INSTANCE);
        let big = payload(&live(&"x".repeat(10_000))).unwrap();
        assert!(big.len() <= MAX_PAYLOAD);
        let big: Announcement = serde_json::from_str(&big).unwrap();
        assert!(big.item.is_none());
        assert_eq!(big.id.as_deref(), Some("i1"));
    }
}
