//! Traces: OpenTelemetry spans exported over OTLP/gRPC, off unless [`init_otlp`] ran.
//! The proxy continues the caller's W3C trace context (`traceparent`, `tracestate`),
//! opens one span per request carrying the authorization decision, and passes its own
//! span on to the app, so a trace follows a request across every sidecar it crosses.

use std::sync::{Arc, LazyLock, OnceLock};

use arc_swap::ArcSwap;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// One exporter of spans under one `service.name` (each sidecar has its own, also when
/// several run in one process, as under `meshward up`). Cheap to clone.
#[derive(Clone)]
pub struct Tracer(Arc<Tracing>);

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracer")
    }
}

/// The process's tracer for spans started without one of their own ([`init_otlp`]).
static DEFAULT: OnceLock<Tracer> = OnceLock::new();
/// Every tracer made, so [`flush`] exports all of them.
static ALL: LazyLock<ArcSwap<Vec<Tracer>>> = LazyLock::new(ArcSwap::default);

/// The W3C trace-context propagator (stateless).
fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// A tracer exporting to the OTLP/gRPC `endpoint` (e.g. `http://127.0.0.1:4317`) as
/// `service` (a batch exporter; spans are dropped, never waited for, when the collector is
/// away). Call inside a Tokio runtime.
pub fn otlp(endpoint: &str, service: &str) -> Result<Tracer, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("the OTLP exporter for `{endpoint}`: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "meshward-proxy");
    let t = Tracer(Arc::new(Tracing { provider, tracer }));
    ALL.rcu(|all| {
        let mut all = Vec::clone(all);
        all.push(t.clone());
        all
    });
    Ok(t)
}

/// Starts exporting the spans of every request started without a tracer of its own, as
/// `service` ([`otlp`]). The first call in a process wins; later ones do nothing.
pub fn init_otlp(endpoint: &str, service: &str) -> Result<(), String> {
    if DEFAULT.get().is_some() {
        return Ok(());
    }
    let t = otlp(endpoint, service)?;
    let _ = DEFAULT.set(t);
    Ok(())
}

/// Exports what is buffered (for tests and shutdown).
pub fn flush() {
    for t in ALL.load().iter() {
        let _ = t.0.provider.force_flush();
    }
}

/// Whether spans are being recorded by the process's default tracer.
pub fn enabled() -> bool {
    DEFAULT.get().is_some()
}

/// The tracer a span uses: its own, else the process's default.
fn pick(t: Option<&Tracer>) -> Option<&Tracer> {
    t.or_else(|| DEFAULT.get())
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Raw header pairs as a codec without a header map (the HTTP/1.1 fast path) read them.
struct Pairs<'a>(Vec<(&'a str, &'a str)>);

impl Extractor for Pairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| *v)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

struct Setter<F>(F);

impl<F: FnMut(&str, &str)> Injector for Setter<F> {
    fn set(&mut self, key: &str, value: String) {
        (self.0)(key, &value);
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The span of one request through the proxy; nothing at all when tracing is off.
#[derive(Debug, Default)]
pub struct RequestSpan(Option<Context>);

/// What the span records of the decision.
#[derive(Debug, Clone, Copy)]
pub struct DecisionAttrs<'a> {
    pub source: &'a str,
    pub destination: &'a str,
    pub verdict: &'a str,
    pub reason: &'a str,
    pub policy: Option<&'a str>,
    pub decision_ns: u64,
}

impl RequestSpan {
    fn server(t: &Tracer, parent: Context, method: &str, path: &str) -> Self {
        let span =
            t.0.tracer
                .span_builder(format!("meshward inbound {method}"))
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("http.request.method", method.to_owned()),
                    KeyValue::new("url.path", path.to_owned()),
                ])
                .start_with_context(&t.0.tracer, &parent);
        RequestSpan(Some(parent.with_span(span)))
    }

    fn client(t: &Tracer, parent: Context, method: &str, path: &str, service: &str) -> Self {
        let span =
            t.0.tracer
                .span_builder(format!("meshward outbound {method}"))
                .with_kind(SpanKind::Client)
                .with_attributes([
                    KeyValue::new("http.request.method", method.to_owned()),
                    KeyValue::new("url.path", path.to_owned()),
                    KeyValue::new("meshward.upstream", service.to_owned()),
                ])
                .start_with_context(&t.0.tracer, &parent);
        RequestSpan(Some(parent.with_span(span)))
    }
}

impl<'a> Pairs<'a> {
    /// The UTF-8 header pairs of a raw head.
    fn of(headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> Self {
        Pairs(
            headers
                .filter_map(|(k, v)| Some((k, std::str::from_utf8(v).ok()?)))
                .collect(),
        )
    }
}

impl RequestSpan {
    /// Starts a server span continuing the trace in `headers` (a new trace without one).
    pub fn start(
        tracer: Option<&Tracer>,
        headers: &http::HeaderMap,
        method: &str,
        path: &str,
    ) -> Self {
        let Some(t) = pick(tracer) else {
            return RequestSpan(None);
        };
        let parent = propagator().extract(&Headers(headers));
        Self::server(t, parent, method, path)
    }

    /// [`RequestSpan::start`] for a codec that reads raw header pairs (name, value): the
    /// same span, so a request is traced alike whichever codec serves it. Nothing is
    /// read or allocated when tracing is off.
    pub fn start_raw<'a>(
        tracer: Option<&Tracer>,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
        method: &str,
        path: &str,
    ) -> Self {
        let Some(t) = pick(tracer) else {
            return RequestSpan(None);
        };
        let parent = propagator().extract(&Pairs::of(headers));
        Self::server(t, parent, method, path)
    }

    /// Whether `name` is a trace-context header [`RequestSpan::inject_with`] replaces.
    pub fn is_context_header(name: &str) -> bool {
        name.eq_ignore_ascii_case("traceparent") || name.eq_ignore_ascii_case("tracestate")
    }

    /// [`RequestSpan::inject`] for a codec that writes raw headers: `set(name, value)` for
    /// each trace-context header of this span.
    pub fn inject_with(&self, set: impl FnMut(&str, &str)) {
        let Some(cx) = &self.0 else {
            return;
        };
        propagator().inject_context(cx, &mut Setter(set));
    }

    /// Starts a client span for a request the outbound proxy forwards (pooled HTTP),
    /// continuing the app's trace; `service` is the upstream called.
    pub fn start_client(
        tracer: Option<&Tracer>,
        headers: &http::HeaderMap,
        method: &str,
        path: &str,
        service: &str,
    ) -> Self {
        let Some(t) = pick(tracer) else {
            return RequestSpan(None);
        };
        let parent = propagator().extract(&Headers(headers));
        Self::client(t, parent, method, path, service)
    }

    /// [`RequestSpan::start_client`] for a codec that reads raw header pairs (name, value).
    pub fn start_client_raw<'a>(
        tracer: Option<&Tracer>,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
        method: &str,
        path: &str,
        service: &str,
    ) -> Self {
        let Some(t) = pick(tracer) else {
            return RequestSpan(None);
        };
        let parent = propagator().extract(&Pairs::of(headers));
        Self::client(t, parent, method, path, service)
    }

    /// Whether this request is traced (tracing is on).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// Records the authorization decision.
    pub fn decision(&self, a: DecisionAttrs<'_>) {
        let Some(cx) = &self.0 else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new("meshward.source", a.source.to_owned()));
        span.set_attribute(KeyValue::new(
            "meshward.destination",
            a.destination.to_owned(),
        ));
        span.set_attribute(KeyValue::new("meshward.verdict", a.verdict.to_owned()));
        span.set_attribute(KeyValue::new("meshward.reason", a.reason.to_owned()));
        if let Some(p) = a.policy {
            span.set_attribute(KeyValue::new("meshward.policy", p.to_owned()));
        }
        span.set_attribute(KeyValue::new(
            "meshward.decision_ns",
            i64::try_from(a.decision_ns).unwrap_or(i64::MAX),
        ));
    }

    /// Puts this span's context into the request forwarded to the app (replacing the
    /// caller's), so the app's own calls continue the trace as children of this span.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        let Some(cx) = &self.0 else {
            return;
        };
        propagator().inject_context(cx, &mut HeadersMut(headers));
    }

    /// Ends the span with the response status.
    pub fn finish(self, status: u16) {
        let Some(cx) = self.0 else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.set_status(Status::error(format!("HTTP {status}")));
        }
        span.end();
    }
}
