//! A directory larger than one snapshot part, end to end: imported into the
//! control plane's store, streamed in parts to cells and a new router over
//! gRPC, routed by, and persisted.

use anyhow::Result;
use homecell_common::replica::Replica;
use homecell_control_plane::store::Store;
use homecell_harness::standard;
use homecell_proto::control::IdentifierClaim;
use std::time::Duration;

const USERS: u32 = 25_000; // two and a half parts of 10,000 rows, twice over

fn user(n: u32) -> (String, String, &'static str) {
    let id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | u128::from(n));
    let hmac = format!("{:064x}", u128::from(n) * 0x9e37_79b9_7f4a_7c15 + 1);
    let region = if n.is_multiple_of(2) {
        "cn-east"
    } else {
        "eu-west"
    };
    (id.to_string(), hmac, region)
}

#[tokio::test]
async fn a_directory_of_several_snapshot_parts_reaches_routers_and_cells() -> Result<()> {
    let mut c = standard().start().await?;
    // A user registered the usual way, before the import.
    let api = homecell_harness::api::Api::new(&c.router_url(0), "eu-west");
    let (_, login) = api
        .signed_in("before@example.com", "a long password")
        .await?;
    let before = login["user_id"].as_str().unwrap_or_default().to_string();

    c.stop_control_plane();
    let store = Store::open(&c.root.join("control-plane/control-plane.redb"), 1000)?;
    store.import_claims((0..USERS).map(|n| {
        let (user_id, hmac, region) = user(n);
        IdentifierClaim {
            hmac,
            user_id,
            region: region.into(),
        }
    }))?;
    drop(store);
    c.start_control_plane().await?;

    // The import cut the log: the router already running and a new one both
    // take the snapshot, in parts.
    c.start_router("eu-west", "eu-west").await?;
    c.wait_ready(Duration::from_secs(30)).await?;
    let target = c.revision()?;
    for i in 0..c.routers.len() {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = c.router_metrics(i).await?;
            if m.contains(&format!("homecell_replica_revision {target}")) {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "router {i} is behind");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // User-addressed requests route by the imported directory at both routers.
    for n in [0, 1, USERS - 2, USERS - 1] {
        let (id, _, region) = user(n);
        for i in 0..c.routers.len() {
            let r = c
                .http()
                .get(format!("{}/v1/users/{id}", c.router_url(i)))
                .send()
                .await?;
            assert_eq!(
                r.headers()["x-home-region"],
                region,
                "user {n} via router {i}"
            );
        }
    }
    // The user registered before the import is still in the directory.
    let r = c
        .http()
        .get(format!("{}/v1/users/{before}", c.router_url(0)))
        .send()
        .await?;
    assert_eq!(r.headers()["x-home-region"], "eu-west");

    // What the new router persisted holds everything.
    if let Some(mut p) = c.routers[1].process.take() {
        p.terminate(Duration::from_secs(5));
    }
    let replica = Replica::open(&c.root.join("router-1/replica.redb"))?;
    let state = replica.state();
    assert_eq!(state.revision, target);
    assert_eq!(
        state.directory.counts(),
        (USERS as usize + 1, USERS as usize + 1)
    );

    // A backup of a directory this size spans many stream messages; it
    // restores row for row.
    let backup = c.root.join("cp.backup");
    let b = c
        .cli_ok(&["-o", "json", "backup", "--out", backup.to_str().unwrap()])?
        .json()?;
    assert_eq!(b["claims"], USERS + 1);
    c.stop_control_plane();
    let restored = homecell_control_plane::backup::restore(
        &backup,
        &homecell_control_plane::store::Location::File(c.root.join("restored.redb")),
        1000,
    )?;
    let original = Store::open(&c.root.join("control-plane/control-plane.redb"), 1000)?;
    let (a, b) = (original.snapshot()?, restored.snapshot()?);
    assert_eq!((a.users, a.claims), (b.users, b.claims));
    assert_eq!(restored.parent().map(|p| p.epoch), Some(original.epoch()));
    Ok(())
}
