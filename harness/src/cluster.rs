//! A whole Homecell deployment on this machine: a control plane, cells and
//! routers as real processes over a shared PKI, started, stopped, killed
//! and driven through the operator CLI.

use crate::config_files::{ensure_directory_key, hosts_for};
use crate::process::{Binaries, Process, free_port, loopback};
use crate::wait::wait_up;
use anyhow::{Context, Result, bail};
use homecell_common::tls::{PeerIdentity, Pki};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a CLI call printed and how it ended.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }

    /// The last one-line JSON object printed: a `-o json` batch command's
    /// final progress line.
    pub fn last_json_line(&self) -> Result<serde_json::Value> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("no JSON line in: {}", self.stdout))?;
        Ok(serde_json::from_str(line)?)
    }
}

pub struct ControlPlaneNode {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// Its gossip (UDP) address: every other member's seed.
    pub gossip: SocketAddr,
    pub process: Option<Process>,
    /// Runs in this network namespace (its addresses are the namespace's).
    pub netns: Option<std::sync::Arc<crate::netns::NetNs>>,
    /// Its own PostgreSQL URL (from inside a namespace, the server's
    /// address differs), else the cluster's.
    pub postgres: Option<String>,
    /// Extra environment for the next start (e.g. `HOMECELL_FAILPOINTS`).
    pub env: Vec<(String, String)>,
}

pub struct CellNode {
    pub region: String,
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub database_url: Option<String>,
    /// Extra environment for the next start (e.g. `HOMECELL_FAILPOINTS`).
    pub env: Vec<(String, String)>,
    pub process: Option<Process>,
}

/// A further instance of a region's cell (see `Cluster::start_cell_instance`).
pub struct CellInstance {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub process: Process,
}

pub struct RouterNode {
    pub region: String,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub process: Option<Process>,
}

/// Fixed ports, for the dev cluster; tests use free ports.
#[derive(Debug, Clone, Copy)]
pub enum Ports {
    Free,
    Dev,
}

/// A whole Homecell deployment on this machine.
pub struct Cluster {
    pub root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub pki_dir: PathBuf,
    pub(crate) bins: Binaries,
    pub(crate) ports: Ports,
    pub control_plane: ControlPlaneNode,
    /// Further control-plane instances over the same PostgreSQL store
    /// (`control_plane_postgres`); every component is given them all.
    pub more_control_planes: Vec<ControlPlaneNode>,
    /// A PostgreSQL URL: the control plane's store is shared there
    /// instead of a redb file.
    pub control_plane_postgres: Option<String>,
    pub cells: BTreeMap<String, CellNode>,
    pub routers: Vec<RouterNode>,
    /// Extra TOML lines for every cell's configuration (benchmarks raise
    /// limits with it).
    pub cell_extra_config: String,
    /// Whether the regions `add_region` registers ask for proof of an
    /// email or phone before registering it (`auth.register.proof`). Off,
    /// as in `./dev cluster`, so a test registers in one step; the tests
    /// of the proof turn it on.
    pub prove_identifiers: bool,
    /// Extra TOML lines for every router's configuration (must come before
    /// any table, so keep them to top-level keys).
    pub router_extra_config: String,
    /// Worker threads of every router (benchmarks vary it).
    pub router_threads: usize,
    /// Where every component exports its spans (`[tracing] otlp_endpoint`),
    /// if anywhere.
    pub otlp_endpoint: Option<String>,
    pub(crate) http: reqwest::Client,
}

impl Cluster {
    /// A cluster in a fresh temporary directory, removed on drop.
    pub fn temp() -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("homecell-").tempdir()?;
        let mut c = Self::in_dir(tmp.path(), Ports::Free)?;
        // HOMECELL_KEEP=1 keeps the directory (logs, data) for a post-mortem.
        if std::env::var_os("HOMECELL_KEEP").is_some() {
            eprintln!("keeping {}", tmp.keep().display());
        } else {
            c._tmp = Some(tmp);
        }
        Ok(c)
    }

    /// A cluster whose state lives in `root` (kept across runs).
    pub fn in_dir(root: &Path, ports: Ports) -> Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let pki_dir = root.join("pki");
        let pki = Pki::open_or_create(&pki_dir)?;
        pki.issue(
            &PeerIdentity::ControlPlane,
            &hosts_for(&PeerIdentity::ControlPlane),
        )?;
        let operator = PeerIdentity::Operator {
            name: "admin".into(),
        };
        pki.issue(&operator, &hosts_for(&operator))?;
        ensure_directory_key(&root.join("directory.key"))?;
        homecell_common::key_file::create_if_missing(&root.join("gossip.key"))?;
        let (grpc, admin, gossip) = match ports {
            Ports::Free => (free_port(), free_port(), free_port()),
            Ports::Dev => (7443, 7080, 7946),
        };
        Ok(Self {
            root,
            _tmp: None,
            pki_dir,
            bins: Binaries::locate()?,
            ports,
            control_plane: ControlPlaneNode {
                grpc: loopback(grpc),
                admin: loopback(admin),
                gossip: loopback(gossip),
                process: None,
                netns: None,
                postgres: None,
                env: Vec::new(),
            },
            more_control_planes: Vec::new(),
            control_plane_postgres: None,
            cells: BTreeMap::new(),
            routers: Vec::new(),
            cell_extra_config: String::new(),
            prove_identifiers: false,
            router_extra_config: String::new(),
            otlp_endpoint: None,
            router_threads: 2,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The directory's HMAC key (shared by the control plane and routers).
    pub fn directory_key_path(&self) -> PathBuf {
        self.root.join("directory.key")
    }

    /// Every control-plane instance's endpoint, comma-separated: what
    /// routers, cells and the CLI are given (they fail over in turn).
    pub fn control_plane_endpoint(&self) -> String {
        std::iter::once(&self.control_plane)
            .chain(&self.more_control_planes)
            .map(|n| format!("https://{}", n.grpc))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A gRPC channel to control-plane instance 0 that presents a fresh
    /// certificate for `identity` (a cell's, as its thief would hold it).
    pub async fn control_plane_as(
        &self,
        identity: &PeerIdentity,
    ) -> Result<tonic::transport::Channel> {
        let paths = Pki::open_or_create(&self.pki_dir)?.issue(identity, &[])?;
        Ok(
            tonic::transport::Endpoint::from_shared(format!(
                "https://{}",
                self.control_plane.grpc
            ))?
            .tls_config(paths.load()?.tonic_client("control-plane"))?
            .connect()
            .await?,
        )
    }

    /// Control-plane instance `i` (0 is `control_plane`).
    pub fn control_plane_node(&mut self, i: usize) -> &mut ControlPlaneNode {
        match i {
            0 => &mut self.control_plane,
            i => &mut self.more_control_planes[i - 1],
        }
    }

    /// Adds a control-plane instance on free ports (over the shared
    /// PostgreSQL store); returns its index for `start_control_plane_instance`.
    pub fn add_control_plane_instance(&mut self) -> usize {
        self.more_control_planes.push(ControlPlaneNode {
            grpc: loopback(free_port()),
            admin: loopback(free_port()),
            gossip: loopback(free_port()),
            process: None,
            netns: None,
            postgres: None,
            env: Vec::new(),
        });
        self.more_control_planes.len()
    }

    /// Moves control-plane instance `i` (before it starts) into `ns`: it
    /// listens on the namespace's address and reaches PostgreSQL at
    /// `postgres`.
    pub fn place_control_plane(
        &mut self,
        i: usize,
        ns: std::sync::Arc<crate::netns::NetNs>,
        postgres: String,
    ) {
        let node = self.control_plane_node(i);
        let at = |port: u16| SocketAddr::from((ns.ns_ip, port));
        node.grpc = at(free_port());
        node.admin = at(free_port());
        node.gossip = at(free_port());
        node.postgres = Some(postgres);
        node.netns = Some(ns);
    }

    /// Kills `region`'s cell (as `kill -9` would), restarts it with
    /// `failpoints` armed (`HOMECELL_FAILPOINTS`; none when empty) and waits
    /// until the router routes to it again.
    pub async fn restart_cell_with_failpoints(
        &mut self,
        region: &str,
        failpoints: &str,
    ) -> Result<()> {
        let node = self
            .cells
            .get_mut(region)
            .ok_or_else(|| anyhow::anyhow!("no cell {region}"))?;
        if let Some(mut p) = node.process.take() {
            p.kill();
        }
        node.env = if failpoints.is_empty() {
            Vec::new()
        } else {
            vec![("HOMECELL_FAILPOINTS".to_string(), failpoints.to_string())]
        };
        self.start_cell(region).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self
                .http
                .get(format!("{}/v1/region", self.router_url(0)))
                .header("x-home-region", region)
                .send()
                .await?;
            if r.status() == reqwest::StatusCode::OK {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{region} is not routed to again");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts (or restarts) the control plane and waits for it to answer.
    pub async fn start_control_plane(&mut self) -> Result<()> {
        self.start_control_plane_instance(0).await
    }

    /// Starts (or restarts) control-plane instance `i`.
    pub async fn start_control_plane_instance(&mut self, i: usize) -> Result<()> {
        let name = match i {
            0 => "control-plane".to_string(),
            i => format!("control-plane-{i}"),
        };
        let node = self.control_plane_node(i);
        let (grpc, admin, gossip) = (node.grpc, node.admin, node.gossip);
        let (netns, own_postgres) = (node.netns.clone(), node.postgres.clone());
        let mut cfg = format!(
            "data_dir = {:?}\nlisten = \"{}\"\nadmin_listen = \"{}\"\ndirectory_key_file = {:?}\n{}",
            self.root.join(&name).display().to_string(),
            grpc,
            admin,
            self.directory_key_path().display().to_string(),
            self.tls_toml(&PeerIdentity::ControlPlane)?
        ) + &self.gossip_toml(&gossip.to_string());
        if let Some(url) = own_postgres
            .as_ref()
            .or(self.control_plane_postgres.as_ref())
        {
            cfg += &format!("\n[store]\npostgres = {url:?}\ninstance = \"cp-{i}\"\n");
        }
        cfg += &self.tracing_toml();
        let path = self.write_config(&name, cfg)?;
        let mut cmd = match &netns {
            Some(ns) => ns.command(&self.bins.path("control-plane")),
            None => Command::new(self.bins.path("control-plane")),
        };
        cmd.arg("serve").arg("--config").arg(path);
        cmd.envs(self.control_plane_node(i).env.clone());
        let mut proc = Process::spawn(&name, cmd, &self.logs())?;
        let up = wait_up(&self.http, &format!("http://{admin}/healthz"), &mut proc).await;
        self.control_plane_node(i).process = Some(proc);
        up?;
        // The gRPC listener binds after the admin one: wait for a CLI round trip.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.cli(&["status"])?.success {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the control plane's gRPC listener did not answer");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop_control_plane(&mut self) {
        if let Some(mut p) = self.control_plane.process.take() {
            p.terminate(Duration::from_secs(5));
        }
    }

    pub fn kill_control_plane(&mut self) {
        self.kill_control_plane_instance(0);
    }

    /// SIGKILLs control-plane instance `i`.
    pub fn kill_control_plane_instance(&mut self, i: usize) {
        if let Some(mut p) = self.control_plane_node(i).process.take() {
            p.kill();
        }
    }

    /// SIGKILLs `region`'s cell (no graceful shutdown); its process handle
    /// stays, so `start_cell` can bring it back on the same ports.
    pub fn kill_cell(&mut self, region: &str) {
        if let Some(p) = self.cells.get_mut(region).and_then(|n| n.process.as_mut()) {
            p.kill();
        }
    }

    /// The `[tracing]` table every component gets, when spans are exported.
    fn tracing_toml(&self) -> String {
        self.otlp_endpoint
            .as_ref()
            .map(|e| format!("\n[tracing]\notlp_endpoint = {e:?}\n"))
            .unwrap_or_default()
    }

    /// Router `index`'s Prometheus text.
    pub async fn router_metrics(&self, index: usize) -> Result<String> {
        let url = format!("http://{}/metrics", self.routers[index].admin);
        Ok(self.http.get(url).send().await?.text().await?)
    }

    /// The operator CLI's binary.
    pub fn cli_path(&self) -> PathBuf {
        self.bins.path("control-plane")
    }

    /// The operator CLI as `program` would run it (the CLI itself, or a
    /// wrapper such as `script` given it as an argument), with this
    /// cluster's control plane and credentials in its environment.
    pub fn cli_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("HOMECELL_CONTROL_PLANE", self.control_plane_endpoint())
            .env("HOMECELL_PKI_DIR", &self.pki_dir)
            .env_remove("HOMECELL_TLS_CA")
            .env_remove("HOMECELL_TLS_CERT")
            .env_remove("HOMECELL_TLS_KEY")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the operator CLI against this cluster's control plane.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput> {
        let out = self
            .cli_command(&self.cli_path())
            .args(args)
            .output()
            .context("cannot run the control-plane CLI")?;
        Ok(CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs the CLI and fails unless it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> Result<CliOutput> {
        let out = self.cli(args)?;
        if !out.success {
            bail!(
                "control-plane {} failed: {}",
                args.join(" "),
                out.stderr.trim()
            );
        }
        Ok(out)
    }

    /// The control plane's current revision, from `status`.
    pub fn revision(&self) -> Result<u64> {
        let v = self.cli_ok(&["-o", "json", "status"])?.json()?;
        v["revision"].as_u64().context("no revision in status")
    }

    /// Reserves the ports of a region's cell (so the region can be registered
    /// with its endpoint before the cell starts).
    pub fn plan_cell(&mut self, region: &str) -> &CellNode {
        let index = self.cells.len() as u16;
        let (api, admin) = match self.ports {
            Ports::Free => (free_port(), free_port()),
            Ports::Dev => (9443 + index, 9080 + index),
        };
        self.cells
            .entry(region.to_string())
            .or_insert_with(|| CellNode {
                region: region.to_string(),
                api: loopback(api),
                admin: loopback(admin),
                database_url: None,
                env: Vec::new(),
                process: None,
            })
    }

    /// Registers `region` through the CLI, with its planned cell's endpoint.
    pub fn add_region(&mut self, region: &str, countries: &str) -> Result<u64> {
        let api = self.plan_cell(region).api;
        let public = format!("http://127.0.0.1:{}", self.router_port_hint());
        let mut args = vec![
            "-o".to_string(),
            "json".into(),
            "region".into(),
            "add".into(),
            region.into(),
            "--public-endpoint".into(),
            public,
            "--internal-endpoint".into(),
            format!("https://{api}"),
        ];
        if !countries.is_empty() {
            args.push("--countries".into());
            args.push(countries.into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = self.cli_ok(&args)?.json()?;
        let added = v["committed_revision"]
            .as_u64()
            .context("no revision in the answer")?;
        if self.prove_identifiers {
            return Ok(added);
        }
        // The region's own override: an operator's global setting for
        // other regions does not reach it.
        let set = [
            "-o",
            "json",
            "config",
            "set",
            "auth.register.proof",
            "false",
            "--region",
            region,
        ];
        let v = self.cli_ok(&set)?.json()?;
        v["revision"].as_u64().context("no revision in the answer")
    }

    fn router_port_hint(&self) -> u16 {
        self.routers.first().map_or(8080, |r| r.listen.port())
    }

    /// Starts (or restarts) the cell of `region`; waits for its admin port.
    pub async fn start_cell(&mut self, region: &str) -> Result<()> {
        self.plan_cell(region);
        let node = self.cells.get(region).expect("planned");
        let (api, admin) = (node.api, node.admin);
        let name = format!("cell-{region}");
        let proc = self.spawn_cell(region, &name, api, admin).await;
        let (proc, up) = match proc {
            Ok(p) => (Some(p), Ok(())),
            Err((p, e)) => (p, Err(e)),
        };
        self.cells.get_mut(region).expect("planned").process = proc;
        up
    }

    /// Starts instance `n` (1, 2, …) of `region`'s cell beside the planned
    /// one: the same configuration, datastore included, on its own ports
    /// and data directory. A cell of several instances runs over one
    /// PostgreSQL; the region's internal endpoint then lists them all.
    pub async fn start_cell_instance(&mut self, region: &str, n: usize) -> Result<CellInstance> {
        anyhow::ensure!(n > 0, "instance 0 is the planned cell");
        self.plan_cell(region);
        let (api, admin) = match self.ports {
            Ports::Free => (free_port(), free_port()),
            Ports::Dev => bail!("extra instances are for tests"),
        };
        let name = format!("cell-{region}-{n}");
        let process = self
            .spawn_cell(region, &name, loopback(api), loopback(admin))
            .await
            .map_err(|(_, e)| e)?;
        Ok(CellInstance {
            api: loopback(api),
            admin: loopback(admin),
            process,
        })
    }

    /// Writes `name`'s configuration and starts it; on failure, the process
    /// (if it started) with why.
    async fn spawn_cell(
        &self,
        region: &str,
        name: &str,
        api: SocketAddr,
        admin: SocketAddr,
    ) -> std::result::Result<Process, (Option<Process>, anyhow::Error)> {
        let node = self.cells.get(region).expect("planned");
        let id = PeerIdentity::Cell {
            region: region.into(),
        };
        let tls = self.tls_toml(&id).map_err(|e| (None, e))?;
        let cp = self.control_plane_endpoint();
        let data_dir = self.root.join(name);
        let mut cfg = format!(
            "region = \"{region}\"\ndata_dir = {:?}\nlisten = \"{api}\"\nadmin_listen = \"{admin}\"\ncontrol_plane = \"{cp}\"\n",
            data_dir.display().to_string(),
        );
        if let Some(url) = &node.database_url {
            cfg.push_str(&format!("database_url = {url:?}\n"));
        }
        // One seal per region, shared by its instances (as in production).
        let seal = self.root.join(format!("signing-keys-{region}.seal"));
        homecell_common::key_file::create_if_missing(&seal).map_err(|e| (None, e))?;
        cfg.push_str(&format!(
            "signing_key_seal_file = {:?}\n",
            seal.display().to_string()
        ));
        // Every test client is 127.0.0.1: a test that is about the
        // registration limit sets its own. The dev cluster keeps the
        // production default.
        if matches!(self.ports, Ports::Free)
            && !self
                .cell_extra_config
                .contains("registrations_per_ip_per_minute")
        {
            cfg.push_str("registrations_per_ip_per_minute = 100000\n");
        }
        // Test providers (payouts, SMS, WeChat) are local, plain HTTP.
        cfg.push_str("allow_http_providers = true\n");
        cfg.push_str(&self.cell_extra_config);
        cfg.push_str(&tls);
        cfg.push_str(&self.gossip_toml("127.0.0.1:0"));
        cfg.push_str(&self.tracing_toml());
        let path = self.write_config(name, cfg).map_err(|e| (None, e))?;
        let mut cmd = Command::new(self.bins.path("cell"));
        cmd.arg("--config").arg(path);
        cmd.envs(node.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Process::spawn(name, cmd, &self.logs()).map_err(|e| (None, e))?;
        match wait_up(&self.http, &format!("http://{admin}/healthz"), &mut proc).await {
            Ok(()) => Ok(proc),
            Err(e) => Err((Some(proc), e)),
        }
    }

    /// Runs a `cell` subcommand on the host of `region`'s cell (its config).
    pub fn cell_command(&self, region: &str, args: &[&str]) -> Result<CliOutput> {
        let config = self.root.join("config").join(format!("cell-{region}.toml"));
        let out = Command::new(self.bins.path("cell"))
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run the cell binary")?;
        Ok(CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `cell audit` over the datastores of `regions` (PostgreSQL where
    /// the cell runs on it, else SQLite); its report,
    /// or an error with it if the audit failed.
    pub fn audit(&self, regions: &[&str]) -> Result<String> {
        let mut args = vec!["audit".to_string()];
        for r in regions {
            args.push("--database-url".into());
            args.push(
                self.cells
                    .get(*r)
                    .and_then(|n| n.database_url.clone())
                    .unwrap_or_else(|| format!("sqlite:{}", self.cell_sqlite_path(r).display())),
            );
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.cell_command(regions.first().copied().unwrap_or("cn-east"), &args)?;
        anyhow::ensure!(out.success, "audit failed:\n{}{}", out.stdout, out.stderr);
        Ok(out.stdout)
    }

    /// The cell's SQLite datastore file (when it runs on the default).
    pub fn cell_sqlite_path(&self, region: &str) -> PathBuf {
        self.root.join(format!("cell-{region}")).join("cell.db")
    }

    pub fn cell_mut(&mut self, region: &str) -> Option<&mut CellNode> {
        self.cells.get_mut(region)
    }

    /// Starts a router in `region`; returns its index in `routers`.
    pub async fn start_router(&mut self, region: &str, default_region: &str) -> Result<usize> {
        let (listen, admin) = match self.ports {
            Ports::Free => (free_port(), free_port()),
            Ports::Dev => (8080, 8081),
        };
        self.routers.push(RouterNode {
            region: region.to_string(),
            listen: loopback(listen),
            admin: loopback(admin),
            process: None,
        });
        let index = self.routers.len() - 1;
        self.restart_router(index, default_region).await?;
        Ok(index)
    }

    /// (Re)starts router `index` on its ports and data directory.
    pub async fn restart_router(&mut self, index: usize, default_region: &str) -> Result<()> {
        let (region, listen, admin) = {
            let r = &self.routers[index];
            (r.region.clone(), r.listen, r.admin)
        };
        let tls = self.tls_toml(&PeerIdentity::Router {
            region: region.clone(),
        })?;
        let cfg = format!(
            "region = \"{region}\"\ndefault_region = \"{default_region}\"\ndata_dir = {:?}\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ncontrol_plane = \"{}\"\nthreads = {}\ndirectory_key_file = {:?}\n{}{tls}",
            self.root
                .join(format!("router-{index}"))
                .display()
                .to_string(),
            self.control_plane_endpoint(),
            self.router_threads,
            self.directory_key_path().display().to_string(),
            self.router_extra_config,
        ) + &self.gossip_toml("127.0.0.1:0")
            + &self.tracing_toml();
        let name = format!("router-{index}");
        let path = self.write_config(&name, cfg)?;
        let mut cmd = Command::new(self.bins.path("region-router"));
        cmd.arg("--config").arg(path);
        if let Some(mut old) = self.routers[index].process.take() {
            old.terminate(Duration::from_secs(5));
        }
        let mut proc = Process::spawn(&name, cmd, &self.logs())?;
        let up = wait_up(&self.http, &format!("http://{admin}/healthz"), &mut proc).await;
        self.routers[index].process = Some(proc);
        up
    }

    /// Stops router `index` (SIGTERM); `restart_router` brings it back.
    pub fn stop_router(&mut self, index: usize) {
        if let Some(mut p) = self.routers[index].process.take() {
            p.terminate(Duration::from_secs(5));
        }
    }

    /// The router's public base URL.
    pub fn router_url(&self, index: usize) -> String {
        format!("http://{}", self.routers[index].listen)
    }
}

/// The standard local cluster: a control plane, two regions (`cn-east` and
/// `eu-west`, registered through the CLI), a cell for each, and a router.
pub async fn start_standard(cluster: &mut Cluster) -> Result<()> {
    cluster.start_control_plane().await?;
    let existing = cluster.cli_ok(&["-o", "json", "region", "list"])?.json()?;
    let known: Vec<String> = existing["regions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for (region, countries) in [("cn-east", "CN,HK,MO"), ("eu-west", "DE,FR,GB,IE,NL")] {
        if known.iter().any(|k| k == region) {
            cluster.plan_cell(region);
        } else {
            cluster.add_region(region, countries)?;
        }
    }
    cluster.start_cell("cn-east").await?;
    cluster.start_cell("eu-west").await?;
    cluster.start_router("cn-east", "cn-east").await?;
    cluster.wait_ready(Duration::from_secs(20)).await
}

/// The standard cluster in a fresh temporary directory, started and ready
/// for tokens (every region has published a signing key): what most
/// end-to-end tests begin with.
#[derive(Default)]
pub struct Standard {
    cell_config: String,
    router_config: String,
    prove_identifiers: bool,
    otlp_endpoint: Option<String>,
}

/// `Standard` with nothing extra: `standard().start().await?`.
pub fn standard() -> Standard {
    Standard::default()
}

impl Standard {
    /// Extra TOML lines for every cell (see `Cluster::cell_extra_config`).
    pub fn cell_config(mut self, toml: &str) -> Self {
        self.cell_config.push_str(toml);
        self
    }

    /// Both regions ask for proof of an email or phone before registering
    /// it (the production default; off otherwise, as in `./dev cluster`).
    pub fn prove_identifiers(mut self) -> Self {
        self.prove_identifiers = true;
        self
    }

    /// Every component exports its spans to `endpoint` (OTLP/gRPC).
    pub fn export_spans_to(mut self, endpoint: &str) -> Self {
        self.otlp_endpoint = Some(endpoint.to_string());
        self
    }

    /// Extra top-level TOML lines for the router.
    pub fn router_config(mut self, toml: &str) -> Self {
        self.router_config.push_str(toml);
        self
    }

    pub async fn start(self) -> Result<Cluster> {
        let mut c = Cluster::temp()?;
        c.cell_extra_config = self.cell_config;
        c.router_extra_config = self.router_config;
        c.prove_identifiers = self.prove_identifiers;
        c.otlp_endpoint = self.otlp_endpoint;
        start_standard(&mut c).await?;
        c.wait_signing_keys(Duration::from_secs(15)).await?;
        Ok(c)
    }
}
