#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Real processes: a control plane, two `meshward proxy` sidecars, an unmodified app
//! (`python3 -m http.server`) and curl. Allowed and denied calls through two proxies over
//! mTLS; the control plane killed (traffic keeps flowing under the same policy, denials
//! still deny); a proxy restarted while the control plane is down starts from its
//! last-known-good state.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY, sha256_hex};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshward")
}

/// A free loopback port below the kernel's ephemeral range, so that no client connection
/// of a test running beside this one can take it between this pick and the process that
/// binds it (that race once made a sidecar exit before `ready`). Unique within this test
/// binary; the start depends on the process id so that two binaries rarely overlap.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (from, span) = (10_000u32, low.saturating_sub(10_000));
    if span < 1000 {
        // An unusual range: let the kernel pick.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let start = std::process::id() * 97 % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(from + (start + n) % span).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {from}..{}", from + span);
}

/// A process, killed when dropped; `spawn_until`'s keep their stderr in a file.
struct Proc(Child, Option<tempfile::NamedTempFile>);
impl Proc {
    fn new(child: Child) -> Self {
        Proc(child, None)
    }

    /// What it has written to stderr so far.
    fn stderr(&self) -> String {
        self.1
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f.path()).ok())
            .unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let o = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "kill {sig}: {}", out(&o));
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns and waits for a line containing `marker` on stdout (then keeps draining it).
fn spawn_until(cmd: &mut Command, marker: &str) -> (Proc, Vec<String>) {
    // stderr goes to a file so that a process that dies early says why.
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut lines = vec![];
    let start = Instant::now();
    // A process that stays silent is killed after 30 s, so the read below ends and the test
    // fails saying why instead of hanging.
    let found = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (watch, pid) = (found.clone(), child.id().to_string());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        if !watch.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = Command::new("kill").args(["-KILL", &pid]).output();
        }
    });
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).unwrap() == 0 {
            let _ = child.wait();
            let stderr = std::fs::read_to_string(errors.path()).unwrap_or_default();
            panic!("process exited before `{marker}`: {lines:?}\nstderr:\n{stderr}");
        }
        lines.push(l.trim().to_owned());
        if l.contains(marker) {
            found.store(true, std::sync::atomic::Ordering::Relaxed);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no `{marker}` in 30s: {lines:?}"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (Proc(child, Some(errors)), lines)
}

fn curl(port: u16, path: &str) -> (String, String) {
    let o = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (code.to_owned(), body.to_owned())
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Env {
    data: PathBuf,
    api: String,
    proxy_api: String,
}

impl Env {
    fn cli(&self, who: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .args(["--server", &self.api, "--ca-file"])
            .arg(self.data.join("bundle.pem"))
            .arg("--token-file")
            .arg(self.data.join(format!("{who}.token")))
            .output()
            .unwrap()
    }

    fn proxy(
        &self,
        workload: &str,
        state: &Path,
        token: Option<&Path>,
        extra: &[&str],
    ) -> (Proc, Vec<String>) {
        self.proxy_under(&[], workload, state, token, extra)
    }

    /// A proxy started by `launcher` (e.g. `prlimit --nofile=64:64`, which runs it in
    /// its own process with that limit).
    fn proxy_under(
        &self,
        launcher: &[&str],
        workload: &str,
        state: &Path,
        token: Option<&Path>,
        extra: &[&str],
    ) -> (Proc, Vec<String>) {
        let mut c = match launcher {
            [] => Command::new(bin()),
            [prog, args @ ..] => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin());
                c
            }
        };
        c.args([
            "proxy",
            "--workload",
            workload,
            "--control",
            &self.proxy_api,
            "--ca-file",
        ])
        .arg(self.data.join("bundle.pem"))
        .arg("--state-dir")
        .arg(state)
        .args(extra);
        if !extra.contains(&"--admin") {
            c.args(["--admin", &format!("127.0.0.1:{}", free_port())]);
        }
        if let Some(t) = token {
            c.arg("--join-token-file").arg(t);
        }
        spawn_until(&mut c, "ready")
    }
}

fn start_control(data: &Path, api: u16, proxy_api: u16, metrics: u16) -> Proc {
    start_control_with(data, (api, proxy_api, metrics), &[])
}

fn start_control_with(
    data: &Path,
    (api, proxy_api, metrics): (u16, u16, u16),
    extra: &[&str],
) -> Proc {
    let mut c = Command::new(bin());
    c.args([
        "control",
        "--trust-domain",
        "shop.example",
        "--listen",
        &format!("127.0.0.1:{api}"),
        "--proxy-listen",
        &format!("127.0.0.1:{proxy_api}"),
        "--http-listen",
        &format!("127.0.0.1:{metrics}"),
        "--data",
    ])
    .arg(data)
    .args(extra);
    spawn_until(&mut c, "listening").0
}

/// A running control plane with two platform operators (alice applies, bob approves),
/// `repo` (YAML) applied and approved as revision 1, and a join token file for each of
/// `identities`.
struct Mesh {
    control: Proc,
    env: Env,
    data: PathBuf,
    ports: (u16, u16, u16),
    tokens: Vec<PathBuf>,
}

fn start_mesh(tmp: &Path, repo: &str, identities: &[&str]) -> Mesh {
    start_mesh_with(tmp, repo, identities, &[])
}

/// [`start_mesh`], the control plane started with `extra` flags.
fn start_mesh_with(tmp: &Path, repo: &str, identities: &[&str], extra: &[&str]) -> Mesh {
    let data = tmp.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ops = Operators {
        operators: ["alice", "bob"]
            .iter()
            .map(|n| Operator {
                name: n.to_string(),
                roles: vec![PLATFORM_SECURITY.into()],
                namespaces: vec![],
                token_sha256: vec![sha256_hex(&format!("t-{n}"))],
            })
            .collect(),
    };
    std::fs::write(
        data.join("operators.json"),
        serde_json::to_string(&ops).unwrap(),
    )
    .unwrap();
    for n in ["alice", "bob"] {
        std::fs::write(data.join(format!("{n}.token")), format!("t-{n}")).unwrap();
    }
    let (api, proxy_api, cp_metrics) = (free_port(), free_port(), free_port());
    let control = start_control_with(&data, (api, proxy_api, cp_metrics), extra);
    let env = Env {
        data: data.clone(),
        api: format!("127.0.0.1:{api}"),
        proxy_api: format!("127.0.0.1:{proxy_api}"),
    };
    let dir = tmp.join("repo");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), repo).unwrap();
    let o = env.cli(
        "alice",
        &["apply", "-f", dir.to_str().unwrap(), "--reason", "initial"],
    );
    assert!(
        out(&o).contains("pending approval: change 1"),
        "{}",
        out(&o)
    );
    let o = env.cli("bob", &["approve", "1"]);
    assert!(out(&o).contains("approved: revision 1"), "{}", out(&o));
    let mut tokens = vec![];
    for id in identities {
        let o = env.cli("alice", &["workload", "token", "--identity", id]);
        assert!(o.status.success(), "{}", out(&o));
        let f = tmp.join(format!("{}.jointoken", tokens.len()));
        std::fs::write(&f, String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        tokens.push(f);
    }
    Mesh {
        control,
        env,
        data,
        ports: (api, proxy_api, cp_metrics),
        tokens,
    }
}

impl Mesh {
    /// The frontend's and the admin's sidecars (tokens 1 and 2), each with an upstream to
    /// `orders/orders:80` on the port given.
    fn callers(&self, tmp: &Path, front_out: u16, admin_out: u16) -> [Proc; 2] {
        let upstream = |port: u16| format!("127.0.0.1:{port}=orders/orders:80");
        let (frontend, _) = self.env.proxy(
            "web/frontend",
            &tmp.join("state-frontend"),
            Some(&self.tokens[1]),
            &["--upstream", &upstream(front_out)],
        );
        let (admin, _) = self.env.proxy(
            "web/admin",
            &tmp.join("state-admin"),
            Some(&self.tokens[2]),
            &["--upstream", &upstream(admin_out)],
        );
        [frontend, admin]
    }
}

#[test]
fn two_sidecars_enforce_locally_and_survive_the_control_plane() {
    let tmp = tempfile::tempdir().unwrap();
    // The app: an unmodified python3 http.server with a file at /orders/1.
    let (app_port, inbound, outbound) = (free_port(), free_port(), free_port());
    let www = tmp.path().join("www");
    std::fs::create_dir_all(www.join("orders")).unwrap();
    std::fs::write(www.join("orders/1"), "order one").unwrap();
    std::fs::write(www.join("secret"), "top secret").unwrap();
    let _app = Proc::new(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &app_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let repo = format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {{name: shop}}
spec: {{trustDomain: shop.example}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: frontend, namespace: web}}
spec: {{ports: [{{port: 9000, protocol: HTTP}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec: {{ports: [{{port: {app_port}, protocol: HTTP, inbound: "127.0.0.1:{inbound}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {app_port}}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - name: frontend-reads-orders
      from: [{{identities: ["spiffe://shop.example/ns/web/sa/frontend"]}}]
      to: [{{methods: [GET], paths: ["/orders/*"]}}]
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: tighten-orders, namespace: orders}}
spec:
  tier: service
  action: DENY
  mode: dry-run
  target: {{workloads: [orders-api]}}
  rules:
    - name: no-order-two
      to: [{{paths: ["/orders/2"]}}]
"#
    );
    let Mesh {
        mut control,
        env,
        data,
        ports: (api, proxy_api, cp_metrics),
        tokens,
    } = start_mesh(
        tmp.path(),
        &repo,
        &[
            "spiffe://shop.example/ns/orders/sa/orders-api",
            "spiffe://shop.example/ns/web/sa/frontend",
        ],
    );
    let orders_state = tmp.path().join("state-orders");
    let orders_admin = format!("127.0.0.1:{}", free_port());
    let (orders, lines) = env.proxy(
        "orders/orders-api",
        &orders_state,
        Some(&tokens[0]),
        &[
            "--decision-log",
            tmp.path().join("orders-decisions.jsonl").to_str().unwrap(),
            "--admin",
            &orders_admin,
        ],
    );
    assert!(
        lines.iter().any(|l| l.contains(&format!(
            "inbound 127.0.0.1:{inbound} -> 127.0.0.1:{app_port}"
        ))),
        "{lines:?}"
    );
    let (_frontend, _) = env.proxy(
        "web/frontend",
        &tmp.path().join("state-frontend"),
        Some(&tokens[1]),
        &[
            "--upstream",
            &format!("127.0.0.1:{outbound}=orders/orders:80"),
        ],
    );

    // Allowed, and denied with the reason.
    let (code, body) = curl(outbound, "/orders/1");
    assert_eq!((code.as_str(), body.as_str()), ("200", "order one"));
    let (code, body) = curl(outbound, "/secret");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("no_allow_at_tier"), "{body}");
    // The sidecar's own port refuses plaintext.
    let (code, _) = curl(inbound, "/orders/1");
    assert_ne!(code, "200");

    // Telemetry: the proxy's and the control plane's metrics pass `promtool check
    // metrics`, carry the decisions just made, and hold every series the Grafana
    // dashboard queries.
    let scrape = |url: &str| {
        let o = Command::new("curl")
            .args(["-s", "-m", "5", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let start = Instant::now();
    let proxy_metrics = loop {
        let m = scrape(&format!("http://{orders_admin}/metrics"));
        if m.contains("meshward_tls_handshake_failures_total{") {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{m}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let cp_text = scrape(&format!("http://127.0.0.1:{cp_metrics}/metrics"));
    for (what, text) in [("proxy", &proxy_metrics), ("control plane", &cp_text)] {
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
        {
            use std::io::Write as _;
            p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let o = p.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "promtool on the {what} metrics: {}\n{text}",
            out(&o)
        );
    }
    for series in [
        r#"meshward_requests_total{direction="inbound",source="spiffe://shop.example/ns/web/sa/frontend",destination="orders/orders-api",verdict="allow",reason="allowed_by_rule"} 1"#,
        r#"meshward_requests_total{direction="inbound",source="spiffe://shop.example/ns/web/sa/frontend",destination="orders/orders-api",verdict="deny",reason="no_allow_at_tier"} 1"#,
        r#"meshward_request_duration_seconds_count{direction="inbound",class="2xx"} 1"#,
        r#"meshward_request_duration_seconds_count{direction="inbound",class="4xx"} 1"#,
        r#"meshward_tls_handshake_failures_total{direction="inbound",reason="not_tls"} 1"#,
        "meshward_config_revision 1",
        "meshward_decision_duration_seconds_count 2",
        "meshward_shadow_decisions_total{",
        "process_cpu_seconds_total ",
        "process_start_time_seconds ",
        "process_max_fds ",
        r#"component="proxy"} 1"#,
        &format!(
            r#"meshward_tcp_connections_opened_total{{listener="inbound 127.0.0.1:{inbound}"}} "#
        ),
    ] {
        assert!(
            proxy_metrics.contains(series),
            "no `{series}` in:\n{proxy_metrics}"
        );
    }
    assert!(
        !proxy_metrics.contains("/orders/1") && !proxy_metrics.contains("/secret"),
        "a raw path became a label value:\n{proxy_metrics}"
    );
    for series in [
        r#"meshward_control_proxies{revision="1"} 2"#,
        "meshward_control_certificates_issued_total 2",
        "meshward_control_revision 1",
        r#"meshward_control_applies_total{result="pending_approval"} 1"#,
        "process_resident_memory_bytes ",
        r#"component="control"} 1"#,
    ] {
        assert!(cp_text.contains(series), "no `{series}` in:\n{cp_text}");
    }
    assert!(
        cp_text.contains("meshward_control_push_duration_seconds_count 2"),
        "{cp_text}"
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/meshward.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("meshward_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");
    for name in &queried {
        let exposed = |text: &str| {
            text.lines().any(|l| {
                l.starts_with(&format!("# TYPE {name} "))
                    || l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name} "))
            })
        };
        assert!(
            exposed(&proxy_metrics) || exposed(&cp_text),
            "the dashboard queries `{name}`, which neither exposition has"
        );
    }

    // The proxies show up in `meshward status`, acknowledged.
    let o = env.cli("alice", &["status", "--output", "json"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["proxies"].as_array().unwrap().len(), 2, "{s}");

    // Control plane killed: enforcement continues, both ways.
    Command::new("kill")
        .arg("-9")
        .arg(control.0.id().to_string())
        .status()
        .unwrap();
    let _ = control.0.wait();
    assert_eq!(curl(outbound, "/orders/1").0, "200");
    assert_eq!(curl(outbound, "/secret").0, "403");

    // A proxy restarted while the control plane is down starts from last-known-good.
    drop(orders);
    let orders_admin2 = format!("127.0.0.1:{}", free_port());
    let (_orders2, lines) = env.proxy(
        "orders/orders-api",
        &orders_state,
        None,
        &["--ship-queue", "2", "--admin", &orders_admin2],
    );
    assert!(lines.iter().any(|l| l.contains("inbound")), "{lines:?}");
    let start = Instant::now();
    loop {
        let (code, body) = curl(outbound, "/orders/1");
        if code == "200" {
            assert_eq!(body, "order one");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(curl(outbound, "/secret").0, "403");
    // Decision shipping never blocks traffic: with the control plane away and a queue of
    // two, the rest is dropped and counted.
    for _ in 0..4 {
        assert_eq!(curl(outbound, "/secret").0, "403");
    }
    let m = scrape(&format!("http://{orders_admin2}/metrics"));
    let dropped: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("meshward_decision_ship_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 3, "{m}");
    let log = std::fs::read_to_string(tmp.path().join("orders-decisions.jsonl")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"verdict\":\"deny\"") && l.contains("/secret")),
        "{log}"
    );

    // And when the control plane returns, it reconnects.
    control = start_control(&data, api, proxy_api, cp_metrics);
    let start = Instant::now();
    loop {
        let o = env.cli("alice", &["status", "--output", "json"]);
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if s["proxies"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|x| x["stale"] == false))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(control);
}

const ORDERS_ID: &str = "spiffe://shop.example/ns/orders/sa/orders-api";
const FRONTEND_ID: &str = "spiffe://shop.example/ns/web/sa/frontend";
const ADMIN_ID: &str = "spiffe://shop.example/ns/web/sa/admin";

/// `python3 -m http.server` on `port`, serving `order one` at `/orders/1`.
fn orders_app(www: &Path, port: u16) -> Proc {
    std::fs::create_dir_all(www.join("orders")).unwrap();
    std::fs::write(www.join("orders/1"), "order one").unwrap();
    Proc::new(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// orders-api (its sidecar on `inbound`) behind the `orders/orders` service, callable by
/// the `web` namespace (frontend and admin), with `limits` as the Mesh's
/// `connectionLimits`.
fn limits_repo(app_port: u16, inbound: u16, limits: &str) -> String {
    format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {{name: shop}}
spec:
  trustDomain: shop.example
  connectionLimits: {limits}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: frontend, namespace: web}}
spec: {{}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: admin, namespace: web}}
spec: {{}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec: {{ports: [{{port: {app_port}, protocol: HTTP, inbound: "127.0.0.1:{inbound}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {app_port}}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - name: web-reads-orders
      from: [{{namespaces: [web]}}]
      to: [{{methods: [GET], paths: ["/orders/*"]}}]
"#
    )
}

/// `(status, body)` of a GET on `url` (status `000` when there was no response).
fn get(url: &str) -> (String, String) {
    let o = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (code.to_owned(), body.to_owned())
}

/// Polls `check` every 200 ms until it is `Ok`; fails after `secs` seconds with its last
/// `Err`.
fn eventually(secs: u64, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    while let Err(e) = check() {
        assert!(start.elapsed() < Duration::from_secs(secs), "{e}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `Ok` when `ok`, else `Err(what())`.
fn hold(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// `(status, body)` of a GET on a kept-alive HTTP/1.1 connection.
fn ask(s: &mut std::net::TcpStream, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    let (head, len) = loop {
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            break (p + 4, len);
        }
    };
    while buf.len() < head + len {
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "closed mid-body");
        buf.extend_from_slice(&tmp[..n]);
    }
    let status = String::from_utf8_lossy(&buf[9..12]).parse().unwrap();
    let body = String::from_utf8_lossy(&buf[head..head + len]).into_owned();
    (status, body)
}

/// Idle connections to a sidecar's upstream listener: each becomes one mTLS connection,
/// with that sidecar's identity, to the destination's inbound port.
fn idle_connections(port: u16, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            s
        })
        .collect()
}

/// How many of `conns` the other side has closed.
fn closed(conns: &[std::net::TcpStream]) -> usize {
    use std::io::Read as _;
    conns
        .iter()
        .filter(|s| {
            let mut b = [0u8; 16];
            let mut r: &std::net::TcpStream = s;
            match r.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .count()
}

#[test]
fn one_identity_cannot_take_the_inbound_port_from_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (app_port, inbound, front_out, admin_out) =
        (free_port(), free_port(), free_port(), free_port());
    let _app = orders_app(&tmp.path().join("www"), app_port);
    let m = start_mesh(
        tmp.path(),
        &limits_repo(
            app_port,
            inbound,
            "{perIdentity: 20, total: 200, headerReadTimeout: 60s}",
        ),
        &[ORDERS_ID, FRONTEND_ID, ADMIN_ID],
    );
    let orders_admin = format!("127.0.0.1:{}", free_port());
    let log = tmp.path().join("orders-decisions.jsonl");
    let (mut orders, _) = m.env.proxy(
        "orders/orders-api",
        &tmp.path().join("state-orders"),
        Some(&m.tokens[0]),
        &[
            "--decision-log",
            log.to_str().unwrap(),
            "--admin",
            &orders_admin,
        ],
    );
    let _callers = m.callers(tmp.path(), front_out, admin_out);
    assert_eq!(curl(front_out, "/orders/1").0, "200");
    assert_eq!(curl(admin_out, "/orders/1").0, "200");

    // The frontend identity opens 30 idle mTLS connections: 20 are held, the other 10 are
    // closed right after their handshake.
    let flood = idle_connections(front_out, 30);
    let metrics = format!("http://{orders_admin}/metrics");
    let refused =
        r#"meshward_connections_refused_total{direction="inbound",limit="per_identity"} "#;
    eventually(15, || {
        let n = closed(&flood);
        hold(n == 10, || format!("{n} closed: {}", get(&metrics).1))
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(closed(&flood), 10, "the 20 under the cap stay open");
    let text = get(&metrics).1;
    assert!(text.contains(&format!("{refused}10")), "{text}");
    assert!(
        text.contains(&format!(
            r#"meshward_listener_connections{{listener="inbound 127.0.0.1:{inbound}",state="open"}} 20"#
        )),
        "{text}"
    );
    // Another identity is still served; the flooding one is refused.
    assert_eq!(
        curl(admin_out, "/orders/1"),
        ("200".into(), "order one".into())
    );
    assert_ne!(curl(front_out, "/orders/1").0, "200");
    // The refusals are decisions: reason connection_limit, with the identity.
    eventually(10, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text.lines().any(|l| {
            l.contains(r#""reason":"connection_limit""#)
                && l.contains(FRONTEND_ID)
                && l.contains("this identity holds 20 connections")
        });
        hold(found, || text)
    });
    // A cap is not a failure of the proxy.
    assert_eq!(get(&format!("http://{orders_admin}/ready")).0, "200");

    // The flood ends: the port serves everyone again.
    drop(flood);
    eventually(10, || {
        hold(curl(front_out, "/orders/1").0 == "200", || get(&metrics).1)
    });
    assert_eq!(curl(admin_out, "/orders/1").0, "200");
    assert!(orders.0.try_wait().unwrap().is_none(), "the proxy exited");
}

#[test]
fn out_of_file_descriptors_the_proxy_backs_off_fails_ready_and_recovers() {
    const NOFILE: usize = 64;
    let tmp = tempfile::tempdir().unwrap();
    let (app_port, inbound, front_out) = (free_port(), free_port(), free_port());
    let _app = orders_app(&tmp.path().join("www"), app_port);
    // Caps set high on purpose: the derived default would keep the proxy below its
    // descriptor limit, and this test is about running out of descriptors anyway.
    let m = start_mesh(
        tmp.path(),
        &limits_repo(
            app_port,
            inbound,
            "{perIdentity: 1000, total: 1000, headerReadTimeout: 60s}",
        ),
        &[ORDERS_ID, FRONTEND_ID],
    );
    let orders_admin = format!("127.0.0.1:{}", free_port());
    let nofile = format!("--nofile={NOFILE}:{NOFILE}");
    let (mut orders, _) = m.env.proxy_under(
        &["prlimit", &nofile],
        "orders/orders-api",
        &tmp.path().join("state-orders"),
        Some(&m.tokens[0]),
        &["--admin", &orders_admin],
    );
    let (_frontend, _) = m.env.proxy(
        "web/frontend",
        &tmp.path().join("state-frontend"),
        Some(&m.tokens[1]),
        &[
            "--upstream",
            &format!("127.0.0.1:{front_out}=orders/orders:80"),
        ],
    );
    assert_eq!(curl(front_out, "/orders/1").0, "200");
    // A monitoring connection opened beforehand (kept alive: it needs no new descriptor);
    // probes on new connections are answered too while the spare descriptor lasts.
    let mut probe = std::net::TcpStream::connect(&orders_admin).unwrap();
    assert_eq!(ask(&mut probe, "/ready").0, 200);

    // More idle connections than the proxy has descriptors left.
    let pid = orders.0.id();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(open_fds < NOFILE - 8, "{open_fds} descriptors at rest");
    let flood = idle_connections(front_out, NOFILE - open_fds + 16);
    let mut last = (0, String::new());
    eventually(15, || {
        last = ask(&mut probe, "/ready");
        hold(
            last.0 == 503 && last.1.contains("is not accepting connections"),
            || format!("{last:?}"),
        )
    });
    assert!(
        last.1.contains(&format!("inbound 127.0.0.1:{inbound}"))
            && last.1.contains("Too many open files"),
        "{last:?}"
    );
    assert_eq!(get(&format!("http://{orders_admin}/ready")).0, "503");
    assert!(orders.0.try_wait().unwrap().is_none(), "the proxy exited");
    let metrics = ask(&mut probe, "/metrics").1;
    assert!(
        metrics.contains(r#"meshward_accept_errors_total{kind="emfile"} "#),
        "{metrics}"
    );

    // The connections close: the listener accepts again by itself, and is ready.
    let t0 = Instant::now();
    drop(flood);
    eventually(20, || {
        let r = ask(&mut probe, "/ready");
        hold(
            r.0 == 200 && curl(front_out, "/orders/1").0 == "200",
            || format!("{r:?}"),
        )
    });
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "recovered only by the timeouts"
    );
    assert_eq!(get(&format!("http://{orders_admin}/ready")).0, "200");
    assert!(orders.0.try_wait().unwrap().is_none(), "the proxy exited");
}

#[test]
fn bad_limit_flags_are_refused_together_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args([
            "proxy",
            "--workload",
            "web/frontend",
            "--control",
            "127.0.0.1:1",
        ])
        .arg("--state-dir")
        .arg(tmp.path())
        .args([
            "--max-connections",
            "0",
            "--max-connections-per-identity",
            "2000000",
            "--header-read-timeout",
            "1ms",
            "--idle-timeout",
            "soon",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = out(&o);
    for want in [
        "--max-connections must be between 1 and 1000000, not 0",
        "--max-connections-per-identity must be between 1 and 1000000, not 2000000",
        "--header-read-timeout must be between 100ms and 10m, not `1ms`",
        "--idle-timeout `soon` is not a duration",
    ] {
        assert!(text.contains(want), "no `{want}` in {text}");
    }
}

#[test]
fn every_bad_proxy_flag_is_reported_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    // A real bundle, so that cross-field rules (identity vs trust domain) are reached.
    let data = tmp.path().join("data");
    let _control = start_control(&data, free_port(), free_port(), free_port());
    let o = Command::new(bin())
        .args(["proxy", "--workload", "web", "--control", "127.0.0.1:1"])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--ca-file")
        .arg(data.join("bundle.pem"))
        .args([
            "--upstream",
            "127.0.0.1:9=orders",
            "--admin",
            "nowhere",
            "--max-connections",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = out(&o);
    for want in [
        "problem(s) with the flags",
        "--workload `web`",
        "--upstream `127.0.0.1:9=orders`: the service needs a port",
        "--admin `nowhere` is not ip:port",
        "--max-connections must be between 1 and 1000000, not 0",
    ] {
        assert!(text.contains(want), "no `{want}` in {text}");
    }
    // Every field parses; the cross-field rules then speak, all of them.
    let o = Command::new(bin())
        .args([
            "proxy",
            "--workload",
            "web/frontend",
            "--control",
            "127.0.0.1:1",
        ])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--ca-file")
        .arg(data.join("bundle.pem"))
        .args([
            "--identity",
            "spiffe://other.example/ns/orders/sa/x",
            "--admin",
            "127.0.0.1:18999",
            "--upstream",
            "127.0.0.1:18999=orders/orders:80",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = out(&o);
    for want in [
        "--upstream 127.0.0.1:18999=orders/orders:80 and --admin both listen on 127.0.0.1:18999",
        "is not of the bundle's trust domain `shop.example`",
        "is in namespace `orders`, --workload `web/frontend` in `web`",
    ] {
        assert!(text.contains(want), "no `{want}` in {text}");
    }
}

/// A TCP echo server (python3) on `port`.
fn echo_app(port: u16) -> Proc {
    let script = "import socket,sys,threading\n\
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
s.bind(('127.0.0.1',int(sys.argv[1])));s.listen(64)\n\
def h(c):\n  d=c.recv(65536)\n  while d:\n    c.sendall(d);d=c.recv(65536)\n\
while True:\n  c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n";
    Proc::new(
        Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// One line echoed back through `s`.
fn echoes(s: &mut std::net::TcpStream) -> bool {
    use std::io::{Read as _, Write as _};
    let mut b = [0u8; 5];
    s.write_all(b"ping\n").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping\n"
}

/// The mesh of the containment test: orders-api with an HTTP port (web may GET
/// `/orders/*`), a TCP echo port (web may connect) and `closed.len()` TCP ports nobody may
/// use; anomaly detection quarantines, fast.
fn containment_repo(app: (u16, u16), echo: (u16, u16), closed: &[(u16, u16)]) -> String {
    let mut ports = format!(
        "    - {{port: {}, protocol: HTTP, inbound: \"127.0.0.1:{}\"}}\n    - {{port: {}, protocol: TCP, inbound: \"127.0.0.1:{}\"}}\n",
        app.0, app.1, echo.0, echo.1
    );
    let mut svc = format!(
        "{{port: 80, targetPort: {}}}, {{port: 81, targetPort: {}, protocol: TCP}}",
        app.0, echo.0
    );
    for (i, (p, inb)) in closed.iter().enumerate() {
        ports.push_str(&format!(
            "    - {{port: {p}, protocol: TCP, inbound: \"127.0.0.1:{inb}\"}}\n"
        ));
        svc.push_str(&format!(
            ", {{port: {}, targetPort: {p}, protocol: TCP}}",
            100 + i
        ));
    }
    format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {{name: shop}}
spec:
  trustDomain: shop.example
  anomalyDetection:
    mode: quarantine
    window: 5s
    warmup: 3s
    quarantineAfter: 1s
    quarantineDuration: 30m
    thresholds: {{minSamples: 5, fanOut: 6, newEdges: 4, denyRatio: 0.5}}
    platform: {{namespaces: [platform]}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: frontend, namespace: web}}
spec: {{}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: admin, namespace: web}}
spec: {{}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec:
  ports:
{ports}---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{svc}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - name: web-reads-orders
      from: [{{namespaces: [web]}}]
      to: [{{methods: [GET], paths: ["/orders/*"]}}]
    - name: web-echoes
      from: [{{namespaces: [web]}}]
      to: [{{ports: [{}]}}]
"#,
        echo.0
    )
}

#[test]
fn a_lateral_scan_is_throttled_then_quarantined_and_cut_while_others_see_no_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, app_in, echo, echo_in) = (free_port(), free_port(), free_port(), free_port());
    let closed_ports: Vec<(u16, u16)> = (0..8).map(|_| (free_port(), free_port())).collect();
    let _app = orders_app(&tmp.path().join("www"), app);
    let _echo = echo_app(echo);
    let m = start_mesh(
        tmp.path(),
        &containment_repo((app, app_in), (echo, echo_in), &closed_ports),
        &[ORDERS_ID, FRONTEND_ID, ADMIN_ID],
    );
    let (_orders, _) = m.env.proxy(
        "orders/orders-api",
        &tmp.path().join("state-orders"),
        Some(&m.tokens[0]),
        &[],
    );
    // The compromised frontend: the HTTP and echo services, and the closed ports.
    let up = |local: u16, port: u16| format!("127.0.0.1:{local}=orders/orders:{port}");
    let (f_http, f_echo) = (free_port(), free_port());
    let f_closed: Vec<u16> = closed_ports.iter().map(|_| free_port()).collect();
    let mut args = vec![up(f_http, 80), up(f_echo, 81)];
    for (i, l) in f_closed.iter().enumerate() {
        args.push(up(*l, 100 + i as u16));
    }
    let args: Vec<String> = args
        .into_iter()
        .flat_map(|a| ["--upstream".to_owned(), a])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_frontend, _) = m.env.proxy(
        "web/frontend",
        &tmp.path().join("state-frontend"),
        Some(&m.tokens[1]),
        &args,
    );
    let a_http = free_port();
    let (_admin, _) = m.env.proxy(
        "web/admin",
        &tmp.path().join("state-admin"),
        Some(&m.tokens[2]),
        &["--upstream", &up(a_http, 80)],
    );

    // The other workload calls orders throughout: it must never see an error.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut codes = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                codes.push(curl(a_http, "/orders/1").0);
                std::thread::sleep(Duration::from_millis(50));
            }
            codes
        }
    });
    // Normal behaviour past the warm-up: the frontend reads orders and holds an echo
    // connection open.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", f_echo)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(echoes(&mut held), "the echo connection works");
    for _ in 0..20 {
        assert_eq!(curl(f_http, "/orders/1").0, "200");
        std::thread::sleep(Duration::from_millis(200));
    }
    let quarantine_list = || {
        let o = m.env.cli("alice", &["quarantine", "list", "-o", "json"]);
        assert!(o.status.success(), "{}", out(&o));
        serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap()
    };
    assert!(quarantine_list().is_empty(), "nothing before the scan");
    // No false alarm: three times its usual rate for 10 s.
    for _ in 0..150 {
        assert_eq!(curl(f_http, "/orders/1").0, "200");
        std::thread::sleep(Duration::from_millis(60));
    }
    assert!(quarantine_list().is_empty(), "a 3x burst is no anomaly");

    // The scan: every closed port, over and over (each connection is refused).
    let t0 = Instant::now();
    let mut stages = vec![];
    let quarantined = loop {
        for p in &f_closed {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", *p)) {
                use std::io::Write as _;
                let _ = s.write_all(b"probe\n");
            }
        }
        let list = quarantine_list();
        if let Some(q) = list.iter().find(|q| q["identity"] == FRONTEND_ID) {
            let stage = q["stage"].as_str().unwrap().to_owned();
            if stages.last() != Some(&stage) {
                stages.push(stage.clone());
            }
            if stage == "quarantined" {
                break q.clone();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not quarantined within 20 s: {stages:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        stages.first().map(String::as_str),
        Some("throttled"),
        "throttled first: {stages:?}"
    );
    let signals = quarantined["evidence"]["signals"].to_string();
    assert!(signals.contains("fan_out"), "{quarantined}");
    // Enforced: the held connection is cut, new calls are refused as quarantined.
    eventually(5, || {
        hold(!echoes(&mut held), || {
            "the echo connection is still open".into()
        })
    });
    eventually(5, || {
        let (code, body) = curl(f_http, "/orders/1");
        hold(code == "403" && body.contains("quarantined"), || {
            format!("{code} {body}")
        })
    });
    // The audit has both steps, with the evidence.
    let o = m.env.cli(
        "alice",
        &["audit", "log", "--action", "anomaly.", "--output", "json"],
    );
    let log = out(&o);
    assert!(
        log.contains("anomaly.throttle") && log.contains("anomaly.quarantine"),
        "{log}"
    );

    // Released by platform-security, with a reason: audited; the frontend is served again.
    let o = m.env.cli(
        "alice",
        &[
            "quarantine",
            "release",
            FRONTEND_ID,
            "--reason",
            "INC-9: image rebuilt",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    eventually(10, || {
        let (code, body) = curl(f_http, "/orders/1");
        hold(code == "200", || format!("{code} {body}"))
    });
    let o = m.env.cli(
        "alice",
        &[
            "audit",
            "log",
            "--action",
            "quarantine.release",
            "--output",
            "json",
        ],
    );
    assert!(out(&o).contains("INC-9: image rebuilt"), "{}", out(&o));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes = other.join().unwrap();
    assert!(
        codes.len() > 50,
        "the other workload kept calling: {}",
        codes.len()
    );
    let errors: Vec<&String> = codes.iter().filter(|c| *c != "200").collect();
    assert!(
        errors.is_empty(),
        "the other workload saw errors: {errors:?}"
    );
}

#[test]
fn a_rate_limit_refuses_the_flooding_identity_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let (app_port, inbound, front_out, admin_out) =
        (free_port(), free_port(), free_port(), free_port());
    let _app = orders_app(&tmp.path().join("www"), app_port);
    let repo = limits_repo(app_port, inbound, "{}")
        + r#"---
apiVersion: meshward.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: orders-api, namespace: orders}
spec:
  target: {workloads: [orders-api]}
  limits: [{requestsPerSecond: 1, burst: 3}]
"#;
    let m = start_mesh(tmp.path(), &repo, &[ORDERS_ID, FRONTEND_ID, ADMIN_ID]);
    let log = tmp.path().join("orders-decisions.jsonl");
    let (_orders, _) = m.env.proxy(
        "orders/orders-api",
        &tmp.path().join("state-orders"),
        Some(&m.tokens[0]),
        &["--decision-log", log.to_str().unwrap()],
    );
    let _callers = m.callers(tmp.path(), front_out, admin_out);
    // The frontend floods: its burst of 3 passes, the rest is refused with Retry-After.
    let heads: Vec<String> = (0..10)
        .map(|_| {
            let o = Command::new("curl")
                .args(["-s", "-i", "-m", "5"])
                .arg(format!("http://127.0.0.1:{front_out}/orders/1"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).to_ascii_lowercase()
        })
        .collect();
    let ok = heads
        .iter()
        .filter(|h| h.split(' ').nth(1) == Some("200"))
        .count();
    let limited: Vec<&String> = heads
        .iter()
        .filter(|h| h.split(' ').nth(1) == Some("429"))
        .collect();
    assert!(
        (3..=5).contains(&ok),
        "the burst passes, little more: {heads:#?}"
    );
    assert_eq!(ok + limited.len(), 10, "{heads:#?}");
    for h in &limited {
        assert!(
            h.contains("retry-after: 1") && h.contains("\"rate_limited\""),
            "{h}"
        );
    }
    // The other identity's budget is its own.
    for _ in 0..3 {
        assert_eq!(curl(admin_out, "/orders/1").0, "200");
    }
    eventually(10, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let n = text
            .lines()
            .filter(|l| l.contains(r#""reason":"rate_limited""#) && l.contains(FRONTEND_ID))
            .count();
        hold(n == limited.len(), || {
            format!("{n} rate_limited records: {text}")
        })
    });
}

// ---- Degrading gracefully (docs/operations.md): a hung control plane, restarts, full
// disks on either side, connections that would outlive their certificates. ----

/// A mesh with 1-minute certificates: the orders app and its sidecar (state in
/// `orders_state`), and a frontend sidecar whose upstream `front_out` reaches it.
struct ShortLived {
    m: Mesh,
    _app: Proc,
    orders: Proc,
    front: Proc,
    front_out: u16,
    orders_admin: u16,
    front_admin: u16,
    www: PathBuf,
    app_port: u16,
    inbound: u16,
}

fn short_lived(tmp: &Path, cp_extra: &[&str], orders_state: &Path) -> ShortLived {
    let (app_port, inbound, front_out) = (free_port(), free_port(), free_port());
    let (orders_admin, front_admin) = (free_port(), free_port());
    let www = tmp.join("www");
    let app = keep_alive_app(&www, app_port);
    let repo = limits_repo(app_port, inbound, "{}\n  certificateLifetime: 1m");
    let m = start_mesh_with(tmp, &repo, &[ORDERS_ID, FRONTEND_ID], cp_extra);
    let admin = |p: u16| format!("127.0.0.1:{p}");
    let (orders, _) = m.env.proxy(
        "orders/orders-api",
        orders_state,
        Some(&m.tokens[0]),
        &["--admin", &admin(orders_admin)],
    );
    let upstream = format!("127.0.0.1:{front_out}=orders/orders:80");
    let (front, _) = m.env.proxy(
        "web/frontend",
        &tmp.join("state-frontend"),
        Some(&m.tokens[1]),
        &["--upstream", &upstream, "--admin", &admin(front_admin)],
    );
    eventually(20, || {
        let r = get(&format!("http://127.0.0.1:{front_out}/orders/1"));
        hold(r.0 == "200", || format!("{r:?}"))
    });
    ShortLived {
        m,
        _app: app,
        orders,
        front,
        front_out,
        orders_admin,
        front_admin,
        www,
        app_port,
        inbound,
    }
}

/// [`orders_app`] answering HTTP/1.1 with keep-alive (`http.server` answers HTTP/1.0 and
/// closes after every response unless told otherwise).
fn keep_alive_app(www: &Path, port: u16) -> Proc {
    std::fs::create_dir_all(www.join("orders")).unwrap();
    std::fs::write(www.join("orders/1"), "order one").unwrap();
    let script = "import http.server as h, sys\n\
h.SimpleHTTPRequestHandler.protocol_version = 'HTTP/1.1'\n\
s = h.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), h.SimpleHTTPRequestHandler)\n\
s.serve_forever()\n";
    Proc::new(
        Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .current_dir(www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A value of a proxy's (or control plane's) metric, without labels or with `labels`.
fn metric(port: u16, name: &str) -> f64 {
    let (_, text) = get(&format!("http://127.0.0.1:{port}/metrics"));
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// When a proxy's certificate expires, from its admin `/config`.
fn svid_not_after(admin: u16) -> std::time::SystemTime {
    let (_, body) = get(&format!("http://127.0.0.1:{admin}/config"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    humantime::parse_rfc3339(v["svid_not_after"].as_str().unwrap()).unwrap()
}

/// One HTTP/1.1 request on a kept-alive connection, as a careful client makes it: a
/// connection the server has closed meanwhile is replaced before the request is sent.
/// Returns the status (0: the request was sent and no full response came back), and
/// whether the response said `Connection: close` (the client then drops the connection).
fn keep_alive_get(conn: &mut Option<std::net::TcpStream>, port: u16, reconnects: &mut u32) -> u16 {
    use std::io::{Read as _, Write as _};
    if let Some(s) = conn.as_ref() {
        // Closed by the server while idle (EOF): a careful client notices before reusing.
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let mut r: &std::net::TcpStream = s;
        let gone = match r.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        s.set_nonblocking(false).unwrap();
        if gone {
            *conn = None;
        }
    }
    if conn.is_none() {
        *reconnects += 1;
        *conn = Some(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    let s = conn.as_mut().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if write!(s, "GET /orders/1 HTTP/1.1\r\nHost: orders\r\n\r\n").is_err() {
        *conn = None;
        return 0;
    }
    let mut buf = Vec::new();
    let mut tmp = [0u8; 65536];
    let (head, len) = loop {
        match s.read(&mut tmp) {
            Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => {
                *conn = None;
                return 0;
            }
        }
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            break (head, len);
        }
    };
    let body_start = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    while buf.len() < body_start + len {
        match s.read(&mut tmp) {
            Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => {
                *conn = None;
                return 0;
            }
        }
    }
    let status = head[9..12].parse().unwrap_or(0);
    if head
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"))
    {
        *conn = None;
    }
    status
}

#[test]
fn a_stopped_control_plane_is_noticed_within_15s_and_no_request_fails_while_certificates_are_valid()
{
    let tmp = tempfile::tempdir().unwrap();
    let sl = short_lived(tmp.path(), &[], &tmp.path().join("state-orders"));
    let url = format!("http://127.0.0.1:{}/orders/1", sl.front_out);
    // A kept-alive connection from before the stop.
    let (mut kept, mut reconnects) = (None, 0);
    assert_eq!(
        keep_alive_get(&mut kept, sl.front_out, &mut reconnects),
        200
    );
    sl.m.control.signal("-STOP");
    let stopped = Instant::now();
    // No renewal can happen now: the earlier certificate bounds what must keep working.
    let valid_until = svid_not_after(sl.orders_admin).min(svid_not_after(sl.front_admin));
    let mut noticed = None;
    let mut results = vec![];
    // 60 s, and past the certificates' expiry.
    while stopped.elapsed() < Duration::from_secs(60)
        || std::time::SystemTime::now() < valid_until + Duration::from_secs(4)
    {
        let at = std::time::SystemTime::now();
        let (code, _) = get(&url);
        let kept_code = keep_alive_get(&mut kept, sl.front_out, &mut reconnects);
        results.push((at, code, kept_code));
        if noticed.is_none() && sl.front.stderr().contains("did not answer") {
            noticed = Some(stopped.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    sl.m.control.signal("-CONT");
    let noticed =
        noticed.expect("the frontend's sidecar never said the control plane did not answer");
    eprintln!(
        "the stopped control plane was noticed after {noticed:?}; the sidecar said:\n{}",
        sl.front.stderr()
    );
    assert!(
        noticed <= Duration::from_secs(15),
        "noticed after {noticed:?}"
    );
    assert!(
        metric(sl.front_admin, "meshward_control_errors_total") >= 1.0,
        "{}",
        get(&format!("http://127.0.0.1:{}/metrics", sl.front_admin)).1
    );
    let margin = Duration::from_secs(2);
    let while_valid: Vec<_> = results
        .iter()
        .filter(|(at, ..)| *at + margin < valid_until)
        .collect();
    assert!(while_valid.len() >= 20, "{results:?}");
    let failed: Vec<_> = while_valid
        .iter()
        .filter(|(_, c, k)| c != "200" || *k != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "failed while certificates were valid: {failed:?}"
    );
    // Past the expiry the kept connection was closed, and new ones fail closed.
    let after: Vec<_> = results
        .iter()
        .filter(|(at, ..)| *at > valid_until + margin)
        .collect();
    assert!(!after.is_empty(), "{results:?}");
    assert!(
        after.iter().all(|(_, c, k)| c != "200" && *k != 200),
        "served after the certificates expired: {after:?}"
    );
    // Resumed: renewals and traffic come back by themselves.
    eventually(30, || {
        let r = get(&url);
        hold(r.0 == "200", || format!("{r:?}"))
    });
    let _ = (&sl.orders, &sl.www, sl.app_port, sl.inbound);
}

#[test]
fn ten_control_plane_restarts_cost_the_same_reconnect_time_as_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sl = short_lived(tmp.path(), &[], &tmp.path().join("state-orders"));
    let count = |p: &Proc| p.stderr().matches("enforcing revision").count();
    let mut costs = vec![];
    for _ in 0..10 {
        let before = count(&sl.orders);
        sl.m.control.signal("-KILL");
        let _ = sl.m.control.0.wait();
        sl.m.control = start_control_with(&sl.m.data, sl.m.ports, &[]);
        let up = Instant::now();
        while count(&sl.orders) == before {
            assert!(
                up.elapsed() < Duration::from_secs(15),
                "no reconnect: {}",
                sl.orders.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        costs.push(up.elapsed());
    }
    eprintln!("reconnect after each restart: {costs:?}");
    assert!(
        costs.iter().all(|c| *c <= Duration::from_millis(2500)),
        "{costs:?}"
    );
    assert!(
        costs[9] <= costs[0] + Duration::from_secs(1),
        "the last restart cost more than the first: {costs:?}"
    );
}

/// Mounts a tmpfs of `size` on `dir` (root; the tests run as root in CI).
struct Mount(PathBuf);
impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount (needs root): {}", out(&o));
        Mount(dir.to_owned())
    }

    fn remount(&self, opt: &str) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(o.status.success(), "remount {opt}: {}", out(&o));
    }

    /// Fills it to 0 bytes free with `name`.
    fn fill(&self, name: &str) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![1u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let small = [1u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.write_all(&[1]);
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// A second revision: the frontend may also read `/health`.
fn with_health(app_port: u16, inbound: u16) -> String {
    limits_repo(app_port, inbound, "{}\n  certificateLifetime: 1m").replace(
        r#"paths: ["/orders/*"]"#,
        r#"paths: ["/orders/*", "/health"]"#,
    )
}

#[test]
fn a_full_control_plane_disk_keeps_renewals_going_refuses_changes_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Mount::tmpfs(&tmp.path().join("data"), "24m");
    let sl = short_lived(
        tmp.path(),
        &["--disk-reserve", "4MiB"],
        &tmp.path().join("state-orders"),
    );
    let url = format!("http://127.0.0.1:{}/orders/1", sl.front_out);
    let cp_http = sl.m.ports.2;
    assert_eq!(metric(cp_http, "meshward_control_disk_full"), 0.0);
    disk.fill("filler");
    // A change finds the disk full: refused, with a reason that says so.
    let repo = tmp.path().join("repo2");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("mesh.yaml"), with_health(sl.app_port, sl.inbound)).unwrap();
    let apply = |who: &str| {
        sl.m.env.cli(
            who,
            &[
                "apply",
                "-f",
                repo.to_str().unwrap(),
                "--reason",
                "health checks",
            ],
        )
    };
    let o = apply("alice");
    assert!(!o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("full"), "{}", out(&o));
    // Loud: status, /ready and the metric.
    let o = sl.m.env.cli("alice", &["status"]);
    assert!(
        out(&o).contains("DEGRADED: the data directory"),
        "{}",
        out(&o)
    );
    let (code, ready) = get(&format!("http://127.0.0.1:{cp_http}/ready"));
    assert_eq!(code, "200", "{ready}");
    assert!(ready.contains("degraded: the data directory"), "{ready}");
    assert_eq!(metric(cp_http, "meshward_control_disk_full"), 1.0);
    // Renewals go on for more than a certificate lifetime: every new connection (a new
    // handshake with the current certificates) keeps working.
    let first = (
        svid_not_after(sl.orders_admin),
        svid_not_after(sl.front_admin),
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(70) {
        let r = get(&url);
        assert_eq!(
            r.0,
            "200",
            "after {:?} on a full disk: {r:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(1000));
    }
    let renewed = (
        svid_not_after(sl.orders_admin),
        svid_not_after(sl.front_admin),
    );
    assert!(
        renewed.0 > first.0 && renewed.1 > first.1,
        "{first:?} {renewed:?}"
    );
    // Space freed: the state ends by itself and changes are accepted again.
    std::fs::remove_file(tmp.path().join("data/filler")).unwrap();
    eventually(15, || {
        let v = metric(cp_http, "meshward_control_disk_full");
        hold(v == 0.0, || format!("disk_full {v}"))
    });
    let o = apply("alice");
    assert!(o.status.success(), "{}", out(&o));
    let o = sl.m.env.cli(
        "alice",
        &["audit", "log", "--limit", "100000", "--output", "json"],
    );
    let log = out(&o);
    assert!(log.contains("audit.deferred"), "{log}");
    assert!(log.contains("apply.refused"), "{log}");
    assert!(
        sl.orders.stderr().contains("SVID for"),
        "{}",
        sl.orders.stderr()
    );
}

#[test]
fn a_read_only_then_full_state_directory_keeps_traffic_flowing_and_a_restart_says_which_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state-orders");
    let mount = Mount::tmpfs(&state, "1m");
    let mut sl = short_lived(tmp.path(), &[], &state);
    let url = format!("http://127.0.0.1:{}/orders/1", sl.front_out);
    let (oa, ob) = (sl.orders_admin, sl.m.env.cli("alice", &["status"]));
    assert!(out(&ob).contains("acked"), "{}", out(&ob));
    assert_eq!(metric(oa, "meshward_state_persisted_revision"), 1.0);
    mount.remount("ro");
    let repo = tmp.path().join("repo2");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("mesh.yaml"), with_health(sl.app_port, sl.inbound)).unwrap();
    let o = sl.m.env.cli(
        "alice",
        &["apply", "-f", repo.to_str().unwrap(), "--reason", "health"],
    );
    assert!(out(&o).contains("revision 2"), "{}", out(&o));
    // Enforced, not saved, and said everywhere.
    eventually(10, || {
        let v = metric(oa, "meshward_config_revision");
        hold(v == 2.0, || format!("revision {v}"))
    });
    assert_eq!(metric(oa, "meshward_state_persisted_revision"), 1.0);
    assert!(metric(oa, "meshward_state_persist_failures_total") >= 1.0);
    // (Ready once revision 2's listeners are reconciled, a few ms after it arrives.)
    eventually(5, || {
        let (code, ready) = get(&format!("http://127.0.0.1:{oa}/ready"));
        hold(
            code == "200"
                && ready.contains("a restart without the control plane would enforce revision 1"),
            || format!("{code} {ready}"),
        )
    });
    eventually(10, || {
        let o = sl.m.env.cli("alice", &["status"]);
        hold(out(&o).contains("not saved: revision 2"), || out(&o))
    });
    // Across a renewal (1-minute certificates renew at about 30 s) traffic keeps flowing.
    let start = Instant::now();
    while !sl.orders.stderr().contains("cannot save the svid") {
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "{}",
            sl.orders.stderr()
        );
        let r = get(&url);
        assert_eq!(r.0, "200", "{r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    for _ in 0..5 {
        let r = get(&url);
        assert_eq!(r.0, "200", "after a renewal not saved: {r:?}");
    }
    // Writable again but full: revision 3 is not saved either.
    mount.remount("rw");
    mount.fill("filler");
    std::fs::write(
        repo.join("mesh.yaml"),
        with_health(sl.app_port, sl.inbound).replace("/health", "/healthz"),
    )
    .unwrap();
    let o = sl.m.env.cli(
        "alice",
        &["apply", "-f", repo.to_str().unwrap(), "--reason", "healthz"],
    );
    assert!(out(&o).contains("revision 3"), "{}", out(&o));
    eventually(10, || {
        let e = sl.orders.stderr();
        hold(e.contains("enforcing revision 3 (not saved"), || e)
    });
    // Restarted with the control plane down: the newest saved revision, and it says so.
    drop(std::mem::replace(
        &mut sl.m.control,
        Proc::new(Command::new("true").spawn().unwrap()),
    ));
    drop(std::mem::replace(
        &mut sl.orders,
        Proc::new(Command::new("true").spawn().unwrap()),
    ));
    let (restarted, _) = sl.m.env.proxy(
        "orders/orders-api",
        &state,
        None,
        &["--admin", &format!("127.0.0.1:{oa}")],
    );
    let e = restarted.stderr();
    assert!(
        e.contains("enforcing last-known-good revision 1")
            && e.contains("the newest this proxy saved"),
        "{e}"
    );
    assert_eq!(metric(oa, "meshward_config_revision"), 1.0);
}

#[test]
fn a_keep_alive_connection_is_closed_and_reestablished_around_certificate_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let sl = short_lived(tmp.path(), &[], &tmp.path().join("state-orders"));
    let (mut conn, mut reconnects) = (None, 0u32);
    let mut codes = vec![];
    let start = Instant::now();
    // Past the first certificates' expiry (1 minute), one request a second on one
    // kept-alive connection whenever the server keeps it.
    while start.elapsed() < Duration::from_secs(75) {
        codes.push(keep_alive_get(&mut conn, sl.front_out, &mut reconnects));
        std::thread::sleep(Duration::from_millis(1000));
    }
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    // The first connection ended at the earlier certificate's expiry at the latest, and
    // the client came back with the renewed ones.
    assert!(
        (2..=3).contains(&reconnects),
        "one connection per certificate lifetime, not {reconnects} in 75 s"
    );
    assert!(
        metric(sl.orders_admin, "meshward_connections_expired_total") >= 1.0,
        "{}",
        get(&format!("http://127.0.0.1:{}/metrics", sl.orders_admin)).1
    );
}

#[test]
fn a_control_address_that_hangs_is_passed_over_for_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let (app_port, inbound) = (free_port(), free_port());
    let _app = keep_alive_app(&tmp.path().join("www"), app_port);
    let m = start_mesh(
        tmp.path(),
        &limits_repo(app_port, inbound, "{}"),
        &[ORDERS_ID],
    );
    // Accepts connections (the kernel's backlog) and never answers: a stopped process.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let env = Env {
        proxy_api: format!("{},{}", hung.local_addr().unwrap(), m.env.proxy_api),
        data: m.env.data.clone(),
        api: m.env.api.clone(),
    };
    let start = Instant::now();
    let (p, _) = env.proxy(
        "orders/orders-api",
        &tmp.path().join("state-orders"),
        Some(&m.tokens[0]),
        &[],
    );
    let e = p.stderr();
    assert!(e.contains("did not answer"), "{e}");
    assert!(e.contains("SVID for"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn max_connection_age_ends_kept_alive_connections_without_failing_a_request() {
    let tmp = tempfile::tempdir().unwrap();
    let (app_port, inbound, front_out, admin) =
        (free_port(), free_port(), free_port(), free_port());
    let _app = keep_alive_app(&tmp.path().join("www"), app_port);
    let m = start_mesh(
        tmp.path(),
        &limits_repo(app_port, inbound, "{}"),
        &[ORDERS_ID, FRONTEND_ID],
    );
    let (_orders, _) = m.env.proxy(
        "orders/orders-api",
        &tmp.path().join("state-orders"),
        Some(&m.tokens[0]),
        &[
            "--max-connection-age",
            "6s",
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ],
    );
    let upstream = format!("127.0.0.1:{front_out}=orders/orders:80");
    let (_front, _) = m.env.proxy(
        "web/frontend",
        &tmp.path().join("state-frontend"),
        Some(&m.tokens[1]),
        &["--upstream", &upstream],
    );
    eventually(20, || {
        let r = get(&format!("http://127.0.0.1:{front_out}/orders/1"));
        hold(r.0 == "200", || format!("{r:?}"))
    });
    let (mut conn, mut reconnects) = (None, 0u32);
    let codes: Vec<u16> = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            keep_alive_get(&mut conn, front_out, &mut reconnects)
        })
        .collect();
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    // 10 s of one connection at a time, each living 6 s and told to close (`connection:
    // close`) from 2 s before that: about 4 s each, so three connections.
    assert!(
        (2..=4).contains(&reconnects),
        "{reconnects} connections in 10 s"
    );
    let expired = get(&format!("http://127.0.0.1:{admin}/metrics")).1;
    assert!(
        expired.contains("meshward_connections_expired_total{kind=\"max_age\"}"),
        "{expired}"
    );
}

// ---------------------------------------------------------------------------------------
// Resilience (issue 14): replicas of one service, each an app on its own loopback address
// behind its own sidecar process, called by the frontend's sidecar.

/// A replica app: answers `GET|POST /orders/*` with its name, as its control file (`CTL/NAME`)
/// says: `ok`, `503`, or `slow:SECONDS`; `GET /__stats` answers `requests peak-concurrency`.
fn replica_app(host: &str, port: u16, name: &str, ctl: &Path) -> Proc {
    let script = r#"import http.server as h, sys, os, time, threading
host, port, name, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock(); st = {'n': 0, 'active': 0, 'peak': 0}
class H(h.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a): pass
    def reply(self, code, body):
        b = body.encode()
        self.send_response(code); self.send_header('content-length', str(len(b))); self.end_headers(); self.wfile.write(b)
    def do_GET(self):
        n = int(self.headers.get('content-length') or 0)
        if n: self.rfile.read(n)
        if self.path == '/__stats':
            return self.reply(200, '%d %d' % (st['n'], st['peak']))
        with lock:
            st['n'] += 1; st['active'] += 1; st['peak'] = max(st['peak'], st['active'])
        try:
            try: mode = open(os.path.join(ctl, name)).read().strip()
            except OSError: mode = 'ok'
            if mode.startswith('slow:'): time.sleep(float(mode[5:]))
            if mode == '503': self.reply(503, 'unavailable')
            else: self.reply(200, name)
        finally:
            with lock: st['active'] -= 1
    do_POST = do_GET
s = h.ThreadingHTTPServer((host, port), H); s.daemon_threads = True; s.serve_forever()
"#;
    let p = Proc::new(
        Command::new("python3")
            .args([
                "-c",
                script,
                host,
                &port.to_string(),
                name,
                ctl.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(10, || {
        let r = get(&format!("http://{host}:{port}/__stats"));
        hold(r.0 == "200", || format!("{name}: {r:?}"))
    });
    p
}

/// `(requests, peak concurrency)` a replica app has seen.
fn replica_stats(host: &str, port: u16) -> (u64, u64) {
    let (_, b) = get(&format!("http://{host}:{port}/__stats"));
    let mut it = b.split(' ').map(|x| x.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

struct Replica {
    name: String,
    identity: String,
    host: String,
    app_port: u16,
    inbound: u16,
    state: PathBuf,
    token: PathBuf,
    app: Option<Proc>,
    sidecar: Option<Proc>,
}

struct Replicas {
    m: Mesh,
    ctl: PathBuf,
    replicas: Vec<Replica>,
    front_out: u16,
    front_admin: u16,
    _front: Proc,
    _tmp: tempfile::TempDir,
}

impl Replicas {
    /// Replicas `orders-0…` of `orders/orders` (zones as given, all in region `r1`), and
    /// with `fallback` an `orders-fallback` service of one replica (zone `z-c`); the
    /// frontend runs in `r1/z-a`. `traffic` is the `TrafficPolicy` spec (YAML, indented by
    /// two) for `orders/orders`.
    fn start(zones: &[&str], fallback: bool, traffic: &str) -> Replicas {
        let tmp = tempfile::tempdir().unwrap();
        let ctl = tmp.path().join("ctl");
        std::fs::create_dir_all(&ctl).unwrap();
        let app_port = free_port();
        let mut names: Vec<(String, &str)> = zones
            .iter()
            .enumerate()
            .map(|(i, z)| (format!("orders-{i}"), *z))
            .collect();
        if fallback {
            names.push(("orders-fallback".into(), "z-c"));
        }
        let mut repo = format!(
            "apiVersion: meshward.io/v1alpha1\nkind: Mesh\nmetadata: {{name: shop}}\nspec: {{trustDomain: shop.example}}\n---\n\
apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: frontend, namespace: web}}\nspec: {{locality: {{region: r1, zone: z-a}}}}\n---\n\
apiVersion: meshward.io/v1alpha1\nkind: Service\nmetadata: {{name: orders, namespace: orders}}\nspec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {app_port}}}]}}\n---\n\
apiVersion: meshward.io/v1alpha1\nkind: Service\nmetadata: {{name: orders-fallback, namespace: orders}}\nspec: {{selector: {{app: orders-fallback}}, ports: [{{port: 80, targetPort: {app_port}}}]}}\n---\n\
apiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: orders, namespace: orders}}\nspec:\n  tier: service\n  action: ALLOW\n  target: {{services: [orders, orders-fallback]}}\n  rules: [{{from: [{{namespaces: [web]}}], to: [{{methods: [GET, POST], paths: [\"/orders/*\"]}}]}}]\n---\n\
apiVersion: meshward.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: orders, namespace: orders}}\nspec:\n  target: {{services: [orders]}}\n{traffic}"
        );
        let mut replicas = vec![];
        for (i, (name, zone)) in names.iter().enumerate() {
            let (app, sa) = if name == "orders-fallback" {
                ("orders-fallback", "orders-fallback")
            } else {
                ("orders-api", "orders-api")
            };
            let inbound = free_port();
            repo.push_str(&format!(
                "---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: orders, labels: {{app: {app}}}}}\n\
spec: {{serviceAccount: {sa}, locality: {{region: r1, zone: {zone}}}, ports: [{{port: {app_port}, protocol: HTTP, inbound: \"127.0.0.1:{inbound}\"}}]}}\n"
            ));
            replicas.push((name.clone(), format!("127.0.0.{}", i + 2), inbound, sa));
        }
        let ids: Vec<String> = replicas
            .iter()
            .map(|(_, _, _, sa)| format!("spiffe://shop.example/ns/orders/sa/{sa}"))
            .chain([FRONTEND_ID.to_owned()])
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let m = start_mesh(tmp.path(), &repo, &ids);
        let replicas: Vec<Replica> = replicas
            .into_iter()
            .enumerate()
            .map(|(i, (name, host, inbound, sa))| {
                let app = replica_app(&host, app_port, &name, &ctl);
                let mut r = Replica {
                    identity: format!("spiffe://shop.example/ns/orders/sa/{sa}"),
                    state: tmp.path().join(format!("state-{name}")),
                    token: m.tokens[i].clone(),
                    name,
                    host,
                    app_port,
                    inbound,
                    app: Some(app),
                    sidecar: None,
                };
                r.sidecar = Some(r.start(&m.env, true));
                r
            })
            .collect();
        let (front_out, front_admin) = (free_port(), free_port());
        let upstream = format!("127.0.0.1:{front_out}=orders/orders:80");
        let (front, _) = m.env.proxy(
            "web/frontend",
            &tmp.path().join("state-frontend"),
            Some(&m.tokens[replicas.len()]),
            &[
                "--upstream",
                &upstream,
                "--admin",
                &format!("127.0.0.1:{front_admin}"),
                "--decision-log",
                tmp.path().join("frontend.jsonl").to_str().unwrap(),
            ],
        );
        let r = Replicas {
            m,
            ctl,
            replicas,
            front_out,
            front_admin,
            _front: front,
            _tmp: tmp,
        };
        eventually(20, || {
            let (code, body) = r.get();
            hold(code == "200", || format!("{code} {body}"))
        });
        r
    }

    fn get(&self) -> (String, String) {
        get(&format!("http://127.0.0.1:{}/orders/1", self.front_out))
    }

    fn mode(&self, replica: usize, mode: &str) {
        std::fs::write(self.ctl.join(&self.replicas[replica].name), mode).unwrap();
    }

    /// Requests each replica's app has seen.
    fn counts(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| replica_stats(&r.host, r.app_port).0)
            .collect()
    }

    /// `threads` keep-alive clients, one request after the other for `secs`; the status of
    /// every request.
    fn load(&self, threads: usize, secs: f64, during: impl FnOnce()) -> Vec<u16> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let port = self.front_out;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut conn, mut reconnects, mut codes) = (None, 0, vec![]);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        codes.push(keep_alive_get(&mut conn, port, &mut reconnects));
                    }
                    codes
                })
            })
            .collect();
        during();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    }

    fn endpoints(&self) -> String {
        get(&format!("http://127.0.0.1:{}/endpoints", self.front_admin)).1
    }

    /// The frontend sidecar's decision records with `reason` (it writes them within a
    /// moment: a background thread).
    fn records(&self, reason: &str) -> Vec<serde_json::Value> {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::read_to_string(self._tmp.path().join("frontend.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == reason)
            .collect()
    }
}

impl Replica {
    fn start(&self, env: &Env, join: bool) -> Proc {
        let token = join.then_some(self.token.as_path());
        env.proxy(
            &format!("orders/{}", self.name),
            &self.state,
            token,
            &[
                "--app-host",
                &self.host,
                "--identity",
                &self.identity,
                "--app-probe-interval",
                "300ms",
                "--drain-time",
                "3s",
            ],
        )
        .0
    }
}

const RETRIES: &str = "  timeout: 5s\n  retries: {attempts: 2, retryOn: [connect-failure, reset, gateway-error]}\n  outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 30s}\n";

#[test]
fn a_killed_replica_costs_no_request_with_retries_and_is_ejected() {
    let mut r = Replicas::start(&["z-a", "z-a"], false, RETRIES);
    let mut victim = r.replicas[0].sidecar.take().unwrap();
    let codes = r.load(4, 3.0, move || {
        std::thread::sleep(Duration::from_secs(1));
        victim.signal("-KILL");
        let _ = victim.0.wait();
    });
    let failed: Vec<_> = codes.iter().filter(|c| **c != 200).collect();
    assert!(codes.len() > 40, "{}", codes.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        codes.len()
    );
    let eps = r.endpoints();
    assert!(eps.contains("\"state\":\"ejected\""), "{eps}");
    // Ejected: new requests no longer try it (no retries counted from now on).
    let retries = |r: &Replicas| {
        metric(
            r.front_admin,
            "meshward_outbound_resilience_total{service=\"orders/orders\",event=\"retry\"}",
        )
    };
    let before = retries(&r);
    for _ in 0..20 {
        assert_eq!(r.get().0, "200");
    }
    assert_eq!(retries(&r), before, "{}", r.endpoints());
    // The caller's records name the endpoint that served each retried request and how
    // many attempts it took.
    let live = format!("127.0.0.1:{}", r.replicas[1].inbound);
    let retried = r.records("retried");
    assert!(!retried.is_empty(), "no record of a retried request");
    for rec in &retried {
        assert_eq!(rec["verdict"], "allow", "{rec}");
        assert_eq!(rec["direction"], "outbound", "{rec}");
        assert_eq!(rec["endpoint"], live.as_str(), "{rec}");
        assert_eq!(rec["destination"], "orders/orders-1", "{rec}");
        assert!(rec["attempts"].as_u64().unwrap() >= 2, "{rec}");
        assert_eq!(rec["path"], "/orders/1", "{rec}");
    }
    let _ = (&r.m, &r.replicas[0].inbound);
}

#[test]
fn a_draining_replica_costs_no_request_without_retries() {
    let mut r = Replicas::start(&["z-a", "z-a"], false, "  timeout: 5s\n");
    let victim = r.replicas[0].sidecar.take().unwrap();
    let before = r.counts();
    let admin = r.front_admin;
    let seen = std::sync::Mutex::new(String::new());
    let codes = r.load(4, 3.0, || {
        std::thread::sleep(Duration::from_millis(500));
        // SIGTERM: the sidecar says it is draining, keeps serving 3 s, then exits.
        victim.signal("-TERM");
        eventually(3, || {
            let eps = get(&format!("http://127.0.0.1:{admin}/endpoints")).1;
            let ok = eps.contains("\"not_ready\":\"draining");
            *seen.lock().unwrap() = eps;
            hold(ok, || seen.lock().unwrap().clone())
        });
    });
    let failed: Vec<_> = codes.iter().filter(|c| **c != 200).collect();
    assert!(codes.len() > 40, "{}", codes.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed",
        failed.len(),
        codes.len()
    );
    let drained = r.counts()[0] - before[0];
    eprintln!("the draining replica served {drained} before it was passed over");
    // It exits by itself once drained, and meanwhile got no new traffic.
    let mut victim = victim;
    let t = Instant::now();
    while victim.0.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "still running after its drain time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        victim.stderr().contains("draining for 3s"),
        "{}",
        victim.stderr()
    );
    for _ in 0..10 {
        assert_eq!(r.get(), ("200".into(), "orders-1".into()));
    }
}

#[test]
fn a_replica_whose_app_stops_is_passed_over_until_it_accepts_again() {
    // No retries and no ejection: only readiness moves the traffic.
    let mut r = Replicas::start(
        &["z-a", "z-a"],
        false,
        "  timeout: 5s\n  outlierDetection: {consecutiveErrors: 100000}\n",
    );
    drop(r.replicas[0].app.take());
    eventually(10, || {
        let eps = r.endpoints();
        hold(
            eps.contains("\"state\":\"not_ready\"") && eps.contains("not accepting connections"),
            || eps.clone(),
        )
    });
    for _ in 0..20 {
        assert_eq!(
            r.get(),
            ("200".into(), "orders-1".into()),
            "{}",
            r.endpoints()
        );
    }
    let x = &r.replicas[0];
    r.replicas[0].app = Some(replica_app(&x.host, x.app_port, &x.name, &r.ctl));
    eventually(10, || {
        let eps = r.endpoints();
        hold(!eps.contains("not_ready\":\""), || eps.clone())
    });
    eventually(10, || {
        let (code, body) = r.get();
        hold(code == "200" && body == "orders-0", || {
            format!("{code} {body}")
        })
    });
}

#[test]
fn without_retries_only_requests_in_flight_at_the_kill_fail() {
    let mut r = Replicas::start(
        &["z-a", "z-a"],
        false,
        "  timeout: 5s\n  outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 30s}\n",
    );
    let threads = 4;
    let mut victim = r.replicas[0].sidecar.take().unwrap();
    let codes = r.load(threads, 3.0, move || {
        std::thread::sleep(Duration::from_secs(1));
        victim.signal("-KILL");
        let _ = victim.0.wait();
    });
    let failed = codes.iter().filter(|c| **c != 200).count();
    // At most one request per client was in flight when the replica died; every later
    // request went to the live one (a connect failure is tried elsewhere: nothing was sent).
    assert!(codes.len() > 40, "{}", codes.len());
    assert!(failed <= threads, "{failed} of {} failed", codes.len());
}

#[test]
fn a_slow_replica_gets_little_traffic_within_10s() {
    let r = Replicas::start(&["z-a", "z-a"], false, "  timeout: 5s\n");
    r.mode(1, "slow:0.2");
    let before = r.counts();
    let codes = r.load(4, 10.0, || {});
    let after = r.counts();
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let (fast, slow) = (after[0] - before[0], after[1] - before[1]);
    let share = fast as f64 / (fast + slow) as f64;
    eprintln!(
        "fast replica: {fast} requests, slow: {slow} ({:.1} % fast)",
        share * 100.0
    );
    assert!(share >= 0.8, "fast {fast}, slow {slow}");
}

#[test]
fn every_primary_down_the_fallback_serves_and_traffic_returns() {
    let mut r = Replicas::start(
        &["z-a", "z-b"],
        true,
        "  timeout: 5s\n  outlierDetection: {consecutiveErrors: 1, baseEjectionTime: 2s}\n  fallback: orders/orders-fallback\n",
    );
    assert_ne!(r.get().1, "orders-fallback");
    for i in 0..2 {
        let mut p = r.replicas[i].sidecar.take().unwrap();
        p.signal("-KILL");
        let _ = p.0.wait();
    }
    eventually(10, || {
        let (code, body) = r.get();
        hold(code == "200" && body == "orders-fallback", || {
            format!("{code} {body}")
        })
    });
    assert!(
        metric(
            r.front_admin,
            "meshward_outbound_resilience_total{service=\"orders/orders\",event=\"fallback\"}"
        ) >= 1.0
    );
    // The primaries come back (from their saved state): after their ejection time they
    // are on probation, answer, and have the traffic again.
    for i in 0..2 {
        let p = r.replicas[i].start(&r.m.env, false);
        r.replicas[i].sidecar = Some(p);
    }
    eventually(20, || {
        let (code, body) = r.get();
        hold(
            code == "200" && body.starts_with("orders-") && body != "orders-fallback",
            || format!("{code} {body}: {}", r.endpoints()),
        )
    });
}

#[test]
fn a_total_outage_retries_stay_within_the_budget() {
    let r = Replicas::start(
        &["z-a", "z-a"],
        false,
        "  timeout: 5s\n  retries: {attempts: 3, retryOn: [\"503\"], budgetPercent: 20, minRetriesPerSecond: 1}\n  outlierDetection: {consecutiveErrors: 1000}\n",
    );
    let before: u64 = r.counts().iter().sum();
    r.mode(0, "503");
    r.mode(1, "503");
    let n = 100u64;
    let start = Instant::now();
    let codes: Vec<String> = (0..n).map(|_| r.get().0).collect();
    let secs = start.elapsed().as_secs_f64().min(10.0).ceil();
    let seen: u64 = r.counts().iter().sum::<u64>() - before;
    assert!(codes.iter().all(|c| c == "503"), "{codes:?}");
    // Every request once, plus at most 20 % of them and 1/s over the 10 s window (the
    // budget counts the warm-up request too: +1).
    let cap = n + n / 5 + 10 + 1;
    eprintln!("{n} requests in {secs} s reached the backends {seen} times (cap {cap})");
    assert!(
        seen >= n && seen <= cap,
        "{seen} attempts for {n} requests (cap {cap})"
    );
    assert!(seen > n, "no retry at all: {seen}");
    // Every retried request is on record with its attempts; together they account for
    // every attempt beyond the first (the warm-up request took one).
    let retried = r.records("retried");
    let extra: u64 = retried
        .iter()
        .map(|x| x["attempts"].as_u64().unwrap() - 1)
        .sum();
    assert!(
        retried
            .iter()
            .all(|x| x["detail"].as_str().unwrap().starts_with("answered 503")),
        "{retried:?}"
    );
    assert_eq!(extra, seen - n, "{retried:?}");
}

#[test]
fn a_flood_beyond_the_breaker_is_refused_at_once_and_the_backend_sees_its_cap() {
    let r = Replicas::start(
        &["z-a"],
        false,
        "  timeout: 10s\n  circuitBreaker: {maxRequests: 2}\n",
    );
    r.mode(0, "slow:1");
    let url = format!("http://127.0.0.1:{}/orders/1", r.front_out);
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let (code, body) = get(&url);
                (code, body, t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let open: Vec<_> = results.iter().filter(|(c, ..)| c == "503").collect();
    let ok = results.iter().filter(|(c, ..)| c == "200").count();
    assert!(ok >= 2 && open.len() >= 6, "{results:?}");
    for (_, body, took) in &open {
        assert!(body.contains("circuit_open"), "{body}");
        assert!(*took < Duration::from_millis(900), "refused after {took:?}");
    }
    let (_, peak) = replica_stats(&r.replicas[0].host, r.replicas[0].app_port);
    assert!(peak <= 2, "the backend saw {peak} at once");
    assert!(
        metric(
            r.front_admin,
            "meshward_outbound_resilience_total{service=\"orders/orders\",event=\"circuit_open\"}"
        ) >= 6.0
    );
    // Each refusal is a decision record of the caller's sidecar.
    let refused = r.records("circuit_open");
    assert_eq!(refused.len(), open.len(), "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|x| x["verdict"] == "deny" && x["destination"] == "orders/orders"),
        "{refused:?}"
    );
}

#[test]
fn traffic_stays_in_the_callers_zone_while_it_is_healthy() {
    let mut r = Replicas::start(
        &["z-a", "z-b"],
        false,
        "  timeout: 5s\n  outlierDetection: {consecutiveErrors: 1, baseEjectionTime: 30s}\n",
    );
    let before = r.counts();
    for _ in 0..30 {
        assert_eq!(r.get(), ("200".into(), "orders-0".into()));
    }
    let after = r.counts();
    assert_eq!(after[1], before[1], "the other zone was called");
    let mut p = r.replicas[0].sidecar.take().unwrap();
    p.signal("-KILL");
    let _ = p.0.wait();
    eventually(10, || {
        let (code, body) = r.get();
        hold(code == "200" && body == "orders-1", || {
            format!("{code} {body}")
        })
    });
}
