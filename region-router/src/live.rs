//! The router file's settings that change without a restart.
//!
//! `SIGHUP` re-reads the file (and the `HOMECELL_ROUTER_*` environment the
//! process started with), validates all of it, and swaps in the settings a
//! request reads: upstream timeouts, the GeoIP database, trusted proxies, the
//! default region and the draining `Retry-After`; the routing table is then
//! rebuilt. A file that does not validate changes nothing. Settings that
//! shape listeners, identity or storage (listen addresses, region, TLS
//! identity, data directory, control plane, threads, directory key, log
//! format, client connection limits) are reported as needing a restart and keep their running values.
//! The public certificate already reloads on its own (`public_tls`).

use crate::config::RouterConfig;
use crate::geo::{Geo, TrustedProxies};
use anyhow::Result;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// What the proxy needs to reach cells. The client certificate and the CA
/// are not here but in the proxy's connector (`connector_options`): a
/// per-peer certificate makes Pingora build a TLS configuration for every
/// new connection (so sessions never resume) and hash the certificate, by
/// formatting its serial, on every pool lookup.
pub struct CellClient {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl CellClient {
    pub fn new(t: &crate::config::UpstreamTimeouts) -> Self {
        Self {
            connect_timeout: Duration::from_millis(t.connect_ms),
            read_timeout: Duration::from_millis(t.read_ms),
            idle_timeout: Duration::from_millis(t.idle_ms),
        }
    }
}

/// The proxy's upstream connector: our CA only (no system roots) and our
/// client certificate, loaded once for every connection to every cell.
pub fn connector_options(
    conf: &pingora::server::configuration::ServerConf,
    tls: &homecell_common::tls::TlsPaths,
) -> pingora::connectors::ConnectorOptions {
    let mut o = pingora::connectors::ConnectorOptions::from_server_conf(conf);
    o.ca_file = Some(tls.ca.display().to_string());
    o.cert_key_file = Some((
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
    ));
    o
}

/// What requests and table rebuilds read, swapped whole on reload.
pub struct Live {
    pub cells: CellClient,
    pub geo: Option<Geo>,
    pub trusted_proxies: TrustedProxies,
    pub default_region: String,
    pub draining_retry_after: Duration,
}

impl Live {
    pub fn from_config(c: &RouterConfig) -> Result<Self> {
        Ok(Self {
            cells: CellClient::new(&c.upstream),
            geo: c.geoip_database.as_deref().map(Geo::open).transpose()?,
            trusted_proxies: TrustedProxies::parse(&c.trusted_proxies)?,
            default_region: c.default_region().to_string(),
            draining_retry_after: Duration::from_secs(c.draining_retry_after_secs),
        })
    }
}

/// Re-reads the configuration on demand.
pub struct Reloader {
    path: Option<PathBuf>,
    /// The configuration the process started with: what the fixed settings
    /// still run on.
    started: RouterConfig,
    pub live: Arc<ArcSwap<Live>>,
    /// Woken after a reload, so the routing table is rebuilt at once.
    pub reloaded: Arc<Notify>,
}

/// The settings that only a restart applies, by name, with their values.
fn fixed(c: &RouterConfig) -> [(&'static str, String); 14] {
    [
        ("region", c.region.clone()),
        ("data_dir", format!("{:?}", c.data_dir)),
        ("listen", c.listen.to_string()),
        ("admin_listen", c.admin_listen.to_string()),
        ("control_plane", c.control_plane.clone()),
        ("control_plane_name", c.control_plane_name.clone()),
        ("threads", c.threads.to_string()),
        ("log_format", format!("{:?}", c.log_format)),
        ("tracing", format!("{:?}", c.tracing)),
        ("directory_key_file", format!("{:?}", c.directory_key_file)),
        ("tls", format!("{:?}", c.tls)),
        ("public_tls", format!("{:?}", c.public_tls)),
        ("gossip", format!("{:?}", c.gossip)),
        ("clients", format!("{:?}", c.clients)),
    ]
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, config: RouterConfig) -> Result<Self> {
        let live = Live::from_config(&config)?;
        Ok(Self {
            path,
            started: config,
            live: Arc::new(ArcSwap::from_pointee(live)),
            reloaded: Arc::new(Notify::new()),
        })
    }

    /// Reloads; returns the changed settings that need a restart.
    pub fn reload(&self) -> Result<Vec<&'static str>> {
        let next = RouterConfig::load(self.path.as_deref())?;
        let live = Live::from_config(&next)?;
        let restart: Vec<&'static str> = fixed(&self.started)
            .into_iter()
            .zip(fixed(&next))
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect();
        self.live.store(Arc::new(live));
        self.reloaded.notify_one();
        Ok(restart)
    }

    /// Reloads on every `SIGHUP` until `stop`.
    pub async fn on_sighup(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; configuration reload is off");
                return;
            }
        };
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                _ = stop.cancelled() => return,
            }
            let this = self.clone();
            // Opening a GeoIP database and the certificates reads files.
            let outcome = tokio::task::spawn_blocking(move || this.reload()).await;
            match outcome {
                Ok(Ok(restart)) => {
                    crate::metrics::CONFIG_RELOADS
                        .with_label_values(&["ok"])
                        .inc();
                    if restart.is_empty() {
                        tracing::info!("configuration reloaded");
                    } else {
                        tracing::warn!(needs_restart = ?restart, "configuration reloaded; these settings changed but apply only at the next restart");
                    }
                }
                Ok(Err(e)) => {
                    crate::metrics::CONFIG_RELOADS
                        .with_label_values(&["error"])
                        .inc();
                    tracing::error!(error = %format!("{e:#}"), "configuration reload refused; the running settings stay");
                }
                Err(e) => tracing::error!(error = %e, "configuration reload failed"),
            }
        }
    }
}
