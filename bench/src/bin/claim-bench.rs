//! Registrations per second at the control plane with a dozen subscribers
//! watching: every claim is one mutation (one fsync on the one global
//! writer), and every subscriber ACKs every revision it is sent.
//!
//! 1. A control plane (from `HOMECELL_BIN_DIR`, so two builds compare A/B)
//!    with one region.
//! 2. `--subscribers` Watch streams that ACK each response at once, as
//!    routers and cells do.
//! 3. `--workers` tasks claim fresh identifiers (`ClaimIdentifier`, with the
//!    region's cell certificate) for `--seconds`.
//!
//! Prints claims per second, latency percentiles, and how far the
//! subscribers trail at the end.
//!
//! With `--postgres`, the control plane's store is a private PostgreSQL
//! (durable: fsync and synchronous commit on, as redb is) instead of its
//! redb file.

use anyhow::{Context, Result};
use clap::Parser;
use homecell_common::tls::{PeerIdentity, Pki};
use homecell_harness::Cluster;
use homecell_proto::control::{
    Ack, ClaimIdentifierRequest, Subscribe, SubscriberKind, WatchRequest,
    directory_service_client::DirectoryServiceClient, sync_service_client::SyncServiceClient,
    watch_request, watch_response,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 12)]
    subscribers: usize,
    #[arg(long, default_value_t = 16)]
    workers: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The store on a private, durable PostgreSQL.
    #[arg(long)]
    postgres: bool,
}

async fn channel(c: &Cluster, who: &PeerIdentity) -> Result<Channel> {
    let paths = Pki::open_or_create(&c.pki_dir)?.issue(who, &[])?;
    Ok(Channel::from_shared(c.control_plane_endpoint())?
        .tls_config(paths.load()?.tonic_client("control-plane"))?
        .connect()
        .await?)
}

/// One subscriber: ACKs every response; records the last revision applied.
async fn subscribe(ch: Channel, n: usize, applied: Arc<AtomicU64>) -> Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(WatchRequest {
        kind: Some(watch_request::Kind::Subscribe(Subscribe {
            node_id: format!("bench-subscriber-{n}"),
            kind: SubscriberKind::Router as i32,
            region: "cn-east".into(),
            from_revision: 0,
            epoch: 0,
        })),
    })
    .await?;
    let mut stream = SyncServiceClient::new(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(m) = stream.message().await? {
        let revision = match m.kind {
            Some(watch_response::Kind::Snapshot(s)) if s.more => continue,
            Some(watch_response::Kind::Snapshot(s)) => s.revision,
            Some(watch_response::Kind::Delta(d)) => d.revision,
            None => continue,
        };
        applied.store(revision, Ordering::Relaxed);
        tx.send(WatchRequest {
            kind: Some(watch_request::Kind::Ack(Ack { revision })),
        })
        .await?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut c = Cluster::temp()?;
    let _pg = if args.postgres {
        let pg = homecell_harness::postgres::TempPostgres::start_durable()?;
        c.control_plane_postgres = Some(pg.create_database("cp")?);
        Some(pg)
    } else {
        None
    };
    c.start_control_plane().await?;
    c.add_region("cn-east", "CN")?;

    let operator = PeerIdentity::Operator {
        name: "admin".into(),
    };
    let mut applied = Vec::new();
    for n in 0..args.subscribers {
        let a = Arc::new(AtomicU64::new(0));
        applied.push(a.clone());
        let ch = channel(&c, &operator).await?;
        tokio::spawn(async move {
            if let Err(e) = subscribe(ch, n, a).await {
                eprintln!("subscriber {n}: {e:#}");
            }
        });
    }
    let start_revision = c.revision()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while applied
        .iter()
        .any(|a| a.load(Ordering::Relaxed) < start_revision)
    {
        anyhow::ensure!(Instant::now() < deadline, "subscribers did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let cell = channel(
        &c,
        &PeerIdentity::Cell {
            region: "cn-east".into(),
        },
    )
    .await?;
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for w in 0..args.workers {
        let mut client = DirectoryServiceClient::new(cell.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                let t = Instant::now();
                client
                    .claim_identifier(ClaimIdentifierRequest {
                        identifier: format!("username:bench-{w}-{n}"),
                        user_id: uuid::Uuid::now_v7().to_string(),
                        region: "cn-east".into(),
                        not_after_unix_ms: 0,
                        replaces: String::new(),
                    })
                    .await
                    .context("claim")?;
                latencies.push(t.elapsed());
                n += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let end_revision = c.revision()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let trailing = applied
        .iter()
        .map(|a| end_revision.saturating_sub(a.load(Ordering::Relaxed)))
        .max()
        .unwrap_or(0);
    println!(
        "claims: {}  rate: {:.0}/s  p50: {:.2?}  p99: {:.2?}  max: {:.2?}  subscribers: {}  most revisions behind 0.5 s after: {}",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        args.subscribers,
        trailing
    );
    Ok(())
}
