#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `meshward drill run` against `meshward up examples/quickstart`: the suite in
//! examples/drills passes; replica loss fails once the TrafficPolicy that protects it is
//! removed; a drill interrupted mid-step leaves no fault and no stopped app behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::{Mesh, copy_dir, examples, meshward};

/// The mesh, with what the drills need of it.
struct Up(Mesh);

impl std::ops::Deref for Up {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.0
    }
}

impl Up {
    fn start(dir: &Path) -> Up {
        Up(Mesh::start(dir))
    }

    fn newest_revision(&self) -> Value {
        let o = self
            .cli()
            .args(["history", "--output", "json"])
            .output()
            .unwrap();
        let h: Value = serde_json::from_slice(&o.stdout).unwrap();
        h.as_array()
            .unwrap()
            .iter()
            .max_by_key(|r| r["rev"].as_u64())
            .unwrap()
            .clone()
    }

    /// `meshward drill run FILE --mesh DIR -o json --junit J`: exit code, report, JUnit.
    fn drill(&self, file: &str) -> (Option<i32>, Value, String) {
        let junit = self.dir.join("junit.xml");
        let o = meshward()
            .args(["drill", "run"])
            .arg(examples().join("drills").join(file))
            .arg("--mesh")
            .arg(&self.dir)
            .arg("--junit")
            .arg(&junit)
            .args(["-o", "json"])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (
            o.status.code(),
            report,
            std::fs::read_to_string(junit).unwrap(),
        )
    }

    /// Starts a drill in text mode, waits for `marker` in its output, interrupts it.
    fn interrupt(&self, file: &str, marker: &str) -> (Option<i32>, Vec<String>) {
        let mut c = meshward()
            .args(["drill", "run"])
            .arg(examples().join("drills").join(file))
            .arg("--mesh")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = vec![];
        let mut r = BufReader::new(c.stdout.take().unwrap());
        loop {
            let mut l = String::new();
            assert!(r.read_line(&mut l).unwrap() > 0, "{lines:#?}");
            lines.push(l.trim_end().to_owned());
            if l.contains(marker) {
                break;
            }
        }
        Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status()
            .unwrap();
        lines.extend(r.lines().map_while(Result::ok));
        (c.wait().unwrap().code(), lines)
    }
}

fn failed(report: &Value) -> Vec<&Value> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect()
}

fn listens(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
}

#[test]
fn the_quickstart_drills_pass_detect_a_missing_traffic_policy_and_clean_up_when_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("quickstart");
    copy_dir(&examples().join("quickstart"), &dir);
    let up = Up::start(&dir);
    // Let some denied traffic (frontend → payments) reach the control plane's records.
    std::thread::sleep(Duration::from_secs(4));

    // 1. A hung replica (first: a replica that hung before stays dear to the balancer for
    //    about a minute, docs/drills.md), then replica loss: survived.
    let (code, r, junit) = up.drill("replica-hangs.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    // steady 1 + the step 1 + recovery 1 + after 1 + denied edges 1.
    assert_eq!(r["passed"], 5, "{r:#}");
    assert!(
        junit.contains(r#"tests="5" failures="0" errors="0""#),
        "{junit}"
    );
    let (code, r, junit) = up.drill("replica-loss.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    // steady 2 + two steps of (2 + recovery 1) + after 2 + denied edges 1.
    assert_eq!(r["passed"], 11, "{r:#}");
    let denied = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["expectation"] == "denied edges stay denied")
        .unwrap();
    assert!(
        denied["measured"]
            .as_str()
            .unwrap()
            .starts_with("0 allowed on"),
        "the frontend → payments edges are watched: {denied}"
    );
    assert!(
        junit.contains(r#"tests="11" failures="0" errors="0""#),
        "{junit}"
    );
    assert!(listens("127.0.0.1:18082"), "payments-0's app is back");
    assert!(listens("127.0.0.2:18082"), "payments-1's app is back");

    // Sidecar loss: payments-1's sidecar stopped alone (listeners and stream closed),
    // orders' charges go on, and it comes back from its state directory.
    let (code, r, _) = up.drill("sidecar-loss.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    assert!(
        r["steps"][0]["did"]
            .as_str()
            .unwrap()
            .contains("listeners and its control-plane stream are closed"),
        "{r:#}"
    );
    assert!(
        r["steps"][0]["undone"]
            .as_str()
            .unwrap()
            .contains("started from its state directory"),
        "{r:#}"
    );

    // Control-plane loss: enforcement goes on (allowed stays allowed, denied stays 403),
    // and every sidecar is back on the restarted control plane.
    let (code, r, _) = up.drill("control-plane-loss.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    // ... and the 8 checks of before, plus one per probe: no record lost uncounted.
    assert_eq!(r["passed"], 10, "{r:#}");
    let kept = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["expectation"] == "no decision record of probe charge lost uncounted")
        .unwrap();
    let measured = kept["measured"].as_str().unwrap();
    let answered: u64 = measured.split(' ').next().unwrap().parse().unwrap();
    assert!(answered > 100, "about 10/s for the whole drill: {measured}");
    assert!(
        measured.contains("on record on orders/orders → payments/payments-0|payments/payments-1"),
        "{measured}"
    );
    let t0 = Instant::now();
    loop {
        let o = up
            .cli()
            .args(["status", "--output", "json"])
            .output()
            .unwrap();
        let st: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let proxies = st["proxies"].as_array().map_or(0, Vec::len);
        if proxies == 4 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{st:#}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // 2. A slow dependency, then a flaky one (injected by orders' sidecar): within
    //    objective, the flaky one thanks to the frontend's retries.
    let (code, r, _) = up.drill("slow-dependency.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    // A flood from one identity: it really sent (about 300/s for 8 s, answered), and the
    // other edge kept its objective.
    let (code, r, _) = up.drill("flood.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    let said = r["steps"][0]["undone"].as_str().unwrap_or("");
    // "flood of … stopped: 2400 sent, 2398 answered 2xx/3xx, 0 rate-limited (429), …"
    let count = |what: &str| -> u64 {
        said.split_once("stopped: ")
            .map_or("", |(_, counts)| counts)
            .split(", ")
            .find_map(|p| p.split_once(' ').filter(|(_, w)| w.starts_with(what)))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(count("sent") >= 1_200, "{said}");
    assert!(count("answered 2xx/3xx") >= 1_200, "{said}");
    // Certificate churn: one-minute certificates for 70 s, every sidecar renewed (at once,
    // then every ~30 s), no request failed; the lifetime is restored.
    let (code, r, _) = up.drill("certificate-churn.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    let said = r["steps"][0]["undone"].as_str().unwrap_or("");
    assert!(said.contains("4 of 4 sidecars renewed"), "{r:#}");
    let rev = up.newest_revision();
    assert!(
        rev["reason"]
            .as_str()
            .is_some_and(|r| r.contains("certificate lifetime restored")),
        "{rev}"
    );
    let (code, r, _) = up.drill("flaky-dependency.yaml");
    assert_eq!(code, Some(0), "{r:#}");
    // The fault is gone again: the newest revision removed it.
    let rev = up.newest_revision();
    assert!(
        rev["summary"]
            .as_str()
            .unwrap()
            .starts_with("-FaultInjection orders/drill-flaky-dependency-1"),
        "{rev}"
    );
    assert_eq!(
        rev["reason"], "drill flaky-dependency: fault removed",
        "{rev}"
    );

    // Against a control plane address (no --mesh): probes by address, fault steps.
    let st = up.state();
    let orders = st["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "web/frontend")
        .unwrap()["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["service"] == "orders/orders")
        .unwrap()["listen"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = dir.join("by-address.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: meshward.io/v1alpha1\nkind: Drill\nmetadata: {{name: by-address, namespace: orders}}\nspec:\n  steady: 2s\n  probes:\n    - {{name: orders, address: \"{orders}\", path: /orders/7}}\n  steps:\n    - name: orders slow\n      duration: 3s\n      fault: {{target: {{workloads: [orders]}}, delay: {{fixed: 100ms, percent: 100}}}}\n  expect:\n    - {{probe: orders, maxErrorPercent: 1}}\n"
        ),
    )
    .unwrap();
    let o = meshward()
        .args(["drill", "run"])
        .arg(&file)
        .args(["--server", st["control"].as_str().unwrap()])
        .args(["--ca-file", st["ca_file"].as_str().unwrap()])
        .args(["--token-file", st["token_file"].as_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("3 passed, 0 failed"), "{out}");
    assert!(out.contains("fault committed as revision"), "{out}");

    // 3. Interrupted mid-step: the fault's revision is undone, then exit 130.
    let (code, lines) = up.interrupt("slow-dependency.yaml", "fault committed");
    assert_eq!(code, Some(130), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("undone: fault removed")),
        "{lines:#?}"
    );
    let rev = up.newest_revision();
    assert!(
        rev["summary"]
            .as_str()
            .unwrap()
            .starts_with("-FaultInjection orders/drill-slow-dependency-1"),
        "{rev}"
    );
    // ... and a stopped app is started again.
    let (code, lines) = up.interrupt("replica-loss.yaml", "stopped (pid");
    assert_eq!(code, Some(130), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("undone: app of payments/payments-0 started again")),
        "{lines:#?}"
    );
    let t0 = Instant::now();
    while !listens("127.0.0.1:18082") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "payments-0 stays down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // 4. Without the TrafficPolicy that retries the frontend's calls to orders, the same
    //    flaky dependency costs the frontend a fifth of its calls: the drill fails, on the
    //    step's error rate — it detects real breakage.
    let repo = dir.join(".meshward/repo");
    let traffic = std::fs::read_to_string(repo.join("traffic.yaml")).unwrap();
    let (payments_only, orders_policy) = traffic.split_once("\n---\n").unwrap();
    assert!(
        orders_policy.contains("metadata: {name: orders, namespace: orders}"),
        "{orders_policy}"
    );
    std::fs::write(repo.join("traffic.yaml"), payments_only).unwrap();
    let o = up
        .cli()
        .args(["apply", "-f"])
        .arg(&repo)
        .args(["--reason", "drop the orders TrafficPolicy"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_secs(2));
    let (code, r, junit) = up.drill("flaky-dependency.yaml");
    assert_eq!(code, Some(1), "{r:#}");
    let f = failed(&r);
    assert!(
        f.iter()
            .any(|c| c["phase"] == "orders fails 20% of the frontend's calls"
                && c["expectation"]
                    .as_str()
                    .unwrap()
                    .starts_with("orders: error rate")),
        "{r:#}"
    );
    assert_eq!(f.len(), 1, "only the step's error rate: {r:#}");
    assert!(junit.contains("<failure message=\"measured"), "{junit}");
}

#[test]
fn a_bad_drill_file_is_refused_with_file_line_and_field_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "    - {name: two failures, duration: 5s, stopApp: a/b, freezeApp: a/b}\n",
            ":10: spec.steps[0]: a step makes one failure",
        ),
        (
            "    - {name: x, duration: 5s, stopApp: a/b, stopApps: a/c}\n",
            ":10: spec.steps[0].stopApps: unknown field",
        ),
        (
            "    - {name: x, duration: soon, stopApp: a/b}\n",
            ":10: spec.steps[0].duration: `soon` is not a duration",
        ),
        (
            "    - {name: x, duration: 5s, flood: {address: \"127.0.0.1:9\", rate: 5000}}\n",
            ":10: spec.steps[0].flood.rate: from 1 to 2000",
        ),
        (
            "    - {name: x, duration: 5s, flood: {address: \"127.0.0.1:9\"}}\n",
            ":10: spec.steps[0].flood: missing field `rate`",
        ),
    ];
    for (step, want) in cases {
        let f = tmp.path().join("bad.yaml");
        std::fs::write(
            &f,
            format!(
                "apiVersion: meshward.io/v1alpha1\nkind: Drill\nmetadata: {{name: bad, namespace: web}}\nspec:\n  probes:\n    - {{name: p, address: \"127.0.0.1:9\"}}\n  expect:\n    - {{probe: p, maxErrorPercent: 1}}\n  steps:\n{step}"
            ),
        )
        .unwrap();
        // No control plane is named: the file is refused before one is needed.
        let o = meshward()
            .args(["drill", "run"])
            .arg(&f)
            .env_remove("MESHWARD_SERVER")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("bad.yaml{want}")), "{want}: {err}");
    }
}
