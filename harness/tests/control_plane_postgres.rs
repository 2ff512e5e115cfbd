//! The control plane's store on PostgreSQL, shared by several instances:
//! one private PostgreSQL server, two `Store`s over one database (what two
//! control-plane processes hold), mutations from both at once.

use anyhow::Result;
use homecell_control_plane::store::{Instance, Location, Parent, Store};
use homecell_harness::postgres::TempPostgres;
use homecell_proto::control::{IdentifierClaim, Region, RegionStatus};
use homecell_proto::error::{CodedError, ErrorCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn region(id: &str) -> Region {
    Region {
        id: id.into(),
        status: RegionStatus::Active as i32,
        ..Default::default()
    }
}

/// Claims `hmac` for `user` unless it is taken: the directory's own check,
/// in the mutation's transaction.
fn claim(store: &Store, hmac: &str, user: &str) -> Result<bool, CodedError> {
    let c = IdentifierClaim {
        hmac: hmac.into(),
        user_id: user.into(),
        region: "cn-east".into(),
    };
    let out = store.mutate("test", |tx| {
        if tx.claim(&c.hmac)?.is_some() {
            return Err(CodedError::new(ErrorCode::AlreadyExists, "taken"));
        }
        tx.put_claim(c)
    });
    match out {
        Ok(_) => Ok(true),
        Err(e) if e.code == ErrorCode::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_gapless_log_and_every_identifier_once() -> Result<()> {
    let pg = TempPostgres::start()?;
    let url = pg.create_database("cp")?;
    let loc = Location::Postgres(url);
    let a = Arc::new(Store::open_at(&loc, 10_000).await?);
    let b = Arc::new(Store::open_at(&loc, 10_000).await?);
    assert_eq!(a.epoch(), b.epoch(), "one store, one epoch");
    assert_eq!(a.engine(), "postgres");

    // B follows what A commits.
    let stop = homecell_common::shutdown::CancellationToken::new();
    for (store, id) in [(&a, "a"), (&b, "b")] {
        let (store, stop) = (store.clone(), stop.clone());
        let me = Instance {
            id: id.into(),
            endpoint: format!("https://{id}:7443"),
            started_unix_ms: 1,
        };
        tokio::spawn(async move { store.follow(me, stop).await });
    }
    let a2 = a.clone();
    tokio::task::spawn_blocking(move || a2.mutate("t", |tx| tx.put_region(region("cn-east"))))
        .await??;

    // 3 writers on each instance; identifiers 0..300, every one tried by
    // two writers on different instances.
    let mut writers = Vec::new();
    for w in 0..6u32 {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.push(tokio::task::spawn_blocking(move || {
            let mut won = Vec::new();
            let base = (w / 2) * 100;
            for i in base..base + 100 {
                let hmac = format!("{i:064x}");
                if claim(&store, &hmac, &format!("w{w}-u{i}"))? {
                    won.push(i);
                }
            }
            Ok::<_, CodedError>(won)
        }));
    }
    let mut won = Vec::new();
    for w in writers {
        won.extend(w.await??);
    }
    won.sort();
    assert_eq!(
        won,
        (0..300).collect::<Vec<_>>(),
        "each identifier claimed exactly once"
    );

    // The log: revisions 1..=head, none missing, in order, from both.
    let head = a.read(|_| Ok(()))?.1;
    assert_eq!(head, 301, "a region and 300 claims");
    let log = a.changes_after(0, 1000)?.expect("the log reaches back");
    let revisions: Vec<u64> = log.iter().map(|c| c.revision).collect();
    assert_eq!(revisions, (1..=head).collect::<Vec<_>>());
    let snap = b.snapshot()?;
    assert_eq!(snap.claims.len(), 300);
    assert_eq!(snap.users.len(), 300);

    // Each instance hears of the other's commits (NOTIFY, or the tick).
    let deadline = Instant::now() + Duration::from_secs(3);
    while (a.revision(), b.revision()) != (head, head) {
        assert!(
            Instant::now() < deadline,
            "instances did not follow the head"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Both are listed, alive.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let listed = a.instances().await?;
    let ids: Vec<(&str, bool)> = listed.iter().map(|(i, al)| (i.id.as_str(), *al)).collect();
    assert_eq!(ids, [("a", true), ("b", true)]);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_an_empty_database_and_never_over_a_store() -> Result<()> {
    let pg = TempPostgres::start()?;
    let from = Location::Postgres(pg.create_database("old")?);
    let to = Location::Postgres(pg.create_database("new")?);
    let old = Store::open_at(&from, 100).await?;
    let journal = std::sync::Mutex::new(None);
    tokio::task::block_in_place(|| -> Result<()> {
        old.mutate("t", |tx| tx.put_region(region("cn-east")))?;
        for i in 0..50u32 {
            assert!(claim(&old, &format!("{i:064x}"), &format!("u{}", i / 2))?);
        }
        // The move journal travels too: an open move and a batch.
        old.mutate("t", |tx| tx.put_region(region("eu-west")))?;
        let (m, _) = old.mutate("t", |tx| {
            homecell_control_plane::moves::start(tx, "u0", "eu-west", "", "")
        })?;
        let (b, _) = old.mutate("t", |tx| {
            homecell_control_plane::moves::start_batch(tx, "cn-east", "eu-west", "fr", 10, 5)
        })?;
        *journal.lock().unwrap() = Some((m.id, b.id));
        old.mutate("t", |tx| {
            tx.set_config(homecell_proto::control::ConfigEntry {
                key: "feature.x".into(),
                region: String::new(),
                value: Some(homecell_proto::control::ConfigValue {
                    kind: Some(homecell_proto::control::config_value::Kind::BoolValue(true)),
                }),
                ..Default::default()
            })
        })?;
        Ok(())
    })?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("cp.backup");
    {
        let mut w = homecell_control_plane::backup::BackupWriter::create(&file)?;
        let mut failed = None;
        tokio::task::block_in_place(|| {
            old.export(|r| {
                if let Err(e) = w.record(&r) {
                    failed = Some(e);
                    return false;
                }
                true
            })
        })?;
        assert!(failed.is_none());
        w.finish()?;
    }
    let restored =
        tokio::task::block_in_place(|| homecell_control_plane::backup::restore(&file, &to, 100))?;
    assert_ne!(restored.epoch(), old.epoch(), "a restore starts an epoch");
    assert_eq!(
        restored.parent(),
        Some(Parent {
            epoch: old.epoch(),
            revision: 53
        })
    );
    let (a, b) = (old.snapshot()?, restored.snapshot()?);
    assert_eq!((a.claims, a.users, a.regions.len()), (b.claims, b.users, 2));
    let (move_id, batch_id) = journal.lock().unwrap().clone().unwrap();
    let ((m, b), _) = tokio::task::block_in_place(|| {
        restored.read(|tx| {
            Ok((
                homecell_control_plane::moves::get(tx, &move_id)?,
                homecell_control_plane::moves::get_batch(tx, &batch_id)?,
            ))
        })
    })?;
    assert_eq!(
        (m.user_id.as_str(), m.to_region.as_str()),
        ("u0", "eu-west")
    );
    assert_eq!((b.country.as_str(), b.rate_per_sec), ("FR", 5));
    // Still open in the restored journal: the source resumes it.
    let (open, _) = tokio::task::block_in_place(|| {
        restored.read(|tx| homecell_control_plane::moves::open_from(tx, "cn-east", None, 10))
    })?;
    assert_eq!(open.len(), 1);
    assert_eq!(restored.config_history("", 10)?.len(), 1);
    // The restored store answers 409 for a claim from before the backup.
    assert!(!tokio::task::block_in_place(|| claim(
        &restored,
        &format!("{:064x}", 7),
        "someone-else"
    ))?);
    // Never over a store that exists.
    let again = tokio::task::block_in_place(|| {
        homecell_control_plane::backup::restore(&file, &to, 100).map(|_| ())
    });
    let e = again.expect_err("the database holds a store");
    assert!(e.to_string().contains("already holds a store"), "{e}");
    Ok(())
}

/// A standby, or a database made read-only for any reason, answers reads
/// while every mutation fails: an instance on one steps aside (unhealthy:
/// it ends its Watch streams and stops listening) rather than serve
/// subscribers a store it cannot write, and comes back once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_on_a_read_only_database_steps_aside_until_it_is_writable() -> Result<()> {
    let pg = TempPostgres::start()?;
    let loc = Location::Postgres(pg.create_database("cp")?);
    let store = Arc::new(Store::open_at(&loc, 100).await?);
    let stop = homecell_common::shutdown::CancellationToken::new();
    let me = Instance {
        id: "a".into(),
        endpoint: "https://a:7443".into(),
        started_unix_ms: 1,
    };
    tokio::spawn({
        let (store, stop) = (store.clone(), stop.clone());
        async move { store.follow(me, stop).await }
    });
    let mut healthy = store.healthy();
    let becomes = |healthy: &mut tokio::sync::watch::Receiver<bool>, want: bool| {
        let mut healthy = healthy.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(15), healthy.wait_for(|h| *h == want))
                .await
                .map(|_| ())
        }
    };
    becomes(&mut healthy, true).await?;

    // New sessions are read-only, as on a standby (where, unlike here,
    // `BEGIN READ WRITE` fails too); the instance's sessions start anew.
    let reconnect = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
        WHERE datname = 'cp' AND pid <> pg_backend_pid()";
    pg.sql(
        "postgres",
        "ALTER DATABASE cp SET default_transaction_read_only = on",
    )?;
    pg.sql("postgres", reconnect)?;
    becomes(&mut healthy, false)
        .await
        .map_err(|_| anyhow::anyhow!("still healthy on a read-only database"))?;
    pg.sql(
        "postgres",
        "ALTER DATABASE cp RESET default_transaction_read_only",
    )?;
    pg.sql("postgres", reconnect)?;
    becomes(&mut healthy, true)
        .await
        .map_err(|_| anyhow::anyhow!("did not come back once the database was writable"))?;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.mutate("t", |tx| tx.put_region(region("cn-east"))))
        .await??;
    stop.cancel();
    Ok(())
}

/// The store reaches PostgreSQL over TLS, verifying the server's
/// certificate (`sslmode=verify-full`): a server that refuses plain TCP
/// serves it, and one whose certificate is not from the named CA is not
/// trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaches_postgres_over_verified_tls() -> Result<()> {
    let pg = TempPostgres::start_tls()?;
    let url = pg.create_database("cp")?;
    let with = |query: String| Location::Postgres(format!("{url}?{query}"));

    let refused = |store: anyhow::Result<Store>| match store {
        Ok(_) => String::new(),
        Err(e) => format!("{e:#}"),
    };
    let plain = refused(Store::open_at(&with("sslmode=disable".into()), 100).await);
    assert!(
        plain.contains("no encryption"),
        "the server takes TLS only: {plain}"
    );

    let other_ca = tempfile::tempdir()?;
    let stranger = homecell_common::tls::Pki::open_or_create(other_ca.path())?
        .issue(&homecell_common::tls::PeerIdentity::ControlPlane, &[])?;
    let wrong = with(format!(
        "sslmode=verify-full&sslrootcert={}",
        stranger.ca.display()
    ));
    let wrong = refused(Store::open_at(&wrong, 100).await);
    assert!(
        wrong.contains("invalid peer certificate"),
        "a certificate from another CA is trusted: {wrong}"
    );

    let verified = with(format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.tls_ca().display()
    ));
    let store = Arc::new(Store::open_at(&verified, 100).await?);
    let s = store.clone();
    let (_, revision) =
        tokio::task::spawn_blocking(move || s.mutate("t", |tx| tx.put_region(region("cn-east"))))
            .await??;
    assert_eq!(revision, 1);
    Ok(())
}
