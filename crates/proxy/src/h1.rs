//! Inbound stage 3b, a codec: the HTTP/1.1 fast path. The common request — HTTP/1.1, no
//! body, no upgrade — relayed between the peer's TLS stream and one app connection in a
//! single task, the request head checked ([`crate::hygiene::check_head`]), parsed
//! (httparse), passed through the request gate ([`crate::gate`]), rewritten (normalized
//! target, verified identity) and the response relayed as it comes. Everything else — a
//! request with a body, `Expect`, `Upgrade`, HTTP/1.0, a head too large — hands the
//! connection, with the bytes read so far, to the general path (hyper), which serves it
//! from then on. With tracing on, the fast path carries the request's span itself, so
//! tracing never changes the path a request takes.
//!
//! Why: at 1,000 requests per second the general path's server and client tasks, header
//! maps and channels were most of the inbound proxy's user-space time (docs/proxy.md has
//! the measurements).
#![deny(clippy::disallowed_types)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use meshward_identity::SpiffeId;
use meshward_telemetry::trace::RequestSpan;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock::Expired;
use crate::gate::{Admitted, Answered, Gate, Head, Stop};
use crate::hygiene::{ChunkedEnd, MAX_HEAD, State0, check_head, head_end};
use crate::inbound::{IDENTITY_HEADER, InboundPort};
use crate::interpret::{self, Version, has_token, split_target};
use crate::rescue::{Refused, Status};
use crate::state::Shared;
use crate::transport::Connector;

/// The most headers in a request or response head (as the general path's `max_headers`).
pub(crate) const MAX_HEADERS: usize = 100;

/// How a connection left the fast path.
#[derive(Debug)]
pub enum End {
    /// Closed (by the peer, after `Connection: close`, or refused).
    Closed,
    /// The next request needs the general path: these bytes, already read, start it.
    Handoff(Vec<u8>),
    /// An injected fault resets the connection (crate::fault): the caller drops it with
    /// an RST.
    Reset,
}

/// A read buffer with a consumed prefix.
#[derive(Debug, Default)]
pub(crate) struct Buf {
    data: Vec<u8>,
    pos: usize,
}

impl Buf {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.data.len() {
            self.data.clear();
            self.pos = 0;
        }
    }

    /// Reads more; `Ok(0)` at end of stream.
    pub(crate) async fn fill(
        &mut self,
        io: &mut (impl AsyncRead + Unpin),
    ) -> std::io::Result<usize> {
        if self.pos > 0 && self.data.capacity() - self.data.len() < 4096 {
            self.data.drain(..self.pos);
            self.pos = 0;
        }
        self.data.reserve(8192);
        io.read_buf(&mut self.data).await
    }

    /// The end of the head at the start of the buffer (after CRLF CRLF), skipping the empty
    /// lines allowed before a request.
    pub(crate) fn head_end(&mut self) -> Option<usize> {
        let skip = self
            .bytes()
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        self.consume(skip);
        head_end(self.bytes())
    }

    pub(crate) fn into_vec(mut self) -> Vec<u8> {
        self.data.drain(..self.pos);
        self.data
    }
}

/// The fast path's head deadline on one timer per connection, re-armed lazily: a later
/// deadline only moves `due`, and the timer, when it fires before `due`, is set to it then.
/// A keep-alive connection busy with requests so touches the runtime's timer wheel about
/// once per idle timeout, not once per request (a new timer per read cost CPU per request:
/// docs/benchmarks.md, "Run of 2026-12-02").
#[derive(Debug)]
struct HeadClock {
    timer: Pin<Box<tokio::time::Sleep>>,
    /// When the timer fires.
    armed: tokio::time::Instant,
    due: tokio::time::Instant,
    kind: Expired,
}

impl HeadClock {
    fn new(due: tokio::time::Instant, kind: Expired) -> Self {
        HeadClock {
            timer: Box::pin(tokio::time::sleep_until(due)),
            armed: due,
            due,
            kind,
        }
    }

    fn set(&mut self, due: tokio::time::Instant, kind: Expired) {
        self.due = due;
        self.kind = kind;
        if due < self.armed {
            self.timer.as_mut().reset(due);
            self.armed = due;
        }
    }

    /// `fut`'s output, or `None` when the deadline passes first.
    async fn run<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                if self.armed >= self.due {
                    return Poll::Ready(None);
                }
                // Fired early: the deadline has moved since it was armed.
                self.timer.as_mut().reset(self.due);
                self.armed = self.due;
            }
            Poll::Pending
        })
        .await
    }
}

/// A connection this proxy sends requests on, with its read buffer: the app connection
/// of an inbound connection, or (outbound, [`crate::h1_out`]) a connection to an endpoint.
#[derive(Debug)]
pub(crate) struct AppConn<I = TcpStream> {
    pub(crate) io: I,
    pub(crate) buf: Buf,
}

/// Serves HTTP/1.1 requests from `stream` until it closes or a request needs the general
/// path.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    port: InboundPort,
    peer: &SpiffeId,
    stream: &mut S,
    expiry: crate::expiry::Expiry,
) -> End {
    let mut buf = Buf::default();
    let mut app: Option<AppConn> = None;
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let limits = shared.limits();
    let mut gate = Gate::new(shared, port, peer, true);
    let mut clock = HeadClock::new(
        tokio::time::Instant::now() + limits.header_read,
        Expired::HeaderRead,
    );
    let mut first = true;
    loop {
        // At its certificates' expiry (crate::expiry) the connection closes between
        // requests: after the response in progress, or at once while idle.
        if expiry.passed() {
            shared.log.metrics.connection_expired(expiry.why);
            let _ = stream.shutdown().await;
            return End::Closed;
        }
        // A request head, in time (crate::clock has the same rules for the general path):
        // the first within the header-read timeout of the handshake; a later one may wait
        // the idle timeout for its first byte, then has the header-read timeout.
        if !first {
            clock.set(tokio::time::Instant::now() + limits.idle, Expired::Idle);
        }
        if expiry.at < clock.due {
            clock.set(expiry.at, Expired::Certificate);
        }
        let end = loop {
            if let Some(e) = buf.head_end() {
                break e;
            }
            let pending = buf.bytes();
            if pending.len() > MAX_HEAD || crate::hygiene::has_bare_lf(None, pending) {
                // Too large or ambiguous: the general path answers (431) or refuses it.
                return End::Handoff(buf.into_vec());
            }
            if clock.kind == Expired::Idle && !pending.is_empty() {
                let now = tokio::time::Instant::now();
                clock.set(now + limits.header_read, Expired::HeaderRead);
            }
            match clock.run(buf.fill(stream)).await {
                None if clock.kind == Expired::Certificate => {
                    // Idle at the end (a head begun meanwhile is not one in progress).
                    shared.log.metrics.connection_expired(expiry.why);
                    let _ = stream.shutdown().await;
                    return End::Closed;
                }
                None => {
                    shared.log.metrics.connection_timeout(clock.kind.as_str());
                    return End::Closed;
                }
                Some(Ok(0) | Err(_)) => return End::Closed,
                Some(Ok(_)) => {}
            }
        };
        first = false;
        let t0 = Instant::now();
        let head = &buf.bytes()[..end];
        if end > MAX_HEAD || !matches!(check_head(head), Ok(State0::Length(0))) {
            // A body, or a head hygiene refuses: the general path carries or refuses it.
            return End::Handoff(buf.into_vec());
        }
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hs);
        let (Ok(httparse::Status::Complete(_)), Some(method), Some(target), Some(1)) =
            (req.parse(head), req.method, req.path, req.version)
        else {
            return End::Handoff(buf.into_vec());
        };
        if method == "CONNECT" {
            // A tunnel: the general path relays it, when a rule names it.
            return End::Handoff(buf.into_vec());
        }
        // The request gate, as for every codec (crate::gate): the same reading of the
        // head as the general path's, the path normalized, the decision, the record of a
        // refusal. The span (tracing on) is the general path's too.
        let (authority, origin) = split_target(target);
        let span = RequestSpan::start_raw(
            shared.tracer.get(),
            req.headers.iter().map(|h| (h.name, h.value)),
            method,
            origin.split('?').next().unwrap_or(origin),
        );
        let checked = gate.check(
            Head {
                version: Version::Http11,
                method,
                target: origin,
                authority,
                headers: || req.headers.iter().map(|h| (h.name, h.value)),
                fast: true,
            },
            &span,
        );
        let Admitted {
            preq,
            d,
            target,
            facts,
            under,
            permit,
            fault,
        } = match checked {
            Ok(a) => a,
            Err(Stop::Handoff) => return End::Handoff(buf.into_vec()),
            Err(Stop::Refused(r)) => {
                let close = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("connection") && has_token(h.value, "close")
                });
                let ok = r.write_h1(stream, close).await;
                let status = r.status.http().as_u16();
                done(shared, status, t0);
                span.finish(status);
                buf.consume(end);
                if close || !ok {
                    return End::Closed;
                }
                continue;
            }
        };
        let close = facts.close;
        // An injected fault (crate::fault): its delay first, then its abort in the app's
        // place.
        if let Some(f) = &fault {
            f.wait().await;
            if let Some((id, abort)) = &f.abort {
                buf.consume(end);
                gate.forwarded(&preq, &d, Answered::aborted(t0.elapsed(), *abort), Some(f));
                drop(permit);
                let crate::fault::Abort::Http(status) = *abort else {
                    drop(span);
                    return End::Reset;
                };
                let ok = crate::fault::write_h1(stream, id, status, close).await;
                done(shared, status, t0);
                span.finish(status);
                if close || !ok {
                    return End::Closed;
                }
                continue;
            }
        }
        // The head for the app: the normalized target, the verified identity (any copy
        // the peer sent is dropped), this proxy's span (tracing on), everything else as
        // sent.
        let traced = span.is_recording();
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for h in req.headers.iter() {
            // (Nothing to drop in the common request: one comparison per header.)
            if (!facts.strips || interpret::forwarded(h.name, under))
                && !(traced && RequestSpan::is_context_header(h.name))
            {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(IDENTITY_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(peer.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        if !facts.host_header {
            // An absolute-form target's authority (what policy saw) as `Host`.
            out.extend_from_slice(b"host: ");
            match facts.host {
                Some(h) => out.extend_from_slice(h.as_bytes()),
                None => out.extend_from_slice(port.app.to_string().as_bytes()),
            }
            out.extend_from_slice(b"\r\n");
        }
        span.inject_with(|k, v| {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        });
        out.extend_from_slice(b"\r\n");
        let head_only = method == "HEAD";
        let idempotent = matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        );
        buf.consume(end);

        let t_app = Instant::now();
        // Near its end (crate::expiry) the connection is retired: this response says
        // `Connection: close`, so the client's next request goes on a new connection.
        let retire = tokio::time::Instant::now() + crate::expiry::RETIRE_EARLY >= expiry.at;
        let relayed = relay(stream, &mut app, port, &out, head_only, idempotent, retire).await;
        let (status, bytes) = match &relayed {
            Ok(r) => (r.status, Some(r.bytes)),
            Err(Failure::App(_)) => (502, None),
            // The caller went away before the response was relayed whole.
            Err(Failure::Peer) => (499, None),
        };
        let answered = Answered {
            duration: t_app.elapsed(),
            status: Some(status),
            bytes,
        };
        gate.forwarded(&preq, &d, answered, fault.as_ref());
        // The response is relayed whole: its concurrency places are free again.
        drop(permit);
        match relayed {
            Ok(r) => {
                done(shared, r.status, t0);
                span.finish(r.status);
                if retire {
                    shared.log.metrics.connection_expired(expiry.why);
                }
                if close || r.close || retire {
                    let _ = stream.shutdown().await;
                    return End::Closed;
                }
            }
            // (`relay` has dropped the app connection.)
            Err(Failure::App(e)) => {
                let body = serde_json::json!({"error": "the app did not answer", "detail": e});
                let ok = Refused::new(Status::BadGateway, body)
                    .write_h1(stream, close)
                    .await;
                done(shared, 502, t0);
                span.finish(502);
                if close || !ok {
                    return End::Closed;
                }
            }
            Err(Failure::Peer) => {
                span.finish(499);
                return End::Closed;
            }
        }
    }
}

/// Counts a finished request (time to the response head).
fn done(shared: &Shared, status: u16, t0: Instant) {
    if shared.log.metrics_on {
        shared
            .log
            .metrics
            .request_done("inbound", status, t0.elapsed().as_secs_f64());
    }
}

#[derive(Debug)]
pub(crate) enum Failure {
    /// The app could not be reached or answered wrongly (nothing was sent to the peer).
    App(String),
    /// The peer's side failed, or the app's after the response had begun: close.
    Peer,
}

#[derive(Debug)]
struct Relayed {
    status: u16,
    /// The connection must close after this response.
    close: bool,
    /// The response body bytes relayed.
    bytes: u64,
}

/// Sends `head` to the app (on the connection's app connection, opened when needed) and
/// relays its response to `stream`.
async fn relay<S: AsyncWrite + Unpin>(
    stream: &mut S,
    app: &mut Option<AppConn>,
    port: InboundPort,
    head: &[u8],
    head_only: bool,
    idempotent: bool,
    retire: bool,
) -> Result<Relayed, Failure> {
    // A kept connection the app has closed meanwhile shows as a write error or an empty
    // read; an idempotent request is then sent again, once, on a new connection.
    let mut fresh = app.is_none();
    let head = loop {
        if app.is_none() {
            *app = Some(AppConn {
                io: connect(port.app, port.mark).await.map_err(Failure::App)?,
                buf: Buf::default(),
            });
        }
        let Some(conn) = app.as_mut() else {
            return Err(Failure::App("no app connection".into()));
        };
        let sent = conn.io.write_all(head).await;
        let got = match sent {
            Ok(()) => read_response_head(conn, stream, head_only).await,
            Err(e) => Err(ReadErr::Closed(e.to_string())),
        };
        match got {
            Ok(r) => break r,
            Err(ReadErr::Closed(_)) if !fresh && idempotent => {
                *app = None;
                fresh = true;
            }
            Err(ReadErr::Closed(e) | ReadErr::Bad(e)) => {
                *app = None;
                return Err(Failure::App(e));
            }
            Err(ReadErr::Peer) => return Err(Failure::Peer),
        }
    };
    let Some(conn) = app.as_mut() else {
        return Err(Failure::App("no app connection".into()));
    };
    let RespHead {
        end: mut resp_end,
        status,
        framing,
        keep,
        ..
    } = head;
    if retire {
        // The head with `connection: close` added (beside any `connection` header the app
        // sent: `close` wins), then the body as usual.
        let head = &conn.buf.bytes()[..resp_end];
        let blank = if head.ends_with(b"\r\n\r\n") { 2 } else { 1 };
        write_out(stream, &head[..resp_end - blank]).await?;
        write_out(stream, b"connection: close\r\n\r\n").await?;
        conn.buf.consume(resp_end);
        resp_end = 0;
    }
    // Counted for the access log: what is written from here is the head left in the
    // buffer (`resp_end` bytes) and the body.
    let mut counted = Counting {
        inner: stream,
        n: 0,
    };
    let close = relay_response(&mut counted, conn, resp_end, framing, !keep || retire).await?;
    let bytes = counted.n.saturating_sub(resp_end as u64);
    // Bytes beyond the response: the app broke framing; never reuse that connection.
    if close || !conn.buf.bytes().is_empty() {
        *app = None;
    }
    Ok(Relayed {
        status,
        close,
        bytes,
    })
}

/// A writer that counts the bytes it has written.
struct Counting<'a, S> {
    inner: &'a mut S,
    n: u64,
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = p {
            self.n += n as u64;
        }
        p
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = p {
            self.n += n as u64;
        }
        p
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Relays a response whose head (`resp_end` bytes) is at the start of `conn`'s buffer, and
/// its body, to `stream`; whether the connection must close after it (`close`, or a body
/// delimited by the close).
pub(crate) async fn relay_response<S: AsyncWrite + Unpin, I: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut AppConn<I>,
    resp_end: usize,
    framing: Framing,
    close: bool,
) -> Result<bool, Failure> {
    // The head and what of the body has arrived, in one write.
    let avail = conn.buf.bytes().len();
    let (first, rest) = match framing {
        Framing::Length(n) => {
            let take = resp_end
                + usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(avail - resp_end);
            (take, n - (take - resp_end) as u64)
        }
        Framing::Chunked(_) | Framing::UntilClose => (avail, 0),
    };
    let mut close = close;
    if let Framing::Chunked(mut c) = framing {
        match c.scan(&conn.buf.bytes()[resp_end..first]) {
            Ok(Some(n)) => {
                write_out(stream, &conn.buf.bytes()[..resp_end + n]).await?;
                conn.buf.consume(resp_end + n);
            }
            Ok(None) => {
                write_out(stream, &conn.buf.bytes()[..first]).await?;
                conn.buf.consume(first);
                relay_chunked(stream, conn, c).await?;
            }
            Err(_) => return Err(Failure::Peer),
        }
    } else {
        write_out(stream, &conn.buf.bytes()[..first]).await?;
        conn.buf.consume(first);
        match framing {
            Framing::Length(_) if rest > 0 => relay_length(stream, conn, rest).await?,
            Framing::UntilClose => {
                relay_until_close(stream, conn).await?;
                close = true;
            }
            _ => {}
        }
    }
    stream.flush().await.map_err(|_| Failure::Peer)?;
    Ok(close)
}

async fn connect(addr: SocketAddr, mark: Option<u32>) -> Result<TcpStream, String> {
    Connector::new(mark)
        .connect(addr)
        .await
        .map_err(|e| format!("cannot connect to the app at {addr}: {e}"))
}

async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, b: &[u8]) -> Result<(), Failure> {
    stream.write_all(b).await.map_err(|_| Failure::Peer)
}

#[derive(Debug)]
pub(crate) enum ReadErr {
    /// The app closed or reset before any byte of a response.
    Closed(String),
    /// The app sent something that is not a valid response.
    Bad(String),
    /// Writing an interim response to the peer failed.
    Peer,
}

#[derive(Debug)]
pub(crate) enum Framing {
    Length(u64),
    Chunked(ChunkedEnd),
    UntilClose,
}

/// A response head read by [`read_response_head`].
#[derive(Debug)]
pub(crate) struct RespHead {
    /// Its length.
    pub(crate) end: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub(crate) keep: bool,
    /// Whether it carries `x-meshward-refused` (a proxy's own answer).
    pub(crate) refused: bool,
}

/// Reads the final response head on `conn` (relaying 1xx interim responses to `stream`):
/// its length, status, body framing and whether the connection may be kept.
pub(crate) async fn read_response_head<S: AsyncWrite + Unpin, I: AsyncRead + Unpin>(
    conn: &mut AppConn<I>,
    stream: &mut S,
    head_only: bool,
) -> Result<RespHead, ReadErr> {
    let mut any = false;
    loop {
        let end = loop {
            if let Some(e) = head_end(conn.buf.bytes()) {
                break e;
            }
            if conn.buf.bytes().len() > MAX_HEAD {
                return Err(ReadErr::Bad("response head too large".into()));
            }
            match conn.buf.fill(&mut conn.io).await {
                Ok(0) if !any && conn.buf.bytes().is_empty() => {
                    return Err(ReadErr::Closed("the app closed the connection".into()));
                }
                Ok(0) => return Err(ReadErr::Bad("the app closed mid-response".into())),
                Err(e) if !any && conn.buf.bytes().is_empty() => {
                    return Err(ReadErr::Closed(e.to_string()));
                }
                Err(e) => return Err(ReadErr::Bad(e.to_string())),
                Ok(_) => any = true,
            }
        };
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut hs);
        let (Ok(httparse::Status::Complete(_)), Some(code), Some(version)) = (
            resp.parse(&conn.buf.bytes()[..end]),
            resp.code,
            resp.version,
        ) else {
            return Err(ReadErr::Bad("not a valid HTTP/1 response head".into()));
        };
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(ReadErr::Bad(
                    "101 Switching Protocols without an upgrade".into(),
                ));
            }
            // Interim (103 Early Hints, 100 Continue): relayed, then the final response.
            stream
                .write_all(&conn.buf.bytes()[..end])
                .await
                .map_err(|_| ReadErr::Peer)?;
            conn.buf.consume(end);
            continue;
        }
        let (mut length, mut chunked, mut te, mut close) = (None, false, false, version == 0);
        let mut refused = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| ReadErr::Bad("invalid Content-Length".into()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(ReadErr::Bad("conflicting Content-Length".into()));
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                if has_token(h.value, "close") {
                    close = true;
                } else if version == 0 && has_token(h.value, "keep-alive") {
                    close = false;
                }
            } else if h.name.eq_ignore_ascii_case(crate::rescue::REFUSED_HEADER) {
                refused = true;
            }
        }
        let framing = if head_only || code == 204 || code == 304 {
            Framing::Length(0)
        } else if te {
            if chunked {
                Framing::Chunked(ChunkedEnd::default())
            } else {
                Framing::UntilClose
            }
        } else {
            length.map_or(Framing::UntilClose, Framing::Length)
        };
        let keep = !close && !matches!(framing, Framing::UntilClose);
        return Ok(RespHead {
            end,
            status: code,
            framing,
            keep,
            refused,
        });
    }
}

async fn relay_length<S: AsyncWrite + Unpin, I: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut AppConn<I>,
    mut rest: u64,
) -> Result<(), Failure> {
    while rest > 0 {
        match conn.buf.fill(&mut conn.io).await {
            Ok(0) | Err(_) => return Err(Failure::Peer),
            Ok(_) => {}
        }
        let b = conn.buf.bytes();
        let take = usize::try_from(rest).unwrap_or(usize::MAX).min(b.len());
        write_out(stream, &b[..take]).await?;
        conn.buf.consume(take);
        rest -= take as u64;
    }
    Ok(())
}

/// Relays a chunked body to its end.
async fn relay_chunked<S: AsyncWrite + Unpin, I: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut AppConn<I>,
    mut c: ChunkedEnd,
) -> Result<(), Failure> {
    loop {
        match conn.buf.fill(&mut conn.io).await {
            Ok(0) | Err(_) => return Err(Failure::Peer),
            Ok(_) => {}
        }
        let b = conn.buf.bytes();
        match c.scan(b) {
            Ok(Some(n)) => {
                write_out(stream, &b[..n]).await?;
                conn.buf.consume(n);
                return Ok(());
            }
            Ok(None) => {
                let n = b.len();
                write_out(stream, b).await?;
                conn.buf.consume(n);
            }
            Err(_) => return Err(Failure::Peer),
        }
    }
}

async fn relay_until_close<S: AsyncWrite + Unpin, I: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut AppConn<I>,
) -> Result<(), Failure> {
    loop {
        match conn.buf.fill(&mut conn.io).await {
            Ok(0) => return Ok(()),
            Err(_) => return Err(Failure::Peer),
            Ok(_) => {}
        }
        let n = conn.buf.bytes().len();
        write_out(stream, conn.buf.bytes()).await?;
        conn.buf.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens() {
        assert!(has_token(b"keep-alive, Close", "close"));
        assert!(!has_token(b"closed", "close"));
        assert!(has_token(b"Upgrade", "upgrade"));
    }
}
