#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The authorization semantics of ARCHITECTURE §4, one behaviour per test, on small YAML
//! policy sets. Every check runs both evaluators and requires them to agree.

use std::sync::Arc;
use std::time::SystemTime;

use meshward_policy::decision::{
    Decision, HttpAttrs, Reason, Request, Source, Verdict, WorkloadRef,
};
use meshward_policy::engine::Engine;
use meshward_policy::model::PolicySet;
use meshward_policy::{load_sources, reference};

const BASE: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec: {trustDomain: td, mtlsMode: PERMISSIVE}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: api, namespace: prod, labels: {app: api}}
spec:
  attributes: {tenant: a, classification: restricted}
  ports: [{port: 80, protocol: HTTP}, {port: 5432, protocol: TCP}]
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  attributes: {tenant: a, posture: compliant}
  ports: [{port: 80, protocol: HTTP}]
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: batch, namespace: jobs}
spec:
  attributes: {tenant: b, posture: outdated}
  ports: [{port: 80, protocol: HTTP}]
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: api-svc, namespace: prod}
spec: {selector: {app: api}}
"#;

fn set(policies: &str) -> PolicySet {
    let loaded = load_sources(vec![
        (Arc::from("base.yaml"), Arc::from(BASE)),
        (Arc::from("p.yaml"), Arc::from(policies)),
    ]);
    match loaded.into_valid() {
        Ok(s) => s,
        Err(l) => panic!("invalid test set: {:#?}", l.diagnostics),
    }
}

fn t(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}

struct Req(Request);

impl Req {
    fn from(src: &str) -> Self {
        let source = if src == "-" {
            Source::Unauthenticated
        } else {
            Source::parse(&format!("spiffe://{src}")).unwrap()
        };
        Req(Request {
            source,
            destination: WorkloadRef::parse("prod/api").unwrap(),
            port: 80,
            http: Some(HttpAttrs {
                method: "GET".into(),
                path: "/".into(),
                host: None,
                headers: vec![],
            }),
            at: t("2026-01-01T12:00:00Z"),
        })
    }
    fn to(mut self, w: &str) -> Self {
        self.0.destination = WorkloadRef::parse(w).unwrap();
        self
    }
    fn tcp(mut self, port: u16) -> Self {
        self.0.port = port;
        self.0.http = None;
        self
    }
    fn get(self, path: &str) -> Self {
        self.method("GET", path)
    }
    fn method(mut self, m: &str, path: &str) -> Self {
        let h = self.0.http.get_or_insert_with(Default::default);
        h.method = m.into();
        h.path = path.into();
        self
    }
    fn host(mut self, h: &str) -> Self {
        self.0.http.as_mut().unwrap().host = Some(h.into());
        self
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.0
            .http
            .as_mut()
            .unwrap()
            .headers
            .push((k.into(), v.into()));
        self
    }
    fn at(mut self, s: &str) -> Self {
        self.0.at = t(s);
        self
    }
}

/// Decides with both evaluators; they must agree.
fn decide(s: &PolicySet, r: &Req) -> Decision {
    let a = reference::evaluate(s, &r.0);
    let b = Engine::compile(s).decide(&r.0);
    assert!(
        a.same_outcome(&b),
        "evaluators disagree on {:?}\nreference {a:#?}\nengine {b:#?}",
        r.0
    );
    a
}

fn verdict(s: &PolicySet, r: Req) -> Verdict {
    decide(s, &r).verdict
}

fn pol(name: &str, ns: &str, body: &str) -> String {
    format!(
        "---\napiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
    )
}

fn allow_api(rules: &str) -> String {
    pol(
        "allow",
        "prod",
        &format!(
            "  tier: service\n  action: ALLOW\n  target: {{workloads: [api]}}\n  rules:\n{rules}"
        ),
    )
}

const ALLOW: Verdict = Verdict::Allow;
const DENY: Verdict = Verdict::Deny;

#[test]
fn default_deny_when_no_tier_allows() {
    let s = set("");
    let d = decide(&s, &Req::from("td/ns/prod/sa/web"));
    assert_eq!((d.verdict, d.reason), (DENY, Reason::DefaultDeny));
}

#[test]
fn tiers_intersect_a_lower_tier_only_narrows() {
    let s = set(&(pol(
        "base",
        "sec",
        "  tier: baseline\n  action: ALLOW\n  rules:\n    - from: [{namespaces: [prod]}]\n",
    ) + &allow_api("    - from: [{namespaces: [prod, jobs]}]\n")));
    assert_eq!(verdict(&s, Req::from("td/ns/prod/sa/web")), ALLOW);
    // The service tier allows jobs, but the baseline does not: deny at the baseline.
    let d = decide(&s, &Req::from("td/ns/jobs/sa/batch"));
    assert_eq!(
        (d.verdict, d.reason, d.tier.map(|t| t.as_str())),
        (DENY, Reason::NoAllowAtTier, Some("baseline"))
    );
    // The deciding rule of an allow is the most specific tier's.
    let d = decide(&s, &Req::from("td/ns/prod/sa/web"));
    assert_eq!(d.policy.as_deref(), Some("prod/allow"));
}

#[test]
fn deny_before_allow_and_non_overridable_baseline() {
    let s = set(&(allow_api("    - {}\n")
        + &pol(
            "no-jobs",
            "sec",
            "  tier: baseline\n  action: DENY\n  rules:\n    - from: [{namespaces: [jobs]}]\n",
        )
        + "---\napiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {name: let-jobs, namespace: prod}\nspec:\n  action: allow\n  subject: {namespaces: [jobs]}\n  target: {workloads: [api]}\n  reason: r\n  expiresAt: 2026-01-02T00:00:00Z\n"));
    assert_eq!(verdict(&s, Req::from("td/ns/prod/sa/web")), ALLOW);
    // The allow override does not lift a non-overridable baseline deny.
    let d = decide(&s, &Req::from("td/ns/jobs/sa/batch"));
    assert_eq!(
        (d.verdict, d.reason, d.policy.as_deref()),
        (DENY, Reason::DeniedByRule, Some("sec/no-jobs"))
    );
}

#[test]
fn overridable_baseline_deny_yields_to_an_active_allow_override_only() {
    let s = set(&(allow_api("    - {}\n")
        + &pol(
            "no-jobs",
            "sec",
            "  tier: baseline\n  action: DENY\n  overridable: true\n  rules:\n    - from: [{namespaces: [jobs]}]\n",
        )
        + "---\napiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {name: let-jobs, namespace: prod}\nspec:\n  action: allow\n  subject: {namespaces: [jobs]}\n  target: {workloads: [api]}\n  reason: r\n  startsAt: 2026-01-01T10:00:00Z\n  expiresAt: 2026-01-01T14:00:00Z\n"));
    let d = decide(&s, &Req::from("td/ns/jobs/sa/batch"));
    assert_eq!(
        (d.verdict, d.reason, d.policy.as_deref()),
        (ALLOW, Reason::OverrideAllow, Some("prod/let-jobs"))
    );
    // Before it starts and from its expiry on, it is not honoured.
    assert_eq!(
        decide(
            &s,
            &Req::from("td/ns/jobs/sa/batch").at("2026-01-01T09:59:59Z")
        )
        .reason,
        Reason::DeniedByRule
    );
    assert_eq!(
        decide(
            &s,
            &Req::from("td/ns/jobs/sa/batch").at("2026-01-01T14:00:00Z")
        )
        .reason,
        Reason::DeniedByRule
    );
}

#[test]
fn deny_and_quarantine_overrides() {
    let o = |name: &str, action: &str, extra: &str| {
        format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {{name: {name}, namespace: ops}}\nspec:\n  action: {action}\n  reason: r\n  expiresAt: 2026-01-02T00:00:00Z\n{extra}"
        )
    };
    let s = set(&(allow_api("    - {}\n")
        + &pol(
            "allow-web",
            "prod",
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - {}\n",
        )
        + &o(
            "q",
            "quarantine",
            "  subject: {identities: [\"spiffe://td/ns/prod/sa/api\"]}\n",
        )
        + &o(
            "d",
            "deny",
            "  subject: {namespaces: [jobs]}\n  target: {workloads: [prod/web]}\n",
        )));
    // Quarantine: nothing reaches the quarantined workload, and it reaches nothing.
    let d = decide(&s, &Req::from("td/ns/prod/sa/web"));
    assert_eq!(
        (d.verdict, d.reason, d.policy.as_deref()),
        (DENY, Reason::Quarantined, Some("ops/q"))
    );
    let d = decide(&s, &Req::from("td/ns/prod/sa/api").to("prod/web"));
    assert_eq!(d.reason, Reason::Quarantined);
    // Deny override: jobs may not reach web; others may.
    assert_eq!(
        decide(&s, &Req::from("td/ns/jobs/sa/batch").to("prod/web")).reason,
        Reason::OverrideDeny
    );
    assert_eq!(
        verdict(&s, Req::from("td/ns/prod/sa/web").to("prod/web")),
        ALLOW
    );
    // Expired: honoured no more.
    assert_eq!(
        verdict(
            &s,
            Req::from("td/ns/prod/sa/web").at("2026-01-02T00:00:00Z")
        ),
        ALLOW
    );
}

#[test]
fn a_quarantine_spares_its_excepted_peers_both_ways() {
    let s = set(&(allow_api("    - {}\n")
        + &pol(
            "allow-web",
            "prod",
            "  tier: service\n  action: ALLOW\n  target: {workloads: [web]}\n  rules:\n    - {}\n",
        )
        + &pol(
            "allow-batch",
            "jobs",
            "  tier: service\n  action: ALLOW\n  target: {workloads: [batch]}\n  rules:\n    - {}\n",
        )
        + "---\napiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {name: q, namespace: prod}\nspec:\n  action: quarantine\n  subject: {identities: [\"spiffe://td/ns/prod/sa/api\"]}\n  except: {namespaces: [jobs]}\n  reason: r\n  expiresAt: 2026-01-02T00:00:00Z\n"));
    // The quarantined api still reaches and is reached by `jobs` (its platform peer)...
    assert_eq!(
        verdict(&s, Req::from("td/ns/prod/sa/api").to("jobs/batch")),
        ALLOW
    );
    assert_eq!(verdict(&s, Req::from("td/ns/jobs/sa/batch")), ALLOW);
    // ...and by nobody else, either way.
    let d = decide(&s, &Req::from("td/ns/prod/sa/api").to("prod/web"));
    assert_eq!((d.verdict, d.reason), (DENY, Reason::Quarantined));
    let d = decide(&s, &Req::from("td/ns/prod/sa/web"));
    assert_eq!((d.verdict, d.reason), (DENY, Reason::Quarantined));
}

#[test]
fn audit_marks_never_change_the_verdict() {
    let s = set(&(allow_api("    - from: [{namespaces: [prod]}]\n")
        + &pol(
            "audit",
            "sec",
            "  tier: baseline\n  action: AUDIT\n  target: {attributes: {classification: restricted}}\n  rules:\n    - name: all\n",
        )));
    let d = decide(&s, &Req::from("td/ns/prod/sa/web"));
    assert_eq!(d.verdict, ALLOW);
    assert_eq!(d.audit.len(), 1);
    assert_eq!(&*d.audit[0].policy, "sec/audit");
    let d = decide(&s, &Req::from("td/ns/jobs/sa/batch"));
    assert_eq!((d.verdict, d.audit.len()), (DENY, 1));
}

#[test]
fn dry_run_policies_give_a_shadow_verdict_only() {
    let s = set(&(allow_api("    - {}\n")
        + &pol(
            "tighten",
            "prod",
            "  tier: service\n  action: DENY\n  mode: dry-run\n  target: {workloads: [api]}\n  rules:\n    - from: [{namespaces: [jobs]}]\n",
        )));
    let d = decide(&s, &Req::from("td/ns/jobs/sa/batch"));
    assert_eq!(d.verdict, ALLOW);
    let sh = d.shadow.unwrap();
    assert_eq!(
        (sh.verdict, sh.reason, sh.policy.as_deref()),
        (DENY, Reason::DeniedByRule, Some("prod/tighten"))
    );
    let d = decide(&s, &Req::from("td/ns/prod/sa/web"));
    assert_eq!(d.shadow.unwrap().verdict, ALLOW);
    // No dry-run policy targets web: no shadow.
    assert!(
        decide(&s, &Req::from("td/ns/prod/sa/api").to("prod/web"))
            .shadow
            .is_none()
    );
}

#[test]
fn source_matchers() {
    let s = set(&allow_api(concat!(
        "    - name: exact\n      from: [{identities: [\"spiffe://td/ns/prod/sa/web\"]}]\n      to: [{paths: [/exact]}]\n",
        "    - name: pattern\n      from: [{identities: [\"spiffe://td/ns/cert-manager.io/*\"]}]\n      to: [{paths: [/pattern]}]\n",
        "    - name: td\n      from: [{trustDomains: [partner]}]\n      to: [{paths: [/td]}]\n",
        "    - name: attr\n      from: [{attributes: {posture: compliant}}]\n      to: [{paths: [/attr]}]\n",
        "    - name: same\n      from: [{sameAttributes: [tenant]}]\n      to: [{paths: [/same]}]\n",
        "    - name: plain\n      from: [{unauthenticated: true}]\n      to: [{paths: [/plain]}]\n",
        "    - name: ns\n      from: [{namespaces: [jobs]}]\n      to: [{paths: [/ns]}]\n",
    )));
    let v = |src: &str, p: &str| verdict(&s, Req::from(src).get(p));
    assert_eq!(v("td/ns/prod/sa/web", "/exact"), ALLOW);
    assert_eq!(v("td/ns/prod/sa/web2", "/exact"), DENY);
    assert_eq!(v("td/ns/cert-manager.io/sa/x", "/pattern"), ALLOW);
    assert_eq!(
        v("td/ns/cert-manager-io/sa/x", "/pattern"),
        DENY,
        "never a substring match"
    );
    assert_eq!(v("partner/ns/prod/sa/web", "/td"), ALLOW);
    assert_eq!(v("td/ns/prod/sa/web", "/td"), DENY);
    assert_eq!(v("td/ns/prod/sa/web", "/attr"), ALLOW);
    assert_eq!(v("td/ns/jobs/sa/batch", "/attr"), DENY);
    assert_eq!(
        v("td/ns/prod/sa/web", "/same"),
        ALLOW,
        "web and api share tenant a"
    );
    assert_eq!(v("td/ns/jobs/sa/batch", "/same"), DENY);
    assert_eq!(v("-", "/plain"), ALLOW);
    assert_eq!(v("td/ns/prod/sa/web", "/plain"), DENY);
    assert_eq!(v("-", "/exact"), DENY);
    assert_eq!(v("td/ns/jobs/sa/batch", "/ns"), ALLOW);
    assert_eq!(
        v("partner/ns/jobs/sa/batch", "/ns"),
        DENY,
        "namespaces are the mesh's own trust domain"
    );
}

#[test]
fn negative_source_fields_match_plaintext_fail_closed() {
    let s = set(&(allow_api("    - {}\n")
        + &pol(
            "no-outsiders",
            "sec",
            "  tier: baseline\n  action: DENY\n  rules:\n    - from: [{notNamespaces: [prod]}]\n",
        )));
    assert_eq!(verdict(&s, Req::from("td/ns/prod/sa/web")), ALLOW);
    assert_eq!(verdict(&s, Req::from("td/ns/jobs/sa/batch")), DENY);
    assert_eq!(
        verdict(&s, Req::from("-")),
        DENY,
        "plaintext is not in prod"
    );
}

#[test]
fn strict_mtls_denies_plaintext_before_policy() {
    let strict = BASE.replace("mtlsMode: PERMISSIVE", "mtlsMode: STRICT");
    let loaded = load_sources(vec![
        (Arc::from("b.yaml"), Arc::from(strict)),
        (
            Arc::from("p.yaml"),
            Arc::from(allow_api("    - from: [{unauthenticated: true}]\n")),
        ),
    ]);
    let s = loaded.set.unwrap();
    assert_eq!(decide(&s, &Req::from("-")).reason, Reason::Unauthenticated);
}

#[test]
fn destinations_by_name_service_label_attribute() {
    let s = set(&(pol(
        "by-svc",
        "prod",
        "  tier: service\n  action: ALLOW\n  target: {services: [api-svc]}\n  rules:\n    - {}\n",
    ) + &pol(
        "by-label",
        "sec",
        "  tier: domain\n  action: ALLOW\n  target: {labels: {app: web}}\n  rules:\n    - from: [{namespaces: [jobs]}]\n",
    ) + &pol(
        "by-attr",
        "sec",
        "  tier: domain\n  action: DENY\n  target: {attributes: {classification: restricted}}\n  rules:\n    - from: [{namespaces: [jobs]}]\n",
    )));
    assert_eq!(verdict(&s, Req::from("td/ns/prod/sa/web")), ALLOW);
    assert_eq!(
        decide(&s, &Req::from("td/ns/jobs/sa/batch"))
            .policy
            .as_deref(),
        Some("sec/by-attr")
    );
    assert_eq!(
        verdict(&s, Req::from("td/ns/jobs/sa/batch").to("prod/web")),
        ALLOW
    );
    assert_eq!(
        decide(&s, &Req::from("td/ns/prod/sa/api").to("prod/web")).reason,
        Reason::NoAllowAtTier
    );
    assert_eq!(
        decide(&s, &Req::from("td/ns/prod/sa/api").to("nope/x")).reason,
        Reason::UnknownDestination
    );
}

#[test]
fn operations_ports_methods_paths_hosts() {
    let s = set(&allow_api(concat!(
        "    - to: [{ports: [80], methods: [GET], paths: [/a, \"/pre/*\", \"/g/*/x\"]}]\n",
        "    - to: [{methods: [POST], hosts: [\"API.td.\", \"*.svc.td\"]}]\n",
        "    - to: [{methods: [PUT], paths: [\"/*\"], notPaths: [\"/secret/*\"]}]\n",
    )));
    let v = |r: Req| verdict(&s, r);
    let w = || Req::from("td/ns/prod/sa/web");
    assert_eq!(v(w().get("/a")), ALLOW);
    assert_eq!(v(w().method("get", "/a")), DENY, "methods match exactly");
    assert_eq!(v(w().get("/a/b")), DENY);
    assert_eq!(v(w().get("/pre")), ALLOW);
    assert_eq!(v(w().get("/pre/x/y")), ALLOW);
    assert_eq!(v(w().get("/prefix")), DENY);
    assert_eq!(v(w().get("/g/1/x")), ALLOW);
    assert_eq!(v(w().get("/g/1/2/x")), DENY);
    assert_eq!(
        v(w().method("POST", "/").host("api.td:8080")),
        ALLOW,
        "host: case, port, trailing dot"
    );
    assert_eq!(v(w().method("POST", "/").host("API.TD.")), ALLOW);
    assert_eq!(v(w().method("POST", "/").host("x.svc.td")), ALLOW);
    assert_eq!(v(w().method("POST", "/").host("svc.td")), DENY);
    assert_eq!(
        v(w().method("POST", "/")),
        DENY,
        "no host: an ALLOW on hosts does not match"
    );
    assert_eq!(v(w().method("PUT", "/x")), ALLOW);
    assert_eq!(v(w().method("PUT", "/secret/x")), DENY);
}

#[test]
fn repeated_headers_any_for_deny_every_for_allow() {
    let s = set(
        &(allow_api("    - when: [{header: X-Env, values: [prod, \"stag*\"]}]\n")
            + &pol(
                "deny-debug",
                "sec",
                "  tier: baseline\n  action: DENY\n  rules:\n    - to: [{ports: [80]}]\n      when: [{header: x-debug, values: [\"on\"]}]\n",
            )),
    );
    let w = || Req::from("td/ns/prod/sa/web");
    assert_eq!(verdict(&s, w().header("x-env", "prod")), ALLOW);
    assert_eq!(
        verdict(&s, w().header("x-env", "prod").header("x-env", "staging")),
        ALLOW
    );
    assert_eq!(
        verdict(&s, w().header("x-env", "prod").header("x-env", "dev")),
        DENY,
        "ALLOW: every value must satisfy"
    );
    assert_eq!(
        verdict(&s, w()),
        DENY,
        "a missing header never satisfies values"
    );
    assert_eq!(
        verdict(
            &s,
            w().header("x-env", "prod")
                .header("x-debug", "off")
                .header("x-debug", "on")
        ),
        DENY,
        "DENY: any value"
    );
    assert_eq!(
        verdict(&s, w().header("x-env", "prod").header("x-debug", "off")),
        ALLOW
    );
}

#[test]
fn comma_lists_and_non_utf8_values_are_evaluated_element_by_element() {
    let s = set(&(allow_api(
        "    - when: [{header: x-env, values: [prod, \"stag*\"]}, {header: x-tier, notValues: [gold]}]\n",
    ) + &pol(
        "deny-admin",
        "sec",
        "  tier: baseline\n  action: DENY\n  rules:\n    - to: [{ports: [80]}]\n      when: [{header: x-role, values: [admin]}]\n",
    )));
    let w = || Req::from("td/ns/prod/sa/web").header("x-env", "prod");
    assert_eq!(verdict(&s, w()), ALLOW);
    // Found in issue #11: `x-role: reader,admin` passed a deny on `admin`.
    assert_eq!(verdict(&s, w().header("x-role", "reader,admin")), DENY);
    assert_eq!(verdict(&s, w().header("x-role", "reader , admin")), DENY);
    assert_eq!(verdict(&s, w().header("x-role", "reader")), ALLOW);
    // ALLOW `values`: every element must match.
    assert_eq!(
        verdict(
            &s,
            Req::from("td/ns/prod/sa/web").header("x-env", "prod, dev")
        ),
        DENY
    );
    assert_eq!(
        verdict(
            &s,
            Req::from("td/ns/prod/sa/web").header("x-env", "prod,staging")
        ),
        ALLOW
    );
    // ALLOW `notValues`: no element may be excluded.
    assert_eq!(verdict(&s, w().header("x-tier", "silver,gold")), DENY);
    // Not UTF-8 (U+FFFD from the proxy): fails the negative ALLOW condition and matches
    // the DENY, whatever it would decode to.
    assert_eq!(verdict(&s, w().header("x-tier", "g\u{fffd}ld")), DENY);
    assert_eq!(verdict(&s, w().header("x-role", "adm\u{fffd}n")), DENY);
    assert_eq!(verdict(&s, w().header("x-tier", "silver")), ALLOW);
}

#[test]
fn http_conditions_on_tcp_allow_never_deny_always() {
    let s = set(&(allow_api(
        "    - to: [{methods: [GET]}]\n    - name: tcp\n      from: [{namespaces: [jobs]}]\n      to: [{ports: [5432]}]\n",
    ) + &pol(
        "no-delete",
        "sec",
        "  tier: domain\n  action: DENY\n  target: {namespaces: [prod]}\n  rules:\n    - from: [{namespaces: [jobs]}]\n      to: [{methods: [DELETE]}]\n",
    )));
    // ALLOW with HTTP-only conditions: no match on TCP.
    assert_eq!(
        decide(&s, &Req::from("td/ns/prod/sa/web").tcp(5432)).reason,
        Reason::NoAllowAtTier
    );
    // DENY with HTTP-only conditions on TCP: denies all of it (jobs would be allowed by `tcp`).
    let d = decide(&s, &Req::from("td/ns/jobs/sa/batch").tcp(5432));
    assert_eq!(
        (d.verdict, d.policy.as_deref()),
        (DENY, Some("sec/no-delete"))
    );
    // On HTTP the DENY only covers DELETE.
    assert_eq!(
        verdict(&s, Req::from("td/ns/jobs/sa/batch").get("/")),
        ALLOW
    );
}
