//! `meshward proxy`: restore state, join or renew, follow the config stream, and serve the
//! inbound ports of the workload, its upstreams and the admin endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::SharedBundles;
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;

use crate::agent::{self, AgentConfig};
use crate::decision_log::DecisionLog;
use crate::inbound::{self, InboundPort};
use crate::outbound::{self, Upstream};
use crate::state::Shared;

/// Settings of one proxy.
#[derive(Debug, Clone)]
pub struct Options {
    pub workload: WorkloadRef,
    pub agent: AgentConfig,
    /// `(listen, upstream)` pairs.
    pub upstreams: Vec<(SocketAddr, Upstream)>,
    pub admin: SocketAddr,
    pub decision_log: Option<PathBuf>,
    pub sample_allows: u64,
    /// Records queued for the control plane at most (0: do not ship).
    pub ship_queue: usize,
    /// Sampled allows shipped per second at most (0: all); above it they are thinned and
    /// weighted.
    pub ship_allows_per_second: u64,
    /// Export a span per request over OTLP/gRPC to this endpoint (off when `None`).
    pub otlp_endpoint: Option<String>,
    /// Per-request metrics and decision shipping (on by default).
    pub telemetry: bool,
    /// How upstreams are carried to the next proxy.
    pub upstream_protocol: crate::pool::UpstreamProtocol,
    /// Transparent mode: capture listeners instead of the ports' `inbound` addresses.
    pub transparent: Option<crate::transparent::Options>,
    /// The inbound listeners' connection caps and timeouts where the policy's
    /// `connectionLimits` sets none.
    pub limits: crate::listener::Limits,
    /// Worker threads that serve connections (1..=[`MAX_WORKERS`]; [`runtime`] builds them).
    pub workers: usize,
    /// Explicit mode: the loopback address the app listens on.
    pub app_host: std::net::IpAddr,
    /// Explicit mode: how often the sidecar checks that its app accepts connections on
    /// every declared port (two failures in a row: callers are told it is not ready);
    /// `None`: never.
    pub app_probe: Option<Duration>,
    /// On SIGTERM: tell callers this endpoint is going away, keep serving this long, then
    /// return; `None`: no SIGTERM handling (the default action; in-process embedding).
    pub drain: Option<Duration>,
}

/// The most worker threads `--workers` accepts.
pub const MAX_WORKERS: usize = 64;

/// The runtime of a proxy with `workers` worker threads. One worker is a current-thread
/// runtime (`PERFORMANCE.md`: ~7% more max rate and less CPU per request than a
/// multi-thread runtime with one worker), the sidecar default; more is one multi-thread
/// runtime whose workers take connections from the same listeners (work stealing). Every
/// connection's state is its own and the request path takes no lock shared across
/// connections (docs/proxy.md), so the workers do not contend.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("meshward-proxy-worker")
            .enable_all()
            .build()
    }
}

impl Options {
    /// Cross-field rules, checked once every field parsed (each error names its flags):
    /// every listener has its own address; the identity belongs to the bundle's trust
    /// domain and, for a workload identity, to the workload's namespace.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = vec![];
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            errors.push(format!(
                "--workers {}: must be between 1 and {MAX_WORKERS}",
                self.workers
            ));
        }
        let mut seen: Vec<(SocketAddr, String)> = vec![(self.admin, "--admin".into())];
        for (listen, up) in &self.upstreams {
            seen.push((
                *listen,
                format!("--upstream {listen}={}:{}", up.service, up.port),
            ));
        }
        if let Some(t) = &self.transparent {
            seen.push((t.inbound, "--inbound-capture".into()));
            seen.push((t.outbound, "--outbound-capture".into()));
        }
        for (i, (a, who)) in seen.iter().enumerate() {
            if let Some((_, first)) = seen[..i].iter().find(|(b, _)| b == a && a.port() != 0) {
                errors.push(format!("{who} and {first} both listen on {a}"));
            }
        }
        let id = &self.agent.identity;
        if id.trust_domain_name() != self.agent.trust_domain.as_str() {
            errors.push(format!(
                "--identity `{id}` is not of the bundle's trust domain `{}`",
                self.agent.trust_domain
            ));
        }
        let segs: Vec<&str> = id.segments().collect();
        if let ["ns", ns, ..] = segs.as_slice()
            && *ns != self.workload.namespace
        {
            errors.push(format!(
                "--identity `{id}` is in namespace `{ns}`, --workload `{}` in `{}`",
                self.workload, self.workload.namespace
            ));
        }
        errors
    }
}

/// Runs the proxy until the process ends; `ready` is called with the bound addresses once
/// the inbound listeners are up.
pub async fn run(opts: Options, ready: impl FnOnce(&[(SocketAddr, u16)])) -> Result<(), String> {
    run_with_state(opts, |_| {}, ready).await
}

/// [`run`], handing `state` the proxy's state as soon as it exists (in-process embedding
/// and tests: a policy set there arrives as from the config stream).
pub async fn run_with_state(
    opts: Options,
    state: impl FnOnce(&Arc<Shared>),
    ready: impl FnOnce(&[(SocketAddr, u16)]),
) -> Result<(), String> {
    meshward_identity::install_crypto_provider();
    // Each sidecar its own exporter and `service.name`, also several in one process.
    let tracer = match &opts.otlp_endpoint {
        Some(e) => Some(meshward_telemetry::trace::otlp(
            e,
            &format!("meshward-proxy {}", opts.workload),
        )?),
        None => None,
    };
    std::fs::create_dir_all(&opts.agent.state_dir)
        .map_err(|e| format!("cannot create `{}`: {e}", opts.agent.state_dir.display()))?;
    let log = match &opts.decision_log {
        Some(p) => DecisionLog::to_file(p.clone(), 64 << 20, opts.sample_allows)
            .map_err(|e| format!("cannot open the decision log `{}`: {e}", p.display()))?,
        None => DecisionLog::without_file(opts.sample_allows),
    }
    .with_shipping(
        if opts.telemetry { opts.ship_queue } else { 0 },
        opts.ship_allows_per_second,
    );
    let log = if opts.telemetry {
        log
    } else {
        log.without_metrics()
    };
    let mut tb = TrustBundles::new();
    tb.set(
        opts.agent.trust_domain.clone(),
        opts.agent.control_roots.clone(),
    );
    let shared = Shared::with_limits(
        opts.workload.clone(),
        SharedBundles::new(tb),
        log,
        opts.limits,
    );
    if let Some(t) = tracer {
        let _ = shared.tracer.set(t);
    }
    agent::restore(&shared, &opts.agent.state_dir, &opts.agent.trust_domain);
    state(&shared);
    let admin = tokio::net::TcpListener::bind(opts.admin)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.admin))?;
    tokio::spawn(crate::admin::serve(shared.clone(), admin));
    tokio::spawn(agent::identity_loop(shared.clone(), opts.agent.clone()));
    tokio::spawn(agent::config_loop(shared.clone(), opts.agent.clone()));
    if let Some(t) = &opts.transparent {
        let bind = |a: SocketAddr| async move {
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| format!("cannot listen on {a}: {e}"))
        };
        let (i, o) = (bind(t.inbound).await?, bind(t.outbound).await?);
        tokio::spawn(crate::transparent::serve_inbound(shared.clone(), t.mark, i));
        tokio::spawn(crate::transparent::serve_outbound(
            shared.clone(),
            opts.agent.identity.clone(),
            t.mark,
            o,
        ));
    }
    for (addr, up) in &opts.upstreams {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        match opts.upstream_protocol {
            crate::pool::UpstreamProtocol::Tunnel => {
                tokio::spawn(outbound::serve(shared.clone(), up.clone(), l));
            }
            p => {
                tokio::spawn(crate::pool::serve(shared.clone(), up.clone(), l, p));
            }
        }
    }
    if let (Some(every), None) = (opts.app_probe, &opts.transparent) {
        tokio::spawn(probe_app(shared.clone(), opts.app_host, every));
    }
    let drained = drain(shared.clone(), opts.drain);
    tokio::pin!(drained);
    // The inbound ports come from the workload's declaration: wait for a policy, open its
    // ports, then follow every revision (ports added, moved or removed).
    let mut open = Inbound(HashMap::new(), opts.app_host);
    let bound = loop {
        if shared.policy.load().is_some() {
            break open.reconcile(&shared, opts.transparent.as_ref()).await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ready(&bound);
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
            () = &mut drained => return Ok(()),
        }
        let current = shared.policy.load().as_ref().map(|p| p.revision);
        if current.is_some() && current != shared.listeners.bound() {
            // Not fatal after start: `/ready` stays 503 and the next tick tries again.
            if let Err(e) = open.reconcile(&shared, opts.transparent.as_ref()).await {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Waits for SIGTERM, then tells callers (through the control plane) that this endpoint
/// is going away and keeps serving for `drain`, so that they move their traffic before
/// the listeners close. Never completes without `drain`.
async fn drain(shared: Arc<Shared>, drain: Option<Duration>) {
    let Some(drain) = drain else {
        return std::future::pending().await;
    };
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    term.recv().await;
    tracing::info!("SIGTERM: draining for {drain:?} (callers are told to pass this endpoint over)");
    shared.health.set_draining();
    tokio::time::sleep(drain).await;
    tracing::info!("drained; exiting");
}

/// Checks every `every` that the app accepts TCP connections on each port the workload
/// declares (at `host`): two failed rounds in a row make the workload not ready for its
/// callers, one good round ready again ([`crate::agent::Health::set_app_down`]).
async fn probe_app(shared: Arc<Shared>, host: std::net::IpAddr, every: Duration) {
    let mut failed_rounds = 0u32;
    loop {
        tokio::time::sleep(every).await;
        let ports: Vec<u16> = shared
            .policy
            .load()
            .as_ref()
            .and_then(|p| p.set.workload(&shared.workload).map(|w| w.ports.clone()))
            .map(|ps| ps.iter().map(|p| p.port).collect())
            .unwrap_or_default();
        let mut down = None;
        for port in ports {
            let addr = SocketAddr::new(host, port);
            let r = tokio::time::timeout(every.max(Duration::from_millis(200)), async {
                tokio::net::TcpStream::connect(addr).await
            })
            .await;
            let why = match r {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".into(),
            };
            down = Some(format!(
                "the app is not accepting connections on {addr} ({why})"
            ));
            break;
        }
        match down {
            None => {
                failed_rounds = 0;
                shared.health.set_app_down(None);
            }
            Some(why) => {
                failed_rounds += 1;
                if failed_rounds >= 2 {
                    shared.health.set_app_down(Some(why));
                }
            }
        }
    }
}

/// The inbound listeners open now (explicit mode), by address.
#[derive(Debug)]
struct Inbound(
    HashMap<SocketAddr, (u16, Protocol, tokio::task::JoinHandle<()>)>,
    std::net::IpAddr,
);

impl Inbound {
    /// Opens the ports the current revision declares and closes those it no longer does
    /// (established connections go on); then marks the revision bound, for `/ready`.
    /// Returns `(listen address, app port)` of every declared port.
    async fn reconcile(
        &mut self,
        shared: &Arc<Shared>,
        transparent: Option<&crate::transparent::Options>,
    ) -> Result<Vec<(SocketAddr, u16)>, String> {
        let Some(p) = shared.policy.load_full() else {
            return Ok(vec![]);
        };
        let ports = p
            .set
            .workload(&shared.workload)
            .map(|w| w.ports.clone())
            .ok_or_else(|| {
                format!(
                    "workload `{}` is not declared in revision {}",
                    shared.workload, p.revision
                )
            })?;
        if let Some(t) = transparent {
            // Every declared port is captured on the inbound capture port.
            shared.listeners.set_bound(p.revision);
            return Ok(ports.iter().map(|q| (t.inbound, q.port)).collect());
        }
        let want: HashMap<SocketAddr, (u16, Protocol)> = ports
            .iter()
            .filter_map(|q| {
                let a = q.inbound.as_deref()?.parse::<SocketAddr>().ok()?;
                Some((a, (q.port, q.protocol)))
            })
            .collect();
        let stale: Vec<SocketAddr> = self
            .0
            .iter()
            .filter(|(a, (port, proto, _))| want.get(a) != Some(&(*port, *proto)))
            .map(|(a, _)| *a)
            .collect();
        for a in stale {
            if let Some((port, _, task)) = self.0.remove(&a) {
                task.abort();
                let _ = task.await; // the listening socket is closed once this returns
                shared.listeners.deregister(&format!("inbound {a}"));
                tracing::info!("closed inbound {a} (port {port}, revision {})", p.revision);
            }
        }
        let mut bound = vec![];
        for (addr, (port, protocol)) in want {
            bound.push((addr, port));
            if self.0.contains_key(&addr) {
                continue;
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let (shared, ip) = (
                shared.clone(),
                InboundPort::explicit_at(self.1, port, protocol),
            );
            let task = tokio::spawn(async move {
                if let Err(e) = inbound::serve(shared, ip, l).await {
                    tracing::warn!("inbound {addr}: {e}");
                }
            });
            self.0.insert(addr, (port, protocol, task));
        }
        bound.sort();
        shared.listeners.set_bound(p.revision);
        Ok(bound)
    }
}
