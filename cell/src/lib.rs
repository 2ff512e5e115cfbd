//! A Homecell cell: the region's public API (reached through routers, over
//! mTLS) on its own datastore, running on a persisted replica of the control
//! plane's state.

pub mod api;
pub mod config;
pub mod db;
pub mod metrics;
pub mod server;
pub mod state;

use anyhow::{Context, Result};
use homecell_common::replica::{Replica, WatchTarget};
use homecell_common::{admin, shutdown};
use homecell_proto::control::SubscriberKind;
use std::sync::Arc;

/// Runs the cell until SIGINT/SIGTERM.
pub async fn run(config: config::CellConfig) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let tls = config.tls.load()?;
    let replica = Replica::open(&config.data_dir.join("replica.redb"))?;
    let db = db::Datastore::open(&config.database_url()).await?;
    db.claim_region(&config.region).await?;
    let cell = Arc::new(state::Cell {
        region: config.region.clone(),
        db,
        replica: replica.clone(),
    });

    let token = shutdown::CancellationToken::new();
    tokio::spawn(shutdown::wait_for_signal(token.clone()));
    tokio::spawn(replica.clone().run(
        WatchTarget {
            endpoint: config.control_plane.clone(),
            server_name: config.control_plane_name.clone(),
            tls: tls.clone(),
            kind: SubscriberKind::Cell,
            region: config.region.clone(),
        },
        token.clone(),
    ));

    let ready_replica = replica.clone();
    let ready: admin::ReadyCheck = Arc::new(move || {
        if ready_replica.is_ready() {
            Ok(())
        } else {
            Err("no control-plane snapshot applied yet".into())
        }
    });
    let admin_addr = admin::serve(config.admin_listen, ready, token.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind {}", config.listen))?;
    tracing::info!(
        region = %config.region,
        api = %listener.local_addr()?,
        admin = %admin_addr,
        datastore = cell.db.backend(),
        replica_revision = replica.state().revision,
        "cell listening"
    );
    server::serve(listener, tls.server_config()?, api::router(cell), token).await?;
    tracing::info!("cell stopped");
    Ok(())
}
