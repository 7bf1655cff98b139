#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The proxy API over real gRPC and mutual TLS: joining with a token, renewing with the
//! current SVID, and the per-workload config stream pushed on every change, acknowledged,
//! and reported by `status`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_api::v1::config_client::ConfigClient;
use meshward_api::v1::identity_client::IdentityClient;
use meshward_api::v1::{ConfigAck, SignRequest};
use meshward_control::auth::{Operator, Operators, PLATFORM_SECURITY};
use meshward_control::grpc;
use meshward_control::server::control_tls;
use meshward_control::service::{Applied, Config, ControlPlane};
use meshward_control::store::{Files, SqliteStore};
use meshward_identity::ca::new_workload_key;
use meshward_identity::control_identity;
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::{Accept, SharedBundles, SvidServerVerifier};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_stream::StreamExt as _;

fn op(name: &str, roles: &[&str], ns: &[&str]) -> Operator {
    Operator {
        name: name.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
        token_sha256: vec![],
    }
}

fn examples() -> Files {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
    let mut files: Files = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn td() -> TrustDomain {
    TrustDomain::parse("shop.example").unwrap()
}

fn client_tls(
    bundle: Vec<CertificateDer<'static>>,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let mut b = TrustBundles::new();
    b.set(td(), bundle);
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(SvidServerVerifier::new(
        SharedBundles::new(b),
        Accept::Only(vec![control_identity(&td()).unwrap()]),
    ));
    match cert {
        Some((c, k)) => builder.with_client_auth_cert(c, k).unwrap(),
        None => builder.with_no_client_auth(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_renew_and_stream_config() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let store = Arc::new(SqliteStore::open(&dir.path().join("meshward.db")).unwrap());
    let ca = ControlPlane::open_ca(dir.path(), &td(), now).unwrap();
    let tls = control_tls(&ca, &td(), now).unwrap();
    let bundle = ca.bundle();
    let (alice, bob, carol) = (
        op("alice", &[PLATFORM_SECURITY], &[]),
        op("bob", &[PLATFORM_SECURITY], &[]),
        op("carol", &[], &["payments"]),
    );
    let cfg = Config {
        data_dir: dir.path().to_owned(),
        trust_domain: td(),
        default_lifetime: Duration::from_secs(3600),
        max_token_ttl: Duration::from_secs(3600),
    };
    let cp = Arc::new(ControlPlane::new(
        store,
        ca,
        Operators {
            operators: vec![alice.clone(), bob.clone(), carol.clone()],
        },
        cfg,
    ));
    let Applied::PendingApproval { proposal, .. } =
        cp.apply(&alice, examples(), "initial", now).unwrap()
    else {
        panic!()
    };
    cp.approve(&bob, proposal, now).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(grpc::serve(
        cp.clone(),
        listener,
        tls,
        std::future::pending(),
    ));

    // Join with a token, without a client certificate.
    let me = SpiffeId::parse("spiffe://shop.example/ns/payments/sa/payments-api").unwrap();
    let (token, _) = cp
        .issue_token(&carol, me.as_str(), Duration::from_secs(60), now)
        .unwrap();
    let (key, csr) = new_workload_key(&me).unwrap();
    let ch = grpc::connect(&addr, client_tls(bundle.clone(), None))
        .await
        .unwrap();
    let signed = IdentityClient::new(ch.clone())
        .sign(SignRequest {
            join_token: token.clone(),
            csr: csr.clone(),
            lifetime_secs: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.spiffe_id, me.as_str());
    // Reusing the token is refused.
    let e = IdentityClient::new(ch.clone())
        .sign(SignRequest {
            join_token: token,
            csr: csr.clone(),
            lifetime_secs: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // Without a client certificate there is no config stream.
    let (_tx0, rx0) = tokio::sync::mpsc::channel::<ConfigAck>(1);
    let e = ConfigClient::new(ch)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // With the SVID: renew (same identity, no token), then subscribe.
    let chain: Vec<CertificateDer<'static>> = signed
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let pk = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mtls = grpc::connect(&addr, client_tls(bundle.clone(), Some((chain, pk))))
        .await
        .unwrap();
    let (_k2, csr2) = new_workload_key(&me).unwrap();
    let renewed = IdentityClient::new(mtls.clone())
        .sign(SignRequest {
            join_token: String::new(),
            csr: csr2,
            lifetime_secs: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.spiffe_id, me.as_str());

    let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<ConfigAck>(4);
    let mut stream = ConfigClient::new(mtls)
        .stream(tokio_stream::wrappers::ReceiverStream::new(ack_rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.revision, 1);
    assert_eq!(first.workloads, vec!["payments/payments-api".to_string()]);
    let text: String = first.files.iter().map(|f| f.text.as_str()).collect();
    assert!(
        text.contains("name: payments-api, namespace: payments}"),
        "its own policy is there"
    );
    assert!(
        text.contains("name: in-mesh-only"),
        "baselines that target it are there"
    );
    assert!(
        !text.contains("name: orders-api, namespace: orders}\nspec:\n  tier: service"),
        "other workloads' policies are not"
    );
    assert!(!text.contains("kind: PolicyTest"));
    assert!(!first.bundle.is_empty());
    // The snapshot is a valid policy set on its own.
    let files: Files = first
        .files
        .iter()
        .map(|f| (f.name.clone(), f.text.clone()))
        .collect();
    let loaded = meshward_control::repo::load(&files);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    ack_tx
        .send(ConfigAck {
            revision: 1,
            accepted: true,
            error: String::new(),
            persist_error: "cannot save the snapshot: No space left on device".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut acked = false;
    for _ in 0..50 {
        let s = cp.status().unwrap();
        if s["proxies"][0]["acked_revision"] == 1 && s["proxies"][0]["stale"] == false {
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(acked, "{}", cp.status().unwrap());
    // Enforced but not saved: the status says so (a restart would enforce an older one).
    assert_eq!(
        cp.status().unwrap()["proxies"][0]["not_persisted"],
        "revision 1: cannot save the snapshot: No space left on device"
    );

    // A change is pushed at once; until it is acknowledged the proxy is stale.
    let head = cp.store.head().unwrap().unwrap().files;
    let next: Files = head
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.replace(
                    "namespaces: [orders, payments, platform]",
                    "namespaces: [orders, payments, platform, web]",
                ),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let cp2 = cp.clone();
    let carol2 = carol.clone();
    tokio::task::spawn_blocking(move || {
        cp2.apply(&carol2, next, "let web in", SystemTime::now())
            .unwrap()
    })
    .await
    .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.revision, 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    let s = cp.status().unwrap();
    assert_eq!(s["proxies"][0]["stale"], true, "{s}");
    ack_tx
        .send(ConfigAck {
            revision: 2,
            accepted: false,
            error: "bad snapshot".into(),
            persist_error: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rejected = false;
    for _ in 0..50 {
        if cp.status().unwrap()["proxies"][0]["rejected"] == "revision 2: bad snapshot" {
            rejected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rejected, "{}", cp.status().unwrap());

    // Readiness: a sidecar speaks only for a workload its identity runs as; what it says
    // goes to every stream at once, with the same revision.
    for (workload, why) in [
        ("orders/orders-api", "forged"),
        (
            "payments/payments-api",
            "draining: the sidecar is shutting down",
        ),
    ] {
        ack_tx
            .send(ConfigAck {
                revision: 2,
                accepted: true,
                workload: workload.into(),
                not_ready: why.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let third = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(third.revision, 2);
    let nr: Vec<(String, String)> = third
        .not_ready
        .iter()
        .map(|n| (n.workload.clone(), n.reason.clone()))
        .collect();
    assert_eq!(
        nr,
        vec![(
            "payments/payments-api".to_string(),
            "draining: the sidecar is shutting down".to_string()
        )]
    );
    // Ready again: the list empties.
    ack_tx
        .send(ConfigAck {
            revision: 2,
            accepted: true,
            workload: "payments/payments-api".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let fourth = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(fourth.not_ready.is_empty(), "{:?}", fourth.not_ready);
}
