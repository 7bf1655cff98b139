//! `meshward demo-app`: an HTTP echo server that also calls its upstreams in a loop, so the
//! quickstart needs nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// One upstream call: `METHOD URL EVERY`.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub url: String,
    pub every: Duration,
}

/// Parses `[METHOD=]URL[@EVERY]`, e.g. `POST=http://127.0.0.1:15001/charge@2s`.
pub fn parse_call(s: &str) -> Result<Call> {
    let (method, rest) = match s.split_once('=') {
        Some((m, r)) if m.chars().all(|c| c.is_ascii_uppercase()) => (m.to_owned(), r),
        _ => ("GET".to_owned(), s),
    };
    let (url, every) = match rest.rsplit_once('@') {
        Some((u, e)) => (
            u.to_owned(),
            humantime::parse_duration(e).with_context(|| format!("`{e}` is not a duration"))?,
        ),
        None => (rest.to_owned(), Duration::from_secs(2)),
    };
    Ok(Call { method, url, every })
}

pub fn run(listen: &str, name: &str, calls: &[String]) -> Result<ExitCode> {
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen `{listen}` is not ip:port"))?;
    let calls: Vec<Call> = calls.iter().map(|c| parse_call(c)).collect::<Result<_>>()?;
    let name = name.to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        println!("[{name}] demo app listening on {listen}");
        for c in calls {
            let name = name.clone();
            tokio::spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
                loop {
                    tokio::time::sleep(c.every).await;
                    let Ok(req) = hyper::Request::builder().method(c.method.as_str()).uri(&c.url).body(Full::new(Bytes::new())) else { return };
                    match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let text = String::from_utf8_lossy(&body);
                            println!("[{name}] {} {} -> {} {}", c.method, c.url, status.as_u16(), text.chars().take(120).collect::<String>());
                        }
                        Err(e) => println!("[{name}] {} {} -> error: {e}", c.method, c.url),
                    }
                }
            });
        }
        loop {
            let (s, _) = l.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let caller = req.headers().get("x-meshward-peer-identity").and_then(|v| v.to_str().ok()).unwrap_or("unknown").to_owned();
                    let body = serde_json::json!({"service": name, "method": req.method().as_str(), "path": req.uri().to_string(), "caller": caller}).to_string();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
            });
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
