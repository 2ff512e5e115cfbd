//! The ledger's behaviour on the datastore, run over SQLite and over a real
//! PostgreSQL server: balances, holds, refusals that write nothing,
//! immutability, concurrency without lost updates or deadlocks, and the
//! audit catching a corrupted balance.

mod plans;
mod stores;

use stores::Stores;

use futures::future::join_all;
use homecell_cell::db::{Datastore, stmt};
use homecell_cell::money::audit::audit;
use homecell_cell::money::ledger::{
    Account, Balance, LedgerError, Move, Operation, Phase, SideEffects, StepUpdate,
};

const NOW: i64 = 1_800_000_000_000;

fn op(id: &str, from: Option<&str>, to: Option<&str>, amount: i64) -> Operation {
    Operation {
        id: id.into(),
        kind: "transfer".into(),
        actor: from.unwrap_or("provider:test").into(),
        request_hash: format!("h-{id}"),
        state: "posted".into(),
        from_user: from.map(String::from),
        to_user: to.map(String::from),
        amount,
        currency: "CNY".into(),
        created_at: NOW,
        updated_at: NOW,
        ..Default::default()
    }
}

fn mv(op: &Operation, step: &str, debit: Account, credit: Account, phase: Phase) -> Move {
    Move {
        id: format!("{}:{step}", op.id),
        operation_id: op.id.clone(),
        debit,
        credit,
        amount: op.amount,
        phase,
        pending_id: matches!(phase, Phase::Post | Phase::Void).then(|| format!("{}:hold", op.id)),
    }
}

fn wallet(u: &str) -> Account {
    Account::wallet(u, "CNY")
}

async fn deposit(db: &Datastore, id: &str, user: &str, amount: i64) {
    let o = op(id, None, Some(user), amount);
    let m = mv(
        &o,
        "single",
        Account::system("deposits", "CNY"),
        wallet(user),
        Phase::Single,
    );
    db.ledger()
        .execute(&o, &[m], &SideEffects::default())
        .await
        .unwrap();
}

async fn transfer(
    db: &Datastore,
    id: &str,
    from: &str,
    to: &str,
    amount: i64,
) -> Result<(), LedgerError> {
    let o = op(id, Some(from), Some(to), amount);
    let m = mv(&o, "single", wallet(from), wallet(to), Phase::Single);
    db.ledger().execute(&o, &[m], &SideEffects::default()).await
}

async fn balance(db: &Datastore, user: &str) -> Balance {
    db.ledger()
        .balances(user)
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap_or(Balance {
            currency: "CNY".into(),
            available: 0,
            pending: 0,
            held: 0,
        })
}

async fn transfers_and_refusals(db: &Datastore) {
    deposit(db, "d1", "alice", 1_000).await;
    transfer(db, "t1", "alice", "bob", 400).await.unwrap();
    assert_eq!(balance(db, "alice").await.available, 600);
    assert_eq!(balance(db, "bob").await.available, 400);

    // Overspending writes nothing: no operation, no balance change.
    let e = transfer(db, "t2", "alice", "bob", 601).await.unwrap_err();
    assert!(matches!(e, LedgerError::InsufficientFunds), "{e:?}");
    assert!(db.ledger().operation("t2").await.unwrap().is_none());
    assert_eq!(balance(db, "alice").await.available, 600);

    // The same id twice is refused as a whole (the caller answers from it).
    let e = transfer(db, "t1", "alice", "bob", 1).await.unwrap_err();
    assert!(matches!(e, LedgerError::Exists), "{e:?}");
    assert_eq!(balance(db, "bob").await.available, 400);

    // A refusal stored for repeats does not move money.
    let mut refused = op("t3", Some("alice"), Some("bob"), 10_000);
    refused.state = "failed".into();
    refused.error_code = Some("insufficient_funds".into());
    let stored = db.ledger().record_refusal(&refused).await.unwrap();
    assert_eq!(stored.state, "failed");
    assert_eq!(db.ledger().record_refusal(&refused).await.unwrap(), stored);

    // Ledger transfers are immutable, whatever the caller tries.
    let edit = match db.backend() {
        "sqlite" => {
            stmt("UPDATE ledger_transfers SET amount = 1")
                .execute(db)
                .await
        }
        _ => stmt("DELETE FROM ledger_transfers").execute(db).await,
    };
    assert!(edit.is_err(), "a ledger transfer was edited");

    let page = db
        .ledger()
        .history(
            "alice",
            &homecell_cell::money::ledger::HistoryFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ids: Vec<&str> = page.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&"t1") && ids.contains(&"d1") && ids.contains(&"t3"));
}

async fn holds(db: &Datastore) {
    deposit(db, "d-h", "carol", 500).await;
    let mut o = op("x1", Some("carol"), Some("remote"), 300);
    o.state = "pending".into();
    o.saga_role = Some("coordinator".into());
    o.saga_step = Some("hold_peer".into());
    o.peer_region = Some("eu-west".into());
    let clearing = Account::clearing("eu-west", "CNY");
    let hold = mv(
        &o,
        "hold",
        wallet("carol"),
        clearing.clone(),
        Phase::Pending,
    );
    db.ledger()
        .execute(&o, &[hold], &SideEffects::default())
        .await
        .unwrap();
    let b = balance(db, "carol").await;
    assert_eq!((b.available, b.held), (200, 300));
    // Held money cannot be spent twice.
    assert!(matches!(
        transfer(db, "x2", "carol", "bob", 201).await,
        Err(LedgerError::InsufficientFunds)
    ));

    // The step moves only from where the caller saw it.
    let to = StepUpdate {
        state: "pending",
        saga_step: Some("post_peer"),
        ..Default::default()
    };
    let post = mv(&o, "post", wallet("carol"), clearing.clone(), Phase::Post);
    let from = ("pending", Some("hold_peer"));
    let side = SideEffects::default();
    assert!(
        db.ledger()
            .advance("x1", from, &to, std::slice::from_ref(&post), &side, NOW)
            .await
            .unwrap()
    );
    assert!(
        !db.ledger()
            .advance("x1", from, &to, &[post], &side, NOW)
            .await
            .unwrap()
    );
    let b = balance(db, "carol").await;
    assert_eq!((b.available, b.held), (200, 0));

    // A hold resolves once: a void after the post is refused.
    let void = mv(&o, "void", wallet("carol"), clearing, Phase::Void);
    let to = StepUpdate {
        state: "pending",
        saga_step: Some("post_peer"),
        ..Default::default()
    };
    let again = db
        .ledger()
        .advance(
            "x1",
            ("pending", Some("post_peer")),
            &to,
            &[void],
            &side,
            NOW,
        )
        .await;
    assert!(again.is_err(), "{again:?}");
    assert_eq!(balance(db, "carol").await.available, 200);
}

async fn concurrency(db: &Datastore) {
    // Many senders to one hot receiver.
    for i in 0..16 {
        deposit(db, &format!("hot-d{i}"), &format!("s{i}"), 100).await;
    }
    let sends =
        (0..16).flat_map(|i| (0..5).map(move |j| (format!("hot-{i}-{j}"), format!("s{i}"))));
    let results =
        join_all(sends.map(|(id, from)| async move { transfer(db, &id, &from, "hot", 20).await }))
            .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(balance(db, "hot").await.available, 16 * 100);

    // Both directions at once: no deadlock, nothing lost.
    deposit(db, "bd-a", "ping", 1_000).await;
    deposit(db, "bd-b", "pong", 1_000).await;
    let both = (0..40).map(|i| async move {
        let (from, to) = if i % 2 == 0 {
            ("ping", "pong")
        } else {
            ("pong", "ping")
        };
        transfer(db, &format!("bd-{i}"), from, to, 7).await
    });
    let results = join_all(both).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        balance(db, "ping").await.available + balance(db, "pong").await.available,
        2_000
    );

    // A storm of spends against one balance: exactly what it covers.
    deposit(db, "storm-d", "spender", 100).await;
    let storm =
        join_all((0..25).map(|i| async move {
            transfer(db, &format!("storm-{i}"), "spender", "bob", 10).await
        }))
        .await;
    assert_eq!(storm.iter().filter(|r| r.is_ok()).count(), 10);
    assert!(
        storm
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, LedgerError::InsufficientFunds))
    );
    assert_eq!(balance(db, "spender").await.available, 0);
}

async fn audit_catches_corruption(db: &Datastore) {
    let report = audit(std::slice::from_ref(db)).await.unwrap();
    assert!(report.passed(), "{}", report.render());
    stmt("UPDATE ledger_accounts SET credits_posted = credits_posted + 1 WHERE id = 'wallet:bob:CNY'")
        .execute(db)
        .await
        .unwrap();
    let report = audit(std::slice::from_ref(db)).await.unwrap();
    assert!(!report.passed(), "created money went unnoticed");
    assert!(
        report.render().contains("wallet:bob:CNY"),
        "{}",
        report.render()
    );
}

async fn suite(db: Datastore) {
    db.claim_region("cn-east").await.unwrap();
    transfers_and_refusals(&db).await;
    holds(&db).await;
    concurrency(&db).await;
    audit_catches_corruption(&db).await;
}

#[tokio::test]
async fn ledger_suite_on_sqlite() {
    let statements = plans::record();
    let dir = tempfile::tempdir().unwrap();
    let db = Datastore::open(&format!("sqlite:{}", dir.path().join("cell.db").display()))
        .await
        .unwrap();
    suite(db.clone()).await;
    plans::assert_indexed(&db, &statements).await;
}

#[tokio::test]
async fn ledger_suite_on_postgres() {
    let statements = plans::record();
    let pg = homecell_harness::postgres::TempPostgres::start().unwrap();
    let url = pg.create_database("ledger").unwrap();
    let db = Datastore::open(&url).await.unwrap();
    suite(db.clone()).await;
    plans::assert_indexed(&db, &statements).await;
}

/// SQLite's group commit applies the same rules in memory: run the same
/// races through it, plus races inside one batch.
#[tokio::test]
async fn group_commit_keeps_the_rules() {
    use homecell_cell::money::group::{GroupCommit, Step, Write};
    let dir = tempfile::tempdir().unwrap();
    let db = Datastore::open(&format!("sqlite:{}", dir.path().join("cell.db").display()))
        .await
        .unwrap();
    db.claim_region("cn-east").await.unwrap();
    let g = GroupCommit::start(db.clone());
    let exec = |o: Operation, moves: Vec<Move>| {
        let g = g.clone();
        async move {
            g.write(Write::Execute {
                op: Box::new(o),
                moves,
                event: None,
            })
            .await
        }
    };
    let send = |id: String, from: &str, to: &str, amount: i64| {
        let o = op(&id, Some(from), Some(to), amount);
        let m = mv(&o, "single", wallet(from), wallet(to), Phase::Single);
        exec(o, vec![m])
    };
    let seed = op("g-seed", None, Some("spender"), 100);
    let m = mv(
        &seed,
        "single",
        Account::system("deposits", "CNY"),
        wallet("spender"),
        Phase::Single,
    );
    exec(seed, vec![m]).await.unwrap();

    // 25 spends of 10 against 100, all in flight at once: exactly 10 land.
    let storm = join_all((0..25).map(|i| send(format!("g-{i}"), "spender", "bob", 10))).await;
    assert_eq!(storm.iter().filter(|r| r.is_ok()).count(), 10, "{storm:?}");
    assert!(
        storm
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, LedgerError::InsufficientFunds))
    );
    // The same id twice at once: one write, one Exists.
    let twice = join_all((0..2).map(|_| send("g-dup".into(), "bob", "carol", 1))).await;
    assert_eq!(twice.iter().filter(|r| r.is_ok()).count(), 1, "{twice:?}");
    assert_eq!(balance(&db, "bob").await.available, 99);
    assert_eq!(balance(&db, "carol").await.available, 1);

    // A hold, then two racing steps from the same state: one moves it.
    let mut h = op("g-hold", Some("bob"), Some("remote"), 50);
    h.state = "pending".into();
    h.saga_step = Some("hold_peer".into());
    let clearing = Account::clearing("eu-west", "CNY");
    let hold = mv(&h, "hold", wallet("bob"), clearing.clone(), Phase::Pending);
    exec(h.clone(), vec![hold]).await.unwrap();
    assert_eq!(balance(&db, "bob").await.held, 50);
    let post = mv(&h, "post", wallet("bob"), clearing, Phase::Post);
    let step = || {
        let g = g.clone();
        let post = post.clone();
        async move {
            g.write(Write::Advance {
                id: "g-hold".into(),
                from: ("pending".into(), Some("hold_peer".into())),
                to: Step {
                    state: "pending".into(),
                    saga_step: Some("post_peer".into()),
                    ..Default::default()
                },
                moves: vec![post],
                event: None,
                now: NOW,
            })
            .await
        }
    };
    let moved = join_all([step(), step()]).await;
    let moved: Vec<bool> = moved.into_iter().map(Result::unwrap).collect();
    assert_eq!(moved.iter().filter(|m| **m).count(), 1, "{moved:?}");
    let b = balance(&db, "bob").await;
    assert_eq!((b.available, b.held), (49, 0));
    assert_eq!(
        db.ledger()
            .operation("g-hold")
            .await
            .unwrap()
            .unwrap()
            .saga_step
            .as_deref(),
        Some("post_peer")
    );
    let report = audit(std::slice::from_ref(&db)).await.unwrap();
    assert!(report.passed(), "{}", report.render());
}
