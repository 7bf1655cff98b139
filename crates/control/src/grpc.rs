//! The proxy API: gRPC over mutual TLS. `Identity.Sign` signs CSRs (join token, or renewal
//! with the current SVID as client certificate); `Config.Stream` pushes each proxy the
//! snapshot its workload needs at once and on every change, and records its acks.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshward_api::v1::config_server::{Config, ConfigServer};
use meshward_api::v1::identity_server::{Identity, IdentityServer};
use meshward_api::v1::telemetry_server::{Telemetry, TelemetryServer};
use meshward_api::v1::{
    ConfigAck, ConfigSnapshot, DecisionBatch, File, NotReady, ShipAck, SignRequest, SignResponse,
};
use meshward_identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use crate::service::{ControlPlane, Refused};

/// A TLS connection with the verified peer identity, for tonic.
#[derive(Debug)]
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Option<SpiffeId>,
    expired: bool,
}

/// The peer identity tonic puts in each request's extensions, and whether its certificate
/// had expired (accepted for renewal only).
#[derive(Debug, Clone)]
pub struct PeerId(pub Option<SpiffeId>, pub bool);

impl Connected for TlsConn {
    type ConnectInfo = PeerId;
    fn connect_info(&self) -> PeerId {
        PeerId(self.peer.clone(), self.expired)
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn peer<T>(r: &Request<T>) -> Option<SpiffeId> {
    r.extensions().get::<PeerId>().and_then(|p| p.0.clone())
}

fn peer_expired<T>(r: &Request<T>) -> bool {
    r.extensions().get::<PeerId>().is_some_and(|p| p.1)
}

fn status(e: Refused) -> Status {
    match e {
        Refused::Forbidden(m) => Status::permission_denied(m),
        Refused::BadRequest(m) => Status::invalid_argument(m),
        Refused::NotFound(m) => Status::not_found(m),
        Refused::Store(e) if e.is_full() => Status::resource_exhausted(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// The gRPC services.
#[derive(Debug, Clone)]
pub struct ProxyApi {
    cp: Arc<ControlPlane>,
}

#[tonic::async_trait]
impl Identity for ProxyApi {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let p = peer(&req);
        if peer_expired(&req)
            && let Some(id) = &p
        {
            tracing::info!("renewing the expired SVID of {id} (within the renewal grace)");
        }
        let r = req.into_inner();
        let cp = self.cp.clone();
        let token = (!r.join_token.is_empty()).then_some(r.join_token);
        let lifetime = (r.lifetime_secs > 0).then(|| Duration::from_secs(r.lifetime_secs));
        let issued = tokio::task::spawn_blocking(move || {
            cp.sign_for(
                token.as_deref(),
                p.as_ref(),
                &r.csr,
                lifetime,
                SystemTime::now(),
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
        let bundle = self.cp.bundle().map_err(status)?;
        Ok(Response::new(SignResponse {
            spiffe_id: issued.spiffe_id.to_string(),
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: bundle.iter().map(|c| c.to_vec()).collect(),
            not_after_unix: i64::try_from(
                issued
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
            )
            .unwrap_or(i64::MAX),
        }))
    }
}

type SnapshotStream = ReceiverStream<Result<ConfigSnapshot, Status>>;

#[tonic::async_trait]
impl Telemetry for ProxyApi {
    async fn ship(&self, req: Request<DecisionBatch>) -> Result<Response<ShipAck>, Status> {
        let id = peer(&req)
            .ok_or_else(|| Status::unauthenticated("ship with your SVID as client certificate"))?;
        if peer_expired(&req) {
            return Err(Status::unauthenticated(
                "your SVID has expired: renew it first",
            ));
        }
        let b = req.into_inner();
        let cp = self.cp.clone();
        let (accepted, invalid) =
            tokio::task::spawn_blocking(move || cp.ship(&id, &b.records, b.dropped))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(status)?;
        Ok(Response::new(ShipAck { accepted, invalid }))
    }
}

#[tonic::async_trait]
impl Config for ProxyApi {
    type StreamStream = SnapshotStream;

    async fn stream(
        &self,
        req: Request<Streaming<ConfigAck>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let id = peer(&req).ok_or_else(|| {
            Status::unauthenticated("subscribe with your SVID as client certificate")
        })?;
        if peer_expired(&req) {
            return Err(Status::unauthenticated(
                "your SVID has expired: renew it (Identity.Sign) before subscribing",
            ));
        }
        if id.workload_parts().is_none() {
            return Err(Status::permission_denied(format!(
                "`{id}` is not a workload identity"
            )));
        }
        let cp = self.cp.clone();
        let workloads = cp.snapshot_for(&id).map_err(status)?.workloads.clone();
        let conn = cp.proxy_connected(&id, workloads, SystemTime::now());
        let mut acks = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut head = cp.subscribe();
        let mut readiness = cp.subscribe_readiness();
        let mut rollout = cp.subscribe_rollout();
        // Sender: a snapshot now and on every new head revision.
        let send_cp = cp.clone();
        let send_id = id.clone();
        // The revision last sent and when, for the push-latency histogram.
        let pending: Arc<std::sync::Mutex<Option<(u64, std::time::Instant)>>> = Arc::default();
        let sent = pending.clone();
        tokio::spawn(async move {
            loop {
                let c = send_cp.clone();
                let who = send_id.clone();
                let snap = tokio::task::spawn_blocking(move || c.snapshot_for(&who)).await;
                let msg = match snap {
                    Ok(Ok(snap)) => {
                        let revision = snap.revision;
                        send_cp.proxy_update(conn, |s| s.sent_revision = revision);
                        let bundle = send_cp
                            .bundle()
                            .map(|b| b.iter().map(|c| c.to_vec()).collect())
                            .unwrap_or_default();
                        Ok(ConfigSnapshot {
                            revision,
                            workloads: snap.workloads.clone(),
                            files: snap
                                .files
                                .iter()
                                .map(|(name, text)| File {
                                    name: name.clone(),
                                    text: text.clone(),
                                })
                                .collect(),
                            bundle,
                            not_ready: send_cp
                                .not_ready()
                                .into_iter()
                                .map(|(workload, reason)| NotReady { workload, reason })
                                .collect(),
                            candidate_rollout: snap.candidate.as_ref().map_or(0, |c| c.0),
                            candidate_files: snap
                                .candidate
                                .iter()
                                .flat_map(|c| c.1.iter())
                                .map(|(name, text)| File {
                                    name: name.clone(),
                                    text: text.clone(),
                                })
                                .collect(),
                        })
                    }
                    Ok(Err(e)) => Err(status(e)),
                    Err(e) => Err(Status::internal(e.to_string())),
                };
                let revision = msg.as_ref().map(|m| m.revision).ok();
                if tx.send(msg).await.is_err() {
                    break;
                }
                if let (Some(r), Ok(mut p)) = (revision, sent.lock()) {
                    *p = Some((r, std::time::Instant::now()));
                }
                // A new revision, or only readiness: either way the whole snapshot (the
                // proxy skips recompiling a revision it enforces already).
                let alive = tokio::select! {
                    h = head.changed() => h.is_ok(),
                    r = readiness.changed() => r.is_ok(),
                    r = rollout.changed() => r.is_ok(),
                };
                if !alive {
                    break;
                }
            }
        });
        // Receiver: acknowledgements; the stream's end is the proxy's disconnection.
        tokio::spawn(async move {
            while let Some(Ok(ack)) = acks.next().await {
                if let Ok(mut p) = pending.lock()
                    && let Some((r, at)) = *p
                    && ack.accepted
                    && ack.revision == r
                {
                    cp.metrics.push_duration.observe(at.elapsed().as_secs_f64());
                    *p = None;
                }
                if !ack.workload.is_empty() {
                    let why = (!ack.not_ready.is_empty()).then(|| ack.not_ready.clone());
                    cp.proxy_readiness(conn, &ack.workload, why);
                }
                let now = crate::store::ms(SystemTime::now());
                let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                cp.proxy_update(conn, |s| {
                    s.last_seen_ms = now;
                    if s.workloads.contains(&ack.workload) {
                        s.workload = Some(ack.workload.clone());
                    }
                    if !ack.cert_serial.is_empty() {
                        s.certificate = Some(crate::service::HeldCertificate {
                            serial: ack.cert_serial.clone(),
                            not_before: at(ack.cert_not_before),
                            not_after: at(ack.cert_not_after),
                        });
                    }
                    s.candidate_rollout = ack.candidate_rollout;
                    s.candidate_error =
                        (!ack.candidate_error.is_empty()).then(|| ack.candidate_error.clone());
                    if ack.accepted {
                        s.acked_revision = ack.revision;
                        s.rejected = None;
                        s.not_persisted = (!ack.persist_error.is_empty())
                            .then(|| format!("revision {}: {}", ack.revision, ack.persist_error));
                    } else {
                        s.rejected = Some(format!("revision {}: {}", ack.revision, ack.error));
                    }
                });
            }
            cp.proxy_disconnected(conn);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the proxy API on `listener` until `shutdown`.
pub async fn serve(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    mut tls: rustls::ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                {
                    let conn = stream.get_ref().1;
                    let peer = meshward_identity::verifier::peer_identity(conn);
                    let expired =
                        meshward_identity::verifier::expired_for(conn, SystemTime::now()).is_some();
                    let _ = tx
                        .send(Ok(TlsConn {
                            stream,
                            peer,
                            expired,
                        }))
                        .await;
                }
            });
        }
    });
    let api = ProxyApi { cp };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(api.clone()))
        .add_service(ConfigServer::new(api.clone()))
        .add_service(TelemetryServer::new(api))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// A gRPC channel to the proxy API over mutual TLS (for tests and tools; proxies dial
/// with their own `meshward_proxy::transport::Connector`).
pub async fn connect(
    addr: &str,
    mut tls: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, String> {
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let addr = addr.to_owned();
    tonic::transport::Endpoint::from_static("http://control.meshward.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("control.meshward.invalid")
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| e.to_string())
}
