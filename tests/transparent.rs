#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The end-to-end security suite: hosts in network namespaces, the control plane on its
//! own host, sidecars in transparent mode (`meshward proxy init-netns` + `--transparent`),
//! unmodified apps (`python3 -m http.server`) and clients (curl, `openssl s_client`), and a
//! rogue host without a sidecar. Every case checks what the real client sees and the
//! decision the proxy logged. Runs as root (CI does); see docs/operations.md.

#[path = "support/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime};

use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY, sha256_hex};
use netns::{Host, Net, Proc, must, spawn_until, wait_for, wait_record};
use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshward")
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The control plane on its host, with two platform-security operators.
struct Control {
    host: Host,
    data: PathBuf,
    proc: Option<Proc>,
}

impl Control {
    fn new(host: Host, data: PathBuf) -> Control {
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
        let mut c = Control {
            host,
            data,
            proc: None,
        };
        c.start();
        c
    }

    fn start(&mut self) {
        let mut cmd = self.host.cmd(bin());
        cmd.args([
            "control",
            "--trust-domain",
            "shop.example",
            "--listen",
            &format!("{}:7443", self.host.ip),
            "--proxy-listen",
            &format!("{}:7444", self.host.ip),
            "--http-listen",
            "127.0.0.1:7445",
            "--data",
        ])
        .arg(&self.data);
        self.proc = Some(spawn_until(&mut cmd, "listening").0);
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    fn proxy_api(&self) -> String {
        format!("{}:7444", self.host.ip)
    }

    fn cli(&self, who: &str, args: &[&str]) -> Output {
        self.host
            .cmd(bin())
            .args(args)
            .args(["--server", &format!("{}:7443", self.host.ip), "--ca-file"])
            .arg(self.data.join("bundle.pem"))
            .arg("--token-file")
            .arg(self.data.join(format!("{who}.token")))
            .output()
            .unwrap()
    }

    /// Applies a policy directory (approving it as the second operator if needed) and
    /// returns the new revision.
    fn apply(&self, dir: &Path) -> u64 {
        let o = self.cli(
            "alice",
            &[
                "apply",
                "-f",
                dir.to_str().unwrap(),
                "--reason",
                "test",
                "--output",
                "json",
            ],
        );
        assert!(o.status.success(), "{}", out(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["status"] == "pending_approval" {
            let id = v["proposal"].as_u64().unwrap().to_string();
            let o = self.cli("bob", &["approve", &id, "--output", "json"]);
            assert!(o.status.success(), "{}", out(&o));
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            return v["revision"].as_u64().unwrap();
        }
        v["revision"].as_u64().unwrap()
    }

    fn token(&self, identity: &str, dir: &Path) -> PathBuf {
        let o = self.cli("alice", &["workload", "token", "--identity", identity]);
        assert!(o.status.success(), "{}", out(&o));
        let f = dir.join(format!("{}.jointoken", identity.replace(['/', ':'], "_")));
        std::fs::write(&f, String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        f
    }
}

/// A meshed workload: capture rules, a transparent sidecar, and its state.
struct Sidecar {
    host: Host,
    workload: String,
    state: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Sidecar {
    fn new(
        c: &Control,
        host: Host,
        workload: &str,
        identity: &str,
        tmp: &Path,
        excl: &[&str],
    ) -> Sidecar {
        let mut init = vec!["proxy", "init-netns"];
        init.extend_from_slice(excl);
        let o = host.run(bin(), &init);
        assert!(o.status.success(), "{}", out(&o));
        let name = workload.replace('/', "-");
        let mut s = Sidecar {
            host,
            workload: workload.into(),
            state: tmp.join(format!("state-{name}")),
            log: tmp.join(format!("{name}.decisions.jsonl")),
            proc: None,
        };
        let token = c.token(identity, tmp);
        s.start(c, Some(&token));
        s
    }

    fn start(&mut self, c: &Control, token: Option<&Path>) {
        let mut cmd = self.host.cmd(bin());
        cmd.args([
            "proxy",
            "--transparent",
            "--workload",
            &self.workload,
            "--control",
            &c.proxy_api(),
        ])
        .arg("--ca-file")
        .arg(c.data.join("bundle.pem"))
        .arg("--state-dir")
        .arg(&self.state)
        .arg("--decision-log")
        .arg(&self.log)
        .args(["--sample-allows", "1"]);
        if let Some(t) = token {
            cmd.arg("--join-token-file").arg(t);
        }
        self.proc = Some(spawn_until(&mut cmd, "ready").0);
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// The sidecar's `/config` (admin port, inside its host).
    fn config(&self) -> Value {
        let o = self
            .host
            .run("curl", &["-s", "-m", "2", "http://127.0.0.1:15000/config"]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    fn svid_not_after(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(self.config()["svid_not_after"].as_str()?).ok()
    }

    fn wait_revision(&self, rev: u64) {
        wait_for(20, &format!("{} at revision {rev}", self.workload), || {
            (self.config()["revision"].as_u64() >= Some(rev)).then_some(())
        });
    }
}

fn mesh_yaml(subnet: &str, lifetime: &str, extra_rule: &str) -> String {
    format!(
        r#"apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {{name: shop}}
spec:
  trustDomain: shop.example
  certificateLifetime: {lifetime}
  outboundTraffic: {{mode: ALLOW_LISTED, allowed: ["{subnet}.50:8081"]}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: frontend, namespace: web}}
spec: {{address: {subnet}.10, ports: [{{port: 8080, protocol: HTTP}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders, namespace: orders, labels: {{app: orders}}}}
spec:
  address: {subnet}.11
  ports: [{{port: 8080, protocol: HTTP}}, {{port: 9090, protocol: HTTP}}]
  interception: {{excludeInboundPorts: [2222]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders}}, addresses: ["{subnet}.100"], ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders]}}
  rules:
    - name: frontend-reads-orders
      from: [{{identities: ["spiffe://shop.example/ns/web/sa/frontend"]}}]
      to: [{{methods: [GET], paths: ["/orders/*"]}}]
    - name: frontend-reads-admin
      from: [{{identities: ["spiffe://shop.example/ns/web/sa/frontend"]}}]
      to: [{{ports: [9090]}}]
{extra_rule}"#
    )
}

const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";
const ORDERS: &str = "spiffe://shop.example/ns/orders/sa/orders";

fn www(tmp: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = tmp.join(name);
    for (f, text) in files {
        let p = d.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    d
}

/// A client certificate from a CA the mesh does not trust, with a mesh SPIFFE ID.
fn foreign_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=rogue-ca"];
    ca.extend_from_slice(&ec);
    let (ca_key, ca_pem) = (p("rogue-ca.key"), p("rogue-ca.pem"));
    ca.extend_from_slice(&["-keyout", &ca_key, "-out", &ca_pem]);
    must("openssl", &ca);
    let (key, csr, cert, ext) = (
        p("rogue.key"),
        p("rogue.csr"),
        p("rogue.pem"),
        p("rogue.ext"),
    );
    let mut req = vec!["req", "-subj", "/CN=rogue"];
    req.extend_from_slice(&ec);
    req.extend_from_slice(&["-keyout", &key, "-out", &csr]);
    must("openssl", &req);
    std::fs::write(
        &ext,
        "subjectAltName=URI:spiffe://shop.example/ns/web/sa/frontend\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n",
    )
    .unwrap();
    must(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    );
    (PathBuf::from(key), PathBuf::from(cert))
}

/// `openssl s_client` from `h` to `addr` sending an HTTP request: what came back.
fn s_client(h: &Host, addr: &str, extra: &[&str]) -> String {
    let mut c = h.cmd("openssl");
    c.args(["s_client", "-connect", addr, "-quiet", "-no_ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /orders/1 HTTP/1.0\r\n\r\n");
    }
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out(&child.wait_with_output().unwrap())
}

fn is(v: &Value, k: &str, want: &str) -> bool {
    v[k].as_str() == Some(want)
}

/// The hosts both security tests use — the control plane (`.2`), frontend (`.10`), orders
/// (`.11`) and a rogue host without sidecar (`.50`) — with the mesh applied.
struct Cluster {
    net: Net,
    s: String,
    a: Host,
    b: Host,
    rogue: Host,
    cp: Control,
    repo: PathBuf,
    rev: u64,
}

impl Cluster {
    fn new(t: &Path, subnet: &str) -> Cluster {
        let mut net = Net::new(subnet);
        let s = net.subnet.clone();
        let cp_host = net.host("cp", 2);
        let a = net.host("frontend", 10);
        let b = net.host("orders", 11);
        let rogue = net.host("rogue", 50);
        let cp = Control::new(cp_host, t.join("data"));
        let repo = t.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("mesh.yaml"), mesh_yaml(&s, "1m", "")).unwrap();
        let rev = cp.apply(&repo);
        Cluster {
            net,
            s,
            a,
            b,
            rogue,
            cp,
            repo,
            rev,
        }
    }
}

#[test]
fn transparent_mode_enforces_and_cannot_be_bypassed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let Cluster {
        net,
        s,
        a,
        b,
        rogue,
        mut cp,
        repo,
        rev: rev1,
    } = Cluster::new(t, "10.231.1");

    // Apps: unmodified python http.servers.
    let orders_www = www(
        t,
        "orders-www",
        &[("orders/1", "order one"), ("secret", "top secret")],
    );
    let admin_www = www(t, "admin-www", &[("index.html", "loopback-only admin")]);
    let rogue_www = www(t, "rogue-www", &[("index.html", "outside the mesh")]);
    let _orders_app = b.http_server(&orders_www, "0.0.0.0", 8080);
    let _orders_admin = b.http_server(&admin_www, "127.0.0.1", 9090);
    let _orders_undeclared = b.http_server(&orders_www, "0.0.0.0", 7777);
    let _orders_excluded = b.http_server(&orders_www, "0.0.0.0", 2222);
    let _frontend_app = a.http_server(&orders_www, "0.0.0.0", 8080);
    let _rogue_app = rogue.http_server(&rogue_www, "0.0.0.0", 8080);
    let _rogue_app2 = rogue.http_server(&rogue_www, "0.0.0.0", 8081);

    let mut orders = Sidecar::new(
        &cp,
        b.clone(),
        "orders/orders",
        ORDERS,
        t,
        &["--exclude-inbound-ports", "2222"],
    );
    let frontend = Sidecar::new(&cp, a.clone(), "web/frontend", FRONTEND, t, &[]);
    orders.wait_revision(rev1);
    let b8080 = format!("http://{}.11:8080", s);
    // The exclusions are part of the configuration, and `meshward status` shows them.
    let o = cp.cli("alice", &["status"]);
    assert!(
        out(&o).contains("orders/orders") && out(&o).contains("excluded inbound 2222"),
        "{}",
        out(&o)
    );
    let o = cp.cli("alice", &["status", "--output", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let w = v["interception"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "orders/orders")
        .unwrap()
        .clone();
    assert_eq!(w["exclude_inbound_ports"], serde_json::json!([2222]), "{v}");
    assert_eq!(w["address"], format!("{s}.11"), "{v}");

    // 1. Allowed by identity, method and path, through the service address and directly.
    let (_, code, body) = a.curl(&[&format!("http://{s}.100/orders/1")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "order one"),
        "via the service address"
    );
    let (_, code, body) = a.curl(&[&format!("{b8080}/orders/1")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "order one"),
        "to the workload address"
    );
    let rec = wait_record(&orders.log, "allow /orders/1 from frontend", |v| {
        is(v, "verdict", "allow") && is(v, "path", "/orders/1") && is(v, "source", FRONTEND)
    });
    assert_eq!(rec["reason"], "allowed_by_rule", "{rec}");
    // Denied by path and by method, with the reason.
    let (_, code, body) = a.curl(&[&format!("{b8080}/secret")]);
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("no_allow_at_tier"), "{body}");
    wait_record(&orders.log, "deny /secret", |v| {
        is(v, "verdict", "deny") && is(v, "path", "/secret") && is(v, "source", FRONTEND)
    });
    let (_, code, _) = a.curl(&["-X", "POST", &format!("{b8080}/orders/1")]);
    assert_eq!(code, "403");
    wait_record(&orders.log, "deny POST", |v| {
        is(v, "verdict", "deny") && is(v, "method", "POST")
    });

    // 2. The rogue host (no sidecar) reaches no port of the meshed workload.
    let (exit, code, body) = rogue.curl(&[&format!("{b8080}/orders/1")]);
    assert!(
        exit != 0 && code != "200" && !body.contains("order one"),
        "plaintext got through: {exit} {code} {body}"
    );
    let rec = wait_record(&orders.log, "plaintext refused", |v| {
        is(v, "reason", "handshake_failed")
            && v["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("not TLS"))
    });
    assert!(rec["source"].is_null(), "{rec}");
    let seen = s_client(&rogue, &format!("{s}.11:8080"), &[]);
    assert!(
        !seen.contains("HTTP/1") && !seen.contains("order one"),
        "TLS without a client certificate got through: {seen}"
    );
    wait_record(&orders.log, "no client certificate", |v| {
        v["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("no client certificate"))
    });
    let (key, cert) = foreign_cert(t);
    let seen = s_client(
        &rogue,
        &format!("{s}.11:8080"),
        &[
            "-cert",
            cert.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(
        !seen.contains("HTTP/1") && !seen.contains("order one"),
        "a foreign CA's certificate got through: {seen}"
    );
    wait_record(&orders.log, "unknown CA", |v| {
        v["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("certificate from an unknown CA"))
    });
    for port in [7777, 9090, 15006, 15001] {
        let (exit, code, body) = rogue.curl(&[&format!("http://{s}.11:{port}/")]);
        assert!(
            exit != 0 && code != "200",
            "rogue reached port {port}: {exit} {code} {body}"
        );
    }
    wait_record(&orders.log, "undeclared inbound port 7777", |v| {
        is(v, "reason", "undeclared_port") && v["port"] == 7777 && is(v, "direction", "inbound")
    });
    // An excluded port is exactly that: reached directly, without the sidecar.
    let (_, code, body) = rogue.curl(&[&format!("http://{s}.11:2222/orders/1")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "order one"),
        "excluded inbound port"
    );

    // 3. The meshed workload cannot bypass its sidecar: dialing the peer's address goes
    // through it (policy applies: see 1.), an unlisted port is refused at the source.
    let (exit, code, _) = a.curl(&[&format!("http://{s}.11:7777/orders/1")]);
    assert!(
        exit != 0 && code != "200",
        "unlisted port reached: {exit} {code}"
    );
    wait_record(&frontend.log, "undeclared outbound port", |v| {
        is(v, "reason", "undeclared_port") && is(v, "direction", "outbound") && v["port"] == 7777
    });
    // Outside the mesh: denied unless on the Mesh's allow-list.
    let (exit, code, body) = a.curl(&[&format!("http://{s}.50:8080/")]);
    assert!(
        exit != 0 && !body.contains("outside the mesh"),
        "egress not allowed got through: {exit} {code}"
    );
    let rec = wait_record(&frontend.log, "outside_mesh", |v| {
        is(v, "reason", "outside_mesh")
    });
    assert_eq!(rec["address"], format!("{s}.50:8080"), "{rec}");
    let (_, code, body) = a.curl(&[&format!("http://{s}.50:8081/")]);
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "outside the mesh"),
        "allow-listed egress"
    );
    wait_record(&frontend.log, "allowed_external", |v| {
        is(v, "reason", "allowed_external")
    });
    // A quarantine of the frontend stops what it sends out of the mesh too (its own
    // sidecar refuses it); lifting it restores it.
    let committed = |o: Output| {
        assert!(o.status.success(), "{}", out(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["revision"].as_u64().unwrap()
    };
    let rev = committed(cp.cli(
        "alice",
        &[
            "override",
            "create",
            "contain-frontend",
            "-n",
            "web",
            "--quarantine",
            "--from",
            "spiffe://shop.example/ns/web/sa/frontend",
            "--reason",
            "egress under quarantine",
            "--expires-in",
            "10m",
            "--output",
            "json",
        ],
    ));
    frontend.wait_revision(rev);
    let (exit, code, body) = a.curl(&["-m", "3", &format!("http://{s}.50:8081/")]);
    assert!(
        code != "200" && !body.contains("outside the mesh"),
        "a quarantined workload reached outside the mesh: {exit} {code} {body}"
    );
    wait_record(&frontend.log, "quarantined egress", |v| {
        is(v, "reason", "quarantined") && is(v, "direction", "outbound")
    });
    let rev = committed(cp.cli(
        "alice",
        &[
            "override",
            "revoke",
            "web/contain-frontend",
            "--output",
            "json",
        ],
    ));
    frontend.wait_revision(rev);
    assert_eq!(
        a.curl(&[&format!("http://{s}.50:8081/")]).1,
        "200",
        "egress after release"
    );

    // 4. An app port bound to loopback inside the pod is unreachable from other hosts,
    // even for an allowed peer.
    let (_, code, body) = a.curl(&[&format!("http://{s}.11:9090/")]);
    assert_eq!(code, "502", "loopback-only app: {body}");
    assert!(!body.contains("loopback-only admin"), "{body}");

    // 5. A link cut and restored: traffic recovers.
    net.link(&b, false);
    let (exit, code, _) = a.curl(&["-m", "2", &format!("{b8080}/orders/1")]);
    assert!(exit != 0 && code != "200", "traffic crossed a cut link");
    net.link(&b, true);
    wait_for(20, "traffic after the link came back", || {
        (a.curl(&[&format!("{b8080}/orders/1")]).1 == "200").then_some(())
    });

    // 6. kill -9 of the sidecar: the app is unreachable (never unprotected) until it is back.
    orders.kill9();
    for h in [&a, &rogue] {
        let (exit, code, body) = h.curl(&[&format!("{b8080}/orders/1")]);
        assert!(
            exit != 0 && code != "200" && !body.contains("order one"),
            "reached without a sidecar: {exit} {code} {body}"
        );
    }
    orders.start(&cp, None);
    wait_for(20, "traffic after the sidecar came back", || {
        (a.curl(&[&format!("{b8080}/orders/1")]).1 == "200").then_some(())
    });

    // 7. A policy change pushed, then the control plane killed: enforcement continues
    // under the new revision, denials still deny.
    let (_, code, _) = a.curl(&[&format!("{b8080}/reports/q3")]);
    assert_eq!(code, "403");
    std::fs::write(
        repo.join("mesh.yaml"),
        mesh_yaml(&s, "1m", "    - name: frontend-reads-reports\n      from: [{identities: [\"spiffe://shop.example/ns/web/sa/frontend\"]}]\n      to: [{methods: [GET], paths: [\"/reports/*\"]}]\n"),
    )
    .unwrap();
    let rev2 = cp.apply(&repo);
    orders.wait_revision(rev2);
    cp.kill9();
    let (_, code, _) = a.curl(&[&format!("{b8080}/reports/q3")]);
    assert_eq!(
        code, "404",
        "the app answers (no such file): the new rule is enforced"
    );
    assert_eq!(a.curl(&[&format!("{b8080}/secret")]).1, "403");
    assert_eq!(a.curl(&[&format!("{b8080}/orders/1")]).1, "200");
    // Certificates renew after the control plane returns, without restarting anything.
    let before = orders.svid_not_after().unwrap();
    let before_fe = frontend.svid_not_after().unwrap();
    cp.start();
    wait_for(
        60,
        "both SVIDs renewed after the control plane returned",
        || {
            (orders.svid_not_after()? > before && frontend.svid_not_after()? > before_fe)
                .then_some(())
        },
    );
    assert_eq!(a.curl(&[&format!("{b8080}/orders/1")]).1, "200");
}

#[test]
fn expired_certificates_fail_closed_and_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let Cluster {
        net: _net,
        s,
        a,
        b,
        rogue,
        mut cp,
        rev,
        ..
    } = Cluster::new(t, "10.231.2");
    let orders_www = www(t, "orders-www", &[("orders/1", "order one")]);
    let _app = b.http_server(&orders_www, "0.0.0.0", 8080);
    let orders = Sidecar::new(&cp, b.clone(), "orders/orders", ORDERS, t, &[]);
    let frontend = Sidecar::new(&cp, a.clone(), "web/frontend", FRONTEND, t, &[]);
    orders.wait_revision(rev);
    let url = format!("http://{s}.11:8080/orders/1");
    assert_eq!(a.curl(&[&url]).1, "200");

    // The control plane stays down past both certificates' expiry.
    cp.kill9();
    let latest = orders
        .svid_not_after()
        .unwrap()
        .max(frontend.svid_not_after().unwrap());
    wait_for(90, "both certificates to expire", || {
        (SystemTime::now() > latest + Duration::from_secs(1)).then_some(())
    });
    let expired_at = SystemTime::now();
    // New connections fail closed: no response at all (never plaintext).
    let (exit, code, body) = a.curl(&[&url]);
    assert!(
        exit != 0 && code != "200" && !body.contains("order one"),
        "{exit} {code} {body}"
    );
    let (exit, code, body) = rogue.curl(&[&url]);
    assert!(
        exit != 0 && code != "200" && !body.contains("order one"),
        "{exit} {code} {body}"
    );
    let rec = wait_record(&orders.log, "a refused handshake after expiry", |v| {
        is(v, "reason", "handshake_failed")
            && v["ts"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                .is_some_and(|t| t + Duration::from_secs(1) >= expired_at)
    });
    assert_eq!(rec["verdict"], "deny");
    // The readiness check says why.
    let o = b.run("curl", &["-s", "http://127.0.0.1:15000/ready"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("no valid certificate"),
        "{}",
        out(&o)
    );

    // The control plane returns: the proxies renew their expired SVIDs and traffic recovers
    // without restarting anything.
    cp.start();
    wait_for(60, "traffic after the control plane returned", || {
        (a.curl(&[&url]).1 == "200").then_some(())
    });
    assert!(orders.svid_not_after().unwrap() > SystemTime::now());
}

/// `meshward up --isolated examples/quickstart`, run inside a host of the test's own (so
/// its bridge and namespaces are the test's too): the demo apps' calls to the services'
/// addresses are captured by their sidecars, allowed and denied by policy; a client outside
/// the mesh cannot reach a workload; Ctrl-C removes everything.
#[test]
fn up_isolated_runs_the_quickstart_in_namespaces() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let mut net = Net::new("10.231.3");
    let _ = &mut net;
    let node = net.host("node", 2);
    let dir = tmp.path().join("quickstart");
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    std::fs::copy(src.join("mesh.yaml"), dir.join("mesh.yaml")).unwrap();
    for f in ["mesh.yaml", "policies.yaml", "traffic.yaml"] {
        std::fs::copy(src.join("policies").join(f), dir.join("policies").join(f)).unwrap();
    }
    // `mwt-PID…` like the harness's own namespaces, so a crashed run's are cleaned up too.
    let bridge = format!("mwt-{}u", std::process::id());
    let mut up = Proc(
        node.cmd(bin())
            .args([
                "up",
                "--isolated",
                "--subnet",
                "10.232.0.0/24",
                "--bridge",
                &bridge,
            ])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut reader = BufReader::new(up.0.stdout.take().unwrap());
    let mut lines: Vec<String> = vec![];
    let start = std::time::Instant::now();
    let (mut allowed, mut denied) = (false, false);
    while !(allowed && denied) {
        let mut l = String::new();
        assert!(
            reader.read_line(&mut l).unwrap() > 0,
            "`meshward up --isolated` exited: {lines:#?}"
        );
        allowed |= l.starts_with("[web/frontend] GET http://10.96.0.11:80/orders -> 200");
        denied |= l.starts_with("[web/frontend] POST http://10.96.0.12:80/charge -> 403");
        lines.push(l.trim_end().to_owned());
        assert!(start.elapsed() < Duration::from_secs(90), "{lines:#?}");
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with("payments/payments-0 "))
        .unwrap();
    assert!(
        row.contains("10.232.0.12:18082") && row.contains(&format!("{bridge}-payments-payments-0")),
        "{row}"
    );
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    // The denial is in the decision log of the payments replica that took the call, with
    // the caller's identity.
    wait_for(60, "frontend denied at a payments replica", || {
        ["payments-payments-0", "payments-payments-1"]
            .iter()
            .find_map(|r| {
                let log = dir.join(format!(".meshward/proxies/{r}/decisions.jsonl"));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                text.lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|v| {
                        is(v, "verdict", "deny")
                            && is(v, "source", FRONTEND)
                            && is(v, "path", "/charge")
                    })
            })
    });
    // From the node itself (no sidecar), a workload is unreachable, even on its app port.
    let (exit, code, body) = node.curl(&["http://10.232.0.12:18082/charge", "-X", "POST"]);
    assert!(exit != 0 && code != "200", "{exit} {code} {body}");
    // Ctrl-C stops it and removes the namespaces and the bridge.
    must("kill", &["-INT", &up.0.id().to_string()]);
    let status = wait_for(20, "`meshward up` to stop", || up.0.try_wait().unwrap());
    assert!(status.success(), "{status}");
    let left = String::from_utf8_lossy(&netns::run("ip", &["netns", "list"]).stdout).into_owned();
    assert!(
        !left.contains(&format!("{bridge}-")),
        "namespaces left behind: {left}"
    );
    let o = node.run("ip", &["link", "show", &bridge]);
    assert!(!o.status.success(), "the bridge was left behind");
}
