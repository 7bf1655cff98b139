//! `meshward proxy`: restore state, join or renew, follow the config stream, and serve the
//! inbound ports of the workload, its upstreams and the admin endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::SharedBundles;
use meshward_policy::decision::WorkloadRef;

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
}

/// Runs the proxy until the process ends; `ready` is called with the bound addresses once
/// the inbound listeners are up.
pub async fn run(opts: Options, ready: impl FnOnce(&[(SocketAddr, u16)])) -> Result<(), String> {
    meshward_identity::install_crypto_provider();
    if let Some(e) = &opts.otlp_endpoint {
        meshward_telemetry::trace::init_otlp(e, &format!("meshward-proxy {}", opts.workload))?;
    }
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
    agent::restore(&shared, &opts.agent.state_dir, &opts.agent.trust_domain);
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
    // The inbound ports come from the workload's declaration: wait for a policy.
    let ports = loop {
        if let Some(p) = shared.policy.load_full() {
            match p.set.workload(&opts.workload) {
                Some(w) => break w.ports.clone(),
                None => {
                    return Err(format!(
                        "workload `{}` is not declared in revision {}",
                        opts.workload, p.revision
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut bound = vec![];
    if let Some(t) = &opts.transparent {
        // Every declared port is captured on the inbound capture port.
        bound.extend(ports.iter().map(|p| (t.inbound, p.port)));
    }
    for p in ports.into_iter().filter(|_| opts.transparent.is_none()) {
        let Some(addr) = p
            .inbound
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            continue;
        };
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        bound.push((addr, p.port));
        tokio::spawn(inbound::serve(
            shared.clone(),
            InboundPort::explicit(p.port, p.protocol),
            l,
        ));
    }
    ready(&bound);
    std::future::pending::<()>().await;
    Ok(())
}
