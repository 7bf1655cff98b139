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
    let opts = match options(&a, conn).and_then(|o| {
        let e = o.validate();
        if e.is_empty() { Ok(o) } else { Err(e) }
    }) {
        Ok(o) => o,
        Err(errors) => bail!(
            "{} problem(s) with the flags:\n  - {}",
            errors.len(),
            errors.join("\n  - ")
        ),
    };
    let (workload, identity) = (opts.workload.clone(), opts.agent.identity.clone());
    // One worker (the default): a current-thread runtime; more: one multi-thread runtime.
    let rt = meshward_proxy::run::runtime(opts.workers)?;
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

/// Parses every flag into the proxy's typed configuration, collecting every error (each
/// names its flag) instead of stopping at the first; cross-field rules are checked after,
/// by [`meshward_proxy::run::Options::validate`].
fn options(
    a: &ProxyArgs,
    conn: &crate::control_cmd::Conn,
) -> std::result::Result<meshward_proxy::run::Options, Vec<String>> {
    let mut errors: Vec<String> = vec![];
    let mut need = |flag: &str, v: &Option<String>| {
        if v.is_none() {
            errors.push(format!("{flag} is required"));
        }
        v.clone()
    };
    let (workload, control) = (
        need("--workload", &a.workload),
        need("--control", &a.control),
    );
    if a.state_dir.is_none() {
        errors.push("--state-dir is required".into());
    }
    if !(1..=meshward_proxy::run::MAX_WORKERS).contains(&a.workers) {
        errors.push(format!(
            "--workers {}: must be between 1 and {}",
            a.workers,
            meshward_proxy::run::MAX_WORKERS
        ));
    }
    let workload = workload.and_then(|w| {
        WorkloadRef::parse(&w)
            .map_err(|e| errors.push(format!("--workload `{w}`: {e}")))
            .ok()
    });
    let limits = limits(a)
        .map_err(|e| {
            errors.extend(e.to_string().split("; ").map(str::to_owned));
        })
        .ok();
    // The trust domain and roots come from the control plane's bundle.
    let bundle = conn
        .ca_file
        .clone()
        .or_else(|| std::env::var_os("MESHWARD_CA_FILE").map(std::path::PathBuf::from))
        .ok_or_else(|| "--ca-file: pass DATA/bundle.pem (the control plane's trust bundle) or set MESHWARD_CA_FILE".to_owned())
        .and_then(|f| {
            let pem = std::fs::read_to_string(&f)
                .map_err(|e| format!("--ca-file: cannot read `{}`: {e}", f.display()))?;
            let roots = certs_from_pem(&pem);
            let td = roots.first().and_then(|c| trust_domain_of(c)).ok_or_else(|| {
                format!("--ca-file: `{}` holds no Meshward root certificate", f.display())
            })?;
            Ok((td, roots))
        })
        .map_err(|e| errors.push(e))
        .ok();
    let identity = match (&a.identity, &bundle, &workload) {
        (Some(i), _, _) => SpiffeId::parse(i)
            .map_err(|e| errors.push(format!("--identity `{i}`: {e}")))
            .ok(),
        (None, Some((td, _)), Some(w)) => SpiffeId::workload(td, &w.namespace, &w.name)
            .map_err(|e| errors.push(format!("--workload: cannot form the identity: {e}")))
            .ok(),
        _ => None,
    };
    let join_token = a.join_token_file.as_ref().and_then(|f| {
        std::fs::read_to_string(f)
            .map(|t| t.trim().to_owned())
            .map_err(|e| {
                errors.push(format!(
                    "--join-token-file: cannot read `{}`: {e}",
                    f.display()
                ))
            })
            .ok()
    });
    let mut upstreams = vec![];
    for u in &a.upstreams {
        match upstream(u) {
            Ok(x) => upstreams.push(x),
            Err(e) => errors.push(format!("--upstream `{u}`: {e}")),
        }
    }
    if a.sample_allows == 0 {
        errors.push("--sample-allows must be at least 1".into());
    }
    let mut addr = |flag: &str, v: &str| {
        v.parse::<std::net::SocketAddr>()
            .map_err(|_| errors.push(format!("{flag} `{v}` is not ip:port")))
            .ok()
    };
    let admin = addr("--admin", &a.admin);
    let captures = if a.transparent {
        (
            addr("--inbound-capture", &a.inbound_capture),
            addr("--outbound-capture", &a.outbound_capture),
        )
    } else {
        (None, None)
    };
    let telemetry = match a.telemetry.as_str() {
        "on" => true,
        "off" => false,
        other => {
            errors.push(format!("--telemetry `{other}`: use on or off"));
            true
        }
    };
    let app_host = match a.app_host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => Some(ip),
        Ok(_) => {
            errors.push(format!(
                "--app-host `{}` is not a loopback address: the app must not be reachable around the sidecar",
                a.app_host
            ));
            None
        }
        Err(_) => {
            errors.push(format!("--app-host `{}` is not an IP address", a.app_host));
            None
        }
    };
    let mut dur = |flag: &str, v: &str| match humantime::parse_duration(v) {
        Ok(d) if d.is_zero() => None,
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(format!("{flag} `{v}`: {e} (write e.g. 2s or 500ms)"));
            None
        }
    };
    let app_probe = dur("--app-probe-interval", &a.app_probe_interval);
    let drain = dur("--drain-time", &a.drain_time);
    let upstream_protocol = meshward_proxy::pool::UpstreamProtocol::parse(&a.upstream_protocol)
        .map_err(|e| errors.push(format!("--upstream-protocol {e}")))
        .ok();
    let (
        Some(workload),
        Some(control),
        Some(state_dir),
        Some(limits),
        Some((td, roots)),
        Some(identity),
        Some(admin),
        Some(upstream_protocol),
        Some(app_host),
        true,
    ) = (
        workload,
        control,
        a.state_dir.clone(),
        limits,
        bundle,
        identity,
        admin,
        upstream_protocol,
        app_host,
        errors.is_empty(),
    )
    else {
        return Err(errors);
    };
    let transparent = match captures {
        (Some(inbound), Some(outbound)) => Some(meshward_proxy::transparent::Options {
            inbound,
            outbound,
            mark: a.mark,
        }),
        _ => None,
    };
    Ok(meshward_proxy::run::Options {
        workload,
        agent: AgentConfig {
            control,
            trust_domain: td,
            control_roots: roots,
            identity,
            join_token,
            state_dir,
            mark: a.transparent.then_some(a.mark),
        },
        upstreams,
        admin,
        decision_log: a.decision_log.clone(),
        sample_allows: a.sample_allows,
        ship_queue: a.ship_queue,
        ship_allows_per_second: a.ship_allows_per_second,
        otlp_endpoint: a.otlp_endpoint.clone(),
        telemetry,
        upstream_protocol,
        transparent,
        limits,
        workers: a.workers,
        app_host,
        app_probe,
        drain,
    })
}

/// `LISTEN=NAMESPACE/SERVICE:PORT`.
fn upstream(u: &str) -> std::result::Result<(std::net::SocketAddr, Upstream), String> {
    let (listen, target) = u
        .split_once('=')
        .ok_or("write LISTEN=NAMESPACE/SERVICE:PORT")?;
    let (svc, port) = target.rsplit_once(':').ok_or("the service needs a port")?;
    let listen = listen
        .parse()
        .map_err(|_| format!("`{listen}` is not ip:port"))?;
    let service = WorkloadRef::parse(svc)?;
    let port = port
        .parse()
        .map_err(|_| format!("`{port}` is not a port"))?;
    Ok((listen, Upstream { service, port }))
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
    let max_age = time(
        "--max-connection-age",
        &a.max_connection_age,
        std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(30 * 24 * 3600),
        &mut errors,
    );
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    let mut l = meshward_proxy::listener::Limits::defaults().with(&c);
    l.max_age = max_age.map(|d| d.0);
    Ok(l)
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
    if a.output != Output::Text {
        println!(
            "{}",
            a.output
                .doc(&serde_json::json!({
                    "netns": netns,
                    "inbound_port": o.inbound_port,
                    "outbound_port": o.outbound_port,
                    "mark": o.mark,
                    "proxy_uid": o.proxy_uid,
                    "exclude_inbound_ports": o.exclude_inbound_ports,
                    "exclude_outbound_ports": o.exclude_outbound_ports,
                    "ipv6": v6,
                }))
                .unwrap_or_default()
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
