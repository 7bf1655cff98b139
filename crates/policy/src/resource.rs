//! The resource kinds of ARCHITECTURE §3 as they are written in YAML. These types are the
//! schema: unknown fields are errors, and values that have a grammar (identities, paths,
//! durations, times) are checked as they are read. The evaluators never see these types;
//! [`crate::model`] turns them into the compiled-ready model.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use meshward_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Deserializer, Serialize};

/// The API version every resource carries.
pub const API_VERSION: &str = "meshward.io/v1alpha1";

/// Every kind the loader knows.
pub const KINDS: &[&str] = &[
    "Mesh",
    "Workload",
    "Service",
    "AuthorizationPolicy",
    "Override",
    "RateLimitPolicy",
    "TrafficPolicy",
    "FaultInjection",
    "TrustDomainFederation",
    "PolicyTest",
];

/// `metadata` of a resource.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<Name>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A resource or namespace name: a DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, ≤ 63) or a
/// dotted DNS subdomain of such labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub struct Name(pub String);

impl Name {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if s.len() <= 253 && s.split('.').all(ok_label) {
            Ok(Name(s.to_owned()))
        } else {
            Err(format!(
                "`{s}` is not a valid name: use lower-case letters, digits and `-` (DNS label rules)"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A duration written as `90s`, `30m`, `1h`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. `90s`, `30m`, `1h`"
            ))
        })
    }
}

/// A point in time written in RFC 3339 (`2026-11-28T12:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub SystemTime);

impl Time {
    pub fn parse(s: &str) -> Result<Self, String> {
        humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(s))
            .map(Time)
            .map_err(|e| {
                format!("`{s}` is not an RFC 3339 time ({e}); write e.g. `2026-11-28T12:00:00Z`")
            })
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Time::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One value or a list of values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl Serialize for OneOrMany {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    out.push(s);
                }
                if out.is_empty() {
                    return Err(serde::de::Error::custom("the list of values is empty"));
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------
// Mesh

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum DefaultAction {
    #[default]
    #[serde(rename = "DENY", alias = "deny", alias = "Deny")]
    Deny,
    #[serde(rename = "ALLOW", alias = "allow", alias = "Allow")]
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum MtlsMode {
    /// Plaintext is refused before policy runs.
    #[default]
    #[serde(rename = "STRICT", alias = "strict")]
    Strict,
    /// Plaintext reaches policy as an unauthenticated source.
    #[serde(rename = "PERMISSIVE", alias = "permissive")]
    Permissive,
}

/// What the inbound proxy does with a request header whose name contains `_` (many servers
/// read `_` as `-`, so `x_role` could reach the app as the `x-role` that policy did not see).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum HeadersWithUnderscores {
    /// Answer 400 (`bad_request`, detail `header_underscore`).
    #[default]
    #[serde(rename = "REFUSE", alias = "refuse")]
    Refuse,
    /// Remove the header before policy and the app see the request.
    #[serde(rename = "DROP", alias = "drop")]
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum OutboundMode {
    #[default]
    #[serde(rename = "DENY", alias = "deny")]
    Deny,
    #[serde(rename = "ALLOW_LISTED", alias = "allowListed")]
    AllowListed,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundTraffic {
    #[serde(default)]
    pub mode: OutboundMode,
    /// `host:port` or `cidr:port` destinations outside the mesh that may be called.
    #[serde(default)]
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    pub trust_domain: TrustDomain,
    /// Workload certificate lifetime, 5m to 24h (default 1h).
    #[serde(default)]
    pub certificate_lifetime: Option<Dur>,
    #[serde(default)]
    pub default_action: DefaultAction,
    #[serde(default)]
    pub mtls_mode: MtlsMode,
    /// The longest an `Override` may last (default 24h).
    #[serde(default)]
    pub max_override_duration: Option<Dur>,
    #[serde(default)]
    pub outbound_traffic: Option<OutboundTraffic>,
    /// Request headers with `_` in their name: refused (default) or dropped.
    #[serde(default)]
    pub headers_with_underscores: HeadersWithUnderscores,
    /// Connection caps and timeouts of every sidecar's inbound listeners (each field can
    /// be overridden per workload).
    #[serde(default)]
    pub connection_limits: Option<ConnectionLimits>,
    /// The control plane's anomaly detection (docs/containment.md).
    #[serde(default)]
    pub anomaly_detection: Option<AnomalyDetectionSpec>,
    /// Progressive rollout's defaults (`meshward apply --progressive`, docs/rollout.md).
    #[serde(default)]
    pub rollout: Option<RolloutSpec>,
}

/// `Mesh.spec.rollout`: how a progressive rollout bakes, gates and watches a change.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutSpec {
    /// How long the candidate runs in shadow beside the enforced revision (default 60s).
    #[serde(default)]
    pub bake: Option<Dur>,
    /// How long healthy edges are watched after enforcement (default 120s).
    #[serde(default)]
    pub watch: Option<Dur>,
    /// Gate 1: the most of an edge's currently allowed requests the candidate may deny,
    /// in percent (default 0: any new deny of live traffic waits for an operator).
    #[serde(default)]
    pub max_new_deny_percent: Option<f64>,
    /// Watch: how many percentage points an edge's deny rate may rise (default 5).
    #[serde(default)]
    pub max_deny_rate_increase: Option<f64>,
    /// Watch: how many percentage points an edge's 5xx rate may rise (default 5).
    #[serde(default)]
    pub max_error_rate_increase: Option<f64>,
    /// Requests an edge needs in a stage for its rates to count (default 5).
    #[serde(default)]
    pub min_requests: Option<u64>,
    /// How long sidecars have to acknowledge the candidate or the enforced revision
    /// (default 30s).
    #[serde(default)]
    pub ack_timeout: Option<Dur>,
    /// Edges a candidate may never deny live requests on (beside those a `PolicyTest`
    /// expects allowed).
    #[serde(default)]
    pub critical_edges: Vec<CriticalEdgeSpec>,
}

/// An edge marked critical: a source and a destination workload.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CriticalEdgeSpec {
    /// A SPIFFE ID (`spiffe://td/ns/NS/sa/SA`).
    pub from: String,
    /// `namespace/name` of the destination workload.
    pub to: String,
}

/// What anomaly detection does with what it finds.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AnomalyMode {
    /// Nothing is detected.
    Off,
    /// Detected, audited and shown; nothing is enforced.
    #[default]
    Report,
    /// A generated, time-bound rate limit on the identity.
    Throttle,
    /// A throttle first, then, if it goes on, a time-bound quarantine.
    Quarantine,
}

impl AnomalyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyMode::Off => "off",
            AnomalyMode::Report => "report",
            AnomalyMode::Throttle => "throttle",
            AnomalyMode::Quarantine => "quarantine",
        }
    }
}

/// Thresholds of anomaly detection; in `perSource`, the ones set replace the Mesh's for
/// the sources matched.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnomalyThresholdsSpec {
    /// Requests (weighted) an identity makes in a window before any signal counts.
    #[serde(default)]
    pub min_samples: Option<u64>,
    /// Request rate over the identity's own EWMA baseline that is anomalous.
    #[serde(default)]
    pub rate_factor: Option<f64>,
    /// Requests per second below which the rate signal never fires.
    #[serde(default)]
    pub min_rate: Option<f64>,
    /// Share of the window's requests denied by policy that is anomalous (0 to 1).
    #[serde(default)]
    pub deny_ratio: Option<f64>,
    /// Distinct destinations and ports in one window that are anomalous.
    #[serde(default)]
    pub fan_out: Option<u64>,
    /// Destinations and ports never seen in the baseline, in one window, that are
    /// anomalous.
    #[serde(default)]
    pub new_edges: Option<u64>,
}

/// `perSource` entry: thresholds for some sources.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnomalyPerSourceSpec {
    pub from: SourceSpec,
    #[serde(default)]
    pub mode: Option<AnomalyMode>,
    #[serde(default)]
    pub thresholds: Option<AnomalyThresholdsSpec>,
}

/// The generated rate limit of a throttle.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnomalyThrottleSpec {
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub duration: Option<Dur>,
}

/// `Mesh.spec.anomalyDetection`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AnomalyDetectionSpec {
    /// What detection does (default `report`).
    #[serde(default)]
    pub mode: Option<AnomalyMode>,
    /// The window signals are measured over (default 10s).
    #[serde(default)]
    pub window: Option<Dur>,
    /// How long an identity is watched before anything fires (default 60s).
    #[serde(default)]
    pub warmup: Option<Dur>,
    /// The horizon of the rate baseline (EWMA) and of the edges seen (default 10m).
    #[serde(default)]
    pub baseline: Option<Dur>,
    #[serde(default)]
    pub thresholds: Option<AnomalyThresholdsSpec>,
    #[serde(default)]
    pub per_source: Vec<AnomalyPerSourceSpec>,
    #[serde(default)]
    pub throttle: Option<AnomalyThrottleSpec>,
    /// How long an identity stays anomalous under its throttle before it is quarantined
    /// (default 30s).
    #[serde(default)]
    pub quarantine_after: Option<Dur>,
    /// How long a quarantine lasts (default 1h; at most `maxOverrideDuration`).
    #[serde(default)]
    pub quarantine_duration: Option<Dur>,
    /// Platform services: never throttled or quarantined, and still reachable (both ways)
    /// from a quarantined identity.
    #[serde(default)]
    pub platform: Option<SourceSpec>,
}

/// Caps and timeouts of a sidecar's inbound listeners (docs/proxy.md, "Resource limits").
/// A field left out falls back to the `Mesh`'s, then to the proxy's command-line flag.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Connections one source identity may hold open on one listener, 1 to 1,000,000.
    #[serde(default)]
    pub per_identity: Option<u64>,
    /// Connections (handshaking or established) one listener holds at most, 1 to 1,000,000.
    #[serde(default)]
    pub total: Option<u64>,
    /// How long a request head may take: from the handshake (first request) or from its
    /// first byte (later requests) to its end, 100ms to 10m.
    #[serde(default)]
    pub header_read_timeout: Option<Dur>,
    /// How long a connection may sit with no request in progress, 1s to 24h.
    #[serde(default)]
    pub idle_timeout: Option<Dur>,
}

impl ConnectionLimits {
    /// The values `perIdentity` and `total` may take.
    pub const COUNTS: std::ops::RangeInclusive<u64> = 1..=1_000_000;
    /// The values `headerReadTimeout` may take.
    pub const HEADER_READ: std::ops::RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(600);
    /// The values `idleTimeout` may take.
    pub const IDLE: std::ops::RangeInclusive<Duration> =
        Duration::from_secs(1)..=Duration::from_secs(86400);

    /// Each field of `self`, or `other`'s where `self` has none.
    pub fn or(self, other: ConnectionLimits) -> ConnectionLimits {
        ConnectionLimits {
            per_identity: self.per_identity.or(other.per_identity),
            total: self.total.or(other.total),
            header_read_timeout: self.header_read_timeout.or(other.header_read_timeout),
            idle_timeout: self.idle_timeout.or(other.idle_timeout),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Workload and Service

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Protocol {
    #[serde(rename = "HTTP", alias = "http")]
    Http,
    #[serde(rename = "HTTP2", alias = "http2")]
    Http2,
    #[serde(rename = "GRPC", alias = "grpc")]
    Grpc,
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
}

impl Protocol {
    /// Whether requests on this protocol carry HTTP attributes.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadPort {
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub name: Option<String>,
    /// Explicit mode: `ip:port` where the workload's sidecar accepts mTLS for this port
    /// (transparent mode intercepts the port itself and needs none).
    #[serde(default)]
    pub inbound: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Service account; the identity is `spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
    /// Defaults to the workload's name.
    #[serde(default)]
    pub service_account: Option<Name>,
    /// role, classification, team, posture, tenant, ...: matched by `attributes` in rules.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    /// Transparent mode: the workload's own IP address (its pod address). Sidecars map
    /// captured connections to this address to the workload.
    #[serde(default)]
    pub address: Option<String>,
    /// Transparent mode: ports that bypass interception.
    #[serde(default)]
    pub interception: Option<Interception>,
    /// This workload's sidecar: connection caps and timeouts, field by field over the
    /// `Mesh`'s.
    #[serde(default)]
    pub connection_limits: Option<ConnectionLimits>,
    /// Where it runs: callers prefer endpoints in their own zone, then region, then a
    /// `TrafficPolicy`'s `failover` order. Defaults to the `topology.kubernetes.io/region`
    /// and `…/zone` labels.
    #[serde(default)]
    pub locality: Option<Locality>,
}

/// A workload's region and zone.
#[derive(Debug, Clone, Deserialize, PartialEq, Default, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Locality {
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

/// Transparent mode: what `meshward proxy init-netns` leaves uncaptured.
#[derive(Debug, Clone, Deserialize, PartialEq, Default, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Interception {
    /// Inbound TCP ports that reach the app directly (without the sidecar: no mTLS, no
    /// policy), e.g. a health-check port.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound TCP destination ports the app may dial directly.
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Workloads (in the service's namespace) whose labels include all of these.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Or workloads by name (`name` or `namespace/name`).
    #[serde(default)]
    pub workloads: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Extra host names the service is called by (besides `NAME.NAMESPACE`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Transparent mode: virtual IP addresses of the service; a captured connection to one
    /// of them is balanced across the service's workloads.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The app routes paths case-insensitively: its sidecar lower-cases the path, and both
    /// policy and the app see the lower-cased one (so `/Admin` cannot pass a deny on
    /// `/admin`). Path patterns of policies on its workloads must then be lower-case.
    #[serde(default)]
    pub path_case_insensitive: bool,
    /// A service-level objective: the dashboard shows the service's availability against it
    /// and the burn rate of its error budget.
    #[serde(default)]
    pub objective: Option<ObjectiveSpec>,
}

/// `spec.objective` of a `Service`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectiveSpec {
    /// Percent of requests that get an answer other than a 5xx (for example `99.9`),
    /// strictly between 0 and 100. Requests policy denies do not count against it.
    pub availability: f64,
}

// ---------------------------------------------------------------------------------------
// AuthorizationPolicy

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Baseline,
    Domain,
    Service,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Baseline, Tier::Domain, Tier::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Baseline => "baseline",
            Tier::Domain => "domain",
            Tier::Service => "service",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Action {
    #[serde(rename = "ALLOW", alias = "allow", alias = "Allow")]
    Allow,
    #[serde(rename = "DENY", alias = "deny", alias = "Deny")]
    Deny,
    #[serde(rename = "AUDIT", alias = "audit", alias = "Audit")]
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
pub enum Mode {
    #[default]
    #[serde(rename = "enforce", alias = "ENFORCE")]
    Enforce,
    #[serde(rename = "dry-run", alias = "DRY_RUN", alias = "dryRun")]
    DryRun,
}

/// Which destinations a policy or override applies to. Fields combine with AND, the
/// values of one field with OR; an empty target means every workload.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetSpec {
    /// `name` (in the resource's namespace) or `namespace/name`.
    #[serde(default)]
    pub workloads: Vec<String>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, OneOrMany>,
}

/// Who a rule is about. Fields combine with AND, values with OR.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_identities: Vec<String>,
    /// Namespaces of the mesh's own trust domain.
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
    /// Source workload attributes that must hold.
    #[serde(default)]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub not_attributes: BTreeMap<String, OneOrMany>,
    /// Attributes whose value must equal the destination's (both present).
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub same_attributes: Vec<String>,
    /// Attributes whose value must differ from the destination's (or be missing on either).
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub different_attributes: Vec<String>,
    /// Matches plaintext (no client certificate) sources only.
    #[serde(default)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// What a rule is about on the destination side.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// A condition on a request header.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    pub header: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub from: Vec<SourceSpec>,
    #[serde(default)]
    pub to: Vec<OperationSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub tier: Tier,
    #[serde(default)]
    pub target: TargetSpec,
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// Baseline DENY only: an allow `Override` may lift it.
    #[serde(default)]
    pub overridable: bool,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

// ---------------------------------------------------------------------------------------
// Override

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverrideAction {
    #[serde(alias = "ALLOW")]
    Allow,
    #[serde(alias = "DENY")]
    Deny,
    #[serde(alias = "QUARANTINE")]
    Quarantine,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OverrideSpec {
    pub action: OverrideAction,
    /// The source (for `quarantine`: the identity isolated both ways).
    #[serde(default)]
    pub subject: Option<SourceSpec>,
    #[serde(default)]
    pub target: Option<TargetSpec>,
    #[serde(default)]
    pub to: Vec<OperationSpec>,
    /// Quarantine only: the peers the subject may still talk to, either way (platform
    /// services such as DNS or the logging pipeline), matched against the other side's
    /// identity.
    #[serde(default)]
    pub except: Option<SourceSpec>,
    pub reason: String,
    #[serde(default)]
    pub ticket: Option<String>,
    #[serde(default)]
    pub requester: Option<String>,
    #[serde(default)]
    pub approver: Option<String>,
    #[serde(default)]
    pub starts_at: Option<Time>,
    /// Required; checked by lint (MW305) so that it can say why.
    #[serde(default)]
    pub expires_at: Option<Time>,
}

// ---------------------------------------------------------------------------------------
// Kinds parsed and validated now, enforced by later issues.

/// One limit of a `RateLimitPolicy`, enforced by the destination's sidecar (docs/containment.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// The sources it applies to (none: every source).
    #[serde(default)]
    pub from: Option<SourceSpec>,
    /// Whose budget: each source identity its own (the default), each source namespace
    /// one, or one for every source it applies to.
    #[serde(default)]
    pub per: LimitPer,
    /// Token bucket: requests per second (on a TCP port: connections per second).
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// Requests that may come at once beyond the rate (default: one second's worth).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Requests in progress at once (on a TCP port: open connections).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Open connections at once, on every port.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

/// Whose budget a limit counts.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum LimitPer {
    #[default]
    Identity,
    Namespace,
    Shared,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    pub target: TargetSpec,
    pub limits: Vec<RateLimit>,
    /// Optional: the control plane removes the policy from this time on (in a new
    /// revision, within one controller interval). Anomaly detection's throttles set it.
    #[serde(default)]
    pub expires_at: Option<Time>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    #[serde(default)]
    pub retry_on: Vec<String>,
    /// Retries may add at most this percentage of the requests of the last 10 s (default 20)…
    #[serde(default)]
    pub budget_percent: Option<u32>,
    /// …plus this many per second whatever the requests (default 10).
    #[serde(default)]
    pub min_retries_per_second: Option<u32>,
    /// The service's calls are safe to repeat whatever the method: POST and PATCH are
    /// retried too (default false: only idempotent methods are).
    #[serde(default)]
    pub non_idempotent: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub base_ejection_time: Option<Dur>,
    /// The longest an ejection lasts however often the endpoint was ejected (default 300s).
    #[serde(default)]
    pub max_ejection_time: Option<Dur>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    /// The success-rate variant: eject when this percentage of at least `minRequests`
    /// requests within `interval` failed.
    #[serde(default)]
    pub failure_percent: Option<u32>,
    #[serde(default)]
    pub min_requests: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreaker {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    pub max_requests: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target: TargetSpec,
    #[serde(default)]
    pub timeout: Option<Dur>,
    #[serde(default)]
    pub retries: Option<RetryPolicy>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Localities to fail over to, in order.
    #[serde(default)]
    pub failover: Vec<String>,
    /// A service (`namespace/name`) to call when every endpoint is down.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Per-route settings, the first route a request matches wins: a route may mark its
    /// calls `retryable` (safe to repeat whatever the method) and set its own `timeout`
    /// and `retries`; a request no route matches gets the policy's own.
    #[serde(default)]
    pub routes: Vec<TrafficRoute>,
}

/// One route of a `TrafficPolicy`: which requests (methods and paths, each list empty for
/// any) and what differs for them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficRoute {
    /// For logs and lint messages.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path patterns as in `AuthorizationPolicy` (`/orders`, `/orders/*`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Repeating these calls is safe (for example the app dedups by an idempotency key):
    /// they are retried whatever the method.
    #[serde(default)]
    pub retryable: bool,
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Replaces the policy's `retries` for this route (`attempts: 0`: none).
    #[serde(default)]
    pub retries: Option<RetryPolicy>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed: Dur,
    pub percent: f64,
}

/// How an aborted request ends: exactly one of an HTTP status, a gRPC status (gRPC
/// requests only) or a reset connection (HTTP/2: the stream).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default)]
    pub http_status: Option<u16>,
    /// A gRPC status name (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, ...) or code (0-16).
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub tcp_reset: bool,
    pub percent: f64,
}

/// The gRPC status codes by name (grpc/doc/statuscodes.md).
pub const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status given by name or code: its code.
pub fn grpc_status_code(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return (usize::from(n) < GRPC_STATUS.len()).then_some(n);
    }
    GRPC_STATUS
        .iter()
        .position(|n| n.eq_ignore_ascii_case(s))
        .and_then(|i| u8::try_from(i).ok())
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjectionSpec {
    pub target: TargetSpec,
    #[serde(default)]
    pub from: Option<SourceSpec>,
    #[serde(default)]
    pub to: Vec<OperationSpec>,
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
    /// Drills are time-bound: required.
    pub expires_at: Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum BundleProfile {
    #[serde(rename = "https_web")]
    HttpsWeb,
    #[serde(rename = "https_spiffe")]
    HttpsSpiffe,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BundleEndpoint {
    pub url: String,
    pub profile: BundleProfile,
    #[serde(default)]
    pub endpoint_spiffe_id: Option<SpiffeId>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustDomainFederationSpec {
    pub trust_domain: TrustDomain,
    #[serde(default)]
    pub bundle_endpoint: Option<BundleEndpoint>,
    /// An inline SPIFFE bundle (JWKS JSON).
    #[serde(default)]
    pub bundle: Option<String>,
    #[serde(default)]
    pub refresh_hint: Option<Dur>,
}

// ---------------------------------------------------------------------------------------
// PolicyTest

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScenarioRequest {
    /// A SPIFFE ID, or `unauthenticated`.
    pub from: String,
    /// The destination workload, `namespace/name`.
    pub to: String,
    pub port: u16,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    pub at: Option<Time>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Expectation {
    pub verdict: crate::decision::Verdict,
    #[serde(default)]
    pub reason: Option<crate::decision::Reason>,
    /// `namespace/name` of the deciding policy or override.
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Scenario {
    pub name: String,
    pub request: ScenarioRequest,
    pub expect: Expectation,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTestSpec {
    /// Default evaluation time for the scenarios (default: now).
    #[serde(default)]
    pub at: Option<Time>,
    pub scenarios: Vec<Scenario>,
}
