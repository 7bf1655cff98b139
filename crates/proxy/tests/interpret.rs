#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Issue #11 §2 — what policy evaluated is exactly what the app receives; anything
//! ambiguous is refused. Every case goes through each inbound path of real proxies with
//! mTLS (frontend tunnel → orders sidecar → an app that echoes what it got): the HTTP/1.1
//! fast path (bodiless), the general path (the same request with a body, which hands the
//! connection to hyper) and HTTP/2 (a port declared `HTTP2`, its app spoken to in HTTP/2).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use support::td;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An app (HTTP/1.1 and HTTP/2) answering every request with what it received: the method,
/// the target and every header, one per line. `/ws/*` with `Upgrade` gets a 101 and an
/// echo of the bytes that follow.
async fn echo_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|mut req: hyper::Request<Incoming>| async move {
                        let mut text = format!("{} {}\n", req.method(), req.uri());
                        for (k, v) in req.headers() {
                            text += &format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()));
                        }
                        if req.uri().path().starts_with("/ws/")
                            && req.headers().contains_key("upgrade")
                        {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(up.await.unwrap());
                                let mut b = [0u8; 64];
                                let n = io.read(&mut b).await.unwrap();
                                io.write_all(&b[..n]).await.unwrap();
                            });
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut()
                                .insert("upgrade", "websocket".parse().unwrap());
                            r.headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        let _ = req.into_body().collect().await;
                        Ok(hyper::Response::new(Full::new(Bytes::from(text))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

const ID: &str = "spiffe://shop.example/ns/web/sa/frontend";

struct Mesh {
    /// Tunnels to the orders sidecar: its HTTP port, its HTTP2 port.
    h1: SocketAddr,
    h2: SocketAddr,
    dir: tempfile::TempDir,
}

/// The orders workload with an `HTTP` and an `HTTP2` port behind a `pathCaseInsensitive`
/// service. Allowed: GET/HEAD/POST on `/a/*` and `/ws/*`, anything on `/` (no methods
/// named); denied: `/a/admin` and `x-role: admin`.
async fn mesh() -> Mesh {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let (app1, app2) = (echo_app().await, echo_app().await);
    let inb1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inb2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (i1, i2) = (inb1.local_addr().unwrap(), inb2.local_addr().unwrap());
    let (p1, p2) = (app1.port(), app2.port());
    let set = support::policy_set(&format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec: {{ports: [{{port: {p1}, protocol: HTTP, inbound: "{i1}"}}, {{port: {p2}, protocol: HTTP2, inbound: "{i2}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec:
  selector: {{app: orders-api}}
  ports: [{{port: 80, targetPort: {p1}}}, {{port: 81, targetPort: {p2}}}]
  pathCaseInsensitive: true
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules:
    - name: reads
      from: [{{identities: ["{ID}"]}}]
      to: [{{methods: [GET, HEAD, POST], paths: ["/a/*", "/ws/*"]}}]
    - name: root
      from: [{{identities: ["{ID}"]}}]
      to: [{{paths: ["/"]}}]
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: orders}}
spec:
  tier: service
  action: DENY
  target: {{workloads: [orders-api]}}
  rules:
    - name: admin-path
      to: [{{paths: ["/a/admin"]}}]
    - name: admin-role
      when: [{{header: x-role, values: [admin]}}]
"#
    ));
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
        orders.clone(),
        InboundPort::explicit(p1, Protocol::Http),
        inb1,
    ));
    tokio::spawn(inbound::serve(
        orders,
        InboundPort::explicit(p2, Protocol::Http2),
        inb2,
    ));
    let mut outs = vec![];
    for port in [80, 81] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        outs.push(l.local_addr().unwrap());
        tokio::spawn(outbound::serve(
            frontend.clone(),
            Upstream {
                service: WorkloadRef::parse("orders/orders").unwrap(),
                port,
            },
            l,
        ));
    }
    Mesh {
        h1: outs[0],
        h2: outs[1],
        dir,
    }
}

/// Raw HTTP/1.1 bytes on one connection, read until the proxy closes it.
async fn raw(addr: SocketAddr, bytes: String) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// One request as the three paths send it.
struct Case {
    method: &'static str,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

/// The HTTP/1.1 request: bodiless (fast path) or with a one-byte body (general path).
fn h1_bytes(c: &Case, body: bool) -> String {
    let mut s = format!("{} {} HTTP/1.1\r\n", c.method, c.target);
    for (k, v) in c.headers {
        s += &format!("{k}: {v}\r\n");
    }
    if body {
        s += "Content-Length: 1\r\n";
    }
    s += "Connection: close\r\n\r\n";
    if body {
        s += "x";
    }
    s
}

/// The request over HTTP/2 (prior knowledge through the tunnel): status and body. The
/// target's authority, when it has one, becomes `:authority`; `host` headers go as sent.
async fn h2(addr: SocketAddr, c: &Case) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let uri = if c.target.starts_with("http") {
        c.target.to_owned()
    } else {
        format!("http://orders{}", c.target)
    };
    let mut b = hyper::Request::builder()
        .method(hyper::Method::from_bytes(c.method.as_bytes()).unwrap())
        .uri(uri);
    for (k, v) in c.headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::new())).unwrap();
    match send.send_request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Runs `c` through the fast path, the general path and HTTP/2 (unless `h1_only`, for
/// what HTTP/2 cannot carry) and calls `check(path, status, body)` for each.
async fn each_path(m: &Mesh, c: &Case, h1_only: bool, check: impl Fn(&str, u16, &str)) {
    for (path, body) in [("fast", false), ("general", true)] {
        let r = raw(m.h1, h1_bytes(c, body)).await;
        let status = r.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        check(path, status, body);
    }
    if !h1_only {
        let (status, body) = h2(m.h2, c).await;
        check("h2", status, &body);
    }
}

fn refused(code: &'static str) -> impl Fn(&str, u16, &str) {
    move |path, status, body| {
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(r#""reason":"bad_request""#), "{path}: {body}");
        assert!(
            body.contains(&format!(r#""error":"{code}""#)),
            "{path}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_one_well_formed_and_agree() {
    let m = mesh().await;
    let two: &[(&str, &str)] = &[("Host", "orders"), ("Host", "evil")];
    let c = Case {
        method: "GET",
        target: "/a/echo",
        headers: two,
    };
    each_path(&m, &c, false, refused("ambiguous_host")).await;
    for bad in ["x@orders", "orders:abc", "orders,evil", ""] {
        let hs: &'static [(&'static str, &'static str)] = Box::leak(
            vec![("Host", &*Box::leak(bad.to_owned().into_boxed_str()))].into_boxed_slice(),
        );
        let c = Case {
            method: "GET",
            target: "/a/echo",
            headers: hs,
        };
        // (An empty `host` is dropped by the HTTP/2 client itself.)
        each_path(&m, &c, bad.is_empty(), refused("bad_host")).await;
    }
    // Absolute form (HTTP/1) and `:authority` (HTTP/2) must agree with `Host`.
    let c = Case {
        method: "GET",
        target: "http://evil/a/echo",
        headers: &[("Host", "orders")],
    };
    each_path(&m, &c, false, refused("host_mismatch")).await;
    // Agreeing, the app gets origin form and the one host.
    let c = Case {
        method: "GET",
        target: "http://orders/a/echo",
        headers: &[("Host", "orders")],
    };
    each_path(&m, &c, false, |path, status, body| {
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("/a/echo"), "{path}: {body}");
        assert!(!body.contains("evil"), "{path}: {body}");
        assert_eq!(body.matches("host: orders").count(), 1, "{path}: {body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_refuse_parameters_lower_case_and_match_stars_literally() {
    let m = mesh().await;
    let h: &[(&str, &str)] = &[("Host", "orders")];
    for target in ["/a/echo;jsessionid=1", "/a/admin;x", "/a/echo%3Bx"] {
        let c = Case {
            method: "GET",
            target,
            headers: h,
        };
        each_path(&m, &c, false, refused("path_parameter")).await;
    }
    // pathCaseInsensitive: a case variant of the denied path is denied; the app receives
    // the lower-cased path that policy evaluated.
    let c = Case {
        method: "GET",
        target: "/A/Admin",
        headers: h,
    };
    each_path(&m, &c, false, |path, status, body| {
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("denied_by_rule"), "{path}: {body}");
    })
    .await;
    let c = Case {
        method: "GET",
        target: "/A/Echo?Q=1",
        headers: h,
    };
    each_path(&m, &c, false, |path, status, body| {
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("/a/echo?Q=1\n"), "{path}: {body}");
    })
    .await;
    // `*` is a character of the path, never a glob, in either spelling.
    for target in ["/a/*", "/a/%2A"] {
        let c = Case {
            method: "GET",
            target,
            headers: h,
        };
        each_path(&m, &c, false, |path, status, body| {
            assert_eq!(status, 200, "{path}: {body}");
            assert!(body.contains("/a/*\n"), "{path}: {body}");
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_every_value_underscores_and_identity_spellings() {
    let m = mesh().await;
    let c = Case {
        method: "GET",
        target: "/a/echo",
        headers: &[("Host", "orders"), ("x-role", "reader,admin")],
    };
    each_path(&m, &c, false, |path, status, body| {
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("admin-role"), "{path}: {body}");
    })
    .await;
    let c = Case {
        method: "GET",
        target: "/a/echo",
        headers: &[("Host", "orders"), ("x_role", "admin")],
    };
    each_path(&m, &c, false, refused("header_underscore")).await;
    let c = Case {
        method: "GET",
        target: "/a/echo",
        headers: &[
            ("Host", "orders"),
            ("X-Meshward-Peer-Identity", "spiffe://evil/a"),
            ("x_meshward_peer_identity", "spiffe://evil/b"),
            ("X-MESHWARD_PEER-IDENTITY", "spiffe://evil/c"),
            ("x-forwarded-client-cert", "By=spiffe://evil/d"),
        ],
    };
    each_path(&m, &c, false, |path, status, body| {
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.contains("evil"), "{path}: {body}");
        assert!(!body.contains("x-forwarded-client-cert"), "{path}: {body}");
        assert_eq!(
            body.matches(&format!("x-meshward-peer-identity: {ID}\n"))
                .count(),
            1,
            "{path}: {body}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_case_sensitive() {
    let m = mesh().await;
    let c = Case {
        method: "get",
        target: "/a/echo",
        headers: &[("Host", "orders")],
    };
    each_path(&m, &c, false, refused("lowercase_method")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_upgrades_only_by_name() {
    let m = mesh().await;
    // `CONNECT` is evaluated as path `/` with its target as host: the `root` rule allows
    // every method there, but names none, so CONNECT is refused.
    let r = raw(
        m.h1,
        "CONNECT orders:80 HTTP/1.1\r\nHost: orders:80\r\n\r\n".into(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("upgrade_refused"), "{r}");
    for (k, v, code) in [
        ("Upgrade", "h2c", "h2c_upgrade"),
        ("HTTP2-Settings", "AAMAAABkAAQAAP__", "h2c_upgrade"),
        ("Upgrade", "tls/1.2", "unsupported_upgrade"),
    ] {
        let hs: &'static [(&'static str, &'static str)] = Box::leak(
            vec![("Host", "orders"), ("Connection", "upgrade"), (k, v)].into_boxed_slice(),
        );
        let c = Case {
            method: "GET",
            target: "/a/echo",
            headers: hs,
        };
        each_path(&m, &c, true, refused(code)).await;
    }
    // A WebSocket upgrade where no rule allows the path: 403, the app never switches.
    let ws = "Host: orders\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let r = raw(m.h1, format!("GET /elsewhere HTTP/1.1\r\n{ws}")).await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // Where a rule allows it: the 101 is relayed and the connection spliced to the app.
    let mut s = tokio::net::TcpStream::connect(m.h1).await.unwrap();
    s.write_all(format!("GET /ws/chat HTTP/1.1\r\n{ws}").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 1024];
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_is_400_and_refusals_are_recorded() {
    let m = mesh().await;
    let r = raw(
        m.h1,
        "POST /a/echo HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".into(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains(r#""error":"bad_chunk""#), "{r}");
    // The log is written by its own task: wait for the record (a line may be half written).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let rec = loop {
        let log = std::fs::read_to_string(m.dir.path().join("decisions.jsonl")).unwrap_or_default();
        let found = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["reason"] == "bad_request");
        match found {
            Some(r) => break r,
            None if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => panic!("no bad_request record: {log}"),
        }
    };
    assert_eq!(rec["detail"], "bad_chunk", "{rec}");
}
