//! Outbound stage 3 for pooled HTTP/1.1, a codec: the fast path. The app's common request
//! — HTTP/1.1, origin-form, no body, no upgrade — is read once (httparse) and written as
//! the app sent it to a mutual-TLS connection of the endpoint chosen for it; the answer is
//! relayed as it comes, all in the app connection's own task. The endpoint choice, the
//! breaker, retries within the budget, per-try and overall timeouts, ejection and the
//! caller's records are the general path's ([`crate::pool`]), with the same settings and
//! the same answers. Everything else — a request with a body, `Expect`, `Upgrade`,
//! HTTP/1.0, an absolute-form target, a head too large or ambiguous — hands the app
//! connection, with the bytes read so far, to the general path (hyper), which serves it
//! from then on.
//!
//! Why: the general path joins a hyper server and a hyper client with a channel and a
//! connection task; per request that was most of the outbound proxy's CPU
//! (docs/benchmarks.md, "Resilient outbound traffic").
#![deny(clippy::disallowed_types)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use meshward_telemetry::trace::RequestSpan;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::endpoint_state::now_ms;
use crate::h1::{
    AppConn, Buf, End, Framing, MAX_HEADERS, ReadErr, RespHead, read_response_head, relay_response,
};
use crate::hygiene::{MAX_HEAD, State0, check_head, has_bare_lf};
use crate::interpret::has_token;
use crate::outbound::{endpoints, event, resilience_of};
use crate::pool::{Pooled, Trail, dial_tls};
use crate::resilience::{Event, RETRY_BODY_CAP};

/// A connection to an endpoint, with its read buffer.
type Up = AppConn<tokio_rustls::client::TlsStream<TcpStream>>;

/// Idle connections kept per endpoint across app connections.
const IDLE_PER_ENDPOINT: usize = 64;

/// How long an idle connection to an endpoint is used again: well within the next proxy's
/// idle timeout (120 s by default), so that a kept connection is rarely found closed.
const IDLE_KEEP: Duration = Duration::from_secs(60);

/// The fast path's idle connections by endpoint, shared by the app connections of one
/// upstream: a bounded lock-free queue per endpoint, the map copied on write (a new
/// endpoint). Each app connection keeps the ones it uses ([`Local`]) and hands them here
/// when it closes.
#[derive(Debug, Default)]
pub struct Idle(ArcSwap<HashMap<SocketAddr, Arc<IdleQueue>>>);

/// One endpoint's idle connections, with when each became idle.
type IdleQueue = ArrayQueue<(Instant, Up)>;

impl Idle {
    fn take(&self, addr: SocketAddr) -> Option<(Instant, Up)> {
        let q = self.0.load().get(&addr).cloned()?;
        while let Some((since, c)) = q.pop() {
            if since.elapsed() < IDLE_KEEP {
                return Some((since, c));
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, since: Instant, c: Up) {
        let q = match self.0.load().get(&addr) {
            Some(q) => q.clone(),
            None => {
                self.0.rcu(|m| {
                    let mut m = HashMap::clone(m);
                    m.entry(addr)
                        .or_insert_with(|| Arc::new(ArrayQueue::new(IDLE_PER_ENDPOINT)));
                    m
                });
                let Some(q) = self.0.load().get(&addr).cloned() else {
                    return;
                };
                q
            }
        };
        // A full queue: this one is closed (dropped).
        let _ = q.push((since, c));
    }
}

/// One app connection's connections to endpoints (when each became idle), given to the
/// shared [`Idle`] at its end.
struct Local<'a> {
    conns: Vec<(SocketAddr, Instant, Up)>,
    idle: &'a Idle,
}

impl Local<'_> {
    /// An open idle connection to `addr`, if there is one.
    fn take(&mut self, addr: SocketAddr) -> Option<Up> {
        loop {
            let (since, mut c) = match self.conns.iter().position(|(a, ..)| *a == addr) {
                Some(i) => {
                    let (_, since, c) = self.conns.swap_remove(i);
                    (since, c)
                }
                None => self.idle.take(addr)?,
            };
            if since.elapsed() < IDLE_KEEP && still_open(&mut c) {
                return Some(c);
            }
        }
    }

    fn put(&mut self, addr: SocketAddr, c: Up) {
        self.conns.push((addr, Instant::now(), c));
    }
}

impl Drop for Local<'_> {
    fn drop(&mut self) {
        for (a, since, c) in self.conns.drain(..) {
            self.idle.put(a, since, c);
        }
    }
}

/// Whether an idle connection is still open: nothing to read on it, not even its end (the
/// endpoint closed it, or sent bytes no request asked for). One poll, never waiting.
fn still_open(c: &mut Up) -> bool {
    if !c.buf.bytes().is_empty() {
        return false;
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut byte = [0u8; 1];
    let mut rb = ReadBuf::new(&mut byte);
    matches!(
        Pin::new(&mut c.io).poll_read(&mut cx, &mut rb),
        Poll::Pending
    )
}

/// How an attempt failed without an answer.
enum Fail {
    /// The per-try or the overall timeout passed.
    Timeout,
    /// `true`: no connection (nothing was sent); the error.
    Error(bool, String),
    /// The app's connection failed (relaying an interim response).
    App,
}

/// How a request ended.
enum Answer {
    /// The endpoint's answer was relayed; `close`: the app connection closes after it.
    Relayed(u16, bool),
    /// The caller's sidecar answers itself: status, reason, message.
    Own(u16, &'static str, String),
    /// The app connection failed, or the answer broke off: close it.
    Gone,
}

/// Serves the app's HTTP/1.1 requests on `app` until it closes or a request needs the
/// general path.
pub(crate) async fn serve(p: &Pooled, idle: &Idle, app: &mut TcpStream) -> End {
    let mut buf = Buf::default();
    let mut local = Local {
        conns: Vec::new(),
        idle,
    };
    let mut traced_head: Vec<u8> = Vec::new();
    let service = p.up.service.to_string();
    loop {
        let end = loop {
            if let Some(e) = buf.head_end() {
                break e;
            }
            let pending = buf.bytes();
            if pending.len() > MAX_HEAD || has_bare_lf(None, pending) {
                return End::Handoff(buf.into_vec());
            }
            match buf.fill(app).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            }
        };
        let head = &buf.bytes()[..end];
        if end > MAX_HEAD || !matches!(check_head(head), Ok(State0::Length(0))) {
            // A body, or a head the general path is to read (or refuse).
            return End::Handoff(buf.into_vec());
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hs);
        let (Ok(httparse::Status::Complete(_)), Some(method), Some(target), Some(1)) =
            (req.parse(head), req.method, req.path, req.version)
        else {
            return End::Handoff(buf.into_vec());
        };
        let (mut close, mut plain) = (false, method != "CONNECT" && target.starts_with('/'));
        let mut hop = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection") {
                hop = true;
                close |= has_token(h.value, "close");
                plain &= !has_token(h.value, "upgrade");
            } else if h.name.eq_ignore_ascii_case("upgrade")
                || h.name.eq_ignore_ascii_case("expect")
            {
                plain = false;
            } else if h.name.eq_ignore_ascii_case("keep-alive") {
                hop = true;
            }
        }
        let Ok(m) = hyper::Method::from_bytes(method.as_bytes()) else {
            return End::Handoff(buf.into_vec());
        };
        if !plain {
            return End::Handoff(buf.into_vec());
        }
        // The head goes as the app sent it, but for the hop-by-hop headers (`Connection`,
        // `Keep-Alive` and those `Connection` names: the app's `close` ends the app
        // connection, not the upstream one) and, with tracing on, with this proxy's span
        // as the trace context.
        let span = RequestSpan::start_client_raw(
            p.shared.tracer.get(),
            req.headers.iter().map(|h| (h.name, h.value)),
            method,
            target.split('?').next().unwrap_or(target),
            &service,
        );
        let traced = span.is_recording();
        let out: &[u8] = if traced || hop {
            traced_head.clear();
            let line = head.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1);
            traced_head.extend_from_slice(&head[..line]);
            let named = |name: &str| {
                req.headers
                    .iter()
                    .any(|c| c.name.eq_ignore_ascii_case("connection") && has_token(c.value, name))
            };
            for h in req.headers.iter() {
                let hop_header = h.name.eq_ignore_ascii_case("connection")
                    || h.name.eq_ignore_ascii_case("keep-alive")
                    || (hop && named(h.name));
                let replaced = traced && RequestSpan::is_context_header(h.name);
                if !(hop_header || replaced) {
                    traced_head.extend_from_slice(h.name.as_bytes());
                    traced_head.extend_from_slice(b": ");
                    traced_head.extend_from_slice(h.value);
                    traced_head.extend_from_slice(b"\r\n");
                }
            }
            span.inject_with(|k, v| {
                traced_head.extend_from_slice(k.as_bytes());
                traced_head.extend_from_slice(b": ");
                traced_head.extend_from_slice(v.as_bytes());
                traced_head.extend_from_slice(b"\r\n");
            });
            traced_head.extend_from_slice(b"\r\n");
            &traced_head
        } else {
            head
        };
        let mut trail = Trail::default();
        let answer = exchange(p, &mut local, app, out, &m, target, &mut trail).await;
        let noted = match &answer {
            Answer::Own(status, reason, msg) => Some((Some((*reason, msg.as_str())), *status)),
            Answer::Relayed(status, _) => Some((None, *status)),
            // The app left, or the answer broke off: nothing to say of the service.
            Answer::Gone => None,
        };
        if let Some((own, status)) = noted {
            p.note(own, status, &trail, method, target, || {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_owned)
            });
        }
        span.finish(noted.map_or(499, |(_, s)| s));
        let closing = match answer {
            Answer::Relayed(_, c) => close || c,
            Answer::Own(status, reason, msg) => {
                !write_own(app, status, reason, &msg, close).await || close
            }
            Answer::Gone => true,
        };
        buf.consume(end);
        if closing {
            let _ = app.shutdown().await;
            return End::Closed;
        }
    }
}

/// One request's attempts, as [`Pooled`]'s general path makes them (its `attempts`): the
/// breaker admits it; each attempt chooses an endpoint, is sent with the per-try timeout and
/// its outcome counts for the endpoint; a failure is tried again when the retry settings,
/// the method and the budget allow it. A refusal by the next proxy's policy is never the
/// endpoint's fault and never retried. The answer chosen is relayed to `app` here.
async fn exchange(
    p: &Pooled,
    local: &mut Local<'_>,
    app: &mut TcpStream,
    head: &[u8],
    method: &hyper::Method,
    target: &str,
    trail: &mut Trail,
) -> Answer {
    let (shared, up) = (&p.shared, &p.up);
    let started = Instant::now();
    let eps = endpoints(shared, up);
    let (res, caller, fallback) = resilience_of(shared, &up.service, up.port, false);
    let settings = &res.settings;
    let per = settings.for_request(method, target);
    let deadline = per.timeout.map(|t| started + t);
    let Some(place) = res.state.admit(&settings.breaker, true, per.timeout).await else {
        event(shared, &up.service, Event::CircuitOpen, "");
        return Answer::Own(
            503,
            "circuit_open",
            format!("{}: circuit open (circuitBreaker caps reached)", up.service),
        );
    };
    res.state.budget().request(now_ms());
    let retry = per.retry;
    let budget = retry
        .cloned()
        .unwrap_or_else(crate::resilience::default_budget);
    // Without retries, a connect failure (nothing was sent) still goes to another endpoint:
    // connect-time failover. (No body: every attempt can send the request again.)
    let max_attempts = 1 + retry.map_or(crate::outbound::CONNECT_ATTEMPTS - 1, |r| r.attempts);
    let per_try = retry.and_then(|r| r.per_try_timeout);
    let head_only = method == hyper::Method::HEAD;
    let idempotent = crate::resilience::idempotent(method);
    let mut avoid = None;
    let mut last_connect: Option<String> = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let Some((choice, ev)) =
            crate::resilience::choose(&eps, fallback.as_deref(), caller.as_ref(), settings, avoid)
        else {
            return Answer::Own(
                503,
                "no_endpoint",
                format!("no endpoint for {}:{}", up.service, up.port),
            );
        };
        if let Some(ev) = ev {
            let detail = format!("trying {}", choice.endpoint.key);
            event(shared, &up.service, ev, &detail);
        }
        let ep = choice.endpoint;
        let addr = ep.addr();
        if let Some(e) = &last_connect
            && Some(addr) == avoid
        {
            // Connect-time failover found no other endpoint: the failure stands.
            return Answer::Own(
                502,
                "upstream_failed",
                format!(
                    "{} ({addr}) did not answer: {e} ({} attempt(s))",
                    up.service,
                    attempt - 1
                ),
            );
        }
        (trail.endpoint, trail.attempts) = (Some(addr), attempt);
        ep.state.started();
        let load = ep.state.begin();
        let t0 = Instant::now();
        let limit = match (per_try.map(|p| t0 + p), deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // With retries, a small answer is read whole before it is passed on, so an endpoint
        // that dies mid-answer is one more failed attempt, not a truncated response.
        let whole = retry.is_some() && attempt < max_attempts;
        let sent = send(p, local, addr, head, head_only, idempotent, whole, app);
        let outcome = match limit {
            Some(l) => tokio::time::timeout_at(l, sent)
                .await
                .unwrap_or(Err(Fail::Timeout)),
            None => sent.await,
        };
        let now = now_ms();
        let can_retry = attempt < max_attempts;
        match outcome {
            Ok((mut conn, r)) => {
                let status = r.status;
                ep.state.observe(now, t0.elapsed().as_nanos() as f64);
                let refused = r.refused && matches!(status, 400 | 403 | 429);
                let failed = status >= 500 && !refused;
                if failed {
                    p.failed(choice.set, ep, settings, &format!("answered {status}"));
                } else {
                    ep.state.succeeded(now, &settings.outlier);
                }
                let again =
                    failed && can_retry && retry.is_some_and(|x| x.on.statuses.contains(&status));
                if !again || !p.take_retry(&res, &budget) {
                    let keep = r.keep;
                    let relayed = relay_response(app, &mut conn, r.end, r.framing, !keep).await;
                    drop((load, place));
                    return match relayed {
                        Ok(close) => {
                            if !close && conn.buf.bytes().is_empty() {
                                local.put(addr, conn);
                            }
                            Answer::Relayed(status, close)
                        }
                        Err(_) => Answer::Gone,
                    };
                }
            }
            Err(Fail::Timeout) => {
                p.failed(choice.set, ep, settings, "timed out");
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    event(shared, &up.service, Event::Timeout, "");
                    return Answer::Own(
                        504,
                        "timeout",
                        format!(
                            "{} did not answer within the timeout ({:?}; {attempt} attempt(s))",
                            up.service,
                            per.timeout.unwrap_or_default()
                        ),
                    );
                }
                event(shared, &up.service, Event::PerTryTimeout, "");
                let again = can_retry && retry.is_some_and(|r| r.on.timeout);
                if !again || !p.take_retry(&res, &budget) {
                    return Answer::Own(
                        504,
                        "timeout",
                        format!(
                            "{} ({addr}) did not answer within the per-try timeout ({:?}; {attempt} attempt(s))",
                            up.service,
                            per_try.unwrap_or_default()
                        ),
                    );
                }
            }
            Err(Fail::Error(connect, e)) => {
                p.failed(choice.set, ep, settings, &e);
                // Only a connect failure without retry settings insists on another
                // endpoint; configured retries may go back to the same one.
                last_connect = (connect && retry.is_none()).then(|| e.clone());
                let again = can_retry && crate::resilience::retry_on_error(retry, connect);
                if !again || !p.take_retry(&res, &budget) {
                    return Answer::Own(
                        502,
                        "upstream_failed",
                        format!(
                            "{} ({addr}) did not answer: {e} ({attempt} attempt(s))",
                            up.service
                        ),
                    );
                }
            }
            Err(Fail::App) => return Answer::Gone,
        }
        avoid = Some(addr);
    }
}

/// Sends `head` to `addr` on an idle connection of its (a new one when there is none) and
/// reads the answer's head — and, `whole`, a small body too. A kept connection the endpoint
/// closed meanwhile (no byte of an answer) is not the endpoint's failure: an idempotent
/// request goes again on a new connection.
#[allow(clippy::too_many_arguments)]
async fn send(
    p: &Pooled,
    local: &mut Local<'_>,
    addr: SocketAddr,
    head: &[u8],
    head_only: bool,
    idempotent: bool,
    whole: bool,
    app: &mut TcpStream,
) -> Result<(Up, RespHead), Fail> {
    let mut reused = local.take(addr);
    loop {
        let fresh = reused.is_none();
        let mut conn = match reused.take() {
            Some(c) => c,
            None => AppConn {
                io: dial_tls(&p.shared, &p.up, addr)
                    .await
                    .map_err(|e| Fail::Error(true, e.to_string()))?,
                buf: Buf::default(),
            },
        };
        let got = match conn.io.write_all(head).await {
            Ok(()) => read_response_head(&mut conn, app, head_only).await,
            Err(e) => Err(ReadErr::Closed(e.to_string())),
        };
        let r = match got {
            Ok(r) => r,
            Err(ReadErr::Closed(_)) if !fresh && idempotent => continue,
            Err(ReadErr::Closed(e) | ReadErr::Bad(e)) => return Err(Fail::Error(false, e)),
            Err(ReadErr::Peer) => return Err(Fail::App),
        };
        if whole
            && let Framing::Length(n) = r.framing
            && n <= RETRY_BODY_CAP as u64
        {
            let want = r.end + n as usize;
            while conn.buf.bytes().len() < want {
                match conn.buf.fill(&mut conn.io).await {
                    Ok(0) => {
                        return Err(Fail::Error(
                            false,
                            "the endpoint closed the connection mid-answer".into(),
                        ));
                    }
                    Err(e) => return Err(Fail::Error(false, e.to_string())),
                    Ok(_) => {}
                }
            }
        }
        return Ok((conn, r));
    }
}

/// Writes an answer of the caller's own sidecar, as the general path's: the status, the
/// JSON reason and the `x-meshward-refused` header. Whether it was written.
async fn write_own(app: &mut TcpStream, status: u16, reason: &str, msg: &str, close: bool) -> bool {
    let body = serde_json::json!({"error": msg, "reason": reason}).to_string();
    let phrase = hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let head = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}: {reason}\r\n{}\r\n",
        body.len(),
        crate::rescue::REFUSED_HEADER,
        if close { "connection: close\r\n" } else { "" }
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body.as_bytes());
    app.write_all(&msg).await.is_ok() && app.flush().await.is_ok()
}

/// An app connection handed to the general path: the bytes the fast path read first, then
/// the connection.
#[derive(Debug)]
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Prefixed {
    pub fn new(inner: TcpStream, prefix: Vec<u8>) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.prefix.len() {
            let n = buf.remaining().min(me.prefix.len() - me.pos);
            buf.put_slice(&me.prefix[me.pos..me.pos + n]);
            me.pos += n;
            if me.pos == me.prefix.len() {
                me.prefix = Vec::new();
                me.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}
