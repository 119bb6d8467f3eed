//! Logging and tracing: `tracing` to stderr (filtered by `RUST_LOG`), and,
//! when `otel.endpoint` is set, spans exported over OTLP/HTTP.
//!
//! The W3C `traceparent` travels inside the entry (as a header), so the apply
//! span joins the trace of the write that produced it.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::OtelConfig;
use crate::entry::Entry;

/// Keeps the exporter alive; call [`Telemetry::shutdown`] before exiting, or
/// buffered spans are lost.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

#[derive(Debug, thiserror::Error)]
#[error("otel.endpoint {endpoint:?}: {source}")]
pub struct TelemetryError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// Install the global subscriber. Safe to call more than once (tests): later
/// calls keep the first subscriber.
pub fn init(otel: &OtelConfig) -> Result<Telemetry, TelemetryError> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let provider = if otel.endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(&otel.endpoint)
            .build()
            .map_err(|source| TelemetryError {
                endpoint: otel.endpoint.clone(),
                source,
            })?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(otel.service_name.clone())
            .build();
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    };
    let otel_layer = provider.as_ref().map(|p| {
        // The exporter's own HTTP stack must not trace itself.
        let quiet =
            EnvFilter::new("info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,reqwest=off");
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("walden"))
            .with_filter(quiet)
    });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init();
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flush and stop the exporter. Blocking: call it off async threads.
    pub fn shutdown(self) {
        if let Some(Err(error)) = self.provider.map(|p| p.shutdown()) {
            eprintln!("walden: trace export shutdown failed: {error}");
        }
    }
}

/// Make `span` a child of the context in `traceparent`, if any. Must be
/// called before the span is entered.
pub fn set_parent_from_traceparent(span: &Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Make `span` a child of the write that produced `entry`.
pub fn set_parent_from(span: &Span, entry: &Entry) {
    set_parent_from_traceparent(span, entry.header("traceparent"));
}

/// The W3C `traceparent` of `span`, when tracing export is on.
pub fn traceparent(span: &Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}
