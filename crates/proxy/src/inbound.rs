//! Inbound: accepts only mutual TLS with a valid SVID, decides per connection (TCP) or per
//! request (HTTP/1.1) with the compiled engine, and forwards what is allowed to the app on
//! loopback — the normalized path, with the verified peer identity in a header the app can
//! trust (any incoming copy is stripped).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_identity::SpiffeId;
use meshward_identity::verifier::{Accept, SvidClientVerifier, peer_identity};
use meshward_policy::decision::{
    Decision, HttpAttrs, PolicyRevision, Reason, Request, Source, Verdict,
};
use meshward_policy::path::normalize;
use meshward_policy::resource::Protocol;
use tokio::net::{TcpListener, TcpStream};

use crate::clock::{Clocked, ConnClock, Tracked};
use crate::listener::{Listener, Refused, Slot};
use crate::state::{ServerCert, Shared};

pub use crate::interpret::IDENTITY_HEADER;
use crate::interpret::{Facts, Refusal, Version};
use crate::transport::Connector;

/// One inbound port: the app port (as declared) and where the app is reached.
#[derive(Debug, Clone, Copy)]
pub struct InboundPort {
    pub app_port: u16,
    pub protocol: Protocol,
    /// Explicit mode: `127.0.0.1:PORT`. Transparent mode: the original destination (the
    /// workload's own address), so an app bound to loopback only is never exposed.
    pub app: SocketAddr,
    /// Transparent mode: the socket mark that lets the proxy's own connections through.
    pub mark: Option<u32>,
}

impl InboundPort {
    /// Explicit mode: the app on `127.0.0.1:PORT`.
    pub fn explicit(app_port: u16, protocol: Protocol) -> Self {
        InboundPort {
            app_port,
            protocol,
            app: SocketAddr::from(([127, 0, 0, 1], app_port)),
            mark: None,
        }
    }
}

/// Connects the inbound side to the app (HTTP connection pool), with the socket mark.
#[derive(Debug, Clone, Copy)]
pub struct AppConnector {
    pub mark: Option<u32>,
}

impl tower::Service<hyper::Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1");
            let ip: std::net::IpAddr =
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| std::io::Error::other(format!("`{host}` is not an IP address")))?;
            let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
            Connector::new(mark).connect(addr).await.map(TokioIo::new)
        })
    }
}

/// The pooled HTTP client towards the app.
pub type AppClient = Client<AppConnector, Incoming>;

/// A client for the app behind `protocol` (HTTP/2 prior knowledge for HTTP/2 and gRPC).
pub fn app_client(protocol: Protocol, mark: Option<u32>) -> AppClient {
    Client::builder(TokioExecutor::new())
        .http2_only(matches!(protocol, Protocol::Http2 | Protocol::Grpc))
        .build(AppConnector { mark })
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(status: StatusCode, json: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(json.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The TLS server configuration: SVIDs required from every client.
pub fn server_tls(
    shared: &Arc<Shared>,
    protocol: Protocol,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_client_cert_verifier(SvidClientVerifier::new(
        shared.bundles.clone(),
        Accept::AnyTrusted,
    ))
    .with_cert_resolver(Arc::new(ServerCert(shared.clone())));
    if protocol.is_http() {
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(Arc::new(cfg))
}

fn decide(shared: &Shared, req: &Request) -> Decision {
    match shared.policy.load().as_ref() {
        Some(p) => p.engine.decide(req),
        // No configuration at all: fail closed.
        None => Decision::bare(Verdict::Deny, Reason::NoPolicy, PolicyRevision(0)),
    }
}

/// Serves one inbound port for ever: the accept loop never exits ([`crate::listener`]),
/// and each connection takes a slot in the listener's table or is refused.
pub async fn serve(
    shared: Arc<Shared>,
    port: InboundPort,
    listener: TcpListener,
) -> Result<(), String> {
    let tls = tokio_rustls::TlsAcceptor::from(server_tls(&shared, port.protocol)?);
    // HTTP/2 and gRPC apps get HTTP/2 (prior knowledge) from their sidecar; HTTP/1 apps
    // get HTTP/1.1.
    let client = app_client(port.protocol, port.mark);
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("inbound {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |tcp, _| {
        if let Some(slot) = admit(&shared, &me, port) {
            tokio::spawn(connection(
                shared.clone(),
                port,
                tcp,
                tls.clone(),
                client.clone(),
                slot,
            ));
        }
    })
    .await;
    Ok(())
}

/// A slot in `listener`'s table for a connection just accepted, or none when the listener
/// holds its total or its handshaking connections: then the refusal is counted and logged
/// and the connection closes unanswered.
pub fn admit(shared: &Shared, listener: &Arc<Listener>, port: InboundPort) -> Option<Slot> {
    match listener.admit(&shared.limits()) {
        Ok(s) => Some(s),
        Err(r) => {
            connection_refused(shared, listener, port, Source::Unauthenticated, r);
            None
        }
    }
}

/// Counts and logs a connection a cap refused (`connection_limit`).
fn connection_refused(
    shared: &Shared,
    listener: &Listener,
    port: InboundPort,
    source: Source,
    r: Refused,
) {
    shared.log.metrics.connection_refused("inbound", r.as_str());
    let rev = shared
        .policy
        .load()
        .as_ref()
        .map_or(PolicyRevision(0), |p| PolicyRevision(p.revision));
    let req = Request {
        source,
        destination: shared.workload.clone(),
        port: port.app_port,
        http: None,
        at: SystemTime::now(),
    };
    let d = Decision::bare(Verdict::Deny, Reason::ConnectionLimit, rev);
    shared.log.record_with(
        &req,
        &d,
        &crate::decision_log::Extra {
            detail: Some(r.detail(&listener.name)),
            address: (port.mark.is_some()).then_some(port.app),
            ..Default::default()
        },
    );
}

/// One inbound connection: the mTLS handshake (a failure is logged as a decision), the
/// peer identity's connection cap, then TCP or HTTP authorization and forwarding. `slot`,
/// its place in the listener's table, is given back when it ends.
pub async fn connection(
    shared: Arc<Shared>,
    port: InboundPort,
    tcp: TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    client: AppClient,
    mut slot: Slot,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = crate::handshake::Failure::of_io(&e);
            return handshake_failed(&shared, port, why);
        }
        Err(_) => {
            let why = crate::handshake::Failure::of_message("no handshake within 10s");
            return handshake_failed(&shared, port, why);
        }
    };
    let Some(peer) = peer_identity(stream.get_ref().1) else {
        let why = crate::handshake::Failure::of_message("the peer presented no SPIFFE ID");
        return handshake_failed(&shared, port, why);
    };
    // The identity is known only now: over its cap, the connection closes at once.
    if let Err(r) = slot.authenticated(&peer, &shared.limits()) {
        return connection_refused(
            &shared,
            slot.listener(),
            port,
            Source::Authenticated(peer),
            r,
        );
    }
    if port.protocol.is_http() {
        serve_http(shared, port, peer, stream, client).await;
    } else {
        serve_tcp(shared, port, peer, stream).await;
    }
}

/// Logs a refused handshake as a deny (`handshake_failed`, source unknown).
fn handshake_failed(shared: &Shared, port: InboundPort, why: crate::handshake::Failure) {
    let rev = shared
        .policy
        .load()
        .as_ref()
        .map_or(PolicyRevision(0), |p| PolicyRevision(p.revision));
    let req = Request {
        source: Source::Unauthenticated,
        destination: shared.workload.clone(),
        port: port.app_port,
        http: None,
        at: SystemTime::now(),
    };
    let d = Decision::bare(Verdict::Deny, Reason::HandshakeFailed, rev);
    shared.log.metrics.handshake_failed("inbound", why.kind);
    shared.log.record_with(
        &req,
        &d,
        &crate::decision_log::Extra {
            detail: Some(why.detail),
            address: (port.mark.is_some()).then_some(port.app),
            ..Default::default()
        },
    );
}

async fn serve_tcp(
    shared: Arc<Shared>,
    port: InboundPort,
    peer: SpiffeId,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
) {
    let req = Request {
        source: Source::Authenticated(peer),
        destination: shared.workload.clone(),
        port: port.app_port,
        http: None,
        at: SystemTime::now(),
    };
    let d = decide(&shared, &req);
    shared.log.record(&req, &d);
    if d.verdict != Verdict::Allow {
        return; // dropped: the connection closes
    }
    let Ok(mut app) = Connector::new(port.mark).connect(port.app).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut app).await;
}

async fn serve_http(
    shared: Arc<Shared>,
    port: InboundPort,
    peer: SpiffeId,
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    client: AppClient,
) {
    // Per connection, not per request: the identity header's value and the app link.
    let Ok(peer_header) = hyper::header::HeaderValue::from_str(peer.as_str()) else {
        return;
    };
    // The common HTTP/1.1 request takes the fast path; the rest of the connection moves to
    // the general path (below) at the first request that needs it.
    let (stream, prefix) = if port.protocol == Protocol::Http
        && stream.get_ref().1.alpn_protocol() != Some(b"h2")
        && !meshward_telemetry::trace::enabled()
    {
        let mut stream = stream;
        match crate::h1::serve(&shared, port, &peer, &mut stream).await {
            crate::h1::End::Closed => return,
            crate::h1::End::Handoff(bytes) => (stream, bytes),
        }
    } else {
        (stream, vec![])
    };
    let link = Arc::new(AppLink::default());
    let bad_body = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The header-read and idle timeouts (crate::clock), as on the fast path.
    let (limits, watchdog) = (shared.limits(), shared.clone());
    let clock = ConnClock::new(false);
    let svc_clock = clock.clone();
    let hygiene = crate::hygiene::Hygiene::with_prefix(stream, prefix).watch(bad_body.clone());
    let svc = hyper::service::service_fn(move |req: HttpRequest<Incoming>| {
        let (shared, peer, client) = (shared.clone(), peer.clone(), client.clone());
        let (peer_header, link, bad_body) = (peer_header.clone(), link.clone(), bad_body.clone());
        let in_flight = svc_clock.request();
        async move {
            let t0 = std::time::Instant::now();
            let span = meshward_telemetry::trace::RequestSpan::start(
                req.headers(),
                req.method().as_str(),
                req.uri().path(),
            );
            let app = App {
                client: &client,
                link: &link,
                peer_header,
                bad_body: &bad_body,
            };
            let r = handle(&shared, port, &peer, app, &span, req).await;
            let status = r.status().as_u16();
            if shared.log.metrics_on {
                shared
                    .log
                    .metrics
                    .request_done("inbound", status, t0.elapsed().as_secs_f64());
            }
            span.finish(status);
            Ok::<_, Infallible>(r.map(|b| Tracked::new(b, in_flight).boxed()))
        }
    });
    // HTTP/1.1 or HTTP/2 (by the connection preface), with bounded headers, streams and
    // resets.
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .max_buf_size(64 * 1024)
        .max_headers(100)
        .half_close(false);
    b.http2()
        .max_concurrent_streams(100)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(100));
    let conn =
        b.serve_connection_with_upgrades(TokioIo::new(Clocked::new(hygiene, clock.clone())), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        why = clock.expired(&limits) => {
            // Nothing in progress: close (HTTP/2: GOAWAY first).
            watchdog.log.metrics.connection_timeout(why.as_str());
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// Where an allowed request goes: the connection's own app link (HTTP/1 to an HTTP/1 app)
/// or the shared pool; and the verified identity as a header value.
struct App<'a> {
    client: &'a AppClient,
    link: &'a AppLink,
    peer_header: hyper::header::HeaderValue,
    /// Set by the hygiene checker when it refused part of a request body.
    bad_body: &'a std::sync::atomic::AtomicBool,
}

/// The app connection of one downstream connection. Requests on an HTTP/1 connection come
/// one after another, so each keeps an app connection of its own: no pool lookup and no
/// task per request to hand the connection back (measured in docs/proxy.md). HTTP/2
/// streams, which run concurrently, and HTTP/2 apps use the shared pool.
#[derive(Default)]
struct AppLink(std::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>);

impl AppLink {
    fn take(&self) -> Option<hyper::client::conn::http1::SendRequest<Incoming>> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }

    fn put(&self, s: hyper::client::conn::http1::SendRequest<Incoming>) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(s);
        }
    }

    /// Sends `req` (origin-form target) on the link's connection, opening one when there is
    /// none or the app closed it before the request was written.
    async fn send(
        &self,
        port: InboundPort,
        mut req: HttpRequest<Incoming>,
    ) -> Result<Response<Incoming>, String> {
        if let Some(mut s) = self.take()
            && s.ready().await.is_ok()
        {
            match s.try_send_request(req).await {
                Ok(resp) => {
                    // Back before the body is read: the next request on this connection
                    // comes after the response is complete, and `ready` waits for that.
                    self.put(s);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r, // never written: retry on a new connection
                    None => return Err(e.into_error().to_string()),
                },
            }
        }
        let tcp = Connector::new(port.mark)
            .connect(port.app)
            .await
            .map_err(|e| format!("cannot connect to the app at {}: {e}", port.app))?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            // With upgrades: an allowed WebSocket or `CONNECT` takes the connection over.
            let _ = conn.with_upgrades().await;
        });
        let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
        self.put(s);
        Ok(resp)
    }
}

/// An HTTP request checked against policy: what was decided on, the decision, and the
/// normalized target to forward.
pub(crate) struct Checked {
    pub preq: Request,
    pub d: Decision,
    pub target: String,
}

/// What to do with header names with `_` under the current policy (refuse without one).
pub(crate) fn underscores(shared: &Shared) -> meshward_policy::resource::HeadersWithUnderscores {
    shared
        .policy
        .load()
        .as_ref()
        .map(|p| p.underscores())
        .unwrap_or_default()
}

/// Records a request refused before policy (reason `bad_request`, the rule's code as
/// detail) and returns the body of its 400.
pub(crate) fn refused(
    shared: &Shared,
    port: InboundPort,
    peer: &SpiffeId,
    method: &str,
    target: &str,
    r: Refusal,
) -> serde_json::Value {
    let rev = shared
        .policy
        .load()
        .as_ref()
        .map_or(PolicyRevision(0), |p| PolicyRevision(p.revision));
    let req = Request {
        source: Source::Authenticated(peer.clone()),
        destination: shared.workload.clone(),
        port: port.app_port,
        http: Some(HttpAttrs {
            method: method.to_owned(),
            path: target.to_owned(),
            host: None,
            headers: vec![],
        }),
        at: SystemTime::now(),
    };
    let d = Decision::bare(Verdict::Deny, Reason::BadRequest, rev);
    shared.log.record_with(
        &req,
        &d,
        &crate::decision_log::Extra {
            detail: Some(r.code.to_owned()),
            address: port.mark.is_some().then_some(port.app),
            ..Default::default()
        },
    );
    serde_json::json!({"verdict": "deny", "reason": d.reason, "error": r.code, "detail": r.detail, "revision": rev})
}

/// Normalizes the request target (origin form; ignored for `CONNECT`, which policy sees
/// as path `/` with its authority as host), lower-cases it for a case-insensitive app,
/// and decides with the compiled engine, upgrades and `CONNECT` only by a rule that names
/// them. `facts` come from [`crate::interpret::head`]. `Err` carries the body of the 400
/// an ambiguous path gets (already recorded).
pub(crate) fn authorize<'h>(
    shared: &Shared,
    port: InboundPort,
    peer: &SpiffeId,
    method: &str,
    target: &str,
    facts: &Facts<'_>,
    headers: impl Iterator<Item = (&'h str, &'h [u8])>,
) -> Result<Checked, serde_json::Value> {
    let policy = shared.policy.load_full();
    let norm = if facts.connect {
        Ok(meshward_policy::path::NormalizedPath {
            path: "/".into(),
            query: None,
        })
    } else {
        normalize(target)
    };
    let mut norm = match norm {
        Ok(n) => n,
        Err(e) => {
            let detail = e.to_string();
            let mut body = refused(
                shared,
                port,
                peer,
                method,
                target,
                Refusal {
                    code: e.code(),
                    detail: "",
                },
            );
            body["detail"] = detail.into();
            return Err(body);
        }
    };
    if policy
        .as_ref()
        .is_some_and(|p| p.lower_paths.contains(&port.app_port))
    {
        norm.path = meshward_policy::path::lower_case(&norm.path);
    }
    // Only the headers policy conditions read (none, for most policies), as the app gets
    // them.
    let wanted: &[String] = policy.as_ref().map_or(&[], |p| p.headers.as_slice());
    let under = policy.as_ref().map(|p| p.underscores()).unwrap_or_default();
    let headers: Vec<(String, String)> = if wanted.is_empty() {
        vec![]
    } else {
        headers
            .filter(|(k, _)| {
                crate::interpret::forwarded(k, under)
                    && wanted.iter().any(|w| w.eq_ignore_ascii_case(k))
            })
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    };
    let target = norm.target();
    let preq = Request {
        source: Source::Authenticated(peer.clone()),
        destination: shared.workload.clone(),
        port: port.app_port,
        http: Some(HttpAttrs {
            method: method.to_owned(),
            path: norm.path,
            host: facts.host.map(str::to_owned),
            headers,
        }),
        at: SystemTime::now(),
    };
    let d = match &policy {
        Some(p) => crate::interpret::upgrade_allowed(&p.set, facts, p.engine.decide(&preq)),
        None => Decision::bare(Verdict::Deny, Reason::NoPolicy, PolicyRevision(0)),
    };
    Ok(Checked { preq, d, target })
}

/// The JSON body of a 403: the reason code and the deciding policy.
pub(crate) fn denial(d: &Decision) -> serde_json::Value {
    serde_json::json!({"verdict": "deny", "reason": d.reason, "policy": d.policy, "rule": d.rule, "revision": d.revision})
}

async fn handle(
    shared: &Shared,
    port: InboundPort,
    peer: &SpiffeId,
    app: App<'_>,
    span: &meshward_telemetry::trace::RequestSpan,
    mut req: HttpRequest<Incoming>,
) -> Response<Body> {
    let version = match req.version() {
        hyper::Version::HTTP_2 => Version::Http2,
        hyper::Version::HTTP_10 | hyper::Version::HTTP_09 => Version::Http10,
        _ => Version::Http11,
    };
    let under = underscores(shared);
    let method = req.method().as_str();
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    // The absolute-form target's authority (HTTP/1; for `CONNECT` its target), or HTTP/2's
    // `:authority`: one function reads them for every codec.
    let facts = crate::interpret::head(
        version,
        method,
        req.uri().authority().map(|a| a.as_str()),
        req.headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes())),
        under,
    );
    let facts = match facts {
        Ok(f) => f,
        Err(r) => {
            return full(
                StatusCode::BAD_REQUEST,
                refused(shared, port, peer, method, target, r),
            );
        }
    };
    let checked = authorize(
        shared,
        port,
        peer,
        method,
        target,
        &facts,
        req.headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes())),
    );
    let (host, host_header, strips) = (
        facts.host.map(str::to_owned),
        facts.host_header,
        facts.strips,
    );
    let upgrade = facts.upgrade || facts.connect;
    let Checked { preq, d, target } = match checked {
        Ok(c) => c,
        Err(body) => return full(StatusCode::BAD_REQUEST, body),
    };
    if span.is_recording() {
        span.decision(meshward_telemetry::trace::DecisionAttrs {
            source: peer.as_str(),
            destination: &preq.destination.to_string(),
            verdict: d.verdict.as_str(),
            reason: d.reason.as_str(),
            policy: d.policy.as_deref(),
            decision_ns: u64::try_from(d.elapsed.as_nanos()).unwrap_or(u64::MAX),
        });
    }
    if d.verdict != Verdict::Allow {
        shared.log.record(&preq, &d);
        let grpc = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if grpc {
            // gRPC: a trailers-only response with PERMISSION_DENIED (7).
            let mut r = full(StatusCode::OK, serde_json::Value::Null);
            let h = r.headers_mut();
            h.insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", hyper::header::HeaderValue::from_static("7"));
            if let Ok(v) =
                hyper::header::HeaderValue::from_str(&format!("denied by policy: {}", d.reason))
            {
                h.insert("grpc-message", v);
            }
            *r.body_mut() = Full::new(Bytes::new())
                .map_err(|never: Infallible| match never {})
                .boxed();
            return r;
        }
        return full(StatusCode::FORBIDDEN, denial(&d));
    }
    // Forward: the normalized target, the verified identity. An HTTP/1 request to an
    // HTTP/1 app goes on the connection's own link (origin-form target); the rest through
    // the pool (absolute target, the app's protocol whatever the peer proxy spoke).
    let h2_app = matches!(port.protocol, Protocol::Http2 | Protocol::Grpc);
    let own_link = !h2_app && req.version() != hyper::Version::HTTP_2;
    if upgrade && !own_link {
        // Tunnels are relayed only between HTTP/1 connections.
        let r = Refusal {
            code: "unsupported_upgrade",
            detail: "upgrades and `CONNECT` are relayed only from HTTP/1 to an HTTP/1 app",
        };
        let body = refused(shared, port, peer, preq_method(&preq), &target, r);
        return full(StatusCode::BAD_REQUEST, body);
    }
    // Taken before the request moves on: the peer's side of an allowed tunnel.
    let down = upgrade.then(|| hyper::upgrade::on(&mut req));
    let uri = if own_link {
        hyper::Uri::try_from(target)
    } else {
        hyper::Uri::try_from(format!("http://{}{target}", port.app))
    };
    let Ok(uri) = uri else {
        return full(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad target"}),
        );
    };
    *req.uri_mut() = uri;
    *req.version_mut() = if h2_app {
        hyper::Version::HTTP_2
    } else {
        hyper::Version::HTTP_11
    };
    let hdrs = req.headers_mut();
    if strips {
        // Every spelling of the identity header, XFCC, `_` names under DROP.
        let gone: Vec<hyper::header::HeaderName> = hdrs
            .keys()
            .filter(|k| !crate::interpret::forwarded(k.as_str(), under))
            .cloned()
            .collect();
        for k in gone {
            hdrs.remove(k);
        }
    }
    hdrs.insert(IDENTITY_HEADER, app.peer_header);
    if !h2_app && !host_header {
        // The host policy saw (absolute-form, `:authority`), else the app's address
        // (HTTP/1.0 without one), as the pool would.
        let h = host.unwrap_or_else(|| port.app.to_string());
        if let Ok(v) = hyper::header::HeaderValue::from_str(&h) {
            hdrs.insert(hyper::header::HOST, v);
        }
    }
    span.inject(hdrs);
    // Allowed requests are recorded once the app's response has started, with the time.
    let t0 = std::time::Instant::now();
    let r = if own_link {
        app.link.send(port, req).await
    } else {
        app.client.request(req).await.map_err(|e| e.to_string())
    };
    shared.log.record_with(
        &preq,
        &d,
        &crate::decision_log::Extra {
            duration: Some(t0.elapsed()),
            address: port.mark.is_some().then_some(port.app),
            ..Default::default()
        },
    );
    match r {
        Ok(mut resp) => {
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (preq_method(&preq) == "CONNECT" && resp.status().is_success());
            if switching {
                // Relayed only for the upgrade policy allowed; then both sides are spliced.
                let Some(down) = down else {
                    return full(
                        StatusCode::BAD_GATEWAY,
                        serde_json::json!({"error": "the app switched protocols without an upgrade"}),
                    );
                };
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(d), Ok(u)) = (down.await, up.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(d),
                            &mut TokioIo::new(u),
                        )
                        .await;
                    }
                });
            }
            resp.map(|b| b.boxed())
        }
        // The hygiene checker cut the request body short (a malformed chunk): the caller's
        // fault, not the app's.
        Err(_) if app.bad_body.load(std::sync::atomic::Ordering::Relaxed) => full(
            StatusCode::BAD_REQUEST,
            refused(
                shared,
                port,
                peer,
                preq_method(&preq),
                preq_path(&preq),
                crate::interpret::BAD_CHUNK,
            ),
        ),
        Err(e) => full(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"error": "the app did not answer", "detail": e}),
        ),
    }
}

fn preq_method(r: &Request) -> &str {
    r.http.as_ref().map_or("", |h| h.method.as_str())
}

fn preq_path(r: &Request) -> &str {
    r.http.as_ref().map_or("", |h| h.path.as_str())
}
