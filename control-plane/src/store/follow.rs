//! How an instance over a shared (PostgreSQL) store follows what the other
//! instances commit, and tells them it is alive.
//!
//! Each commit is announced with `NOTIFY`; the instance `LISTEN`s, and also
//! reads the head revision every [`TICK`], so a notification lost while its
//! connection was down delays it by one tick at most. The same tick records
//! this instance in `cp_instances` (what `status` lists) and checks that the
//! store was not rebuilt under it. An instance that cannot read the store
//! for [`UNHEALTHY_AFTER`] reports itself unhealthy: its Watch streams end
//! and `/ready` fails, so subscribers and load balancers go to another.

use super::postgres::{CHANNEL, InstanceRow};
use super::{Engine, Store, now_ms};
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio::sync::watch;

/// How often an instance reads the head and reports itself.
pub const TICK: Duration = Duration::from_secs(1);
/// How long the store may be unreadable before the instance gives up its
/// subscribers. Below the 5 s a subscriber may take to attach elsewhere.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(2);
/// Reads in a row an unhealthy instance needs before it serves again: a
/// flapping link would otherwise end every client's connection each flap.
pub const RECOVER_AFTER: u32 = 3;
/// An instance not seen for this long is listed as not alive.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(10);

/// This instance, as `status` lists it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub endpoint: String,
    pub started_unix_ms: i64,
}

impl Store {
    /// Whether this instance can serve: always on redb.
    pub fn healthy(&self) -> watch::Receiver<bool> {
        self.healthy_tx.subscribe()
    }

    /// Follows the shared store until `stop`. Returns an error when the
    /// store was rebuilt under this instance (a new epoch): what it holds
    /// in memory is of the old one, so it must restart. On redb there is
    /// nothing to follow.
    pub async fn follow(
        &self,
        me: Instance,
        stop: homecell_common::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        let Engine::Postgres(pg) = &self.engine else {
            stop.cancelled().await;
            return Ok(());
        };
        let mut listener: Option<PgListener> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = std::time::Instant::now();
        let mut good_reads = 0u32;
        // The last head read from the database.
        let mut head = 0;
        loop {
            if listener.is_none() {
                listener = listen(pg.url()).await;
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                // A notification only wakes: any role on the database may
                // send one, so the head is read from the log's own row.
                n = async { listener.as_mut().expect("guarded").recv().await }, if listener.is_some() => match n {
                    Ok(_) => {
                        // One head read answers every notification already
                        // buffered (a burst of commits).
                        while listener.as_mut().and_then(PgListener::next_buffered).is_some() {}
                        if let Ok(Ok((revision, epoch))) = tokio::time::timeout(TICK, pg.head()).await
                            && epoch == self.epoch
                        {
                            self.set_head(&mut head, revision)?;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the store's notifications; reading the head each tick");
                        listener = None;
                    }
                },
                _ = tick.tick() => {
                    match tokio::time::timeout(TICK, pg.head()).await {
                        Ok(Ok((revision, epoch))) => {
                            anyhow::ensure!(
                                epoch == self.epoch,
                                "the store was rebuilt under this instance (epoch {epoch:016x}, not {:016x}); restart it",
                                self.epoch
                            );
                            self.set_head(&mut head, revision)?;
                            last_read = std::time::Instant::now();
                            good_reads += 1;
                            if !*self.healthy_tx.borrow() && good_reads < RECOVER_AFTER {
                                continue;
                            }
                            if !*self.healthy_tx.borrow() {
                                // Back: every pooled connection may be one
                                // stuck since the cut; start afresh.
                                pg.renew_all();
                                listener = None;
                                tracing::info!("the store can be read again");
                            }
                            self.set_healthy(true);
                            let row = InstanceRow {
                                id: me.id.clone(),
                                endpoint: me.endpoint.clone(),
                                started_unix_ms: me.started_unix_ms,
                                seen_unix_ms: now_ms(),
                                revision,
                            };
                            match tokio::time::timeout(TICK, pg.heartbeat(&row)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => tracing::warn!(error = %e, "cannot record this instance in the store"),
                                Err(_) => tracing::warn!("recording this instance in the store timed out"),
                            }
                        }
                        failed => {
                            let e = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".into(),
                            };
                            // The next read takes a new connection: this
                            // one may be stuck for as long as TCP retries.
                            pg.renew_follow();
                            good_reads = 0;
                            if last_read.elapsed() >= UNHEALTHY_AFTER && *self.healthy_tx.borrow() {
                                tracing::error!(error = %e, "cannot read the store; ending this instance's Watch streams until it can");
                                self.set_healthy(false);
                                listener = None;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The head as the database holds it, read after `last` (the previous
    /// read, one at a time). Only ever forward within an epoch: a read
    /// behind the one before means the database lost commits (a failover
    /// to a standby that was behind, a point-in-time restore), and revision
    /// numbers would be used again for other changes. That is a rebuild,
    /// not a revision: the instance stops rather than serve it (see
    /// OPERATIONS.md). (This instance's own commits are not compared: a
    /// read that began before one of them committed is not a regression.)
    fn set_head(&self, last: &mut u64, revision: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            revision >= *last,
            "the store's head went back from {last} to {revision} within one epoch: the database lost commits; restore or recover it as a new epoch (OPERATIONS.md)"
        );
        *last = revision;
        self.advance(revision);
        Ok(())
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy_tx.send_if_modified(|h| {
            let changed = *h != healthy;
            *h = healthy;
            changed
        });
    }

    /// Every instance that has served this store, as each last reported
    /// itself, and whether it did so lately. On redb: none (the one
    /// instance is the caller).
    pub async fn instances(&self) -> anyhow::Result<Vec<(InstanceRow, bool)>> {
        let Engine::Postgres(pg) = &self.engine else {
            return Ok(Vec::new());
        };
        let now = now_ms();
        let within = ALIVE_WITHIN.as_millis() as i64;
        Ok(pg
            .instances()
            .await?
            .into_iter()
            .map(|i| {
                let alive = now - i.seen_unix_ms <= within;
                (i, alive)
            })
            .collect())
    }
}

/// A listener on the revision channel, or None (the tick covers for it).
async fn listen(url: &str) -> Option<PgListener> {
    let attempt = async {
        // Its own connection, outside the pools.
        let mut l = PgListener::connect(url).await?;
        l.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    };
    match tokio::time::timeout(TICK, attempt).await {
        Ok(Ok(l)) => Some(l),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot listen for the store's notifications");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a head read behind the previous head read is a regression: a
    /// read that began before one of this instance's commits is not.
    #[test]
    fn a_head_read_is_compared_with_the_last_head_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("cp.redb"), 100).unwrap();
        for i in 0..3 {
            s.mutate("t", |tx| {
                tx.put_region(homecell_proto::control::Region {
                    id: format!("r{i}"),
                    ..Default::default()
                })
            })
            .unwrap();
        }
        assert_eq!(s.revision(), 3, "this instance committed up to 3");
        let mut last = 0;
        s.set_head(&mut last, 2)
            .expect("read before the last commit");
        assert_eq!((last, s.revision()), (2, 3), "never moves back");
        s.set_head(&mut last, 5).unwrap();
        assert_eq!(s.revision(), 5);
        let err = s.set_head(&mut last, 4).unwrap_err();
        assert!(err.to_string().contains("went back from 5 to 4"), "{err}");
    }
}
