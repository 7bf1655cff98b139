//! Requests and decisions: what the evaluators take and give.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::resource::Tier;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[serde(alias = "ALLOW")]
    Allow,
    #[serde(alias = "DENY")]
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a decision came out as it did. Stable codes: they appear in 403 bodies, metrics,
/// the decision log and `PolicyTest` expectations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An ALLOW rule matched at every tier that has ALLOW policies for the destination.
    AllowedByRule,
    /// A DENY rule matched.
    DeniedByRule,
    /// A tier has ALLOW policies for the destination but none matched.
    NoAllowAtTier,
    /// An active override quarantines the source or the destination.
    Quarantined,
    /// An active override denies this traffic.
    OverrideDeny,
    /// An active override allows this traffic.
    OverrideAllow,
    /// No tier has ALLOW policies for the destination; the mesh default is deny.
    DefaultDeny,
    /// No tier has ALLOW policies for the destination; the mesh default is allow.
    DefaultAllow,
    /// Plaintext source while the mesh requires mTLS.
    Unauthenticated,
    /// The destination workload is not in the policy set.
    UnknownDestination,
    /// The proxy has no policy at all (fail closed).
    NoPolicy,
    /// Set by the proxy's rate limiter, never by the evaluators.
    RateLimited,
    /// Set by the proxy: the connection was to a port the workload does not declare.
    UndeclaredPort,
    /// Set by the proxy: the peer did not complete mutual TLS with a valid SVID
    /// (plaintext, no client certificate, unknown CA, expired, wrong identity).
    HandshakeFailed,
    /// Set by the outbound proxy: the destination is outside the mesh and the `Mesh`'s
    /// `outboundTraffic` does not allow it.
    OutsideMesh,
    /// Set by the outbound proxy: a destination outside the mesh on the allow-list.
    AllowedExternal,
    /// Set by the inbound proxy: a request that apps could read differently from what
    /// policy would evaluate (two `Host`s, `;` in the path, `_` in a header name, ...) was
    /// refused with 400 before policy; the record's `detail` names the rule.
    BadRequest,
    /// Set by the inbound proxy: an upgrade (WebSocket, `CONNECT`) that no rule allows by
    /// name was refused with 403, although the request itself was allowed.
    UpgradeRefused,
    /// Set by the inbound proxy: the listener's connection cap (total, handshaking, or
    /// this source identity's) was reached; the connection was closed.
    ConnectionLimit,
    /// Set by the caller's sidecar (`TrafficPolicy`): the circuit breaker's caps were
    /// reached; the caller got 503 at once.
    CircuitOpen,
    /// Set by the caller's sidecar: the overall or per-try timeout passed; 504.
    #[serde(rename = "timeout")]
    UpstreamTimeout,
    /// Set by the caller's sidecar: the service has no endpoint (nor fallback); 503.
    NoEndpoint,
    /// Set by the caller's sidecar: every attempt failed (connect failure, reset, or an
    /// error status) and no retry was left; 502 or the last status.
    UpstreamFailed,
    /// Set by the caller's sidecar: served, after more than one attempt (`attempts`,
    /// `endpoint` say which served). The destination's own record counts the request.
    Retried,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllowedByRule => "allowed_by_rule",
            Reason::DeniedByRule => "denied_by_rule",
            Reason::NoAllowAtTier => "no_allow_at_tier",
            Reason::Quarantined => "quarantined",
            Reason::OverrideDeny => "override_deny",
            Reason::OverrideAllow => "override_allow",
            Reason::DefaultDeny => "default_deny",
            Reason::DefaultAllow => "default_allow",
            Reason::Unauthenticated => "unauthenticated",
            Reason::UnknownDestination => "unknown_destination",
            Reason::NoPolicy => "no_policy",
            Reason::RateLimited => "rate_limited",
            Reason::UndeclaredPort => "undeclared_port",
            Reason::HandshakeFailed => "handshake_failed",
            Reason::OutsideMesh => "outside_mesh",
            Reason::AllowedExternal => "allowed_external",
            Reason::BadRequest => "bad_request",
            Reason::UpgradeRefused => "upgrade_refused",
            Reason::ConnectionLimit => "connection_limit",
            Reason::CircuitOpen => "circuit_open",
            Reason::UpstreamTimeout => "timeout",
            Reason::NoEndpoint => "no_endpoint",
            Reason::UpstreamFailed => "upstream_failed",
            Reason::Retried => "retried",
        }
    }

    /// Whether the policy engine made this decision (and a replay can re-evaluate it), as
    /// opposed to the proxy's own checks (rate limits, ports, handshakes, egress).
    pub fn is_policy(self) -> bool {
        !matches!(
            self,
            Reason::RateLimited
                | Reason::UndeclaredPort
                | Reason::HandshakeFailed
                | Reason::OutsideMesh
                | Reason::AllowedExternal
                | Reason::BadRequest
                | Reason::UpgradeRefused
                | Reason::ConnectionLimit
                | Reason::CircuitOpen
                | Reason::UpstreamTimeout
                | Reason::NoEndpoint
                | Reason::UpstreamFailed
                | Reason::Retried
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The revision of the policy set a decision was made with (assigned by the control
/// plane's store; 0 for a set read from files).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct PolicyRevision(pub u64);

impl fmt::Display for PolicyRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The source of a request: a verified peer identity, or none (plaintext).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Authenticated(SpiffeId),
    Unauthenticated,
}

impl Source {
    pub fn identity(&self) -> Option<&SpiffeId> {
        match self {
            Source::Authenticated(id) => Some(id),
            Source::Unauthenticated => None,
        }
    }

    /// Parses `unauthenticated` or a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "unauthenticated" {
            return Ok(Source::Unauthenticated);
        }
        SpiffeId::parse(s)
            .map(Source::Authenticated)
            .map_err(|e| format!("`{s}` is neither `unauthenticated` nor a SPIFFE ID: {e}"))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Authenticated(id) => write!(f, "{id}"),
            Source::Unauthenticated => f.write_str("unauthenticated"),
        }
    }
}

/// The HTTP part of a request. `path` must already be normalized with
/// [`crate::path::normalize`]; header names lower-case; `host` normalized with
/// [`crate::matcher::normalize_host`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpAttrs {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl HttpAttrs {
    /// Every value of a header (name lower-case), one per field line as received.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// What header conditions evaluate: every element of every value of a header, a value
    /// split at commas (the HTTP list syntax most apps apply: `x-role: reader,admin` is
    /// `reader` and `admin`), each trimmed of spaces and tabs; empty elements included.
    pub fn header_elements<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.header_values(name)
            .flat_map(|v| v.split(',').map(|e| e.trim_matches([' ', '\t'])))
    }
}

/// Whether a header value element is unknown to policy: it came from bytes that are not
/// UTF-8 (the proxy records those with U+FFFD in their place). Such an element satisfies
/// every DENY condition on its header and no ALLOW condition (`present` aside): fail
/// closed, whichever way an app would decode it.
pub fn is_opaque(element: &str) -> bool {
    element.contains(char::REPLACEMENT_CHARACTER)
}

/// A workload by namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
}

impl WorkloadRef {
    /// Parses `namespace/name`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(WorkloadRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "`{s}` is not a workload reference `namespace/name`"
            )),
        }
    }
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One request (or connection, when `http` is `None`) to authorize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub source: Source,
    pub destination: WorkloadRef,
    pub port: u16,
    pub http: Option<HttpAttrs>,
    pub at: SystemTime,
}

/// A policy or override and one of its rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    /// `namespace/name` of the policy.
    pub policy: Arc<str>,
    pub rule: Arc<str>,
}

/// What a dry-run pass would have decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowDecision {
    pub verdict: Verdict,
    pub reason: Reason,
    pub policy: Option<Arc<str>>,
    pub rule: Option<Arc<str>>,
}

/// What a progressive rollout's candidate revision decided, beside the enforced one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CandidateDecision {
    /// The rollout the candidate belongs to.
    pub rollout: u64,
    pub verdict: Verdict,
    pub reason: Reason,
    pub policy: Option<Arc<str>>,
}

/// The result of authorizing one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The tier that decided, when a tier did.
    pub tier: Option<Tier>,
    /// `namespace/name` of the deciding policy or override.
    pub policy: Option<Arc<str>>,
    pub rule: Option<Arc<str>>,
    pub revision: PolicyRevision,
    /// Present when a dry-run policy applies to the destination: the verdict with every
    /// dry-run policy enforced.
    pub shadow: Option<ShadowDecision>,
    /// During a progressive rollout's shadow stage: what the candidate decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate: Option<CandidateDecision>,
    /// AUDIT rules that matched.
    pub audit: Vec<RuleRef>,
    /// How long the decision took.
    #[serde(serialize_with = "ser_nanos")]
    pub elapsed: Duration,
}

fn ser_nanos<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Decision {
    /// A decision with no policy or rule attached.
    pub fn bare(verdict: Verdict, reason: Reason, revision: PolicyRevision) -> Self {
        Decision {
            verdict,
            reason,
            tier: None,
            policy: None,
            rule: None,
            revision,
            shadow: None,
            candidate: None,
            audit: vec![],
            elapsed: Duration::ZERO,
        }
    }

    /// Equal in everything but the time taken.
    pub fn same_outcome(&self, other: &Decision) -> bool {
        Decision {
            elapsed: Duration::ZERO,
            ..self.clone()
        } == Decision {
            elapsed: Duration::ZERO,
            ..other.clone()
        }
    }
}
