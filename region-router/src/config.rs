//! The router's configuration: a TOML file, `HOMECELL_ROUTER_*` overrides,
//! then `validate()`.

use anyhow::{Context, Result, bail};
use homecell_common::telemetry::LogFormat;
use homecell_common::tls::TlsPaths;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// The region this router runs in (its identity, and where unrouted
    /// requests go once routing keys exist).
    pub region: String,
    /// Where a request goes when it names no region. Defaults to `region`.
    #[serde(default)]
    pub default_region: Option<String>,
    /// Holds the persisted replica of the control plane's state.
    pub data_dir: PathBuf,
    /// The public HTTP listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Plain HTTP: /healthz, /ready, /metrics.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The control plane's gRPC endpoint, or a comma-separated list of its
    /// instances; the replica moves to the next when its stream breaks.
    pub control_plane: String,
    #[serde(default = "default_cp_name")]
    pub control_plane_name: String,
    /// Proxy workers: threads with a single-threaded runtime each, sharing
    /// the listening sockets; a connection is accepted and served by one
    /// of them, with its own idle connections to cells (pool.rs), as nginx
    /// runs its worker processes (workers.rs). The router refuses to start on a port another process
    /// already listens on.
    #[serde(default = "default_threads")]
    pub threads: usize,
    #[serde(default)]
    pub upstream: UpstreamTimeouts,
    /// What one client connection may take: timeouts and connection caps
    /// (clients.rs).
    #[serde(default)]
    pub clients: crate::clients::ClientLimits,
    /// `Retry-After` for a draining region, unless the control plane's
    /// `router.draining.retry_after` says otherwise.
    #[serde(default = "default_retry_after")]
    pub draining_retry_after_secs: u64,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Spans exported over OTLP (`[tracing] otlp_endpoint`); off by default.
    #[serde(default)]
    pub tracing: homecell_common::otel::TracingConfig,
    /// A MaxMind-format country database (GeoLite2/DB-IP or flat schema),
    /// to home registrations by the client's country.
    #[serde(default)]
    pub geoip_database: Option<PathBuf>,
    /// Proxies (`ip` or `ip/prefix`) whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// The directory's HMAC key (the control plane's), to route logins by
    /// identifier without ever holding one in clear.
    pub directory_key_file: PathBuf,
    /// This router's client identity towards cells and the control plane.
    pub tls: TlsPaths,
    /// HTTPS for clients (HTTP/2 and HTTP/1.1), beside the plain listener.
    #[serde(default)]
    pub public_tls: Option<crate::public_tls::PublicTlsConfig>,
    /// Membership gossip with cells and the control plane: a region whose
    /// cells gossip calls down is answered 503 at once, like one that fails
    /// the active health checks.
    #[serde(default)]
    pub gossip: Option<homecell_common::gossip::GossipConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeouts {
    pub connect_ms: u64,
    pub read_ms: u64,
    pub idle_ms: u64,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect_ms: 1_000,
            read_ms: 30_000,
            idle_ms: 60_000,
        }
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid")
}
fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:8081".parse().expect("valid")
}
fn default_cp_name() -> String {
    "control-plane".into()
}
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
fn default_retry_after() -> u64 {
    30
}

impl RouterConfig {
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let c: Self = homecell_common::config::load(
            file,
            homecell_common::config::process_env(),
            "HOMECELL_ROUTER_",
        )?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        self.tracing.validate()?;
        homecell_proto::region::validate_region_id(&self.region).context("region")?;
        if let Some(d) = &self.default_region {
            homecell_proto::region::validate_region_id(d).context("default_region")?;
        }
        homecell_proto::region::validate_endpoint_list("control_plane", &self.control_plane)
            .context("control_plane")?;
        if self.listen.port() == 0 {
            bail!("listen needs an explicit port");
        }
        if self.listen == self.admin_listen {
            bail!("listen and admin_listen must differ");
        }
        if self.threads == 0 || self.threads > 256 {
            bail!("threads must be between 1 and 256");
        }
        if self.upstream.connect_ms == 0 || self.upstream.read_ms == 0 {
            bail!("upstream timeouts must be positive");
        }
        self.clients.validate()?;
        self.tls.load().context("tls")?;
        if let Some(p) = &self.public_tls {
            if [self.listen, self.admin_listen].contains(&p.listen) {
                bail!("public_tls.listen must differ from listen and admin_listen");
            }
            if p.reload_secs == 0 {
                bail!("public_tls.reload_secs must be positive");
            }
            crate::public_tls::ReloadingCert::open(p)?;
        }
        homecell_common::directory_key::DirectoryKey::load(&self.directory_key_file)?;
        if let Some(g) = &self.gossip {
            g.validate().context("gossip")?;
        }
        crate::geo::TrustedProxies::parse(&self.trusted_proxies)?;
        if let Some(p) = &self.geoip_database {
            crate::geo::Geo::open(p)?;
        }
        Ok(())
    }

    pub fn default_region(&self) -> &str {
        self.default_region.as_deref().unwrap_or(&self.region)
    }
}
