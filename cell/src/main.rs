//! `cell`: one region's cell, and the commands an operator runs on its host.

use clap::{Parser, Subcommand};
use homecell_cell::config::CellConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "cell", version, about = "A Homecell regional cell")]
struct Cli {
    /// TOML configuration; HOMECELL_CELL_* environment variables override it.
    #[arg(long, short, global = true, env = "HOMECELL_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Probe the running cell's /ready on its admin listener (the container
    /// health check); exit 0 when ready.
    #[arg(long)]
    healthcheck: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the cell (the default).
    Serve,
    /// Start signing tokens with a new key; the old one verifies until its
    /// tokens expire. Running cells pick it up within seconds.
    RotateKeys,
    /// Grant a role to a registered user (how the first admin is made: on
    /// the cell host, never through an open endpoint).
    GrantRole {
        /// The user's phone, email or username.
        #[arg(long)]
        identifier: String,
        #[arg(long)]
        role: String,
    },
    /// Prove the ledger: every cell's sums to zero and matches its
    /// transfers, clearing accounts net to what is in flight, and wallets
    /// hold deposits minus withdrawals. Give every cell's datastore to check
    /// across cells (default: this cell's). Exits 1 on any violation.
    Audit {
        /// `sqlite:<path>` or `postgres://…`; repeat for several cells.
        #[arg(long = "database-url")]
        database_urls: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An audit of explicit datastores needs no cell configuration.
    if let Some(Cmd::Audit { database_urls }) = &cli.cmd
        && !database_urls.is_empty()
    {
        return run_audit(database_urls);
    }
    let config = match CellConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    if cli.healthcheck {
        return homecell_common::admin::healthcheck_exit(config.admin_listen);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => {
            // Kept until the end: dropping it flushes the last spans.
            let _spans = match homecell_common::telemetry::init(
                config.log_format,
                &config.tracing,
                "homecell-cell",
                Some(&config.region),
                homecell_common::otel::Position::Inside,
            ) {
                Ok(exporter) => exporter,
                Err(e) => {
                    eprintln!("error: cannot export spans: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            homecell_common::process_metrics::register(
                "cell",
                env!("CARGO_PKG_VERSION"),
                option_env!("HOMECELL_COMMIT"),
            );
            rt.block_on(homecell_cell::run(config))
        }
        Cmd::RotateKeys => rt.block_on(homecell_cell::admin::rotate_keys(&config)),
        Cmd::Audit { .. } => return run_audit(&[config.database_url()]),
        Cmd::GrantRole { identifier, role } => rt.block_on(homecell_cell::admin::grant_role(
            &config,
            &identifier,
            &role,
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_audit(urls: &[String]) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(homecell_cell::admin::audit(urls)) {
        Ok(report) => {
            print!("{}", report.render());
            if report.passed() {
                println!("audit passed");
                ExitCode::SUCCESS
            } else {
                println!("audit FAILED");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
