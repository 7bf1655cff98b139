#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Live re-checks, through real proxies with mTLS: two client sidecars (`web/frontend`,
//! `web/cart`) hold long-lived connections to one `orders-api` sidecar — TCP connections
//! to an echo app and gRPC server streams (HTTP/2) — when a new revision quarantines the
//! frontend or an override starts. The frontend's connections and streams close within a
//! second, each recorded; the cart's carry on untouched.

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshward_api::v1::config_client::ConfigClient;
use meshward_api::v1::config_server::{Config, ConfigServer};
use meshward_api::v1::{ConfigAck, ConfigSnapshot};
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::PolicySet;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use meshward_proxy::state::Shared;
use support::td;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALLERS: [&str; 2] = ["web/frontend", "web/cart"];
const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";

fn id(workload: &str) -> String {
    let (ns, name) = workload.split_once('/').unwrap();
    format!("spiffe://shop.example/ns/{ns}/sa/{name}")
}

/// A gRPC app whose `Config.Stream` sends a snapshot every 50 ms for as long as the call
/// lasts.
#[derive(Debug)]
struct Ticker;

type Snapshots =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ConfigSnapshot, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Config for Ticker {
    type StreamStream = Snapshots;

    async fn stream(
        &self,
        _req: tonic::Request<tonic::Streaming<ConfigAck>>,
    ) -> Result<tonic::Response<Snapshots>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for revision in 1.. {
                let snap = ConfigSnapshot {
                    revision,
                    ..Default::default()
                };
                if tx.send(Ok(snap)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The mesh: the callers, `orders/orders-api` (a TCP echo port and a gRPC port) allowing
/// both, and `more` YAML documents (an override, say).
fn set(tcp: u16, grpc: u16, tcp_in: SocketAddr, grpc_in: SocketAddr, more: &str) -> PolicySet {
    support::policy_set(&format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: cart, namespace: web}}
spec: {{ports: [{{port: 9000, protocol: HTTP}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec:
  ports:
    - {{port: {tcp}, protocol: TCP, inbound: "{tcp_in}"}}
    - {{port: {grpc}, protocol: GRPC, inbound: "{grpc_in}"}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{{port: 81, targetPort: {tcp}}}, {{port: 50051, targetPort: {grpc}, protocol: GRPC}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - from: [{{namespaces: [web]}}]
{more}"#
    ))
}

/// An override of `action` on the frontend from `starts` (or now) for an hour.
fn frontend_override(action: &str, starts: Option<SystemTime>) -> String {
    let expires = starts.unwrap_or_else(SystemTime::now) + Duration::from_secs(3600);
    let starts = starts
        .map(|t| format!("  startsAt: {}\n", humantime::format_rfc3339_seconds(t)))
        .unwrap_or_default();
    format!(
        r#"---
apiVersion: meshward.io/v1alpha1
kind: Override
metadata: {{name: contain-frontend, namespace: web}}
spec:
  action: {action}
  subject: {{identities: ["{FRONTEND}"]}}
  reason: suspected compromise
{starts}  expiresAt: {}
"#,
        humantime::format_rfc3339_seconds(expires)
    )
}

struct Mesh {
    orders: Arc<Shared>,
    /// Each caller's outbound listeners: (TCP, gRPC).
    callers: Vec<(SocketAddr, SocketAddr)>,
    ports: (u16, u16, SocketAddr, SocketAddr),
    dir: tempfile::TempDir,
}

impl Mesh {
    fn apply(&self, revision: u64, more: &str) {
        let (t, g, ti, gi) = self.ports;
        self.orders.set_policy(revision, set(t, g, ti, gi, more));
    }

    /// The orders sidecar's decision records that say they revoked something.
    fn revoked(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("decisions.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| {
                r["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("revoked"))
            })
            .collect()
    }

    fn metric(&self, kind: &str) -> String {
        let text = self.orders.log.metrics.encode();
        let series = format!("meshward_revoked_total{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series).map(str::to_owned))
            .unwrap_or_else(|| "0".into())
    }
}

async fn mesh() -> Mesh {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let tcp_app = support::echo().await;
    let grpc_app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_port = grpc_app.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ConfigServer::new(Ticker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc_app)),
    );
    let tin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ports = (
        tcp_app.port(),
        grpc_port,
        tin.local_addr().unwrap(),
        gin.local_addr().unwrap(),
    );
    let s = set(ports.0, ports.1, ports.2, ports.3, "");
    let dir = tempfile::tempdir().unwrap();
    let log = DecisionLog::to_file(dir.path().join("decisions.jsonl"), 1 << 20, 1).unwrap();
    let orders = support::sidecar(
        &ca,
        &ca,
        "orders/orders-api",
        "spiffe://shop.example/ns/orders/sa/orders-api",
        s.clone(),
        log,
    );
    tokio::spawn(inbound::serve(
        orders.clone(),
        InboundPort::explicit(ports.0, Protocol::Tcp),
        tin,
    ));
    tokio::spawn(inbound::serve(
        orders.clone(),
        InboundPort::explicit(ports.1, Protocol::Grpc),
        gin,
    ));
    let mut callers = vec![];
    for c in CALLERS {
        let side = support::sidecar(&ca, &ca, c, &id(c), s.clone(), DecisionLog::disabled());
        let mut pair = vec![];
        for port in [81, 50051] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            pair.push(l.local_addr().unwrap());
            tokio::spawn(outbound::serve(
                side.clone(),
                Upstream {
                    service: WorkloadRef::parse("orders/orders").unwrap(),
                    port,
                },
                l,
            ));
        }
        callers.push((pair[0], pair[1]));
    }
    Mesh {
        orders,
        callers,
        ports,
        dir,
    }
}

/// A TCP connection through a caller's sidecar to the echo app, shown to work.
async fn open_tcp(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(round_trip(&mut s).await, "the echo answers at first");
    s
}

/// One line echoed back within 2 s.
async fn round_trip(s: &mut tokio::net::TcpStream) -> bool {
    if s.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping\n"
    )
}

/// How long until `s` is closed by the other side (`None`: still open after `within`).
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at((t0 + within).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_closes_the_open_tcp_connections_it_denies_and_only_those() {
    let m = mesh().await;
    let mut frontend = [
        open_tcp(m.callers[0].0).await,
        open_tcp(m.callers[0].0).await,
    ];
    let mut cart = open_tcp(m.callers[1].0).await;

    m.apply(2, &frontend_override("quarantine", None));
    for s in &mut frontend {
        let t = closed_within(s, Duration::from_secs(1)).await;
        assert!(
            t.is_some(),
            "the frontend's connection is closed within 1 s"
        );
    }
    assert!(
        round_trip(&mut cart).await,
        "the cart's connection carries on"
    );
    assert!(
        round_trip(&mut open_tcp(m.callers[1].0).await).await,
        "and the cart connects anew"
    );
    // Each recorded as the quarantine's deny, once.
    let revoked = m.revoked();
    assert_eq!(revoked.len(), 2, "{revoked:#?}");
    for r in &revoked {
        assert_eq!(r["source"], FRONTEND);
        assert_eq!(r["verdict"], "deny");
        assert_eq!(r["reason"], "quarantined");
        assert_eq!(r["revision"], 2);
        assert_eq!(r["policy"], "web/contain-frontend");
    }
    assert_eq!(m.metric("tcp"), "2");

    // A revision that still allows what is open closes nothing.
    let mut again = open_tcp(m.callers[1].0).await;
    m.apply(3, "");
    assert!(round_trip(&mut again).await && round_trip(&mut cart).await);
    assert_eq!(m.revoked().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_that_starts_later_closes_the_connection_when_it_starts() {
    let m = mesh().await;
    let mut s = open_tcp(m.callers[0].0).await;
    // Whole seconds (RFC 3339 in the resource), at least 1.5 s ahead.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let starts = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs() + 2);
    m.apply(2, &frontend_override("deny", Some(starts)));
    assert!(round_trip(&mut s).await, "open until the override starts");
    let left = starts.duration_since(SystemTime::now()).unwrap();
    let t = closed_within(&mut s, left + Duration::from_secs(1)).await;
    let t = t.expect("closed within 1 s of the start, with no new revision");
    assert!(
        t + Duration::from_millis(50) >= left,
        "not before it starts: {t:?} < {left:?}"
    );
    let revoked = m.revoked();
    assert_eq!(revoked.len(), 1, "{revoked:#?}");
    assert_eq!(revoked[0]["reason"], "override_deny");
}

/// A server stream through `addr` (a caller's gRPC outbound listener).
async fn subscribe(addr: SocketAddr) -> tonic::Streaming<ConfigSnapshot> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ConfigClient::new(ch);
    let acks = tokio_stream::pending::<ConfigAck>();
    let mut s = client.stream(acks).await.unwrap().into_inner();
    assert!(s.message().await.unwrap().is_some(), "the stream starts");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_ends_the_open_http2_streams_it_denies_and_only_those() {
    let m = mesh().await;
    let mut frontend = subscribe(m.callers[0].1).await;
    let mut cart = subscribe(m.callers[1].1).await;

    m.apply(2, &frontend_override("quarantine", None));
    let deadline = Instant::now() + Duration::from_secs(1);
    let status = loop {
        match tokio::time::timeout_at(deadline.into(), frontend.message()).await {
            Err(_) => panic!("the frontend's stream still runs 1 s after the revision"),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("quarantined"),
        "{}",
        status.message()
    );
    // The cart's stream goes on ticking.
    for _ in 0..5 {
        let next = tokio::time::timeout(Duration::from_secs(2), cart.message()).await;
        assert!(
            matches!(next, Ok(Ok(Some(_)))),
            "the cart's stream goes on: {next:?}"
        );
    }
    let revoked = m.revoked();
    assert_eq!(revoked.len(), 1, "{revoked:#?}");
    assert_eq!(revoked[0]["source"], FRONTEND);
    assert_eq!(revoked[0]["reason"], "quarantined");
    assert_eq!(revoked[0]["path"], "/meshward.v1.Config/Stream");
    assert_eq!(m.metric("stream"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_bytes_and_connections_are_counted() {
    let m = mesh().await;
    let value = |text: &str, series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let listener = format!("{{listener=\"inbound {}\"}}", m.ports.2);
    {
        let mut s = open_tcp(m.callers[1].0).await;
        assert!(round_trip(&mut s).await);
        let text = m.orders.log.metrics.encode();
        // Two lines of 5 bytes each way, counted as they pass.
        assert_eq!(
            value(
                &text,
                r#"meshward_tcp_received_bytes_total{direction="inbound"}"#
            ),
            10,
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"meshward_tcp_sent_bytes_total{direction="inbound"}"#
            ),
            10,
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &format!("meshward_tcp_connections_opened_total{listener}")
            ),
            1,
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &format!("meshward_tcp_connections_closed_total{listener}")
            ),
            0,
            "{text}"
        );
    }
    // Closed by the caller: the sidecar counts it closed once its relay ends.
    let start = Instant::now();
    loop {
        let text = m.orders.log.metrics.encode();
        if value(
            &text,
            &format!("meshward_tcp_connections_closed_total{listener}"),
        ) == 1
        {
            assert!(text.contains("process_resident_memory_bytes "), "{text}");
            assert!(text.contains("process_open_fds "), "{text}");
            assert!(
                text.contains(&format!(
                    "meshward_build_info{{version=\"{}\",component=\"proxy\"}} 1",
                    env!("CARGO_PKG_VERSION")
                )),
                "{text}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
