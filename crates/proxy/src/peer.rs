//! Outbound stage 4, the wire to the peer proxy: mutual TLS with the workload's SVID to one
//! endpoint, accepting only a server whose SPIFFE ID is one the endpoint's service is
//! declared to run as (a misrouted or impersonating endpoint is refused, counted and
//! recorded). Used by every outbound path: the tunnel ([`crate::outbound`]), the pools
//! ([`crate::pool`]) and transparent capture ([`crate::transparent`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;
use meshward_identity::svid::spiffe_id_of;
use meshward_identity::verifier::{Accept, SvidServerVerifier};
use meshward_policy::decision::{
    Decision, PolicyRevision, Reason, Request, Source, Verdict, WorkloadRef,
};
use tokio::net::TcpStream;

use crate::decision_log::Extra;
use crate::handshake::Failure;
use crate::state::{ClientCert, Shared};

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
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        crate::transport::Connector::new(mark).connect(addr),
    )
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
            ..Extra::default()
        },
    );
}
