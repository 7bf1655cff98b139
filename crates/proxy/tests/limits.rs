#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The inbound listener's timeouts and caps, set by the workload's `connectionLimits`,
//! against real mTLS connections from a peer sidecar's `dial`: a half-sent head is closed
//! after the header-read timeout (on the fast path and on the general path), a kept-alive
//! connection may idle longer than that, and one identity over its cap is closed right
//! after the handshake while another is served.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshward_identity::SpiffeId;
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::state::Shared;
use support::td;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";
const ADMIN: &str = "spiffe://shop.example/ns/web/sa/admin";
const ORDERS: &str = "spiffe://shop.example/ns/orders/sa/orders-api";

struct Setup {
    inbound: SocketAddr,
    orders: Arc<Shared>,
    frontend: Arc<Shared>,
    admin: Arc<Shared>,
    _dir: tempfile::TempDir,
}

/// An app that answers every request head with `200 ok` (reading any Content-Length body).
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut tmp = [0u8; 4096];
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    while let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if buf.len() < p + 4 + len {
                            break;
                        }
                        buf.drain(..p + 4 + len);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    addr
}

/// The orders sidecar serving its inbound port in-process, with `limits` (a YAML flow
/// map) as its workload's `connectionLimits`; frontend and admin may call it.
async fn setup(limits: &str) -> Setup {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let app = app().await;
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound = inb.local_addr().unwrap();
    let set = support::policy_set(&format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: admin, namespace: web}}
spec: {{}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders}}
spec:
  ports: [{{port: {port}, protocol: HTTP, inbound: "{inbound}"}}]
  connectionLimits: {limits}
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
"#,
        port = app.port()
    ));
    let dir = tempfile::tempdir().unwrap();
    let log = DecisionLog::to_file(dir.path().join("decisions.jsonl"), 1 << 20, 1).unwrap();
    let orders = support::sidecar(&ca, &ca, "orders/orders-api", ORDERS, set.clone(), log);
    let frontend = support::sidecar(
        &ca,
        &ca,
        "web/frontend",
        FRONTEND,
        set.clone(),
        DecisionLog::disabled(),
    );
    let admin = support::sidecar(&ca, &ca, "web/admin", ADMIN, set, DecisionLog::disabled());
    tokio::spawn(inbound::serve(
        orders.clone(),
        InboundPort::explicit(app.port(), Protocol::Http),
        inb,
    ));
    Setup {
        inbound,
        orders,
        frontend,
        admin,
        _dir: dir,
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A mutual-TLS connection to the orders sidecar as `from`.
async fn dial(s: &Setup, from: &Arc<Shared>) -> Tls {
    let allowed = vec![SpiffeId::parse(ORDERS).unwrap()];
    let to = meshward_policy::decision::WorkloadRef::parse("orders/orders").unwrap();
    meshward_proxy::outbound::dial(from, &to, s.inbound, allowed, None)
        .await
        .unwrap()
}

/// Waits until the peer closes `c` (or resets it) and says how long that took; fails
/// after `max`.
async fn closed_within(c: &mut Tls, max: Duration) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(max, c.read(&mut buf)).await {
        Err(_) => panic!("still open after {max:?}"),
        Ok(Ok(0) | Err(_)) => t0.elapsed(),
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
    }
}

/// Sends one request and reads its `200` response (the app's body is `ok`).
async fn request(c: &mut Tls, req: &str) {
    c.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\nok") {
        let mut tmp = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut tmp))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&tmp[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

fn metric(s: &Shared, series: &str) -> u64 {
    let text = s.log.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_is_closed_after_the_header_read_timeout() {
    let s = setup("{headerReadTimeout: 1s, idleTimeout: 30s}").await;
    // Fast path, first request: half a head, then nothing.
    let mut c = dial(&s, &s.frontend).await;
    c.write_all(b"GET /orders/1 HTTP/1.1\r\nHost: ord")
        .await
        .unwrap();
    let took = closed_within(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // Nothing at all after the handshake: the same.
    let mut c = dial(&s, &s.frontend).await;
    let took = closed_within(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // Kept alive: idle for longer than the header-read timeout is fine; the next head's
    // time starts at its first byte.
    let mut c = dial(&s, &s.frontend).await;
    request(&mut c, "GET /a HTTP/1.1\r\nHost: o\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    request(&mut c, "GET /b HTTP/1.1\r\nHost: o\r\n\r\n").await;
    c.write_all(b"GET /c HTTP/1.1\r\n").await.unwrap();
    let took = closed_within(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // The general path (a body moved the connection there): the same rules.
    let mut c = dial(&s, &s.frontend).await;
    request(
        &mut c,
        "POST /p HTTP/1.1\r\nHost: o\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    request(&mut c, "GET /d HTTP/1.1\r\nHost: o\r\n\r\n").await;
    c.write_all(b"GET /e HTTP/1.1\r\nHo").await.unwrap();
    let took = closed_within(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");

    assert_eq!(
        metric(
            &s.orders,
            r#"meshward_connection_timeouts_total{kind="header_read"}"#
        ),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let s = setup("{headerReadTimeout: 1s, idleTimeout: 2s}").await;
    for general in [false, true] {
        let mut c = dial(&s, &s.frontend).await;
        let req = if general {
            "POST /p HTTP/1.1\r\nHost: o\r\nContent-Length: 1\r\n\r\nx"
        } else {
            "GET /a HTTP/1.1\r\nHost: o\r\n\r\n"
        };
        request(&mut c, req).await;
        let took = closed_within(&mut c, Duration::from_secs(6)).await;
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }
    assert_eq!(
        metric(
            &s.orders,
            r#"meshward_connection_timeouts_total{kind="idle"}"#
        ),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_over_its_cap_is_closed_after_the_handshake_others_are_served() {
    let s = setup("{perIdentity: 5, total: 40}").await;
    let mut held = vec![];
    for _ in 0..5 {
        let mut c = dial(&s, &s.frontend).await;
        request(&mut c, "GET /a HTTP/1.1\r\nHost: o\r\n\r\n").await;
        held.push(c);
    }
    // The sixth completes the handshake on the client's side, then is closed unanswered.
    let mut c = dial(&s, &s.frontend).await;
    let _ = c.write_all(b"GET /a HTTP/1.1\r\nHost: o\r\n\r\n").await;
    closed_within(&mut c, Duration::from_secs(2)).await;
    // Another identity is served, and so are the five held ones.
    let mut other = dial(&s, &s.admin).await;
    request(&mut other, "GET /x HTTP/1.1\r\nHost: o\r\n\r\n").await;
    for c in &mut held {
        request(c, "GET /again HTTP/1.1\r\nHost: o\r\n\r\n").await;
    }
    assert_eq!(
        metric(
            &s.orders,
            r#"meshward_connections_refused_total{direction="inbound",limit="per_identity"}"#
        ),
        1
    );
    // Closing them gives the slots back.
    drop(held);
    let t0 = Instant::now();
    loop {
        let mut c = dial(&s, &s.frontend).await;
        let _ = c.write_all(b"GET /a HTTP/1.1\r\nHost: o\r\n\r\n").await;
        let mut buf = [0u8; 64];
        if matches!(
            tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await,
            Ok(Ok(n)) if n > 0
        ) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "still refused");
    }
    // The refusal is in the decision log, with the identity and the reason.
    let t0 = Instant::now();
    let line = loop {
        let log =
            std::fs::read_to_string(s._dir.path().join("decisions.jsonl")).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.contains("\"connection_limit\"")) {
            break l.to_owned();
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(line.contains(FRONTEND), "{line}");
    assert!(line.contains("this identity holds 5 connections"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_streams_is_closed_after_the_idle_timeout() {
    let s = setup("{headerReadTimeout: 1s, idleTimeout: 2s}").await;
    let tls = dial(&s, &s.frontend).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let driver = tokio::spawn(conn);
    // Two requests, the second after longer than the header-read timeout: HTTP/2 has
    // only the idle timeout once it is serving.
    for path in ["/a", "/b"] {
        let req = hyper::Request::get(format!("http://orders{path}"))
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(&body.to_bytes()[..], b"ok");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let since_last = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("still open after the idle timeout")
        .unwrap()
        .ok();
    assert!(
        since_last.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        metric(
            &s.orders,
            r#"meshward_connection_timeouts_total{kind="idle"}"#
        ),
        1
    );
}
