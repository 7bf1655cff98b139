//! Stage: the wire under every other stage. Every connection the proxy opens — to the
//! app, to a peer proxy, to an external destination, to the control plane — is dialled
//! through a [`Connector`], which knows whether the proxy's own sockets carry a mark
//! (transparent mode: the iptables rules let marked packets through uncaptured). A stage
//! never decides that itself (ztunnel's `SocketFactory`, docs/proxy.md "Crate graph").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// The TCP connect and TLS handshake to the control plane, together, at most.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an open control-plane channel pings.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(4);
/// How long a ping may go unanswered before the channel is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);
/// One control-plane call (a certificate request, opening the config stream) at most.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the proxy's outgoing TCP connections (`TCP_NODELAY` on, the socket mark set
/// before connecting when there is one). Cheap to copy: pass it by value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connector {
    mark: Option<u32>,
}

impl Connector {
    /// A connector whose sockets carry `mark` (when set).
    pub fn new(mark: Option<u32>) -> Self {
        Connector { mark }
    }

    /// The socket mark on the connections it opens.
    pub fn mark(&self) -> Option<u32> {
        self.mark
    }

    /// A socket for `addr`'s family, marked.
    fn socket(&self, addr: SocketAddr) -> std::io::Result<TcpSocket> {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(m) = self.mark {
            socket2::SockRef::from(&sock).set_mark(m).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot set the socket mark {m} (needs CAP_NET_ADMIN): {e}"),
                )
            })?;
        }
        Ok(sock)
    }

    /// Connects to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let s = self.socket(addr)?.connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    /// Resolves `host:port` and connects to the first address that answers.
    pub async fn connect_host(&self, addr: &str) -> std::io::Result<TcpStream> {
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("`{addr}` resolves to no address"),
        );
        for a in tokio::net::lookup_host(addr).await? {
            match self.connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A gRPC channel over TLS (ALPN `h2`) to `addr` (`host:port`), every connection it
    /// makes dialled by this connector: the proxy's channel to the control plane. The TCP
    /// connect and the TLS handshake together have [`CONNECT_TIMEOUT`]; an open channel
    /// sends an HTTP/2 ping every [`KEEPALIVE_INTERVAL`] (idle or not) and is closed when
    /// one goes unanswered for [`KEEPALIVE_TIMEOUT`]: a hung control plane (stopped, or
    /// deadlocked) is noticed (`agent::HUNG_BOUND`). Calls bound themselves with
    /// [`CALL_TIMEOUT`].
    pub async fn grpc_channel(
        self,
        addr: &str,
        mut tls: rustls::ClientConfig,
    ) -> Result<tonic::transport::Channel, String> {
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let addr = addr.to_owned();
        tonic::transport::Endpoint::from_static("http://control.meshward.invalid")
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector(tower::service_fn(move |_| {
                let (tls, addr) = (tls.clone(), addr.clone());
                let dial = async move {
                    let tcp = self.connect_host(&addr).await?;
                    let name = rustls::pki_types::ServerName::try_from("control.meshward.invalid")
                        .map_err(std::io::Error::other)?;
                    let tls = tls.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                };
                async move {
                    tokio::time::timeout(CONNECT_TIMEOUT, dial)
                        .await
                        .unwrap_or_else(|_| {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "the control plane did not answer the connection and TLS handshake within {CONNECT_TIMEOUT:?} (hung?)"
                                ),
                            ))
                        })
                }
            }))
            .await
            .map_err(|e| {
                // tonic's message is "transport error"; the cause says what happened.
                match std::error::Error::source(&e) {
                    Some(src) => format!("{e}: {src}"),
                    None => e.to_string(),
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_nodelay_and_reports_refusals() -> std::io::Result<()> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let s = Connector::default().connect(addr).await?;
        assert!(s.nodelay()?);
        let s = Connector::default()
            .connect_host(&format!("localhost:{}", addr.port()))
            .await;
        // `localhost` may resolve to ::1 first: the loop goes on to 127.0.0.1.
        assert!(s.is_ok(), "{s:?}");
        drop(l);
        let e = Connector::default().connect(addr).await;
        assert_eq!(
            e.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        Ok(())
    }

    #[tokio::test]
    async fn marks_its_sockets_or_says_why_not() -> std::io::Result<()> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        match Connector::new(Some(1337)).connect(l.local_addr()?).await {
            // With CAP_NET_ADMIN (root in the test container): the mark is on the socket.
            Ok(s) => assert_eq!(socket2::SockRef::from(&s).mark()?, 1337),
            Err(e) => assert!(e.to_string().contains("socket mark 1337"), "{e}"),
        }
        Ok(())
    }
}

/// The caller's side of an opaque TCP relay, counting what it relays: bytes read from it
/// into `meshward_tcp_received_bytes_total{direction}`, bytes written to it into
/// `meshward_tcp_sent_bytes_total{direction}` (counted as they pass, so a relay cut short
/// by a revocation or a timeout has counted what it moved).
#[derive(Debug)]
pub struct Metered<'a, S> {
    inner: &'a mut S,
    received: meshward_telemetry::Counter,
    sent: meshward_telemetry::Counter,
}

impl<'a, S> Metered<'a, S> {
    pub fn new(inner: &'a mut S, shared: &crate::state::Shared, direction: &'static str) -> Self {
        let l = meshward_telemetry::DirectionLabels { direction };
        let m = &shared.log.metrics;
        Metered {
            inner,
            received: m.tcp_received.get_or_create(&l).clone(),
            sent: m.tcp_sent.get_or_create(&l).clone(),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.received.inc_by(n as u64);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.sent.inc_by(*n as u64);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
