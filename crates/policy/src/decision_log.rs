//! The decision log: one JSON object a line, written by every proxy (all denies, sampled
//! allows) and read by `meshward policy impact` and `meshward policy suggest`. The schema is
//! documented in docs/decision-log.md; fields are only ever added, never renamed.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, HttpAttrs, Reason, Request, Source, Verdict, WorkloadRef};
use crate::matcher::normalize_host;
use crate::path;
use crate::resource::Tier;

fn one() -> u32 {
    1
}

/// One recorded decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// When the decision was made, RFC 3339 UTC.
    pub ts: String,
    /// Policy revision the proxy enforced.
    #[serde(default)]
    pub revision: u64,
    /// `inbound` (the destination's proxy decided) or `outbound`.
    #[serde(default = "inbound")]
    pub direction: String,
    /// The verified peer SPIFFE ID; `null` for plaintext.
    pub source: Option<String>,
    /// The destination workload, `namespace/name`.
    pub destination: String,
    pub port: u16,
    /// HTTP only: method, normalized path, host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Only the headers some policy condition names (lower-case), so replays can evaluate
    /// conditions without logging every header.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
    pub verdict: Verdict,
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_policy: Option<String>,
    /// A progressive rollout's shadow stage: the rollout, and what its candidate decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_rollout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_policy: Option<String>,
    /// Time the decision took, in nanoseconds.
    #[serde(default)]
    pub decision_ns: u64,
    /// How many requests this record stands for: 1 for denies, the sampling interval for
    /// sampled allows.
    #[serde(default = "one")]
    pub weight: u32,
    /// Proxy checks only (`handshake_failed`, `outside_mesh`, ...): what happened, e.g.
    /// "the peer sent no certificate".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Transparent mode: the original destination address the connection was made to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Allowed HTTP requests: from the request to the app's response headers, in
    /// nanoseconds (the proxy writes such records once the response has started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<u64>,
    /// The caller's sidecar (`TrafficPolicy`): the endpoint that served or was tried last
    /// (`address`, the workload in `destination`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The caller's sidecar: how many attempts the request took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// HTTP: the status the caller received (the app's, an injected abort's, or the
    /// proxy's own 502/504 when the app failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// HTTP: the response body bytes relayed to the caller (written once the response has
    /// ended, or was cut short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
}

fn inbound() -> String {
    "inbound".into()
}

impl DecisionRecord {
    /// The record of a decision, as the proxy writes it.
    pub fn new(req: &Request, d: &Decision, weight: u32) -> Self {
        let h = req.http.as_ref();
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(h) = h {
            for (k, v) in &h.headers {
                headers.entry(k.clone()).or_default().push(v.clone());
            }
        }
        DecisionRecord {
            ts: humantime::format_rfc3339_millis(req.at).to_string(),
            revision: d.revision.0,
            direction: inbound(),
            source: req.source.identity().map(|i| i.to_string()),
            destination: req.destination.to_string(),
            port: req.port,
            method: h.map(|h| h.method.clone()),
            path: h.map(|h| h.path.clone()),
            host: h.and_then(|h| h.host.clone()),
            headers,
            verdict: d.verdict,
            reason: d.reason,
            tier: d.tier,
            policy: d.policy.as_deref().map(String::from),
            rule: d.rule.as_deref().map(String::from),
            shadow_verdict: d.shadow.as_ref().map(|s| s.verdict),
            shadow_policy: d
                .shadow
                .as_ref()
                .and_then(|s| s.policy.as_deref().map(String::from)),
            candidate_rollout: d.candidate.as_ref().map(|c| c.rollout),
            candidate_verdict: d.candidate.as_ref().map(|c| c.verdict),
            candidate_reason: d.candidate.as_ref().map(|c| c.reason),
            candidate_policy: d
                .candidate
                .as_ref()
                .and_then(|c| c.policy.as_deref().map(String::from)),
            decision_ns: u64::try_from(d.elapsed.as_nanos()).unwrap_or(u64::MAX),
            weight,
            detail: None,
            address: None,
            duration_ns: None,
            endpoint: None,
            attempts: None,
            status: None,
            response_bytes: None,
        }
    }

    /// The request this record describes, for replay.
    pub fn to_request(&self) -> Result<Request, String> {
        let source = match &self.source {
            None => Source::Unauthenticated,
            Some(s) => Source::parse(s)?,
        };
        let destination = WorkloadRef::parse(&self.destination)?;
        let at = humantime::parse_rfc3339_weak(self.ts.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(&self.ts))
            .map_err(|e| format!("`ts` is not an RFC 3339 time: {e}"))?;
        let http = match (&self.method, &self.path) {
            (Some(m), Some(p)) => Some(HttpAttrs {
                method: m.clone(),
                path: path::normalize(p).map_err(|e| format!("`path`: {e}"))?.path,
                host: self.host.as_deref().map(normalize_host),
                headers: self
                    .headers
                    .iter()
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_ascii_lowercase(), v.clone())))
                    .collect(),
            }),
            (None, None) => None,
            _ => return Err("`method` and `path` go together".into()),
        };
        Ok(Request {
            source,
            destination,
            port: self.port,
            http,
            at,
        })
    }

    /// The time of the record.
    pub fn time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(self.ts.trim_end_matches('Z')).ok()
    }

    /// Serializes as one line of JSON.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Reads a decision log line by line, calling `f(line_number, bytes_read_so_far, record)`.
/// Blank lines are skipped; a line that is not a record is passed as an error naming why.
pub fn for_each_record<R: BufRead>(
    mut r: R,
    mut f: impl FnMut(u64, u64, Result<DecisionRecord, String>),
) -> std::io::Result<()> {
    let mut line = String::new();
    let mut n = 0u64;
    let mut bytes = 0u64;
    loop {
        line.clear();
        let read = r.read_line(&mut line)?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        bytes += read as u64;
        if line.trim().is_empty() {
            continue;
        }
        f(
            n,
            bytes,
            serde_json::from_str::<DecisionRecord>(line.trim()).map_err(|e| e.to_string()),
        );
    }
}
