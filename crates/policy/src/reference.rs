//! The reference evaluator: ARCHITECTURE §4 written out as plainly as possible, with no
//! index and no cleverness. It is the oracle the compiled [`crate::engine`] is tested
//! against, and, because it can record every step, the engine behind `policy explain`.

use std::collections::BTreeMap;
use std::sync::Arc;

use meshward_identity::SpiffeId;
use serde::Serialize;

use crate::decision::{Decision, Reason, Request, RuleRef, ShadowDecision, Source, Verdict};
use crate::matcher::normalize_host;
use crate::model::{
    CondKind, Condition, Operation, Override, Policy, PolicySet, Rule, SourceMatch, Target,
    Workload,
};
use crate::resource::{Action, DefaultAction, Mode, MtlsMode, OverrideAction, Tier};

/// What one step of an evaluation saw; `policy explain` prints these.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Step {
    /// The evaluation step of ARCHITECTURE §4 (1-6), 0 for checks before policy.
    pub step: u8,
    pub tier: Option<Tier>,
    pub what: String,
    pub matched: bool,
}

/// Everything an evaluation considered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trace {
    pub steps: Vec<Step>,
}

impl Trace {
    fn push(&mut self, step: u8, tier: Option<Tier>, what: String, matched: bool) {
        self.steps.push(Step {
            step,
            tier,
            what,
            matched,
        });
    }
}

/// Whether a source entry matches. `src_attrs` are the source's workload attributes,
/// `dst_attrs` the destination's.
pub fn source_matches(
    m: &SourceMatch,
    source: Option<&SpiffeId>,
    src_attrs: &BTreeMap<String, String>,
    dst_attrs: &BTreeMap<String, String>,
    mesh_td: &str,
) -> bool {
    if m.unauthenticated {
        return source.is_none();
    }
    let same = |k: &String| match (src_attrs.get(k), dst_attrs.get(k)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    };
    let attr_holds =
        |(k, vs): &(String, Vec<String>)| src_attrs.get(k).is_some_and(|v| vs.contains(v));
    let negatives = m.not_attributes.iter().all(|kv| !attr_holds(kv))
        && m.different_attributes.iter().all(|k| !same(k));
    let Some(id) = source else {
        // Plaintext: positive fields cannot hold, negative ones do.
        return m.is_negative_only() && negatives;
    };
    let own_ns = (id.trust_domain_name() == mesh_td)
        .then(|| id.namespace())
        .flatten();
    (m.identities.is_empty() || m.identities.iter().any(|p| p.matches(id)))
        && !m.not_identities.iter().any(|p| p.matches(id))
        && (m.namespaces.is_empty()
            || own_ns.is_some_and(|ns| m.namespaces.iter().any(|n| n == ns)))
        && !own_ns.is_some_and(|ns| m.not_namespaces.iter().any(|n| n == ns))
        && (m.trust_domains.is_empty()
            || m.trust_domains.iter().any(|t| t == id.trust_domain_name()))
        && !m
            .not_trust_domains
            .iter()
            .any(|t| t == id.trust_domain_name())
        && m.attributes.iter().all(attr_holds)
        && m.same_attributes.iter().all(same)
        && negatives
}

/// Whether an operation matches. On plain TCP (no HTTP attributes) an operation with HTTP
/// fields never matches for ALLOW/AUDIT, and its HTTP fields are ignored for DENY (so the
/// deny covers all of the port's traffic: fail closed).
pub fn operation_matches(op: &Operation, action: Action, req: &Request) -> bool {
    if !op.ports.is_empty() && !op.ports.contains(&req.port) {
        return false;
    }
    let Some(http) = &req.http else {
        return action == Action::Deny || !op.has_http();
    };
    if !op.methods.is_empty() && !op.methods.contains(&http.method) {
        return false;
    }
    if op.not_methods.contains(&http.method) {
        return false;
    }
    if !op.paths.is_empty() && !op.paths.iter().any(|p| p.matches(&http.path)) {
        return false;
    }
    if op.not_paths.iter().any(|p| p.matches(&http.path)) {
        return false;
    }
    if !op.hosts.is_empty() {
        match &http.host {
            Some(h) => {
                let h = normalize_host(h);
                if !op.hosts.iter().any(|p| p.matches(&h)) {
                    return false;
                }
            }
            // No host to check: a DENY still applies, an ALLOW does not.
            None => return action == Action::Deny,
        }
    }
    true
}

/// Whether a header condition holds. Every value of the header is split at commas and
/// each element trimmed; for DENY a condition matches if any element matches; for ALLOW
/// and AUDIT it holds only if every element satisfies it. A missing header never satisfies
/// `values`, and always satisfies `notValues`. An element from bytes that are not UTF-8
/// (holding U+FFFD) satisfies a DENY condition and never an ALLOW one.
pub fn condition_holds(c: &Condition, action: Action, req: &Request) -> bool {
    let Some(http) = &req.http else {
        return action == Action::Deny;
    };
    let mut elements: Vec<&str> = vec![];
    for (k, v) in &http.headers {
        if *k == c.header {
            for e in v.split(',') {
                elements.push(e.trim_matches(|ch| ch == ' ' || ch == '\t'));
            }
        }
    }
    let deny = action == Action::Deny;
    let opaque = |v: &&str| v.contains('\u{fffd}');
    match &c.kind {
        CondKind::Present(p) => elements.is_empty() != *p,
        CondKind::Values(ms) => {
            let ok = |v: &&str| {
                if opaque(v) {
                    deny
                } else {
                    ms.iter().any(|m| m.matches(v))
                }
            };
            if deny {
                elements.iter().any(ok)
            } else {
                !elements.is_empty() && elements.iter().all(ok)
            }
        }
        CondKind::NotValues(ms) => {
            let ok = |v: &&str| {
                if opaque(v) {
                    deny
                } else {
                    !ms.iter().any(|m| m.matches(v))
                }
            };
            if deny {
                elements.is_empty() || elements.iter().any(ok)
            } else {
                elements.iter().all(ok)
            }
        }
    }
}

/// Whether a rule matches a request.
pub fn rule_matches(
    set: &PolicySet,
    rule: &Rule,
    action: Action,
    req: &Request,
    dest: &Workload,
) -> bool {
    let id = req.source.identity();
    let src_attrs = set.attributes_of(id);
    let td = set.mesh.trust_domain.as_str();
    (rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|m| source_matches(m, id, src_attrs, &dest.attributes, td)))
        && (rule.to.is_empty() || rule.to.iter().any(|op| operation_matches(op, action, req)))
        && rule.when.iter().all(|c| condition_holds(c, action, req))
}

/// Whether an override applies to a request.
pub fn override_matches(set: &PolicySet, o: &Override, req: &Request, dest: &Workload) -> bool {
    let id = req.source.identity();
    let td = set.mesh.trust_domain.as_str();
    let src_attrs = set.attributes_of(id);
    match o.action {
        OverrideAction::Quarantine => {
            let Some(subject) = &o.subject else {
                return false;
            };
            let as_source = |m: &SourceMatch| {
                source_matches(
                    m,
                    Some(&dest.identity),
                    &dest.attributes,
                    &dest.attributes,
                    td,
                )
            };
            let from_source =
                |m: &SourceMatch| source_matches(m, id, src_attrs, &dest.attributes, td);
            let except = |f: &dyn Fn(&SourceMatch) -> bool| o.except.as_ref().is_some_and(f);
            // From the subject unless to an excepted peer; to the subject unless from one.
            (from_source(subject) && !except(&as_source))
                || (as_source(subject) && !except(&from_source))
        }
        OverrideAction::Allow | OverrideAction::Deny => {
            let action = if o.action == OverrideAction::Allow {
                Action::Allow
            } else {
                Action::Deny
            };
            o.subject
                .as_ref()
                .is_none_or(|s| source_matches(s, id, src_attrs, &dest.attributes, td))
                && o.target.as_ref().is_none_or(|t: &Target| t.matches(dest))
                && (o.to.is_empty() || o.to.iter().any(|op| operation_matches(op, action, req)))
        }
    }
}

/// The deciding policy and rule of a decision.
type PolicyRule = (Option<Arc<str>>, Option<Arc<str>>);

fn rref(p: &Policy, r: &Rule) -> PolicyRule {
    (Some(p.id.clone()), Some(r.name.clone()))
}

/// Evaluates a request by the specification.
pub fn evaluate(set: &PolicySet, req: &Request) -> Decision {
    evaluate_traced(set, req, &mut None)
}

/// Evaluates a request and records every step.
pub fn explain(set: &PolicySet, req: &Request) -> (Decision, Trace) {
    let mut t = Some(Trace::default());
    let d = evaluate_traced(set, req, &mut t);
    (d, t.unwrap_or_default())
}

fn evaluate_traced(set: &PolicySet, req: &Request, trace: &mut Option<Trace>) -> Decision {
    let rev = set.revision;
    let Some(dest) = set.workload(&req.destination) else {
        if let Some(t) = trace {
            t.push(
                0,
                None,
                format!(
                    "destination `{}` is not a workload of this policy set",
                    req.destination
                ),
                true,
            );
        }
        return Decision::bare(Verdict::Deny, Reason::UnknownDestination, rev);
    };
    if set.mesh.mtls_mode == MtlsMode::Strict && req.source == Source::Unauthenticated {
        if let Some(t) = trace {
            t.push(
                0,
                None,
                "plaintext source and the mesh requires mTLS (mtlsMode STRICT)".into(),
                true,
            );
        }
        return Decision::bare(Verdict::Deny, Reason::Unauthenticated, rev);
    }
    let mut d = decide(set, req, dest, false, trace);
    // Shadow pass: only when a dry-run policy applies to this destination.
    if set
        .policies
        .iter()
        .any(|p| p.mode == Mode::DryRun && p.target.matches(dest))
    {
        let s = decide(set, req, dest, true, &mut None);
        if let Some(t) = trace {
            t.push(
                0,
                None,
                format!(
                    "dry-run shadow pass: would be {} ({}){}",
                    s.verdict,
                    s.reason,
                    s.policy
                        .as_deref()
                        .map(|p| format!(" by `{p}`"))
                        .unwrap_or_default()
                ),
                s.verdict != d.verdict,
            );
        }
        d.shadow = Some(ShadowDecision {
            verdict: s.verdict,
            reason: s.reason,
            policy: s.policy,
            rule: s.rule,
        });
    }
    for p in &set.policies {
        if p.action == Action::Audit && p.mode == Mode::Enforce && p.target.matches(dest) {
            for r in &p.rules {
                if rule_matches(set, r, Action::Audit, req, dest) {
                    if let Some(t) = trace {
                        t.push(
                            0,
                            Some(p.tier),
                            format!("audit mark by `{}` rule `{}`", p.id, r.name),
                            true,
                        );
                    }
                    d.audit.push(RuleRef {
                        policy: p.id.clone(),
                        rule: r.name.clone(),
                    });
                }
            }
        }
    }
    d
}

/// Steps 1-6 of §4. `dry_run` treats dry-run policies as enforced.
fn decide(
    set: &PolicySet,
    req: &Request,
    dest: &Workload,
    dry_run: bool,
    trace: &mut Option<Trace>,
) -> Decision {
    let rev = set.revision;
    let active = |p: &Policy| (p.mode == Mode::Enforce || dry_run) && p.target.matches(dest);
    let deny = |reason, tier, (policy, rule): PolicyRule| Decision {
        tier,
        policy,
        rule,
        ..Decision::bare(Verdict::Deny, reason, rev)
    };
    let mut note = |step: u8, tier: Option<Tier>, what: String, matched: bool| {
        if let Some(t) = trace.as_mut() {
            t.push(step, tier, what, matched);
        }
    };

    // 1. Non-overridable baseline DENY.
    for p in set.policies.iter().filter(|p| {
        p.tier == Tier::Baseline && p.action == Action::Deny && !p.overridable && active(p)
    }) {
        for r in &p.rules {
            let m = rule_matches(set, r, Action::Deny, req, dest);
            note(
                1,
                Some(Tier::Baseline),
                format!(
                    "baseline DENY `{}` rule `{}` (not overridable)",
                    p.id, r.name
                ),
                m,
            );
            if m {
                return deny(Reason::DeniedByRule, Some(Tier::Baseline), rref(p, r));
            }
        }
    }
    // 2. Active deny / quarantine overrides.
    for o in set
        .overrides
        .iter()
        .filter(|o| o.active_at(req.at) && o.action != OverrideAction::Allow)
    {
        let m = override_matches(set, o, req, dest);
        note(
            2,
            None,
            format!("{:?} override `{}`", o.action, o.id).to_lowercase(),
            m,
        );
        if m {
            let reason = if o.action == OverrideAction::Quarantine {
                Reason::Quarantined
            } else {
                Reason::OverrideDeny
            };
            return deny(reason, None, (Some(o.id.clone()), None));
        }
    }
    // 3. Active allow overrides.
    for o in set
        .overrides
        .iter()
        .filter(|o| o.active_at(req.at) && o.action == OverrideAction::Allow)
    {
        let m = override_matches(set, o, req, dest);
        note(3, None, format!("allow override `{}`", o.id), m);
        if m {
            return Decision {
                policy: Some(o.id.clone()),
                ..Decision::bare(Verdict::Allow, Reason::OverrideAllow, rev)
            };
        }
    }
    // 4. Every other DENY.
    for p in set.policies.iter().filter(|p| {
        p.action == Action::Deny && (p.tier != Tier::Baseline || p.overridable) && active(p)
    }) {
        for r in &p.rules {
            let m = rule_matches(set, r, Action::Deny, req, dest);
            note(
                4,
                Some(p.tier),
                format!("{} DENY `{}` rule `{}`", p.tier.as_str(), p.id, r.name),
                m,
            );
            if m {
                return deny(Reason::DeniedByRule, Some(p.tier), rref(p, r));
            }
        }
    }
    // 5. Tiers intersect.
    let mut decided: Option<(Tier, PolicyRule)> = None;
    for tier in Tier::ALL {
        let allows: Vec<&Policy> = set
            .policies
            .iter()
            .filter(|p| p.tier == tier && p.action == Action::Allow && active(p))
            .collect();
        if allows.is_empty() {
            note(
                5,
                Some(tier),
                format!(
                    "{} tier has no ALLOW policy for this destination",
                    tier.as_str()
                ),
                false,
            );
            continue;
        }
        let mut found = None;
        'policies: for p in &allows {
            for r in &p.rules {
                let m = rule_matches(set, r, Action::Allow, req, dest);
                note(
                    5,
                    Some(tier),
                    format!("{} ALLOW `{}` rule `{}`", tier.as_str(), p.id, r.name),
                    m,
                );
                if m {
                    found = Some(rref(p, r));
                    break 'policies;
                }
            }
        }
        match found {
            Some(pr) => decided = Some((tier, pr)),
            None => {
                note(
                    5,
                    Some(tier),
                    format!("no ALLOW rule of the {} tier matches", tier.as_str()),
                    true,
                );
                return Decision {
                    tier: Some(tier),
                    ..Decision::bare(Verdict::Deny, Reason::NoAllowAtTier, rev)
                };
            }
        }
    }
    match decided {
        Some((tier, (policy, rule))) => Decision {
            tier: Some(tier),
            policy,
            rule,
            ..Decision::bare(Verdict::Allow, Reason::AllowedByRule, rev)
        },
        // 6. Nobody allows anything for this destination: the mesh default.
        None => {
            note(
                6,
                None,
                format!(
                    "no tier has ALLOW policies: mesh default {:?}",
                    set.mesh.default_action
                )
                .to_lowercase(),
                true,
            );
            match set.mesh.default_action {
                DefaultAction::Deny => Decision::bare(Verdict::Deny, Reason::DefaultDeny, rev),
                DefaultAction::Allow => Decision::bare(Verdict::Allow, Reason::DefaultAllow, rev),
            }
        }
    }
}

/// The quarantine in force at `at` whose subject is `id`: a quarantined workload's own
/// sidecar refuses, with it, what would leave the mesh (destinations in the mesh refuse the
/// rest).
pub fn quarantine_of<'a>(
    set: &'a PolicySet,
    id: &SpiffeId,
    at: std::time::SystemTime,
) -> Option<&'a Override> {
    let td = set.mesh.trust_domain.as_str();
    let attrs = set.attributes_of(Some(id));
    set.overrides.iter().find(|o| {
        o.action == OverrideAction::Quarantine
            && o.active_at(at)
            && o.subject
                .as_ref()
                .is_some_and(|s| source_matches(s, Some(id), attrs, attrs, td))
    })
}
