//! Outbound: a loopback listener per upstream service. The app connects in plaintext; the
//! proxy picks an endpoint of the service (round robin), originates mutual TLS with the
//! workload's SVID, accepts only a server whose SPIFFE ID is one the service is declared
//! to run as, and copies bytes both ways (HTTP is parsed and authorized by the inbound
//! side, where the policy lives).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;
use meshward_identity::svid::spiffe_id_of;
use meshward_identity::verifier::{Accept, SvidServerVerifier};
use meshward_policy::decision::{
    Decision, PolicyRevision, Reason, Request, Source, Verdict, WorkloadRef,
};
use tokio::net::{TcpListener, TcpStream};

use crate::decision_log::Extra;
use crate::handshake::Failure;
use crate::state::{ClientCert, Shared};
use crate::transport::Connector;

/// One upstream: a service and its port.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub service: WorkloadRef,
    pub port: u16,
}

/// The endpoints of an upstream in the current configuration: `(inbound address, identity)`.
pub fn endpoints(shared: &Shared, up: &Upstream) -> Vec<(SocketAddr, SpiffeId)> {
    endpoints_with(shared, up, |a, id| (a, id.clone()))
}

/// The endpoints of an upstream, each mapped by `f(inbound address, identity)` (so a caller
/// that needs only addresses clones no identity).
pub fn endpoints_with<T>(
    shared: &Shared,
    up: &Upstream,
    f: impl Fn(SocketAddr, &SpiffeId) -> T,
) -> Vec<T> {
    let Some(p) = shared.policy.load_full() else {
        return vec![];
    };
    let set = &p.set;
    let Some(svc) = set.services.iter().find(|s| s.id == up.service) else {
        return vec![];
    };
    let target_port = svc
        .ports
        .iter()
        .find(|sp| sp.port == up.port)
        .map_or(up.port, |sp| sp.target_port.unwrap_or(sp.port));
    svc.workloads
        .iter()
        .filter_map(|&i| set.workloads.get(i))
        .filter_map(|w| {
            let addr = w
                .ports
                .iter()
                .find(|p| p.port == target_port)?
                .inbound
                .as_deref()?
                .parse()
                .ok()?;
            Some(f(addr, &w.identity))
        })
        .collect()
}

/// Opens mutual TLS to `addr`, an endpoint of `to`, with the workload's SVID, accepting
/// only a server whose SPIFFE ID is in `allowed` (a misrouted or impersonating endpoint is
/// refused, counted and recorded: [`handshake_refused`]).
pub async fn dial(
    shared: &Arc<Shared>,
    to: &WorkloadRef,
    addr: SocketAddr,
    allowed: Vec<SpiffeId>,
    mark: Option<u32>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(SvidServerVerifier::new(
        shared.bundles.clone(),
        Accept::Only(allowed),
    ))
    .with_client_cert_resolver(Arc::new(ClientCert(shared.clone())));
    let tcp = tokio::time::timeout(Duration::from_secs(5), Connector::new(mark).connect(addr))
        .await
        .map_err(|_| format!("no connection to {addr} within 5s"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("mesh.meshward.invalid")
        .map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            let why = Failure::of_io(&e);
            let msg = format!("mTLS with {addr} failed: {}", why.detail);
            handshake_refused(shared, to, addr, why);
            msg
        })
}

/// Counts a failed outbound handshake (`direction="outbound"`) and logs it as a deny
/// (`handshake_failed`, outbound, from this workload's identity to `to` at `addr`).
fn handshake_refused(shared: &Shared, to: &WorkloadRef, addr: SocketAddr, why: Failure) {
    shared.log.metrics.handshake_failed("outbound", why.kind);
    let own = shared
        .svid
        .load()
        .as_ref()
        .and_then(|s| spiffe_id_of(s.key.end_entity_cert().ok()?).ok());
    let req = Request {
        source: own.map_or(Source::Unauthenticated, Source::Authenticated),
        destination: to.clone(),
        port: addr.port(),
        http: None,
        at: SystemTime::now(),
    };
    let rev = shared
        .policy
        .load()
        .as_ref()
        .map_or(PolicyRevision(0), |p| PolicyRevision(p.revision));
    let d = Decision::bare(Verdict::Deny, Reason::HandshakeFailed, rev);
    shared.log.record_with(
        &req,
        &d,
        &Extra {
            outbound: true,
            detail: Some(why.detail),
            address: Some(addr),
            duration: None,
        },
    );
}

/// Serves one upstream for ever (the accept loop never exits: [`crate::listener`]).
pub async fn serve(shared: Arc<Shared>, up: Upstream, listener: TcpListener) -> Result<(), String> {
    let next = Arc::new(AtomicUsize::new(0));
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("outbound {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |mut app, _| {
        let (shared, up, next) = (shared.clone(), up.clone(), next.clone());
        tokio::spawn(async move {
            let _ = app.set_nodelay(true);
            let eps = endpoints(&shared, &up);
            if eps.is_empty() {
                eprintln!(
                    "meshward-proxy: no endpoint for {}:{}; closing",
                    up.service, up.port
                );
                return;
            }
            let (addr, _) = eps[next.fetch_add(1, Ordering::Relaxed) % eps.len()].clone();
            let allowed: Vec<SpiffeId> = eps.iter().map(|(_, id)| id.clone()).collect();
            match dial(&shared, &up.service, addr, allowed, None).await {
                Ok(mut tls) => {
                    let _ = tokio::io::copy_bidirectional(&mut app, &mut tls).await;
                }
                Err(e) => eprintln!("meshward-proxy: refusing endpoint of {}: {e}", up.service),
            }
        });
    })
    .await;
    Ok(())
}
