//! What the proxy's in-process tests share: a CA's SVIDs, proxies' shared state, and
//! policy sets from YAML (whose Mesh and frontend workload they all start with).

#![allow(dead_code, reason = "each test binary uses part of it")]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::ca::{Ca, new_workload_key};
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::SharedBundles;
use meshward_identity::{SpiffeId, TrustDomain};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::PolicySet;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::state::{Shared, Svid};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The Mesh (`shop.example`) and the `web/frontend` workload, as YAML documents.
pub const MESH_AND_FRONTEND: &str = r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec: {trustDomain: shop.example}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: web}
spec: {ports: [{port: 9000, protocol: HTTP}]}
"#;

pub fn td() -> TrustDomain {
    TrustDomain::parse("shop.example").unwrap()
}

/// An SVID for `id` from `ca`, which the proxy believes valid for `lifetime` from now.
pub fn svid(ca: &Ca, id: &str, lifetime: Duration) -> Svid {
    let id = SpiffeId::parse(id).unwrap();
    let (key, csr) = new_workload_key(&id).unwrap();
    let issued = ca
        .issue(&id, &csr, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key.serialize_der()),
    ))
    .unwrap();
    Svid {
        key: Arc::new(rustls::sign::CertifiedKey::new(issued.chain, signing)),
        not_after: SystemTime::now() + lifetime,
    }
}

/// A proxy's state for `workload`, trusting `ca`.
pub fn shared(ca: &Ca, workload: &str, log: DecisionLog) -> Arc<Shared> {
    let mut b = TrustBundles::new();
    b.set(td(), ca.bundle());
    Shared::new(
        WorkloadRef::parse(workload).unwrap(),
        SharedBundles::new(b),
        log,
    )
}

/// A valid policy set from [`MESH_AND_FRONTEND`] and `more` YAML documents.
pub fn policy_set(more: &str) -> PolicySet {
    let yaml = format!("{MESH_AND_FRONTEND}---\n{more}");
    meshward_policy::load_sources(vec![(Arc::from("p.yaml"), Arc::from(yaml))])
        .into_valid()
        .unwrap_or_else(|l| panic!("{:#?}", l.diagnostics))
}

/// The `orders/orders-api` workload (its sidecar at `inbound`, its app on `app_port`), the
/// `orders/orders` service in front of it, and a policy that lets the frontend do `to`
/// (a YAML flow list of operations, e.g. `[{methods: [GET], paths: ["/orders/*"]}]`).
pub fn orders_policy(app_port: u16, inbound: std::net::SocketAddr, to: &str) -> PolicySet {
    policy_set(&format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec: {{ports: [{{port: {app_port}, protocol: HTTP, inbound: "{inbound}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {app_port}}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - name: frontend-reads
      from: [{{identities: ["spiffe://shop.example/ns/web/sa/frontend"]}}]
      to: {to}
"#
    ))
}

/// A sidecar's state for `workload`: trusting `ca`, enforcing `set` (revision 1), with an
/// SVID for `id` from `issuer` valid for an hour.
pub fn sidecar(
    ca: &Ca,
    issuer: &Ca,
    workload: &str,
    id: &str,
    set: PolicySet,
    log: DecisionLog,
) -> Arc<Shared> {
    let s = shared(ca, workload, log);
    s.set_policy(1, set);
    s.svid
        .store(Some(Arc::new(svid(issuer, id, Duration::from_secs(3600)))));
    s
}

/// Reads one HTTP/1.1 request (its head and a `Content-Length` body) from a test app's
/// connection, keeping what follows in `buf`: `(head, body)`, or `None` once the peer closes.
pub async fn read_request(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, String)> {
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if !read_more(s, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < end + len {
        if !read_more(s, buf).await {
            return None;
        }
    }
    let body = String::from_utf8_lossy(&buf[end..end + len]).into_owned();
    buf.drain(..end + len);
    Some((head, body))
}

/// One read from `s` appended to `buf`; false once the peer closed.
async fn read_more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut tmp = [0u8; 4096];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

/// A TCP echo app on 127.0.0.1 (any port).
pub async fn echo() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// One `GET /x` to `addr` on its own connection (`connection: close`): the status and the
/// whole answer.
pub async fn get(addr: std::net::SocketAddr) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}
