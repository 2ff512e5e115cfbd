//! Every statement a suite ran uses an index, on both backends, as each
//! backend's query planner says (`EXPLAIN QUERY PLAN`, `EXPLAIN`): a cell
//! with millions of rows must not scan a table to answer one request.
//!
//! `record()` collects the statements sqlx ran (its `sqlx::query` events)
//! while a suite runs; `check()` then asks the planner about each one.
//! PostgreSQL plans with sequential scans switched off and a generic plan,
//! so a scan in its answer means no index can serve the statement, whatever
//! the size of the test's tables. A statement that reads a whole table by
//! design is listed in `WHOLE_TABLE`, with the reason. (SQLite's point
//! reads, which bypass sqlx, run the same text as PostgreSQL's pool reads,
//! so they are planned there.)

use homecell_cell::db::Datastore;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Statements that read a whole table on purpose (matched by a fragment).
const WHOLE_TABLE: &[(&str, &str)] = &[
    ("_migrations", "the migration log, read at start"),
    ("FROM cell_info", "one row per key, read at start"),
    (
        "signing_keys",
        "a handful of keys, loaded at start and on rotation",
    ),
    (
        "DELETE FROM reset_budgets WHERE issue_window",
        "a periodic prune in the background, not a request",
    ),
    (
        "FROM ledger_transfers GROUP BY",
        "`cell audit` sums the whole ledger: an operator's command, not a request",
    ),
    (
        "WHERE saga_role = 'coordinator' AND saga_step = 'post_peer'",
        "`cell audit` lists every transfer in flight between cells",
    ),
    (
        "FROM ledger_transfers t JOIN money_operations o",
        "`cell audit` looks for holds that finished operations left open",
    ),
    (
        "UPDATE ledger_transfers SET amount = 1",
        "the ledger suite's own corruption of the ledger, for the audit to find",
    ),
    (
        "DELETE FROM ledger_transfers",
        "the ledger suite's own corruption of the ledger, for the audit to find",
    ),
    (
        "FROM pending_claims WHERE created_at <",
        "the reconciliation's sweep of claims still unsettled: registrations in flight",
    ),
    ("FROM roles", "the role catalogue, a handful of rows"),
    ("sqlite_master", "SQLite's own schema"),
];

#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<BTreeSet<String>>>);

struct Statement {
    summary: String,
    full: String,
}

impl Visit for Statement {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_string(),
            "db.statement" => self.full = value.trim().to_string(),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" && self.summary.is_empty() {
            self.summary = format!("{value:?}").trim_matches('"').to_string();
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let mut s = Statement {
            summary: String::new(),
            full: String::new(),
        };
        event.record(&mut s);
        let sql = if s.full.is_empty() { s.summary } else { s.full };
        self.0.lock().unwrap().insert(sql);
    }
}

/// Records every statement the process runs from now on. Global, because
/// sqlx runs SQLite's statements on a thread of each connection's own; a
/// test binary's tests share it (nextest gives each test its own process).
pub fn record() -> Recorder {
    static RECORDER: std::sync::OnceLock<Recorder> = std::sync::OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let r = Recorder::default();
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(r.clone()))
                .expect("no other subscriber");
            r
        })
        .clone()
}

fn asks_the_planner(sql: &str) -> bool {
    let s = sql.trim_start().to_ascii_uppercase();
    let planned = ["SELECT", "UPDATE", "DELETE", "WITH", "INSERT"]
        .iter()
        .any(|k| s.starts_with(k));
    // A plain INSERT … VALUES touches no existing row to find.
    let plain_insert = s.starts_with("INSERT") && !s.contains("SELECT");
    planned && !plain_insert && !s.contains(';')
}

fn whole_table(sql: &str) -> bool {
    WHOLE_TABLE.iter().any(|(f, _)| sql.contains(f))
}

/// How many `$n` parameters a statement takes.
fn params(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    for (i, c) in b.iter().enumerate() {
        if *c == b'$' {
            let n: String = b[i + 1..]
                .iter()
                .take_while(|d| d.is_ascii_digit())
                .map(|d| *d as char)
                .collect();
            max = max.max(n.parse().unwrap_or(0));
        }
    }
    max
}

/// The statements `r` saw that scan a table on `db`, with the plan.
async fn scans(db: &Datastore, r: &Recorder) -> Vec<String> {
    let statements: Vec<String> = r.0.lock().unwrap().iter().cloned().collect();
    let mut bad = Vec::new();
    let mut asked = 0;
    match db {
        Datastore::Sqlite(pool, ..) => {
            // `SCAN x` of a subquery's result (a UNION of index searches,
            // say) reads no table.
            let tables: BTreeSet<String> =
                sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                    .fetch_all(pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect();
            for sql in statements
                .iter()
                .filter(|s| asks_the_planner(s) && !whole_table(s))
            {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let mut q =
                    sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(explain));
                for _ in 0..params(sql) {
                    q = q.bind(None::<String>);
                }
                let plan = q
                    .fetch_all(pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                asked += 1;
                // `SCAN t` alone reads every row; `SCAN t USING (COVERING)
                // INDEX` walks an index in order, which a LIMIT bounds.
                let scan = plan.iter().any(|(.., d)| {
                    d.strip_prefix("SCAN ")
                        .is_some_and(|t| !t.contains(" USING ") && tables.contains(t.trim()))
                });
                if scan {
                    let lines: Vec<&str> = plan.iter().map(|(.., d)| d.as_str()).collect();
                    bad.push(format!("{sql}\n    {}", lines.join("\n    ")));
                }
            }
        }
        Datastore::Postgres(pool) => {
            let mut c = pool.acquire().await.unwrap();
            for set in [
                "SET enable_seqscan = off",
                "SET plan_cache_mode = force_generic_plan",
            ] {
                sqlx::query(set).execute(&mut *c).await.unwrap();
            }
            for (i, sql) in statements
                .iter()
                .filter(|s| asks_the_planner(s) && !whole_table(s))
                .enumerate()
            {
                let name = format!("plan_{i}");
                let prepare = format!("PREPARE {name} AS {sql}");
                // PREPARE infers each parameter's type from its use, which
                // a few statements leave open (`THEN $4 ELSE NULL`; sqlx
                // says the type when it runs them). Those are planned on
                // SQLite only, over the same text and the same indexes.
                if sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
                    .execute(&mut *c)
                    .await
                    .is_err()
                {
                    continue;
                }
                let args = vec!["NULL"; params(sql)].join(", ");
                let explain = if args.is_empty() {
                    format!("EXPLAIN EXECUTE {name}")
                } else {
                    format!("EXPLAIN EXECUTE {name}({args})")
                };
                let plan: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(explain))
                    .fetch_all(&mut *c)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                asked += 1;
                if plan.iter().any(|(l,)| l.contains("Seq Scan on")) {
                    let lines: Vec<&str> = plan.iter().map(|(l,)| l.as_str()).collect();
                    bad.push(format!("{sql}\n    {}", lines.join("\n    ")));
                }
            }
        }
    }
    assert!(asked > 0, "no statement was recorded");
    bad
}

/// Fails, listing them, if any statement `r` saw scans a table on `db`.
pub async fn assert_indexed(db: &Datastore, r: &Recorder) {
    let scans = scans(db, r).await;
    assert!(
        scans.is_empty(),
        "statements that scan a table:\n{}",
        scans.join("\n")
    );
}
