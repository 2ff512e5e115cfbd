//! `control-plane serve`: configuration and the server's lifecycle.

use crate::grpc::ControlPlane;
use crate::store::{Instance, Location, Store};
use crate::sync::Subscribers;
use anyhow::{Context, Result, bail};
use homecell_common::telemetry::LogFormat;
use homecell_common::tls::TlsPaths;
use homecell_common::{admin, shutdown};
use homecell_proto::control::{
    backup_service_server::BackupServiceServer, config_service_server::ConfigServiceServer,
    directory_service_server::DirectoryServiceServer, region_service_server::RegionServiceServer,
    status_service_server::StatusServiceServer, sync_service_server::SyncServiceServer,
};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The store's file in `data_dir`.
pub const STORE_FILE: &str = "control-plane.redb";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Holds `control-plane.redb`.
    pub data_dir: PathBuf,
    /// gRPC with mTLS.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain HTTP: /healthz, /ready, /metrics.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Change sets kept in the log; a subscriber further behind gets a snapshot.
    #[serde(default = "default_retain")]
    pub retain_changes: u64,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Spans exported over OTLP (`[tracing] otlp_endpoint`); off by default.
    #[serde(default)]
    pub tracing: homecell_common::otel::TracingConfig,
    /// Hex file (at least 32 bytes) keying HMAC(identifier) in the directory.
    /// The routers hold the same key; cells never do.
    pub directory_key_file: PathBuf,
    pub tls: TlsPaths,
    /// Membership gossip: the control plane is usually every member's seed.
    #[serde(default)]
    pub gossip: Option<homecell_common::gossip::GossipConfig>,
    #[serde(default)]
    pub store: StoreConfig,
}

/// Where the store lives. Unset, it is `control-plane.redb` in `data_dir`:
/// one instance, nothing else to run. With `postgres`, every instance that
/// names the same database serves the same store.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// A `postgres://` URL. Usually set from a secret through
    /// `HOMECELL_CP_STORE__POSTGRES` rather than written in the file.
    pub postgres: Option<String>,
    /// This instance's name in `status` (default: the host name and the
    /// gRPC port).
    pub instance: Option<String>,
    /// The address routers, cells and operators reach this instance at,
    /// shown in `status` (default: `listen`).
    pub advertise: Option<String>,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:7443".parse().expect("valid")
}
fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:7080".parse().expect("valid")
}
fn default_retain() -> u64 {
    10_000
}

impl ServeConfig {
    pub fn load(file: Option<&std::path::Path>) -> Result<Self> {
        let c: Self = homecell_common::config::load(
            file,
            homecell_common::config::process_env(),
            "HOMECELL_CP_",
        )?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        self.tracing.validate()?;
        if self.retain_changes == 0 {
            bail!("retain_changes must be at least 1");
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            bail!("listen and admin_listen must differ");
        }
        self.tls.load().context("tls")?;
        crate::directory::DirectoryKey::load(&self.directory_key_file)?;
        if let Some(url) = &self.store.postgres
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            bail!("store.postgres must be a postgres:// URL");
        }
        if let Some(g) = &self.gossip {
            g.validate().context("gossip")?;
        }
        Ok(())
    }
}

/// Never the URL: it may hold a password.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("postgres", &self.postgres.as_ref().map(|_| ".."))
            .field("instance", &self.instance)
            .field("advertise", &self.advertise)
            .finish()
    }
}

impl ServeConfig {
    pub fn location(&self) -> Location {
        match &self.store.postgres {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::File(self.data_dir.join(STORE_FILE)),
        }
    }
}

pub async fn run(config: ServeConfig) -> Result<()> {
    homecell_common::key_file::create_private_dir(&config.data_dir).context("data_dir")?;
    let store = Arc::new(Store::open_at(&config.location(), config.retain_changes).await?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind {}", config.listen))?;
    let grpc_addr = listener.local_addr()?;
    let instance = Instance {
        id: config
            .store
            .instance
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), grpc_addr.port())),
        endpoint: config
            .store
            .advertise
            .clone()
            // A wildcard listen address names no host: say the host's name.
            .unwrap_or_else(|| match grpc_addr.ip().is_unspecified() {
                true => format!("https://{}:{}", host_name(), grpc_addr.port()),
                false => format!("https://{grpc_addr}"),
            }),
        started_unix_ms: crate::store::now_ms(),
    };
    let subscribers = Arc::new(tokio::task::block_in_place(|| {
        Subscribers::load(store.clone(), &instance.id)
    })?);
    let token = shutdown::CancellationToken::new();
    tokio::spawn(shutdown::wait_for_signal(token.clone()));
    // On a shared store: other instances' revisions, and this one's
    // liveness. A store rebuilt under it stops the process.
    let following = tokio::spawn({
        let (store, me) = (store.clone(), instance.clone());
        let token = token.clone();
        async move { store.follow(me, token).await }
    });
    // However following ends (an error, or a panic), the server stops with
    // it: an instance that no longer follows its store must not serve.
    let following = tokio::spawn({
        let token = token.clone();
        async move {
            let ended = following.await;
            token.cancel();
            match ended {
                Ok(followed) => followed,
                Err(e) => Err(anyhow::anyhow!("following the store failed: {e}")),
            }
        }
    });
    crate::metrics::init();
    tokio::spawn(crate::metrics::sample(
        store.clone(),
        subscribers.clone(),
        token.clone(),
    ));
    let persisting = tokio::spawn({
        let (subscribers, token) = (subscribers.clone(), token.clone());
        async move { subscribers.persist_until(token).await }
    });
    let membership = match &config.gossip {
        Some(g) => Some(
            homecell_common::gossip::start(
                g,
                homecell_common::gossip::Role::ControlPlane,
                "",
                "control-plane",
                token.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let cp = ControlPlane {
        membership,
        store: store.clone(),
        subscribers,
        directory_key: Arc::new(crate::directory::DirectoryKey::load(
            &config.directory_key_file,
        )?),
        instance: instance.clone(),
    };
    let tls = config.tls.load()?;

    // Ready while this instance can reach its store.
    let healthy = store.healthy();
    let ready: admin::ReadyCheck = Arc::new(move || {
        if *healthy.borrow() {
            Ok(())
        } else {
            Err("cannot reach the store".into())
        }
    });
    let admin_addr = admin::serve(config.admin_listen, ready, token.clone()).await?;
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, store = store.engine(), instance = %instance.id, revision = store.revision(), epoch = format!("{:016x}", store.epoch()), "control plane listening");

    // While this instance cannot read a shared store it stops listening:
    // a client's next dial finds the port closed and goes to the next
    // instance at once (an open port with a refusing server behind it
    // would keep every client's connection pinned here). It listens again
    // on the same address once it can read the store.
    let mut listener = Some(listener);
    let mut healthy = store.healthy();
    loop {
        let listener = match listener.take() {
            Some(l) => l,
            None => {
                tokio::select! {
                    () = token.cancelled() => break,
                    up = healthy.wait_for(|h| *h) => if up.is_err() { break },
                }
                match tokio::net::TcpListener::bind(grpc_addr).await {
                    Ok(l) => {
                        tracing::info!(grpc = %grpc_addr, "the store can be read again; listening");
                        l
                    }
                    Err(e) => {
                        tracing::warn!(grpc = %grpc_addr, error = %e, "cannot listen again yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
        };
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = {
            let (token, mut healthy) = (token.clone(), store.healthy());
            async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    _ = healthy.wait_for(|h| !*h) => {}
                }
            }
        };
        let server = tonic::transport::Server::builder()
            .tls_config(tls.tonic_server())?
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .layer(tower::layer::layer_fn(|s| {
                homecell_common::traced_grpc::TracedServer::new(s, crate::grpc::METHODS)
            }))
            .add_service(RegionServiceServer::new(cp.clone()))
            .add_service(ConfigServiceServer::new(cp.clone()))
            .add_service(SyncServiceServer::new(cp.clone()))
            .add_service(DirectoryServiceServer::new(cp.clone()))
            .add_service(BackupServiceServer::new(cp.clone()))
            .add_service(StatusServiceServer::new(cp.clone()))
            .add_service(
                homecell_proto::control::move_service_server::MoveServiceServer::new(cp.clone()),
            )
            .serve_with_incoming_shutdown(incoming, stop);
        // Watch streams never end on their own: once stopping, give open
        // calls a moment, then stop regardless.
        let stopping = {
            let (token, mut healthy) = (token.clone(), store.healthy());
            async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    _ = healthy.wait_for(|h| !*h) => {}
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        };
        tokio::select! {
            served = server => served.context("gRPC server failed")?,
            () = stopping => {}
        }
        if token.is_cancelled() {
            break;
        }
        tracing::warn!(grpc = %grpc_addr, "cannot read the store; stopped listening until it can");
    }
    let _ = persisting.await;
    if let Ok(Err(e)) = following.await {
        return Err(e);
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// This host's name, for the default instance id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "control-plane".into())
}
