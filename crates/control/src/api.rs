//! The operators' HTTP/JSON API over TLS, and the signing endpoints proxies use to join.
//!
//! Authentication: a bearer token (`Authorization: Bearer …`) of an operator in the
//! operators file, or a client certificate `spiffe://TD/operator/NAME`. Workloads
//! authenticate to `/v1/svid` with a single-use join token, and to `/v1/svid/renew` with
//! their current SVID as client certificate. Every route is listed in docs/control-plane.md.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use meshward_identity::SpiffeId;
use meshward_identity::bundle::Bundle;
use meshward_identity::ca::cert_pem;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Operator;
use crate::service::{ControlPlane, Refused};
use crate::store::{AuditFilter, Files};

/// The verified client certificate's identity, if the client presented one.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<SpiffeId>);

type Cp = Arc<ControlPlane>;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Refused::Invalid(..) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Refused::TestsFail(_) => (StatusCode::UNPROCESSABLE_ENTITY, "tests_failed"),
            Refused::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Refused::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Refused::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Refused::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            // The data directory is full: nothing was written (crate::disk).
            Refused::Store(e) if e.is_full() => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
            Refused::Store(_) | Refused::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let mut body = json!({"error": self.to_string(), "code": code});
        if let Refused::Invalid(_, diags) = &self {
            body["diagnostics"] = json!(diags);
        }
        (status, Json(body)).into_response()
    }
}

/// Who is calling, as an operator.
fn operator(
    cp: &ControlPlane,
    headers: &HeaderMap,
    peer: &Peer,
) -> Result<Operator, Box<Response>> {
    if let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        let token = token.trim();
        if let Some(op) = cp.operators().by_token(token) {
            return Ok(op.clone());
        }
        // Unknown: maybe an operator added within the same clock tick as the last read.
        return cp
            .operators_reloaded(true)
            .by_token(token)
            .cloned()
            .ok_or_else(|| Box::new(error(StatusCode::UNAUTHORIZED, "unknown bearer token")));
    }
    if let Some(id) = &peer.0 {
        let td = cp.trust_domain().as_str();
        let name = id
            .as_str()
            .strip_prefix(&format!("spiffe://{td}/operator/"));
        let ops = cp.operators();
        if let Some(op) = name.and_then(|n| ops.by_name(n)) {
            return Ok(op.clone());
        }
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            format!("`{id}` is not an operator"),
        )));
    }
    Err(Box::new(error(
        StatusCode::UNAUTHORIZED,
        "authenticate with `Authorization: Bearer TOKEN` or an operator client certificate",
    )))
}

macro_rules! op {
    ($cp:expr, $h:expr, $p:expr) => {
        match operator(&$cp, &$h, &$p) {
            Ok(o) => o,
            Err(r) => return *r,
        }
    };
}

/// Runs store and CA work off the async workers (a durable commit waits for the disk).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refused> + Send + 'static,
) -> Result<T, Refused> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Refused::Internal(e.to_string())))
}

fn reply<T: serde::Serialize>(r: Result<T, Refused>) -> Response {
    match r {
        Ok(v) => Json(json!(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ApplyReq {
    files: Files,
    #[serde(default)]
    reason: String,
    /// A progressive rollout (docs/rollout.md) instead of an apply.
    #[serde(default)]
    progressive: Option<crate::service::rollout::Options>,
}

async fn apply(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Json(r): Json<ApplyReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(
        blocking(move || match &r.progressive {
            Some(o) => cp.start_rollout(&op, r.files, &r.reason, o, SystemTime::now()),
            None => cp.apply(&op, r.files, &r.reason, SystemTime::now()),
        })
        .await,
    )
}

/// The rollout running now or the last one, with its evidence.
async fn rollout_status(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
) -> Response {
    let _op = op!(cp, h, p);
    reply(blocking(move || cp.rollout_status(SystemTime::now())).await)
}

#[derive(Debug, Deserialize)]
struct RolloutReq {
    #[serde(default)]
    reason: String,
}

/// `POST /v1/rollout/promote` and `/v1/rollout/abort`.
async fn rollout_act(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    Path(act): Path<String>,
    h: HeaderMap,
    Json(r): Json<RolloutReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(
        blocking(move || {
            let now = SystemTime::now();
            match act.as_str() {
                "promote" => cp.promote_rollout(&op, &r.reason, now),
                "abort" => cp.abort_rollout(&op, &r.reason, now),
                other => Err(Refused::NotFound(format!(
                    "no rollout action `{other}`: promote or abort"
                ))),
            }
            .map(|m| json!({"message": m}))
        })
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct ApproveReq {
    proposal: u64,
}

async fn approve(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Json(r): Json<ApproveReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(blocking(move || cp.approve(&op, r.proposal, SystemTime::now())).await)
}

/// The pending changes, without their files: who proposed what, against which revision,
/// what it changes, and whose approval it waits for.
async fn proposals(State(cp): State<Cp>, Extension(p): Extension<Peer>, h: HeaderMap) -> Response {
    let _ = op!(cp, h, p);
    reply(
        blocking(move || {
            let head = cp.store.head()?.map_or(0, |r| r.rev);
            let ps = cp.store.proposals()?;
            Ok(ps
                .into_iter()
                .map(|p| {
                    json!({
                        "id": p.id,
                        "created_ms": p.created_ms,
                        "author": p.author,
                        "reason": p.reason,
                        "summary": p.summary,
                        "base": p.base,
                        "stale": p.base != head,
                        "waiting_for": format!("a platform-security operator other than `{}`", p.author),
                    })
                })
                .collect::<Vec<_>>())
        })
        .await,
    )
}

#[derive(Debug, Deserialize)]
struct RollbackReq {
    to: u64,
    #[serde(default)]
    reason: String,
}

async fn rollback(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Json(r): Json<RollbackReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(blocking(move || cp.rollback(&op, r.to, &r.reason, SystemTime::now())).await)
}

async fn history(State(cp): State<Cp>, Extension(p): Extension<Peer>, h: HeaderMap) -> Response {
    let _ = op!(cp, h, p);
    reply(blocking(move || cp.history()).await)
}

async fn revision(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Path(rev): Path<u64>,
) -> Response {
    let _ = op!(cp, h, p);
    reply(blocking(move || cp.revision(rev)).await)
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    limit: Option<usize>,
}

async fn audit_log(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let _ = op!(cp, h, p);
    reply(
        blocking(move || {
            cp.audit(&AuditFilter {
                actor: q.actor,
                action_prefix: q.action,
                since_ms: None,
                limit: q.limit,
            })
        })
        .await,
    )
}

async fn audit_verify(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
) -> Response {
    let _ = op!(cp, h, p);
    match cp.audit(&AuditFilter::default()) {
        Ok(entries) => match crate::audit::verify(&entries) {
            Ok(head) => Json(json!({"intact": true, "entries": entries.len(), "head": head})).into_response(),
            Err(b) => (StatusCode::CONFLICT, Json(json!({"intact": false, "entries": entries.len(), "broken": b, "error": b.to_string()}))).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct TokenReq {
    identity: String,
    #[serde(default = "ten_minutes")]
    ttl_secs: u64,
}

fn ten_minutes() -> u64 {
    600
}

async fn token(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Json(r): Json<TokenReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(blocking(move || cp.issue_token(&op, &r.identity, Duration::from_secs(r.ttl_secs), SystemTime::now()).map(|(token, exp)| {
        json!({"token": token, "identity": r.identity, "expires_at": humantime::format_rfc3339(exp).to_string()})
    })).await)
}

#[derive(Debug, Deserialize)]
struct SvidReq {
    #[serde(default)]
    token: Option<String>,
    /// Base64 DER.
    csr: String,
    #[serde(default)]
    lifetime_secs: Option<u64>,
}

fn issued_json(cp: &ControlPlane, i: &meshward_identity::ca::Issued) -> Result<Value, Refused> {
    Ok(json!({
        "spiffe_id": i.spiffe_id.to_string(),
        "chain": i.chain.iter().map(cert_pem).collect::<Vec<_>>(),
        "bundle": cp.bundle()?.iter().map(cert_pem).collect::<Vec<_>>(),
        "not_after": humantime::format_rfc3339(i.not_after).to_string(),
    }))
}

async fn svid(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    Json(r): Json<SvidReq>,
) -> Response {
    let Ok(csr) = base64::engine::general_purpose::STANDARD.decode(r.csr.trim()) else {
        return error(StatusCode::BAD_REQUEST, "`csr` is not base64 DER");
    };
    let lifetime = r.lifetime_secs.map(Duration::from_secs);
    let now = SystemTime::now();
    let (token, peer) = (r.token.clone(), p.0.clone());
    let c = cp.clone();
    let issued = blocking(move || match (&token, &peer) {
        (Some(t), _) => c.sign_with_token(t, &csr, lifetime, now),
        (None, Some(id)) => c.renew(id, &csr, lifetime, now),
        (None, None) => Err(Refused::Forbidden(
            "present a join token, or your current SVID as client certificate to renew".into(),
        )),
    })
    .await;
    reply(issued.and_then(|i| issued_json(&cp, &i)))
}

/// Prometheus metrics: no authentication (they carry counts, revisions and nothing
/// secret), like the bundle.
async fn metrics(State(cp): State<Cp>) -> Response {
    let text = tokio::task::spawn_blocking(move || cp.metrics_text())
        .await
        .unwrap_or_default();
    ([("content-type", meshward_telemetry::CONTENT_TYPE)], text).into_response()
}

async fn bundle(State(cp): State<Cp>) -> Response {
    let b = match cp.bundle() {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let doc = Bundle {
        trust_domain: cp.trust_domain().clone(),
        roots: b,
        sequence: 1,
        refresh_hint: Some(Duration::from_secs(300)),
    };
    match doc.to_jwks() {
        Ok(j) => ([("content-type", "application/json")], j).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct OverrideReq {
    namespace: String,
    name: String,
    /// The `Override` YAML document.
    document: String,
}

async fn override_create(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Json(r): Json<OverrideReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(
        blocking(move || {
            cp.create_override(&op, &r.namespace, &r.name, &r.document, SystemTime::now())
        })
        .await,
    )
}

async fn override_list(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
) -> Response {
    let _ = op!(cp, h, p);
    reply(blocking(move || cp.overrides()).await)
}

async fn override_revoke(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let op = op!(cp, h, p);
    reply(blocking(move || cp.revoke_override(&op, &ns, &name, SystemTime::now())).await)
}

async fn quarantine_list(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
) -> Response {
    let _ = op!(cp, h, p);
    reply(blocking(move || cp.quarantines(SystemTime::now())).await)
}

#[derive(Debug, Deserialize)]
struct ReleaseReq {
    /// The identity, or the generated `namespace/name`.
    id: String,
    reason: String,
}

async fn quarantine_release(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Json(r): Json<ReleaseReq>,
) -> Response {
    let op = op!(cp, h, p);
    reply(blocking(move || cp.release_quarantine(&op, &r.id, &r.reason, SystemTime::now())).await)
}

#[derive(Debug, Deserialize, Default)]
struct RotateReq {
    #[serde(default)]
    rotation: Option<crate::service::Rotation>,
}

async fn ca_rotate(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    body: Option<Json<RotateReq>>,
) -> Response {
    let op = op!(cp, h, p);
    let what = body
        .and_then(|Json(b)| b.rotation)
        .unwrap_or(crate::service::Rotation::Intermediate);
    reply(
        blocking(move || {
            cp.rotate(&op, what, SystemTime::now())
                .map(|()| json!({"rotated": what}))
        })
        .await,
    )
}

async fn status(State(cp): State<Cp>, Extension(p): Extension<Peer>, h: HeaderMap) -> Response {
    let _ = op!(cp, h, p);
    reply(blocking(move || cp.status()).await)
}

#[derive(Debug, Deserialize)]
struct WindowQuery {
    /// Seconds back from now (default: the graph's 300; all records for `/v1/decisions`).
    window_secs: Option<u64>,
    limit: Option<usize>,
}

/// The decision window as JSON lines (the decision-log format).
async fn decisions(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Query(q): Query<WindowQuery>,
) -> Response {
    let _ = op!(cp, h, p);
    let r = blocking(move || {
        cp.decisions(
            q.window_secs.map(Duration::from_secs),
            q.limit.unwrap_or(1_000_000),
            SystemTime::now(),
        )
    })
    .await;
    match r {
        Ok(recs) => {
            let mut body = String::new();
            for r in recs {
                body.push_str(&r.to_line());
                body.push('\n');
            }
            ([("content-type", "application/x-ndjson")], body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The service graph of the last `window_secs` (default 300).
async fn graph(
    State(cp): State<Cp>,
    Extension(p): Extension<Peer>,
    h: HeaderMap,
    Query(q): Query<WindowQuery>,
) -> Response {
    let _ = op!(cp, h, p);
    let window = Duration::from_secs(q.window_secs.unwrap_or(300).max(1));
    reply(blocking(move || cp.graph(window, SystemTime::now())).await)
}

/// Every route.
pub fn router(cp: Cp) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/apply", post(apply))
        .route("/v1/approve", post(approve))
        .route("/v1/proposals", get(proposals))
        .route("/v1/rollback", post(rollback))
        .route("/v1/rollout", get(rollout_status))
        .route("/v1/rollout/{act}", post(rollout_act))
        .route("/v1/history", get(history))
        .route("/v1/revisions/{rev}", get(revision))
        .route("/v1/audit", get(audit_log))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/tokens", post(token))
        .route("/v1/svid", post(svid))
        .route("/v1/bundle", get(bundle))
        .route("/metrics", get(metrics))
        .route("/v1/decisions", get(decisions))
        .route("/v1/graph", get(graph))
        .route("/v1/overrides", post(override_create).get(override_list))
        .route("/v1/overrides/{ns}/{name}", delete(override_revoke))
        .route("/v1/quarantines", get(quarantine_list))
        .route("/v1/quarantines/release", post(quarantine_release))
        .route("/v1/ca/rotate", post(ca_rotate))
        .with_state(cp)
}

/// Serves the API on `listener` with TLS until `shutdown` resolves.
pub async fn serve(
    cp: Cp,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(cp);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let peer = Peer(meshward_identity::verifier::peer_identity(
                stream.get_ref().1,
            ));
            let svc = hyper_util::service::TowerToHyperService::new(app.layer(Extension(peer)));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
