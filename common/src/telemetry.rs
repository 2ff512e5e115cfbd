//! Logging setup shared by every binary: `tracing` with an env filter
//! (`RUST_LOG`, default `info`). Libraries that log through `log`
//! (Pingora) are bridged in by tracing-subscriber.
//!
//! The format follows where the log goes unless `log_format` says:
//! on a terminal, plain lines in colour; anywhere else (a file, a pipe, a
//! container's log driver), one JSON object per line with the timestamp,
//! level, target, message and the fields of the spans it ran in (the
//! request's `trace_id` and `request_id`), and never colour codes, which a
//! log shipper would store as text.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON unless standard error is a terminal.
    #[default]
    Auto,
    Plain,
    Json,
}

/// Installs the global subscriber. Safe to call twice (the second is a no-op).
pub fn init(format: LogFormat) {
    let terminal = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Plain => false,
        LogFormat::Json => true,
    };
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
