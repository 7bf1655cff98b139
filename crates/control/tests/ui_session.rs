#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Dashboard sign-in over a real socket: the cookie carries a random session id, never the
//! operator's token; the session is revoked on sign-out and ends with its operator.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY, sha256_hex};
use meshward_control::service::{Config, ControlPlane};
use meshward_control::store::SqliteStore;
use meshward_identity::TrustDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "mwt_alice_secret_token_0123456789";

fn plane(dir: &Path) -> ControlPlane {
    let td = TrustDomain::parse("shop.example").unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("meshward.db")).unwrap());
    let ca = ControlPlane::open_ca(dir, &td, SystemTime::now()).unwrap();
    let cfg = Config {
        data_dir: dir.to_owned(),
        trust_domain: td,
        default_lifetime: Duration::from_secs(3600),
        max_token_ttl: Duration::from_secs(86400),
    };
    let alice = Operator {
        name: "alice".into(),
        roles: vec![PLATFORM_SECURITY.into()],
        namespaces: vec![],
        token_sha256: vec![sha256_hex(TOKEN)],
    };
    ControlPlane::new(
        store,
        ca,
        Operators {
            operators: vec![alice],
        },
        cfg,
    )
}

/// One HTTP/1.1 request on its own connection; the whole response as text.
async fn http(addr: std::net::SocketAddr, req: String) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = vec![];
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(path: &str, cookie: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\nconnection: close\r\n\r\n")
}

fn post(path: &str, cookie: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_holds_a_revocable_session_not_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Arc::new(plane(dir.path()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(l, meshward_control::ui::router(cp))
            .await
            .unwrap();
    });

    let r = http(addr, post("/ui/login", "", "token=wrong")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(!r.to_ascii_lowercase().contains("set-cookie"), "{r}");

    let r = http(addr, post("/ui/login", "", &format!("token={TOKEN}"))).await;
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let set = r
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap();
    assert!(!set.contains(TOKEN), "the cookie carries the token: {set}");
    assert!(
        set.contains("HttpOnly")
            && set.contains("SameSite=Strict")
            && set.contains("Max-Age=43200"),
        "{set}"
    );
    let cookie = set
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("meshward_session=mws_"), "{cookie}");

    // The session reads; the token itself as a cookie does not.
    let r = http(addr, get("/ui/api/status", &cookie)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = http(
        addr,
        get("/ui/api/status", &format!("meshward_session={TOKEN}")),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = http(addr, get("/ui/api/status", "meshward_session=mws_guess")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");

    // Sign-out revokes it on the server, not only in the browser.
    let r = http(addr, post("/ui/logout", &cookie, "")).await;
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let r = http(addr, get("/ui/api/status", &cookie)).await;
    assert!(
        r.starts_with("HTTP/1.1 401"),
        "a revoked session still reads: {r}"
    );
}
