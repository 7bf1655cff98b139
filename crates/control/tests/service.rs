#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The control plane's operations on a real SQLite store and a real CA: apply with
//! validation, tests, permissions and approval; rollback; join tokens and signing; overrides
//! and their expiry; the audit chain and its tamper detection.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_control::audit::{self, Broken};
use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY};
use meshward_control::service::{Applied, Config, ControlPlane, Refused};
use meshward_control::store::{AuditFilter, Files, SqliteStore, Store};
use meshward_identity::ca::new_workload_key;
use meshward_identity::svid::{TrustBundles, Usage, validate};
use meshward_identity::{SpiffeId, TrustDomain};

fn t(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}

fn now() -> SystemTime {
    t("2026-11-28T10:00:00Z")
}

fn op(name: &str, roles: &[&str], ns: &[&str]) -> Operator {
    Operator {
        name: name.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        token_sha256: vec![],
    }
}

fn alice() -> Operator {
    op("alice", &[PLATFORM_SECURITY], &[])
}
fn bob() -> Operator {
    op("bob", &[PLATFORM_SECURITY], &[])
}
fn carol() -> Operator {
    op("carol", &[], &["payments"])
}

fn examples() -> Files {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
    let mut files: Files = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn plane(dir: &Path) -> ControlPlane {
    let td = TrustDomain::parse("shop.example").unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("meshward.db")).unwrap());
    let ca = ControlPlane::open_ca(dir, &td, SystemTime::now()).unwrap();
    let cfg = Config {
        data_dir: dir.to_owned(),
        trust_domain: td,
        default_lifetime: Duration::from_secs(3600),
        max_token_ttl: Duration::from_secs(86400),
    };
    ControlPlane::new(
        store,
        ca,
        Operators {
            operators: vec![alice(), bob(), carol()],
        },
        cfg,
    )
}

/// A plane with the examples applied and approved (revision 1).
fn seeded(dir: &Path) -> ControlPlane {
    let cp = plane(dir);
    let Applied::PendingApproval { proposal, .. } =
        cp.apply(&alice(), examples(), "initial", now()).unwrap()
    else {
        panic!("baseline needs approval")
    };
    let Applied::Committed { revision, .. } = cp.approve(&bob(), proposal, now()).unwrap() else {
        panic!()
    };
    assert_eq!(revision, 1);
    cp
}

fn edit(files: &Files, file: &str, from: &str, to: &str) -> Files {
    files
        .iter()
        .map(|(n, t)| {
            if n == file {
                assert!(t.contains(from), "{from}");
                (n.clone(), t.replacen(from, to, 1))
            } else {
                (n.clone(), t.clone())
            }
        })
        .collect()
}

fn head(cp: &ControlPlane) -> u64 {
    cp.store.head().unwrap().map_or(0, |r| r.rev)
}

#[test]
fn baseline_changes_need_a_second_platform_security_operator() {
    let dir = tempfile::tempdir().unwrap();
    let cp = plane(dir.path());
    let Applied::PendingApproval {
        proposal, summary, ..
    } = cp.apply(&alice(), examples(), "initial", now()).unwrap()
    else {
        panic!()
    };
    assert!(
        summary.starts_with("+AuthorizationPolicy acme/storefront")
            && summary.ends_with("and 26 more"),
        "{summary}"
    );
    assert_eq!(head(&cp), 0, "nothing is committed before approval");
    assert!(
        matches!(cp.approve(&alice(), proposal, now()), Err(Refused::Forbidden(m)) if m.contains("cannot also approve"))
    );
    assert!(matches!(
        cp.approve(&carol(), proposal, now()),
        Err(Refused::Forbidden(_))
    ));
    assert_eq!(head(&cp), 0);
    assert!(matches!(
        cp.approve(&bob(), proposal, now()).unwrap(),
        Applied::Committed { revision: 1, .. }
    ));
    let h = cp.history().unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].author, "operator:alice");
    assert_eq!(h[0].reason, "initial");
}

#[test]
fn namespace_owners_change_only_their_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let files = cp.store.head().unwrap().unwrap().files;
    // carol owns payments: a domain policy there commits directly.
    let ok = edit(
        &files,
        "domain-payments.yaml",
        "namespaces: [orders, payments, platform]",
        "namespaces: [orders, payments, platform, web]",
    );
    let r = cp.apply(&carol(), ok, "let web in", now()).unwrap();
    assert!(matches!(r, Applied::Committed { revision: 2, .. }), "{r:?}");
    // ... but not orders' service policy, nor a baseline.
    let files = cp.store.head().unwrap().unwrap().files;
    let bad = edit(
        &files,
        "services-policies.yaml",
        "methods: [GET, POST]",
        "methods: [GET, POST, DELETE]",
    );
    assert!(
        matches!(cp.apply(&carol(), bad, "x", now()), Err(Refused::Forbidden(m)) if m.contains("namespace `orders`"))
    );
    let bad = edit(
        &files,
        "baseline.yaml",
        "notNamespaces: [platform]",
        "notNamespaces: [platform, payments]",
    );
    assert!(
        matches!(cp.apply(&carol(), bad, "x", now()), Err(Refused::Forbidden(m)) if m.contains("platform-security"))
    );
    assert_eq!(head(&cp), 2, "a refused apply leaves the store as it was");
    let rejected = cp
        .audit(&AuditFilter {
            action_prefix: Some("apply.rejected".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].actor, "operator:carol");
}

#[test]
fn invalid_sets_and_failing_tests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let files = cp.store.head().unwrap().unwrap().files;
    let typo = edit(
        &files,
        "domain-payments.yaml",
        "namespaces: [orders, payments, platform]",
        "namespacs: [orders, payments, platform]",
    );
    match cp.apply(&carol(), typo, "typo", now()) {
        Err(Refused::Invalid(m, _)) => {
            assert!(m.contains("error[MW102]: unknown field `namespacs`"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // Valid, but it breaks a PolicyTest (orders can no longer charge).
    let breaks = edit(
        &files,
        "domain-payments.yaml",
        "namespaces: [orders, payments, platform]",
        "namespaces: [payments, platform]",
    );
    match cp.apply(&carol(), breaks, "oops", now()) {
        Err(Refused::TestsFail(m)) => assert!(m.contains("orders charges a card"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(head(&cp), 1);
}

#[test]
fn rollback_restores_an_earlier_revision_as_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let files = cp.store.head().unwrap().unwrap().files;
    let next = edit(
        &files,
        "domain-payments.yaml",
        "namespaces: [orders, payments, platform]",
        "namespaces: [orders, payments, platform, web]",
    );
    cp.apply(&carol(), next, "let web in", now()).unwrap();
    // A rollback is a change like an apply: it needs a reason ...
    assert!(matches!(
        cp.rollback(&carol(), 1, " ", now()),
        Err(Refused::BadRequest(m)) if m.contains("needs a reason")
    ));
    // ... and carol may undo what only touches her namespace.
    assert!(matches!(
        cp.rollback(&carol(), 1, "revert", now()).unwrap(),
        Applied::Committed { revision: 3, .. }
    ));
    assert_eq!(cp.revision(3).unwrap().files, cp.revision(1).unwrap().files);
    assert!(
        cp.history().unwrap()[0]
            .summary
            .starts_with("rollback to 1")
    );
    assert!(matches!(
        cp.rollback(&alice(), 99, "x", now()),
        Err(Refused::NotFound(_))
    ));
    let rejected = cp
        .audit(&AuditFilter {
            action_prefix: Some("rollback.rejected".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
}

#[test]
fn rolling_back_across_a_baseline_change_waits_for_approval() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let files = cp.store.head().unwrap().unwrap().files;
    let next = edit(
        &files,
        "baseline.yaml",
        "notNamespaces: [platform]",
        "notNamespaces: [platform, payments]",
    );
    let Applied::PendingApproval { proposal, .. } = cp
        .apply(&alice(), next, "payments may call admin paths", now())
        .unwrap()
    else {
        panic!("a baseline change needs approval")
    };
    cp.approve(&bob(), proposal, now()).unwrap();
    assert_eq!(head(&cp), 2);
    // Rolling back to 1 changes the baseline again: not carol's, and alice needs bob.
    assert!(matches!(
        cp.rollback(&carol(), 1, "undo", now()),
        Err(Refused::Forbidden(m)) if m.contains("baseline")
    ));
    let Applied::PendingApproval {
        proposal, summary, ..
    } = cp.rollback(&alice(), 1, "undo", now()).unwrap()
    else {
        panic!("a rollback across a baseline change needs approval")
    };
    assert!(summary.starts_with("rollback to 1"), "{summary}");
    assert_eq!(head(&cp), 2, "nothing committed before the approval");
    assert!(matches!(
        cp.approve(&alice(), proposal, now()),
        Err(Refused::Forbidden(_))
    ));
    cp.approve(&bob(), proposal, now()).unwrap();
    assert_eq!(head(&cp), 3);
    assert_eq!(cp.revision(3).unwrap().files, cp.revision(1).unwrap().files);
}

/// A document in carol's namespace `payments`, appended to the examples.
fn with_doc(cp: &ControlPlane, doc: &str) -> Files {
    let mut files = cp.store.head().unwrap().unwrap().files;
    files.push(("extra.yaml".into(), doc.into()));
    files
}

#[test]
fn an_owner_of_one_namespace_cannot_change_what_another_allows_or_denies() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let meta = "apiVersion: meshward.io/v1alpha1\nmetadata: {name: x, namespace: payments}\n";
    // Each kind, living in payments (carol's) and reaching orders (not hers).
    let cases = [
        (
            "AuthorizationPolicy deny",
            "kind: AuthorizationPolicy\nspec:\n  tier: domain\n  action: DENY\n  target: {workloads: [orders/orders-api]}\n  rules: [{to: [{paths: [/never]}]}]\n",
        ),
        (
            "AuthorizationPolicy allow",
            "kind: AuthorizationPolicy\nspec:\n  tier: domain\n  action: ALLOW\n  target: {namespaces: [orders]}\n  rules: [{from: [{namespaces: [payments]}], to: [{ports: [8080, 8443], paths: [/never]}]}]\n",
        ),
        (
            "allow Override",
            "kind: Override\nspec:\n  action: allow\n  subject: {namespaces: [payments]}\n  target: {services: [orders/orders]}\n  to: [{paths: [/never]}]\n  reason: r\n  expiresAt: 2026-11-28T12:00:00Z\n",
        ),
        (
            "deny Override",
            "kind: Override\nspec:\n  action: deny\n  target: {workloads: [orders/orders-api]}\n  to: [{paths: [/never]}]\n  reason: r\n  expiresAt: 2026-11-28T12:00:00Z\n",
        ),
        (
            "quarantine Override",
            "kind: Override\nspec:\n  action: quarantine\n  subject: {identities: [\"spiffe://shop.example/ns/orders/sa/nobody\"]}\n  reason: r\n  expiresAt: 2026-11-28T12:00:00Z\n",
        ),
        (
            "RateLimitPolicy",
            "kind: RateLimitPolicy\nspec:\n  target: {services: [orders/orders]}\n  limits: [{requestsPerSecond: 1}]\n",
        ),
        (
            "TrafficPolicy",
            "kind: TrafficPolicy\nspec:\n  target: {services: [orders/orders]}\n  timeout: 1s\n",
        ),
        (
            "FaultInjection",
            "kind: FaultInjection\nspec:\n  target: {workloads: [orders/orders-api]}\n  abort: {httpStatus: 503, percent: 100}\n  expiresAt: 2026-11-28T12:00:00Z\n",
        ),
    ];
    for (what, body) in cases {
        let before = head(&cp);
        let files = with_doc(&cp, &format!("{meta}{body}"));
        match cp.apply(&carol(), files.clone(), "test", now()) {
            Err(Refused::Forbidden(m)) => {
                assert!(m.contains("does not own namespace `orders`"), "{what}: {m}")
            }
            other => panic!("{what}: carol reached orders: {other:?}"),
        }
        assert_eq!(head(&cp), before, "{what}: the store is as it was");
        // The same resource aimed at carol's own namespace commits.
        let own = format!("{meta}{body}")
            .replace("orders/orders-api", "payments-api")
            .replace("orders/orders", "payments")
            .replace("namespaces: [orders]", "namespaces: [payments]")
            .replace("ns/orders/sa/nobody", "ns/payments/sa/nobody");
        let r = cp.apply(&carol(), with_doc(&cp, &own), "test", now());
        assert!(
            matches!(r, Ok(Applied::Committed { .. })),
            "{what} in her own namespace: {r:?}"
        );
        // An owner of both namespaces may make the cross-namespace change.
        let both = op("dave", &[], &["payments", "orders"]);
        let r = cp.apply(&both, files, "test", now());
        assert!(
            matches!(
                r,
                Ok(Applied::Committed { .. }) | Err(Refused::TestsFail(_))
            ),
            "{what}: {r:?}"
        );
        // Back to the seed for the next case.
        cp.rollback(&alice(), 1, "reset", now()).unwrap();
    }
    let rejected = cp
        .audit(&AuditFilter {
            action_prefix: Some("apply.rejected".into()),
            ..Default::default()
        })
        .unwrap();
    let carols = rejected
        .iter()
        .filter(|e| e.actor == "operator:carol")
        .count();
    assert_eq!(carols, cases.len(), "every refusal is audited");
}

#[test]
fn unconfined_targets_and_shared_attributes_are_mesh_wide() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    // A deny in payments selecting by attribute reaches whoever carries it, anywhere.
    let doc = "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: payments}\nspec:\n  tier: domain\n  action: DENY\n  target: {attributes: {classification: internal}}\n  rules: [{to: [{paths: [/never]}]}]\n";
    assert!(matches!(
        cp.apply(&carol(), with_doc(&cp, doc), "test", now()),
        Err(Refused::Forbidden(m)) if m.contains("reaches every namespace") && m.contains("platform-security")
    ));
    // Confined to her namespace it is hers.
    let confined = doc.replace("target: {", "target: {namespaces: [payments], ");
    assert!(matches!(
        cp.apply(&carol(), with_doc(&cp, &confined), "test", now()),
        Ok(Applied::Committed { .. })
    ));
    // Platform security may, with a second approval.
    let r = cp.apply(
        &alice(),
        with_doc(&cp, &doc.replace("name: x", "name: y")),
        "test",
        now(),
    );
    assert!(matches!(r, Ok(Applied::PendingApproval { .. })), "{r:?}");
    // reporting is `posture: outdated`, which a baseline DENY reads: claiming `compliant`
    // would lift that deny, so it is not carol's to change.
    let files = cp.store.head().unwrap().unwrap().files;
    let claim = edit(
        &files,
        "workloads.yaml",
        "attributes: {team: payments, posture: outdated",
        "attributes: {team: payments, posture: compliant",
    );
    match cp.apply(&carol(), claim.clone(), "test", now()) {
        Err(Refused::Forbidden(m)) => assert!(
            m.contains("`posture`")
                && m.contains("meshward-system/restricted-needs-compliant-posture"),
            "{m}"
        ),
        other => panic!("carol changed a mesh-wide attribute: {other:?}"),
    }
    // Platform security may make the change; here the PolicyTests then catch what it would
    // lift.
    let r = cp.apply(&alice(), claim, "test", now());
    assert!(
        matches!(&r, Err(Refused::TestsFail(m)) if m.contains("restricted data needs a compliant posture")),
        "{r:?}"
    );
    // An attribute nobody reads is hers (ports and labels too).
    let harmless = edit(
        &files,
        "workloads.yaml",
        "attributes: {team: payments, posture: outdated, classification: internal}",
        "attributes: {team: payments, posture: outdated, classification: internal, owner: carol}",
    );
    let r = cp.apply(&carol(), harmless, "test", now());
    assert!(matches!(r, Ok(Applied::Committed { .. })), "{r:?}");
}

#[test]
fn a_set_that_does_not_parse_is_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let files = cp.store.head().unwrap().unwrap().files;
    let broken = edit(
        &files,
        "domain-payments.yaml",
        "tier: domain",
        "tier: [domain",
    );
    match cp.apply(&carol(), broken, "typo", now()) {
        Err(Refused::Invalid(text, diags)) => {
            assert!(text.contains("MW101"), "{text}");
            assert!(text.contains("domain-payments.yaml"), "{text}");
            assert!(diags.iter().any(|d| d.code == "MW101"), "{diags:?}");
        }
        other => panic!("a YAML syntax error was not refused: {other:?}"),
    }
    assert_eq!(head(&cp), 1);
    let rejected = cp
        .audit(&AuditFilter {
            action_prefix: Some("apply.rejected".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert!(matches!(
        cp.apply(&carol(), files, "", now()),
        Err(Refused::BadRequest(m)) if m.contains("needs a reason")
    ));
}

#[test]
fn kinds_not_enforced_yet_are_named_by_apply() {
    let dir = tempfile::tempdir().unwrap();
    let cp = plane(dir.path());
    let Applied::PendingApproval { not_enforced, .. } =
        cp.apply(&alice(), examples(), "initial", now()).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        not_enforced,
        ["TrustDomainFederation meshward-system/partner"]
    );
}

#[test]
fn join_tokens_are_single_use_bound_and_expiring() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    // Certificates are checked against the real clock: use it throughout.
    let now = SystemTime::now;
    let id = SpiffeId::parse("spiffe://shop.example/ns/payments/sa/payments-api").unwrap();
    let (token, _) = cp
        .issue_token(&carol(), id.as_str(), Duration::from_secs(600), now())
        .unwrap();
    assert!(token.starts_with("mwj_"));
    // carol may not issue tokens for another namespace.
    assert!(matches!(
        cp.issue_token(
            &carol(),
            "spiffe://shop.example/ns/web/sa/frontend",
            Duration::from_secs(60),
            now()
        ),
        Err(Refused::Forbidden(_))
    ));
    // A CSR for another identity is refused (and the token is spent).
    let (_k, other_csr) =
        new_workload_key(&SpiffeId::parse("spiffe://shop.example/ns/web/sa/frontend").unwrap())
            .unwrap();
    assert!(
        matches!(cp.sign_with_token(&token, &other_csr, None, now()), Err(Refused::Forbidden(m)) if m.contains("asks for"))
    );
    let (token, _) = cp
        .issue_token(&carol(), id.as_str(), Duration::from_secs(600), now())
        .unwrap();
    let (_k, csr) = new_workload_key(&id).unwrap();
    let issued = cp
        .sign_with_token(&token, &csr, None, SystemTime::now())
        .unwrap();
    let mut b = TrustBundles::new();
    b.set(
        TrustDomain::parse("shop.example").unwrap(),
        cp.bundle().unwrap(),
    );
    assert_eq!(
        validate(&issued.chain, &b, Usage::Client, SystemTime::now()).unwrap(),
        id
    );
    // Reuse.
    assert!(
        matches!(cp.sign_with_token(&token, &csr, None, now()), Err(Refused::Forbidden(m)) if m.contains("already used"))
    );
    // Expiry.
    let (short, _) = cp
        .issue_token(&carol(), id.as_str(), Duration::from_secs(1), now())
        .unwrap();
    assert!(
        matches!(cp.sign_with_token(&short, &csr, None, now() + Duration::from_secs(2)), Err(Refused::Forbidden(m)) if m.contains("expired"))
    );
    // Unknown token; a lifetime longer than the mesh allows.
    assert!(matches!(
        cp.sign_with_token("mwj_nope", &csr, None, now()),
        Err(Refused::Forbidden(_))
    ));
    assert!(matches!(
        cp.renew(&id, &csr, Some(Duration::from_secs(7200)), now()),
        Err(Refused::BadRequest(_))
    ));
    // Renewal keeps the identity.
    let renewed = cp.renew(&id, &csr, None, SystemTime::now()).unwrap();
    assert_eq!(renewed.spiffe_id, id);
    let actions: Vec<String> = cp
        .audit(&AuditFilter::default())
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    for a in [
        "token.issue",
        "token.use",
        "svid.issue",
        "token.refused",
        "svid.refused",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "no `{a}` in the audit log: {actions:?}"
        );
    }
}

#[test]
fn fault_injections_are_listed_and_expire_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let doc = "apiVersion: meshward.io/v1alpha1\nkind: FaultInjection\nmetadata: {name: drill, namespace: payments}\nspec:\n  target: {workloads: [payments-api]}\n  delay: {fixed: 250ms, percent: 50}\n  abort: {httpStatus: 503, percent: 10}\n  expiresAt: 2026-11-28T11:00:00Z\n";
    let r = cp
        .apply(&carol(), with_doc(&cp, doc), "drill", now())
        .unwrap();
    assert!(matches!(r, Applied::Committed { .. }), "{r:?}");
    let faults = cp.faults().unwrap();
    let f = faults
        .iter()
        .find(|f| f["fault"] == "payments/drill")
        .unwrap_or_else(|| panic!("{faults:?}"));
    assert_eq!(f["target"], "workload payments-api");
    assert_eq!(f["delay"], "250ms for 50%");
    assert_eq!(f["abort"], "HTTP 503 for 10%");
    assert_eq!(f["expires_at"], "2026-11-28T11:00:00Z");
    let before = head(&cp);
    assert!(
        !cp.expire_overrides(now() + Duration::from_secs(60))
            .unwrap()
            .iter()
            .any(|g| g.contains("payments/drill"))
    );
    let gone = cp.expire_overrides(t("2026-11-28T11:00:00Z")).unwrap();
    assert!(
        gone.contains(&"FaultInjection payments/drill".to_string()),
        "{gone:?}"
    );
    assert_eq!(head(&cp), before + 1, "one revision");
    assert!(
        cp.faults()
            .unwrap()
            .iter()
            .all(|f| f["fault"] != "payments/drill")
    );
    let e = cp
        .audit(&AuditFilter {
            action_prefix: Some("fault.expire".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].actor, "controller");
}

#[test]
fn overrides_expire_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let doc = |exp: &str| {
        format!(
            "apiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {{name: hotfix, namespace: payments}}\nspec:\n  action: deny\n  subject: {{identities: [\"spiffe://shop.example/ns/payments/sa/reporting\"]}}\n  reason: leaking\n  ticket: INC-1\n  expiresAt: {exp}\n"
        )
    };
    // Longer than the mesh's 24h: refused by lint (MW306).
    assert!(
        matches!(cp.create_override(&carol(), "payments", "hotfix", &doc("2026-11-30T10:00:00Z"), now()), Err(Refused::Invalid(m, _)) if m.contains("MW306"))
    );
    let r = cp
        .create_override(
            &carol(),
            "payments",
            "hotfix",
            &doc("2026-11-28T10:30:00Z"),
            now(),
        )
        .unwrap();
    assert!(matches!(r, Applied::Committed { revision: 2, .. }), "{r:?}");
    assert_eq!(
        cp.overrides()
            .unwrap()
            .iter()
            .filter(|o| o["override"] == "payments/hotfix")
            .count(),
        1
    );
    assert!(
        cp.expire_overrides(now() + Duration::from_secs(60))
            .unwrap()
            .is_empty()
    );
    let gone = cp.expire_overrides(t("2026-11-28T10:30:00Z")).unwrap();
    assert!(gone.contains(&"payments/hotfix".to_string()), "{gone:?}");
    assert!(
        cp.overrides()
            .unwrap()
            .iter()
            .all(|o| o["override"] != "payments/hotfix")
    );
    let e = cp
        .audit(&AuditFilter {
            action_prefix: Some("override.expire".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].actor, "controller");
    // Revoke.
    cp.create_override(
        &carol(),
        "payments",
        "hotfix2",
        &doc("2026-11-28T11:00:00Z").replace("hotfix", "hotfix2"),
        now(),
    )
    .unwrap();
    cp.revoke_override(&carol(), "payments", "hotfix2", now())
        .unwrap();
    assert!(
        cp.overrides()
            .unwrap()
            .iter()
            .all(|o| o["override"] != "payments/hotfix2")
    );
}

#[test]
fn the_audit_chain_detects_edits_deletions_and_reordering() {
    let dir = tempfile::tempdir().unwrap();
    let cp = seeded(dir.path());
    let id = "spiffe://shop.example/ns/payments/sa/ledger";
    for _ in 0..3 {
        cp.issue_token(&carol(), id, Duration::from_secs(60), now())
            .unwrap();
    }
    let entries = cp.audit(&AuditFilter::default()).unwrap();
    assert!(entries.len() >= 5);
    assert!(audit::verify(&entries).is_ok());
    drop(cp);
    let db = dir.path().join("meshward.db");
    let tamper = |sql: &str| {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(sql).unwrap();
    };
    let check = || {
        audit::verify(
            &SqliteStore::open(&db)
                .unwrap()
                .audit(&AuditFilter::default())
                .unwrap(),
        )
    };
    tamper("BEGIN; CREATE TABLE backup AS SELECT * FROM audit; COMMIT;");
    tamper("UPDATE audit SET detail = '{\"expires_ms\":0}' WHERE seq = 3");
    assert_eq!(check(), Err(Broken::Edited { seq: 3 }));
    tamper(
        "DELETE FROM audit; INSERT INTO audit SELECT * FROM backup; DELETE FROM audit WHERE seq = 4",
    );
    assert_eq!(
        check(),
        Err(Broken::Missing {
            seq: 5,
            expected: 4
        })
    );
    tamper("DELETE FROM audit; INSERT INTO audit SELECT * FROM backup;");
    assert!(check().is_ok());
    // Swap two entries' content, keeping the sequence numbers in place.
    tamper(
        "UPDATE audit SET seq = -1 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4; UPDATE audit SET seq = 4 WHERE seq = -1;",
    );
    assert!(
        matches!(check(), Err(Broken::Unlinked { seq: 3, after: 2 })),
        "{:?}",
        check()
    );
}

#[test]
fn concurrent_audit_appends_are_group_committed_and_keep_the_chain() {
    use meshward_control::store::NewEntry;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("meshward.db")).unwrap());
    std::thread::scope(|s| {
        for t in 0..8 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..100 {
                    let e = store
                        .append_audit(
                            NewEntry::new(
                                &format!("t{t}"),
                                "svid.issue",
                                &format!("{i}"),
                                serde_json::json!({}),
                            ),
                            SystemTime::now(),
                        )
                        .unwrap();
                    assert!(e.seq >= 1);
                }
            });
        }
    });
    let entries = store.audit(&AuditFilter::default()).unwrap();
    assert_eq!(entries.len(), 800);
    assert!(audit::verify(&entries).is_ok());
    // Each thread's entries are all there, in its own order.
    for t in 0..8 {
        let mine: Vec<String> = entries
            .iter()
            .filter(|e| e.actor == format!("t{t}"))
            .map(|e| e.subject.clone())
            .collect();
        assert_eq!(mine, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    }
}
