//! A client of the control plane's API, for the CLI and for proxies.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::{Accept, SharedBundles, SvidServerVerifier};
use meshward_identity::{TrustDomain, control_identity};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the control plane at `{addr}`: {why}")]
    Connect { addr: String, why: String },
    #[error("{0}")]
    Protocol(String),
    #[error("{message}")]
    Status {
        status: u16,
        message: String,
        body: Value,
    },
}

/// A connection recipe: address, how to check the server, how to authenticate.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
}

impl Client {
    /// `bundle`: the mesh's root certificates; the server must present the control plane's
    /// SVID. `token`: an operator bearer token. `cert`: a client SVID (for renewal or an
    /// operator certificate).
    pub fn new(
        addr: &str,
        td: &TrustDomain,
        bundle: Vec<CertificateDer<'static>>,
        token: Option<String>,
        cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, ClientError> {
        let mut b = TrustBundles::new();
        b.set(td.clone(), bundle);
        let accept = Accept::Only(control_identity(td).into_iter().collect());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(SvidServerVerifier::new(SharedBundles::new(b), accept));
        let tls = match cert {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Client {
            addr: addr
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_owned(),
            tls: Arc::new(tls),
            token,
        })
    }

    /// Sends one request; returns the JSON body of a 2xx answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let connect = |why: String| ClientError::Connect {
            addr: self.addr.clone(),
            why,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.addr),
        )
        .await
        .map_err(|_| connect("timed out".into()))?
        .map_err(|e| connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("control.meshward.invalid")
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| connect(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "control")
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
            .await
            .map_err(|_| {
                ClientError::Protocol("the control plane did not answer within 60s".into())
            })?
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            let message = v
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| v.to_string(), str::to_owned);
            Err(ClientError::Status {
                status,
                message,
                body: v,
            })
        }
    }
}
