//! The control plane's store lost and rebuilt, end to end: from an online
//! backup taken while registrations went on, and from a router's replica
//! when no backup is left. Either way the rebuilt store starts a new epoch;
//! routers and cells take its snapshot, those that held more say so, and
//! the cells assert their users' claims again, so every identifier is
//! routed and held once more.

use anyhow::{Context, Result, ensure};
use homecell_harness::api::Api;
use homecell_harness::{Cluster, standard};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::{Duration, Instant};

const PASSWORD: &str = "a long password";

/// Retries `check` for up to `secs` seconds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn status(c: &Cluster) -> Result<Value> {
    c.cli_ok(&["-o", "json", "status"])?.json()
}

/// Moves the control plane's store aside (as a lost disk would).
fn lose_the_store(c: &mut Cluster) -> Result<()> {
    c.stop_control_plane();
    let store = c.root.join("control-plane/control-plane.redb");
    std::fs::rename(&store, store.with_extension("lost")).context("move the store aside")?;
    Ok(())
}

/// Whether `who` signs in through `api`. Tests pass an `Api` whose
/// `x-home-region` names the wrong region: the router then finds the
/// user's cell only by the identifier's claim in its directory.
async fn logs_in(api: &Api, who: &str) -> Result<bool> {
    Ok(api.login(who, PASSWORD).await?.status == StatusCode::OK)
}

#[tokio::test]
async fn a_restored_control_plane_gets_back_what_the_cells_hold() -> Result<()> {
    let mut c = standard().start().await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let cn = Api::new(&c.router_url(0), "cn-east");
    eu.signed_in("before@example.com", PASSWORD).await?;

    let backup = c.root.join("cp.backup");
    let b = c
        .cli_ok(&["-o", "json", "backup", "--out", backup.to_str().unwrap()])?
        .json()?;
    let backed_up = b["revision"].as_u64().context("revision")?;
    ensure!(b["claims"].as_u64() >= Some(1) && b["regions"] == 2, "{b}");
    ensure!(
        !c.cli(&["backup", "--out", backup.to_str().unwrap()])?
            .success,
        "a backup never overwrites a file"
    );

    // A registration after the backup: the restored store will not hold it.
    let r = eu.register("after@example.com", PASSWORD).await?;
    ensure!(r.status == StatusCode::CREATED, "{}", r.body);
    let old_epoch = status(&c)?["epoch"].clone();

    lose_the_store(&mut c)?;
    // A damaged backup restores nothing, with a one-line error.
    let damaged = c.root.join("damaged.backup");
    let bytes = std::fs::read(&backup)?;
    std::fs::write(&damaged, &bytes[..bytes.len() - 10])?;
    let data_dir = c.root.join("control-plane");
    let out = c.cli(&[
        "restore",
        "--from",
        damaged.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])?;
    // (Progress lines come before the error, on stderr too.)
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    ensure!(
        !out.success && errors.len() == 1 && errors[0].contains("truncated"),
        "{}",
        out.stderr
    );
    ensure!(!data_dir.join("control-plane.redb").exists());

    let r = c
        .cli_ok(&[
            "-o",
            "json",
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])?
        .json()?;
    ensure!(
        r["from_revision"].as_str() == Some(&*backed_up.to_string()),
        "{r}"
    );
    c.start_control_plane().await?;
    let s = status(&c)?;
    ensure!(s["epoch"] != old_epoch, "a restore starts a new epoch: {s}");

    // Every subscriber held revisions past the backup: each reports the
    // conflict (in status, and in its own metric) and takes the snapshot.
    eventually(20, "every subscriber reports the conflict", || async {
        let s = status(&c)?;
        let subs = s["subscribers"].as_array().cloned().unwrap_or_default();
        Ok(subs.len() == 3
            && subs.iter().all(|x| {
                x["connected"] == true
                    && x["epoch"] == s["epoch"]
                    && x["conflict"]
                        .as_str()
                        .is_some_and(|c| c.contains("past the revision"))
            }))
    })
    .await?;
    let metrics = c.router_metrics(0).await?;
    ensure!(
        metrics.contains("homecell_replica_epoch_conflicts_total 1"),
        "{metrics}"
    );

    // The cell re-asserted the claim the backup lacked: the identifier
    // routes to its home again (asked with the wrong region's hint), and
    // nobody can take it elsewhere.
    eventually(30, "the later user signs in again", || {
        logs_in(&cn, "after@example.com")
    })
    .await?;
    ensure!(logs_in(&cn, "before@example.com").await?);
    let again = cn.register("after@example.com", PASSWORD).await?;
    ensure!(again.status == StatusCode::CONFLICT, "{}", again.body);

    // A pass for another epoch (the store rebuilt again meanwhile) is
    // refused: its `last` must not drop what the new store reserves.
    let channel = c
        .control_plane_as(&homecell_common::tls::PeerIdentity::Cell {
            region: "eu-west".into(),
        })
        .await?;
    let stale =
        homecell_proto::control::directory_service_client::DirectoryServiceClient::new(channel)
            .reassert_claims(homecell_proto::control::ReassertClaimsRequest {
                region: "eu-west".into(),
                claims: Vec::new(),
                last: true,
                epoch: 1,
            })
            .await;
    ensure!(
        stale.as_ref().err().map(|s| s.code()) == Some(tonic::Code::FailedPrecondition),
        "{stale:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_control_plane_recovered_from_a_replica_gets_its_claims_back_from_the_cells() -> Result<()>
{
    let mut c = standard().start().await?;
    let eu = Api::new(&c.router_url(0), "eu-west");
    let cn = Api::new(&c.router_url(0), "cn-east");
    cn.signed_in("anna@example.com", PASSWORD).await?;
    eu.signed_in("emil@example.com", PASSWORD).await?;
    c.cli_ok(&["config", "set", "ops.recovery-drill", "7", "--type", "int"])?;
    let revision = c.revision()?;
    c.wait_applied(revision, 3, Duration::from_secs(10)).await?;

    // The store is lost and there is no backup: rebuild from the router's
    // replica (the router is stopped so its file is whole).
    c.stop_router(0);
    lose_the_store(&mut c)?;
    let replica = c.root.join("router-0/replica.redb");
    let data_dir = c.root.join("control-plane");
    let r = c
        .cli_ok(&[
            "-o",
            "json",
            "recover",
            "--from-replica",
            replica.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])?
        .json()?;
    ensure!(
        r["from_revision"].as_str() == Some(&*revision.to_string())
            && r["regions"] == "2"
            && r["signing_keys"]
                .as_str()
                .and_then(|s| s.parse::<u32>().ok())
                >= Some(2)
            && r["users"] == "2"
            && r["claims_to_reassert"] == "2",
        "{r}"
    );
    c.start_control_plane().await?;
    c.restart_router(0, "cn-east").await?;

    // Regions, keys and config came back from the replica.
    let v = c
        .cli_ok(&["-o", "json", "config", "get", "ops.recovery-drill"])?
        .json()?;
    ensure!(v.to_string().contains('7'), "{v}");
    c.wait_signing_keys(Duration::from_secs(5)).await?;
    // Rollback cannot reach history the replica did not hold.
    ensure!(
        !c.cli(&["config", "rollback", "--to", "1"])?.success,
        "rollback below the recovery is refused"
    );

    // The claims come back from the cells: both users sign in through the
    // router again, and their identifiers are held.
    eventually(30, "both users sign in again", || async {
        Ok(logs_in(&eu, "anna@example.com").await? && logs_in(&cn, "emil@example.com").await?)
    })
    .await?;
    let taken = eu.register("anna@example.com", PASSWORD).await?;
    ensure!(taken.status == StatusCode::CONFLICT, "{}", taken.body);
    Ok(())
}

/// Routers, cells and the CLI take a list of control-plane instances and
/// use whichever answers: here the first listed is down for good.
#[tokio::test]
async fn cells_and_the_cli_use_the_control_plane_instance_that_answers() -> Result<()> {
    let mut c = standard().start().await?;
    let down = format!("https://127.0.0.1:{}", homecell_harness::free_port());
    let list = format!("{down},{}", c.control_plane_endpoint());

    let s = c
        .cli_ok(&["--endpoint", &list, "-o", "json", "status"])?
        .json()?;
    ensure!(s["revision"].as_u64() > Some(0), "{s}");
    let none = c.cli(&["--endpoint", &down, "status"])?;
    ensure!(
        !none.success && none.stderr.contains("cannot reach the control plane"),
        "{}",
        none.stderr
    );

    c.kill_cell("eu-west");
    c.cell_mut("eu-west")
        .context("eu-west")?
        .env
        .push(("HOMECELL_CELL_CONTROL_PLANE".into(), list));
    c.start_cell("eu-west").await?;
    c.wait_ready(Duration::from_secs(20)).await?;
    // Its claims reach the instance that answers, and its replica attaches.
    let eu = Api::new(&c.router_url(0), "eu-west");
    let r = eu.register("listed@example.com", PASSWORD).await?;
    ensure!(r.status == StatusCode::CREATED, "{}", r.body);
    let revision = c.revision()?;
    c.wait_applied(revision, 3, Duration::from_secs(10)).await?;
    Ok(())
}
