#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The inbound request gate through two real proxies with mTLS, with tracing on (this
//! binary turns it on): the HTTP/1.1 fast path still serves the common request and carries
//! the span, and every request — fast path, general path, refused — gets exactly one
//! decision record.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use support::td;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const ID: &str = "spiffe://shop.example/ns/web/sa/frontend";

/// An app that sends each request head it gets (as bytes on the wire) to `heads`, reads a
/// Content-Length body, and answers `200 ok`.
async fn app(heads: mpsc::UnboundedSender<String>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some((head, _)) = support::read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    let _ = heads.send(head);
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Mesh {
    outbound: SocketAddr,
    heads: mpsc::UnboundedReceiver<String>,
    dir: tempfile::TempDir,
}

/// Tracing on (to a loopback collector that never answers: spans are dropped, never
/// waited for), then frontend sidecar → orders sidecar → the app; GET and POST on `/a/*`
/// allowed.
async fn mesh() -> Mesh {
    meshward_identity::install_crypto_provider();
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let otlp = collector.local_addr().unwrap();
    std::mem::forget(collector);
    meshward_telemetry::trace::init_otlp(&format!("http://{otlp}"), "gate-test").unwrap();
    assert!(meshward_telemetry::trace::enabled());
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let (tx, heads) = mpsc::unbounded_channel();
    let app_addr = app(tx).await;
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (inbound, outbound) = (inb.local_addr().unwrap(), out.local_addr().unwrap());
    let set = support::orders_policy(
        app_addr.port(),
        inbound,
        r#"[{methods: [GET, POST], paths: ["/a/*"]}]"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let log = DecisionLog::to_file(dir.path().join("decisions.jsonl"), 1 << 20, 1).unwrap();
    let orders = support::sidecar(
        &ca,
        &ca,
        "orders/orders-api",
        "spiffe://shop.example/ns/orders/sa/orders-api",
        set.clone(),
        log,
    );
    let frontend = support::sidecar(&ca, &ca, "web/frontend", ID, set, DecisionLog::disabled());
    tokio::spawn(inbound::serve(
        orders,
        InboundPort::explicit(app_addr.port(), Protocol::Http),
        inb,
    ));
    tokio::spawn(outbound::serve(
        frontend,
        Upstream {
            service: WorkloadRef::parse("orders/orders").unwrap(),
            port: 80,
        },
        out,
    ));
    Mesh {
        outbound,
        heads,
        dir,
    }
}

/// Sends `request` on its own connection; the whole answer.
async fn send(addr: SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The decision records once there are `n` (the log is written by its own thread).
async fn records(m: &Mesh, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(m.dir.path().join("decisions.jsonl")).unwrap_or_default();
        let recs: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if recs.len() >= n || std::time::Instant::now() > deadline {
            // A little longer: a second record for the same request would show now.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let log = std::fs::read_to_string(m.dir.path().join("decisions.jsonl")).unwrap();
            return log
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_on_keeps_the_fast_path_and_it_carries_the_span() {
    let mut m = mesh().await;
    let r = send(
        m.outbound,
        &format!(
            "GET /a/x HTTP/1.1\r\nHost: orders\r\nX-Case-Check: 1\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let head = m.heads.recv().await.unwrap();
    // The fast path copies header names as sent; hyper (the general path) would have
    // lower-cased this one.
    assert!(head.contains("\r\nX-Case-Check: 1\r\n"), "{head}");
    // This proxy's span continues the caller's trace and replaces its parent.
    let tp: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("traceparent: "))
        .collect();
    assert_eq!(tp.len(), 1, "exactly one traceparent: {head}");
    let parts: Vec<&str> = tp[0].split('-').collect();
    assert_eq!(parts[1], TRACE, "{head}");
    assert_ne!(parts[2], PARENT, "the proxy's own span id: {head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_exactly_one_record() {
    let m = mesh().await;
    let h = "Host: orders\r\nConnection: close\r\n";
    // Fast path: allowed, denied, a bad path, a bad head.
    assert!(
        send(m.outbound, &format!("GET /a/1 HTTP/1.1\r\n{h}\r\n"))
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        send(m.outbound, &format!("GET /b HTTP/1.1\r\n{h}\r\n"))
            .await
            .starts_with("HTTP/1.1 403")
    );
    assert!(
        send(m.outbound, &format!("GET /a/b;c HTTP/1.1\r\n{h}\r\n"))
            .await
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        send(m.outbound, &format!("get /a/1 HTTP/1.1\r\n{h}\r\n"))
            .await
            .starts_with("HTTP/1.1 400")
    );
    // General path: an allowed request with a body, a malformed chunk.
    let r = send(
        m.outbound,
        &format!("POST /a/2 HTTP/1.1\r\n{h}Content-Length: 2\r\n\r\nhi"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = send(
        m.outbound,
        &format!(
            "POST /a/3 HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let recs = records(&m, 6).await;
    let seen: Vec<(String, String)> = recs
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap_or("").to_owned(),
                r["detail"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(recs.len(), 6, "one record per request: {seen:?}");
    let allowed = recs.iter().filter(|r| r["verdict"] == "allow").count();
    assert_eq!(allowed, 2, "{seen:?}");
    for detail in ["lowercase_method", "bad_chunk"] {
        assert!(seen.iter().any(|(_, d)| d == detail), "{detail}: {seen:?}");
    }
    let bad = recs.iter().filter(|r| r["reason"] == "bad_request").count();
    assert_eq!(
        bad, 3,
        "the bad path, the bad head, the bad chunk: {seen:?}"
    );
    let denied = recs.iter().filter(|r| r["verdict"] == "deny").count();
    assert_eq!(denied, 4, "and the path no rule allows: {seen:?}");
}
