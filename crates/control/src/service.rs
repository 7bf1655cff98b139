//! The control plane's operations, independent of transport: apply, approve, rollback,
//! history, audit, join tokens, certificate signing, overrides and their expiry. Every
//! operation that changes something, and every refusal, is audited.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshward_identity::ca::{Ca, CaLifetimes, Issued};
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_policy::diag::{self, Diagnostic};
use meshward_policy::engine::Engine;
use meshward_policy::scope::{self, Reach};
use meshward_policy::{lint, scenario};
use serde::Serialize;
use serde_json::json;

use crate::auth::{Operator, Operators, random_secret, sha256_hex};
use crate::repo::{self, Change, Key};
use crate::store::{
    AuditFilter, Files, NewEntry, Proposal, Revision, Store, StoreError, TokenRecord, ms,
};

pub mod detector;
pub mod rollout;

/// Why an operation was refused. Each maps to an HTTP status in the API.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The rendered diagnostics, and the diagnostics themselves (for `--output json`).
    #[error("the policy set is invalid:\n{0}")]
    Invalid(String, Vec<Diagnostic>),
    #[error("policy tests fail:\n{0}")]
    TestsFail(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// Another change is under way (a progressive rollout).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// The outcome of an apply.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Applied {
    /// Committed as this revision.
    Committed {
        revision: u64,
        summary: String,
        /// Resources of kinds that are accepted but not enforced yet (lint MW315).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        not_enforced: Vec<String>,
    },
    /// Waiting for a second platform-security operator: `meshward approve ID`.
    PendingApproval {
        proposal: u64,
        summary: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        not_enforced: Vec<String>,
    },
    /// Nothing to change.
    Unchanged { revision: u64 },
    /// `apply --progressive`: the candidate is in shadow (docs/rollout.md).
    RolloutStarted {
        rollout: u64,
        summary: String,
        bake_seconds: f64,
        watch_seconds: f64,
    },
}

/// Configuration of a control plane.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    /// Default workload certificate lifetime (the `Mesh` may set another).
    pub default_lifetime: Duration,
    /// Longest join-token lifetime.
    pub max_token_ttl: Duration,
}

/// The control plane.
pub struct ControlPlane {
    pub store: Arc<dyn Store>,
    ca: std::sync::RwLock<Ca>,
    operators: std::sync::RwLock<(Operators, Option<OperatorsFile>)>,
    cfg: Config,
    /// The head revision; every commit publishes here, config streams listen.
    head: tokio::sync::watch::Sender<u64>,
    /// Connected proxies by stream id.
    proxies: Mutex<std::collections::BTreeMap<u64, ProxyState>>,
    next_proxy: std::sync::atomic::AtomicU64,
    /// Workloads whose own sidecar said it is not ready, and why (in memory: after a
    /// restart every sidecar says it again with its first acknowledgement).
    readiness: Mutex<std::collections::BTreeMap<String, String>>,
    /// Bumped on every readiness change; config streams listen.
    readiness_gen: tokio::sync::watch::Sender<u64>,
    /// Bumped on every change of the progressive rollout; config streams listen.
    rollout_gen: tokio::sync::watch::Sender<u64>,
    /// One rollout transition at a time.
    rollout_lock: Mutex<()>,
    /// No rollout runs (known once the store was read): the clock's tick reads nothing.
    rollout_idle: std::sync::atomic::AtomicBool,
    tls_bundles: Option<meshward_identity::verifier::SharedBundles>,
    /// Snapshots of the head revision (and rollout generation) by identity.
    snapshots: Mutex<SnapshotCache>,
    pub metrics: Arc<meshward_telemetry::ControlMetrics>,
    /// Decision records shipped by proxies (a bounded window).
    decisions: Option<Arc<crate::decisions::DecisionWindow>>,
    /// The latest certificate this replica issued per identity: when it expires.
    issued: Mutex<std::collections::BTreeMap<String, SystemTime>>,
    /// Anomaly detection's memory ([`detector`]).
    detector: Mutex<detector::State>,
    /// The data directory's space (a full disk keeps renewals going: [`crate::disk`]).
    pub disk: Option<Arc<crate::disk::Disk>>,
}

/// Snapshots by identity, for one (head revision, rollout generation).
type SnapshotCache = (
    (u64, u64),
    std::collections::HashMap<SpiffeId, Arc<Snapshot>>,
);

/// What one proxy identity receives at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub workloads: Vec<String>,
    pub files: Files,
    /// A progressive rollout's candidate in shadow: `(rollout, files)`, selected as
    /// `files` are.
    pub candidate: Option<(u64, Files)>,
}

/// What `meshward ca rotate` rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rotation {
    Intermediate,
    RootBegin,
    RootFinish,
}

/// The operators file and the modification time last read.
type OperatorsFile = (PathBuf, Option<SystemTime>);

/// What the control plane knows of one connected proxy.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyState {
    pub identity: String,
    pub workloads: Vec<String>,
    pub connected_ms: i64,
    /// The revision the proxy acknowledged last (0: none yet).
    pub acked_revision: u64,
    /// The revision last sent.
    pub sent_revision: u64,
    /// Why the proxy rejected its last snapshot, if it did.
    pub rejected: Option<String>,
    /// Enforced but not saved by the proxy (why): its restart without the control plane
    /// would enforce an older revision.
    pub not_persisted: Option<String>,
    pub last_seen_ms: i64,
    /// The workload it serves, as it says (one of its identity's).
    pub workload: Option<String>,
    /// The certificate it presents now, as it says (after each renewal).
    pub certificate: Option<HeldCertificate>,
    /// The rollout whose candidate it evaluates in shadow (0: none), and why it could not
    /// take the one it was sent.
    pub candidate_rollout: u64,
    pub candidate_error: Option<String>,
}

/// A certificate a proxy holds.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HeldCertificate {
    pub serial: String,
    #[serde(serialize_with = "rfc3339")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub not_after: SystemTime,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("cfg", &self.cfg)
            .finish()
    }
}

fn render(diags: &[Diagnostic], loaded: &meshward_policy::model::Loaded) -> String {
    diag::render_text(diags, &loaded.sources)
}

impl ControlPlane {
    pub fn new(store: Arc<dyn Store>, ca: Ca, operators: Operators, cfg: Config) -> Self {
        let head = store.head().ok().flatten().map_or(0, |r| r.rev);
        ControlPlane {
            store,
            ca: std::sync::RwLock::new(ca),
            operators: std::sync::RwLock::new((operators, None)),
            cfg,
            head: tokio::sync::watch::channel(head).0,
            proxies: Mutex::new(std::collections::BTreeMap::new()),
            next_proxy: std::sync::atomic::AtomicU64::new(1),
            readiness: Mutex::new(std::collections::BTreeMap::new()),
            readiness_gen: tokio::sync::watch::channel(0).0,
            rollout_gen: tokio::sync::watch::channel(0).0,
            rollout_lock: Mutex::new(()),
            rollout_idle: std::sync::atomic::AtomicBool::new(false),
            snapshots: Mutex::new(((u64::MAX, 0), std::collections::HashMap::new())),
            tls_bundles: None,
            metrics: Arc::default(),
            decisions: None,
            issued: Mutex::default(),
            detector: Mutex::default(),
            disk: None,
        }
    }

    /// Watches the data directory's space ([`crate::disk`]): `store` must be the
    /// [`crate::disk::GuardedStore`] around the same `disk`.
    pub fn with_disk(mut self, disk: Arc<crate::disk::Disk>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// The disk-full condition, if the disk is full.
    pub fn disk_condition(&self) -> Option<String> {
        self.disk.as_ref().and_then(|d| d.condition())
    }

    /// While the disk is full: ends the state once space is back.
    pub fn check_disk(&self) {
        if let Some(d) = &self.disk {
            d.check(self.store.as_ref());
        }
    }

    /// Opens (creating on first start) the CA in `DATA/ca`.
    pub fn open_ca(dir: &Path, td: &TrustDomain, now: SystemTime) -> Result<Ca, String> {
        let ca_dir = dir.join("ca");
        if ca_dir.join("root.pem").exists() {
            Ca::load(&ca_dir, td.clone(), CaLifetimes::default(), now).map_err(|e| e.to_string())
        } else {
            let ca =
                Ca::generate(td.clone(), CaLifetimes::default(), now).map_err(|e| e.to_string())?;
            ca.save(&ca_dir).map_err(|e| e.to_string())?;
            Ok(ca)
        }
    }

    /// Reloads operators from this file whenever it changes (`meshward operator add`).
    pub fn with_operators_file(self, path: PathBuf) -> Self {
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if let Ok(mut g) = self.operators.write() {
            g.1 = Some((path, mtime));
        }
        self
    }

    /// The operators, re-read if their file changed.
    pub fn operators(&self) -> Operators {
        self.operators_reloaded(false)
    }

    /// The operators; `force` re-reads the file even if its modification time looks
    /// unchanged (two writes within one clock tick share a time).
    pub fn operators_reloaded(&self, force: bool) -> Operators {
        let stale = self.operators.read().ok().and_then(|g| {
            let (path, seen) = g.1.clone()?;
            let now = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            (force || now != seen).then_some((path, now))
        });
        if let Some((path, mtime)) = stale
            && let (Ok(ops), Ok(mut g)) = (Operators::load(&path), self.operators.write())
        {
            *g = (ops, Some((path, mtime)));
        }
        self.operators
            .read()
            .map(|g| g.0.clone())
            .unwrap_or_default()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    fn ca(&self) -> Result<std::sync::RwLockReadGuard<'_, Ca>, Refused> {
        self.ca
            .read()
            .map_err(|_| Refused::Internal("the CA is unavailable".into()))
    }

    fn ca_mut(&self) -> Result<std::sync::RwLockWriteGuard<'_, Ca>, Refused> {
        self.ca
            .write()
            .map_err(|_| Refused::Internal("the CA is unavailable".into()))
    }

    /// Runs `f` with the CA (read access: signing).
    pub fn with_ca<T>(&self, f: impl FnOnce(&Ca) -> T) -> Result<T, Refused> {
        let ca = self.ca()?;
        Ok(f(&ca))
    }

    /// Commits and tells every config stream.
    fn commit(
        &self,
        author: &str,
        reason: &str,
        summary: &str,
        files: &Files,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<Revision, Refused> {
        let r = self
            .store
            .commit(author, reason, summary, files, entry, now)?;
        self.head.send_replace(r.rev);
        Ok(r)
    }

    /// Follows the head revision.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// The trust bundle (roots).
    pub fn bundle(&self) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Refused> {
        Ok(self.ca()?.bundle())
    }

    fn head_files(&self) -> Result<(u64, Files), Refused> {
        Ok(self
            .store
            .head()?
            .map(|r| (r.rev, r.files))
            .unwrap_or((0, vec![])))
    }

    /// Validates a candidate set: load and lint errors, then PolicyTests. Returns the
    /// rendered reason on refusal.
    fn validate(&self, files: &Files, now: SystemTime) -> Result<(), Refused> {
        let loaded = repo::load(files);
        let diags = lint::errors(&loaded, now);
        if !diags.is_empty() {
            return Err(Refused::Invalid(render(&diags, &loaded), diags));
        }
        let Some(set) = &loaded.set else {
            return Err(Refused::Invalid(
                "the policy set could not be built".into(),
                vec![],
            ));
        };
        if set.mesh.trust_domain != self.cfg.trust_domain {
            return Err(Refused::Invalid(
                format!(
                    "the Mesh's trust domain `{}` is not this control plane's `{}`",
                    set.mesh.trust_domain, self.cfg.trust_domain
                ),
                vec![],
            ));
        }
        let results = scenario::run(set, &Engine::compile(set), now);
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| format!("{} :: {}: {}", r.test, r.name, r.failures.join("; ")))
            .collect();
        if !failed.is_empty() {
            let passed = results.len() - failed.len();
            return Err(Refused::TestsFail(format!(
                "{}\n{passed} passed, {} failed",
                failed.join("\n"),
                failed.len()
            )));
        }
        Ok(())
    }

    /// Checks that `op` may make every change; returns whether approval is needed.
    ///
    /// A change is authorized by everything it reaches (`meshward_policy::scope`), in the
    /// set before and in the set after it: the namespace it lives in, every namespace it
    /// targets or selects, and — for a workload whose attributes change — what every policy
    /// that reads those attributes of its callers reaches. Reaching every namespace (the
    /// `Mesh`, federations, baseline policies, unconfined targets) needs platform-security
    /// and a second platform-security operator's approval.
    fn authorize(&self, op: &Operator, old: &Files, new: &Files) -> Result<bool, Refused> {
        let changes = repo::changes(old, new);
        if changes.is_empty() {
            return Ok(false);
        }
        let (old_set, new_set) = (repo::load(old).set, repo::load(new).set);
        let mut needs_approval = false;
        for (change, key, before, after) in changes {
            let verb = match change {
                Change::Added => "add",
                Change::Removed => "remove",
                Change::Modified => "change",
            };
            let mut reach = Reach::namespace(&key.namespace);
            let mut via: Vec<String> = vec![];
            for (set, present) in [(&old_set, before.is_some()), (&new_set, after.is_some())] {
                if present {
                    // A resource the set could not build reaches everything (fail closed).
                    let r = set
                        .as_ref()
                        .and_then(|s| scope::resource(s, &key.kind, &key.namespace, &key.name))
                        .unwrap_or(Reach::Mesh);
                    reach = reach.union(r);
                }
            }
            if key.kind == "Workload" {
                let keys = changed_attributes(old_set.as_ref(), new_set.as_ref(), &key);
                for set in [&old_set, &new_set].into_iter().flatten() {
                    for (reader, r) in scope::attribute_readers(set, &keys) {
                        if !r.beyond(&key.namespace).is_some_and(|v| v.is_empty()) {
                            via.push(reader);
                            reach = reach.union(r);
                        }
                    }
                }
                via.sort();
                via.dedup();
            }
            let because = if via.is_empty() {
                String::new()
            } else {
                let keys: Vec<String> =
                    changed_attributes(old_set.as_ref(), new_set.as_ref(), &key)
                        .into_iter()
                        .map(|k| format!("`{k}`"))
                        .collect();
                format!(
                    " (its attributes {} are read by {})",
                    keys.join(", "),
                    via.join(", ")
                )
            };
            match &reach {
                Reach::Mesh => {
                    if !op.is_platform_security() {
                        let what = match key.kind.as_str() {
                            "Mesh" | "TrustDomainFederation" => "it is mesh-wide".to_owned(),
                            "AuthorizationPolicy"
                                if [&before, &after].into_iter().flatten().any(|r| {
                                    r.tier.as_deref() == Some("baseline")
                                }) =>
                            {
                                "it is a baseline policy".to_owned()
                            }
                            _ if !because.is_empty() => format!("it reaches every namespace{because}"),
                            _ => "it reaches every namespace (its target or subject names no workload, service or namespace)".to_owned(),
                        };
                        return Err(Refused::Forbidden(format!(
                            "`{}` may not {verb} {key}: {what}; mesh-wide resources (Mesh, federations, baseline policies, unconfined targets) belong to the platform-security role and need a second approval",
                            op.name
                        )));
                    }
                    needs_approval = true;
                }
                Reach::Namespaces(ns) => {
                    let missing: Vec<String> = ns
                        .iter()
                        .filter(|n| !op.owns(n))
                        .map(|n| format!("`{n}`"))
                        .collect();
                    if !missing.is_empty() {
                        let reaches = if missing.len() == 1 && ns.len() == 1 {
                            String::new()
                        } else {
                            format!(" (it reaches {reach}{because})")
                        };
                        return Err(Refused::Forbidden(format!(
                            "`{}` may not {verb} {key}: it does not own namespace {}{reaches}",
                            op.name,
                            missing.join(", ")
                        )));
                    }
                }
            }
        }
        Ok(needs_approval)
    }

    fn audit_refusal(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        why: &Refused,
        now: SystemTime,
    ) {
        let _ = self.store.append_audit(
            NewEntry::new(actor, action, subject, json!({"reason": why.to_string()})),
            now,
        );
    }

    /// Validates, authorizes and commits a new policy set (or files it for approval).
    /// A refused apply leaves the store as it was, except for the audit entry saying why.
    pub fn apply(
        &self,
        op: &Operator,
        files: Files,
        reason: &str,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let result = self.apply_inner(op, files, reason, now);
        if let Err(e) = &result {
            self.audit_refusal(&op.actor(), "apply.rejected", "policy-set", e, now);
        }
        let outcome = match &result {
            Ok(Applied::Committed { .. }) => "applied",
            Ok(Applied::PendingApproval { .. }) => "pending_approval",
            Ok(_) => "unchanged",
            Err(_) => "refused",
        };
        self.metrics
            .applies
            .get_or_create(&meshward_telemetry::ResultLabels { result: outcome })
            .inc();
        result
    }

    fn apply_inner(
        &self,
        op: &Operator,
        files: Files,
        reason: &str,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        require_reason(reason)?;
        self.refuse_during_rollout()?;
        // A set that does not parse is refused before anything else, with the diagnostics
        // `meshward policy lint` prints: what it would change cannot even be read.
        let loaded = repo::load(&files);
        if loaded
            .diagnostics
            .iter()
            .any(|d| d.is_error() && d.code.starts_with("MW1"))
        {
            let diags = lint::errors(&loaded, now);
            return Err(Refused::Invalid(render(&diags, &loaded), diags));
        }
        self.change(op, files, reason, None, now)
    }

    /// Authorizes, validates and commits (or files for approval) a new set: an apply, or a
    /// rollback to revision `rollback_to`. The same ownership and two-person rules hold for
    /// both.
    fn change(
        &self,
        op: &Operator,
        files: Files,
        reason: &str,
        rollback_to: Option<u64>,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let (base, old) = self.head_files()?;
        let mut summary = repo::summary(&old, &files);
        if repo::changes(&old, &files).is_empty() && base > 0 {
            return Ok(Applied::Unchanged { revision: base });
        }
        // Permissions first: an operator learns nothing about a change it may not make.
        let needs_approval = self.authorize(op, &old, &files)?;
        self.validate(&files, now)?;
        let not_enforced = not_enforced(&files);
        let (action, subject) = match rollback_to {
            Some(to) => {
                summary = format!("rollback to {to}: {summary}");
                ("rollback", format!("revision/{to}"))
            }
            None => ("apply", "policy-set".to_owned()),
        };
        if needs_approval {
            let p = Proposal {
                id: 0,
                created_ms: ms(now),
                author: op.name.clone(),
                reason: reason.into(),
                summary: summary.clone(),
                base,
                files,
            };
            let id = self.store.propose(
                &p,
                NewEntry::new(
                    &op.actor(),
                    &format!("{action}.proposed"),
                    &subject,
                    json!({"summary": summary, "reason": reason}),
                ),
                now,
            )?;
            return Ok(Applied::PendingApproval {
                proposal: id,
                summary,
                not_enforced,
            });
        }
        let rev = self.commit(
            &op.actor(),
            reason,
            &summary,
            &files,
            NewEntry::new(
                &op.actor(),
                action,
                &subject,
                json!({"summary": summary, "reason": reason}),
            ),
            now,
        )?;
        if rollback_to.is_some() {
            self.metrics.rollbacks.inc();
        }
        Ok(Applied::Committed {
            revision: rev.rev,
            summary,
            not_enforced,
        })
    }

    /// Approves and commits a pending change (a second platform-security operator).
    pub fn approve(&self, op: &Operator, id: u64, now: SystemTime) -> Result<Applied, Refused> {
        let p = self
            .store
            .proposal(id)?
            .ok_or_else(|| Refused::NotFound(format!("no pending change {id}")))?;
        let refuse = |e: Refused| {
            self.audit_refusal(
                &op.actor(),
                "approve.rejected",
                &format!("proposal/{id}"),
                &e,
                now,
            );
            Err(e)
        };
        if let Err(e) = self.refuse_during_rollout() {
            return refuse(e);
        }
        if !op.is_platform_security() {
            return refuse(Refused::Forbidden(format!(
                "`{}` may not approve: approvals need the platform-security role",
                op.name
            )));
        }
        if op.name == p.author {
            return refuse(Refused::Forbidden(format!(
                "`{}` proposed change {id} and cannot also approve it",
                op.name
            )));
        }
        let (base, old) = self.head_files()?;
        if base != p.base {
            self.store.drop_proposal(id)?;
            return refuse(Refused::BadRequest(format!(
                "change {id} was made against revision {} but the head is now {base}; apply it again",
                p.base
            )));
        }
        if let Err(e) = self.validate(&p.files, now) {
            return refuse(e);
        }
        // Filed by `apply --progressive`: the approval starts its rollout.
        match self.progressive_proposal(id) {
            Ok(Some(opts)) => {
                return self.begin_approved(op, &p, &opts, now).or_else(refuse);
            }
            Ok(None) => {}
            Err(e) => return refuse(e),
        }
        let summary = repo::summary(&old, &p.files);
        let rev = self.commit(
            &format!("operator:{}", p.author),
            &p.reason,
            &summary,
            &p.files,
            NewEntry::new(&op.actor(), "apply.approved", "policy-set", json!({"summary": summary, "proposal": id, "author": p.author, "approver": op.name})),
            now,
        )?;
        self.store.drop_proposal(id)?;
        Ok(Applied::Committed {
            revision: rev.rev,
            summary,
            not_enforced: not_enforced(&p.files),
        })
    }

    /// A new revision equal to an earlier one: a change like any other, authorized by what
    /// it changes (a rollback across a baseline change waits for a second approval), with a
    /// reason.
    pub fn rollback(
        &self,
        op: &Operator,
        to: u64,
        reason: &str,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let result = require_reason(reason).and_then(|()| {
            self.refuse_during_rollout()?;
            let target = self
                .store
                .revision(to)
                .map_err(|_| Refused::NotFound(format!("revision {to} does not exist")))?;
            self.change(op, target.files, reason, Some(to), now)
        });
        if let Err(e) = &result {
            self.audit_refusal(
                &op.actor(),
                "rollback.rejected",
                &format!("revision/{to}"),
                e,
                now,
            );
        }
        result
    }

    pub fn history(&self) -> Result<Vec<Revision>, Refused> {
        Ok(self.store.history()?)
    }

    pub fn revision(&self, rev: u64) -> Result<Revision, Refused> {
        self.store
            .revision(rev)
            .map_err(|_| Refused::NotFound(format!("revision {rev} does not exist")))
    }

    // -- identities -------------------------------------------------------------------------

    /// Issues a single-use join token bound to one workload identity; only its hash is kept.
    pub fn issue_token(
        &self,
        op: &Operator,
        identity: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(String, SystemTime), Refused> {
        let id = SpiffeId::parse(identity)
            .map_err(|e| Refused::BadRequest(format!("`{identity}` is not a SPIFFE ID: {e}")))?;
        let parts = id.workload_parts().ok_or_else(|| {
            Refused::BadRequest(format!(
                "`{id}` is not a workload identity `spiffe://TD/ns/NS/sa/SA`"
            ))
        })?;
        if id.trust_domain_name() != self.cfg.trust_domain.as_str() {
            return Err(Refused::BadRequest(format!(
                "`{id}` is not in trust domain `{}`",
                self.cfg.trust_domain
            )));
        }
        if !op.owns(parts.namespace) {
            let e = Refused::Forbidden(format!(
                "`{}` may not issue tokens for namespace `{}`",
                op.name, parts.namespace
            ));
            self.audit_refusal(&op.actor(), "token.refused", id.as_str(), &e, now);
            return Err(e);
        }
        if ttl.is_zero() || ttl > self.cfg.max_token_ttl {
            return Err(Refused::BadRequest(format!(
                "a token lifetime must be between 1s and {}",
                humantime::format_duration(self.cfg.max_token_ttl)
            )));
        }
        let token = random_secret("mwj_");
        if token.is_empty() {
            return Err(Refused::Internal(
                "the system random generator failed".into(),
            ));
        }
        let expires = now + ttl;
        let rec = TokenRecord {
            identity: id.to_string(),
            expires_ms: ms(expires),
            used_ms: None,
            created_by: op.name.clone(),
        };
        self.store.add_token(
            &sha256_hex(&token),
            &rec,
            NewEntry::new(
                &op.actor(),
                "token.issue",
                id.as_str(),
                json!({"expires_ms": ms(expires)}),
            ),
            now,
        )?;
        Ok((token, expires))
    }

    fn lifetime(&self, requested: Option<Duration>) -> Result<Duration, Refused> {
        let head_lifetime = self
            .store
            .head()?
            .and_then(|r| {
                repo::load(&r.files)
                    .set
                    .map(|s| s.mesh.certificate_lifetime)
            })
            .unwrap_or(self.cfg.default_lifetime);
        match requested {
            None => Ok(head_lifetime),
            Some(l) if l <= head_lifetime => Ok(l),
            Some(l) => Err(Refused::BadRequest(format!(
                "a lifetime of {} is longer than the mesh allows ({})",
                humantime::format_duration(l),
                humantime::format_duration(head_lifetime)
            ))),
        }
    }

    /// Signs a CSR for the identity a join token is bound to; the token is spent.
    pub fn sign_with_token(
        &self,
        token: &str,
        csr_der: &[u8],
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<Issued, Refused> {
        let refuse = |why: String, subject: &str| {
            self.metrics.certificates_refused.inc();
            let e = Refused::Forbidden(why);
            self.audit_refusal("anonymous", "token.refused", subject, &e, now);
            Err(e)
        };
        // What would make the CA refuse is checked before the token is spent.
        let l = self.lifetime(lifetime)?;
        if !(meshward_identity::ca::MIN_LIFETIME..=meshward_identity::ca::MAX_LIFETIME).contains(&l)
        {
            return refuse(
                format!(
                    "the mesh's certificateLifetime {} is outside what the CA issues; the token was not spent",
                    humantime::format_duration(l)
                ),
                "token",
            );
        }
        let Some(rec) = self.store.use_token(&sha256_hex(token), now)? else {
            return refuse("unknown join token".into(), "token");
        };
        if let Some(used) = rec.used_ms {
            return refuse(
                format!(
                    "the join token for `{}` was already used (at {used} ms); tokens are single-use",
                    rec.identity
                ),
                &rec.identity,
            );
        }
        if rec.expires_ms <= ms(now) {
            return refuse(
                format!("the join token for `{}` has expired", rec.identity),
                &rec.identity,
            );
        }
        let id = SpiffeId::parse(&rec.identity).map_err(|e| Refused::Internal(e.to_string()))?;
        let _ = self.store.append_audit(
            NewEntry::new(id.as_str(), "token.use", id.as_str(), json!({})),
            now,
        );
        self.sign(&id, csr_der, lifetime, now)
    }

    /// Signs a CSR for an identity proven by its current, valid SVID (renewal): the
    /// identity never changes.
    pub fn renew(
        &self,
        proven: &SpiffeId,
        csr_der: &[u8],
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<Issued, Refused> {
        if proven.workload_parts().is_none() {
            return Err(Refused::Forbidden(format!(
                "`{proven}` is not a workload identity"
            )));
        }
        self.sign(proven, csr_der, lifetime, now)
    }

    fn sign(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<Issued, Refused> {
        let lifetime = match self.lifetime(lifetime) {
            Ok(l) => l,
            Err(e) => {
                self.metrics.certificates_refused.inc();
                self.audit_refusal(id.as_str(), "svid.refused", id.as_str(), &e, now);
                return Err(e);
            }
        };
        let issued = self.ca()?.issue(id, csr_der, lifetime, now);
        match issued {
            Ok(i) => {
                self.store.append_audit(
                    NewEntry::new(
                        id.as_str(),
                        "svid.issue",
                        id.as_str(),
                        json!({"not_after_ms": ms(i.not_after)}),
                    ),
                    now,
                )?;
                self.metrics.certificates_issued.inc();
                if let Ok(mut m) = self.issued.lock() {
                    m.insert(id.to_string(), i.not_after);
                }
                Ok(i)
            }
            Err(e) => {
                self.metrics.certificates_refused.inc();
                let r = Refused::Forbidden(format!("the CA refused: {e}"));
                self.audit_refusal(id.as_str(), "svid.refused", id.as_str(), &r, now);
                Err(r)
            }
        }
    }

    /// Rotates the signing intermediate.
    pub fn rotate_ca(&self, op: &Operator, now: SystemTime) -> Result<(), Refused> {
        self.rotate(op, Rotation::Intermediate, now)
    }

    /// Rotates the CA. `Intermediate`: a new intermediate under the same root (no bundle
    /// change). `RootBegin`: a new root joins the bundle, which is pushed to every proxy,
    /// while the old intermediate keeps signing. `RootFinish`: signing switches to the new
    /// root's intermediate; the old root stays in the bundle while its leaves may live.
    pub fn rotate(&self, op: &Operator, what: Rotation, now: SystemTime) -> Result<(), Refused> {
        if !op.is_platform_security() {
            return Err(Refused::Forbidden(format!(
                "`{}` may not rotate the CA: it needs the platform-security role",
                op.name
            )));
        }
        let (action, subject) = {
            let mut ca = self.ca_mut()?;
            let r = match what {
                Rotation::Intermediate => ca.rotate_intermediate(now).map(|()| ("ca.rotate", "intermediate")),
                Rotation::RootBegin if ca.rotating_root() => return Err(Refused::BadRequest("a root rotation is already in progress; finish it with `meshward ca rotate --root --finish`".into())),
                Rotation::RootBegin => ca.begin_root_rotation(now).map(|()| ("ca.rotate-root.begin", "root")),
                Rotation::RootFinish => ca.finish_root_rotation().map(|()| ("ca.rotate-root.finish", "root")),
            };
            let r = r.map_err(|e| Refused::BadRequest(e.to_string()))?;
            ca.save(&self.cfg.data_dir.join("ca"))
                .map_err(|e| Refused::Internal(e.to_string()))?;
            if let Some(b) = &self.tls_bundles {
                let mut tb = meshward_identity::svid::TrustBundles::new();
                tb.set(self.cfg.trust_domain.clone(), ca.bundle());
                b.store(tb);
            }
            r
        };
        self.store
            .append_audit(NewEntry::new(&op.actor(), action, subject, json!({})), now)?;
        // Push the bundle to every proxy (same revision, new bundle).
        let head = *self.head.borrow();
        self.head.send_replace(head);
        Ok(())
    }

    /// The bundles the control plane's own TLS verifier uses, kept in step with rotations.
    pub fn with_tls_bundles(mut self, b: meshward_identity::verifier::SharedBundles) -> Self {
        self.tls_bundles = Some(b);
        self
    }

    pub fn with_decision_window(mut self, w: crate::decisions::DecisionWindow) -> Self {
        self.decisions = Some(Arc::new(w));
        self
    }

    // -- decision records ---------------------------------------------------------------

    fn window(&self) -> Result<&crate::decisions::DecisionWindow, Refused> {
        self.decisions
            .as_deref()
            .ok_or_else(|| Refused::NotFound("this control plane keeps no decision window".into()))
    }

    /// Stores a batch of records shipped by the proxy running as `proxy`.
    pub fn ship(
        &self,
        proxy: &SpiffeId,
        records: &[String],
        dropped: u64,
    ) -> Result<(u64, u64), Refused> {
        if proxy.workload_parts().is_none() {
            return Err(Refused::Forbidden(format!(
                "`{proxy}` is not a workload identity"
            )));
        }
        if let Some(d) = &self.disk
            && d.is_full()
        {
            // The freed reserve is for renewals: the window waits for space.
            let n = records.len() as u64;
            d.decisions_dropped
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            self.metrics.decisions_lost.inc_by(n + dropped);
            return Ok((0, 0));
        }
        let (ok, invalid) = self.window()?.append(proxy.as_str(), records)?;
        self.metrics.decisions_received.inc_by(ok);
        self.metrics.decisions_lost.inc_by(dropped + invalid);
        Ok((ok, invalid))
    }

    /// Records of the last `since` (all kept when `None`), at most `limit`, oldest first.
    pub fn decisions(
        &self,
        since: Option<Duration>,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<meshward_policy::decision_log::DecisionRecord>, Refused> {
        Ok(self
            .window()?
            .records(since.and_then(|d| now.checked_sub(d)), limit)?)
    }

    /// The certificate each connected sidecar holds (as it reports it after every
    /// renewal): `[{sidecar, identity, serial, not_before, not_after, seconds_left,
    /// stale}]`; then identities this replica issued a certificate to that no connected
    /// sidecar reports (`sidecar: null`, the latest issued expiry).
    pub fn certificates(&self, now: SystemTime) -> Result<Vec<serde_json::Value>, Refused> {
        let head = self.store.head()?.map_or(0, |r| r.rev);
        let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let left = |t: SystemTime| t.duration_since(now).map_or(0, |d| d.as_secs());
        let mut out = vec![];
        let mut held = std::collections::BTreeSet::new();
        {
            let proxies = self
                .proxies
                .lock()
                .map_err(|_| Refused::Internal("proxy registry unavailable".into()))?;
            let mut rows: Vec<&ProxyState> = proxies.values().collect();
            rows.sort_by(|a, b| {
                (a.workload.as_ref(), &a.identity).cmp(&(b.workload.as_ref(), &b.identity))
            });
            for p in rows {
                let Some(c) = &p.certificate else { continue };
                held.insert(p.identity.clone());
                out.push(json!({
                    "sidecar": p.workload.clone().or_else(|| p.workloads.first().cloned()),
                    "identity": p.identity,
                    "serial": c.serial,
                    "not_before": rfc(c.not_before),
                    "not_after": rfc(c.not_after),
                    "seconds_left": left(c.not_after),
                    "stale": p.acked_revision < head,
                }));
            }
        }
        let m = self
            .issued
            .lock()
            .map_err(|_| Refused::Internal("certificate registry unavailable".into()))?;
        for (id, t) in m.iter().filter(|(id, _)| !held.contains(*id)) {
            out.push(json!({
                "sidecar": null, "identity": id, "serial": null, "not_before": null,
                "not_after": rfc(*t), "seconds_left": left(*t), "stale": false,
            }));
        }
        Ok(out)
    }

    /// The service graph of the last `window`: the head revision's workloads as nodes,
    /// traffic from the decision window as edges.
    pub fn graph(
        &self,
        window: Duration,
        now: SystemTime,
    ) -> Result<crate::decisions::Graph, Refused> {
        let records = self.decisions(Some(window), 1_000_000, now)?;
        let set = self.store.head()?.and_then(|r| repo::load(&r.files).set);
        Ok(crate::decisions::graph(
            &records,
            set.as_ref(),
            window.as_secs(),
        ))
    }

    /// A time series of the last `window` in steps of `step`, for `of`, with the revisions
    /// of the window as markers (the dashboard's series).
    pub fn series(
        &self,
        of: &crate::decisions::SeriesOf,
        window: Duration,
        step: Duration,
        now: SystemTime,
    ) -> Result<crate::decisions::Series, Refused> {
        let step = step.max(Duration::from_secs(1));
        let steps = (window.as_millis() / step.as_millis()).clamp(1, 1_000) as usize;
        let step_ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
        // Aligned to the step so that successive refreshes bucket alike.
        let end_ms = (ms(now) / step_ms + 1) * step_ms;
        let start_ms = end_ms - step_ms * steps as i64;
        let since = now
            .checked_sub(Duration::from_millis(
                u64::try_from(ms(now) - start_ms).unwrap_or(0),
            ))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let records = self.window()?.records(Some(since), 1_000_000)?;
        let set = self.store.head()?.and_then(|r| repo::load(&r.files).set);
        let mut s = crate::decisions::series(&records, set.as_ref(), of, start_ms, step_ms, steps);
        s.markers = crate::decisions::revision_markers(&self.store.history()?, start_ms);
        Ok(s)
    }

    // -- overrides --------------------------------------------------------------------------

    /// Adds an `Override` resource (YAML document) as a new revision. Expiry is required and
    /// capped by the mesh; lint checks it like any other change.
    pub fn create_override(
        &self,
        op: &Operator,
        namespace: &str,
        name: &str,
        doc: &str,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let (_, mut files) = self.head_files()?;
        let key = Key {
            kind: "Override".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        if repo::resources(&files).contains_key(&key) {
            return Err(Refused::BadRequest(format!("{key} already exists")));
        }
        files.push((format!("overrides/{namespace}-{name}.yaml"), doc.to_owned()));
        let r = self.apply(op, files, &format!("override {namespace}/{name}"), now)?;
        self.store.append_audit(
            NewEntry::new(
                &op.actor(),
                "override.create",
                &format!("{namespace}/{name}"),
                json!({}),
            ),
            now,
        )?;
        Ok(r)
    }

    /// Removes an override before it expires.
    pub fn revoke_override(
        &self,
        op: &Operator,
        namespace: &str,
        name: &str,
        now: SystemTime,
    ) -> Result<Applied, Refused> {
        let (_, files) = self.head_files()?;
        let key = Key {
            kind: "Override".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        if !repo::resources(&files).contains_key(&key) {
            return Err(Refused::NotFound(format!("no {key}")));
        }
        let r = self.apply(
            op,
            repo::remove(&files, &key),
            &format!("revoke override {namespace}/{name}"),
            now,
        )?;
        self.store.append_audit(
            NewEntry::new(
                &op.actor(),
                "override.revoke",
                &format!("{namespace}/{name}"),
                json!({}),
            ),
            now,
        )?;
        Ok(r)
    }

    /// The overrides of the head revision with their expiry.
    pub fn overrides(&self) -> Result<Vec<serde_json::Value>, Refused> {
        let (_, files) = self.head_files()?;
        let loaded = repo::load(&files);
        let Some(set) = loaded.set else {
            return Ok(vec![]);
        };
        Ok(set
            .overrides
            .iter()
            .map(|o| {
                json!({
                    "override": o.id.to_string(),
                    "action": format!("{:?}", o.action).to_lowercase(),
                    "reason": o.reason,
                    "ticket": o.ticket,
                    "requester": o.requester,
                    "approver": o.approver,
                    "expires_at": o.expires_at.map(|t| humantime::format_rfc3339(t).to_string()),
                })
            })
            .collect())
    }

    /// The `FaultInjection`s of the head revision: what each injects, where, and when it
    /// expires (the dashboard's "Active faults").
    pub fn faults(&self) -> Result<Vec<serde_json::Value>, Refused> {
        let (_, files) = self.head_files()?;
        let Some(set) = repo::load(&files).set else {
            return Ok(vec![]);
        };
        Ok(set
            .faults
            .iter()
            .map(|f| {
                let s = &f.spec;
                let t = &s.target;
                let mut target: Vec<String> = t.workloads.iter().map(|w| format!("workload {w}")).collect();
                target.extend(t.services.iter().map(|v| format!("service {v}")));
                target.extend(t.namespaces.iter().map(|n| format!("namespace {n}")));
                target.extend(t.labels.iter().map(|(k, v)| format!("{k}={v}")));
                let abort = s.abort.as_ref().map(|a| {
                    let how = match (a.http_status, &a.grpc_status, a.tcp_reset) {
                        (Some(c), _, _) => format!("HTTP {c}"),
                        (_, Some(g), _) => format!("gRPC {g}"),
                        _ => "reset".to_owned(),
                    };
                    format!("{how} for {}%", a.percent)
                });
                json!({
                    "fault": f.id.to_string(),
                    "target": target.join(", "),
                    "from": s.from.is_some(),
                    "delay": s.delay.as_ref().map(|d| format!("{} for {}%", humantime::format_duration(d.fixed.0), d.percent)),
                    "abort": abort,
                    "expires_at": humantime::format_rfc3339(s.expires_at.0).to_string(),
                })
            })
            .collect())
    }

    /// Removes every expired override in one new revision, audited by the controller
    /// (`override.expire`), then every `RateLimitPolicy` past its `expiresAt` in another
    /// (`ratelimit.expire`), then every `FaultInjection` past its `expiresAt`
    /// (`fault.expire`). Returns what was removed.
    pub fn expire_overrides(&self, now: SystemTime) -> Result<Vec<String>, Refused> {
        let mut gone = self.expire_override_resources(now)?;
        gone.extend(
            self.expire_kind(now, "RateLimitPolicy", "ratelimit.expire", |set| {
                set.rate_limits
                    .iter()
                    .filter(|r| r.spec.expires_at.is_some_and(|e| e.0 <= now))
                    .map(|r| r.id.to_string())
                    .collect()
            })?,
        );
        gone.extend(
            self.expire_kind(now, "FaultInjection", "fault.expire", |set| {
                set.faults
                    .iter()
                    .filter(|f| f.spec.expires_at.0 <= now)
                    .map(|f| f.id.to_string())
                    .collect()
            })?,
        );
        Ok(gone)
    }

    /// Removes the resources of `kind` that `expired` names (`namespace/name`) in one new
    /// revision by the controller, audited as `action`.
    fn expire_kind(
        &self,
        now: SystemTime,
        kind: &str,
        action: &str,
        expired: impl Fn(&meshward_policy::model::PolicySet) -> Vec<String>,
    ) -> Result<Vec<String>, Refused> {
        let (_, files) = self.head_files()?;
        let Some(set) = repo::load(&files).set else {
            return Ok(vec![]);
        };
        let expired = expired(&set);
        if expired.is_empty() {
            return Ok(vec![]);
        }
        let mut next = files.clone();
        for id in &expired {
            let (ns, name) = id.split_once('/').unwrap_or(("default", id));
            let key = Key {
                kind: kind.into(),
                namespace: ns.into(),
                name: name.into(),
            };
            next = repo::remove(&next, &key);
        }
        let summary = repo::summary(&files, &next);
        let entry = NewEntry::new(
            "controller",
            action,
            &expired.join(","),
            json!({"summary": summary}),
        );
        self.commit(
            "controller",
            &format!("{kind} expired"),
            &summary,
            &next,
            entry,
            now,
        )?;
        Ok(expired.into_iter().map(|i| format!("{kind} {i}")).collect())
    }

    fn expire_override_resources(&self, now: SystemTime) -> Result<Vec<String>, Refused> {
        let (_, files) = self.head_files()?;
        let loaded = repo::load(&files);
        let Some(set) = loaded.set else {
            return Ok(vec![]);
        };
        let expired: Vec<&meshward_policy::model::Override> = set
            .overrides
            .iter()
            .filter(|o| o.expires_at.is_some_and(|e| e <= now))
            .collect();
        if expired.is_empty() {
            return Ok(vec![]);
        }
        let mut next = files.clone();
        let mut names = vec![];
        for o in &expired {
            let (ns, name) = o.id.split_once('/').unwrap_or(("default", &o.id));
            next = repo::remove(
                &next,
                &Key {
                    kind: "Override".into(),
                    namespace: ns.into(),
                    name: name.into(),
                },
            );
            names.push(o.id.to_string());
        }
        let summary = repo::summary(&files, &next);
        self.commit(
            "controller",
            "overrides expired",
            &summary,
            &next,
            NewEntry::new(
                "controller",
                "override.expire",
                &names.join(","),
                json!({"summary": summary}),
            ),
            now,
        )?;
        Ok(names)
    }

    /// The audit log, filtered.
    pub fn audit(&self, f: &AuditFilter) -> Result<Vec<crate::audit::Entry>, Refused> {
        Ok(self.store.audit(f)?)
    }
}

impl ControlPlane {
    /// The snapshot a proxy running as `identity` needs at the head revision:
    /// `(revision, its workloads, files)`.
    pub fn snapshot_for(&self, identity: &SpiffeId) -> Result<Arc<Snapshot>, Refused> {
        let key = (*self.head.borrow(), *self.rollout_gen.borrow());
        if let Ok(c) = self.snapshots.lock()
            && c.0 == key
            && let Some(s) = c.1.get(identity)
        {
            return Ok(s.clone());
        }
        // Built once per (revision, rollout, identity) and shared by every proxy of that
        // identity.
        let (rev, files) = self.head_files()?;
        let (names, selected) = select_for(&files, identity);
        let candidate = self.shadow_candidate().map(|(id, cfiles)| {
            let (_, mine) = select_for(&cfiles, identity);
            (id, mine)
        });
        let snap = Arc::new(Snapshot {
            revision: rev,
            workloads: names,
            files: selected,
            candidate,
        });
        if let Ok(mut c) = self.snapshots.lock() {
            if c.0 != key {
                *c = (key, std::collections::HashMap::new());
            }
            c.1.insert(identity.clone(), snap.clone());
        }
        Ok(snap)
    }

    /// Bumped whenever a rollout changes (config streams resend).
    pub fn subscribe_rollout(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rollout_gen.subscribe()
    }

    /// Registers a config stream; returns its id.
    pub fn proxy_connected(
        &self,
        identity: &SpiffeId,
        workloads: Vec<String>,
        now: SystemTime,
    ) -> u64 {
        let id = self
            .next_proxy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut p) = self.proxies.lock() {
            p.insert(
                id,
                ProxyState {
                    identity: identity.to_string(),
                    workloads,
                    connected_ms: ms(now),
                    acked_revision: 0,
                    sent_revision: 0,
                    rejected: None,
                    not_persisted: None,
                    last_seen_ms: ms(now),
                    workload: None,
                    certificate: None,
                    candidate_rollout: 0,
                    candidate_error: None,
                },
            );
        }
        id
    }

    /// Records what was sent to, or answered by, a proxy.
    pub fn proxy_update(&self, id: u64, f: impl FnOnce(&mut ProxyState)) {
        if let Ok(mut p) = self.proxies.lock()
            && let Some(s) = p.get_mut(&id)
        {
            f(s);
        }
    }

    /// What the sidecar of stream `id` says of its workload's readiness (`None`: ready).
    /// Only a workload its identity runs as counts. A change is published to every config
    /// stream. A sidecar that disconnects keeps what it said last (a draining one has
    /// gone; one cut off from the control plane may still serve, and says so again when it
    /// is back).
    pub fn proxy_readiness(&self, id: u64, workload: &str, not_ready: Option<String>) {
        let owns = self.proxies.lock().ok().is_some_and(|p| {
            p.get(&id)
                .is_some_and(|s| s.workloads.iter().any(|w| w == workload))
        });
        if !owns {
            return;
        }
        let changed = match self.readiness.lock() {
            Ok(mut r) => match not_ready {
                Some(why) => r.insert(workload.to_owned(), why.clone()).as_ref() != Some(&why),
                None => r.remove(workload).is_some(),
            },
            Err(_) => false,
        };
        if changed {
            self.readiness_gen.send_modify(|g| *g += 1);
        }
    }

    /// Workloads not ready, and why.
    pub fn not_ready(&self) -> Vec<(String, String)> {
        self.readiness
            .lock()
            .map(|r| r.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn subscribe_readiness(&self) -> tokio::sync::watch::Receiver<u64> {
        self.readiness_gen.subscribe()
    }

    pub fn proxy_disconnected(&self, id: u64) {
        if let Ok(mut p) = self.proxies.lock() {
            p.remove(&id);
        }
    }

    /// The head revision and every connected proxy, marked stale when it has not
    /// acknowledged the head.
    pub fn status(&self) -> Result<serde_json::Value, Refused> {
        let head = self.store.head()?.map_or(0, |r| r.rev);
        let proxies: Vec<serde_json::Value> = self
            .proxies
            .lock()
            .map_err(|_| Refused::Internal("proxy registry unavailable".into()))?
            .values()
            .map(|p| {
                let mut v = json!(p);
                if let Some(o) = v.as_object_mut() {
                    o.insert("stale".into(), json!(p.acked_revision < head));
                }
                v
            })
            .collect();
        // Transparent mode: each workload's address and the ports its capture rules leave
        // alone, as the head revision declares them.
        let interception: Vec<serde_json::Value> = self
            .store
            .head()?
            .and_then(|r| repo::load(&r.files).set)
            .map(|set| {
                set.workloads
                    .iter()
                    .filter(|w| {
                        w.address.is_some()
                            || !w.interception.exclude_inbound_ports.is_empty()
                            || !w.interception.exclude_outbound_ports.is_empty()
                    })
                    .map(|w| {
                        json!({
                            "workload": w.id.to_string(),
                            "address": w.address.map(|a| a.to_string()),
                            "exclude_inbound_ports": w.interception.exclude_inbound_ports,
                            "exclude_outbound_ports": w.interception.exclude_outbound_ports,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(
            json!({"revision": head, "trust_domain": self.cfg.trust_domain.to_string(), "proxies": proxies, "interception": interception, "degraded": self.disk_condition().into_iter().collect::<Vec<_>>(),
                "not_ready": self.not_ready().into_iter().map(|(w, why)| json!({"workload": w, "why": why})).collect::<Vec<_>>()}),
        )
    }

    /// The Prometheus exposition: the counters, and proxies by acknowledged revision and
    /// the head revision as of now.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        m.proxies.clear();
        if let Ok(p) = self.proxies.lock() {
            for s in p.values() {
                m.proxies
                    .get_or_create(&meshward_telemetry::RevisionLabels {
                        revision: s.acked_revision.to_string(),
                    })
                    .inc();
            }
        }
        let head = self.store.head().ok().flatten().map_or(0, |r| r.rev);
        m.revision.set(i64::try_from(head).unwrap_or(i64::MAX));
        if let Some(d) = &self.disk {
            m.disk_full.set(i64::from(d.is_full()));
            m.audit_held
                .set(i64::try_from(d.held()).unwrap_or(i64::MAX));
        }
        m.encode() + &meshward_telemetry::process_text("control")
    }

    /// Signs for the proxy API: with a join token, or renewing the peer's identity.
    pub fn sign_for(
        &self,
        token: Option<&str>,
        peer: Option<&SpiffeId>,
        csr: &[u8],
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<Issued, Refused> {
        match (token, peer) {
            (Some(t), _) => self.sign_with_token(t, csr, lifetime, now),
            (None, Some(id)) => self.renew(id, csr, lifetime, now),
            (None, None) => Err(Refused::Forbidden(
                "present a join token, or your current SVID as client certificate to renew".into(),
            )),
        }
    }
}

/// The attribute keys of workload `key` that differ between two sets (every key when the
/// workload is added or removed): what a policy reading caller attributes could see change.
fn changed_attributes(
    old: Option<&meshward_policy::model::PolicySet>,
    new: Option<&meshward_policy::model::PolicySet>,
    key: &Key,
) -> std::collections::BTreeSet<String> {
    let r = meshward_policy::decision::WorkloadRef {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    };
    let empty = std::collections::BTreeMap::new();
    let a = old
        .and_then(|s| s.workload(&r))
        .map_or(&empty, |w| &w.attributes);
    let b = new
        .and_then(|s| s.workload(&r))
        .map_or(&empty, |w| &w.attributes);
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Every change says why: the reason goes into the history and the audit log.
/// What a proxy running as `identity` needs of `files`: the names of its workloads, and
/// the Mesh, every Workload and Service (identities and attributes), the policies that
/// target its workloads, and the overrides, rate limits, traffic policies and faults.
fn select_for(files: &Files, identity: &SpiffeId) -> (Vec<String>, Files) {
    let loaded = repo::load(files);
    let Some(set) = loaded.set else {
        return (vec![], vec![]);
    };
    let mine: Vec<&meshward_policy::model::Workload> = set
        .workloads
        .iter()
        .filter(|w| w.identity == *identity)
        .collect();
    let names = mine.iter().map(|w| w.id.to_string()).collect();
    let targets_mine = |id: &str| {
        set.policies
            .iter()
            .find(|p| &*p.id == id)
            .is_some_and(|p| mine.iter().any(|w| p.target.matches(w)))
    };
    let selected = repo::select(files, |k| match k.kind.as_str() {
        "Mesh"
        | "Workload"
        | "Service"
        | "TrustDomainFederation"
        | "Override"
        | "RateLimitPolicy"
        | "TrafficPolicy"
        | "FaultInjection" => true,
        "AuthorizationPolicy" => targets_mine(&format!("{}/{}", k.namespace, k.name)),
        _ => false,
    });
    (names, selected)
}

fn require_reason(reason: &str) -> Result<(), Refused> {
    if reason.trim().is_empty() {
        return Err(Refused::BadRequest(
            "a change needs a reason: say why with `--reason \"...\"` (it is kept in the history and the audit log)".into(),
        ));
    }
    Ok(())
}

/// The resources of `files` whose kind is accepted but not enforced yet (lint MW315).
fn not_enforced(files: &Files) -> Vec<String> {
    repo::resources(files)
        .into_keys()
        .filter(|k| k.kind == "TrustDomainFederation")
        .map(|k| k.to_string())
        .collect()
}
