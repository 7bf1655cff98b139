//! Beside the data-plane view: long-lived per-endpoint state (request and failure counters
//! today; health, ejection and breaker counters when resilience lands, issue 14). Keyed by
//! the stable name of an endpoint — the service and the address — so a new revision that
//! keeps an endpoint keeps its state, and an endpoint that disappears loses it.
//!
//! The request path never looks anything up here: each endpoint of a compiled view holds
//! its own `Arc<EndpointState>` ([`crate::discovery::Endpoint::state`]), handed out when the
//! view is built ([`StatesBuilder`]) and only updated with atomics afterwards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use meshward_policy::decision::WorkloadRef;

/// The stable name of an endpoint: the service (or workload, for a direct call) it serves
/// and the address the proxy dials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub service: WorkloadRef,
    pub addr: SocketAddr,
}

impl std::fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.service, self.addr)
    }
}

/// Milliseconds on the proxy's monotonic clock (since the first call).
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    // +1: 0 means "never" in the fields below.
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Why an endpoint is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejected {
    /// `consecutiveErrors` failures in a row.
    Consecutive,
    /// `failurePercent` of at least `minRequests` requests failed within `interval`.
    FailurePercent,
}

impl Ejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Ejected::Consecutive => "consecutive_failures",
            Ejected::FailurePercent => "failure_percent",
        }
    }
}

/// The outlier detector's settings for one service (resolved from its `TrafficPolicy`,
/// defaults otherwise: docs/resilience.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    pub consecutive: u32,
    pub failure_percent: Option<u32>,
    pub min_requests: u32,
    pub interval_ms: u64,
    pub base_ms: u64,
    pub max_ms: u64,
    pub max_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive: 5,
            failure_percent: None,
            min_requests: 20,
            interval_ms: 10_000,
            base_ms: 30_000,
            max_ms: 300_000,
            max_percent: 50,
        }
    }
}

/// What the proxy knows about one endpoint across revisions: counters, the in-flight
/// load and the peak-EWMA latency the balancer reads, and the outlier detector's state.
/// All atomics: updated by every connection that uses the endpoint, never locked.
#[derive(Debug, Default)]
pub struct EndpointState {
    requests: AtomicU64,
    failures: AtomicU64,
    /// Requests in flight (pooled HTTP) or open tunnels.
    outstanding: AtomicU32,
    /// Peak-EWMA of the latency (HTTP) or connect time (tunnel), nanoseconds as f64 bits;
    /// 0 until the first sample.
    rtt: AtomicU64,
    rtt_at: AtomicU64,
    consecutive: AtomicU32,
    /// Failure-percentage window: its start and its counts.
    window_at: AtomicU64,
    window_total: AtomicU32,
    window_failed: AtomicU32,
    /// Ejected until this `now_ms` (0: not ejected); how many times; why (`Ejected` + 1).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    reason: std::sync::atomic::AtomicU8,
    /// Back from an ejection and not yet answered well: one failure ejects it again.
    probation: AtomicBool,
    returned_at: AtomicU64,
    last_failure: AtomicU64,
    /// The endpoint's own sidecar says it is not ready (draining, its app down), via the
    /// control plane; why.
    not_ready: AtomicBool,
    not_ready_why: arc_swap::ArcSwapOption<String>,
}

/// The balancer's decay time for the latency estimate (Linkerd's default).
pub const DECAY_MS: f64 = 10_000.0;

/// An endpoint's state as the admin page and the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// `ready`, `ejected`, `not_ready` or `probation`.
    pub state: &'static str,
    /// Why its own sidecar says it is not ready.
    pub not_ready: Option<String>,
    /// Why it is ejected.
    pub reason: Option<&'static str>,
    /// Milliseconds until it returns, when ejected.
    pub returns_in_ms: Option<u64>,
    pub ejections: u32,
    pub outstanding: u32,
    pub latency_ms: Option<f64>,
}

impl EndpointState {
    /// What the endpoint's own sidecar says (`None`: ready).
    pub fn set_not_ready(&self, why: Option<Arc<String>>) {
        self.not_ready.store(why.is_some(), Ordering::Relaxed);
        self.not_ready_why.store(why);
    }

    /// Whether the endpoint's own sidecar says it is ready (the default).
    pub fn is_ready(&self) -> bool {
        !self.not_ready.load(Ordering::Relaxed)
    }

    /// One more request (HTTP) or connection (tunnel) sent to this endpoint.
    pub fn started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// One of them failed at the endpoint (no connection, handshake refused, no answer).
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// In flight now (requests, or open tunnels).
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Holds one place of the in-flight count until dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The latency estimate in nanoseconds, decayed to `now` (`default` before any sample).
    pub fn latency_ns(&self, now: u64, default: f64) -> f64 {
        let bits = self.rtt.load(Ordering::Relaxed);
        if bits == 0 {
            return default;
        }
        let rtt = f64::from_bits(bits);
        let age = now.saturating_sub(self.rtt_at.load(Ordering::Relaxed)) as f64;
        // Decays towards zero when no sample comes (as tower's peak EWMA): an endpoint that
        // stopped being chosen is tried again some time later, and a warm spare's cost
        // stays comparable to the busy endpoint's — so one that hangs is passed over once
        // a request or two are in flight on it, not after dozens (docs/resilience.md;
        // examples/drills/replica-hangs.yaml found it: decaying towards the 30 ms default
        // left the spare 30× dearer than a 1 ms endpoint, and a hung replica took ~30
        // requests before the balancer moved).
        let w = (-age / DECAY_MS).exp();
        rtt * w
    }

    /// The balancer's cost: latency × (in flight + 1) (peak-EWMA load, as Linkerd). An
    /// endpoint with no sample yet costs `default` × in flight: idle, it is tried at once
    /// (so a new or returning replica gets traffic even beside faster ones), busy, it is
    /// weighed as if it answered in `default`.
    pub fn cost(&self, now: u64, default: f64) -> f64 {
        let n = f64::from(self.outstanding());
        if self.rtt.load(Ordering::Relaxed) == 0 {
            return default * n;
        }
        self.latency_ns(now, default) * (n + 1.0)
    }

    /// Records a latency sample: a slower one is taken at once (the peak), a faster one
    /// moves the estimate by the time since the last sample (the EWMA).
    pub fn observe(&self, now: u64, sample_ns: f64) {
        let bits = self.rtt.load(Ordering::Relaxed);
        let next = if bits == 0 {
            sample_ns
        } else {
            let rtt = f64::from_bits(bits);
            if sample_ns > rtt {
                sample_ns
            } else {
                let age = now.saturating_sub(self.rtt_at.load(Ordering::Relaxed)) as f64;
                let w = (-age / DECAY_MS).exp();
                rtt * w + sample_ns * (1.0 - w)
            }
        };
        self.rtt.store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.rtt_at.store(now, Ordering::Relaxed);
    }

    /// Whether the balancer passes it over now.
    pub fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now < until {
            return true;
        }
        // Its time is up: back on probation (one failure ejects it again).
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.probation.store(true, Ordering::Relaxed);
            self.returned_at.store(now, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Failing now: `consecutive` failures in a row (the detector's own threshold), the
    /// last within the base ejection time. An endpoint that is failing but could not be
    /// ejected (the `maxEjectionPercent` cap) still counts as down for failover, and is
    /// tried again after that time like an ejected one.
    pub fn is_failing(&self, now: u64, cfg: &Outlier) -> bool {
        self.consecutive.load(Ordering::Relaxed) >= cfg.consecutive.max(1)
            && now.saturating_sub(self.last_failure.load(Ordering::Relaxed)) < cfg.base_ms
    }

    /// A good answer: the run of failures ends, probation ends; after a healthy
    /// `max_ms` since it returned, its ejection count starts again from zero.
    pub fn succeeded(&self, now: u64, cfg: &Outlier) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.window(now, cfg, false);
        if self.probation.load(Ordering::Relaxed) {
            self.probation.store(false, Ordering::Relaxed);
        }
        let back = self.returned_at.load(Ordering::Relaxed);
        if back != 0 && now.saturating_sub(back) > cfg.max_ms {
            self.ejections.store(0, Ordering::Relaxed);
            self.returned_at.store(0, Ordering::Relaxed);
        }
    }

    /// A failure the endpoint is to blame for. Returns why it should be ejected now, if it
    /// should (the caller checks the service's `maxEjectionPercent`, then [`Self::eject`]).
    pub fn failed_at(&self, now: u64, cfg: &Outlier) -> Option<Ejected> {
        self.failed();
        self.last_failure.store(now, Ordering::Relaxed);
        let run = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let pct = self.window(now, cfg, true);
        if self.is_ejected(now) {
            return None;
        }
        if self.probation.load(Ordering::Relaxed) || run >= cfg.consecutive.max(1) {
            return Some(Ejected::Consecutive);
        }
        pct.then_some(Ejected::FailurePercent)
    }

    /// Ejects it for base × (ejections so far + 1), at most max. Returns for how long.
    pub fn eject(&self, now: u64, cfg: &Outlier, why: Ejected) -> u64 {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = cfg
            .base_ms
            .saturating_mul(u64::from(n))
            .min(cfg.max_ms.max(cfg.base_ms));
        self.ejected_until.store(now + ms, Ordering::Relaxed);
        self.reason.store(why as u8 + 1, Ordering::Relaxed);
        self.probation.store(false, Ordering::Relaxed);
        ms
    }

    /// Counts one outcome in the failure-percentage window; true when the window's failure
    /// share crossed the threshold.
    fn window(&self, now: u64, cfg: &Outlier, failed: bool) -> bool {
        let Some(threshold) = cfg.failure_percent else {
            return false;
        };
        let at = self.window_at.load(Ordering::Relaxed);
        if now.saturating_sub(at) >= cfg.interval_ms
            && self
                .window_at
                .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.window_total.store(0, Ordering::Relaxed);
            self.window_failed.store(0, Ordering::Relaxed);
        }
        let total = self.window_total.fetch_add(1, Ordering::Relaxed) + 1;
        let bad = if failed {
            self.window_failed.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.window_failed.load(Ordering::Relaxed)
        };
        failed
            && total >= cfg.min_requests
            && u64::from(bad) * 100 >= u64::from(threshold) * u64::from(total)
    }

    /// As the admin page shows it.
    pub fn health(&self, now: u64) -> Health {
        let ejected = self.is_ejected(now);
        let until = self.ejected_until.load(Ordering::Relaxed);
        let bits = self.rtt.load(Ordering::Relaxed);
        let not_ready = self.not_ready_why.load_full();
        Health {
            state: if ejected {
                "ejected"
            } else if not_ready.is_some() {
                "not_ready"
            } else if self.probation.load(Ordering::Relaxed) {
                "probation"
            } else {
                "ready"
            },
            reason: match (ejected, self.reason.load(Ordering::Relaxed)) {
                (true, 1) => Some(Ejected::Consecutive.as_str()),
                (true, 2) => Some(Ejected::FailurePercent.as_str()),
                _ => None,
            },
            returns_in_ms: ejected.then(|| until.saturating_sub(now)),
            ejections: self.ejections.load(Ordering::Relaxed),
            outstanding: self.outstanding(),
            latency_ms: (bits != 0).then(|| self.latency_ns(now, 0.0) / 1e6),
            not_ready: not_ready.map(|w| w.as_str().to_owned()),
        }
    }
}

impl Health {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "state": self.state,
            "reason": self.reason,
            "returns_in_ms": self.returns_in_ms,
            "ejections": self.ejections,
            "outstanding": self.outstanding,
            "latency_ms": self.latency_ms,
            "not_ready": self.not_ready,
        })
    }
}

/// One place in an endpoint's in-flight count ([`EndpointState::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every endpoint's state, by stable name, and every called service's
/// ([`crate::resilience::ServiceState`]). Replaced whole (copy-on-write) when a view is
/// built; never read on the request path.
#[derive(Debug, Default)]
pub struct EndpointStates {
    endpoints: ArcSwap<HashMap<EndpointKey, Arc<EndpointState>>>,
    services: ArcSwap<HashMap<WorkloadRef, Arc<crate::resilience::ServiceState>>>,
    /// The workloads whose own sidecar says they are not ready (the control plane's
    /// last word), applied to every view's endpoints.
    not_ready: ArcSwap<HashMap<WorkloadRef, Arc<String>>>,
}

impl EndpointStates {
    /// Starts building the states of the next view from the current ones.
    pub fn builder(&self) -> StatesBuilder {
        StatesBuilder {
            old: self.endpoints.load_full(),
            new: HashMap::new(),
            old_services: self.services.load_full(),
            services: HashMap::new(),
        }
    }

    /// Takes the control plane's list of workloads not ready, for `discovery` (the view in
    /// force) and every later view.
    pub fn set_not_ready(
        &self,
        not_ready: HashMap<WorkloadRef, Arc<String>>,
        discovery: Option<&crate::discovery::Discovery>,
    ) {
        self.not_ready.store(Arc::new(not_ready));
        if let Some(d) = discovery {
            self.apply_readiness(d);
        }
    }

    /// Marks the endpoints of `discovery` ready or not as the last list says.
    pub fn apply_readiness(&self, discovery: &crate::discovery::Discovery) {
        let nr = self.not_ready.load();
        for e in discovery.all() {
            e.state.set_not_ready(nr.get(&e.workload).cloned());
        }
    }

    /// Keeps exactly the states the next view asked for (the others are dropped).
    pub fn commit(&self, b: StatesBuilder) {
        self.endpoints.store(Arc::new(b.new));
        self.services.store(Arc::new(b.services));
    }

    /// The state of `key`, if some view in force has that endpoint.
    pub fn get(&self, key: &EndpointKey) -> Option<Arc<EndpointState>> {
        self.endpoints.load().get(key).cloned()
    }

    /// How many endpoints have state.
    pub fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(endpoint, requests, failures)` of every endpoint, sorted by name.
    pub fn snapshot(&self) -> Vec<(EndpointKey, u64, u64)> {
        let mut v: Vec<_> = self
            .endpoints
            .load()
            .iter()
            .map(|(k, s)| (k.clone(), s.requests(), s.failures()))
            .collect();
        v.sort();
        v
    }

    /// Every endpoint with its health now, sorted by name (the admin page, the metrics).
    pub fn health(&self) -> Vec<(EndpointKey, Health)> {
        let now = now_ms();
        let mut v: Vec<_> = self
            .endpoints
            .load()
            .iter()
            .map(|(k, s)| (k.clone(), s.health(now)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Hands out the state of each endpoint (and called service) of a view being built: the
/// existing one when the previous view had it, a fresh one otherwise.
#[derive(Debug)]
pub struct StatesBuilder {
    old: Arc<HashMap<EndpointKey, Arc<EndpointState>>>,
    new: HashMap<EndpointKey, Arc<EndpointState>>,
    old_services: Arc<HashMap<WorkloadRef, Arc<crate::resilience::ServiceState>>>,
    services: HashMap<WorkloadRef, Arc<crate::resilience::ServiceState>>,
}

impl StatesBuilder {
    pub fn state(&mut self, key: &EndpointKey) -> Arc<EndpointState> {
        if let Some(s) = self.new.get(key) {
            return s.clone();
        }
        let s = self.old.get(key).cloned().unwrap_or_default();
        self.new.insert(key.clone(), s.clone());
        s
    }

    pub fn service(&mut self, service: &WorkloadRef) -> Arc<crate::resilience::ServiceState> {
        if let Some(s) = self.services.get(service) {
            return s.clone();
        }
        let s = self.old_services.get(service).cloned().unwrap_or_default();
        self.services.insert(service.clone(), s.clone());
        s
    }
}
