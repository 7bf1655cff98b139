//! Outbound stage 3 for pooled HTTP, per-endpoint connections and pools: the app's HTTP
//! requests are forwarded over a pool of mutual-TLS connections to the upstream's endpoints — HTTP/1.1 (a pool of connections, one request
//! at a time on each) or HTTP/2 (requests multiplexed on one connection per endpoint).
//! Each request picks an endpoint ([`crate::balance`]); connections are reused across the app's
//! connections and requests. The alternative, [`crate::outbound::serve`], tunnels each app
//! connection as bytes. Which is the default, and why: docs/proxy.md.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use crate::endpoint_state::now_ms;
use crate::outbound::{Upstream, dial, endpoints};
use crate::resilience::{Event, RETRY_BODY_CAP};
use crate::state::Shared;

/// How the outbound side carries an upstream's traffic to the next proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Bytes, one mTLS connection per app connection (any protocol).
    Tunnel,
    /// HTTP/1.1 over a pool of mTLS connections.
    Http1,
    /// HTTP/2 over one multiplexed mTLS connection per endpoint.
    Http2,
}

impl UpstreamProtocol {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tunnel" => Ok(UpstreamProtocol::Tunnel),
            "http1" => Ok(UpstreamProtocol::Http1),
            "http2" => Ok(UpstreamProtocol::Http2),
            other => Err(format!("`{other}`: use tunnel, http1 or http2")),
        }
    }
}

/// An mTLS connection as hyper's client I/O.
#[derive(Debug)]
pub struct MtlsIo(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl hyper::rt::Read for MtlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MtlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

impl Connection for MtlsIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Dials the endpoint a pooled request's URI names (or, for HTTP/2, the one endpoint its
/// client is for), accepting only the identity the configuration gives that endpoint.
#[derive(Debug, Clone)]
struct MtlsConnector {
    shared: Arc<Shared>,
    up: Upstream,
    endpoint: Option<SocketAddr>,
}

impl tower::Service<Uri> for MtlsConnector {
    type Response = MtlsIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<MtlsIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (shared, up, endpoint) = (self.shared.clone(), self.up.clone(), self.endpoint);
        Box::pin(async move {
            let addr: SocketAddr = match endpoint {
                Some(a) => a,
                None => uri
                    .authority()
                    .map(|a| a.as_str())
                    .unwrap_or("")
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("`{uri}` names no endpoint")))?,
            };
            dial_endpoint(&shared, &up, addr).await
        })
    }
}

/// [`dial_tls`] as hyper's client I/O.
async fn dial_endpoint(
    shared: &Arc<Shared>,
    up: &Upstream,
    addr: SocketAddr,
) -> std::io::Result<MtlsIo> {
    dial_tls(shared, up, addr)
        .await
        .map(|tls| MtlsIo(TokioIo::new(tls)))
}

/// Opens mutual TLS to the endpoint at `addr` of `up` (or of its fallback), accepting only
/// the identity the configuration gives that endpoint.
pub(crate) async fn dial_tls(
    shared: &Arc<Shared>,
    up: &Upstream,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let (_, _, fallback) = crate::outbound::resilience_of(shared, &up.service, up.port, false);
    let primary = endpoints(shared, up);
    let Some(identity) = primary
        .get(addr)
        .or_else(|| fallback.as_deref().and_then(|f| f.get(addr)))
        .map(|e| e.identity.clone())
    else {
        return Err(std::io::Error::other(format!(
            "{addr} is no longer an endpoint of {}",
            up.service
        )));
    };
    dial(shared, &up.service, addr, vec![identity], None)
        .await
        .map_err(std::io::Error::other)
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// HTTP/1.1 connections to endpoints, without hyper-util's pool (which spawned a task per
/// request to give its connection back, and locked one pool for every request): each app
/// connection keeps its own upstream connections ([`Local`], touched by that connection
/// only) and hands them to this shared idle list when it closes, where the next app
/// connection finds them. So a keep-alive app connection takes no shared lock per request.
#[derive(Debug, Default)]
struct H1Idle(std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<Sender>>>);

/// Idle connections kept per endpoint across app connections.
const IDLE_PER_ENDPOINT: usize = 64;

impl H1Idle {
    fn take(&self, addr: SocketAddr) -> Option<Sender> {
        let mut m = self.0.lock().ok()?;
        let v = m.get_mut(&addr)?;
        while let Some(s) = v.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, s: Sender) {
        if s.is_closed() {
            return;
        }
        if let Ok(mut m) = self.0.lock() {
            let v = m.entry(addr).or_default();
            if v.len() < IDLE_PER_ENDPOINT {
                v.push(s);
            }
        }
    }
}

/// One app connection's upstream HTTP/1.1 connections (a lock only it takes: its requests
/// run one at a time, or a few at once for h2c), given to the shared idle list at its end.
#[derive(Debug)]
struct Local {
    conns: std::sync::Mutex<Vec<(SocketAddr, Sender)>>,
    idle: Arc<H1Idle>,
}

impl Local {
    /// A ready connection to `addr` (this app connection's, else an idle one; `None`:
    /// dial), and whether it was reused.
    fn take(&self, addr: SocketAddr) -> Option<Sender> {
        if let Ok(mut v) = self.conns.lock()
            && let Some(i) = v.iter().position(|(a, s)| *a == addr && s.is_ready())
        {
            return Some(v.swap_remove(i).1);
        }
        self.idle.take(addr)
    }

    fn put(&self, addr: SocketAddr, s: Sender) {
        if s.is_closed() {
            return;
        }
        if let Ok(mut v) = self.conns.lock() {
            v.push((addr, s));
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Ok(v) = self.conns.get_mut() {
            for (a, s) in v.drain(..) {
                self.idle.put(a, s);
            }
        }
    }
}

/// Sends `req` (origin-form) to `addr` over one of `local`'s connections, a fresh one when
/// none is ready. A reused connection that turns out closed before the request went out
/// (the endpoint closed it while idle) is not the endpoint's failure: the request is sent
/// again on a new connection. `Err((true, _))`: no connection could be made.
async fn send_h1(
    shared: &Arc<Shared>,
    up: &Upstream,
    local: &Local,
    addr: SocketAddr,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, Fail> {
    let mut reused = local.take(addr);
    loop {
        let fresh = reused.is_none();
        let mut sender = match reused.take() {
            Some(s) => s,
            None => {
                let io = dial_endpoint(shared, up, addr)
                    .await
                    .map_err(|e| Fail::Error(true, error_chain(&e)))?;
                let (s, conn) = hyper::client::conn::http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|e| Fail::Error(true, error_chain(&e)))?;
                tokio::spawn(conn);
                s
            }
        };
        if let Err(e) = sender.ready().await {
            if fresh {
                return Err(Fail::Error(false, error_chain(&e)));
            }
            continue; // closed while idle: a new connection
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                // Ready again once the response body has been read (before this app
                // connection's next request); `take` checks.
                local.put(addr, sender);
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                // Not sent: the connection was closing. Again, on a new one.
                Some(back) if !fresh => req = back,
                _ => return Err(Fail::Error(false, error_chain(&e.into_error()))),
            },
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// An answer of the caller's own sidecar: the status, the JSON reason, and the
/// `x-meshward-refused` header (so a sidecar in front of this one does not blame, nor
/// retry on, an endpoint for it).
fn error(status: StatusCode, reason: &'static str, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(
            serde_json::json!({"error": &msg, "reason": reason}).to_string(),
        ))
        .map_err(|never: Infallible| match never {})
        .boxed(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        crate::rescue::REFUSED_HEADER,
        hyper::header::HeaderValue::from_static(reason),
    );
    r.extensions_mut().insert(OwnAnswer(reason, msg));
    r
}

/// Marks an answer the caller's sidecar made itself (never sent): its reason and message,
/// for the record [`Pooled::forward`] writes.
#[derive(Debug, Clone)]
struct OwnAnswer(&'static str, String);

/// Where a request's attempts went: the endpoint tried last and how many attempts.
#[derive(Debug, Default)]
pub(crate) struct Trail {
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) attempts: u32,
}

type PoolClient = Client<MtlsConnector, Body>;

fn client(
    shared: &Arc<Shared>,
    up: &Upstream,
    protocol: UpstreamProtocol,
    endpoint: Option<SocketAddr>,
) -> PoolClient {
    Client::builder(TokioExecutor::new())
        .http2_only(protocol == UpstreamProtocol::Http2)
        .pool_idle_timeout(Duration::from_secs(90))
        .build(MtlsConnector {
            shared: shared.clone(),
            up: up.clone(),
            endpoint,
        })
}

/// HTTP/2: one client per endpoint, so that a request's `:authority` carries the app's host
/// (the host policy evaluates at the next proxy) while the client still dials that endpoint.
/// Copy-on-write: the request path only loads the map.
#[derive(Debug, Default)]
struct H2Clients(arc_swap::ArcSwap<std::collections::HashMap<SocketAddr, PoolClient>>);

impl H2Clients {
    fn get(&self, shared: &Arc<Shared>, up: &Upstream, addr: SocketAddr) -> PoolClient {
        if let Some(c) = self.0.load().get(&addr) {
            return c.clone();
        }
        let new = client(shared, up, UpstreamProtocol::Http2, Some(addr));
        self.0.rcu(|m| {
            let mut m = std::collections::HashMap::clone(m);
            m.entry(addr).or_insert_with(|| new.clone());
            m
        });
        self.0.load().get(&addr).cloned().unwrap_or(new)
    }
}

/// Serves one upstream as pooled HTTP for ever (the accept loop never exits:
/// [`crate::listener`]).
pub async fn serve(
    shared: Arc<Shared>,
    up: Upstream,
    listener: TcpListener,
    protocol: UpstreamProtocol,
) -> Result<(), String> {
    let ctx = Pooled::new(&shared, &up, protocol);
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("outbound {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |app, _, conn| {
        let served = ctx.clone().serve_app(app);
        tokio::spawn(async move {
            let _conn = conn;
            served.await;
        });
    })
    .await;
    Ok(())
}

impl Pooled {
    pub fn new(shared: &Arc<Shared>, up: &Upstream, protocol: UpstreamProtocol) -> Arc<Self> {
        Arc::new(Pooled {
            h1: Arc::default(),
            raw: crate::h1_out::Idle::default(),
            h2: H2Clients::default(),
            shared: shared.clone(),
            up: up.clone(),
            protocol,
        })
    }

    /// Serves one app connection: each of its requests is forwarded ([`Self::forward`]).
    pub async fn serve_app(self: Arc<Self>, mut app: TcpStream) {
        let _ = app.set_nodelay(true);
        // The common HTTP/1.1 request takes the fast path; the rest of the connection
        // moves to the general path (below) at the first request that needs it.
        let prefix = if self.protocol == UpstreamProtocol::Http1 {
            match crate::h1_out::serve(&self, &self.raw, &mut app).await {
                // (The outbound side injects no faults: `Reset` is never returned here.)
                crate::h1::End::Closed | crate::h1::End::Reset => return,
                crate::h1::End::Handoff(bytes) => bytes,
            }
        } else {
            vec![]
        };
        let local = Arc::new(Local {
            conns: std::sync::Mutex::new(Vec::new()),
            idle: self.h1.clone(),
        });
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (ctx, local) = (self.clone(), local.clone());
            async move { Ok::<_, Infallible>(ctx.forward(req, &local).await) }
        });
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1().max_buf_size(64 * 1024);
        let _ = b
            .serve_connection(TokioIo::new(crate::h1_out::Prefixed::new(app, prefix)), svc)
            .await;
    }
}

/// One pooled upstream: its clients and where it goes.
#[derive(Debug)]
pub struct Pooled {
    pub(crate) shared: Arc<Shared>,
    pub(crate) up: Upstream,
    protocol: UpstreamProtocol,
    /// HTTP/1.1: idle connections by endpoint, shared by the app connections.
    h1: Arc<H1Idle>,
    /// HTTP/1.1, the fast path's idle connections by endpoint ([`crate::h1_out`]).
    raw: crate::h1_out::Idle,
    /// HTTP/2: a client per endpoint.
    h2: H2Clients,
}

/// How an attempt failed without an answer.
enum Fail {
    /// The per-try or the overall timeout passed.
    Timeout,
    /// `true`: no connection (nothing was sent); the error with its sources. A body that
    /// failed before its end (the endpoint died mid-answer) is `false`.
    Error(bool, String),
}

impl Pooled {
    /// One request through the stages and the resilience around them: the breaker admits
    /// it; each attempt chooses an endpoint (failover, ejection, fallback, then two random
    /// choices on latency × load), is sent with the per-try timeout, and its outcome counts
    /// for the endpoint; a failure is tried again when the retry settings, the method, the
    /// body and the budget all allow it. A refusal by the next proxy's policy is never the
    /// endpoint's fault and never retried.
    async fn forward(&self, req: Request<Incoming>, local: &Local) -> Response<Body> {
        // Cheap copies (shared bytes), kept for the rare record below.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let host = req.headers().get(hyper::header::HOST).cloned();
        let mut trail = Trail::default();
        let resp = self.attempts(req, local, &mut trail).await;
        let own = resp
            .extensions()
            .get::<OwnAnswer>()
            .map(|OwnAnswer(r, m)| (*r, m.as_str()));
        self.note(
            own,
            resp.status().as_u16(),
            &trail,
            method.as_str(),
            uri.path_and_query().map_or("/", |p| p.as_str()),
            || {
                host.as_ref()
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| uri.authority().map(|a| a.to_string()))
            },
        );
        resp
    }

    /// The caller's record of a request its resilience answered itself (`own`: the reason
    /// and message of that answer) or that took more than one attempt; nothing otherwise.
    pub(crate) fn note(
        &self,
        own: Option<(&'static str, &str)>,
        status: u16,
        trail: &Trail,
        method: &str,
        pq: &str,
        host: impl FnOnce() -> Option<String>,
    ) {
        use meshward_policy::Reason;
        let (reason, detail) = match own {
            Some((r, msg)) => (
                match r {
                    "circuit_open" => Some(Reason::CircuitOpen),
                    "timeout" => Some(Reason::UpstreamTimeout),
                    "no_endpoint" => Some(Reason::NoEndpoint),
                    "upstream_failed" => Some(Reason::UpstreamFailed),
                    // The app's own fault (a bad target, a body that failed): not the
                    // service's, nothing to record.
                    _ => None,
                },
                msg.to_owned(),
            ),
            None if trail.attempts > 1 => (
                Some(Reason::Retried),
                format!("answered {status} at attempt {}", trail.attempts),
            ),
            None => (None, String::new()),
        };
        let Some(reason) = reason else {
            return;
        };
        let path = meshward_policy::path::normalize(pq)
            .map(|n| n.path)
            .unwrap_or_else(|_| pq.split('?').next().unwrap_or("/").to_owned());
        let http = meshward_policy::decision::HttpAttrs {
            method: method.to_owned(),
            path,
            host: host(),
            headers: vec![],
        };
        // The endpoint as the view in force names it (the primary set or the fallback).
        let (_, _, fallback) =
            crate::outbound::resilience_of(&self.shared, &self.up.service, self.up.port, false);
        let primary = endpoints(&self.shared, &self.up);
        let ep = trail.endpoint.and_then(|a| {
            primary
                .get(a)
                .or_else(|| fallback.as_deref().and_then(|f| f.get(a)))
        });
        crate::outbound::record_answered(
            &self.shared,
            &self.up.service,
            self.up.port,
            reason,
            ep,
            trail.attempts,
            detail,
            Some(http),
            Some(status),
        );
    }

    /// [`Self::forward`]'s attempts, noting in `trail` where they went.
    async fn attempts(
        &self,
        req: Request<Incoming>,
        local: &Local,
        trail: &mut Trail,
    ) -> Response<Body> {
        let (shared, up) = (&self.shared, &self.up);
        let started = tokio::time::Instant::now();
        let eps = endpoints(shared, up);
        let (res, caller, fallback) =
            crate::outbound::resilience_of(shared, &up.service, up.port, false);
        let settings = &res.settings;
        let per = settings.for_request(
            req.method(),
            req.uri().path_and_query().map_or("/", |p| p.as_str()),
        );
        let deadline = per.timeout.map(|t| started + t);
        let http1 = self.protocol == UpstreamProtocol::Http1;
        let Some(place) = res.state.admit(&settings.breaker, http1, per.timeout).await else {
            crate::outbound::event(shared, &up.service, Event::CircuitOpen, "");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                format!("{}: circuit open (circuitBreaker caps reached)", up.service),
            );
        };
        res.state.budget().request(now_ms());
        let (parts, body) = req.into_parts();
        let retry = per.retry;
        // A body is kept for another attempt only when its size is known and small (an
        // empty one costs nothing); otherwise it is streamed to the first attempt only.
        let mut body = Some(body);
        let replay: Option<Bytes> = match body
            .as_ref()
            .and_then(|b| hyper::body::Body::size_hint(b).exact())
        {
            Some(0) => {
                body = None;
                Some(Bytes::new())
            }
            Some(n) if n <= RETRY_BODY_CAP as u64 => {
                let b = body
                    .take()
                    .map(|b| http_body_util::Limited::new(b, RETRY_BODY_CAP));
                let collected = match (b, deadline) {
                    (Some(b), Some(d)) => tokio::time::timeout_at(d, b.collect()).await.ok(),
                    (Some(b), None) => Some(b.collect().await),
                    (None, _) => None,
                };
                match collected {
                    Some(Ok(c)) => Some(c.to_bytes()),
                    Some(Err(e)) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            format!("the request body failed: {e}"),
                        );
                    }
                    None => {
                        crate::outbound::event(shared, &up.service, Event::Timeout, "");
                        return error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            format!(
                                "{}: the request body did not arrive within the timeout",
                                up.service
                            ),
                        );
                    }
                }
            }
            _ => None,
        };
        let budget = retry
            .cloned()
            .unwrap_or_else(crate::resilience::default_budget);
        // Without retries, a connect failure (nothing was sent) still goes to another
        // endpoint: connect-time failover.
        let max_attempts = 1 + retry.map_or(crate::outbound::CONNECT_ATTEMPTS - 1, |r| r.attempts);
        let per_try = retry.and_then(|r| r.per_try_timeout);
        let mut avoid = None;
        let mut last_connect: Option<String> = None;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let Some((choice, ev)) = crate::resilience::choose(
                &eps,
                fallback.as_deref(),
                caller.as_ref(),
                settings,
                avoid,
            ) else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_endpoint",
                    format!("no endpoint for {}:{}", up.service, up.port),
                );
            };
            if let Some(ev) = ev {
                let detail = format!("trying {}", choice.endpoint.key);
                crate::outbound::event(shared, &up.service, ev, &detail);
            }
            let ep = choice.endpoint;
            if let Some(e) = &last_connect
                && Some(ep.addr()) == avoid
            {
                // Connect-time failover found no other endpoint: the failure stands.
                return error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!(
                        "{} ({}) did not answer: {e} ({} attempt(s))",
                        up.service,
                        ep.addr(),
                        attempt - 1
                    ),
                );
            }
            (trail.endpoint, trail.attempts) = (Some(ep.addr()), attempt);
            ep.state.started();
            let load = ep.state.begin();
            let b: Body = match (&replay, body.take()) {
                (Some(bytes), _) => Full::new(bytes.clone())
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
                (None, Some(b)) => b.boxed(),
                // Never: without a kept body there is no second attempt (`can_retry`).
                (None, None) => Body::default(),
            };
            let mut req = Request::from_parts(clone_parts(&parts), b);
            let Some(client) = self.prepare(&mut req, ep.addr()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "bad request target".into(),
                );
            };
            let addr = ep.addr();
            let tracer = shared.tracer.get();
            let span = if tracer.is_some() || meshward_telemetry::trace::enabled() {
                meshward_telemetry::trace::RequestSpan::start_client(
                    tracer,
                    req.headers(),
                    req.method().as_str(),
                    req.uri().path(),
                    &up.service.to_string(),
                )
            } else {
                meshward_telemetry::trace::RequestSpan::default()
            };
            span.inject(req.headers_mut());
            let t0 = tokio::time::Instant::now();
            let limit = match (per_try.map(|p| t0 + p), deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sent = async {
                match client {
                    Some(c) => c
                        .request(req)
                        .await
                        .map_err(|e| Fail::Error(e.is_connect(), error_chain(&e))),
                    None => send_h1(shared, up, local, addr, req).await,
                }
            };
            let outcome = match limit {
                Some(l) => match tokio::time::timeout_at(l, sent).await {
                    Ok(r) => r,
                    Err(_) => Err(Fail::Timeout),
                },
                None => sent.await,
            };
            // With retries, a small answer is read whole before it is passed on, so an
            // endpoint that dies mid-answer is one more failed attempt, not a truncated
            // response to the app.
            let outcome = match outcome {
                Ok(resp) if retry.is_some() && attempt < max_attempts => {
                    buffer_small(resp, limit).await
                }
                Ok(resp) => Ok(resp.map(|b| b.boxed())),
                Err(e) => Err(e),
            };
            let now = now_ms();
            let can_retry = attempt < max_attempts && replay.is_some();
            match outcome {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    ep.state.observe(now, t0.elapsed().as_nanos() as f64);
                    let refused = resp.headers().contains_key(crate::rescue::REFUSED_HEADER)
                        && matches!(status, 400 | 403 | 429);
                    let failed = status >= 500 && !refused;
                    if failed {
                        self.failed(choice.set, ep, settings, &format!("answered {status}"));
                    } else {
                        ep.state.succeeded(now, &settings.outlier);
                    }
                    let again = failed
                        && can_retry
                        && retry.is_some_and(|r| r.on.statuses.contains(&status));
                    if !again || !self.take_retry(&res, &budget) {
                        span.finish(status);
                        return resp.map(|b| crate::clock::Tracked::new(b, (load, place)).boxed());
                    }
                }
                Err(Fail::Timeout) => {
                    self.failed(choice.set, ep, settings, "timed out");
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        crate::outbound::event(shared, &up.service, Event::Timeout, "");
                        span.finish(504);
                        return error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            format!(
                                "{} did not answer within the timeout ({:?}; {attempt} attempt(s))",
                                up.service,
                                per.timeout.unwrap_or_default()
                            ),
                        );
                    }
                    crate::outbound::event(shared, &up.service, Event::PerTryTimeout, "");
                    let again = can_retry && retry.is_some_and(|r| r.on.timeout);
                    if !again || !self.take_retry(&res, &budget) {
                        span.finish(504);
                        return error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            format!(
                                "{} ({}) did not answer within the per-try timeout ({:?}; {attempt} attempt(s))",
                                up.service,
                                ep.addr(),
                                per_try.unwrap_or_default()
                            ),
                        );
                    }
                }
                Err(Fail::Error(connect, e)) => {
                    self.failed(choice.set, ep, settings, &e);
                    // Only a connect failure without retry settings insists on another
                    // endpoint; configured retries may go back to the same one.
                    last_connect = (connect && retry.is_none()).then(|| e.clone());
                    let again = can_retry && crate::resilience::retry_on_error(retry, connect);
                    if !again || !self.take_retry(&res, &budget) {
                        span.finish(502);
                        return error(
                            StatusCode::BAD_GATEWAY,
                            "upstream_failed",
                            format!(
                                "{} ({}) did not answer: {e} ({attempt} attempt(s))",
                                up.service,
                                ep.addr()
                            ),
                        );
                    }
                }
            }
            avoid = Some(ep.addr());
        }
    }

    /// A failure the endpoint is to blame for: counted, and ejected when the detector says.
    pub(crate) fn failed(
        &self,
        set: &crate::discovery::EndpointSet,
        ep: &crate::discovery::Endpoint,
        settings: &crate::resilience::Settings,
        why: &str,
    ) {
        if let Some((ms, reason)) = crate::resilience::failed(set, ep, &settings.outlier) {
            let detail = format!("{} ejected for {ms} ms ({reason}; last: {why})", ep.key);
            crate::outbound::event(&self.shared, &self.up.service, Event::Ejection, &detail);
        }
    }

    /// Takes a retry from the budget, counting it or its refusal.
    pub(crate) fn take_retry(
        &self,
        res: &crate::resilience::Resilience,
        budget: &crate::resilience::Retry,
    ) -> bool {
        let ok = res.state.budget().try_retry(now_ms(), budget);
        let e = if ok {
            Event::Retry
        } else {
            Event::RetryBudgetExhausted
        };
        crate::outbound::event(&self.shared, &self.up.service, e, "");
        ok
    }

    /// Points `req` at the endpoint `addr`: HTTP/1.1 dials by the URI and sends the app's
    /// `Host` as it is; HTTP/2 carries the app's host in `:authority` (RFC 9113 §8.3.1),
    /// with no `Host` beside it, on a client bound to the endpoint.
    ///
    /// `Some(Some(client))`: send with that client (HTTP/2); `Some(None)`: HTTP/1.1, in
    /// origin form over the app connection's own pool ([`send_h1`]); `None`: a target
    /// that cannot be sent.
    fn prepare(&self, req: &mut Request<Body>, addr: SocketAddr) -> Option<Option<PoolClient>> {
        if self.protocol != UpstreamProtocol::Http2 {
            // Origin form; the app's `Host` goes as it is (one is added from an
            // absolute-form target that had none).
            if !req.headers().contains_key(hyper::header::HOST)
                && let Some(a) = req.uri().authority()
            {
                let v = hyper::header::HeaderValue::from_str(a.as_str()).ok()?;
                req.headers_mut().insert(hyper::header::HOST, v);
            }
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
            *req.version_mut() = hyper::Version::HTTP_11;
            let _ = addr;
            return Some(None);
        }
        let pq = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map_or_else(|| self.up.service.name.clone(), str::to_owned);
        req.headers_mut().remove(hyper::header::HOST);
        let client = self.h2.get(&self.shared, &self.up, addr);
        *req.uri_mut() = format!("http://{host}{pq}").parse::<Uri>().ok()?;
        *req.version_mut() = hyper::Version::HTTP_2;
        Some(Some(client))
    }
}

/// Reads a response whose body is known to be at most [`RETRY_BODY_CAP`] whole (within
/// `limit`); a body that fails is the attempt's failure (`Fail::Error`, not a connect
/// failure). Larger or unsized bodies are passed on as they stream.
async fn buffer_small(
    resp: Response<Incoming>,
    limit: Option<tokio::time::Instant>,
) -> Result<Response<Body>, Fail> {
    let small = hyper::body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= RETRY_BODY_CAP as u64);
    if !small {
        return Ok(resp.map(|b| b.boxed()));
    }
    let (parts, body) = resp.into_parts();
    let collected = match limit {
        Some(l) => match tokio::time::timeout_at(l, body.collect()).await {
            Ok(r) => r,
            Err(_) => return Err(Fail::Timeout),
        },
        None => body.collect().await,
    };
    match collected {
        Ok(c) => Ok(Response::from_parts(
            parts,
            Full::new(c.to_bytes())
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )),
        Err(e) => Err(Fail::Error(false, error_chain(&e))),
    }
}

/// A copy of a request's head for another attempt (extensions are not carried).
fn clone_parts(p: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = p.method.clone();
    parts.uri = p.uri.clone();
    parts.version = p.version;
    parts.headers = p.headers.clone();
    parts
}

/// An error with its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}
