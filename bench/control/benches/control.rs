//! Control-plane benchmarks, each a whole scenario in one process:
//!
//! 1. Certificate signing throughput: the CA alone (parse and verify the CSR, build and sign
//!    the certificate) with 1 and 2 threads, and the full renewal path of the control plane
//!    (which also appends an audit entry to SQLite with a durable commit per certificate).
//! 2. Config fan-out: N proxies (default 1,000) hold `Config.Stream` over mutual TLS; one
//!    apply commits a change; the time until each proxy has the new revision.
//!
//! Run: `bash bench/control/run.sh` (raises the open-file limit first).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshward_api::v1::ConfigAck;
use meshward_api::v1::config_client::ConfigClient;
use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY};
use meshward_control::client::control_identity;
use meshward_control::grpc;
use meshward_control::server::control_tls;
use meshward_control::service::{Applied, Config, ControlPlane};
use meshward_control::store::{Files, SqliteStore};
use meshward_identity::ca::{Ca, CaLifetimes, new_workload_key};
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::{Accept, SharedBundles, SvidServerVerifier};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_stream::StreamExt as _;

fn td() -> TrustDomain {
    TrustDomain::parse("shop.example").unwrap_or_else(|e| panic!("{e}"))
}

fn examples() -> Files {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
    let mut files: Files = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap_or_default()))
        .collect();
    files.sort();
    files
}

fn signing() {
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<SpiffeId> = (0..64).map(|i| SpiffeId::parse(&format!("spiffe://shop.example/ns/bench/sa/w{i}")).unwrap_or_else(|e| panic!("{e}"))).collect();
    let csrs: Vec<(SpiffeId, Vec<u8>)> = ids.iter().map(|id| (id.clone(), new_workload_key(id).unwrap_or_else(|e| panic!("{e}")).1)).collect();
    let run = |threads: usize| {
        let budget = Duration::from_secs(3);
        let start = Instant::now();
        let total: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let (ca, csrs) = (&ca, &csrs);
                    s.spawn(move || {
                        let mut n = 0;
                        while start.elapsed() < budget {
                            let (id, csr) = &csrs[(n + t) % csrs.len()];
                            ca.issue(id, csr, Duration::from_secs(3600), SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        total as f64 / start.elapsed().as_secs_f64()
    };
    let one = run(1);
    let two = run(2);
    // The full path: renewal through the control plane, audited in SQLite (group commit).
    let dir = std::env::temp_dir().join(format!("meshward-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let cp = plane(&dir);
    let full = |threads: usize| {
        let budget = Duration::from_secs(3);
        let start = Instant::now();
        let total: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let (cp, csrs) = (&cp, &csrs);
                    s.spawn(move || {
                        let mut n = 0;
                        while start.elapsed() < budget {
                            let (id, csr) = &csrs[(n + t) % csrs.len()];
                            cp.renew(id, csr, None, SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        total as f64 / start.elapsed().as_secs_f64()
    };
    let full1 = full(1);
    let full32 = full(32);
    println!("| signing path | SVIDs/s |");
    println!("|---|---:|");
    println!("| CA only, 1 thread | {one:.0} |");
    println!("| CA only, 2 threads | {two:.0} |");
    println!("| control plane renewal, audited in SQLite, 1 caller | {full1:.0} |");
    println!("| control plane renewal, audited in SQLite, 32 concurrent callers (group commit) | {full32:.0} |");
    let _ = std::fs::remove_dir_all(&dir);
}

fn plane(dir: &Path) -> ControlPlane {
    let store = Arc::new(SqliteStore::open(&dir.join("meshward.db")).unwrap_or_else(|e| panic!("{e}")));
    let ca = ControlPlane::open_ca(dir, &td(), SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
    let cfg = Config { data_dir: dir.to_owned(), trust_domain: td(), default_lifetime: Duration::from_secs(3600), max_token_ttl: Duration::from_secs(3600) };
    let op = |n: &str, r: &[&str], ns: &[&str]| Operator { name: n.into(), roles: r.iter().map(|s| s.to_string()).collect(), namespaces: ns.iter().map(|s| s.to_string()).collect(), token_sha256: vec![] };
    ControlPlane::new(store, ca, Operators { operators: vec![op("alice", &[PLATFORM_SECURITY], &[]), op("bob", &[PLATFORM_SECURITY], &[]), op("carol", &[], &["payments"])] }, cfg)
}

async fn fanout(n: usize) {
    let dir = std::env::temp_dir().join(format!("meshward-fanout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let now = SystemTime::now();
    let ca = ControlPlane::open_ca(&dir, &td(), now).unwrap_or_else(|e| panic!("{e}"));
    let tls = control_tls(&ca, &td(), now).unwrap_or_else(|e| panic!("{e}"));
    let bundle = ca.bundle();
    let cp = Arc::new(plane(&dir));
    let admin = cp.operators().by_name("alice").cloned().unwrap_or_else(|| panic!("alice"));
    let bob = cp.operators().by_name("bob").cloned().unwrap_or_else(|| panic!("bob"));
    let carol = cp.operators().by_name("carol").cloned().unwrap_or_else(|| panic!("carol"));
    if let Ok(Applied::PendingApproval { proposal, .. }) = cp.apply(&admin, examples(), "seed", now) {
        cp.approve(&bob, proposal, now).unwrap_or_else(|e| panic!("{e}"));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
    tokio::spawn(grpc::serve(cp.clone(), listener, tls, std::future::pending()));
    let ids: Vec<SpiffeId> = ["platform/sa/ingress", "platform/sa/ops-console", "web/sa/frontend", "acme/sa/storefront", "globex/sa/storefront", "orders/sa/orders-api", "payments/sa/payments-api", "payments/sa/ledger", "payments/sa/reporting"]
        .iter()
        .map(|s| SpiffeId::parse(&format!("spiffe://shop.example/ns/{s}")).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    eprintln!("connecting {n} proxies over mTLS ...");
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(usize, Instant)>(n);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    for i in 0..n {
        let id = ids[i % ids.len()].clone();
        let (key, csr) = new_workload_key(&id).unwrap_or_else(|e| panic!("{e}"));
        let issued = cp.renew(&id, &csr, None, SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
        let mut b = TrustBundles::new();
        b.set(td(), bundle.clone());
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|e| panic!("{e}"))
            .dangerous()
            .with_custom_certificate_verifier(SvidServerVerifier::new(SharedBundles::new(b), Accept::Only(vec![control_identity(&td()).unwrap_or_else(|| panic!())])))
            .with_client_auth_cert(issued.chain.clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
            .unwrap_or_else(|e| panic!("{e}"));
        let ch = grpc::connect(&addr, cfg).await.unwrap_or_else(|e| panic!("{e}"));
        let (done_tx, ready_tx) = (done_tx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<ConfigAck>(4);
            let mut s = ConfigClient::new(ch).stream(tokio_stream::wrappers::ReceiverStream::new(ack_rx)).await.unwrap_or_else(|e| panic!("{e}")).into_inner();
            while let Some(Ok(snap)) = s.next().await {
                let _ = ack_tx.send(ConfigAck { revision: snap.revision, accepted: true, error: String::new() }).await;
                if snap.revision == 1 {
                    let _ = ready_tx.send(()).await;
                } else {
                    let _ = done_tx.send((i, Instant::now())).await;
                    break;
                }
            }
            drop(ack_tx);
        });
        let _: &Vec<CertificateDer<'static>> = &issued.chain;
    }
    for _ in 0..n {
        ready_rx.recv().await;
    }
    eprintln!("all {n} proxies hold revision 1; applying a change ...");
    let head = cp.store.head().ok().flatten().map(|r| r.files).unwrap_or_default();
    let next: Files = head.iter().map(|(f, t)| (f.clone(), t.replace("namespaces: [orders, payments, platform]", "namespaces: [orders, payments, platform, web]"))).collect();
    let start = Instant::now();
    let cp2 = cp.clone();
    tokio::task::spawn_blocking(move || cp2.apply(&carol, next, "fan-out", SystemTime::now())).await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    let committed = start.elapsed();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        if let Some((_, t)) = done_rx.recv().await {
            lat.push(t.duration_since(start));
        }
    }
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!();
    println!("| proxies | apply committed after | p50 | p99 | max |");
    println!("|---:|---:|---:|---:|---:|");
    println!("| {n} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |", committed.as_secs_f64() * 1e3, q(0.5).as_secs_f64() * 1e3, q(0.99).as_secs_f64() * 1e3, lat[lat.len() - 1].as_secs_f64() * 1e3);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    meshward_identity::install_crypto_provider();
    let n: usize = std::env::var("MESHWARD_BENCH_PROXIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    signing();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(fanout(n));
}
