#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Traces across two hops: a client's request with a W3C `traceparent` goes through the
//! frontend's sidecar to the relay's, whose app calls the backend through its own sidecar,
//! forwarding the trace headers it received (as a well-behaved app does). A minimal OTLP
//! receiver (the OpenTelemetry collector's gRPC service) collects what the proxies export:
//! one span per request per inbound sidecar, carrying the decision, each the child of the
//! one before; the backend app sees the backend sidecar's span as its parent.

mod support;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::{self, InboundPort};
use meshward_proxy::outbound::{self, Upstream};
use meshward_proxy::state::Shared;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";
const RELAY: &str = "spiffe://shop.example/ns/mid/sa/relay";
const BACKEND: &str = "spiffe://shop.example/ns/orders/sa/orders-api";

/// The OTLP receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

impl Receiver {
    /// Flushes the exporter until at least `n` spans of `trace` (hex) have arrived.
    async fn spans_of(&self, trace: &str, n: usize) -> Vec<Span> {
        let start = Instant::now();
        loop {
            tokio::task::spawn_blocking(meshward_telemetry::trace::flush)
                .await
                .unwrap();
            let spans: Vec<Span> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|s| hex(&s.trace_id) == trace)
                .cloned()
                .collect();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "spans so far: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            // The exporter's `service.name`, kept on each span (as `resource.service.name`).
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .cloned();
            for ss in rs.scope_spans {
                for mut span in ss.spans {
                    if let Some(mut a) = service.clone() {
                        a.key = "resource.service.name".into();
                        span.attributes.push(a);
                    }
                    spans.push(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn proxy(ca: &Ca, workload: &str, id: &str, set: &meshward_policy::PolicySet) -> Arc<Shared> {
    let s = support::shared(ca, workload, DecisionLog::disabled());
    s.set_policy(1, set.clone());
    s.svid.store(Some(Arc::new(support::svid(
        ca,
        id,
        Duration::from_secs(3600),
    ))));
    s
}

/// An app: the relay calls `upstream` with the same path, forwarding the trace headers it
/// got; the backend answers with the `traceparent` it got.
async fn app(upstream: Option<SocketAddr>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let tp = req
                            .headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let body = match upstream {
                            None => tp,
                            Some(up) => {
                                let path = req.uri().path().to_owned();
                                tokio::task::spawn_blocking(move || {
                                    get(up, &path, &format!("traceparent: {tp}\r\n"))
                                })
                                .await
                                .unwrap()
                            }
                        };
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

/// A raw HTTP/1.1 GET; returns the body (or the whole answer when it is not 200).
fn get(addr: SocketAddr, path: &str, extra: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_owned(),
        _ => text,
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_decision_and_link_across_two_hops() {
    meshward_identity::install_crypto_provider();
    // The receiver.
    let rx = Receiver::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = l.local_addr().unwrap();
    let svc = TraceServiceServer::new(rx.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    meshward_telemetry::trace::init_otlp(&format!("http://{otlp}"), "meshward-test").unwrap();

    // Three workloads: frontend -> relay -> backend.
    let ca = Ca::generate(support::td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let (relay_in, backend_in, front_out, relay_out) =
        (bind().await, bind().await, bind().await, bind().await);
    let backend_app = app(None).await;
    let relay_app = app(Some(relay_out.local_addr().unwrap())).await;
    let yaml = format!(
        r#"
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: relay, namespace: mid, labels: {{app: relay}}}}
spec: {{ports: [{{port: {rp}, protocol: HTTP, inbound: "{ri}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}
spec: {{ports: [{{port: {bp}, protocol: HTTP, inbound: "{bi}"}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: relay, namespace: mid}}
spec: {{selector: {{app: relay}}, ports: [{{port: 80, targetPort: {rp}}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: orders, namespace: orders}}
spec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {bp}}}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: relay, namespace: mid}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [relay]}}
  rules: [{{name: from-frontend, from: [{{identities: ["{FRONTEND}"]}}], to: [{{paths: ["/orders/*", "/secret"]}}]}}]
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: orders-api, namespace: orders}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [orders-api]}}
  rules: [{{name: from-relay, from: [{{identities: ["{RELAY}"]}}], to: [{{paths: ["/orders/*"]}}]}}]
"#,
        rp = relay_app.port(),
        ri = relay_in.local_addr().unwrap(),
        bp = backend_app.port(),
        bi = backend_in.local_addr().unwrap(),
    );
    let set = support::policy_set(&yaml);
    let frontend = proxy(&ca, "web/frontend", FRONTEND, &set);
    let relay = proxy(&ca, "mid/relay", RELAY, &set);
    // The relay's sidecar exports under its own name (as each sidecar of `meshward up`,
    // all in one process, does); the others use the process's default tracer.
    relay
        .tracer
        .set(
            meshward_telemetry::trace::otlp(&format!("http://{otlp}"), "meshward-proxy mid/relay")
                .unwrap(),
        )
        .unwrap();
    let backend = proxy(&ca, "orders/orders-api", BACKEND, &set);
    tokio::spawn(inbound::serve(
        relay.clone(),
        InboundPort::explicit(relay_app.port(), Protocol::Http),
        relay_in,
    ));
    tokio::spawn(inbound::serve(
        backend,
        InboundPort::explicit(backend_app.port(), Protocol::Http),
        backend_in,
    ));
    let up = |svc: &str| Upstream {
        service: WorkloadRef::parse(svc).unwrap(),
        port: 80,
    };
    let front_out_addr = front_out.local_addr().unwrap();
    tokio::spawn(outbound::serve(
        frontend.clone(),
        up("mid/relay"),
        front_out,
    ));
    tokio::spawn(outbound::serve(relay, up("orders/orders"), relay_out));

    // The client starts a trace.
    let (trace, root) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let body = tokio::task::spawn_blocking(move || {
        get(
            front_out_addr,
            "/orders/7",
            &format!("traceparent: 00-{trace}-{root}-01\r\n"),
        )
    })
    .await
    .unwrap();
    assert!(
        body.starts_with(&format!("00-{trace}-")),
        "the backend app continues the trace: {body}"
    );
    let backend_app_parent = body.split('-').nth(2).unwrap().to_owned();
    // And a denied one (the backend does not allow /secret).
    let denied = tokio::task::spawn_blocking(move || {
        get(
            front_out_addr,
            "/secret",
            &format!("traceparent: 00-{trace}-{root}-01\r\n"),
        )
    })
    .await
    .unwrap();
    assert!(denied.contains("403"), "{denied}");

    // The spans arrive: relay's (child of the client's), backend's (child of relay's).
    let spans = rx.spans_of(trace, 4).await;
    let find = |dest: &str, path: &str| {
        spans
            .iter()
            .find(|s| {
                attr(s, "meshward.destination").as_deref() == Some(dest)
                    && attr(s, "url.path").as_deref() == Some(path)
            })
            .unwrap_or_else(|| panic!("no span at {dest} for {path}: {spans:#?}"))
    };
    let relay_span = find("mid/relay", "/orders/7");
    let backend_span = find("orders/orders-api", "/orders/7");
    assert_eq!(
        attr(relay_span, "resource.service.name").as_deref(),
        Some("meshward-proxy mid/relay"),
        "the relay's own service.name"
    );
    assert_eq!(
        attr(backend_span, "resource.service.name").as_deref(),
        Some("meshward-test"),
        "the process's default"
    );
    assert_eq!(
        hex(&relay_span.parent_span_id),
        root,
        "the relay's span continues the client's"
    );
    assert_eq!(
        hex(&backend_span.parent_span_id),
        hex(&relay_span.span_id),
        "the backend's span is the relay's child"
    );
    assert_eq!(
        backend_app_parent,
        hex(&backend_span.span_id),
        "the app sees its sidecar's span as parent"
    );
    for (s, source, policy) in [
        (relay_span, FRONTEND, "mid/relay"),
        (backend_span, RELAY, "orders/orders-api"),
    ] {
        assert_eq!(
            attr(s, "meshward.source").as_deref(),
            Some(source),
            "{s:#?}"
        );
        assert_eq!(
            attr(s, "meshward.verdict").as_deref(),
            Some("allow"),
            "{s:#?}"
        );
        assert_eq!(
            attr(s, "meshward.reason").as_deref(),
            Some("allowed_by_rule"),
            "{s:#?}"
        );
        assert_eq!(
            attr(s, "meshward.policy").as_deref(),
            Some(policy),
            "{s:#?}"
        );
        assert!(
            attr(s, "meshward.decision_ns").is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0)),
            "{s:#?}"
        );
        assert_eq!(
            attr(s, "http.response.status_code").as_deref(),
            Some("200"),
            "{s:#?}"
        );
    }
    // Pooled HTTP out of the frontend (instead of the tunnel): its outbound proxy adds a
    // client span between the client's and the relay's.
    let pooled = bind().await;
    let pooled_addr = pooled.local_addr().unwrap();
    tokio::spawn(meshward_proxy::pool::serve(
        frontend,
        up("mid/relay"),
        pooled,
        meshward_proxy::pool::UpstreamProtocol::Http1,
    ));
    let (trace2, root2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let body = tokio::task::spawn_blocking(move || {
        get(
            pooled_addr,
            "/orders/9",
            &format!("traceparent: 00-{trace2}-{root2}-01\r\n"),
        )
    })
    .await
    .unwrap();
    assert!(body.starts_with(&format!("00-{trace2}-")), "{body}");
    let spans2 = rx.spans_of(trace2, 3).await;
    let client_span = spans2
        .iter()
        .find(|s| attr(s, "meshward.upstream").as_deref() == Some("mid/relay"))
        .unwrap_or_else(|| panic!("no client span: {spans2:#?}"));
    assert_eq!(client_span.kind, 3, "SPAN_KIND_CLIENT: {client_span:#?}");
    assert_eq!(hex(&client_span.parent_span_id), root2);
    assert_eq!(
        attr(client_span, "http.response.status_code").as_deref(),
        Some("200")
    );
    let relay2 = spans2
        .iter()
        .find(|s| attr(s, "meshward.destination").as_deref() == Some("mid/relay"))
        .unwrap();
    assert_eq!(
        hex(&relay2.parent_span_id),
        hex(&client_span.span_id),
        "the relay's span is the outbound client span's child"
    );

    // The denial: allowed at the relay, denied at the backend, both recorded.
    let denied_span = find("orders/orders-api", "/secret");
    assert_eq!(
        attr(denied_span, "meshward.verdict").as_deref(),
        Some("deny")
    );
    assert_eq!(
        attr(denied_span, "meshward.reason").as_deref(),
        Some("no_allow_at_tier")
    );
    assert_eq!(
        attr(denied_span, "http.response.status_code").as_deref(),
        Some("403")
    );
}
