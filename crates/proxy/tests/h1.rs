#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The inbound HTTP/1.1 fast path against an app that answers in every framing HTTP/1
//! has — length, chunked with trailers, until close, interim 1xx, HEAD — through two real
//! proxies with mTLS: keep-alive on both sides, one app connection per peer connection, a
//! stale app connection replaced, denials and bad paths answered without closing, and the
//! hand-over to the general path for a request with a body.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use support::td;
use tokio::io::AsyncWriteExt;

/// An app written against the socket, so each framing is exactly what the test says.
/// Counts the connections it accepts.
async fn app(accepted: Arc<AtomicUsize>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some((head, body)) = support::read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    let (method, path) = {
                        let mut w = head.split(' ');
                        (w.next().unwrap().to_owned(), w.next().unwrap().to_owned())
                    };
                    let resp: Vec<u8> = match path.split('?').next().unwrap() {
                        "/a/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
                        "/a/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t1\r\n\r\n".to_vec(),
                        "/a/hints" => b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhinted".to_vec(),
                        "/a/big" => {
                            let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n".to_vec();
                            r.extend(std::iter::repeat_n(b'x', 300_000));
                            r
                        }
                        "/a/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        "/a/echo" => {
                            let text = format!("{head}{body}");
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).into_bytes()
                        }
                        "/a/close" | "/a/drop" => Vec::new(),
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                    };
                    let resp = if method == "HEAD" {
                        // The head only (Content-Length says what GET would carry).
                        let e = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        resp[..e].to_vec()
                    } else {
                        resp
                    };
                    match path.as_str() {
                        // No length: the body runs until the app closes.
                        "/a/close" => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil-close").await;
                            return;
                        }
                        // A kept-alive connection the app then closes (idle timeout).
                        "/a/drop" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndropped")
                                .await;
                            return;
                        }
                        _ => {
                            if s.write_all(&resp).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

struct Pair {
    outbound: SocketAddr,
    accepted: Arc<AtomicUsize>,
    dir: tempfile::TempDir,
}

/// Frontend sidecar (tunnel out) → orders sidecar (fast path in) → the app above. GET,
/// HEAD and POST on `/a/*` are allowed; everything else is denied.
async fn pair(app_addr: Option<SocketAddr>) -> Pair {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let app_addr = match app_addr {
        Some(a) => a,
        None => app(accepted.clone()).await,
    };
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (inbound, outbound) = (inb.local_addr().unwrap(), out.local_addr().unwrap());
    let app_port = app_addr.port();
    let set = support::orders_policy(
        app_port,
        inbound,
        r#"[{methods: [GET, HEAD, POST], paths: ["/a/*"]}]"#,
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
        InboundPort::explicit(app_port, Protocol::Http),
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
    Pair {
        outbound,
        accepted,
        dir,
    }
}

/// A port nothing listens on (bound, then released).
fn gone() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends `requests` on one connection and reads until the proxy closes it.
async fn exchange(addr: SocketAddr, requests: &str) -> String {
    let requests = requests.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(requests.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}

const ID: &str = "spiffe://shop.example/ns/web/sa/frontend";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_share_one_app_connection_with_the_identity_set() {
    let p = pair(None).await;
    let r = exchange(
        p.outbound,
        "GET /a/x/../echo?q=1 HTTP/1.1\r\nHost: orders\r\nX-Meshward-Peer-Identity: spiffe://evil/ns/x/sa/y\r\nx-meshward-peer-identity: spiffe://evil/ns/x/sa/z\r\n\r\n\
         GET /a//echo HTTP/1.1\r\nHost: orders\r\n\r\n\
         GET /a/echo HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 3, "{r}");
    assert!(
        r.contains("GET /a/echo?q=1 HTTP/1.1\r\n"),
        "normalized target: {r}"
    );
    assert!(r.contains("GET /a/echo HTTP/1.1\r\n"), "{r}");
    assert_eq!(
        r.matches(&format!("x-meshward-peer-identity: {ID}\r\n"))
            .count(),
        3,
        "{r}"
    );
    assert!(
        !r.contains("evil"),
        "forged identity copies are dropped: {r}"
    );
    assert_eq!(p.accepted.load(Ordering::SeqCst), 1, "one app connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_is_relayed_whole() {
    let p = pair(None).await;
    let r = exchange(
        p.outbound,
        "GET /a/chunked HTTP/1.1\r\nHost: o\r\n\r\n\
         HEAD /a/len HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/hints HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/empty HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/big HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/len HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/close HTTP/1.1\r\nHost: o\r\n\r\n",
    )
    .await;
    // Each response in order, exactly as the app framed it.
    let mut want = String::new();
    want += "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t1\r\n\r\n";
    want += "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
    want += "HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhinted";
    want += "HTTP/1.1 204 No Content\r\n\r\n";
    want += "HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n";
    want += &"x".repeat(300_000);
    want += "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    want += "HTTP/1.1 200 OK\r\n\r\nuntil-close";
    assert!(
        r == want,
        "got {} bytes: {}",
        r.len(),
        &r[..r.len().min(600)]
    );
    // The body that ran until the app closed ended the peer's connection too (read_to_end
    // returned); everything before it used one app connection.
    assert_eq!(p.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_connection_closed_while_idle_is_replaced() {
    let p = pair(None).await;
    let r = exchange(
        p.outbound,
        "GET /a/drop HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/len HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        r,
        "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndroppedHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    );
    assert_eq!(p.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_and_bad_paths_keep_the_connection() {
    let p = pair(None).await;
    let r = exchange(
        p.outbound,
        "GET /admin HTTP/1.1\r\nHost: o\r\n\r\n\
         DELETE /a/len HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/x%2Fy HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/len HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
    )
    .await;
    let denied = r.matches("HTTP/1.1 403 Forbidden\r\n").count();
    assert_eq!(denied, 2, "{r}");
    assert!(r.contains(r#""reason":"no_allow_at_tier""#), "{r}");
    assert!(r.contains("HTTP/1.1 400 Bad Request\r\n"), "{r}");
    assert!(r.contains("path_encoded_slash"), "{r}");
    assert!(
        r.ends_with("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        "{r}"
    );
    // Denied requests never reached the app; the allowed one opened its only connection.
    assert_eq!(p.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_moves_the_connection_to_the_general_path() {
    let p = pair(None).await;
    let r = exchange(
        p.outbound,
        "GET /a/len HTTP/1.1\r\nHost: o\r\n\r\n\
         POST /a/echo HTTP/1.1\r\nHost: o\r\nContent-Length: 3\r\nx-meshward-peer-identity: forged\r\n\r\nabc\
         GET /a/echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        "{r}"
    );
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 3, "{r}");
    assert!(r.contains("POST /a/echo HTTP/1.1\r\n"), "{r}");
    assert!(r.contains("\r\n\r\nabc"), "the body reaches the app: {r}");
    assert_eq!(
        r.matches(&format!("x-meshward-peer-identity: {ID}\r\n"))
            .count(),
        2,
        "{r}"
    );
    assert!(!r.contains("forged"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_is_not_listening_gets_502() {
    let p = pair(Some(gone())).await;
    let r = exchange(
        p.outbound,
        "GET /a/len HTTP/1.1\r\nHost: o\r\n\r\nGET /a/len HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.matches("HTTP/1.1 502 Bad Gateway\r\n").count(), 2, "{r}");
    assert!(r.contains("the app did not answer"), "{r}");
}

/// The orders sidecar's records once there are `n` of them (written by a background
/// thread), as JSON values.
async fn records(p: &Pair, n: usize) -> Vec<serde_json::Value> {
    let path = p.dir.path().join("decisions.jsonl");
    for _ in 0..200 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if recs.len() >= n {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {n} records in {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_each_requests_status_and_bytes() {
    let p = pair(None).await;
    let chunked_body = "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t1\r\n\r\n";
    let r = exchange(
        p.outbound,
        "GET /a/len HTTP/1.1\r\nHost: o\r\n\r\n\
         HEAD /a/len?head HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/big HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/empty HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/chunked HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/missing HTTP/1.1\r\nHost: o\r\n\r\n\
         DELETE /a/len HTTP/1.1\r\nHost: o\r\n\r\n\
         GET /a/x%2Fy HTTP/1.1\r\nHost: o\r\n\r\n\
         POST /a/echo HTTP/1.1\r\nHost: o\r\nContent-Length: 3\r\n\r\nabc\
         GET /a/echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 6, "{r}");
    let recs = records(&p, 10).await;
    let of = |method: &str, path: &str| {
        recs.iter()
            .find(|r| r["method"] == method && r["path"] == path)
            .unwrap_or_else(|| panic!("no record of {method} {path}: {recs:?}"))
            .clone()
    };
    let got = |method: &str, path: &str| {
        let r = of(method, path);
        (r["status"].as_u64(), r["response_bytes"].as_u64())
    };
    // The fast path: the app's status and the body bytes it relayed, whatever the framing.
    assert_eq!(got("GET", "/a/len"), (Some(200), Some(5)));
    assert_eq!(
        got("HEAD", "/a/len"),
        (Some(200), Some(0)),
        "HEAD has no body"
    );
    assert_eq!(got("GET", "/a/big"), (Some(200), Some(300_000)));
    assert_eq!(got("GET", "/a/empty"), (Some(204), Some(0)));
    assert_eq!(
        got("GET", "/a/chunked"),
        (Some(200), Some(chunked_body.len() as u64)),
        "a chunked body counts as sent, framing included"
    );
    assert_eq!(got("GET", "/a/missing"), (Some(404), Some(0)));
    // Refusals: the gate's own answer, nothing relayed.
    assert_eq!(got("DELETE", "/a/len"), (Some(403), None));
    assert_eq!(of("DELETE", "/a/len")["verdict"], "deny");
    assert_eq!(got("GET", "/a/x%2Fy"), (Some(400), None));
    // The general path (a request with a body moved the connection there): the record is
    // written once the body has been relayed, with its size.
    let echo: Vec<&serde_json::Value> = recs.iter().filter(|r| r["path"] == "/a/echo").collect();
    assert_eq!(echo.len(), 2, "{echo:?}");
    for e in echo {
        assert_eq!(e["status"], 200, "{e}");
        let bytes = e["response_bytes"].as_u64().unwrap();
        assert!(bytes > 40, "the echoed head and body: {e}");
        assert!(e["duration_ns"].as_u64().is_some(), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_records_502_when_the_app_is_gone() {
    let p = pair(Some(gone())).await;
    let r = exchange(
        p.outbound,
        "GET /a/len HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    let recs = records(&p, 1).await;
    assert_eq!(recs[0]["verdict"], "allow", "{:?}", recs[0]);
    assert_eq!(recs[0]["status"], 502, "{:?}", recs[0]);
    assert!(recs[0].get("response_bytes").is_none(), "{:?}", recs[0]);
}
