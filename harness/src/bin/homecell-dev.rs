//! `homecell-dev`: the whole system on this machine in one command.
//!
//! Starts a control plane, registers the regions `cn-east` and `eu-west`
//! through its CLI (once; later runs reuse the data directory), starts a cell
//! for each and a router on http://127.0.0.1:8080, and a local SMTP server
//! whose mail lands in `<data_dir>/mail`, prints where everything listens,
//! and stops it all cleanly on Ctrl-C.

use clap::Parser;
use homecell_harness::smtp::SmtpSink;
use homecell_harness::{Cluster, Ports, free_port, start_standard};
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
    // The cells' email goes to a local SMTP server that keeps every
    // message in a maildir, where a person reads the codes they ask for.
    let maildir = cluster.root.join("mail");
    let mail = match SmtpSink::start_into(maildir.clone(), free_port()).await {
        Ok(sink) => {
            cluster.cell_extra_config = sink.cell_config();
            Some(sink)
        }
        Err(e) => {
            eprintln!("warning: no local mail ({e:#}); cells send no email");
            None
        }
    };
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
    if mail.is_some() {
        println!(
            "  mail            {}   (every email the cells send)",
            maildir.join("new").display()
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
