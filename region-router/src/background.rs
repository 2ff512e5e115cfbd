//! The router's background work, run as a Pingora background service: keep
//! the replica current, rebuild the routing table whenever it changes (and
//! every 5 s, to follow DNS, and after a configuration reload), reload the
//! configuration on SIGHUP, and serve the admin listener.

use crate::routes::{self, RouteTable};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use homecell_common::admin;
use homecell_common::replica::{Replica, WatchTarget};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Background {
    pub replica: Arc<Replica>,
    pub target: WatchTarget,
    pub table: Arc<ArcSwap<RouteTable>>,
    pub health: Arc<crate::health::Health>,
    pub probe_tls: Arc<rustls::ClientConfig>,
    pub reloader: Arc<crate::live::Reloader>,
    pub admin_listen: SocketAddr,
    /// Gossip settings, and the name and region this router gossips as.
    pub gossip: Option<(homecell_common::gossip::GossipConfig, String, String)>,
}

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let token = CancellationToken::new();
        tokio::spawn(self.replica.clone().run(self.target.clone(), token.clone()));
        tokio::spawn(crate::health::run(
            self.health.clone(),
            self.table.clone(),
            self.probe_tls.clone(),
            token.clone(),
        ));
        tokio::spawn(self.reloader.clone().on_sighup(token.clone()));
        if let Some((config, region, name)) = &self.gossip {
            use homecell_common::gossip::{Role, start};
            match start(config, Role::Router, region, name, token.clone()).await {
                Ok(m) => self.health.follow_gossip(m),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "gossip did not start; active health checks only")
                }
            }
        }

        let (replica, table) = (self.replica.clone(), self.table.clone());
        let ready: admin::ReadyCheck = Arc::new(move || {
            if !replica.is_ready() {
                Err("no control-plane snapshot applied yet".into())
            } else if table.load().revision == 0 {
                Err("no routing table built yet".into())
            } else {
                Ok(())
            }
        });
        match admin::serve(self.admin_listen, ready, token.clone()).await {
            Ok(addr) => tracing::info!(admin = %addr, "router admin listening"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "admin listener failed"),
        }

        let mut revisions = self.replica.subscribe();
        // Rebuilt on every revision, and every few seconds so that a cell
        // instance that came back at another address (a restarted container)
        // is found again.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { break },
                _ = tick.tick() => {}
                _ = self.reloader.reloaded.notified() => {}
                _ = shutdown.changed() => break,
            }
            let state = self.replica.state();
            let live = self.reloader.live.load_full();
            let next = routes::build(
                &state,
                &live.default_region,
                live.draining_retry_after,
                &self.table.load(),
            )
            .await;
            tracing::debug!(
                revision = next.revision,
                regions = next.regions.len(),
                "routing table rebuilt"
            );
            self.table.store(Arc::new(next));
        }
        token.cancel();
    }
}
