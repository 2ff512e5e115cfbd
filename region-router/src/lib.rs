//! The Homecell region router: a Pingora proxy that sends each request to its
//! user's home cell over mTLS, on a routing table built from a persisted
//! replica of the control plane's state.

pub mod access_log;
pub mod background;
pub mod clients;
pub mod config;
pub mod decide;
pub mod edge;
pub mod forward;
pub mod geo;
pub mod health;
pub mod live;
pub mod metrics;
pub mod pool;
pub mod problem;
pub mod public_tls;
pub mod route_key;
pub mod routes;
pub mod routing;
pub mod state;
pub mod workers;

use anyhow::Result;
use arc_swap::ArcSwap;
use homecell_common::replica::{Replica, WatchTarget};
use homecell_proto::control::SubscriberKind;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use pingora::services::background::background_service;
use std::sync::Arc;
use std::time::Duration;

/// Builds and runs the Pingora server; returns when it shuts down.
/// `config_path` is where a reload (SIGHUP) reads the configuration again.
pub fn run(config: config::RouterConfig, config_path: Option<std::path::PathBuf>) -> Result<()> {
    homecell_common::key_file::create_private_dir(&config.data_dir)?;
    let tls = config.tls.load()?;
    let replica = Replica::open(&config.data_dir.join("replica.redb"))?;
    let fallback_retry_after = Duration::from_secs(config.draining_retry_after_secs);

    // Route from the persisted copy at once, before the control plane answers.
    let initial = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(routes::build(
            &replica.state(),
            config.default_region(),
            fallback_retry_after,
            &routes::RouteTable::default(),
        ));
    tracing::info!(
        revision = initial.revision,
        regions = initial.regions.len(),
        "routing table loaded from the local replica"
    );
    let table = Arc::new(ArcSwap::from_pointee(initial));
    let health = Arc::new(health::Health::default());
    let probe_tls = tls.client_config()?;

    // The proxy's workers are threads of their own (workers.rs); one
    // thread is plenty for the background service.
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(2),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let reloader = Arc::new(live::Reloader::new(config_path, config.clone())?);
    server.bootstrap();

    let router = state::Router {
        table: table.clone(),
        replica: replica.clone(),
        tokens: Arc::new(homecell_common::token_cache::TokenCache::default()),
        directory_key: Arc::new(homecell_common::directory_key::DirectoryKey::load(
            &config.directory_key_file,
        )?),
        health: health.clone(),
        live: reloader.live.clone(),
        limiter: Default::default(),
    };
    // nginx's worker model (workers.rs): `threads` threads, each accepting
    // on its own reactor and serving its connections there. Binding here
    // turns a port another process holds into a clean error at start.
    let mut listeners = vec![workers::Listener::bind(config.listen, None)?];
    if let Some(p) = &config.public_tls {
        let cert = public_tls::ReloadingCert::open(p)?;
        cert.clone().watch(Duration::from_secs(p.reload_secs));
        tracing::info!(listen = %p.listen, "HTTPS for clients (h2, http/1.1)");
        let acceptor = public_tls::settings(cert)?.build();
        listeners.push(workers::Listener::bind(p.listen, Some(acceptor))?);
    }
    let edge = edge::Edge::new(
        router,
        live::connector_options(&server.configuration, &config.tls),
        config.clients.clone(),
    );
    server.add_service(workers::Workers::new(edge, listeners, config.threads));
    server.add_service(background_service(
        "replica",
        background::Background {
            replica,
            target: WatchTarget {
                endpoint: config.control_plane.clone(),
                server_name: config.control_plane_name.clone(),
                tls,
                kind: SubscriberKind::Router,
                region: config.region.clone(),
            },
            table,
            health,
            probe_tls,
            reloader: reloader.clone(),
            admin_listen: config.admin_listen,
            gossip: config
                .gossip
                .clone()
                .map(|g| (g, config.region.clone(), config.listen.to_string())),
        },
    ));
    tracing::info!(listen = %config.listen, region = %config.region, default_region = config.default_region(), "router listening");
    server.run(pingora::server::RunArgs::default());
    Ok(())
}
