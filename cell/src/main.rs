//! `cell`: one region's cell, and the commands an operator runs on its host.

use clap::{Parser, Subcommand};
use homecell_cell::config::CellConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "cell", version, about = "A Homecell regional cell")]
struct Cli {
    /// TOML configuration; HOMECELL_CELL_* environment variables override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => {
            homecell_common::telemetry::init(config.log_format);
            rt.block_on(homecell_cell::run(config))
        }
        Cmd::RotateKeys => rt.block_on(homecell_cell::admin::rotate_keys(&config)),
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
