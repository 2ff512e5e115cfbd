//! A cluster for a load generator whose workers all come from one client
//! address (loopback), as the per-address limits would refuse them.

use homecell_harness::{Cluster, start_standard};
use std::time::Duration;

/// Starts the standard cluster with the cell's per-address login limit
/// lifted (plus `cell_extra` in the cell's configuration), then lifts the
/// router's per-address registration limit through the control plane and
/// waits until the routers have it.
pub async fn one_address_cluster(cell_extra: &str) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::temp()?;
    cluster.cell_extra_config =
        format!("login_attempts_per_ip_per_minute = 100000000\n{cell_extra}");
    start_standard(&mut cluster).await?;
    let out = cluster.cli_ok(&[
        "-o",
        "json",
        "config",
        "set",
        "router.rate_limit.registrations_per_ip",
        "0",
    ])?;
    let revision = out.json()?["committed_revision"].as_u64().unwrap_or(0);
    cluster
        .wait_applied(revision, 3, Duration::from_secs(10))
        .await?;
    Ok(cluster)
}
