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
    let Applied::PendingApproval { proposal, summary } =
        cp.apply(&alice(), examples(), "initial", now()).unwrap()
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
        Err(Refused::Invalid(m)) => {
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
    assert!(matches!(
        cp.rollback(&carol(), 1, "no", now()),
        Err(Refused::Forbidden(_))
    ));
    assert!(matches!(
        cp.rollback(&alice(), 1, "revert", now()).unwrap(),
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
        matches!(cp.create_override(&carol(), "payments", "hotfix", &doc("2026-11-30T10:00:00Z"), now()), Err(Refused::Invalid(m)) if m.contains("MW306"))
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
