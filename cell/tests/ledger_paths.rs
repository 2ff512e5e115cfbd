//! The ledger's two write paths hold to one rule: random sequences of
//! operations (deposits, transfers of one or two moves, holds, posts and
//! voids, some of them wrong, repeats of earlier ids) run through the
//! per-statement path on SQLite and on PostgreSQL and through SQLite's
//! group committer (in batches). Every operation must get the same answer
//! on every path, the balances must end identical, money must be conserved
//! and no wallet may go below zero.

mod stores;

use futures::future::join_all;
use homecell_cell::db::{Datastore, stmt};
use homecell_cell::money::audit::audit;
use homecell_cell::money::group::{GroupCommit, Write};
use homecell_cell::money::ledger::{
    Account, LedgerError, LedgerResult, Move, Operation, Phase, SideEffects,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use stores::Stores;

const NOW: i64 = 1_800_000_000_000;
const USERS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    Deposit {
        to: usize,
        amount: i64,
    },
    /// A transfer, with a second move to another wallet when `fee` > 0:
    /// both land or neither.
    Transfer {
        from: usize,
        to: usize,
        amount: i64,
        fee: i64,
    },
    Hold {
        from: usize,
        to: usize,
        amount: i64,
    },
    /// Resolves the `hold`-th hold seen so far (modulo), with its amount
    /// off by `off` (a wrong resolution when not zero).
    Resolve {
        hold: usize,
        post: bool,
        off: i64,
    },
    /// Sends the `op`-th operation so far again, id and all.
    Repeat {
        op: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let user = 0..USERS;
    // Zero and self-transfers included: the rule refuses them, and a
    // refusal must cost no other write in the same group.
    let amount = 0..120i64;
    prop_oneof![
        2 => (user.clone(), amount.clone()).prop_map(|(to, amount)| Step::Deposit { to, amount }),
        4 => (user.clone(), user.clone(), amount.clone(), prop_oneof![3 => Just(0i64), 1 => 1..20i64])
            .prop_map(|(from, to, amount, fee)| Step::Transfer { from, to, amount, fee }),
        2 => (user.clone(), user, amount).prop_map(|(from, to, amount)| Step::Hold { from, to, amount }),
        2 => (any::<usize>(), any::<bool>(), prop_oneof![4 => Just(0i64), 1 => 1..3i64])
            .prop_map(|(hold, post, off)| Step::Resolve { hold, post, off }),
        1 => any::<usize>().prop_map(|op| Step::Repeat { op }),
    ]
}

fn wallet(u: usize) -> Account {
    Account::wallet(&format!("u{u}"), "CNY")
}

fn op(id: &str, state: &str, amount: i64) -> Operation {
    Operation {
        id: id.into(),
        kind: "transfer".into(),
        actor: "test".into(),
        request_hash: format!("h-{id}"),
        state: state.into(),
        amount,
        currency: "CNY".into(),
        created_at: NOW,
        updated_at: NOW,
        ..Default::default()
    }
}

fn mv(op_id: &str, step: &str, debit: Account, credit: Account, amount: i64) -> Move {
    Move {
        id: format!("{op_id}:{step}"),
        phase: Phase::Single,
        ..Move::single(op_id, debit, credit, amount)
    }
}

/// The operations `steps` stand for, each with its moves.
fn plan(steps: &[Step]) -> Vec<(Operation, Vec<Move>)> {
    let mut ops: Vec<(Operation, Vec<Move>)> = Vec::new();
    let mut holds: Vec<Move> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let id = format!("op{i}");
        let planned = match *s {
            Step::Deposit { to, amount } => {
                let m = mv(
                    &id,
                    "single",
                    Account::system("deposits", "CNY"),
                    wallet(to),
                    amount,
                );
                (op(&id, "posted", amount), vec![m])
            }
            Step::Transfer {
                from,
                to,
                amount,
                fee,
            } => {
                let mut moves = vec![mv(&id, "single", wallet(from), wallet(to), amount)];
                if fee > 0 {
                    moves.push(mv(&id, "fee", wallet(from), wallet(USERS), fee));
                }
                (op(&id, "posted", amount), moves)
            }
            Step::Hold { from, to, amount } => {
                let m = Move {
                    phase: Phase::Pending,
                    ..mv(&id, "hold", wallet(from), wallet(to), amount)
                };
                holds.push(m.clone());
                (op(&id, "pending", amount), vec![m])
            }
            Step::Resolve { hold, post, off } => {
                let Some(h) = (!holds.is_empty()).then(|| holds[hold % holds.len()].clone()) else {
                    continue;
                };
                let m = Move {
                    id: format!("{id}:resolve"),
                    operation_id: id.clone(),
                    phase: if post { Phase::Post } else { Phase::Void },
                    pending_id: Some(h.id.clone()),
                    amount: h.amount + off,
                    ..h
                };
                (op(&id, "posted", m.amount), vec![m])
            }
            Step::Repeat { op } => {
                let Some(earlier) = (!ops.is_empty()).then(|| ops[op % ops.len()].clone()) else {
                    continue;
                };
                earlier
            }
        };
        ops.push(planned);
    }
    ops
}

/// An answer, comparable across paths.
fn outcome(r: LedgerResult<()>) -> Result<&'static str, String> {
    match r {
        Ok(()) => Ok("ok"),
        Err(LedgerError::InsufficientFunds) => Ok("insufficient funds"),
        Err(LedgerError::Overflow) => Ok("overflow"),
        Err(LedgerError::Exists) => Ok("exists"),
        Err(LedgerError::Invariant(_)) => Ok("invariant"),
        Err(LedgerError::Db(e)) => Err(format!("datastore error: {e}")),
    }
}

type Columns = (String, i64, i64, i64, i64);

async fn accounts(db: &Datastore) -> Vec<Columns> {
    let sql = "SELECT id, debits_pending, debits_posted, credits_pending, credits_posted \
               FROM ledger_accounts ORDER BY id";
    stmt(sql).fetch_all(db).await.unwrap()
}

async fn per_statement(
    db: &Datastore,
    ops: &[(Operation, Vec<Move>)],
) -> Vec<Result<&'static str, String>> {
    let mut out = Vec::new();
    for (o, moves) in ops {
        out.push(outcome(
            db.ledger().execute(o, moves, &SideEffects::default()).await,
        ));
    }
    out
}

/// Everything sent at once, in order: the committer takes it in groups.
async fn grouped(
    db: &Datastore,
    ops: &[(Operation, Vec<Move>)],
) -> Vec<Result<&'static str, String>> {
    assert!(db.single_writer(), "group commit is SQLite's");
    let group = GroupCommit::start(db.clone());
    let writes = ops.iter().map(|(o, moves)| {
        group.write(Write::Execute {
            op: Box::new(o.clone()),
            moves: moves.clone(),
            event: None,
        })
    });
    join_all(writes)
        .await
        .into_iter()
        .map(|r| outcome(r.map(|_| ())))
        .collect()
}

async fn sqlite(dir: &tempfile::TempDir, name: &str) -> Datastore {
    let db = Datastore::open(&format!("sqlite:{}", dir.path().join(name).display()))
        .await
        .unwrap();
    db.claim_region("cn-east").await.unwrap();
    db
}

fn conserved_and_never_negative(cols: &[Columns]) -> Result<(), TestCaseError> {
    let sum = |f: fn(&Columns) -> i64| cols.iter().map(f).sum::<i64>();
    prop_assert_eq!(sum(|c| c.2), sum(|c| c.4), "posted debits and credits");
    prop_assert_eq!(sum(|c| c.1), sum(|c| c.3), "pending debits and credits");
    for (id, dpend, dpost, cpend, cpost) in cols {
        prop_assert!(*dpend >= 0 && *cpend >= 0, "{id} has a negative hold");
        if id.starts_with("wallet:") {
            prop_assert!(cpost - dpost - dpend >= 0, "{id} went below zero");
        }
    }
    Ok(())
}

#[test]
fn both_write_paths_keep_one_rule() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = homecell_harness::postgres::TempPostgres::start().unwrap();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(step(), 1..60), |steps| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ops = plan(&steps);
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let one = sqlite(&dir, "statements.db").await;
                let batched = sqlite(&dir, "grouped.db").await;
                let url = pg.create_database(&format!("paths{case}")).unwrap();
                let postgres = Datastore::open(&url).await.unwrap();
                postgres.claim_region("cn-east").await.unwrap();

                let expected = per_statement(&one, &ops).await;
                prop_assert_eq!(&grouped(&batched, &ops).await, &expected, "group commit");
                prop_assert_eq!(&per_statement(&postgres, &ops).await, &expected, "postgres");
                prop_assert!(expected.iter().all(Result::is_ok), "{:?}", expected);

                let balances = accounts(&one).await;
                prop_assert_eq!(&accounts(&batched).await, &balances);
                prop_assert_eq!(&accounts(&postgres).await, &balances);
                conserved_and_never_negative(&balances)?;
                for db in [&one, &batched, &postgres] {
                    let report = audit(std::slice::from_ref(db)).await.unwrap();
                    prop_assert!(report.passed(), "{}", report.render());
                }
                Ok(())
            })
        })
        .unwrap();
}
