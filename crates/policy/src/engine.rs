//! The compiled policy engine the proxy runs on every connection and request.
//!
//! [`Engine::compile`] resolves every policy's target once and builds, per destination
//! workload and per evaluation step, a rule group indexed by source: exact identities and
//! identity-pattern prefixes, namespaces, trust domains and attribute values go to hash
//! buckets, so a decision looks at the few rules that can concern its source instead of all
//! of them. Rules keep their evaluation order as ordinals; the first match is found by
//! scanning each bucket in ordinal order and never looking past the best match so far.
//! Methods become bit masks and hosts are normalized once per request.
//!
//! The engine must agree with [`crate::reference`] on every request; the property test in
//! `tests/differential.rs` checks that.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use meshward_identity::SpiffeId;

use crate::decision::{
    Decision, PolicyRevision, Reason, Request, RuleRef, ShadowDecision, Source, Verdict,
    WorkloadRef, is_opaque,
};
use crate::matcher::{HostPattern, IdentityPattern, PathPattern, normalize_host};
use crate::model::{
    CondKind, Condition, Operation, Override, Policy, PolicySet, SourceMatch, Workload,
};
use crate::resource::{Action, DefaultAction, Mode, MtlsMode, OverrideAction, Tier};

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn method_bit(m: &str) -> u16 {
    METHODS.iter().position(|x| *x == m).map_or(0, |i| 1 << i)
}

/// Methods as a bit mask of the standard ones plus a list of the others.
#[derive(Debug, Clone, Default)]
struct MethodSet {
    mask: u16,
    other: Vec<Box<str>>,
}

impl MethodSet {
    fn new(list: &[String]) -> Self {
        let mut s = MethodSet::default();
        for m in list {
            match method_bit(m) {
                0 => s.other.push(m.as_str().into()),
                b => s.mask |= b,
            }
        }
        s
    }
    fn is_empty(&self) -> bool {
        self.mask == 0 && self.other.is_empty()
    }
    fn contains(&self, bit: u16, m: &str) -> bool {
        if bit != 0 {
            self.mask & bit != 0
        } else {
            self.other.iter().any(|o| &**o == m)
        }
    }
}

#[derive(Debug, Clone)]
struct COp {
    ports: Vec<u16>,
    methods: MethodSet,
    not_methods: MethodSet,
    paths: Vec<PathPattern>,
    not_paths: Vec<PathPattern>,
    hosts: Vec<HostPattern>,
    has_http: bool,
}

impl COp {
    fn new(o: &Operation) -> Self {
        COp {
            ports: o.ports.clone(),
            methods: MethodSet::new(&o.methods),
            not_methods: MethodSet::new(&o.not_methods),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
            hosts: o.hosts.clone(),
            has_http: o.has_http(),
        }
    }

    fn matches(&self, deny: bool, cx: &Cx<'_>) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&cx.req.port) {
            return false;
        }
        let Some(http) = &cx.req.http else {
            return deny || !self.has_http;
        };
        if !self.has_http {
            return true;
        }
        if !self.methods.is_empty() && !self.methods.contains(cx.method_bit, &http.method) {
            return false;
        }
        if self.not_methods.contains(cx.method_bit, &http.method) {
            return false;
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| p.matches(&http.path)) {
            return false;
        }
        if self.not_paths.iter().any(|p| p.matches(&http.path)) {
            return false;
        }
        if !self.hosts.is_empty() {
            return match &cx.host {
                Some(h) => self.hosts.iter().any(|p| p.matches(h)),
                None => deny,
            };
        }
        true
    }
}

#[derive(Debug, Clone)]
struct CRule {
    policy: Arc<str>,
    name: Arc<str>,
    tier: Tier,
    from: Vec<SourceMatch>,
    ops: Vec<COp>,
    when: Vec<Condition>,
}

/// Per-request facts computed once.
struct Cx<'a> {
    req: &'a Request,
    id: Option<&'a SpiffeId>,
    /// Namespace of the source when it is a workload of the mesh's own trust domain.
    own_ns: Option<&'a str>,
    src_attrs: &'a BTreeMap<String, String>,
    dst_attrs: &'a BTreeMap<String, String>,
    host: Option<String>,
    method_bit: u16,
}

fn src_matches(m: &SourceMatch, cx: &Cx<'_>) -> bool {
    if m.unauthenticated {
        return cx.id.is_none();
    }
    let same = |k: &String| matches!((cx.src_attrs.get(k), cx.dst_attrs.get(k)), (Some(a), Some(b)) if a == b);
    let has = |(k, vs): &(String, Vec<String>)| cx.src_attrs.get(k).is_some_and(|v| vs.contains(v));
    let Some(id) = cx.id else {
        return m.is_negative_only()
            && !m.not_attributes.iter().any(has)
            && !m.different_attributes.iter().any(same);
    };
    let td = id.trust_domain_name();
    if !m.identities.is_empty() && !m.identities.iter().any(|p| p.matches(id)) {
        return false;
    }
    if m.not_identities.iter().any(|p| p.matches(id)) {
        return false;
    }
    if !m.namespaces.is_empty()
        && !cx
            .own_ns
            .is_some_and(|ns| m.namespaces.iter().any(|n| n == ns))
    {
        return false;
    }
    if let Some(ns) = cx.own_ns
        && m.not_namespaces.iter().any(|n| n == ns)
    {
        return false;
    }
    if !m.trust_domains.is_empty() && !m.trust_domains.iter().any(|t| t == td) {
        return false;
    }
    if m.not_trust_domains.iter().any(|t| t == td) {
        return false;
    }
    m.attributes.iter().all(has)
        && !m.not_attributes.iter().any(has)
        && m.same_attributes.iter().all(same)
        && !m.different_attributes.iter().any(same)
}

fn cond_holds(c: &Condition, deny: bool, cx: &Cx<'_>) -> bool {
    let Some(http) = &cx.req.http else {
        return deny;
    };
    let mut n = 0usize;
    // Every element of every value (commas split); an opaque (non-UTF-8) element satisfies
    // a DENY and fails an ALLOW, whatever the matchers.
    match &c.kind {
        CondKind::Present(p) => http.header_values(&c.header).next().is_some() == *p,
        CondKind::Values(ms) => {
            for v in http.header_elements(&c.header) {
                n += 1;
                let ok = if is_opaque(v) {
                    deny
                } else {
                    ms.iter().any(|m| m.matches(v))
                };
                if deny && ok {
                    return true;
                }
                if !deny && !ok {
                    return false;
                }
            }
            !deny && n > 0
        }
        CondKind::NotValues(ms) => {
            for v in http.header_elements(&c.header) {
                n += 1;
                let ok = if is_opaque(v) {
                    deny
                } else {
                    !ms.iter().any(|m| m.matches(v))
                };
                if deny && ok {
                    return true;
                }
                if !deny && !ok {
                    return false;
                }
            }
            // No value at all satisfies a negative condition; otherwise a DENY saw no
            // satisfying value and an ALLOW saw only satisfying ones.
            n == 0 || !deny
        }
    }
}

impl CRule {
    fn matches(&self, deny: bool, cx: &Cx<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|m| src_matches(m, cx)))
            && (self.ops.is_empty() || self.ops.iter().any(|o| o.matches(deny, cx)))
            && self.when.iter().all(|c| cond_holds(c, deny, cx))
    }
}

/// Rule ordinals bucketed by what a source must be for the rule to match.
#[derive(Debug, Clone, Default)]
struct SourceIndex {
    exact: HashMap<Box<str>, Vec<u32>>,
    prefix: HashMap<Box<str>, Vec<u32>>,
    namespace: HashMap<Box<str>, Vec<u32>>,
    trust_domain: HashMap<Box<str>, Vec<u32>>,
    attr: HashMap<Box<str>, HashMap<Box<str>, Vec<u32>>>,
    unauth: Vec<u32>,
    /// Rules with no indexable source but path conditions on every operation, filed under
    /// the literal segments their patterns start with.
    by_path: PathTrie,
    /// Every rule in `by_path`, for requests without a path (plain TCP).
    path_all: Vec<u32>,
    always: Vec<u32>,
}

/// Rule ordinals keyed by literal path segments.
#[derive(Debug, Clone, Default)]
struct PathTrie {
    children: HashMap<Box<str>, PathTrie>,
    here: Vec<u32>,
}

impl PathTrie {
    fn insert(&mut self, segs: &[&str], ord: u32) {
        let mut node = self;
        for s in segs {
            node = node.children.entry((*s).into()).or_default();
        }
        if node.here.last() != Some(&ord) {
            node.here.push(ord);
        }
    }

    /// Calls `f` with the rules of every node on the path's way down.
    fn visit<'s>(&'s self, path: &str, f: &mut impl FnMut(&'s [u32]) -> bool) -> bool {
        let mut node = self;
        if !node.here.is_empty() && !f(&node.here) {
            return false;
        }
        for seg in path.get(1..).unwrap_or("").split('/') {
            match node.children.get(seg) {
                Some(c) => {
                    node = c;
                    if !node.here.is_empty() && !f(&node.here) {
                        return false;
                    }
                }
                None => break,
            }
        }
        true
    }
}

/// The literal segments a path pattern starts with, as the trie walks a request path.
fn path_key(p: &PathPattern) -> Vec<&str> {
    match p {
        PathPattern::Any => vec![],
        PathPattern::Exact(x) | PathPattern::Prefix(x) => {
            x.get(1..).unwrap_or("").split('/').collect()
        }
        PathPattern::Glob { segs, .. } => segs
            .iter()
            .map_while(|s| match s {
                crate::matcher::Seg::Lit(l) => Some(l.as_str()),
                crate::matcher::Seg::Any => None,
            })
            .collect(),
    }
}

/// One evaluation step's rules for one destination.
#[derive(Debug, Clone, Default)]
struct Group {
    rules: Vec<CRule>,
    index: SourceIndex,
}

impl Group {
    fn push(&mut self, rule: CRule) {
        let ord = u32::try_from(self.rules.len()).unwrap_or(u32::MAX);
        let ix = &mut self.index;
        // A rule is filed under one necessary condition per `from` entry; one entry with
        // nothing indexable (or no `from` at all) makes it a rule to check always.
        let indexable = !rule.from.is_empty()
            && rule.from.iter().all(|m| {
                m.unauthenticated
                    || !m.identities.is_empty()
                    || !m.namespaces.is_empty()
                    || !m.attributes.is_empty()
                    || !m.trust_domains.is_empty()
            });
        let path_indexable = !rule.ops.is_empty() && rule.ops.iter().all(|o| !o.paths.is_empty());
        if !indexable && path_indexable {
            for o in &rule.ops {
                for p in &o.paths {
                    ix.by_path.insert(&path_key(p), ord);
                }
            }
            ix.path_all.push(ord);
        } else if !indexable {
            ix.always.push(ord);
        } else {
            for m in &rule.from {
                if m.unauthenticated {
                    ix.unauth.push(ord);
                } else if !m.identities.is_empty() {
                    for p in &m.identities {
                        match p {
                            IdentityPattern::Exact(id) => {
                                ix.exact.entry(id.as_str().into()).or_default().push(ord)
                            }
                            IdentityPattern::Glob { .. } => ix
                                .prefix
                                .entry(p.literal_prefix().0.into())
                                .or_default()
                                .push(ord),
                        }
                    }
                } else if !m.namespaces.is_empty() {
                    for ns in &m.namespaces {
                        ix.namespace
                            .entry(ns.as_str().into())
                            .or_default()
                            .push(ord);
                    }
                } else if let Some((k, vs)) = m.attributes.first() {
                    let by_v = ix.attr.entry(k.as_str().into()).or_default();
                    for v in vs {
                        by_v.entry(v.as_str().into()).or_default().push(ord);
                    }
                } else {
                    for td in &m.trust_domains {
                        ix.trust_domain
                            .entry(td.as_str().into())
                            .or_default()
                            .push(ord);
                    }
                }
            }
        }
        self.rules.push(rule);
    }

    /// Removes duplicate ordinals a rule got from several `from` entries.
    fn seal(&mut self) {
        let ix = &mut self.index;
        let dedup = |v: &mut Vec<u32>| v.dedup();
        ix.exact.values_mut().for_each(dedup);
        ix.prefix.values_mut().for_each(dedup);
        ix.namespace.values_mut().for_each(dedup);
        ix.trust_domain.values_mut().for_each(dedup);
        ix.attr
            .values_mut()
            .flat_map(|m| m.values_mut())
            .for_each(dedup);
        dedup(&mut ix.unauth);
    }

    fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Calls `f` with every bucket that may hold rules matching this request's source.
    fn buckets<'s>(&'s self, cx: &Cx<'_>, mut f: impl FnMut(&'s [u32]) -> bool) {
        let ix = &self.index;
        if !ix.always.is_empty() && !f(&ix.always) {
            return;
        }
        if !ix.path_all.is_empty() {
            let more = match &cx.req.http {
                Some(h) => ix.by_path.visit(&h.path, &mut f),
                None => f(&ix.path_all),
            };
            if !more {
                return;
            }
        }
        let Some(id) = cx.id else {
            if !ix.unauth.is_empty() {
                f(&ix.unauth);
            }
            return;
        };
        let s = id.as_str();
        if !ix.exact.is_empty()
            && let Some(v) = ix.exact.get(s)
            && !f(v)
        {
            return;
        }
        if !ix.prefix.is_empty() {
            // Every segment boundary of the ID, from the trust domain on, but not the end.
            let start = "spiffe://".len();
            let mut bounds: Vec<usize> = s[start..]
                .match_indices('/')
                .map(|(i, _)| start + i)
                .collect();
            if bounds.is_empty() {
                bounds.push(s.len());
            }
            for b in bounds {
                if let Some(v) = ix.prefix.get(&s[..b])
                    && !f(v)
                {
                    return;
                }
            }
        }
        if let (Some(ns), false) = (cx.own_ns, ix.namespace.is_empty())
            && let Some(v) = ix.namespace.get(ns)
            && !f(v)
        {
            return;
        }
        if !ix.trust_domain.is_empty()
            && let Some(v) = ix.trust_domain.get(id.trust_domain_name())
            && !f(v)
        {
            return;
        }
        if !ix.attr.is_empty() {
            for (k, v) in cx.src_attrs {
                if let Some(v) = ix.attr.get(k.as_str()).and_then(|m| m.get(v.as_str()))
                    && !f(v)
                {
                    return;
                }
            }
        }
    }

    /// The first rule (in evaluation order) that matches.
    fn first_match(&self, deny: bool, cx: &Cx<'_>) -> Option<&CRule> {
        if self.rules.is_empty() {
            return None;
        }
        let mut best = u32::MAX;
        self.buckets(cx, |ords| {
            for &o in ords {
                if o >= best {
                    break;
                }
                if self.rules[o as usize].matches(deny, cx) {
                    best = o;
                    break;
                }
            }
            best != 0
        });
        self.rules.get(best as usize)
    }

    /// Every matching rule, in evaluation order.
    fn all_matches(&self, cx: &Cx<'_>) -> Vec<&CRule> {
        let mut hits = vec![];
        self.buckets(cx, |ords| {
            hits.extend(
                ords.iter()
                    .copied()
                    .filter(|&o| self.rules[o as usize].matches(false, cx)),
            );
            true
        });
        hits.sort_unstable();
        hits.dedup();
        hits.into_iter().map(|o| &self.rules[o as usize]).collect()
    }
}

/// Steps 1, 4 and 5 for one destination.
#[derive(Debug, Clone, Default)]
struct Steps {
    hard_deny: Group,
    soft_deny: Group,
    /// `None` when the tier has no ALLOW policy for the destination.
    allow: [Option<Group>; 3],
}

impl Steps {
    fn build<'p>(policies: impl Iterator<Item = &'p Policy>) -> Self {
        let mut s = Steps::default();
        for p in policies {
            let group = match p.action {
                Action::Deny if p.tier == Tier::Baseline && !p.overridable => &mut s.hard_deny,
                Action::Deny => &mut s.soft_deny,
                Action::Allow => s.allow[p.tier as usize].get_or_insert_with(Group::default),
                Action::Audit => continue,
            };
            for r in &p.rules {
                group.push(compile_rule(p, r));
            }
        }
        s.hard_deny.seal();
        s.soft_deny.seal();
        s.allow.iter_mut().flatten().for_each(Group::seal);
        s
    }
}

fn compile_rule(p: &Policy, r: &crate::model::Rule) -> CRule {
    CRule {
        policy: p.id.clone(),
        name: r.name.clone(),
        tier: p.tier,
        from: r.from.clone(),
        ops: r.to.iter().map(COp::new).collect(),
        when: r.when.clone(),
    }
}

#[derive(Debug, Clone)]
struct Dest {
    workload: Workload,
    steps: Steps,
    shadow: Option<Box<Steps>>,
    audit: Group,
    /// Indexes into `Engine::overrides` that may apply here: deny/quarantine, then allow.
    deny_overrides: Vec<u32>,
    allow_overrides: Vec<u32>,
}

/// A compiled, immutable policy set. Cheap to share behind an `Arc`; build the next one
/// off to the side and swap it in.
#[derive(Debug, Clone)]
pub struct Engine {
    revision: PolicyRevision,
    trust_domain: Arc<str>,
    strict: bool,
    default_allow: bool,
    dest_ix: HashMap<WorkloadRef, u32>,
    dests: Vec<Dest>,
    attrs: HashMap<SpiffeId, BTreeMap<String, String>>,
    overrides: Vec<Override>,
    rule_count: usize,
}

static NO_ATTRS: BTreeMap<String, String> = BTreeMap::new();

impl Engine {
    /// Compiles a policy set.
    pub fn compile(set: &PolicySet) -> Self {
        let mut attrs = HashMap::new();
        for w in &set.workloads {
            attrs
                .entry(w.identity.clone())
                .or_insert_with(|| w.attributes.clone());
        }
        // Targets resolved once: for each destination, its policies in evaluation order.
        let mut per_dest: Vec<Vec<&Policy>> = vec![vec![]; set.workloads.len()];
        for p in &set.policies {
            if let Some(named) = &p.target.named {
                for r in named {
                    if let Some(i) = set.workload_index(r)
                        && p.target.matches(&set.workloads[i])
                    {
                        per_dest[i].push(p);
                    }
                }
            } else {
                for (i, w) in set.workloads.iter().enumerate() {
                    if p.target.matches(w) {
                        per_dest[i].push(p);
                    }
                }
            }
        }
        let mut rule_count = 0;
        let dests: Vec<Dest> = set
            .workloads
            .iter()
            .zip(per_dest)
            .map(|(w, ps)| {
                let steps = Steps::build(ps.iter().copied().filter(|p| p.mode == Mode::Enforce));
                let shadow = ps
                    .iter()
                    .any(|p| p.mode == Mode::DryRun)
                    .then(|| Box::new(Steps::build(ps.iter().copied())));
                let mut audit = Group::default();
                for p in ps
                    .iter()
                    .filter(|p| p.action == Action::Audit && p.mode == Mode::Enforce)
                {
                    for r in &p.rules {
                        audit.push(compile_rule(p, r));
                    }
                }
                audit.seal();
                rule_count += ps.iter().map(|p| p.rules.len()).sum::<usize>();
                let applies = |o: &Override| {
                    o.action == OverrideAction::Quarantine
                        || o.target.as_ref().is_none_or(|t| t.matches(w))
                };
                let ix = |o: &Override| {
                    set.overrides
                        .iter()
                        .position(|x| std::ptr::eq(x, o))
                        .and_then(|i| u32::try_from(i).ok())
                };
                Dest {
                    workload: w.clone(),
                    steps,
                    shadow,
                    audit,
                    deny_overrides: set
                        .overrides
                        .iter()
                        .filter(|o| o.action != OverrideAction::Allow && applies(o))
                        .filter_map(ix)
                        .collect(),
                    allow_overrides: set
                        .overrides
                        .iter()
                        .filter(|o| o.action == OverrideAction::Allow && applies(o))
                        .filter_map(ix)
                        .collect(),
                }
            })
            .collect();
        Engine {
            revision: set.revision,
            trust_domain: set.mesh.trust_domain.as_str().into(),
            strict: set.mesh.mtls_mode == MtlsMode::Strict,
            default_allow: set.mesh.default_action == DefaultAction::Allow,
            dest_ix: set
                .workloads
                .iter()
                .enumerate()
                .filter_map(|(i, w)| Some((w.id.clone(), u32::try_from(i).ok()?)))
                .collect(),
            dests,
            attrs,
            overrides: set.overrides.clone(),
            rule_count,
        }
    }

    /// The revision the engine was compiled from.
    pub fn revision(&self) -> PolicyRevision {
        self.revision
    }

    /// Number of (policy, rule, destination) entries compiled.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// Decides a request; fills `elapsed`.
    pub fn decide(&self, req: &Request) -> Decision {
        let start = Instant::now();
        let mut d = self.decide_inner(req);
        d.elapsed = start.elapsed();
        d
    }

    fn decide_inner(&self, req: &Request) -> Decision {
        let rev = self.revision;
        let Some(dest) = self
            .dest_ix
            .get(&req.destination)
            .map(|&i| &self.dests[i as usize])
        else {
            return Decision::bare(Verdict::Deny, Reason::UnknownDestination, rev);
        };
        if self.strict && req.source == Source::Unauthenticated {
            return Decision::bare(Verdict::Deny, Reason::Unauthenticated, rev);
        }
        let id = req.source.identity();
        let cx = Cx {
            req,
            id,
            own_ns: id
                .filter(|i| i.trust_domain_name() == &*self.trust_domain)
                .and_then(|i| i.namespace()),
            src_attrs: id.and_then(|i| self.attrs.get(i)).unwrap_or(&NO_ATTRS),
            dst_attrs: &dest.workload.attributes,
            host: req
                .http
                .as_ref()
                .and_then(|h| h.host.as_deref())
                .map(normalize_host),
            method_bit: req.http.as_ref().map_or(0, |h| method_bit(&h.method)),
        };
        let mut d = self.run(&dest.steps, dest, &cx);
        if let Some(shadow) = &dest.shadow {
            let s = self.run(shadow, dest, &cx);
            d.shadow = Some(ShadowDecision {
                verdict: s.verdict,
                reason: s.reason,
                policy: s.policy,
                rule: s.rule,
            });
        }
        if !dest.audit.is_empty() {
            d.audit = dest
                .audit
                .all_matches(&cx)
                .into_iter()
                .map(|r| RuleRef {
                    policy: r.policy.clone(),
                    rule: r.name.clone(),
                })
                .collect();
        }
        d
    }

    fn run(&self, steps: &Steps, dest: &Dest, cx: &Cx<'_>) -> Decision {
        let rev = self.revision;
        let hit = |verdict, reason, r: &CRule| Decision {
            tier: Some(r.tier),
            policy: Some(r.policy.clone()),
            rule: Some(r.name.clone()),
            ..Decision::bare(verdict, reason, rev)
        };
        if let Some(r) = steps.hard_deny.first_match(true, cx) {
            return hit(Verdict::Deny, Reason::DeniedByRule, r);
        }
        let at = cx.req.at;
        for &i in &dest.deny_overrides {
            let o = &self.overrides[i as usize];
            if o.active_at(at) && self.override_matches(o, dest, cx) {
                let reason = if o.action == OverrideAction::Quarantine {
                    Reason::Quarantined
                } else {
                    Reason::OverrideDeny
                };
                return Decision {
                    policy: Some(o.id.clone()),
                    ..Decision::bare(Verdict::Deny, reason, rev)
                };
            }
        }
        for &i in &dest.allow_overrides {
            let o = &self.overrides[i as usize];
            if o.active_at(at) && self.override_matches(o, dest, cx) {
                return Decision {
                    policy: Some(o.id.clone()),
                    ..Decision::bare(Verdict::Allow, Reason::OverrideAllow, rev)
                };
            }
        }
        if let Some(r) = steps.soft_deny.first_match(true, cx) {
            return hit(Verdict::Deny, Reason::DeniedByRule, r);
        }
        let mut allowed = None;
        for (t, group) in steps.allow.iter().enumerate() {
            let Some(group) = group else { continue };
            match group.first_match(false, cx) {
                Some(r) => allowed = Some(r),
                None => {
                    return Decision {
                        tier: Some(Tier::ALL[t]),
                        ..Decision::bare(Verdict::Deny, Reason::NoAllowAtTier, rev)
                    };
                }
            }
        }
        match allowed {
            Some(r) => hit(Verdict::Allow, Reason::AllowedByRule, r),
            None if self.default_allow => Decision::bare(Verdict::Allow, Reason::DefaultAllow, rev),
            None => Decision::bare(Verdict::Deny, Reason::DefaultDeny, rev),
        }
    }

    fn override_matches(&self, o: &Override, dest: &Dest, cx: &Cx<'_>) -> bool {
        match o.action {
            OverrideAction::Quarantine => {
                let Some(subject) = &o.subject else {
                    return false;
                };
                // The destination's identity as a source (for "to a quarantined workload"
                // and for `except`).
                let as_source = Cx {
                    req: cx.req,
                    id: Some(&dest.workload.identity),
                    own_ns: (dest.workload.identity.trust_domain_name() == &*self.trust_domain)
                        .then(|| dest.workload.identity.namespace())
                        .flatten(),
                    src_attrs: &dest.workload.attributes,
                    dst_attrs: &dest.workload.attributes,
                    host: None,
                    method_bit: 0,
                };
                let excepted = |cx: &Cx<'_>| o.except.as_ref().is_some_and(|e| src_matches(e, cx));
                // From the subject, unless to an excepted peer; to the subject, unless from
                // one.
                (src_matches(subject, cx) && !excepted(&as_source))
                    || (src_matches(subject, &as_source) && !excepted(cx))
            }
            OverrideAction::Allow | OverrideAction::Deny => {
                let deny = o.action == OverrideAction::Deny;
                o.subject.as_ref().is_none_or(|s| src_matches(s, cx))
                    && o.target.as_ref().is_none_or(|t| t.matches(&dest.workload))
                    && (o.to.is_empty() || o.to.iter().any(|op| COp::new(op).matches(deny, cx)))
            }
        }
    }
}
