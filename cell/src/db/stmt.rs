//! Statements: the one place the cell's SQL meets a backend.
//!
//! A store writes `stmt(SQL).bind(a).bind(b)` and runs it on where it
//! should run: the datastore for a read (`fetch_*(db)`), the datastore's
//! writer for a write outside a transaction (`execute(db)`, or
//! `fetch_*(db.writer())` for a `RETURNING`), or a transaction
//! (`fetch_*(&mut tx)`). The backend `match` happens here, once per way to
//! run, so a store never names SQLite or PostgreSQL. The SQL text is shared:
//! both backends take `$n` parameters.
//!
//! Rows come back as `sqlx::FromRow` types that decode on both backends
//! (`Record`). Bound values are copied into an `Arg`, as sqlx copies them
//! into its own arguments anyway.

use super::{Datastore, DbResult, SQLITE_WRITER};
use futures::future::BoxFuture;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, FromRow, PgConnection, Postgres, Sqlite, SqliteConnection};
use std::borrow::Cow;
use tokio::sync::MutexGuard;

/// A row type both backends decode.
pub trait Record:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}
impl<T> Record for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

/// A value bound to a statement's next `$n`.
#[derive(Debug, Clone)]
pub enum Arg {
    I64(i64),
    I32(i32),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    OptI64(Option<i64>),
    OptText(Option<String>),
}

macro_rules! arg_from {
    ($($t:ty => $v:ident $(($conv:expr))?),* $(,)?) => {
        $(impl From<$t> for Arg {
            fn from(v: $t) -> Self {
                Arg::$v($( ($conv) )?(v))
            }
        })*
    };
}
arg_from! {
    i64 => I64,
    i32 => I32,
    bool => Bool,
    String => Text,
    &str => Text(str::to_owned),
    &String => Text(String::clone),
    Vec<u8> => Bytes,
    &[u8] => Bytes(<[u8]>::to_vec),
    &Vec<u8> => Bytes(Vec::clone),
    Option<i64> => OptI64,
    Option<String> => OptText,
    Option<&str> => OptText(|v: Option<&str>| v.map(str::to_owned)),
    &Option<String> => OptText(Option::clone),
    &i64 => I64(|v: &i64| *v),
    &bool => Bool(|v: &bool| *v),
    &&str => Text(|v: &&str| (*v).to_owned()),
    Option<&String> => OptText(|v: Option<&String>| v.cloned()),
    &Option<i64> => OptI64(|v: &Option<i64>| *v),
}

impl From<usize> for Arg {
    fn from(v: usize) -> Self {
        Arg::I64(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::I64(i64::from(v))
    }
}

impl rusqlite::ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Arg::I64(v) => v.to_sql(),
            Arg::I32(v) => v.to_sql(),
            Arg::Bool(v) => v.to_sql(),
            Arg::Text(v) => v.to_sql(),
            Arg::Bytes(v) => v.to_sql(),
            Arg::OptI64(v) => v.to_sql(),
            Arg::OptText(v) => v.to_sql(),
        }
    }
}

/// A statement and its bound values.
#[derive(Debug)]
#[must_use = "a statement does nothing until it runs"]
pub struct Stmt {
    /// The text, for SQLite and for PostgreSQL alike unless `postgres`
    /// gives PostgreSQL's own.
    pub(super) sql: Cow<'static, str>,
    pub(super) postgres: Option<&'static str>,
    pub(super) args: Vec<Arg>,
}

/// A statement of the cell's own text.
pub fn stmt(sql: &'static str) -> Stmt {
    Stmt {
        sql: Cow::Borrowed(sql),
        postgres: None,
        args: Vec::new(),
    }
}

/// A statement whose text differs by backend (an aggregate each spells its
/// own way): the same parameters, the same columns.
pub fn stmt_each(sqlite: &'static str, postgres: &'static str) -> Stmt {
    Stmt {
        postgres: Some(postgres),
        ..stmt(sqlite)
    }
}

/// A statement whose text is built at run time. Only from the cell's own
/// fragments: every value still goes through `bind`.
pub fn built(sql: String) -> Stmt {
    Stmt {
        sql: Cow::Owned(sql),
        postgres: None,
        args: Vec::new(),
    }
}

/// A connection a statement runs on: a transaction's, or a batch's.
pub enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl Conn<'_> {
    /// The same connection, for one more statement.
    pub fn reborrow(&mut self) -> Conn<'_> {
        match self {
            Conn::Sqlite(c) => Conn::Sqlite(c),
            Conn::Postgres(c) => Conn::Postgres(c),
        }
    }
}

/// Where a statement runs.
pub enum On<'t> {
    /// The pool, for a read.
    Read(&'t Datastore),
    /// The pool, for a write outside a transaction: on SQLite it queues
    /// behind `SQLITE_WRITER` like every other writer, instead of meeting a
    /// running transaction in SQLite's sleeping busy handler.
    Write(&'t Datastore),
    Conn(Conn<'t>),
}

impl<'t> From<&'t Datastore> for On<'t> {
    fn from(db: &'t Datastore) -> Self {
        On::Read(db)
    }
}

impl<'t> From<Conn<'t>> for On<'t> {
    fn from(c: Conn<'t>) -> Self {
        On::Conn(c)
    }
}

impl<'t, 'c> From<&'t mut Conn<'c>> for On<'t> {
    fn from(c: &'t mut Conn<'c>) -> Self {
        On::Conn(c.reborrow())
    }
}

impl<'t> From<&'t mut Tx> for On<'t> {
    fn from(tx: &'t mut Tx) -> Self {
        On::Conn(tx.conn())
    }
}

/// The datastore's writer, for a write outside a transaction that reads
/// rows back (`RETURNING`).
pub struct Writer<'t>(&'t Datastore);

impl<'t> From<Writer<'t>> for On<'t> {
    fn from(w: Writer<'t>) -> Self {
        On::Write(w.0)
    }
}

impl Datastore {
    pub fn writer(&self) -> Writer<'_> {
        Writer(self)
    }
}

/// Binds every argument of `$args` to the sqlx query `$q`.
macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::I64(v) => q.bind(v),
                Arg::I32(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
                Arg::OptI64(v) => q.bind(v),
                Arg::OptText(v) => q.bind(v),
            };
        }
        q
    }};
}

/// Runs `$call` (a method of sqlx's query and its executor) with the query
/// `$make` builds for the backend `$on` has, holding the SQLite writer for
/// a write on the pool.
macro_rules! run {
    ($self:ident, $on:expr, $make:ident [$($g:ty)?], |$q:ident, $ex:ident| $call:expr) => {{
        let Stmt { sql, postgres, args } = $self;
        let on = $on.into();
        let sql = AssertSqlSafe(match (&on, postgres) {
            (On::Read(Datastore::Postgres(_)) | On::Write(Datastore::Postgres(_)) | On::Conn(Conn::Postgres(_)), Some(pg)) => {
                Cow::Borrowed(pg)
            }
            _ => sql,
        });
        match on {
            // On the pool itself, not on a connection taken from it: the
            // pool's executor boxes its work, where a connection's would be
            // part of this future and of every future awaiting it (a
            // statement outside a transaction is in most requests').
            On::Read(Datastore::Sqlite(pool, ..)) => {
                let $q = bind_all!(sqlx::$make::<Sqlite $(, $g)?>(sql), args);
                let $ex = pool;
                $call
            }
            On::Write(Datastore::Sqlite(pool, ..)) => {
                let _writer = SQLITE_WRITER.lock().await;
                let $q = bind_all!(sqlx::$make::<Sqlite $(, $g)?>(sql), args);
                let $ex = pool;
                $call
            }
            On::Read(Datastore::Postgres(pool)) | On::Write(Datastore::Postgres(pool)) => {
                let $q = bind_all!(sqlx::$make::<Postgres $(, $g)?>(sql), args);
                let $ex = pool;
                $call
            }
            On::Conn(Conn::Sqlite(c)) => {
                let $q = bind_all!(sqlx::$make::<Sqlite $(, $g)?>(sql), args);
                let $ex = &mut *c;
                $call
            }
            On::Conn(Conn::Postgres(c)) => {
                let $q = bind_all!(sqlx::$make::<Postgres $(, $g)?>(sql), args);
                let $ex = &mut *c;
                $call
            }
        }
    }};
}

impl Stmt {
    pub fn bind(mut self, v: impl Into<Arg>) -> Self {
        self.args.push(v.into());
        self
    }

    /// Runs a statement that returns no rows; the number of rows it changed.
    /// On the datastore itself it is a write (`On::Write`).
    pub async fn execute<'t>(self, on: impl Into<On<'t>>) -> DbResult<u64> {
        let on = match on.into() {
            On::Read(db) => On::Write(db),
            on => on,
        };
        Ok(run!(self, on, query[], |q, ex| q.execute(ex).await?.rows_affected()))
    }

    pub async fn fetch_all<'t, T: Record>(self, on: impl Into<On<'t>>) -> DbResult<Vec<T>> {
        Ok(run!(self, on, query_as[_], |q, ex| q.fetch_all(ex).await?))
    }

    pub async fn fetch_optional<'t, T: Record>(self, on: impl Into<On<'t>>) -> DbResult<Option<T>> {
        Ok(run!(self, on, query_as[_], |q, ex| q
            .fetch_optional(ex)
            .await?))
    }

    pub async fn fetch_one<'t, T: Record>(self, on: impl Into<On<'t>>) -> DbResult<T> {
        Ok(run!(self, on, query_as[_], |q, ex| q.fetch_one(ex).await?))
    }

    /// The first column of the first row.
    pub async fn scalar<'t, T>(self, on: impl Into<On<'t>>) -> DbResult<T>
    where
        (T,): Record,
    {
        Ok(self.fetch_one::<(T,)>(on).await?.0)
    }

    /// The first column of the first row, if there is a row.
    pub async fn scalar_optional<'t, T>(self, on: impl Into<On<'t>>) -> DbResult<Option<T>>
    where
        (T,): Record,
    {
        Ok(self.fetch_optional::<(T,)>(on).await?.map(|r| r.0))
    }

    /// The first column of every row.
    pub async fn scalars<'t, T>(self, on: impl Into<On<'t>>) -> DbResult<Vec<T>>
    where
        (T,): Record,
    {
        Ok(self
            .fetch_all::<(T,)>(on)
            .await?
            .into_iter()
            .map(|r| r.0)
            .collect())
    }
}

impl Datastore {
    /// Runs `f`'s statements as one write and answers once it is durable.
    /// On SQLite writes that arrive together share one commit (`TxBatch`),
    /// each under its own savepoint; on PostgreSQL, which has its own group
    /// commit, `f` gets a transaction of its own. An error from `f` undoes
    /// `f`'s statements only.
    pub async fn write_batched<T, F>(&self, f: F) -> DbResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(Conn<'c>) -> BoxFuture<'c, DbResult<T>> + Send + 'static,
    {
        match self {
            Datastore::Sqlite(_, batch, _) => batch.run(move |c| f(Conn::Sqlite(c))).await,
            Datastore::Postgres(_) => {
                let mut tx = self.begin().await?;
                let out = f(tx.conn()).await?;
                tx.commit().await?;
                Ok(out)
            }
        }
    }
}

/// How a write transaction keeps the rows it read from changing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// Its write lock holds the whole database (SQLite).
    Database,
    /// Only what it locks row by row (`FOR UPDATE`, PostgreSQL).
    Rows,
}

/// A write transaction: it commits on `commit`; dropped before that (an
/// early `?`), it rolls back. On SQLite it holds the in-process writer and
/// SQLite's write lock from the start (`BEGIN IMMEDIATE`), so concurrent
/// writers queue instead of failing on a lock upgrade.
pub struct Tx(TxInner);

enum TxInner {
    // Fields drop in order: the transaction before the writer it holds
    // (none for a snapshot).
    Sqlite(
        sqlx::Transaction<'static, Sqlite>,
        Option<MutexGuard<'static, ()>>,
    ),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Datastore {
    /// Opens a write transaction. The wait for its connection (and its
    /// BEGIN) is counted in `homecell_cell_pool_wait_seconds`: a pool too
    /// small for the load shows there before anywhere else.
    pub async fn begin(&self) -> DbResult<Tx> {
        Ok(Tx(match self {
            Datastore::Sqlite(pool, ..) => {
                let writer = SQLITE_WRITER.lock().await;
                let started = std::time::Instant::now();
                let tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                crate::metrics::POOL_WAIT.observe(started.elapsed().as_secs_f64());
                TxInner::Sqlite(tx, Some(writer))
            }
            Datastore::Postgres(pool) => {
                let started = std::time::Instant::now();
                let tx = pool.begin().await?;
                crate::metrics::POOL_WAIT.observe(started.elapsed().as_secs_f64());
                TxInner::Postgres(tx)
            }
        }))
    }

    /// A read-only transaction that sees one moment: every statement in it
    /// reads the same committed state (an SQLite read transaction; a
    /// repeatable-read one on PostgreSQL). It holds no writer.
    pub async fn begin_snapshot(&self) -> DbResult<Tx> {
        Ok(Tx(match self {
            Datastore::Sqlite(pool, ..) => TxInner::Sqlite(pool.begin_with("BEGIN").await?, None),
            Datastore::Postgres(pool) => TxInner::Postgres(
                pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?,
            ),
        }))
    }
}

impl Tx {
    pub fn conn(&mut self) -> Conn<'_> {
        match &mut self.0 {
            TxInner::Sqlite(tx, _) => Conn::Sqlite(tx),
            TxInner::Postgres(tx) => Conn::Postgres(tx),
        }
    }

    /// Runs a script of the cell's own (a migration): several statements,
    /// no parameters.
    pub async fn raw(&mut self, script: &'static str) -> DbResult<()> {
        match &mut self.0 {
            TxInner::Sqlite(tx, _) => {
                sqlx::raw_sql(script).execute(&mut **tx).await?;
            }
            TxInner::Postgres(tx) => {
                sqlx::raw_sql(script).execute(&mut **tx).await?;
            }
        }
        Ok(())
    }

    /// How this transaction keeps what it read from changing under it.
    pub fn locking(&self) -> Locking {
        match self.0 {
            TxInner::Sqlite(..) => Locking::Database,
            TxInner::Postgres(_) => Locking::Rows,
        }
    }

    pub async fn commit(self) -> DbResult<()> {
        let started = std::time::Instant::now();
        match self.0 {
            TxInner::Sqlite(tx, _writer) => tx.commit().await?,
            TxInner::Postgres(tx) => tx.commit().await?,
        }
        crate::metrics::COMMIT_SECONDS.observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}
