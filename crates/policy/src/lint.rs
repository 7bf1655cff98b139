//! Semantic checks over a loaded policy set, on top of the schema and reference checks the
//! loader already made. Every check has a stable code listed in [`CODES`].

use crate::diag::Severity;

/// A lint code: stable, documented in docs/policy.md.
#[derive(Debug, Clone, Copy)]
pub struct Code {
    pub code: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    pub summary: &'static str,
}

/// Every code the loader and the linter emit.
pub const CODES: &[Code] = &[
    Code {
        code: "MW101",
        name: "YamlSyntax",
        severity: Severity::Error,
        summary: "the file is not valid YAML",
    },
    Code {
        code: "MW102",
        name: "UnknownField",
        severity: Severity::Error,
        summary: "a field the schema does not know (often a typo)",
    },
    Code {
        code: "MW103",
        name: "InvalidValue",
        severity: Severity::Error,
        summary: "a value of the wrong type or out of range",
    },
    Code {
        code: "MW104",
        name: "MissingField",
        severity: Severity::Error,
        summary: "a required field is missing",
    },
    Code {
        code: "MW105",
        name: "UnknownKind",
        severity: Severity::Error,
        summary: "an unknown kind or apiVersion",
    },
    Code {
        code: "MW106",
        name: "Duplicate",
        severity: Severity::Error,
        summary: "two resources (or rules) with the same name",
    },
    Code {
        code: "MW107",
        name: "MalformedIdentity",
        severity: Severity::Error,
        summary: "a malformed SPIFFE ID, identity pattern or trust domain",
    },
    Code {
        code: "MW108",
        name: "MalformedMatcher",
        severity: Severity::Error,
        summary: "a malformed path, host, method or header matcher",
    },
    Code {
        code: "MW109",
        name: "Unreadable",
        severity: Severity::Error,
        summary: "a file or directory that cannot be read",
    },
    Code {
        code: "MW201",
        name: "UnknownWorkload",
        severity: Severity::Error,
        summary: "a reference to a workload that does not exist",
    },
    Code {
        code: "MW202",
        name: "UnknownService",
        severity: Severity::Error,
        summary: "a reference to a service that does not exist",
    },
    Code {
        code: "MW203",
        name: "UnknownNamespace",
        severity: Severity::Warning,
        summary: "a namespace no workload runs in",
    },
    Code {
        code: "MW204",
        name: "MeshMissing",
        severity: Severity::Error,
        summary: "no `Mesh` resource, or more than one",
    },
    Code {
        code: "MW205",
        name: "UnknownIdentity",
        severity: Severity::Warning,
        summary: "an exact identity no workload has, in the mesh's own trust domain",
    },
    Code {
        code: "MW206",
        name: "UnfederatedTrustDomain",
        severity: Severity::Warning,
        summary: "a foreign trust domain with no `TrustDomainFederation`",
    },
    Code {
        code: "MW207",
        name: "UnknownAttribute",
        severity: Severity::Warning,
        summary: "an attribute key no workload declares",
    },
    Code {
        code: "MW301",
        name: "NeverMatches",
        severity: Severity::Error,
        summary: "a rule that can never match any request",
    },
    Code {
        code: "MW302",
        name: "ShadowedByDeny",
        severity: Severity::Warning,
        summary: "an ALLOW rule whose every request a DENY rule denies first",
    },
    Code {
        code: "MW303",
        name: "IneffectiveAllow",
        severity: Severity::Warning,
        summary: "an ALLOW rule a higher tier never allows",
    },
    Code {
        code: "MW304",
        name: "HttpOnTcp",
        severity: Severity::Error,
        summary: "HTTP conditions on a port that carries plain TCP",
    },
    Code {
        code: "MW305",
        name: "OverrideNoExpiry",
        severity: Severity::Error,
        summary: "an override without `expiresAt`",
    },
    Code {
        code: "MW306",
        name: "OverrideTooLong",
        severity: Severity::Error,
        summary: "an override longer than the mesh allows",
    },
    Code {
        code: "MW307",
        name: "DryRunLeftOn",
        severity: Severity::Warning,
        summary: "a policy in dry-run mode",
    },
    Code {
        code: "MW308",
        name: "OverrideExpired",
        severity: Severity::Warning,
        summary: "an override that has expired and can be removed",
    },
    Code {
        code: "MW309",
        name: "AllowsPlaintext",
        severity: Severity::Warning,
        summary: "an ALLOW rule that also admits plaintext (unauthenticated) sources",
    },
    Code {
        code: "MW310",
        name: "DefaultAllow",
        severity: Severity::Warning,
        summary: "the mesh default action is ALLOW",
    },
    Code {
        code: "MW311",
        name: "TargetsNothing",
        severity: Severity::Warning,
        summary: "a policy whose target matches no workload",
    },
    Code {
        code: "MW312",
        name: "TierScope",
        severity: Severity::Error,
        summary: "a policy's target does not fit its tier",
    },
    Code {
        code: "MW313",
        name: "ConflictingAttributes",
        severity: Severity::Error,
        summary: "workloads sharing an identity declare different attributes",
    },
    Code {
        code: "MW314",
        name: "ReachesOtherNamespaces",
        severity: Severity::Warning,
        summary: "a resource reaches namespaces beyond its own (changing it needs their ownership)",
    },
    Code {
        code: "MW315",
        name: "NotEnforced",
        severity: Severity::Warning,
        summary: "a kind that is accepted and stored but not enforced yet",
    },
];

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;

use crate::decision::{HttpAttrs, Request, Source};
use crate::diag::Diagnostic;
use crate::matcher::IdentityPattern;
use crate::model::{CondKind, Operation, Policy, PolicySet, Rule, SourceMatch, Workload};
use crate::p;
use crate::reference;
use crate::resource::{Action, Mode, MtlsMode, Tier};
use crate::yaml::PathSeg;

/// Every error of a loaded set: the loader's and the linter's (what blocks an apply).
pub fn errors(loaded: &crate::model::Loaded, now: SystemTime) -> Vec<Diagnostic> {
    let mut d: Vec<Diagnostic> = loaded
        .diagnostics
        .iter()
        .filter(|x| x.is_error())
        .cloned()
        .collect();
    if let Some(set) = &loaded.set {
        d.extend(lint(set, now).into_iter().filter(Diagnostic::is_error));
    }
    d
}

/// Runs every semantic check. `now` decides which overrides are expired or too long.
pub fn lint(set: &PolicySet, now: SystemTime) -> Vec<Diagnostic> {
    let mut out = vec![];
    let mut l = Linter {
        set,
        now,
        out: &mut out,
    };
    l.mesh();
    l.overrides();
    for p in &set.policies {
        l.policy(p);
    }
    l.reach();
    l.not_enforced();
    out.sort_by(|a, b| {
        (&a.file, a.line, a.column, a.code).cmp(&(&b.file, b.line, b.column, b.code))
    });
    out.dedup();
    out
}

struct Linter<'a> {
    set: &'a PolicySet,
    now: SystemTime,
    out: &'a mut Vec<Diagnostic>,
}

fn label(kind: &str, id: &str) -> String {
    format!("{kind} {id}")
}

fn rule_path(i: usize, rest: &[PathSeg]) -> Vec<PathSeg> {
    let mut v = p!["spec", "rules", i].to_vec();
    v.extend_from_slice(rest);
    v
}

impl<'a> Linter<'a> {
    fn emit(
        &mut self,
        p: &Policy,
        code: &'static str,
        sev: Severity,
        path: &[PathSeg],
        msg: String,
        help: &str,
    ) {
        if let Some(o) = &p.origin {
            self.out.push(
                o.diag(code, sev, path, msg)
                    .help(help)
                    .resource(label("AuthorizationPolicy", &p.id)),
            );
        }
    }

    fn mesh(&mut self) {
        if self.set.mesh.default_action == crate::resource::DefaultAction::Allow
            && let Some(o) = &self.set.mesh.origin
        {
            self.out.push(
                    o.diag("MW310", Severity::Warning, &p!["spec", "defaultAction"], "the mesh default action is ALLOW: destinations without ALLOW policies accept every caller")
                        .help("use `defaultAction: DENY` and write ALLOW policies"),
                );
        }
    }

    fn overrides(&mut self) {
        let max = self.set.mesh.max_override_duration;
        for o in &self.set.overrides {
            let Some(origin) = &o.origin else { continue };
            let res = label("Override", &o.id);
            match o.expires_at {
                None => self.out.push(
                    origin
                        .diag(
                            "MW305",
                            Severity::Error,
                            &p!["spec", "expiresAt"],
                            "the override has no `expiresAt`; overrides are always time-bound",
                        )
                        .help(format!(
                            "add `expiresAt:` at most {} from its start",
                            humantime::format_duration(max)
                        ))
                        .resource(res),
                ),
                Some(exp) => {
                    let start = o.starts_at.unwrap_or(self.now);
                    let len = exp.duration_since(start).unwrap_or(Duration::ZERO);
                    if len > max {
                        self.out.push(
                            origin
                                .diag("MW306", Severity::Error, &p!["spec", "expiresAt"], format!("the override lasts {} but the mesh allows at most {}", humantime::format_duration(round(len)), humantime::format_duration(max)))
                                .help("shorten it, or raise `Mesh.spec.maxOverrideDuration` through a reviewed change")
                                .resource(res),
                        );
                    } else if exp <= self.now {
                        self.out.push(
                            origin
                                .diag(
                                    "MW308",
                                    Severity::Warning,
                                    &p!["spec", "expiresAt"],
                                    "the override has expired and no longer applies",
                                )
                                .help("delete it from the repository")
                                .resource(res),
                        );
                    }
                }
            }
        }
    }

    /// MW314: a resource other than a baseline policy whose target or subject reaches
    /// namespaces beyond its own (crate::scope): whoever changes it needs their ownership.
    fn reach(&mut self) {
        let set = self.set;
        let mut items: Vec<(&str, &str, &crate::model::Origin)> = vec![];
        for p in &set.policies {
            if p.tier != Tier::Baseline
                && let Some(o) = &p.origin
            {
                items.push(("AuthorizationPolicy", &p.id, o));
            }
        }
        for o in &set.overrides {
            if let Some(origin) = &o.origin {
                items.push(("Override", &o.id, origin));
            }
        }
        for x in &set.rate_limits {
            items.push(("RateLimitPolicy", &x.id, &x.origin));
        }
        for x in &set.traffic {
            items.push(("TrafficPolicy", &x.id, &x.origin));
        }
        for x in &set.faults {
            items.push(("FaultInjection", &x.id, &x.origin));
        }
        for (kind, id, origin) in items {
            let (ns, name) = id.split_once('/').unwrap_or(("", id));
            let Some(reach) = crate::scope::resource(set, kind, ns, name) else {
                continue;
            };
            let quarantine = kind == "Override"
                && set.overrides.iter().any(|o| {
                    *o.id == *id && o.action == crate::resource::OverrideAction::Quarantine
                });
            let field = if quarantine {
                p!["spec", "subject"].to_vec()
            } else {
                p!["spec", "target"].to_vec()
            };
            let (msg, help) = match reach.beyond(ns) {
                Some(v) if v.is_empty() => continue,
                Some(v) => {
                    let names: Vec<String> = v.iter().map(|n| format!("`{n}`")).collect();
                    (
                        format!(
                            "this {kind} in `{ns}` reaches namespace(s) {} too",
                            names.join(", ")
                        ),
                        format!(
                            "a change to it needs an operator who owns {} as well as `{ns}`; keep resources in the namespace they affect",
                            names.join(", ")
                        ),
                    )
                }
                None => (
                    format!(
                        "this {kind} in `{ns}` reaches every namespace: its {} names no workload, service or namespace",
                        if quarantine { "subject" } else { "target" }
                    ),
                    if quarantine {
                        "a change to it needs platform-security and a second approval; name the subject's identities or `namespaces`".to_owned()
                    } else {
                        format!(
                            "a change to it needs platform-security and a second approval; add `namespaces: [{ns}]` to the target to keep it in `{ns}`"
                        )
                    },
                ),
            };
            self.out.push(
                origin
                    .diag("MW314", Severity::Warning, &field, msg)
                    .help(help)
                    .resource(label(kind, id)),
            );
        }
    }

    /// MW315: kinds that are validated and stored but that no proxy enforces yet.
    fn not_enforced(&mut self) {
        let set = self.set;
        let items = set
            .federations
            .iter()
            .map(|x| ("TrustDomainFederation", &x.id, &x.origin));
        for (kind, id, origin) in items {
            self.out.push(
                origin
                    .diag(
                        "MW315",
                        Severity::Warning,
                        &p!["kind"],
                        format!("`{kind}` is accepted but not enforced yet: {kind} {id} has no effect on traffic"),
                    )
                    .help("it is validated and stored so that it is ready when enforcement lands; do not rely on it meanwhile")
                    .resource(label(kind, id)),
            );
        }
    }

    fn targets(&self, p: &Policy) -> Vec<&'a Workload> {
        self.set
            .workloads
            .iter()
            .filter(|w| p.target.matches(w))
            .collect()
    }

    fn policy(&mut self, p: &Policy) {
        if p.mode == Mode::DryRun {
            self.emit(p, "MW307", Severity::Warning, &p!["spec", "mode"], "the policy is in dry-run mode: it is evaluated in the shadow pass only and enforces nothing".into(), "set `mode: enforce` once its shadow verdicts look right, or delete it");
        }
        let dests = self.targets(p);
        if dests.is_empty() {
            self.emit(
                p,
                "MW311",
                Severity::Warning,
                &p!["spec", "target"],
                "the policy's target matches no workload".into(),
                "check the target's names, namespaces, labels and attributes",
            );
        }
        for (i, r) in p.rules.iter().enumerate() {
            self.identities(p, i, r);
            self.never_matches(p, i, r);
            self.http_on_tcp(p, i, r, &dests);
            if p.action == Action::Allow && p.mode == Mode::Enforce {
                if self.set.mesh.mtls_mode == MtlsMode::Permissive {
                    for (j, m) in r.from.iter().enumerate() {
                        if m.is_negative_only() {
                            self.emit(p, "MW309", Severity::Warning, &rule_path(i, &p!["from", j]), "this `from` entry has only negative fields, so it also admits plaintext sources".into(), "add a positive field (identities, namespaces, trustDomains or attributes)");
                        }
                    }
                }
                self.shadowed(p, i, r, &dests);
                self.ineffective(p, i, r, &dests);
            }
        }
    }

    fn identities(&mut self, p: &Policy, i: usize, r: &Rule) {
        let td = self.set.mesh.trust_domain.as_str();
        let federated: BTreeSet<&str> = self
            .set
            .federations
            .iter()
            .map(|f| f.spec.trust_domain.as_str())
            .collect();
        let declared: BTreeSet<&str> = self
            .set
            .workloads
            .iter()
            .flat_map(|w| w.attributes.keys().map(String::as_str))
            .collect();
        for (j, m) in r.from.iter().enumerate() {
            for (field, list) in [
                ("identities", &m.identities),
                ("notIdentities", &m.not_identities),
            ] {
                for (k, pat) in list.iter().enumerate() {
                    let path = rule_path(i, &p!["from", j, field, k]);
                    let (ptd, exact) = match pat {
                        IdentityPattern::Exact(id) => (id.trust_domain_name().to_owned(), Some(id)),
                        IdentityPattern::Glob { trust_domain, .. } => {
                            (trust_domain.as_str().to_owned(), None)
                        }
                    };
                    if ptd == td {
                        if let Some(id) = exact
                            && self.set.workload_by_identity(id).is_none()
                        {
                            self.emit(
                                p,
                                "MW205",
                                Severity::Warning,
                                &path,
                                format!("no workload has the identity `{id}`"),
                                &suggest_identity(id, self.set),
                            );
                        }
                    } else if !federated.contains(ptd.as_str()) {
                        self.emit(
                            p,
                            "MW206",
                            Severity::Warning,
                            &path,
                            format!("trust domain `{ptd}` is neither the mesh's nor federated"),
                            "add a `TrustDomainFederation` for it, or fix the trust domain",
                        );
                    }
                }
            }
            let keys = m
                .attributes
                .iter()
                .chain(&m.not_attributes)
                .map(|(k, _)| k)
                .chain(&m.same_attributes)
                .chain(&m.different_attributes);
            for k in keys {
                if !declared.contains(k.as_str()) {
                    self.emit(
                        p,
                        "MW207",
                        Severity::Warning,
                        &rule_path(i, &p!["from", j]),
                        format!("no workload declares the attribute `{k}`"),
                        "check the attribute's spelling against the workloads' `spec.attributes`",
                    );
                }
            }
        }
    }

    fn never_matches(&mut self, p: &Policy, i: usize, r: &Rule) {
        let strict = self.set.mesh.mtls_mode == MtlsMode::Strict;
        for (j, m) in r.from.iter().enumerate() {
            if let Some(why) = source_contradiction(m) {
                self.emit(
                    p,
                    "MW301",
                    Severity::Error,
                    &rule_path(i, &p!["from", j]),
                    format!("this `from` entry can never match: {why}"),
                    "remove the contradiction, or the entry",
                );
            }
        }
        if strict
            && p.action != Action::Deny
            && !r.from.is_empty()
            && r.from.iter().all(|m| m.unauthenticated)
        {
            self.emit(
                p,
                "MW301",
                Severity::Error,
                &rule_path(i, &p!["from"]),
                "the rule only matches plaintext sources, which the mesh refuses (mtlsMode STRICT)"
                    .into(),
                "remove the rule, or set `mtlsMode: PERMISSIVE` on purpose",
            );
        }
        for (j, op) in r.to.iter().enumerate() {
            if let Some(why) = op_contradiction(op) {
                self.emit(
                    p,
                    "MW301",
                    Severity::Error,
                    &rule_path(i, &p!["to", j]),
                    format!("this `to` entry can never match: {why}"),
                    "remove the contradiction, or the entry",
                );
            }
        }
        for (j, c) in r.when.iter().enumerate() {
            if let CondKind::NotValues(ms) = &c.kind
                && ms.contains(&crate::matcher::StringMatch::Any)
                && p.action != Action::Deny
            {
                self.emit(p, "MW301", Severity::Error, &rule_path(i, &p!["when", j]), "`notValues: [\"*\"]` excludes every value; it only holds when the header is absent".into(), "use `present: false`");
            }
        }
    }

    fn http_on_tcp(&mut self, p: &Policy, i: usize, r: &Rule, dests: &[&Workload]) {
        if !r.has_http() {
            return;
        }
        let deny = p.action == Action::Deny;
        let consequence = if deny {
            "so the DENY applies to all of that port's traffic"
        } else {
            "so the rule never matches there"
        };
        let is_tcp = |w: &Workload, port: u16| w.protocol(port).is_some_and(|pr| !pr.is_http());
        for (j, op) in r.to.iter().enumerate() {
            if !op.has_http() && r.when.is_empty() {
                continue;
            }
            for port in &op.ports {
                if let Some(w) = dests.iter().find(|w| is_tcp(w, *port)) {
                    self.emit(p, "MW304", Severity::Error, &rule_path(i, &p!["to", j, "ports"]), format!("the rule has HTTP conditions but port {port} of `{}` carries plain TCP, {consequence}", w.id), "drop the HTTP conditions for this port, or declare the port as HTTP");
                    return;
                }
            }
        }
        // HTTP conditions without explicit ports apply to every port of every target.
        let unported = r.to.is_empty()
            || r.to
                .iter()
                .any(|op| op.ports.is_empty() && (op.has_http() || !r.when.is_empty()));
        if !unported {
            return;
        }
        for w in dests {
            let tcp: Vec<u16> = w
                .ports
                .iter()
                .filter(|pt| !pt.protocol.is_http())
                .map(|pt| pt.port)
                .collect();
            let all_tcp = !w.ports.is_empty() && tcp.len() == w.ports.len();
            if (deny && !tcp.is_empty()) || (!deny && all_tcp) {
                let list = tcp
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                self.emit(p, "MW304", Severity::Error, &rule_path(i, &[]), format!("the rule has HTTP conditions and no ports, and `{}` carries plain TCP on port {list}, {consequence}", w.id), "list the HTTP ports in `to.ports`, or narrow the target");
                return;
            }
        }
    }

    fn shadowed(&mut self, p: &Policy, i: usize, r: &Rule, dests: &[&Workload]) {
        if dests.is_empty() {
            return;
        }
        // Structural cover: a DENY rule that matches everything this rule matches.
        for q in self
            .set
            .policies
            .iter()
            .filter(|q| q.action == Action::Deny && q.mode == Mode::Enforce)
        {
            if !dests.iter().all(|w| q.target.matches(w)) {
                continue;
            }
            if let Some(d) = q.rules.iter().find(|d| rule_covers(d, r)) {
                self.emit(
                    p,
                    "MW302",
                    Severity::Warning,
                    &rule_path(i, &[]),
                    format!(
                        "every request this rule allows is denied first by `{}` rule `{}`",
                        q.id, d.name
                    ),
                    "remove the ALLOW rule, or narrow the DENY",
                );
                return;
            }
        }
        // Over the known workloads: every concrete request it allows is denied.
        let mut any = false;
        let mut first: Option<(String, String)> = None;
        for w in dests {
            for req in witnesses(self.set, r, w, self.now) {
                any = true;
                let set = self.set;
                let hit = set
                    .policies
                    .iter()
                    .filter(|q| {
                        q.action == Action::Deny && q.mode == Mode::Enforce && q.target.matches(w)
                    })
                    .find_map(|q| {
                        q.rules
                            .iter()
                            .find(|d| reference::rule_matches(self.set, d, Action::Deny, &req, w))
                            .map(|d| (q.id.to_string(), d.name.to_string()))
                    });
                match hit {
                    Some(h) => {
                        first.get_or_insert(h);
                    }
                    None => return,
                }
            }
        }
        if let (true, Some((q, d))) = (any, first) {
            self.emit(p, "MW302", Severity::Warning, &rule_path(i, &[]), format!("every request this rule allows from the known workloads is denied first, e.g. by `{q}` rule `{d}`"), "remove the ALLOW rule, or narrow the DENY");
        }
    }

    fn ineffective(&mut self, p: &Policy, i: usize, r: &Rule, dests: &[&Workload]) {
        if p.tier == Tier::Baseline {
            return;
        }
        for w in dests {
            let witnesses = witnesses(self.set, r, w, self.now);
            if witnesses.is_empty() {
                continue;
            }
            for tier in Tier::ALL.iter().filter(|t| **t < p.tier) {
                let higher: Vec<&Policy> = self
                    .set
                    .policies
                    .iter()
                    .filter(|q| {
                        q.tier == *tier
                            && q.action == Action::Allow
                            && q.mode == Mode::Enforce
                            && q.target.matches(w)
                    })
                    .collect();
                if higher.is_empty() {
                    continue;
                }
                let any = witnesses.iter().any(|req| {
                    higher.iter().any(|q| {
                        q.rules
                            .iter()
                            .any(|hr| reference::rule_matches(self.set, hr, Action::Allow, req, w))
                    })
                });
                if !any {
                    self.emit(p, "MW303", Severity::Warning, &rule_path(i, &[]), format!("the {} tier never allows what this rule allows for `{}`, so the rule has no effect there", tier.as_str(), w.id), "tiers intersect: a lower tier can only narrow what a higher tier allows; widen the higher tier first");
                    return;
                }
            }
        }
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn suggest_identity(id: &SpiffeId, set: &PolicySet) -> String {
    let ids: Vec<String> = set
        .workloads
        .iter()
        .map(|w| w.identity.to_string())
        .collect();
    match crate::yaml::did_you_mean(id.as_str(), ids.iter().map(String::as_str)) {
        Some(s) => format!("did you mean `{s}`?"),
        None => "check the namespace and service account against the workloads".into(),
    }
}

/// Why a source entry can never match, if it cannot.
fn source_contradiction(m: &SourceMatch) -> Option<String> {
    for (k, vs) in &m.attributes {
        if let Some((_, nvs)) = m.not_attributes.iter().find(|(nk, _)| nk == k)
            && vs.iter().all(|v| nvs.contains(v))
        {
            return Some(format!("attribute `{k}` is both required and excluded"));
        }
    }
    if let Some(k) = m
        .same_attributes
        .iter()
        .find(|k| m.different_attributes.contains(k))
    {
        return Some(format!(
            "attribute `{k}` must be both the same as and different from the destination's"
        ));
    }
    if !m.namespaces.is_empty() && m.namespaces.iter().all(|n| m.not_namespaces.contains(n)) {
        return Some("every namespace it names is also excluded".into());
    }
    if !m.trust_domains.is_empty()
        && m.trust_domains
            .iter()
            .all(|t| m.not_trust_domains.contains(t))
    {
        return Some("every trust domain it names is also excluded".into());
    }
    if !m.identities.is_empty() {
        let exact: Vec<&SpiffeId> = m
            .identities
            .iter()
            .filter_map(|p| match p {
                IdentityPattern::Exact(id) => Some(id),
                IdentityPattern::Glob { .. } => None,
            })
            .collect();
        if exact.len() == m.identities.len() {
            let possible = exact.iter().any(|id| {
                !m.not_identities.iter().any(|n| n.matches(id))
                    && (m.trust_domains.is_empty()
                        || m.trust_domains.iter().any(|t| t == id.trust_domain_name()))
                    && !m
                        .not_trust_domains
                        .iter()
                        .any(|t| t == id.trust_domain_name())
                    && (m.namespaces.is_empty()
                        || id
                            .namespace()
                            .is_some_and(|ns| m.namespaces.iter().any(|n| n == ns)))
            });
            if !possible {
                return Some("no identity it names also satisfies its other fields".into());
            }
        }
    }
    None
}

/// Why an operation can never match, if it cannot.
fn op_contradiction(op: &Operation) -> Option<String> {
    if !op.methods.is_empty() && op.methods.iter().all(|m| op.not_methods.contains(m)) {
        return Some("every method it names is also excluded".into());
    }
    if !op.paths.is_empty()
        && op
            .paths
            .iter()
            .all(|p| op.not_paths.iter().any(|n| n.covers(p)))
    {
        return Some("every path it names is also excluded by `notPaths`".into());
    }
    None
}

/// Whether DENY rule `d` matches every request ALLOW rule `r` matches (sound, incomplete).
fn rule_covers(d: &Rule, r: &Rule) -> bool {
    if !d.when.is_empty() {
        return false;
    }
    let from_ok = d.from.is_empty()
        || (!r.from.is_empty()
            && r.from
                .iter()
                .all(|rm| d.from.iter().any(|dm| source_covers(dm, rm))));
    let to_ok = d.to.is_empty()
        || (!r.to.is_empty()
            && r.to
                .iter()
                .all(|ro| d.to.iter().any(|dop| op_covers(dop, ro))));
    from_ok && to_ok
}

fn source_covers(d: &SourceMatch, r: &SourceMatch) -> bool {
    if d == r {
        return true;
    }
    let only = |m: &SourceMatch, f: fn(&SourceMatch) -> bool| f(m) && !m.is_negative_only();
    // A deny by namespaces alone covers entries confined to those namespaces.
    if only(d, |m| {
        *m == SourceMatch {
            namespaces: m.namespaces.clone(),
            ..Default::default()
        }
    }) {
        if !r.namespaces.is_empty() && r.namespaces.iter().all(|n| d.namespaces.contains(n)) {
            return true;
        }
        if !r.identities.is_empty()
            && r.identities.iter().all(|p| matches!(p, IdentityPattern::Exact(id) if id.namespace().is_some_and(|ns| d.namespaces.iter().any(|n| n == ns))))
        {
            return true;
        }
    }
    // A deny by identities alone covers entries whose identities it all matches.
    if only(d, |m| {
        *m == SourceMatch {
            identities: m.identities.clone(),
            ..Default::default()
        }
    }) && !r.identities.is_empty()
    {
        return r.identities.iter().all(|p| match p {
            IdentityPattern::Exact(id) => d.identities.iter().any(|dp| dp.matches(id)),
            g => d.identities.contains(g),
        });
    }
    false
}

fn op_covers(d: &Operation, r: &Operation) -> bool {
    let sub = |dv: &Vec<String>, rv: &Vec<String>| {
        dv.is_empty() || (!rv.is_empty() && rv.iter().all(|x| dv.contains(x)))
    };
    (d.ports.is_empty() || (!r.ports.is_empty() && r.ports.iter().all(|p| d.ports.contains(p))))
        && sub(&d.methods, &r.methods)
        && d.not_methods.is_empty()
        && (d.paths.is_empty()
            || (!r.paths.is_empty()
                && r.paths
                    .iter()
                    .all(|rp| d.paths.iter().any(|dp| dp.covers(rp)))))
        && d.not_paths.is_empty()
        && (d.hosts.is_empty()
            || (!r.hosts.is_empty() && r.hosts.iter().all(|h| d.hosts.contains(h))))
}

/// Concrete requests, over the workloads the set knows, that rule `r` matches at `w`.
pub fn witnesses(set: &PolicySet, r: &Rule, w: &Workload, now: SystemTime) -> Vec<Request> {
    let mut sources: Vec<Source> = set
        .workloads
        .iter()
        .map(|x| Source::Authenticated(x.identity.clone()))
        .collect();
    for m in &r.from {
        for p in &m.identities {
            if let IdentityPattern::Exact(id) = p {
                sources.push(Source::Authenticated(id.clone()));
            }
        }
        if m.unauthenticated {
            sources.push(Source::Unauthenticated);
        }
    }
    sources.dedup();
    let mut ports: Vec<u16> = r.to.iter().flat_map(|o| o.ports.iter().copied()).collect();
    if ports.is_empty() {
        ports = w.ports.iter().map(|p| p.port).collect();
    }
    let mut out = vec![];
    for port in ports {
        let http = w.protocol(port).is_none_or(|p| p.is_http());
        let https: Vec<Option<HttpAttrs>> = if !http {
            vec![None]
        } else {
            let ops: Vec<&Operation> = if r.to.is_empty() {
                vec![]
            } else {
                r.to.iter().collect()
            };
            let mut v = vec![];
            let headers: Vec<(String, String)> = r
                .when
                .iter()
                .filter_map(|c| match &c.kind {
                    CondKind::Values(ms) => ms.first().map(|m| (c.header.clone(), m.example())),
                    CondKind::Present(true) => Some((c.header.clone(), "x".into())),
                    _ => None,
                })
                .collect();
            if ops.is_empty() {
                v.push(Some(HttpAttrs {
                    method: "GET".into(),
                    path: "/".into(),
                    host: None,
                    headers: headers.clone(),
                }));
            }
            for op in ops {
                let method = op.methods.first().cloned().unwrap_or_else(|| "GET".into());
                let paths: Vec<String> = if op.paths.is_empty() {
                    vec!["/".into()]
                } else {
                    op.paths.iter().map(|p| p.example()).collect()
                };
                for path in paths {
                    let host = op.hosts.first().map(|h| h.to_string().replace('*', "x"));
                    v.push(Some(HttpAttrs {
                        method: method.clone(),
                        path,
                        host,
                        headers: headers.clone(),
                    }));
                }
            }
            v
        };
        for source in &sources {
            for h in &https {
                let req = Request {
                    source: source.clone(),
                    destination: w.id.clone(),
                    port,
                    http: h.clone(),
                    at: now,
                };
                if reference::rule_matches(set, r, Action::Allow, &req, w) {
                    out.push(req);
                }
            }
        }
    }
    out
}
