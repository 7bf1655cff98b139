#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! gRPC (HTTP/2) through two sidecars: a tonic client and a tonic server that never see
//! TLS; allowed calls carry the caller's verified identity, denied ones get
//! PERMISSION_DENIED.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_api::v1::identity_client::IdentityClient;
use meshward_api::v1::identity_server::{Identity, IdentityServer};
use meshward_api::v1::{SignRequest, SignResponse};
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::PolicySet;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use meshward_proxy::state::Svid;

/// The app: answers Sign with the identity its sidecar vouched for.
#[derive(Debug)]
struct Echo;

#[tonic::async_trait]
impl Identity for Echo {
    async fn sign(
        &self,
        req: tonic::Request<SignRequest>,
    ) -> Result<tonic::Response<SignResponse>, tonic::Status> {
        let who = req
            .metadata()
            .get("x-meshward-peer-identity")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        Ok(tonic::Response::new(SignResponse {
            spiffe_id: who,
            ..Default::default()
        }))
    }
}

use support::{shared, td};

fn svid(ca: &Ca, id: &str) -> Svid {
    support::svid(ca, id, Duration::from_secs(3600))
}

fn set(app_port: u16, inbound: SocketAddr, allowed_path: &str) -> PolicySet {
    set_with(app_port, inbound, allowed_path, "")
}

fn set_with(app_port: u16, inbound: SocketAddr, allowed_path: &str, more: &str) -> PolicySet {
    let yaml = format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: signer, namespace: pki, labels: {{app: signer}}}}
spec: {{ports: [{{port: {app_port}, protocol: GRPC, inbound: "{inbound}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: signer, namespace: pki}}
spec: {{selector: {{app: signer}}, ports: [{{port: 50051, targetPort: {app_port}, protocol: GRPC}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: signer, namespace: pki}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [signer]}}
  rules:
    - from: [{{identities: ["spiffe://shop.example/ns/web/sa/frontend"]}}]
      to: [{{methods: [POST], paths: ["{allowed_path}"]}}]
{more}"#
    );
    support::policy_set(&yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_two_sidecars() {
    meshward_identity::install_crypto_provider();
    let ca = Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(app)),
    );
    let inb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (inbound, outbound) = (inb.local_addr().unwrap(), out.local_addr().unwrap());
    let signer = shared(&ca, "pki/signer", DecisionLog::disabled());
    signer.set_policy(1, set(app_port, inbound, "/meshward.v1.Identity/Sign"));
    signer.svid.store(Some(Arc::new(svid(
        &ca,
        "spiffe://shop.example/ns/pki/sa/signer",
    ))));
    let frontend = shared(&ca, "web/frontend", DecisionLog::disabled());
    frontend.set_policy(1, set(app_port, inbound, "/meshward.v1.Identity/Sign"));
    frontend.svid.store(Some(Arc::new(svid(
        &ca,
        "spiffe://shop.example/ns/web/sa/frontend",
    ))));
    tokio::spawn(inbound::serve(
        signer.clone(),
        InboundPort::explicit(app_port, Protocol::Grpc),
        inb,
    ));
    tokio::spawn(outbound::serve(
        frontend,
        Upstream {
            service: WorkloadRef::parse("pki/signer").unwrap(),
            port: 50051,
        },
        out,
    ));

    let ch = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = IdentityClient::new(ch);
    let r = client
        .sign(SignRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, "spiffe://shop.example/ns/web/sa/frontend");

    // A new revision that no longer allows the method: PERMISSION_DENIED, on the same
    // HTTP/2 connection.
    signer.set_policy(2, set(app_port, inbound, "/meshward.v1.Identity/Other"));
    let e = client.sign(SignRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("no_allow_at_tier"), "{}", e.message());

    // Allowed again, under a rate limit of one call a second: the call over it gets
    // RESOURCE_EXHAUSTED, on the same HTTP/2 connection.
    let limit = r#"---
apiVersion: meshward.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: signer, namespace: pki}
spec:
  target: {workloads: [signer]}
  limits: [{requestsPerSecond: 1, burst: 1}]
"#;
    signer.set_policy(
        3,
        set_with(app_port, inbound, "/meshward.v1.Identity/Sign", limit),
    );
    client.sign(SignRequest::default()).await.unwrap();
    let e = client.sign(SignRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("rate"), "{}", e.message());

    // A drill (FaultInjection): every call answered UNAVAILABLE by the signer's sidecar,
    // then every call's stream reset — on the same HTTP/2 connection, the app untouched.
    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(600));
    for (rev, abort) in [(4, "grpcStatus: UNAVAILABLE"), (5, "tcpReset: true")] {
        let fault = format!(
            "---\napiVersion: meshward.io/v1alpha1\nkind: FaultInjection\nmetadata: {{name: drill, namespace: pki}}\nspec:\n  target: {{workloads: [signer]}}\n  abort: {{{abort}, percent: 100}}\n  expiresAt: {expires}\n"
        );
        signer.set_policy(
            rev,
            set_with(app_port, inbound, "/meshward.v1.Identity/Sign", &fault),
        );
        let e = client.sign(SignRequest::default()).await.unwrap_err();
        if rev == 4 {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(e.message().contains("pki/drill"), "{}", e.message());
        } else {
            // The caller's sidecar resets the app's stream in turn.
            assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
            assert!(format!("{e:?}").contains("Reset("), "{e:?}");
        }
    }
    let fault_free = set(app_port, inbound, "/meshward.v1.Identity/Sign");
    signer.set_policy(6, fault_free);
    client.sign(SignRequest::default()).await.unwrap();
}
