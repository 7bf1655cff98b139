//! Anomaly detection (docs/containment.md): per source identity, from the decision
//! records proxies ship, the detector measures over a sliding window its request rate
//! against its own EWMA baseline, its share of requests denied by policy, its fan-out
//! (distinct destinations and ports) and its new edges (destinations and ports not seen in
//! the baseline). Counts are weighted: a shipped allow record stands for `weight` requests
//! (proxies sample and thin allows; denies are never thinned).
//!
//! What it does depends on the mode in force for the identity (`Mesh.anomalyDetection`):
//! `report` audits the detection (`anomaly.detected`); `throttle` commits a generated,
//! time-bound `RateLimitPolicy` on the identity (`anomaly.throttle`); `quarantine` does
//! that first and, when the identity stays anomalous for `quarantineAfter` under its
//! throttle, commits a time-bound quarantine `Override` sparing the platform services
//! (`anomaly.quarantine`). Every step is audited with the numbers that crossed which
//! threshold. Platform services are never acted on.
//!
//! The state (baselines, windows, stages) is this replica's, in memory, fed by the
//! proxies connected to it; what it enforces is in the store, like any other change.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;
use meshward_policy::anomaly::Thresholds;
use meshward_policy::decision::{Reason, Verdict};
use meshward_policy::resource::AnomalyMode;
use serde_json::json;

use super::{ControlPlane, Refused};
use crate::auth::Operator;
use crate::repo::{self, Key};
use crate::store::{AuditFilter, NewEntry};

/// Who the generated resources name as their requester.
pub const REQUESTER: &str = "meshward-detector";
/// The audit actor of the detector's steps.
pub const ACTOR: &str = "detector";

/// One destination and port.
type Edge = (String, u16);

/// The detector's memory of this replica.
#[derive(Debug, Default)]
pub struct State {
    /// The last decision-window row read (`None`: not started; it starts at the newest).
    cursor: Option<i64>,
    last_tick: Option<SystemTime>,
    sources: HashMap<String, Watched>,
}

#[derive(Debug)]
struct Watched {
    first_seen: SystemTime,
    /// Requests per second, the identity's own baseline.
    ewma: f64,
    ticks: u64,
    buckets: VecDeque<Bucket>,
    /// Edges seen within the baseline horizon, with when last.
    edges: HashMap<Edge, SystemTime>,
    stage: Stage,
    /// When the signals were last found over a threshold.
    last_firing: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct Bucket {
    at: Option<SystemTime>,
    secs: f64,
    requests: u64,
    denies: u64,
    edges: HashSet<Edge>,
    new_edges: HashSet<Edge>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Normal,
    Reported(SystemTime),
    Throttled(SystemTime),
    Quarantined(SystemTime),
}

/// One signal over its threshold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Signal {
    pub signal: &'static str,
    pub value: f64,
    pub threshold: f64,
}

/// What one window shows of one identity.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evidence {
    pub identity: String,
    pub window_secs: f64,
    /// Weighted counts (sampled allows stand for the requests they were sampled from).
    pub requests: u64,
    pub denies: u64,
    pub rate: f64,
    pub baseline_rate: f64,
    pub deny_ratio: f64,
    pub fan_out: u64,
    pub new_edges: u64,
    pub signals: Vec<Signal>,
    pub mode: &'static str,
}

impl Evidence {
    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .signals
            .iter()
            .map(|s| format!("{} {:.2} ≥ {:.2}", s.signal, s.value, s.threshold))
            .collect();
        format!(
            "{} over {:.0}s ({} requests, weighted)",
            parts.join(", "),
            self.window_secs,
            self.requests
        )
    }
}

/// What one tick did: `(action, identity)` pairs, for the log.
pub type Steps = Vec<(&'static str, String)>;

/// A deny that says something about the caller (not the detector's own doing, not a
/// limit or a malformed request).
fn counts_as_deny(reason: Reason) -> bool {
    reason.is_policy() && reason != Reason::Quarantined
}

/// The namespace and name of the resources generated for `identity`.
pub fn generated_name(identity: &str) -> (String, String) {
    let id = SpiffeId::parse(identity).ok();
    let ns = id
        .as_ref()
        .and_then(|i| i.namespace().map(str::to_owned))
        .unwrap_or_else(|| "meshward-system".into());
    let tail = identity.rsplit('/').next().unwrap_or("x");
    let mut base: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    base = base.trim_matches('-').to_owned();
    let hash = &crate::auth::sha256_hex(identity)[..8];
    (ns, format!("anomaly-{base}-{hash}"))
}

fn key(kind: &str, ns: &str, name: &str) -> Key {
    Key {
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl ControlPlane {
    /// One detector tick: reads the records shipped since the last one, updates every
    /// identity's window and baseline, and takes the steps the thresholds call for.
    pub fn detect(&self, now: SystemTime) -> Result<Steps, Refused> {
        let Ok(window) = self.window() else {
            return Ok(vec![]);
        };
        let (_, mut files) = self.head_files()?;
        let Some(set) = repo::load(&files).set else {
            return Ok(vec![]);
        };
        let cfg = &set.mesh.anomaly;
        let mut present = repo::resources(&files);
        let mut st = self
            .detector
            .lock()
            .map_err(|_| Refused::Internal("the detector's state is poisoned".into()))?;
        let cursor = match st.cursor {
            Some(c) => c,
            None => window.last_id()?,
        };
        let records = window.records_after(cursor, 200_000)?;
        st.cursor = Some(records.last().map_or(cursor, |(id, _)| *id));
        let secs = st
            .last_tick
            .and_then(|t| now.duration_since(t).ok())
            .map_or(1.0, |d| d.as_secs_f64().max(0.001));
        st.last_tick = Some(now);
        // This tick's bucket per source.
        let mut fresh: HashMap<String, Bucket> = HashMap::new();
        for (_, r) in &records {
            let Some(src) = &r.source else { continue };
            // Destination-side records decide; a source-side record counts only for what
            // the destination never saw (as the service graph does).
            if r.direction == "outbound" && r.reason.is_policy() {
                continue;
            }
            let b = fresh.entry(src.clone()).or_default();
            let w = u64::from(r.weight.max(1));
            b.requests += w;
            if r.verdict == Verdict::Deny && counts_as_deny(r.reason) {
                b.denies += w;
            }
            b.edges.insert((r.destination.clone(), r.port));
        }
        let names: Vec<String> = st
            .sources
            .keys()
            .cloned()
            .chain(fresh.keys().cloned())
            .collect();
        let mut steps = vec![];
        let td = set.mesh.trust_domain.as_str().to_owned();
        for name in names.into_iter().collect::<HashSet<_>>() {
            let Ok(id) = SpiffeId::parse(&name) else {
                continue;
            };
            let attrs = set.attributes_of(Some(&id));
            let th = cfg.for_source(&id, attrs, &td);
            let platform = cfg.is_platform(&id, attrs, &td);
            let mut bucket = fresh.remove(&name).unwrap_or_default();
            bucket.at = Some(now);
            bucket.secs = secs;
            let w = st.sources.entry(name.clone()).or_insert_with(|| Watched {
                first_seen: now,
                ewma: 0.0,
                ticks: 0,
                buckets: VecDeque::new(),
                edges: HashMap::new(),
                stage: Stage::Normal,
                last_firing: None,
            });
            let warm = now.duration_since(w.first_seen).unwrap_or_default() >= cfg.warmup;
            bucket.new_edges = bucket
                .edges
                .iter()
                .filter(|e| !w.edges.contains_key(*e))
                .cloned()
                .collect();
            let evidence = w.observe(bucket, now, cfg.window, cfg.baseline, &th, warm, &name);
            // What is enforced now: the store says (a throttle or quarantine may have
            // expired or been released).
            let (ns, generated) = generated_name(&name);
            let throttled = present.contains_key(&key("RateLimitPolicy", &ns, &generated));
            let quarantined = present.contains_key(&key("Override", &ns, &generated));
            w.stage = match w.stage {
                Stage::Quarantined(_) | Stage::Throttled(_) if !throttled && !quarantined => {
                    Stage::Normal
                }
                s => s,
            };
            if quarantined && !matches!(w.stage, Stage::Quarantined(_)) {
                w.stage = Stage::Quarantined(now);
            } else if throttled && w.stage == Stage::Normal {
                w.stage = Stage::Throttled(now);
            }
            let Some(ev) = evidence else {
                // Quiet for a whole window: a report is over (the next episode reports
                // again).
                if let Stage::Reported(_) = w.stage
                    && w.last_firing
                        .is_none_or(|t| now.duration_since(t).unwrap_or_default() >= cfg.window)
                {
                    w.stage = Stage::Normal;
                }
                continue;
            };
            w.last_firing = Some(now);
            let mode = if platform {
                AnomalyMode::Report
            } else {
                th.mode
            };
            let stage = w.stage;
            let step = match (stage, mode) {
                (_, AnomalyMode::Off) => None,
                (Stage::Normal, AnomalyMode::Report) => Some("anomaly.detected"),
                (Stage::Normal, AnomalyMode::Throttle | AnomalyMode::Quarantine) => {
                    Some("anomaly.throttle")
                }
                (Stage::Throttled(since), AnomalyMode::Quarantine)
                    if now.duration_since(since).unwrap_or_default() >= cfg.quarantine_after =>
                {
                    Some("anomaly.quarantine")
                }
                _ => None,
            };
            let Some(step) = step else { continue };
            let done = match step {
                "anomaly.detected" => self
                    .store
                    .append_audit(
                        NewEntry::new(ACTOR, step, &name, json!({"evidence": ev})),
                        now,
                    )
                    .map(|_| Stage::Reported(now))
                    .map_err(Refused::from),
                "anomaly.throttle" => self
                    .throttle(&ns, &generated, &ev, cfg, now)
                    .map(|()| Stage::Throttled(now)),
                _ => self
                    .quarantine(&ns, &generated, &ev, cfg, now)
                    .map(|()| Stage::Quarantined(now)),
            };
            match done {
                Ok(stage) => {
                    if let Some(w) = st.sources.get_mut(&name) {
                        w.stage = stage;
                    }
                    steps.push((step, name.clone()));
                }
                Err(e) => {
                    // Refused (an invalid set, a store error): audited, tried again at
                    // the next tick while the signals last.
                    self.audit_refusal(ACTOR, &format!("{step}.refused"), &name, &e, now);
                }
            }
            // A commit moved the head: the next step builds on it.
            if step != "anomaly.detected" {
                files = self.head_files()?.1;
                present = repo::resources(&files);
            }
        }
        Ok(steps)
    }

    fn throttle(
        &self,
        ns: &str,
        name: &str,
        ev: &Evidence,
        cfg: &meshward_policy::anomaly::AnomalyDetection,
        now: SystemTime,
    ) -> Result<(), Refused> {
        let t = cfg.throttle;
        let doc = format!(
            "apiVersion: meshward.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  target: {{}}\n  limits:\n    - from: {{identities: [{id}]}}\n      requestsPerSecond: {rps}\n      burst: {burst}\n  expiresAt: {exp}\n",
            id = serde_json::Value::String(ev.identity.clone()),
            rps = t.requests_per_second,
            burst = t.burst,
            exp = rfc3339(now + t.duration),
        );
        self.generate("throttle", ns, name, doc, ev, now)
    }

    fn quarantine(
        &self,
        ns: &str,
        name: &str,
        ev: &Evidence,
        cfg: &meshward_policy::anomaly::AnomalyDetection,
        now: SystemTime,
    ) -> Result<(), Refused> {
        let except = cfg
            .platform_spec
            .as_ref()
            .and_then(|p| serde_json::to_string(p).ok())
            .map(|j| format!("  except: {j}\n"))
            .unwrap_or_default();
        let doc = format!(
            "apiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  action: quarantine\n  subject: {{identities: [{id}]}}\n{except}  reason: {reason}\n  requester: {REQUESTER}\n  expiresAt: {exp}\n",
            id = serde_json::Value::String(ev.identity.clone()),
            reason = serde_json::Value::String(format!("anomaly detection: {}", ev.summary())),
            exp = rfc3339(now + cfg.quarantine_duration),
        );
        self.generate("quarantine", ns, name, doc, ev, now)
    }

    /// Commits a generated resource (validated like any change) with its audit entry.
    fn generate(
        &self,
        what: &str,
        ns: &str,
        name: &str,
        doc: String,
        ev: &Evidence,
        now: SystemTime,
    ) -> Result<(), Refused> {
        let path = format!("anomaly/{what}-{ns}-{name}.yaml");
        // On the newest head (an operator may have committed since the tick began).
        let files = &self.head_files()?.1;
        let mut next: crate::store::Files =
            files.iter().filter(|(p, _)| *p != path).cloned().collect();
        next.push((path, doc));
        self.validate(&next, now)?;
        let summary = repo::summary(files, &next);
        let entry = NewEntry::new(
            ACTOR,
            &format!("anomaly.{what}"),
            &ev.identity,
            json!({"resource": format!("{ns}/{name}"), "evidence": ev, "summary": summary}),
        );
        let reason = format!(
            "anomaly detection: {what} {}: {}",
            ev.identity,
            ev.summary()
        );
        self.commit(ACTOR, &reason, &summary, &next, entry, now)?;
        Ok(())
    }

    /// The identities anomaly detection reported, throttled or quarantined: the enforced
    /// ones from the head revision, the reported ones from the last hour of the audit log,
    /// each with its latest evidence.
    pub fn quarantines(&self, now: SystemTime) -> Result<Vec<serde_json::Value>, Refused> {
        let (_, files) = self.head_files()?;
        let set = repo::load(&files).set;
        let since = now - Duration::from_secs(3600);
        let audit = self.store.audit(&AuditFilter {
            action_prefix: Some("anomaly.".into()),
            limit: Some(1000),
            ..Default::default()
        })?;
        // Newest last: keep the latest per identity and action.
        let mut latest: HashMap<(String, String), &crate::audit::Entry> = HashMap::new();
        for e in &audit {
            latest.insert((e.subject.clone(), e.action.clone()), e);
        }
        let evidence = |identity: &str, action: &str| {
            latest
                .get(&(identity.to_owned(), action.to_owned()))
                .map(|e| {
                    let d: serde_json::Value = serde_json::from_str(&e.detail).unwrap_or_default();
                    (d["evidence"].clone(), e.ts_ms)
                })
        };
        let ms = |t: i64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(t.max(0) as u64));
        let mut out: HashMap<String, serde_json::Value> = HashMap::new();
        if let Some(set) = &set {
            for r in &set.rate_limits {
                let Some(id) =
                    generated_identity(&r.id, r.spec.limits.first().and_then(|l| l.from.as_ref()))
                else {
                    continue;
                };
                let (ev, at) = evidence(&id, "anomaly.throttle").unwrap_or_default();
                out.insert(
                    id.clone(),
                    json!({
                        "id": r.id, "identity": id, "stage": "throttled", "since": ms(at),
                        "throttle_expires_at": r.spec.expires_at.map(|t| rfc3339(t.0)),
                        "quarantine_expires_at": null, "evidence": ev,
                    }),
                );
            }
            for o in &set.overrides {
                if o.requester.as_deref() != Some(REQUESTER) {
                    continue;
                }
                let Some(id) = o
                    .subject
                    .as_ref()
                    .and_then(|s| s.identities.first())
                    .map(|p| p.to_string())
                else {
                    continue;
                };
                let (ev, at) = evidence(&id, "anomaly.quarantine").unwrap_or_default();
                let v = out.entry(id.clone()).or_insert_with(
                    || json!({"id": o.id, "identity": id, "throttle_expires_at": null}),
                );
                v["stage"] = json!("quarantined");
                v["since"] = json!(ms(at));
                v["quarantine_expires_at"] = json!(o.expires_at.map(rfc3339));
                v["evidence"] = ev;
            }
        }
        for e in audit.iter().filter(|e| e.action == "anomaly.detected") {
            let at = SystemTime::UNIX_EPOCH + Duration::from_millis(e.ts_ms.max(0) as u64);
            if at < since || out.contains_key(&e.subject) {
                continue;
            }
            let (ev, ts) = evidence(&e.subject, "anomaly.detected").unwrap_or_default();
            out.insert(
                e.subject.clone(),
                json!({
                    "id": null, "identity": e.subject, "stage": "reported", "since": ms(ts),
                    "throttle_expires_at": null, "quarantine_expires_at": null, "evidence": ev,
                }),
            );
        }
        let mut v: Vec<serde_json::Value> = out.into_values().collect();
        v.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
        Ok(v)
    }

    /// Lifts what anomaly detection enforces on an identity (`id`: the identity or the
    /// generated `namespace/name`): its throttle and its quarantine, in one revision,
    /// audited `quarantine.release` with `reason`. Needs the identity's namespace owner
    /// or platform-security. The detector watches the identity afresh (warm-up again).
    pub fn release_quarantine(
        &self,
        op: &Operator,
        id: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<super::Applied, Refused> {
        super::require_reason(reason)?;
        let listed = self.quarantines(now)?;
        let Some(entry) = listed
            .iter()
            .find(|q| q["stage"] != "reported" && (q["identity"] == id || q["id"] == id))
        else {
            return Err(Refused::NotFound(format!(
                "nothing throttled or quarantined by anomaly detection is called `{id}`: `meshward quarantine list` shows what is"
            )));
        };
        let identity = entry["identity"].as_str().unwrap_or_default().to_owned();
        let (ns, name) = generated_name(&identity);
        if !op.owns(&ns) {
            let e = Refused::Forbidden(format!(
                "releasing {identity} needs an owner of namespace `{ns}` or platform-security; {} is neither",
                op.name
            ));
            self.audit_refusal(
                &op.actor(),
                "quarantine.release.refused",
                &identity,
                &e,
                now,
            );
            return Err(e);
        }
        let (_, files) = self.head_files()?;
        let mut next = files.clone();
        for kind in ["RateLimitPolicy", "Override"] {
            next = repo::remove(&next, &key(kind, &ns, &name));
        }
        let summary = repo::summary(&files, &next);
        let entry = NewEntry::new(
            &op.actor(),
            "quarantine.release",
            &identity,
            json!({"reason": reason, "resource": format!("{ns}/{name}"), "summary": summary}),
        );
        let r = self.commit(&op.actor(), reason, &summary, &next, entry, now)?;
        if let Ok(mut st) = self.detector.lock() {
            st.sources.remove(&identity);
        }
        Ok(super::Applied::Committed {
            revision: r.rev,
            summary,
            not_enforced: vec![],
        })
    }
}

/// The identity a generated throttle limits (`None`: not the detector's).
fn generated_identity(
    id: &str,
    from: Option<&meshward_policy::resource::SourceSpec>,
) -> Option<String> {
    let who = from?.identities.first()?.clone();
    let (ns, name) = generated_name(&who);
    (id == format!("{ns}/{name}")).then_some(who)
}

impl Watched {
    /// Adds this tick's bucket and measures the window; the evidence when some signal is
    /// over its threshold (never before the warm-up and the minimum samples).
    #[expect(
        clippy::too_many_arguments,
        reason = "the window, its settings and the identity, each needed"
    )]
    fn observe(
        &mut self,
        bucket: Bucket,
        now: SystemTime,
        window: Duration,
        baseline: Duration,
        th: &Thresholds,
        warm: bool,
        identity: &str,
    ) -> Option<Evidence> {
        let tick_rate = bucket.requests as f64 / bucket.secs;
        for e in &bucket.edges {
            self.edges.insert(e.clone(), now);
        }
        self.buckets.push_back(bucket);
        let start = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        while self
            .buckets
            .front()
            .is_some_and(|b| b.at.is_some_and(|t| t <= start))
        {
            self.buckets.pop_front();
        }
        let horizon = now.checked_sub(baseline).unwrap_or(SystemTime::UNIX_EPOCH);
        self.edges.retain(|_, t| *t > horizon);
        let secs: f64 = self.buckets.iter().map(|b| b.secs).sum::<f64>().max(0.001);
        let requests: u64 = self.buckets.iter().map(|b| b.requests).sum();
        let denies: u64 = self.buckets.iter().map(|b| b.denies).sum();
        let edges = self
            .buckets
            .iter()
            .flat_map(|b| &b.edges)
            .collect::<HashSet<_>>()
            .len() as u64;
        let new_edges = self
            .buckets
            .iter()
            .flat_map(|b| &b.new_edges)
            .collect::<HashSet<_>>()
            .len() as u64;
        let rate = requests as f64 / secs;
        let deny_ratio = if requests == 0 {
            0.0
        } else {
            denies as f64 / requests as f64
        };
        let mut signals = vec![];
        if warm && th.mode != AnomalyMode::Off {
            let enough = requests >= th.min_samples;
            let rate_threshold = (th.rate_factor * self.ewma).max(th.min_rate);
            if enough && rate >= rate_threshold {
                signals.push(Signal {
                    signal: "rate",
                    value: rate,
                    threshold: rate_threshold,
                });
            }
            if enough && deny_ratio >= th.deny_ratio {
                signals.push(Signal {
                    signal: "deny_ratio",
                    value: deny_ratio,
                    threshold: th.deny_ratio,
                });
            }
            if edges >= th.fan_out {
                signals.push(Signal {
                    signal: "fan_out",
                    value: edges as f64,
                    threshold: th.fan_out as f64,
                });
            }
            if new_edges >= th.new_edges {
                signals.push(Signal {
                    signal: "new_edges",
                    value: new_edges as f64,
                    threshold: th.new_edges as f64,
                });
            }
        }
        // The baseline learns from normal traffic only: the running mean of the warm-up,
        // then an EWMA over the baseline horizon (a ramp cannot teach it much).
        if signals.is_empty() && self.stage == Stage::Normal {
            self.ticks += 1;
            let secs_now = self.buckets.back().map_or(1.0, |b| b.secs);
            let alpha = if warm {
                (secs_now / baseline.as_secs_f64()).min(1.0)
            } else {
                1.0 / self.ticks as f64
            };
            self.ewma += alpha * (tick_rate - self.ewma);
        }
        if !warm {
            // Warming up: what it does now is its baseline (its edges are learned above),
            // never evidence — the window starts when the warm-up ends.
            self.buckets.clear();
        }
        (!signals.is_empty()).then(|| Evidence {
            identity: identity.to_owned(),
            window_secs: secs,
            requests,
            denies,
            rate,
            baseline_rate: self.ewma,
            deny_ratio,
            fan_out: edges,
            new_edges,
            signals,
            mode: th.mode.as_str(),
        })
    }
}
