//! Point reads on SQLite without sqlx's thread hop.
//!
//! sqlx runs each SQLite connection on a thread of its own, so every
//! statement is a hand-off there and back: on two cores those wake-ups,
//! not SQLite, were most of an authenticated read's cost (bench/HISTORY.md,
//! 2026-12-03). The reads every authenticated request makes (the session
//! check, the own profile) are lookups by primary key that take SQLite a
//! few microseconds, so they run here instead, on the calling thread,
//! through read-only connections of their own.
//!
//! They never wait: a WAL reader is blocked only while a checkpoint resets
//! the log or a crashed writer's log is recovered, and then SQLite answers
//! busy at once (no busy timeout here) and the caller takes the pool's
//! path, which waits off this thread. Any other failure does the same, so
//! the pool stays the one place datastore errors come from.

use super::stmt::{Record, Stmt};
use super::{Datastore, DbResult};
use rusqlite::{Connection, OpenFlags, Params, Row, ToSql};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Read-only connections to one SQLite file, opened as needed and kept.
#[derive(Debug)]
pub struct PointReads {
    /// None for an in-memory database, which another connection cannot see.
    path: Option<PathBuf>,
    idle: Mutex<Vec<Connection>>,
    /// Reads answered by the pool instead: what a test checks stays zero.
    pub fallbacks: AtomicU64,
}

/// Connections kept idle; more are opened under a burst and then dropped.
const IDLE: usize = 8;

impl PointReads {
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// The first row of `sql` (a statement of the cell's own, prepared once
    /// per connection) through `row`, `Some(None)` for no row; `None` when
    /// the pool must answer instead.
    pub fn row<T>(
        &self,
        sql: &str,
        params: impl Params,
        row: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Option<Option<T>> {
        let out = self.with(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let mut rows = stmt.query(params)?;
            rows.next()?.map(row).transpose()
        });
        if out.is_none() {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<T> {
        let path = self.path.as_ref()?;
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => match open(path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a point-read connection");
                    return None;
                }
            },
        };
        let out = match f(&conn) {
            Ok(v) => Some(v),
            Err(e) => {
                if !is_busy(&e) {
                    tracing::warn!(error = %e, "a point read failed; the pool answers");
                }
                None
            }
        };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE {
            idle.push(conn);
        }
        out
    }
}

/// A row a point read decodes, in the statement's column order.
pub trait PointRecord: Record + Sized {
    fn from_point(r: &Row<'_>) -> rusqlite::Result<Self>;
}

impl PointRecord for (i32,) {
    fn from_point(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok((r.get(0)?,))
    }
}

/// The names SQLite gives a statement's `$n` parameters.
const NAMES: [&str; 8] = ["$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8"];

impl Stmt {
    /// A lookup by key on a request's hot path: on a SQLite file, read on
    /// the calling thread; otherwise, or when that cannot answer, through
    /// the pool like `fetch_optional`.
    pub async fn point<T: PointRecord>(self, db: &Datastore) -> DbResult<Option<T>> {
        if let Datastore::Sqlite(_, _, reads) = db
            && self.args.len() <= NAMES.len()
        {
            let params: Vec<(&str, &dyn ToSql)> = NAMES
                .iter()
                .zip(&self.args)
                .map(|(n, a)| (*n, a as &dyn ToSql))
                .collect();
            if let Some(row) = reads.row(&self.sql, params.as_slice(), T::from_point) {
                return Ok(row);
            }
        }
        self.fetch_optional(db).await
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // rusqlite waits five seconds on a busy database by default; here the
    // pool waits instead, off the calling thread.
    conn.busy_timeout(std::time::Duration::ZERO)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_a_writer_committed_and_falls_back_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let w = Connection::open(&path).unwrap();
        w.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER); INSERT INTO t VALUES ('a', 1);")
            .unwrap();
        let reads = PointReads::new(Some(path.clone()));
        let get = |k: &str| reads.row("SELECT v FROM t WHERE k = $1", [k], |r| r.get::<_, i64>(0));
        assert_eq!(get("a"), Some(Some(1)));
        assert_eq!(get("b"), Some(None));
        // A commit after the connection was opened and its statement cached.
        w.execute("UPDATE t SET v = 2 WHERE k = 'a'", []).unwrap();
        assert_eq!(get("a"), Some(Some(2)));
        assert_eq!(reads.fallbacks.load(Ordering::Relaxed), 0);
        // Read-only: a write is refused, and the caller told to use the pool.
        assert_eq!(
            reads.row("DELETE FROM t RETURNING v", [], |r| r.get::<_, i64>(0)),
            None
        );
        assert_eq!(
            w.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            1
        );
        // A statement that does not fit the schema: the pool answers too.
        assert_eq!(
            reads.row("SELECT nope FROM t", [], |r| r.get::<_, i64>(0)),
            None
        );
        assert_eq!(reads.fallbacks.load(Ordering::Relaxed), 2);
        // Another connection holding the file's lock: busy, answered at once
        // (rusqlite's own default would wait five seconds), by the pool.
        let locked = dir.path().join("locked.db");
        let holder = Connection::open(&locked).unwrap();
        holder
            .execute_batch("CREATE TABLE t (v INTEGER); BEGIN EXCLUSIVE; INSERT INTO t VALUES (1);")
            .unwrap();
        let busy = PointReads::new(Some(locked));
        let started = std::time::Instant::now();
        assert_eq!(
            busy.row("SELECT v FROM t", [], |r| r.get::<_, i64>(0)),
            None
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let memory = PointReads::new(None);
        assert_eq!(memory.row("SELECT 1", [], |r| r.get::<_, i64>(0)), None);
    }
}
