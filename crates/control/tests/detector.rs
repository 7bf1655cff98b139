#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Anomaly detection on a real store and decision window, driven tick by tick with the
//! time given: a lateral-movement scan is throttled, then quarantined (sparing the platform
//! services), with the evidence audited; a burst three times the baseline triggers nothing;
//! platform services are never acted on; release needs the namespace owner and is
//! audited; an expired quarantine and throttle lift themselves; report mode only reports.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY};
use meshward_control::decisions::DecisionWindow;
use meshward_control::service::{Applied, Config, ControlPlane, Refused};
use meshward_control::store::{AuditFilter, SqliteStore};
use meshward_identity::{SpiffeId, TrustDomain};

const WORKER: &str = "spiffe://shop.example/ns/payments/sa/worker";
const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";
const DNS: &str = "spiffe://shop.example/ns/platform/sa/dns";
const SHIPPER: &str = "spiffe://shop.example/ns/shop/sa/api";

fn t0() -> SystemTime {
    humantime::parse_rfc3339("2026-11-28T10:00:00Z").unwrap()
}

fn op(name: &str, roles: &[&str], ns: &[&str]) -> Operator {
    Operator {
        name: name.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        token_sha256: vec![],
    }
}

fn repo(mode: &str) -> Vec<(String, String)> {
    let mut yaml = format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {{name: mesh}}
spec:
  trustDomain: shop.example
  anomalyDetection:
    mode: {mode}
    window: 5s
    warmup: 10s
    quarantineAfter: 3s
    quarantineDuration: 30m
    throttle: {{requestsPerSecond: 2, burst: 4, duration: 10m}}
    thresholds: {{minSamples: 10, fanOut: 8, newEdges: 5, denyRatio: 0.5, rateFactor: 10, minRate: 5}}
    platform: {{namespaces: [platform]}}
"#
    );
    for (ns, name) in [
        ("payments", "worker"),
        ("web", "frontend"),
        ("platform", "dns"),
        ("shop", "api"),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{port: 8080, protocol: HTTP}}]}}\n"
        ));
    }
    vec![("mesh.yaml".into(), yaml)]
}

struct Plane {
    cp: ControlPlane,
    _dir: tempfile::TempDir,
}

fn plane(mode: &str) -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::parse("shop.example").unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("meshward.db")).unwrap());
    let ca = ControlPlane::open_ca(dir.path(), &td, SystemTime::now()).unwrap();
    let cfg = Config {
        data_dir: dir.path().to_owned(),
        trust_domain: td,
        default_lifetime: Duration::from_secs(3600),
        max_token_ttl: Duration::from_secs(86400),
    };
    let ops = Operators {
        operators: vec![
            op("alice", &[PLATFORM_SECURITY], &[]),
            op("bob", &[PLATFORM_SECURITY], &[]),
            op("carol", &[], &["payments"]),
            op("dave", &[], &["web"]),
        ],
    };
    let window = DecisionWindow::open(&dir.path().join("decisions.db"), 100_000).unwrap();
    let cp = ControlPlane::new(store, ca, ops, cfg).with_decision_window(window);
    let alice = op("alice", &[PLATFORM_SECURITY], &[]);
    let bob = op("bob", &[PLATFORM_SECURITY], &[]);
    let Applied::PendingApproval { proposal, .. } =
        cp.apply(&alice, repo(mode), "initial", t0()).unwrap()
    else {
        panic!("the Mesh needs approval")
    };
    cp.approve(&bob, proposal, t0()).unwrap();
    Plane { cp, _dir: dir }
}

fn rec(src: &str, dest: &str, port: u16, allow: bool, weight: u32) -> String {
    let (verdict, reason) = if allow {
        ("allow", "allowed_by_rule")
    } else {
        ("deny", "no_allow_at_tier")
    };
    serde_json::json!({
        "ts": "2026-11-28T10:00:00Z", "revision": 1, "source": src, "destination": dest,
        "port": port, "verdict": verdict, "reason": reason, "weight": weight,
    })
    .to_string()
}

impl Plane {
    fn ship(&self, lines: Vec<String>) {
        let shipper = SpiffeId::parse(SHIPPER).unwrap();
        self.cp.ship(&shipper, &lines, 0).unwrap();
    }

    /// Normal traffic of one second: each of `who` makes `n` allowed calls (sampled: one
    /// record of weight `n`) to its usual two destinations.
    fn normal(&self, who: &[&str], n: u32) {
        let mut lines = vec![];
        for w in who {
            lines.push(rec(w, "shop/api", 8080, true, n));
            lines.push(rec(w, "shop/cart", 8080, true, 1));
        }
        self.ship(lines);
    }

    /// One second of a scan from `who`: calls to `n` services and ports never seen,
    /// almost all denied.
    fn scan(&self, who: &str, second: u16, n: u16) {
        let lines = (0..n)
            .map(|i| {
                rec(
                    who,
                    &format!("shop/svc-{}", second * 100 + i),
                    9000 + i,
                    i == 0,
                    1,
                )
            })
            .collect();
        self.ship(lines);
    }

    fn tick(&self, at: Duration) -> Vec<(&'static str, String)> {
        self.cp.detect(t0() + at).unwrap()
    }

    fn audit(&self, action: &str) -> Vec<serde_json::Value> {
        self.cp
            .audit(&AuditFilter {
                action_prefix: Some(action.into()),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| serde_json::json!({"action": e.action, "actor": e.actor, "subject": e.subject, "detail": serde_json::from_str::<serde_json::Value>(&e.detail).unwrap()}))
            .collect()
    }

    fn files(&self) -> String {
        let head = self.cp.store.head().unwrap().unwrap();
        head.files
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// `secs` seconds of a scan from `who`, a tick each, from `at`: the time after.
    fn scan_for(&self, who: &str, mut at: Duration, secs: u16) -> Duration {
        for s in 0..secs {
            self.scan(who, s, 10);
            self.tick(at);
            at += Duration::from_secs(1);
        }
        at
    }

    /// Warm-up: 12 s of normal traffic from everyone.
    fn warm(&self) -> Duration {
        for s in 0..12 {
            self.normal(&[WORKER, FRONTEND, DNS], 20);
            assert!(
                self.tick(Duration::from_secs(s)).is_empty(),
                "nothing fires in normal traffic"
            );
        }
        Duration::from_secs(12)
    }
}

#[test]
fn a_scan_is_throttled_then_quarantined_with_the_evidence_audited() {
    let p = plane("quarantine");
    let mut at = p.warm();
    // The scan: 10 new services and ports a second, 9 of 10 denied; the others go on.
    let mut steps = vec![];
    for s in 0..6 {
        p.scan(WORKER, s, 10);
        p.normal(&[FRONTEND, DNS], 20);
        steps.extend(p.tick(at));
        at += Duration::from_secs(1);
    }
    let throttle = steps
        .iter()
        .position(|s| *s == ("anomaly.throttle", WORKER.to_owned()));
    let quarantine = steps
        .iter()
        .position(|s| *s == ("anomaly.quarantine", WORKER.to_owned()));
    assert_eq!(
        throttle,
        Some(0),
        "throttled at the first tick of the scan: {steps:?}"
    );
    assert!(quarantine.is_some(), "then quarantined: {steps:?}");
    assert_eq!(steps.len(), 2, "nobody else is acted on: {steps:?}");

    // The generated resources: a rate limit with an expiry, a quarantine sparing the
    // platform namespace, both named for the worker in its own namespace.
    let files = p.files();
    assert!(
        files.contains("kind: RateLimitPolicy") && files.contains("requestsPerSecond: 2"),
        "{files}"
    );
    assert!(files.contains("action: quarantine"), "{files}");
    assert!(
        files.contains(r#"except: {"namespaces":["platform"]}"#),
        "{files}"
    );
    assert!(files.contains("requester: meshward-detector"), "{files}");

    // Each step audited by the detector with the numbers that crossed which threshold.
    let t = p.audit("anomaly.throttle");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["actor"], "detector");
    assert_eq!(t[0]["subject"], WORKER);
    let ev = &t[0]["detail"]["evidence"];
    let signals: Vec<&str> = ev["signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["signal"].as_str().unwrap())
        .collect();
    assert!(
        signals.contains(&"fan_out") && signals.contains(&"new_edges"),
        "{ev}"
    );
    assert!(ev["fan_out"].as_u64().unwrap() >= 10, "{ev}");
    assert!(ev["denies"].as_u64().unwrap() >= 9, "{ev}");
    assert_eq!(p.audit("anomaly.quarantine").len(), 1);

    // `quarantine list`: the worker, quarantined, with its evidence and expiry.
    let list = p.cp.quarantines(t0() + at).unwrap();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["identity"], WORKER);
    assert_eq!(list[0]["stage"], "quarantined");
    assert!(list[0]["quarantine_expires_at"].as_str().is_some());
    assert!(
        !list[0]["evidence"]["signals"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_burst_three_times_the_baseline_triggers_nothing() {
    let p = plane("quarantine");
    let mut at = p.warm();
    for _ in 0..10 {
        p.normal(&[WORKER, FRONTEND, DNS], 60);
        assert!(p.tick(at).is_empty(), "a 3x burst for 10 s is no anomaly");
        at += Duration::from_secs(1);
    }
    assert!(p.audit("anomaly.").is_empty());
    // A flood far over its own baseline is (the rate signal).
    let mut steps = vec![];
    for _ in 0..3 {
        p.normal(&[FRONTEND], 1000);
        steps.extend(p.tick(at));
        at += Duration::from_secs(1);
    }
    assert_eq!(
        steps.first(),
        Some(&("anomaly.throttle", FRONTEND.to_owned())),
        "{steps:?}"
    );
    let ev = &p.audit("anomaly.throttle")[0]["detail"]["evidence"];
    assert_eq!(ev["signals"][0]["signal"], "rate", "{ev}");
}

#[test]
fn nothing_fires_during_the_warm_up_and_platform_services_are_never_acted_on() {
    let p = plane("quarantine");
    // A scan from the first second: still warming up.
    for s in 0..10 {
        p.scan(WORKER, s, 10);
        assert!(p.tick(Duration::from_secs(u64::from(s))).is_empty());
    }
    // ...and what it did then is its baseline, never evidence once the warm-up is over.
    for s in 10..16 {
        p.normal(&[WORKER], 20);
        assert!(p.tick(Duration::from_secs(s)).is_empty(), "at {s} s");
    }
    let p = plane("quarantine");
    let mut at = p.warm();
    let mut steps = vec![];
    for s in 0..8 {
        p.scan(DNS, s, 10);
        steps.extend(p.tick(at));
        at += Duration::from_secs(1);
    }
    assert_eq!(
        steps,
        [("anomaly.detected", DNS.to_owned())],
        "reported only"
    );
    assert!(!p.files().contains("RateLimitPolicy"));
}

#[test]
fn release_needs_the_namespace_owner_and_is_audited_and_expiry_lifts_by_itself() {
    let p = plane("quarantine");
    let at = p.warm();
    let at = p.scan_for(WORKER, at, 6);
    assert_eq!(
        p.cp.quarantines(t0() + at).unwrap()[0]["stage"],
        "quarantined"
    );
    let dave = op("dave", &[], &["web"]);
    let e =
        p.cp.release_quarantine(&dave, WORKER, "looks fine", t0() + at)
            .unwrap_err();
    assert!(
        matches!(&e, Refused::Forbidden(m) if m.contains("payments")),
        "{e}"
    );
    assert_eq!(p.audit("quarantine.release.refused").len(), 1);
    let carol = op("carol", &[], &["payments"]);
    assert!(
        p.cp.release_quarantine(&carol, WORKER, " ", t0() + at)
            .is_err(),
        "a reason is required"
    );
    p.cp.release_quarantine(&carol, WORKER, "INC-7: credentials rotated", t0() + at)
        .unwrap();
    let r = p.audit("quarantine.release");
    let r: Vec<_> = r
        .iter()
        .filter(|e| e["action"] == "quarantine.release")
        .collect();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["actor"], "operator:carol");
    assert_eq!(r[0]["detail"]["reason"], "INC-7: credentials rotated");
    assert!(p.cp.quarantines(t0() + at).unwrap().is_empty());
    assert!(!p.files().contains("action: quarantine") && !p.files().contains("RateLimitPolicy"));

    // Again, then left to expire: the controller removes both at their expiry.
    let p = plane("quarantine");
    let at = p.warm();
    let at = p.scan_for(WORKER, at, 6);
    let gone =
        p.cp.expire_overrides(t0() + at + Duration::from_secs(11 * 60))
            .unwrap();
    assert!(
        gone.len() == 1 && gone[0].starts_with("RateLimitPolicy"),
        "the throttle (10m) first: {gone:?}"
    );
    assert_eq!(
        p.cp.quarantines(t0() + at).unwrap()[0]["stage"],
        "quarantined"
    );
    let gone =
        p.cp.expire_overrides(t0() + at + Duration::from_secs(31 * 60))
            .unwrap();
    assert!(
        gone.len() == 1 && gone[0].starts_with("payments/anomaly-worker-"),
        "then the quarantine (30m): {gone:?}"
    );
    assert!(p.cp.quarantines(t0() + at).unwrap().is_empty());
}

#[test]
fn report_mode_audits_and_enforces_nothing() {
    let p = plane("report");
    let mut at = p.warm();
    let mut steps = vec![];
    for s in 0..8 {
        p.scan(WORKER, s, 10);
        steps.extend(p.tick(at));
        at += Duration::from_secs(1);
    }
    assert_eq!(
        steps,
        [("anomaly.detected", WORKER.to_owned())],
        "one report per episode"
    );
    assert!(!p.files().contains("RateLimitPolicy") && !p.files().contains("kind: Override"));
    let list = p.cp.quarantines(t0() + at).unwrap();
    assert_eq!(list[0]["stage"], "reported");
}
