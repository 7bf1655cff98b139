//! The control plane's plain-HTTP listener (`--http-listen`, loopback by default): the
//! Prometheus `/metrics`, and the dashboard at `/ui` — a live service graph (Cytoscape.js,
//! vendored), denials by reason and policy with example requests, the revision timeline
//! with who applied what, active overrides with time left, and certificate expiry per
//! workload. The dashboard needs an operator token (entered once, kept in an HttpOnly,
//! SameSite=Strict cookie); its API is read-only.

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

const COOKIE: &str = "meshward_ui";
static CYTOSCAPE: &[u8] = include_bytes!("../assets/cytoscape.min.js");
static PAGE: &str = include_str!("../assets/dashboard.html");

/// The routes of the plain-HTTP listener.
pub fn router(cp: Cp) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/cytoscape.min.js", get(cytoscape))
        .route("/ui/api/graph", get(graph))
        .route("/ui/api/status", get(status))
        .route("/ui/api/history", get(history))
        .route("/ui/api/overrides", get(overrides))
        .route("/ui/api/certificates", get(certificates))
        .with_state(cp)
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

/// The operator the dashboard cookie names, if any.
fn operator(cp: &ControlPlane, h: &HeaderMap) -> Option<crate::auth::Operator> {
    let token = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))?
        .to_owned();
    cp.operators()
        .by_token(&token)
        .cloned()
        .or_else(|| cp.operators_reloaded(true).by_token(&token).cloned())
}

const LOGIN: &str = r#"<!doctype html><html><head><meta charset="utf-8"><title>Meshward — sign in</title>
<style>body{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;display:grid;place-items:center;height:100vh;margin:0}
form{background:#1e293b;padding:2rem;border-radius:8px;min-width:24rem}input{width:100%;padding:.5rem;margin:.5rem 0 1rem;box-sizing:border-box}
button{padding:.5rem 1rem}.err{color:#f87171}</style></head><body>
<form method="post" action="/ui/login"><h2>Meshward dashboard</h2>
<label for="token">Operator token (e.g. the contents of DATA/admin.token)</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus>
ERROR<button id="signin" type="submit">Sign in</button></form></body></html>"#;

async fn page(State(cp): State<Cp>, h: HeaderMap) -> Response {
    if operator(&cp, &h).is_none() {
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

async fn login(State(cp): State<Cp>, Form(f): Form<LoginForm>) -> Response {
    let token = f.token.trim().to_owned();
    let known = cp.operators().by_token(&token).is_some()
        || cp.operators_reloaded(true).by_token(&token).is_some();
    if !known {
        return (
            StatusCode::UNAUTHORIZED,
            Html(LOGIN.replace(
                "ERROR",
                r#"<p class="err">Unknown token: use an operator's token file.</p>"#,
            )),
        )
            .into_response();
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=43200"),
        )],
        Redirect::to("/ui"),
    )
        .into_response()
}

async fn logout() -> Response {
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
    cp: Cp,
    h: HeaderMap,
    f: impl FnOnce(&ControlPlane) -> Result<T, crate::service::Refused> + Send + 'static,
) -> Response {
    if operator(&cp, &h).is_none() {
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

async fn graph(State(cp): State<Cp>, h: HeaderMap, Query(q): Query<WindowQuery>) -> Response {
    let window = Duration::from_secs(q.window_secs.unwrap_or(300).max(1));
    read(cp, h, move |cp| cp.graph(window, SystemTime::now())).await
}

async fn status(State(cp): State<Cp>, h: HeaderMap) -> Response {
    read(cp, h, |cp| cp.status()).await
}

async fn history(State(cp): State<Cp>, h: HeaderMap) -> Response {
    read(cp, h, |cp| cp.history()).await
}

async fn overrides(State(cp): State<Cp>, h: HeaderMap) -> Response {
    read(cp, h, |cp| cp.overrides()).await
}

async fn certificates(State(cp): State<Cp>, h: HeaderMap) -> Response {
    read(cp, h, |cp| cp.certificates(SystemTime::now())).await
}
