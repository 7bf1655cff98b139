//! Inbound stage 4, the request gate: what every codec (the HTTP/1.1 fast path in
//! [`crate::h1`], the general HTTP/1 and HTTP/2 path and gRPC in [`crate::inbound`], TCP)
//! calls before anything reaches the app. [`Gate::check`] reads top to bottom as the list
//! of checks; a refusal leaves as a [`Refused`] for the rescue ([`crate::rescue`]).
//!
//! This module is also the one place the inbound side writes decision records
//! ([`write`]): connection refusals, failed handshakes, TCP decisions, requests refused
//! before or by policy, and allowed requests once the app has answered. Every request
//! gets exactly one record.
#![deny(clippy::disallowed_types)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::SpiffeId;
use meshward_policy::decision::{
    Decision, HttpAttrs, PolicyRevision, Reason, Request, Source, Verdict,
};
use meshward_policy::path::{NormalizedPath, normalize};
use meshward_policy::resource::HeadersWithUnderscores;
use meshward_telemetry::trace::{DecisionAttrs, RequestSpan};

use crate::decision_log::{Extra, Series};
use crate::fault::Injected;
use crate::inbound::InboundPort;
use crate::interpret::{self, Facts, Refusal, Version};
use crate::ratelimit::{Over, Permit, Resolved};
use crate::rescue::{Refused, Status};
use crate::state::Shared;

/// A request head as a codec read it.
#[derive(Debug)]
pub(crate) struct Head<'h, H> {
    pub version: Version,
    pub method: &'h str,
    /// The target as sent (origin form; for `CONNECT`, its authority).
    pub target: &'h str,
    /// An absolute-form target's authority, or HTTP/2's `:authority`.
    pub authority: Option<&'h str>,
    /// Name and value of each header, as sent (read more than once, so a maker of the
    /// iterator).
    pub headers: H,
    /// The codec is the fast path: what it cannot carry (a body with `Expect`, an upgrade)
    /// is handed to the general path before any decision.
    pub fast: bool,
}

/// A request the gate let through, with what the forwarding needs.
#[derive(Debug)]
pub(crate) struct Admitted<'h> {
    /// What policy decided on (and what is recorded).
    pub preq: Request,
    pub d: Decision,
    /// The normalized target to forward.
    pub target: String,
    pub facts: Facts<'h>,
    pub under: HeadersWithUnderscores,
    /// Its places in the concurrency budgets (`maxConcurrent`): held until the response is
    /// done.
    pub permit: Permit,
    /// The faults drawn for it (step 7): the codec waits the delay, then answers the abort
    /// in the app's place.
    pub fault: Option<Injected>,
}

/// Why the gate stopped a request.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Answer this (already recorded).
    Refused(Refused),
    /// The fast path cannot carry this request: the general path serves it (nothing was
    /// decided or recorded).
    Handoff,
}

/// The gate of one connection (fast path) or one request (general path).
#[derive(Debug)]
pub(crate) struct Gate<'a> {
    pub shared: &'a Shared,
    pub port: InboundPort,
    pub peer: &'a SpiffeId,
    /// The connection's own metric series (the fast path keeps one per connection); none:
    /// the log's lock-free shared snapshot.
    series: Option<Series>,
    /// The peer's rate-limit budgets under the revision they were resolved for (the fast
    /// path's gate keeps them for its connection).
    budgets: Option<Resolved>,
}

impl<'a> Gate<'a> {
    /// A gate for `peer`'s requests on `port`; `per_connection`: with a series cache of its
    /// own (a gate that lives as long as its connection).
    pub fn new(
        shared: &'a Shared,
        port: InboundPort,
        peer: &'a SpiffeId,
        per_connection: bool,
    ) -> Self {
        Gate {
            shared,
            port,
            peer,
            series: per_connection.then(Series::default),
            budgets: None,
        }
    }

    /// The request gate, in order. Every refusal is recorded here and returned for the
    /// rescue; an admitted request is recorded by [`Gate::forwarded`] once the app answers.
    pub fn check<'h, H, I>(
        &mut self,
        head: Head<'h, H>,
        span: &RequestSpan,
    ) -> Result<Admitted<'h>, Stop>
    where
        H: Fn() -> I,
        I: Iterator<Item = (&'h str, &'h [u8])>,
    {
        let policy = self.shared.policy.load();
        let under = policy.as_ref().map(|p| p.underscores()).unwrap_or_default();
        // 1. Interpret: one reading of method, Host and headers for every codec.
        let facts = interpret::head(
            head.version,
            head.method,
            head.authority,
            (head.headers)(),
            under,
        )
        .map_err(|r| {
            Stop::Refused(self.bad_request(head.method, head.target, r.code, r.detail.into()))
        })?;
        // 2. What the codec cannot carry moves to the one that can, undecided.
        if head.fast && (facts.expect || facts.upgrade) {
            return Err(Stop::Handoff);
        }
        // 3. Normalize the path (`CONNECT`: `/`, its authority as host), lower-cased for a
        //    case-insensitive app.
        let mut norm = if facts.connect {
            NormalizedPath {
                path: "/".into(),
                query: None,
            }
        } else {
            normalize(head.target).map_err(|e| {
                Stop::Refused(self.bad_request(head.method, head.target, e.code(), e.to_string()))
            })?
        };
        if policy
            .as_ref()
            .is_some_and(|p| p.lower_paths.contains(&self.port.app_port))
        {
            norm.path = meshward_policy::path::lower_case(&norm.path);
        }
        // 4. Authorize: only the headers some rule reads (none, for most policies), as the
        //    app gets them; upgrades and `CONNECT` only by a rule that names them.
        let wanted: &[String] = policy.as_ref().map_or(&[], |p| p.headers.as_slice());
        let headers = if wanted.is_empty() {
            vec![]
        } else {
            (head.headers)()
                .filter(|(k, _)| {
                    interpret::forwarded(k, under)
                        && wanted.iter().any(|w| w.eq_ignore_ascii_case(k))
                })
                .map(|(k, v)| {
                    (
                        k.to_ascii_lowercase(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect()
        };
        let target = norm.target();
        let preq = Request {
            source: Source::Authenticated(self.peer.clone()),
            destination: self.shared.workload.clone(),
            port: self.port.app_port,
            http: Some(HttpAttrs {
                method: head.method.to_owned(),
                path: norm.path,
                host: facts.host.map(str::to_owned),
                headers,
            }),
            at: SystemTime::now(),
        };
        let d = match policy.as_ref() {
            Some(p) => p.with_candidate(
                interpret::upgrade_allowed(&p.set, &facts, p.engine.decide(&preq)),
                |set, d| interpret::upgrade_allowed(set, &facts, d),
                &preq,
                false,
            ),
            None => Decision::bare(Verdict::Deny, Reason::NoPolicy, PolicyRevision(0)),
        };
        if span.is_recording() {
            span.decision(DecisionAttrs {
                source: self.peer.as_str(),
                destination: &preq.destination.to_string(),
                verdict: d.verdict.as_str(),
                reason: d.reason.as_str(),
                policy: d.policy.as_deref(),
                decision_ns: u64::try_from(d.elapsed.as_nanos()).unwrap_or(u64::MAX),
            });
        }
        // 5. Deny: recorded, answered 403 (gRPC: PERMISSION_DENIED).
        if d.verdict != Verdict::Allow {
            drop(policy);
            self.record(&preq, &d, Extra::default());
            return Err(Stop::Refused(Refused::new(Status::Forbidden, denial(&d))));
        }
        // 6. Limits: the source's rate-limit budgets (crate::ratelimit), after the
        //    decision (a denied request spends nobody's budget); over one: recorded,
        //    answered 429 with `Retry-After` (gRPC: RESOURCE_EXHAUSTED).
        let permit = match policy.as_ref() {
            Some(p) if !p.view.rate_limiter.is_empty() => {
                let budgets = match self.budgets.take() {
                    Some(b) if b.revision == p.revision => b,
                    _ => resolve(self.shared, p, Some(self.peer)),
                };
                let taken = budgets.request(false);
                self.budgets = Some(budgets);
                match taken {
                    Ok(permit) => permit,
                    Err(over) => {
                        let rev = PolicyRevision(p.revision);
                        drop(policy);
                        return Err(Stop::Refused(self.rate_limited(&preq, rev, &over)));
                    }
                }
            }
            _ => Permit::default(),
        };
        // 7. Faults: the `FaultInjection`s drawn for this allowed request (crate::fault);
        //    a `grpcStatus` abort only for gRPC (HTTP/2 with a gRPC content type).
        let fault = policy.as_ref().and_then(|p| {
            let grpc = head.version == Version::Http2
                && (head.headers)().any(|(k, v)| {
                    k.eq_ignore_ascii_case("content-type") && v.starts_with(b"application/grpc")
                });
            injected(self.shared, p, &preq, grpc)
        });
        drop(policy);
        Ok(Admitted {
            preq,
            d,
            target,
            facts,
            under,
            permit,
            fault,
        })
    }

    /// Records a request over a rate limit and returns its 429.
    fn rate_limited(&mut self, req: &Request, rev: PolicyRevision, over: &Over) -> Refused {
        let (d, extra, body) = over_limit(rev, over);
        self.record(req, &d, extra);
        Refused::new(Status::TooManyRequests, body).retry_after(over.retry_after_secs())
    }

    /// Records an admitted request once the app's response has started (`duration`: the
    /// time to it), or once an injected abort answered in its place (`fault`: what was
    /// injected, the record's detail).
    pub fn forwarded(
        &mut self,
        preq: &Request,
        d: &Decision,
        answered: Answered,
        fault: Option<&Injected>,
    ) {
        self.record(preq, d, answered.extra(fault));
    }

    /// Records a request refused as malformed (reason `bad_request`, `code` as detail) and
    /// returns its 400.
    pub fn bad_request(
        &mut self,
        method: &str,
        target: &str,
        code: &'static str,
        detail: String,
    ) -> Refused {
        let rev = revision(self.shared);
        let req = Request {
            source: Source::Authenticated(self.peer.clone()),
            destination: self.shared.workload.clone(),
            port: self.port.app_port,
            http: Some(HttpAttrs {
                method: method.to_owned(),
                path: target.to_owned(),
                host: None,
                headers: vec![],
            }),
            at: SystemTime::now(),
        };
        let d = Decision::bare(Verdict::Deny, Reason::BadRequest, rev);
        self.record(
            &req,
            &d,
            Extra {
                detail: Some(code.to_owned()),
                ..Default::default()
            },
        );
        Refused::new(
            Status::BadRequest,
            serde_json::json!({"verdict": "deny", "reason": d.reason, "error": code, "detail": detail, "revision": rev}),
        )
    }

    /// [`Gate::bad_request`] for a rule of [`crate::interpret`] or [`crate::hygiene`].
    pub fn refusal(&mut self, method: &str, target: &str, r: Refusal) -> Refused {
        self.bad_request(method, target, r.code, r.detail.to_owned())
    }

    fn record(&mut self, req: &Request, d: &Decision, extra: Extra) {
        write(self.shared, self.port, self.series.as_mut(), req, d, extra);
    }
}

/// How an admitted HTTP request was answered, for its record (the access log).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answered {
    /// The time to the response (the app's, or an injected abort's).
    pub duration: Duration,
    /// The status the caller received (none: the connection was reset).
    pub status: Option<u16>,
    /// The response body bytes relayed (none: not relayed from the app).
    pub bytes: Option<u64>,
}

impl Answered {
    /// An injected abort answered after `duration` (a reset has no status).
    pub(crate) fn aborted(duration: Duration, abort: crate::fault::Abort) -> Self {
        Answered {
            duration,
            status: match abort {
                crate::fault::Abort::Http(s) => Some(s),
                _ => None,
            },
            bytes: None,
        }
    }

    pub(crate) fn extra(self, fault: Option<&Injected>) -> Extra {
        Extra {
            duration: Some(self.duration),
            detail: fault.map(Injected::detail),
            injected: fault.is_some(),
            status: self.status,
            response_bytes: self.bytes,
            ..Default::default()
        }
    }
}

/// An admitted request's response body on the general path: its bytes counted, and the
/// request's record written once the body has ended, failed or been dropped (the caller
/// went away), so the access log has what the caller received.
pub(crate) struct Logged<B> {
    inner: B,
    pending: Option<Pending>,
    bytes: u64,
}

struct Pending {
    shared: Arc<Shared>,
    port: InboundPort,
    req: Request,
    d: Decision,
    extra: Extra,
}

impl<B> Logged<B> {
    pub(crate) fn new(
        inner: B,
        shared: Arc<Shared>,
        port: InboundPort,
        req: Request,
        d: Decision,
        extra: Extra,
    ) -> Self {
        Logged {
            inner,
            pending: Some(Pending {
                shared,
                port,
                req,
                d,
                extra,
            }),
            bytes: 0,
        }
    }

    fn finish(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.extra.response_bytes = Some(self.bytes);
            write(&p.shared, p.port, None, &p.req, &p.d, p.extra);
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> hyper::body::Body for Logged<B>
where
    B: hyper::body::Body + Unpin,
    B::Data: hyper::body::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let p = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &p {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += hyper::body::Buf::remaining(d) as u64;
                }
            }
            std::task::Poll::Ready(None | Some(Err(_))) => self.finish(),
            std::task::Poll::Pending => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP connection the gate let through: its budgets' permit (held while it is open) and
/// what was decided (watched by [`crate::recheck`]).
#[derive(Debug)]
pub(crate) struct TcpAdmitted {
    pub permit: Permit,
    pub req: Request,
    pub revision: u64,
    /// The faults drawn for the connection: a delay before it reaches the app, a reset.
    pub fault: Option<Injected>,
}

/// The TCP codec's gate: one decision per connection, then the source's rate-limit
/// budgets (on a TCP port the rate and `maxConcurrent` count connections); recorded, a
/// refusal closes it.
pub(crate) fn tcp(shared: &Shared, port: InboundPort, peer: SpiffeId) -> Result<TcpAdmitted, ()> {
    let req = Request {
        source: Source::Authenticated(peer),
        destination: shared.workload.clone(),
        port: port.app_port,
        http: None,
        at: SystemTime::now(),
    };
    let policy = shared.policy.load();
    let d = match policy.as_ref() {
        Some(p) => p.with_candidate(p.engine.decide(&req), |_, d| d, &req, true),
        // No configuration at all: fail closed.
        None => Decision::bare(Verdict::Deny, Reason::NoPolicy, PolicyRevision(0)),
    };
    if d.verdict != Verdict::Allow {
        write(shared, port, None, &req, &d, Extra::default());
        return Err(());
    }
    let permit = match policy.as_ref() {
        Some(p) if !p.view.rate_limiter.is_empty() => {
            let Source::Authenticated(peer) = &req.source else {
                return Err(());
            };
            match resolve(shared, p, Some(peer)).request(true) {
                Ok(permit) => permit,
                Err(over) => {
                    let (d, extra, _) = over_limit(PolicyRevision(p.revision), &over);
                    write(shared, port, None, &req, &d, extra);
                    return Err(());
                }
            }
        }
        _ => Permit::default(),
    };
    let fault = policy
        .as_ref()
        .and_then(|p| injected(shared, p, &req, false));
    let extra = Extra {
        detail: fault.as_ref().map(Injected::detail),
        injected: fault.is_some(),
        ..Default::default()
    };
    write(shared, port, None, &req, &d, extra);
    Ok(TcpAdmitted {
        permit,
        req,
        revision: d.revision.0,
        fault,
    })
}

/// The faults drawn for an allowed `req` under `p`, counted.
fn injected(
    shared: &Shared,
    p: &crate::state::Policy,
    req: &Request,
    grpc: bool,
) -> Option<Injected> {
    if p.view.faults.is_empty() {
        return None;
    }
    let f = p
        .view
        .faults
        .draw(req, &p.set, &shared.workload, grpc, SystemTime::now())?;
    let m = &shared.log.metrics;
    if let Some((id, _)) = &f.delay {
        m.fault_injected(id, "delay");
    }
    if let Some((id, a)) = &f.abort {
        m.fault_injected(id, a.kind());
    }
    Some(f)
}

/// Records an open connection or stream closed because a later revision denies it
/// ([`crate::recheck`]; `kind`: `tcp`, `stream` or `tunnel`), and counts it.
pub(crate) fn revoked(
    shared: &Shared,
    port: InboundPort,
    r: &crate::recheck::Revoked,
    kind: &'static str,
) {
    shared.log.metrics.revoked(kind);
    let extra = Extra {
        detail: Some(format!(
            "revoked: revision {} denies the open {}; closed",
            r.d.revision.0,
            match kind {
                "tcp" => "connection",
                "tunnel" => "tunnel",
                _ => "request",
            }
        )),
        ..Default::default()
    };
    write(shared, port, None, &r.req, &r.d, extra);
}

/// A connection's place under the `maxConnections` of its source's budgets, once its
/// identity is known; over one, the refusal is recorded (`rate_limited`) and the
/// connection closes.
pub(crate) fn connection_quota(
    shared: &Shared,
    port: InboundPort,
    peer: &SpiffeId,
) -> Result<Permit, ()> {
    let policy = shared.policy.load();
    let Some(p) = policy.as_ref().filter(|p| !p.view.rate_limiter.is_empty()) else {
        return Ok(Permit::default());
    };
    resolve(shared, p, Some(peer)).connection().map_err(|over| {
        let req = Request {
            source: Source::Authenticated(peer.clone()),
            destination: shared.workload.clone(),
            port: port.app_port,
            http: None,
            at: SystemTime::now(),
        };
        let (d, extra, _) = over_limit(PolicyRevision(p.revision), &over);
        write(shared, port, None, &req, &d, extra);
    })
}

/// `source`'s budgets under `p`.
fn resolve(shared: &Shared, p: &crate::state::Policy, source: Option<&SpiffeId>) -> Resolved {
    p.view.rate_limiter.resolve(
        p.revision,
        &shared.budgets,
        &p.set,
        &shared.workload,
        source,
    )
}

/// The decision, record detail and answer body of a request or connection over a limit.
fn over_limit(rev: PolicyRevision, over: &Over) -> (Decision, Extra, serde_json::Value) {
    let mut d = Decision::bare(Verdict::Deny, Reason::RateLimited, rev);
    d.policy = Some(over.policy.clone());
    let extra = Extra {
        detail: Some(format!(
            "{} limit {} of {}",
            over.kind, over.index, over.policy
        )),
        ..Default::default()
    };
    let body = serde_json::json!({
        "verdict": "deny",
        "reason": d.reason,
        "policy": over.policy,
        "limit": over.index,
        "kind": over.kind,
        "retryAfter": over.retry_after_secs(),
        "revision": rev,
    });
    (d, extra, body)
}

/// Records a connection refused before any request (`connection_limit`,
/// `handshake_failed`), with what happened as detail.
pub(crate) fn connection(
    shared: &Shared,
    port: InboundPort,
    source: Source,
    reason: Reason,
    detail: String,
) {
    let req = Request {
        source,
        destination: shared.workload.clone(),
        port: port.app_port,
        http: None,
        at: SystemTime::now(),
    };
    let d = Decision::bare(Verdict::Deny, reason, revision(shared));
    let extra = Extra {
        detail: Some(detail),
        ..Default::default()
    };
    write(shared, port, None, &req, &d, extra);
}

/// The one place the inbound side writes a decision record.
fn write(
    shared: &Shared,
    port: InboundPort,
    series: Option<&mut Series>,
    req: &Request,
    d: &Decision,
    mut extra: Extra,
) {
    extra.address = port.mark.is_some().then_some(port.app);
    if req.http.is_some() && d.verdict == Verdict::Deny && extra.status.is_none() {
        // The answer the gate gave (crate::rescue): 400 malformed, 429 over a limit, 403.
        extra.status = Some(match d.reason {
            Reason::BadRequest => 400,
            Reason::RateLimited => 429,
            _ => 403,
        });
    }
    shared.log.record_in(series, req, d, &extra);
}

/// The revision in force (0: none).
pub(crate) fn revision(shared: &Shared) -> PolicyRevision {
    shared
        .policy
        .load()
        .as_ref()
        .map_or(PolicyRevision(0), |p| PolicyRevision(p.revision))
}

/// The JSON body of a 403: the reason code and the deciding policy.
pub(crate) fn denial(d: &Decision) -> serde_json::Value {
    serde_json::json!({"verdict": "deny", "reason": d.reason, "policy": d.policy, "rule": d.rule, "revision": d.revision})
}
