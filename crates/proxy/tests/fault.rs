#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `FaultInjection` at the destination's sidecar, through real proxies with mTLS: three
//! caller sidecars (`web/frontend`, `web/cart`, `batch/noisy`) call one `orders-api`
//! sidecar whose policy allows the `web` namespace. Aborts are injected at their
//! percentage (within the binomial interval) and only for the callers `from` names; a
//! delay is waited before the app; a denied caller is still refused; an expired fault
//! injects nothing; a reset ends HTTP requests and TCP connections; the caller's retries
//! take an injected 503 for an endpoint failure. Every injection is recorded and counted.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::PolicySet;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use meshward_proxy::state::Shared;
use meshward_telemetry::FaultLabels;
use support::{get, td};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALLERS: [&str; 3] = ["web/frontend", "web/cart", "batch/noisy"];
const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";

fn id(workload: &str) -> String {
    let (ns, name) = workload.split_once('/').unwrap();
    format!("spiffe://shop.example/ns/{ns}/sa/{name}")
}

/// An HTTP app that answers `200 ok` to every request.
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while support::read_request(&mut s, &mut buf).await.is_some() {
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

/// The mesh: `orders/orders-api` (an HTTP and a TCP port) allowing the `web` namespace,
/// `fault` (the spec of a FaultInjection on orders-api, YAML lines indented by two) and
/// `traffic` (a TrafficPolicy's spec for the callers of `orders/orders`, or empty).
fn set(ports: (u16, u16, SocketAddr, SocketAddr), fault: &str, traffic: &str) -> PolicySet {
    let (http, tcp, inbound, tcp_in) = ports;
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
    - from: [{{namespaces: [web]}}]
---
apiVersion: meshward.io/v1alpha1
kind: FaultInjection
metadata: {{name: drill, namespace: orders}}
spec:
  target: {{workloads: [orders-api]}}
{fault}
"#
    ));
    if !traffic.is_empty() {
        yaml.push_str(&format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: orders, namespace: orders}}\nspec:\n  target: {{services: [orders]}}\n{traffic}\n"
        ));
    }
    support::policy_set(&yaml)
}

/// An hour from now, as `expiresAt`.
fn in_an_hour() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600)).to_string()
}

struct Mesh {
    orders: Arc<Shared>,
    /// Each caller's outbound listeners: (HTTP, TCP).
    callers: Vec<(SocketAddr, SocketAddr)>,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// The decision records written so far (after the log's flush interval).
    async fn records(&self) -> Vec<serde_json::Value> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::read_to_string(self.dir.path().join("decisions.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many faults of `kind` the drill injected (`meshward_faults_injected`).
    fn injected(&self, kind: &'static str) -> u64 {
        self.orders
            .log
            .metrics
            .faults
            .get_or_create(&FaultLabels {
                fault: "orders/drill".into(),
                kind,
            })
            .get()
    }
}

async fn mesh(fault: &str, traffic: &str) -> Mesh {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let http_app = app().await;
    let tcp_app = support::echo().await;
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ports = (
        http_app.port(),
        tcp_app.port(),
        inb.local_addr().unwrap(),
        tin.local_addr().unwrap(),
    );
    let s = set(ports, fault, traffic);
    let dir = tempfile::tempdir().unwrap();
    // Allows sampled 1 in 10, the default: a request a fault was injected into is kept.
    let log = DecisionLog::to_file(dir.path().join("decisions.jsonl"), 1 << 20, 10).unwrap();
    let orders = support::sidecar(
        &ca,
        &ca,
        "orders/orders-api",
        "spiffe://shop.example/ns/orders/sa/orders-api",
        s.clone(),
        log,
    );
    for (port, protocol, l) in [
        (ports.0, Protocol::Http, inb),
        (ports.1, Protocol::Tcp, tin),
    ] {
        tokio::spawn(inbound::serve(
            orders.clone(),
            InboundPort::explicit(port, protocol),
            l,
        ));
    }
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
        dir,
    }
}

/// `n` GETs from caller `c`, four at a time, each on its own connection: the answers.
async fn load(m: &Mesh, c: usize, n: usize) -> Vec<(u16, String)> {
    let mut tasks = vec![];
    for k in 0..4 {
        let a = m.callers[c].0;
        let share = n / 4 + usize::from(k < n % 4);
        tasks.push(tokio::spawn(async move {
            let mut v = vec![];
            for _ in 0..share {
                v.push(get(a).await);
            }
            v
        }));
    }
    let mut out = vec![];
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

fn injected_aborts(answers: &[(u16, String)]) -> usize {
    answers
        .iter()
        .filter(|(s, t)| *s == 503 && t.contains("x-meshward-fault: orders/drill\r\n"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenth_of_the_named_callers_requests_are_aborted_and_no_one_elses() {
    let fault = format!(
        "  from: {{identities: [\"{FRONTEND}\"]}}\n  abort: {{httpStatus: 503, percent: 10}}\n  expiresAt: {}",
        in_an_hour()
    );
    let m = mesh(&fault, "").await;
    let n = 2000;
    let frontend = load(&m, 0, n).await;
    let aborted = injected_aborts(&frontend);
    // Binomial(2000, 0.1): mean 200, σ ≈ 13.4; the 99.9 % interval is ± 3.29 σ.
    assert!((156..=244).contains(&aborted), "{aborted} of {n} aborted");
    // Everything else reached the app; nothing else failed.
    let ok = frontend.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok + aborted, n, "only 200s and injected 503s");
    // The answer is the endpoint's, not a refusal: the caller's sidecar may retry it.
    let (_, one) = frontend.iter().find(|(s, _)| *s == 503).unwrap();
    assert!(!one.contains("x-meshward-refused"), "{one}");
    let body: serde_json::Value =
        serde_json::from_str(one.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["fault"], "orders/drill");
    assert_eq!(body["injected"], "abort");
    // A caller `from` does not name is untouched.
    let cart = load(&m, 1, 300).await;
    assert!(cart.iter().all(|(s, _)| *s == 200), "cart saw a fault");
    // Counted and recorded: each abort is an allow whose detail names the fault.
    assert_eq!(m.injected("abort_http"), aborted as u64);
    let records = m.records().await;
    let faulted: Vec<_> = records
        .iter()
        .filter(|r| r["detail"] == "fault orders/drill: abort 503")
        .collect();
    assert_eq!(
        faulted.len(),
        aborted,
        "one record per abort, none sampled away"
    );
    assert!(
        faulted
            .iter()
            .all(|r| r["verdict"] == "allow" && r["source"] == FRONTEND && r["weight"] == 1)
    );
    // The other allows are sampled, their weights still counting every request.
    let weighed: u64 = records
        .iter()
        .filter(|r| r["verdict"] == "allow")
        .map(|r| r["weight"].as_u64().unwrap())
        .sum();
    let total = 2000 + 300;
    assert!(
        records.len() < total / 2 && weighed.abs_diff(total as u64) <= 10 * 2,
        "{} records weigh {weighed} for {total} requests",
        records.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_is_waited_before_the_app_and_a_denied_caller_is_still_refused() {
    let fault = format!(
        "  delay: {{fixed: 300ms, percent: 100}}\n  abort: {{httpStatus: 500, percent: 100}}\n  to: [{{paths: [/x]}}]\n  expiresAt: {}",
        in_an_hour()
    );
    let m = mesh(&fault, "").await;
    let t0 = Instant::now();
    let (status, text) = get(m.callers[1].0).await;
    assert!(t0.elapsed() >= Duration::from_millis(300), "the delay");
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("x-meshward-fault: orders/drill"), "{text}");
    // Policy first: a caller it denies gets its 403, never the fault.
    let (status, text) = get(m.callers[2].0).await;
    assert_eq!(status, 403, "{text}");
    assert!(!text.contains("x-meshward-fault"), "{text}");
    assert_eq!(m.injected("delay"), 1);
    assert_eq!(m.injected("abort_http"), 1);
    let records = m.records().await;
    let details: Vec<&str> = records
        .iter()
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert!(
        details.contains(&"fault orders/drill: delay 300ms; fault orders/drill: abort 500"),
        "{details:?}"
    );
    // A path `to` does not name is untouched (a TCP port has no path: nothing either).
    let mut tcp = tokio::net::TcpStream::connect(m.callers[0].1)
        .await
        .unwrap();
    tcp.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_fault_injects_nothing() {
    let past = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(1));
    let fault = format!("  abort: {{httpStatus: 503, percent: 100}}\n  expiresAt: {past}");
    let m = mesh(&fault, "").await;
    let answers = load(&m, 0, 40).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(m.injected("abort_http"), 0);
}

/// Sends `msg` on a new connection to `addr`: everything that comes back before it ends.
async fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(msg).await;
    let mut out = vec![];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "the connection ends");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_ends_http_requests_and_tcp_connections_unanswered() {
    let fault = format!(
        "  abort: {{tcpReset: true, percent: 100}}\n  expiresAt: {}",
        in_an_hour()
    );
    let m = mesh(&fault, "").await;
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n";
    // A tunnelled HTTP connection (the caller sets no per-request settings): it ends with
    // nothing answered, as the endpoint's did.
    let out = exchange(m.callers[0].0, GET).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    // TCP: the connection ends with nothing relayed.
    let out = exchange(m.callers[0].1, b"hello").await;
    assert!(out.is_empty(), "nothing echoed: {out:?}");
    assert_eq!(m.injected("reset"), 2);
    let records = m.records().await;
    let resets = records
        .iter()
        .filter(|r| r["detail"] == "fault orders/drill: reset")
        .count();
    assert_eq!(resets, 2, "{records:?}");
    // A caller whose requests are pooled (a timeout set): its sidecar answers for the
    // endpoint that failed, 502 `upstream_failed`.
    let m = mesh(&fault, "  timeout: 5s").await;
    let (status, text) = get(m.callers[0].0).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("upstream_failed"), "{text}");
    assert!(!text.contains("x-meshward-fault"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_retries_take_an_injected_503_for_an_endpoint_failure() {
    let fault = format!(
        "  abort: {{httpStatus: 503, percent: 10}}\n  expiresAt: {}",
        in_an_hour()
    );
    let traffic = "  retries: {attempts: 2, retryOn: [\"503\"]}";
    let m = mesh(&fault, traffic).await;
    let n = 600;
    let answers = load(&m, 0, n).await;
    let failed = answers.iter().filter(|(s, _)| *s != 200).count();
    let injected = m.injected("abort_http");
    // About 60 injected (99.9 %: at least 36); a request fails only when all three of its
    // attempts drew the abort (p = 0.001: 0.6 expected, at most 5 by far).
    assert!(injected >= 36, "{injected} injected");
    assert!(failed <= 5, "{failed} of {n} failed despite the retries");
}
