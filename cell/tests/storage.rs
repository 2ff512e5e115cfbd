//! One behavioural suite for the cell's datastore, run over SQLite and over a
//! real PostgreSQL server (a private one started for the test).
//!
//! Why one file of this length: it is one suite, run whole over each backend
//! (the two tests at the end), so every behaviour is proven on SQLite and
//! PostgreSQL alike.

mod plans;
mod stores;

use stores::Stores;

use futures::future::join_all;
use homecell_cell::db::audit::AuditEntry;
use homecell_cell::db::{Datastore, DbError};
use homecell_cell::identity::store::{
    Address, NewProof, NewUser, RefreshOutcome, ResetLimits, RoleRow, Rotation, Session,
    reset_budget_key_of_user,
};

const NOW: i64 = 1_800_000_000_000;

async fn user(db: &Datastore, id: &str, ident: &str) {
    db.identity()
        .create_user(&NewUser {
            id,
            display_name: id,
            kind: "email",
            value: ident,
            password_hash: "h",
            now: NOW,
        })
        .await
        .unwrap();
}

/// Whether session `sid` of `user` lives, as the session check sees it;
/// the own-profile read, which makes the same check in its statement, must
/// agree, and answer with the profile `profile` reads.
async fn alive(db: &Datastore, sid: &str, user: &str, now: i64) -> bool {
    let live = db.identity().session_alive(sid, user, now).await.unwrap();
    let own = db
        .identity()
        .profile_in_session(user, sid, now)
        .await
        .unwrap();
    assert_eq!(own.is_some(), live, "session {sid} of {user}");
    if let Some(own) = own {
        let p = db.identity().profile(user).await.unwrap().unwrap();
        assert_eq!(
            (own.user.id, own.user.version, own.roles, own.identifiers),
            (p.user.id, p.user.version, p.roles, p.identifiers)
        );
    }
    live
}

fn session(id: &str, user: &str, ct: &str) -> Session {
    Session {
        id: id.into(),
        user_id: user.into(),
        client_type: ct.into(),
        created_at: NOW,
        last_used_at: NOW,
        expires_at: NOW + 3_600_000,
        revoked_at: None,
    }
}

async fn users_and_identifiers(db: &Datastore) {
    user(db, "u1", "a@x.io").await;
    let dup = db
        .identity()
        .create_user(&NewUser {
            id: "u2",
            display_name: "b",
            kind: "email",
            value: "a@x.io",
            password_hash: "h",
            now: NOW,
        })
        .await;
    assert!(matches!(dup, Err(DbError::Conflict)), "{dup:?}");
    // The failed registration left nothing behind.
    assert!(db.identity().user("u2").await.unwrap().is_none());
    assert_eq!(
        db.identity()
            .user_by_identifier("email", "a@x.io")
            .await
            .unwrap()
            .as_deref(),
        Some("u1")
    );
    assert_eq!(db.identity().roles_of("u1").await.unwrap(), vec!["user"]);
    // Injection-shaped values are data, nothing more.
    user(db, "u3", "x'); DROP TABLE users;--@x.io").await;
    assert!(db.identity().user("u1").await.unwrap().is_some());
}

async fn lockout_is_atomic_and_always_settled(db: &Datastore) {
    user(db, "lk", "lk@x.io").await;
    let lock = NOW + 900_000;
    let identity = db.identity();
    let reserved = join_all((0..20).map(|_| identity.reserve_attempt("lk", 5, lock, NOW))).await;
    let granted = reserved
        .into_iter()
        .filter(|r| matches!(r, Ok(Some(_))))
        .count();
    assert_eq!(granted, 5, "a storm got more checks than the limit");
    // The fifth reservation locked the account before its check ran, so
    // no path after it (an error, a dropped request) can leave the counter
    // at the limit with no lock: that would be locked for good.
    assert_eq!(
        db.identity()
            .reserve_attempt("lk", 5, lock, NOW + 1)
            .await
            .unwrap(),
        None
    );
    // After the lock expires, counting starts again.
    assert_eq!(
        db.identity()
            .reserve_attempt("lk", 5, NOW + 1_800_000, NOW + 900_001)
            .await
            .unwrap(),
        Some(1)
    );
    db.identity().clear_attempts("lk").await.unwrap();
    assert_eq!(
        db.identity()
            .reserve_attempt("lk", 5, lock, NOW + 2)
            .await
            .unwrap(),
        Some(1)
    );
    // A check that never ran (argon2 busy) gives its attempt back, and the
    // lock that attempt set.
    for n in 2..=5 {
        assert_eq!(
            db.identity()
                .reserve_attempt("lk", 5, lock, NOW + 3)
                .await
                .unwrap(),
            Some(n)
        );
    }
    assert_eq!(
        db.identity()
            .reserve_attempt("lk", 5, lock, NOW + 4)
            .await
            .unwrap(),
        None
    );
    db.identity().refund_attempt("lk", 5).await.unwrap();
    assert_eq!(
        db.identity()
            .reserve_attempt("lk", 5, lock, NOW + 5)
            .await
            .unwrap(),
        Some(5)
    );
    // A counter at the limit with no lock in force (a row written before
    // locks were set on reservation, or a lowered limit) counts as expired.
    db.identity().clear_attempts("lk").await.unwrap();
    for n in 1..=3 {
        assert_eq!(
            db.identity()
                .reserve_attempt("lk", 5, lock, NOW + 6)
                .await
                .unwrap(),
            Some(n)
        );
    }
    assert_eq!(
        db.identity()
            .reserve_attempt("lk", 3, lock, NOW + 7)
            .await
            .unwrap(),
        Some(1)
    );
}

/// A rotation of `old` to `new` at `now`, with `new`'s salt named after it.
async fn rot(db: &Datastore, old: &str, new: &str, now: i64) -> Result<RefreshOutcome, DbError> {
    let salt = format!("salt-{new}");
    db.identity()
        .rotate_refresh(&Rotation {
            old_hash: old,
            new_hash: new,
            salt: &salt,
            now,
            grace_ms: 30_000,
        })
        .await
}

async fn one_session_per_client_type(db: &Datastore) {
    user(db, "s", "s@x.io").await;
    assert_eq!(
        db.identity()
            .open_session(&session("s1", "s", "app"), "r1")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        db.identity()
            .open_session(&session("s2", "s", "web"), "r2")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        db.identity()
            .open_session(&session("s3", "s", "app"), "r3")
            .await
            .unwrap()
            .as_deref(),
        Some("s1")
    );
    assert!(!alive(db, "s1", "s", NOW).await);
    assert!(alive(db, "s2", "s", NOW).await);
    assert!(alive(db, "s3", "s", NOW).await);
    assert!(!alive(db, "s3", "someone-else", NOW).await);
    assert!(!alive(db, "s3", "s", NOW + 3_600_000).await, "expired");
    assert_eq!(db.identity().sessions_of("s", NOW).await.unwrap().len(), 2);
    // Concurrent logins on one client type leave exactly one active session.
    let opened = join_all((0..8).map(|i| {
        let s = session(&format!("c{i}"), "s", "mp");
        let h = format!("rc{i}");
        async move { db.identity().open_session(&s, &h).await }
    }))
    .await;
    assert!(opened.iter().any(|r| r.is_ok()));
    let mp = db
        .identity()
        .sessions_of("s", NOW)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.client_type == "mp")
        .count();
    assert_eq!(mp, 1);
    assert_eq!(
        db.identity()
            .revoke_other_sessions("s", "s3", NOW)
            .await
            .unwrap(),
        2
    );
}

async fn refresh_rotation_and_reuse(db: &Datastore) {
    user(db, "r", "r@x.io").await;
    db.identity()
        .open_session(&session("rs", "r", "app"), "t0")
        .await
        .unwrap();
    assert!(
        matches!(rot(db, "t0", "t1", NOW).await.unwrap(), RefreshOutcome::Rotated(s) if s.id == "rs")
    );
    assert!(matches!(
        rot(db, "t1", "t2", NOW).await.unwrap(),
        RefreshOutcome::Rotated(_)
    ));
    // t0 again, two rotations back: reuse revokes the whole session.
    assert!(matches!(
        rot(db, "t0", "tx", NOW).await.unwrap(),
        RefreshOutcome::Reused
    ));
    assert!(!alive(db, "rs", "r", NOW).await);
    assert!(matches!(
        rot(db, "t2", "t3", NOW).await.unwrap(),
        RefreshOutcome::Invalid
    ));
    assert!(matches!(
        rot(db, "nope", "t4", NOW).await.unwrap(),
        RefreshOutcome::Invalid
    ));
    // Concurrent uses of one token: one rotation; the others are repeats
    // that name the same successor (its salt).
    db.identity()
        .open_session(&session("rs2", "r", "web"), "u0")
        .await
        .unwrap();
    let outcomes = join_all((0..4).map(|i| {
        let next = format!("u{}", i + 1);
        async move { rot(db, "u0", &next, NOW).await }
    }))
    .await;
    let rotated: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(RefreshOutcome::Rotated(_)) => Some(String::new()),
            _ => None,
        })
        .collect();
    assert_eq!(rotated.len(), 1, "one token must rotate exactly once");
    let repeats: std::collections::BTreeSet<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(RefreshOutcome::Repeated(s, salt)) if s.id == "rs2" => Some(salt.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        repeats.len(),
        1,
        "every repeat names the one successor: {outcomes:?}"
    );
    assert!(alive(db, "rs2", "r", NOW).await);

    // A lost answer: the token comes again within the grace window and
    // gets its successor again; the session lives on.
    user(db, "g", "g@x.io").await;
    db.identity()
        .open_session(&session("gs", "g", "app"), "g0")
        .await
        .unwrap();
    assert!(matches!(
        rot(db, "g0", "g1", NOW).await.unwrap(),
        RefreshOutcome::Rotated(_)
    ));
    assert!(matches!(
        rot(db, "g0", "g1-retry", NOW + 29_000).await.unwrap(),
        RefreshOutcome::Repeated(s, salt) if s.id == "gs" && salt == "salt-g1"
    ));
    assert!(alive(db, "gs", "g", NOW + 29_000).await);
    // Once the successor is used, the predecessor is plain reuse.
    assert!(matches!(
        rot(db, "g1", "g2", NOW + 29_500).await.unwrap(),
        RefreshOutcome::Rotated(_)
    ));
    assert!(matches!(
        rot(db, "g1", "g2-retry", NOW + 29_600).await.unwrap(),
        RefreshOutcome::Repeated(..)
    ));
    assert!(matches!(
        rot(db, "g0", "g0-late", NOW + 29_700).await.unwrap(),
        RefreshOutcome::Reused
    ));
    assert!(!alive(db, "gs", "g", NOW + 29_800).await);
    // Past the grace window, a repeat is reuse.
    db.identity()
        .open_session(&session("hs", "g", "web"), "h0")
        .await
        .unwrap();
    assert!(matches!(
        rot(db, "h0", "h1", NOW).await.unwrap(),
        RefreshOutcome::Rotated(_)
    ));
    assert!(matches!(
        rot(db, "h0", "h1-late", NOW + 30_000).await.unwrap(),
        RefreshOutcome::Reused
    ));
    assert!(!alive(db, "hs", "g", NOW + 30_001).await);

    // Rotations that fail and succeed side by side (on SQLite they may
    // share a batched commit; db::batch's tests force one): the failure
    // undoes only its own statements.
    user(db, "f", "f@x.io").await;
    for (sid, ct, token) in [("fa", "app", "a0"), ("fb", "web", "b0"), ("fc", "mp", "c0")] {
        db.identity()
            .open_session(&session(sid, "f", ct), token)
            .await
            .unwrap();
    }
    let (clash, fine) = futures::join!(
        rot(db, "a0", "c0", NOW), // the successor's hash exists
        rot(db, "b0", "b1", NOW),
    );
    assert!(matches!(clash, Err(DbError::Conflict)), "{clash:?}");
    assert!(matches!(fine, Ok(RefreshOutcome::Rotated(s)) if s.id == "fb"));
    assert!(
        matches!(rot(db, "a0", "a1", NOW).await.unwrap(), RefreshOutcome::Rotated(s) if s.id == "fa"),
        "the failed rotation must leave its token unused"
    );
    assert!(alive(db, "fa", "f", NOW).await);
}

async fn password_resets(db: &Datastore) {
    user(db, "pr", "pr@x.io").await;
    db.identity()
        .create_reset("reset1", "pr", "hash1", NOW + 900_000, "{}", NOW)
        .await
        .unwrap();
    db.identity()
        .create_reset("reset2", "pr", "hash2", NOW + 900_000, "{}", NOW + 1)
        .await
        .unwrap();
    assert_eq!(
        db.identity()
            .outbox_pending("auth.password_reset", 10)
            .await
            .unwrap()
            .len(),
        2
    );
    // A newer code replaces the older one; each guess is reserved before
    // the code is compared, five per code however many race.
    let identity = db.identity();
    let guesses = join_all((0..12).map(|_| identity.reserve_reset_guess("pr", 5, NOW + 2))).await;
    let granted: Vec<_> = guesses.into_iter().filter_map(|g| g.unwrap()).collect();
    assert_eq!(
        granted.len(),
        5,
        "a storm got more guesses than a code allows"
    );
    assert!(
        granted
            .iter()
            .all(|(id, hash)| (id.as_str(), hash.as_str()) == ("reset2", "hash2"))
    );
    assert!(
        db.identity()
            .reserve_reset_guess("pr", 5, NOW + 3)
            .await
            .unwrap()
            .is_none()
    );
    db.identity()
        .create_reset("reset3", "pr", "hash3", NOW + 900_000, "{}", NOW + 5)
        .await
        .unwrap();
    db.identity()
        .open_session(&session("prs", "pr", "app"), "prt")
        .await
        .unwrap();
    // The right guess is not a failure: completing gives it back.
    let one = ResetLimits {
        codes_per_hour: 1,
        failures_per_day: 1,
    };
    let budget = reset_budget_key_of_user("pr");
    assert!(
        db.identity()
            .spend_reset_guess(&budget, one, NOW + 5)
            .await
            .unwrap()
            .is_ok()
    );
    assert!(
        db.identity()
            .spend_reset_guess(&budget, one, NOW + 5)
            .await
            .unwrap()
            .is_err()
    );
    assert!(
        db.identity()
            .complete_reset("reset3", "pr", "newhash", NOW + 6)
            .await
            .unwrap()
    );
    assert!(
        db.identity()
            .spend_reset_guess(&budget, one, NOW + 6)
            .await
            .unwrap()
            .is_ok()
    );
    assert!(
        !db.identity()
            .complete_reset("reset3", "pr", "other", NOW + 7)
            .await
            .unwrap(),
        "single use"
    );
    assert_eq!(
        db.identity().password_hash("pr").await.unwrap().as_deref(),
        Some("newhash")
    );
    assert!(!alive(db, "prs", "pr", NOW + 8).await);
    assert!(
        db.identity()
            .reserve_reset_guess("pr", 5, NOW + 9)
            .await
            .unwrap()
            .is_none()
    );
    db.identity()
        .create_reset("reset4", "pr", "hash4", NOW + 900_000, "{}", NOW + 10)
        .await
        .unwrap();
    assert!(
        db.identity()
            .reserve_reset_guess("pr", 5, NOW + 900_001)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
}

async fn pending_claims(db: &Datastore) {
    let pending = || async {
        db.identity()
            .unsettled_claims(NOW + 1)
            .await
            .unwrap()
            .into_iter()
            .map(|u| (u.identifier, u.user_id, u.state))
            .collect::<Vec<(String, String, String)>>()
    };
    // A claim is recorded before it is made; the user's creation settles it.
    db.identity()
        .record_claim("email:pc1@x.io", "pc1", None, NOW)
        .await
        .unwrap();
    assert_eq!(pending().await.len(), 1);
    user(db, "pc1", "pc1@x.io").await;
    assert!(pending().await.is_empty(), "settled with the user");
    // Once the reconciliation takes a record over, the registration it
    // belonged to can no longer create its user.
    db.identity()
        .record_claim("email:pc2@x.io", "pc2", None, NOW)
        .await
        .unwrap();
    assert!(
        db.identity()
            .begin_release("email:pc2@x.io", "pc2")
            .await
            .unwrap()
    );
    let late = db
        .identity()
        .create_user(&NewUser {
            id: "pc2",
            display_name: "pc2",
            kind: "email",
            value: "pc2@x.io",
            password_hash: "h",
            now: NOW,
        })
        .await;
    assert!(matches!(late, Err(DbError::Conflict)), "{late:?}");
    assert!(db.identity().user("pc2").await.unwrap().is_none());
    assert_eq!(
        pending().await,
        vec![("email:pc2@x.io".into(), "pc2".into(), "releasing".into())]
    );
    db.identity()
        .forget_claim("email:pc2@x.io", "pc2")
        .await
        .unwrap();
    assert!(pending().await.is_empty());
    assert!(
        !db.identity()
            .begin_release("email:pc2@x.io", "pc2")
            .await
            .unwrap()
    );
    // Only records older than the cut-off are unsettled.
    db.identity()
        .record_claim("email:pc3@x.io", "pc3", None, NOW + 5)
        .await
        .unwrap();
    assert!(pending().await.is_empty());
    assert_eq!(
        db.identity().unsettled_claims(NOW + 6).await.unwrap().len(),
        1
    );
    db.identity()
        .forget_claim("email:pc3@x.io", "pc3")
        .await
        .unwrap();
    // Deleting an account records its releases in the same transaction.
    user(db, "pc4", "pc4@x.io").await;
    db.identity()
        .anonymise_user("pc4", "deleted-pc4", NOW, None, true)
        .await
        .unwrap();
    assert_eq!(
        pending().await,
        vec![("email:pc4@x.io".into(), "pc4".into(), "releasing".into())]
    );
    db.identity()
        .forget_claim("email:pc4@x.io", "pc4")
        .await
        .unwrap();
}

async fn reset_budgets(db: &Datastore) {
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;
    let limits = ResetLimits {
        codes_per_hour: 3,
        failures_per_day: 4,
    };
    for _ in 0..3 {
        assert!(
            db.identity()
                .spend_reset_issue("user:b", limits, NOW)
                .await
                .unwrap()
                .is_ok()
        );
    }
    assert_eq!(
        db.identity()
            .spend_reset_issue("user:b", limits, NOW + 1000)
            .await
            .unwrap(),
        Err(HOUR - 1000),
        "the hour's codes are spent"
    );
    assert!(
        db.identity()
            .spend_reset_issue("user:b", limits, NOW + HOUR)
            .await
            .unwrap()
            .is_ok()
    );
    // Wrong guesses, however many race, stop at the day's budget, which
    // then refuses new codes as well.
    let identity = db.identity();
    let spent = join_all((0..10).map(|_| identity.spend_reset_guess("id:g", limits, NOW))).await;
    assert_eq!(spent.iter().filter(|r| matches!(r, Ok(Ok(())))).count(), 4);
    assert_eq!(
        db.identity()
            .spend_reset_guess("id:g", limits, NOW + 5000)
            .await
            .unwrap(),
        Err(DAY - 5000)
    );
    assert_eq!(
        db.identity()
            .spend_reset_issue("id:g", limits, NOW + 6000)
            .await
            .unwrap(),
        Err(DAY - 6000)
    );
    assert!(
        db.identity()
            .spend_reset_guess("id:g", limits, NOW + DAY)
            .await
            .unwrap()
            .is_ok()
    );
    assert!(
        db.identity()
            .spend_reset_guess("id:other", limits, NOW)
            .await
            .unwrap()
            .is_ok()
    );
    // Budgets whose windows have passed are dropped.
    assert!(
        db.identity()
            .prune_reset_budgets(NOW + 3 * DAY)
            .await
            .unwrap()
            >= 3
    );
    assert!(
        db.identity()
            .spend_reset_issue("user:b", limits, NOW + 3 * DAY)
            .await
            .unwrap()
            .is_ok()
    );
}

fn address(id: &str, default: bool) -> Address {
    Address {
        id: id.into(),
        label: None,
        recipient: "R".into(),
        phone: None,
        line1: "1 Road".into(),
        line2: None,
        city: "C".into(),
        state: None,
        postal_code: None,
        country: "CN".into(),
        is_default: default,
        created_at: NOW,
        updated_at: NOW,
    }
}

async fn addresses(db: &Datastore) {
    user(db, "ad", "ad@x.io").await;
    assert!(
        db.identity()
            .add_address("ad", &address("a1", false), 2)
            .await
            .unwrap()
    );
    assert!(
        db.identity()
            .add_address("ad", &address("a2", true), 2)
            .await
            .unwrap()
    );
    assert!(
        !db.identity()
            .add_address("ad", &address("a3", false), 2)
            .await
            .unwrap(),
        "limit"
    );
    let all = db.identity().addresses("ad").await.unwrap();
    assert_eq!(
        all.iter()
            .filter(|a| a.is_default)
            .map(|a| a.id.as_str())
            .collect::<Vec<_>>(),
        vec!["a2"]
    );
    assert!(
        db.identity()
            .set_default_address("ad", "a1", NOW)
            .await
            .unwrap()
    );
    let all = db.identity().addresses("ad").await.unwrap();
    assert_eq!(all.iter().filter(|a| a.is_default).count(), 1);
    assert!(all.iter().find(|a| a.id == "a1").unwrap().is_default);
    // An update of an address that is not the user's changes nothing, not
    // even the default it asked for.
    assert!(
        !db.identity()
            .update_address("ad", &address("nope", true))
            .await
            .unwrap()
    );
    assert!(
        !db.identity()
            .update_address("someone-else", &address("a2", true))
            .await
            .unwrap()
    );
    let after = db.identity().addresses("ad").await.unwrap();
    assert_eq!(after, all);
    assert!(
        !db.identity()
            .delete_address("someone-else", "a1")
            .await
            .unwrap()
    );
    assert!(db.identity().delete_address("ad", "a1").await.unwrap());
}

async fn roles_audit_and_anonymisation(db: &Datastore) {
    user(db, "adm", "adm@x.io").await;
    assert!(
        !db.identity()
            .has_permission("adm", "role:assign")
            .await
            .unwrap()
    );
    let audit = |action: &'static str| AuditEntry {
        at: NOW,
        actor: "t",
        action,
        target: Some("adm"),
        details: "{}".into(),
    };
    assert!(
        db.identity()
            .set_role("adm", "admin", true, &audit("role.grant"))
            .await
            .unwrap()
    );
    assert!(
        !db.identity()
            .set_role("adm", "admin", true, &audit("role.grant"))
            .await
            .unwrap(),
        "idempotent"
    );
    assert!(
        db.identity()
            .has_permission("adm", "role:assign")
            .await
            .unwrap()
    );
    // The cell's last active admin keeps the role.
    assert!(
        !db.identity()
            .set_role("adm", "admin", false, &audit("role.revoke"))
            .await
            .unwrap()
    );
    assert!(
        db.identity()
            .has_permission("adm", "role:assign")
            .await
            .unwrap()
    );
    user(db, "adm-b", "adm-b@x.io").await;
    assert!(
        db.identity()
            .set_role("adm-b", "admin", true, &audit("role.grant"))
            .await
            .unwrap()
    );
    assert!(
        db.identity()
            .set_role("adm", "admin", false, &audit("role.revoke"))
            .await
            .unwrap()
    );
    assert!(
        !db.identity()
            .has_permission("adm", "role:assign")
            .await
            .unwrap()
    );
    let log = db.audit_log(None, 10).await.unwrap();
    assert_eq!(log.len(), 3, "only real changes are audited");
    let page = db
        .audit_log(Some((log[0].at, log[0].id.clone())), 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 2);

    db.identity()
        .open_session(&session("anon-s", "adm", "app"), "anon-t")
        .await
        .unwrap();
    db.identity()
        .add_address("adm", &address("anon-a", true), 5)
        .await
        .unwrap();
    let ids = db
        .identity()
        .anonymise_user("adm", "deleted-xyz", NOW, None, true)
        .await
        .unwrap();
    assert_eq!(ids, vec![("email".to_string(), "adm@x.io".to_string())]);
    let u = db.identity().user("adm").await.unwrap().unwrap();
    assert_eq!(
        (u.status.as_str(), u.display_name.as_str()),
        ("deleted", "deleted-xyz")
    );
    assert!(
        db.identity()
            .user_by_identifier("email", "adm@x.io")
            .await
            .unwrap()
            .is_none()
    );
    assert!(db.identity().addresses("adm").await.unwrap().is_empty());
    assert!(db.identity().password_hash("adm").await.unwrap().is_none());
    assert!(!alive(db, "anon-s", "adm", NOW).await);
    // The identifier can be registered again.
    user(db, "adm2", "adm@x.io").await;
}

async fn listing_and_profiles(db: &Datastore) {
    for i in 0..5 {
        db.identity()
            .create_user(&NewUser {
                id: &format!("l{i}"),
                display_name: &format!("Lister {i}"),
                kind: "username",
                value: &format!("lister{i}"),
                password_hash: "h",
                now: NOW + i,
            })
            .await
            .unwrap();
    }
    let first = db
        .identity()
        .list_users(None, Some("Lister"), 3)
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|u| u.0.id.as_str()).collect::<Vec<_>>(),
        vec!["l0", "l1", "l2"]
    );
    let last = &first.last().unwrap().0;
    let next = db
        .identity()
        .list_users(Some((last.created_at, last.id.clone())), Some("Lister"), 3)
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|u| u.0.id.as_str()).collect::<Vec<_>>(),
        vec!["l3", "l4"]
    );
    assert_eq!(
        db.identity()
            .list_users(None, Some("lister3"), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        db.identity()
            .list_users(None, Some("%"), 10)
            .await
            .unwrap()
            .is_empty(),
        "wildcards are literal"
    );

    let fields = homecell_cell::identity::store::ProfileFields {
        display_name: "New",
        locale: Some("en"),
        bio: None,
        avatar_url: None,
    };
    let u = db
        .identity()
        .update_profile("l0", 1, &fields, NOW + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((u.version, u.display_name.as_str()), (2, "New"));
    assert!(
        db.identity()
            .update_profile("l0", 1, &fields, NOW + 11)
            .await
            .unwrap()
            .is_none(),
        "stale version"
    );
    // The profile read: the row as updated, roles and identifiers in
    // order, empty lists as empty.
    let p = db.identity().profile("l0").await.unwrap().unwrap();
    assert_eq!(p.user, u);
    assert_eq!(p.roles, vec!["user"]);
    assert_eq!(
        p.identifiers,
        vec![("username".to_string(), "lister0".to_string())]
    );
    let audit = |action: &'static str| AuditEntry {
        at: NOW,
        actor: "t",
        action,
        target: Some("l0"),
        details: "{}".into(),
    };
    db.identity()
        .set_role("l0", "admin", true, &audit("role.grant"))
        .await
        .unwrap();
    let p = db.identity().profile("l0").await.unwrap().unwrap();
    assert_eq!(p.roles, vec!["admin", "user"]);
    // The listing carries each user's roles, in order, in its one statement
    // (l0 is found by its identifier: its display name changed above).
    let roles_listed = |q: &'static str| async move {
        let page = db.identity().list_users(None, Some(q), 1).await.unwrap();
        page.into_iter()
            .map(|(u, roles)| (u.id, roles))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        roles_listed("lister0").await,
        vec![(
            "l0".to_string(),
            vec!["admin".to_string(), "user".to_string()]
        )]
    );
    assert_eq!(
        roles_listed("Lister").await,
        vec![("l1".to_string(), vec!["user".to_string()])]
    );
    for role in ["admin", "user"] {
        db.identity()
            .set_role("l0", role, false, &audit("role.revoke"))
            .await
            .unwrap();
    }
    assert!(
        db.identity()
            .profile("l0")
            .await
            .unwrap()
            .unwrap()
            .roles
            .is_empty()
    );
    assert_eq!(
        roles_listed("lister0").await,
        vec![("l0".to_string(), vec![])]
    );
    assert!(db.identity().profile("nobody").await.unwrap().is_none());
    let before = db.audit_log(None, 100).await.unwrap().len();
    let disable = AuditEntry {
        at: NOW,
        actor: "t",
        action: "user.disable",
        target: Some("l1"),
        details: "{}".into(),
    };
    assert!(
        db.identity()
            .set_status("l1", "disabled", &disable)
            .await
            .unwrap()
    );
    assert_eq!(
        db.identity().user("l1").await.unwrap().unwrap().status,
        "disabled"
    );
    assert!(
        !db.identity()
            .set_status("l1", "disabled", &disable)
            .await
            .unwrap(),
        "nothing to change"
    );
    assert_eq!(
        db.audit_log(None, 100).await.unwrap().len(),
        before + 1,
        "the change and its audit entry are one write; no change, no entry"
    );
}

async fn signing_keys(db: &Datastore) {
    use homecell_cell::identity::keys::{Keys, Verifier, rotate};
    use homecell_cell::identity::seal::{Seal, is_sealed};
    use homecell_common::jwt::KeySet;
    use homecell_common::replica::ReplicaState;
    use homecell_proto::control::{Region, SigningKey, Snapshot};
    // Stored plain, as before cells had seals.
    let k1 = rotate(&db.identity(), "cn-east", None).await.unwrap();
    let k2 = rotate(&db.identity(), "cn-east", None).await.unwrap();
    let rows = db.identity().signing_keys().await.unwrap();
    let active: Vec<_> = rows
        .iter()
        .filter(|r| r.retired_at.is_none())
        .map(|r| r.kid.clone())
        .collect();
    assert_eq!(active, vec![k2.clone()]);
    assert!(rows.iter().any(|r| r.kid == k1 && r.retired_at.is_some()));

    // A cell with a seal seals what it finds, and signs with it.
    let dir = tempfile::tempdir().unwrap();
    let seal = || Seal::create_if_missing(&dir.path().join("seal")).unwrap();
    let keys = Keys::open(&db.identity(), "cn-east", Some(seal()))
        .await
        .unwrap();
    assert_eq!(keys.signer().kid, k2);
    let rows = db.identity().signing_keys().await.unwrap();
    assert!(
        rows.iter().all(|r| is_sealed(&r.private_pkcs8)),
        "every stored key sealed"
    );
    // New keys are sealed from the start; the same seal opens them.
    let k3 = rotate(&db.identity(), "cn-east", Some(&seal()))
        .await
        .unwrap();
    let keys = Keys::open(&db.identity(), "cn-east", Some(seal()))
        .await
        .unwrap();
    assert_eq!(keys.signer().kid, k3);

    // What a remembered token is checked against on every use: a local key
    // is published for this cell's issuer only, as its own public key;
    // another region's key is whatever region metadata says.
    let pk3 = db
        .identity()
        .signing_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.kid == k3)
        .unwrap()
        .public_key;
    let replica = ReplicaState::from_snapshot(Snapshot {
        regions: vec![Region {
            id: "eu-west".into(),
            signing_keys: vec![SigningKey {
                kid: "eu-1".into(),
                public_key: vec![7; 32],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    });
    let v = Verifier {
        keys: &keys,
        replica: &replica,
    };
    assert_eq!(v.key(&k3), Some((pk3.clone(), "cell.cn-east".to_string())));
    assert!(v.publishes(&k3, &pk3, "cell.cn-east"));
    assert!(!v.publishes(&k3, &pk3, "cell.eu-west"), "another issuer");
    assert!(!v.publishes(&k3, &[0; 32], "cell.cn-east"), "another key");
    assert!(v.publishes("eu-1", &[7; 32], "cell.eu-west"));
    assert!(!v.publishes("eu-1", &[7; 32], "cell.cn-east"));
    assert!(!v.publishes("eu-1", &[8; 32], "cell.eu-west"));
    assert!(!v.publishes("unknown", &pk3, "cell.cn-east"));
    // Without the seal, or with another, the cell does not start.
    let e = Keys::open(&db.identity(), "cn-east", None)
        .await
        .err()
        .expect("no seal");
    assert!(format!("{e:#}").contains("sealed"), "{e:#}");
    let other = Seal::create_if_missing(&dir.path().join("other")).unwrap();
    let e = Keys::open(&db.identity(), "cn-east", Some(other))
        .await
        .err()
        .expect("another seal");
    assert!(format!("{e:#}").contains("does not open"), "{e:#}");
    // Once a cell has sealed its keys, a key stored plain (planted by
    // someone who can write to the database) is refused, not adopted.
    rotate(&db.identity(), "cn-east", None).await.unwrap();
    let e = Keys::open(&db.identity(), "cn-east", Some(seal()))
        .await
        .err()
        .expect("a planted plain key");
    assert!(format!("{e:#}").contains("stored plain"), "{e:#}");
}

/// A move's datastore steps: freeze, export, erase at the old home; import
/// (here into the same store, over the anonymised row, as when a user moves
/// back) restores the same rows, sessions included; a second import
/// replaces the first; a discard erases what an import brought.
async fn moving_a_user(db: &Datastore) {
    user(db, "mv", "mv@x.io").await;
    db.identity()
        .add_address("mv", &address("mv-a1", true), 10)
        .await
        .unwrap();
    db.identity()
        .open_session(&session("mv-s", "mv", "app"), "mv-r")
        .await
        .unwrap();
    assert!(alive(db, "mv-s", "mv", NOW).await);
    assert!(!db.moves().money_in_flight("mv", "m1").await.unwrap());
    assert_eq!(
        db.moves().freeze("mv", "m1", "eu-west", NOW).await.unwrap(),
        NOW
    );
    assert_eq!(
        db.moves()
            .freeze("mv", "m1", "eu-west", NOW + 5)
            .await
            .unwrap(),
        NOW,
        "a repeated freeze keeps the first time"
    );
    assert_eq!(
        db.moves().frozen().await.unwrap(),
        vec![(
            "mv".to_string(),
            "m1".to_string(),
            "eu-west".to_string(),
            NOW
        )]
    );
    assert!(
        alive(db, "mv-s", "mv", NOW).await,
        "a frozen user stays signed in"
    );
    let bundle = db.moves().export("mv", NOW).await.unwrap().unwrap();
    assert_eq!(bundle.qualified_identifiers(), vec!["email:mv@x.io"]);
    assert_eq!(
        db.moves().qualified_identifiers("mv").await.unwrap(),
        vec!["email:mv@x.io"]
    );
    assert_eq!(bundle.addresses.len(), 1);
    assert_eq!(bundle.sessions.len(), 1);
    assert_eq!(bundle.refresh_tokens.len(), 1);
    let before = serde_json::to_string(&bundle).unwrap();

    db.moves().erase_moved("mv", NOW).await.unwrap();
    assert_eq!(
        db.identity()
            .user_by_identifier("email", "mv@x.io")
            .await
            .unwrap(),
        None
    );
    assert!(db.identity().addresses("mv").await.unwrap().is_empty());
    assert_eq!(
        db.identity().user("mv").await.unwrap().unwrap().status,
        "deleted"
    );
    assert!(!alive(db, "mv-s", "mv", NOW).await, "its sessions end here");
    assert_eq!(
        db.moves()
            .moved_session_user("mv-r")
            .await
            .unwrap()
            .as_deref(),
        Some("mv"),
        "a refresh token of a moved session is known as such"
    );
    assert!(!db.moves().lives_here("mv").await.unwrap());
    db.moves().thaw("mv", "m1").await.unwrap();
    assert!(db.moves().frozen().await.unwrap().is_empty());

    db.moves()
        .import(&bundle, "eu-west", "m1", NOW)
        .await
        .unwrap();
    db.moves()
        .import(&bundle, "eu-west", "m1", NOW)
        .await
        .unwrap();
    let after =
        serde_json::to_string(&db.moves().export("mv", NOW).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        after, before,
        "an import restores exactly what was exported"
    );
    assert_eq!(
        db.identity()
            .user_by_identifier("email", "mv@x.io")
            .await
            .unwrap()
            .as_deref(),
        Some("mv")
    );
    // The session lives on, and honours the old region's tokens for a
    // while after the move, never for a session from elsewhere.
    assert!(alive(db, "mv-s", "mv", NOW).await);
    let identity = db.identity();
    assert!(
        identity
            .moved_session_alive("mv-s", "mv", "eu-west", NOW - 1, NOW)
            .await
            .unwrap()
    );
    assert!(
        !identity
            .moved_session_alive("mv-s", "mv", "eu-west", NOW + 1, NOW)
            .await
            .unwrap()
    );
    assert!(
        !identity
            .moved_session_alive("mv-s", "mv", "us-east", NOW - 1, NOW)
            .await
            .unwrap()
    );
    // A role that grants nothing comes along only if it is built in: not a
    // custom one, empty now, that an admin may fill later.
    let empty = RoleRow {
        name: "empty-now".into(),
        description: String::new(),
        builtin: false,
        permissions: Vec::new(),
    };
    let audit = AuditEntry {
        at: NOW,
        actor: "t",
        action: "role.create",
        target: Some("empty-now"),
        details: "{}".into(),
    };
    db.identity().create_role(&empty, &audit).await.unwrap();
    let mut seeded = bundle.clone();
    seeded.user.0 = "mv-seeded".into();
    seeded.identifiers = vec![("email".into(), "seeded@x.io".into())];
    seeded.addresses.clear();
    seeded.sessions.clear();
    seeded.refresh_tokens.clear();
    seeded.roles.push(("empty-now".into(), NOW));
    db.moves()
        .import(&seeded, "eu-west", "m2", NOW)
        .await
        .unwrap();
    assert_eq!(
        db.identity().roles_of("mv-seeded").await.unwrap(),
        vec!["user".to_string()]
    );

    // An identifier another user holds here refuses the whole import.
    let mut clash = bundle.clone();
    clash.user.0 = "mv2".into();
    assert!(matches!(
        db.moves().import(&clash, "eu-west", "m2", NOW).await,
        Err(DbError::Conflict)
    ));
    assert!(db.identity().user("mv2").await.unwrap().is_none());

    // A moved-in user can hold several identifiers: the profile lists
    // them by kind, then value, whatever order they came in.
    let mut several = bundle.clone();
    several.user.0 = "mv3".into();
    several.identifiers = vec![
        ("username".into(), "mv3".into()),
        ("email".into(), "z-mv3@x.io".into()),
        ("email".into(), "a-mv3@x.io".into()),
    ];
    several.addresses.clear();
    several.inbox.clear();
    several.wechat.clear();
    several.sessions.clear();
    several.refresh_tokens.clear();
    db.moves()
        .import(&several, "eu-west", "m3", NOW)
        .await
        .unwrap();
    assert_eq!(
        db.identity()
            .profile("mv3")
            .await
            .unwrap()
            .unwrap()
            .identifiers,
        vec![
            ("email".to_string(), "a-mv3@x.io".to_string()),
            ("email".to_string(), "z-mv3@x.io".to_string()),
            ("username".to_string(), "mv3".to_string()),
        ]
    );
    // An undone move's import is erased again.
    assert!(db.moves().lives_here("mv3").await.unwrap());
    db.moves().discard("mv3", "m3", NOW).await.unwrap();
    assert!(!db.moves().lives_here("mv3").await.unwrap());
    assert_eq!(
        db.identity()
            .user_by_identifier("username", "mv3")
            .await
            .unwrap(),
        None
    );
}

/// Sign-in codes: a newer one replaces the older, guesses are reserved
/// five per code however many race, a code answers only its client type
/// and before it expires, and is used once.
async fn sign_in_codes(db: &Datastore) {
    let id = db.identity();
    user(db, "otp", "otp@x.io").await;
    let code = |n: i64, client: &'static str| {
        let id = db.identity();
        async move {
            id.create_sign_in_code(
                &format!("code{n}"),
                "otp",
                client,
                &format!("hash{n}"),
                NOW + 300_000,
                "{}",
                NOW + n,
            )
            .await
            .unwrap()
        }
    };
    code(1, "app").await;
    code(2, "app").await;
    assert_eq!(
        id.outbox_pending("auth.sign_in_code", 10)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        id.reserve_sign_in_guess("otp", "web", 5, NOW + 3)
            .await
            .unwrap()
            .is_none(),
        "another client type's code"
    );
    let guesses =
        join_all((0..12).map(|_| id.reserve_sign_in_guess("otp", "app", 5, NOW + 3))).await;
    let granted: Vec<_> = guesses.into_iter().filter_map(|g| g.unwrap()).collect();
    assert_eq!(
        granted.len(),
        5,
        "a storm got more guesses than a code allows"
    );
    assert!(
        granted
            .iter()
            .all(|(c, h)| (c.as_str(), h.as_str()) == ("code2", "hash2"))
    );

    code(3, "app").await;
    assert!(
        id.reserve_sign_in_guess("otp", "app", 5, NOW + 300_004)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
    let (c, _) = id
        .reserve_sign_in_guess("otp", "app", 5, NOW + 4)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c, "code3");
    assert!(id.use_sign_in_code("code3", "otp", NOW + 4).await.unwrap());

    // Two codes asked at once: one stays live (on PostgreSQL the other
    // insert meets the unique index and is refused as a conflict).
    let made = join_all((10..12).map(|n| {
        let id = db.identity();
        async move {
            id.create_sign_in_code(
                &format!("code{n}"),
                "otp",
                "app",
                "h",
                NOW + 300_000,
                "{}",
                NOW + 6,
            )
            .await
        }
    }))
    .await;
    assert!(
        made.iter()
            .all(|r| matches!(r, Ok(()) | Err(DbError::Conflict)))
    );
    let live: std::collections::BTreeSet<String> =
        join_all((0..4).map(|_| id.reserve_sign_in_guess("otp", "app", 5, NOW + 7)))
            .await
            .into_iter()
            .filter_map(|g| g.unwrap().map(|(c, _)| c))
            .collect();
    assert_eq!(live.len(), 1, "one live code: {live:?}");
    let code = live.into_iter().next().unwrap();
    assert!(id.use_sign_in_code(&code, "otp", NOW + 7).await.unwrap());

    // Past their expiry, used or not, they go.
    assert_eq!(id.prune_sign_in_codes(NOW + 7).await.unwrap(), 0);
    assert!(id.prune_sign_in_codes(NOW + 300_100).await.unwrap() >= 4);
    assert_eq!(id.prune_sign_in_codes(NOW + 300_100).await.unwrap(), 0);
    assert!(
        !id.use_sign_in_code("code3", "otp", NOW + 4).await.unwrap(),
        "once"
    );
    assert!(
        id.reserve_sign_in_guess("otp", "app", 5, NOW + 5)
            .await
            .unwrap()
            .is_none()
    );
}

/// Roles as data: a custom role grants exactly its permissions, an edit
/// counts at once, deleting it takes its grants, built-in roles stay, and
/// every change is audited in its own transaction.
async fn custom_roles(db: &Datastore) {
    let id = db.identity();
    user(db, "aud", "aud@x.io").await;
    let audit = |action: &'static str| AuditEntry {
        at: NOW,
        actor: "t",
        action,
        target: Some("auditor"),
        details: "{}".into(),
    };
    let mut role = RoleRow {
        name: "auditor".into(),
        description: "reads the audit log".into(),
        builtin: false,
        permissions: vec!["audit:read".into()],
    };
    let before = db.audit_log(None, 1000).await.unwrap().len();
    id.create_role(&role, &audit("role.create")).await.unwrap();
    assert!(matches!(
        id.create_role(&role, &audit("role.create")).await,
        Err(DbError::Conflict)
    ));
    assert_eq!(id.role("auditor").await.unwrap().as_ref(), Some(&role));
    let builtin: Vec<(String, bool)> = id
        .roles()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.builtin))
        .collect();
    assert!(builtin.contains(&("admin".into(), true)));
    assert!(builtin.contains(&("auditor".into(), false)));

    id.set_role("aud", "auditor", true, &audit("role.grant"))
        .await
        .unwrap();
    assert!(id.has_permission("aud", "audit:read").await.unwrap());
    assert!(!id.has_permission("aud", "users:read").await.unwrap());

    role.permissions = vec!["users:read".into()];
    role.description = "reads users".into();
    id.update_role(&role, &audit("role.update")).await.unwrap();
    assert!(!id.has_permission("aud", "audit:read").await.unwrap());
    assert!(id.has_permission("aud", "users:read").await.unwrap());
    assert_eq!(id.role("auditor").await.unwrap(), Some(role.clone()));

    // A built-in role is never deleted; a custom one goes with its grants.
    assert_eq!(
        id.delete_role("support", &audit("role.delete"))
            .await
            .unwrap(),
        None
    );
    assert!(id.role("support").await.unwrap().is_some());
    assert_eq!(
        id.delete_role("auditor", &audit("role.delete"))
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(id.role("auditor").await.unwrap(), None);
    assert!(!id.has_permission("aud", "users:read").await.unwrap());
    assert!(
        !id.roles_of("aud")
            .await
            .unwrap()
            .contains(&"auditor".to_string())
    );
    assert_eq!(
        db.audit_log(None, 1000).await.unwrap().len(),
        before + 4,
        "create, grant, update, delete"
    );
}

/// Identifier proofs: a stranger's registration stands beside the owner's
/// (nothing is claimed), guesses are capped under a storm, a proof is used
/// once and expires; a change's proof is its user's alone; a change and a
/// removal settle their claim records, and a change left to the
/// reconciliation is finished by it.
async fn identifier_proofs(db: &Datastore) {
    let id = db.identity();
    let proof = |n: i64, purpose: &'static str, user: &'static str, value: &'static str| {
        let id = db.identity();
        async move {
            id.create_proof(
                &NewProof {
                    id: &format!("cn-east~p{n}"),
                    purpose,
                    user_id: user,
                    kind: "email",
                    value,
                    password_hash: (purpose == "register").then_some("h"),
                    display_name: None,
                    code_hash: &format!("hash{n}"),
                    expires_at: NOW + 900_000,
                    now: NOW + n,
                },
                "{}",
            )
            .await
            .unwrap()
        }
    };
    proof(1, "register", "reg-owner", "owned@x.io").await;
    proof(2, "register", "reg-stranger", "owned@x.io").await;
    assert_eq!(
        id.proof_identifier("cn-east~p1", "register", 5, NOW + 3)
            .await
            .unwrap(),
        Some(("email".into(), "owned@x.io".into()))
    );
    assert_eq!(
        id.proof_identifier("cn-east~p1", "change", 5, NOW + 3)
            .await
            .unwrap(),
        None,
        "a registration's proof does not change an identifier"
    );
    let guesses = join_all(
        (0..12).map(|_| id.reserve_proof_guess("cn-east~p2", "register", None, 5, NOW + 3)),
    )
    .await;
    let granted: Vec<_> = guesses.into_iter().filter_map(|g| g.unwrap()).collect();
    assert_eq!(granted.len(), 5, "a storm got more guesses than allowed");
    assert_eq!(granted[0].user_id, "reg-stranger");
    assert!(
        id.proof_identifier("cn-east~p2", "register", 5, NOW + 3)
            .await
            .unwrap()
            .is_none(),
        "a proof whose guesses are spent is not read (nor charged)"
    );
    assert_eq!(granted[0].password_hash.as_deref(), Some("h"));
    // The owner's proof is untouched by the stranger's guesses.
    let owner = id
        .reserve_proof_guess("cn-east~p1", "register", None, 5, NOW + 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.code_hash, "hash1");
    assert!(id.use_proof("cn-east~p1", "k", NOW + 4).await.unwrap());
    assert!(
        !id.use_proof("cn-east~p1", "k", NOW + 4).await.unwrap(),
        "single use"
    );
    assert!(
        id.reserve_proof_guess("cn-east~p1", "register", None, 5, NOW + 5)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        id.proof_identifier("cn-east~p2", "register", 5, NOW + 900_000)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );

    // A change: the newest proof replaces the user's earlier one, and only
    // its user may guess at it.
    user(db, "chg", "chg@x.io").await;
    proof(3, "change", "chg", "chg-new@x.io").await;
    proof(4, "change", "chg", "chg-newer@x.io").await;
    assert!(
        id.reserve_proof_guess("cn-east~p3", "change", Some("chg"), 5, NOW + 5)
            .await
            .unwrap()
            .is_none(),
        "replaced by the newer proof"
    );
    assert!(
        id.reserve_proof_guess("cn-east~p4", "change", Some("other"), 5, NOW + 5)
            .await
            .unwrap()
            .is_none(),
        "another user's proof"
    );
    assert!(
        id.reserve_proof_guess("cn-east~p4", "change", Some("chg"), 5, NOW + 5)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        id.outbox_pending("auth.identifier_code", 10)
            .await
            .unwrap()
            .len(),
        4
    );

    // The change settles its claim record and swaps the identifier.
    id.record_claim("email:chg-newer@x.io", "chg", Some("email:chg@x.io"), NOW)
        .await
        .unwrap();
    let of_chg = || async {
        id.unsettled_claims(NOW + 1)
            .await
            .unwrap()
            .into_iter()
            .filter(|u| u.user_id == "chg")
            .collect::<Vec<_>>()
    };
    let unsettled = of_chg().await;
    assert_eq!(unsettled.len(), 1);
    assert_eq!(unsettled[0].replaces.as_deref(), Some("email:chg@x.io"));
    id.change_identifier("chg", "email", Some("chg@x.io"), "chg-newer@x.io", NOW)
        .await
        .unwrap();
    assert!(of_chg().await.is_empty());
    assert_eq!(
        id.identifier_of_kind("chg", "email")
            .await
            .unwrap()
            .as_deref(),
        Some("chg-newer@x.io")
    );
    assert!(
        id.user_by_identifier("email", "chg@x.io")
            .await
            .unwrap()
            .is_none()
    );
    let told = id
        .outbox_pending("auth.identifier_changed", 10)
        .await
        .unwrap();
    assert_eq!(told.len(), 1, "the old address hears of the change");
    assert!(told[0].2.contains("chg@x.io"));

    // Taken over by the reconciliation: the request can no longer settle
    // it, and the reconciliation finishes it (once, idempotently).
    id.record_claim("email:chg-3@x.io", "chg", Some("email:chg-newer@x.io"), NOW)
        .await
        .unwrap();
    assert!(id.begin_release("email:chg-3@x.io", "chg").await.unwrap());
    let late = id
        .change_identifier("chg", "email", Some("chg-newer@x.io"), "chg-3@x.io", NOW)
        .await;
    assert!(matches!(late, Err(DbError::Conflict)), "{late:?}");
    id.finish_change("email:chg-3@x.io", "email:chg-newer@x.io", "chg")
        .await
        .unwrap();
    id.finish_change("email:chg-3@x.io", "email:chg-newer@x.io", "chg")
        .await
        .unwrap();
    assert_eq!(
        id.identifier_of_kind("chg", "email")
            .await
            .unwrap()
            .as_deref(),
        Some("chg-3@x.io")
    );
    assert!(of_chg().await.is_empty());

    // A change that no longer replaces what the user has is refused: the
    // reconciliation gives its claim back.
    let stale = id
        .change_identifier("chg", "email", Some("chg@x.io"), "chg-4@x.io", NOW)
        .await;
    assert!(matches!(stale, Err(DbError::Conflict)), "{stale:?}");
    assert_eq!(
        id.identifier_of_kind("chg", "email")
            .await
            .unwrap()
            .as_deref(),
        Some("chg-3@x.io")
    );

    // A removal records its release in the same transaction, and never
    // takes the last way to sign in: the phone added here is the last.
    let last = id
        .remove_identifier("chg", "email", "chg-3@x.io", NOW)
        .await;
    assert!(matches!(last, Err(DbError::Conflict)), "{last:?}");
    id.change_identifier("chg", "phone", None, "+8613800000123", NOW)
        .await
        .unwrap();
    let both = join_all([
        id.remove_identifier("chg", "email", "chg-3@x.io", NOW),
        id.remove_identifier("chg", "phone", "+8613800000123", NOW),
    ])
    .await;
    assert_eq!(
        both.iter().filter(|r| matches!(r, Ok(true))).count(),
        1,
        "two removals at once took both ways to sign in: {both:?}"
    );
    assert_eq!(
        both.iter()
            .filter(|r| matches!(r, Err(DbError::Conflict)))
            .count(),
        1
    );
    let email_gone = id
        .identifier_of_kind("chg", "email")
        .await
        .unwrap()
        .is_none();
    if !email_gone {
        // The phone went: put the email removal back in its place for the
        // checks below.
        id.forget_claim("phone:+8613800000123", "chg")
            .await
            .unwrap();
        id.change_identifier("chg", "phone", None, "+8613800000123", NOW)
            .await
            .unwrap();
        assert!(
            id.remove_identifier("chg", "email", "chg-3@x.io", NOW)
                .await
                .unwrap()
        );
    }
    let left = of_chg().await;
    assert_eq!(
        left.iter()
            .map(|u| (u.identifier.as_str(), u.state.as_str()))
            .collect::<Vec<_>>(),
        vec![("email:chg-3@x.io", "releasing")]
    );
    id.forget_claim("email:chg-3@x.io", "chg").await.unwrap();
    // One change under way per user: a second live proof is refused.
    let second = id
        .create_proof(
            &NewProof {
                id: "cn-east~p9",
                purpose: "change",
                user_id: "chg",
                kind: "email",
                value: "x@x.io",
                password_hash: None,
                display_name: None,
                code_hash: "h",
                expires_at: NOW + 900_000,
                now: NOW,
            },
            "{}",
        )
        .await;
    assert!(second.is_ok(), "the earlier one is ended first: {second:?}");

    assert!(id.prune_identifier_proofs(NOW + 900_100).await.unwrap() >= 4);
    assert_eq!(id.prune_identifier_proofs(NOW + 900_100).await.unwrap(), 0);
}

async fn suite(db: Datastore) {
    db.claim_region("cn-east").await.unwrap();
    assert!(
        db.claim_region("eu-west").await.is_err(),
        "a datastore belongs to one region"
    );
    users_and_identifiers(&db).await;
    lockout_is_atomic_and_always_settled(&db).await;
    one_session_per_client_type(&db).await;
    refresh_rotation_and_reuse(&db).await;
    password_resets(&db).await;
    reset_budgets(&db).await;
    pending_claims(&db).await;
    addresses(&db).await;
    roles_audit_and_anonymisation(&db).await;
    custom_roles(&db).await;
    sign_in_codes(&db).await;
    identifier_proofs(&db).await;
    listing_and_profiles(&db).await;
    signing_keys(&db).await;
    moving_a_user(&db).await;
}

#[tokio::test]
async fn storage_suite_on_sqlite() {
    let statements = plans::record();
    let dir = tempfile::tempdir().unwrap();
    let db = Datastore::open(&format!("sqlite:{}", dir.path().join("cell.db").display()))
        .await
        .unwrap();
    suite(db.clone()).await;
    // Every session check and profile read above took the point-read path
    // (each that did not is counted), so the suite checked that path.
    let Datastore::Sqlite(_, _, reads) = &db else {
        unreachable!()
    };
    assert_eq!(
        reads.fallbacks.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    plans::assert_indexed(&db, &statements).await;
}

#[tokio::test]
async fn storage_suite_on_postgres() {
    let pg = homecell_harness::postgres::TempPostgres::start().unwrap();
    let url = pg.create_database("suite").unwrap();
    let statements = plans::record();
    let db = Datastore::open(&url).await.unwrap();
    suite(db.clone()).await;
    plans::assert_indexed(&db, &statements).await;
}
