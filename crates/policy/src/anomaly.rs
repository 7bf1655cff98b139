//! `Mesh.spec.anomalyDetection`, validated and with its defaults: what the control plane's
//! detector (crates/control/src/detector.rs) reads. docs/containment.md explains the
//! signals and the staged response.

use std::collections::BTreeMap;
use std::time::Duration;

use meshward_identity::SpiffeId;

use crate::model::SourceMatch;
use crate::reference::source_matches;
use crate::resource::{self as r, AnomalyMode};

/// The thresholds in force for one source.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub mode: AnomalyMode,
    pub min_samples: u64,
    pub rate_factor: f64,
    pub min_rate: f64,
    pub deny_ratio: f64,
    pub fan_out: u64,
    pub new_edges: u64,
}

impl Thresholds {
    pub const DEFAULT: Thresholds = Thresholds {
        mode: AnomalyMode::Report,
        min_samples: 20,
        rate_factor: 10.0,
        min_rate: 10.0,
        deny_ratio: 0.5,
        fan_out: 20,
        new_edges: 10,
    };

    /// These, with the fields `spec` sets replaced.
    fn with(self, mode: Option<AnomalyMode>, spec: &r::AnomalyThresholdsSpec) -> Thresholds {
        Thresholds {
            mode: mode.unwrap_or(self.mode),
            min_samples: spec.min_samples.unwrap_or(self.min_samples),
            rate_factor: spec.rate_factor.unwrap_or(self.rate_factor),
            min_rate: spec.min_rate.unwrap_or(self.min_rate),
            deny_ratio: spec.deny_ratio.unwrap_or(self.deny_ratio),
            fan_out: spec.fan_out.unwrap_or(self.fan_out),
            new_edges: spec.new_edges.unwrap_or(self.new_edges),
        }
    }
}

/// The generated rate limit of a throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub requests_per_second: u32,
    pub burst: u32,
    pub duration: Duration,
}

/// Anomaly detection as the Mesh configures it.
#[derive(Debug, Clone)]
pub struct AnomalyDetection {
    pub window: Duration,
    pub warmup: Duration,
    pub baseline: Duration,
    pub thresholds: Thresholds,
    /// Thresholds of some sources (first match wins).
    pub per_source: Vec<(SourceMatch, Thresholds)>,
    pub throttle: Throttle,
    pub quarantine_after: Duration,
    pub quarantine_duration: Duration,
    /// Platform services: never acted on; reachable from a quarantined identity.
    pub platform: Option<SourceMatch>,
    /// The `platform` field as written (copied into generated quarantines as `except`).
    pub platform_spec: Option<r::SourceSpec>,
}

impl Default for AnomalyDetection {
    fn default() -> Self {
        AnomalyDetection {
            window: Duration::from_secs(10),
            warmup: Duration::from_secs(60),
            baseline: Duration::from_secs(600),
            thresholds: Thresholds::DEFAULT,
            per_source: vec![],
            throttle: Throttle {
                requests_per_second: 5,
                burst: 10,
                duration: Duration::from_secs(600),
            },
            quarantine_after: Duration::from_secs(30),
            quarantine_duration: Duration::from_secs(3600),
            platform: None,
            platform_spec: None,
        }
    }
}

impl AnomalyDetection {
    /// The thresholds for `source` (its attributes `attrs`; `td` the mesh's trust domain).
    pub fn for_source(
        &self,
        source: &SpiffeId,
        attrs: &BTreeMap<String, String>,
        td: &str,
    ) -> Thresholds {
        self.per_source
            .iter()
            .find(|(m, _)| source_matches(m, Some(source), attrs, &BTreeMap::new(), td))
            .map_or(self.thresholds, |(_, t)| *t)
    }

    /// Whether `source` is a platform service (never acted on).
    pub fn is_platform(
        &self,
        source: &SpiffeId,
        attrs: &BTreeMap<String, String>,
        td: &str,
    ) -> bool {
        self.platform
            .as_ref()
            .is_some_and(|m| source_matches(m, Some(source), attrs, &BTreeMap::new(), td))
    }
}

/// An invalid field: its path under `spec.anomalyDetection` and why.
pub type Problem = (Vec<String>, String);

/// Validates `spec` (`max_override`: the Mesh's `maxOverrideDuration`): the settings with
/// defaults for what is unset or invalid, and the problems found.
pub fn validate(
    spec: Option<&r::AnomalyDetectionSpec>,
    max_override: Duration,
) -> (AnomalyDetection, Vec<Problem>) {
    let mut a = AnomalyDetection::default();
    let mut bad: Vec<Problem> = vec![];
    let Some(s) = spec else {
        return (a, bad);
    };
    let at = |f: &[&str]| f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let time = |bad: &mut Vec<Problem>,
                f: &[&str],
                v: Option<r::Dur>,
                min: Duration,
                max: Duration,
                default: Duration| {
        match v {
            Some(d) if d.0 < min || d.0 > max => {
                bad.push((
                    at(f),
                    format!(
                        "must be between {} and {}, not {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max),
                        humantime::format_duration(d.0)
                    ),
                ));
                default
            }
            Some(d) => d.0,
            None => default,
        }
    };
    let day = Duration::from_secs(86400);
    a.window = time(
        &mut bad,
        &["window"],
        s.window,
        Duration::from_secs(1),
        Duration::from_secs(600),
        a.window,
    );
    a.warmup = time(
        &mut bad,
        &["warmup"],
        s.warmup,
        Duration::ZERO,
        day,
        a.warmup,
    );
    a.baseline = time(
        &mut bad,
        &["baseline"],
        s.baseline,
        a.window,
        day,
        a.baseline.max(a.window),
    );
    a.quarantine_after = time(
        &mut bad,
        &["quarantineAfter"],
        s.quarantine_after,
        Duration::ZERO,
        day,
        a.quarantine_after,
    );
    a.quarantine_duration = time(
        &mut bad,
        &["quarantineDuration"],
        s.quarantine_duration,
        Duration::from_secs(60),
        max_override,
        a.quarantine_duration.min(max_override),
    );
    if let Some(t) = &s.throttle {
        let mut count = |f: &str, v: Option<u32>, default: u32| match v {
            Some(0) => {
                bad.push((at(&["throttle", f]), "must be at least 1".into()));
                default
            }
            Some(n) => n,
            None => default,
        };
        a.throttle.requests_per_second = count(
            "requestsPerSecond",
            t.requests_per_second,
            a.throttle.requests_per_second,
        );
        a.throttle.burst = count("burst", t.burst, a.throttle.burst);
        a.throttle.duration = time(
            &mut bad,
            &["throttle", "duration"],
            t.duration,
            Duration::from_secs(1),
            day,
            a.throttle.duration,
        );
    }
    let thresholds = |bad: &mut Vec<Problem>, base: &[&str], t: &r::AnomalyThresholdsSpec| {
        let mut check = |f: &str, ok: bool, why: &str| {
            if !ok {
                let mut p = at(base);
                p.push(f.to_owned());
                bad.push((p, why.to_owned()));
            }
        };
        check(
            "minSamples",
            t.min_samples.is_none_or(|n| n >= 1),
            "must be at least 1",
        );
        check(
            "rateFactor",
            t.rate_factor.is_none_or(|f| f > 1.0 && f.is_finite()),
            "must be above 1 (a multiple of the identity's own baseline)",
        );
        check(
            "minRate",
            t.min_rate.is_none_or(|f| f >= 0.0 && f.is_finite()),
            "must be 0 or more requests per second",
        );
        check(
            "denyRatio",
            t.deny_ratio.is_none_or(|f| f > 0.0 && f <= 1.0),
            "must be above 0 and at most 1 (the share of requests denied)",
        );
        check(
            "fanOut",
            t.fan_out.is_none_or(|n| n >= 1),
            "must be at least 1",
        );
        check(
            "newEdges",
            t.new_edges.is_none_or(|n| n >= 1),
            "must be at least 1",
        );
    };
    if let Some(t) = &s.thresholds {
        thresholds(&mut bad, &["thresholds"], t);
    }
    a.thresholds = Thresholds::DEFAULT.with(s.mode, &s.thresholds.unwrap_or_default());
    for (i, p) in s.per_source.iter().enumerate() {
        let i = i.to_string();
        if let Some(t) = &p.thresholds {
            thresholds(&mut bad, &["perSource", &i, "thresholds"], t);
        }
        match SourceMatch::of_valid(&p.from) {
            Some(m) => a.per_source.push((
                m,
                a.thresholds.with(p.mode, &p.thresholds.unwrap_or_default()),
            )),
            None => bad.push((
                at(&["perSource", &i, "from"]),
                "an identity pattern or trust domain does not parse".into(),
            )),
        }
    }
    if let Some(p) = &s.platform {
        match SourceMatch::of_valid(p) {
            Some(m) => {
                a.platform = Some(m);
                a.platform_spec = Some(p.clone());
            }
            None => bad.push((
                at(&["platform"]),
                "an identity pattern or trust domain does not parse".into(),
            )),
        }
    }
    if !bad.is_empty() {
        // Invalid settings never half-apply: detection stays on its defaults in report
        // mode until they are fixed (the set is refused anyway).
        a = AnomalyDetection::default();
    }
    (a, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_thresholds_replace_only_what_they_set() {
        let spec: r::AnomalyDetectionSpec = serde_json::from_str(
            r#"{"mode": "quarantine", "thresholds": {"fanOut": 5},
                "perSource": [{"from": {"namespaces": ["batch"]}, "mode": "report",
                               "thresholds": {"denyRatio": 0.9}}]}"#,
        )
        .unwrap();
        let (a, bad) = validate(Some(&spec), Duration::from_secs(86400));
        assert!(bad.is_empty(), "{bad:?}");
        let id = |s| SpiffeId::parse(s).unwrap();
        let none = BTreeMap::new();
        let web = a.for_source(&id("spiffe://td/ns/web/sa/x"), &none, "td");
        assert_eq!(
            (web.mode, web.fan_out, web.deny_ratio),
            (AnomalyMode::Quarantine, 5, 0.5)
        );
        let batch = a.for_source(&id("spiffe://td/ns/batch/sa/x"), &none, "td");
        assert_eq!(
            (batch.mode, batch.fan_out, batch.deny_ratio),
            (AnomalyMode::Report, 5, 0.9)
        );
    }

    #[test]
    fn out_of_range_settings_are_reported_at_their_field() {
        let spec: r::AnomalyDetectionSpec = serde_json::from_str(
            r#"{"window": "0s", "quarantineDuration": "48h", "thresholds": {"denyRatio": 1.5},
                "throttle": {"burst": 0}}"#,
        )
        .unwrap();
        let (_, bad) = validate(Some(&spec), Duration::from_secs(86400));
        let paths: Vec<String> = bad.iter().map(|(p, _)| p.join(".")).collect();
        assert_eq!(
            paths,
            [
                "window",
                "quarantineDuration",
                "throttle.burst",
                "thresholds.denyRatio"
            ]
        );
    }
}
