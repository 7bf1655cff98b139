#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `RateLimitPolicy` at the destination's sidecar, through real proxies with mTLS: three
//! client sidecars with their own identities call one `orders-api` sidecar. A flood from
//! one identity is answered 429 with `Retry-After` while the others see no error; a refused
//! identity does not spend a shared budget; budgets survive a new revision unless their
//! limit changed; `maxConcurrent` and `maxConnections` hold; on a TCP port the limits
//! count connections.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::PolicySet;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use meshward_proxy::state::Shared;
use support::{get, td};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALLERS: [&str; 3] = ["web/frontend", "web/cart", "batch/noisy"];

fn id(workload: &str) -> String {
    let (ns, name) = workload.split_once('/').unwrap();
    format!("spiffe://shop.example/ns/{ns}/sa/{name}")
}

/// An HTTP app that answers `200 ok` after `delay`, counting requests in progress (the
/// most at once in `peak`); and on a second port, a TCP echo.
async fn app(delay: Duration, peak: Arc<AtomicUsize>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let (peak, now) = (peak.clone(), now.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while support::read_request(&mut s, &mut buf).await.is_some() {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The mesh: the callers, `orders/orders-api` (HTTP app port, TCP app port) allowing
/// every caller, and `limits` (YAML of a RateLimitPolicy's `limits`) on orders-api.
fn set(http: u16, tcp: u16, inbound: SocketAddr, tcp_in: SocketAddr, limits: &str) -> PolicySet {
    let mut yaml = String::new();
    for c in &CALLERS[1..] {
        let (ns, name) = c.split_once('/').unwrap();
        yaml.push_str(&format!(
            "apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{port: 9000, protocol: HTTP}}]}}\n---\n"
        ));
    }
    yaml.push_str(&format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec:
  ports:
    - {{port: {http}, protocol: HTTP, inbound: "{inbound}"}}
    - {{port: {tcp}, protocol: TCP, inbound: "{tcp_in}"}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {http}}}, {{port: 81, targetPort: {tcp}}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - from: [{{namespaces: [web, batch]}}]
---
apiVersion: meshward.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  target: {{workloads: [orders-api]}}
  limits: {limits}
"#
    ));
    support::policy_set(&yaml)
}

struct Mesh {
    orders: Arc<Shared>,
    /// Each caller's outbound listeners: (HTTP, TCP).
    callers: Vec<(SocketAddr, SocketAddr)>,
    ports: (u16, u16, SocketAddr, SocketAddr),
    peak: Arc<AtomicUsize>,
    dir: tempfile::TempDir,
}

impl Mesh {
    fn apply(&self, revision: u64, limits: &str) {
        let (h, t, i, ti) = self.ports;
        self.orders.set_policy(revision, set(h, t, i, ti, limits));
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("decisions.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

async fn mesh(limits: &str, delay: Duration) -> Mesh {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let peak = Arc::new(AtomicUsize::new(0));
    let http_app = app(delay, peak.clone()).await;
    let tcp_app = support::echo().await;
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ports = (
        http_app.port(),
        tcp_app.port(),
        inb.local_addr().unwrap(),
        tin.local_addr().unwrap(),
    );
    let s = set(ports.0, ports.1, ports.2, ports.3, limits);
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
        InboundPort::explicit(ports.0, Protocol::Http),
        inb,
    ));
    tokio::spawn(inbound::serve(
        orders.clone(),
        InboundPort::explicit(ports.1, Protocol::Tcp),
        tin,
    ));
    let mut callers = vec![];
    for c in CALLERS {
        let side = support::sidecar(&ca, &ca, c, &id(c), s.clone(), DecisionLog::disabled());
        let mut pair = vec![];
        for port in [80, 81] {
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
        peak,
        dir,
    }
}

/// `n` GETs from caller `c`, one after another: the statuses.
async fn burst(m: &Mesh, c: usize, n: usize) -> Vec<u16> {
    let mut out = vec![];
    for _ in 0..n {
        out.push(get(m.callers[c].0).await.0);
    }
    out
}

fn count(v: &[u16], status: u16) -> usize {
    v.iter().filter(|s| **s == status).count()
}

const PER_IDENTITY: &str = "[{requestsPerSecond: 2, burst: 5}]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_identity_is_refused_while_the_others_see_no_error() {
    let m = mesh(PER_IDENTITY, Duration::ZERO).await;
    let flood = tokio::spawn({
        let a = m.callers[2].0;
        async move {
            let mut v = vec![];
            for _ in 0..40 {
                v.push(get(a).await);
            }
            v
        }
    });
    // The others, meanwhile, at well under their own limit.
    let mut others = vec![];
    for _ in 0..4 {
        others.extend(burst(&m, 0, 1).await);
        others.extend(burst(&m, 1, 1).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let flood = flood.await.unwrap();
    assert_eq!(others, vec![200; 8], "the quiet identities see no error");
    let ok = flood.iter().filter(|(s, _)| *s == 200).count();
    // The burst (5) and the rate over the flood's time (2/s, under 2 s here).
    assert!((5..=10).contains(&ok), "{ok} of 40 allowed");
    let (_, refused) = flood.iter().find(|(s, _)| *s == 429).unwrap();
    assert!(refused.contains("retry-after: 1\r\n"), "{refused}");
    let body: serde_json::Value =
        serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["reason"], "rate_limited");
    assert_eq!(body["policy"], "orders/orders-api");
    assert_eq!(body["kind"], "rate");
    // Recorded: one deny per refusal, with the limit named.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let limited: Vec<_> = m
        .records()
        .into_iter()
        .filter(|r| r["reason"] == "rate_limited")
        .collect();
    assert_eq!(limited.len(), 40 - ok, "{limited:?}");
    assert!(limited.iter().all(|r| r["source"] == id("batch/noisy")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_identity_does_not_spend_the_shared_budget() {
    // Each identity 2 at once (then 1/s); all of them together 10 at once.
    let m = mesh(
        "[{requestsPerSecond: 1, burst: 2}, {per: shared, requestsPerSecond: 1, burst: 10}]",
        Duration::ZERO,
    )
    .await;
    let noisy = burst(&m, 2, 30).await;
    assert_eq!(count(&noisy, 200), 2, "{noisy:?}");
    // 8 left in the shared budget: the two others take 2 each, refused only by their own.
    let a = burst(&m, 0, 3).await;
    let b = burst(&m, 1, 3).await;
    assert_eq!((count(&a, 200), count(&b, 200)), (2, 2), "{a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_survive_a_revision_unless_their_limit_changed() {
    let m = mesh("[{requestsPerSecond: 1, burst: 3}]", Duration::ZERO).await;
    assert_eq!(count(&burst(&m, 2, 5).await, 200), 3);
    // The same limit in a new revision: still spent.
    m.apply(2, "[{requestsPerSecond: 1, burst: 3}]");
    assert_eq!(burst(&m, 2, 1).await, vec![429]);
    // A changed limit starts afresh.
    m.apply(3, "[{requestsPerSecond: 1, burst: 4}]");
    assert_eq!(count(&burst(&m, 2, 6).await, 200), 4);
    // The limit gone: nothing refused.
    m.apply(4, "[{from: {namespaces: [web]}, requestsPerSecond: 1}]");
    assert_eq!(burst(&m, 2, 5).await, vec![200; 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_caps_requests_in_progress_per_identity() {
    let m = mesh("[{maxConcurrent: 2}]", Duration::from_millis(400)).await;
    let mut tasks = vec![];
    for _ in 0..6 {
        let a = m.callers[2].0;
        tasks.push(tokio::spawn(async move { get(a).await }));
    }
    let mut got = vec![];
    for t in tasks {
        got.push(t.await.unwrap());
    }
    let statuses: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(count(&statuses, 200), 2, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 4, "{statuses:?}");
    assert_eq!(m.peak.load(Ordering::SeqCst), 2, "the app never saw more");
    let (_, refused) = got.iter().find(|(s, _)| *s == 429).unwrap();
    assert!(refused.contains("\"kind\":\"concurrency\""), "{refused}");
    assert!(!refused.contains("retry-after"), "{refused}");
    // Another identity has its own places, and the places come back.
    assert_eq!(burst(&m, 0, 1).await, vec![200]);
    assert_eq!(burst(&m, 2, 1).await, vec![200]);
}

/// Places come back once the inbound side has seen both halves of a connection close
/// (under load that takes a while: wait for it rather than guess).
async fn places_come_back(m: &Mesh) {
    let t0 = std::time::Instant::now();
    while m.orders.budgets.in_progress() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tcp_port_the_limits_count_connections() {
    let m = mesh(
        "[{requestsPerSecond: 1, burst: 2, maxConcurrent: 1}]",
        Duration::ZERO,
    )
    .await;
    // One open connection at a time: a second one is closed unanswered.
    let mut first = tokio::net::TcpStream::connect(m.callers[2].1)
        .await
        .unwrap();
    first.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    let mut second = tokio::net::TcpStream::connect(m.callers[2].1)
        .await
        .unwrap();
    let _ = second.write_all(b"hello").await;
    let mut out = vec![];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut out))
        .await
        .expect("the refused connection is closed");
    assert_eq!(n.unwrap_or(0), 0, "nothing relayed");
    // Another identity is not affected.
    let mut other = tokio::net::TcpStream::connect(m.callers[0].1)
        .await
        .unwrap();
    other.write_all(b"hi").await.unwrap();
    let mut two = [0u8; 2];
    other.read_exact(&mut two).await.unwrap();
    drop((first, other));
    places_come_back(&m).await;
    // The place is free again, and the refused connection took no token: connections
    // one after another now pass until the rate (1/s, burst 2) is spent. How many pass
    // depends on how long this machine took so far (tokens refill), so count them.
    let mut passed = 0;
    let refused = loop {
        assert!(passed < 6, "the rate of 1/s never refused a connection");
        let mut next = tokio::net::TcpStream::connect(m.callers[2].1)
            .await
            .unwrap();
        let _ = next.write_all(b"x").await;
        let mut one = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), next.read(&mut one))
            .await
            .expect("a connection is answered or closed");
        if !matches!(read, Ok(1)) {
            break passed;
        }
        passed += 1;
        drop(next);
        // Its place must be free too, or the next one is refused for concurrency.
        places_come_back(&m).await;
    };
    assert!(
        refused >= 1,
        "the token the refused connection did not take is left"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kinds: Vec<String> = m
        .records()
        .iter()
        .filter(|r| r["reason"] == "rate_limited")
        .map(|r| r["detail"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(kinds[0].starts_with("connections "), "{kinds:?}");
    assert!(kinds[1].starts_with("rate "), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_open_connections_per_identity() {
    let m = mesh("[{maxConnections: 1}]", Duration::ZERO).await;
    // A keep-alive connection held open through the caller's tunnel.
    let mut held = tokio::net::TcpStream::connect(m.callers[2].0)
        .await
        .unwrap();
    held.write_all(b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = held.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let mut second = tokio::net::TcpStream::connect(m.callers[2].0)
        .await
        .unwrap();
    let _ = second
        .write_all(b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n")
        .await;
    let mut out = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
        "{out:?}"
    );
    assert_eq!(
        burst(&m, 0, 1).await,
        vec![200],
        "another identity is not affected"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(burst(&m, 2, 1).await, vec![200]);
}
