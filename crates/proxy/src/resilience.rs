//! Outbound, the resilience around stages 2–4 (issue 14): which endpoints may serve
//! (failover by locality, outlier ejection, the fallback service), the circuit breaker
//! that admits a request or connection, the retry budget, and the timeouts — everything a
//! `TrafficPolicy` sets for the calls of this workload to a service, compiled once per
//! revision ([`Resilience::compile`], part of [`crate::view::View`]). The counters that
//! must outlive a revision (breaker places, the retry budget) are a [`ServiceState`] kept
//! beside the view ([`crate::endpoint_state::EndpointStates`]), like each endpoint's
//! health and latency ([`crate::endpoint_state::EndpointState`]).
//!
//! Defaults and how each setting meets authorization: docs/resilience.md.
#![deny(clippy::disallowed_types)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::Other;
use meshward_policy::resource::TrafficPolicySpec;

pub use crate::balance::{Choice, choose};
use crate::discovery::{Endpoint, EndpointSet};
use crate::endpoint_state::{Outlier, now_ms};

/// The initial latency estimate of an endpoint with no sample yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// The largest request body kept for a retry; a larger one is sent once, not retried.
pub const RETRY_BODY_CAP: usize = 64 * 1024;

/// When an attempt is tried again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// No connection to the endpoint (refused, unreachable, handshake refused).
    pub connect_failure: bool,
    /// The connection failed after the request was sent (reset, closed without an answer).
    pub reset: bool,
    /// The per-try timeout passed.
    pub timeout: bool,
    /// These statuses (`5xx` adds 500–599, `gateway-error` 502–504).
    pub statuses: Vec<u16>,
}

impl RetryOn {
    /// Parses the `retryOn` list; an unknown condition is an error naming it.
    pub fn parse(conditions: &[String]) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        if conditions.is_empty() {
            on.connect_failure = true;
            on.reset = true;
            return Ok(on);
        }
        for c in conditions {
            match c.as_str() {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "timeout" | "per-try-timeout" => on.timeout = true,
                "5xx" => on.statuses.extend(500..=599),
                "gateway-error" => on.statuses.extend(502..=504),
                n => match n.parse::<u16>() {
                    Ok(code) if (500..=599).contains(&code) => on.statuses.push(code),
                    Ok(code) => {
                        return Err(format!(
                            "status {code} is not retried: only 5xx statuses are (a 4xx is the request's fault, and a policy refusal is never retried)"
                        ));
                    }
                    Err(_) => {
                        return Err(format!(
                            "unknown retry condition `{n}`: use connect-failure, reset, timeout, 5xx, gateway-error or a 5xx status code"
                        ));
                    }
                },
            }
        }
        on.statuses.sort_unstable();
        on.statuses.dedup();
        Ok(on)
    }
}

/// Retries of one service's calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Retries after the first attempt (Istio's `attempts`).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Retries may add this share of the requests of the last 10 s…
    pub budget_ratio: f64,
    /// …and at least this many per second whatever the requests.
    pub min_per_second: u32,
    /// Retry non-idempotent methods too (POST, PATCH, CONNECT): the service's own mark
    /// that its calls are safe to repeat.
    pub non_idempotent: bool,
}

/// Whether an attempt that got no answer may go again under `retry` (the budget asked
/// after). `connect`: no connection was made, so nothing was sent and any method may go
/// elsewhere — without retry settings too (connect-time failover); otherwise only a reset
/// the settings name.
pub fn retry_on_error(retry: Option<&Retry>, connect: bool) -> bool {
    if connect {
        retry.is_none_or(|r| r.on.connect_failure)
    } else {
        retry.is_some_and(|r| r.on.reset)
    }
}

/// The budget connect-time failover draws from when the service sets no retries: 20 %
/// of requests plus 10 per second.
pub fn default_budget() -> Retry {
    Retry {
        attempts: 0,
        per_try_timeout: None,
        on: RetryOn::default(),
        budget_ratio: 0.2,
        min_per_second: 10,
        non_idempotent: false,
    }
}

/// The circuit breaker's caps for one service, as this caller sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaker {
    /// Open connections: tunnels; for pooled HTTP/1.1, one connection per request in
    /// flight, so it caps requests in flight too.
    pub max_connections: Option<u32>,
    /// Requests waiting for a place once `max_requests` are in flight (default 0: none
    /// wait, the caller gets 503 `circuit_open` at once).
    pub max_pending: u32,
    /// Requests in flight.
    pub max_requests: Option<u32>,
}

/// What this workload's calls to one service do (the merged `TrafficPolicy`s that apply
/// to it, in configuration order: the first that sets a field wins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub outlier: Outlier,
    pub breaker: Breaker,
    /// Localities (`region` or `region/zone`) to fail over to, in order, after the
    /// caller's own zone and region.
    pub failover: Vec<String>,
    pub fallback: Option<WorkloadRef>,
    /// The `TrafficPolicy`s these settings come from (for logs and the admin page).
    pub policies: Vec<String>,
    /// Per-route settings; the first route a request matches wins.
    pub routes: Vec<Route>,
}

/// One route's settings: which requests, and what differs for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: Option<String>,
    /// Empty: any method.
    pub methods: Vec<String>,
    /// Empty: any path.
    pub paths: Vec<meshward_policy::matcher::PathPattern>,
    /// Repeating these calls is safe whatever the method.
    pub retryable: bool,
    pub timeout: Option<Duration>,
    /// Replaces the service's retries (`Some` with `attempts: 0`: none).
    pub retry: Option<Retry>,
}

impl Route {
    fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

/// What one request gets: the route it matched (if any) applied over the service's
/// settings.
#[derive(Debug, Clone, Copy)]
pub struct PerRequest<'a> {
    pub route: Option<&'a Route>,
    pub timeout: Option<Duration>,
    /// The retries that apply and that this request may use (its method is idempotent,
    /// or its route or the service marks it safe to repeat); `None`: not retried.
    pub retry: Option<&'a Retry>,
}

fn retry_of(r: &meshward_policy::resource::RetryPolicy) -> Retry {
    Retry {
        attempts: r.attempts,
        per_try_timeout: r.per_try_timeout.map(|d| d.0),
        on: RetryOn::parse(&r.retry_on).unwrap_or_default(),
        budget_ratio: f64::from(r.budget_percent.unwrap_or(20)) / 100.0,
        min_per_second: r.min_retries_per_second.unwrap_or(10),
        non_idempotent: r.non_idempotent,
    }
}

impl Settings {
    /// Merges `specs` (already validated by the policy model; a value it would refuse
    /// never reaches here, and one that does anyway falls back to the default).
    pub fn compile(specs: &[Other<TrafficPolicySpec>]) -> Settings {
        let mut s = Settings::default();
        let (mut outlier_seen, mut breaker_seen) = (false, false);
        for o in specs {
            let t = &o.spec;
            s.policies.push(o.id.to_string());
            if s.timeout.is_none() {
                s.timeout = t.timeout.map(|d| d.0);
            }
            if s.retry.is_none()
                && let Some(r) = &t.retries
            {
                s.retry = Some(retry_of(r));
            }
            if !outlier_seen && let Some(od) = &t.outlier_detection {
                outlier_seen = true;
                let d = Outlier::default();
                let ms = |x: Option<meshward_policy::resource::Dur>, or: u64| {
                    x.map_or(or, |d| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX))
                };
                s.outlier = Outlier {
                    consecutive: od.consecutive_errors.unwrap_or(d.consecutive).max(1),
                    failure_percent: od.failure_percent,
                    min_requests: od.min_requests.unwrap_or(d.min_requests),
                    interval_ms: ms(od.interval, d.interval_ms),
                    base_ms: ms(od.base_ejection_time, d.base_ms),
                    max_ms: ms(od.max_ejection_time, d.max_ms),
                    max_percent: od.max_ejection_percent.unwrap_or(d.max_percent).min(100),
                };
            }
            if !breaker_seen && let Some(b) = &t.circuit_breaker {
                breaker_seen = true;
                s.breaker = Breaker {
                    max_connections: b.max_connections,
                    max_pending: b.max_pending_requests.unwrap_or(0),
                    max_requests: b.max_requests,
                };
            }
            if s.failover.is_empty() {
                s.failover = t.failover.clone();
            }
            if s.fallback.is_none() {
                s.fallback = t
                    .fallback
                    .as_deref()
                    .and_then(|f| WorkloadRef::parse(f).ok());
            }
            if s.routes.is_empty() {
                s.routes = t
                    .routes
                    .iter()
                    .map(|r| Route {
                        name: r.name.clone(),
                        methods: r.methods.clone(),
                        // A pattern the model refused never reaches here; one that does
                        // anyway is dropped (the route then matches fewer paths).
                        paths: r
                            .paths
                            .iter()
                            .filter_map(|p| meshward_policy::matcher::PathPattern::parse(p).ok())
                            .collect(),
                        retryable: r.retryable,
                        timeout: r.timeout.map(|d| d.0),
                        retry: r.retries.as_ref().map(retry_of),
                    })
                    .collect();
            }
        }
        s
    }

    /// The settings one request gets: the first route matching its method and path
    /// (`path` as the app sent it; normalized here the way policy reads it), over the
    /// service's own; retries only when the method is idempotent or the route or the
    /// service marks the calls safe to repeat.
    pub fn for_request<'a>(&'a self, method: &hyper::Method, target: &str) -> PerRequest<'a> {
        let route = if self.routes.is_empty() {
            None
        } else {
            let path = meshward_policy::path::normalize(target)
                .map(|n| n.path)
                .unwrap_or_else(|_| target.split('?').next().unwrap_or("").to_owned());
            self.routes
                .iter()
                .find(|r| r.matches(method.as_str(), &path))
        };
        let retry = route
            .and_then(|r| r.retry.as_ref())
            .or(self.retry.as_ref())
            .filter(|r| {
                r.attempts > 0
                    && (idempotent(method)
                        || r.non_idempotent
                        || route.is_some_and(|x| x.retryable))
            });
        PerRequest {
            route,
            timeout: route.and_then(|r| r.timeout).or(self.timeout),
            retry,
        }
    }
}

/// A service's resilience in one view: its settings and its long-lived counters.
#[derive(Debug, Default)]
pub struct Resilience {
    pub service: WorkloadRef,
    pub settings: Settings,
    pub state: Arc<ServiceState>,
    /// The declared protocol of each port callers use.
    pub ports: std::collections::HashMap<u16, meshward_policy::resource::Protocol>,
}

impl Resilience {
    /// Whether calls on `port` must be carried as pooled HTTP rather than tunnelled: the
    /// settings act per request (a timeout, retries, request caps) and the port speaks
    /// HTTP. HTTP/1.1 ports get the HTTP/1.1 pool, HTTP/2 and gRPC ports the HTTP/2 one.
    pub fn pooled(&self, port: u16) -> Option<crate::pool::UpstreamProtocol> {
        use meshward_policy::resource::Protocol;
        let s = &self.settings;
        let per_request = s.timeout.is_some()
            || s.retry.is_some()
            || !s.routes.is_empty()
            || s.breaker.max_requests.is_some()
            || s.breaker.max_pending > 0;
        if !per_request {
            return None;
        }
        match self.ports.get(&port)? {
            Protocol::Http => Some(crate::pool::UpstreamProtocol::Http1),
            Protocol::Http2 | Protocol::Grpc => Some(crate::pool::UpstreamProtocol::Http2),
            Protocol::Tcp => None,
        }
    }
}

/// What happened to a request or connection, for the counters and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Retry,
    RetryBudgetExhausted,
    PerTryTimeout,
    Timeout,
    CircuitOpen,
    Ejection,
    Fallback,
    /// Every endpoint of the service and its fallback was ejected or failing: one was
    /// tried anyway (better than refusing at once; Envoy's panic mode).
    AllEjected,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Retry => "retry",
            Event::RetryBudgetExhausted => "retry_budget_exhausted",
            Event::PerTryTimeout => "per_try_timeout",
            Event::Timeout => "timeout",
            Event::CircuitOpen => "circuit_open",
            Event::Ejection => "ejection",
            Event::Fallback => "fallback",
            Event::AllEjected => "all_ejected",
        }
    }
}

/// Per service, across revisions: the breaker's places and the retry budget.
#[derive(Debug, Default)]
pub struct ServiceState {
    in_flight: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
    released: tokio::sync::Notify,
    budget: RetryBudget,
}

/// One place the breaker gave: a request in flight or an open connection, given back on
/// drop.
#[derive(Debug)]
pub struct Place {
    state: Arc<ServiceState>,
    connection: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.connection {
            self.state.connections.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.state.released.notify_one();
    }
}

/// Takes one place below `max` in `counter`; false when full.
fn take(counter: &AtomicU32, max: Option<u32>) -> bool {
    let Some(max) = max else {
        counter.fetch_add(1, Ordering::Relaxed);
        return true;
    };
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl ServiceState {
    /// Admits one request: a place among `max_requests` (and, for pooled HTTP/1.1,
    /// `max_connections`), waiting up to `wait` when `max_pending` allows it to queue.
    /// `None`: the circuit is open.
    pub async fn admit(
        self: &Arc<Self>,
        b: &Breaker,
        http1: bool,
        wait: Option<Duration>,
    ) -> Option<Place> {
        let max = match (b.max_requests, b.max_connections.filter(|_| http1)) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        if take(&self.in_flight, max) {
            return Some(self.place(false));
        }
        if !take(&self.pending, Some(b.max_pending)) {
            return None;
        }
        let deadline = tokio::time::Instant::now() + wait.unwrap_or(Duration::from_secs(30));
        let got = loop {
            let notified = self.released.notified();
            if take(&self.in_flight, max) {
                break true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break take(&self.in_flight, max);
            }
        };
        self.pending.fetch_sub(1, Ordering::Relaxed);
        got.then(|| self.place(false))
    }

    /// Admits one tunnel under `max_connections`; `None`: the circuit is open.
    pub fn admit_connection(self: &Arc<Self>, b: &Breaker) -> Option<Place> {
        take(&self.connections, b.max_connections).then(|| self.place(true))
    }

    fn place(self: &Arc<Self>, connection: bool) -> Place {
        Place {
            state: self.clone(),
            connection,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }
}

/// Retries over the last [`RetryBudget::WINDOW`] seconds may be at most `ratio` of the
/// requests plus `min_per_second` × the window (Linkerd's budget: 20 % plus 10/s), so a
/// total outage never multiplies the load. One-second slots, atomics only.
#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [Slot; 10],
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    pub const WINDOW: u64 = 10;

    fn slot(&self, now_ms: u64) -> &Slot {
        let sec = now_ms / 1000;
        let slot = &self.slots[usize::try_from(sec % Self::WINDOW).unwrap_or(0)];
        let was = slot.second.load(Ordering::Relaxed);
        if was != sec
            && slot
                .second
                .compare_exchange(was, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts a request (its first attempt).
    pub fn request(&self, now_ms: u64) {
        self.slot(now_ms).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, now_ms: u64, r: &Retry) -> bool {
        let sec = now_ms / 1000;
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            if sec.saturating_sub(s.second.load(Ordering::Relaxed)) < Self::WINDOW {
                requests += u64::from(s.requests.load(Ordering::Relaxed));
                retries += u64::from(s.retries.load(Ordering::Relaxed));
            }
        }
        let allowed =
            r.budget_ratio * requests as f64 + f64::from(r.min_per_second) * Self::WINDOW as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        self.slot(now_ms).retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Reports a failure the endpoint is to blame for, and ejects it when the detector says
/// so and the service's `maxEjectionPercent` allows (at least one endpoint may always be
/// ejected). Returns how long it was ejected for.
pub fn failed(set: &EndpointSet, ep: &Endpoint, outlier: &Outlier) -> Option<(u64, &'static str)> {
    let now = now_ms();
    let why = ep.state.failed_at(now, outlier)?;
    let total = set.endpoints.len().max(1);
    let ejected = set
        .endpoints
        .iter()
        .filter(|e| e.state.is_ejected(now))
        .count();
    let cap = (total * outlier.max_percent as usize / 100).max(1);
    if ejected >= cap {
        return None;
    }
    Some((ep.state.eject(now, outlier, why), why.as_str()))
}

/// Whether a method may be retried without the service's `nonIdempotent` mark (RFC 9110
/// §9.2.2).
pub fn idempotent(m: &hyper::Method) -> bool {
    meshward_policy::model::idempotent_method(m.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(ratio: f64, min: u32) -> Retry {
        Retry {
            attempts: 3,
            per_try_timeout: None,
            on: RetryOn::parse(&[]).unwrap(),
            budget_ratio: ratio,
            min_per_second: min,
            non_idempotent: false,
        }
    }

    #[test]
    fn the_budget_allows_its_ratio_plus_the_minimum_and_no_more() {
        let b = RetryBudget::default();
        let r = retry(0.2, 1);
        let t = 50_000;
        for _ in 0..100 {
            b.request(t);
        }
        // 20 % of 100 plus 1/s over 10 s.
        let granted = (0..100).filter(|_| b.try_retry(t, &r)).count();
        assert_eq!(granted, 30);
        // Ten seconds on, the old slots no longer count.
        assert!(b.try_retry(t + 11_000, &r));
    }

    #[test]
    fn retry_conditions_parse_and_refuse_what_is_never_retried() {
        let on = RetryOn::parse(&["gateway-error".into(), "500".into()]).unwrap();
        assert_eq!(on.statuses, vec![500, 502, 503, 504]);
        assert!(!on.connect_failure);
        let d = RetryOn::parse(&[]).unwrap();
        assert!(d.connect_failure && d.reset && d.statuses.is_empty());
        assert!(
            RetryOn::parse(&["403".into()])
                .unwrap_err()
                .contains("never retried")
        );
        assert!(
            RetryOn::parse(&["flaky".into()])
                .unwrap_err()
                .contains("unknown")
        );
    }

    #[test]
    fn a_route_marks_its_calls_retryable_and_sets_its_own_timeout_and_retries() {
        let pat = |p: &str| meshward_policy::matcher::PathPattern::parse(p).unwrap();
        let s = Settings {
            timeout: Some(Duration::from_secs(5)),
            retry: Some(retry(0.2, 10)),
            routes: vec![
                Route {
                    name: Some("create".into()),
                    methods: vec!["POST".into()],
                    paths: vec![pat("/orders")],
                    retryable: true,
                    timeout: Some(Duration::from_secs(1)),
                    retry: None,
                },
                Route {
                    name: Some("report".into()),
                    methods: vec![],
                    paths: vec![pat("/reports/*")],
                    retryable: false,
                    timeout: None,
                    retry: Some(Retry {
                        attempts: 0,
                        ..retry(0.2, 10)
                    }),
                },
            ],
            ..Settings::default()
        };
        let post = hyper::Method::POST;
        // The marked route: POST retried, its own timeout; `//orders` is the same path.
        let r = s.for_request(&post, "//orders?x=1");
        assert_eq!(r.route.and_then(|r| r.name.as_deref()), Some("create"));
        assert!(r.retry.is_some());
        assert_eq!(r.timeout, Some(Duration::from_secs(1)));
        // Another path: POST is not idempotent, not retried; the service's timeout.
        let r = s.for_request(&post, "/carts");
        assert!(r.route.is_none() && r.retry.is_none());
        assert_eq!(r.timeout, Some(Duration::from_secs(5)));
        assert!(s.for_request(&hyper::Method::GET, "/carts").retry.is_some());
        // A route whose retries say none: not even GET.
        let r = s.for_request(&hyper::Method::GET, "/reports/q3");
        assert_eq!(r.route.and_then(|r| r.name.as_deref()), Some("report"));
        assert!(r.retry.is_none());
    }

    #[tokio::test]
    async fn the_breaker_refuses_beyond_its_caps_and_queues_only_max_pending() {
        let s = Arc::new(ServiceState::default());
        let b = Breaker {
            max_connections: None,
            max_pending: 1,
            max_requests: Some(2),
        };
        let p1 = s.admit(&b, false, None).await.unwrap();
        let _p2 = s.admit(&b, false, None).await.unwrap();
        // A third waits (one may); a fourth is refused at once.
        let s2 = s.clone();
        let waiting = tokio::spawn(async move {
            s2.admit(&b, false, Some(Duration::from_secs(5)))
                .await
                .is_some()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(s.admit(&b, false, None).await.is_none());
        drop(p1);
        assert!(waiting.await.unwrap());
        let c = Breaker {
            max_connections: Some(1),
            ..Breaker::default()
        };
        let t = s.admit_connection(&c).unwrap();
        assert!(s.admit_connection(&c).is_none());
        drop(t);
        assert!(s.admit_connection(&c).is_some());
    }
}
