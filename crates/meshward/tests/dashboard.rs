#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The dashboard at 50 services, in headless Chromium: a real control plane with a
//! generated repository of 50 workloads and services (some with an availability
//! objective), a decision window holding recorded traffic on about 80 edges (written with
//! the control plane's own `DecisionWindow`, as sidecars' shipped batches are), and
//! `tests/ui/dashboard.mjs` driving the page: every node is drawn, no two labels overlap,
//! clicking an edge shows its details and its time series with the revisions as markers.
//! (The 3-service case runs in `up.rs` against `meshward up examples/quickstart`.)

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

const NAMESPACES: [&str; 5] = [
    "storefront",
    "inventory",
    "checkout",
    "shipping",
    "identity",
];
const ROLES: [&str; 10] = [
    "api",
    "gateway",
    "reconciler",
    "worker",
    "cache",
    "indexer",
    "notifier",
    "ledger",
    "scheduler",
    "auditor",
];

fn workloads() -> Vec<(String, String)> {
    NAMESPACES
        .iter()
        .flat_map(|ns| {
            ROLES
                .iter()
                .map(move |r| (ns.to_string(), format!("{ns}-{r}")))
        })
        .collect()
}

fn repo() -> String {
    let mut s = String::from(
        "apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {trustDomain: shop.example}\n",
    );
    for (i, (ns, name)) in workloads().iter().enumerate() {
        s.push_str(&format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\nspec: {{ports: [{{port: 8080, protocol: HTTP}}]}}\n"
        ));
        let objective = if i % 3 == 0 {
            ", objective: {availability: 99.5}"
        } else {
            ""
        };
        s.push_str(&format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]{objective}}}\n"
        ));
    }
    s
}

/// About 80 edges: within a namespace the first roles call the later ones, and each
/// namespace's gateway calls the next namespace's api.
fn edges() -> Vec<(usize, usize)> {
    let n = ROLES.len();
    let mut e = vec![];
    for ns in 0..NAMESPACES.len() {
        let at = |r: usize| ns * n + r;
        for (from, to) in [
            (0, 2),
            (0, 3),
            (0, 4),
            (1, 0),
            (1, 5),
            (2, 6),
            (2, 7),
            (3, 7),
            (3, 8),
            (4, 9),
            (5, 9),
            (6, 9),
            (7, 8),
            (8, 9),
            (1, 6),
        ] {
            e.push((at(from), at(to)));
        }
        e.push((at(1), ((ns + 1) % NAMESPACES.len()) * n));
    }
    e
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_dashboard_stays_readable_at_fifty_services() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let repo_dir = tmp.path().join("repo");
    std::fs::create_dir_all(&repo_dir).unwrap();
    std::fs::write(repo_dir.join("mesh.yaml"), repo()).unwrap();
    // Two platform-security operators: a change to the Mesh needs a second one's approval.
    std::fs::create_dir_all(&data).unwrap();
    let op = |name: &str| meshward_control::auth::Operator {
        name: name.into(),
        roles: vec![meshward_control::auth::PLATFORM_SECURITY.into()],
        namespaces: vec![],
        token_sha256: vec![meshward_control::auth::sha256_hex(&format!(
            "token-of-{name}"
        ))],
    };
    std::fs::write(
        data.join("operators.json"),
        serde_json::to_string(&meshward_control::auth::Operators {
            operators: vec![op("alice"), op("bob")],
        })
        .unwrap(),
    )
    .unwrap();
    for n in ["alice", "bob"] {
        std::fs::write(data.join(format!("{n}.token")), format!("token-of-{n}")).unwrap();
    }
    let http = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshward"))
        .args([
            "control",
            "--trust-domain",
            "shop.example",
            "--listen",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
            "--http-listen",
            &format!("127.0.0.1:{http}"),
            "--data",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let _control = Kill(child);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("meshward control listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let token = data.join("alice.token");
    let cli_as = |who: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_meshward"))
            .args(args)
            .arg("--server")
            .arg(&addr)
            .arg("--ca-file")
            .arg(data.join("bundle.pem"))
            .arg("--token-file")
            .arg(data.join(format!("{who}.token")))
            .output()
            .unwrap()
    };
    for reason in ["initial", "second revision"] {
        let o = cli_as(
            "alice",
            &[
                "apply",
                "-f",
                repo_dir.to_str().unwrap(),
                "--reason",
                reason,
            ],
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        if let Some(id) = text
            .strip_prefix("pending approval: change ")
            .and_then(|t| t.split_whitespace().next())
        {
            let o = cli_as("bob", &["approve", id]);
            assert!(
                o.status.success(),
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if reason == "initial" {
            // The second apply must change something to be a revision.
            std::fs::write(
                repo_dir.join("policy.yaml"),
                "apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: checkout}\nspec:\n  tier: service\n  action: DENY\n  target: {workloads: [checkout-api]}\n  rules:\n    - name: admin\n      to: [{paths: [\"/admin/*\"]}]\n",
            )
            .unwrap();
        }
    }

    // The recorded traffic of the last minute: allows (some answered 5xx) and denies.
    let window = meshward_control::decisions::DecisionWindow::open(
        &data.join("decisions.db"),
        meshward_control::decisions::DEFAULT_MAX_RECORDS,
    )
    .unwrap();
    let w = workloads();
    let id = |i: usize| format!("spiffe://shop.example/ns/{}/sa/{}", w[i].0, w[i].1);
    let now = SystemTime::now();
    let mut lines = vec![];
    for (k, &(from, to)) in edges().iter().enumerate() {
        for j in 0..12u64 {
            let at = now - Duration::from_secs(55 - j * 4);
            let ts = humantime::format_rfc3339_millis(at).to_string();
            let deny = k % 5 == 0 && j % 2 == 0 || k % 11 == 0;
            let (verdict, reason, policy) = if deny {
                (
                    "deny",
                    "no_allow_at_tier",
                    r#","policy":"checkout/no-admin""#,
                )
            } else {
                ("allow", "allowed_by_rule", "")
            };
            let status = if deny {
                403
            } else if k % 7 == 0 && j % 3 == 0 {
                503
            } else {
                200
            };
            lines.push(format!(
                r#"{{"ts":"{ts}","direction":"inbound","source":"{}","destination":"{}/{}","port":8080,"method":"GET","path":"/items/{j}","verdict":"{verdict}","reason":"{reason}"{policy},"decision_ns":900,"duration_ns":{},"status":{status}}}"#,
                id(from),
                w[to].0,
                w[to].1,
                (j + 1) * 1_500_000
            ));
        }
    }
    let (ok, invalid) = window.append(&id(0), &lines).unwrap();
    assert_eq!((ok as usize, invalid), (lines.len(), 0));

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-50.png");
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ui");
    let o = Command::new("node")
        .arg(ui.join("dashboard.mjs"))
        .arg(format!("http://127.0.0.1:{http}/ui"))
        .arg(&token)
        .arg(&shot)
        .env("MESHWARD_UI_MIN_NODES", "50")
        .output()
        .expect("node (scripts/test.sh installs chromium and tests/ui's playwright-core)");
    assert!(
        o.status.success(),
        "the dashboard test failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["errors"], serde_json::json!([]), "{shown}");
    assert!(shown["nodes"].as_array().unwrap().len() >= 50, "{shown}");
    assert_eq!(
        shown["edges"].as_array().unwrap().len(),
        edges().len(),
        "{shown}"
    );
    assert_eq!(
        shown["overlaps"],
        serde_json::json!([]),
        "labels overlap at 50 services (screenshot {})",
        shot.display()
    );
    // Clicking a denied edge: its details with the reason and its own example, and its
    // series over the window with the two revisions as markers.
    let details = &shown["details"];
    let text = details["details"].as_str().unwrap_or("");
    assert!(text.contains("no_allow_at_tier"), "{details}");
    assert!(text.contains("GET /items/"), "{details}");
    assert!(details["series_points"].as_u64() > Some(10), "{details}");
    assert!(details["series_markers"].as_u64() >= Some(2), "{details}");
    // Error budgets: some services burn theirs, and the graph says so.
    assert!(
        shown["burning"].as_u64() > Some(0),
        "no service shown burning its budget: {shown}"
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("dashboard screenshot at 50 services: {}", shot.display());
}
