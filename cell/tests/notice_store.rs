//! The notice tables on SQLite and on a real PostgreSQL server: idempotent
//! events and fan-out, the inbox life cycle and expiry, preferences,
//! templates, deliveries through leases, retries, death and re-drive, and
//! what an account's erasure takes with it.

mod plans;
mod stores;

use stores::Stores;

use homecell_cell::db::Datastore;
use homecell_cell::identity::store::NewUser;
use homecell_cell::notice::store::{Delivery, FanOut, InboxItem, Redrive, Template};

const NOW: i64 = 1_800_000_000_000;

fn item(id: &str, at: i64) -> InboxItem {
    InboxItem {
        id: id.into(),
        category: "account".into(),
        title: "t".into(),
        body: "b".into(),
        created_at: at,
        read_at: None,
        archived_at: None,
    }
}

fn delivery(id: &str, event: &str) -> Delivery {
    Delivery {
        id: id.into(),
        event_id: event.into(),
        user_id: "u1".into(),
        channel: "email".into(),
        recipient: "u1@x.io".into(),
        subject: "s".into(),
        body: "code 123456".into(),
        html: Some("code 123456".into()),
        state: "pending".into(),
        attempts: 0,
        next_attempt_at: NOW,
        last_error: None,
        created_at: NOW,
    }
}

async fn events_and_fan_out(db: &Datastore) {
    db.identity()
        .create_user(&NewUser {
            id: "u1",
            display_name: "U",
            kind: "email",
            value: "u1@x.io",
            password_hash: "h",
            now: NOW,
        })
        .await
        .unwrap();
    // Registration queued a welcome; triggers are idempotent by event id.
    assert!(
        db.notices()
            .enqueue_event("e1", "message", "u1", r#"{"title":"a","text":"b"}"#, NOW)
            .await
            .unwrap()
    );
    assert!(
        !db.notices()
            .enqueue_event("e1", "message", "u1", "{}", NOW)
            .await
            .unwrap()
    );
    let pending = db.notices().pending_events(10).await.unwrap();
    assert_eq!(pending.len(), 2, "the welcome and e1");
    let f = FanOut {
        inbox: Some((item("i1", NOW), NOW + 1_000)),
        deliveries: vec![delivery("d1", "e1")],
    };
    assert!(db.notices().fan_out("e1", "u1", &f, NOW).await.unwrap());
    // A second run of the same event adds nothing.
    let again = FanOut {
        inbox: Some((item("i2", NOW), NOW + 1_000)),
        deliveries: vec![delivery("d2", "e1")],
    };
    assert!(!db.notices().fan_out("e1", "u1", &again, NOW).await.unwrap());
    let left = db.notices().pending_events(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(db.notices().due_deliveries(NOW, 10).await.unwrap().len(), 1);
}

async fn inbox(db: &Datastore) {
    for i in 0..5 {
        let f = FanOut {
            inbox: Some((item(&format!("n{i}"), NOW + i), NOW + 10_000)),
            deliveries: vec![],
        };
        db.notices()
            .fan_out(&format!("ev{i}"), "u1", &f, NOW)
            .await
            .unwrap();
    }
    assert_eq!(db.notices().unread_count("u1", NOW).await.unwrap(), 6);
    let page = db
        .notices()
        .inbox_page("u1", false, None, 2, NOW)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["n4", "n3"]
    );
    let next = db
        .notices()
        .inbox_page(
            "u1",
            false,
            Some((page[1].created_at, page[1].id.clone())),
            10,
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(next.len(), 4);
    assert_eq!(
        db.notices()
            .mark_inbox("u1", Some("n4"), false, NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        db.notices()
            .mark_inbox("other", Some("n3"), false, NOW)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        db.notices()
            .mark_inbox("u1", Some("n3"), true, NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        db.notices()
            .inbox_page("u1", true, None, 10, NOW)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(db.notices().unread_count("u1", NOW).await.unwrap(), 4);
    assert_eq!(
        db.notices()
            .mark_inbox("u1", None, false, NOW)
            .await
            .unwrap(),
        4
    );
    assert_eq!(db.notices().unread_count("u1", NOW).await.unwrap(), 0);
    assert!(db.notices().delete_inbox("u1", "n0").await.unwrap());
    assert!(!db.notices().delete_inbox("u1", "n0").await.unwrap());
    // Expired items vanish from reads at once and from the table on purge.
    assert!(
        db.notices()
            .inbox_page("u1", false, None, 10, NOW + 20_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(db.notices().purge_inbox(NOW + 20_000).await.unwrap() >= 4);
}

async fn preferences_and_templates(db: &Datastore) {
    let prefs = vec![
        ("message".to_string(), "inbox".to_string(), false),
        ("account".to_string(), "email".to_string(), true),
    ];
    db.notices().set_preferences("u1", &prefs).await.unwrap();
    db.notices()
        .set_preferences("u1", &[("account".into(), "email".into(), false)])
        .await
        .unwrap();
    let mut off = db.notices().opted_out("u1").await.unwrap();
    off.sort();
    assert_eq!(
        off,
        vec![
            ("account".into(), "email".into()),
            ("message".into(), "inbox".into())
        ]
    );
    let seeded = db
        .notices()
        .templates_for("auth.password_reset")
        .await
        .unwrap();
    assert!(
        seeded
            .iter()
            .any(|t| t.locale == "zh-CN" && t.channel == "sms")
    );
    let t = Template {
        key: "promo".into(),
        channel: "inbox".into(),
        locale: "en".into(),
        category: "marketing".into(),
        subject: "Hi".into(),
        body: "{{x}}".into(),
        updated_at: NOW,
        updated_by: "admin".into(),
    };
    db.notices().put_template(&t).await.unwrap();
    db.notices()
        .put_template(&Template {
            body: "{{y}}".into(),
            ..t.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        db.notices().templates_for("promo").await.unwrap()[0].body,
        "{{y}}"
    );
    assert!(
        db.notices()
            .delete_template("promo", "inbox", "en")
            .await
            .unwrap()
    );
    assert!(
        !db.notices()
            .delete_template("promo", "inbox", "en")
            .await
            .unwrap()
    );
}

async fn deliveries(db: &Datastore) {
    let d = &db.notices().due_deliveries(NOW, 10).await.unwrap()[0];
    // One worker wins the lease.
    assert!(
        db.notices()
            .lease_delivery(&d.id, d.next_attempt_at, NOW + 60_000)
            .await
            .unwrap()
    );
    assert!(
        !db.notices()
            .lease_delivery(&d.id, d.next_attempt_at, NOW + 60_000)
            .await
            .unwrap()
    );
    assert!(
        db.notices()
            .due_deliveries(NOW, 10)
            .await
            .unwrap()
            .is_empty()
    );
    db.notices()
        .delivery_failed(&d.id, "smtp down", NOW + 1, false)
        .await
        .unwrap();
    db.notices()
        .delivery_failed(&d.id, "smtp down", NOW + 2, true)
        .await
        .unwrap();
    let dead = db.notices().dead_deliveries(None, 10).await.unwrap();
    assert_eq!((dead.len(), dead[0].attempts), (1, 2));
    assert_eq!(dead[0].last_error.as_deref(), Some("smtp down"));
    assert!(
        db.notices()
            .due_deliveries(NOW + 10, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        db.notices().redrive(&d.id, NOW + 5).await.unwrap(),
        Redrive::Queued
    );
    assert_eq!(
        db.notices().redrive(&d.id, NOW + 5).await.unwrap(),
        Redrive::NotDead
    );
    let due = db.notices().due_deliveries(NOW + 5, 10).await.unwrap();
    assert_eq!((due.len(), due[0].attempts), (1, 0));
    db.notices()
        .delivery_sent(&d.id, "smtp", NOW + 6)
        .await
        .unwrap();
    assert!(
        db.notices()
            .due_deliveries(NOW + 100, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A password reset's message that dies keeps no code; another dead
    // message keeps its text for a re-drive.
    assert!(
        db.notices()
            .enqueue_event("e-reset", "auth.password_reset", "u1", "{}", NOW)
            .await
            .unwrap()
    );
    let f = FanOut {
        inbox: None,
        deliveries: vec![delivery("d-reset", "e-reset")],
    };
    db.notices()
        .fan_out("e-reset", "u1", &f, NOW)
        .await
        .unwrap();
    db.notices()
        .delivery_failed("d-reset", "smtp down", NOW + 7, true)
        .await
        .unwrap();
    let dead = db.notices().dead_deliveries(None, 10).await.unwrap();
    let reset = dead.iter().find(|d| d.id == "d-reset").unwrap();
    assert_eq!((reset.body.as_str(), reset.html.as_deref()), ("", None));
    // ... and is never sent again.
    assert_eq!(
        db.notices().redrive("d-reset", NOW + 8).await.unwrap(),
        Redrive::OneTimeCode
    );
    assert_eq!(
        db.notices().dead_deliveries(None, 10).await.unwrap().len(),
        dead.len()
    );
}

/// Deleting an account (and erasing a moved one) takes its notices with
/// it: inbox texts, preferences, deliveries with their recipient address,
/// events not yet handled. Another user's stay.
async fn erasure_takes_the_users_notices(db: &Datastore) {
    db.identity()
        .create_user(&NewUser {
            id: "gone",
            display_name: "Ana",
            kind: "email",
            value: "ana@x.io",
            password_hash: "h",
            now: NOW,
        })
        .await
        .unwrap();
    let mine = |id: &str, event: &str| Delivery {
        user_id: "gone".into(),
        recipient: "ana@x.io".into(),
        ..delivery(id, event)
    };
    let f = FanOut {
        inbox: Some((item("gone-i1", NOW), NOW + 1_000)),
        deliveries: vec![mine("gone-d1", "gone-e1")],
    };
    assert!(
        db.notices()
            .fan_out("gone-e1", "gone", &f, NOW)
            .await
            .unwrap()
    );
    let f = FanOut {
        inbox: None,
        deliveries: vec![mine("gone-d2", "gone-e2")],
    };
    assert!(
        !db.notices()
            .fan_out("gone-e2", "gone", &f, NOW)
            .await
            .unwrap()
    );
    db.notices()
        .delivery_failed("gone-d2", "smtp down", NOW, true)
        .await
        .unwrap();
    db.notices()
        .set_preferences("gone", &[("marketing".into(), "email".into(), false)])
        .await
        .unwrap();
    let others_inbox = db
        .notices()
        .inbox_page("u1", false, None, 100, NOW)
        .await
        .unwrap();
    let theirs = |ds: Vec<Delivery>| ds.into_iter().filter(|d| d.user_id == "gone").count();
    assert_eq!(
        theirs(db.notices().due_deliveries(NOW, 100).await.unwrap()),
        1
    );
    assert_eq!(
        theirs(db.notices().dead_deliveries(None, 100).await.unwrap()),
        1
    );
    assert!(
        db.notices()
            .pending_events(100)
            .await
            .unwrap()
            .iter()
            .any(|e| e.user_id.as_deref() == Some("gone")),
        "the welcome is queued"
    );

    db.identity()
        .anonymise_user("gone", "deleted-1", NOW, None, true)
        .await
        .unwrap();
    assert!(
        db.notices()
            .inbox_page("gone", false, None, 100, NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.notices().unread_count("gone", NOW).await.unwrap(), 0);
    assert!(db.notices().preferences("gone").await.unwrap().is_empty());
    assert_eq!(
        theirs(db.notices().due_deliveries(NOW, 100).await.unwrap()),
        0
    );
    assert_eq!(
        theirs(db.notices().dead_deliveries(None, 100).await.unwrap()),
        0
    );
    assert!(
        !db.notices()
            .pending_events(100)
            .await
            .unwrap()
            .iter()
            .any(|e| e.user_id.as_deref() == Some("gone"))
    );
    assert_eq!(
        db.notices()
            .inbox_page("u1", false, None, 100, NOW)
            .await
            .unwrap(),
        others_inbox
    );
}

async fn suite(db: Datastore) {
    db.claim_region("cn-east").await.unwrap();
    events_and_fan_out(&db).await;
    inbox(&db).await;
    preferences_and_templates(&db).await;
    deliveries(&db).await;
    erasure_takes_the_users_notices(&db).await;
}

#[tokio::test]
async fn notice_store_on_sqlite() {
    let statements = plans::record();
    let dir = tempfile::tempdir().unwrap();
    let db = Datastore::open(&format!("sqlite:{}", dir.path().join("cell.db").display()))
        .await
        .unwrap();
    suite(db.clone()).await;
    plans::assert_indexed(&db, &statements).await;
}

#[tokio::test]
async fn notice_store_on_postgres() {
    let statements = plans::record();
    let pg = homecell_harness::postgres::TempPostgres::start().unwrap();
    let url = pg.create_database("notices").unwrap();
    let db = Datastore::open(&url).await.unwrap();
    suite(db.clone()).await;
    plans::assert_indexed(&db, &statements).await;
}
