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

use crate::balance::RoundRobin;
use crate::outbound::{Upstream, dial, endpoints};
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
            let Some(identity) = endpoints(&shared, &up)
                .get(addr)
                .map(|e| e.identity.clone())
            else {
                return Err(std::io::Error::other(format!(
                    "{addr} is no longer an endpoint of {}",
                    up.service
                )));
            };
            let allowed = vec![identity];
            dial(&shared, &up.service, addr, allowed, None)
                .await
                .map(|tls| MtlsIo(TokioIo::new(tls)))
                .map_err(std::io::Error::other)
        })
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn error(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(serde_json::json!({"error": msg}).to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

type PoolClient = Client<MtlsConnector, Incoming>;

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
    let client = client(&shared, &up, protocol, None);
    let h2 = Arc::new(H2Clients::default());
    let balancer = Arc::new(RoundRobin::default());
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let me = shared.listeners.register(format!("outbound {addr}"));
    crate::listener::accept_loop(&shared, &me, listener, None, |app, _| {
        let _ = app.set_nodelay(true);
        let (shared, up, client) = (shared.clone(), up.clone(), client.clone());
        let (h2, balancer) = (h2.clone(), balancer.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (shared, up, client) = (shared.clone(), up.clone(), client.clone());
                let (h2, balancer) = (h2.clone(), balancer.clone());
                async move {
                    // Discovery, then balancing. Seam (issue 14) — failover and ejection
                    // choose the candidate set here, before the pick.
                    let eps = endpoints(&shared, &up);
                    let Some(ep) = balancer.pick(&eps) else {
                        return Ok::<_, Infallible>(error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("no endpoint for {}:{}", up.service, up.port),
                        ));
                    };
                    let (addr, state) = (ep.addr(), ep.state.clone());
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
                    // HTTP/1.1 dials by the URI and sends the app's `Host` as it is. HTTP/2
                    // carries the app's host in `:authority` (RFC 9113 §8.3.1), with no
                    // `Host` beside it, on a client bound to the chosen endpoint.
                    let (authority, client) = match protocol {
                        UpstreamProtocol::Http2 => {
                            let host = req
                                .headers()
                                .get(hyper::header::HOST)
                                .and_then(|v| v.to_str().ok())
                                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                                .map_or_else(|| up.service.name.clone(), str::to_owned);
                            req.headers_mut().remove(hyper::header::HOST);
                            (host, h2.get(&shared, &up, addr))
                        }
                        _ => (addr.to_string(), client),
                    };
                    let Ok(uri) = format!("http://{authority}{pq}").parse::<Uri>() else {
                        return Ok(error(StatusCode::BAD_REQUEST, "bad request target".into()));
                    };
                    let span = if meshward_telemetry::trace::enabled() {
                        meshward_telemetry::trace::RequestSpan::start_client(
                            req.headers(),
                            req.method().as_str(),
                            req.uri().path(),
                            &up.service.to_string(),
                        )
                    } else {
                        meshward_telemetry::trace::RequestSpan::default()
                    };
                    *req.uri_mut() = uri;
                    *req.version_mut() = match protocol {
                        UpstreamProtocol::Http2 => hyper::Version::HTTP_2,
                        _ => hyper::Version::HTTP_11,
                    };
                    span.inject(req.headers_mut());
                    // Seams — the breaker admits the request here; per-try and overall
                    // timeouts and the retry budget wrap this one attempt.
                    state.started();
                    let r = match client.request(req).await {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(e) => {
                            state.failed();
                            error(
                                StatusCode::BAD_GATEWAY,
                                format!("{} ({addr}) did not answer: {e}", up.service),
                            )
                        }
                    };
                    span.finish(r.status().as_u16());
                    Ok(r)
                }
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1().max_buf_size(64 * 1024);
            let _ = b.serve_connection(TokioIo::new(app), svc).await;
        });
    })
    .await;
    Ok(())
}
