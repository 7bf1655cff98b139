//! `meshward drill run FILE`: rehearse failures against a running mesh and judge whether
//! it survives them (docs/drills.md).
//!
//! A drill sends its own probe traffic through callers' sidecars (what those callers see
//! is what is judged), measures a steady state, then runs its steps one by one — each
//! makes one failure for its duration (a `FaultInjection` committed through the control
//! plane, an app of `meshward up` stopped) and then undoes it — and checks its
//! expectations during every step, after each (recovery) and at the end (denied edges
//! stayed denied, from the mesh's own decision records). Whatever a step changed is
//! undone also on Ctrl-C, and would undo itself if the drill died: a fault expires a
//! minute after its step, and `meshward up` restarts a stopped app when its lease ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use meshward_control::client::Client;
use meshward_policy::resource::Dur;
use meshward_policy::yaml::{self, PathSeg};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::Output;
use crate::control_cmd::Conn;

// ---------------------------------------------------------------------------------------
// The file

/// `kind: Drill`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DrillSpec {
    probes: Vec<ProbeSpec>,
    /// Measured before the first step and after the last (default 5s).
    #[serde(default)]
    steady: Option<Dur>,
    steps: Vec<StepSpec>,
    expect: Vec<ExpectSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProbeSpec {
    name: String,
    /// The calling workload (`namespace/name`) whose sidecar carries the probe, with `to`
    /// (`namespace/service:port`, one of its calls in mesh.yaml): needs `--mesh`.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    /// Or the address to send to (`host:port`, a caller sidecar's upstream listener).
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    /// Requests per second, 1 to 200 (default 20).
    #[serde(default)]
    rate: Option<u32>,
    /// A request without an answer by then counts as an error (default 2s).
    #[serde(default)]
    timeout: Option<Dur>,
    /// The status every answer must have (e.g. 403 for a call policy denies); default: any
    /// 2xx or 3xx.
    #[serde(default)]
    expect_status: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StepSpec {
    name: String,
    duration: Dur,
    /// A `FaultInjection` spec without `expiresAt` (the drill sets it).
    #[serde(default)]
    fault: Option<Value>,
    /// A workload of `meshward up` whose app is stopped (`namespace/name`).
    #[serde(default)]
    stop_app: Option<String>,
    /// A workload of `meshward up` whose sidecar is stopped (its listeners and its
    /// control-plane stream closed) for the step, then started again from its state.
    #[serde(default)]
    stop_sidecar: Option<String>,
    /// A workload of `meshward up` whose app hangs (SIGSTOP: connections accepted, nothing
    /// answered) for the step.
    #[serde(default)]
    freeze_app: Option<String>,
    /// Stops the control plane of `meshward up` (SIGKILL) for the step: proxies must keep
    /// enforcing what they last received.
    #[serde(default)]
    stop_control_plane: Option<bool>,
    /// Floods a service from one identity (through its sidecar) for the step.
    #[serde(default)]
    flood: Option<FloodSpec>,
    /// Sets the `Mesh`'s `certificateLifetime` (1m or more) for the step: every sidecar
    /// renews at once and then at half that lifetime — certificate churn.
    #[serde(default)]
    certificate_lifetime: Option<Dur>,
}

/// `flood`: requests from one workload's sidecar to one of its calls, at `rate` per second,
/// each on its own connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FloodSpec {
    /// The flooding workload (`namespace/name`), with `to` (`namespace/service:port`, one
    /// of its calls in mesh.yaml): needs `--mesh`.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    /// Or the address to send to (a caller sidecar's upstream listener).
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    /// Requests per second, 1 to 2000.
    rate: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExpectSpec {
    /// A probe's expectations, checked during every step and in the closing steady window.
    #[serde(default)]
    probe: Option<String>,
    #[serde(default)]
    max_error_percent: Option<f64>,
    #[serde(default)]
    max_p99: Option<Dur>,
    /// After each step is undone, every probe answers again within this (no error for a
    /// whole second).
    #[serde(default)]
    recover_within: Option<Dur>,
    /// No allow appears, while the drill runs, on an edge that only had denies before.
    #[serde(default)]
    denied_stays_denied: Option<bool>,
    /// Every probe request a sidecar answered is in the control plane's records, or
    /// counted as lost by the proxies (a full queue, a control plane away).
    #[serde(default)]
    no_lost_records: Option<bool>,
}

/// A drill file, read and checked.
struct Drill {
    name: String,
    namespace: String,
    file: String,
    spec: DrillSpec,
    /// Line of each step's `fault`, for errors.
    fault_lines: Vec<u32>,
}

fn err_at(file: &str, line: u32, field: &str, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{file}:{line}: {field}: {msg}")
}

/// The drill file's own checks, for `meshward policy lint` (MW110): `Err` says what is
/// wrong, as `file:line: field: why`.
pub fn check(path: &Path) -> Result<()> {
    read(path).map(|_| ())
}

fn read(path: &Path) -> Result<Drill> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read `{file}`"))?;
    let docs = yaml::parse_documents(&text)
        .map_err(|e| anyhow!("{file}:{}:{}: {}", e.span.line, e.span.col, e.message))?;
    let [doc] = docs.as_slice() else {
        bail!(
            "{file}: a drill file holds one document (`kind: Drill`), found {}",
            docs.len()
        );
    };
    let field = |k: &str| doc.get(k).and_then(|n| yaml::from_node::<String>(n).ok());
    if field("kind").as_deref() != Some("Drill") {
        bail!(
            "{file}:{}: kind: expected `Drill`, found {}",
            doc.get("kind").map_or(doc.span.line, |n| n.span.line),
            field("kind").map_or("nothing".into(), |k| format!("`{k}`"))
        );
    }
    if field("apiVersion").as_deref() != Some("meshward.io/v1alpha1") {
        bail!(
            "{file}:{}: apiVersion: expected `meshward.io/v1alpha1`",
            doc.span.line
        );
    }
    let meta = doc.get("metadata").ok_or_else(|| {
        err_at(
            &file,
            doc.span.line,
            "metadata",
            "missing: add `metadata: {name: ..., namespace: ...}`",
        )
    })?;
    let get = |k: &str| meta.get(k).and_then(|n| yaml::from_node::<String>(n).ok());
    let name =
        get("name").ok_or_else(|| err_at(&file, meta.span.line, "metadata.name", "missing"))?;
    let namespace = get("namespace").unwrap_or_else(|| "default".into());
    let spec_node = doc
        .get("spec")
        .ok_or_else(|| err_at(&file, doc.span.line, "spec", "missing"))?;
    let spec: DrillSpec = yaml::from_node(spec_node).map_err(|e| {
        let mut path = vec![PathSeg::Key("spec".into())];
        path.extend(e.path.iter().cloned());
        let line = e.span.map_or(spec_node.span.line, |s| s.line);
        let help = e.help.map(|h| format!(" ({h})")).unwrap_or_default();
        err_at(
            &file,
            line,
            &yaml::path_string(&path),
            format!("{}{help}", e.message),
        )
    })?;
    let at = |p: &[PathSeg]| doc.find(p).span.line;
    let key = |s: &str| PathSeg::Key(s.into());
    if spec.probes.is_empty() {
        bail!(err_at(
            &file,
            at(&[key("spec")]),
            "spec.probes",
            "a drill needs at least one probe to judge"
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in spec.probes.iter().enumerate() {
        let line = at(&[key("spec"), key("probes"), PathSeg::Index(i)]);
        let f = format!("spec.probes[{i}]");
        if !names.insert(p.name.as_str()) {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.name"),
                format!("probe `{}` is named twice", p.name)
            ));
        }
        match (&p.address, &p.from, &p.to) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            _ => bail!(err_at(
                &file,
                line,
                &f,
                "give `from` and `to` (a caller's call, with --mesh) or `address`"
            )),
        }
        if p.rate.is_some_and(|r| !(1..=200).contains(&r)) {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.rate"),
                "from 1 to 200 requests per second"
            ));
        }
        if p.timeout
            .as_ref()
            .is_some_and(|t| t.0 < Duration::from_millis(100) || t.0 > Duration::from_secs(10))
        {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.timeout"),
                "from 100ms to 10s"
            ));
        }
    }
    if spec.steps.is_empty() {
        bail!(err_at(
            &file,
            at(&[key("spec")]),
            "spec.steps",
            "a drill needs at least one step"
        ));
    }
    let mut fault_lines = vec![];
    for (i, s) in spec.steps.iter().enumerate() {
        let line = at(&[key("spec"), key("steps"), PathSeg::Index(i)]);
        let f = format!("spec.steps[{i}]");
        if usize::from(s.fault.is_some())
            + usize::from(s.stop_app.is_some())
            + usize::from(s.stop_sidecar.is_some())
            + usize::from(s.freeze_app.is_some())
            + usize::from(s.stop_control_plane.is_some())
            + usize::from(s.flood.is_some())
            + usize::from(s.certificate_lifetime.is_some())
            != 1
        {
            bail!(err_at(
                &file,
                line,
                &f,
                "a step makes one failure: set exactly one of `fault`, `stopApp`, `stopSidecar`, `freezeApp`, `stopControlPlane: true`, `flood` and `certificateLifetime`"
            ));
        }
        if let Some(l) = &s.certificate_lifetime
            && (l.0 < Duration::from_secs(60) || l.0 > Duration::from_secs(24 * 3600))
        {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.certificateLifetime"),
                "from 1m to 24h (the Mesh's bounds)"
            ));
        }
        if let Some(fl) = &s.flood
            && !(1..=2000).contains(&fl.rate)
        {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.flood.rate"),
                "from 1 to 2000 requests per second"
            ));
        }
        if s.duration.0 < Duration::from_secs(1) || s.duration.0 > Duration::from_secs(600) {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.duration"),
                "from 1s to 10m"
            ));
        }
        if s.stop_control_plane == Some(false) {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.stopControlPlane"),
                "only `true` (leave it out not to stop it)"
            ));
        }
        if let Some(Value::Object(o)) = &s.fault {
            if o.contains_key("expiresAt") {
                bail!(err_at(
                    &file,
                    line,
                    &format!("{f}.fault.expiresAt"),
                    "the drill sets it (a minute after the step): leave it out"
                ));
            }
        } else if s.fault.is_some() {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.fault"),
                "a FaultInjection spec (`target`, `delay`, `abort`, ...)"
            ));
        }
        fault_lines.push(at(&[
            key("spec"),
            key("steps"),
            PathSeg::Index(i),
            key("fault"),
        ]));
    }
    for (i, e) in spec.expect.iter().enumerate() {
        let line = at(&[key("spec"), key("expect"), PathSeg::Index(i)]);
        let f = format!("spec.expect[{i}]");
        let probe_part = e.max_error_percent.is_some() || e.max_p99.is_some();
        let kinds = usize::from(probe_part)
            + usize::from(e.recover_within.is_some())
            + usize::from(e.denied_stays_denied.is_some())
            + usize::from(e.no_lost_records.is_some());
        if kinds != 1 {
            bail!(err_at(
                &file,
                line,
                &f,
                "one expectation per entry: `maxErrorPercent`/`maxP99` (with `probe`), `recoverWithin`, `deniedStaysDenied` or `noLostRecords`"
            ));
        }
        if e.no_lost_records == Some(false) {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.noLostRecords"),
                "only `true` (leave it out not to check)"
            ));
        }
        match &e.probe {
            Some(p) if !names.contains(p.as_str()) => {
                bail!(err_at(
                    &file,
                    line,
                    &format!("{f}.probe"),
                    format!(
                        "no probe `{p}` (probes: {})",
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    )
                ))
            }
            None if probe_part => bail!(err_at(
                &file,
                line,
                &format!("{f}.probe"),
                "name the probe these limits are for"
            )),
            _ => {}
        }
        if e.max_error_percent
            .is_some_and(|p| !(0.0..=100.0).contains(&p))
        {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.maxErrorPercent"),
                "between 0 and 100"
            ));
        }
        if e.denied_stays_denied == Some(false) {
            bail!(err_at(
                &file,
                line,
                &format!("{f}.deniedStaysDenied"),
                "only `true` (leave it out not to check)"
            ));
        }
    }
    if spec.expect.is_empty() {
        bail!(err_at(
            &file,
            at(&[key("spec")]),
            "spec.expect",
            "a drill without expectations proves nothing"
        ));
    }
    Ok(Drill {
        name,
        namespace,
        file,
        spec,
        fault_lines,
    })
}

// ---------------------------------------------------------------------------------------
// Where it runs

/// What `meshward up` wrote to DIR/.meshward/up.json.
#[derive(Debug, Deserialize)]
struct UpState {
    control: String,
    ca_file: PathBuf,
    token_file: PathBuf,
    hooks: PathBuf,
    workloads: Vec<UpWorkload>,
}

#[derive(Debug, Deserialize)]
struct UpWorkload {
    id: String,
    upstreams: Vec<UpUpstream>,
}

#[derive(Debug, Deserialize)]
struct UpUpstream {
    service: String,
    port: u16,
    listen: SocketAddr,
}

/// Asks `meshward up` (its hooks socket) to do something; its answer.
async fn hook(sock: &Path, line: &str) -> Result<String> {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .with_context(|| {
            format!(
                "cannot reach `meshward up` at `{}`: is the mesh up?",
                sock.display()
            )
        })?;
    s.write_all(format!("{line}\n").as_bytes()).await?;
    let mut r = tokio::io::BufReader::new(s);
    let mut answer = String::new();
    r.read_line(&mut answer).await?;
    let answer = answer.trim().to_owned();
    match answer.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_owned()),
        None => bail!(
            "meshward up: {}",
            answer.strip_prefix("error ").unwrap_or(&answer)
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Probes

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    latency: Duration,
    /// The status, `None`: no answer (refused, reset, timed out).
    status: Option<u16>,
}

impl Sample {
    /// Not what the probe expects: no answer, or another status (by default, one outside
    /// 2xx and 3xx).
    fn failed(&self, expect: Option<u16>) -> bool {
        match (self.status, expect) {
            (None, _) => true,
            (Some(s), Some(e)) => s != e,
            (Some(s), None) => !(200..400).contains(&s),
        }
    }
}

struct Probe {
    name: String,
    addr: SocketAddr,
    request: Arc<[u8]>,
    rate: u32,
    timeout: Duration,
    expect: Option<u16>,
    samples: Arc<Mutex<Vec<Sample>>>,
    /// The edge it travels: the calling workload, and the workloads of the service it
    /// calls (`from`/`to` probes of a `meshward up` mesh).
    edge: Option<(String, Vec<String>)>,
}

/// One HTTP/1.1 request without a body, on a connection of its own.
fn request(method: &str, path: &str, addr: SocketAddr, agent: &str) -> Arc<[u8]> {
    format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: {agent}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .into_bytes()
        .into()
}

async fn send(addr: SocketAddr, request: &[u8], timeout: Duration) -> Option<u16> {
    tokio::time::timeout(timeout, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(request).await.ok()?;
        let mut buf = Vec::with_capacity(512);
        s.read_to_end(&mut buf).await.ok()?;
        let head = std::str::from_utf8(buf.get(..12)?).ok()?;
        head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    })
    .await
    .ok()
    .flatten()
}

impl Probe {
    /// Sends at its rate until aborted, each request on its own connection.
    async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p = self.clone();
            tokio::spawn(async move {
                let at = Instant::now();
                let status = send(p.addr, &p.request, p.timeout).await;
                let s = Sample {
                    at,
                    latency: at.elapsed(),
                    status,
                };
                if let Ok(mut v) = p.samples.lock() {
                    v.push(s);
                }
            });
        }
    }

    /// The samples sent in [from, to).
    fn window(&self, from: Instant, to: Instant) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|s| s.at >= from && s.at < to)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn p99(samples: &[Sample]) -> Option<Duration> {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    if l.is_empty() {
        return None;
    }
    l.sort();
    let i = (l.len() * 99).div_ceil(100).saturating_sub(1);
    l.get(i).copied()
}

// ---------------------------------------------------------------------------------------
// Running

/// One expectation judged.
#[derive(Debug, serde::Serialize)]
struct Check {
    /// Where: `steady state`, a step's name, `after`, `whole drill`.
    phase: String,
    expectation: String,
    measured: String,
    passed: bool,
}

/// What a step changed, to undo.
#[derive(Clone)]
enum Undo {
    Fault {
        file: String,
    },
    App {
        workload: String,
    },
    Thaw {
        workload: String,
    },
    Sidecar {
        workload: String,
    },
    Control,
    Flood {
        flood: Arc<Flood>,
        task: tokio::task::AbortHandle,
    },
    /// The Mesh file as it was, and each sidecar's certificate serial when the step began.
    Lifetime {
        file: String,
        text: String,
        serials: BTreeMap<String, String>,
    },
}

/// `text` (a policy file) with the `Mesh` document's `spec.certificateLifetime` set to
/// `lifetime`, or `None` when the file holds no `Mesh`. Edited as text, so the rest of
/// the file (comments, order) stays as the operator wrote it.
fn with_lifetime(text: &str, lifetime: &str) -> Result<Option<String>> {
    let mut out = String::new();
    let mut found = false;
    for (n, doc) in text.split_inclusive("\n---").enumerate() {
        let is_mesh = doc.lines().any(|l| l.trim_end() == "kind: Mesh");
        if !is_mesh {
            out.push_str(doc);
            continue;
        }
        found = true;
        let mut lines: Vec<String> = doc.split('\n').map(str::to_owned).collect();
        if let Some(i) = lines
            .iter()
            .position(|l| l.trim_start().starts_with("certificateLifetime:") && l.starts_with(' '))
        {
            let indent = lines[i].len() - lines[i].trim_start().len();
            lines[i] = format!("{}certificateLifetime: {lifetime}", " ".repeat(indent));
        } else if let Some(i) = lines.iter().position(|l| l.trim_end() == "spec:") {
            lines.insert(i + 1, format!("  certificateLifetime: {lifetime}"));
        } else {
            bail!(
                "document {} of the Mesh's file: `spec:` is not in block style (one field per line); a drill cannot set its certificateLifetime",
                n + 1
            );
        }
        out.push_str(&lines.join("\n"));
    }
    Ok(found.then_some(out))
}

/// A flood's target and what it got back.
#[derive(Debug)]
struct Flood {
    target: String,
    addr: SocketAddr,
    request: Arc<[u8]>,
    rate: u32,
    sent: AtomicU64,
    ok: AtomicU64,
    limited: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

impl Flood {
    /// Sends at its rate until aborted, each request on its own connection.
    async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / self.rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let f = self.clone();
            f.sent.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let counter = match send(f.addr, &f.request, Duration::from_secs(2)).await {
                    Some(200..=399) => &f.ok,
                    Some(429) => &f.limited,
                    Some(400..=499) => &f.refused,
                    _ => &f.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
    }

    fn summary(&self) -> String {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "flood of {} stopped: {} sent, {} answered 2xx/3xx, {} rate-limited (429), {} refused (other 4xx), {} failed (5xx or no answer)",
            self.target,
            n(&self.sent),
            n(&self.ok),
            n(&self.limited),
            n(&self.refused),
            n(&self.failed)
        )
    }
}

struct Runner {
    client: Client,
    /// Each step's flood, resolved when the drill starts.
    floods: Vec<Option<Arc<Flood>>>,
    /// What each step did and what undoing it said (`-o json`'s `steps`).
    steps: Vec<Value>,
    /// A second operator for mesh-wide changes (`meshward up`'s `up-approver`).
    approver: Option<Client>,
    hooks: Option<PathBuf>,
    drill_name: String,
    namespace: String,
    text: bool,
    undo: Vec<Undo>,
}

impl Runner {
    fn say(&self, msg: &str) {
        if self.text {
            println!("{msg}");
        }
    }

    /// The head revision's files.
    async fn head(&self) -> Result<(u64, Vec<(String, String)>)> {
        let st = self
            .client
            .call("GET", "/v1/status", None)
            .await
            .map_err(|e| anyhow!("status: {e}"))?;
        let head = st["revision"]
            .as_u64()
            .filter(|r| *r > 0)
            .context("the control plane has no revision yet")?;
        let rev = self
            .client
            .call("GET", &format!("/v1/revisions/{head}"), None)
            .await
            .map_err(|e| anyhow!("revision {head}: {e}"))?;
        let files = serde_json::from_value(rev["files"].clone()).context("a revision's files")?;
        Ok((head, files))
    }

    /// Applies a change the drill's namespace owns (a fault): one needing a second
    /// operator is refused.
    async fn apply(&self, files: Vec<(String, String)>, reason: &str) -> Result<u64> {
        self.submit(files, reason, false).await
    }

    /// Each connected sidecar's certificate serial (by the workload it serves).
    async fn serials(&self) -> Result<BTreeMap<String, String>> {
        let st = self
            .client
            .call("GET", "/v1/status", None)
            .await
            .map_err(|e| anyhow!("status: {e}"))?;
        Ok(st["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["workload"].as_str()?.to_owned(),
                    p["certificate"]["serial"].as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    /// Applies a mesh-wide change, approved by the second operator when it needs one.
    async fn apply_approved(&self, files: Vec<(String, String)>, reason: &str) -> Result<u64> {
        self.submit(files, reason, true).await
    }

    async fn submit(
        &self,
        files: Vec<(String, String)>,
        reason: &str,
        mesh_wide: bool,
    ) -> Result<u64> {
        let r = self
            .client
            .call(
                "POST",
                "/v1/apply",
                Some(&json!({"files": files, "reason": reason})),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?;
        match r["status"].as_str() {
            Some("committed") | Some("unchanged") => Ok(r["revision"].as_u64().unwrap_or(0)),
            Some("pending_approval") if !mesh_wide => bail!(
                "the change waits for a second approval (proposal {}): a drill's fault must not touch mesh-wide resources",
                r["proposal"]
            ),
            Some("pending_approval") => {
                let approver = self.approver.as_ref().with_context(|| {
                    format!(
                        "the change waits for a second operator's approval (proposal {}): run the drill against a mesh of `meshward up` (--mesh), whose second operator approves it",
                        r["proposal"]
                    )
                })?;
                let a = approver
                    .call(
                        "POST",
                        "/v1/approve",
                        Some(&json!({"proposal": r["proposal"]})),
                    )
                    .await
                    .map_err(|e| anyhow!("approving proposal {}: {e}", r["proposal"]))?;
                Ok(a["revision"].as_u64().unwrap_or(0))
            }
            _ => bail!("unexpected answer: {r}"),
        }
    }

    /// Asks `meshward up` to `cmd` (a `field` step) on workload `w` (empty: the control
    /// plane) for the step, with a lease: `up` undoes it by itself if this drill dies.
    async fn leased(&self, field: &str, cmd: &str, w: &str, step: &StepSpec) -> Result<String> {
        let hooks = self
            .hooks
            .clone()
            .with_context(|| format!("`{field}` needs a mesh of `meshward up`: pass --mesh DIR"))?;
        let lease = step.duration.0.as_secs() + 30;
        let line = match w {
            "" => format!("{cmd} {lease}"),
            w => format!("{cmd} {w} {lease}"),
        };
        hook(&hooks, &line).await
    }

    /// Sends `line` to `meshward up`'s hooks (an undo).
    async fn hook(&self, line: &str) -> Result<String> {
        hook(self.hooks.as_deref().context("no hooks")?, line).await
    }

    async fn start(&mut self, i: usize, step: &StepSpec, drill: &Drill) -> Result<String> {
        if let Some(fault) = &step.fault {
            let file = format!("drill.{}.{}.yaml", self.drill_name, i + 1);
            let expires = SystemTime::now() + step.duration.0 + Duration::from_secs(60);
            let mut spec = fault.clone();
            if let Value::Object(o) = &mut spec {
                o.insert(
                    "expiresAt".into(),
                    json!(humantime::format_rfc3339_seconds(expires).to_string()),
                );
            }
            let doc = json!({
                "apiVersion": "meshward.io/v1alpha1",
                "kind": "FaultInjection",
                "metadata": {"name": format!("drill-{}-{}", self.drill_name, i + 1), "namespace": self.namespace},
                "spec": spec,
            });
            let (_, mut files) = self.head().await?;
            files.retain(|(n, _)| *n != file);
            files.push((file.clone(), serde_json::to_string_pretty(&doc)?));
            let rev = self
                .apply(
                    files,
                    &format!("drill {} step {}: {}", self.drill_name, i + 1, step.name),
                )
                .await
                .map_err(|e| {
                    anyhow!(
                        "{}:{}: spec.steps[{i}].fault: the control plane refused it: {e}",
                        drill.file,
                        drill.fault_lines[i]
                    )
                })?;
            self.undo.push(Undo::Fault { file });
            return Ok(format!("fault committed as revision {rev}"));
        }
        if let Some(w) = &step.stop_app {
            let said = self.leased("stopApp", "stop-app", w, step).await?;
            self.undo.push(Undo::App {
                workload: w.clone(),
            });
            return Ok(format!("app of {w} stopped ({said})"));
        }
        if let Some(w) = &step.stop_sidecar {
            let said = self.leased("stopSidecar", "stop-sidecar", w, step).await?;
            self.undo.push(Undo::Sidecar {
                workload: w.clone(),
            });
            return Ok(format!("sidecar of {w} {said}"));
        }
        if let Some(w) = &step.freeze_app {
            let said = self.leased("freezeApp", "freeze-app", w, step).await?;
            self.undo.push(Undo::Thaw {
                workload: w.clone(),
            });
            return Ok(format!("app of {w} frozen ({said})"));
        }
        if step.stop_control_plane == Some(true) {
            let said = self
                .leased("stopControlPlane", "stop-control", "", step)
                .await?;
            self.undo.push(Undo::Control);
            return Ok(format!("control plane stopped ({said})"));
        }
        if let Some(l) = &step.certificate_lifetime {
            let lifetime = humantime::format_duration(l.0).to_string();
            let (_, mut files) = self.head().await?;
            let mut edited = None;
            for (name, text) in files.iter_mut() {
                if let Some(t) = with_lifetime(text, &lifetime)
                    .with_context(|| format!("spec.steps[{i}].certificateLifetime: `{name}`"))?
                {
                    edited = Some((name.clone(), std::mem::replace(text, t)));
                    break;
                }
            }
            let (file, text) =
                edited.context("the head revision has no `Mesh` to set the lifetime on")?;
            let serials = self.serials().await?;
            let rev = self
                .apply_approved(
                    files,
                    &format!(
                        "drill {} step {}: {}: certificate lifetime {lifetime}",
                        self.drill_name,
                        i + 1,
                        step.name
                    ),
                )
                .await?;
            self.undo.push(Undo::Lifetime {
                file,
                text,
                serials,
            });
            return Ok(format!(
                "certificate lifetime {lifetime} committed as revision {rev}"
            ));
        }
        if let Some(flood) = self.floods.get(i).cloned().flatten() {
            let task = tokio::spawn(flood.clone().run()).abort_handle();
            let said = format!("flooding {} at {}/s", flood.target, flood.rate);
            self.undo.push(Undo::Flood { flood, task });
            return Ok(said);
        }
        unreachable!("checked when read")
    }

    /// Undoes the newest change (all of them: `undo_all`).
    async fn undo_one(&mut self) -> Result<String> {
        let Some(u) = self.undo.last().cloned() else {
            return Ok(String::new());
        };
        // Popped once done: a failed undo stays, to be tried again.
        let said = match u {
            Undo::Fault { file } => {
                let (_, mut files) = self.head().await?;
                files.retain(|(n, _)| *n != file);
                let rev = self
                    .apply(files, &format!("drill {}: fault removed", self.drill_name))
                    .await?;
                format!("fault removed in revision {rev}")
            }
            Undo::App { workload } => {
                self.hook(&format!("start-app {workload}")).await?;
                format!("app of {workload} started again")
            }
            Undo::Thaw { workload } => {
                self.hook(&format!("thaw-app {workload}")).await?;
                format!("app of {workload} thawed")
            }
            Undo::Sidecar { workload } => {
                let said = self.hook(&format!("start-sidecar {workload}")).await?;
                format!("sidecar of {workload} {said}")
            }
            Undo::Control => {
                self.hook("start-control").await?;
                // Back once its API answers (what the next steps and checks need).
                let t0 = Instant::now();
                while self.client.call("GET", "/v1/status", None).await.is_err() {
                    if t0.elapsed() > Duration::from_secs(20) {
                        bail!("the control plane did not answer within 20s of its restart");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                "control plane started again".into()
            }
            Undo::Lifetime {
                file,
                text,
                serials,
            } => {
                // Counted before the restore (which renews nothing: certificates of the
                // short lifetime renew at half of it, then get the mesh's again).
                let now = self.serials().await?;
                let renewed = serials
                    .iter()
                    .filter(|(w, s)| now.get(*w).is_some_and(|n| n != *s))
                    .count();
                let (_, mut files) = self.head().await?;
                for (n, t) in files.iter_mut() {
                    if *n == file {
                        *t = text.clone();
                    }
                }
                let rev = self
                    .apply_approved(
                        files,
                        &format!("drill {}: certificate lifetime restored", self.drill_name),
                    )
                    .await?;
                format!(
                    "certificate lifetime restored in revision {rev}; {renewed} of {} sidecars renewed during the step",
                    serials.len()
                )
            }
            Undo::Flood { flood, task } => {
                task.abort();
                // Let the requests in flight answer (each has 2 s at most).
                tokio::time::sleep(Duration::from_secs(2)).await;
                flood.summary()
            }
        };
        self.undo.pop();
        Ok(said)
    }

    async fn undo_all(&mut self) -> Vec<String> {
        let mut problems = vec![];
        while !self.undo.is_empty() {
            let mut tries = 0;
            loop {
                match self.undo_one().await {
                    Ok(m) => {
                        if !m.is_empty() {
                            self.say(&format!("  undone: {m}"));
                        }
                        break;
                    }
                    Err(e) if tries < 5 => {
                        tries += 1;
                        self.say(&format!("  undo failed ({e}); again in 1s"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        // Given up: say what is left behind (a fault still expires, an
                        // app's lease still ends).
                        problems.push(format!("could not undo: {e:#}"));
                        self.undo.pop();
                        break;
                    }
                }
            }
        }
        problems
    }
}

/// The edges of the control plane's service graph over `window`.
async fn graph_edges(client: &Client, window: Duration) -> Result<Vec<Value>> {
    let g = client
        .call(
            "GET",
            &format!("/v1/graph?window_secs={}", window.as_secs().max(1)),
            None,
        )
        .await
        .map_err(|e| anyhow!("graph: {e}"))?;
    Ok(g["edges"].as_array().cloned().unwrap_or_default())
}

/// The edges that only had denies in the window (`source → destination`).
async fn denied_edges(client: &Client, window: Duration) -> Result<Vec<(String, String)>> {
    let edges = graph_edges(client, window).await?;
    Ok(edges
        .iter()
        .filter(|e| e["allowed"] == 0 && e["denied"].as_u64().unwrap_or(0) > 0)
        .map(|e| {
            (
                e["source"].as_str().unwrap_or("").to_owned(),
                e["destination"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

async fn allowed_on(
    client: &Client,
    window: Duration,
    edges: &[(String, String)],
) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for e in &graph_edges(client, window).await? {
        let k = (
            e["source"].as_str().unwrap_or("").to_owned(),
            e["destination"].as_str().unwrap_or("").to_owned(),
        );
        if edges.contains(&k) {
            out.insert(
                format!("{} → {}", k.0, k.1),
                e["allowed"].as_u64().unwrap_or(0),
            );
        }
    }
    Ok(out)
}

fn judge_probe(
    e: &ExpectSpec,
    probe: &Probe,
    phase: &str,
    samples: &[Sample],
    checks: &mut Vec<Check>,
) {
    let n = samples.len();
    let failed = samples.iter().filter(|s| s.failed(probe.expect)).count();
    if let Some(max) = e.max_error_percent {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let pct = if n == 0 {
            100.0
        } else {
            failed as f64 * 100.0 / n as f64
        };
        checks.push(Check {
            phase: phase.into(),
            expectation: match probe.expect {
                Some(st) => format!("{}: answers other than {st} ≤ {max}%", probe.name),
                None => format!("{}: error rate ≤ {max}%", probe.name),
            },
            measured: format!("{pct:.1}% ({failed} of {n})"),
            passed: n > 0 && pct <= max,
        });
    }
    if let Some(max) = &e.max_p99 {
        let v = p99(samples);
        checks.push(Check {
            phase: phase.into(),
            expectation: format!(
                "{}: p99 ≤ {}",
                probe.name,
                humantime::format_duration(max.0)
            ),
            measured: v.map_or("no samples".into(), |d| format!("{} ms", d.as_millis())),
            passed: v.is_some_and(|d| d <= max.0),
        });
    }
}

/// The workloads the control plane has a not-ready report for (`None`: it does not
/// answer, e.g. while it restarts after a `stopControlPlane` step).
async fn not_ready(client: &Client) -> Option<std::collections::BTreeSet<String>> {
    let st = client.call("GET", "/v1/status", None).await.ok()?;
    Some(
        st["not_ready"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["workload"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Waits, at most `limit`, until the mesh is back in its steady state: every probe has had
/// a whole second without an error (its samples answered), and the control plane reports
/// no workload not ready beyond those it reported before the drill (`baseline`) — a
/// stopped app that serves again is ready for its callers before the next step starts.
/// How long it took.
async fn recovered(
    probes: &[Arc<Probe>],
    since: Instant,
    limit: Duration,
    client: &Client,
    baseline: &std::collections::BTreeSet<String>,
) -> Option<Duration> {
    let mut answering: Option<Duration> = None;
    let mut waited_ready = false;
    loop {
        let now = Instant::now();
        // A sample counts once answered or timed out: look at those sent a timeout ago.
        let ok = probes.iter().all(|p| {
            let end = now.checked_sub(p.timeout).unwrap_or(since);
            let start = end.checked_sub(Duration::from_secs(1)).unwrap_or(since);
            start >= since && {
                let w = p.window(start, end);
                !w.is_empty() && w.iter().all(|s| !s.failed(p.expect))
            }
        });
        if ok && answering.is_none() {
            // The probes recovered by the start of that clean second.
            let back =
                probes.iter().map(|p| p.timeout).max().unwrap_or_default() + Duration::from_secs(1);
            answering = Some(now.duration_since(since).saturating_sub(back));
        }
        if let Some(t) = answering {
            if not_ready(client)
                .await
                .is_some_and(|n| n.is_subset(baseline))
            {
                // Ready at the first look: the probes' time is the recovery's; else the
                // time readiness was seen.
                return Some(if waited_ready {
                    now.duration_since(since)
                } else {
                    t
                });
            }
            waited_ready = true;
        }
        if now.duration_since(since) > limit + Duration::from_secs(3) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The address a probe or flood sends to: `address`, or the upstream listener of `from`'s
/// sidecar for its call `to` in a mesh of `meshward up`.
fn resolve(
    file: &str,
    field: &str,
    address: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    up: Option<&UpState>,
) -> Result<SocketAddr> {
    Ok(match (address, from, to, up) {
        (Some(a), ..) => a
            .parse()
            .map_err(|e| anyhow!("{}: {field}.address: `{a}`: {e}", file))?,
        (None, Some(from), Some(to), Some(u)) => {
            let w = u.workloads.iter().find(|w| w.id == *from).ok_or_else(|| {
                anyhow!(
                    "{}: {field}.from: no workload `{from}` in the mesh (workloads: {})",
                    file,
                    u.workloads
                        .iter()
                        .map(|w| w.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            let (svc, port) = to
                .rsplit_once(':')
                .and_then(|(s, p)| Some((s, p.parse::<u16>().ok()?)))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: {field}.to: `{to}` is not `namespace/service:port`",
                        file
                    )
                })?;
            w.upstreams
                .iter()
                .find(|x| x.service == svc && x.port == port)
                .map(|x| x.listen)
                .ok_or_else(|| {
                    anyhow!(
                        "{}: {field}.to: {from} does not call {to} (its calls: {})",
                        file,
                        w.upstreams
                            .iter()
                            .map(|x| format!("{}:{}", x.service, x.port))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?
        }
        _ => bail!(
            "{}: {field}: `from`/`to` need a mesh of `meshward up`: pass --mesh DIR (or give `address`)",
            file
        ),
    })
}

/// The workloads behind `to` (`namespace/service[:port]`) in the repository `meshward up`
/// applied for `mesh`; `to` itself when it names no service (a workload).
fn members(mesh: Option<&Path>, to: &str) -> Vec<String> {
    let id = to.rsplit_once(':').map_or(to, |(s, _)| s);
    let set = mesh.and_then(|d| meshward_policy::load_path(&d.join(".meshward").join("repo")).set);
    set.and_then(|set| {
        let svc = set.services.iter().find(|s| s.id.to_string() == id)?;
        Some(
            svc.workloads
                .iter()
                .filter_map(|&i| set.workloads.get(i))
                .map(|w| w.id.to_string())
                .collect(),
        )
    })
    .unwrap_or_else(|| vec![id.to_owned()])
}

/// The records proxies said they lost, as the control plane counts them.
async fn records_lost(client: &Client) -> Result<u64> {
    let v = client
        .call("GET", "/metrics", None)
        .await
        .map_err(|e| anyhow!("metrics: {e}"))?;
    let text = v.as_str().unwrap_or_default();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("meshward_control_decisions_lost_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Requests on record (allowed and denied, weighted) per edge over `window`.
async fn on_record(client: &Client, window: Duration) -> Result<BTreeMap<(String, String), u64>> {
    let edges = graph_edges(client, window).await?;
    let mut out = BTreeMap::new();
    for e in &edges {
        let k = (
            e["source"].as_str().unwrap_or("").to_owned(),
            e["destination"].as_str().unwrap_or("").to_owned(),
        );
        *out.entry(k).or_default() +=
            e["allowed"].as_u64().unwrap_or(0) + e["denied"].as_u64().unwrap_or(0);
    }
    Ok(out)
}

/// `meshward drill run FILE`.
pub fn run(
    conn: &Conn,
    file: &Path,
    mesh: Option<&Path>,
    junit: Option<&Path>,
    output: Output,
) -> Result<ExitCode> {
    let drill = read(file)?;
    let up: Option<UpState> = match mesh {
        Some(dir) => {
            let p = dir.join(".meshward").join("up.json");
            let text = std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "cannot read `{}`: is `meshward up {}` running?",
                    p.display(),
                    dir.display()
                )
            })?;
            Some(serde_json::from_str(&text).with_context(|| format!("`{}`", p.display()))?)
        }
        None => None,
    };
    let client = match &up {
        Some(u) => Conn {
            server: Some(u.control.clone()),
            token_file: Some(u.token_file.clone()),
            ca_file: Some(u.ca_file.clone()),
        }
        .client()?,
        None => conn.client()?,
    };
    let mut probes = vec![];
    for (i, p) in drill.spec.probes.iter().enumerate() {
        let addr = resolve(
            &drill.file,
            &format!("spec.probes[{i}]"),
            p.address.as_deref(),
            p.from.as_deref(),
            p.to.as_deref(),
            up.as_ref(),
        )?;
        let method = p.method.clone().unwrap_or_else(|| "GET".into());
        let path = p.path.clone().unwrap_or_else(|| "/".into());
        let edge = match (&p.from, &p.to) {
            (Some(from), Some(to)) => Some((from.clone(), members(mesh, to))),
            _ => None,
        };
        probes.push(Arc::new(Probe {
            name: p.name.clone(),
            addr,
            request: request(&method, &path, addr, "meshward-drill"),
            rate: p.rate.unwrap_or(20),
            timeout: p.timeout.as_ref().map_or(Duration::from_secs(2), |d| d.0),
            expect: p.expect_status,
            samples: Arc::default(),
            edge,
        }));
    }
    // `meshward up` keeps a second operator for its own approvals: a drill of its mesh uses
    // it for a mesh-wide step (certificateLifetime).
    let approver = match &up {
        Some(u) => {
            let t = u.token_file.with_file_name("up-approver.token");
            if t.exists() {
                Some(
                    Conn {
                        server: Some(u.control.clone()),
                        token_file: Some(t),
                        ca_file: Some(u.ca_file.clone()),
                    }
                    .client()?,
                )
            } else {
                None
            }
        }
        None => None,
    };
    let mut floods = vec![];
    for (i, step) in drill.spec.steps.iter().enumerate() {
        floods.push(match &step.flood {
            None => None,
            Some(f) => {
                let addr = resolve(
                    &drill.file,
                    &format!("spec.steps[{i}].flood"),
                    f.address.as_deref(),
                    f.from.as_deref(),
                    f.to.as_deref(),
                    up.as_ref(),
                )?;
                let method = f.method.clone().unwrap_or_else(|| "GET".into());
                let path = f.path.clone().unwrap_or_else(|| "/".into());
                let target = match (&f.from, &f.to) {
                    (Some(a), Some(b)) => format!("{b} from {a} ({method} {path})"),
                    _ => format!("{addr} ({method} {path})"),
                };
                Some(Arc::new(Flood {
                    target,
                    addr,
                    request: request(&method, &path, addr, "meshward-drill-flood"),
                    rate: f.rate,
                    sent: AtomicU64::new(0),
                    ok: AtomicU64::new(0),
                    limited: AtomicU64::new(0),
                    refused: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                }))
            }
        });
    }
    let text = output == Output::Text;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runner = Runner {
        client,
        floods,
        steps: vec![],
        approver,
        hooks: up.as_ref().map(|u| u.hooks.clone()),
        drill_name: drill.name.clone(),
        namespace: drill.namespace.clone(),
        text,
        undo: vec![],
    };
    let started = Instant::now();
    let (checks, problems, interrupted) = rt.block_on(async {
        let tasks: Vec<_> = probes
            .iter()
            .map(|p| tokio::spawn(p.clone().run()))
            .collect();
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        let mut checks = vec![];
        let body = async { drive(&drill, &probes, &mut runner, &mut checks, started).await };
        let (r, interrupted) = tokio::select! {
            r = body => (r, false),
            _ = &mut interrupt => (Ok(()), true),
        };
        if interrupted {
            runner.say("interrupted: undoing what the drill changed");
        }
        let mut problems = runner.undo_all().await;
        for t in tasks {
            t.abort();
        }
        if let Err(e) = r {
            problems.insert(0, format!("{e:#}"));
        }
        (checks, problems, interrupted)
    });
    let passed = checks.iter().filter(|c| c.passed).count();
    let failed = checks.len() - passed;
    if let Some(path) = junit {
        std::fs::write(
            path,
            junit_xml(&drill, &checks, &problems, started.elapsed()),
        )
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    match output {
        Output::Json | Output::Yaml => println!(
            "{}",
            output
                .doc(&json!({
                    "drill": format!("{}/{}", drill.namespace, drill.name),
                    "checks": checks,
                    "steps": runner.steps,
                    "passed": passed,
                    "failed": failed,
                    "errors": problems,
                    "interrupted": interrupted,
                }))
                .unwrap_or_default()
        ),
        Output::Text => {
            for p in &problems {
                eprintln!("error: {p}");
            }
            println!("{passed} passed, {failed} failed");
        }
    }
    Ok(if failed == 0 && problems.is_empty() && !interrupted {
        ExitCode::SUCCESS
    } else if interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::from(1)
    })
}

async fn drive(
    drill: &Drill,
    probes: &[Arc<Probe>],
    r: &mut Runner,
    checks: &mut Vec<Check>,
    started: Instant,
) -> Result<()> {
    let steady = drill
        .spec
        .steady
        .as_ref()
        .map_or(Duration::from_secs(5), |d| d.0);
    let wants_denied = drill
        .spec
        .expect
        .iter()
        .any(|e| e.denied_stays_denied.is_some());
    let total = drill.spec.steps.len();
    r.say(&format!(
        "drill {}/{} ({}): {} probes, {total} steps",
        drill.namespace,
        drill.name,
        drill.file,
        probes.len()
    ));
    let wants_records = drill
        .spec
        .expect
        .iter()
        .any(|e| e.no_lost_records.is_some());
    let lost_before = if wants_records {
        records_lost(&r.client).await?
    } else {
        0
    };
    let denied = if wants_denied {
        let d = denied_edges(&r.client, Duration::from_secs(300)).await?;
        r.say(&format!(
            "  denied edges before the drill: {}",
            if d.is_empty() {
                "none".into()
            } else {
                d.iter()
                    .map(|(s, t)| format!("{s} → {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        d
    } else {
        vec![]
    };
    let report = |r: &Runner, checks: &[Check], from: usize| {
        for c in &checks[from..] {
            r.say(&format!(
                "  {} {}: {} (measured {})",
                if c.passed { "PASS" } else { "FAIL" },
                c.phase,
                c.expectation,
                c.measured
            ));
        }
    };
    // Steady state.
    r.say(&format!(
        "[0/{total}] steady state for {}",
        humantime::format_duration(steady)
    ));
    let t0 = Instant::now();
    tokio::time::sleep(steady).await;
    let t1 = Instant::now();
    answered(probes).await;
    let mut from = checks.len();
    for e in &drill.spec.expect {
        if let Some(p) = probes.iter().find(|p| Some(&p.name) == e.probe.as_ref()) {
            judge_probe(e, p, "steady state", &p.window(t0, t1), checks);
        }
    }
    report(r, checks, from);
    if checks.iter().any(|c| !c.passed) {
        bail!(
            "the mesh is not in a steady state before the drill: fix that first (the drill made no change)"
        );
    }
    // What was not ready before the drill is not the drill's to restore.
    let baseline = not_ready(&r.client).await.unwrap_or_default();
    for (i, step) in drill.spec.steps.iter().enumerate() {
        r.say(&format!(
            "[{}/{total}] {} for {}",
            i + 1,
            step.name,
            humantime::format_duration(step.duration.0)
        ));
        let said = r.start(i, step, drill).await?;
        r.say(&format!("  {said}"));
        let s0 = Instant::now();
        tokio::time::sleep(step.duration.0).await;
        let s1 = Instant::now();
        let undone = r.undo_one().await?;
        r.say(&format!("  {undone}"));
        r.steps
            .push(json!({"step": step.name, "did": said, "undone": undone}));
        let u = Instant::now();
        // Samples sent during the step, once answered.
        answered(probes).await;
        from = checks.len();
        for e in &drill.spec.expect {
            if let Some(p) = probes.iter().find(|p| Some(&p.name) == e.probe.as_ref()) {
                judge_probe(e, p, &step.name, &p.window(s0, s1), checks);
            }
        }
        // Back to the steady state before the next step (at most the expectation's
        // limit, else 10 s), judged when expected.
        let limit = drill
            .spec
            .expect
            .iter()
            .find_map(|e| e.recover_within.as_ref().map(|l| l.0))
            .unwrap_or(Duration::from_secs(10));
        let took = recovered(probes, u, limit, &r.client, &baseline).await;
        for e in &drill.spec.expect {
            if let Some(limit) = &e.recover_within {
                checks.push(Check {
                    phase: step.name.clone(),
                    expectation: format!(
                        "every probe recovers within {}",
                        humantime::format_duration(limit.0)
                    ),
                    measured: took.map_or(
                        format!("not within {}", humantime::format_duration(limit.0)),
                        |d| format!("{} ms", d.as_millis()),
                    ),
                    passed: took.is_some_and(|d| d <= limit.0),
                });
            }
        }
        report(r, checks, from);
    }
    // The closing steady window.
    r.say(&format!(
        "[after] steady state for {}",
        humantime::format_duration(steady)
    ));
    let t0 = Instant::now();
    tokio::time::sleep(steady).await;
    let t1 = Instant::now();
    answered(probes).await;
    from = checks.len();
    for e in &drill.spec.expect {
        if let Some(p) = probes.iter().find(|p| Some(&p.name) == e.probe.as_ref()) {
            judge_probe(e, p, "after", &p.window(t0, t1), checks);
        }
    }
    if wants_denied || wants_records {
        // Records reach the control plane within a second or two.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if wants_records {
        let records = on_record(&r.client, started.elapsed() + Duration::from_secs(1)).await?;
        let lost = records_lost(&r.client).await?.saturating_sub(lost_before);
        for p in probes {
            let answered = p
                .window(started, Instant::now())
                .iter()
                .filter(|s| s.status.is_some())
                .count() as u64;
            let (measured, passed) = match &p.edge {
                None => (
                    "not checked: the probe names an address, not an edge (`from`/`to`)".to_owned(),
                    true,
                ),
                Some((from, to)) => {
                    let kept: u64 = records
                        .iter()
                        .filter(|((s, d), _)| s == from && to.contains(d))
                        .map(|(_, n)| n)
                        .sum();
                    (
                        format!(
                            "{answered} answered, {kept} on record on {from} → {}, {lost} counted as lost",
                            to.join("|")
                        ),
                        kept + lost >= answered,
                    )
                }
            };
            checks.push(Check {
                phase: "whole drill".into(),
                expectation: format!("no decision record of probe {} lost uncounted", p.name),
                measured,
                passed,
            });
        }
    }
    if wants_denied {
        let allowed = allowed_on(
            &r.client,
            started.elapsed() + Duration::from_secs(1),
            &denied,
        )
        .await?;
        let leaked: u64 = allowed.values().sum();
        checks.push(Check {
            phase: "whole drill".into(),
            expectation: "denied edges stay denied".into(),
            measured: if denied.is_empty() {
                "no denied edge to watch".into()
            } else {
                format!(
                    "{leaked} allowed on {} denied edge(s){}",
                    denied.len(),
                    if leaked > 0 {
                        format!(": {allowed:?}")
                    } else {
                        String::new()
                    }
                )
            },
            passed: leaked == 0,
        });
    }
    report(r, checks, from);
    Ok(())
}

/// Waits until every request sent so far has been answered or timed out.
async fn answered(probes: &[Arc<Probe>]) {
    tokio::time::sleep(probes.iter().map(|p| p.timeout).max().unwrap_or_default()).await;
}

fn junit_xml(d: &Drill, checks: &[Check], problems: &[String], took: Duration) -> String {
    use meshward_policy::scenario::xml_escape as x;
    use std::fmt::Write as _;
    let failures = checks.iter().filter(|c| !c.passed).count();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites name=\"meshward drill\" tests=\"{}\" failures=\"{failures}\" errors=\"{}\" time=\"{:.3}\">",
        checks.len() + problems.len(),
        problems.len(),
        took.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"{}/{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{}\" time=\"{:.3}\" file=\"{}\">",
        x(&d.namespace),
        x(&d.name),
        checks.len() + problems.len(),
        problems.len(),
        took.as_secs_f64(),
        x(&d.file)
    );
    for c in checks {
        let _ = write!(
            s,
            "    <testcase classname=\"{}\" name=\"{}\"",
            x(&c.phase),
            x(&c.expectation)
        );
        if c.passed {
            let _ = writeln!(
                s,
                "><system-out>measured {}</system-out></testcase>",
                x(&c.measured)
            );
        } else {
            let _ = writeln!(
                s,
                "><failure message=\"measured {}\"/></testcase>",
                x(&c.measured)
            );
        }
    }
    for p in problems {
        let _ = writeln!(
            s,
            "    <testcase classname=\"drill\" name=\"run\"><error message=\"{}\"/></testcase>",
            x(p)
        );
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}
