//! Meshward's Prometheus metrics (prometheus-client, OpenMetrics text): the families a
//! proxy exposes on its admin port and those the control plane exposes on `/metrics`.
//!
//! Label values are bounded by construction: identities (the mesh's SPIFFE IDs, or
//! `unauthenticated`), workload and service names (`namespace/name`, or `external`),
//! verdicts, reason codes, directions, response classes (`2xx` ... `5xx`), handshake
//! failure kinds, policy names, revisions. Never a raw path, address or header.
//!
//! Counted on the request path: no lock shared across connections (lint below).
#![deny(clippy::disallowed_types)]

pub mod trace;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`ProxyMetrics::encode`] and [`ControlMetrics::encode`]: the
/// Prometheus text format, which every scraper and `promtool check metrics` read.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites prometheus-client's OpenMetrics text as the Prometheus text format (0.0.4):
/// counter families are named with their `_total` suffix and there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = l.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(r) => out.push_str(&r),
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

/// The standard process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_start_time_seconds`, `process_open_fds`, `process_max_fds`, `process_threads`)
/// read from `/proc/self` (none elsewhere), and `meshward_build_info{version,component} 1`.
pub fn process_text(component: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        );
    };
    // USER_HZ is 100 on every Linux ABI the proxy builds for.
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name in parentheses (which may hold spaces): field 3 onwards.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    if let (Some(u), Some(k)) = (field(14), field(15)) {
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (u + k) / TICKS,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|k| k * 1024.0)
    };
    if let Some(v) = kib("VmRSS:") {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            v,
        );
    }
    if let Some(v) = kib("VmSize:") {
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            v,
        );
    }
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(b), Some(start)) = (btime, field(22)) {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            b + start / TICKS,
        );
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            d.count() as f64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        });
    if let Some(v) = max_fds {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            v,
        );
    }
    if let Some(v) = field(20) {
        metric(
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            v,
        );
    }
    let _ = write!(
        out,
        "# HELP meshward_build_info The build: version and component.\n# TYPE meshward_build_info gauge\nmeshward_build_info{{version=\"{}\",component=\"{component}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    out
}

fn encode(registry: &Registry) -> String {
    let mut s = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut s, registry);
    to_prometheus_text(&s)
}

/// Authorization decision time: 100 ns to 1 ms (the engine decides in well under 1 µs).
pub const DECISION_BUCKETS: [f64; 12] = [
    1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3,
];

/// Request latency through the proxy, 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Config push latency (control plane), 1 ms to 30 s.
pub const PUSH_BUCKETS: [f64; 12] = [
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

type FGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The verified peer SPIFFE ID, or `unauthenticated` (shared strings: labels are built
    /// on every request, so they copy no text).
    pub source: Arc<str>,
    /// The destination workload or service (`namespace/name`), or `external`.
    pub destination: Arc<str>,
    pub verdict: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    /// `2xx`, `3xx`, `4xx`, `5xx`, `1xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    /// [`HandshakeFailure::as_str`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub direction: &'static str,
    /// The cap that refused: `total`, `handshaking` or `per_identity`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    /// The called service, `namespace/name`.
    pub service: String,
    /// `retry`, `retry_budget_exhausted`, `per_try_timeout`, `timeout`, `circuit_open`,
    /// `ejection`, `fallback`, `all_ejected`.
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
    /// `ready`, `ejected` or `probation`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    /// The `FaultInjection`, `namespace/name`.
    pub fault: String,
    /// `delay`, `abort_http`, `abort_grpc` or `reset`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerNameLabels {
    /// The listener, e.g. `inbound 127.0.0.1:15006`.
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener, e.g. `inbound 127.0.0.1:15006`.
    pub listener: String,
    /// `open` (all) or `handshaking`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// The dry-run policy whose shadow verdict this is.
    pub policy: String,
    pub verdict: &'static str,
}

/// Why a TLS handshake failed, in a handful of kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    NotTls,
    NoCertificate,
    /// The peer's certificates break the X.509-SVID rules (no or several URI SANs, no
    /// path, a CA or signing leaf, a signing certificate without `keyCertSign`, ...).
    BadSvid,
    UnknownCa,
    Expired,
    NotYetValid,
    /// A valid SVID of another identity than expected: on the outbound side, an endpoint
    /// impersonating the service.
    WrongIdentity,
    /// The proxy had no valid certificate of its own to present (fail closed).
    NoOwnCertificate,
    Timeout,
    Other,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::BadSvid => "bad_svid",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::NotYetValid => "not_yet_valid",
            HandshakeFailure::WrongIdentity => "wrong_identity",
            HandshakeFailure::NoOwnCertificate => "no_own_certificate",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// The kind of a stable refusal code (`meshward_identity::svid::SvidError::code`, the
    /// same words as [`HandshakeFailure::as_str`]); `None` for an unknown code.
    pub fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "no_certificate" => HandshakeFailure::NoCertificate,
            "bad_svid" => HandshakeFailure::BadSvid,
            "unknown_ca" => HandshakeFailure::UnknownCa,
            "expired" => HandshakeFailure::Expired,
            "not_yet_valid" => HandshakeFailure::NotYetValid,
            "wrong_identity" => HandshakeFailure::WrongIdentity,
            _ => return None,
        })
    }

    /// Classifies a rustls (or I/O) error message: for failures that carry no refusal code
    /// (not TLS, the peer's alerts, timeouts).
    pub fn classify(err: &str) -> Self {
        let e = err.to_ascii_lowercase();
        if e.contains("corrupt message") || e.contains("invalidcontenttype") {
            HandshakeFailure::NotTls
        } else if e.contains("peer sent no certificates") || e.contains("certificaterequired") {
            HandshakeFailure::NoCertificate
        } else if e.contains("unknownissuer")
            || e.contains("unknown issuer")
            || e.contains("unknown ca")
            || e.contains("badsignature")
        {
            HandshakeFailure::UnknownCa
        } else if e.contains("expired") {
            HandshakeFailure::Expired
        } else if e.contains("wrong identity")
            || e.contains("is not one of")
            || e.contains("expected `spiffe")
        {
            HandshakeFailure::WrongIdentity
        } else if e.contains("no server certificate")
            || e.contains("no certificate chain resolved")
            || e.contains("handshakefailure")
        {
            HandshakeFailure::NoOwnCertificate
        } else if e.contains("timed out") || e.contains("within") {
            HandshakeFailure::Timeout
        } else {
            HandshakeFailure::Other
        }
    }
}

/// A proxy's metrics.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub decision_time: Histogram,
    pub request_duration: Family<LatencyLabels, Histogram>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub connection_timeouts: Family<KindLabels, Counter>,
    pub revoked: Family<KindLabels, Counter>,
    pub faults: Family<FaultLabels, Counter>,
    pub accept_errors: Family<KindLabels, Counter>,
    /// Set when scraped.
    pub listener_connections: Family<ListenerLabels, Gauge>,
    pub tcp_opened: Family<ListenerNameLabels, Counter>,
    pub tcp_closed: Family<ListenerNameLabels, Counter>,
    pub tcp_received: Family<DirectionLabels, Counter>,
    pub tcp_sent: Family<DirectionLabels, Counter>,
    pub shadow: Family<ShadowLabels, Counter>,
    pub decision_log_dropped: Counter,
    pub decision_ship_dropped: Counter,
    /// Set when scraped.
    pub certificate_expiry: FGauge,
    pub config_revision: Gauge,
    pub config_updated: FGauge,
    pub config_age: FGauge,
    pub overrides_active: Gauge,
    pub persist_failures: Family<KindLabels, Counter>,
    /// Set when scraped.
    pub persisted_revision: Gauge,
    pub control_errors: Family<KindLabels, Counter>,
    pub connections_expired: Family<KindLabels, Counter>,
    pub outbound: Family<OutboundLabels, Counter>,
    /// Set when scraped: 1 for the state each endpoint is in.
    pub endpoints: Family<EndpointLabels, Gauge>,
    /// The series of the last request counted by a caller without a [`RequestSeries`] of
    /// its own, reused while the labels stay the same (a proxy mostly counts one source,
    /// destination and verdict over and over). Lock-free: a snapshot swapped on a change.
    last_request: arc_swap::ArcSwapOption<(RequestLabels, Counter)>,
    /// The latency series by direction (inbound, outbound) and status class, once created.
    latency: [std::sync::OnceLock<Histogram>; 10],
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let decision_time = Histogram::new(DECISION_BUCKETS);
        let request_duration: Family<LatencyLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        let shadow = Family::<ShadowLabels, Counter>::default();
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        let connection_timeouts = Family::<KindLabels, Counter>::default();
        let revoked = Family::<KindLabels, Counter>::default();
        let faults = Family::<FaultLabels, Counter>::default();
        let accept_errors = Family::<KindLabels, Counter>::default();
        let listener_connections = Family::<ListenerLabels, Gauge>::default();
        let tcp_opened = Family::<ListenerNameLabels, Counter>::default();
        let tcp_closed = Family::<ListenerNameLabels, Counter>::default();
        let tcp_received = Family::<DirectionLabels, Counter>::default();
        let tcp_sent = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "meshward_tcp_connections_opened",
            "Connections accepted, by listener",
            tcp_opened.clone(),
        );
        registry.register(
            "meshward_tcp_connections_closed",
            "Connections accepted and since closed, by listener",
            tcp_closed.clone(),
        );
        registry.register(
            "meshward_tcp_received_bytes",
            "Bytes relayed from the caller's side of opaque TCP connections (inbound: from the peer sidecar, outbound: from the app)",
            tcp_received.clone(),
        );
        registry.register(
            "meshward_tcp_sent_bytes",
            "Bytes relayed back to the caller's side of opaque TCP connections",
            tcp_sent.clone(),
        );
        let decision_log_dropped = Counter::default();
        let decision_ship_dropped = Counter::default();
        let certificate_expiry = FGauge::default();
        let config_revision = Gauge::default();
        let config_updated = FGauge::default();
        let config_age = FGauge::default();
        let overrides_active = Gauge::default();
        let persist_failures = Family::<KindLabels, Counter>::default();
        let persisted_revision = Gauge::default();
        let control_errors = Family::<KindLabels, Counter>::default();
        let connections_expired = Family::<KindLabels, Counter>::default();
        let outbound = Family::<OutboundLabels, Counter>::default();
        let endpoints = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "meshward_outbound_resilience",
            "What the caller's sidecar did for calls to a service, by event: retry, retry_budget_exhausted, per_try_timeout, timeout, circuit_open, ejection, fallback, all_ejected",
            outbound.clone(),
        );
        registry.register(
            "meshward_outbound_endpoint",
            "1 for the state each endpoint of a called service is in (ready, ejected, probation)",
            endpoints.clone(),
        );
        registry.register(
            "meshward_state_persist_failures",
            "Writes to the proxy's state directory that failed (svid, bundle, snapshot): what they held is in use but a restart would not find it",
            persist_failures.clone(),
        );
        registry.register(
            "meshward_state_persisted_revision",
            "The newest revision saved as last-known-good (a restart without the control plane enforces it; below meshward_config_revision: not saved)",
            persisted_revision.clone(),
        );
        registry.register(
            "meshward_control_errors",
            "Control-plane calls that failed, by kind (timeout: no answer within the deadline or keepalive, a hung control plane; unavailable; refused)",
            control_errors.clone(),
        );
        registry.register(
            "meshward_connections_expired",
            "Connections closed because a certificate that authenticated them expired or they reached --max-connection-age (certificate, max_age)",
            connections_expired.clone(),
        );
        registry.register(
            "meshward_requests",
            "Authorization decisions (connections and HTTP requests) by direction, source identity, destination, verdict and reason",
            requests.clone(),
        );
        registry.register(
            "meshward_decision_duration_seconds",
            "Time the policy engine took to decide",
            decision_time.clone(),
        );
        registry.register(
            "meshward_request_duration_seconds",
            "HTTP request latency through the proxy (allowed requests, to the app's response headers) by response class",
            request_duration.clone(),
        );
        registry.register(
            "meshward_tls_handshake_failures",
            "mTLS handshakes refused or failed, by kind",
            handshake_failures.clone(),
        );
        registry.register(
            "meshward_connections_refused",
            "Connections closed because a listener's cap was reached (total, handshaking, per_identity)",
            connections_refused.clone(),
        );
        registry.register(
            "meshward_connection_timeouts",
            "Inbound connections closed for a timeout (header_read: a request head too slow; idle: no request in progress for too long)",
            connection_timeouts.clone(),
        );
        registry.register(
            "meshward_revoked",
            "Open connections and streams closed because a later revision, override or quarantine denies them (tcp: a TCP connection; stream: an HTTP request in progress; tunnel: an upgraded connection or CONNECT tunnel)",
            revoked.clone(),
        );
        registry.register(
            "meshward_faults_injected",
            "Faults a FaultInjection injected into allowed requests and connections (delay; abort_http, abort_grpc: answered with that status instead of the app; reset: the connection or HTTP/2 stream reset)",
            faults.clone(),
        );
        registry.register(
            "meshward_accept_errors",
            "Accept errors that made a listener back off (emfile, enfile, enomem, enobufs, other)",
            accept_errors.clone(),
        );
        registry.register(
            "meshward_listener_connections",
            "Connections an inbound listener holds now (open: all, handshaking: identity not yet known)",
            listener_connections.clone(),
        );
        registry.register(
            "meshward_shadow_decisions",
            "Shadow (dry-run) verdicts by policy",
            shadow.clone(),
        );
        registry.register(
            "meshward_decision_log_dropped",
            "Decision records dropped because the log queue was full",
            decision_log_dropped.clone(),
        );
        registry.register(
            "meshward_decision_ship_dropped",
            "Decision records not shipped to the control plane (queue full while it was unreachable, or a failed batch)",
            decision_ship_dropped.clone(),
        );
        registry.register(
            "meshward_certificate_expiry_timestamp_seconds",
            "When the proxy's SVID expires (Unix time; 0 without one)",
            certificate_expiry.clone(),
        );
        registry.register(
            "meshward_config_revision",
            "The policy revision in force (0: none, everything is denied)",
            config_revision.clone(),
        );
        registry.register(
            "meshward_config_last_update_timestamp_seconds",
            "When the policy in force was installed (Unix time)",
            config_updated.clone(),
        );
        registry.register(
            "meshward_config_age_seconds",
            "Seconds since the policy in force was installed",
            config_age.clone(),
        );
        registry.register(
            "meshward_overrides_active",
            "Break-glass overrides in effect now",
            overrides_active.clone(),
        );
        ProxyMetrics {
            registry,
            requests,
            decision_time,
            request_duration,
            handshake_failures,
            connections_refused,
            connection_timeouts,
            revoked,
            faults,
            accept_errors,
            listener_connections,
            tcp_opened,
            tcp_closed,
            tcp_received,
            tcp_sent,
            shadow,
            decision_log_dropped,
            decision_ship_dropped,
            certificate_expiry,
            config_revision,
            config_updated,
            config_age,
            overrides_active,
            persist_failures,
            persisted_revision,
            control_errors,
            connections_expired,
            outbound,
            endpoints,
            last_request: arc_swap::ArcSwapOption::empty(),
            latency: Default::default(),
        }
    }

    /// The exposition ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        encode(&self.registry) + &process_text("proxy")
    }

    /// Counts a handshake failure.
    pub fn handshake_failed(&self, direction: &'static str, kind: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                direction,
                reason: kind.as_str(),
            })
            .inc();
    }

    /// Counts a connection refused by a listener's cap (`total`, `handshaking`,
    /// `per_identity`).
    pub fn connection_refused(&self, direction: &'static str, limit: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { direction, limit })
            .inc();
    }

    /// Counts a connection closed for a timeout (`header_read`, `idle`).
    pub fn connection_timeout(&self, kind: &'static str) {
        self.connection_timeouts
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts an open connection or stream closed by a re-check (`tcp`, `stream`,
    /// `tunnel`).
    pub fn revoked(&self, kind: &'static str) {
        self.revoked.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts a failed write to the state directory (`svid`, `bundle`, `snapshot`).
    pub fn persist_failed(&self, kind: &'static str) {
        self.persist_failures
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts one fault injected by `fault` (`delay`, `abort_http`, `abort_grpc`, `reset`).
    pub fn fault_injected(&self, fault: &str, kind: &'static str) {
        self.faults
            .get_or_create(&FaultLabels {
                fault: fault.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts one resilience event of calls to `service`.
    pub fn outbound_event(&self, service: &str, event: &'static str) {
        self.outbound
            .get_or_create(&OutboundLabels {
                service: service.to_owned(),
                event,
            })
            .inc();
    }

    /// Counts a failed control-plane call (`timeout`, `unavailable`, `refused`).
    pub fn control_error(&self, kind: &'static str) {
        self.control_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts a connection closed at its certificate's expiry or its maximum age
    /// (`certificate`, `max_age`).
    pub fn connection_expired(&self, kind: &'static str) {
        self.connections_expired
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts an accept error that made a listener back off.
    pub fn accept_error(&self, kind: &'static str) {
        self.accept_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Observes the latency of an HTTP request answered with `status`.
    pub fn request_done(&self, direction: &'static str, status: u16, seconds: f64) {
        let (i, class) = match status / 100 {
            1 => (0, "1xx"),
            2 => (1, "2xx"),
            3 => (2, "3xx"),
            4 => (3, "4xx"),
            _ => (4, "5xx"),
        };
        let slot = if direction == "inbound" { i } else { 5 + i };
        self.latency[slot]
            .get_or_init(|| {
                self.request_duration
                    .get_or_create(&LatencyLabels { direction, class })
                    .clone()
            })
            .observe(seconds);
    }

    /// Counts one decision in `meshward_requests` (the process-wide, lock-free cache of the
    /// last series).
    pub fn count_request(&self, labels: RequestLabels) {
        if let Some(last) = self.last_request.load().as_ref()
            && last.0 == labels
        {
            last.1.inc();
            return;
        }
        let c = self.requests.get_or_create(&labels).clone();
        c.inc();
        self.last_request.store(Some(Arc::new((labels, c))));
    }

    /// Counts one decision in `meshward_requests` with the caller's own cache of the last
    /// series (one per connection: nothing shared with any other connection while the
    /// labels stay the same).
    pub fn count_request_in(&self, cache: &mut RequestSeries, labels: RequestLabels) {
        match &cache.0 {
            Some((l, c)) if *l == labels => {
                c.inc();
            }
            _ => {
                let c = self.requests.get_or_create(&labels).clone();
                c.inc();
                cache.0 = Some((labels, c));
            }
        }
    }
}

/// A caller's cache of the `meshward_requests` series it counted last (see
/// [`ProxyMetrics::count_request_in`]).
#[derive(Debug, Default)]
pub struct RequestSeries(Option<(RequestLabels, Counter)>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    /// The revision proxies have acknowledged.
    pub revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `applied`, `pending_approval`, `refused`.
    pub result: &'static str,
}

/// The control plane's metrics.
#[derive(Debug)]
pub struct ControlMetrics {
    registry: Registry,
    /// Set when scraped.
    pub proxies: Family<RevisionLabels, Gauge>,
    pub push_duration: Histogram,
    pub certificates_issued: Counter,
    pub certificates_refused: Counter,
    pub applies: Family<ResultLabels, Counter>,
    pub rollbacks: Counter,
    /// Progressive rollouts by what happened: started, enforced, promoted, stopped
    /// (held at the gate or by a sidecar), rolled_back, aborted.
    pub rollouts: Family<ResultLabels, Counter>,
    pub revision: Gauge,
    pub decisions_received: Counter,
    pub decisions_lost: Counter,
    /// Set when scraped.
    pub disk_full: Gauge,
    /// Set when scraped.
    pub audit_held: Gauge,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let proxies = Family::<RevisionLabels, Gauge>::default();
        let push_duration = Histogram::new(PUSH_BUCKETS);
        let certificates_issued = Counter::default();
        let certificates_refused = Counter::default();
        let applies = Family::<ResultLabels, Counter>::default();
        let rollbacks = Counter::default();
        let rollouts = Family::<ResultLabels, Counter>::default();
        let revision = Gauge::default();
        let decisions_received = Counter::default();
        let decisions_lost = Counter::default();
        let disk_full = Gauge::default();
        let audit_held = Gauge::default();
        registry.register(
            "meshward_control_disk_full",
            "1 while the data directory is full: changes are refused, renewals go on (docs/operations.md)",
            disk_full.clone(),
        );
        registry.register(
            "meshward_control_audit_held",
            "Audit entries held in memory because the disk is full and its reserve spent (written when space returns)",
            audit_held.clone(),
        );
        registry.register(
            "meshward_control_decisions_received",
            "Decision records shipped by proxies and kept in the window",
            decisions_received.clone(),
        );
        registry.register(
            "meshward_control_decisions_lost",
            "Decision records proxies reported dropped, or sent invalid",
            decisions_lost.clone(),
        );
        registry.register(
            "meshward_control_proxies",
            "Proxies connected, by the revision they acknowledged",
            proxies.clone(),
        );
        registry.register(
            "meshward_control_push_duration_seconds",
            "From sending a configuration snapshot to a proxy to its acknowledgement",
            push_duration.clone(),
        );
        registry.register(
            "meshward_control_certificates_issued",
            "Workload certificates signed",
            certificates_issued.clone(),
        );
        registry.register(
            "meshward_control_certificates_refused",
            "Certificate requests refused",
            certificates_refused.clone(),
        );
        registry.register(
            "meshward_control_applies",
            "Policy applies by result",
            applies.clone(),
        );
        registry.register(
            "meshward_control_rollbacks",
            "Rollbacks to an earlier revision",
            rollbacks.clone(),
        );
        registry.register(
            "meshward_control_rollouts",
            "Progressive rollouts by event: started, enforced, promoted, stopped, rolled_back, aborted",
            rollouts.clone(),
        );
        registry.register(
            "meshward_control_revision",
            "The head policy revision",
            revision.clone(),
        );
        ControlMetrics {
            registry,
            proxies,
            push_duration,
            certificates_issued,
            certificates_refused,
            applies,
            rollbacks,
            rollouts,
            revision,
            decisions_received,
            decisions_lost,
            disk_full,
            audit_held,
        }
    }

    /// The exposition ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_bounded_labels() {
        let m = ProxyMetrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                direction: "inbound",
                source: "spiffe://td/ns/a/sa/b".into(),
                destination: "x/y".into(),
                verdict: "deny",
                reason: "no_allow_at_tier",
            })
            .inc();
        m.decision_time.observe(4e-7);
        m.request_done("inbound", 503, 0.002);
        m.handshake_failed(
            "inbound",
            HandshakeFailure::classify("peer sent no certificates"),
        );
        let text = m.encode();
        assert!(text.contains(r#"meshward_requests_total{direction="inbound",source="spiffe://td/ns/a/sa/b",destination="x/y",verdict="deny",reason="no_allow_at_tier"} 1"#), "{text}");
        assert!(
            text.contains(r#"meshward_decision_duration_seconds_bucket{le="5e-7"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"meshward_request_duration_seconds_count{direction="inbound",class="5xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"meshward_tls_handshake_failures_total{direction="inbound",reason="no_certificate"} 1"#), "{text}");
        assert!(
            text.contains("# TYPE meshward_requests_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            ControlMetrics::new()
                .encode()
                .contains("meshward_control_push_duration_seconds")
        );
    }

    #[test]
    fn handshake_kinds() {
        use HandshakeFailure as H;
        for (msg, want) in [
            (
                "received corrupt message of type InvalidContentType",
                H::NotTls,
            ),
            ("peer sent no certificates", H::NoCertificate),
            ("invalid peer certificate: UnknownIssuer", H::UnknownCa),
            ("invalid peer certificate: Expired", H::Expired),
            ("no handshake within 10s", H::Timeout),
            ("something else", H::Other),
        ] {
            assert_eq!(H::classify(msg), want, "{msg}");
        }
        for k in [
            H::NoCertificate,
            H::BadSvid,
            H::UnknownCa,
            H::Expired,
            H::NotYetValid,
            H::WrongIdentity,
        ] {
            assert_eq!(H::from_code(k.as_str()), Some(k));
        }
        assert_eq!(H::from_code("other"), None);
    }
}
