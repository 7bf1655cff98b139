//! `meshward up DIR`: a whole local mesh in one command — a control plane with its
//! embedded store in `DIR/.meshward/`, the policies applied, a sidecar per workload joined
//! with a one-time token, each app started, and a table of what runs where. Ctrl-C stops
//! everything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use meshward_control::client::Client;
use meshward_identity::ca::certs_from_pem;
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;
use meshward_proxy::agent::AgentConfig;
use meshward_proxy::outbound::Upstream;
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshFile {
    trust_domain: String,
    workloads: Vec<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    name: String,
    namespace: String,
    /// The app's port (it listens on 127.0.0.1:PORT).
    port: u16,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    /// The app's command; default: the built-in demo app.
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    calls: Vec<CallEntry>,
    /// Run this many replicas (workloads `NAME-0`, `NAME-1`, … of service account `NAME`,
    /// each app on its own loopback address `127.0.0.1`, `127.0.0.2`, …); default 1 (the
    /// workload is `NAME`).
    #[serde(default)]
    replicas: Option<u8>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CallEntry {
    /// `namespace/name` of a Service.
    service: String,
    port: u16,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    every: Option<String>,
    /// The loopback port the app calls this upstream on (default: any free port).
    #[serde(default)]
    listen: Option<u16>,
}

/// A loopback port nothing listens on, for a listener opened a moment later by a child or
/// a sidecar. Chosen below the kernel's ephemeral range when there is room: a port from
/// `bind(:0)` is in that range, and another program's outgoing connection can take it as
/// its source port before our listener binds it ("address in use": a sidecar that never
/// became ready when two meshes started at once).
fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    const FROM: u32 = 20_000;
    if low > FROM + 1_000 {
        let span = low - FROM;
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        for _ in 0..200 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = FROM + seed.wrapping_add(n.wrapping_mul(7_919)) % span;
            let port = u16::try_from(port).unwrap_or(0);
            if port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn read_mesh(dir: &Path) -> Result<MeshFile> {
    let file = dir.join("mesh.yaml");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "cannot read `{}` (a mesh directory has mesh.yaml and policies/)",
            file.display()
        )
    })?;
    let docs = meshward_policy::yaml::parse_documents(&text).map_err(|e| {
        anyhow!(
            "{}:{}:{}: {}",
            file.display(),
            e.span.line,
            e.span.col,
            e.message
        )
    })?;
    let doc = docs
        .first()
        .with_context(|| format!("`{}` is empty", file.display()))?;
    meshward_policy::yaml::from_node(doc).map_err(|e| {
        let at = e
            .span
            .map(|s| format!("{}:{}", s.line, s.col))
            .unwrap_or_default();
        anyhow!(
            "{}:{at}: {} (field `{}`){}",
            file.display(),
            e.message,
            meshward_policy::yaml::path_string(&e.path),
            e.help.map(|h| format!("; {h}")).unwrap_or_default()
        )
    })
}

/// `--isolated`: the network the workloads' namespaces share.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// `A.B.C.0/24`.
    pub subnet: String,
    pub bridge: String,
}

impl Isolation {
    /// `A.B.C` of the /24.
    fn prefix(&self) -> Result<String> {
        let net = self
            .subnet
            .strip_suffix(".0/24")
            .filter(|p| format!("{p}.0").parse::<std::net::Ipv4Addr>().is_ok())
            .with_context(|| format!("--subnet `{}`: write an A.B.C.0/24 network", self.subnet))?;
        Ok(net.to_owned())
    }

    fn netns(&self, id: &WorkloadRef) -> String {
        format!("{}-{}-{}", self.bridge, id.namespace, id.name)
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !o.status.success() {
        bail!(
            "`ip {}` failed: {} (--isolated needs root)",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// The bridge and namespaces of `--isolated`; removed when dropped (and, left over from an
/// earlier run that was killed, before a new one starts).
#[derive(Debug)]
struct IsolatedNet {
    bridge: String,
    namespaces: Vec<String>,
}

impl IsolatedNet {
    fn clean(bridge: &str) {
        let list = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output();
        if let Ok(o) = list {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                let name = l.split_whitespace().next().unwrap_or("");
                if name.starts_with(&format!("{bridge}-")) {
                    let _ = ip(&["netns", "del", name]);
                }
            }
        }
        let _ = ip(&["link", "del", bridge]);
    }
}

impl Drop for IsolatedNet {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

struct Plan {
    entry: Entry,
    id: WorkloadRef,
    /// The service account (identity) it runs as: the entry's name.
    sa: String,
    /// Where its app listens (explicit mode): a loopback address of its own per replica.
    app_host: std::net::Ipv4Addr,
    inbound: SocketAddr,
    admin: SocketAddr,
    upstreams: Vec<(SocketAddr, Upstream, CallEntry)>,
}

fn step(n: usize, total: usize, msg: &str) {
    println!("[{n}/{total}] {msg}");
}

/// Makes this process the one `meshward up` of the mesh whose state is `state`: refused
/// while another one (its pid in `up.pid`, alive and a meshward process) runs it, since a
/// second run would rewrite the repository and the ports under the first one's feet.
fn claim(state: &Path) -> Result<()> {
    std::fs::create_dir_all(state)?;
    let pid_file = state.join("up.pid");
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&p| p != std::process::id())
    {
        let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("meshward"));
        if alive {
            let control = std::fs::read_to_string(state.join("up.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["control"].as_str().map(str::to_owned))
                .map(|c| format!(", its control plane on {c}"))
                .unwrap_or_default();
            bail!(
                "a `meshward up` (pid {pid}{control}) is already running the mesh of `{}`: use that one, or stop it first (Ctrl-C in its terminal, or `kill -INT {pid}`) and run again",
                state.parent().unwrap_or(state).display()
            );
        }
    }
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write `{}`", pid_file.display()))?;
    Ok(())
}

pub fn run(dir: &Path, isolated: Option<Isolation>) -> Result<ExitCode> {
    let mesh = read_mesh(dir)?;
    let prefix = match &isolated {
        Some(i) => {
            if i.bridge.len() > 12 {
                bail!("--bridge `{}`: at most 12 characters", i.bridge);
            }
            Some(i.prefix()?)
        }
        None => None,
    };
    let td = TrustDomain::parse(&mesh.trust_domain)
        .map_err(|e| anyhow!("mesh.yaml trustDomain: {e}"))?;
    let state = dir.join(".meshward");
    claim(&state)?;
    let repo = state.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo)?;
    const TOTAL: usize = 5;

    // 1. Plan ports and write the policy repository (policies/ + generated workloads).
    let mut plans = vec![];
    let mut entries = vec![];
    for e in mesh.workloads {
        match e.replicas {
            None | Some(1) => entries.push((e.name.clone(), 0u8, e)),
            Some(n) if (2..=8).contains(&n) => {
                for i in 0..n {
                    let mut r = e.clone();
                    r.name = format!("{}-{i}", e.name);
                    r.replicas = None;
                    entries.push((e.name.clone(), i, r));
                }
            }
            Some(n) => bail!(
                "mesh.yaml: workload {}/{}: replicas {n}: run 1 to 8",
                e.namespace,
                e.name
            ),
        }
    }
    for (sa, replica, e) in entries {
        let id = WorkloadRef {
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        };
        let mut ups = vec![];
        for c in &e.calls {
            let service = WorkloadRef::parse(&c.service)
                .map_err(|m| anyhow!("mesh.yaml: workload {id}: {m}"))?;
            let listen = SocketAddr::from(([127, 0, 0, 1], c.listen.map_or_else(free_port, Ok)?));
            ups.push((
                listen,
                Upstream {
                    service,
                    port: c.port,
                },
                CallEntry {
                    service: c.service.clone(),
                    port: c.port,
                    method: c.method.clone(),
                    path: c.path.clone(),
                    every: c.every.clone(),
                    listen: c.listen,
                },
            ));
        }
        let inbound = match &prefix {
            Some(p) => format!("{p}.{}:{}", 10 + plans.len(), e.port).parse()?,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        plans.push(Plan {
            id,
            sa,
            app_host: std::net::Ipv4Addr::new(127, 0, 0, 1 + replica),
            inbound,
            admin: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            upstreams: ups,
            entry: e,
        });
    }
    let mut files: Vec<(String, String)> = vec![];
    let pol = dir.join("policies");
    for f in meshward_policy::model::yaml_files(&pol)
        .with_context(|| format!("cannot read `{}`", pol.display()))?
    {
        let name = f.strip_prefix(&pol).unwrap_or(&f).display().to_string();
        files.push((name, std::fs::read_to_string(&f)?));
    }
    let mut generated = String::from("# Generated by `meshward up` from mesh.yaml.\n");
    for p in &plans {
        let e = &p.entry;
        let proto = serde_json::to_value(e.protocol.unwrap_or(Protocol::Http))?;
        // Explicit mode: the sidecar's loopback port; isolated: the workload's address.
        let (where_, addr) = if prefix.is_some() {
            (String::new(), format!("  address: {}\n", p.inbound.ip()))
        } else {
            (format!(", inbound: \"{}\"", p.inbound), String::new())
        };
        generated.push_str(&format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: {}, namespace: {}, labels: {}}}\nspec:\n  serviceAccount: {}\n  attributes: {}\n{addr}  ports: [{{port: {}, protocol: {}{where_}}}]\n",
            e.name,
            e.namespace,
            serde_json::to_string(&e.labels)?,
            p.sa,
            serde_json::to_string(&e.attributes)?,
            e.port,
            proto.as_str().unwrap_or("HTTP"),
        ));
    }
    files.push(("workloads.generated.yaml".into(), generated));
    for (n, t) in &files {
        let path = repo.join(n);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, t)?;
    }
    let loaded = meshward_policy::load_path(&repo);
    let mut diags = meshward_policy::lint::errors(&loaded, std::time::SystemTime::now());
    if !diags.is_empty() {
        // Point at the user's files, not at their copies in the combined repository; the
        // generated workloads say where they come from.
        let mut sources = meshward_policy::diag::Sources::default();
        let shown = |name: &str| -> String {
            if name == "workloads.generated.yaml" {
                format!(
                    "{} (generated from {})",
                    repo.join(name).display(),
                    dir.join("mesh.yaml").display()
                )
            } else {
                pol.join(name).display().to_string()
            }
        };
        for (n, t) in &files {
            sources.insert(shown(n).into(), t.as_str().into());
        }
        for d in &mut diags {
            if let Ok(rel) = Path::new(&*d.file).strip_prefix(&repo) {
                d.file = shown(&rel.to_string_lossy()).into();
            }
        }
        eprint!("{}", meshward_policy::diag::render_text(&diags, &sources));
        bail!(
            "the mesh's policies have errors (the combined repository is in `{}`)",
            repo.display()
        );
    }
    step(
        1,
        TOTAL,
        &format!(
            "policies: {} files, lint clean ({})",
            files.len(),
            repo.display()
        ),
    );

    // --isolated: a namespace per workload on a bridge, all its TCP captured.
    let mut targets: Vec<Vec<String>> = vec![];
    let _net = match (&isolated, &prefix) {
        (Some(iso), Some(p)) => {
            let set = loaded.set.as_ref().context("no policy set")?;
            for plan in &plans {
                let mut t = vec![];
                for (_, up, _) in &plan.upstreams {
                    t.push(call_target(set, up).with_context(|| {
                        format!(
                            "workload {}: the service {} has no address to call",
                            plan.id, up.service
                        )
                    })?);
                }
                targets.push(t);
            }
            let net = isolate(iso, p, &plans, set)?;
            println!(
                "      network: bridge {} {p}.1/24, {} namespaces, all TCP captured by the sidecars",
                iso.bridge,
                net.namespaces.len()
            );
            Some(net)
        }
        _ => None,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // 2. The control plane: `meshward control` as a child process on fixed ports, so a
        //    drill can stop it and start it again where proxies look for it.
        let data = state.join("data");
        let exe = std::env::current_exe()?;
        let api: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let proxy_api: SocketAddr = match &prefix {
            Some(p) => format!("{p}.1:{}", free_port()?).parse()?,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let http = Some(http_addr);
        let mut control_cmd = tokio::process::Command::new(&exe);
        control_cmd.env("MESHWARD_LOG_FORMAT", crate::LOG_FORMAT.get().copied().unwrap_or("text"));
        control_cmd
            .arg("control")
            .arg("--data")
            .arg(&data)
            .args(["--trust-domain", td.as_str()])
            .args(["--listen", &api.to_string(), "--proxy-listen", &proxy_api.to_string(), "--http-listen", &http_addr.to_string()])
            .args(["--controller-interval", "5s"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut control = control_cmd.spawn().context("cannot start the control plane (`meshward control`)")?;
        let t0 = Instant::now();
        while !(tokio::net::TcpStream::connect(api).await.is_ok() && data.join("admin.token").exists()) {
            if let Some(status) = control.try_wait()? {
                // Its own error (a port taken, a bad data directory) is printed above.
                bail!("the control plane exited ({status}) before it answered on {api}: see its error above");
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("the control plane did not start within 20s (`meshward control --data {}`)", data.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let control = Arc::new(tokio::sync::Mutex::new(Control { cmd: control_cmd, child: Some(control), stops: 0 }));
        if !data.join("up-approver.token").exists() {
            meshward_control::server::add_operator(&data, "up-approver", vec!["platform-security".into()], vec![]).map_err(anyhow::Error::msg)?;
        }
        let roots = certs_from_pem(&std::fs::read_to_string(data.join("bundle.pem"))?);
        let token = |who: &str| std::fs::read_to_string(data.join(format!("{who}.token"))).map(|t| t.trim().to_owned());
        let admin = Client::new(&api.to_string(), &td, roots.clone(), Some(token("admin")?), None)?;
        let approver = Client::new(&api.to_string(), &td, roots.clone(), Some(token("up-approver")?), None)?;
        step(2, TOTAL, &format!("control plane on {api} (proxy API {proxy_api}), store in {}", data.display()));

        // 3. Apply (and, for mesh-wide resources, approve as the second local operator).
        let r = admin.call("POST", "/v1/apply", Some(&json!({"files": files, "reason": "meshward up"}))).await.map_err(|e| anyhow!("apply: {e}"))?;
        let rev = match r["status"].as_str() {
            Some("pending_approval") => {
                let a = approver.call("POST", "/v1/approve", Some(&json!({"proposal": r["proposal"]}))).await.map_err(|e| anyhow!("approve: {e}"))?;
                a["revision"].as_u64().unwrap_or(0)
            }
            _ => r["revision"].as_u64().unwrap_or(0),
        };
        step(3, TOTAL, &format!("policies applied: revision {rev}"));

        // 4. Sidecars, joined with one-time tokens.
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<String, String>>(plans.len() * 2);
        let mut sidecars = vec![];
        let mut in_process: Vec<Sidecar> = vec![];
        for p in &plans {
            let identity = SpiffeId::workload(&td, &p.id.namespace, &p.sa).map_err(|e| anyhow!("{e}"))?;
            let t = admin.call("POST", "/v1/tokens", Some(&json!({"identity": identity.to_string(), "ttl_secs": 600}))).await.map_err(|e| anyhow!("token: {e}"))?;
            let pdir = state.join("proxies").join(format!("{}-{}", p.id.namespace, p.id.name));
            if let Some(iso) = &isolated {
                // A sidecar process inside the workload's namespace, in transparent mode.
                let _ = std::fs::remove_dir_all(&pdir);
                std::fs::create_dir_all(&pdir)?;
                let token = pdir.join("join.token");
                meshward_identity::ca::write_atomic(&token, t["token"].as_str().unwrap_or_default().as_bytes(), true)?;
                let mut c = tokio::process::Command::new("ip");
                c.env("MESHWARD_LOG_FORMAT", crate::LOG_FORMAT.get().copied().unwrap_or("text"));
                c.args(["netns", "exec", &iso.netns(&p.id)]).arg(&exe)
                    .args(["proxy", "--transparent", "--workload", &p.id.to_string(), "--identity", &identity.to_string(), "--control", &proxy_api.to_string(), "--ca-file"])
                    .arg(data.join("bundle.pem"))
                    .arg("--join-token-file").arg(&token)
                    .arg("--state-dir").arg(&pdir)
                    .arg("--decision-log").arg(pdir.join("decisions.jsonl"))
                    .args(["--sample-allows", "1", "--admin", "127.0.0.1:15000"])
                    .args(std::env::var("MESHWARD_OTLP_ENDPOINT").map(|e| vec!["--otlp-endpoint".to_owned(), e]).unwrap_or_default())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true);
                let mut child = c.spawn().with_context(|| format!("cannot start the sidecar of {}", p.id))?;
                let stdout = child.stdout.take().context("no stdout")?;
                let (tx, name) = (ready_tx.clone(), p.id.to_string());
                tokio::spawn(async move {
                    use tokio::io::AsyncBufReadExt as _;
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l.contains("ready") {
                            let _ = tx.try_send(Ok(name.clone()));
                        }
                    }
                });
                sidecars.push(child);
                continue;
            }
            let opts = meshward_proxy::run::Options {
                workload: p.id.clone(),
                agent: AgentConfig {
                    control: proxy_api.to_string(),
                    trust_domain: td.clone(),
                    control_roots: roots.clone(),
                    identity,
                    join_token: t["token"].as_str().map(str::to_owned),
                    state_dir: pdir.clone(),
                    mark: None,
                },
                upstreams: p.upstreams.iter().map(|(a, u, _)| (*a, u.clone())).collect(),
                admin: p.admin,
                decision_log: Some(pdir.join("decisions.jsonl")),
                sample_allows: 1,
                ship_queue: 2_000,
                ship_allows_per_second: 500,
                otlp_endpoint: std::env::var("MESHWARD_OTLP_ENDPOINT").ok(),
                telemetry: true,
                upstream_protocol: meshward_proxy::pool::UpstreamProtocol::Tunnel,
                transparent: None,
                limits: meshward_proxy::listener::Limits::defaults(),
        workers: 1,
        app_host: p.app_host.into(),
        // Callers pass over a replica whose app stopped (the quickstart shows it).
        app_probe: Some(Duration::from_secs(1)),
        drain: None,
            };
            let (tx, name) = (ready_tx.clone(), p.id.to_string());
            let ready = {
                let (tx, name) = (tx.clone(), name.clone());
                move || {
                    let _ = tx.try_send(Ok(name));
                }
            };
            let stop = run_sidecar(opts.clone(), ready, move |e| {
                let _ = tx.try_send(Err(format!("the sidecar of {name} stopped: {e}")));
            })?;
            in_process.push(Sidecar {
                id: p.id.to_string(),
                opts,
                stop: Some(stop),
                stops: 0,
            });
        }
        let in_process = Arc::new(tokio::sync::Mutex::new(in_process));
        let start = Instant::now();
        for i in 0..plans.len() {
            let name = tokio::time::timeout(Duration::from_secs(30).saturating_sub(start.elapsed()), ready_rx.recv())
                .await
                .context("a sidecar did not become ready within 30s")?
                .unwrap_or_else(|| Ok(String::new()))
                .map_err(anyhow::Error::msg)?;
            println!("      sidecar {}/{} ready: {name}", i + 1, plans.len());
        }
        step(4, TOTAL, "sidecars ready");

        // 5. The apps (isolated: in their namespaces, on all addresses, calling the
        // services' addresses directly — the sidecar captures it).
        let children = sidecars;
        let mut app_pids = vec![];
        let mut apps = vec![];
        for (i, p) in plans.iter().enumerate() {
            let e = &p.entry;
            let called: Vec<String> = match &isolated {
                Some(_) => targets[i].clone(),
                None => p.upstreams.iter().map(|(l, _, _)| l.to_string()).collect(),
            };
            let program: Vec<String> = if e.command.is_empty() {
                let listen = if isolated.is_some() { format!("0.0.0.0:{}", e.port) } else { format!("{}:{}", p.app_host, e.port) };
                let mut c = vec![exe.display().to_string(), "demo-app".into(), "--listen".into(), listen, "--name".into(), p.id.to_string()];
                for ((_, _, call), target) in p.upstreams.iter().zip(&called) {
                    if let Some(path) = &call.path {
                        c.push("--call".into());
                        c.push(format!("{}=http://{target}{path}@{}", call.method.clone().unwrap_or_else(|| "GET".into()), call.every.clone().unwrap_or_else(|| "2s".into())));
                    }
                }
                c
            } else {
                e.command.clone()
            };
            let mut cmd = match &isolated {
                Some(iso) => {
                    let mut c = tokio::process::Command::new("ip");
                    c.args(["netns", "exec", &iso.netns(&p.id)]).args(&program);
                    c
                }
                None => {
                    let mut c = tokio::process::Command::new(&program[0]);
                    c.args(&program[1..]);
                    c
                }
            };
            cmd.env("PORT", e.port.to_string()).kill_on_drop(true);
            for ((_, up, _), target) in p.upstreams.iter().zip(&called) {
                cmd.env(format!("MESHWARD_UPSTREAM_{}_{}", up.service.namespace, up.service.name).to_uppercase().replace('-', "_"), target);
            }
            if isolated.is_none()
                && let Err(why) = std::net::TcpListener::bind((p.app_host, e.port))
            {
                // Another process (a previous `meshward up`?) holds it: the app could not
                // listen, and a check that the port answers would be fooled by that process.
                bail!(
                    "the app of {} cannot listen on {}:{} ({why}): another process holds it (`ss -ltnp 'sport = :{}'` shows which); stop it, or change the workload's `port` in {}",
                    p.id, p.app_host, e.port, e.port, dir.join("mesh.yaml").display()
                );
            }
            let child = cmd.spawn().with_context(|| format!("cannot start the app of {}", p.id))?;
            app_pids.push(child.id().unwrap_or(0));
            apps.push(App { id: p.id.to_string(), cmd, child: Some(child), stops: 0, frozen: false });
        }
        for (i, p) in plans.iter().enumerate() {
            let start = Instant::now();
            while !app_listens(isolated.as_ref(), p).await {
                if let Some(status) = apps[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!("the app of {} exited ({status}) before it listened on port {}: see its error above", p.id, p.entry.port);
                }
                if start.elapsed() > Duration::from_secs(15) {
                    bail!("the app of {} does not listen on port {}", p.id, p.entry.port);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        step(5, TOTAL, "apps running");

        // What `meshward drill run --mesh DIR` reads, and the hooks it drives (docs/drills.md).
        let apps = Arc::new(tokio::sync::Mutex::new(apps));
        let sock = state.join("up.sock");
        let _ = std::fs::remove_file(&sock);
        let hooks = tokio::net::UnixListener::bind(&sock).with_context(|| format!("cannot listen on `{}`", sock.display()))?;
        // Only this user may drive the mesh's processes.
        std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        tokio::spawn(serve_hooks(hooks, apps.clone(), control.clone(), in_process.clone()));
        tokio::spawn(watch_apps(apps.clone()));
        // Absolute: a drill runs from anywhere.
        let abs = |p: std::path::PathBuf| std::path::absolute(&p).unwrap_or(p);
        let up_state = json!({
            "control": api.to_string(),
            "ca_file": abs(data.join("bundle.pem")),
            "token_file": abs(data.join("admin.token")),
            "hooks": abs(sock.clone()),
            "workloads": plans.iter().map(|p| json!({
                "id": p.id.to_string(),
                "upstreams": if isolated.is_some() { vec![] } else {
                    p.upstreams.iter().map(|(l, u, _)| json!({"service": u.service.to_string(), "port": u.port, "listen": l})).collect::<Vec<_>>()
                },
            })).collect::<Vec<_>>(),
        });
        meshward_identity::ca::write_atomic(&state.join("up.json"), serde_json::to_string_pretty(&up_state)?.as_bytes(), false)?;

        println!();
        if let Some(iso) = &isolated {
            println!("{:<22} {:<48} {:<20} {:<30} CALLS", "WORKLOAD", "IDENTITY", "ADDRESS", "NETNS");
            for (i, p) in plans.iter().enumerate() {
                let calls: Vec<String> = p.upstreams.iter().zip(&targets[i]).map(|((_, u, _), t)| format!("{}:{}={t}", u.service, u.port)).collect();
                println!(
                    "{:<22} {:<48} {:<20} {:<30} {}",
                    p.id.to_string(),
                    format!("spiffe://{td}/ns/{}/sa/{}", p.id.namespace, p.sa),
                    p.inbound.to_string(),
                    iso.netns(&p.id),
                    if calls.is_empty() { "-".into() } else { calls.join(" ") }
                );
            }
            println!();
            println!("control plane: {api}   (export MESHWARD_SERVER={api} MESHWARD_CA_FILE={} MESHWARD_TOKEN_FILE={})", data.join("bundle.pem").display(), data.join("admin.token").display());
            if let Some(h) = http {
                println!("dashboard:     http://{h}/ui   (sign in with the token in {})   metrics: http://{h}/metrics   terminal: meshward top", data.join("admin.token").display());
            }
            println!("access log:    meshward logs -f --mesh {}   (files: {}/proxies/*/decisions.jsonl)", dir.display(), state.display());
            println!("try: ip netns exec {} curl -s http://ADDRESS/...   (inside a workload: through its sidecar)", plans.first().map(|p| iso.netns(&p.id)).unwrap_or_default());
            println!("mesh is up; Ctrl-C stops it");
        } else {
        println!("{:<22} {:<48} {:<17} {:<17} {:<17} UPSTREAMS", "WORKLOAD", "IDENTITY", "APP", "SIDECAR (mTLS)", "ADMIN");
        for p in &plans {
            let ups: Vec<String> = p.upstreams.iter().map(|(a, u, _)| format!("{}:{}={a}", u.service, u.port)).collect();
            println!(
                "{:<22} {:<48} {:<17} {:<17} {:<17} {}",
                p.id.to_string(),
                format!("spiffe://{td}/ns/{}/sa/{}", p.id.namespace, p.sa),
                format!("{}:{}", p.app_host, p.entry.port),
                p.inbound.to_string(),
                p.admin.to_string(),
                if ups.is_empty() { "-".into() } else { ups.join(" ") }
            );
        }
        println!();
        println!("control plane: {api}   (export MESHWARD_SERVER={api} MESHWARD_CA_FILE={} MESHWARD_TOKEN_FILE={})", data.join("bundle.pem").display(), data.join("admin.token").display());
        if let Some(h) = http {
            println!("dashboard:     http://{h}/ui   (sign in with the token in {})   metrics: http://{h}/metrics   terminal: meshward top", data.join("admin.token").display());
        }
        println!("access log:    meshward logs -f --mesh {}   (files: {}/proxies/*/decisions.jsonl)", dir.display(), state.display());
        // Replicas: how to watch traffic move (docs/resilience.md).
        let replicas: Vec<(usize, &Plan)> = plans.iter().enumerate().filter(|(_, p)| p.sa != p.id.name).collect();
        if let Some((last, victim)) = replicas.last() {
            let others: Vec<String> = replicas.iter().filter(|(i, _)| i != last).map(|(_, p)| p.id.to_string()).collect();
            let callers: Vec<&Plan> = plans.iter().filter(|p| p.upstreams.iter().any(|(_, u, _)| u.service.namespace == victim.id.namespace)).collect();
            println!(
                "replicas:      {} answer for their service; stop one with `kill {}` (the app of {}): its sidecar reports it not ready and callers move to {} within ~2 s — watch the callers' lines above, and `curl -s http://{}/endpoints`",
                replicas.iter().map(|(_, p)| p.id.to_string()).collect::<Vec<_>>().join(", "),
                app_pids.get(*last).copied().unwrap_or(0),
                victim.id,
                others.join(", "),
                callers.first().map_or_else(|| "ADMIN".to_owned(), |c| c.admin.to_string()),
            );
        }
        println!("mesh is up; Ctrl-C stops it");
        }
        // Ctrl-C or SIGTERM: stop the apps (and, with this process, everything else).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        println!("stopping");
        let _ = std::fs::remove_file(state.join("up.json"));
        let _ = std::fs::remove_file(state.join("up.pid"));
        let _ = std::fs::remove_file(state.join("up.sock"));
        apps.lock().await.clear();
        drop(children);
        control.lock().await.child = None;
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// An app `meshward up` runs: how to start it again after a drill stopped it.
struct App {
    id: String,
    cmd: tokio::process::Command,
    child: Option<tokio::process::Child>,
    /// How many times it was stopped or frozen (a lease undoes only its own).
    stops: u64,
    /// Frozen (SIGSTOP): running, answering nothing.
    frozen: bool,
}

/// The control plane's process, as `meshward up` runs it.
struct Control {
    cmd: tokio::process::Command,
    child: Option<tokio::process::Child>,
    stops: u64,
}

/// `stop-control LEASE_SECS` kills the control plane (SIGKILL: a crash; its store is on
/// disk) and starts it again after the lease unless `start-control` did first.
async fn control_hook(control: &Arc<tokio::sync::Mutex<Control>>, line: &str) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut c = control.lock().await;
    match words.as_slice() {
        ["stop-control", lease] => {
            let lease: u64 = lease.parse().context("LEASE_SECS: a number of seconds")?;
            let mut child = c
                .child
                .take()
                .context("the control plane is stopped already")?;
            let pid = child.id().unwrap_or(0);
            let _ = child.kill().await;
            c.stops += 1;
            let (stops, control) = (c.stops, control.clone());
            println!("drill: control plane (pid {pid}) stopped for at most {lease}s");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(lease)).await;
                let mut c = control.lock().await;
                if c.stops == stops && c.child.is_none() {
                    c.child = c.cmd.spawn().ok();
                    println!("drill: lease over, control plane started again");
                }
            });
            Ok(format!("pid {pid} killed"))
        }
        ["start-control"] => {
            if c.child.is_some() {
                return Ok("running already".into());
            }
            let child = c.cmd.spawn().context("cannot start the control plane")?;
            let pid = child.id().unwrap_or(0);
            c.child = Some(child);
            println!("drill: control plane started again (pid {pid})");
            Ok(format!("pid {pid}"))
        }
        _ => bail!("expected `stop-control LEASE_SECS` or `start-control`"),
    }
}

/// Sends `sig` (`-STOP`, `-CONT`) to `pid` with kill(1).
async fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = tokio::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .await?;
    if !st.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

/// The hooks `meshward drill` drives, one line per connection on DIR/.meshward/up.sock:
/// `stop-app WORKLOAD LEASE_SECS` kills the workload's app (SIGKILL: a crash) and starts it
/// again after the lease unless `start-app WORKLOAD` did first; `freeze-app WORKLOAD
/// LEASE_SECS` stops it (SIGSTOP: it hangs, connections still accepted by the kernel)
/// until `thaw-app WORKLOAD` or the lease. Answers `ok ...` or `error ...`.
/// Says so when an app exits by itself (a drill's stop takes the child first, so it is not
/// reported here); `start-app` starts it again.
async fn watch_apps(apps: Arc<tokio::sync::Mutex<Vec<App>>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for a in apps.lock().await.iter_mut() {
            if let Some(status) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                tracing::warn!(
                    "the app of {} exited ({status}); its sidecar reports it not ready (`start-app {}` on the hooks socket starts it again)",
                    a.id,
                    a.id
                );
                a.child = None;
            }
        }
    }
}

/// A sidecar `up` runs in its own process: on a thread with a runtime of its own, so a
/// drill can stop it alone (every task, socket and stream of it goes with its runtime)
/// and start it again from its state directory.
struct Sidecar {
    id: String,
    opts: meshward_proxy::run::Options,
    /// Stops it; `None` while it is stopped.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// How many times it was stopped (a lease undoes only its own stop).
    stops: u64,
}

/// Starts a sidecar on a thread and runtime of its own; `ready` when its listeners are
/// open, `failed` if it ends by itself. The sender stops it.
fn run_sidecar(
    opts: meshward_proxy::run::Options,
    ready: impl FnOnce() + Send + 'static,
    failed: impl FnOnce(String) + Send + 'static,
) -> Result<tokio::sync::oneshot::Sender<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let name = opts.workload.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("sidecar {name}"))
        .enable_all()
        .build()
        .with_context(|| format!("cannot start a runtime for the sidecar of {name}"))?;
    std::thread::Builder::new()
        .name(format!("sidecar {name}"))
        .spawn(move || {
            let r = rt.block_on(async move {
                tokio::select! {
                    r = meshward_proxy::run::run(opts, |_| ready()) => r.err(),
                    _ = rx => None,
                }
            });
            if let Some(e) = r {
                tracing::error!("proxy {name} stopped: {e}");
                failed(e);
            }
            // Every task of the sidecar ends with its runtime: listeners and streams close.
            rt.shutdown_timeout(Duration::from_secs(2));
        })
        .with_context(|| "cannot start a sidecar thread".to_string())?;
    Ok(tx)
}

/// `stop-sidecar WORKLOAD LEASE_SECS` and `start-sidecar WORKLOAD`.
async fn sidecar_hook(
    sidecars: &Arc<tokio::sync::Mutex<Vec<Sidecar>>>,
    line: &str,
) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut list = sidecars.lock().await;
    let (cmd, id) = match words.as_slice() {
        [c, id, ..] => (*c, *id),
        _ => bail!("expected `stop-sidecar WORKLOAD LEASE_SECS` or `start-sidecar WORKLOAD`"),
    };
    let Some(i) = list.iter().position(|s| s.id == id) else {
        let names: Vec<String> = list.iter().map(|s| s.id.clone()).collect();
        if names.is_empty() {
            bail!(
                "no sidecar runs inside `meshward up` (with --isolated each sidecar is a process of its own: stopping one is not supported yet)"
            );
        }
        bail!("no sidecar of `{id}` (sidecars: {})", names.join(", "));
    };
    let s = &mut list[i];
    match (cmd, words.get(2)) {
        ("stop-sidecar", Some(lease)) => {
            let lease: u64 = lease.parse().context("LEASE_SECS: a number of seconds")?;
            let stop = s.stop.take().context("its sidecar is stopped already")?;
            let _ = stop.send(());
            s.stops += 1;
            let (stops, all, id) = (s.stops, sidecars.clone(), id.to_owned());
            println!("drill: sidecar of {id} stopped for at most {lease}s");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(lease)).await;
                let mut list = all.lock().await;
                if let Some(s) = list
                    .iter_mut()
                    .find(|s| s.id == id && s.stops == stops && s.stop.is_none())
                    && let Ok(stop) = restart(s)
                {
                    s.stop = Some(stop);
                    println!("drill: lease over, sidecar of {id} started again");
                }
            });
            Ok("stopped: its listeners and its control-plane stream are closed".into())
        }
        ("start-sidecar", None) => {
            if s.stop.is_some() {
                return Ok("running already".into());
            }
            s.stop = Some(restart(s)?);
            println!("drill: sidecar of {id} started again");
            Ok("started from its state directory".into())
        }
        _ => bail!("expected `stop-sidecar WORKLOAD LEASE_SECS` or `start-sidecar WORKLOAD`"),
    }
}

/// Starts a stopped sidecar again: from its state directory (its certificate and the last
/// policy it enforced), without a join token (the first one was used).
fn restart(s: &Sidecar) -> Result<tokio::sync::oneshot::Sender<()>> {
    let mut opts = s.opts.clone();
    opts.agent.join_token = None;
    let name = s.id.clone();
    run_sidecar(
        opts,
        || {},
        move |e| tracing::error!("the sidecar of {name} stopped: {e}"),
    )
}

async fn serve_hooks(
    l: tokio::net::UnixListener,
    apps: Arc<tokio::sync::Mutex<Vec<App>>>,
    control: Arc<tokio::sync::Mutex<Control>>,
    sidecars: Arc<tokio::sync::Mutex<Vec<Sidecar>>>,
) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    while let Ok((s, _)) = l.accept().await {
        let (apps, control, sidecars) = (apps.clone(), control.clone(), sidecars.clone());
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if tokio::io::BufReader::new(r)
                .read_line(&mut line)
                .await
                .is_err()
            {
                return;
            }
            let line = line.trim();
            let r = if line.ends_with("-control") || line.contains("-control ") {
                control_hook(&control, line).await
            } else if line.starts_with("stop-sidecar ") || line.starts_with("start-sidecar ") {
                sidecar_hook(&sidecars, line).await
            } else {
                hook(&apps, line).await
            };
            let answer = match r {
                Ok(m) => format!("ok {m}\n"),
                Err(e) => format!("error {e}\n"),
            };
            let _ = w.write_all(answer.as_bytes()).await;
        });
    }
}

async fn hook(apps: &Arc<tokio::sync::Mutex<Vec<App>>>, line: &str) -> Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (cmd, id) = match words.as_slice() {
        [c, id, ..] => (*c, *id),
        _ => bail!(
            "expected `stop-app|freeze-app WORKLOAD LEASE_SECS` or `start-app|thaw-app WORKLOAD`"
        ),
    };
    let mut list = apps.lock().await;
    let names = || {
        list.iter()
            .map(|a| a.id.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(i) = list.iter().position(|a| a.id == id) else {
        let n = names();
        bail!("no workload `{id}` (workloads: {n})");
    };
    let app = &mut list[i];
    match (cmd, words.get(2)) {
        ("stop-app", Some(lease)) => {
            let lease: u64 = lease.parse().context("LEASE_SECS: a number of seconds")?;
            let mut child = app.child.take().context("its app is stopped already")?;
            app.frozen = false;
            let pid = child.id().unwrap_or(0);
            let _ = child.kill().await;
            app.stops += 1;
            let (stops, apps) = (app.stops, apps.clone());
            println!("drill: app of {id} (pid {pid}) stopped for at most {lease}s");
            let id = id.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(lease)).await;
                let mut list = apps.lock().await;
                if let Some(a) = list
                    .iter_mut()
                    .find(|a| a.id == id && a.stops == stops && a.child.is_none())
                {
                    a.child = a.cmd.spawn().ok();
                    println!("drill: lease over, app of {id} started again");
                }
            });
            Ok(format!("pid {pid} killed"))
        }
        ("start-app", None) => {
            if app.child.is_some() {
                return Ok("running already".into());
            }
            let child = app
                .cmd
                .spawn()
                .with_context(|| format!("cannot start the app of {id}"))?;
            let pid = child.id().unwrap_or(0);
            app.child = Some(child);
            println!("drill: app of {id} started again (pid {pid})");
            Ok(format!("pid {pid}"))
        }
        ("freeze-app", Some(lease)) => {
            let lease: u64 = lease.parse().context("LEASE_SECS: a number of seconds")?;
            if app.frozen {
                bail!("its app is frozen already");
            }
            let pid = app
                .child
                .as_ref()
                .and_then(tokio::process::Child::id)
                .context("its app is not running")?;
            signal(pid, "-STOP").await?;
            app.frozen = true;
            app.stops += 1;
            let (stops, apps) = (app.stops, apps.clone());
            println!("drill: app of {id} (pid {pid}) frozen for at most {lease}s");
            let id = id.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(lease)).await;
                let mut list = apps.lock().await;
                if let Some(a) = list
                    .iter_mut()
                    .find(|a| a.id == id && a.stops == stops && a.frozen)
                {
                    a.frozen = false;
                    let _ = signal(pid, "-CONT").await;
                    println!("drill: lease over, app of {id} thawed");
                }
            });
            Ok(format!("pid {pid} frozen"))
        }
        ("thaw-app", None) => {
            if !app.frozen {
                return Ok("not frozen".into());
            }
            let pid = app
                .child
                .as_ref()
                .and_then(tokio::process::Child::id)
                .context("its app is not running")?;
            signal(pid, "-CONT").await?;
            app.frozen = false;
            println!("drill: app of {id} thawed (pid {pid})");
            Ok(format!("pid {pid}"))
        }
        _ => bail!(
            "expected `stop-app|freeze-app WORKLOAD LEASE_SECS` or `start-app|thaw-app WORKLOAD`"
        ),
    }
}

/// Isolated mode: where a workload calls a service — its first virtual address, else the
/// address of one of its workloads (the sidecar balances either way only for the former).
fn call_target(set: &meshward_policy::PolicySet, up: &Upstream) -> Option<String> {
    let svc = set.services.iter().find(|s| s.id == up.service)?;
    if let Some(a) = svc.addresses.first() {
        return Some(SocketAddr::new(*a, up.port).to_string());
    }
    let sp = svc.ports.iter().find(|p| p.port == up.port)?;
    let port = sp.target_port.unwrap_or(sp.port);
    let w = svc
        .workloads
        .iter()
        .filter_map(|&i| set.workloads.get(i))
        .find(|w| w.address.is_some())?;
    Some(SocketAddr::new(w.address?, port).to_string())
}

/// Creates the bridge (`PREFIX.1`) and a namespace per workload (`PREFIX.10`, `.11`, ...)
/// with its capture rules (the workload's `spec.interception` exclusions applied).
fn isolate(
    iso: &Isolation,
    prefix: &str,
    plans: &[Plan],
    set: &meshward_policy::PolicySet,
) -> Result<IsolatedNet> {
    IsolatedNet::clean(&iso.bridge);
    let mut net = IsolatedNet {
        bridge: iso.bridge.clone(),
        namespaces: vec![],
    };
    ip(&["link", "add", &iso.bridge, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &iso.bridge])?;
    ip(&["link", "set", &iso.bridge, "up"])?;
    for (i, p) in plans.iter().enumerate() {
        let ns = iso.netns(&p.id);
        let veth = format!("{}v{i}", iso.bridge);
        ip(&["netns", "add", &ns])?;
        net.namespaces.push(ns.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &iso.bridge, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", p.inbound.ip()),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{prefix}.1"),
        ])?;
        let mut o = meshward_proxy::transparent::RuleOptions::default();
        if let Some(w) = set.workload(&p.id) {
            o.exclude_inbound_ports = w.interception.exclude_inbound_ports.clone();
            o.exclude_outbound_ports = w.interception.exclude_outbound_ports.clone();
        }
        crate::proxy_cmd::install_capture(Some(&ns), &o)
            .with_context(|| format!("capture rules for {}", p.id))?;
    }
    Ok(net)
}

/// Whether the app of `p` accepts connections (inside its namespace when isolated).
async fn app_listens(isolated: Option<&Isolation>, p: &Plan) -> bool {
    match isolated {
        None => tokio::net::TcpStream::connect((p.app_host, p.entry.port))
            .await
            .is_ok(),
        Some(iso) => tokio::process::Command::new("ip")
            .args(["netns", "exec", &iso.netns(&p.id), "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{}", p.entry.port))
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success()),
    }
}
