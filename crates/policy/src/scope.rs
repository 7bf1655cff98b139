//! What a resource reaches: the namespaces whose traffic it can change. The control plane
//! authorizes a change by this — every namespace a resource targets or selects — and not by
//! the namespace the resource happens to live in; lint MW314 shows it to authors.
//!
//! The rules (docs/policy.md, "Who may change what"):
//! - a target reaches the namespaces of the workloads and services it names, narrowed by its
//!   `namespaces` field; a target that names nothing and no namespace (empty, or labels and
//!   attributes only) reaches **every** namespace, now and later: a label or attribute can be
//!   put on a workload in any namespace;
//! - a baseline policy, the `Mesh` and a `TrustDomainFederation` reach every namespace;
//! - an allow `Override` reaches its target; a deny `Override` its target, or, when the
//!   target is unconfined, its subject (then it only cuts the subject's own calls);
//! - a quarantine `Override` isolates its subject both ways: it reaches the subject's
//!   namespaces (identities of this trust domain with a literal `ns/NAME` segment, or
//!   `namespaces`), every namespace when the subject is not confined that way;
//! - a `Service` reaches its own namespace and those of the workloads behind it;
//! - a `Workload` reaches its own namespace, and, when its attributes change, what every
//!   policy that reads those attributes of its callers reaches (see [`attribute_readers`]).
//!
//! Every resource also reaches its own namespace.

use std::collections::BTreeSet;

use crate::model::{PolicySet, SourceMatch, Target};
use crate::resource::{OverrideAction, TargetSpec, Tier};

/// The namespaces a resource can affect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Every namespace of the mesh, including ones that do not exist yet.
    Mesh,
    /// These namespaces only.
    Namespaces(BTreeSet<String>),
}

impl Reach {
    /// One namespace.
    pub fn namespace(ns: &str) -> Self {
        Reach::Namespaces(BTreeSet::from([ns.to_owned()]))
    }

    /// Both reaches.
    pub fn union(self, other: Reach) -> Reach {
        match (self, other) {
            (Reach::Namespaces(mut a), Reach::Namespaces(b)) => {
                a.extend(b);
                Reach::Namespaces(a)
            }
            _ => Reach::Mesh,
        }
    }

    pub fn is_mesh(&self) -> bool {
        matches!(self, Reach::Mesh)
    }

    /// The namespaces reached other than `own` (`None`: every namespace).
    pub fn beyond(&self, own: &str) -> Option<Vec<&str>> {
        match self {
            Reach::Mesh => None,
            Reach::Namespaces(n) => {
                Some(n.iter().map(String::as_str).filter(|n| *n != own).collect())
            }
        }
    }
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reach::Mesh => f.write_str("every namespace"),
            Reach::Namespaces(n) => {
                let names: Vec<String> = n.iter().map(|n| format!("`{n}`")).collect();
                write!(f, "namespace(s) {}", names.join(", "))
            }
        }
    }
}

fn confine(named: Option<BTreeSet<String>>, namespaces: &[String]) -> Reach {
    match named {
        Some(n) if namespaces.is_empty() => Reach::Namespaces(n),
        Some(n) => Reach::Namespaces(n.into_iter().filter(|x| namespaces.contains(x)).collect()),
        None if !namespaces.is_empty() => Reach::Namespaces(namespaces.iter().cloned().collect()),
        None => Reach::Mesh,
    }
}

/// What a resolved target reaches.
pub fn target(t: &Target) -> Reach {
    let named = t.named.as_ref().map(|n| {
        n.iter()
            .map(|w| w.namespace.clone())
            .chain(t.services.iter().map(|s| s.namespace.clone()))
            .collect::<BTreeSet<_>>()
    });
    confine(named, &t.namespaces)
}

/// What a target as written reaches (for the kinds the model keeps unresolved), with the
/// resource's own namespace `own` qualifying bare names.
pub fn target_spec(t: &TargetSpec, own: &str, set: &PolicySet) -> Reach {
    let qualify = |n: &str| match n.split_once('/') {
        Some((ns, _)) => ns.to_owned(),
        None => own.to_owned(),
    };
    let named = (!t.workloads.is_empty() || !t.services.is_empty()).then(|| {
        let mut out: BTreeSet<String> = t.workloads.iter().map(|w| qualify(w)).collect();
        for s in &t.services {
            let ns = qualify(s);
            let name = s.rsplit('/').next().unwrap_or(s);
            if let Some(svc) = set
                .services
                .iter()
                .find(|x| x.id.namespace == ns && x.id.name == name)
            {
                out.extend(
                    svc.workloads
                        .iter()
                        .filter_map(|&i| set.workloads.get(i))
                        .map(|w| w.id.namespace.clone()),
                );
            }
            out.insert(ns);
        }
        out
    });
    confine(named, &t.namespaces)
}

/// What a source selector reaches when the selected sources themselves are affected (a
/// quarantine): the namespaces it confines them to, or every namespace.
pub fn source(s: &SourceMatch, set: &PolicySet) -> Reach {
    if !s.namespaces.is_empty() {
        return Reach::Namespaces(s.namespaces.iter().cloned().collect());
    }
    if s.identities.is_empty() || s.unauthenticated {
        return Reach::Mesh;
    }
    let ours = format!("spiffe://{}/", set.mesh.trust_domain);
    let mut out = BTreeSet::new();
    for id in &s.identities {
        let (prefix, literal) = id.literal_prefix();
        let segs: Vec<&str> = prefix
            .strip_prefix(&ours)
            .map(|p| p.split('/').collect())
            .unwrap_or_default();
        match segs.as_slice() {
            ["ns", ns, ..] if literal >= 2 => {
                out.insert((*ns).to_owned());
            }
            _ => return Reach::Mesh,
        }
    }
    Reach::Namespaces(out)
}

/// What the resource `kind` `ns/name` of `set` reaches, or `None` when the set does not hold
/// it (callers treat that as every namespace: fail closed).
pub fn resource(set: &PolicySet, kind: &str, ns: &str, name: &str) -> Option<Reach> {
    let id = format!("{ns}/{name}");
    let own = Reach::namespace(ns);
    let reach = match kind {
        "Mesh" | "TrustDomainFederation" => Reach::Mesh,
        "AuthorizationPolicy" => {
            let p = set.policies.iter().find(|p| *p.id == *id)?;
            if p.tier == Tier::Baseline {
                Reach::Mesh
            } else {
                target(&p.target)
            }
        }
        "Override" => {
            let o = set.overrides.iter().find(|o| *o.id == *id)?;
            match (o.action, &o.subject, &o.target) {
                (OverrideAction::Quarantine, Some(s), _) => source(s, set),
                // A quarantine without a subject matches nothing.
                (OverrideAction::Quarantine, None, _) => own.clone(),
                // A deny only takes away: confined to its subjects' namespaces, it only
                // cuts their own outbound traffic, whatever the target.
                (OverrideAction::Deny, Some(s), t) => {
                    match t.as_ref().map_or(Reach::Mesh, target) {
                        Reach::Mesh => source(s, set),
                        r => r,
                    }
                }
                (_, _, Some(t)) => target(t),
                (_, _, None) => Reach::Mesh,
            }
        }
        "RateLimitPolicy" => target_spec(
            &set.rate_limits.iter().find(|x| *x.id == *id)?.spec.target,
            ns,
            set,
        ),
        "TrafficPolicy" => target_spec(
            &set.traffic.iter().find(|x| *x.id == *id)?.spec.target,
            ns,
            set,
        ),
        "FaultInjection" => target_spec(
            &set.faults.iter().find(|x| *x.id == *id)?.spec.target,
            ns,
            set,
        ),
        "Service" => {
            let s = set
                .services
                .iter()
                .find(|s| s.id.namespace == ns && s.id.name == name)?;
            Reach::Namespaces(
                s.workloads
                    .iter()
                    .filter_map(|&i| set.workloads.get(i))
                    .map(|w| w.id.namespace.clone())
                    .collect(),
            )
        }
        _ => own.clone(),
    };
    Some(reach.union(own))
}

/// The policies and overrides of `set` that read any of the source attributes `keys`
/// (`attributes`, `notAttributes`, `sameAttributes`, `differentAttributes` of a `from` entry
/// or an override's subject), each with what it reaches. A workload that gains, loses or
/// changes such an attribute changes what those policies decide.
pub fn attribute_readers(set: &PolicySet, keys: &BTreeSet<String>) -> Vec<(String, Reach)> {
    let reads = |m: &SourceMatch| {
        m.attributes
            .iter()
            .chain(&m.not_attributes)
            .map(|(k, _)| k)
            .chain(&m.same_attributes)
            .chain(&m.different_attributes)
            .any(|k| keys.contains(k))
    };
    let mut out = vec![];
    for p in &set.policies {
        if p.rules.iter().any(|r| r.from.iter().any(reads)) {
            let reach = if p.tier == Tier::Baseline {
                Reach::Mesh
            } else {
                target(&p.target).union(Reach::namespace(&p.namespace))
            };
            out.push((format!("AuthorizationPolicy {}", p.id), reach));
        }
    }
    for o in &set.overrides {
        if o.subject.as_ref().is_some_and(reads) {
            let ns = o.id.split('/').next().unwrap_or_default();
            let reach = resource(
                set,
                "Override",
                ns,
                o.id.rsplit('/').next().unwrap_or_default(),
            )
            .unwrap_or(Reach::Mesh);
            out.push((format!("Override {}", o.id), reach));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(yaml: &str) -> PolicySet {
        let loaded = crate::load_sources(vec![("t.yaml".into(), yaml.into())]);
        match loaded.into_valid() {
            Ok(s) => s,
            Err(l) => {
                let msgs: Vec<String> = l.diagnostics.iter().map(|d| d.message.clone()).collect();
                unreachable!("test set invalid: {msgs:?}")
            }
        }
    }

    const BASE: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: td.example}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: api, namespace: prod}
spec: {attributes: {role: api}, ports: [{port: 80, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: tool, namespace: dev}
spec: {ports: [{port: 80, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: api, namespace: prod}
spec: {workloads: [api], ports: [{port: 80}]}
"#;

    fn with(doc: &str) -> PolicySet {
        set(&format!("{BASE}---\n{doc}"))
    }

    fn ns(v: &[&str]) -> Reach {
        Reach::Namespaces(v.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn a_policy_naming_another_namespace_reaches_it() {
        let s = with(
            "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: dev}\nspec:\n  tier: domain\n  action: DENY\n  target: {workloads: [prod/api]}\n  rules: [{}]\n",
        );
        assert_eq!(
            resource(&s, "AuthorizationPolicy", "dev", "p"),
            Some(ns(&["dev", "prod"]))
        );
    }

    #[test]
    fn label_and_attribute_targets_reach_every_namespace() {
        for target in ["{attributes: {role: api}}", "{labels: {app: x}}"] {
            let s = with(&format!(
                "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: dev}}\nspec:\n  tier: domain\n  action: DENY\n  target: {target}\n  rules: [{{}}]\n"
            ));
            assert_eq!(
                resource(&s, "AuthorizationPolicy", "dev", "p"),
                Some(Reach::Mesh),
                "{target}"
            );
        }
        // Confined by `namespaces`, the same selector stays in the namespace.
        let s = with(
            "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: dev}\nspec:\n  tier: domain\n  action: DENY\n  target: {namespaces: [dev], attributes: {role: api}}\n  rules: [{}]\n",
        );
        assert_eq!(
            resource(&s, "AuthorizationPolicy", "dev", "p"),
            Some(ns(&["dev"]))
        );
    }

    #[test]
    fn overrides_and_the_later_kinds_reach_their_targets() {
        let s = with(
            "apiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {name: o, namespace: dev}\nspec:\n  action: allow\n  subject: {namespaces: [dev]}\n  target: {services: [prod/api]}\n  reason: r\n  expiresAt: 2030-01-01T00:00:00Z\n---\napiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {name: q, namespace: dev}\nspec:\n  action: quarantine\n  subject: {identities: [\"spiffe://td.example/ns/prod/sa/api\"]}\n  reason: r\n  expiresAt: 2030-01-01T00:00:00Z\n---\napiVersion: meshward.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: r, namespace: dev}\nspec:\n  target: {services: [prod/api]}\n  limits: [{requestsPerSecond: 1}]\n",
        );
        assert_eq!(
            resource(&s, "Override", "dev", "o"),
            Some(ns(&["dev", "prod"]))
        );
        assert_eq!(
            resource(&s, "Override", "dev", "q"),
            Some(ns(&["dev", "prod"]))
        );
        assert_eq!(
            resource(&s, "RateLimitPolicy", "dev", "r"),
            Some(ns(&["dev", "prod"]))
        );
        assert_eq!(resource(&s, "Override", "dev", "missing"), None);
    }

    #[test]
    fn attribute_readers_are_found_with_their_reach() {
        let s = with(
            "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: admins, namespace: prod}\nspec:\n  tier: service\n  action: ALLOW\n  target: {workloads: [api]}\n  rules: [{from: [{attributes: {role: admin}}]}]\n",
        );
        let keys = BTreeSet::from(["role".to_owned()]);
        assert_eq!(
            attribute_readers(&s, &keys),
            vec![("AuthorizationPolicy prod/admins".to_owned(), ns(&["prod"]))]
        );
        assert!(attribute_readers(&s, &BTreeSet::from(["team".to_owned()])).is_empty());
    }
}
