//! `meshward proxy`.

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use meshward_identity::SpiffeId;
use meshward_identity::ca::{certs_from_pem, trust_domain_of};
use meshward_policy::decision::WorkloadRef;
use meshward_proxy::agent::AgentConfig;
use meshward_proxy::outbound::Upstream;

use crate::{InitNetnsArgs, Output, ProxyArgs, ProxyCommand};

pub fn run(a: ProxyArgs, conn: &crate::control_cmd::Conn) -> Result<ExitCode> {
    if let Some(ProxyCommand::InitNetns(i)) = a.command {
        return init_netns(&i);
    }
    let (Some(workload), Some(control), Some(state_dir)) = (&a.workload, &a.control, &a.state_dir)
    else {
        bail!("--workload, --control and --state-dir are required");
    };
    let workload = WorkloadRef::parse(workload).map_err(|e| anyhow!("--workload: {e}"))?;
    let limits = limits(&a)?;
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
            control: control.clone(),
            trust_domain: td,
            control_roots: roots,
            identity: identity.clone(),
            join_token,
            state_dir: state_dir.clone(),
            mark: a.transparent.then_some(a.mark),
        },
        upstreams,
        admin: a
            .admin
            .parse()
            .with_context(|| format!("--admin `{}` is not ip:port", a.admin))?,
        decision_log: a.decision_log.clone(),
        sample_allows: a.sample_allows,
        ship_queue: a.ship_queue,
        ship_allows_per_second: a.ship_allows_per_second,
        otlp_endpoint: a.otlp_endpoint.clone(),
        telemetry: a.telemetry == "on",
        upstream_protocol: meshward_proxy::pool::UpstreamProtocol::parse(&a.upstream_protocol)
            .map_err(|e| anyhow!("--upstream-protocol {e}"))?,
        transparent: if a.transparent {
            Some(meshward_proxy::transparent::Options {
                inbound: a.inbound_capture.parse().with_context(|| {
                    format!("--inbound-capture `{}` is not ip:port", a.inbound_capture)
                })?,
                outbound: a.outbound_capture.parse().with_context(|| {
                    format!("--outbound-capture `{}` is not ip:port", a.outbound_capture)
                })?,
                mark: a.mark,
            })
        } else {
            None
        },
        limits,
    };
    // One worker: a current-thread runtime (PERFORMANCE.md: faster than a one-worker
    // multi-thread runtime).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(meshward_proxy::run::run(opts, |bound| {
        for (addr, port) in bound {
            if a.transparent {
                println!(
                    "meshward proxy for {workload} ({identity}): port {port} captured on {addr}"
                );
            } else {
                println!(
                    "meshward proxy for {workload} ({identity}): inbound {addr} -> 127.0.0.1:{port}"
                );
            }
        }
        println!("ready");
    }))
    .map_err(anyhow::Error::msg)?;
    Ok(ExitCode::SUCCESS)
}

/// The inbound connection limits from the flags over the built-in defaults (the same
/// ranges as the policy's `connectionLimits`); every bad flag is reported together.
fn limits(a: &ProxyArgs) -> Result<meshward_proxy::listener::Limits> {
    use meshward_policy::resource::{ConnectionLimits, Dur};
    let mut errors = vec![];
    let count = |flag: &str, v: Option<u64>, errors: &mut Vec<String>| {
        v.filter(|n| {
            let ok = ConnectionLimits::COUNTS.contains(n);
            if !ok {
                errors.push(format!("{flag} must be between 1 and 1000000, not {n}"));
            }
            ok
        })
    };
    let time = |flag: &str,
                v: &Option<String>,
                range: std::ops::RangeInclusive<std::time::Duration>,
                errors: &mut Vec<String>| {
        let s = v.as_deref()?;
        match humantime::parse_duration(s) {
            Ok(d) if range.contains(&d) => Some(Dur(d)),
            Ok(_) => {
                errors.push(format!(
                    "{flag} must be between {} and {}, not `{s}`",
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end())
                ));
                None
            }
            Err(e) => {
                errors.push(format!(
                    "{flag} `{s}` is not a duration ({e}); write e.g. `10s`"
                ));
                None
            }
        }
    };
    let c = ConnectionLimits {
        total: count("--max-connections", a.max_connections, &mut errors),
        per_identity: count(
            "--max-connections-per-identity",
            a.max_connections_per_identity,
            &mut errors,
        ),
        header_read_timeout: time(
            "--header-read-timeout",
            &a.header_read_timeout,
            ConnectionLimits::HEADER_READ,
            &mut errors,
        ),
        idle_timeout: time(
            "--idle-timeout",
            &a.idle_timeout,
            ConnectionLimits::IDLE,
            &mut errors,
        ),
    };
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(meshward_proxy::listener::Limits::defaults().with(&c))
}

/// Runs a command, optionally inside a named network namespace, feeding it `input`.
fn sh(netns: Option<&str>, prog: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, prog]);
            c
        }
        None => std::process::Command::new(prog),
    };
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!("cannot run `{prog}` (install iptables and iproute2, and run as root)")
    })?;
    if let (Some(i), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(i.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes Meshward's jumps and chains (ignoring what is not there).
fn remove_rules(netns: Option<&str>) {
    for (chain, from) in meshward_proxy::transparent::CHAINS {
        while sh(
            netns,
            "iptables",
            &["-t", "nat", "-D", from, "-p", "tcp", "-j", chain],
            None,
        )
        .is_ok()
        {}
        let _ = sh(netns, "iptables", &["-t", "nat", "-F", chain], None);
        let _ = sh(netns, "iptables", &["-t", "nat", "-X", chain], None);
    }
}

/// Replaces Meshward's capture rules in a network namespace (`None`: this one). Returns
/// whether IPv6 was captured as well (IPv6 goes to the same ports, where nothing listens:
/// it fails closed instead of bypassing the mesh; namespaces without IPv6 skip it).
pub fn install_capture(
    netns: Option<&str>,
    o: &meshward_proxy::transparent::RuleOptions,
) -> Result<bool> {
    let text = meshward_proxy::transparent::rules(o);
    remove_rules(netns);
    sh(netns, "iptables-restore", &["--noflush"], Some(&text))
        .context("installing the capture rules")?;
    Ok(sh(netns, "ip6tables-restore", &["--noflush"], Some(&text)).is_ok())
}

fn init_netns(a: &InitNetnsArgs) -> Result<ExitCode> {
    use meshward_proxy::transparent::{RuleOptions, rules};
    let netns = a.netns.as_deref();
    let mut o = RuleOptions {
        inbound_port: a.inbound_port,
        outbound_port: a.outbound_port,
        mark: a.mark,
        proxy_uid: a.proxy_uid,
        exclude_inbound_ports: a.exclude_inbound_ports.clone(),
        exclude_outbound_ports: a.exclude_outbound_ports.clone(),
    };
    if let (Some(dir), Some(w)) = (&a.policies, &a.workload) {
        let id = WorkloadRef::parse(w).map_err(|e| anyhow!("--workload: {e}"))?;
        let loaded = meshward_policy::load_path(dir);
        let set = loaded.set.as_ref().filter(|_| {
            !loaded
                .diagnostics
                .iter()
                .any(|d| d.severity == meshward_policy::diag::Severity::Error)
        });
        let Some(set) = set else {
            eprint!(
                "{}",
                meshward_policy::diag::render_text(&loaded.diagnostics, &loaded.sources)
            );
            bail!("`{}` has errors; no rules were installed", dir.display());
        };
        let wl = set
            .workload(&id)
            .with_context(|| format!("workload `{id}` is not declared in `{}`", dir.display()))?;
        o.exclude_inbound_ports
            .extend(&wl.interception.exclude_inbound_ports);
        o.exclude_outbound_ports
            .extend(&wl.interception.exclude_outbound_ports);
    }
    o.exclude_inbound_ports.sort_unstable();
    o.exclude_inbound_ports.dedup();
    o.exclude_outbound_ports.sort_unstable();
    o.exclude_outbound_ports.dedup();
    if a.dry_run {
        print!("{}", rules(&o));
        return Ok(ExitCode::SUCCESS);
    }
    let where_ = netns.map_or("this network namespace".to_owned(), |n| {
        format!("network namespace `{n}`")
    });
    if a.remove {
        remove_rules(netns);
        println!("removed Meshward's capture rules from {where_}");
        return Ok(ExitCode::SUCCESS);
    }
    let v6 = install_capture(netns, &o)?;
    if a.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({
                "netns": netns,
                "inbound_port": o.inbound_port,
                "outbound_port": o.outbound_port,
                "mark": o.mark,
                "proxy_uid": o.proxy_uid,
                "exclude_inbound_ports": o.exclude_inbound_ports,
                "exclude_outbound_ports": o.exclude_outbound_ports,
                "ipv6": v6,
            })
        );
    } else {
        println!(
            "capturing all TCP of {where_}: inbound -> :{}, outbound -> :{} (proxy mark {}{}); excluded inbound ports: {}; excluded outbound ports: {}{}",
            o.inbound_port,
            o.outbound_port,
            o.mark,
            o.proxy_uid
                .map(|u| format!(", proxy uid {u}"))
                .unwrap_or_default(),
            list(&o.exclude_inbound_ports),
            list(&o.exclude_outbound_ports),
            if v6 { "" } else { " (IPv6: not available)" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
