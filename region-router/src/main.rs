//! `region-router`: the edge proxy.

use clap::Parser;
use homecell_region_router::config::RouterConfig;
use std::path::PathBuf;
use std::process::ExitCode;

/// Every proxied request allocates and frees many small buffers (headers,
/// Bytes, futures); glibc's malloc cost about a tenth of the router's CPU
/// under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "region-router",
    version,
    about = "Homecell region router (Pingora)"
)]
struct Cli {
    /// TOML configuration; HOMECELL_ROUTER_* environment variables override it.
    #[arg(long, short, env = "HOMECELL_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Probe the running router's /ready on its admin listener (the
    /// container health check); exit 0 when ready.
    #[arg(long)]
    healthcheck: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match RouterConfig::load(cli.config.as_deref()) {
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
    // Kept until the end: dropping it flushes the last spans.
    let _spans = match homecell_common::telemetry::init(
        config.log_format,
        &config.tracing,
        "homecell-region-router",
        Some(&config.region),
        homecell_common::otel::Position::Edge,
    ) {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("error: cannot export spans: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    homecell_common::process_metrics::register(
        "region-router",
        env!("CARGO_PKG_VERSION"),
        option_env!("HOMECELL_COMMIT"),
    );
    match homecell_region_router::run(config, cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
