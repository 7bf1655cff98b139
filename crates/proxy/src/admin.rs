//! The admin endpoint (loopback by default): `/live`, `/ready`, `/config`, `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tokio::net::TcpListener;

use crate::listener::{Listener, Reserve};
use crate::state::Shared;

fn resp(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

/// `ready`, with what is degraded but still serving: state that could not be saved, a
/// control plane that does not answer (traffic goes on under the revision in force).
fn ready_text(shared: &Shared, policy: Option<&crate::state::Policy>) -> String {
    let mut t = String::from("ready\n");
    let h = &shared.health;
    if let Some(e) = h.persist_error.load().as_deref() {
        let saved = h
            .persisted_revision
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = policy.map_or(0, |p| p.revision);
        t.push_str(&format!(
            "degraded: state not saved ({e}); enforcing revision {now}, a restart without the control plane would enforce revision {saved}\n"
        ));
    }
    if let Some(e) = h.control_error.load().as_deref() {
        t.push_str(&format!("degraded: control plane: {e}\n"));
    }
    t
}

fn route(shared: &Shared, path: &str) -> Response<Full<Bytes>> {
    let policy = shared.policy.load_full();
    let svid = shared.svid.load_full();
    match path {
        "/live" => resp(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => {
            let svid_ok = svid
                .as_ref()
                .is_some_and(|s| s.not_after > SystemTime::now());
            let stalled = shared.listeners.not_accepting();
            if let Some((name, why)) = stalled.first() {
                // A listener backing off after accept errors (e.g. out of file
                // descriptors): not serving its port until it recovers by itself.
                return resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {name} is not accepting connections ({why})\n"),
                );
            }
            if let Some(p) = &policy
                && shared.listeners.bound() != Some(p.revision)
            {
                // The current revision's inbound ports are not all listening yet (just
                // started, or a new revision opened a port): a request now could fail.
                return resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: the inbound listeners of revision {} are not all bound\n",
                        p.revision
                    ),
                );
            }
            match (policy.is_some(), svid_ok) {
                (true, true) => resp(
                    StatusCode::OK,
                    "text/plain",
                    ready_text(shared, policy.as_deref()),
                ),
                (false, _) => resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no policy yet (denying everything)\n".into(),
                ),
                (_, false) => resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no valid certificate\n".into(),
                ),
            }
        }
        "/config" => {
            let v = serde_json::json!({
                "workload": shared.workload.to_string(),
                "revision": policy.as_ref().map(|p| p.revision),
                "rules": policy.as_ref().map(|p| p.engine.rule_count()),
                "policies": policy.as_ref().map(|p| p.set.policies.len()),
                "svid_not_after": svid.as_ref().map(|s| humantime::format_rfc3339_seconds(s.not_after).to_string()),
                "persisted_revision": shared.health.persisted_revision.load(std::sync::atomic::Ordering::Relaxed),
                "persist_error": shared.health.persist_error.load().as_deref().cloned(),
                "control_error": shared.health.control_error.load().as_deref().cloned(),
            });
            resp(StatusCode::OK, "application/json", v.to_string())
        }
        "/endpoints" => {
            let v: Vec<serde_json::Value> = shared
                .endpoints
                .health()
                .into_iter()
                .map(|(k, h)| {
                    let mut j = h.to_json();
                    j["service"] = k.service.to_string().into();
                    j["endpoint"] = k.addr.to_string().into();
                    j
                })
                .collect();
            resp(
                StatusCode::OK,
                "application/json",
                serde_json::Value::from(v).to_string(),
            )
        }
        "/metrics" => {
            let m = &shared.log.metrics;
            m.endpoints.clear();
            for (k, h) in shared.endpoints.health() {
                m.endpoints
                    .get_or_create(&meshward_telemetry::EndpointLabels {
                        service: k.service.to_string(),
                        endpoint: k.addr.to_string(),
                        state: h.state,
                    })
                    .set(1);
            }
            let unix = |t: SystemTime| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
            };
            let now = SystemTime::now();
            m.certificate_expiry
                .set(svid.as_ref().map_or(0.0, |s| unix(s.not_after)));
            m.config_revision.set(
                policy
                    .as_ref()
                    .map_or(0, |p| i64::try_from(p.revision).unwrap_or(i64::MAX)),
            );
            if policy.is_some() {
                m.config_age
                    .set((unix(now) - m.config_updated.get()).max(0.0));
            }
            for l in shared.listeners.all().iter().filter(|l| l.is_inbound()) {
                let (open, handshaking) = l.counts();
                for (state, n) in [("open", open), ("handshaking", handshaking)] {
                    m.listener_connections
                        .get_or_create(&meshward_telemetry::ListenerLabels {
                            listener: l.name.clone(),
                            state,
                        })
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            m.persisted_revision.set(
                i64::try_from(
                    shared
                        .health
                        .persisted_revision
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
                .unwrap_or(i64::MAX),
            );
            m.overrides_active.set(policy.as_ref().map_or(0, |p| {
                let n = p.set.overrides.iter().filter(|o| o.active_at(now)).count();
                i64::try_from(n).unwrap_or(i64::MAX)
            }));
            resp(StatusCode::OK, meshward_telemetry::CONTENT_TYPE, m.encode())
        }
        _ => resp(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /live, /ready, /config, /endpoints or /metrics\n".into(),
        ),
    }
}

/// Serves the admin endpoint for ever. It keeps a spare file descriptor, so that even when
/// the process has run out of them it can accept a probe and answer that `/ready` fails.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let reserve = Arc::new(Reserve::default());
    let name = listener
        .local_addr()
        .map_or_else(|_| "admin".into(), |a| format!("admin {a}"));
    // Not in `shared.listeners`: `/ready` is answered here, so it can only report others.
    let me = Listener::unlisted(name);
    crate::listener::accept_loop(&shared, &me, listener, Some(&reserve), |s, _, conn| {
        let (shared, reserve) = (shared.clone(), reserve.clone());
        tokio::spawn(async move {
            let _conn = conn;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let r = route(&shared, req.uri().path());
                    async move { Ok::<_, Infallible>(r) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            // The connection's descriptor is closed: take the spare one back, if given up.
            reserve.refill();
        });
    })
    .await;
}
