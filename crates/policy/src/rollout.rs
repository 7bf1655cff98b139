//! `Mesh.spec.rollout`, validated and with its defaults: what the control plane's
//! progressive rollout (crates/control/src/rollout.rs, docs/rollout.md) reads.

use std::time::Duration;

use meshward_identity::SpiffeId;

use crate::decision::WorkloadRef;
use crate::resource as r;

/// How a progressive rollout bakes, gates and watches a change.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RolloutSettings {
    /// Shadow: how long the candidate runs beside the enforced revision.
    #[serde(with = "secs")]
    pub bake: Duration,
    /// After enforcement: how long healthy edges are watched.
    #[serde(with = "secs")]
    pub watch: Duration,
    /// Gate 1: the most of an edge's allowed requests the candidate may deny (percent).
    pub max_new_deny_percent: f64,
    /// Watch: the most an edge's deny rate may rise (percentage points).
    pub max_deny_rate_increase: f64,
    /// Watch: the most an edge's 5xx rate may rise (percentage points).
    pub max_error_rate_increase: f64,
    /// Requests an edge needs in a stage for its rates to count.
    pub min_requests: u64,
    /// How long sidecars have to acknowledge.
    #[serde(with = "secs")]
    pub ack_timeout: Duration,
    /// Edges never to deny live requests on: (source, destination workload).
    pub critical_edges: Vec<(String, String)>,
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = <f64 as serde::Deserialize>::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            bake: Duration::from_secs(60),
            watch: Duration::from_secs(120),
            max_new_deny_percent: 0.0,
            max_deny_rate_increase: 5.0,
            max_error_rate_increase: 5.0,
            min_requests: 5,
            ack_timeout: Duration::from_secs(30),
            critical_edges: vec![],
        }
    }
}

/// An invalid field of `spec.rollout` and why.
pub type Problem = (String, String);

/// Validates `spec`: the settings with defaults for what is unset or invalid, and the
/// problems found.
pub fn validate(spec: Option<&r::RolloutSpec>) -> (RolloutSettings, Vec<Problem>) {
    let mut out = RolloutSettings::default();
    let mut bad: Vec<Problem> = vec![];
    let Some(s) = spec else {
        return (out, bad);
    };
    let mut time = |field: &str, v: Option<&r::Dur>, min: u64, max: u64, slot: &mut Duration| {
        if let Some(d) = v {
            if d.0 < Duration::from_secs(min) || d.0 > Duration::from_secs(max) {
                bad.push((
                    field.to_owned(),
                    format!("must be between {min}s and {max}s"),
                ));
            } else {
                *slot = d.0;
            }
        }
    };
    time("bake", s.bake.as_ref(), 1, 86_400, &mut out.bake);
    time("watch", s.watch.as_ref(), 1, 86_400, &mut out.watch);
    time(
        "ackTimeout",
        s.ack_timeout.as_ref(),
        1,
        3600,
        &mut out.ack_timeout,
    );
    let mut percent = |field: &str, v: Option<f64>, slot: &mut f64| {
        if let Some(x) = v {
            if x.is_finite() && (0.0..=100.0).contains(&x) {
                *slot = x;
            } else {
                bad.push((
                    field.to_owned(),
                    "must be a percentage from 0 to 100".into(),
                ));
            }
        }
    };
    percent(
        "maxNewDenyPercent",
        s.max_new_deny_percent,
        &mut out.max_new_deny_percent,
    );
    percent(
        "maxDenyRateIncrease",
        s.max_deny_rate_increase,
        &mut out.max_deny_rate_increase,
    );
    percent(
        "maxErrorRateIncrease",
        s.max_error_rate_increase,
        &mut out.max_error_rate_increase,
    );
    if let Some(n) = s.min_requests {
        if n == 0 {
            bad.push(("minRequests".into(), "must be at least 1".into()));
        } else {
            out.min_requests = n;
        }
    }
    for e in &s.critical_edges {
        if let Err(why) = SpiffeId::parse(&e.from) {
            bad.push((
                "criticalEdges".into(),
                format!("has `from: {}` that is not a SPIFFE ID: {why}", e.from),
            ));
            continue;
        }
        if let Err(why) = WorkloadRef::parse(&e.to) {
            bad.push((
                "criticalEdges".into(),
                format!("has `to: {}` that is not `namespace/name`: {why}", e.to),
            ));
            continue;
        }
        out.critical_edges.push((e.from.clone(), e.to.clone()));
    }
    (out, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bad_fields() {
        let (d, bad) = validate(None);
        assert_eq!(d, RolloutSettings::default());
        assert!(bad.is_empty());
        let spec = r::RolloutSpec {
            bake: Some(r::Dur(Duration::from_secs(5))),
            max_new_deny_percent: Some(150.0),
            min_requests: Some(0),
            critical_edges: vec![r::CriticalEdgeSpec {
                from: "web".into(),
                to: "orders/orders".into(),
            }],
            ..Default::default()
        };
        let (s, bad) = validate(Some(&spec));
        assert_eq!(s.bake, Duration::from_secs(5));
        let fields: Vec<&str> = bad.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            ["maxNewDenyPercent", "minRequests", "criticalEdges"],
            "{bad:?}"
        );
        assert_eq!(
            s.max_new_deny_percent, 0.0,
            "an invalid value keeps the default"
        );
    }
}
