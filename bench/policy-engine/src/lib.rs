//! Equivalent policy sets for Meshward, Cedar and Rego, generated at a given size, and the
//! requests the benchmarks send. Rule `i` allows one source (by exact identity, namespace,
//! attribute or identity pattern) one method on the path prefix `/api/v{i}/*` of the
//! destination `bench/api` — "one policy per principal" — and the benchmark request
//! matches the last rule, as in ../../shared/PERFORMANCE.md.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::{SpiffeId, TrustDomain};
use meshward_policy::decision::{HttpAttrs, Request, Source, WorkloadRef};
use meshward_policy::matcher::{IdentityPattern, PathPattern};
use meshward_policy::model::{Mesh, Operation, Policy, PolicySet, Rule, SourceMatch, Target, Workload};
use meshward_policy::resource::{Action, Mode, Protocol, Tier, WorkloadPort};

pub const TD: &str = "bench.example";

/// How rule `i` names its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Identity,
    Namespace,
    Attribute,
    Pattern,
    /// Any caller outside a quarantine namespace: nothing to index by source, so the
    /// compiled engine files the rule under its path.
    AnyCaller,
}

/// Which mix of rules a set is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// 70% exact identities, 10% each namespaces, attributes, identity patterns.
    Sources,
    /// Every rule admits any caller (but a quarantined namespace) on its own path prefix.
    Paths,
}

pub fn kind(i: usize, f: Family) -> Kind {
    if f == Family::Paths {
        return Kind::AnyCaller;
    }
    match i % 10 {
        7 => Kind::Namespace,
        8 => Kind::Attribute,
        9 => Kind::Pattern,
        _ => Kind::Identity,
    }
}

pub fn ns(i: usize) -> String {
    format!("ns{}", i / 10)
}

pub fn identity(i: usize) -> String {
    format!("spiffe://{TD}/ns/{}/sa/sa{i}", ns(i))
}

pub fn method(i: usize) -> &'static str {
    if i % 2 == 0 { "GET" } else { "POST" }
}

pub fn team(i: usize) -> String {
    format!("team{i}")
}

/// The Meshward policy set: one service-tier ALLOW policy of one rule per `i`, a
/// baseline that admits the mesh's trust domain, and the workloads (sources and the one
/// destination) with their attributes.
pub fn meshward_set(n: usize, f: Family) -> PolicySet {
    let td = TrustDomain::parse(TD).unwrap_or_else(|e| panic!("{e}"));
    let mut workloads: Vec<Workload> = (0..n)
        .map(|i| Workload {
            id: WorkloadRef { namespace: ns(i), name: format!("sa{i}") },
            identity: SpiffeId::workload(&td, &ns(i), &format!("sa{i}")).unwrap_or_else(|e| panic!("{e}")),
            labels: BTreeMap::new(),
            attributes: [("team".to_string(), team(i))].into(),
            ports: vec![],
            origin: None,
        })
        .collect();
    workloads.push(Workload {
        id: WorkloadRef { namespace: "bench".into(), name: "api".into() },
        identity: SpiffeId::workload(&td, "bench", "api").unwrap_or_else(|e| panic!("{e}")),
        labels: BTreeMap::new(),
        attributes: BTreeMap::new(),
        ports: vec![WorkloadPort { port: 8080, protocol: Protocol::Http, name: None, inbound: None }],
        address: None,
        interception: Default::default(),
        origin: None,
    });
    let target = Target { named: Some([WorkloadRef { namespace: "bench".into(), name: "api".into() }].into()), ..Default::default() };
    let mut policies: Vec<Policy> = (0..n)
        .map(|i| {
            let from = match kind(i, f) {
                Kind::Identity => SourceMatch { identities: vec![IdentityPattern::parse(&identity(i)).unwrap_or_else(|e| panic!("{e}"))], ..Default::default() },
                Kind::Namespace => SourceMatch { namespaces: vec![ns(i)], ..Default::default() },
                Kind::Attribute => SourceMatch { attributes: vec![("team".into(), vec![team(i)])], ..Default::default() },
                Kind::Pattern => SourceMatch {
                    identities: vec![IdentityPattern::parse(&format!("spiffe://{TD}/ns/{}/sa/*", ns(i))).unwrap_or_else(|e| panic!("{e}"))],
                    ..Default::default()
                },
                Kind::AnyCaller => SourceMatch { not_namespaces: vec!["quarantine".into()], ..Default::default() },
            };
            Policy {
                id: format!("bench/p{i:07}").into(),
                namespace: "bench".into(),
                name: format!("p{i:07}"),
                tier: Tier::Service,
                action: Action::Allow,
                mode: Mode::Enforce,
                overridable: false,
                target: target.clone(),
                rules: vec![Rule {
                    name: Arc::from("r"),
                    from: vec![from],
                    to: vec![Operation {
                        methods: vec![method(i).into()],
                        paths: vec![PathPattern::parse(&format!("/api/v{i}/*")).unwrap_or_else(|e| panic!("{e}"))],
                        ..Default::default()
                    }],
                    when: vec![],
                }],
                origin: None,
            }
        })
        .collect();
    policies.push(Policy {
        id: "mesh/in-mesh".into(),
        namespace: "mesh".into(),
        name: "in-mesh".into(),
        tier: Tier::Baseline,
        action: Action::Allow,
        mode: Mode::Enforce,
        overridable: false,
        target: Target::default(),
        rules: vec![Rule { name: Arc::from("td"), from: vec![SourceMatch { trust_domains: vec![TD.into()], ..Default::default() }], to: vec![], when: vec![] }],
        origin: None,
    });
    let mesh = Mesh {
        trust_domain: td,
        default_action: Default::default(),
        mtls_mode: Default::default(),
        certificate_lifetime: Duration::from_secs(3600),
        max_override_duration: Duration::from_secs(86400),
        outbound: Default::default(),
        origin: None,
    };
    PolicySet::from_parts(mesh, workloads, policies, vec![])
}

/// The request that matches rule `i` (and, by construction, no other).
pub fn request(i: usize) -> Request {
    Request {
        source: Source::parse(&identity(i)).unwrap_or_else(|e| panic!("{e}")),
        destination: WorkloadRef { namespace: "bench".into(), name: "api".into() },
        port: 8080,
        http: Some(HttpAttrs { method: method(i).into(), path: format!("/api/v{i}/items"), host: None, headers: vec![] }),
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    }
}

/// A request no rule matches: a known source on a path no rule names.
pub fn miss(n: usize) -> Request {
    let mut r = request(n - 1);
    if let Some(h) = &mut r.http {
        h.path = "/nowhere".into();
    }
    r
}

/// The same set in Cedar.
pub fn cedar_src(n: usize, f: Family) -> String {
    let mut s = String::with_capacity(n * 160);
    for i in 0..n {
        let m = method(i);
        let path = format!("context.path like \"/api/v{i}/*\"");
        let p = match kind(i, f) {
            Kind::Identity => format!("permit(principal == Svc::\"{}\", action == Action::\"{m}\", resource == Workload::\"bench/api\") when {{ {path} }};\n", identity(i)),
            Kind::Namespace => format!("permit(principal, action == Action::\"{m}\", resource == Workload::\"bench/api\") when {{ context.source_ns == \"{}\" && {path} }};\n", ns(i)),
            Kind::Attribute => format!("permit(principal, action == Action::\"{m}\", resource == Workload::\"bench/api\") when {{ context.source_team == \"{}\" && {path} }};\n", team(i)),
            Kind::Pattern => format!("permit(principal, action == Action::\"{m}\", resource == Workload::\"bench/api\") when {{ context.source like \"spiffe://{TD}/ns/{}/sa/*\" && {path} }};\n", ns(i)),
            Kind::AnyCaller => format!("permit(principal, action == Action::\"{m}\", resource == Workload::\"bench/api\") when {{ context.source_ns != \"quarantine\" && {path} }};\n"),
        };
        s.push_str(&p);
    }
    s
}

/// The Cedar request matching rule `i`.
pub fn cedar_request(i: usize, path: &str) -> cedar_policy::Request {
    let principal: cedar_policy::EntityUid = format!("Svc::\"{}\"", identity(i)).parse().unwrap_or_else(|e| panic!("{e}"));
    let action: cedar_policy::EntityUid = format!("Action::\"{}\"", method(i)).parse().unwrap_or_else(|e| panic!("{e}"));
    let resource: cedar_policy::EntityUid = "Workload::\"bench/api\"".parse().unwrap_or_else(|e| panic!("{e}"));
    let ctx = cedar_policy::Context::from_json_value(
        serde_json::json!({"path": path, "source": identity(i), "source_ns": ns(i), "source_team": team(i)}),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    cedar_policy::Request::new(principal, action, resource, ctx, None).unwrap_or_else(|e| panic!("{e}"))
}

/// The same set in Rego (regorus), as modules of one package of at most 1,000 rules each
/// (regorus caps a policy file at 1 MiB and 20,000 lines).
pub fn rego_modules(n: usize, f: Family) -> Vec<String> {
    let mut out = vec![];
    let mut s = String::from("package meshward\n\nimport rego.v1\n\ndefault allow := false\n\n");
    for i in 0..n {
        if i > 0 && i % 1000 == 0 {
            out.push(std::mem::replace(&mut s, String::from("package meshward\n\nimport rego.v1\n\n")));
        }
        let m = method(i);
        let cond = match kind(i, f) {
            Kind::Identity => format!("input.source == \"{}\"", identity(i)),
            Kind::Namespace => format!("input.source_ns == \"{}\"", ns(i)),
            Kind::Attribute => format!("input.source_team == \"{}\"", team(i)),
            Kind::Pattern => format!("startswith(input.source, \"spiffe://{TD}/ns/{}/sa/\")", ns(i)),
            Kind::AnyCaller => "input.source_ns != \"quarantine\"".to_string(),
        };
        s.push_str(&format!(
            "allow if {{\n\t{cond}\n\tinput.method == \"{m}\"\n\tinput.dest == \"bench/api\"\n\tstartswith(input.path, \"/api/v{i}/\")\n}}\n\n"
        ));
    }
    out.push(s);
    out
}

/// A regorus engine loaded with the set.
pub fn rego_engine(n: usize, f: Family) -> regorus::Engine {
    let mut e = regorus::Engine::new();
    for (k, m) in rego_modules(n, f).into_iter().enumerate() {
        e.add_policy(format!("bench{k}.rego"), m).unwrap_or_else(|e| panic!("regorus: {e}"));
    }
    e
}

/// The Rego input matching rule `i`.
pub fn rego_input(i: usize, path: &str) -> regorus::Value {
    let v = serde_json::json!({"source": identity(i), "source_ns": ns(i), "source_team": team(i), "method": method(i), "dest": "bench/api", "path": path});
    regorus::Value::from_json_str(&v.to_string()).unwrap_or_else(|e| panic!("{e}"))
}
