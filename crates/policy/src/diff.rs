//! Semantic diff: which (source, destination, port, method, path class) edges change
//! verdict between two policy sets, over every identity and workload either set knows.
//!
//! Path classes are the representative paths of every path pattern either set mentions
//! (`/admin/*` gives `/admin` and `/admin/x`), plus `/` and a path no pattern names, so
//! every region of the path space that any rule distinguishes is probed once. Methods are
//! those either set names, plus `GET` and one no rule names. Header conditions are probed
//! without headers.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::Serialize;

use crate::decision::{Decision, HttpAttrs, Reason, Request, Source, Verdict, WorkloadRef};
use crate::engine::Engine;
use crate::matcher::{IdentityPattern, PathPattern};
use crate::model::PolicySet;

/// One edge whose verdict changes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeChange {
    pub source: String,
    pub destination: String,
    pub port: u16,
    /// `None` for plain TCP.
    pub method: Option<String>,
    pub path: Option<String>,
    pub old: Verdict,
    pub old_reason: Reason,
    pub new: Verdict,
    pub new_reason: Reason,
    /// Deciding policy in the new set.
    pub new_policy: Option<String>,
}

/// The result of a diff.
#[derive(Debug, Clone, Serialize)]
pub struct SemanticDiff {
    pub edges_compared: usize,
    /// Destinations not probed because nothing that decides their traffic changed.
    pub destinations_unchanged: usize,
    pub changes: Vec<EdgeChange>,
}

/// Everything outside a destination's own policies that decisions depend on.
fn global_fingerprint(set: &PolicySet) -> String {
    let m = &set.mesh;
    let attrs: Vec<String> = set
        .workloads
        .iter()
        .map(|w| format!("{}={:?}", w.identity, w.attributes))
        .collect();
    let overrides: Vec<String> = set
        .overrides
        .iter()
        .map(|o| {
            format!(
                "{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
                o.id, o.action, o.subject, o.target, o.to, o.starts_at, o.expires_at
            )
        })
        .collect();
    format!(
        "{}|{:?}|{:?}|{attrs:?}|{overrides:?}",
        m.trust_domain, m.default_action, m.mtls_mode
    )
}

/// The policies that apply to one destination, in evaluation order.
fn dest_fingerprint(set: &PolicySet, w: &crate::model::Workload) -> String {
    let mut s = format!("{:?}|{:?}|", w.attributes, w.ports);
    for p in set.policies.iter().filter(|p| p.target.matches(w)) {
        s.push_str(&format!(
            "{}|{:?}|{:?}|{:?}|{}|{:?};",
            p.id, p.tier, p.action, p.mode, p.overridable, p.rules
        ));
    }
    s
}

/// Sources, (destination, port, is HTTP), methods and paths to probe.
type Universe = (
    Vec<Source>,
    Vec<(WorkloadRef, u16, bool)>,
    Vec<String>,
    Vec<String>,
);

fn universe(sets: [&PolicySet; 2]) -> Universe {
    let mut sources = BTreeSet::new();
    let mut dests = BTreeSet::new();
    let mut methods: BTreeSet<String> = ["GET".to_owned(), "MESHWARD-OTHER".to_owned()].into();
    let mut paths: BTreeSet<String> =
        ["/".to_owned(), "/meshward-unmatched-path".to_owned()].into();
    let mut plaintext = false;
    for set in sets {
        plaintext |= set.mesh.mtls_mode == crate::resource::MtlsMode::Permissive;
        for w in &set.workloads {
            sources.insert(w.identity.to_string());
            for p in &w.ports {
                dests.insert((w.id.clone(), p.port, p.protocol.is_http()));
            }
        }
        let mut pat = |p: &PathPattern| {
            paths.insert(p.example());
            if let PathPattern::Prefix(x) = p {
                paths.insert(x.clone());
            }
        };
        for pol in &set.policies {
            for r in &pol.rules {
                for m in &r.from {
                    for i in m.identities.iter().chain(&m.not_identities) {
                        if let IdentityPattern::Exact(id) = i {
                            sources.insert(id.to_string());
                        }
                    }
                }
                for op in &r.to {
                    methods.extend(op.methods.iter().chain(&op.not_methods).cloned());
                    op.paths.iter().chain(&op.not_paths).for_each(&mut pat);
                }
            }
        }
    }
    let mut srcs: Vec<Source> = sources
        .iter()
        .filter_map(|s| Source::parse(s).ok())
        .collect();
    if plaintext {
        srcs.push(Source::Unauthenticated);
    }
    (
        srcs,
        dests.into_iter().collect(),
        methods.into_iter().collect(),
        paths.into_iter().collect(),
    )
}

/// Compares two policy sets edge by edge at time `at`.
pub fn diff(old: &PolicySet, new: &PolicySet, at: SystemTime) -> SemanticDiff {
    diff_with_progress(old, new, at, &mut |_, _| {})
}

/// [`diff`], calling `progress(destinations done, destinations to probe)` as it goes.
pub fn diff_with_progress(
    old: &PolicySet,
    new: &PolicySet,
    at: SystemTime,
    progress: &mut dyn FnMut(u64, u64),
) -> SemanticDiff {
    let (a, b) = (Engine::compile(old), Engine::compile(new));
    let (sources, dests, methods, paths) = universe([old, new]);
    let same_globals = global_fingerprint(old) == global_fingerprint(new);
    let unchanged = |d: &WorkloadRef| {
        same_globals
            && match (old.workload(d), new.workload(d)) {
                (Some(a), Some(b)) => dest_fingerprint(old, a) == dest_fingerprint(new, b),
                _ => false,
            }
    };
    let skip: BTreeSet<&WorkloadRef> = dests
        .iter()
        .map(|(d, _, _)| d)
        .filter(|d| unchanged(d))
        .collect();
    let mut changes = vec![];
    let mut n = 0;
    let total = dests.iter().filter(|(d, _, _)| !skip.contains(d)).count() as u64;
    let mut done = 0u64;
    for (dest, port, http) in &dests {
        if skip.contains(dest) {
            continue;
        }
        progress(done, total);
        done += 1;
        let mut probes: Vec<Option<HttpAttrs>> = vec![];
        if *http {
            for m in &methods {
                for p in &paths {
                    probes.push(Some(HttpAttrs {
                        method: m.clone(),
                        path: p.clone(),
                        host: None,
                        headers: vec![],
                    }));
                }
            }
        } else {
            probes.push(None);
        }
        for src in &sources {
            for h in &probes {
                n += 1;
                let req = Request {
                    source: src.clone(),
                    destination: dest.clone(),
                    port: *port,
                    http: h.clone(),
                    at,
                };
                let (x, y): (Decision, Decision) = (a.decide(&req), b.decide(&req));
                if x.verdict != y.verdict {
                    changes.push(EdgeChange {
                        source: src.to_string(),
                        destination: dest.to_string(),
                        port: *port,
                        method: h.as_ref().map(|h| h.method.clone()),
                        path: h.as_ref().map(|h| h.path.clone()),
                        old: x.verdict,
                        old_reason: x.reason,
                        new: y.verdict,
                        new_reason: y.reason,
                        new_policy: y.policy.as_deref().map(String::from),
                    });
                }
            }
        }
    }
    changes.sort();
    SemanticDiff {
        edges_compared: n,
        destinations_unchanged: skip.len(),
        changes,
    }
}
