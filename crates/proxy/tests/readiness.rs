#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! `/ready` tells the truth: the whole proxy (`run::run_with_state`) started in-process from
//! a state directory (SVID, bundle and last-known-good revision; no control plane), its
//! admin endpoint hammered until `/ready` says 200, and a request over mTLS sent at once
//! to the inbound port must be answered — over 20 starts. A new revision that adds an
//! inbound port opens it without a restart, `/ready` covers it, and one that drops a port
//! closes it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshward_identity::SpiffeId;
use meshward_identity::ca::{Ca, CaLifetimes, cert_pem, key_pem, new_workload_key};
use meshward_policy::decision::WorkloadRef;
use meshward_proxy::agent::AgentConfig;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::state::Shared;
use support::td;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS: &str = "spiffe://shop.example/ns/orders/sa/orders-api";
const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";

/// A port nothing listens on, below the kernel's ephemeral range (32768 and up here), so
/// that no outgoing connection of a parallel test takes it as its source port between
/// this check and the proxy's bind (a port from `bind(:0)` is in that range: the cause of
/// a rare "never ready" when the proxy could not bind its admin or inbound port).
fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

/// The orders workload with one port per `(app port, inbound)`, all callable by the web
/// namespace.
fn yaml(ports: &[(u16, SocketAddr)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(p, a)| format!(r#"{{port: {p}, protocol: HTTP, inbound: "{a}"}}"#))
        .collect();
    format!(
        r#"{}---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders}}
spec: {{ports: [{}]}}
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
        support::MESH_AND_FRONTEND,
        ports.join(", ")
    )
}

fn policy(ports: &[(u16, SocketAddr)]) -> meshward_policy::model::PolicySet {
    meshward_policy::load_sources(vec![(Arc::from("p.yaml"), Arc::from(yaml(ports)))])
        .into_valid()
        .unwrap_or_else(|l| panic!("{:#?}", l.diagnostics))
}

/// A state directory the proxy restores from: an SVID for orders-api and the bundle; and
/// revision 1 declaring `ports` if given.
fn state_dir(ca: &Ca, dir: &Path, ports: Option<&[(u16, SocketAddr)]>) {
    let id = SpiffeId::parse(ORDERS).unwrap();
    let (key, csr) = new_workload_key(&id).unwrap();
    let issued = ca
        .issue(&id, &csr, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    let chain: String = issued.chain.iter().map(cert_pem).collect();
    std::fs::write(dir.join("svid.pem"), chain).unwrap();
    std::fs::write(dir.join("svid.key"), key_pem(&key)).unwrap();
    let bundle: String = ca.bundle().iter().map(cert_pem).collect();
    std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
    let Some(ports) = ports else { return };
    let files = vec![("p.yaml".to_owned(), yaml(ports))];
    std::fs::write(
        dir.join("snapshot.json"),
        serde_json::to_string(&(1u64, files)).unwrap(),
    )
    .unwrap();
}

fn options(ca: &Ca, dir: &Path, admin: SocketAddr) -> meshward_proxy::run::Options {
    meshward_proxy::run::Options {
        workload: WorkloadRef::parse("orders/orders-api").unwrap(),
        agent: AgentConfig {
            // Nothing listens there: the proxy runs on its restored state.
            control: "127.0.0.1:1".into(),
            trust_domain: td(),
            control_roots: ca.bundle(),
            identity: SpiffeId::parse(ORDERS).unwrap(),
            join_token: None,
            state_dir: dir.to_path_buf(),
            mark: None,
        },
        upstreams: vec![],
        admin,
        decision_log: None,
        sample_allows: 1,
        ship_queue: 0,
        ship_allows_per_second: 0,
        otlp_endpoint: None,
        telemetry: true,
        upstream_protocol: meshward_proxy::pool::UpstreamProtocol::Tunnel,
        transparent: None,
        limits: meshward_proxy::listener::Limits::defaults(),
        workers: 1,
        app_host: std::net::Ipv4Addr::LOCALHOST.into(),
        app_probe: None,
        drain: None,
    }
}

/// The status code of `GET path` on the admin endpoint, or `None` if it does not answer.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.get(9..12)?.parse().ok()
}

/// Waits for `/ready` to say 200; fails with the proxy's own error if it stopped.
async fn until_ready(admin: SocketAddr, proxy: &mut tokio::task::JoinHandle<Result<(), String>>) {
    let t0 = Instant::now();
    while admin_get(admin, "/ready").await != Some(200) {
        if proxy.is_finished() {
            panic!("the proxy stopped before it was ready: {:?}", proxy.await);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One request over mTLS as the frontend to `inbound`: the status line, or why none came.
async fn request(frontend: &Arc<Shared>, inbound: SocketAddr) -> Result<String, String> {
    let to = WorkloadRef::parse("orders/orders").unwrap();
    let allowed = vec![SpiffeId::parse(ORDERS).unwrap()];
    let mut c = meshward_proxy::outbound::dial(frontend, &to, inbound, allowed, None).await?;
    c.write_all(b"GET / HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// An app answering `200 ok` to each connection's first request.
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

fn frontend(ca: &Ca) -> Arc<Shared> {
    support::sidecar(
        ca,
        ca,
        "web/frontend",
        FRONTEND,
        policy(&[]),
        DecisionLog::disabled(),
    )
}

#[test]
fn a_request_right_after_ready_is_served_over_20_starts() {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    for start in 0..20 {
        // A runtime per start (two workers, like a proxy racing its probes): dropping it
        // stops every task of that proxy and closes its listeners.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let app = app().await;
            let (admin, inbound) = (free_port(), free_port());
            let dir = tempfile::tempdir().unwrap();
            state_dir(&ca, dir.path(), None);
            // The first revision arrives after start, as from the config stream.
            let set = policy(&[(app.port(), inbound)]);
            let opts = options(&ca, dir.path(), admin);
            let mut proxy = tokio::spawn(meshward_proxy::run::run_with_state(
                opts,
                move |shared| {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        shared.set_policy(1, set);
                    });
                },
                |_| {},
            ));
            until_ready(admin, &mut proxy).await;
            let got = request(&frontend(&ca), inbound).await;
            assert_eq!(
                got.as_deref(),
                Ok("HTTP/1.1 200 OK"),
                "start {start}: a request right after /ready said 200"
            );
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_that_adds_a_port_opens_it_and_one_that_drops_it_closes_it() {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let (app1, app2) = (app().await, app().await);
    let (admin, in1, in2) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    state_dir(&ca, dir.path(), Some(&[(app1.port(), in1)]));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut proxy = tokio::spawn(meshward_proxy::run::run_with_state(
        options(&ca, dir.path(), admin),
        move |shared| {
            let _ = tx.send(shared.clone());
        },
        |_| {},
    ));
    let orders = rx.await.unwrap();
    until_ready(admin, &mut proxy).await;
    let fe = frontend(&ca);
    assert_eq!(request(&fe, in1).await.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert!(
        request(&fe, in2).await.is_err(),
        "{in2} is not declared yet"
    );

    // Revision 2 adds a port: `/ready` is 503 until it listens, then it serves.
    orders.set_policy(2, policy(&[(app1.port(), in1), (app2.port(), in2)]));
    let t0 = Instant::now();
    let mut saw_503 = false;
    loop {
        match admin_get(admin, "/ready").await {
            Some(200) => break,
            Some(503) => saw_503 = true,
            other => panic!("/ready: {other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "never ready for revision 2"
        );
    }
    // The reconciler ticks every 50 ms: the swap is seen before the port is open.
    assert!(
        saw_503,
        "/ready said 200 before revision 2's port was bound"
    );
    assert_eq!(orders.listeners.bound(), Some(2));
    assert_eq!(request(&fe, in2).await.as_deref(), Ok("HTTP/1.1 200 OK"));
    assert_eq!(request(&fe, in1).await.as_deref(), Ok("HTTP/1.1 200 OK"));

    // Revision 3 drops the first port: it stops accepting; the second still serves.
    orders.set_policy(3, policy(&[(app2.port(), in2)]));
    let t0 = Instant::now();
    while orders.listeners.bound() != Some(3) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "revision 3 never bound"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(admin_get(admin, "/ready").await, Some(200));
    assert!(
        tokio::net::TcpStream::connect(in1).await.is_err(),
        "{in1} still listening after revision 3 dropped it"
    );
    assert_eq!(request(&fe, in2).await.as_deref(), Ok("HTTP/1.1 200 OK"));
    let names: Vec<String> = orders
        .listeners
        .all()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    assert_eq!(names, vec![format!("inbound {in2}")]);
}

/// `--workers 2`: the proxy on the runtime `run::runtime(2)` builds (two worker threads)
/// serves every request of 16 concurrent mTLS connections; `--workers 1` is a
/// current-thread runtime; 0 and 65 are refused by validation.
#[test]
fn two_workers_serve_concurrent_requests() {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let one = meshward_proxy::run::runtime(1).unwrap();
    assert_eq!(
        one.handle().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::CurrentThread
    );
    let rt = meshward_proxy::run::runtime(2).unwrap();
    assert_eq!(
        rt.handle().runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread
    );
    assert_eq!(rt.metrics().num_workers(), 2);
    rt.block_on(async {
        let app = app().await;
        let (admin, inbound) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        state_dir(&ca, dir.path(), Some(&[(app.port(), inbound)]));
        let mut opts = options(&ca, dir.path(), admin);
        for bad in [0, 65] {
            opts.workers = bad;
            let errors = opts.validate();
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&format!("--workers {bad}:"))),
                "{errors:?}"
            );
        }
        opts.workers = 2;
        assert_eq!(opts.validate(), Vec::<String>::new());
        let mut proxy = tokio::spawn(meshward_proxy::run::run(opts, |_| {}));
        until_ready(admin, &mut proxy).await;
        let fe = frontend(&ca);
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let fe = fe.clone();
                tokio::spawn(async move {
                    let mut got = vec![];
                    for _ in 0..4 {
                        got.push(request(&fe, inbound).await);
                    }
                    got
                })
            })
            .collect();
        for c in calls {
            for got in c.await.unwrap() {
                assert_eq!(got.as_deref(), Ok("HTTP/1.1 200 OK"));
            }
        }
    });
}
