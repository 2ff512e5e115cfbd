//! The cell's datastore: SQLite (a file, WAL) by default, PostgreSQL for a
//! `postgres://` URL. Typed pools behind one enum, because sqlx's `Any`
//! driver decodes only bool, integer, float, text and blob: it breaks on
//! PostgreSQL's `SUM(bigint)` (a numeric) and on timestamps. Each backend
//! has its own migrations folder, embedded in the binary and applied at
//! start.

use anyhow::{Context, Result, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use std::str::FromStr;
use std::sync::Arc;

pub mod audit;
mod batch;
mod error;
mod point;
pub use batch::TxBatch;
pub use error::{DbError, DbResult};
pub use point::PointReads;
use std::time::Duration;

/// Runs `$body` with `$pool` bound to whichever typed pool the datastore has.
/// The body is compiled once per backend; the SQL text is shared (both
/// backends accept `$n` parameters).
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Datastore::Sqlite($pool, ..) => $body,
            $crate::db::Datastore::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_db;

/// `on_db!` for a single write outside a transaction: on SQLite it queues
/// behind `SQLITE_WRITER` like every other writer, instead of meeting a
/// running transaction in SQLite's sleeping busy handler.
macro_rules! write_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Datastore::Sqlite($pool, ..) => {
                let _writer = $crate::db::SQLITE_WRITER.lock().await;
                $body
            }
            $crate::db::Datastore::Postgres($pool) => $body,
        }
    };
}
pub(crate) use write_db;

/// Serialises SQLite write transactions inside the process: waiting on a
/// tokio mutex wakes the next writer the moment the last commits, where
/// SQLite's busy handler would sleep and poll.
pub static SQLITE_WRITER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `$body` inside a write transaction that commits when the body
/// finishes; an early return (`?`) drops it, which rolls back. SQLite takes
/// the write lock up front (`BEGIN IMMEDIATE`, after the in-process writer
/// mutex) so concurrent writers queue instead of failing on a lock upgrade.
macro_rules! in_tx {
    ($db:expr, $tx:ident => $body:expr) => {
        match $db {
            $crate::db::Datastore::Sqlite(pool, ..) => {
                let _writer = $crate::db::SQLITE_WRITER.lock().await;
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            $crate::db::Datastore::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}
pub(crate) use in_tx;

#[derive(Clone, Debug)]
pub enum Datastore {
    /// The pool, the group committer for the writes that use it, and the
    /// hot point reads, which skip the pool's thread hop.
    Sqlite(SqlitePool, TxBatch, Arc<PointReads>),
    Postgres(PgPool),
}

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

macro_rules! migrations {
    ($backend:literal: $($version:literal $name:literal),* $(,)?) => {
        &[$(Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../migrations/", $backend, "/", $name, ".sql")),
        }),*]
    };
}

const SQLITE_MIGRATIONS: &[Migration] = migrations!("sqlite": 1 "0001_cell_info", 2 "0002_identity", 3 "0003_money", 4 "0004_notice", 5 "0005_broadcast", 6 "0006_wechat", 7 "0007_identity_hardening", 8 "0008_request_path_indexes");
const POSTGRES_MIGRATIONS: &[Migration] = migrations!("postgres": 1 "0001_cell_info", 2 "0002_identity", 3 "0003_money", 4 "0004_notice", 5 "0005_broadcast", 6 "0006_wechat", 7 "0007_identity_hardening", 8 "0008_request_path_indexes");

impl Datastore {
    /// Connects and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .with_context(|| "malformed sqlite URL")?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let file = opts.get_filename().to_path_buf();
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                // sqlx pings a pooled connection before handing it out; on
                // SQLite that is a round trip to the connection's thread
                // for every statement, testing a file handle that cannot
                // hang up (a crashed worker fails the statement itself).
                .test_before_acquire(false)
                .connect_with(opts)
                .await
                .context("cannot open the SQLite datastore")?;
            // An in-memory database has no file another connection can open.
            let reads = PointReads::new(Some(file).filter(|f| f.is_file()));
            Self::Sqlite(pool.clone(), TxBatch::start(pool), Arc::new(reads))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).context("malformed postgres URL")?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await
                .context("cannot connect to PostgreSQL")?;
            Self::Postgres(pool)
        } else {
            bail!("database_url must start with sqlite: or postgres://");
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(..) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Applies the pending migrations in one transaction, all or none. On
    /// PostgreSQL an advisory lock serialises cell instances that start
    /// together; on SQLite, `BEGIN IMMEDIATE` does.
    async fn migrate(&self) -> Result<()> {
        let (migrations, ledger, lock): (&[Migration], &'static str, Option<&'static str>) =
            match self {
                Self::Sqlite(..) => (
                    SQLITE_MIGRATIONS,
                    "CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
                    None,
                ),
                Self::Postgres(_) => (
                    POSTGRES_MIGRATIONS,
                    "CREATE TABLE IF NOT EXISTS _migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
                    Some("SELECT pg_advisory_xact_lock(7243110)"),
                ),
            };
        crate::db::in_tx!(self, tx => {
            if let Some(lock) = lock {
                sqlx::query(lock).execute(&mut *tx).await?;
            }
            sqlx::query(ledger).execute(&mut *tx).await?;
            for m in migrations {
                let done: Option<i64> = sqlx::query_scalar("SELECT version FROM _migrations WHERE version = $1")
                    .bind(m.version)
                    .fetch_optional(&mut *tx)
                    .await?;
                if done.is_none() {
                    sqlx::raw_sql(m.sql)
                        .execute(&mut *tx)
                        .await
                        .with_context(|| format!("migration {} failed", m.name))?;
                    sqlx::query("INSERT INTO _migrations (version, name) VALUES ($1, $2)")
                        .bind(m.version)
                        .bind(m.name)
                        .execute(&mut *tx)
                        .await?;
                    tracing::info!(migration = m.name, "applied");
                }
            }
        });
        Ok(())
    }

    /// Binds the datastore to `region` on first use; refuses another region's.
    pub async fn claim_region(&self, region: &str) -> Result<()> {
        let owner: String = match self {
            Self::Sqlite(pool, ..) => {
                sqlx::query("INSERT INTO cell_info (key, value) VALUES ('region', ?) ON CONFLICT (key) DO NOTHING")
                    .bind(region)
                    .execute(pool)
                    .await?;
                sqlx::query_scalar("SELECT value FROM cell_info WHERE key = 'region'")
                    .fetch_one(pool)
                    .await?
            }
            Self::Postgres(pool) => {
                sqlx::query("INSERT INTO cell_info (key, value) VALUES ('region', $1) ON CONFLICT (key) DO NOTHING")
                    .bind(region)
                    .execute(pool)
                    .await?;
                sqlx::query_scalar("SELECT value FROM cell_info WHERE key = 'region'")
                    .fetch_one(pool)
                    .await?
            }
        };
        if owner != region {
            bail!("this datastore belongs to region {owner}, not {region}");
        }
        Ok(())
    }

    /// A `cell_info` entry: facts about this datastore itself.
    pub async fn cell_info(&self, key: &str) -> Result<Option<String>> {
        Ok(
            crate::db::on_db!(self, p => sqlx::query_scalar("SELECT value FROM cell_info WHERE key = $1")
            .bind(key).fetch_optional(p).await?),
        )
    }

    pub async fn set_cell_info(&self, key: &str, value: &str) -> Result<()> {
        crate::db::write_db!(self, p => {
            sqlx::query("INSERT INTO cell_info (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
                .bind(key).bind(value).execute(p).await?;
        });
        Ok(())
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Self::Sqlite(pool, ..) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Self::Postgres(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
        }
        Ok(())
    }
}
