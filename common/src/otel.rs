//! Spans exported over OTLP (gRPC), off unless `[tracing] otlp_endpoint`
//! is set.
//!
//! A hop's span is a `tracing` span of target [`TARGET`] whose fields follow
//! the OpenTelemetry semantic conventions (`otel.name`, `otel.kind`,
//! `http.request.method`, `http.route`, `rpc.method`, …). Only those spans
//! reach the exporter: log events and the log's own spans (which carry the
//! request id a client may choose) never do, so no span attribute holds
//! more than a route template, a method, a status or a region.
//!
//! The W3C `traceparent` each hop sends on (`trace.rs`) names the exported
//! span's own id when spans are exported, so a collector links every hop to
//! its caller; when they are not, hops make their own ids as before.

use crate::trace::TraceParent;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span that is exported.
pub const TARGET: &str = "homecell::otel";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// `[tracing]` in every component's configuration.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    /// Unset: no span leaves the process.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The share of requests whose trace is kept, 0 to 1, decided by the
    /// router (the edge) for each request; cells and the control plane
    /// follow their caller's decision, and use it only for what no caller
    /// decided (work a cell starts by itself).
    #[serde(default = "all")]
    pub sample_ratio: f64,
}

fn all() -> f64 {
    1.0
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl TracingConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.sample_ratio),
            "tracing.sample_ratio must be between 0 and 1"
        );
        if let Some(e) = &self.otlp_endpoint {
            let uri: tonic::transport::Uri = e
                .parse()
                .map_err(|_| anyhow::anyhow!("tracing.otlp_endpoint is not a URL: {e}"))?;
            // The exporter is built without TLS: a collector is reached on
            // the local network or through a sidecar.
            anyhow::ensure!(
                uri.scheme_str() == Some("http") && uri.host().is_some(),
                "tracing.otlp_endpoint must be http://host:port (OTLP/gRPC without TLS: run the collector beside the component)"
            );
        }
        Ok(())
    }
}

/// The exporter while the process runs: flushes what it holds when dropped.
pub struct Exporter {
    provider: SdkTracerProvider,
    // The exporter's gRPC channel lives on this runtime, so any thread
    // (Pingora's workers, the batch processor's own) can export.
    _runtime: tokio::runtime::Runtime,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("could not flush the last spans: {e}");
        }
    }
}

/// Where a component stands, for its sampling: the router is the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Decides for every request by a random draw of its own: a client's
    /// `traceparent` keeps its trace id (the logs show it), but neither its
    /// sampled flag nor a trace id picked to pass a ratio test decides
    /// whether the request is exported.
    Edge,
    /// Follows its caller's decision (a router's or another component's).
    Inside,
}

/// [`Position::Edge`]'s sampler.
#[derive(Debug, Clone)]
struct EdgeSampler {
    ratio: f64,
}

impl opentelemetry_sdk::trace::ShouldSample for EdgeSampler {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        _trace_id: TraceId,
        _name: &str,
        _kind: &opentelemetry::trace::SpanKind,
        _attributes: &[opentelemetry::KeyValue],
        _links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        use opentelemetry_sdk::trace::SamplingDecision;
        let mut b = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        let draw = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
        opentelemetry_sdk::trace::SamplingResult {
            decision: if draw < self.ratio {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: parent
                .map(|cx| cx.span().span_context().trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

/// The tracer for `service` (`homecell-cell` …) when `config` names an
/// endpoint.
pub fn tracer(
    config: &TracingConfig,
    service: &'static str,
    region: Option<&str>,
    position: Position,
) -> anyhow::Result<Option<(opentelemetry_sdk::trace::Tracer, Exporter)>> {
    use opentelemetry_otlp::WithExportConfig;
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    let exporter = {
        let _in = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()?
    };
    let mut resource = opentelemetry_sdk::Resource::builder().with_service_name(service);
    if let Some(region) = region {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "cloud.region",
            region.to_string(),
        ));
    }
    let builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    let provider = match position {
        Position::Edge => builder.with_sampler(EdgeSampler {
            ratio: config.sample_ratio,
        }),
        Position::Inside => builder.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(config.sample_ratio),
        ))),
    }
    .build();
    let tracer = provider.tracer(service);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((
        tracer,
        Exporter {
            provider,
            _runtime: runtime,
        },
    )))
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Makes `span` the child of the caller's span named by `parent` (the
/// `traceparent` it sent).
pub fn set_remote_parent(span: &tracing::Span, parent: Option<TraceParent>) {
    if !enabled() {
        return;
    }
    if let Some(p) = parent {
        let cx = opentelemetry::Context::new().with_remote_span_context(remote(p));
        let _ = span.set_parent(cx);
    }
}

/// The span another process named in a `traceparent`.
fn remote(p: TraceParent) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(p.trace_id),
        SpanId::from_bytes(p.span_id),
        TraceFlags::new(p.flags),
        true,
        TraceState::default(),
    )
}

/// Links `span` to the span named by `cause` (a `traceparent` kept with
/// work done later, as an outbox event keeps the request's).
pub fn add_link(span: &tracing::Span, cause: TraceParent) {
    if !enabled() {
        return;
    }
    span.add_link(remote(cause));
}

/// This hop's trace context: the exported span's own ids when spans are
/// exported, else `otherwise`.
pub fn hop(span: &tracing::Span, otherwise: TraceParent) -> TraceParent {
    if !enabled() {
        return otherwise;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return otherwise;
    }
    TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::SpanKind;
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};

    /// A client's sampled flag, or a trace id chosen to pass a ratio test
    /// (all zeros below the top bits), decides nothing at the edge.
    #[test]
    fn the_edge_ignores_what_a_client_says_about_sampling() {
        let sampled_by_client =
            opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(
                    [0; 15]
                        .into_iter()
                        .chain([1])
                        .collect::<Vec<_>>()
                        .try_into()
                        .unwrap(),
                ),
                SpanId::from_bytes([1; 8]),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ));
        let decide = |ratio: f64| {
            EdgeSampler { ratio }
                .should_sample(
                    Some(&sampled_by_client),
                    TraceId::from_bytes(
                        [0; 15]
                            .into_iter()
                            .chain([1])
                            .collect::<Vec<_>>()
                            .try_into()
                            .unwrap(),
                    ),
                    "request",
                    &SpanKind::Server,
                    &[],
                    &[],
                )
                .decision
        };
        for _ in 0..100 {
            assert_eq!(decide(0.0), SamplingDecision::Drop);
            assert_eq!(decide(1.0), SamplingDecision::RecordAndSample);
        }
        let kept = (0..2000)
            .filter(|_| decide(0.1) == SamplingDecision::RecordAndSample)
            .count();
        assert!((100..=320).contains(&kept), "{kept} of 2000 at 0.1");
    }
}
