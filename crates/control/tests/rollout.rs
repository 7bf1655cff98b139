#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Progressive rollout on a real store and decision window, driven tick by tick with the
//! time given (the end-to-end test with real sidecars is crates/meshward/tests/rollout.rs):
//! no traffic never promotes silently (a replay with flips holds even with
//! `--allow-no-traffic`); a sidecar that cannot compile the candidate stops the rollout
//! before anything is enforced; a sidecar that rejects the enforced revision, or does not
//! acknowledge it in time, rolls it back; a restarted control plane carries on.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY};
use meshward_control::decisions::DecisionWindow;
use meshward_control::service::rollout::Options;
use meshward_control::service::{Applied, Config, ControlPlane, Refused};
use meshward_control::store::{AuditFilter, SqliteStore};
use meshward_identity::{SpiffeId, TrustDomain};

const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";

fn t0() -> SystemTime {
    humantime::parse_rfc3339("2026-12-06T10:00:00Z").unwrap()
}

fn op(name: &str, roles: &[&str], ns: &[&str]) -> Operator {
    Operator {
        name: name.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        token_sha256: vec![],
    }
}

/// The mesh, and the orders policy allowing the frontend GET `paths`.
fn repo(paths: &str) -> Vec<(String, String)> {
    let mesh = r#"apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: mesh}
spec:
  trustDomain: shop.example
  rollout: {bake: 10s, watch: 20s, ackTimeout: 5s}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: web}
spec: {ports: [{port: 8080, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: orders, namespace: orders}
spec: {ports: [{port: 8080, protocol: HTTP}]}
"#;
    let policy = format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders]}}
  rules:
    - name: reads
      from: [{{identities: ["{FRONTEND}"]}}]
      to: [{{methods: [GET], paths: [{paths}]}}]
"#
    );
    vec![
        ("mesh.yaml".into(), mesh.into()),
        ("orders.yaml".into(), policy),
    ]
}

struct Plane {
    cp: ControlPlane,
    dir: tempfile::TempDir,
}

fn ops() -> Operators {
    Operators {
        operators: vec![
            op("alice", &[PLATFORM_SECURITY], &[]),
            op("bob", &[PLATFORM_SECURITY], &[]),
            op("carol", &[], &["orders"]),
        ],
    }
}

fn open(dir: &std::path::Path) -> ControlPlane {
    let td = TrustDomain::parse("shop.example").unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("meshward.db")).unwrap());
    let ca = ControlPlane::open_ca(dir, &td, SystemTime::now()).unwrap();
    let cfg = Config {
        data_dir: dir.to_owned(),
        trust_domain: td,
        default_lifetime: Duration::from_secs(3600),
        max_token_ttl: Duration::from_secs(86400),
    };
    let window = DecisionWindow::open(&dir.join("decisions.db"), 100_000).unwrap();
    ControlPlane::new(store, ca, ops(), cfg).with_decision_window(window)
}

fn plane() -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(dir.path());
    let alice = op("alice", &[PLATFORM_SECURITY], &[]);
    let bob = op("bob", &[PLATFORM_SECURITY], &[]);
    let Applied::PendingApproval { proposal, .. } = cp
        .apply(&alice, repo("\"/orders/*\""), "initial", t0())
        .unwrap()
    else {
        panic!("the Mesh needs approval")
    };
    cp.approve(&bob, proposal, t0()).unwrap();
    Plane { cp, dir }
}

fn carol() -> Operator {
    op("carol", &[], &["orders"])
}

impl Plane {
    /// Carol (she owns orders) rolls out the orders policy narrowed to `/orders`.
    fn start(&self, at: Duration, allow_no_traffic: bool) -> u64 {
        let opts = Options {
            allow_no_traffic,
            ..Default::default()
        };
        match self
            .cp
            .start_rollout(
                &carol(),
                repo("\"/orders\""),
                "narrow reads",
                &opts,
                t0() + at,
            )
            .unwrap()
        {
            Applied::RolloutStarted { rollout, .. } => rollout,
            other => panic!("{other:?}"),
        }
    }

    fn tick(&self, at: Duration) -> Option<String> {
        self.cp.rollout_tick(t0() + at).unwrap()
    }

    fn stage(&self) -> String {
        let v = self.cp.rollout_status(t0()).unwrap();
        v["rollout"]["stage"].as_str().unwrap().to_owned()
    }

    fn head(&self) -> u64 {
        self.cp.store.head().unwrap().unwrap().rev
    }

    fn audit(&self, action: &str) -> Vec<serde_json::Value> {
        self.cp
            .audit(&AuditFilter {
                action_prefix: Some(action.into()),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| serde_json::from_str(&e.detail).unwrap())
            .collect()
    }

    /// Allowed reads of `/orders/7` recorded at `at` (before any rollout: no candidate).
    fn record_reads(&self, at: Duration, n: u32) {
        let ts = humantime::format_rfc3339_millis(t0() + at).to_string();
        let line = serde_json::json!({
            "ts": ts, "revision": 1, "source": FRONTEND, "destination": "orders/orders",
            "port": 8080, "method": "GET", "path": "/orders/7", "verdict": "allow",
            "reason": "allowed_by_rule", "weight": n, "status": 200,
        })
        .to_string();
        self.cp
            .ship(&SpiffeId::parse(FRONTEND).unwrap(), &[line], 0)
            .unwrap();
    }

    /// A connected sidecar of orders.
    fn sidecar(&self) -> u64 {
        let id = SpiffeId::parse("spiffe://shop.example/ns/orders/sa/orders").unwrap();
        let conn = self
            .cp
            .proxy_connected(&id, vec!["orders/orders".into()], t0());
        let head = self.head();
        self.cp.proxy_update(conn, |s| s.acked_revision = head);
        conn
    }
}

#[test]
fn no_traffic_never_promotes_silently() {
    let p = plane();
    let base = p.head();
    let id = p.start(Duration::ZERO, false);
    assert_eq!(p.stage(), "shadow");
    assert_eq!(p.tick(Duration::from_secs(5)), None, "still baking");
    let said = p.tick(Duration::from_secs(11)).unwrap();
    assert!(said.contains("waits for an operator"), "{said}");
    let v = p.cp.rollout_status(t0()).unwrap();
    let why = v["rollout"]["why"].as_str().unwrap();
    assert!(
        why.contains("no traffic") && why.contains("replays clean"),
        "{why}"
    );
    assert_eq!(p.head(), base, "nothing enforced");
    // Other changes wait for it.
    let again =
        p.cp.apply(&carol(), repo("\"/orders/*\", \"/o\""), "meanwhile", t0());
    assert!(
        matches!(again, Err(Refused::Conflict(ref m)) if m.contains(&format!("rollout {id}"))),
        "{again:?}"
    );
    // The operator's say: enforced, then watched.
    let said =
        p.cp.promote_rollout(
            &carol(),
            "nobody calls it yet",
            t0() + Duration::from_secs(12),
        )
        .unwrap();
    assert!(said.contains("enforced as revision"), "{said}");
    assert_eq!(p.head(), base + 1);
    assert_eq!(p.stage(), "watch");
    // No sidecar connected, no traffic: promoted at the end of the watch.
    assert_eq!(p.tick(Duration::from_secs(20)), None);
    let said = p.tick(Duration::from_secs(33)).unwrap();
    assert!(said.contains("promoted"), "{said}");
    assert_eq!(p.audit("rollout.promoted").len(), 1);
    let enforced = p.audit("rollout.enforced");
    assert!(
        enforced[0]["waited"]
            .as_str()
            .unwrap()
            .contains("carol promoted past the gate")
    );
}

#[test]
fn a_replay_that_flips_holds_even_with_allow_no_traffic() {
    let p = plane();
    let base = p.head();
    // Reads of /orders/7 recorded before the rollout; none during its bake.
    p.record_reads(Duration::ZERO, 40);
    p.start(Duration::from_secs(60), true);
    p.tick(Duration::from_secs(71)).unwrap();
    assert_eq!(p.stage(), "waiting");
    let v = p.cp.rollout_status(t0()).unwrap();
    let r = &v["rollout"];
    assert_eq!(r["replayed"]["allow_to_deny"], 40, "{r:#}");
    assert!(
        r["why"]
            .as_str()
            .unwrap()
            .contains("40 allowed requests denied"),
        "{r:#}"
    );
    assert_eq!(p.head(), base);
    // Without flips, --allow-no-traffic enforces.
    p.cp.abort_rollout(&carol(), "rethink", t0() + Duration::from_secs(72))
        .unwrap();
    assert_eq!(p.stage(), "aborted");
    let opts = Options {
        allow_no_traffic: true,
        ..Default::default()
    };
    p.cp.start_rollout(
        &carol(),
        repo("\"/orders/*\", \"/receipts/*\""),
        "add receipts",
        &opts,
        t0() + Duration::from_secs(80),
    )
    .unwrap();
    let said = p.tick(Duration::from_secs(91)).unwrap();
    assert!(said.contains("enforced"), "{said}");
    assert_eq!(p.head(), base + 1);
}

#[test]
fn a_sidecar_that_cannot_compile_the_candidate_stops_it_before_enforcement() {
    let p = plane();
    let base = p.head();
    let conn = p.sidecar();
    let id = p.start(Duration::ZERO, true);
    p.cp.proxy_update(conn, |s| {
        s.candidate_error = Some(format!("rollout {id}: orders.yaml:3: unknown field"));
    });
    let said = p.tick(Duration::from_secs(1)).unwrap();
    assert!(said.contains("stopped"), "{said}");
    assert_eq!(p.stage(), "stopped");
    assert_eq!(p.head(), base, "never enforced");
    let why = p.audit("rollout.stopped")[0]["why"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("unknown field"), "{why}");
    // Over: a new change may go.
    assert!(
        p.cp.apply(&carol(), repo("\"/orders\""), "plain", t0())
            .is_ok()
    );
}

#[test]
fn a_rejected_or_unacknowledged_revision_is_rolled_back() {
    let p = plane();
    let base = p.head();
    let base_files = p.cp.store.head().unwrap().unwrap().files;
    let conn = p.sidecar();
    let id = p.start(Duration::ZERO, true);
    p.cp.proxy_update(conn, |s| s.candidate_rollout = id);
    // Baked, no traffic but allowed to go: enforced.
    assert!(
        p.tick(Duration::from_secs(11))
            .unwrap()
            .contains("enforced")
    );
    let rev = p.head();
    assert_eq!(rev, base + 1);
    // The sidecar says it cannot take it.
    p.cp.proxy_update(conn, |s| {
        s.rejected = Some(format!("revision {rev}: orders.yaml:9: cannot compile"));
    });
    let said = p.tick(Duration::from_secs(12)).unwrap();
    assert!(said.contains("rolled back"), "{said}");
    assert_eq!(p.head(), rev + 1);
    let head = p.cp.store.head().unwrap().unwrap();
    assert_eq!(
        head.files, base_files,
        "the rollback restores what the candidate changed"
    );
    assert!(
        head.reason
            .starts_with(&format!("rollout {id} rolled back: a sidecar rejected"))
    );

    // Silence: the sidecar stays on the old revision past the ack timeout (5 s).
    p.cp.proxy_update(conn, |s| {
        s.rejected = None;
        s.acked_revision = rev + 1;
    });
    let id = p.start(Duration::from_secs(100), true);
    p.cp.proxy_update(conn, |s| s.candidate_rollout = id);
    assert!(
        p.tick(Duration::from_secs(111))
            .unwrap()
            .contains("enforced")
    );
    assert_eq!(
        p.tick(Duration::from_secs(113)),
        None,
        "within the ack timeout"
    );
    let said = p.tick(Duration::from_secs(117)).unwrap();
    assert!(said.contains("did not acknowledge"), "{said}");
    assert_eq!(p.audit("rollout.rolled_back").len(), 2);
}

#[test]
fn a_restarted_control_plane_carries_on() {
    let p = plane();
    let id = p.start(Duration::ZERO, false);
    let dir = p.dir;
    drop(p.cp);
    let cp = open(dir.path());
    let v = cp.rollout_status(t0()).unwrap();
    assert_eq!(v["rollout"]["id"], id);
    assert_eq!(v["rollout"]["stage"], "shadow");
    let again = cp.apply(&carol(), repo("\"/x\""), "meanwhile", t0());
    assert!(matches!(again, Err(Refused::Conflict(_))), "{again:?}");
}

#[test]
fn a_change_that_needs_approval_is_rolled_out_once_approved() {
    let p = plane();
    let base = p.head();
    let alice = op("alice", &[PLATFORM_SECURITY], &[]);
    let bob = op("bob", &[PLATFORM_SECURITY], &[]);
    let mut files = repo("\"/orders/*\"");
    files[0].1 = files[0].1.replace("watch: 20s", "watch: 30s");
    let opts = Options {
        allow_no_traffic: true,
        ..Default::default()
    };
    // A Mesh change: filed for a second approval, no rollout yet.
    let Applied::PendingApproval { proposal, .. } =
        p.cp.start_rollout(&alice, files, "longer watch", &opts, t0())
            .unwrap()
    else {
        panic!("the Mesh needs approval")
    };
    assert!(p.cp.active_rollout().unwrap().is_none());
    // Bob's approval starts it (not a commit).
    let r =
        p.cp.approve(&bob, proposal, t0() + Duration::from_secs(1))
            .unwrap();
    assert!(
        matches!(r, Applied::RolloutStarted { rollout: 1, .. }),
        "{r:?}"
    );
    assert_eq!(p.head(), base);
    let st = p.cp.rollout_status(t0()).unwrap();
    assert_eq!(st["rollout"]["author"], "alice");
    assert_eq!(st["rollout"]["approved_by"], "bob");
    assert_eq!(
        st["rollout"]["settings"]["watch"], 30.0,
        "the candidate's own settings"
    );
    assert_eq!(p.audit("rollout.started")[0]["approved_by"], "bob");
    // Carol owns orders but not the Mesh: she may not promote it.
    let no =
        p.cp.promote_rollout(&carol(), "mine", t0() + Duration::from_secs(2));
    assert!(matches!(no, Err(Refused::Forbidden(_))), "{no:?}");
    assert!(
        p.tick(Duration::from_secs(12))
            .unwrap()
            .contains("enforced")
    );
    assert_eq!(p.head(), base + 1);
}
