//! `homecell-dev`: the whole system on this machine in one command.
//!
//! Starts a control plane, registers the regions `cn-east` and `eu-west`
//! through its CLI (once; later runs reuse the data directory), starts a cell
//! for each and a router on http://127.0.0.1:8080, prints where everything
//! listens, and stops it all cleanly on Ctrl-C.

use clap::Parser;
use homecell_harness::{Cluster, Ports, start_standard};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "homecell-dev", about = "Run a local Homecell cluster")]
struct Args {
    /// Where the cluster keeps its state (certificates, redb and SQLite files, logs).
    #[arg(long, default_value = ".homecell")]
    data_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cluster = Cluster::in_dir(&args.data_dir, Ports::Dev)?;
    if let Err(e) = start_standard(&mut cluster).await {
        eprintln!("error: {e:#}");
        eprintln!("logs are in {}", cluster.root.join("logs").display());
        std::process::exit(1);
    }
    println!("Homecell is up. Data and logs: {}", cluster.root.display());
    println!();
    println!(
        "  router          http://{}   (admin http://{})",
        cluster.routers[0].listen, cluster.routers[0].admin
    );
    println!(
        "  control plane   {}  (admin http://{})",
        cluster.control_plane_endpoint(),
        cluster.control_plane.admin
    );
    for c in cluster.cells.values() {
        println!(
            "  cell {:<10} https://{}  (admin http://{})",
            c.region, c.api, c.admin
        );
    }
    println!();
    println!("Try:");
    println!("  curl -s -H 'x-home-region: eu-west' http://127.0.0.1:8080/v1/region");
    println!(
        "  HOMECELL_PKI_DIR={} target/release/control-plane region list",
        cluster.pki_dir.display()
    );
    println!();
    println!("Ctrl-C stops everything.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping…");
    for r in &mut cluster.routers {
        if let Some(p) = r.process.as_mut() {
            p.terminate(Duration::from_secs(5));
        }
    }
    for c in cluster.cells.values_mut() {
        if let Some(p) = c.process.as_mut() {
            p.terminate(Duration::from_secs(5));
        }
    }
    cluster.stop_control_plane();
    println!("stopped");
    Ok(())
}
