//! Transparent mode, the capture listeners (the "accept" stage of both directions): the
//! workload's network namespace sends all its TCP through the sidecar (rules installed by
//! `meshward proxy init-netns`, see [`rules`]). Inbound connections arrive on the inbound
//! capture port, outbound ones on the outbound capture port; the proxy reads the original
//! destination (`SO_ORIGINAL_DST`), maps it to a workload or service of the mesh
//! ([`crate::discovery::Discovery::capture`]), and applies the same stages as explicit
//! mode ([`crate::outbound::connect`]). The proxy's own connections carry a socket mark the
//! rules let through.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use meshward_identity::SpiffeId;
use meshward_policy::decision::{Decision, Reason, Request, Source, Verdict, WorkloadRef};
use meshward_policy::model::PolicySet;
use meshward_policy::reference::quarantine_of;
use meshward_policy::resource::{OutboundMode, Protocol};
use tokio::net::{TcpListener, TcpStream};

use crate::decision_log::Extra;
pub use crate::discovery::Target;
use crate::inbound::{self, AppClient, InboundPort};
use crate::state::Shared;
use crate::transport::Connector;

/// The mark on the proxy's own sockets (the value Istio uses for its proxy UID).
pub const DEFAULT_MARK: u32 = 1337;
/// Where inbound connections are redirected.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// Where outbound connections are redirected.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;

/// Transparent-mode settings of a proxy.
#[derive(Debug, Clone)]
pub struct Options {
    /// The inbound capture listener (all addresses: redirected packets keep the address
    /// they were sent to).
    pub inbound: SocketAddr,
    /// The outbound capture listener (loopback: `REDIRECT` in `OUTPUT` sends there).
    pub outbound: SocketAddr,
    pub mark: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inbound: SocketAddr::from(([0, 0, 0, 0], INBOUND_CAPTURE_PORT)),
            outbound: SocketAddr::from(([127, 0, 0, 1], OUTBOUND_CAPTURE_PORT)),
            mark: DEFAULT_MARK,
        }
    }
}

/// The destination a captured connection was sent to, before the redirect.
pub fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let s = socket2::SockRef::from(tcp);
    let a = if tcp.local_addr()?.is_ipv4() {
        s.original_dst_v4()?
    } else {
        s.original_dst_v6()?
    };
    a.as_socket()
        .ok_or_else(|| std::io::Error::other("the original destination is not an IP address"))
}

/// One entry of `outboundTraffic.allowed`: `IP:PORT`, `CIDR:PORT` or `HOST:PORT`, with
/// `*` for any port; IPv6 addresses in brackets.
#[derive(Debug, Clone, PartialEq)]
enum AllowEntry {
    Net {
        net: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
    Host {
        host: String,
        port: Option<u16>,
    },
}

fn parse_entry(e: &str) -> Option<AllowEntry> {
    let (host, port) = e.rsplit_once(':')?;
    let port = match port {
        "*" => None,
        p => Some(p.parse().ok()?),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (addr, prefix) = match host.split_once('/') {
        Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
        None => (host, None),
    };
    match addr.parse::<IpAddr>() {
        Ok(net) => {
            let max = if net.is_ipv4() { 32 } else { 128 };
            let prefix = prefix.unwrap_or(max);
            (prefix <= max).then_some(AllowEntry::Net { net, prefix, port })
        }
        Err(_) if prefix.is_none() && !addr.is_empty() => Some(AllowEntry::Host {
            host: addr.to_ascii_lowercase(),
            port,
        }),
        Err(_) => None,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & m == u32::from(n) & m
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & m == u128::from(n) & m
        }
        _ => false,
    }
}

/// Whether the mesh lets a workload call `dst` outside the mesh (host names are resolved
/// when no address entry matches).
pub async fn external_allowed(set: &PolicySet, dst: SocketAddr) -> bool {
    let ob = &set.mesh.outbound;
    if ob.mode == OutboundMode::Deny {
        return false;
    }
    let entries: Vec<AllowEntry> = ob.allowed.iter().filter_map(|e| parse_entry(e)).collect();
    let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == dst.port());
    for e in &entries {
        if let AllowEntry::Net { net, prefix, port } = e
            && port_ok(port)
            && in_net(dst.ip(), *net, *prefix)
        {
            return true;
        }
    }
    for e in &entries {
        if let AllowEntry::Host { host, port } = e {
            if !port_ok(port) {
                continue;
            }
            let lookup = tokio::net::lookup_host((host.as_str(), dst.port()));
            if let Ok(Ok(addrs)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), lookup).await
                && addrs.into_iter().any(|a| a.ip() == dst.ip())
            {
                return true;
            }
        }
    }
    false
}

use crate::gate::revision;

/// A captured connection, for the decisions the proxy makes itself (not the policy
/// engine): who, to which original destination, which side.
struct Captured<'a> {
    shared: &'a Shared,
    source: Source,
    dst: SocketAddr,
    outbound: bool,
}

impl Captured<'_> {
    fn log(&self, destination: WorkloadRef, verdict: Verdict, reason: Reason, detail: String) {
        let req = Request {
            source: self.source.clone(),
            destination,
            port: self.dst.port(),
            http: None,
            at: SystemTime::now(),
        };
        let d = Decision::bare(verdict, reason, revision(self.shared));
        self.shared.log.record_with(
            &req,
            &d,
            &Extra {
                outbound: self.outbound,
                detail: Some(detail),
                address: Some(self.dst),
                duration: None,
                ..Extra::default()
            },
        );
    }
}

fn external_ref(dst: SocketAddr) -> WorkloadRef {
    WorkloadRef {
        namespace: "external".into(),
        name: dst.ip().to_string(),
    }
}

/// Serves the outbound capture port: every TCP connection the app opens.
pub async fn serve_outbound(
    shared: Arc<Shared>,
    identity: SpiffeId,
    mark: u32,
    listener: TcpListener,
) -> Result<(), String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared
        .listeners
        .register(format!("outbound capture {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |app, _, conn| {
        let served = outbound_connection(shared.clone(), identity.clone(), mark, app);
        tokio::spawn(async move {
            let _conn = conn;
            served.await;
        });
    })
    .await;
    Ok(())
}

async fn outbound_connection(
    shared: Arc<Shared>,
    identity: SpiffeId,
    mark: u32,
    mut app: TcpStream,
) {
    let _ = app.set_nodelay(true);
    let Ok(dst) = original_dst(&app) else {
        // Not a redirected connection (someone dialed the capture port itself).
        return;
    };
    let me = identity.clone();
    let out = Captured {
        shared: &shared,
        source: Source::Authenticated(identity),
        dst,
        outbound: true,
    };
    let Some(policy) = shared.policy.load_full() else {
        let why = "no configuration yet: outbound traffic is refused (fail closed)".into();
        return out.log(external_ref(dst), Verdict::Deny, Reason::NoPolicy, why);
    };
    match policy.view.discovery.capture(dst) {
        Target::Mesh {
            destination,
            endpoints,
        } => {
            let conn =
                crate::outbound::connect(&shared, &destination, dst.port(), &endpoints, Some(mark));
            match conn.await {
                Ok(mut t) => {
                    let mut app = crate::transport::Metered::new(&mut app, &shared, "outbound");
                    let _ = tokio::io::copy_bidirectional(&mut app, &mut t.tls).await;
                }
                Err(crate::outbound::ConnectError::CircuitOpen) => {
                    tracing::warn!(
                        "{destination} ({dst}): circuit open (circuitBreaker.maxConnections)"
                    )
                }
                Err(crate::outbound::ConnectError::NoEndpoint) => {
                    let why = format!("{destination} has no endpoint with an address");
                    out.log(destination, Verdict::Deny, Reason::UnknownDestination, why);
                }
                Err(crate::outbound::ConnectError::Refused(e)) => {
                    tracing::warn!("{destination} ({dst}): {e}")
                }
            }
        }
        Target::UndeclaredPort { destination } => {
            let why = format!(
                "{destination} declares no port {}: the connection is refused",
                dst.port()
            );
            out.log(destination, Verdict::Deny, Reason::UndeclaredPort, why);
        }
        Target::External => {
            // A quarantined workload's traffic leaving the mesh: refused here (destinations
            // in the mesh refuse the rest).
            if let Some(o) = quarantine_of(&policy.set, &me, SystemTime::now()) {
                let why = format!(
                    "this workload is quarantined ({}): nothing leaves the mesh",
                    o.id
                );
                return out.log(external_ref(dst), Verdict::Deny, Reason::Quarantined, why);
            }
            if !external_allowed(&policy.set, dst).await {
                let why = match policy.set.mesh.outbound.mode {
                    OutboundMode::Deny => format!(
                        "{dst} is outside the mesh and the Mesh's outboundTraffic mode is DENY"
                    ),
                    OutboundMode::AllowListed => {
                        format!("{dst} is outside the mesh and not in outboundTraffic.allowed")
                    }
                };
                return out.log(external_ref(dst), Verdict::Deny, Reason::OutsideMesh, why);
            }
            out.log(
                external_ref(dst),
                Verdict::Allow,
                Reason::AllowedExternal,
                "on outboundTraffic.allowed".into(),
            );
            if let Ok(mut up) = Connector::new(Some(mark)).connect(dst).await {
                // Cut when a later revision quarantines the workload (crate::recheck).
                let quarantined =
                    crate::recheck::until(shared.clone(), policy.revision, move |p, now| {
                        p.and_then(|p| quarantine_of(&p.set, &me, now))
                            .map(|o| o.id.to_string())
                    });
                tokio::select! {
                    _ = async {
                        let mut app = crate::transport::Metered::new(&mut app, &shared, "outbound");
                        tokio::io::copy_bidirectional(&mut app, &mut up).await
                    } => {}
                    id = quarantined => {
                        shared.log.metrics.revoked("tcp");
                        let why = format!("revoked: this workload is quarantined ({id}); the connection leaving the mesh is closed");
                        out.log(external_ref(dst), Verdict::Deny, Reason::Quarantined, why);
                    }
                }
            }
        }
    }
}

/// Serves the inbound capture port: every TCP connection to the workload.
pub async fn serve_inbound(
    shared: Arc<Shared>,
    mark: u32,
    listener: TcpListener,
) -> Result<(), String> {
    let tls_http = tokio_rustls::TlsAcceptor::from(inbound::server_tls(&shared, Protocol::Http)?);
    let tls_tcp = tokio_rustls::TlsAcceptor::from(inbound::server_tls(&shared, Protocol::Tcp)?);
    let h1: AppClient = inbound::app_client(Protocol::Http, Some(mark));
    let h2: AppClient = inbound::app_client(Protocol::Http2, Some(mark));
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("inbound capture {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |tcp, _, conn| {
        let Ok(dst) = original_dst(&tcp) else {
            return;
        };
        let declared = shared.policy.load().as_ref().map(|p| {
            p.set
                .workload(&shared.workload)
                .and_then(|w| w.ports.iter().find(|p| p.port == dst.port()))
                .map(|p| p.protocol)
        });
        let inb = Captured {
            shared: &shared,
            source: Source::Unauthenticated,
            dst,
            outbound: false,
        };
        let protocol = match declared {
            Some(Some(p)) => p,
            Some(None) => {
                let why = format!(
                    "{} declares no port {}: the connection is refused",
                    shared.workload,
                    dst.port()
                );
                inb.log(
                    shared.workload.clone(),
                    Verdict::Deny,
                    Reason::UndeclaredPort,
                    why,
                );
                return;
            }
            None => {
                let why = "no configuration yet: inbound traffic is refused (fail closed)".into();
                inb.log(
                    shared.workload.clone(),
                    Verdict::Deny,
                    Reason::NoPolicy,
                    why,
                );
                return;
            }
        };
        let port = InboundPort {
            app_port: dst.port(),
            protocol,
            app: dst,
            mark: Some(mark),
        };
        let (tls, client) = match protocol {
            Protocol::Tcp => (tls_tcp.clone(), h1.clone()),
            Protocol::Http => (tls_http.clone(), h1.clone()),
            Protocol::Http2 | Protocol::Grpc => (tls_http.clone(), h2.clone()),
        };
        let Some(slot) = inbound::admit(&shared, &me, port) else {
            return;
        };
        let served = inbound::connection(shared.clone(), port, tcp, tls, client, slot);
        tokio::spawn(async move {
            let _conn = conn;
            served.await;
        });
    })
    .await;
    Ok(())
}

/// What `meshward proxy init-netns` installs.
#[derive(Debug, Clone)]
pub struct RuleOptions {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub mark: u32,
    /// Also let this UID's traffic through (a proxy that runs as its own user).
    pub proxy_uid: Option<u32>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
}

impl Default for RuleOptions {
    fn default() -> Self {
        RuleOptions {
            inbound_port: INBOUND_CAPTURE_PORT,
            outbound_port: OUTBOUND_CAPTURE_PORT,
            mark: DEFAULT_MARK,
            proxy_uid: None,
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
        }
    }
}

/// The chains Meshward owns in the `nat` table.
/// Each chain and the built-in chain that jumps to it.
pub const CHAINS: [(&str, &str); 2] = [
    ("MESHWARD_INBOUND", "PREROUTING"),
    ("MESHWARD_OUTPUT", "OUTPUT"),
];

/// The `iptables-restore --noflush` input that captures all TCP of a network namespace:
/// inbound to the inbound capture port, outbound to the outbound capture port, except the
/// proxy's own (marked) traffic, loopback, and excluded ports. Applying it replaces any
/// earlier Meshward rules (the chains are flushed and the jumps re-added once).
pub fn rules(o: &RuleOptions) -> String {
    let mut r = String::from("*nat\n");
    for (chain, _) in CHAINS {
        r.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for (chain, from) in CHAINS {
        r.push_str(&format!("-A {from} -p tcp -j {chain}\n"));
    }
    for p in &o.exclude_inbound_ports {
        r.push_str(&format!(
            "-A MESHWARD_INBOUND -p tcp --dport {p} -j RETURN\n"
        ));
    }
    r.push_str(&format!(
        "-A MESHWARD_INBOUND -p tcp -j REDIRECT --to-ports {}\n",
        o.inbound_port
    ));
    r.push_str(&format!(
        "-A MESHWARD_OUTPUT -m mark --mark {} -j RETURN\n",
        o.mark
    ));
    if let Some(uid) = o.proxy_uid {
        r.push_str(&format!(
            "-A MESHWARD_OUTPUT -m owner --uid-owner {uid} -j RETURN\n"
        ));
    }
    r.push_str("-A MESHWARD_OUTPUT -o lo -j RETURN\n");
    for p in &o.exclude_outbound_ports {
        r.push_str(&format!(
            "-A MESHWARD_OUTPUT -p tcp --dport {p} -j RETURN\n"
        ));
    }
    r.push_str(&format!(
        "-A MESHWARD_OUTPUT -p tcp -j REDIRECT --to-ports {}\n",
        o.outbound_port
    ));
    r.push_str("COMMIT\n");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries() {
        assert_eq!(
            parse_entry("10.0.0.0/8:443"),
            Some(AllowEntry::Net {
                net: "10.0.0.0".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
                prefix: 8,
                port: Some(443)
            })
        );
        assert!(matches!(
            parse_entry("[::1]:*"),
            Some(AllowEntry::Net {
                prefix: 128,
                port: None,
                ..
            })
        ));
        assert!(matches!(
            parse_entry("api.example.com:443"),
            Some(AllowEntry::Host { .. })
        ));
        assert_eq!(parse_entry("10.0.0.0/33:443"), None);
        assert_eq!(parse_entry("10.0.0.1"), None);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert!(in_net(ip("10.1.2.3"), ip("10.0.0.0"), 8));
        assert!(!in_net(ip("11.1.2.3"), ip("10.0.0.0"), 8));
        assert!(in_net(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(!in_net(ip("::1"), ip("0.0.0.0"), 0));
    }
}
