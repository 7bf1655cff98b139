//! Inbound stages 1–3 and 6, and the general codec: accept (the listener's table,
//! [`crate::listener`]) → handshake (mTLS, an SVID required) → protocol detection (TCP, the
//! HTTP/1.1 fast path [`crate::h1`], or hyper for HTTP/1 and HTTP/2 and gRPC) → the request
//! gate ([`crate::gate`], which every codec calls) → the app on loopback: the normalized
//! path, with the verified peer identity in a header the app can trust (any incoming copy
//! is stripped). A refusal at any stage is answered by [`crate::rescue`].
#![deny(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request as HttpRequest, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_identity::SpiffeId;
use meshward_identity::verifier::{Accept, SvidClientVerifier, peer_identity};
use meshward_policy::decision::{Reason, Source};
use meshward_policy::resource::Protocol;
use tokio::net::{TcpListener, TcpStream};

use crate::clock::{Clocked, ConnClock, Tracked};
use crate::gate::{Admitted, Gate, Head, Stop};
use crate::listener::{Listener, Refused, Slot};
use crate::rescue::{Body, Status};
use crate::state::{ServerCert, Shared};

pub use crate::interpret::IDENTITY_HEADER;
use crate::interpret::Version;
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

    /// Explicit mode: the app on `host:PORT` (a loopback address).
    pub fn explicit_at(host: std::net::IpAddr, app_port: u16, protocol: Protocol) -> Self {
        InboundPort {
            app: SocketAddr::new(host, app_port),
            ..Self::explicit(app_port, protocol)
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
    crate::listener::accept_loop(&shared, &me, listener, None, |tcp, _, conn| {
        if let Some(slot) = admit(&shared, &me, port) {
            let served = connection(shared.clone(), port, tcp, tls.clone(), client.clone(), slot);
            tokio::spawn(async move {
                let _conn = conn;
                served.await;
            });
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
    let detail = r.detail(&listener.name);
    crate::gate::connection(shared, port, source, Reason::ConnectionLimit, detail);
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
    // Its source's `maxConnections` (a RateLimitPolicy), held while it is open.
    let Ok(_quota) = crate::gate::connection_quota(&shared, port, &peer) else {
        return;
    };
    // It ends when a certificate that authenticated it expires (crate::expiry).
    let expiry = crate::expiry::Expiry::of(
        &shared,
        stream.get_ref().1.peer_certificates(),
        shared.limits().max_age,
    );
    if port.protocol.is_http() {
        serve_http(shared, port, peer, stream, client, expiry).await;
    } else {
        serve_tcp(shared, port, peer, stream, expiry).await;
    }
}

/// Logs a refused handshake as a deny (`handshake_failed`, source unknown).
fn handshake_failed(shared: &Shared, port: InboundPort, why: crate::handshake::Failure) {
    shared.log.metrics.handshake_failed("inbound", why.kind);
    let source = Source::Unauthenticated;
    crate::gate::connection(shared, port, source, Reason::HandshakeFailed, why.detail);
}

/// The TCP codec: the gate decides once for the connection; a refusal closes it.
async fn serve_tcp(
    shared: Arc<Shared>,
    port: InboundPort,
    peer: SpiffeId,
    mut stream: tokio_rustls::server::TlsStream<TcpStream>,
    expiry: crate::expiry::Expiry,
) {
    let Ok(admitted) = crate::gate::tcp(&shared, port, peer) else {
        return; // refused: the connection closes
    };
    let _permit = admitted.permit;
    // An injected fault (crate::fault): its delay before the app is reached; a reset ends
    // the connection with an RST.
    if let Some(f) = &admitted.fault {
        f.wait().await;
        if f.abort.is_some() {
            crate::fault::reset_on_close(stream.get_ref().0);
            return;
        }
    }
    let Ok(mut app) = Connector::new(port.mark).connect(port.app).await else {
        return;
    };
    // Decided again on every revision: a deny closes both sides.
    let kind = crate::recheck::Kind::default();
    let revoke = crate::recheck::revoke(shared.clone(), admitted.req, admitted.revision, kind);
    tokio::select! {
        _ = async {
            let mut peer = crate::transport::Metered::new(&mut stream, &shared, "inbound");
            tokio::io::copy_bidirectional(&mut peer, &mut app).await
        } => {}
        r = revoke => crate::gate::revoked(&shared, port, &r, "tcp"),
        () = expiry.reached(&shared) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        }
    }
}

async fn serve_http(
    shared: Arc<Shared>,
    port: InboundPort,
    peer: SpiffeId,
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    client: AppClient,
    expiry: crate::expiry::Expiry,
) {
    // Per connection, not per request: the identity header's value and the app link.
    let Ok(peer_header) = hyper::header::HeaderValue::from_str(peer.as_str()) else {
        return;
    };
    // Protocol detection. The common HTTP/1.1 request takes the fast path; the rest of
    // the connection moves to the general path (below) at the first request that needs it.
    // Tracing on or off, the same path: both carry the request's span.
    let (stream, prefix) =
        if port.protocol == Protocol::Http && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            let mut stream = stream;
            match crate::h1::serve(&shared, port, &peer, &mut stream, expiry).await {
                crate::h1::End::Closed => return,
                crate::h1::End::Reset => {
                    crate::fault::reset_on_close(stream.get_ref().0);
                    return;
                }
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
                shared.tracer.get(),
                req.headers(),
                req.method().as_str(),
                req.uri().path(),
            );
            let app = App {
                client: &client,
                link: &link,
                peer_header,
                bad_body: &bad_body,
                expiry,
            };
            let r = handle(&shared, port, &peer, app, &span, req).await;
            let status = r.status().as_u16();
            if shared.log.metrics_on {
                shared
                    .log
                    .metrics
                    .request_done("inbound", status, t0.elapsed().as_secs_f64());
            }
            if r.extensions().get::<crate::fault::ResetStream>().is_some() {
                // An injected reset: hyper ends the request without an answer.
                drop(span);
                return Err(crate::fault::ResetStream);
            }
            span.finish(status);
            Ok(r.map(|b| Tracked::new(b, in_flight).boxed()))
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
        () = expiry.reached(&watchdog) => {
            // HTTP/2: GOAWAY, streams in progress finish; HTTP/1: `Connection: close` on
            // the response in progress, or closed at once when idle.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(crate::expiry::GRACE, conn).await;
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
    /// When the connection ends (an upgraded tunnel ends then too).
    expiry: crate::expiry::Expiry,
}

/// The app connection of one downstream connection. Requests on an HTTP/1 connection come
/// one after another, so each keeps an app connection of its own: no pool lookup and no
/// task per request to hand the connection back (measured in docs/proxy.md). HTTP/2
/// streams, which run concurrently, and HTTP/2 apps use the shared pool.
#[derive(Default)]
#[expect(
    clippy::disallowed_types,
    reason = "one downstream connection's own app link, never shared with another connection"
)]
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

/// The general codec's request: detected version → the gate → forwarding; every refusal,
/// the gate's or the forwarding's, is answered by the rescue ([`crate::rescue`]).
async fn handle(
    shared: &Arc<Shared>,
    port: InboundPort,
    peer: &SpiffeId,
    app: App<'_>,
    span: &meshward_telemetry::trace::RequestSpan,
    mut req: HttpRequest<Incoming>,
) -> Response<Body> {
    let grpc = crate::rescue::is_grpc(req.headers());
    let mut gate = Gate::new(shared, port, peer, false);
    let version = match req.version() {
        hyper::Version::HTTP_2 => Version::Http2,
        hyper::Version::HTTP_10 | hyper::Version::HTTP_09 => Version::Http10,
        _ => Version::Http11,
    };
    // The absolute-form target's authority (HTTP/1; for `CONNECT` its target), or HTTP/2's
    // `:authority`: one function reads them for every codec.
    let head = Head {
        version,
        method: req.method().as_str(),
        target: req.uri().path_and_query().map_or("/", |pq| pq.as_str()),
        authority: req.uri().authority().map(|a| a.as_str()),
        headers: || {
            req.headers()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_bytes()))
        },
        fast: false,
    };
    let admitted = match gate.check(head, span) {
        Ok(a) => a,
        Err(Stop::Refused(r)) => return r.answer(grpc),
        // (Only the fast path hands requests over.)
        Err(Stop::Handoff) => {
            let r = gate.bad_request("", "", "unsupported_request", String::new());
            return r.answer(grpc);
        }
    };
    let Admitted {
        preq,
        d,
        target,
        facts,
        under,
        permit,
        fault,
    } = admitted;
    // An injected fault (crate::fault): its delay first, then its abort in the app's place.
    if let Some(f) = &fault {
        let t0 = std::time::Instant::now();
        f.wait().await;
        if let Some((id, abort)) = &f.abort {
            let answered = crate::gate::Answered::aborted(t0.elapsed(), *abort);
            gate.forwarded(&preq, &d, answered, Some(f));
            return crate::fault::answer(id, *abort).unwrap_or_else(crate::fault::reset);
        }
    }
    let (host, host_header, strips) = (
        facts.host.map(str::to_owned),
        facts.host_header,
        facts.strips,
    );
    let upgrade = facts.upgrade || facts.connect;
    // Decided again on every revision while it is open (crate::recheck).
    let kind = crate::recheck::Kind {
        upgrade: facts.upgrade,
        connect: facts.connect,
    };
    let mut revoke = crate::recheck::revoke(shared.clone(), preq.clone(), d.revision.0, kind);
    // Forward: the normalized target, the verified identity. An HTTP/1 request to an
    // HTTP/1 app goes on the connection's own link (origin-form target); the rest through
    // the pool (absolute target, the app's protocol whatever the peer proxy spoke).
    let h2_app = matches!(port.protocol, Protocol::Http2 | Protocol::Grpc);
    let own_link = !h2_app && req.version() != hyper::Version::HTTP_2;
    if upgrade && !own_link {
        // Tunnels are relayed only between HTTP/1 connections.
        let r = gate.refusal(
            preq_method(&preq),
            &target,
            crate::interpret::Refusal {
                code: "unsupported_upgrade",
                detail: "upgrades and `CONNECT` are relayed only from HTTP/1 to an HTTP/1 app",
            },
        );
        return r.answer(grpc);
    }
    // Taken before the request moves on: the peer's side of an allowed tunnel.
    let down = upgrade.then(|| hyper::upgrade::on(&mut req));
    let uri = if own_link {
        hyper::Uri::try_from(target.as_str())
    } else {
        hyper::Uri::try_from(format!("http://{}{}", port.app, target))
    };
    let Ok(uri) = uri else {
        let r = gate.bad_request(preq_method(&preq), &target, "bad_target", String::new());
        return r.answer(grpc);
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
    let t0 = std::time::Instant::now();
    let forward = async {
        if own_link {
            app.link.send(port, req).await
        } else {
            app.client.request(req).await.map_err(|e| e.to_string())
        }
    };
    let r = tokio::select! {
        r = forward => r,
        r = &mut revoke => {
            // Denied before the app answered: the request to the app is dropped.
            crate::gate::revoked(shared, port, &r, "stream");
            let body = crate::gate::denial(&r.d);
            return crate::rescue::Refused::new(Status::Forbidden, body).answer(grpc);
        }
    };
    let r = match r {
        // The hygiene checker cut the request body short (a malformed chunk): the caller's
        // fault, not the app's — recorded as that instead of the allow.
        Err(_) if app.bad_body.load(std::sync::atomic::Ordering::Relaxed) => {
            let (method, path) = (preq_method(&preq), preq_path(&preq));
            let r = gate.refusal(method, path, crate::interpret::BAD_CHUNK);
            return r.answer(grpc);
        }
        r => r,
    };
    // Allowed requests are recorded with the time to the app's response head, its status,
    // and (once the body has ended) the bytes relayed.
    let mut answered = crate::gate::Answered {
        duration: t0.elapsed(),
        status: None,
        bytes: None,
    };
    match r {
        Ok(mut resp) => {
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (preq_method(&preq) == "CONNECT" && resp.status().is_success());
            answered.status = Some(resp.status().as_u16());
            if switching {
                gate.forwarded(&preq, &d, answered, fault.as_ref());
                // Relayed only for the upgrade policy allowed; then both sides are spliced.
                let Some(down) = down else {
                    let body = serde_json::json!({"error": "the app switched protocols without an upgrade"});
                    return crate::rescue::Refused::new(Status::BadGateway, body).answer(grpc);
                };
                let up = hyper::upgrade::on(&mut resp);
                let (shared, expiry) = (shared.clone(), app.expiry);
                tokio::spawn(async move {
                    if let (Ok(d), Ok(u)) = (down.await, up.await) {
                        let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                        tokio::select! {
                            _ = async {
                                let mut d = crate::transport::Metered::new(&mut d, &shared, "inbound");
                                tokio::io::copy_bidirectional(&mut d, &mut u).await
                            } => {}
                            r = revoke => crate::gate::revoked(&shared, port, &r, "tunnel"),
                            // The connection it took over ends at its certificates' expiry.
                            () = expiry.reached(&shared) => {}
                        }
                    }
                });
                return resp.map(|b| {
                    Tracked::new(b, permit)
                        .map_err(crate::rescue::BodyError::App)
                        .boxed()
                });
            }
            // Its concurrency places are held until the response body is done; a later
            // revision that denies it cuts it.
            let extra = answered.extra(fault.as_ref());
            let (shared2, d2) = (shared.clone(), d.clone());
            resp.map(|b| {
                let b = Tracked::new(b, permit);
                let b = crate::gate::Logged::new(b, shared2, port, preq, d2, extra)
                    .map_err(crate::rescue::BodyError::App);
                crate::recheck::Revocable::new(b, revoke, shared.clone(), port, grpc).boxed()
            })
        }
        Err(e) => {
            answered.status = Some(502);
            gate.forwarded(&preq, &d, answered, fault.as_ref());
            let body = serde_json::json!({"error": "the app did not answer", "detail": e});
            crate::rescue::Refused::new(Status::BadGateway, body).answer(grpc)
        }
    }
}

fn preq_method(r: &meshward_policy::decision::Request) -> &str {
    r.http.as_ref().map_or("", |h| h.method.as_str())
}

fn preq_path(r: &meshward_policy::decision::Request) -> &str {
    r.http.as_ref().map_or("", |h| h.path.as_str())
}
