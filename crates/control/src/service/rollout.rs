//! Progressive rollout (docs/rollout.md): a change goes out in shadow first, is compared
//! with live traffic, is enforced only when it breaks nothing that works today, and is
//! rolled back by itself when enforcement hurts edges that were healthy.
//!
//! - **Shadow** (`bake`): every sidecar evaluates the candidate beside the revision it
//!   enforces and records both verdicts (records where they differ are never sampled
//!   away). A sidecar that cannot compile the candidate stops the rollout.
//! - **Gate**: at the end of the bake, the edges (source → destination workload) where
//!   the candidate would deny requests allowed today. Over `maxNewDenyPercent` of an
//!   edge's allowed requests, or any on a critical edge (`Mesh.rollout.criticalEdges`, and
//!   every edge a `PolicyTest` expects allowed), the rollout waits for an operator
//!   (`meshward rollout promote | abort`). No live traffic at all: the recorded window is
//!   replayed against the candidate (`policy impact`); a flip there holds it too, and a
//!   clean replay still waits unless the rollout was started with `--allow-no-traffic`.
//! - **Watch** (`watch`): enforced as a new revision; the deny and 5xx rates of every
//!   edge that was healthy in the bake are compared with the bake's; beyond
//!   `maxDenyRateIncrease` / `maxErrorRateIncrease` percentage points, or when sidecars
//!   reject the revision or do not acknowledge it within `ackTimeout`, the control plane
//!   commits a new revision that restores what the candidate changed, with the evidence in
//!   the audit log. At the end of the watch the rollout is promoted.
//!
//! One rollout at a time: `apply`, `rollback` and `approve` are refused while one runs
//! (overrides, quarantines and expiries still commit: the candidate's changes are
//! rebased onto whatever head the enforcement finds). The rollout lives in the store
//! (`state` row `rollout`): a restarted control plane carries on where it was.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use meshward_policy::decision::Verdict;
use meshward_policy::decision_log::DecisionRecord;
use meshward_policy::rollout::RolloutSettings;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Applied, ControlPlane, Refused, require_reason};
use crate::auth::Operator;
use crate::repo;
use crate::store::{Files, NewEntry, ms};

/// The store's state row.
pub const STATE_KEY: &str = "rollout";
/// The audit actor of what a rollout does by itself.
pub const ACTOR: &str = "rollout";
/// How far back the no-traffic fallback replays the recorded window.
const REPLAY_HORIZON: Duration = Duration::from_secs(3600);
/// The watch's baseline: the edges' health over at least this long before enforcement
/// (the bake, when it is longer), so a short bake still knows which edges were healthy.
const BASELINE_HORIZON: Duration = Duration::from_secs(300);
/// The most records a stage reads.
const MAX_RECORDS: usize = 200_000;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The candidate runs in shadow beside the enforced revision.
    Shadow,
    /// Held at the gate: an operator promotes or aborts.
    Waiting,
    /// Enforced; healthy edges are watched.
    Watch,
    Promoted,
    RolledBack,
    /// Ended before enforcement by a fault (a sidecar could not take the candidate, the
    /// rebased set is invalid).
    Stopped,
    /// Ended by an operator before enforcement.
    Aborted,
}

impl Stage {
    pub fn active(self) -> bool {
        matches!(self, Stage::Shadow | Stage::Waiting | Stage::Watch)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Shadow => "shadow",
            Stage::Waiting => "waiting",
            Stage::Watch => "watch",
            Stage::Promoted => "promoted",
            Stage::RolledBack => "rolled_back",
            Stage::Stopped => "stopped",
            Stage::Aborted => "aborted",
        }
    }
}

/// What the shadow saw on one edge.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EdgeShadow {
    pub source: String,
    pub destination: String,
    /// Requests decided with the candidate beside (weighted by sampling).
    pub requests: u64,
    /// Of those, allowed today.
    pub allowed: u64,
    /// Allowed today, denied by the candidate.
    pub would_deny: u64,
    /// Denied today, allowed by the candidate.
    pub would_allow: u64,
    /// `would_deny` in percent of `allowed`.
    pub would_deny_percent: f64,
    pub critical: bool,
    /// Over the gate's threshold, or denied on a critical edge.
    pub held: bool,
    /// A request that flips, e.g. `POST /charge` (port 80), and the candidate's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<String>,
}

/// An edge's health in one stage: `direction` is whose sidecar wrote the records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EdgeHealth {
    pub source: String,
    pub destination: String,
    pub direction: String,
    pub requests: u64,
    pub denied: u64,
    /// Requests with an HTTP status on record, and those 5xx.
    pub answered: u64,
    pub errors: u64,
    pub deny_percent: f64,
    pub error_percent: f64,
}

/// The no-traffic fallback: the recorded window replayed against the candidate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Replayed {
    pub requests: u64,
    pub allow_to_deny: u64,
    pub deny_to_allow: u64,
    /// The edges that flip (`source → destination: N`).
    pub flips: Vec<String>,
}

/// One progressive rollout, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    pub author: String,
    pub reason: String,
    pub summary: String,
    /// The revision enforced when it started, and its files.
    pub base: u64,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub base_files: Files,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub candidate: Files,
    pub settings: RolloutSettings,
    pub allow_no_traffic: bool,
    pub started_ms: i64,
    /// The second platform-security operator whose approval started it (a change that
    /// needs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    pub stage: Stage,
    /// When the current stage began.
    pub stage_ms: i64,
    /// The revision the enforcement committed.
    pub enforced: Option<u64>,
    /// The revision the rollback committed.
    pub rolled_back_to: Option<u64>,
    pub ended_ms: Option<i64>,
    /// Why it waits, or how it ended.
    pub why: Option<String>,
    /// Critical edges: (source, destination).
    pub critical: Vec<(String, String)>,
    /// The gate's evidence (the bake's shadow verdicts).
    pub gate: Vec<EdgeShadow>,
    pub replayed: Option<Replayed>,
    /// Edge health in the bake, and in the watch.
    pub baseline: Vec<EdgeHealth>,
    pub watched: Vec<EdgeHealth>,
}

/// What `apply --progressive` asks for beside the files.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Options {
    /// Seconds; the Mesh's `rollout.bake` otherwise.
    #[serde(default)]
    pub bake_seconds: Option<f64>,
    #[serde(default)]
    pub watch_seconds: Option<f64>,
    #[serde(default)]
    pub allow_no_traffic: bool,
}

fn proposal_key(id: u64) -> String {
    format!("proposal/{id}/progressive")
}

/// The candidate's `Mesh.rollout` with the apply's `--bake` / `--watch`.
fn settings_of(
    loaded: &meshward_policy::model::Loaded,
    opts: &Options,
) -> Result<RolloutSettings, Refused> {
    let mut settings = loaded
        .set
        .as_ref()
        .map(|s| s.mesh.rollout.clone())
        .unwrap_or_default();
    let secs = |v: Option<f64>, what: &str| -> Result<Option<Duration>, Refused> {
        match v {
            None => Ok(None),
            Some(x) if x.is_finite() && (1.0..=86_400.0).contains(&x) => {
                Ok(Some(Duration::from_secs_f64(x)))
            }
            Some(x) => Err(Refused::BadRequest(format!(
                "--{what} {x}s: must be between 1s and 24h"
            ))),
        }
    };
    if let Some(d) = secs(opts.bake_seconds, "bake")? {
        settings.bake = d;
    }
    if let Some(d) = secs(opts.watch_seconds, "watch")? {
        settings.watch = d;
    }
    Ok(settings)
}

fn at_ms(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(t).unwrap_or(0))
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 100.0 / whole as f64 * 10.0).round() / 10.0
    }
}

/// The files `candidate` changes against `base`: name → the candidate's text (`None`:
/// removed).
fn delta(base: &Files, candidate: &Files) -> BTreeMap<String, Option<String>> {
    let b: BTreeMap<&str, &str> = base.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    let c: BTreeMap<&str, &str> = candidate
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut out = BTreeMap::new();
    for name in b.keys().chain(c.keys()) {
        if b.get(name) != c.get(name) {
            out.insert((*name).to_owned(), c.get(name).map(|t| (*t).to_owned()));
        }
    }
    out
}

/// `head` with `changes` applied (name → text, `None` removes).
fn with_changes(head: &Files, changes: &BTreeMap<String, Option<String>>) -> Files {
    let mut out: Files = head
        .iter()
        .filter(|(n, _)| !matches!(changes.get(n), Some(None)))
        .map(|(n, t)| match changes.get(n) {
            Some(Some(new)) => (n.clone(), new.clone()),
            _ => (n.clone(), t.clone()),
        })
        .collect();
    for (n, t) in changes {
        if let Some(t) = t
            && !head.iter().any(|(h, _)| h == n)
        {
            out.push((n.clone(), t.clone()));
        }
    }
    out
}

/// The candidate's changes applied onto `head` (which moved from `base` if an override,
/// a quarantine or an expiry committed meanwhile); the files both changed otherwise are
/// a conflict.
pub fn rebase(base: &Files, candidate: &Files, head: &Files) -> Result<Files, Vec<String>> {
    let changes = delta(base, candidate);
    let text = |f: &Files, n: &str| f.iter().find(|(x, _)| x == n).map(|(_, t)| t.clone());
    let conflicts: Vec<String> = changes
        .iter()
        .filter(|(n, c)| {
            let h = text(head, n);
            h != text(base, n) && h != **c
        })
        .map(|(n, _)| n.clone())
        .collect();
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    Ok(with_changes(head, &changes))
}

/// `head` with every file the candidate changed restored to the base's version.
pub fn revert(base: &Files, candidate: &Files, head: &Files) -> Files {
    let text = |f: &Files, n: &str| f.iter().find(|(x, _)| x == n).map(|(_, t)| t.clone());
    let restore: BTreeMap<String, Option<String>> = delta(base, candidate)
        .into_keys()
        .map(|n| {
            let t = text(base, &n);
            (n, t)
        })
        .collect();
    with_changes(head, &restore)
}

/// The shadow verdicts of rollout `id` in `records`, by edge.
pub fn shadow_edges(
    records: &[DecisionRecord],
    id: u64,
    settings: &RolloutSettings,
    critical: &[(String, String)],
) -> Vec<EdgeShadow> {
    let mut edges: BTreeMap<(String, String), EdgeShadow> = BTreeMap::new();
    for r in records {
        if r.candidate_rollout != Some(id) || r.direction != "inbound" {
            continue;
        }
        let Some(cv) = r.candidate_verdict else {
            continue;
        };
        let source = r.source.clone().unwrap_or_else(|| "unauthenticated".into());
        let e = edges
            .entry((source.clone(), r.destination.clone()))
            .or_insert_with(|| EdgeShadow {
                source,
                destination: r.destination.clone(),
                ..Default::default()
            });
        let w = u64::from(r.weight.max(1));
        e.requests += w;
        if r.verdict == Verdict::Allow {
            e.allowed += w;
            if cv == Verdict::Deny {
                e.would_deny += w;
                if e.example.is_none() {
                    e.example = Some(format!(
                        "{} {} (port {}): {}{}",
                        r.method.as_deref().unwrap_or("TCP"),
                        r.path.as_deref().unwrap_or(""),
                        r.port,
                        r.candidate_reason.map_or("denied", |x| x.as_str()),
                        r.candidate_policy
                            .as_deref()
                            .map(|p| format!(" by {p}"))
                            .unwrap_or_default(),
                    ));
                }
            }
        } else if cv == Verdict::Allow {
            e.would_allow += w;
        }
    }
    edges
        .into_values()
        .map(|mut e| {
            e.would_deny_percent = percent(e.would_deny, e.allowed);
            e.critical = critical
                .iter()
                .any(|(s, d)| *s == e.source && *d == e.destination);
            e.held = e.would_deny > 0
                && (e.critical || e.would_deny_percent > settings.max_new_deny_percent);
            e
        })
        .collect()
}

/// Each edge's deny and 5xx rates in `records`.
pub fn health(records: &[DecisionRecord], min_revision: u64) -> Vec<EdgeHealth> {
    let mut edges: BTreeMap<(String, String, String), EdgeHealth> = BTreeMap::new();
    for r in records {
        if r.revision < min_revision {
            continue;
        }
        let source = r.source.clone().unwrap_or_else(|| "unauthenticated".into());
        let e = edges
            .entry((source.clone(), r.destination.clone(), r.direction.clone()))
            .or_insert_with(|| EdgeHealth {
                source,
                destination: r.destination.clone(),
                direction: r.direction.clone(),
                ..Default::default()
            });
        let w = u64::from(r.weight.max(1));
        e.requests += w;
        if r.verdict == Verdict::Deny {
            e.denied += w;
        }
        if let Some(s) = r.status {
            e.answered += w;
            if s >= 500 {
                e.errors += w;
            }
        }
    }
    edges
        .into_values()
        .map(|mut e| {
            e.deny_percent = percent(e.denied, e.requests);
            e.error_percent = percent(e.errors, e.answered);
            e
        })
        .collect()
}

/// The healthy edges of `baseline` whose rates in `now` rose beyond the thresholds, each
/// said as evidence.
pub fn harmed(baseline: &[EdgeHealth], now: &[EdgeHealth], s: &RolloutSettings) -> Vec<String> {
    let mut out = vec![];
    for b in baseline {
        // Healthy before: enough traffic, and some of it answered without error.
        if b.requests < s.min_requests || b.error_percent >= 100.0 || b.deny_percent >= 100.0 {
            continue;
        }
        let Some(n) = now.iter().find(|n| {
            n.source == b.source && n.destination == b.destination && n.direction == b.direction
        }) else {
            continue;
        };
        if n.requests < s.min_requests {
            continue;
        }
        let edge = format!("{} → {} ({})", b.source, b.destination, b.direction);
        if n.deny_percent - b.deny_percent > s.max_deny_rate_increase {
            out.push(format!(
                "{edge}: deny rate {}% (was {}%, {} of {} requests)",
                n.deny_percent, b.deny_percent, n.denied, n.requests
            ));
        }
        if n.answered >= s.min_requests
            && n.error_percent - b.error_percent > s.max_error_rate_increase
        {
            out.push(format!(
                "{edge}: 5xx rate {}% (was {}%, {} of {} answered)",
                n.error_percent, b.error_percent, n.errors, n.answered
            ));
        }
    }
    out
}

/// The edges a `PolicyTest` of `files` expects allowed, with the Mesh's critical edges.
fn critical_edges(files: &Files, settings: &RolloutSettings) -> Vec<(String, String)> {
    let mut out = settings.critical_edges.clone();
    if let Some(set) = repo::load(files).set {
        for t in &set.tests {
            for sc in &t.spec.scenarios {
                if sc.expect.verdict == Verdict::Allow {
                    out.push((sc.request.from.clone(), sc.request.to.clone()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

impl ControlPlane {
    /// One rollout transition at a time.
    fn lock_rollouts(&self) -> Result<std::sync::MutexGuard<'_, ()>, Refused> {
        self.rollout_lock
            .lock()
            .map_err(|_| Refused::Internal("the rollout lock is poisoned".into()))
    }

    /// `r`, with its refusal audited (`action` on `subject`).
    fn audited<T>(
        &self,
        op: &Operator,
        action: &str,
        subject: &str,
        now: SystemTime,
        r: Result<T, Refused>,
    ) -> Result<T, Refused> {
        if let Err(e) = &r {
            self.audit_refusal(&op.actor(), action, subject, e, now);
        }
        r
    }

    /// The rollout on record (the last one, active or not).
    pub fn rollout(&self) -> Result<Option<Rollout>, Refused> {
        match self.store.state(STATE_KEY)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Refused::Internal(format!("the stored rollout is unreadable: {e}"))),
        }
    }

    /// The rollout running now, if one is.
    pub fn active_rollout(&self) -> Result<Option<Rollout>, Refused> {
        Ok(self.rollout()?.filter(|r| r.stage.active()))
    }

    /// Refuses a change while a rollout runs.
    pub(super) fn refuse_during_rollout(&self) -> Result<(), Refused> {
        if let Some(r) = self.active_rollout()? {
            return Err(Refused::Conflict(format!(
                "rollout {} ({}, by {}: {}) is in its {} stage; wait for it to end, or end it with `meshward rollout promote` or `meshward rollout abort`",
                r.id,
                r.summary,
                r.author,
                r.reason,
                r.stage.as_str()
            )));
        }
        Ok(())
    }

    fn save_rollout(
        &self,
        r: &Rollout,
        entry: Option<NewEntry>,
        now: SystemTime,
    ) -> Result<(), Refused> {
        let text = serde_json::to_string(r).map_err(|e| Refused::Internal(e.to_string()))?;
        self.store.set_state(STATE_KEY, &text, entry, now)?;
        self.rollout_idle
            .store(!r.stage.active(), std::sync::atomic::Ordering::Relaxed);
        self.rollout_gen.send_modify(|g| *g += 1);
        Ok(())
    }

    fn count_rollout(&self, event: &'static str) {
        self.metrics
            .rollouts
            .get_or_create(&meshward_telemetry::ResultLabels { result: event })
            .inc();
    }

    /// The candidate sidecars evaluate in shadow now: `(rollout, files)`.
    pub(super) fn shadow_candidate(&self) -> Option<(u64, Files)> {
        if self.rollout_idle.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let r = self.active_rollout().ok().flatten()?;
        matches!(r.stage, Stage::Shadow | Stage::Waiting).then(|| (r.id, r.candidate))
    }

    /// `apply --progressive`: validates and authorizes `files` as an apply would, then
    /// starts their rollout in shadow.
    pub fn start_rollout(
        &self,
        op: &Operator,
        files: Files,
        reason: &str,
        opts: &Options,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let result = self.start_inner(op, files, reason, opts, now);
        self.audited(op, "rollout.rejected", "policy-set", now, result)
    }

    fn start_inner(
        &self,
        op: &Operator,
        files: Files,
        reason: &str,
        opts: &Options,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        require_reason(reason)?;
        let _g = self.lock_rollouts()?;
        self.refuse_during_rollout()?;
        let loaded = repo::load(&files);
        if loaded
            .diagnostics
            .iter()
            .any(|d| d.is_error() && d.code.starts_with("MW1"))
        {
            let diags = meshward_policy::lint::errors(&loaded, now);
            return Err(Refused::Invalid(super::render(&diags, &loaded), diags));
        }
        let (base, old) = self.head_files()?;
        if repo::changes(&old, &files).is_empty() {
            return Ok(Applied::Unchanged { revision: base });
        }
        let needs_approval = self.authorize(op, &old, &files)?;
        self.validate(&files, now)?;
        let settings = settings_of(&loaded, opts)?;
        if needs_approval {
            // Filed like any change that needs a second approval; the approval starts
            // the rollout instead of committing it (ControlPlane::approve).
            let summary = repo::summary(&old, &files);
            let p = crate::store::Proposal {
                id: 0,
                created_ms: ms(now),
                author: op.name.clone(),
                reason: reason.into(),
                summary: summary.clone(),
                base,
                files: files.clone(),
            };
            let id = self.store.propose(
                &p,
                NewEntry::new(
                    &op.actor(),
                    "apply.proposed",
                    "policy-set",
                    json!({"summary": summary, "reason": reason, "progressive": opts}),
                ),
                now,
            )?;
            let text = serde_json::to_string(opts).map_err(|e| Refused::Internal(e.to_string()))?;
            self.store.set_state(&proposal_key(id), &text, None, now)?;
            return Ok(Applied::PendingApproval {
                proposal: id,
                summary,
                not_enforced: vec![],
            });
        }
        self.begin(
            &op.actor(),
            &op.name,
            None,
            reason,
            (base, old),
            files,
            settings,
            opts,
            now,
        )
    }

    /// A proposal's progressive options, when its approval is to start a rollout.
    pub(super) fn progressive_proposal(&self, id: u64) -> Result<Option<Options>, Refused> {
        Ok(self
            .store
            .state(&proposal_key(id))?
            .and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Approval of a progressive proposal: its rollout starts (the approver is on record).
    pub(super) fn begin_approved(
        &self,
        approver: &Operator,
        p: &crate::store::Proposal,
        opts: &Options,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let _g = self.lock_rollouts()?;
        self.refuse_during_rollout()?;
        let (base, old) = self.head_files()?;
        let loaded = repo::load(&p.files);
        let settings = settings_of(&loaded, opts)?;
        self.store.drop_proposal(p.id)?;
        self.begin(
            &approver.actor(),
            &p.author,
            Some(&approver.name),
            &p.reason,
            (base, old),
            p.files.clone(),
            settings,
            opts,
            now,
        )
    }

    /// Records a new rollout in shadow.
    #[allow(clippy::too_many_arguments, reason = "one call site each, all named")]
    fn begin(
        &self,
        actor: &str,
        author: &str,
        approved_by: Option<&str>,
        reason: &str,
        (base, old): (u64, Files),
        files: Files,
        settings: RolloutSettings,
        opts: &Options,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let id = self.rollout()?.map_or(1, |r| r.id + 1);
        let summary = repo::summary(&old, &files);
        let critical = critical_edges(&files, &settings);
        let r = Rollout {
            id,
            author: author.to_owned(),
            approved_by: approved_by.map(str::to_owned),
            reason: reason.to_owned(),
            summary: summary.clone(),
            base,
            base_files: old,
            candidate: files,
            settings,
            allow_no_traffic: opts.allow_no_traffic,
            started_ms: ms(now),
            stage: Stage::Shadow,
            stage_ms: ms(now),
            enforced: None,
            rolled_back_to: None,
            ended_ms: None,
            why: None,
            critical,
            gate: vec![],
            replayed: None,
            baseline: vec![],
            watched: vec![],
        };
        self.save_rollout(
            &r,
            Some(NewEntry::new(
                actor,
                "rollout.started",
                &format!("rollout/{id}"),
                json!({"summary": summary, "reason": reason, "base": base, "author": author, "approved_by": approved_by,
                    "bake_seconds": r.settings.bake.as_secs_f64(), "watch_seconds": r.settings.watch.as_secs_f64(),
                    "allow_no_traffic": r.allow_no_traffic, "critical_edges": r.critical}),
            )),
            now,
        )?;
        self.count_rollout("started");
        Ok(Applied::RolloutStarted {
            rollout: id,
            summary,
            bake_seconds: r.settings.bake.as_secs_f64(),
            watch_seconds: r.settings.watch.as_secs_f64(),
        })
    }

    fn window_records(&self, since_ms: i64) -> Vec<DecisionRecord> {
        self.window()
            .ok()
            .and_then(|w| w.records(Some(at_ms(since_ms)), MAX_RECORDS).ok())
            .unwrap_or_default()
    }

    /// The rollout as `meshward rollout status` shows it: with the live shadow evidence
    /// while it bakes, and where the sidecars are.
    pub fn rollout_status(&self, now: SystemTime) -> Result<serde_json::Value, Refused> {
        let Some(mut r) = self.rollout()? else {
            return Ok(json!({"rollout": null}));
        };
        if r.stage == Stage::Shadow {
            let recs = self.window_records(r.stage_ms);
            r.gate = shadow_edges(&recs, r.id, &r.settings, &r.critical);
        }
        if r.stage == Stage::Watch {
            let recs = self.window_records(r.stage_ms);
            r.watched = health(&recs, r.enforced.unwrap_or(0));
        }
        let elapsed = now
            .duration_since(at_ms(r.stage_ms))
            .unwrap_or_default()
            .as_secs_f64();
        let remaining = match r.stage {
            Stage::Shadow => Some((r.settings.bake.as_secs_f64() - elapsed).max(0.0)),
            Stage::Watch => Some((r.settings.watch.as_secs_f64() - elapsed).max(0.0)),
            _ => None,
        };
        let sidecars = self.sidecars_for(&r);
        let mut v = json!(r);
        if let Some(o) = v.as_object_mut() {
            o.remove("base_files");
            o.remove("candidate");
            o.insert(
                "stage_elapsed_seconds".into(),
                json!((elapsed * 10.0).round() / 10.0),
            );
            o.insert(
                "stage_remaining_seconds".into(),
                json!(remaining.map(|x| (x * 10.0).round() / 10.0)),
            );
            o.insert("sidecars".into(), sidecars);
        }
        Ok(json!({"rollout": v}))
    }

    /// Where the connected sidecars are with rollout `r`.
    fn sidecars_for(&self, r: &Rollout) -> serde_json::Value {
        let Ok(p) = self.proxies.lock() else {
            return json!(null);
        };
        let total = p.len();
        let shadowing = p.values().filter(|s| s.candidate_rollout == r.id).count();
        let rejected: Vec<String> = p
            .values()
            .filter_map(|s| {
                s.candidate_error
                    .as_ref()
                    .filter(|e| e.starts_with(&format!("rollout {}:", r.id)))
                    .map(|e| format!("{}: {e}", s.workload.as_deref().unwrap_or(&s.identity)))
            })
            .collect();
        let enforcing = r
            .enforced
            .map(|rev| p.values().filter(|s| s.acked_revision >= rev).count());
        json!({"connected": total, "shadowing": shadowing, "enforcing": enforcing, "rejected": rejected})
    }

    /// One step of every rollout's clock (the controller calls it every second).
    pub fn rollout_tick(&self, now: SystemTime) -> Result<Option<String>, Refused> {
        let _g = self.lock_rollouts()?;
        // Idle (the common case): nothing to read. This replica is the only writer.
        if self.rollout_idle.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(mut r) = self.active_rollout()? else {
            self.rollout_idle
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(None);
        };
        let elapsed = now.duration_since(at_ms(r.stage_ms)).unwrap_or_default();
        match r.stage {
            Stage::Shadow => {
                let status = self.sidecars_for(&r);
                if let Some(first) = status["rejected"].as_array().and_then(|a| a.first()) {
                    let why = format!(
                        "a sidecar cannot evaluate the candidate, so it would not enforce it either: {}",
                        first.as_str().unwrap_or("")
                    );
                    return self.end(r, Stage::Stopped, why, ACTOR, now).map(Some);
                }
                if elapsed < r.settings.bake {
                    return Ok(None);
                }
                let connected = status["connected"].as_u64().unwrap_or(0);
                let shadowing = status["shadowing"].as_u64().unwrap_or(0);
                if shadowing < connected && elapsed < r.settings.bake + r.settings.ack_timeout {
                    // Wait for the stragglers (up to `ackTimeout` past the bake).
                    return Ok(None);
                }
                let recs = self.window_records(r.stage_ms);
                r.gate = shadow_edges(&recs, r.id, &r.settings, &r.critical);
                if shadowing < connected {
                    let why = format!(
                        "{} of {connected} sidecars never evaluated the candidate (within the bake and {:?}): the shadow is incomplete; `meshward rollout promote` to enforce anyway, or `abort`",
                        connected - shadowing,
                        r.settings.ack_timeout
                    );
                    return self.hold(r, why, now).map(Some);
                }
                let held: Vec<&EdgeShadow> = r.gate.iter().filter(|e| e.held).collect();
                if !held.is_empty() {
                    let what: Vec<String> = held
                        .iter()
                        .map(|e| {
                            format!(
                                "{} → {}: {} of {} allowed requests ({}%){}",
                                e.source,
                                e.destination,
                                e.would_deny,
                                e.allowed,
                                e.would_deny_percent,
                                if e.critical { ", a critical edge" } else { "" }
                            )
                        })
                        .collect();
                    let why = format!(
                        "the candidate would deny requests allowed today (threshold {}%): {}",
                        r.settings.max_new_deny_percent,
                        what.join("; ")
                    );
                    return self.hold(r, why, now).map(Some);
                }
                if r.gate.iter().all(|e| e.requests == 0) {
                    let replayed = self.replay(&r, now)?;
                    let flips = replayed.allow_to_deny > 0;
                    let clean = format!(
                        "no traffic reached the affected sidecars during the bake; the recorded window ({} requests) replays {}",
                        replayed.requests,
                        if flips {
                            format!(
                                "with {} allowed requests denied: {}",
                                replayed.allow_to_deny,
                                replayed.flips.join("; ")
                            )
                        } else {
                            "clean".to_owned()
                        }
                    );
                    r.replayed = Some(replayed);
                    if flips || !r.allow_no_traffic {
                        let why = format!(
                            "{clean}; nothing live shows the change is safe: `meshward rollout promote` to enforce it (or start it with --allow-no-traffic), or `abort`"
                        );
                        return self.hold(r, why, now).map(Some);
                    }
                }
                self.enforce(r, ACTOR, now).map(Some)
            }
            Stage::Waiting => Ok(None),
            Stage::Watch => {
                let rev = r.enforced.unwrap_or(0);
                // Sidecars that rejected the enforced revision, or did not take it in time.
                let (rejected, stale) = match self.proxies.lock() {
                    Ok(p) => (
                        p.values()
                            .filter_map(|s| {
                                s.rejected
                                    .as_ref()
                                    .filter(|e| e.starts_with(&format!("revision {rev}:")))
                                    .map(|e| {
                                        format!(
                                            "{}: {e}",
                                            s.workload.as_deref().unwrap_or(&s.identity)
                                        )
                                    })
                            })
                            .collect::<Vec<_>>(),
                        p.values().filter(|s| s.acked_revision < rev).count(),
                    ),
                    Err(_) => (vec![], 0),
                };
                if let Some(first) = rejected.first() {
                    let why = format!("a sidecar rejected revision {rev}: {first}");
                    return self.roll_back(r, why, ACTOR, now).map(Some);
                }
                if stale > 0 && elapsed >= r.settings.ack_timeout {
                    let why = format!(
                        "{stale} sidecars did not acknowledge revision {rev} within {:?}",
                        r.settings.ack_timeout
                    );
                    return self.roll_back(r, why, ACTOR, now).map(Some);
                }
                let recs = self.window_records(r.stage_ms);
                r.watched = health(&recs, rev);
                let harm = harmed(&r.baseline, &r.watched, &r.settings);
                if !harm.is_empty() {
                    let why = format!(
                        "enforcement hurt edges that were healthy: {}",
                        harm.join("; ")
                    );
                    return self.roll_back(r, why, ACTOR, now).map(Some);
                }
                if elapsed >= r.settings.watch {
                    let why = format!(
                        "no healthy edge got worse in {:?} of enforcement",
                        r.settings.watch
                    );
                    return self.end(r, Stage::Promoted, why, ACTOR, now).map(Some);
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// The no-traffic fallback: the window before the rollout replayed against the
    /// candidate.
    fn replay(&self, r: &Rollout, _now: SystemTime) -> Result<Replayed, Refused> {
        let Some(set) = repo::load(&r.candidate).set else {
            return Ok(Replayed::default());
        };
        let engine = meshward_policy::engine::Engine::compile(&set);
        let since = r.started_ms - i64::try_from(REPLAY_HORIZON.as_millis()).unwrap_or(0);
        let mut replay = meshward_policy::impact::Replay::new(&engine, None);
        for (i, rec) in self.window_records(since).into_iter().enumerate() {
            if rec.candidate_rollout.is_none() && rec.direction == "inbound" {
                replay.add(i as u64 + 1, Ok(rec));
            }
        }
        let report = replay.finish();
        let mut by_edge: BTreeMap<(String, String), u64> = BTreeMap::new();
        for f in report.flips.iter().filter(|f| f.recorded == Verdict::Allow) {
            *by_edge
                .entry((f.source.clone(), f.destination.clone()))
                .or_default() += f.requests;
        }
        Ok(Replayed {
            requests: report.requests,
            allow_to_deny: report.allow_to_deny_requests,
            deny_to_allow: report.deny_to_allow_requests,
            flips: by_edge
                .into_iter()
                .map(|((s, d), n)| format!("{s} → {d}: {n}"))
                .collect(),
        })
    }

    fn hold(&self, mut r: Rollout, why: String, now: SystemTime) -> Result<String, Refused> {
        r.stage = Stage::Waiting;
        r.stage_ms = ms(now);
        r.why = Some(why.clone());
        let entry = NewEntry::new(
            ACTOR,
            "rollout.held",
            &format!("rollout/{}", r.id),
            json!({"why": why, "gate": r.gate, "replayed": r.replayed}),
        );
        self.save_rollout(&r, Some(entry), now)?;
        self.count_rollout("stopped");
        Ok(format!("rollout {} waits for an operator: {why}", r.id))
    }

    /// Commits the candidate (rebased onto the head) and starts the watch.
    fn enforce(&self, mut r: Rollout, actor: &str, now: SystemTime) -> Result<String, Refused> {
        let (head, files) = self.head_files()?;
        let rebased = match rebase(&r.base_files, &r.candidate, &files) {
            Ok(f) => f,
            Err(conflicts) => {
                let why = format!(
                    "the head moved to revision {head} and changed what the candidate changes ({}): abort and apply again",
                    conflicts.join(", ")
                );
                return self.hold(r, why, now);
            }
        };
        if let Err(e) = self.validate(&rebased, now) {
            let why = format!("the candidate rebased onto revision {head} is refused: {e}");
            return self.end(r, Stage::Stopped, why, actor, now);
        }
        // The watch's baseline: the edges' health under the revision being replaced (or
        // a later one an override made), over the bake and at least the last five
        // minutes.
        let horizon = r.settings.bake.max(BASELINE_HORIZON);
        let since = ms(now) - i64::try_from(horizon.as_millis()).unwrap_or(0);
        r.baseline = health(&self.window_records(since), r.base);
        let rev = if repo::changes(&files, &rebased).is_empty() {
            head
        } else {
            self.commit(
                &format!("operator:{}", r.author),
                &format!("rollout {}: {}", r.id, r.reason),
                &r.summary,
                &rebased,
                NewEntry::new(
                    actor,
                    "rollout.enforced",
                    &format!("rollout/{}", r.id),
                    json!({"summary": r.summary, "author": r.author, "gate": r.gate, "replayed": r.replayed, "waited": r.why}),
                ),
                now,
            )?
            .rev
        };
        r.enforced = Some(rev);
        r.stage = Stage::Watch;
        r.stage_ms = ms(now);
        r.why = None;
        self.save_rollout(&r, None, now)?;
        self.count_rollout("enforced");
        Ok(format!("rollout {} enforced as revision {rev}", r.id))
    }

    /// Commits a revision that restores what the candidate changed, and ends the rollout.
    fn roll_back(
        &self,
        mut r: Rollout,
        why: String,
        actor: &str,
        now: SystemTime,
    ) -> Result<String, Refused> {
        let (_, files) = self.head_files()?;
        let restored = revert(&r.base_files, &r.candidate, &files);
        let rev = self
            .commit(
                ACTOR,
                &format!("rollout {} rolled back: {why}", r.id),
                &format!("rollback of rollout {}: {}", r.id, r.summary),
                &restored,
                NewEntry::new(
                    actor,
                    "rollout.rolled_back",
                    &format!("rollout/{}", r.id),
                    json!({"why": why, "enforced": r.enforced, "baseline": r.baseline, "watched": r.watched}),
                ),
                now,
            )?
            .rev;
        self.metrics.rollbacks.inc();
        r.rolled_back_to = Some(rev);
        r.stage = Stage::RolledBack;
        r.why = Some(why.clone());
        r.ended_ms = Some(ms(now));
        r.stage_ms = ms(now);
        self.save_rollout(&r, None, now)?;
        self.count_rollout("rolled_back");
        Ok(format!(
            "rollout {} rolled back (revision {rev}): {why}",
            r.id
        ))
    }

    /// Ends `r` in `stage` (promoted, stopped, aborted), audited with why.
    fn end(
        &self,
        mut r: Rollout,
        stage: Stage,
        why: String,
        actor: &str,
        now: SystemTime,
    ) -> Result<String, Refused> {
        r.stage = stage;
        r.why = Some(why.clone());
        r.ended_ms = Some(ms(now));
        r.stage_ms = ms(now);
        let entry = NewEntry::new(
            actor,
            &format!("rollout.{}", stage.as_str()),
            &format!("rollout/{}", r.id),
            json!({"why": why, "enforced": r.enforced, "gate": r.gate, "baseline": r.baseline, "watched": r.watched}),
        );
        self.save_rollout(&r, Some(entry), now)?;
        self.count_rollout(stage.as_str());
        Ok(format!("rollout {} {}: {why}", r.id, stage.as_str()))
    }

    /// The running rollout, if `op` may `verb` it: whoever may make the change; for a
    /// change that needed a second approval, platform-security only.
    fn operators_rollout(&self, op: &Operator, verb: &str) -> Result<Rollout, Refused> {
        let r = self
            .active_rollout()?
            .ok_or_else(|| Refused::NotFound("no rollout is running".into()))?;
        if self.authorize(op, &r.base_files, &r.candidate)? && !op.is_platform_security() {
            return Err(Refused::Forbidden(format!(
                "`{}` may not {verb} rollout {}: it changes what only platform-security may",
                op.name, r.id
            )));
        }
        Ok(r)
    }

    /// The operator's say: in shadow or waiting, enforce now (the watch still follows);
    /// in the watch, promote now. The operator must be allowed to make the change.
    pub fn promote_rollout(
        &self,
        op: &Operator,
        reason: &str,
        now: SystemTime,
    ) -> Result<String, Refused> {
        let result = self.promote_inner(op, reason, now);
        self.audited(op, "rollout.promote_rejected", "rollout", now, result)
    }

    fn promote_inner(
        &self,
        op: &Operator,
        reason: &str,
        now: SystemTime,
    ) -> Result<String, Refused> {
        require_reason(reason)?;
        let _g = self.lock_rollouts()?;
        let mut r = self.operators_rollout(op, "promote")?;
        let actor = op.actor();
        if r.stage == Stage::Watch {
            return self.end(
                r,
                Stage::Promoted,
                format!("promoted by {}: {reason}", op.name),
                &actor,
                now,
            );
        }
        if r.stage == Stage::Shadow {
            r.gate = shadow_edges(
                &self.window_records(r.stage_ms),
                r.id,
                &r.settings,
                &r.critical,
            );
        }
        r.why = Some(format!("{} promoted past the gate: {reason}", op.name));
        self.enforce(r, &actor, now)
    }

    /// Ends a rollout: before enforcement nothing was enforced; in the watch the change
    /// is rolled back.
    pub fn abort_rollout(
        &self,
        op: &Operator,
        reason: &str,
        now: SystemTime,
    ) -> Result<String, Refused> {
        let result = (|| {
            require_reason(reason)?;
            let _g = self.lock_rollouts()?;
            let r = self.operators_rollout(op, "abort")?;
            let why = format!("aborted by {}: {reason}", op.name);
            if r.stage == Stage::Watch {
                return self.roll_back(r, why, &op.actor(), now);
            }
            self.end(r, Stage::Aborted, why, &op.actor(), now)
        })();
        self.audited(op, "rollout.abort_rejected", "rollout", now, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(list: &[(&str, &str)]) -> Files {
        list.iter()
            .map(|(a, b)| ((*a).into(), (*b).into()))
            .collect()
    }

    #[test]
    fn rebase_applies_the_candidates_changes_onto_a_moved_head_and_revert_undoes_them() {
        let base = f(&[("a", "1"), ("b", "1"), ("gone", "x")]);
        let cand = f(&[("a", "2"), ("b", "1"), ("new", "n")]);
        // An override committed meanwhile (file o) and b changed by the detector.
        let head = f(&[("a", "1"), ("b", "9"), ("gone", "x"), ("o", "ov")]);
        let r = rebase(&base, &cand, &head).unwrap();
        assert_eq!(r, f(&[("a", "2"), ("b", "9"), ("o", "ov"), ("new", "n")]));
        assert_eq!(
            revert(&base, &cand, &r),
            f(&[("a", "1"), ("b", "9"), ("o", "ov"), ("gone", "x")])
        );
        // The head changed a file the candidate changes too: a conflict.
        let head = f(&[("a", "7"), ("b", "1"), ("gone", "x")]);
        assert_eq!(rebase(&base, &cand, &head), Err(vec!["a".to_owned()]));
    }

    fn rec(v: serde_json::Value) -> DecisionRecord {
        let mut base = json!({"ts": "2026-12-06T10:00:00.000Z", "source": "spiffe://t/ns/web/sa/frontend",
            "destination": "orders/orders", "port": 80, "verdict": "allow", "reason": "allowed_by_rule", "decision_ns": 1});
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn the_gate_holds_an_edge_over_its_threshold_or_critical() {
        let s = RolloutSettings {
            max_new_deny_percent: 10.0,
            ..Default::default()
        };
        let mut recs = vec![];
        // 19 allowed (one record weighing 18, one that flips), on the frontend edge.
        recs.push(rec(
            json!({"candidate_rollout": 3, "candidate_verdict": "allow", "weight": 18}),
        ));
        recs.push(rec(json!({"candidate_rollout": 3, "candidate_verdict": "deny", "candidate_reason": "no_allow_at_tier", "method": "GET", "path": "/x"})));
        // Another rollout's and a record with no candidate: not counted.
        recs.push(rec(
            json!({"candidate_rollout": 2, "candidate_verdict": "deny"}),
        ));
        recs.push(rec(json!({})));
        let e = shadow_edges(&recs, 3, &s, &[]);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].allowed, e[0].would_deny, e[0].would_deny_percent),
            (19, 1, 5.3)
        );
        assert!(!e[0].held, "5.3% is under 10%");
        assert_eq!(
            e[0].example.as_deref(),
            Some("GET /x (port 80): no_allow_at_tier")
        );
        let crit = [(
            "spiffe://t/ns/web/sa/frontend".to_owned(),
            "orders/orders".to_owned(),
        )];
        let e = shadow_edges(&recs, 3, &s, &crit);
        assert!(
            e[0].critical && e[0].held,
            "any new deny on a critical edge holds"
        );
    }

    #[test]
    fn harm_is_a_rise_on_an_edge_that_was_healthy() {
        let s = RolloutSettings::default();
        let ok: Vec<DecisionRecord> = (0..10).map(|_| rec(json!({"status": 200}))).collect();
        let base = health(&ok, 0);
        let mut bad: Vec<DecisionRecord> = (0..6)
            .map(|_| rec(json!({"status": 503, "revision": 5})))
            .collect();
        bad.extend((0..4).map(|_| rec(json!({"status": 200, "revision": 5}))));
        let now = health(&bad, 5);
        let h = harmed(&base, &now, &s);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h[0].contains("5xx rate 60% (was 0%"), "{h:?}");
        // Records of the earlier revision do not count; too few requests neither.
        assert!(harmed(&base, &health(&bad, 6), &s).is_empty());
        assert!(harmed(&base, &health(&bad[..3], 5), &s).is_empty());
        // An edge that was failing entirely is not judged.
        let failing = health(&bad[..6], 0);
        assert!(harmed(&failing, &now, &s).is_empty());
    }
}
