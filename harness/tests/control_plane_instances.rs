//! Three control-plane processes over one private PostgreSQL database, with
//! the standard cells and router given all three endpoints. The instance a
//! subscriber is attached to is killed with SIGKILL while registrations go
//! on: every subscriber attaches to another instance within 5 s, no
//! identifier is lost or given twice, and `status` lists the instances.
//! A backup taken under registrations restores into a wiped database.

use anyhow::{Result, ensure};
use homecell_harness::api::Api;
use homecell_harness::postgres::TempPostgres;
use homecell_harness::{Cluster, start_standard};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::{Duration, Instant};

const PASSWORD: &str = "a long password";

fn status(c: &Cluster) -> Result<Value> {
    c.cli_ok(&["-o", "json", "status"])?.json()
}

/// node id → (attached instance, connected), for every subscriber.
fn attachments(s: &Value) -> Vec<(String, String, bool)> {
    s["subscribers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                r["instance"].as_str().unwrap_or_default().to_string(),
                r["connected"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[tokio::test]
async fn subscribers_fail_over_when_their_instance_is_killed() -> Result<()> {
    let pg = TempPostgres::start()?;
    let mut c = Cluster::temp()?;
    c.control_plane_postgres = Some(pg.create_database("cp")?);
    let second = c.add_control_plane_instance();
    let third = c.add_control_plane_instance();
    start_standard(&mut c).await?;
    c.start_control_plane_instance(second).await?;
    c.start_control_plane_instance(third).await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;

    let s = status(&c)?;
    assert_eq!(s["store"], "postgres");
    let instances: Vec<&str> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(instances, ["cp-0", "cp-1", "cp-2"], "{s}");

    let api = Api::new(&c.router_url(0), "cn-east");
    let mut registered = Vec::new();
    for i in 0..5 {
        let who = format!("before{i}@example.com");
        api.signed_in(&who, PASSWORD).await?;
        registered.push(who);
    }

    // Every component was started knowing only cp-0 was up: all are
    // attached to it. Kill it.
    let before = attachments(&status(&c)?);
    ensure!(
        before.len() >= 3,
        "router and two cells subscribe: {before:?}"
    );
    ensure!(
        before.iter().all(|(_, i, up)| i == "cp-0" && *up),
        "{before:?}"
    );
    c.kill_control_plane_instance(0);
    let killed_at = Instant::now();

    // Registrations go on meanwhile, each through whichever instance
    // answers its cell; none hangs past its timeout.
    let mut during = Vec::new();
    let mut reattached = None;
    for i in 0.. {
        let who = format!("during{i}@example.com");
        let t = Instant::now();
        let r = api.register(&who, PASSWORD).await?;
        ensure!(
            t.elapsed() < Duration::from_secs(12),
            "a registration hung {:?}",
            t.elapsed()
        );
        if r.status == StatusCode::CREATED {
            during.push(who);
        } else {
            ensure!(
                r.status == StatusCode::SERVICE_UNAVAILABLE,
                "{}: {}",
                r.status,
                r.body
            );
        }
        if reattached.is_none() {
            let now = attachments(&status(&c)?);
            let moved = before.iter().all(|(node, _, _)| {
                now.iter()
                    .any(|(n, inst, up)| n == node && inst != "cp-0" && *up)
            });
            if moved {
                reattached = Some(killed_at.elapsed());
            }
        }
        if reattached.is_some() && during.len() >= 5 {
            break;
        }
        ensure!(
            killed_at.elapsed() < Duration::from_secs(30),
            "subscribers did not re-attach: {:?}",
            attachments(&status(&c)?)
        );
    }
    let reattached = reattached.expect("set before the loop ends");
    eprintln!("every subscriber re-attached {reattached:?} after the kill");
    ensure!(
        reattached < Duration::from_secs(5),
        "re-attaching took {reattached:?}"
    );

    // Every identifier is held exactly once: registering it again is 409,
    // and it signs in, routed by the directory through the router.
    for who in registered.iter().chain(&during) {
        let again = api.register(who, PASSWORD).await?;
        assert_eq!(again.status, StatusCode::CONFLICT, "{who}: {}", again.body);
        let eu = Api::new(&c.router_url(0), "eu-west");
        assert_eq!(
            eu.login(who, PASSWORD).await?.status,
            StatusCode::OK,
            "{who}"
        );
    }

    // The killed instance comes back and is listed alive again.
    c.start_control_plane_instance(0).await?;
    let s = status(&c)?;
    let alive: Vec<bool> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["alive"].as_bool().unwrap())
        .collect();
    assert_eq!(alive, [true, true, true], "{s}");
    Ok(())
}

#[tokio::test]
async fn a_backup_taken_under_load_restores_into_a_wiped_database() -> Result<()> {
    let pg = TempPostgres::start()?;
    let mut c = Cluster::temp()?;
    c.control_plane_postgres = Some(pg.create_database("cp")?);
    let second = c.add_control_plane_instance();
    start_standard(&mut c).await?;
    c.start_control_plane_instance(second).await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;
    // The load comes from one address: the router's limit off.
    c.cli_ok(&[
        "config",
        "set",
        "router.rate_limit.registrations_per_ip",
        "0",
    ])?;
    let api = Api::new(&c.router_url(0), "cn-east");
    api.signed_in("before@example.com", PASSWORD).await?;

    // Registrations go on while the backup is taken.
    let load = tokio::spawn({
        let api = Api::new(&c.router_url(0), "cn-east");
        async move {
            for i in 0..40 {
                api.register(&format!("load{i}@example.com"), PASSWORD)
                    .await?;
            }
            anyhow::Ok(())
        }
    });
    let backup = c.root.join("cp.backup");
    let b = c
        .cli_ok(&["-o", "json", "backup", "--out", backup.to_str().unwrap()])?
        .json()?;
    load.await??;
    let old_epoch = status(&c)?["epoch"].clone();

    // The database is lost: every instance stops, it is dropped and made
    // again empty, and the backup restored into it.
    c.stop_control_plane();
    if let Some(mut p) = c.more_control_planes[second - 1].process.take() {
        p.terminate(Duration::from_secs(5));
    }
    pg.drop_database("cp")?;
    pg.create_database("cp")?;
    let config = c.root.join("config/control-plane.toml");
    let r = c
        .cli_ok(&[
            "-o",
            "json",
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])?
        .json()?;
    assert_eq!(
        r["from_revision"].as_str(),
        Some(&*b["revision"].to_string()),
        "{r}"
    );
    assert!(
        !r.to_string().contains("postgres://"),
        "the URL is never printed: {r}"
    );
    // Never over a store that exists.
    let again = c.cli(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ])?;
    assert!(
        !again.success && again.stderr.contains("already holds a store"),
        "{}",
        again.stderr
    );

    c.start_control_plane().await?;
    c.start_control_plane_instance(second).await?;
    let s = status(&c)?;
    assert_ne!(s["epoch"], old_epoch, "a restore starts a new epoch: {s}");
    // Every subscriber takes the new epoch's snapshot.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&c)?;
        let subs = s["subscribers"].as_array().cloned().unwrap_or_default();
        if subs.len() == 3
            && subs
                .iter()
                .all(|x| x["connected"] == true && x["epoch"] == s["epoch"])
        {
            break;
        }
        ensure!(Instant::now() < deadline, "subscribers did not resync: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An identifier claimed before the backup is still taken.
    let r = api.register("before@example.com", PASSWORD).await?;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    Ok(())
}
