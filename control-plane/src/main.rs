//! `control-plane`: the server (`serve`) and the operator CLI in one binary.

use clap::{Parser, Subcommand};
use homecell_common::telemetry;
use homecell_common::tls::{PeerIdentity, Pki};
use homecell_control_plane::backup_cli::{self, StoreTarget};
use homecell_control_plane::cli::{self, ConfigCmd, Connection, RegionCmd};
use homecell_control_plane::move_cli::MoveCmd;
use homecell_control_plane::serve::{self, ServeConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "control-plane",
    version,
    about = "Homecell control plane and operator CLI"
)]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the control-plane server.
    Serve {
        /// TOML configuration; HOMECELL_CP_* environment variables override it.
        #[arg(long, short, env = "HOMECELL_CONFIG")]
        config: Option<PathBuf>,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
        /// Probe the running server's /ready on its admin listener (the
        /// container health check); exit 0 when ready.
        #[arg(long)]
        healthcheck: bool,
    },
    /// Manage regions.
    #[command(subcommand)]
    Region(RegionCmd),
    /// Manage configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Move users between regions: one, a batch, or a whole region.
    #[command(subcommand)]
    Move(MoveCmd),
    /// Every subscriber with its applied revision and last contact.
    Status,
    /// Copy the running control plane's state to a new file (a consistent
    /// online copy: mutations go on meanwhile).
    Backup {
        /// The file to write (never an existing one).
        #[arg(long, required_unless_present = "out_dir", conflicts_with = "out_dir")]
        out: Option<PathBuf>,
        /// Or a directory: the file is named control-plane-<UTC time>.backup.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// With --out-dir: then delete all but the newest N backups there.
        #[arg(long, requires = "out_dir", value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
    },
    /// Build a new store from a backup, in a new epoch, for a stopped
    /// control plane (the store must not exist yet). Subscribers take a
    /// snapshot of the new epoch when it starts.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        target: StoreTarget,
    },
    /// Build a new store from a router's or cell's replica when no backup
    /// is left: regions, keys, config and user homes; the cells assert
    /// their users' claims again.
    Recover {
        /// A replica file (`replica.redb` of a stopped router or cell).
        #[arg(long = "from-replica")]
        from_replica: PathBuf,
        #[command(flatten)]
        target: StoreTarget,
    },
    /// Issue internal certificates.
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(Debug, Subcommand)]
enum PkiCmd {
    /// Create the CA in DIR (kept if present) and issue one certificate.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// control-plane, router.<region>, cell.<region> or operator.<name>.
        #[arg(long)]
        identity: String,
        /// DNS names or IPs the certificate is valid for (besides the identity).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Create the directory's HMAC key file (kept if present); the control
    /// plane and every router read the same file.
    DirectoryKey {
        #[arg(long)]
        file: PathBuf,
    },
    /// Create the gossip key file (kept if present); every member of the
    /// cluster (control plane, routers, cells) reads the same file.
    GossipKey {
        #[arg(long)]
        file: PathBuf,
    },
    /// Create a cell's signing-key seal file (kept if present); every
    /// instance of that cell reads the same file, no other component does.
    SealKey {
        #[arg(long)]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Serve {
        config,
        check,
        healthcheck,
    } = cli.cmd
    {
        return run_server(config, check, healthcheck);
    }
    // Multi-threaded (with one worker) because `restore` and `recover`
    // into PostgreSQL block on queries from synchronous code, which tokio
    // allows only there.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let conn = cli.conn;
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Region(c) => cli::region(&conn, c).await,
            Cmd::Config(c) => cli::config(&conn, c).await,
            Cmd::Move(c) => homecell_control_plane::move_cli::run(&conn, c).await,
            Cmd::Status => cli::status(&conn).await,
            Cmd::Backup { out, out_dir, keep } => {
                backup_cli::backup(&conn, out, out_dir, keep).await
            }
            Cmd::Restore { from, target } => backup_cli::restore(&from, &target, conn.output),
            Cmd::Recover {
                from_replica,
                target,
            } => backup_cli::recover(&from_replica, &target, conn.output),
            Cmd::Pki(PkiCmd::Issue {
                dir,
                identity,
                hosts,
            }) => issue(&dir, &identity, hosts),
            Cmd::Pki(PkiCmd::DirectoryKey { file }) => {
                homecell_common::directory_key::DirectoryKey::create_if_missing(&file)
                    .map(|_| println!("{}", file.display()))
            }
            Cmd::Pki(PkiCmd::GossipKey { file } | PkiCmd::SealKey { file }) => {
                homecell_common::key_file::create_if_missing(&file)
                    .map(|_| println!("{}", file.display()))
            }
            Cmd::Serve { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn issue(dir: &std::path::Path, identity: &str, mut hosts: Vec<String>) -> anyhow::Result<()> {
    let id = PeerIdentity::parse(identity)
        .ok_or_else(|| anyhow::anyhow!("identity {identity:?} is not control-plane, router.<region>, cell.<region> or operator.<name>"))?;
    hosts.insert(0, id.common_name());
    let paths = Pki::open_or_create(dir)?.issue(&id, &hosts)?;
    println!("{}", paths.cert.display());
    Ok(())
}

fn run_server(config: Option<PathBuf>, check: bool, healthcheck: bool) -> ExitCode {
    let config = match ServeConfig::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    if healthcheck {
        return homecell_common::admin::healthcheck_exit(config.admin_listen);
    }
    // Kept until the end: dropping it flushes the last spans.
    let _spans = match telemetry::init(
        config.log_format,
        &config.tracing,
        "homecell-control-plane",
        None,
        homecell_common::otel::Position::Inside,
    ) {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("error: cannot export spans: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    homecell_common::process_metrics::register(
        "control-plane",
        env!("CARGO_PKG_VERSION"),
        option_env!("HOMECELL_COMMIT"),
    );
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
