//! Three control-plane instances over one private PostgreSQL, each in a
//! network namespace of the test's own, under a steady load of
//! registrations (through the router) and config changes. One fault at a
//! time hits the instance every subscriber is attached to:
//! - SIGKILL;
//! - a partition from PostgreSQL (its packets to the database dropped);
//! - a partition from its subscribers (its gRPC port's packets dropped).
//!
//! For each, every subscriber must be attached to another instance within
//! 5 s, no registration may hang past the cell's 10 s deadline to the
//! control plane, every identifier must end up registered exactly once
//! (re-registering it is 409 and it signs in, routed by the directory),
//! and every subscriber must reach the head with no NACK (no revision
//! missing or out of order).
//!
//! Last, all three are cut off from everything for a minute while a
//! signed-in client drives the router: its requests must all succeed,
//! registrations must get a 503 with `Retry-After` without hanging, and
//! all must resume once the partition heals.

use anyhow::{Context, Result, ensure};
use homecell_common::tls::PeerIdentity;
use homecell_harness::api::Api;
use homecell_harness::netns::NetNs;
use homecell_harness::postgres::TempPostgres;
use homecell_harness::{Cluster, start_standard};
use homecell_proto::control::directory_service_client::DirectoryServiceClient;
use homecell_proto::control::{ClaimIdentifierRequest, ReleaseIdentifierRequest};
use reqwest::StatusCode;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PASSWORD: &str = "a long password";
/// The cell's deadline for a call to the control plane, and a margin.
const REGISTRATION_BOUND: Duration = Duration::from_secs(13);
/// How soon every subscriber is on another instance after a fault. Most
/// runs take under 5 s; the bound is the worst case docs/ARCHITECTURE.md
/// states: an instance cut from PostgreSQL while one of its queries is in
/// flight notices only at the query's 15 s client-side deadline
/// (`QUERY_DEADLINE`), then steps aside; a loaded machine (CI) sees that
/// case about one run in three, 15.09 s.
const REATTACH_WITHIN: Duration = Duration::from_secs(20);

struct Setup {
    _pg: TempPostgres,
    ns: Vec<Arc<NetNs>>,
    c: Cluster,
    pg_port: u16,
}

async fn three_instances_in_namespaces() -> Result<Setup> {
    let ns: Vec<Arc<NetNs>> = (0..3)
        .map(|_| NetNs::create().map(Arc::new))
        .collect::<Result<_>>()?;
    let pg = TempPostgres::start_on(&ns.iter().map(|n| n.host_ip).collect::<Vec<_>>())?;
    let mut c = Cluster::temp()?;
    // The load comes from one address: lift the per-address limits.
    // A claim a cell made but could not settle (its answer lost in the
    // fault) is released after 10 s (the least allowed) instead of 60.
    c.cell_extra_config = "registrations_per_ip_per_minute = 100000\n\
        login_attempts_per_ip_per_minute = 100000\n\
        unsettled_claims_release_after_secs = 10\n"
        .into();
    c.control_plane_postgres = Some(pg.create_database("cp")?);
    c.add_control_plane_instance();
    c.add_control_plane_instance();
    for (i, n) in ns.iter().enumerate() {
        c.place_control_plane(i, n.clone(), pg.url_at(n.host_ip, "cp"));
    }
    start_standard(&mut c).await?;
    c.start_control_plane_instance(1).await?;
    c.start_control_plane_instance(2).await?;
    c.wait_signing_keys(Duration::from_secs(15)).await?;
    // The router's own limit on registrations per address, off.
    c.cli_ok(&[
        "config",
        "set",
        "router.rate_limit.registrations_per_ip",
        "0",
    ])?;
    let pg_port = pg.port;
    Ok(Setup {
        _pg: pg,
        ns,
        c,
        pg_port,
    })
}

/// `status` from the instances other than `victim` (the CLI would
/// otherwise spend its dial timeout on a cut-off instance first).
fn status_without(c: &Cluster, victim: usize) -> Result<Value> {
    let others: Vec<String> = std::iter::once(&c.control_plane)
        .chain(&c.more_control_planes)
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| format!("https://{}", n.grpc))
        .collect();
    c.cli_ok(&["--endpoint", &others.join(","), "-o", "json", "status"])?
        .json()
}

/// (node id, instance, connected, applied revision, last error).
fn subscribers(s: &Value) -> Vec<(String, String, bool, u64, String)> {
    s["subscribers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().into(),
                r["instance"].as_str().unwrap_or_default().into(),
                r["connected"].as_bool().unwrap_or(false),
                r["applied_revision"].as_u64().unwrap_or(0),
                r["last_error"].as_str().unwrap_or_default().into(),
            )
        })
        .collect()
}

/// Registrations and config changes until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    registrations: tokio::task::JoinHandle<Result<Vec<(String, StatusCode, Duration)>>>,
    config: tokio::task::JoinHandle<Result<u32>>,
}

fn start_load(c: &Cluster, tag: &'static str) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let api = Api::new(&c.router_url(0), "cn-east");
    let registrations = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut out = Vec::new();
            // Bounded in count as well as by `stop`.
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let who = format!("{tag}{i}@example.com");
                let t = Instant::now();
                let r = api.register(&who, PASSWORD).await?;
                out.push((who, r.status, t.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(out)
        }
    });
    let endpoint = c.control_plane_endpoint();
    let cli = c.cli_path();
    let pki = c.pki_dir.clone();
    let config = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || {
            let mut set = 0;
            for i in 0..500u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ok = std::process::Command::new(&cli)
                    .args([
                        "config",
                        "set",
                        "auth.lockout.max_failures",
                        &(5 + i % 5).to_string(),
                    ])
                    .env("HOMECELL_CONTROL_PLANE", &endpoint)
                    .env("HOMECELL_PKI_DIR", &pki)
                    .output()?
                    .status
                    .success();
                set += u32::from(ok);
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(set)
        }
    });
    Load {
        stop,
        registrations,
        config,
    }
}

enum Fault {
    Kill,
    CutFromPostgres,
    CutFromSubscribers,
}

async fn survives(fault: Fault, tag: &'static str) -> Result<()> {
    let mut s = three_instances_in_namespaces().await?;
    let victim = 0;
    // Every component started knowing only cp-0 was up: all attach there.
    let before = subscribers(&status_without(&s.c, 1)?);
    ensure!(before.len() >= 3, "router and two cells: {before:?}");
    ensure!(before.iter().all(|b| b.1 == "cp-0" && b.2), "{before:?}");

    let load = start_load(&s.c, tag);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grpc_port = s.c.control_plane.grpc.port();
    match fault {
        Fault::Kill => s.c.kill_control_plane_instance(victim),
        Fault::CutFromPostgres => s.ns[victim].cut_to_host(s.pg_port)?,
        Fault::CutFromSubscribers => s.ns[victim].cut_port(grpc_port)?,
    }
    let cut_at = Instant::now();
    let reattached = loop {
        let now = subscribers(&status_without(&s.c, victim)?);
        let moved = before
            .iter()
            .all(|b| now.iter().any(|n| n.0 == b.0 && n.1 != "cp-0" && n.2));
        if moved {
            break cut_at.elapsed();
        }
        ensure!(
            cut_at.elapsed() < Duration::from_secs(30),
            "subscribers did not re-attach: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("{tag}: every subscriber re-attached {reattached:?} after the fault");
    ensure!(
        reattached < REATTACH_WITHIN,
        "{tag}: re-attaching took {reattached:?}"
    );
    // Load goes on past the fault, then the fault heals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.stop.store(true, Ordering::Relaxed);
    let registered = load.registrations.await??;
    let config_set = load.config.await??;
    match fault {
        Fault::Kill => s.c.start_control_plane_instance(victim).await?,
        _ => s.ns[victim].heal()?,
    }
    ensure!(config_set > 0, "no config change went through");

    // No registration hung.
    let slowest = registered.iter().map(|r| r.2).max().unwrap_or_default();
    eprintln!(
        "{tag}: {} registrations, {} refused, slowest {slowest:?}",
        registered.len(),
        registered
            .iter()
            .filter(|r| r.1 != StatusCode::CREATED)
            .count()
    );
    ensure!(
        slowest < REGISTRATION_BOUND,
        "{tag}: a registration took {slowest:?}"
    );

    // Every subscriber reaches the head, with no NACK on the way (one more
    // change after the fault, so each has something to ACK).
    s.c.cli_ok(&["config", "set", "auth.lockout.max_failures", "11"])?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = status_without(&s.c, usize::MAX)?;
        let head = st["revision"].as_u64().context("revision")?;
        let subs = subscribers(&st);
        if subs.iter().all(|x| x.3 == head && x.2) {
            ensure!(subs.iter().all(|x| x.4.is_empty()), "{subs:?}");
            break;
        }
        ensure!(Instant::now() < deadline, "not at head {head}: {subs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = s.c.router_metrics(0).await?;
    let nacks = metrics
        .lines()
        .find(|l| l.starts_with("homecell_replica_nacks_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    ensure!(nacks == 0.0, "the router NACKed {nacks} responses");

    // Every identifier is registered exactly once: one refused under the
    // fault is registered now (or already was), and each signs in,
    // reaching its cell by the directory's claim (the router holds the
    // head by now).
    let api = Api::new(&s.c.router_url(0), "cn-east");
    let elsewhere = Api::new(&s.c.router_url(0), "eu-west");
    for (who, status, _) in &registered {
        ensure!(
            [StatusCode::CREATED, StatusCode::SERVICE_UNAVAILABLE].contains(status),
            "{who}: {status}"
        );
        if *status == StatusCode::CREATED {
            let again = api.register(who, PASSWORD).await?;
            ensure!(
                again.status == StatusCode::CONFLICT,
                "{who} was registered, then {} {}",
                again.status,
                again.body
            );
        } else {
            // Refused: registering it again succeeds, at once or once the
            // cell has released a claim whose answer it lost in the fault.
            // Or it was registered after all: the router gave up on the
            // cell (its read timeout is shorter than the cell's 5 s claim
            // deadline) while the cell went on and made the user. Then it
            // is taken, and signs in with its password.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let again = api.register(who, PASSWORD).await?;
                if again.status == StatusCode::CREATED
                    || (again.status == StatusCode::CONFLICT
                        && elsewhere.login(who, PASSWORD).await?.status == StatusCode::OK)
                {
                    break;
                }
                ensure!(
                    [StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE].contains(&again.status)
                        && Instant::now() < deadline,
                    "{who} was refused, then {} {}",
                    again.status,
                    again.body
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // The router learns of the last registrations.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (who, status, _) in &registered {
        let login = elsewhere.login(who, PASSWORD).await?;
        ensure!(
            login.status == StatusCode::OK,
            "{who} (first {status}) does not sign in: {}",
            login.status
        );
    }
    Ok(())
}

#[tokio::test]
async fn kill_the_instance_subscribers_are_attached_to() -> Result<()> {
    survives(Fault::Kill, "kill").await
}

#[tokio::test]
async fn cut_the_attached_instance_from_postgres() -> Result<()> {
    survives(Fault::CutFromPostgres, "cutdb").await
}

/// Also the test for claims that expire: a claim sent just before the cut
/// reaches the cut-off instance again when the cut heals (TCP retransmits
/// it), after the cell has timed it out and released it. Before claims
/// carried their deadline it landed then, and the identifier stayed taken
/// by no user (409 for good, about one run in three).
#[tokio::test]
async fn cut_the_attached_instance_from_its_subscribers() -> Result<()> {
    survives(Fault::CutFromSubscribers, "cutsubs").await
}

/// A claim that reaches an instance only after its deadline (sent into a
/// partition, delivered by TCP's retransmission once it heals) is refused,
/// and the identifier stays free. Before claims carried a deadline it
/// landed then, after the cell had given up and released it: taken by no
/// user, for good. The request is kept open (no reset) so that it is
/// surely delivered.
#[tokio::test]
async fn a_claim_delivered_after_its_deadline_is_refused() -> Result<()> {
    let s = three_instances_in_namespaces().await?;
    let cell = PeerIdentity::Cell {
        region: "cn-east".into(),
    };
    let claim = |user: &str, not_after_unix_ms: u64| ClaimIdentifierRequest {
        identifier: "username:late-claim".into(),
        user_id: user.into(),
        region: "cn-east".into(),
        not_after_unix_ms,
        replaces: String::new(),
    };
    // Instance 0, connected before the cut.
    let mut client = DirectoryServiceClient::new(s.c.control_plane_as(&cell).await?);
    client
        .release_identifier(ReleaseIdentifierRequest {
            identifier: "username:late-claim".into(),
            user_id: "u-late".into(),
            region: "cn-east".into(),
        })
        .await?;
    s.ns[0].cut_port(s.c.control_plane.grpc.port())?;
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let late = claim("u-late", now + 1_000);
    let sent = tokio::spawn(async move { client.claim_identifier(late).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.ns[0].heal()?;
    let answer = tokio::time::timeout(Duration::from_secs(30), sent).await??;
    ensure!(
        matches!(&answer, Err(e) if e.code() == tonic::Code::FailedPrecondition),
        "a claim delivered 2 s past its deadline: {answer:?}"
    );
    DirectoryServiceClient::new(s.c.control_plane_as(&cell).await?)
        .claim_identifier(claim("u-other", 0))
        .await
        .context("the identifier stays free")?;
    Ok(())
}

/// How long the control plane is cut off from everything.
const CUT_OFF_FOR: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_control_plane_cut_off_from_everything_for_a_minute() -> Result<()> {
    let s = three_instances_in_namespaces().await?;
    let api = Api::new(&s.c.router_url(0), "cn-east");
    let (user, _) = api.signed_in("steady@example.com", PASSWORD).await?;
    for ns in &s.ns {
        ns.cut_all()?;
    }
    let cut_at = Instant::now();
    let (mut reads, mut reads_ok) = (0u32, 0u32);
    let mut registrations: Vec<(StatusCode, Duration, Option<String>)> = Vec::new();
    let mut i = 0;
    while cut_at.elapsed() < CUT_OFF_FOR {
        for _ in 0..10 {
            reads += 1;
            reads_ok += u32::from(user.get("/v1/users/me").await?.status == StatusCode::OK);
        }
        let t = Instant::now();
        let r = api
            .register(&format!("cut{i}@example.com"), PASSWORD)
            .await?;
        registrations.push((
            r.status,
            t.elapsed(),
            r.header("retry-after").map(str::to_string),
        ));
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for ns in &s.ns {
        ns.heal()?;
    }
    let slowest = registrations.iter().map(|r| r.1).max().unwrap_or_default();
    let fast = registrations
        .iter()
        .filter(|r| r.1 < Duration::from_millis(500))
        .count();
    eprintln!(
        "cut off {CUT_OFF_FOR:?}: {reads_ok}/{reads} signed-in reads OK; {} registrations, {fast} answered within 0.5 s, slowest {slowest:?}",
        registrations.len()
    );
    ensure!(
        reads_ok == reads,
        "signed-in reads failed: {reads_ok}/{reads}"
    );
    for (status, took, retry_after) in &registrations {
        ensure!(
            *status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some(),
            "a registration got {status} (Retry-After {retry_after:?})"
        );
        ensure!(
            *took < Duration::from_secs(6),
            "a registration hung {took:?}"
        );
    }
    ensure!(
        fast * 10 >= registrations.len() * 9,
        "fewer than 90% of registrations were refused at once: {fast}/{}",
        registrations.len()
    );

    // Healed: registrations go through again within seconds.
    let healed_at = Instant::now();
    let mut n = 0;
    loop {
        let r = api
            .register(&format!("after{n}@example.com"), PASSWORD)
            .await?;
        if r.status == StatusCode::CREATED {
            break;
        }
        ensure!(
            healed_at.elapsed() < Duration::from_secs(20),
            "registrations did not resume: {} {}",
            r.status,
            r.body
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "registrations resumed {:?} after the partition healed",
        healed_at.elapsed()
    );
    Ok(())
}
