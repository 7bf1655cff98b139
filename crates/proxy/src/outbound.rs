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
//! Resilience sits around stages 2–4 ([`crate::resilience`]): ejection, locality
//! failover and the fallback choose the candidates before balancing; the breaker admits
//! after it; a connect failure is tried again on another endpoint (connect-time failover,
//! within the service's retry budget). HTTP is parsed and authorized by the inbound side,
//! where the policy lives; this module tunnels bytes.

use std::sync::Arc;
use std::time::Instant;

use meshward_policy::decision::WorkloadRef;
use tokio::net::{TcpListener, TcpStream};

use crate::discovery::EndpointSet;
use crate::endpoint_state::{InFlight, now_ms};
use crate::resilience::{Event, Place, Resilience};
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
    /// The service's `circuitBreaker.maxConnections` are open.
    CircuitOpen,
    /// No endpoint tried could be reached or passed the handshake (the last one's error).
    Refused(String),
}

/// An open tunnel: the mutual-TLS stream, and the places it holds (the endpoint's load
/// for the balancer, the breaker's connection) until it is dropped.
#[derive(Debug)]
pub struct Tunnel {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    /// The endpoint that serves it.
    pub endpoint: std::net::SocketAddr,
    _load: InFlight,
    _place: Place,
}

/// At most this many endpoints are tried for one connection (connect-time failover).
pub const CONNECT_ATTEMPTS: u32 = 3;

/// The resilience of calls to `service` in the view in force, the caller's locality, and
/// the fallback's endpoints on `port` (`transparent`: the captured tables).
pub fn resilience_of(
    shared: &Shared,
    service: &WorkloadRef,
    port: u16,
    transparent: bool,
) -> (
    Arc<Resilience>,
    Option<crate::discovery::Locality>,
    Option<Arc<EndpointSet>>,
) {
    match shared.policy.load().as_ref() {
        Some(p) => {
            let r = p.view.resilience(service).clone();
            let fb = r
                .settings
                .fallback
                .as_ref()
                .map(|f| p.view.discovery.fallback(f, port, transparent).clone());
            (r, p.view.locality.clone(), fb)
        }
        None => (Arc::default(), None, None),
    }
}

/// Counts (and for the rare ones, logs) a resilience event of calls to `service`.
pub fn event(shared: &Shared, service: &WorkloadRef, e: Event, detail: &str) {
    shared
        .log
        .metrics
        .outbound_event(&service.to_string(), e.as_str());
    match e {
        Event::Ejection => tracing::warn!("{service}: {}: {detail}", e.as_str()),
        Event::AllEjected => {
            // Every request while all are ejected: one line a second, the rest counted.
            static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now = now_ms().max(1);
            let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
            if (last == 0 || now.saturating_sub(last) >= 1000)
                && LAST
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                tracing::warn!(
                    "{service}: {}: {detail} (at most one such line a second; all of them are counted in the outbound events metric)",
                    e.as_str()
                );
            }
        }
        _ => {}
    }
}

/// The caller's record of a call its resilience answered itself (`deny` with reason
/// `circuit_open`, `timeout`, `no_endpoint` or `upstream_failed`) or that took more than
/// one attempt (`allow`, `retried`): which endpoint served or was tried last, and how
/// many attempts (docs/decision-log.md). Rare by design: nothing is written for a call
/// served at its first attempt (the destination's sidecar records those).
#[allow(clippy::too_many_arguments)]
pub fn record(
    shared: &Shared,
    service: &WorkloadRef,
    port: u16,
    reason: meshward_policy::Reason,
    endpoint: Option<&crate::discovery::Endpoint>,
    attempts: u32,
    detail: String,
    http: Option<meshward_policy::decision::HttpAttrs>,
) {
    record_answered(
        shared, service, port, reason, endpoint, attempts, detail, http, None,
    );
}

/// [`record`] of an HTTP call, with the `status` the caller's app received.
#[allow(clippy::too_many_arguments)]
pub fn record_answered(
    shared: &Shared,
    service: &WorkloadRef,
    port: u16,
    reason: meshward_policy::Reason,
    endpoint: Option<&crate::discovery::Endpoint>,
    attempts: u32,
    detail: String,
    http: Option<meshward_policy::decision::HttpAttrs>,
    status: Option<u16>,
) {
    use meshward_policy::decision::{Decision, Request, Source, Verdict};
    let source = shared
        .svid
        .load()
        .as_ref()
        .and_then(|s| s.key.cert.first())
        .and_then(|leaf| meshward_identity::svid::spiffe_id_of(leaf).ok())
        .map_or(Source::Unauthenticated, Source::Authenticated);
    let verdict = if reason == meshward_policy::Reason::Retried {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    let req = Request {
        source,
        destination: endpoint.map_or_else(|| service.clone(), |e| e.workload.clone()),
        port,
        http,
        at: std::time::SystemTime::now(),
    };
    let d = Decision::bare(verdict, reason, crate::gate::revision(shared));
    shared.log.record_with(
        &req,
        &d,
        &crate::decision_log::Extra {
            outbound: true,
            detail: Some(detail),
            endpoint: endpoint.map(|e| e.addr()),
            attempts: Some(attempts),
            status,
            ..Default::default()
        },
    );
}

/// One outbound connection to `service` (callers on `port`) through the stages: the
/// breaker admits it, an endpoint of `endpoints` (or the fallback's) is chosen, and mutual
/// TLS is opened to it accepting only the identities of the set it came from (sockets
/// marked with `mark` in transparent mode). A connect failure counts against the
/// endpoint (ejection) and, within the retry budget, another endpoint is tried.
pub async fn connect(
    shared: &Arc<Shared>,
    service: &WorkloadRef,
    port: u16,
    endpoints: &EndpointSet,
    mark: Option<u32>,
) -> Result<Tunnel, ConnectError> {
    let (res, caller, fallback) = resilience_of(shared, service, port, mark.is_some());
    let settings = &res.settings;
    use meshward_policy::Reason;
    let Some(place) = res.state.admit_connection(&settings.breaker) else {
        event(shared, service, Event::CircuitOpen, "");
        let why = "circuit open (circuitBreaker.maxConnections)".to_owned();
        record(
            shared,
            service,
            port,
            Reason::CircuitOpen,
            None,
            0,
            why,
            None,
        );
        return Err(ConnectError::CircuitOpen);
    };
    let budget = settings
        .retry
        .clone()
        .unwrap_or_else(crate::resilience::default_budget);
    res.state.budget().request(now_ms());
    let (mut avoid, mut last) = (None, String::new());
    let mut tried: Option<(&crate::discovery::Endpoint, u32)> = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        let Some((choice, ev)) = crate::resilience::choose(
            endpoints,
            fallback.as_deref(),
            caller.as_ref(),
            settings,
            avoid,
        ) else {
            let why = format!("no endpoint for {service}:{port}");
            record(
                shared,
                service,
                port,
                Reason::NoEndpoint,
                None,
                attempt,
                why,
                None,
            );
            return Err(ConnectError::NoEndpoint);
        };
        if attempt > 0 {
            // Failover goes to another endpoint; the one that just failed is not redialled.
            if Some(choice.endpoint.addr()) == avoid {
                break;
            }
            if !res.state.budget().try_retry(now_ms(), &budget) {
                event(shared, service, Event::RetryBudgetExhausted, "");
                break;
            }
            event(shared, service, Event::Retry, "");
        }
        if let Some(ev) = ev {
            event(
                shared,
                service,
                ev,
                &format!("trying {}", choice.endpoint.key),
            );
        }
        let ep = choice.endpoint;
        tried = Some((ep, attempt + 1));
        ep.state.started();
        let load = ep.state.begin();
        let t0 = Instant::now();
        match dial(
            shared,
            &ep.key.service,
            ep.addr(),
            choice.set.allowed.clone(),
            mark,
        )
        .await
        {
            Ok(tls) => {
                let now = now_ms();
                ep.state.observe(now, t0.elapsed().as_nanos() as f64);
                ep.state.succeeded(now, &settings.outlier);
                if attempt > 0 {
                    let why = format!(
                        "connected at attempt {} (last failure: {last})",
                        attempt + 1
                    );
                    record(
                        shared,
                        service,
                        port,
                        Reason::Retried,
                        Some(ep),
                        attempt + 1,
                        why,
                        None,
                    );
                }
                return Ok(Tunnel {
                    tls,
                    endpoint: ep.addr(),
                    _load: load,
                    _place: place,
                });
            }
            Err(e) => {
                if let Some((ms, why)) =
                    crate::resilience::failed(choice.set, ep, &settings.outlier)
                {
                    let detail = format!("{} ejected for {ms} ms ({why}): {e}", ep.key);
                    event(shared, service, Event::Ejection, &detail);
                }
                avoid = Some(ep.addr());
                last = e;
            }
        }
    }
    if let Some((ep, n)) = tried {
        let why = format!("no connection: {last}");
        record(
            shared,
            service,
            port,
            Reason::UpstreamFailed,
            Some(ep),
            n,
            why,
            None,
        );
    }
    Err(ConnectError::Refused(last))
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
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("outbound {addr}"));
    let pools = [
        crate::pool::Pooled::new(&shared, &up, crate::pool::UpstreamProtocol::Http1),
        crate::pool::Pooled::new(&shared, &up, crate::pool::UpstreamProtocol::Http2),
    ];
    crate::listener::accept_loop(&shared, &me, listener, None, |mut app, _, conn| {
        // Per-request settings on an HTTP port need the requests: pooled HTTP for this
        // connection (decided per connection, so a new revision applies to the next one).
        let pooled = shared
            .policy
            .load()
            .as_ref()
            .and_then(|p| p.view.resilience(&up.service).pooled(up.port));
        if let Some(proto) = pooled {
            let i = usize::from(proto == crate::pool::UpstreamProtocol::Http2);
            let served = pools[i].clone().serve_app(app);
            tokio::spawn(async move {
                let _conn = conn;
                served.await;
            });
            return;
        }
        let (shared, up) = (shared.clone(), up.clone());
        tokio::spawn(async move {
            let _conn = conn;
            let _ = app.set_nodelay(true);
            let endpoints = endpoints(&shared, &up);
            match connect(&shared, &up.service, up.port, &endpoints, None).await {
                Ok(mut t) => {
                    let mut app = crate::transport::Metered::new(&mut app, &shared, "outbound");
                    let _ = tokio::io::copy_bidirectional(&mut app, &mut t.tls).await;
                }
                Err(ConnectError::CircuitOpen) => tracing::warn!(
                    "{}: circuit open (circuitBreaker.maxConnections); closing",
                    up.service
                ),
                Err(ConnectError::NoEndpoint) => {
                    tracing::warn!("no endpoint for {}:{}; closing", up.service, up.port)
                }
                Err(ConnectError::Refused(e)) => {
                    tracing::warn!("refusing endpoint of {}: {e}", up.service)
                }
            }
        });
    })
    .await;
    Ok(())
}
