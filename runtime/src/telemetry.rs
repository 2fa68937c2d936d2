//! Logging and tracing setup.
//!
//! Logs: `tracing` with an env filter (`RUST_LOG`, default `info`), text or JSON.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, spans are exported over OTLP/gRPC, configured by the standard variables
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
//! Export never blocks the data path: finished spans go into a bounded queue with
//! `try_send`; a full queue, or a batch the collector does not take, is dropped and
//! counted in `meshlite_otel_dropped_spans_total`.

use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber for logs only. Safe to call twice (the second
/// call is a no-op), so tests can call it freely.
pub fn init_logging(json: bool) {
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt_layer(json))
        .try_init();
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

fn fmt_layer<S>(json: bool) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        Box::new(layer.json())
    } else {
        Box::new(layer)
    }
}

/// Handles of the tracing pipeline.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Spans dropped: queue full or export failed.
    pub dropped_spans: Counter,
    /// Spans the collector accepted.
    pub exported_spans: Counter,
}

/// Whether the standard variables ask for trace export.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Installs logging and, when configured by the environment, OTLP trace export.
/// `service` is the default `service.name` when `OTEL_SERVICE_NAME` is unset.
/// Must run inside a tokio runtime when export is on.
pub fn init(service: &str, json: bool) -> Telemetry {
    let mut t = Telemetry::default();
    let layer = if otlp_configured() {
        match build_provider(service, &t) {
            Ok(provider) => {
                let tracer = provider.tracer("meshlite");
                t.provider = Some(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("OTLP trace export disabled: {e}");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt_layer(json))
        .with(layer)
        .try_init();
    if t.provider.is_some() {
        tracing::info!(service, "exporting traces over OTLP");
    }
    t
}

impl Telemetry {
    /// Registers `meshlite_otel_dropped_spans_total` and `..._exported_spans_total`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meshlite_otel");
        r.register(
            "dropped_spans",
            "Spans dropped because the export queue was full or the collector failed",
            self.dropped_spans.clone(),
        );
        r.register(
            "exported_spans",
            "Spans accepted by the collector",
            self.exported_spans.clone(),
        );
    }

    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued (best effort, bounded) and stops.
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            let _ = p.shutdown_with_timeout(Duration::from_secs(2));
        }
    }
}

fn env_duration_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn build_provider(service: &str, t: &Telemetry) -> Result<SdkTracerProvider, String> {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_string());
    }
    let resource = resource.build();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(&resource);
    let processor = BoundedBatch::spawn(
        exporter,
        env_usize("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        env_usize("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        env_duration_ms("OTEL_BSP_SCHEDULE_DELAY", 1000),
        t.dropped_spans.clone(),
        t.exported_spans.clone(),
    );
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// A batch span processor with an honest drop counter: `on_end` never waits.
#[derive(Debug)]
struct BoundedBatch {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl BoundedBatch {
    fn spawn<E: SpanExporter + 'static>(
        exporter: E,
        queue: usize,
        batch: usize,
        delay: Duration,
        dropped: Counter,
        exported: Counter,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<SpanData>(queue);
        let drop_count = dropped.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(batch);
            let mut warned = false;
            loop {
                let first = rx.recv().await;
                let Some(first) = first else { return };
                buf.push(first);
                let deadline = tokio::time::Instant::now() + delay;
                while buf.len() < batch {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(s)) => buf.push(s),
                        Ok(None) | Err(_) => break,
                    }
                }
                let n = buf.len() as u64;
                match exporter.export(std::mem::take(&mut buf)).await {
                    Ok(()) => {
                        exported.inc_by(n);
                        warned = false;
                    }
                    Err(e) => {
                        drop_count.inc_by(n);
                        if !warned {
                            tracing::warn!(error = %e, spans = n, "trace export failed; dropping spans");
                            warned = true;
                        }
                    }
                }
            }
        });
        Self { tx, dropped }
    }
}

impl SpanProcessor for BoundedBatch {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The W3C traceparent of a tracing span ("" when it is not traced).
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return String::new();
    }
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Parses a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(tp: &str) -> Option<SpanContext> {
    let mut parts = tp.split('-');
    let (ver, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ver != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Links a span to the change whose traceparent is given (ignored when invalid).
pub fn link(span: &tracing::Span, tp: &str) {
    if let Some(sc) = parse_traceparent(tp) {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert_eq!(
            format!("{}", sc.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{}", sc.span_id()), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn untraced_span_has_no_traceparent() {
        assert_eq!(traceparent(&tracing::Span::none()), "");
    }
}
