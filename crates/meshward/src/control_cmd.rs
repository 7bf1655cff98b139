//! `meshward control` and the operator commands that talk to it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshward_control::client::{Client, ClientError};
use meshward_identity::ca::{certs_from_pem, trust_domain_of};
use serde_json::{Value, json};

use crate::Output;

/// How to reach the control plane (flags, else environment).
#[derive(Debug, clap::Args, Clone)]
pub struct Conn {
    /// Control plane address `host:port` [env: MESHWARD_SERVER]
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// File with an operator bearer token [env: MESHWARD_TOKEN_FILE]
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// The mesh's root certificates (PEM), to check the server [env: MESHWARD_CA_FILE]
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
}

impl Conn {
    pub(crate) fn client(&self) -> Result<Client> {
        let server = self.server.clone().or_else(|| std::env::var("MESHWARD_SERVER").ok()).context(
            "no control plane address: pass --server HOST:PORT or set MESHWARD_SERVER (`meshward control` prints it)",
        )?;
        let ca_file = self.ca_file.clone().or_else(|| std::env::var_os("MESHWARD_CA_FILE").map(PathBuf::from)).context(
            "no CA file: pass --ca-file DATA/bundle.pem or set MESHWARD_CA_FILE (`meshward control` writes it)",
        )?;
        let pem = std::fs::read_to_string(&ca_file)
            .with_context(|| format!("cannot read the CA file `{}`", ca_file.display()))?;
        let bundle = certs_from_pem(&pem);
        let td = bundle
            .first()
            .and_then(|c| trust_domain_of(c))
            .with_context(|| {
                format!("`{}` holds no Meshward root certificate", ca_file.display())
            })?;
        let token_file = self
            .token_file
            .clone()
            .or_else(|| std::env::var_os("MESHWARD_TOKEN_FILE").map(PathBuf::from));
        let token = match token_file {
            Some(f) => Some(
                std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read the token file `{}`", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Client::new(&server, &td, bundle, token, None)?)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A refusal by the control plane: as the server phrased it, and its JSON body.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: u16,
    message: String,
    body: Value,
}

impl std::error::Error for Refusal {}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.status, self.message)
    }
}

/// Runs one API call; a refusal is returned as the server phrased it.
fn call(
    conn: &Conn,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<std::result::Result<Value, Refusal>> {
    let client = conn.client()?;
    let rt = runtime()?;
    match rt.block_on(client.call(method, path, body.as_ref())) {
        Ok(v) => Ok(Ok(v)),
        Err(ClientError::Status {
            status,
            message,
            body,
        }) => Ok(Err(Refusal {
            status,
            message,
            body,
        })),
        Err(e) => Err(e.into()),
    }
}

/// Prints a result and returns the exit code: 0, or 4 for a refusal (docs/cli.md). With `--output json`
/// a refusal is printed on stdout too (`{"status": "refused", "http_status", "code",
/// "error", "diagnostics"}`), so tools read one document either way.
fn finish(
    r: std::result::Result<Value, Refusal>,
    output: Output,
    text: impl FnOnce(&Value) -> String,
) -> ExitCode {
    match r {
        Ok(v) => {
            match output.doc(&v) {
                Some(d) => println!("{d}"),
                None => print!("{}", text(&v)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if output != Output::Text {
                let mut doc = json!({
                    "status": "refused",
                    "http_status": e.status,
                    "error": e.message,
                });
                for k in ["code", "diagnostics"] {
                    if let Some(v) = e.body.get(k) {
                        doc[k] = v.clone();
                    }
                }
                println!("{}", output.doc(&doc).unwrap_or_default());
            }
            eprintln!("{e}");
            ExitCode::from(crate::EXIT_REFUSED)
        }
    }
}

/// `  no effect yet: …` lines for the resources of kinds not enforced yet.
fn not_enforced_note(v: &Value) -> String {
    let names: Vec<&str> = v["not_enforced"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if names.is_empty() {
        return String::new();
    }
    format!(
        "warning: {} resource(s) have no effect yet (accepted, not enforced; lint MW315): {}\n",
        names.len(),
        names.join(", ")
    )
}

/// `meshward control`.
#[expect(
    clippy::too_many_arguments,
    reason = "one per flag of `meshward control`"
)]
pub fn control(
    data: &Path,
    trust_domain: &str,
    listen: &str,
    proxy_listen: &str,
    controller_interval: Duration,
    http_listen: &str,
    insecure_remote_http: bool,
    disk_reserve: u64,
) -> Result<ExitCode> {
    let td = meshward_identity::TrustDomain::parse(trust_domain)
        .map_err(|e| anyhow::anyhow!("--trust-domain `{trust_domain}`: {e}"))?;
    let listen = listen
        .parse()
        .with_context(|| format!("--listen `{listen}` is not HOST:PORT"))?;
    let proxy_listen = proxy_listen
        .parse()
        .with_context(|| format!("--proxy-listen `{proxy_listen}` is not HOST:PORT"))?;
    let opts = meshward_control::server::Options {
        data_dir: data.to_owned(),
        trust_domain: td,
        listen,
        proxy_listen,
        controller_interval,
        http_listen: match http_listen {
            "" | "off" => None,
            m => {
                let a: std::net::SocketAddr = m
                    .parse()
                    .with_context(|| format!("--http-listen `{m}` is not HOST:PORT (or `off`)"))?;
                if !a.ip().is_loopback() && !insecure_remote_http {
                    bail!(
                        "--http-listen `{m}` is not a loopback address: the dashboard and /metrics are plain HTTP, so its session cookie would cross the network in clear text; keep it on 127.0.0.1 and put a TLS reverse proxy in front (docs/telemetry.md), or pass --insecure-remote-http"
                    );
                }
                Some(a)
            }
        },
        disk_reserve,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let data_dir = data.to_owned();
    rt.block_on(meshward_control::server::run(
        opts,
        |s| {
            println!("meshward control listening on {}", s.addr);
            println!("  proxy API (gRPC, mTLS) on {}", s.proxy_addr);
            if let Some(m) = s.http_addr {
                println!("  dashboard http://{m}/ui   metrics http://{m}/metrics");
            }
            println!("  export MESHWARD_SERVER={}", s.addr);
            println!("  export MESHWARD_CA_FILE={}", s.bundle_file.display());
            match &s.admin_token_file {
                Some(f) => println!(
                    "  export MESHWARD_TOKEN_FILE={}   # first start: the admin operator's token",
                    f.display()
                ),
                None => println!("  operators: {}", data_dir.join("operators.json").display()),
            }
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down");
        },
    ))
    .map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

/// `meshward apply -f DIR`.
pub fn apply(
    conn: &Conn,
    dir: &Path,
    reason: &str,
    progressive: Option<Value>,
    output: Output,
) -> Result<ExitCode> {
    let files = meshward_policy::model::yaml_files(dir)
        .with_context(|| format!("cannot read `{}`", dir.display()))?;
    if files.is_empty() {
        bail!("no YAML files in `{}`", dir.display());
    }
    let mut body = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read `{}`", f.display()))?;
        let rel = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        body.push((rel, text));
    }
    let r = call(
        conn,
        "POST",
        "/v1/apply",
        Some(json!({"files": body, "reason": reason, "progressive": progressive})),
    )?;
    Ok(finish(r, output, |v| match v["status"].as_str() {
        Some("rollout_started") => rollout_started(v),
        Some("committed") => format!(
            "applied: revision {} ({})\n{}",
            v["revision"],
            v["summary"].as_str().unwrap_or(""),
            not_enforced_note(v)
        ),
        Some("pending_approval") => pending(v),
        Some("unchanged") => format!(
            "unchanged: revision {} already holds this policy set\n",
            v["revision"]
        ),
        _ => format!("{v}\n"),
    }))
}

fn pending(v: &Value) -> String {
    format!(
        "pending approval: change {} ({})\na second platform-security operator runs `meshward approve {}` (see `meshward proposals`)\n{}",
        v["proposal"],
        v["summary"].as_str().unwrap_or(""),
        v["proposal"],
        not_enforced_note(v)
    )
}

/// `meshward proposals`: the changes waiting for a second approval.
pub fn proposals(conn: &Conn, output: Output) -> Result<ExitCode> {
    let r = call(conn, "GET", "/v1/proposals", None)?;
    Ok(finish(r, output, |v| {
        let list = v.as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            return "no change is waiting for approval\n".into();
        }
        let mut s = format!(
            "{:>4}  {:<20}  {:<14}  {:<24}  {:<40}  {}\n",
            "ID", "PROPOSED", "BY", "REASON", "WAITING FOR", "CHANGE"
        );
        for p in &list {
            let mut waiting = p["waiting_for"].as_str().unwrap_or("").to_owned();
            if p["stale"].as_bool() == Some(true) {
                waiting = format!("STALE (head moved past {}): apply again", p["base"]);
            }
            s.push_str(&format!(
                "{:>4}  {:<20}  {:<14}  {:<24}  {:<40}  {}\n",
                p["id"].as_u64().unwrap_or(0),
                when(&p["created_ms"]),
                p["author"].as_str().unwrap_or(""),
                p["reason"].as_str().unwrap_or(""),
                waiting,
                p["summary"].as_str().unwrap_or("")
            ));
        }
        s
    }))
}

pub fn approve(conn: &Conn, id: u64, output: Output) -> Result<ExitCode> {
    let r = call(conn, "POST", "/v1/approve", Some(json!({"proposal": id})))?;
    Ok(finish(r, output, |v| match v["status"].as_str() {
        // Filed by `apply --progressive`: the approval starts the rollout.
        Some("rollout_started") => format!("approved: {}", rollout_started(v)),
        _ => format!(
            "approved: revision {} ({})\n",
            v["revision"],
            v["summary"].as_str().unwrap_or("")
        ),
    }))
}

fn rollout_started(v: &Value) -> String {
    format!(
        "rollout {} started ({}): in shadow for {}s beside the enforced revision, then enforced if it denies nothing allowed today, then watched for {}s\nfollow it: meshward rollout status --watch\n",
        v["rollout"],
        v["summary"].as_str().unwrap_or(""),
        v["bake_seconds"],
        v["watch_seconds"]
    )
}

fn when(ms: &Value) -> String {
    let ms = ms.as_u64().unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn history(conn: &Conn, output: Output) -> Result<ExitCode> {
    let r = call(conn, "GET", "/v1/history", None)?;
    Ok(finish(r, output, |v| {
        let mut s = format!(
            "{:>4}  {:<20}  {:<18}  {:<24}  {}\n",
            "REV", "TIME", "AUTHOR", "REASON", "CHANGE"
        );
        for r in v.as_array().into_iter().flatten() {
            s.push_str(&format!(
                "{:>4}  {:<20}  {:<18}  {:<24}  {}\n",
                r["rev"].as_u64().unwrap_or(0),
                when(&r["created_ms"]),
                r["author"].as_str().unwrap_or(""),
                r["reason"].as_str().unwrap_or(""),
                r["summary"].as_str().unwrap_or("")
            ));
        }
        s
    }))
}

pub fn rollback(conn: &Conn, to: u64, reason: &str, output: Output) -> Result<ExitCode> {
    let r = call(
        conn,
        "POST",
        "/v1/rollback",
        Some(json!({"to": to, "reason": reason})),
    )?;
    Ok(finish(r, output, |v| match v["status"].as_str() {
        Some("pending_approval") => pending(v),
        Some("unchanged") => format!(
            "unchanged: revision {} already equals revision {to}\n",
            v["revision"]
        ),
        _ => format!(
            "rolled back: revision {} restores revision {to}\n",
            v["revision"]
        ),
    }))
}

pub fn audit_log(
    conn: &Conn,
    actor: Option<&str>,
    action: Option<&str>,
    limit: Option<usize>,
    output: Output,
) -> Result<ExitCode> {
    let mut q = vec![];
    if let Some(a) = actor {
        q.push(format!("actor={a}"));
    }
    if let Some(a) = action {
        q.push(format!("action={a}"));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    let path = if q.is_empty() {
        "/v1/audit".to_owned()
    } else {
        format!("/v1/audit?{}", q.join("&"))
    };
    let r = call(conn, "GET", &path, None)?;
    Ok(finish(r, output, |v| {
        let mut s = String::new();
        for e in v.as_array().into_iter().flatten() {
            s.push_str(&format!(
                "{:>5}  {}  {:<40}  {:<16}  {}  {}\n",
                e["seq"].as_u64().unwrap_or(0),
                when(&e["ts_ms"]),
                e["actor"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
                e["subject"].as_str().unwrap_or(""),
                e["detail"].as_str().unwrap_or("")
            ));
        }
        s
    }))
}

/// `meshward audit verify`: against the server, or offline on a data directory.
pub fn audit_verify(conn: &Conn, data: Option<&Path>, output: Output) -> Result<ExitCode> {
    let (ok, v) = match data {
        Some(dir) => {
            use meshward_control::store::Store as _;
            let store = meshward_control::store::SqliteStore::open(&dir.join("meshward.db"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let entries = store
                .audit(&Default::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            match meshward_control::audit::verify(&entries) {
                Ok(head) => (
                    true,
                    json!({"intact": true, "entries": entries.len(), "head": head}),
                ),
                Err(b) => (
                    false,
                    json!({"intact": false, "entries": entries.len(), "broken": b, "error": b.to_string()}),
                ),
            }
        }
        None => {
            let client = conn.client()?;
            match runtime()?.block_on(client.call("GET", "/v1/audit/verify", None)) {
                Ok(v) => (true, v),
                Err(ClientError::Status {
                    status: 409, body, ..
                }) => (false, body),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Some(d) = output.doc(&v) {
        println!("{d}");
    } else if ok {
        println!(
            "audit log intact: {} entries, head {}",
            v["entries"],
            v["head"].as_str().unwrap_or("")
        );
    } else {
        println!("AUDIT LOG BROKEN: {}", v["error"].as_str().unwrap_or(""));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn token(conn: &Conn, identity: &str, ttl: Duration, output: Output) -> Result<ExitCode> {
    let r = call(
        conn,
        "POST",
        "/v1/tokens",
        Some(json!({"identity": identity, "ttl_secs": ttl.as_secs()})),
    )?;
    Ok(finish(r, output, |v| {
        format!("{}\n", v["token"].as_str().unwrap_or(""))
    }))
}

/// Fields of `meshward override create`.
#[derive(Debug)]
pub struct OverrideInput {
    pub name: String,
    pub namespace: String,
    pub action: &'static str,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub reason: String,
    pub ticket: Option<String>,
    pub requester: Option<String>,
    pub approver: Option<String>,
    pub expires_in: Duration,
}

pub fn override_create(conn: &Conn, o: &OverrideInput, output: Output) -> Result<ExitCode> {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let expires = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + o.expires_in);
    let mut doc = format!(
        "apiVersion: meshward.io/v1alpha1\nkind: Override\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  action: {}\n  reason: {}\n  expiresAt: {expires}\n",
        o.name,
        o.namespace,
        o.action,
        q(&o.reason)
    );
    if !o.from.is_empty() {
        doc.push_str(&format!(
            "  subject: {{identities: [{}]}}\n",
            o.from.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
        ));
    }
    if !o.to.is_empty() {
        doc.push_str(&format!(
            "  target: {{workloads: [{}]}}\n",
            o.to.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
        ));
    }
    for (k, v) in [
        ("ticket", &o.ticket),
        ("requester", &o.requester),
        ("approver", &o.approver),
    ] {
        if let Some(v) = v {
            doc.push_str(&format!("  {k}: {}\n", q(v)));
        }
    }
    let r = call(
        conn,
        "POST",
        "/v1/overrides",
        Some(json!({"namespace": o.namespace, "name": o.name, "document": doc})),
    )?;
    Ok(finish(r, output, |v| match v["status"].as_str() {
        Some("committed") => format!(
            "override {}/{} in force until {expires}: revision {}\n",
            o.namespace, o.name, v["revision"]
        ),
        _ => format!("{v}\n"),
    }))
}

pub fn override_list(conn: &Conn, namespace: Option<&str>, output: Output) -> Result<ExitCode> {
    let mut r = call(conn, "GET", "/v1/overrides", None)?;
    if let (Some(ns), Ok(Value::Array(list))) = (namespace, &mut r) {
        let prefix = format!("{ns}/");
        list.retain(|o| {
            o["override"]
                .as_str()
                .is_some_and(|id| id.starts_with(&prefix))
        });
    }
    Ok(finish(r, output, |v| {
        let mut s = String::new();
        for o in v.as_array().into_iter().flatten() {
            s.push_str(&format!(
                "{:<36} {:<10} until {}  {}  ({})\n",
                o["override"].as_str().unwrap_or(""),
                o["action"].as_str().unwrap_or(""),
                o["expires_at"].as_str().unwrap_or("never"),
                o["reason"].as_str().unwrap_or(""),
                o["ticket"].as_str().unwrap_or("no ticket")
            ));
        }
        if s.is_empty() {
            s.push_str("no overrides\n");
        }
        s
    }))
}

pub fn override_revoke(conn: &Conn, ns: &str, name: &str, output: Output) -> Result<ExitCode> {
    let r = call(conn, "DELETE", &format!("/v1/overrides/{ns}/{name}"), None)?;
    Ok(finish(r, output, |v| {
        format!("revoked {ns}/{name}: revision {}\n", v["revision"])
    }))
}

pub fn quarantine_list(conn: &Conn, output: Output) -> Result<ExitCode> {
    let r = call(conn, "GET", "/v1/quarantines", None)?;
    Ok(finish(r, output, |v| {
        let mut s = String::new();
        for q in v.as_array().into_iter().flatten() {
            let until = q["quarantine_expires_at"]
                .as_str()
                .or(q["throttle_expires_at"].as_str())
                .unwrap_or("-");
            let why: Vec<String> = q["evidence"]["signals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    format!(
                        "{} {:.2} >= {:.2}",
                        g["signal"].as_str().unwrap_or(""),
                        g["value"].as_f64().unwrap_or(0.0),
                        g["threshold"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            s.push_str(&format!(
                "{:<52} {:<12} since {}  until {}  {}\n",
                q["identity"].as_str().unwrap_or(""),
                q["stage"].as_str().unwrap_or(""),
                q["since"].as_str().unwrap_or("-"),
                until,
                why.join(", ")
            ));
        }
        if s.is_empty() {
            s.push_str("nothing reported, throttled or quarantined\n");
        }
        s
    }))
}

pub fn quarantine_release(conn: &Conn, id: &str, reason: &str, output: Output) -> Result<ExitCode> {
    let body = json!({"id": id, "reason": reason});
    let r = call(conn, "POST", "/v1/quarantines/release", Some(body))?;
    Ok(finish(r, output, |v| {
        format!("released {id}: revision {}\n", v["revision"])
    }))
}

pub fn ca_rotate(conn: &Conn, root: bool, finish: bool, output: Output) -> Result<ExitCode> {
    let rotation = match (root, finish) {
        (false, _) => "intermediate",
        (true, false) => "root_begin",
        (true, true) => "root_finish",
    };
    let r = call(
        conn,
        "POST",
        "/v1/ca/rotate",
        Some(json!({"rotation": rotation})),
    )?;
    Ok(finish_with(r, output, rotation))
}

fn finish_with(r: std::result::Result<Value, Refusal>, output: Output, rotation: &str) -> ExitCode {
    finish(r, output, |_| {
        match rotation {
        "root_begin" => "the new root is in the bundle and pushed to proxies; the old intermediate still signs.\nWhen `meshward status` shows no STALE proxy: `meshward ca rotate --root --finish`\n".into(),
        "root_finish" => "signing with the new root's intermediate; the old root stays in the bundle while its leaves may live\n".into(),
        _ => "rotated the intermediate CA; leaves of the old one stay valid until they expire\n".into(),
    }
    })
}

/// The control plane's decision window as JSON lines (the last `window`, or all).
pub fn fetch_decisions(conn: &Conn, window: Option<Duration>) -> Result<String> {
    let path = match window {
        Some(w) => format!("/v1/decisions?window_secs={}", w.as_secs().max(1)),
        None => "/v1/decisions".into(),
    };
    match call(conn, "GET", &path, None)? {
        Ok(Value::String(s)) => Ok(s),
        Ok(_) => Ok(String::new()),
        Err(e) => Err(anyhow::Error::new(e).context("reading the decision window")),
    }
}

/// `meshward status`: the head revision and every connected proxy.
pub fn status(conn: &Conn, output: Output) -> Result<ExitCode> {
    let r = call(conn, "GET", "/v1/status", None)?;
    Ok(finish(r, output, |v| {
        let head = v["revision"].as_u64().unwrap_or(0);
        let mut s = format!(
            "revision {head}, trust domain {}\n",
            v["trust_domain"].as_str().unwrap_or("")
        );
        for d in v["degraded"].as_array().cloned().unwrap_or_default() {
            s.push_str(&format!("DEGRADED: {}\n", d.as_str().unwrap_or("")));
        }
        let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
        if proxies.is_empty() {
            s.push_str("no proxies connected\n");
        }
        for p in proxies {
            let acked = p["acked_revision"].as_u64().unwrap_or(0);
            let mark = if p["stale"].as_bool().unwrap_or(true) {
                "STALE"
            } else {
                "ok"
            };
            s.push_str(&format!(
                "{:<5} {:<56} acked {acked:>4}{}  {}\n",
                mark,
                p["identity"].as_str().unwrap_or(""),
                p["rejected"]
                    .as_str()
                    .map(|r| format!("  rejected: {r}"))
                    .or_else(|| p["not_persisted"]
                        .as_str()
                        .map(|r| format!("  not saved: {r}")))
                    .unwrap_or_default(),
                p["workloads"]
                    .as_array()
                    .map(|w| w
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            ));
        }
        let ic = v["interception"].as_array().cloned().unwrap_or_default();
        if !ic.is_empty() {
            s.push_str("transparent mode (ports the capture rules leave alone):\n");
        }
        let ports = |x: &Value| {
            let p: Vec<String> = x
                .as_array()
                .map(|a| a.iter().map(|p| p.to_string()).collect())
                .unwrap_or_default();
            if p.is_empty() {
                "none".into()
            } else {
                p.join(",")
            }
        };
        for w in ic {
            s.push_str(&format!(
                "  {:<32} address {:<16} excluded inbound {:<12} excluded outbound {}\n",
                w["workload"].as_str().unwrap_or(""),
                w["address"].as_str().unwrap_or("-"),
                ports(&w["exclude_inbound_ports"]),
                ports(&w["exclude_outbound_ports"])
            ));
        }
        s
    }))
}

fn fetch_graph(conn: &Conn, window: Duration, namespace: Option<&str>) -> Result<Value> {
    let mut g = match call(
        conn,
        "GET",
        &format!("/v1/graph?window_secs={}", window.as_secs().max(1)),
        None,
    )? {
        Ok(v) => v,
        Err(e) => return Err(anyhow::Error::new(e).context("reading the service graph")),
    };
    if let Some(ns) = namespace {
        // The namespace's workloads and every edge that touches one of them.
        let prefix = format!("{ns}/");
        let inside = |id: &Value| id.as_str().is_some_and(|s| s.starts_with(&prefix));
        let mut keep = std::collections::BTreeSet::new();
        if let Some(edges) = g["edges"].as_array_mut() {
            edges.retain(|e| inside(&e["source"]) || inside(&e["destination"]));
            for e in edges.iter() {
                for k in ["source", "destination"] {
                    keep.insert(e[k].as_str().unwrap_or("").to_owned());
                }
            }
        }
        if let Some(nodes) = g["nodes"].as_array_mut() {
            nodes.retain(|n| inside(&n["id"]) || keep.contains(n["id"].as_str().unwrap_or("")));
        }
        if let Some(services) = g["services"].as_array_mut() {
            services.retain(|s| inside(&s["id"]));
        }
    }
    Ok(g)
}

fn dot_id(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The graph as Graphviz `dot`: denied edges red (dashed when nothing was allowed),
/// plaintext edges marked.
pub fn graph_dot(g: &Value) -> String {
    let mut s =
        String::from("digraph meshward {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for n in g["nodes"].as_array().into_iter().flatten() {
        let id = n["id"].as_str().unwrap_or("");
        let shape = match n["kind"].as_str() {
            Some("workload") => "box",
            _ => "ellipse",
        };
        s.push_str(&format!("  {} [shape={shape}];\n", dot_id(id)));
    }
    for e in g["edges"].as_array().into_iter().flatten() {
        let (allowed, denied) = (
            e["allowed"].as_u64().unwrap_or(0),
            e["denied"].as_u64().unwrap_or(0),
        );
        let mut label = format!("{allowed} allowed / {denied} denied");
        if let Some(p) = e["p99_ms"].as_f64() {
            label.push_str(&format!("\\np99 {p:.1} ms"));
        }
        if e["mtls"] != true {
            label.push_str("\\nno mTLS");
        }
        let style = match (allowed, denied) {
            (0, d) if d > 0 => ", color=red, fontcolor=red, style=dashed",
            (_, d) if d > 0 => ", color=orange",
            _ => ", color=darkgreen",
        };
        s.push_str(&format!(
            "  {} -> {} [label={}{style}];\n",
            dot_id(e["source"].as_str().unwrap_or("")),
            dot_id(e["destination"].as_str().unwrap_or("")),
            dot_id(&label)
        ));
    }
    s.push_str("}\n");
    s
}

/// The edges as a table, busiest first.
fn edges_table(g: &Value) -> String {
    let mut edges: Vec<&Value> = g["edges"].as_array().into_iter().flatten().collect();
    edges.sort_by(|a, b| {
        b["rate_per_sec"]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&a["rate_per_sec"].as_f64().unwrap_or(0.0))
    });
    let mut s = format!(
        "{:<24} {:<24} {:>8} {:>8} {:>8} {:>6} {:>9} {:<5} TOP DENIAL\n",
        "SOURCE", "DESTINATION", "RPS", "ALLOWED", "DENIED", "DENY%", "P99", "MTLS"
    );
    for e in edges {
        let (a, d) = (
            e["allowed"].as_u64().unwrap_or(0),
            e["denied"].as_u64().unwrap_or(0),
        );
        let top = e["denials"]
            .as_object()
            .and_then(|m| m.iter().max_by_key(|(_, v)| v.as_u64().unwrap_or(0)))
            .map(|(k, v)| format!("{k} x{v}"))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{:<24} {:<24} {:>8.2} {:>8} {:>8} {:>5.1}% {:>9} {:<5} {}\n",
            e["source"].as_str().unwrap_or(""),
            e["destination"].as_str().unwrap_or(""),
            e["rate_per_sec"].as_f64().unwrap_or(0.0),
            a,
            d,
            if a + d == 0 {
                0.0
            } else {
                100.0 * d as f64 / (a + d) as f64
            },
            e["p99_ms"]
                .as_f64()
                .map_or("-".into(), |p| format!("{p:.1}ms")),
            if e["mtls"] == true { "yes" } else { "NO" },
            top
        ));
    }
    s
}

/// `meshward graph`.
pub fn graph(
    conn: &Conn,
    window: Duration,
    namespace: Option<&str>,
    output: crate::GraphFormat,
) -> Result<ExitCode> {
    let g = fetch_graph(conn, window, namespace)?;
    match output {
        crate::GraphFormat::Json => println!("{}", serde_json::to_string_pretty(&g)?),
        crate::GraphFormat::Yaml => println!("{}", crate::to_yaml(&g)),
        crate::GraphFormat::Dot => print!("{}", graph_dot(&g)),
        crate::GraphFormat::Text => {
            let nodes: Vec<&str> = g["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["id"].as_str())
                .collect();
            println!(
                "{} nodes: {}\n{} records in the last {}",
                nodes.len(),
                nodes.join(", "),
                g["records"],
                humantime::format_duration(window)
            );
            print!("{}", edges_table(&g));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `meshward top`: the edges table, refreshed.
pub fn top(
    conn: &Conn,
    window: Duration,
    interval: Duration,
    once: bool,
    namespace: Option<&str>,
    output: Output,
) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let tty = std::io::stdout().is_terminal();
    loop {
        let g = fetch_graph(conn, window, namespace)?;
        if output == Output::Json {
            println!("{}", serde_json::to_string(&g)?);
        } else if let Some(d) = output.doc(&g) {
            println!("{d}");
        } else {
            if tty && !once {
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "meshward top — {} — last {}, {} records (Ctrl-C quits)\n",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                humantime::format_duration(window),
                g["records"]
            );
            print!("{}", edges_table(&g));
        }
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(interval);
    }
}

/// One rollout as text: stage, time left, edges, sidecars, outcome.
fn rollout_text(v: &Value) -> String {
    let r = &v["rollout"];
    if r.is_null() {
        return "no rollout has run\n".into();
    }
    let mut s = format!(
        "rollout {}  {}  by {}: {}\n  change: {}\n  base revision {}",
        r["id"],
        r["stage"].as_str().unwrap_or("").to_uppercase(),
        r["author"].as_str().unwrap_or(""),
        r["reason"].as_str().unwrap_or(""),
        r["summary"].as_str().unwrap_or(""),
        r["base"]
    );
    if let Some(e) = r["enforced"].as_u64() {
        s.push_str(&format!(", enforced as revision {e}"));
    }
    if let Some(e) = r["rolled_back_to"].as_u64() {
        s.push_str(&format!(", rolled back by revision {e}"));
    }
    s.push('\n');
    if let Some(left) = r["stage_remaining_seconds"].as_f64() {
        s.push_str(&format!(
            "  {} for {}s more\n",
            r["stage"].as_str().unwrap_or(""),
            left
        ));
    }
    if let Some(why) = r["why"].as_str() {
        s.push_str(&format!("  why: {why}\n"));
    }
    let sc = &r["sidecars"];
    if sc.is_object() {
        s.push_str(&format!(
            "  sidecars: {} connected, {} evaluating the candidate{}\n",
            sc["connected"],
            sc["shadowing"],
            sc["enforcing"]
                .as_u64()
                .map(|n| format!(", {n} enforcing it"))
                .unwrap_or_default()
        ));
        for e in sc["rejected"].as_array().into_iter().flatten() {
            s.push_str(&format!("  REJECTED {}\n", e.as_str().unwrap_or("")));
        }
    }
    let gate = r["gate"].as_array().cloned().unwrap_or_default();
    if !gate.is_empty() {
        s.push_str(&format!(
            "  {:<46} {:<24} {:>8} {:>8} {:>10} {:>8}\n",
            "SOURCE", "DESTINATION", "ALLOWED", "→DENY", "→DENY %", "→ALLOW"
        ));
        for e in &gate {
            let mark = match (e["held"].as_bool(), e["critical"].as_bool()) {
                (Some(true), Some(true)) => "  HELD (critical)",
                (Some(true), _) => "  HELD",
                _ => "",
            };
            s.push_str(&format!(
                "  {:<46} {:<24} {:>8} {:>8} {:>10} {:>8}{mark}\n",
                e["source"].as_str().unwrap_or(""),
                e["destination"].as_str().unwrap_or(""),
                e["allowed"].to_string(),
                e["would_deny"].to_string(),
                e["would_deny_percent"].to_string(),
                e["would_allow"].to_string()
            ));
            if let Some(x) = e["example"].as_str() {
                s.push_str(&format!("      e.g. {x}\n"));
            }
        }
    }
    if let Some(rp) = r["replayed"].as_object() {
        s.push_str(&format!(
            "  replay of the recorded window: {} requests, {} allowed → denied, {} denied → allowed\n",
            rp["requests"], rp["allow_to_deny"], rp["deny_to_allow"]
        ));
    }
    let watched = r["watched"].as_array().cloned().unwrap_or_default();
    if !watched.is_empty() {
        s.push_str(&format!(
            "  {:<46} {:<24} {:<9} {:>8} {:>7} {:>7}\n",
            "WATCHED SOURCE", "DESTINATION", "SIDE", "REQUESTS", "DENY %", "5XX %"
        ));
        for e in &watched {
            s.push_str(&format!(
                "  {:<46} {:<24} {:<9} {:>8} {:>7} {:>7}\n",
                e["source"].as_str().unwrap_or(""),
                e["destination"].as_str().unwrap_or(""),
                e["direction"].as_str().unwrap_or(""),
                e["requests"].to_string(),
                e["deny_percent"].to_string(),
                e["error_percent"].to_string()
            ));
        }
    }
    match r["stage"].as_str() {
        Some("waiting") => s.push_str(
            "  next: `meshward rollout promote --reason …` to enforce it, or `meshward rollout abort --reason …`\n",
        ),
        Some("shadow" | "watch") => {
            s.push_str("  next: it moves on by itself (`meshward rollout status --watch` follows it)\n")
        }
        _ => {}
    }
    s
}

/// `meshward rollout status [--watch]`.
pub fn rollout_status(conn: &Conn, watch: bool, output: Output) -> Result<ExitCode> {
    if !watch {
        let r = call(conn, "GET", "/v1/rollout", None)?;
        return Ok(finish(r, output, rollout_text));
    }
    // Follow it: a line per change of stage, the whole status at the end.
    let mut last: Option<(Value, Value)> = None;
    let started = std::time::Instant::now();
    loop {
        let v = match call(conn, "GET", "/v1/rollout", None)? {
            Ok(v) => v,
            Err(e) => return Ok(finish(Err(e), output, rollout_text)),
        };
        let r = &v["rollout"];
        let key = (r["id"].clone(), r["stage"].clone());
        if last.as_ref() != Some(&key) && output == Output::Text {
            eprintln!(
                "[{:>4}s] rollout {}: {}{}",
                started.elapsed().as_secs(),
                r["id"],
                r["stage"].as_str().unwrap_or("none"),
                r["why"]
                    .as_str()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            );
        }
        last = Some(key);
        let active = matches!(r["stage"].as_str(), Some("shadow" | "watch"));
        if !active {
            // For scripts and CI: success only when the change was promoted.
            let promoted = r["stage"] == "promoted";
            let code = finish(Ok(v), output, rollout_text);
            return Ok(if promoted { code } else { ExitCode::FAILURE });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `meshward rollout promote | abort`.
pub fn rollout_act(conn: &Conn, act: &str, reason: &str, output: Output) -> Result<ExitCode> {
    let r = call(
        conn,
        "POST",
        &format!("/v1/rollout/{act}"),
        Some(json!({"reason": reason})),
    )?;
    Ok(finish(r, output, |v| {
        format!("{}\n", v["message"].as_str().unwrap_or(""))
    }))
}
