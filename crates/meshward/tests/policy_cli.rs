#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `meshward policy …` end to end: the real binary on the example repository and on broken
//! or changed copies of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshward_policy::decision::{HttpAttrs, Request, Source, WorkloadRef};
use meshward_policy::decision_log::DecisionRecord;
use meshward_policy::engine::Engine;
use meshward_policy::load_path;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshward"))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run meshward")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Validates a SARIF file against the official 2.1.0 schema (python3 `jsonschema`).
fn assert_valid_sarif(sarif_path: &Path) {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sarif-2.1.0-rtm.5.json");
    let py = Command::new("python3")
        .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))); print('valid')"])
        .arg(sarif_path)
        .arg(&schema)
        .output()
        .expect("python3 with jsonschema (scripts/test.sh installs it)");
    assert!(
        py.status.success(),
        "SARIF does not validate: {}",
        String::from_utf8_lossy(&py.stderr)
    );
}

fn copy_examples(dir: &Path) {
    for e in std::fs::read_dir(examples()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let s = std::fs::read_to_string(path).unwrap();
    assert!(
        s.contains(from),
        "{} does not contain {from:?}",
        path.display()
    );
    std::fs::write(path, s.replacen(from, to, 1)).unwrap();
}

#[test]
fn help_has_examples() {
    for sub in ["lint", "test", "explain", "diff", "impact", "suggest"] {
        let o = run(&["policy", sub, "--help"]);
        assert!(o.status.success());
        assert!(
            stdout(&o).contains("meshward policy"),
            "`policy {sub} --help` shows no example"
        );
    }
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    // The generated script, loaded into a real bash, asked as bash asks it on <TAB>
    // (COMP_WORDS and COMP_CWORD set; the function called with command, word, previous word).
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("meshward.bash");
    let o = run(&["completion", "bash"]);
    assert!(o.status.success());
    std::fs::write(&script, &o.stdout).unwrap();
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let cmd = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; _meshward meshward '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words_q.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2]
        );
        let o = Command::new("bash").args(["-c", &cmd]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stdout(&o)
    };
    let top = complete("meshward dr");
    assert_eq!(top.trim(), "drill", "{top}");
    let lint = complete("meshward policy lint --fo");
    assert!(lint.lines().any(|l| l == "--format"), "{lint}");
    let formats = complete("meshward policy lint --format ");
    for f in ["text", "json", "sarif"] {
        assert!(formats.lines().any(|l| l == f), "{formats}");
    }
    for sh in ["zsh", "fish"] {
        let o = run(&["completion", sh]);
        assert!(o.status.success());
        assert!(stdout(&o).contains("drill"), "{sh}");
    }
    let o = run(&["completion", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn lint_examples_is_clean() {
    // Judged while the example's break-glass override is in force (it is dated, as every
    // override must be; afterwards lint rightly flags it as expired, MW308).
    let o = run(&[
        "policy",
        "lint",
        examples().to_str().unwrap(),
        "--now",
        "2026-11-28T12:00:00Z",
    ]);
    assert!(o.status.success(), "{}", stdout(&o));
    // The only warning: the resource of a kind not enforced yet (MW315).
    let text = stdout(&o);
    assert!(text.ends_with("0 error(s), 1 warning(s)\n"), "{text}");
    assert_eq!(text.matches("warning[MW315]").count(), 1, "{text}");
}

#[test]
fn lint_reports_errors_as_text_json_and_valid_sarif() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let f = dir.path().join("services-policies.yaml");
    edit(
        &f,
        "        - identities: [\"spiffe://shop.example/ns/platform/sa/ingress\"]\n---\napiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: storefront, namespace: acme}",
        "        - identites: [\"spiffe://shop.example/ns/platform/sa/ingress\"]\n---\napiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: storefront, namespace: acme}",
    );
    edit(
        &dir.path().join("overrides.yaml"),
        "  expiresAt: 2026-11-28T20:00:00Z\n",
        "",
    );
    let d = dir.path().to_str().unwrap();

    let o = run(&["policy", "lint", d, "--now", "2026-11-28T10:00:00Z"]);
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(
        text.contains("error[MW102]: unknown field `identites`"),
        "{text}"
    );
    assert!(
        text.contains(&format!("--> {}:12:11", f.display())),
        "{text}"
    );
    assert!(
        text.contains(
            "12 |         - identites: [\"spiffe://shop.example/ns/platform/sa/ingress\"]"
        ),
        "{text}"
    );
    assert!(text.contains("   |           ^^^^^^^^^"), "{text}");
    assert!(
        text.contains("= field: spec.rules[0].from[0].identites"),
        "{text}"
    );
    assert!(
        text.contains("= help: did you mean `identities`?"),
        "{text}"
    );
    assert!(text.contains("error[MW305]"), "{text}");
    assert!(text.contains("2 error(s)"), "{text}");

    let o = run(&[
        "policy",
        "lint",
        d,
        "--format",
        "json",
        "--now",
        "2026-11-28T10:00:00Z",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // `-o`/`--output`, as in every other command, say the same as `--format`.
    for flag in ["-o", "--output"] {
        let o = run(&[
            "policy",
            "lint",
            d,
            flag,
            "json",
            "--now",
            "2026-11-28T10:00:00Z",
        ]);
        let same: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(same, v, "{flag}");
    }
    let codes: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["severity"] == "error")
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes.len(), 2, "{v:#}");
    assert!(codes.contains(&"MW102") && codes.contains(&"MW305"));
    let mw102 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "MW102")
        .unwrap();
    assert_eq!(
        (mw102["line"].as_u64(), mw102["column"].as_u64()),
        (Some(12), Some(11))
    );

    let o = run(&[
        "policy",
        "lint",
        d,
        "--format",
        "sarif",
        "--now",
        "2026-11-28T10:00:00Z",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let sarif_path = dir.path().join("out.sarif");
    std::fs::write(&sarif_path, &o.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], "2.1.0");
    let errors = v["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["level"] == "error")
        .count();
    assert_eq!(errors, 2, "{v:#}");
    assert_valid_sarif(&sarif_path);
    // The temporary directory is outside any repository: an absolute file URI.
    let loc = &v["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"];
    assert!(
        loc["uri"].as_str().unwrap().starts_with("file:///") && loc.get("uriBaseId").is_none(),
        "{loc}"
    );
}

#[test]
fn sarif_uris_are_relative_to_the_repository_root_and_percent_encoded() {
    // A repository (`.git`) holding `my policies/`, linted from a subdirectory as
    // `../my policies`: code scanning needs `my%20policies/…` under %SRCROOT%.
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir(repo.path().join(".git")).unwrap();
    let pol = repo.path().join("my policies");
    std::fs::create_dir(&pol).unwrap();
    copy_examples(&pol);
    edit(
        &pol.join("services-policies.yaml"),
        "        - identities: [\"spiffe://shop.example/ns/platform/sa/ingress\"]\n",
        "        - identites: [\"spiffe://shop.example/ns/platform/sa/ingress\"]\n",
    );
    let sub = repo.path().join("ci");
    std::fs::create_dir(&sub).unwrap();
    let o = bin()
        .current_dir(&sub)
        .args(["policy", "lint", "../my policies", "--format", "sarif"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let run = &v["runs"][0];
    let r = run["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ruleId"] == "MW102")
        .unwrap();
    let loc = &r["locations"][0]["physicalLocation"]["artifactLocation"];
    assert_eq!(loc["uri"], "my%20policies/services-policies.yaml", "{loc}");
    assert_eq!(loc["uriBaseId"], "%SRCROOT%", "{loc}");
    let root = run["originalUriBaseIds"]["%SRCROOT%"]["uri"]
        .as_str()
        .unwrap();
    let want = format!("file://{}/", repo.path().display());
    assert_eq!(root, want);
    let sarif_path = repo.path().join("out.sarif");
    std::fs::write(&sarif_path, &o.stdout).unwrap();
    assert_valid_sarif(&sarif_path);
}

#[test]
fn test_runs_scenarios_and_writes_junit() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let o = run(&[
        "policy",
        "test",
        examples().to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).ends_with("22 passed, 0 failed\n"),
        "{}",
        stdout(&o)
    );
    let x = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(x.matches("<testcase ").count(), 22);
    // Strict consumers require `errors` beside `failures`.
    assert!(
        x.contains("tests=\"22\" failures=\"0\" errors=\"0\">"),
        "{x}"
    );
    assert_eq!(
        x.matches("<testsuite ").count(),
        x.matches("errors=\"0\"").count() - 1,
        "{x}"
    );

    // A broken expectation fails, with the explain trace.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    copy_examples(&bad);
    edit(
        &bad.join("tests.yaml"),
        "expect: {verdict: deny, reason: denied_by_rule, policy: meshward-system/no-cross-tenant",
        "expect: {verdict: allow, reason: denied_by_rule, policy: meshward-system/no-cross-tenant",
    );
    let o = run(&[
        "policy",
        "test",
        bad.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("FAIL  meshward-system/shop :: no cross-tenant calls"),
        "{out}"
    );
    assert!(out.contains("expected verdict allow, got deny"), "{out}");
    assert!(out.contains("step 1 ✔ [baseline] baseline DENY `meshward-system/no-cross-tenant` rule `other-tenants`"), "{out}");
    assert!(out.ends_with("21 passed, 1 failed\n"), "{out}");
    assert!(
        std::fs::read_to_string(&junit)
            .unwrap()
            .contains("<failure message=\"expected verdict allow, got deny\">")
    );
}

#[test]
fn explain_shows_every_tier() {
    let o = run(&[
        "policy",
        "explain",
        examples().to_str().unwrap(),
        "--from",
        "spiffe://shop.example/ns/web/sa/frontend",
        "--to",
        "payments/payments-api",
        "--port",
        "8443",
        "--method",
        "POST",
        "--path",
        "/v1/charges",
        "--at",
        "2026-11-28T10:00:00Z",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(out.contains("step 5 ✔ [baseline] baseline ALLOW `meshward-system/in-mesh-only` rule `own-trust-domain`"), "{out}");
    assert!(
        out.contains(
            "step 5 · [domain] domain ALLOW `payments/payments-callers` rule `known-namespaces`"
        ),
        "{out}"
    );
    assert!(out.contains("verdict: DENY (no_allow_at_tier)"), "{out}");
    assert!(
        out.contains("audit mark: `meshward-system/audit-restricted` rule `all-access`"),
        "{out}"
    );

    let o = run(&[
        "policy",
        "explain",
        examples().to_str().unwrap(),
        "--output",
        "json",
        "--from",
        "spiffe://shop.example/ns/orders/sa/orders-api",
        "--to",
        "payments/payments-api",
        "--port",
        "8443",
        "--method",
        "POST",
        "--path",
        "/v1//./charges",
        "--at",
        "2026-11-28T10:00:00Z",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["decision"]["verdict"], "allow");
    assert_eq!(v["decision"]["policy"], "payments/payments-api");
    assert!(v["trace"]["steps"].as_array().unwrap().len() > 5);

    // Errors are actionable.
    let o = run(&[
        "policy",
        "explain",
        examples().to_str().unwrap(),
        "--from",
        "spiffe://shop.example/ns/web/sa/frontend",
        "--to",
        "payments/nope",
        "--port",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("known workloads:"));
}

fn storefronts_may_post(dir: &Path) {
    copy_examples(dir);
    edit(
        &dir.join("services-policies.yaml"),
        "        - methods: [GET]\n          paths: [\"/orders/*\"]",
        "        - methods: [GET, POST]\n          paths: [\"/orders/*\"]",
    );
}

#[test]
fn diff_lists_exactly_the_changed_edges() {
    let dir = tempfile::tempdir().unwrap();
    storefronts_may_post(dir.path());
    let o = run(&[
        "policy",
        "diff",
        examples().to_str().unwrap(),
        dir.path().to_str().unwrap(),
        "--output",
        "json",
        "--at",
        "2026-11-28T10:00:00Z",
    ]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let changes = v["changes"].as_array().unwrap();
    assert!(!changes.is_empty());
    for c in changes {
        assert_eq!(c["destination"], "orders/orders-api", "{c}");
        assert_eq!(c["method"], "POST", "{c}");
        assert!(
            c["source"].as_str().unwrap().ends_with("/sa/storefront"),
            "{c}"
        );
        assert_eq!(
            (c["old"].as_str(), c["new"].as_str()),
            (Some("deny"), Some("allow")),
            "{c}"
        );
        assert!(c["path"].as_str().unwrap().starts_with("/orders"), "{c}");
    }
    // Both tenants' storefronts, for /orders and a path below it.
    assert_eq!(changes.len(), 4, "{v:#}");
    // Only orders-api's policies changed: the 8 other workloads need no probing.
    assert_eq!(v["destinations_unchanged"], 8, "{v:#}");

    // A workload attribute is global (sources carry it everywhere): nothing is skipped,
    // and reporting's new posture opens the ledger to it.
    let posture = tempfile::tempdir().unwrap();
    copy_examples(posture.path());
    edit(
        &posture.path().join("workloads.yaml"),
        "posture: outdated",
        "posture: compliant",
    );
    let o = run(&[
        "policy",
        "diff",
        examples().to_str().unwrap(),
        posture.path().to_str().unwrap(),
        "--output",
        "json",
        "--at",
        "2026-11-28T10:00:00Z",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["destinations_unchanged"], 0);
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{v:#}");
    assert_eq!(
        changes[0]["source"],
        "spiffe://shop.example/ns/payments/sa/reporting"
    );
    assert_eq!(changes[0]["destination"], "payments/ledger");
    assert_eq!(changes[0]["new"], "allow");
    let o = run(&[
        "policy",
        "diff",
        examples().to_str().unwrap(),
        examples().to_str().unwrap(),
        "--exit-code",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("no edge changes verdict"));
    let o = run(&[
        "policy",
        "diff",
        examples().to_str().unwrap(),
        dir.path().to_str().unwrap(),
        "--exit-code",
        "--at",
        "2026-11-28T10:00:00Z",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("+ spiffe://shop.example/ns/acme/sa/storefront -> orders/orders-api port 8080 POST /orders: deny (no_allow_at_tier) -> allow (allowed_by_rule) by `orders/orders-api`"), "{}", stdout(&o));
}

/// A decision log as the proxy writes it, from the example policies.
fn write_log(path: &Path) -> (usize, usize) {
    let set = load_path(&examples()).into_valid().unwrap();
    let engine = Engine::compile(&set);
    let at = humantime::parse_rfc3339("2026-11-28T10:00:00Z").unwrap();
    let mut lines = String::new();
    let (mut posts, mut allowed) = (0, 0);
    let who = |ns: &str, sa: &str| {
        Source::parse(&format!("spiffe://shop.example/ns/{ns}/sa/{sa}")).unwrap()
    };
    for i in 0..600 {
        let (source, dest, port, method, path) = match i % 6 {
            0 => (
                who("web", "frontend"),
                "orders/orders-api",
                8080,
                "GET",
                format!("/orders/{i}"),
            ),
            1 => (
                who("acme", "storefront"),
                "orders/orders-api",
                8080,
                "POST",
                format!("/orders/{i}"),
            ),
            2 => (
                who("orders", "orders-api"),
                "payments/payments-api",
                8443,
                "POST",
                "/v1/charges".to_owned(),
            ),
            3 => (
                who("web", "frontend"),
                "payments/payments-api",
                8443,
                "POST",
                "/v1/charges".to_owned(),
            ),
            4 => (
                who("platform", "ingress"),
                "web/frontend",
                8080,
                "GET",
                "/".to_owned(),
            ),
            _ => (
                who("payments", "payments-api"),
                "payments/ledger",
                5432,
                "",
                String::new(),
            ),
        };
        let http = (!method.is_empty()).then(|| HttpAttrs {
            method: method.into(),
            path,
            host: None,
            headers: vec![],
        });
        let req = Request {
            source,
            destination: WorkloadRef::parse(dest).unwrap(),
            port,
            http,
            at,
        };
        let d = engine.decide(&req);
        if i % 6 == 1 {
            posts += 1;
        }
        if d.verdict == meshward_policy::Verdict::Allow {
            allowed += 1;
        }
        lines.push_str(&DecisionRecord::new(&req, &d, 1).to_line());
        lines.push('\n');
    }
    lines.push_str("this is not json\n");
    std::fs::write(path, lines).unwrap();
    (posts, allowed)
}

#[test]
fn impact_counts_exactly_the_flipping_requests() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.jsonl");
    let (posts, _) = write_log(&log);
    let cand = dir.path().join("cand");
    std::fs::create_dir(&cand).unwrap();
    storefronts_may_post(&cand);
    let o = run(&[
        "policy",
        "impact",
        cand.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["records"], 600);
    assert_eq!(v["deny_to_allow_records"], posts as u64);
    assert_eq!(v["allow_to_deny_records"], 0);
    assert_eq!(v["invalid_lines"], 1);
    assert_eq!(v["invalid_examples"][0][0], 601);
    let flips = v["flips"].as_array().unwrap();
    assert_eq!(flips.len(), posts, "one edge per distinct path");
    assert!(flips.iter().all(
        |f| f["source"] == "spiffe://shop.example/ns/acme/sa/storefront"
            && f["method"] == "POST"
            && f["candidate_policy"] == "orders/orders-api"
    ));
    // Unchanged policies: nothing flips.
    let o = run(&[
        "policy",
        "impact",
        examples().to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--exit-code",
    ]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("0 allowed would be denied, 0 denied would be allowed"),
        "{}",
        stdout(&o)
    );
    let o = run(&[
        "policy",
        "impact",
        cand.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--exit-code",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn suggest_writes_least_privilege_policies_that_lint_and_admit_exactly_the_observed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.jsonl");
    write_log(&log);
    // A repository with the mesh and workloads only, plus the suggestions.
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    for f in ["mesh.yaml", "workloads.yaml", "services.yaml"] {
        std::fs::copy(examples().join(f), repo.join(f)).unwrap();
    }
    let out = repo.join("suggested.yaml");
    let o = run(&[
        "policy",
        "suggest",
        "--log",
        log.to_str().unwrap(),
        "--collapse-above",
        "0",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let yaml = std::fs::read_to_string(&out).unwrap();
    assert!(yaml.contains("name: suggested-orders-api"), "{yaml}");
    assert!(
        !yaml.contains("acme/sa/storefront"),
        "denied traffic must not be suggested:\n{yaml}"
    );
    let o = run(&["policy", "lint", repo.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).ends_with("0 error(s), 0 warning(s)\n"),
        "{}",
        stdout(&o)
    );
    // Replaying the log: every observed allow stays allowed, every observed deny stays denied.
    let o = run(&[
        "policy",
        "impact",
        repo.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["allow_to_deny_records"], 0, "{v:#}");
    assert_eq!(v["deny_to_allow_records"], 0, "{v:#}");
    // Collapsing: 100 distinct /orders/N paths become one prefix.
    let o = run(&["policy", "suggest", "--log", log.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("paths: [\"/orders/*\"]"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn impact_shows_progress_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.jsonl");
    write_log(&one);
    let text = std::fs::read_to_string(&one).unwrap();
    let text: String = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    let big = dir.path().join("big.jsonl");
    std::fs::write(&big, text.repeat(400)).unwrap(); // 240,000 records, ~80 MB
    let typescript = dir.path().join("typescript");
    // `script` gives the command a pseudo-terminal, as a person running it would have.
    let cmd = format!(
        "{} policy impact {} --log {}",
        env!("CARGO_BIN_EXE_meshward"),
        examples().display(),
        big.display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd])
        .arg(&typescript)
        .output()
        .expect("script (util-linux)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let screen = std::fs::read_to_string(&typescript).unwrap();
    assert!(
        screen.contains("replaying "),
        "no progress bar on the terminal:\n{screen}"
    );
    assert!(screen.contains("replayed 240000 records"), "{screen}");
}

#[test]
fn lint_checks_drills_beside_the_policies() {
    // The quickstart's drill suite: every drill passes the drill's own checks, and a
    // directory of drills alone does not miss a Mesh.
    let o = run(&[
        "policy",
        "lint",
        examples().join("../drills").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // A broken drill beside policies: MW110 at its line and field, and the policies are
    // linted as ever (the Drill is not part of the policy set).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(examples().join("mesh.yaml"), tmp.path().join("mesh.yaml")).unwrap();
    let drill = std::fs::read_to_string(examples().join("../drills/flood.yaml")).unwrap();
    assert!(drill.contains("duration: 8s"));
    std::fs::write(
        tmp.path().join("flood.yaml"),
        drill.replace("duration: 8s", "duration: 8x"),
    )
    .unwrap();
    let o = run(&[
        "policy",
        "lint",
        tmp.path().to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let d = v
        .as_array()
        .or_else(|| v["diagnostics"].as_array())
        .unwrap()
        .iter()
        .find(|d| d["code"] == "MW110")
        .unwrap_or_else(|| panic!("{v:#}"))
        .clone();
    let line = drill
        .lines()
        .position(|l| l.contains("duration: 8s"))
        .unwrap()
        + 1;
    assert_eq!(d["line"], line, "{d:#}");
    assert_eq!(d["field"], "spec.steps[0].duration", "{d:#}");
    assert!(d["file"].as_str().unwrap().ends_with("flood.yaml"), "{d:#}");
    assert!(
        !v.to_string().contains("MW105"),
        "a Drill is a known kind: {v:#}"
    );
}
