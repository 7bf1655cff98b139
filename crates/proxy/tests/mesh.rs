#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Two proxies and an app on loopback, with real mTLS: an allowed call goes through with
//! the normalized path and the verified identity; a denied one gets 403 with its reason;
//! bad paths get 400; plaintext, `openssl s_client` without a certificate, and a proxy
//! with no policy or an expired certificate all fail closed.

mod support;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::PolicySet;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use meshward_proxy::state::Shared;

use support::{svid, td};

/// The app: echoes the path it got and the identity header.
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let id = req
                            .headers()
                            .get("x-meshward-peer-identity")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        let body =
                            serde_json::json!({"target": req.uri().to_string(), "identity": id})
                                .to_string();
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn policy(app_port: u16, inbound: SocketAddr) -> PolicySet {
    support::orders_policy(
        app_port,
        inbound,
        r#"[{methods: [GET], paths: ["/orders/*"]}]"#,
    )
}

struct Mesh {
    outbound: SocketAddr,
    inbound: SocketAddr,
    orders: Arc<Shared>,
    frontend: Arc<Shared>,
    ca: Ca,
    dir: tempfile::TempDir,
}

async fn mesh() -> Mesh {
    mesh_as("spiffe://shop.example/ns/orders/sa/orders-api", None).await
}

/// A mesh whose orders sidecar presents `orders_id`, and whose frontend's certificate
/// comes from `frontend_ca` (default: the mesh's CA).
async fn mesh_as(orders_id: &str, frontend_ca: Option<&Ca>) -> Mesh {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let app = app().await;
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (inbound, outbound) = (inb.local_addr().unwrap(), out.local_addr().unwrap());
    let set = policy(app.port(), inbound);
    let dir = tempfile::tempdir().unwrap();
    let log = DecisionLog::to_file(dir.path().join("decisions.jsonl"), 1 << 20, 1).unwrap();
    let orders = support::sidecar(&ca, &ca, "orders/orders-api", orders_id, set.clone(), log);
    let frontend = support::sidecar(
        &ca,
        frontend_ca.unwrap_or(&ca),
        "web/frontend",
        "spiffe://shop.example/ns/web/sa/frontend",
        set,
        DecisionLog::to_file(dir.path().join("frontend.jsonl"), 1 << 20, 1).unwrap(),
    );
    tokio::spawn(inbound::serve(
        orders.clone(),
        InboundPort::explicit(app.port(), Protocol::Http),
        inb,
    ));
    tokio::spawn(outbound::serve(
        frontend.clone(),
        Upstream {
            service: WorkloadRef::parse("orders/orders").unwrap(),
            port: 80,
        },
        out,
    ));
    Mesh {
        outbound,
        inbound,
        orders,
        frontend,
        ca,
        dir,
    }
}

/// The first record in a proxy's decision log (`decisions.jsonl` for orders,
/// `frontend.jsonl` for the frontend) that `want` accepts, waiting up to 5 s for it.
async fn record(
    m: &Mesh,
    file: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let path = m.dir.path().join(file);
    for _ in 0..50 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let found = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| want(v));
        if let Some(v) = found {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no such record in {file}: {}",
        std::fs::read_to_string(&path).unwrap_or_default()
    );
}

/// An impostor endpoint seen by the frontend's proxy: counted as `wrong_identity` on the
/// outbound side and recorded as an outbound `handshake_failed` deny naming the identity.
async fn assert_impostor_refused(m: &Mesh) {
    let rec = record(m, "frontend.jsonl", |v| v["reason"] == "handshake_failed").await;
    assert_eq!(rec["verdict"], "deny", "{rec}");
    assert_eq!(rec["direction"], "outbound", "{rec}");
    assert_eq!(
        rec["source"], "spiffe://shop.example/ns/web/sa/frontend",
        "{rec}"
    );
    assert_eq!(rec["destination"], "orders/orders", "{rec}");
    assert_eq!(rec["address"], m.inbound.to_string(), "{rec}");
    let detail = rec["detail"].as_str().unwrap();
    assert!(
        detail
            .starts_with("wrong identity: the peer is `spiffe://shop.example/ns/evil/sa/impostor`"),
        "{detail}"
    );
    let metrics = m.frontend.log.metrics.encode();
    assert!(
        metrics.contains(
            r#"meshward_tls_handshake_failures_total{direction="outbound",reason="wrong_identity"} 1"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"reason="other""#), "{metrics}");
}

/// A raw HTTP/1.1 exchange (so nothing rewrites what we send).
fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> String {
    raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: orders\r\n{extra}Connection: close\r\n\r\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_and_denied_through_two_proxies() {
    let m = mesh().await;
    let out = m.outbound;
    let r = tokio::task::spawn_blocking(move || {
        get(
            out,
            "/orders/../orders//7?x=1",
            "x-meshward-peer-identity: spiffe://evil/ns/x/sa/y\r\n",
        )
    })
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains(r#""target":"/orders/7?x=1""#),
        "the app gets the normalized path: {r}"
    );
    assert!(
        r.contains(r#""identity":"spiffe://shop.example/ns/web/sa/frontend""#),
        "a forged identity header is replaced: {r}"
    );

    let r = tokio::task::spawn_blocking(move || get(out, "/admin/users", ""))
        .await
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains(r#""reason":"no_allow_at_tier""#), "{r}");
    let r = tokio::task::spawn_blocking(move || raw(out, "POST /orders/1 HTTP/1.1\r\nHost: orders\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).await.unwrap();
    assert!(
        r.starts_with("HTTP/1.1 403"),
        "methods are part of the rule: {r}"
    );

    // Request-smuggling material never reaches policy or the app: the connection closes.
    for bad in [
        "GET /orders/1 HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        "GET /orders/1 HTTP/1.1\nHost: o\r\nConnection: close\r\n\r\n",
        "GET /orders/1 HTTP/1.1\r\nHost: o\r\nX-A: 1\r\n folded\r\nConnection: close\r\n\r\n",
        "GET /orders/1 HTTP/1.1\r\nHost: o\r\nBad Name: 1\r\nConnection: close\r\n\r\n",
        "GET /orders/1 HTTP/1.1\r\nHost: o\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab",
    ] {
        let r = tokio::task::spawn_blocking(move || raw(out, bad))
            .await
            .unwrap();
        assert!(
            !r.contains("200 OK") && !r.contains("target"),
            "{bad:?} got {r}"
        );
    }
    // A clean keep-alive sequence with a chunked body still works.
    let r = tokio::task::spawn_blocking(move || {
        raw(out, "GET /orders/1 HTTP/1.1\r\nHost: o\r\n\r\nGET /orders/2 HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /orders/3 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    })
    .await
    .unwrap();
    assert_eq!(r.matches("HTTP/1.1 200").count(), 3, "{r}");

    // Ambiguous paths get 400.
    let r = tokio::task::spawn_blocking(move || get(out, "/orders/a%2Fb", ""))
        .await
        .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("path_encoded_slash"),
        "{r}"
    );

    // Every decision is in the log, in the documented schema.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(m.dir.path().join("decisions.jsonl")).unwrap();
    let recs: Vec<meshward_policy::decision_log::DecisionRecord> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        recs.iter()
            .any(|r| r.verdict == meshward_policy::Verdict::Allow
                && r.path.as_deref() == Some("/orders/7"))
    );
    assert!(
        recs.iter()
            .any(|r| r.verdict == meshward_policy::Verdict::Deny
                && r.path.as_deref() == Some("/admin/users")
                && r.source.as_deref() == Some("spiffe://shop.example/ns/web/sa/frontend"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_certificateless_clients_are_refused() {
    let m = mesh().await;
    let inb = m.inbound;
    let r = tokio::task::spawn_blocking(move || get(inb, "/orders/1", ""))
        .await
        .unwrap();
    assert!(
        !r.contains("HTTP/1.1 200") && !r.contains("target"),
        "plaintext must not reach the app: {r}"
    );
    let o = tokio::task::spawn_blocking(move || {
        let mut c = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &inb.to_string(),
                "-tls1_3",
                "-quiet",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(b"GET /orders/1 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
            .unwrap();
        c.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        !text.contains("200") && !text.contains("target"),
        "no client certificate, no response: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_policy_denies_and_an_expired_certificate_fails_closed() {
    let m = mesh().await;
    let out = m.outbound;
    // Without any configuration, the inbound proxy denies everything.
    m.orders.policy.store(None);
    let r = tokio::task::spawn_blocking(move || get(out, "/orders/1", ""))
        .await
        .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains(r#""reason":"no_policy""#),
        "{r}"
    );
    // An expired SVID: no new connection is accepted (never plaintext).
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let mut expired = svid(
        &ca,
        "spiffe://shop.example/ns/orders/sa/orders-api",
        Duration::from_secs(3600),
    );
    expired.not_after = SystemTime::now() - Duration::from_secs(1);
    m.orders.svid.store(Some(Arc::new(expired)));
    let r = tokio::task::spawn_blocking(move || get(out, "/orders/1", ""))
        .await
        .unwrap();
    assert!(!r.contains("HTTP/1.1"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_is_not_the_service_is_refused() {
    // The address declared for orders answers with a valid SVID of another identity.
    let m = mesh_as("spiffe://shop.example/ns/evil/sa/impostor", None).await;
    let out = m.outbound;
    let r = tokio::task::spawn_blocking(move || get(out, "/orders/1", ""))
        .await
        .unwrap();
    assert!(
        !r.contains("HTTP/1.1"),
        "an impersonating endpoint must never be talked to: {r}"
    );
    assert_impostor_refused(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let other = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let m = mesh_as(
        "spiffe://shop.example/ns/orders/sa/orders-api",
        Some(&other),
    )
    .await;
    let out = m.outbound;
    let r = tokio::task::spawn_blocking(move || get(out, "/orders/1", ""))
        .await
        .unwrap();
    assert!(!r.contains("HTTP/1.1"), "{r}");
    // The orders proxy refused it by kind, not `other`, and recorded why.
    let rec = record(&m, "decisions.jsonl", |v| v["reason"] == "handshake_failed").await;
    let detail = rec["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("certificate from an unknown CA"),
        "{rec}"
    );
    let metrics = m.orders.log.metrics.encode();
    assert!(
        metrics.contains(
            r#"meshward_tls_handshake_failures_total{direction="inbound",reason="unknown_ca"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_continuous_load_fails_no_request() {
    let m = mesh().await;
    let out = m.outbound;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Load: sequential requests, each on a fresh connection (so each is a new handshake).
    let load = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (mut ok, mut failed) = (0, vec![]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = get(out, "/orders/1", "");
                if r.starts_with("HTTP/1.1 200") {
                    ok += 1;
                } else {
                    failed.push(r);
                }
            }
            (ok, failed)
        })
    };
    // Rotate both sides' certificates ten times while the load runs.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        m.orders.svid.store(Some(Arc::new(svid(
            &m.ca,
            "spiffe://shop.example/ns/orders/sa/orders-api",
            Duration::from_secs(3600),
        ))));
        m.frontend.svid.store(Some(Arc::new(svid(
            &m.ca,
            "spiffe://shop.example/ns/web/sa/frontend",
            Duration::from_secs(3600),
        ))));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 20, "too little load to prove anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during rotation: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
}

/// A pooled outbound listener of the frontend for `orders/orders:80`.
async fn pooled(m: &Mesh, protocol: meshward_proxy::pool::UpstreamProtocol) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(meshward_proxy::pool::serve(
        m.frontend.clone(),
        Upstream {
            service: WorkloadRef::parse("orders/orders").unwrap(),
            port: 80,
        },
        l,
        protocol,
    ));
    addr
}

/// Pooled HTTP between the proxies, both protocols: the same answers as the tunnel (the
/// normalized path, the verified identity, 403 with the reason), the app's `Host` reaches
/// the inbound side's policy, a misrouted endpoint is refused, and many app connections
/// share the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_http1_and_http2_between_proxies() {
    use meshward_proxy::pool::UpstreamProtocol;
    let m = mesh().await;
    for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
        let addr = pooled(&m, protocol).await;
        let rs = tokio::task::spawn_blocking(move || {
            (0..20)
                .map(|i| get(addr, &format!("/orders/../orders/{i}"), ""))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for (i, r) in rs.iter().enumerate() {
            assert!(r.starts_with("HTTP/1.1 200"), "{protocol:?}: {r}");
            assert!(
                r.contains(&format!(r#""target":"/orders/{i}""#)),
                "{protocol:?}: {r}"
            );
            assert!(
                r.contains(r#""identity":"spiffe://shop.example/ns/web/sa/frontend""#),
                "{protocol:?}: {r}"
            );
        }
        let r = tokio::task::spawn_blocking(move || get(addr, "/secret", ""))
            .await
            .unwrap();
        assert!(r.starts_with("HTTP/1.1 403"), "{protocol:?}: {r}");
        assert!(r.contains("no_allow_at_tier"), "{protocol:?}: {r}");
    }
    // The inbound side saw the app's Host (`orders`), not the endpoint's address: as
    // `Host` over HTTP/1.1, as `:authority` (and no `Host` beside it) over HTTP/2.
    let log = std::fs::read_to_string(m.dir.path().join("decisions.jsonl")).unwrap();
    let hosts: std::collections::BTreeSet<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["host"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(hosts, ["orders".to_owned()].into(), "{log}");
}

/// Pooled HTTP/1.1's fast path and the general path on one app connection: pipelined
/// requests are answered in order; a request with a body moves the connection to the
/// general path mid-stream, which then serves the rest; and the next app connection
/// finds the upstream connections the first one left (no new handshake at the inbound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_http1_fast_path_hands_off_mid_connection_and_keeps_order() {
    use meshward_proxy::pool::UpstreamProtocol;
    let m = mesh().await;
    let addr = pooled(&m, UpstreamProtocol::Http1).await;
    let r = tokio::task::spawn_blocking(move || {
        raw(
            addr,
            "GET /orders/1 HTTP/1.1\r\nHost: orders\r\n\r\n\
             GET /orders/2 HTTP/1.1\r\nHost: orders\r\n\r\n\
             POST /orders/4 HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\n\r\nhello\
             GET /orders/3 HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(r.matches("HTTP/1.1 ").count(), 4, "{r}");
    let at = |needle: &str| r.find(needle).unwrap_or_else(|| panic!("{needle}: {r}"));
    let (one, two, post, three) = (
        at(r#""target":"/orders/1""#),
        at(r#""target":"/orders/2""#),
        at("HTTP/1.1 403"),
        at(r#""target":"/orders/3""#),
    );
    assert!(one < two && two < post && post < three, "out of order: {r}");
    // The next app connection reuses an upstream connection the first one left: the
    // inbound side holds no more connections than before.
    let open = || -> usize {
        m.orders
            .listeners
            .all()
            .iter()
            .filter(|l| l.is_inbound())
            .map(|l| l.counts().0)
            .sum()
    };
    // (The general path's connection closes after the app's `Connection: close`, at its
    // own pace: wait until the count holds still.)
    let mut before = open();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open();
        if now == before {
            break;
        }
        before = now;
    }
    assert!(before >= 1, "the upstream connections were not kept");
    let r = tokio::task::spawn_blocking(move || get(addr, "/orders/5", ""))
        .await
        .unwrap();
    assert!(r.contains(r#""target":"/orders/5""#), "{r}");
    assert_eq!(before, open(), "a new upstream connection was opened");
}

/// A pooled upstream refuses an endpoint whose certificate is not the service's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_refuses_an_impostor() {
    use meshward_proxy::pool::UpstreamProtocol;
    let m = mesh_as("spiffe://shop.example/ns/evil/sa/impostor", None).await;
    let addr = pooled(&m, UpstreamProtocol::Http1).await;
    let r = tokio::task::spawn_blocking(move || get(addr, "/orders/1", ""))
        .await
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(
        !r.contains("target"),
        "the impostor's app must not be reached: {r}"
    );
    assert_impostor_refused(&m).await;
}

/// Every outbound path counts on the endpoint's long-lived state — tunnel connections and
/// pooled requests as requests, a refused impostor as a failure — and a new revision that
/// keeps the endpoint keeps the counts (one that drops it drops them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_state_counts_and_survives_a_revision() {
    use meshward_proxy::endpoint_state::EndpointKey;
    use meshward_proxy::pool::{self, UpstreamProtocol};
    let m = mesh().await;
    let key = EndpointKey {
        service: WorkloadRef::parse("orders/orders").unwrap(),
        addr: m.inbound,
    };
    let out = m.outbound;
    let rs = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| get(out, "/orders/1", ""))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(rs.iter().all(|r| r.starts_with("HTTP/1.1 200")), "{rs:?}");
    let state = m.frontend.endpoints.get(&key).unwrap();
    assert_eq!((state.requests(), state.failures()), (3, 0));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pooled = l.local_addr().unwrap();
    tokio::spawn(pool::serve(
        m.frontend.clone(),
        Upstream {
            service: key.service.clone(),
            port: 80,
        },
        l,
        UpstreamProtocol::Http1,
    ));
    let rs = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| get(pooled, "/orders/1", ""))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(rs.iter().all(|r| r.starts_with("HTTP/1.1 200")), "{rs:?}");
    assert_eq!((state.requests(), state.failures()), (8, 0));
    // Revision 2, same endpoints: the same state, still counting.
    let set = m.frontend.policy.load_full().unwrap().set.clone();
    m.frontend.set_policy(2, set.clone());
    let again = m.frontend.endpoints.get(&key).unwrap();
    assert!(Arc::ptr_eq(&state, &again));
    tokio::task::spawn_blocking(move || get(out, "/orders/1", ""))
        .await
        .unwrap();
    assert_eq!(again.requests(), 9);
    // Revision 3 without the service's workloads: the endpoint and its state are gone.
    let mut empty = set;
    empty.services.iter_mut().for_each(|s| s.workloads.clear());
    m.frontend.set_policy(3, empty);
    assert!(m.frontend.endpoints.get(&key).is_none());
    let r = tokio::task::spawn_blocking(move || get(pooled, "/orders/1", ""))
        .await
        .unwrap();
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");

    // A refused handshake is a failure of that endpoint.
    let m = mesh_as("spiffe://shop.example/ns/evil/sa/impostor", None).await;
    let out = m.outbound;
    tokio::task::spawn_blocking(move || raw(out, "GET / HTTP/1.1\r\nHost: orders\r\n\r\n"))
        .await
        .unwrap();
    let key = EndpointKey {
        addr: m.inbound,
        ..key
    };
    let state = m.frontend.endpoints.get(&key).unwrap();
    assert_eq!((state.requests(), state.failures()), (1, 1));
}
