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

mod announce;
pub mod audit;
mod batch;
mod error;
mod point;
mod stmt;
pub use announce::Listener;
pub use batch::TxBatch;
pub use error::{DbError, DbResult};
pub use point::{PointReads, PointRecord};
use std::time::Duration;
pub use stmt::{Arg, Conn, Locking, On, Record, Stmt, Tx, Writer, built, stmt, stmt_each};

/// Serialises SQLite write transactions inside the process: waiting on a
/// tokio mutex wakes the next writer the moment the last commits, where
/// SQLite's busy handler would sleep and poll.
pub static SQLITE_WRITER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

const SQLITE_MIGRATIONS: &[Migration] = migrations!("sqlite": 1 "0001_cell_info", 2 "0002_identity", 3 "0003_money", 4 "0004_notice", 5 "0005_broadcast", 6 "0006_wechat", 7 "0007_identity_hardening", 8 "0008_request_path_indexes", 9 "0009_roles_as_data", 10 "0010_sign_in_codes", 11 "0011_identifier_proofs", 12 "0012_outbox_trace", 13 "0013_gauge_indexes", 14 "0014_moves", 15 "0015_moves_follow_up");
const POSTGRES_MIGRATIONS: &[Migration] = migrations!("postgres": 1 "0001_cell_info", 2 "0002_identity", 3 "0003_money", 4 "0004_notice", 5 "0005_broadcast", 6 "0006_wechat", 7 "0007_identity_hardening", 8 "0008_request_path_indexes", 9 "0009_roles_as_data", 10 "0010_sign_in_codes", 11 "0011_identifier_proofs", 12 "0012_outbox_trace", 13 "0013_gauge_indexes", 14 "0014_moves", 15 "0015_moves_follow_up");

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

    /// Whether the database takes one write transaction at a time (SQLite):
    /// there, writes that share one commit (`TxBatch`, the money group
    /// committer) cost one fsync instead of one each.
    pub fn single_writer(&self) -> bool {
        matches!(self, Self::Sqlite(..))
    }

    /// The pool's connections: open, and of those idle.
    pub fn pool_connections(&self) -> (u32, usize) {
        match self {
            Self::Sqlite(pool, ..) => (pool.size(), pool.num_idle()),
            Self::Postgres(pool) => (pool.size(), pool.num_idle()),
        }
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
        let mut tx = self.begin().await?;
        if let Some(lock) = lock {
            stmt(lock).execute(&mut tx).await?;
        }
        stmt(ledger).execute(&mut tx).await?;
        for m in migrations {
            let done: Option<i64> = stmt("SELECT version FROM _migrations WHERE version = $1")
                .bind(m.version)
                .scalar_optional(&mut tx)
                .await?;
            if done.is_none() {
                tx.raw(m.sql)
                    .await
                    .with_context(|| format!("migration {} failed", m.name))?;
                stmt("INSERT INTO _migrations (version, name) VALUES ($1, $2)")
                    .bind(m.version)
                    .bind(m.name)
                    .execute(&mut tx)
                    .await?;
                tracing::info!(migration = m.name, "applied");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Binds the datastore to `region` on first use; refuses another region's.
    pub async fn claim_region(&self, region: &str) -> Result<()> {
        stmt(
            "INSERT INTO cell_info (key, value) VALUES ('region', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(region)
        .execute(self)
        .await?;
        let owner: String = stmt("SELECT value FROM cell_info WHERE key = 'region'")
            .scalar(self)
            .await?;
        if owner != region {
            bail!("this datastore belongs to region {owner}, not {region}");
        }
        Ok(())
    }

    /// A `cell_info` entry: facts about this datastore itself.
    pub async fn cell_info(&self, key: &str) -> Result<Option<String>> {
        Ok(stmt("SELECT value FROM cell_info WHERE key = $1")
            .bind(key)
            .scalar_optional(self)
            .await?)
    }

    pub async fn set_cell_info(&self, key: &str, value: &str) -> Result<()> {
        stmt("INSERT INTO cell_info (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
            .bind(key)
            .bind(value)
            .execute(self)
            .await?;
        Ok(())
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        stmt("SELECT 1").scalar::<i32>(self).await?;
        Ok(())
    }
}
