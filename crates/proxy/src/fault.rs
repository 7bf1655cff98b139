//! Inbound stage 4, step 7 of the request gate: the `FaultInjection`s that target this
//! workload (docs/faults.md). A fault is drawn only for a request (on a TCP port: a
//! connection) that policy allowed and no rate limit refused, so a fault never lets
//! through what policy denies, and it never applies past its `expiresAt`.
//!
//! Each fault whose scope matches (`from`: the verified source, as a rule's `from`;
//! `to`: ports, methods, paths, hosts, as a rule's `to` — HTTP fields never match a TCP
//! connection) draws its delay and its abort independently at their percentages; the
//! first drawn delay and the first drawn abort apply (configuration order). The delay is
//! waited before the request goes on; the abort then answers in the app's place:
//! - `httpStatus`: that status with a JSON body and `x-meshward-fault` (never the
//!   refusal header, so the caller's sidecar takes it for the endpoint's answer: its
//!   retries, budget and outlier detection react as they would to a failing replica —
//!   that is what a drill rehearses);
//! - `grpcStatus`: a trailers-only gRPC answer with that status (gRPC requests only);
//! - `tcpReset`: the connection is reset (HTTP/2: the stream), nothing answered.
#![deny(clippy::disallowed_types)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use meshward_policy::decision::{Request, WorkloadRef};
use meshward_policy::model::{Operation, Other, PolicySet, SourceMatch};
use meshward_policy::reference::{operation_matches, source_matches};
use meshward_policy::resource::{Action, FaultInjectionSpec, grpc_status_code};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::rescue::Body;

/// The header on every answer an injected abort makes, its value the `FaultInjection`.
pub const FAULT_HEADER: &str = "x-meshward-fault";

/// How an injected abort ends the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u8),
    Reset,
}

impl Abort {
    /// The metric's `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Abort::Http(_) => "abort_http",
            Abort::Grpc(_) => "abort_grpc",
            Abort::Reset => "reset",
        }
    }
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abort::Http(s) => write!(f, "abort {s}"),
            Abort::Grpc(c) => write!(f, "abort grpc-status {c}"),
            Abort::Reset => f.write_str("reset"),
        }
    }
}

/// One `FaultInjection`, compiled for this workload.
#[derive(Debug)]
struct Fault {
    id: Arc<str>,
    from: Option<SourceMatch>,
    to: Vec<Operation>,
    /// The delay and its draw threshold (a random u64 below it: injected).
    delay: Option<(Duration, u64)>,
    abort: Option<(Abort, u64)>,
    expires: SystemTime,
}

/// The faults of one revision for this workload (in the view).
#[derive(Debug, Default)]
pub struct Faults {
    faults: Vec<Fault>,
}

/// What was drawn for one request: the delay and the abort, each with its fault.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    pub delay: Option<(Arc<str>, Duration)>,
    pub abort: Option<(Arc<str>, Abort)>,
}

impl Injected {
    /// Waits the drawn delay, if any.
    pub async fn wait(&self) {
        if let Some((_, d)) = &self.delay {
            tokio::time::sleep(*d).await;
        }
    }

    /// What the decision record says of it.
    pub fn detail(&self) -> String {
        let mut parts = vec![];
        if let Some((id, d)) = &self.delay {
            parts.push(format!(
                "fault {id}: delay {}",
                humantime::format_duration(*d)
            ));
        }
        if let Some((id, a)) = &self.abort {
            parts.push(format!("fault {id}: {a}"));
        }
        parts.join("; ")
    }
}

/// A percentage as a draw threshold over u64 (100: every draw).
fn threshold(percent: f64) -> u64 {
    if percent >= 100.0 {
        u64::MAX
    } else if percent > 0.0 {
        // Below 2^64 by the bound above (the cast saturates, never wraps).
        (percent / 100.0 * 18_446_744_073_709_551_616.0) as u64
    } else {
        0
    }
}

fn drawn(threshold: u64) -> bool {
    threshold == u64::MAX || crate::balance::random() < threshold
}

impl Faults {
    /// Compiles the `FaultInjection`s that target this workload (the view has selected
    /// them; a loaded set has validated them, so an entry that does not compile is never
    /// here — and would be skipped, injecting nothing).
    pub fn compile(specs: &[Other<FaultInjectionSpec>]) -> Faults {
        let mut faults = vec![];
        for f in specs {
            let s = &f.spec;
            let from = match &s.from {
                Some(x) => match SourceMatch::of_valid(x) {
                    Some(m) => Some(m),
                    None => continue,
                },
                None => None,
            };
            let Ok(to) =
                s.to.iter()
                    .map(Operation::parse)
                    .collect::<Result<Vec<_>, _>>()
            else {
                continue;
            };
            let abort = match &s.abort {
                None => None,
                Some(a) => {
                    let how = match (a.http_status, &a.grpc_status, a.tcp_reset) {
                        (Some(c), None, false) => Abort::Http(c),
                        (None, Some(g), false) => match grpc_status_code(g) {
                            Some(c) => Abort::Grpc(c),
                            None => continue,
                        },
                        (None, None, true) => Abort::Reset,
                        _ => continue,
                    };
                    Some((how, threshold(a.percent)))
                }
            };
            faults.push(Fault {
                id: f.id.clone(),
                from,
                to,
                delay: s.delay.as_ref().map(|d| (d.fixed.0, threshold(d.percent))),
                abort,
                expires: s.expires_at.0,
            });
        }
        Faults { faults }
    }

    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// The faults drawn for `req` (allowed already) at `workload`; `grpc`: a gRPC request
    /// (a `grpcStatus` abort applies only to those). None when nothing was drawn.
    pub fn draw(
        &self,
        req: &Request,
        set: &PolicySet,
        workload: &WorkloadRef,
        grpc: bool,
        now: SystemTime,
    ) -> Option<Injected> {
        static NONE: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        let mut out = Injected::default();
        let source = req.source.identity();
        for f in &self.faults {
            if now >= f.expires {
                continue;
            }
            if let Some(m) = &f.from {
                let src = source
                    .and_then(|s| set.workload_by_identity(s))
                    .map_or(&NONE, |w| &w.attributes);
                let dst = set.workload(workload).map_or(&NONE, |w| &w.attributes);
                if !source_matches(m, source, src, dst, set.mesh.trust_domain.as_str()) {
                    continue;
                }
            }
            // As an ALLOW rule's `to`: an HTTP field never matches a TCP connection.
            if !f.to.is_empty()
                && !f
                    .to
                    .iter()
                    .any(|o| operation_matches(o, Action::Allow, req))
            {
                continue;
            }
            if out.delay.is_none()
                && let Some((d, t)) = f.delay
                && drawn(t)
            {
                out.delay = Some((f.id.clone(), d));
            }
            if out.abort.is_none()
                && let Some((a, t)) = f.abort
                && applies(a, req, grpc)
                && drawn(t)
            {
                out.abort = Some((f.id.clone(), a));
            }
        }
        (out.delay.is_some() || out.abort.is_some()).then_some(out)
    }
}

/// Whether an abort can end `req`: a status needs HTTP (a gRPC status, a gRPC request); a
/// reset ends anything.
fn applies(a: Abort, req: &Request, grpc: bool) -> bool {
    match a {
        Abort::Http(_) => req.http.is_some(),
        Abort::Grpc(_) => req.http.is_some() && grpc,
        Abort::Reset => true,
    }
}

/// The JSON body of an injected HTTP abort.
fn body(fault: &str, status: u16) -> String {
    serde_json::json!({"fault": fault, "injected": "abort", "status": status}).to_string()
}

/// The answer of an injected abort on the general path (hyper); `None` for a reset.
pub fn answer(fault: &str, abort: Abort) -> Option<Response<Body>> {
    let marked = HeaderValue::from_str(fault).ok()?;
    let mut r = match abort {
        Abort::Reset => return None,
        Abort::Http(status) => {
            let mut r = Response::new(full(body(fault, status)));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r
        }
        Abort::Grpc(code) => {
            let mut r = Response::new(full(String::new()));
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(u16::from(code)));
            if let Ok(v) = HeaderValue::from_str(&format!("fault injected by {fault}")) {
                h.insert("grpc-message", v);
            }
            r
        }
    };
    r.headers_mut().insert(FAULT_HEADER, marked);
    Some(r)
}

/// The answer of an injected HTTP abort on the HTTP/1.1 fast path; false when the peer is
/// gone.
pub async fn write_h1<S: AsyncWrite + Unpin>(
    stream: &mut S,
    fault: &str,
    status: u16,
    close: bool,
) -> bool {
    let body = body(fault, status);
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{FAULT_HEADER}: {fault}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    stream.write_all(msg.as_bytes()).await.is_ok() && stream.flush().await.is_ok()
}

/// Resets `tcp` when it is dropped (SO_LINGER 0: RST instead of FIN).
pub fn reset_on_close(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// The general path's service error that makes hyper drop the request without an answer
/// (HTTP/1: the connection closes; HTTP/2: the stream is reset); as a response extension,
/// the mark of [`reset`].
#[derive(Debug, Clone, Copy)]
pub struct ResetStream;

/// The general path's stand-in for an injected reset: an empty response marked with
/// [`ResetStream`], which the connection's service turns into its error.
pub fn reset() -> Response<Body> {
    let mut r = Response::new(full(String::new()));
    r.extensions_mut().insert(ResetStream);
    r
}

impl std::fmt::Display for ResetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset by an injected fault")
    }
}

impl std::error::Error for ResetStream {}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_cover_the_percentages() {
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(100.0), u64::MAX);
        assert_eq!(threshold(50.0), 1 << 63);
        let n = 200_000;
        let hits = (0..n).filter(|_| drawn(threshold(10.0))).count();
        // 10 % of 200,000 with a 99.9 % binomial interval (± 3.29 σ, σ ≈ 134).
        assert!((19_558..=20_442).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| drawn(threshold(0.0))));
        assert!((0..1000).all(|_| drawn(threshold(100.0))));
    }
}
