#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `meshward apply --progressive` against `meshward up examples/quickstart`, with traffic
//! through the real sidecars: a benign change is promoted; a change that would deny a
//! legitimate edge is held at the gate and never enforced; a change whose harm shows only
//! once enforced (here a `FaultInjection` that aborts every charge: the shadow judges
//! authorization, it cannot see an app fail) is rolled back within the watch; all of it
//! in the audit log, whose chain verifies.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

mod support;
use support::{Mesh, copy_dir};

/// The mesh, and the traffic this test sends through it (stopped with it).
struct Up {
    mesh: Mesh,
    stop: Arc<AtomicBool>,
}

impl std::ops::Deref for Up {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Up {
    fn start(dir: &Path) -> Up {
        Up {
            mesh: Mesh::start(dir),
            stop: Arc::default(),
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        let o = self.cli().args(args).args(["-o", "json"]).output().unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
    }

    /// The outbound listener `workload`'s sidecar opens for `service`.
    fn outbound(&self, workload: &str, service: &str) -> std::net::SocketAddr {
        let s = self.state();
        let w = s["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == workload)
            .unwrap();
        w["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["service"] == service)
            .unwrap()["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Sends `method path` through `addr` ten times a second until the mesh stops;
    /// counts the answers by class.
    fn traffic(
        &self,
        addr: std::net::SocketAddr,
        method: &'static str,
        path: &'static str,
    ) -> Arc<[AtomicU64; 6]> {
        let counts: Arc<[AtomicU64; 6]> = Arc::default();
        let (stop, c) = (self.stop.clone(), counts.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let status = (|| {
                    let mut s =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                    write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").ok()?;
                    let mut buf = vec![];
                    s.read_to_end(&mut buf).ok()?;
                    std::str::from_utf8(buf.get(9..12)?)
                        .ok()?
                        .parse::<usize>()
                        .ok()
                })();
                let class = status.map_or(0, |s| (s / 100).min(5));
                c[class].fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        counts
    }

    /// A repository (`from`, else the combined one `up` applied) copied to `name`, with
    /// `edit` made.
    fn candidate(&self, from: Option<&Path>, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
        let to = self.dir.parent().unwrap().join(name);
        let repo = self.dir.join(".meshward/repo");
        copy_dir(from.unwrap_or(&repo), &to);
        edit(&to);
        to
    }

    /// `apply --progressive`, then `rollout status --watch` until it stops: both exit
    /// codes and the final status.
    fn roll_out(&self, dir: &Path, extra: &[&str]) -> (Option<i32>, Option<i32>, Value) {
        let a = self
            .cli()
            .args(["apply", "-f"])
            .arg(dir)
            .args(["--progressive", "--reason", "rollout test"])
            .args(extra)
            .output()
            .unwrap();
        let started = String::from_utf8_lossy(&a.stdout).into_owned();
        assert!(
            started.contains("started"),
            "{started}{}",
            String::from_utf8_lossy(&a.stderr)
        );
        let w = self
            .cli()
            .args(["rollout", "status", "--watch", "-o", "json"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&w.stdout).unwrap();
        (a.status.code(), w.status.code(), v["rollout"].clone())
    }

    fn head(&self) -> Value {
        self.json(&["history"])
            .as_array()
            .unwrap()
            .iter()
            .max_by_key(|r| r["rev"].as_u64())
            .unwrap()
            .clone()
    }
}

fn edit(file: &Path, from: &str, to: &str) {
    let s = std::fs::read_to_string(file).unwrap();
    assert!(s.contains(from), "{}: no `{from}`", file.display());
    std::fs::write(file, s.replace(from, to)).unwrap();
}

fn audit(up: &Up, action: &str) -> Vec<Value> {
    up.json(&["audit", "log", "--action", action])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn progressive_rollout_promotes_holds_and_rolls_back_on_live_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("quickstart");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart"),
        &dir,
    );
    let up = Up::start(&dir);
    // Live traffic on the two legitimate edges, ten requests a second each (on top of the
    // demo apps' own calls).
    let reads = up.traffic(
        up.outbound("web/frontend", "orders/orders"),
        "GET",
        "/orders/7",
    );
    let charges = up.traffic(
        up.outbound("orders/orders", "payments/payments"),
        "POST",
        "/charge",
    );
    std::thread::sleep(Duration::from_secs(3));
    let first = up.head()["rev"].as_u64().unwrap();

    // 1. A benign change (a new route nobody calls yet): shadow, gate passed, enforced,
    //    watched, promoted. Meanwhile another apply is refused.
    let benign = up.candidate(None, "benign", |d| {
        edit(
            &d.join("policies.yaml"),
            "      to: [{methods: [GET], paths: [\"/orders/*\"]}]",
            "      to: [{methods: [GET], paths: [\"/orders/*\"]}]\n    - name: health-from-frontend\n      from: [{identities: [\"spiffe://shop.example/ns/web/sa/frontend\"]}]\n      to: [{methods: [GET], paths: [\"/healthz\"]}]",
        );
    });
    let a = up
        .cli()
        .args(["apply", "-f"])
        .arg(&benign)
        .args([
            "--progressive",
            "--bake",
            "6s",
            "--watch",
            "6s",
            "--reason",
            "health route",
        ])
        .output()
        .unwrap();
    assert_eq!(
        a.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&a.stderr)
    );
    let again = up
        .cli()
        .args(["apply", "-f"])
        .arg(&benign)
        .args(["--reason", "impatient"])
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(4),
        "refused while the rollout runs"
    );
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("409") && said.contains("rollout 1"), "{said}");
    let w = up
        .cli()
        .args(["rollout", "status", "--watch", "-o", "json"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&w.stdout).unwrap();
    let r = &r["rollout"];
    assert_eq!(w.status.code(), Some(0), "{r:#}");
    assert_eq!(r["stage"], "promoted", "{r:#}");
    let gate = r["gate"].as_array().unwrap();
    let reads_edge = gate
        .iter()
        .find(|e| e["destination"] == "orders/orders")
        .unwrap_or_else(|| panic!("the shadow saw the frontend's reads: {r:#}"));
    assert!(reads_edge["allowed"].as_u64().unwrap() >= 20, "{r:#}");
    assert_eq!(reads_edge["would_deny"], 0, "{r:#}");
    let enforced = r["enforced"].as_u64().unwrap();
    assert_eq!(enforced, first + 1);
    assert_eq!(
        up.head()["rev"].as_u64(),
        Some(enforced),
        "promoted: it stays"
    );
    assert!(
        up.head()["reason"]
            .as_str()
            .unwrap()
            .starts_with("rollout 1: ")
    );
    assert_eq!(audit(&up, "rollout.promoted").len(), 1);

    // 2. A change that would break a legitimate edge: the orders policy narrowed from
    //    `/orders/*` to `/orders`. Its PolicyTest (GET /orders) still passes, so apply
    //    would take it, but the frontend reads `/orders/7` ten times a second. Held at
    //    the gate with the edge (critical: a PolicyTest expects it allowed) and its
    //    counts; never enforced; aborted.
    let narrow = up.candidate(Some(&benign), "narrow", |d| {
        edit(
            &d.join("policies.yaml"),
            "      to: [{methods: [GET], paths: [\"/orders/*\"]}]",
            "      to: [{methods: [GET], paths: [\"/orders\"]}]",
        );
    });
    let (code, watch, r) = up.roll_out(&narrow, &["--bake", "6s", "--watch", "6s"]);
    assert_eq!(code, Some(0));
    assert_eq!(watch, Some(1), "not promoted: {r:#}");
    assert_eq!(r["stage"], "waiting", "{r:#}");
    assert!(r["enforced"].is_null(), "{r:#}");
    let held: Vec<&Value> = r["gate"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["held"] == true)
        .collect();
    assert_eq!(held.len(), 1, "{r:#}");
    assert_eq!(
        held[0]["source"],
        "spiffe://shop.example/ns/web/sa/frontend"
    );
    assert_eq!(held[0]["destination"], "orders/orders");
    assert_eq!(held[0]["critical"], true, "{r:#}");
    let denied = held[0]["would_deny"].as_u64().unwrap();
    assert!(denied >= 20, "{r:#}");
    assert!(
        denied < held[0]["allowed"].as_u64().unwrap(),
        "GET /orders stays allowed"
    );
    assert!(
        held[0]["example"]
            .as_str()
            .unwrap()
            .starts_with("GET /orders/7"),
        "{r:#}"
    );
    assert!(
        r["why"].as_str().unwrap().contains("orders/orders"),
        "{r:#}"
    );
    assert_eq!(up.head()["rev"].as_u64(), Some(enforced), "never enforced");
    let before = reads[2].load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        reads[2].load(Ordering::Relaxed) > before,
        "reads still pass"
    );
    assert_eq!(
        reads[4].load(Ordering::Relaxed),
        0,
        "no read was ever refused"
    );
    let o = up
        .cli()
        .args([
            "rollout",
            "abort",
            "--reason",
            "payments-1 must keep charging",
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        up.json(&["rollout", "status"])["rollout"]["stage"],
        "aborted"
    );
    assert_eq!(up.head()["rev"].as_u64(), Some(enforced));

    // 3. Harm only enforcement shows: every charge aborted with 503. The shadow sees no
    //    verdict change, so it is enforced; the watch sees orders → payments fail and
    //    rolls it back, well within the watch.
    let faulty = up.candidate(Some(&benign), "faulty", |d| {
        let mut s = std::fs::read_to_string(d.join("policies.yaml")).unwrap();
        s.push_str("\n---\napiVersion: meshward.io/v1alpha1\nkind: FaultInjection\nmetadata: {name: oops, namespace: payments}\nspec:\n  target: {workloads: [payments-0, payments-1]}\n  from: {identities: [\"spiffe://shop.example/ns/orders/sa/orders\"]}\n  abort: {httpStatus: 503, percent: 100}\n  expiresAt: \"2099-01-01T00:00:00Z\"\n");
        std::fs::write(d.join("policies.yaml"), s).unwrap();
    });
    let (code, watch, r) = up.roll_out(&faulty, &["--bake", "6s", "--watch", "30s"]);
    assert_eq!(code, Some(0));
    assert_eq!(watch, Some(1), "{r:#}");
    assert_eq!(r["stage"], "rolled_back", "{r:#}");
    let why = r["why"].as_str().unwrap();
    assert!(
        why.contains("orders/sa/orders → payments/payments-") && why.contains("5xx rate"),
        "{why}"
    );
    let enforced3 = r["enforced"].as_u64().unwrap();
    let back = r["rolled_back_to"].as_u64().unwrap();
    assert_eq!(back, enforced3 + 1);
    let history = up.json(&["history"]);
    let at = |rev: u64| {
        history
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["rev"] == rev)
            .unwrap()["created_ms"]
            .as_i64()
            .unwrap()
    };
    let took = at(back) - at(enforced3);
    assert!(
        took <= 31_000,
        "rolled back {took} ms after enforcement (watch 30 s)"
    );
    let head = up.head();
    assert_eq!(head["rev"].as_u64(), Some(back));
    assert_eq!(
        head["summary"].as_str().unwrap(),
        "rollback of rollout 3: +FaultInjection payments/oops",
        "it restores only what the candidate changed"
    );
    // The fault is gone: charges succeed again.
    let ok = charges[2].load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        charges[2].load(Ordering::Relaxed) > ok,
        "charges pass again"
    );

    // The audit log has each step with its evidence, and its chain verifies.
    let rb = audit(&up, "rollout.rolled_back");
    assert_eq!(rb.len(), 1);
    let detail: Value = serde_json::from_str(rb[0]["detail"].as_str().unwrap()).unwrap();
    assert!(
        detail["why"].as_str().unwrap().contains("5xx rate"),
        "{detail:#}"
    );
    assert!(
        detail["watched"].as_array().is_some_and(|w| !w.is_empty()),
        "{detail:#}"
    );
    assert_eq!(audit(&up, "rollout.started").len(), 3);
    assert_eq!(audit(&up, "rollout.enforced").len(), 2);
    assert_eq!(audit(&up, "rollout.held").len(), 1);
    assert_eq!(audit(&up, "rollout.aborted").len(), 1);
    let v = up.cli().args(["audit", "verify"]).output().unwrap();
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );

    let url = up
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("dashboard:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    // The metrics count each event.
    let metrics = Command::new("curl")
        .args(["-sf", &url.replace("/ui", "/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for (event, n) in [
        ("started", 3),
        ("enforced", 2),
        ("promoted", 1),
        ("stopped", 1),
        ("aborted", 1),
        ("rolled_back", 1),
    ] {
        let line = format!("meshward_control_rollouts_total{{result=\"{event}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }

    // The dashboard (headless Chromium) shows the last rollout, its stage and outcome.
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ui");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-rollout.png");
    let o = Command::new("node")
        .arg(ui.join("dashboard.mjs"))
        .arg(&url)
        .arg(up.state()["token_file"].as_str().unwrap())
        .arg(&shot)
        .args(["web/frontend", "orders/orders"])
        .output()
        .expect("node (scripts/test.sh installs chromium and tests/ui's playwright-core)");
    assert!(
        o.status.success(),
        "the dashboard test failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ro = &shown["rollout"];
    assert_eq!(ro["state"]["id"], 3, "{ro:#}");
    assert_eq!(ro["state"]["stage"], "rolled_back", "{ro:#}");
    let text = ro["text"].as_str().unwrap();
    assert!(
        text.contains("rolled back") && text.contains("5xx rate"),
        "{text}"
    );
    assert!(
        ro["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("orders/sa/orders")),
        "{ro:#}"
    );
}
