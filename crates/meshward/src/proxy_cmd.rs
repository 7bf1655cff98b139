//! `meshward proxy`.

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use meshward_identity::SpiffeId;
use meshward_identity::ca::{certs_from_pem, trust_domain_of};
use meshward_policy::decision::WorkloadRef;
use meshward_proxy::agent::AgentConfig;
use meshward_proxy::outbound::Upstream;

use crate::ProxyArgs;

pub fn run(a: ProxyArgs, conn: &crate::control_cmd::Conn) -> Result<ExitCode> {
    let workload = WorkloadRef::parse(&a.workload).map_err(|e| anyhow!("--workload: {e}"))?;
    let ca_file = conn.ca_file.clone().or_else(|| std::env::var_os("MESHWARD_CA_FILE").map(std::path::PathBuf::from)).context("pass --ca-file DATA/bundle.pem (the control plane's trust bundle) or set MESHWARD_CA_FILE")?;
    let pem = std::fs::read_to_string(&ca_file)
        .with_context(|| format!("cannot read `{}`", ca_file.display()))?;
    let roots = certs_from_pem(&pem);
    let td = roots
        .first()
        .and_then(|c| trust_domain_of(c))
        .with_context(|| format!("`{}` holds no Meshward root certificate", ca_file.display()))?;
    let identity = match &a.identity {
        Some(i) => SpiffeId::parse(i).map_err(|e| anyhow!("--identity `{i}`: {e}"))?,
        None => SpiffeId::workload(&td, &workload.namespace, &workload.name)
            .map_err(|e| anyhow!("cannot form the identity: {e}"))?,
    };
    let join_token = match &a.join_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read `{}`", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let mut upstreams = vec![];
    for u in &a.upstreams {
        let (listen, target) = u
            .split_once('=')
            .with_context(|| format!("--upstream `{u}`: write LISTEN=NAMESPACE/SERVICE:PORT"))?;
        let (svc, port) = target
            .rsplit_once(':')
            .with_context(|| format!("--upstream `{u}`: the service needs a port"))?;
        let listen = listen
            .parse()
            .with_context(|| format!("--upstream `{u}`: `{listen}` is not ip:port"))?;
        let service = WorkloadRef::parse(svc).map_err(|e| anyhow!("--upstream `{u}`: {e}"))?;
        let port = port
            .parse()
            .with_context(|| format!("--upstream `{u}`: `{port}` is not a port"))?;
        upstreams.push((listen, Upstream { service, port }));
    }
    if a.sample_allows == 0 {
        bail!("--sample-allows must be at least 1");
    }
    let opts = meshward_proxy::run::Options {
        workload: workload.clone(),
        agent: AgentConfig {
            control: a.control.clone(),
            trust_domain: td,
            control_roots: roots,
            identity: identity.clone(),
            join_token,
            state_dir: a.state_dir.clone(),
        },
        upstreams,
        admin: a
            .admin
            .parse()
            .with_context(|| format!("--admin `{}` is not ip:port", a.admin))?,
        decision_log: a.decision_log.clone(),
        sample_allows: a.sample_allows,
    };
    // One worker: a current-thread runtime (PERFORMANCE.md: faster than a one-worker
    // multi-thread runtime).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(meshward_proxy::run::run(opts, |bound| {
        for (addr, port) in bound {
            println!(
                "meshward proxy for {workload} ({identity}): inbound {addr} -> 127.0.0.1:{port}"
            );
        }
        println!("ready");
    }))
    .map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}
