//! Logs and traces: the process's `tracing` subscriber, writing text or
//! JSON lines and, when an OTLP endpoint is configured, exporting spans
//! (the `rpc` span of each call, the `execution` span of each run and the
//! `step` span of each attempt) to an OpenTelemetry collector over gRPC.
//!
//! A call that carries a valid W3C `traceparent` continues the caller's
//! trace: its `rpc` span's parent is the caller's span. The `execution`
//! span of an execution the call starts is a child of that `rpc` span in
//! the trace (it stays a root for log lines, since it outlives the call), so
//! the steps of a traced `RunPipeline` belong to the caller's trace. An
//! execution resumed after a restart, or promoted from its pipeline's queue,
//! starts a trace of its own (the trace context is not stored with it).

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http::HeaderMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the current span and its
    /// parents.
    Json,
}

/// What the process's logging and tracing are set up with.
#[derive(Debug, Clone, Default)]
pub struct TracingConfig {
    /// An `EnvFilter` directive, e.g. `info` or `pipelined=debug`.
    pub filter: String,
    pub format: LogFormat,
    /// Where to export spans over OTLP/gRPC (`http://collector:4317`);
    /// `None` exports nothing.
    pub otlp_endpoint: Option<String>,
}

/// Keeps the exporter alive; [`TracingGuard::shutdown`] flushes the spans
/// not exported yet.
#[must_use = "dropping the guard does not flush; call shutdown()"]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Exports the spans still buffered and stops the exporter. Blocking
    /// work, done off the async workers.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = done {
                eprintln!("flushing traces failed: {error}");
            }
        }
    }
}

/// Installs the process's subscriber. Must run inside the Tokio runtime
/// when exporting (the exporter's gRPC channel lives there).
pub fn init(config: &TracingConfig) -> anyhow::Result<TracingGuard> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&config.filter).context("bad --log filter")?;
    let (text, json) = match config.format {
        LogFormat::Text => (Some(tracing_subscriber::fmt::layer()), None),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true),
            ),
        ),
    };
    let provider = match config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("cannot export traces to {endpoint}"))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name("pipelined").build())
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("pipelined")));
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .context("cannot install the log subscriber")?;
    Ok(TracingGuard { provider })
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes the caller's span, named by the W3C `traceparent` (and
/// `tracestate`) in `headers`, the parent of `span` in exported traces.
/// Does nothing without a valid `traceparent`, or when nothing exports.
pub fn continue_remote_trace(span: &Span, headers: &HeaderMap) {
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(context);
}

/// Makes `span` a child, in exported traces, of the span current now (the
/// `rpc` span of the call that starts an execution, say), while it stays a
/// root for log lines. Does nothing when nothing exports.
pub fn continue_current_trace(span: &Span) {
    let _ = span.set_parent(Span::current().context());
}

/// Records a call's final gRPC status code on the current (`rpc`) span of
/// exported traces, as `rpc.grpc.status_code`; the codes that mean a server
/// fault (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
/// DATA_LOSS) mark the span as an error, as the OpenTelemetry conventions
/// for gRPC servers ask. Does nothing when nothing exports.
pub fn record_grpc_status(code: i64) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    span.set_attribute("rpc.grpc.status_code", code);
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.set_status(opentelemetry::trace::Status::error(format!(
            "gRPC status {code}"
        )));
    }
}
