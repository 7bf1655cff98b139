#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Every diagnostic the loader and the linter emit, each on a minimal policy set, checking
//! code, position and field — and that a fixed version is clean.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_policy::diag::{Diagnostic, Severity};
use meshward_policy::lint::lint;
use meshward_policy::load_sources;

const BASE: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec: {trustDomain: td.example, maxOverrideDuration: 2h}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  attributes: {tier: front, posture: compliant}
  ports: [{port: 8080, protocol: HTTP}]
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  attributes: {tier: data}
  ports: [{port: 5432, protocol: TCP}]
"#;

fn now() -> SystemTime {
    humantime::parse_rfc3339("2026-11-28T10:00:00Z").unwrap()
}

/// Diagnostics for BASE plus `doc` (in its own file `case.yaml`).
fn diags(doc: &str) -> Vec<Diagnostic> {
    let loaded = load_sources(vec![
        (Arc::from("base.yaml"), Arc::from(BASE)),
        (Arc::from("case.yaml"), Arc::from(doc)),
    ]);
    let mut d = loaded.diagnostics.clone();
    if let Some(set) = &loaded.set {
        d.extend(lint(set, now()));
    }
    d
}

fn only(doc: &str, code: &str) -> Diagnostic {
    let d = diags(doc);
    let hits: Vec<&Diagnostic> = d.iter().filter(|x| x.code == code).collect();
    assert_eq!(hits.len(), 1, "expected exactly one {code}, got {d:#?}");
    hits[0].clone()
}

fn clean(doc: &str) {
    let d = diags(doc);
    assert!(d.is_empty(), "expected no diagnostics, got {d:#?}");
}

const POLICY_HEAD: &str = "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n";

fn policy(body: &str) -> String {
    format!("{POLICY_HEAD}{body}")
}

#[test]
fn base_is_clean() {
    clean("");
}

#[test]
fn mw101_yaml_syntax() {
    let d = only("a: [1, 2\nb: 3\n", "MW101");
    assert_eq!(&*d.file, "case.yaml");
    assert!(d.line >= 1);
}

#[test]
fn mw102_unknown_field_with_suggestion_and_position() {
    let d = only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from:\n        - identites: [\"spiffe://td.example/ns/shop/sa/db\"]\n",
        ),
        "MW102",
    );
    assert_eq!((d.line, d.column), (10, 11));
    assert_eq!(d.field.as_deref(), Some("spec.rules[0].from[0].identites"));
    assert_eq!(d.help.as_deref(), Some("did you mean `identities`?"));
    assert_eq!(d.severity, Severity::Error);
    // Top-level too.
    let d = only(
        "apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {name: x}\nspecs: {}\n",
        "MW102",
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `spec`?"));
}

#[test]
fn mw103_mw104_mw105_schema() {
    let d = only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - to: [{ports: [80000]}]\n",
        ),
        "MW103",
    );
    assert_eq!(d.field.as_deref(), Some("spec.rules[0].to[0].ports[0]"));
    let d = only(
        &policy("  tier: service\n  target: {workloads: [web]}\n"),
        "MW104",
    );
    assert!(d.message.contains("`action`"), "{}", d.message);
    let d = only(
        "apiVersion: meshward.io/v1alpha1\nkind: AuthorisationPolicy\nmetadata: {name: x}\nspec: {}\n",
        "MW105",
    );
    assert_eq!(
        d.help.as_deref(),
        Some("did you mean `AuthorizationPolicy`?")
    );
    let d = only(&policy("  tier: services\n  action: ALLOW\n"), "MW103");
    assert_eq!(d.help.as_deref(), Some("did you mean `service`?"));
}

#[test]
fn errors_from_all_documents_are_collected() {
    let doc = format!(
        "{}\n---\n{}",
        policy("  tier: service\n  action: ALOW\n  target: {workloads: [web]}\n"),
        "apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: x, namespace: shop}\nspec: {ports: [{port: 1, protcol: TCP}]}\n"
    );
    let d = diags(&doc);
    assert!(d.iter().any(|x| x.code == "MW103" && x.line == 6), "{d:#?}");
    assert!(
        d.iter().any(|x| x.code == "MW102" && x.line == 13),
        "{d:#?}"
    );
}

#[test]
fn mw106_duplicates() {
    let p = policy("  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n");
    only(&format!("{p}---\n{p}"), "MW106");
}

#[test]
fn mw107_malformed_identities() {
    let d = only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from:\n        - identities: [\"spiffe://td.example/ns/shop-*\"]\n",
        ),
        "MW107",
    );
    assert!(d.message.contains("whole path segment"), "{}", d.message);
    assert_eq!(
        d.field.as_deref(),
        Some("spec.rules[0].from[0].identities[0]")
    );
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from:\n        - identities: [\"spiffe://TD/x\"]\n",
        ),
        "MW107",
    );
}

#[test]
fn mw108_malformed_matchers() {
    let d = only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - to: [{methods: [get]}]\n",
        ),
        "MW108",
    );
    assert!(d.message.contains("`GET`"));
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - to: [{paths: [\"/a/../b\"]}]\n",
        ),
        "MW108",
    );
}

#[test]
fn mw201_mw202_mw203_references() {
    let d = only(
        &policy("  tier: service\n  action: ALLOW\n  target: {workloads: [wbe]}\n"),
        "MW201",
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `shop/web`?"));
    assert_eq!(d.field.as_deref(), Some("spec.target.workloads[0]"));
    only(
        &policy("  tier: service\n  action: ALLOW\n  target: {services: [nope]}\n"),
        "MW202",
    );
    let d = only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{namespaces: [shpo]}]\n",
        ),
        "MW203",
    );
    assert_eq!(d.severity, Severity::Warning);
    assert_eq!(d.help.as_deref(), Some("did you mean `shop`?"));
}

#[test]
fn mw204_mesh_missing() {
    let loaded = load_sources(vec![(
        Arc::from("a.yaml"),
        Arc::from(policy("  tier: baseline\n  action: ALLOW\n")),
    )]);
    assert!(loaded.diagnostics.iter().any(|d| d.code == "MW204"));
    assert!(loaded.into_valid().is_err());
}

#[test]
fn mw205_mw206_mw207_unknown_identities_and_attributes() {
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{identities: [\"spiffe://td.example/ns/shop/sa/dbb\"]}]\n",
        ),
        "MW205",
    );
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{identities: [\"spiffe://elsewhere/ns/a/sa/b\"]}]\n",
        ),
        "MW206",
    );
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{attributes: {postrue: compliant}}]\n",
        ),
        "MW207",
    );
}

#[test]
fn mw301_never_matches() {
    let d = only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - to: [{methods: [GET], notMethods: [GET]}]\n",
        ),
        "MW301",
    );
    assert_eq!(d.field.as_deref(), Some("spec.rules[0].to[0]"));
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{namespaces: [shop], notNamespaces: [shop]}]\n",
        ),
        "MW301",
    );
    // Plaintext-only allow in a STRICT mesh.
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{unauthenticated: true}]\n",
        ),
        "MW301",
    );
}

#[test]
fn mw302_shadowed_by_deny() {
    let doc = format!(
        "{}---\n{}",
        policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{identities: [\"spiffe://td.example/ns/shop/sa/db\"]}]\n      to: [{paths: [\"/admin/x\"]}]\n"
        ),
        "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: sec}\nspec:\n  tier: baseline\n  action: DENY\n  rules:\n    - to: [{ports: [8080], paths: [\"/admin/*\"]}]\n"
    );
    let d = only(&doc, "MW302");
    assert!(d.message.contains("sec/no-admin"), "{}", d.message);
}

#[test]
fn mw303_ineffective_allow() {
    let doc = format!(
        "{}---\n{}",
        policy(
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{identities: [\"spiffe://td.example/ns/shop/sa/db\"]}]\n"
        ),
        "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-web, namespace: sec}\nspec:\n  tier: baseline\n  action: ALLOW\n  rules:\n    - from: [{attributes: {tier: front}}]\n"
    );
    let d = only(&doc, "MW303");
    assert!(
        d.message.contains("baseline tier never allows"),
        "{}",
        d.message
    );
}

#[test]
fn mw304_http_conditions_on_tcp() {
    let d = only(
        &policy(
            "  tier: service\n  action: DENY\n  target: {workloads: [db]}\n  rules:\n    - to: [{ports: [5432], methods: [GET]}]\n",
        ),
        "MW304",
    );
    assert!(d.message.contains("port 5432"), "{}", d.message);
    // A DENY with HTTP conditions and no ports, on a workload with a TCP port: fail closed.
    let d = only(
        &policy(
            "  tier: domain\n  action: DENY\n  target: {namespaces: [shop]}\n  rules:\n    - to: [{paths: [\"/admin/*\"]}]\n",
        ),
        "MW304",
    );
    assert!(d.message.contains("shop/db"), "{}", d.message);
    clean(&policy(
        "  tier: domain\n  action: DENY\n  target: {namespaces: [shop]}\n  rules:\n    - to: [{ports: [8080], paths: [\"/admin/*\"]}]\n",
    ));
}

fn override_doc(extra: &str) -> String {
    format!(
        "apiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {{name: o, namespace: shop}}\nspec:\n  action: deny\n  subject: {{namespaces: [shop]}}\n  reason: incident\n{extra}"
    )
}

#[test]
fn mw305_mw306_mw308_overrides() {
    only(&override_doc(""), "MW305");
    let d = only(
        &override_doc("  startsAt: 2026-11-28T09:00:00Z\n  expiresAt: 2026-11-28T19:00:00Z\n"),
        "MW306",
    );
    assert!(d.message.contains("10h"), "{}", d.message);
    // Without startsAt the duration counts from now (10:00): 3h > 2h.
    only(
        &override_doc("  expiresAt: 2026-11-28T13:00:00Z\n"),
        "MW306",
    );
    only(
        &override_doc("  startsAt: 2026-11-28T07:00:00Z\n  expiresAt: 2026-11-28T08:00:00Z\n"),
        "MW308",
    );
    clean(&override_doc("  expiresAt: 2026-11-28T11:00:00Z\n"));
}

#[test]
fn mw307_dry_run_left_on() {
    only(
        &policy(
            "  tier: service\n  action: ALLOW\n  mode: dry-run\n  target: {workloads: [web]}\n  rules:\n    - from: [{namespaces: [shop]}]\n",
        ),
        "MW307",
    );
}

#[test]
fn mw309_mw310_permissive_and_default_allow() {
    let mesh = "apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {trustDomain: td.example, mtlsMode: PERMISSIVE, defaultAction: ALLOW}\n";
    let base = BASE.replacen("apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {trustDomain: td.example, maxOverrideDuration: 2h}\n", mesh, 1);
    let doc = policy(
        "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - from: [{notNamespaces: [other]}]\n",
    );
    let loaded = load_sources(vec![
        (Arc::from("base.yaml"), Arc::from(base)),
        (Arc::from("case.yaml"), Arc::from(doc)),
    ]);
    let d = lint(loaded.set.as_ref().unwrap(), now());
    assert!(d.iter().any(|x| x.code == "MW309"), "{d:#?}");
    assert!(d.iter().any(|x| x.code == "MW310"), "{d:#?}");
}

#[test]
fn mw311_mw312_targets() {
    only(
        &policy("  tier: domain\n  action: ALLOW\n  target: {attributes: {tier: nothing}}\n"),
        "MW311",
    );
    only(
        &policy("  tier: service\n  action: ALLOW\n  target: {namespaces: [shop]}\n"),
        "MW312",
    );
    only(&policy("  tier: domain\n  action: ALLOW\n"), "MW312");
}

#[test]
fn mw313_conflicting_attributes() {
    let doc = "apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: web2, namespace: shop}\nspec: {serviceAccount: web, attributes: {tier: back}}\n";
    only(doc, "MW313");
}

#[test]
fn every_code_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policy.md"))
        .unwrap();
    for c in meshward_policy::lint::CODES {
        assert!(
            doc.contains(&format!("### {}", c.code)),
            "docs/policy.md has no section for {}",
            c.code
        );
    }
    let _ = Duration::ZERO;
}

#[test]
fn mw314_reach_beyond_the_own_namespace() {
    let other = "---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: api, namespace: prod}\nspec: {attributes: {tier: back}, ports: [{port: 8080, protocol: HTTP}]}\n";
    // Naming another namespace's workload.
    let d = only(
        &format!(
            "{}{other}",
            policy(
                "  tier: domain\n  action: DENY\n  target: {workloads: [prod/api]}\n  rules: [{to: [{paths: [/x]}]}]\n"
            )
        ),
        "MW314",
    );
    assert_eq!(d.severity, Severity::Warning);
    assert_eq!((d.line, d.field.as_deref()), (7, Some("spec.target")));
    assert!(
        d.message.contains("reaches namespace(s) `prod`"),
        "{}",
        d.message
    );
    // Selecting by attribute only: every namespace.
    let d = only(
        &policy(
            "  tier: domain\n  action: DENY\n  target: {attributes: {tier: [front]}}\n  rules: [{to: [{paths: [/x]}]}]\n",
        ),
        "MW314",
    );
    assert!(
        d.message.contains("reaches every namespace"),
        "{}",
        d.message
    );
    assert!(d.help.unwrap().contains("namespaces: [shop]"));
    // Confined: clean.
    clean(&policy(
        "  tier: domain\n  action: DENY\n  target: {namespaces: [shop], attributes: {tier: [front]}}\n  rules: [{to: [{paths: [/x]}]}]\n",
    ));
}

#[test]
fn mw315_kinds_not_enforced_yet() {
    let d = only(
        "apiVersion: meshward.io/v1alpha1\nkind: TrustDomainFederation\nmetadata: {name: partner, namespace: meshward-system}\nspec:\n  trustDomain: partner.example\n  bundleEndpoint: {url: https://bundle.partner.example/shop, profile: https_web}\n",
        "MW315",
    );
    assert_eq!(d.severity, Severity::Warning);
    assert_eq!((d.line, d.field.as_deref()), (2, Some("kind")));
    assert!(d.message.contains("not enforced yet"), "{}", d.message);
    // A `FaultInjection` is enforced (crate meshward-proxy, docs/faults.md): no MW315.
    clean(FAULT);
}

const FAULT: &str = "apiVersion: meshward.io/v1alpha1\nkind: FaultInjection\nmetadata: {name: f, namespace: shop}\nspec:\n  target: {workloads: [web]}\n  from: {namespaces: [shop]}\n  to: [{methods: [GET], paths: [/api/*]}]\n  delay: {fixed: 200ms, percent: 50}\n  abort: {grpcStatus: UNAVAILABLE, percent: 1}\n  expiresAt: 2030-01-01T00:00:00Z\n";

#[test]
fn mw103_a_fault_abort_ends_a_request_one_valid_way() {
    for (abort, field, says) in [
        (
            "{httpStatus: 503, tcpReset: true, percent: 1}",
            "spec.abort.httpStatus",
            "exactly one",
        ),
        ("{percent: 1}", "spec.abort.httpStatus", "exactly one"),
        (
            "{httpStatus: 99, percent: 1}",
            "spec.abort.httpStatus",
            "200-599",
        ),
        (
            "{grpcStatus: UNAVAILBLE, percent: 1}",
            "spec.abort.grpcStatus",
            "not a gRPC error status",
        ),
        (
            "{grpcStatus: OK, percent: 1}",
            "spec.abort.grpcStatus",
            "not a gRPC error status",
        ),
    ] {
        let doc = FAULT.replace("{grpcStatus: UNAVAILABLE, percent: 1}", abort);
        let d = only(&doc, "MW103");
        assert_eq!(d.field.as_deref(), Some(field), "{abort}: {d:?}");
        assert_eq!(d.line, 9, "{abort}");
        assert!(d.message.contains(says), "{abort}: {}", d.message);
    }
    // Its `to` and `from` are checked as an AuthorizationPolicy's.
    let d = only(&FAULT.replace("/api/*", "/api*"), "MW108");
    assert_eq!(d.field.as_deref(), Some("spec.to[0].paths[0]"), "{d:?}");
    let d = only(&FAULT.replace("[shop]", "[shpo]"), "MW203");
    assert!(
        d.field
            .as_deref()
            .is_some_and(|f| f.starts_with("spec.from")),
        "{d:?}"
    );
}

#[test]
fn mw103_connection_limits_out_of_range_name_file_line_and_field() {
    let mesh = "apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  trustDomain: td.example\n  connectionLimits:\n    perIdentity: 0\n    total: 5000000\n    headerReadTimeout: 1ms\n    idleTimeout: 30d\n";
    let loaded = load_sources(vec![(Arc::from("mesh.yaml"), Arc::from(mesh))]);
    let d: Vec<&Diagnostic> = loaded
        .diagnostics
        .iter()
        .filter(|x| x.code == "MW103")
        .collect();
    let at = |field: &str| {
        d.iter()
            .find(|x| x.field.as_deref() == Some(field))
            .unwrap_or_else(|| panic!("no MW103 at {field}: {d:#?}"))
    };
    for (field, line, words) in [
        (
            "spec.connectionLimits.perIdentity",
            7,
            "between 1 and 1000000 connections, not 0",
        ),
        ("spec.connectionLimits.total", 8, "not 5000000"),
        (
            "spec.connectionLimits.headerReadTimeout",
            9,
            "between 100ms and 10m, not 1ms",
        ),
        (
            "spec.connectionLimits.idleTimeout",
            10,
            "between 1s and 1day, not 30days",
        ),
    ] {
        let x = at(field);
        assert_eq!((&*x.file, x.line), ("mesh.yaml", line), "{x:#?}");
        assert!(x.message.contains(words), "{}", x.message);
        assert_eq!(x.severity, Severity::Error);
    }
    assert!(loaded.into_valid().is_err());
    // On a workload too, and an unknown field is named with a suggestion.
    let d = only(
        "apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: x, namespace: shop}\nspec:\n  connectionLimits: {total: 0}\n",
        "MW103",
    );
    assert_eq!(d.field.as_deref(), Some("spec.connectionLimits.total"));
    assert_eq!(d.line, 5);
    let d = only(
        "apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: x, namespace: shop}\nspec:\n  connectionLimits: {perIdentty: 3}\n",
        "MW102",
    );
    assert_eq!(d.help.as_deref(), Some("did you mean `perIdentity`?"));
}

#[test]
fn connection_limits_workload_fields_override_the_mesh() {
    let yaml = "apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  trustDomain: td.example\n  connectionLimits: {perIdentity: 50, total: 400, idleTimeout: 2m}\n---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\nspec:\n  connectionLimits: {perIdentity: 20, headerReadTimeout: 3s}\n---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {name: db, namespace: shop}\nspec: {}\n";
    let set = load_sources(vec![(Arc::from("m.yaml"), Arc::from(yaml))])
        .into_valid()
        .unwrap_or_else(|l| panic!("{:#?}", l.diagnostics));
    let web =
        set.connection_limits(&meshward_policy::decision::WorkloadRef::parse("shop/web").unwrap());
    assert_eq!(web.per_identity, Some(20));
    assert_eq!(web.total, Some(400));
    assert_eq!(
        web.header_read_timeout.map(|d| d.0),
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        web.idle_timeout.map(|d| d.0),
        Some(Duration::from_secs(120))
    );
    let db =
        set.connection_limits(&meshward_policy::decision::WorkloadRef::parse("shop/db").unwrap());
    assert_eq!((db.per_identity, db.header_read_timeout), (Some(50), None));
}

const TRAFFIC_HEAD: &str = "apiVersion: meshward.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t, namespace: shop}\nspec:\n  target: {workloads: [web]}\n";

#[test]
fn traffic_routes_retries_that_can_never_apply_are_said_and_the_retryable_mark_silences_them() {
    let d = only(
        &format!(
            "{TRAFFIC_HEAD}  retries: {{attempts: 2, retryOn: [5xx]}}\n  routes:\n  - name: create\n    methods: [POST]\n    paths: [/orders]\n"
        ),
        "MW103",
    );
    assert_eq!(d.severity, Severity::Warning);
    assert_eq!(d.field.as_deref(), Some("spec.routes[0].methods"));
    assert!(
        d.message.contains("route `create`") && d.message.contains("never retried"),
        "{d:?}"
    );
    assert_eq!(d.line, 9);
    clean(&format!(
        "{TRAFFIC_HEAD}  retries: {{attempts: 2, retryOn: [5xx]}}\n  routes:\n  - name: create\n    methods: [POST]\n    paths: [/orders]\n    retryable: true\n"
    ));
    // A route's own retries, its method and path patterns are checked like the policy's.
    let d = diags(&format!(
        "{TRAFFIC_HEAD}  timeout: 1s\n  routes:\n  - methods: [post]\n    paths: [orders]\n    retries: {{attempts: 1, perTryTimeout: 2s, retryOn: [flaky]}}\n"
    ));
    let fields: Vec<_> = d.iter().filter_map(|x| x.field.clone()).collect();
    for f in [
        "spec.routes[0].methods[0]",
        "spec.routes[0].paths[0]",
        "spec.routes[0].retries.retryOn[0]",
        "spec.routes[0].retries.perTryTimeout",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} not in {d:#?}");
    }
}

#[test]
fn a_service_objective_is_a_percentage_strictly_between_0_and_100() {
    let svc = |a: &str| {
        format!(
            "apiVersion: meshward.io/v1alpha1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  selector: {{app: web}}\n  objective: {{availability: {a}}}\n"
        )
    };
    clean(&svc("99.9"));
    for bad in ["100", "0", "-1", "250"] {
        let d = only(&svc(bad), "MW103");
        assert_eq!(
            d.field.as_deref(),
            Some("spec.objective.availability"),
            "{bad}"
        );
        assert_eq!(d.line, 6, "{bad}");
        assert!(d.message.contains("strictly between 0 and 100"), "{d:?}");
    }
}
