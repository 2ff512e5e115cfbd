//! The tables on PostgreSQL, shared by every control-plane instance that
//! names the same database (`[store] postgres`).
//!
//! - A mutation is one PostgreSQL transaction that first locks the
//!   `revision` row of `cp_meta`: mutations from all instances take turns
//!   there, so each commits the next revision, in order and with no gap.
//!   The revision comes from the database, never from an instance.
//! - A committed change set is announced with `NOTIFY` (delivered on
//!   commit). Each instance `LISTEN`s and also reads the revision every
//!   second, so a notification lost while its connection was down costs at
//!   most a second: the log is the truth, notifications only wake.
//! - Reads that must be consistent across many queries (a snapshot, a
//!   backup) run in one `REPEATABLE READ` read-only transaction.
//!
//! The store's code is synchronous (redb's is, and every caller already
//! runs it on a blocking thread), so each query here blocks on the runtime.

use super::tables::{Read, Result, UserRow, Write};
use homecell_proto::control::{
    ChangeSet, ConfigEntry, ConfigHistoryEntry, IdentifierClaim, MoveBatch, MoveRecord, Region,
    SubscriberStatus,
};
use homecell_proto::error::CodedError;
use prost::Message;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::cell::RefCell;
use std::str::FromStr;
use std::time::Duration;

/// The channel committed revisions are announced on.
pub const CHANNEL: &str = "homecell_cp_revision";

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "0001_store",
        include_str!("../../migrations/postgres/0001_store.sql"),
    ),
    (
        2,
        "0002_moves",
        include_str!("../../migrations/postgres/0002_moves.sql"),
    ),
];

fn storage(e: impl std::fmt::Display) -> CodedError {
    super::redb_tables::storage(e)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(storage)
}

/// A u64 stored bit for bit in a BIGINT.
fn int(v: u64) -> i64 {
    v as i64
}

/// A revision bound (revisions never reach i64::MAX).
fn rev(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn prefix_key(prefix: u128) -> String {
    format!("{prefix:032x}")
}

/// How long one query may take, measured here: the server's own limits
/// (`statement_timeout`) never fire if the network drops its packets, and
/// a thread blocked for ever would hold its connection for ever.
const QUERY_DEADLINE: Duration = Duration::from_secs(15);

/// Runs `f` to completion from synchronous code on a thread of the
/// runtime's blocking pool (or, via `block_in_place`, a worker thread),
/// giving up after [`QUERY_DEADLINE`] (the transaction is then dropped,
/// which closes or rolls back its connection).
fn block<T>(
    rt: &tokio::runtime::Handle,
    f: impl std::future::Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    tokio::task::block_in_place(|| {
        rt.block_on(async {
            tokio::time::timeout(QUERY_DEADLINE, f)
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
        })
    })
}

/// The shared database.
pub struct Pg {
    pools: std::sync::RwLock<Pools>,
    opts: PgConnectOptions,
    url: String,
    rt: tokio::runtime::Handle,
}

/// The connections, renewed whole after the database was unreachable: a
/// connection whose packets were dropped stays stuck in TCP's
/// retransmission backoff (a minute and more) after the network heals,
/// and a pool would hand it out again.
struct Pools {
    /// Mutations, reads, snapshots and backups.
    main: PgPool,
    /// Following the head and the heartbeat, apart: a pool busy with
    /// snapshots must not make the instance think it lost the store.
    follow: PgPool,
}

impl Pools {
    fn lazy(opts: &PgConnectOptions) -> Self {
        Self {
            main: main_pool().connect_lazy_with(opts.clone()),
            follow: follow_pool().connect_lazy_with(opts.clone()),
        }
    }
}

fn main_pool() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
}

fn follow_pool() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
}

/// How long an instance keeps trying to reach PostgreSQL when it starts:
/// a database that starts beside it (compose, a reboot, a failover in
/// progress) is often not ready yet, and a process that gave up at once
/// would leave the retry to whatever restarts it.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// The main pool's first connection, retried while the failure may pass
/// (the server unreachable or slow to answer). What will not pass (a
/// refused password, a missing database) fails at once.
async fn connect_at_start(opts: &PgConnectOptions) -> std::result::Result<PgPool, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        match main_pool().connect_with(opts.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(e @ (sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)))
                if started.elapsed() < START_PATIENCE =>
            {
                tracing::warn!(error = %e, "PostgreSQL not reachable yet; retrying");
                let wait = homecell_common::backoff::jittered_ms(attempt, 200, 2_000);
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One control-plane instance as it last reported itself.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub id: String,
    pub endpoint: String,
    pub started_unix_ms: i64,
    pub seen_unix_ms: i64,
    pub revision: u64,
}

impl Pg {
    /// Connects and applies pending migrations (under an advisory lock, so
    /// instances that start together take turns).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        // The store's code blocks on queries (see `block`), which tokio
        // allows only on a multi-threaded runtime.
        anyhow::ensure!(
            tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread,
            "the PostgreSQL store needs a multi-threaded tokio runtime"
        );
        // A statement never waits on a lock or runs for longer than a
        // client's own deadline. (Write transactions also set an idle
        // limit: see `begin_write`.)
        let opts = PgConnectOptions::from_str(url)
            .context("malformed postgres URL")?
            .application_name("homecell-control-plane")
            // lock_timeout well under a cell's 5 s claim deadline: a claim
            // queued behind others fails as not done, and the cell's
            // breaker (which counts only unreached control planes) stays
            // closed.
            .options([("lock_timeout", "2s"), ("statement_timeout", "10s")]);
        let pool = connect_at_start(&opts)
            .await
            .context("cannot connect to PostgreSQL")?;
        let follow = follow_pool().connect_lazy_with(opts.clone());
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7243111)")
            .execute(&mut *tx)
            .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS cp_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            .execute(&mut *tx)
            .await?;
        for (version, name, sql) in MIGRATIONS {
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM cp_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_none() {
                sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("migration {name}"))?;
                sqlx::query("INSERT INTO cp_migrations (version, name) VALUES ($1, $2)")
                    .bind(version)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(Self {
            pools: std::sync::RwLock::new(Pools { main: pool, follow }),
            opts,
            url: url.to_string(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// [`Pg::connect`] from synchronous code on a multi-threaded runtime.
    pub fn connect_blocking(url: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| rt.block_on(Self::connect(url)))
    }

    fn pool(&self) -> PgPool {
        self.pools.read().expect("poisoned").main.clone()
    }

    fn follow(&self) -> PgPool {
        self.pools.read().expect("poisoned").follow.clone()
    }

    /// Fresh connections for following (one just timed out).
    pub fn renew_follow(&self) {
        self.pools.write().expect("poisoned").follow =
            follow_pool().connect_lazy_with(self.opts.clone());
    }

    /// Fresh connections for everything (the database is reachable again
    /// after it was not).
    pub fn renew_all(&self) {
        *self.pools.write().expect("poisoned") = Pools::lazy(&self.opts);
    }

    /// The URL, for a listener's own connection.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A write transaction, holding the revision lock until it ends (with
    /// `lock`; rows no subscriber sees, such as the subscribers' own, are
    /// written without it).
    pub fn begin_write(&self, lock: bool) -> Result<PgTx> {
        let tx = block(&self.rt, async {
            // READ COMMITTED whatever the server's default: a writer that
            // waited on the lock must then read what the last one wrote.
            let mut tx = self
                .pool()
                .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE")
                .await?;
            // An instance cut off mid-transaction would hold the revision
            // lock on the server, stopping every other instance's
            // mutations: the server ends such a session after 5 s idle.
            sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '5s'")
                .execute(&mut *tx)
                .await?;
            if lock {
                // fetch_one: a missing row must fail, not lock nothing.
                sqlx::query("SELECT value FROM cp_meta WHERE key = 'revision' FOR UPDATE")
                    .fetch_one(&mut *tx)
                    .await?;
            }
            Ok::<_, sqlx::Error>(tx)
        })
        .map_err(storage)?;
        Ok(PgTx {
            tx: RefCell::new(tx),
            rt: self.rt.clone(),
        })
    }

    /// A consistent read-only view, however many queries read it. No idle
    /// limit: a snapshot's reader may take up to `sync::STALL` per part.
    pub fn begin_read(&self) -> Result<PgTx> {
        let tx = block(
            &self.rt,
            self.pool()
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        )
        .map_err(storage)?;
        Ok(PgTx {
            tx: RefCell::new(tx),
            rt: self.rt.clone(),
        })
    }

    /// Records this instance as alive at `revision`.
    pub async fn heartbeat(&self, i: &InstanceRow) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO cp_instances (id, endpoint, started_unix_ms, seen_unix_ms, revision) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET endpoint = $2, \
             started_unix_ms = $3, seen_unix_ms = $4, revision = $5",
        )
        .bind(&i.id)
        .bind(&i.endpoint)
        .bind(i.started_unix_ms)
        .bind(i.seen_unix_ms)
        .bind(int(i.revision))
        .execute(&self.follow())
        .await?;
        // An instance removed for good leaves the list after a day.
        sqlx::query("DELETE FROM cp_instances WHERE seen_unix_ms < $1")
            .bind(i.seen_unix_ms - 86_400_000)
            .execute(&self.follow())
            .await?;
        Ok(())
    }

    pub async fn instances(&self) -> sqlx::Result<Vec<InstanceRow>> {
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, endpoint, started_unix_ms, seen_unix_ms, revision FROM cp_instances ORDER BY id",
        )
        // The main pool: an operator polling `status` must never starve
        // the follow pool's head reads.
        .fetch_all(&self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| InstanceRow {
                id: r.0,
                endpoint: r.1,
                started_unix_ms: r.2,
                seen_unix_ms: r.3,
                revision: r.4 as u64,
            })
            .collect())
    }

    /// The committed revision and epoch, as the database holds them now.
    pub async fn head(&self) -> sqlx::Result<(u64, u64)> {
        // One round trip: it runs every tick and after every notification.
        // A standby (or a database read-only for any reason) answers reads
        // while every mutation fails: not a store this instance can serve.
        let (revision, epoch, read_only): (Option<i64>, Option<i64>, String) = sqlx::query_as(
            "SELECT (SELECT value FROM cp_meta WHERE key = 'revision'), \
             (SELECT value FROM cp_meta WHERE key = 'epoch'), \
             current_setting('transaction_read_only')",
        )
        .fetch_one(&self.follow())
        .await?;
        if read_only == "on" {
            return Err(sqlx::Error::Protocol(
                "the database is read-only (a standby?)".into(),
            ));
        }
        Ok((revision.unwrap_or(0) as u64, epoch.unwrap_or(0) as u64))
    }
}

/// One transaction on the shared database.
pub struct PgTx {
    tx: RefCell<Transaction<'static, Postgres>>,
    rt: tokio::runtime::Handle,
}

impl PgTx {
    pub fn commit(self) -> Result<()> {
        block(&self.rt, self.tx.into_inner().commit()).map_err(storage)
    }

    /// Runs one query future against this transaction.
    fn run<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut sqlx::PgConnection,
        ) -> futures::future::BoxFuture<'c, sqlx::Result<T>>,
    ) -> Result<T> {
        let mut tx = self.tx.borrow_mut();
        block(&self.rt, f(&mut tx)).map_err(storage)
    }

    fn body<M: Message + Default>(
        &self,
        sql: &'static str,
        key: impl Into<KeyArg>,
    ) -> Result<Option<M>> {
        let key = key.into();
        let v: Option<Vec<u8>> = self.run(move |c| {
            Box::pin(async move {
                let q = sqlx::query_scalar(sql);
                match key {
                    KeyArg::Text(k) => q.bind(k),
                    KeyArg::Bytes(k) => q.bind(k),
                }
                .fetch_optional(c)
                .await
            })
        })?;
        v.map(|b| decode(&b)).transpose()
    }

    fn bodies<M: Message + Default>(&self, sql: &'static str) -> Result<Vec<M>> {
        let v: Vec<Vec<u8>> =
            self.run(|c| Box::pin(async move { sqlx::query_scalar(sql).fetch_all(c).await }))?;
        v.iter().map(|b| decode(b)).collect()
    }

    fn count(&self, sql: &'static str) -> Result<u64> {
        let n: i64 =
            self.run(|c| Box::pin(async move { sqlx::query_scalar(sql).fetch_one(c).await }))?;
        Ok(n as u64)
    }

    /// The claim a statement returns for `hmac` (a `SELECT`, or a
    /// `DELETE ... RETURNING`, of its three columns).
    fn claim_row(&self, sql: &'static str, hmac: &str) -> Result<Option<IdentifierClaim>> {
        let hmac = hmac.to_string();
        let v: Option<(String, String, String)> = self.run(move |c| {
            Box::pin(async move { sqlx::query_as(sql).bind(hmac).fetch_optional(c).await })
        })?;
        Ok(v.map(to_claim))
    }

    fn exec(
        &self,
        q: sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<u64> {
        self.run(|c| Box::pin(async move { Ok(q.execute(c).await?.rows_affected()) }))
    }
}

/// A claim from its columns.
fn to_claim((hmac, user_id, region): (String, String, String)) -> IdentifierClaim {
    IdentifierClaim {
        hmac,
        user_id,
        region,
    }
}

/// A key bound to a lookup.
enum KeyArg {
    Text(String),
    Bytes(Vec<u8>),
}

impl From<&str> for KeyArg {
    fn from(k: &str) -> Self {
        KeyArg::Text(k.to_string())
    }
}

/// A config row key: BYTEA, as it holds a NUL.
struct RowKey(Vec<u8>);

impl From<RowKey> for KeyArg {
    fn from(k: RowKey) -> Self {
        KeyArg::Bytes(k.0)
    }
}

impl Read for PgTx {
    fn meta(&self, key: &str) -> Result<u64> {
        let key = key.to_string();
        let v: Option<i64> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_scalar("SELECT value FROM cp_meta WHERE key = $1")
                    .bind(key)
                    .fetch_optional(c)
                    .await
            })
        })?;
        Ok(v.map_or(0, |v| v as u64))
    }
    fn region(&self, id: &str) -> Result<Option<Region>> {
        self.body("SELECT body FROM cp_regions WHERE id = $1", id)
    }
    fn regions(&self) -> Result<Vec<Region>> {
        self.bodies("SELECT body FROM cp_regions ORDER BY id")
    }
    fn claim(&self, hmac: &str) -> Result<Option<IdentifierClaim>> {
        self.claim_row(
            "SELECT hmac, user_id, region FROM cp_claims WHERE hmac = $1",
            hmac,
        )
    }
    fn user(&self, user_id: &str) -> Result<Option<UserRow>> {
        let id = user_id.to_string();
        let v: Option<(String, i32)> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_as("SELECT region, claims FROM cp_users WHERE user_id = $1")
                    .bind(id)
                    .fetch_optional(c)
                    .await
            })
        })?;
        Ok(v.map(|(r, n)| (r, n.max(0) as u32)))
    }
    fn reservation(&self, prefix: u128) -> Result<Option<String>> {
        let key = prefix_key(prefix);
        self.run(move |c| {
            Box::pin(async move {
                sqlx::query_scalar("SELECT region FROM cp_reserved WHERE prefix = $1")
                    .bind(key)
                    .fetch_optional(c)
                    .await
            })
        })
    }
    fn config(&self, row: &str) -> Result<Option<ConfigEntry>> {
        self.body(
            "SELECT body FROM cp_config WHERE row_key = $1",
            RowKey(row.as_bytes().to_vec()),
        )
    }
    fn config_entries(&self) -> Result<Vec<ConfigEntry>> {
        self.bodies("SELECT body FROM cp_config ORDER BY row_key")
    }
    fn history_upto(&self, revision: u64) -> Result<Vec<(String, ConfigHistoryEntry)>> {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_as("SELECT row_key, body FROM cp_config_history WHERE revision <= $1 ORDER BY revision, row_key")
                    .bind(rev(revision))
                    .fetch_all(c)
                    .await
            })
        })?;
        rows.into_iter()
            .map(|(k, b)| Ok((String::from_utf8_lossy(&k).into_owned(), decode(&b)?)))
            .collect()
    }
    fn history_newest(&self, key: &str, limit: usize) -> Result<Vec<ConfigHistoryEntry>> {
        // The key sits inside the encoded row: walk newest first a page at
        // a time until `limit` rows match (history is small).
        let mut out = Vec::new();
        let mut before: Option<(i64, Vec<u8>)> = None;
        loop {
            let from = before.clone();
            let page: Vec<(i64, Vec<u8>, Vec<u8>)> = self.run(move |c| {
                Box::pin(async move {
                    let (r, k) = from.unwrap_or((i64::MAX, Vec::new()));
                    sqlx::query_as("SELECT revision, row_key, body FROM cp_config_history WHERE (revision, row_key) < ($1, $2) ORDER BY revision DESC, row_key DESC LIMIT 500")
                        .bind(r)
                        .bind(k)
                        .fetch_all(c)
                        .await
                })
            })?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            before = Some((last.0, last.1.clone()));
            for (_, _, body) in &page {
                let h: ConfigHistoryEntry = decode(body)?;
                if key.is_empty() || h.key == key {
                    out.push(h);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
    }
    fn changes_after(&self, revision: u64, max: usize) -> Result<Vec<ChangeSet>> {
        let v: Vec<Vec<u8>> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_scalar(
                    "SELECT body FROM cp_changes WHERE revision > $1 ORDER BY revision LIMIT $2",
                )
                .bind(rev(revision))
                .bind(max.min(i64::MAX as usize) as i64)
                .fetch_all(c)
                .await
            })
        })?;
        v.iter().map(|b| decode(b)).collect()
    }
    fn subscribers(&self) -> Result<Vec<SubscriberStatus>> {
        self.bodies("SELECT body FROM cp_subscribers ORDER BY node_id")
    }
    fn users_len(&self) -> Result<u64> {
        self.count("SELECT count(*) FROM cp_users")
    }
    fn claims_len(&self) -> Result<u64> {
        self.count("SELECT count(*) FROM cp_claims")
    }
    fn history_len(&self) -> Result<u64> {
        self.count("SELECT count(*) FROM cp_config_history")
    }
    fn users_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, String)>> {
        let after = after.map(str::to_string);
        self.run(move |c| {
            Box::pin(async move {
                // `> ''` for the first page: keys are never empty, and a
                // plain bound keeps the index usable in a generic plan.
                sqlx::query_as("SELECT user_id, region FROM cp_users WHERE user_id > $1 ORDER BY user_id LIMIT $2")
                    .bind(after.unwrap_or_default())
                    .bind(limit as i64)
                    .fetch_all(c)
                    .await
            })
        })
    }
    fn claims_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<IdentifierClaim>> {
        let after = after.map(str::to_string);
        let rows: Vec<(String, String, String)> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_as("SELECT hmac, user_id, region FROM cp_claims WHERE hmac > $1 ORDER BY hmac LIMIT $2")
                    .bind(after.unwrap_or_default())
                    .bind(limit as i64)
                    .fetch_all(c)
                    .await
            })
        })?;
        Ok(rows.into_iter().map(to_claim).collect())
    }
    fn history_page(
        &self,
        after: Option<(u64, &str)>,
        limit: usize,
    ) -> Result<Vec<(u64, String, ConfigHistoryEntry)>> {
        let (r, k) = after.map_or((-1, Vec::new()), |(r, k)| (rev(r), k.as_bytes().to_vec()));
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_as("SELECT revision, row_key, body FROM cp_config_history WHERE (revision, row_key) > ($1, $2) ORDER BY revision, row_key LIMIT $3")
                    .bind(r)
                    .bind(k)
                    .bind(limit as i64)
                    .fetch_all(c)
                    .await
            })
        })?;
        rows.into_iter()
            .map(|(r, k, b)| {
                Ok((
                    r as u64,
                    String::from_utf8_lossy(&k).into_owned(),
                    decode(&b)?,
                ))
            })
            .collect()
    }
    fn move_record(&self, id: &str) -> Result<Option<MoveRecord>> {
        self.body("SELECT body FROM cp_moves WHERE id = $1", id)
    }
    fn moves_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<MoveRecord>> {
        let after = after.map(str::to_string);
        let v: Vec<Vec<u8>> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_scalar("SELECT body FROM cp_moves WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(after.unwrap_or_default())
                    .bind(limit as i64)
                    .fetch_all(c)
                    .await
            })
        })?;
        v.iter().map(|b| decode(b)).collect()
    }
    fn open_move_of(&self, user_id: &str) -> Result<Option<String>> {
        let user = user_id.to_string();
        self.run(move |c| {
            Box::pin(async move {
                sqlx::query_scalar("SELECT id FROM cp_moves WHERE open_user = $1")
                    .bind(user)
                    .fetch_optional(c)
                    .await
            })
        })
    }
    fn open_moves_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<MoveRecord>> {
        let after = after.map(str::to_string);
        let v: Vec<Vec<u8>> = self.run(move |c| {
            Box::pin(async move {
                sqlx::query_scalar(
                    "SELECT body FROM cp_moves WHERE open_user > $1 ORDER BY open_user LIMIT $2",
                )
                .bind(after.unwrap_or_default())
                .bind(limit as i64)
                .fetch_all(c)
                .await
            })
        })?;
        v.iter().map(|b| decode(b)).collect()
    }
    fn batch(&self, id: &str) -> Result<Option<MoveBatch>> {
        self.body("SELECT body FROM cp_move_batches WHERE id = $1", id)
    }
    fn batches(&self) -> Result<Vec<MoveBatch>> {
        self.bodies("SELECT body FROM cp_move_batches ORDER BY id")
    }
}

impl Write for PgTx {
    fn set_meta(&mut self, key: &str, value: u64) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
                .bind(key.to_string())
                .bind(int(value)),
        )?;
        Ok(())
    }
    fn put_region(&mut self, r: &Region) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_regions (id, body) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET body = $2")
                .bind(r.id.clone())
                .bind(r.encode_to_vec()),
        )?;
        Ok(())
    }
    fn put_claim(&mut self, c: &IdentifierClaim) -> Result<bool> {
        let (hmac, user, region) = (c.hmac.clone(), c.user_id.clone(), c.region.clone());
        let updated = self.exec(
            sqlx::query("UPDATE cp_claims SET user_id = $2, region = $3 WHERE hmac = $1")
                .bind(hmac.clone())
                .bind(user.clone())
                .bind(region.clone()),
        )?;
        if updated > 0 {
            return Ok(true);
        }
        self.exec(
            sqlx::query("INSERT INTO cp_claims (hmac, user_id, region) VALUES ($1, $2, $3)")
                .bind(hmac)
                .bind(user)
                .bind(region),
        )?;
        Ok(false)
    }
    fn remove_claim(&mut self, hmac: &str) -> Result<Option<IdentifierClaim>> {
        self.claim_row(
            "DELETE FROM cp_claims WHERE hmac = $1 RETURNING hmac, user_id, region",
            hmac,
        )
    }
    fn put_user(&mut self, user_id: &str, region: &str, claims: u32) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_users (user_id, region, claims) VALUES ($1, $2, $3) ON CONFLICT (user_id) DO UPDATE SET region = $2, claims = $3")
                .bind(user_id.to_string())
                .bind(region.to_string())
                .bind(claims.min(i32::MAX as u32) as i32),
        )?;
        Ok(())
    }
    fn remove_user(&mut self, user_id: &str) -> Result<()> {
        self.exec(
            sqlx::query("DELETE FROM cp_users WHERE user_id = $1").bind(user_id.to_string()),
        )?;
        Ok(())
    }
    fn reserve(&mut self, prefix: u128, region: &str) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_reserved (prefix, region) VALUES ($1, $2) ON CONFLICT (prefix) DO UPDATE SET region = $2")
                .bind(prefix_key(prefix))
                .bind(region.to_string()),
        )?;
        Ok(())
    }
    fn unreserve(&mut self, prefix: u128) -> Result<()> {
        self.exec(
            sqlx::query("DELETE FROM cp_reserved WHERE prefix = $1").bind(prefix_key(prefix)),
        )?;
        Ok(())
    }
    fn drop_reservations(&mut self, region: &str) -> Result<u64> {
        self.exec(sqlx::query("DELETE FROM cp_reserved WHERE region = $1").bind(region.to_string()))
    }
    fn put_config(&mut self, row: &str, e: &ConfigEntry) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_config (row_key, body) VALUES ($1, $2) ON CONFLICT (row_key) DO UPDATE SET body = $2")
                .bind(row.as_bytes().to_vec())
                .bind(e.encode_to_vec()),
        )?;
        Ok(())
    }
    fn remove_config(&mut self, row: &str) -> Result<()> {
        self.exec(
            sqlx::query("DELETE FROM cp_config WHERE row_key = $1").bind(row.as_bytes().to_vec()),
        )?;
        Ok(())
    }
    fn put_history(&mut self, row: &str, h: &ConfigHistoryEntry) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_config_history (revision, row_key, body) VALUES ($1, $2, $3) ON CONFLICT (revision, row_key) DO UPDATE SET body = $3")
                .bind(rev(h.revision))
                .bind(row.as_bytes().to_vec())
                .bind(h.encode_to_vec()),
        )?;
        Ok(())
    }
    fn put_change(&mut self, cs: &ChangeSet) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_changes (revision, body) VALUES ($1, $2)")
                .bind(rev(cs.revision))
                .bind(cs.encode_to_vec()),
        )?;
        // Delivered when (and only if) the transaction commits.
        self.exec(
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(cs.revision.to_string()),
        )?;
        Ok(())
    }
    fn trim_changes(&mut self, revision: u64) -> Result<()> {
        self.exec(sqlx::query("DELETE FROM cp_changes WHERE revision <= $1").bind(rev(revision)))?;
        Ok(())
    }
    fn put_subscriber(&mut self, s: &SubscriberStatus) -> Result<()> {
        // Instances persist their rows independently: an older report (a
        // disconnect written late by the instance the subscriber left)
        // never replaces a newer one.
        self.exec(
            sqlx::query("INSERT INTO cp_subscribers (node_id, body, contact_unix_ms) VALUES ($1, $2, $3) ON CONFLICT (node_id) DO UPDATE SET body = $2, contact_unix_ms = $3 WHERE cp_subscribers.contact_unix_ms <= $3")
                .bind(s.node_id.clone())
                .bind(s.encode_to_vec())
                .bind(s.last_contact_unix_ms),
        )?;
        Ok(())
    }
    fn put_move(&mut self, m: &MoveRecord) -> Result<()> {
        let open = super::tables::move_is_open(m).then(|| m.user_id.clone());
        self.exec(
            sqlx::query("INSERT INTO cp_moves (id, open_user, body) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET open_user = $2, body = $3")
                .bind(m.id.clone())
                .bind(open)
                .bind(m.encode_to_vec()),
        )?;
        Ok(())
    }
    fn put_batch(&mut self, b: &MoveBatch) -> Result<()> {
        self.exec(
            sqlx::query("INSERT INTO cp_move_batches (id, body) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET body = $2")
                .bind(b.id.clone())
                .bind(b.encode_to_vec()),
        )?;
        Ok(())
    }
}
