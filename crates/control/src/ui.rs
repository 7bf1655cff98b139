//! The control plane's plain-HTTP listener (`--http-listen`, loopback by default): the
//! Prometheus `/metrics`, and the dashboard at `/ui` — a live service graph (Cytoscape.js,
//! vendored), denials by reason and policy with example requests, the revision timeline
//! with who applied what, active overrides and injected faults with time left, and certificate expiry per
//! workload. Signing in takes an operator token once; the browser then holds only a random
//! session id (HttpOnly, SameSite=Strict cookie) that expires after 12 hours, is revoked on
//! sign-out, and dies with its operator; the token itself never goes into a cookie. The
//! dashboard's API is read-only.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::service::ControlPlane;

type Cp = Arc<ControlPlane>;

const COOKIE: &str = "meshward_session";

/// How long a dashboard session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Signed-in dashboard sessions: SHA-256 of the session id → operator name and expiry.
/// In memory: a restart (or another replica) signs everyone out.
#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: std::sync::Mutex<std::collections::HashMap<String, (String, SystemTime)>>,
}

impl Sessions {
    /// A new session for `operator`: its id (for the cookie).
    fn create(&self, operator: &str, now: SystemTime) -> Option<String> {
        let id = crate::auth::random_secret("mws_");
        if id.is_empty() {
            return None;
        }
        let mut m = self.by_hash.lock().ok()?;
        m.retain(|_, (_, exp)| *exp > now);
        m.insert(
            crate::auth::sha256_hex(&id),
            (operator.to_owned(), now + SESSION_LIFETIME),
        );
        Some(id)
    }

    /// The operator name of a live session.
    fn operator(&self, id: &str, now: SystemTime) -> Option<String> {
        let m = self.by_hash.lock().ok()?;
        m.get(&crate::auth::sha256_hex(id))
            .filter(|(_, exp)| *exp > now)
            .map(|(name, _)| name.clone())
    }

    fn revoke(&self, id: &str) {
        if let Ok(mut m) = self.by_hash.lock() {
            m.remove(&crate::auth::sha256_hex(id));
        }
    }

    /// Live sessions (for tests and status).
    pub fn len(&self) -> usize {
        self.by_hash.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The listener's state: the control plane and the dashboard's sessions.
#[derive(Debug, Clone)]
struct Ui {
    cp: Cp,
    sessions: Arc<Sessions>,
}

impl axum::extract::FromRef<Ui> for Cp {
    fn from_ref(u: &Ui) -> Cp {
        u.cp.clone()
    }
}
static CYTOSCAPE: &[u8] = include_bytes!("../assets/cytoscape.min.js");
static PAGE: &str = include_str!("../assets/dashboard.html");

/// The routes of the plain-HTTP listener.
pub fn router(cp: Cp) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/cytoscape.min.js", get(cytoscape))
        .route("/ui/api/graph", get(graph))
        .route("/ui/api/series", get(series))
        .route("/ui/api/status", get(status))
        .route("/ui/api/history", get(history))
        .route("/ui/api/overrides", get(overrides))
        .route("/ui/api/faults", get(faults))
        .route("/ui/api/rollout", get(rollout))
        .route("/ui/api/quarantines", get(quarantines))
        .route("/ui/api/certificates", get(certificates))
        .with_state(Ui {
            cp,
            sessions: Arc::new(Sessions::default()),
        })
}

/// 200 while the control plane serves proxies: a full disk is reported in the body
/// (`degraded: …`) but stays 200, because taking this replica out of service would stop
/// the renewals it still signs (docs/operations.md).
async fn ready(State(cp): State<Cp>) -> Response {
    match cp.disk_condition() {
        None => "ready\n".into_response(),
        Some(c) => format!("ready\ndegraded: {c}\n").into_response(),
    }
}

async fn metrics(State(cp): State<Cp>) -> Response {
    let text = tokio::task::spawn_blocking(move || cp.metrics_text())
        .await
        .unwrap_or_default();
    (
        [(header::CONTENT_TYPE, meshward_telemetry::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

async fn cytoscape() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        CYTOSCAPE,
    )
        .into_response()
}

/// The session id in the request's cookie.
fn session_id(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
        .map(str::to_owned)
}

/// The operator of the request's live session, if it still is an operator.
fn operator(u: &Ui, h: &HeaderMap) -> Option<crate::auth::Operator> {
    let name = u.sessions.operator(&session_id(h)?, SystemTime::now())?;
    u.cp.operators().by_name(&name).cloned()
}

const LOGIN: &str = r#"<!doctype html><html><head><meta charset="utf-8"><title>Meshward — sign in</title><link rel="icon" href="data:,">
<style>body{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;display:grid;place-items:center;height:100vh;margin:0}
form{background:#1e293b;padding:2rem;border-radius:8px;min-width:24rem}input{width:100%;padding:.5rem;margin:.5rem 0 1rem;box-sizing:border-box}
button{padding:.5rem 1rem}.err{color:#f87171}</style></head><body>
<form method="post" action="/ui/login"><h2>Meshward dashboard</h2>
<label for="token">Operator token (e.g. the contents of DATA/admin.token)</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus>
ERROR<button id="signin" type="submit">Sign in</button></form></body></html>"#;

async fn page(State(u): State<Ui>, h: HeaderMap) -> Response {
    if operator(&u, &h).is_none() {
        return Html(LOGIN.replace("ERROR", "")).into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(u): State<Ui>, Form(f): Form<LoginForm>) -> Response {
    let token = f.token.trim().to_owned();
    let op =
        u.cp.operators()
            .by_token(&token)
            .cloned()
            .or_else(|| u.cp.operators_reloaded(true).by_token(&token).cloned());
    let session = op
        .as_ref()
        .and_then(|op| u.sessions.create(&op.name, SystemTime::now()));
    let Some(id) = session else {
        return (
            StatusCode::UNAUTHORIZED,
            Html(LOGIN.replace(
                "ERROR",
                r#"<p class="err">Unknown token: use an operator's token file.</p>"#,
            )),
        )
            .into_response();
    };
    (
        [(
            header::SET_COOKIE,
            format!(
                "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_LIFETIME.as_secs()
            ),
        )],
        Redirect::to("/ui"),
    )
        .into_response()
}

async fn logout(State(u): State<Ui>, h: HeaderMap) -> Response {
    if let Some(id) = session_id(&h) {
        u.sessions.revoke(&id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/ui"),
    )
        .into_response()
}

fn json_reply<T: serde::Serialize>(r: Result<T, crate::service::Refused>) -> Response {
    match r {
        Ok(v) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(json!(v))).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

/// Runs a read for a signed-in operator.
async fn read<T: serde::Serialize + Send + 'static>(
    u: Ui,
    h: HeaderMap,
    f: impl FnOnce(&ControlPlane) -> Result<T, crate::service::Refused> + Send + 'static,
) -> Response {
    let cp = u.cp.clone();
    if operator(&u, &h).is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "sign in at /ui"})),
        )
            .into_response();
    }
    let r = tokio::task::spawn_blocking(move || f(&cp))
        .await
        .unwrap_or_else(|e| Err(crate::service::Refused::Internal(e.to_string())));
    json_reply(r)
}

#[derive(Debug, Deserialize)]
struct WindowQuery {
    window_secs: Option<u64>,
}

async fn graph(State(u): State<Ui>, h: HeaderMap, Query(q): Query<WindowQuery>) -> Response {
    let window = Duration::from_secs(q.window_secs.unwrap_or(300).max(1));
    read(u, h, move |cp| cp.graph(window, SystemTime::now())).await
}

async fn status(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.status()).await
}

async fn history(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.history()).await
}

async fn overrides(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.overrides()).await
}

async fn rollout(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.rollout_status(SystemTime::now())).await
}

async fn faults(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.faults()).await
}

async fn quarantines(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.quarantines(SystemTime::now())).await
}

async fn certificates(State(u): State<Ui>, h: HeaderMap) -> Response {
    read(u, h, |cp| cp.certificates(SystemTime::now())).await
}

#[derive(serde::Deserialize)]
struct SeriesQuery {
    window_secs: Option<u64>,
    step_secs: Option<u64>,
    source: Option<String>,
    destination: Option<String>,
    node: Option<String>,
    service: Option<String>,
}

async fn series(State(u): State<Ui>, h: HeaderMap, Query(q): Query<SeriesQuery>) -> Response {
    use crate::decisions::SeriesOf;
    let of = match (q.source, q.destination, q.node, q.service) {
        (Some(s), Some(d), None, None) => SeriesOf::Edge(s, d),
        (None, None, Some(n), None) => SeriesOf::Node(n),
        (None, None, None, Some(s)) => SeriesOf::Service(s),
        (None, None, None, None) => SeriesOf::Mesh,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(
                    json!({"error": "give source and destination, or node, or service, or none"}),
                ),
            )
                .into_response();
        }
    };
    let window = Duration::from_secs(q.window_secs.unwrap_or(300).clamp(10, 86_400));
    let step = Duration::from_secs(
        q.step_secs
            .unwrap_or(window.as_secs() / 60)
            .max(window.as_secs() / 1_000)
            .max(1),
    );
    read(u, h, move |cp| {
        cp.series(&of, window, step, SystemTime::now())
    })
    .await
}
