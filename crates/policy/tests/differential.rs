#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Differential test: the compiled engine must decide exactly as the reference evaluator on
//! generated policy sets and requests. 10,000 cases by default (each with 24 requests); set
//! `PROPTEST_CASES=1000000` to run a million (see docs/policy.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::{SpiffeId, TrustDomain};
use meshward_policy::decision::{HttpAttrs, Request, Source, WorkloadRef};
use meshward_policy::engine::Engine;
use meshward_policy::matcher::{HostPattern, IdentityPattern, PathPattern, StringMatch};
use meshward_policy::model::{
    CondKind, Condition, Mesh, Operation, Override, Policy, PolicySet, Rule, SourceMatch, Target,
    Workload,
};
use meshward_policy::reference;
use meshward_policy::resource::{
    Action, DefaultAction, Mode, MtlsMode, OverrideAction, Protocol, Tier, WorkloadPort,
};
use proptest::prelude::*;

/// A small deterministic generator (SplitMix64): proptest draws the seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    fn subset<T: Clone>(&mut self, xs: &[T], pct: u64) -> Vec<T> {
        if !self.chance(pct) {
            return vec![];
        }
        let mut out: Vec<T> = xs.iter().filter(|_| self.chance(40)).cloned().collect();
        if out.is_empty() {
            out.push(self.pick(xs));
        }
        out
    }
}

const T0: u64 = 1_800_000_000;

fn at(offset: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0.saturating_add_signed(offset))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn attrs_pool() -> Vec<(String, Vec<String>)> {
    vec![
        ("tenant".into(), s(&["t1"])),
        ("tenant".into(), s(&["t1", "t2"])),
        ("class".into(), s(&["restricted"])),
        ("posture".into(), s(&["ok"])),
    ]
}

fn gen_source(g: &mut Gen) -> SourceMatch {
    if g.chance(8) {
        return SourceMatch {
            unauthenticated: true,
            ..Default::default()
        };
    }
    let ids = [
        "spiffe://td/ns/a/sa/w1",
        "spiffe://td/ns/b/sa/w3",
        "spiffe://td/ns/a/*",
        "spiffe://td/ns/*/sa/w1",
        "spiffe://other/*",
        "spiffe://other/ns/a/sa/w1",
        "spiffe://td/ns/a/sa/ghost",
    ];
    let pat = |g: &mut Gen, pct| -> Vec<IdentityPattern> {
        g.subset(&ids, pct)
            .iter()
            .map(|i| IdentityPattern::parse(i).unwrap())
            .collect()
    };
    let mut m = SourceMatch {
        identities: pat(g, 30),
        not_identities: pat(g, 10),
        namespaces: g.subset(&s(&["a", "b", "c"]), 25),
        not_namespaces: g.subset(&s(&["a", "b"]), 12),
        trust_domains: g.subset(&s(&["td", "other"]), 10),
        not_trust_domains: g.subset(&s(&["other"]), 8),
        attributes: g.subset(&attrs_pool(), 20),
        not_attributes: g.subset(&attrs_pool(), 10),
        same_attributes: g.subset(&s(&["tenant", "class"]), 10),
        different_attributes: g.subset(&s(&["tenant"]), 10),
        unauthenticated: false,
    };
    if m == SourceMatch::default() {
        m.namespaces = vec!["a".into()];
    }
    m
}

fn gen_op(g: &mut Gen) -> Operation {
    let paths = [
        "/admin/*",
        "/api/*/x",
        "/a",
        "*",
        "/api/*/x/*",
        "/api/v1/x",
        "/admin/x/*",
    ];
    let pp = |g: &mut Gen, pct| -> Vec<PathPattern> {
        g.subset(&paths, pct)
            .iter()
            .map(|p| PathPattern::parse(p).unwrap())
            .collect()
    };
    Operation {
        ports: g.subset(&[80u16, 9000], 30),
        methods: g.subset(&s(&["GET", "POST", "PURGE"]), 35),
        not_methods: g.subset(&s(&["DELETE", "POST"]), 10),
        paths: pp(g, 40),
        not_paths: pp(g, 10),
        hosts: g
            .subset(&["api.td", "*.td"], 15)
            .iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect(),
    }
}

fn gen_cond(g: &mut Gen) -> Condition {
    let ms = |g: &mut Gen| {
        g.subset(&["v1", "v*", "*1"], 100)
            .iter()
            .map(|v| StringMatch::parse(v))
            .collect()
    };
    let kind = match g.below(3) {
        0 => CondKind::Values(ms(g)),
        1 => CondKind::NotValues(ms(g)),
        _ => CondKind::Present(g.chance(50)),
    };
    Condition {
        header: "x-h".into(),
        kind,
    }
}

fn gen_target(g: &mut Gen, tier: Tier) -> Target {
    let named = |v: &[(&str, &str)]| {
        Some(
            v.iter()
                .map(|(n, w)| WorkloadRef {
                    namespace: n.to_string(),
                    name: w.to_string(),
                })
                .collect::<BTreeSet<_>>(),
        )
    };
    match (tier, g.below(6)) {
        (Tier::Baseline, 0) => Target::default(),
        (_, 1) => Target {
            namespaces: s(&["a"]),
            ..Default::default()
        },
        (_, 2) => Target {
            named: named(&[("a", "w1"), ("b", "w3")]),
            ..Default::default()
        },
        (_, 3) => Target {
            attributes: vec![("class".into(), s(&["restricted"]))],
            ..Default::default()
        },
        (_, 4) => Target {
            labels: vec![("app".into(), "w2".into())],
            ..Default::default()
        },
        _ => Target {
            named: named(&[("c", "w4")]),
            ..Default::default()
        },
    }
}

fn gen_policy(g: &mut Gen, i: usize) -> Policy {
    let tier = g.pick(&Tier::ALL);
    let action = match g.below(10) {
        0..=4 => Action::Allow,
        5..=8 => Action::Deny,
        _ => Action::Audit,
    };
    let rules = (0..g.below(3) + usize::from(g.chance(85)))
        .map(|j| Rule {
            name: format!("r{j}").into(),
            from: (0..g.below(3)).map(|_| gen_source(g)).collect(),
            to: (0..g.below(3)).map(|_| gen_op(g)).collect(),
            when: (0..usize::from(g.chance(20)))
                .map(|_| gen_cond(g))
                .collect(),
        })
        .collect();
    let ns = g.pick(&["a", "b", "mesh"]);
    Policy {
        id: format!("{ns}/p{i}").into(),
        namespace: ns.into(),
        name: format!("p{i}"),
        tier,
        action,
        mode: if g.chance(15) {
            Mode::DryRun
        } else {
            Mode::Enforce
        },
        overridable: tier == Tier::Baseline && action == Action::Deny && g.chance(50),
        target: gen_target(g, tier),
        rules,
        origin: None,
    }
}

fn gen_override(g: &mut Gen, i: usize) -> Override {
    let action = g.pick(&[
        OverrideAction::Allow,
        OverrideAction::Deny,
        OverrideAction::Quarantine,
    ]);
    let subject = Some(gen_source(g));
    let target = (action != OverrideAction::Quarantine
        && (action == OverrideAction::Allow || g.chance(50)))
    .then(|| gen_target(g, Tier::Service));
    Override {
        id: format!("ops/o{i}").into(),
        action,
        subject,
        target,
        to: if action != OverrideAction::Quarantine && g.chance(30) {
            vec![gen_op(g)]
        } else {
            vec![]
        },
        except: (action == OverrideAction::Quarantine && g.chance(50)).then(|| gen_source(g)),
        reason: "drill".into(),
        ticket: None,
        requester: None,
        approver: None,
        starts_at: g.chance(30).then(|| at(g.below(100) as i64 - 50)),
        expires_at: (!g.chance(10)).then(|| at(g.below(200) as i64 - 50)),
        origin: None,
    }
}

fn gen_set(g: &mut Gen) -> PolicySet {
    let td = TrustDomain::parse("td").unwrap();
    let attrs = |g: &mut Gen| {
        let mut m = BTreeMap::new();
        for (k, vs) in [
            ("tenant", ["t1", "t2"]),
            ("class", ["public", "restricted"]),
            ("posture", ["ok", "bad"]),
        ] {
            if g.chance(70) {
                m.insert(k.to_string(), g.pick(&vs).to_string());
            }
        }
        m
    };
    let workloads = [("a", "w1"), ("a", "w2"), ("b", "w3"), ("c", "w4")]
        .iter()
        .map(|(ns, n)| Workload {
            id: WorkloadRef {
                namespace: ns.to_string(),
                name: n.to_string(),
            },
            identity: SpiffeId::workload(&td, ns, n).unwrap(),
            labels: [("app".to_string(), n.to_string())].into(),
            attributes: attrs(g),
            ports: vec![WorkloadPort {
                port: 80,
                protocol: Protocol::Http,
                name: None,
                inbound: None,
            }],
            address: None,
            interception: Default::default(),
            connection_limits: Default::default(),
            locality: None,
            origin: None,
        })
        .collect();
    let mesh = Mesh {
        trust_domain: td,
        anomaly: Default::default(),
        rollout: Default::default(),
        default_action: if g.chance(20) {
            DefaultAction::Allow
        } else {
            DefaultAction::Deny
        },
        mtls_mode: if g.chance(50) {
            MtlsMode::Strict
        } else {
            MtlsMode::Permissive
        },
        certificate_lifetime: Duration::from_secs(3600),
        headers_with_underscores: Default::default(),
        max_override_duration: Duration::from_secs(86400),
        outbound: Default::default(),
        connection_limits: Default::default(),
        origin: None,
    };
    let policies = (0..g.below(9)).map(|i| gen_policy(g, i)).collect();
    let overrides = (0..g.below(3)).map(|i| gen_override(g, i)).collect();
    PolicySet::from_parts(mesh, workloads, policies, overrides)
}

fn gen_request(g: &mut Gen) -> Request {
    let source = match g.below(8) {
        0 => Source::Unauthenticated,
        1 => Source::Authenticated(SpiffeId::parse("spiffe://other/ns/a/sa/w1").unwrap()),
        2 => Source::Authenticated(SpiffeId::parse("spiffe://td/ns/a/sa/ghost").unwrap()),
        _ => {
            let (ns, n) = g.pick(&[("a", "w1"), ("a", "w2"), ("b", "w3"), ("c", "w4")]);
            Source::Authenticated(SpiffeId::parse(&format!("spiffe://td/ns/{ns}/sa/{n}")).unwrap())
        }
    };
    let (ns, n) = g.pick(&[
        ("a", "w1"),
        ("a", "w2"),
        ("b", "w3"),
        ("c", "w4"),
        ("z", "nope"),
    ]);
    let http = g.chance(75).then(|| HttpAttrs {
        method: g.pick(&["GET", "POST", "PURGE", "DELETE"]).into(),
        path: g
            .pick(&[
                "/admin",
                "/admin/x",
                "/admin/x/y",
                "/api/v2/x",
                "/api/v1/x",
                "/api/v1/x/y",
                "/a",
                "/b",
                "/",
            ])
            .into(),
        host: g
            .pick(&[
                None,
                Some("api.td"),
                Some("API.td.:80"),
                Some("x.td"),
                Some("other"),
            ])
            .map(String::from),
        // Repeated fields, comma lists (with spaces and empty elements) and values from
        // bytes that are not UTF-8 (U+FFFD, as the proxy records them).
        headers: (0..g.below(4))
            .map(|_| {
                (
                    "x-h".to_string(),
                    g.pick(&[
                        "v1",
                        "v2",
                        "w",
                        "x1",
                        "v1,v2",
                        "w, v1",
                        "v1 ,\tx1",
                        "v1,",
                        ",",
                        "",
                        "v\u{fffd}1",
                        "v1, \u{fffd}",
                    ])
                    .to_string(),
                )
            })
            .collect(),
    });
    Request {
        source,
        destination: WorkloadRef {
            namespace: ns.into(),
            name: n.into(),
        },
        port: g.pick(&[80, 9000]),
        http,
        at: at(g.below(200) as i64 - 50),
    }
}

fn check(seed: u64) -> Result<(), TestCaseError> {
    let mut g = Gen(seed);
    let set = gen_set(&mut g);
    let engine = Engine::compile(&set);
    for _ in 0..24 {
        let req = gen_request(&mut g);
        let want = reference::evaluate(&set, &req);
        let got = engine.decide(&req);
        prop_assert!(
            want.same_outcome(&got),
            "seed {seed}: engine and reference disagree\nrequest: {req:#?}\nreference: {want:#?}\nengine: {got:#?}\npolicies: {:#?}\noverrides: {:#?}\nworkloads: {:#?}",
            set.policies,
            set.overrides,
            set.workloads
                .iter()
                .map(|w| (&w.id, &w.attributes))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_agrees_with_reference(seed in any::<u64>()) {
        check(seed)?;
    }
}

/// The generator must exercise every reason code, or agreement would prove little.
#[test]
fn generator_covers_every_reason() {
    use meshward_policy::decision::Reason;
    let mut seen = BTreeSet::new();
    let mut shadow = false;
    let mut audit = false;
    for seed in 0..3000u64 {
        let mut g = Gen(seed);
        let set = gen_set(&mut g);
        for _ in 0..24 {
            let d = reference::evaluate(&set, &gen_request(&mut g));
            seen.insert(d.reason.as_str());
            shadow |= d.shadow.as_ref().is_some_and(|s| s.verdict != d.verdict);
            audit |= !d.audit.is_empty();
        }
    }
    for r in [
        Reason::AllowedByRule,
        Reason::DeniedByRule,
        Reason::NoAllowAtTier,
        Reason::Quarantined,
        Reason::OverrideDeny,
        Reason::OverrideAllow,
        Reason::DefaultDeny,
        Reason::DefaultAllow,
        Reason::Unauthenticated,
        Reason::UnknownDestination,
    ] {
        assert!(
            seen.contains(r.as_str()),
            "generator never produced {r}: {seen:?}"
        );
    }
    assert!(shadow, "no shadow verdict ever differed");
    assert!(audit, "no audit mark ever set");
    let _ = Arc::<str>::from("");
}
