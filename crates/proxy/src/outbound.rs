//! Outbound, the listener and the order of the stages. The app connects in plaintext to a
//! loopback listener per upstream service (or is captured, [`crate::transparent`]); each
//! connection (tunnel) or request (pooled HTTP, [`crate::pool`]) goes through:
//!
//! 1. discovery — the endpoints of the service in the view in force ([`crate::discovery`]);
//! 2. balancing — one endpoint of them ([`crate::balance`]);
//! 3. connections — per endpoint: a new one per app connection (tunnel, [`connect`]) or a
//!    pool ([`crate::pool`]);
//! 4. the wire — mutual TLS to the peer proxy, identity-checked ([`crate::peer`]).
//!
//! The seams where issue 14's resilience sits are marked in [`connect`] and in
//! [`crate::pool`]: failover and ejection choose the candidate set before balancing, the
//! breaker admits after it, timeouts and retries wrap the attempt. HTTP is parsed and
//! authorized by the inbound side, where the policy lives; this module tunnels bytes.

use std::sync::Arc;

use meshward_policy::decision::WorkloadRef;
use tokio::net::{TcpListener, TcpStream};

use crate::balance::RoundRobin;
use crate::discovery::EndpointSet;
use crate::state::Shared;

pub use crate::peer::dial;

/// One upstream: a service and its port.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub service: WorkloadRef,
    pub port: u16,
}

/// Why an outbound connection was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The service has no endpoint in the view in force.
    NoEndpoint,
    /// The chosen endpoint could not be reached or was refused at the handshake.
    Refused(String),
}

/// One outbound connection to `service` through the stages: choose an endpoint of
/// `endpoints` with `balancer`, then open mutual TLS to it accepting any identity of the
/// service (its sockets marked with `mark` in transparent mode). Counts the attempt, and a
/// failure, on the endpoint's long-lived state.
pub async fn connect(
    shared: &Arc<Shared>,
    service: &WorkloadRef,
    endpoints: &EndpointSet,
    balancer: &RoundRobin,
    mark: Option<u32>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    // Seam (issue 14) — failover and ejection: `endpoints` is the primary set; the
    // caller's locality first, then the `failover` localities, then the `fallback`
    // service, minus ejected endpoints, are chosen here, before balancing.
    let ep = balancer.pick(endpoints).ok_or(ConnectError::NoEndpoint)?;
    // Seam — circuit breaker: the per-service connection cap admits or refuses here.
    ep.state.started();
    // Seam — timeouts and retries: the connect timeout (5 s) is in `peer::dial`; a
    // connect-failure retry on another endpoint wraps this attempt.
    match dial(shared, service, ep.addr(), endpoints.allowed.clone(), mark).await {
        Ok(tls) => Ok(tls),
        Err(e) => {
            ep.state.failed();
            Err(ConnectError::Refused(e))
        }
    }
}

/// Discovery for an explicit upstream: its endpoints in the view in force (none before the
/// first revision).
pub fn endpoints(shared: &Shared, up: &Upstream) -> Arc<EndpointSet> {
    shared
        .policy
        .load()
        .as_ref()
        .map_or_else(Arc::default, |p| {
            p.view.discovery.explicit(&up.service, up.port).clone()
        })
}

/// Serves one upstream for ever, tunnelling each app connection as bytes (the accept loop
/// never exits: [`crate::listener`]).
pub async fn serve(shared: Arc<Shared>, up: Upstream, listener: TcpListener) -> Result<(), String> {
    let balancer = Arc::new(RoundRobin::default());
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("outbound {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |mut app, _| {
        let (shared, up, balancer) = (shared.clone(), up.clone(), balancer.clone());
        tokio::spawn(async move {
            let _ = app.set_nodelay(true);
            let endpoints = endpoints(&shared, &up);
            match connect(&shared, &up.service, &endpoints, &balancer, None).await {
                Ok(mut tls) => {
                    let _ = tokio::io::copy_bidirectional(&mut app, &mut tls).await;
                }
                Err(ConnectError::NoEndpoint) => eprintln!(
                    "meshward-proxy: no endpoint for {}:{}; closing",
                    up.service, up.port
                ),
                Err(ConnectError::Refused(e)) => {
                    eprintln!("meshward-proxy: refusing endpoint of {}: {e}", up.service)
                }
            }
        });
    })
    .await;
    Ok(())
}
