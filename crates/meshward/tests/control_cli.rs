#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `meshward control` as a real process, driven by the real CLI over TLS: apply with
//! approval and permissions, history and rollback, join tokens and SVIDs checked by
//! `openssl verify`, overrides that expire by themselves, the audit chain under tampering,
//! and `kill -9` in the middle of applies.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY, sha256_hex};
use meshward_identity::ca::new_workload_key;
use meshward_identity::{SpiffeId, TrustDomain};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshward")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies")
}

struct Control {
    child: Child,
    dir: PathBuf,
    addr: String,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_operators(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let op = |name: &str, roles: &[&str], ns: &[&str]| Operator {
        name: name.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        token_sha256: vec![sha256_hex(&format!("token-of-{name}"))],
    };
    let ops = Operators {
        operators: vec![
            op("alice", &[PLATFORM_SECURITY], &[]),
            op("bob", &[PLATFORM_SECURITY], &[]),
            op("carol", &[], &["payments"]),
        ],
    };
    std::fs::write(
        dir.join("operators.json"),
        serde_json::to_string(&ops).unwrap(),
    )
    .unwrap();
    for n in ["alice", "bob", "carol"] {
        std::fs::write(dir.join(format!("{n}.token")), format!("token-of-{n}")).unwrap();
    }
}

impl Control {
    fn start(dir: &Path) -> Control {
        let mut child = Command::new(bin())
            .args([
                "control",
                "--trust-domain",
                "shop.example",
                "--listen",
                "127.0.0.1:0",
                "--proxy-listen",
                "127.0.0.1:0",
                "--controller-interval",
                "1s",
                "--http-listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        reader.read_line(&mut line).unwrap();
        // Keep reading, so the server never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let addr = line
            .trim()
            .strip_prefix("meshward control listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Control {
            child,
            dir: dir.to_owned(),
            addr,
        }
    }

    fn cli(&self, who: &str, args: &[&str]) -> Output {
        let mut c = Command::new(bin());
        c.args(args)
            .arg("--server")
            .arg(&self.addr)
            .arg("--ca-file")
            .arg(self.dir.join("bundle.pem"));
        if !who.is_empty() {
            c.arg("--token-file")
                .arg(self.dir.join(format!("{who}.token")));
        }
        c.output().unwrap()
    }

    fn kill9(&mut self) {
        Command::new("kill")
            .arg("-9")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        let _ = self.child.wait();
    }
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn seeded(dir: &Path) -> Control {
    write_operators(dir);
    let c = Control::start(dir);
    let o = c.cli(
        "alice",
        &[
            "apply",
            "-f",
            examples().to_str().unwrap(),
            "--reason",
            "initial",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("pending approval: change 1"),
        "{}",
        out(&o)
    );
    let o = c.cli("bob", &["approve", "1"]);
    assert!(out(&o).contains("approved: revision 1"), "{}", out(&o));
    c
}

fn copy_examples(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(examples()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn variant(base: &Path, name: &str, extra_ns: &str) -> PathBuf {
    let d = base.join(name);
    copy_examples(&d);
    let f = d.join("domain-payments.yaml");
    let s = std::fs::read_to_string(&f).unwrap();
    std::fs::write(
        &f,
        s.replace(
            "namespaces: [orders, payments, platform]",
            &format!("namespaces: [orders, payments, platform, {extra_ns}]"),
        ),
    )
    .unwrap();
    d
}

#[test]
fn apply_approve_history_rollback_with_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    write_operators(&dir);
    let c = Control::start(&dir);
    let o = c.cli(
        "alice",
        &[
            "apply",
            "-f",
            examples().to_str().unwrap(),
            "--reason",
            "initial",
        ],
    );
    assert!(
        out(&o).contains("pending approval: change 1"),
        "{}",
        out(&o)
    );
    // Kinds that are accepted but not enforced yet are named.
    assert!(
        out(&o).contains("warning: 1 resource(s) have no effect yet")
            && out(&o).contains("TrustDomainFederation meshward-system/partner")
            && !out(&o).contains("FaultInjection")
            && !out(&o).contains("TrafficPolicy orders/orders")
            && !out(&o).contains("RateLimitPolicy"),
        "{}",
        out(&o)
    );
    // Pending changes can be listed: who proposed what, waiting for whom.
    let o = c.cli("bob", &["proposals"]);
    let text = out(&o);
    assert!(
        o.status.success()
            && text.contains("WAITING FOR")
            && text.contains("alice")
            && text.contains("a platform-security operator other than `alice`")
            && text.contains("+AuthorizationPolicy"),
        "{text}"
    );
    let o = c.cli("bob", &["proposals", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["id"], 1);
    assert_eq!(v[0]["author"], "alice");
    assert_eq!(v[0]["reason"], "initial");
    assert_eq!(v[0]["stale"], false);
    assert!(
        v[0].get("files").is_none(),
        "proposals are listed without their files"
    );
    let o = c.cli("alice", &["approve", "1"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        out(&o).contains("refused (403): `alice` proposed change 1 and cannot also approve it"),
        "{}",
        out(&o)
    );
    let o = c.cli("bob", &["approve", "1"]);
    assert!(out(&o).contains("approved: revision 1"), "{}", out(&o));
    // carol may change her namespace...
    let web = variant(tmp.path(), "v-web", "web");
    let o = c.cli(
        "carol",
        &[
            "apply",
            "-f",
            web.to_str().unwrap(),
            "--reason",
            "let web in",
        ],
    );
    assert!(
        out(&o).contains("applied: revision 2 (~AuthorizationPolicy payments/payments-callers)"),
        "{}\n{}",
        out(&o),
        out(&c.cli("alice", &["history"]))
    );
    // ... but not a baseline policy; the store stays as it was.
    let base = tmp.path().join("v-base");
    copy_examples(&base);
    let f = base.join("baseline.yaml");
    std::fs::write(
        &f,
        std::fs::read_to_string(&f).unwrap().replace(
            "notNamespaces: [platform]",
            "notNamespaces: [platform, payments]",
        ),
    )
    .unwrap();
    let o = c.cli(
        "carol",
        &["apply", "-f", base.to_str().unwrap(), "--reason", "x"],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(
        out(&o).contains("refused (403)") && out(&o).contains("platform-security"),
        "{}",
        out(&o)
    );
    // An invalid set is refused with the lint diagnostics.
    let bad = tmp.path().join("v-bad");
    copy_examples(&bad);
    let f = bad.join("domain-payments.yaml");
    std::fs::write(
        &f,
        std::fs::read_to_string(&f).unwrap().replace(
            "namespaces: [orders, payments, platform]",
            "namespacs: [orders, payments, platform]",
        ),
    )
    .unwrap();
    let o = c.cli(
        "carol",
        &["apply", "-f", bad.to_str().unwrap(), "--reason", "x"],
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(
        out(&o).contains("refused (422)")
            && out(&o).contains("error[MW102]: unknown field `namespacs`"),
        "{}",
        out(&o)
    );
    // A set that does not even parse: refused (exit 1) with lint's diagnostics, and with
    // `--output json` the refusal and its diagnostics on stdout.
    let broken = tmp.path().join("v-broken");
    copy_examples(&broken);
    let f = broken.join("domain-payments.yaml");
    std::fs::write(
        &f,
        std::fs::read_to_string(&f)
            .unwrap()
            .replace("tier: domain", "tier: [domain"),
    )
    .unwrap();
    let o = c.cli(
        "carol",
        &["apply", "-f", broken.to_str().unwrap(), "--reason", "x"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", out(&o));
    assert!(
        out(&o).contains("refused (422)")
            && out(&o).contains("error[MW101]")
            && out(&o).contains("domain-payments.yaml"),
        "{}",
        out(&o)
    );
    let o = c.cli(
        "carol",
        &[
            "apply",
            "-f",
            broken.to_str().unwrap(),
            "--reason",
            "x",
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "refused");
    assert_eq!(v["code"], "invalid");
    assert_eq!(v["http_status"], 422);
    assert!(
        v["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["code"] == "MW101" && d["file"] == "domain-payments.yaml"),
        "{v}"
    );
    // A change without a reason is refused.
    let o = c.cli("carol", &["apply", "-f", web.to_str().unwrap()]);
    assert!(
        o.status.code() == Some(4) && out(&o).contains("needs a reason"),
        "{}",
        out(&o)
    );
    // History and rollback.
    let o = c.cli("alice", &["history", "--output", "json"]);
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 2);
    assert_eq!(h[0]["author"], "operator:carol");
    assert_eq!(h[1]["author"], "operator:alice");
    let o = c.cli("alice", &["rollback", "--to", "1", "--reason", "revert"]);
    assert!(
        out(&o).contains("rolled back: revision 3 restores revision 1"),
        "{}",
        out(&o)
    );
    let o = c.cli("alice", &["history"]);
    assert!(out(&o).contains("rollback to 1"), "{}", out(&o));
    let o = c.cli("alice", &["audit", "verify"]);
    assert!(
        o.status.success() && out(&o).contains("audit log intact"),
        "{}",
        out(&o)
    );
    let o = c.cli(
        "alice",
        &[
            "audit",
            "log",
            "--action",
            "apply.rejected",
            "--output",
            "json",
        ],
    );
    let rejected: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rejected.as_array().unwrap().len() >= 2, "{rejected}");
    // No credentials: refused.
    let o = c.cli("", &["history"]);
    assert!(out(&o).contains("refused (401)"), "{}", out(&o));
}

#[test]
fn join_token_gets_an_svid_that_openssl_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let c = seeded(&dir);
    let who = "spiffe://shop.example/ns/web/sa/frontend";
    let o = c.cli(
        "alice",
        &["workload", "token", "--identity", who, "--ttl", "5m"],
    );
    assert!(o.status.success(), "{}", out(&o));
    let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let id = SpiffeId::parse(who).unwrap();
    let (_key, csr) = new_workload_key(&id).unwrap();
    let bundle = meshward_identity::ca::certs_from_pem(
        &std::fs::read_to_string(dir.join("bundle.pem")).unwrap(),
    );
    let client = meshward_control::client::Client::new(
        &c.addr,
        &TrustDomain::parse("shop.example").unwrap(),
        bundle,
        None,
        None,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = serde_json::json!({"token": token, "csr": base64::engine::general_purpose::STANDARD.encode(&csr)});
    let v = rt
        .block_on(client.call("POST", "/v1/svid", Some(&body)))
        .unwrap();
    assert_eq!(v["spiffe_id"], who);
    let chain = v["chain"].as_array().unwrap();
    std::fs::write(tmp.path().join("leaf.pem"), chain[0].as_str().unwrap()).unwrap();
    std::fs::write(tmp.path().join("inter.pem"), chain[1].as_str().unwrap()).unwrap();
    let o = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg("-untrusted")
        .arg(tmp.path().join("inter.pem"))
        .arg(tmp.path().join("leaf.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    // The token is spent.
    let e = rt
        .block_on(client.call("POST", "/v1/svid", Some(&body)))
        .unwrap_err();
    assert!(e.to_string().contains("already used"), "{e}");
    let o = c.cli(
        "alice",
        &["audit", "log", "--action", "token", "--output", "json"],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let actions: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["token.issue", "token.use", "token.refused"]);
}

#[test]
fn overrides_expire_by_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let c = seeded(&tmp.path().join("data"));
    let o = c.cli(
        "carol",
        &[
            "override",
            "create",
            "hotfix",
            "-n",
            "payments",
            "--deny",
            "--from",
            "spiffe://shop.example/ns/payments/sa/reporting",
            "--reason",
            "leaking reports",
            "--ticket",
            "INC-9",
            "--expires-in",
            "3s",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("override payments/hotfix in force until"),
        "{}",
        out(&o)
    );
    assert!(out(&c.cli("carol", &["override", "list"])).contains("payments/hotfix"));
    // -n NAMESPACE filters the list; -o yaml is the same document as -o json.
    assert!(
        out(&c.cli("carol", &["override", "list", "-n", "payments"])).contains("payments/hotfix")
    );
    assert!(out(&c.cli("carol", &["override", "list", "-n", "web"])).contains("no overrides"));
    let yaml = c.cli(
        "carol",
        &["override", "list", "-n", "payments", "-o", "yaml"],
    );
    let yaml = String::from_utf8_lossy(&yaml.stdout).into_owned();
    assert!(
        yaml.starts_with("---\n") && yaml.contains("override: payments/hotfix"),
        "{yaml}"
    );
    let start = Instant::now();
    loop {
        if !out(&c.cli("carol", &["override", "list"])).contains("payments/hotfix") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the override did not expire"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = c.cli(
        "alice",
        &[
            "audit",
            "log",
            "--action",
            "override.expire",
            "--output",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // (The seeded example override may have expired as well, depending on today's date.)
    let e = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == "payments/hotfix")
        .unwrap_or_else(|| panic!("no override.expire entry for payments/hotfix: {v}"));
    assert_eq!(e["actor"], "controller");
    // Overrides without an expiry cannot be made: the CLI requires --expires-in.
    let o = c.cli(
        "carol",
        &[
            "override", "create", "x", "-n", "payments", "--deny", "--reason", "r",
        ],
    );
    assert!(!o.status.success());
}

#[test]
fn audit_tampering_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut c = seeded(&dir);
    for _ in 0..3 {
        c.cli(
            "alice",
            &[
                "workload",
                "token",
                "--identity",
                "spiffe://shop.example/ns/web/sa/frontend",
            ],
        );
    }
    c.kill9();
    let verify = || {
        Command::new(bin())
            .args(["audit", "verify", "--data"])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let o = verify();
    assert!(o.status.success(), "{}", out(&o));
    let db = rusqlite::Connection::open(dir.join("meshward.db")).unwrap();
    db.execute(
        "UPDATE audit SET actor = 'operator:mallory' WHERE seq = 4",
        [],
    )
    .unwrap();
    let o = verify();
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("entry 4 was edited"), "{}", out(&o));
}

#[test]
fn kill_9_during_applies_leaves_a_whole_revision_and_an_intact_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut c = seeded(&dir);
    let a = variant(tmp.path(), "a", "web");
    let b = variant(tmp.path(), "b", "acme");
    let sets = [
        std::fs::read_to_string(a.join("domain-payments.yaml")).unwrap(),
        std::fs::read_to_string(b.join("domain-payments.yaml")).unwrap(),
        std::fs::read_to_string(examples().join("domain-payments.yaml")).unwrap(),
    ];
    for round in 0..3 {
        // Applies in a tight loop from another thread; kill -9 the server in the middle.
        let (addr, ca) = (c.addr.clone(), dir.join("bundle.pem"));
        let (a, b, tokf) = (a.clone(), b.clone(), dir.join("carol.token"));
        let applier = std::thread::spawn(move || {
            for i in 0..40 {
                let d = if i % 2 == 0 { &a } else { &b };
                let o = Command::new(bin())
                    .args(["apply", "--reason", "flip", "-f"])
                    .arg(d)
                    .arg("--server")
                    .arg(&addr)
                    .arg("--ca-file")
                    .arg(&ca)
                    .arg("--token-file")
                    .arg(&tokf)
                    .output()
                    .unwrap();
                if !o.status.success() {
                    return i;
                }
            }
            40
        });
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        c.kill9();
        let applied = applier.join().unwrap();
        assert!(
            applied < 40,
            "the server was killed too late to test anything"
        );
        // The store holds whole revisions only, and the chain is intact.
        let o = Command::new(bin())
            .args(["audit", "verify", "--data"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "round {round}: {}", out(&o));
        c = Control::start(&dir);
        let o = c.cli("alice", &["history", "--output", "json"]);
        let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let head = h[0]["rev"].as_u64().unwrap();
        let o = c.cli(
            "alice",
            &["audit", "log", "--action", "apply", "--output", "json"],
        );
        assert!(o.status.success());
        let db = rusqlite::Connection::open(dir.join("meshward.db")).unwrap();
        let files: String = db
            .query_row("SELECT files FROM revisions WHERE rev = ?1", [head], |r| {
                r.get(0)
            })
            .unwrap();
        let files: Vec<(String, String)> = serde_json::from_str(&files).unwrap();
        let dp = files
            .iter()
            .find(|(n, _)| n == "domain-payments.yaml")
            .unwrap();
        assert!(
            sets.contains(&dp.1),
            "round {round}: head revision {head} is not one of the applied sets"
        );
        // Every committed revision has exactly one audit entry naming it.
        let revs: i64 = db
            .query_row("SELECT COUNT(*) FROM revisions", [], |r| r.get(0))
            .unwrap();
        let entries: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM audit WHERE action IN ('apply', 'apply.approved')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(revs, entries, "round {round}");
    }
}

#[test]
fn a_new_user_bootstraps_with_the_admin_token_and_adds_a_second_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let c = Control::start(&dir);
    assert!(
        dir.join("admin.token").exists(),
        "first start writes the admin token"
    );
    let o = Command::new(bin())
        .args([
            "operator",
            "add",
            "bob",
            "--role",
            "platform-security",
            "--data",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("bob.token"), "{}", out(&o));
    let o = Command::new(bin())
        .args(["operator", "add", "bob", "--data"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out(&o).contains("already exists"), "{}", out(&o));
    let o = c.cli(
        "admin",
        &[
            "apply",
            "-f",
            examples().to_str().unwrap(),
            "--reason",
            "initial",
        ],
    );
    assert!(
        out(&o).contains("pending approval: change 1"),
        "{}",
        out(&o)
    );
    // The running server picked bob up without a restart.
    let o = c.cli("bob", &["approve", "1"]);
    assert!(out(&o).contains("approved: revision 1"), "{}", out(&o));
    let o = c.cli("admin", &["status"]);
    assert!(
        out(&o).contains("revision 1, trust domain shop.example"),
        "{}",
        out(&o)
    );
}

#[test]
fn root_rotation_in_two_steps_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut c = seeded(&dir);
    let o = c.cli("alice", &["ca", "rotate", "--root"]);
    assert!(
        o.status.success() && out(&o).contains("the new root is in the bundle"),
        "{}",
        out(&o)
    );
    let o = c.cli("alice", &["ca", "rotate", "--root"]);
    assert!(out(&o).contains("already in progress"), "{}", out(&o));
    let o = c.cli("carol", &["ca", "rotate", "--root", "--finish"]);
    assert!(out(&o).contains("refused (403)"), "{}", out(&o));
    // A restart in the middle keeps the rotation.
    c.kill9();
    c = Control::start(&dir);
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).unwrap();
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        2,
        "both roots are trusted during the overlap"
    );
    let o = c.cli("alice", &["ca", "rotate", "--root", "--finish"]);
    assert!(o.status.success(), "{}", out(&o));
    let o = c.cli("alice", &["ca", "rotate", "--root", "--finish"]);
    assert!(
        out(&o).contains("no root rotation is in progress"),
        "{}",
        out(&o)
    );
    // New certificates chain to the new root; both roots stay in the bundle.
    let o = c.cli(
        "alice",
        &[
            "workload",
            "token",
            "--identity",
            "spiffe://shop.example/ns/web/sa/frontend",
        ],
    );
    let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let id = SpiffeId::parse("spiffe://shop.example/ns/web/sa/frontend").unwrap();
    let (_key, csr) = new_workload_key(&id).unwrap();
    let roots = meshward_identity::ca::certs_from_pem(&bundle);
    let client = meshward_control::client::Client::new(
        &c.addr,
        &TrustDomain::parse("shop.example").unwrap(),
        roots,
        None,
        None,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let v = rt.block_on(client.call("POST", "/v1/svid", Some(&serde_json::json!({"token": token, "csr": base64::engine::general_purpose::STANDARD.encode(&csr)})))).unwrap();
    let new_root = std::fs::read_to_string(dir.join("ca/root.pem")).unwrap();
    std::fs::write(tmp.path().join("new-root.pem"), &new_root).unwrap();
    std::fs::write(tmp.path().join("leaf.pem"), v["chain"][0].as_str().unwrap()).unwrap();
    std::fs::write(
        tmp.path().join("inter.pem"),
        v["chain"][1].as_str().unwrap(),
    )
    .unwrap();
    let o = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(tmp.path().join("new-root.pem"))
        .arg("-untrusted")
        .arg(tmp.path().join("inter.pem"))
        .arg(tmp.path().join("leaf.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(v["bundle"].as_array().unwrap().len(), 2);
    let o = c.cli(
        "alice",
        &["audit", "log", "--action", "ca.", "--output", "json"],
    );
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let actions: Vec<&str> = a
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["ca.rotate-root.begin", "ca.rotate-root.finish"]);
}

#[test]
fn operators_may_authenticate_with_a_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let c = seeded(&dir);
    // An operator certificate `spiffe://TD/operator/NAME` from the mesh CA.
    let ca = meshward_identity::ca::Ca::load(
        &dir.join("ca"),
        TrustDomain::parse("shop.example").unwrap(),
        Default::default(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let cert = |name: &str| {
        let id = SpiffeId::parse(&format!("spiffe://shop.example/operator/{name}")).unwrap();
        let (key, csr) = new_workload_key(&id).unwrap();
        let issued = ca
            .issue(
                &id,
                &csr,
                Duration::from_secs(600),
                std::time::SystemTime::now(),
            )
            .unwrap();
        (
            issued.chain,
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )),
        )
    };
    let bundle = meshward_identity::ca::certs_from_pem(
        &std::fs::read_to_string(dir.join("bundle.pem")).unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let td = TrustDomain::parse("shop.example").unwrap();
    let alice = meshward_control::client::Client::new(
        &c.addr,
        &td,
        bundle.clone(),
        None,
        Some(cert("alice")),
    )
    .unwrap();
    let h = rt.block_on(alice.call("GET", "/v1/history", None)).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 1);
    // A valid certificate of someone who is not an operator is refused.
    let mallory =
        meshward_control::client::Client::new(&c.addr, &td, bundle, None, Some(cert("mallory")))
            .unwrap();
    let e = rt
        .block_on(mallory.call("GET", "/v1/history", None))
        .unwrap_err();
    assert!(e.to_string().contains("is not an operator"), "{e}");
}

/// A proxy that cannot reach its control plane for about two seconds, its stderr.
fn proxy_logs(ca: &Path, state: &Path, args: &[&str], rust_log: &str) -> String {
    let mut c = Command::new(bin());
    c.args([
        "proxy",
        "--workload",
        "web/frontend",
        "--identity",
        "spiffe://shop.example/ns/web/sa/frontend",
        // Loopback, nothing listening: the agent's retries are logged.
        "--control",
        "127.0.0.1:1",
        "--join-token-file",
        "/dev/null",
        "--ca-file",
    ])
    .arg(ca)
    .arg("--state-dir")
    .arg(state)
    .args(args)
    .env("RUST_LOG", rust_log)
    .env_remove("MESHWARD_LOG_FORMAT")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn logs_are_structured_filtered_by_rust_log_and_json_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Control::start(tmp.path());
    c.kill9();
    let ca = tmp.path().join("bundle.pem");
    let state = tmp.path().join("proxy");
    // JSON lines: each an object with time, level, target and message.
    let json = proxy_logs(&ca, &state, &["--log-format", "json"], "");
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let retry = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("cannot get a certificate"))
        })
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(retry["level"], "WARN", "{retry}");
    assert_eq!(retry["target"], "meshward_proxy::agent", "{retry}");
    assert!(
        retry["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{retry}"
    );
    // Text by default, one line per event with its level and target.
    let text = proxy_logs(&ca, &state, &[], "");
    assert!(
        text.lines()
            .any(|l| l.contains(" WARN meshward_proxy::agent: cannot get a certificate")),
        "{text}"
    );
    // RUST_LOG filters by level and target.
    let quiet = proxy_logs(&ca, &state, &[], "error");
    assert!(!quiet.contains("cannot get a certificate"), "{quiet}");
    let quiet = proxy_logs(&ca, &state, &[], "info,meshward_proxy::agent=off");
    assert!(!quiet.contains("cannot get a certificate"), "{quiet}");
    // A filter that does not parse is refused before anything runs.
    let o = Command::new(bin())
        .args(["status"])
        .env("RUST_LOG", "meshward=loud")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(out(&o).contains("RUST_LOG `meshward=loud`"), "{}", out(&o));
}

#[test]
fn exit_codes_tell_refused_unreachable_and_usage_apart() {
    let tmp = tempfile::tempdir().unwrap();
    write_operators(tmp.path());
    let mut c = Control::start(tmp.path());
    let ca = tmp.path().join("bundle.pem");
    // Refused (4): no token.
    let o = c.cli("", &["status"]);
    assert_eq!(o.status.code(), Some(4), "{}", out(&o));
    // Done (0).
    let o = c.cli("alice", &["status", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    c.kill9();
    // Unreachable (3): the same address, nothing listening any more.
    let o = c.cli("alice", &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(
        out(&o).contains("cannot reach the control plane"),
        "{}",
        out(&o)
    );
    // Usage (2): no address at all, or a flag clap refuses.
    let o = Command::new(bin())
        .args(["status", "--ca-file"])
        .arg(&ca)
        .env_remove("MESHWARD_SERVER")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(out(&o).contains("no control plane address"), "{}", out(&o));
    let o = Command::new(bin())
        .args(["status", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
}
