//! Group commit for small, frequent SQLite write transactions (refresh-token
//! rotations): the ones that arrive while a commit is being made share the
//! next one, so many of them cost one fsync.
//!
//! Each job runs inside the batch's `BEGIN IMMEDIATE` transaction under its
//! own savepoint. A job that fails is rolled back to its savepoint and
//! answers with its error; the others are unaffected. Every caller hears back
//! only after the commit that holds its write, so "answered" still means
//! "durable". A job whose caller has gone away (a dropped request) is skipped
//! rather than committed with no one to hear it: for a refresh rotation that
//! would burn the token the client still holds.
//!
//! SQLite has one writer, so this changes the cost, not the semantics: the
//! batch holds `SQLITE_WRITER` and SQLite's write lock from its first
//! statement to its commit, as each transaction did on its own. PostgreSQL has
//! row locks and its own group commit and keeps one transaction per write.

use super::SQLITE_WRITER;
use crate::db::{DbError, DbResult};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{SqliteConnection, SqlitePool};
use std::panic::AssertUnwindSafe;
use tokio::sync::{mpsc, oneshot};

/// Hands a job its commit's outcome: `None` when the batch committed.
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;

/// A job: runs its statements, says whether to keep them, and returns how to
/// deliver its answer once the commit is known.
type Job = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Ran> + Send>;

enum Ran {
    /// The caller is gone; nothing was written.
    Abandoned,
    Done {
        keep: bool,
        deliver: Deliver,
    },
}

/// Most jobs one transaction takes, so one slow batch cannot hold the write
/// lock for long.
const MAX_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct TxBatch {
    queue: mpsc::Sender<Job>,
}

impl TxBatch {
    pub fn start(pool: SqlitePool) -> Self {
        let (queue, mut rx) = mpsc::channel::<Job>(4 * MAX_BATCH);
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
                let size = jobs.len();
                crate::metrics::WRITE_BATCH_SIZE.observe(size as f64);
                // A job that panics costs its batch (rolled back, callers
                // told), not every later refresh.
                let ran = AssertUnwindSafe(commit(&pool, &mut jobs))
                    .catch_unwind()
                    .await;
                let Ok((delivers, outcome)) = ran else {
                    jobs.clear();
                    tracing::error!(size, "a batched write panicked; its batch was rolled back");
                    continue;
                };
                let failed = outcome.err().map(|e| e.to_string());
                if let Some(e) = &failed {
                    tracing::error!(error = %e, size, "batched commit failed");
                }
                for deliver in delivers {
                    deliver(failed.as_deref());
                }
            }
        });
        Self { queue }
    }

    /// Runs `f` inside the next batch and waits until its write is durable.
    /// An error from `f` undoes `f`'s statements only.
    pub async fn run<T, F>(&self, f: F) -> DbResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, DbResult<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<DbResult<T>>();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                if reply.is_closed() {
                    return Ran::Abandoned;
                }
                let result = f(conn).await;
                let keep = result.is_ok();
                let deliver: Deliver = Box::new(move |failed| {
                    let _ = reply.send(match (failed, result) {
                        (Some(e), Ok(_)) => Err(commit_failed(e)),
                        (_, result) => result,
                    });
                });
                Ran::Done { keep, deliver }
            })
        });
        let stopped = || commit_failed("the batch writer stopped");
        self.queue.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn commit_failed(why: &str) -> DbError {
    DbError::Db(sqlx::Error::Protocol(format!(
        "batched commit failed: {why}"
    )))
}

/// Runs `jobs` in one transaction. Returns every ran job's delivery and
/// whether the transaction committed; on an error it was rolled back.
async fn commit(pool: &SqlitePool, jobs: &mut Vec<Job>) -> (Vec<Deliver>, Result<(), sqlx::Error>) {
    let mut delivers = Vec::with_capacity(jobs.len());
    let _writer = SQLITE_WRITER.lock().await;
    // Every statement is a round trip to sqlx's SQLite thread, so the
    // savepoint bookkeeping between two jobs goes in one call.
    let outcome = async {
        // A transaction sqlx tracks: dropped before its commit (an error
        // below, or a job that panicked) it is rolled back, so no pooled
        // connection is left holding SQLite's write lock.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql("SAVEPOINT job").execute(&mut *tx).await?;
        let mut jobs = jobs.drain(..).peekable();
        while let Some(job) = jobs.next() {
            let keep = match job(&mut tx).await {
                Ran::Abandoned => false,
                Ran::Done { keep, deliver } => {
                    delivers.push(deliver);
                    keep
                }
            };
            let next = match (keep, jobs.peek().is_some()) {
                (true, true) => "RELEASE job; SAVEPOINT job",
                (false, true) => "ROLLBACK TO job; RELEASE job; SAVEPOINT job",
                (true, false) => "RELEASE job",
                (false, false) => "ROLLBACK TO job; RELEASE job",
            };
            sqlx::raw_sql(next).execute(&mut *tx).await?;
        }
        let started = std::time::Instant::now();
        let committed = tx.commit().await;
        crate::metrics::COMMIT_SECONDS.observe(started.elapsed().as_secs_f64());
        committed
    }
    .await;
    if outcome.is_err() {
        jobs.clear(); // dropping a job drops its reply: the caller hears "stopped"
    }
    (delivers, outcome)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Datastore;

    async fn open() -> (tempfile::TempDir, SqlitePool, TxBatch) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("b.db").display());
        let Datastore::Sqlite(pool, batch, _) = Datastore::open(&url).await.unwrap() else {
            unreachable!()
        };
        sqlx::raw_sql("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        (dir, pool, batch)
    }

    fn insert(
        batch: &TxBatch,
        keys: &[&'static str],
    ) -> impl Future<Output = DbResult<()>> + use<> {
        let keys = keys.to_vec();
        let batch = batch.clone();
        async move {
            batch
                .run(move |conn| {
                    Box::pin(async move {
                        for k in keys {
                            sqlx::query("INSERT INTO t (k) VALUES ($1)")
                                .bind(k)
                                .execute(&mut *conn)
                                .await?;
                        }
                        Ok(())
                    })
                })
                .await
        }
    }

    async fn keys(pool: &SqlitePool) -> Vec<String> {
        sqlx::query_scalar("SELECT k FROM t ORDER BY k")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_failed_job_undoes_only_itself() {
        let (_dir, pool, batch) = open().await;
        insert(&batch, &["a"]).await.unwrap();
        // Queue three jobs behind a held writer so they share one batch.
        let writer = SQLITE_WRITER.lock().await;
        let jobs = tokio::spawn(futures::future::join3(
            insert(&batch, &["b"]),
            insert(&batch, &["c", "a"]), // "c" goes in, then "a" clashes
            insert(&batch, &["d"]),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(writer);
        let (b, clash, d) = jobs.await.unwrap();
        assert!(b.is_ok() && d.is_ok());
        assert!(matches!(clash, Err(DbError::Conflict)), "{clash:?}");
        assert_eq!(keys(&pool).await, ["a", "b", "d"]);
    }

    #[tokio::test]
    async fn a_panicking_job_costs_only_its_batch() {
        let (_dir, pool, batch) = open().await;
        let boom = batch
            .run(|conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO t (k) VALUES ('lost')")
                        .execute(&mut *conn)
                        .await?;
                    if std::hint::black_box(true) {
                        panic!("a bug in a job");
                    }
                    Ok(())
                })
            })
            .await;
        assert!(boom.is_err());
        insert(&batch, &["after"]).await.unwrap();
        // The write lock was released: a writer outside the batch gets in.
        sqlx::query("INSERT INTO t (k) VALUES ('outside')")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(keys(&pool).await, ["after", "outside"]);
    }

    #[tokio::test]
    async fn a_job_whose_caller_left_is_not_written() {
        let (_dir, pool, batch) = open().await;
        let writer = SQLITE_WRITER.lock().await;
        let gone = tokio::spawn(insert(&batch, &["gone"]));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        gone.abort();
        let _ = gone.await;
        drop(writer);
        insert(&batch, &["kept"]).await.unwrap();
        assert_eq!(keys(&pool).await, ["kept"]);
    }
}
