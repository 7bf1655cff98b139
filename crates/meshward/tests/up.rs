#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `meshward up examples/quickstart`: the whole local mesh from one command — allowed and
//! denied traffic as the README shows it, then Ctrl-C stops everything.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A failed assertion stops the `meshward up` under test (Ctrl-C, then SIGKILL): left
/// running, it and its apps would hold the test harness's output pipe and ports, and the
/// whole run would hang instead of failing.
struct StopOnPanic(u32);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let pid = self.0.to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        std::thread::sleep(Duration::from_secs(3));
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
}

mod support;
use support::copy_dir;

fn curl(addr: &str, method: &str, path: &str) -> (String, String) {
    let o = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    let (b, c) = t.rsplit_once('\n').unwrap_or((&t, ""));
    (c.to_owned(), b.to_owned())
}

#[test]
fn quickstart_comes_up_shows_allowed_and_denied_traffic_and_stops_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("quickstart");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart"),
        &dir,
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .arg("up")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _stop = StopOnPanic(child.id());
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut lines = vec![];
    let start = Instant::now();
    loop {
        let mut l = String::new();
        assert!(
            reader.read_line(&mut l).unwrap() > 0,
            "`meshward up` exited: {lines:#?}"
        );
        lines.push(l.trim_end().to_owned());
        if l.contains("mesh is up") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{lines:#?}");
    }
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in reader.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    for step in [
        "[1/5] policies",
        "[2/5] control plane",
        "[3/5] policies applied: revision 1",
        "[4/5] sidecars ready",
        "[5/5] apps running",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(step)),
            "no `{step}`: {lines:#?}"
        );
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with("web/frontend "))
        .unwrap();
    assert!(
        row.contains("spiffe://shop.example/ns/web/sa/frontend"),
        "{row}"
    );
    let up = |svc: &str| {
        row.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{svc}:80=")))
            .unwrap()
            .to_owned()
    };
    let (orders, payments) = (up("orders/orders"), up("payments/payments"));

    let (code, body) = curl(&orders, "GET", "/orders/7");
    assert_eq!(code, "200", "{body}");
    assert!(
        body.contains(r#""caller":"spiffe://shop.example/ns/web/sa/frontend""#),
        "{body}"
    );
    let (code, body) = curl(&payments, "POST", "/charge");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("no_allow_at_tier"), "{body}");

    // The demo apps' own traffic shows the same, within a few seconds.
    let start = Instant::now();
    let (mut allowed, mut denied) = (false, false);
    while !(allowed && denied) && start.elapsed() < Duration::from_secs(15) {
        if let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
            allowed |= l.starts_with("[orders/orders] POST") && l.contains("-> 200");
            denied |= l.starts_with("[web/frontend] POST") && l.contains("-> 403");
        }
    }
    assert!(allowed && denied, "allowed {allowed}, denied {denied}");

    // Running `up` again while this one runs is refused, naming it; this one goes on.
    let o = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .arg("up")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("pid {}", child.id())) && err.contains("already running"),
        "{err}"
    );
    let (code, body) = curl(&orders, "GET", "/orders/7");
    assert_eq!(code, "200", "the first mesh still serves: {body}");

    // The sidecars ship their decisions to the control plane: `meshward top` and
    // `meshward graph` show the traffic, the denied edge marked; `policy impact|suggest
    // --from-control` read the same window.
    let exports = lines
        .iter()
        .find(|l| l.starts_with("control plane: "))
        .unwrap();
    let env_of = |k: &str| {
        exports
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .trim_end_matches(')')
            .to_owned()
    };
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_meshward"))
            .args(args)
            .env("MESHWARD_SERVER", env_of("MESHWARD_SERVER"))
            .env("MESHWARD_CA_FILE", env_of("MESHWARD_CA_FILE"))
            .env("MESHWARD_TOKEN_FILE", env_of("MESHWARD_TOKEN_FILE"))
            .output()
            .unwrap()
    };
    let edge = |g: &serde_json::Value, from: &str, to: &str| {
        g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["source"] == from && e["destination"] == to)
            .cloned()
    };
    // Payments runs two replicas (workloads payments-0 and payments-1): an edge to either.
    let to_payments = |g: &serde_json::Value, from: &str, key: &str| -> Option<serde_json::Value> {
        g["edges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["source"] == from
                    && e["destination"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("payments/payments-"))
            })
            .find(|e| e[key].as_u64() > Some(0))
            .cloned()
    };
    let start = Instant::now();
    let g = loop {
        let o = cli(&["top", "--once", "--output", "json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ok = to_payments(&g, "orders/orders", "allowed").is_some()
            && to_payments(&g, "web/frontend", "denied").is_some()
            && edge(&g, "web/frontend", "orders/orders").is_some();
        if ok {
            break g;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no shipped traffic: {g}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let nodes: Vec<&str> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    for n in ["web/frontend", "orders/orders"] {
        assert!(nodes.contains(&n), "{nodes:?}");
    }
    assert!(
        nodes.iter().any(|n| n.starts_with("payments/payments-")),
        "{nodes:?}"
    );
    let denied = to_payments(&g, "web/frontend", "denied").unwrap();
    assert_eq!(denied["allowed"], 0, "{denied}");
    assert!(
        denied["denials"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("no_allow_at_tier")),
        "{denied}"
    );
    assert_eq!(denied["example_denied"], "POST /charge", "{denied}");
    // Each deny reason carries its own example.
    let examples = denied["denial_examples"].as_object().unwrap();
    assert!(
        examples
            .iter()
            .any(|(k, v)| k.starts_with("no_allow_at_tier") && v == "POST /charge"),
        "{denied}"
    );
    // -n NAMESPACE and -o yaml: the payments namespace's edges only, as YAML.
    let o = cli(&["graph", "-n", "payments", "-o", "yaml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let yaml = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(yaml.starts_with("---\n"), "{yaml}");
    assert!(yaml.contains("destination: payments/payments-"), "{yaml}");
    assert!(
        !yaml.contains("destination: orders/orders"),
        "an edge outside the namespace: {yaml}"
    );
    let allowed = edge(&g, "web/frontend", "orders/orders").unwrap();
    assert_eq!(allowed["mtls"], true, "{allowed}");
    assert!(allowed["p99_ms"].as_f64().is_some(), "{allowed}");
    let o = cli(&["top", "--once"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("web/frontend") && text.contains("no_allow_at_tier"),
        "{text}"
    );
    let o = cli(&["graph", "--output", "dot"]);
    let dot = String::from_utf8_lossy(&o.stdout);
    assert!(
        dot.lines()
            .any(|l| l.contains(r#""web/frontend" -> "payments/payments-"#)
                && l.contains("color=red")),
        "{dot}"
    );
    // Replaying the window against the policies in force flips nothing; suggest mines it.
    let repo = dir.join(".meshward/repo");
    let o = cli(&[
        "policy",
        "impact",
        repo.to_str().unwrap(),
        "--from-control",
        "--output",
        "json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["records"].as_u64() > Some(0), "{r}");
    assert_eq!(r["allow_to_deny_records"], 0, "{r}");
    assert_eq!(r["deny_to_allow_records"], 0, "{r}");
    let o = cli(&["policy", "suggest", "--from-control"]);
    let yaml = String::from_utf8_lossy(&o.stdout);
    assert!(
        yaml.contains("spiffe://shop.example/ns/orders/sa/orders") && yaml.contains("/charge"),
        "{yaml}"
    );

    // The access log: `meshward logs` reads the sidecars' files in the mesh directory,
    // filtered, as JSON lines; the denied edge with its 403, the allowed one with status,
    // bytes and duration; and the control plane's window the same way.
    let logs = |args: &[&str]| {
        let o = cli(&[
            &["logs", "--mesh", dir.to_str().unwrap(), "-o", "json"],
            args,
        ]
        .concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let denied = logs(&[
        "--source",
        "web/frontend",
        "--destination",
        "payments",
        "--verdict",
        "deny",
    ]);
    assert!(!denied.is_empty());
    for r in &denied {
        assert_eq!(r["status"], 403, "{r}");
        assert_eq!(
            r["source"], "spiffe://shop.example/ns/web/sa/frontend",
            "{r}"
        );
        assert!(
            r["destination"]
                .as_str()
                .unwrap()
                .starts_with("payments/payments-"),
            "{r}"
        );
    }
    let ok = logs(&["--destination", "orders/orders", "--status", "2xx"]);
    assert!(!ok.is_empty());
    for r in &ok {
        assert_eq!(r["verdict"], "allow", "{r}");
        assert!(r["response_bytes"].as_u64() > Some(0), "{r}");
        assert!(r["duration_ns"].as_u64().is_some(), "{r}");
    }
    assert!(logs(&["--destination", "orders/orders", "--status", "5xx"]).is_empty());
    // -n NAMESPACE: only destinations of that namespace; with --destination NAME, that
    // workload of it.
    let in_payments = logs(&["-n", "payments"]);
    assert!(!in_payments.is_empty());
    assert!(
        in_payments.iter().all(|r| r["destination"]
            .as_str()
            .is_some_and(|d| d.starts_with("payments/"))),
        "{in_payments:?}"
    );
    assert_eq!(
        logs(&["-n", "orders", "--destination", "orders", "--status", "2xx"]).len(),
        ok.len()
    );
    let o = cli(&["logs", "--from-control", "--verdict", "deny", "--tail", "3"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // (The window holds what was shipped so far: at least the one denial above.)
    assert!((1..=3).contains(&text.lines().count()), "{text}");
    assert!(text.lines().all(|l| l.contains(" deny ")), "{text}");
    // Following: a denied request made after `logs -f --tail 0` started appears (this
    // one, or the demo frontend's own next call to /charge).
    let mut follow = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args([
            "logs",
            "-f",
            "--tail",
            "0",
            "--status",
            "403",
            "--source",
            "web/frontend",
            "--mesh",
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(follow.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let mut got = String::new();
    let (code, _) = curl(&payments, "POST", "/charge");
    assert_eq!(code, "403");
    let reader = std::thread::spawn(move || {
        let _ = out.read_line(&mut got);
        got
    });
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let line = reader.join().unwrap();
    assert!(line.contains("POST /charge 403"), "followed: {line:?}");

    // A drill through the CLI: a FaultInjection that answers 503 for the frontend's calls
    // to one path of orders, for ten minutes. The orders sidecar injects it after
    // authorization; other paths are untouched.
    let drill = tmp.path().join("drill");
    copy_dir(&repo, &drill);
    let expires =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(600));
    std::fs::write(
        drill.join("drill.yaml"),
        format!(
            "apiVersion: meshward.io/v1alpha1\nkind: FaultInjection\nmetadata: {{name: drill, namespace: orders}}\nspec:\n  target: {{workloads: [orders]}}\n  from: {{identities: [\"spiffe://shop.example/ns/web/sa/frontend\"]}}\n  to: [{{paths: [/orders/99]}}]\n  abort: {{httpStatus: 503, percent: 100}}\n  expiresAt: {expires}\n"
        ),
    )
    .unwrap();
    let o = cli(&[
        "apply",
        "-f",
        drill.to_str().unwrap(),
        "--reason",
        "drill: orders fails for /orders/99",
    ]);
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("no effect yet"),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let start = Instant::now();
    loop {
        let (code, body) = curl(&orders, "GET", "/orders/99");
        if code == "503" {
            assert!(body.contains(r#""fault":"orders/drill""#), "{body}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = curl(&orders, "GET", "/orders/7");
    assert_eq!(code, "200", "{body}");

    // The dashboard, in headless Chromium (Debian's chromium, driven by playwright-core
    // from tests/ui): sign in with the admin token, the graph shows the three services,
    // the denied edge marked denied, the denial with its reason; a screenshot is kept.
    let url = lines
        .iter()
        .find_map(|l| l.strip_prefix("dashboard:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ui");
    let o = Command::new("node")
        .arg(ui.join("dashboard.mjs"))
        .arg(&url)
        .arg(env_of("MESHWARD_TOKEN_FILE"))
        .arg(&shot)
        .args([
            "web/frontend",
            "orders/orders",
            "payments/payments-0",
            "payments/payments-1",
        ])
        .output()
        .expect("node (scripts/test.sh installs chromium and tests/ui's playwright-core)");
    assert!(
        o.status.success(),
        "the dashboard test failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        shown["nodes"],
        serde_json::json!([
            "orders/orders",
            "payments/payments-0",
            "payments/payments-1",
            "web/frontend"
        ]),
        "{shown}"
    );
    let edges = shown["edges"].as_array().unwrap();
    let classes = |from: &str, to: &str| {
        edges
            .iter()
            .find(|e| e["source"] == from && e["target"] == to)
            .map(|e| e["classes"].clone())
            .unwrap_or_default()
    };
    for replica in ["payments/payments-0", "payments/payments-1"] {
        let c = classes("web/frontend", replica);
        assert!(
            c == serde_json::json!(["denied"]) || c.is_null(),
            "{replica}: {shown}"
        );
    }
    assert_eq!(
        classes("web/frontend", "orders/orders"),
        serde_json::json!(["ok"]),
        "{shown}"
    );
    assert!(
        ["payments/payments-0", "payments/payments-1"]
            .iter()
            .any(|r| classes("orders/orders", r) == serde_json::json!(["ok"])),
        "{shown}"
    );
    assert!(
        shown["denials"].as_array().unwrap().iter().any(|d| {
            let d = d.as_str().unwrap_or("");
            d.contains("web/frontend")
                && d.contains("no_allow_at_tier")
                && d.contains("POST /charge")
        }),
        "{shown}"
    );
    // The initial revision and the drill's; the drill among the injected faults.
    assert_eq!(shown["history"].as_array().unwrap().len(), 2, "{shown}");
    assert!(
        shown["faults"].as_array().unwrap().iter().any(|f| {
            let f = f.as_str().unwrap_or("");
            f.contains("orders/drill") && f.contains("HTTP 503 for 100%")
        }),
        "{shown}"
    );
    // A row per sidecar with the certificate it holds: the two payments replicas each
    // have their own (same identity, different serials).
    let certs: Vec<&str> = shown["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(certs.len(), 4, "{shown}");
    for w in [
        "web/frontend",
        "orders/orders",
        "payments/payments-0",
        "payments/payments-1",
    ] {
        assert!(
            certs
                .iter()
                .any(|c| c.starts_with(w) && c.contains("spiffe://shop.example/")),
            "no certificate row for {w}: {shown}"
        );
    }
    // The anomaly-detection panel renders (the quickstart's Mesh is in report mode: a row
    // per reported identity, or the empty-table row).
    let anomalies = shown["anomalies"].as_array().unwrap();
    assert!(
        anomalies.iter().any(|r| {
            let r = r.as_str().unwrap_or("");
            r.contains("nothing reported") || r.contains("reported")
        }),
        "{shown}"
    );
    assert_eq!(shown["errors"], serde_json::json!([]), "{shown}");
    // Readable: no two labels overlap; a real click on the denied edge shows its details
    // (the reason with its own example) and its series with the two revisions as markers.
    assert_eq!(shown["overlaps"], serde_json::json!([]), "{shown}");
    let details = &shown["details"];
    let text = details["details"].as_str().unwrap_or("");
    assert!(
        text.contains("web/frontend → payments/payments-")
            && text.contains("no_allow_at_tier")
            && text.contains("POST /charge"),
        "{details}"
    );
    assert!(details["series_points"].as_u64() > Some(10), "{details}");
    assert!(details["series_markers"].as_u64() >= Some(2), "{details}");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "no screenshot"
    );
    eprintln!("dashboard screenshot: {}", shot.display());

    // Replicas: the printed way to stop one works, and the calls move to the other.
    let hint = lines
        .iter()
        .find(|l| l.starts_with("replicas:"))
        .unwrap_or_else(|| panic!("no replicas hint: {lines:#?}"));
    let pid = hint
        .split("`kill ")
        .nth(1)
        .unwrap()
        .split('`')
        .next()
        .unwrap();
    let admin = hint
        .split("curl -s http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    assert!(hint.contains("payments/payments-1"), "{hint}");
    let st = Command::new("kill").arg(pid).status().unwrap();
    assert!(st.success(), "kill {pid}");
    let start = Instant::now();
    loop {
        let (_, eps) = curl(admin, "GET", "/endpoints");
        if eps.contains("\"not_ready\":\"the app is not accepting connections") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{eps}");
        std::thread::sleep(Duration::from_millis(200));
    }
    while rx.try_recv().is_ok() {}
    let (mut to_0, mut to_1) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(500))
            && l.starts_with("[orders/orders] POST")
        {
            to_0 += usize::from(
                l.contains("-> 200") && l.contains(r#""service":"payments/payments-0""#),
            );
            to_1 += usize::from(l.contains("payments/payments-1"));
        }
    }
    assert!(
        to_0 >= 3 && to_1 == 0,
        "to payments-0: {to_0}, to payments-1: {to_1}"
    );

    // Ctrl-C stops everything.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "`meshward up` did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    for port in [18080, 18081, 18082] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the app on {port} is still running"
        );
    }
}

#[test]
fn a_lint_error_points_at_the_users_file_not_at_the_generated_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qs");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart"),
        &dir,
    );
    let f = dir.join("policies/policies.yaml");
    let text = std::fs::read_to_string(&f).unwrap();
    let first = text
        .lines()
        .position(|l| l.contains("from: [{identities:"))
        .unwrap();
    std::fs::write(
        &f,
        text.replacen("from: [{identities:", "from: [{identites:", 1),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .arg("up")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("unknown field `identites`"), "{err}");
    assert!(
        err.contains(&format!("--> {}:{}:", f.display(), first + 1)),
        "the user's file and line: {err}"
    );
    assert!(
        !err.contains(".meshward/repo/policies.yaml"),
        "not the copy: {err}"
    );
    // The source line under the arrow is the user's.
    assert!(
        err.contains("identites: [\"spiffe://shop.example/ns/web/sa/frontend\"]"),
        "{err}"
    );
}

#[test]
fn an_app_port_held_by_another_process_is_named_and_up_fails() {
    // The quickstart on app ports of its own (the other test of this file runs the
    // quickstart on 18080–18082 at the same time), orders' held by this test.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let other = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let (frontend, payments) = (other(), other());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qs");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart"),
        &dir,
    );
    for f in ["mesh.yaml", "policies/mesh.yaml", "policies/policies.yaml"] {
        let p = dir.join(f);
        let t = std::fs::read_to_string(&p).unwrap();
        let t = t
            .replace("18080", &frontend)
            .replace("18081", &port)
            .replace("18082", &payments);
        std::fs::write(&p, t).unwrap();
    }
    let t0 = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .arg("up")
        .arg(&dir)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!o.status.success(), "{out}{err}");
    assert!(
        err.contains(&format!(
            "the app of orders/orders cannot listen on 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(
        !out.contains("apps running") && !out.contains("mesh is up"),
        "{out}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    drop(held);
}
