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

/// Installs the global subscriber: the log, and the OTLP exporter when
/// `tracing` names an endpoint (see `otel.rs`), which must be kept alive
/// for as long as spans should leave. Safe to call twice (the second
/// installs nothing).
pub fn init(
    format: LogFormat,
    tracing: &crate::otel::TracingConfig,
    service: &'static str,
    region: Option<&str>,
    position: crate::otel::Position,
) -> anyhow::Result<Option<crate::otel::Exporter>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let terminal = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Plain => false,
        LogFormat::Json => true,
    };
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let log = if json {
        log.json().flatten_event(true).boxed()
    } else {
        log.boxed()
    };
    // The exported spans are not the log's, and nothing but them is
    // exported: no log event, and no span of the log's own. The log's
    // filter says so in a directive of its own, so each filter stays one
    // static per-callsite answer: a nested or dynamic filter would be asked
    // again at every event of every library, enabled or not.
    let filter = filter.add_directive(
        format!("{}=off", crate::otel::TARGET)
            .parse()
            .expect("a valid directive"),
    );
    let exported = |m: &tracing::Metadata<'_>| m.is_span() && m.target() == crate::otel::TARGET;
    let log = log.with_filter(filter);
    let (otel, exporter) = match crate::otel::tracer(tracing, service, region, position)? {
        Some((tracer, exporter)) => (
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(
                        filter_fn(exported)
                            .with_max_level_hint(tracing::level_filters::LevelFilter::INFO),
                    ),
            ),
            Some(exporter),
        ),
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(otel)
        .try_init();
    Ok(exporter)
}
