//! The decision log writer: every deny and a sample of allows, as JSON lines in the
//! format of `docs/decision-log.md`, written by a background thread so the request path
//! never waits on the disk. When the queue is full, records are dropped and counted.
//!
//! Stage: the end of the inbound request gate ([`crate::gate`] is its one caller on the
//! inbound side). Nothing here takes a lock shared across connections: the metric series
//! and the destination label are cached per connection ([`Series`]) or in lock-free
//! snapshots, and both queues are bounded channels whose senders never block.
#![deny(clippy::disallowed_types)]

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use meshward_policy::decision::{Decision, Request, Verdict, WorkloadRef};
use meshward_policy::decision_log::DecisionRecord;

/// What the proxy adds to a record beyond the request and decision.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// The source's proxy decided (transparent-mode egress checks).
    pub outbound: bool,
    pub detail: Option<String>,
    /// The original destination of a captured connection.
    pub address: Option<std::net::SocketAddr>,
    /// Allowed HTTP requests: the time to the app's response headers.
    pub duration: Option<std::time::Duration>,
    /// The caller's sidecar: the endpoint that served or was tried last.
    pub endpoint: Option<std::net::SocketAddr>,
    /// The caller's sidecar: how many attempts the request took.
    pub attempts: Option<u32>,
    /// A fault was injected into this allowed request (docs/faults.md): kept, never
    /// sampled away, so a drill's every injected failure is on record.
    pub injected: bool,
    /// HTTP: the status the caller received.
    pub status: Option<u16>,
    /// HTTP: the response body bytes relayed to the caller.
    pub response_bytes: Option<u64>,
}

/// A destination and its metric label.
type Labelled = (WorkloadRef, Arc<str>);

/// One connection's cache of what its records are counted under: the `meshward_requests`
/// series and the destination's label, reused while they stay the same (they mostly do:
/// one peer, one workload).
#[derive(Debug, Default)]
pub struct Series {
    requests: meshward_telemetry::RequestSeries,
    destination: Option<Labelled>,
}

/// Where decisions go.
#[derive(Debug, Clone)]
pub struct DecisionLog {
    tx: Option<SyncSender<String>>,
    /// Log one allow in this many.
    sample_allows: u64,
    seen_allows: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
    pub allowed: Arc<AtomicU64>,
    pub denied: Arc<AtomicU64>,
    /// Every decision is counted here, logged or not.
    pub metrics: Arc<meshward_telemetry::ProxyMetrics>,
    /// Records waiting to be shipped to the control plane.
    pub ship: Option<Arc<ShipQueue>>,
    /// Per-request metrics (off: only the decision log, for the overhead benchmark and
    /// the leanest deployments).
    pub metrics_on: bool,
    /// The last destination labelled for a caller without a [`Series`] (lock-free).
    last_destination: Arc<arc_swap::ArcSwapOption<Labelled>>,
}

/// The bounded queue of records for the control plane: when it is full (the control plane
/// unreachable, say) new records are dropped and counted, never waited for.
#[derive(Debug)]
pub struct ShipQueue {
    /// Bounded: `try_send` never waits and never locks.
    tx: tokio::sync::mpsc::Sender<String>,
    /// Only the shipper takes records; a second taker at the same moment gets none.
    rx: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<String>>,
    /// Dropped since the last batch (reported with it).
    dropped: AtomicU64,
    metrics: Arc<meshward_telemetry::ProxyMetrics>,
    /// Sampled allows shipped at most this many per second (0: no limit): above it, only
    /// one in `every` of them is shipped, with its weight multiplied by `every`, so that
    /// the control plane's counts stay right while the proxy's cost stays flat under load.
    allows_per_second: u64,
    every: AtomicU64,
    /// Sampled allows since the last tick (they set `every`).
    sampled: AtomicU64,
}

/// One in how many sampled allows to ship when `sampled` arrived over `tick`, to stay at
/// most `per_second` shipped per second.
pub fn ship_every(sampled: u64, tick: std::time::Duration, per_second: u64) -> u64 {
    if per_second == 0 {
        return 1;
    }
    let budget = (per_second as f64 * tick.as_secs_f64()).max(1.0);
    ((sampled as f64 / budget).ceil() as u64).max(1)
}

impl ShipQueue {
    /// Called every `tick` by the shipper: sets the shipping interval of sampled allows
    /// from how many arrived since the last call.
    pub fn retune(&self, tick: std::time::Duration) -> u64 {
        let sampled = self.sampled.swap(0, Ordering::Relaxed);
        let every = ship_every(sampled, tick, self.allows_per_second);
        self.every.store(every, Ordering::Relaxed);
        every
    }

    /// Whether to ship this sampled allow, and the factor its weight takes.
    fn ship_allow(&self) -> Option<u64> {
        let n = self.sampled.fetch_add(1, Ordering::Relaxed);
        let every = self.every.load(Ordering::Relaxed).max(1);
        n.is_multiple_of(every).then_some(every)
    }

    fn push(&self, line: String) {
        if self.tx.try_send(line).is_err() {
            self.lost(1);
        }
    }

    /// Counts records that will never reach the control plane.
    pub fn lost(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.metrics.decision_ship_dropped.inc_by(n);
    }

    /// Takes up to `n` records, oldest first.
    pub fn take(&self, n: usize) -> Vec<String> {
        let Ok(mut rx) = self.rx.try_lock() else {
            return vec![];
        };
        let mut out = Vec::with_capacity(n.min(rx.len()));
        while out.len() < n {
            match rx.try_recv() {
                Ok(line) => out.push(line),
                Err(_) => break,
            }
        }
        out
    }

    /// Records dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DecisionLog {
    /// Turns per-request metrics off.
    pub fn without_metrics(mut self) -> Self {
        self.metrics_on = false;
        self
    }

    /// Also queues records for the control plane, at most `cap` waiting (0: off): every
    /// deny, and sampled allows — at most `allows_per_second` of them (0: all), weighted.
    pub fn with_shipping(mut self, cap: usize, allows_per_second: u64) -> Self {
        self.ship = (cap > 0).then(|| {
            // (tokio refuses a bound above `usize::MAX >> 3`.)
            let (tx, rx) = tokio::sync::mpsc::channel(cap.min(usize::MAX >> 4));
            Arc::new(ShipQueue {
                tx,
                rx: tokio::sync::Mutex::new(rx),
                dropped: AtomicU64::new(0),
                metrics: self.metrics.clone(),
                allows_per_second,
                every: AtomicU64::new(1),
                sampled: AtomicU64::new(0),
            })
        });
        self
    }

    /// Writes to `path`, rotating to `path.1` past `max_bytes`.
    pub fn to_file(path: PathBuf, max_bytes: u64, sample_allows: u64) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<String>(8192);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    if size + line.len() as u64 > max_bytes {
                        let _ = std::fs::rename(&path, path.with_extension("jsonl.1"));
                        match std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                        {
                            Ok(f) => {
                                file = f;
                                size = 0;
                            }
                            Err(_) => continue,
                        }
                    }
                    if file.write_all(line.as_bytes()).is_ok() {
                        size += line.len() as u64;
                    }
                }
            })?;
        Ok(Self::with(Some(tx), sample_allows))
    }

    /// Counts decisions but writes none.
    pub fn disabled() -> Self {
        Self::with(None, 1)
    }

    /// No file; sampling as given (for shipping only).
    pub fn without_file(sample_allows: u64) -> Self {
        Self::with(None, sample_allows)
    }

    fn with(tx: Option<SyncSender<String>>, sample_allows: u64) -> Self {
        DecisionLog {
            tx,
            sample_allows: sample_allows.max(1),
            seen_allows: Arc::default(),
            dropped: Arc::default(),
            allowed: Arc::default(),
            denied: Arc::default(),
            metrics: Arc::default(),
            ship: None,
            metrics_on: true,
            last_destination: Arc::default(),
        }
    }

    /// Records a decision (all denies, one allow in `sample_allows`).
    pub fn record(&self, req: &Request, d: &Decision) {
        self.record_with(req, d, &Extra::default());
    }

    /// Records a decision with the proxy's own context (direction, detail, address).
    pub fn record_with(&self, req: &Request, d: &Decision, extra: &Extra) {
        self.record_in(None, req, d, extra);
    }

    /// [`DecisionLog::record_with`], counted under the connection's own `series` when it
    /// has one.
    pub fn record_in(
        &self,
        series: Option<&mut Series>,
        req: &Request,
        d: &Decision,
        extra: &Extra,
    ) {
        self.count(series, req, d, extra.outbound);
        let weight = match d.verdict {
            Verdict::Deny => {
                self.denied.fetch_add(1, Ordering::Relaxed);
                1
            }
            // The caller's record of a retried call, a request a fault was injected into:
            // rare, each one kept.
            Verdict::Allow if extra.attempts.is_some() || extra.injected || flips(d) => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
                1
            }
            Verdict::Allow => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
                if !self
                    .seen_allows
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(self.sample_allows)
                {
                    return;
                }
                self.sample_allows
            }
        };
        // Shipped: every deny; a sampled allow as the shipping budget says, weighted.
        let ship = self.ship.as_ref().and_then(|q| match d.verdict {
            Verdict::Deny => Some((q, 1)),
            Verdict::Allow if extra.attempts.is_some() || extra.injected || flips(d) => {
                Some((q, 1))
            }
            Verdict::Allow => q.ship_allow().map(|f| (q, f)),
        });
        if self.tx.is_none() && ship.is_none() {
            return;
        }
        let mut rec = DecisionRecord::new(req, d, u32::try_from(weight).unwrap_or(u32::MAX));
        if extra.outbound {
            rec.direction = "outbound".into();
        }
        rec.detail.clone_from(&extra.detail);
        rec.address = extra.address.map(|a| a.to_string());
        rec.duration_ns = extra
            .duration
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        rec.endpoint = extra.endpoint.map(|a| a.to_string());
        rec.attempts = extra.attempts;
        rec.status = extra.status;
        rec.response_bytes = extra.response_bytes;
        let mut line = rec.to_line();
        if let Some((q, factor)) = ship {
            if factor > 1 {
                // Thinned: the shipped copy stands for `factor` times as many.
                rec.weight = u32::try_from(weight.saturating_mul(factor)).unwrap_or(u32::MAX);
                q.push(rec.to_line());
            } else if self.tx.is_none() {
                q.push(line);
                return;
            } else {
                q.push(line.clone());
            }
        }
        let Some(tx) = &self.tx else { return };
        line.push('\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.decision_log_dropped.inc();
        }
    }

    /// The destination's metric label, `external` for every address outside the mesh; the
    /// last one is kept (a proxy's records mostly name its own workload).
    fn destination_label(&self, series: Option<&mut Series>, dest: &WorkloadRef) -> Arc<str> {
        if dest.namespace == "external" {
            return Arc::from("external");
        }
        if let Some(s) = series {
            return match &s.destination {
                Some((w, label)) if w == dest => label.clone(),
                _ => {
                    let label: Arc<str> = Arc::from(dest.to_string());
                    s.destination = Some((dest.clone(), label.clone()));
                    label
                }
            };
        }
        if let Some(last) = self.last_destination.load().as_ref()
            && last.0 == *dest
        {
            return last.1.clone();
        }
        let label: Arc<str> = Arc::from(dest.to_string());
        self.last_destination
            .store(Some(Arc::new((dest.clone(), label.clone()))));
        label
    }

    /// The metrics of a decision: the request counter (bounded labels: identities,
    /// workload names, codes), the decision time, shadow verdicts.
    fn count(&self, mut series: Option<&mut Series>, req: &Request, d: &Decision, outbound: bool) {
        if !self.metrics_on {
            return;
        }
        let m = &self.metrics;
        let destination = self.destination_label(series.as_deref_mut(), &req.destination);
        let labels = meshward_telemetry::RequestLabels {
            direction: if outbound { "outbound" } else { "inbound" },
            source: req
                .source
                .identity()
                .map_or_else(|| Arc::from("unauthenticated"), |i| i.as_arc().clone()),
            destination,
            verdict: d.verdict.as_str(),
            reason: d.reason.as_str(),
        };
        match series {
            Some(s) => m.count_request_in(&mut s.requests, labels),
            None => m.count_request(labels),
        }
        if d.reason.is_policy() {
            m.decision_time.observe(d.elapsed.as_secs_f64());
        }
        if let Some(sh) = &d.shadow {
            m.shadow
                .get_or_create(&meshward_telemetry::ShadowLabels {
                    policy: sh.policy.as_deref().unwrap_or("").to_owned(),
                    verdict: sh.verdict.as_str(),
                })
                .inc();
        }
    }
}

/// A rollout's candidate decides this request otherwise than the enforced revision: the
/// evidence the rollout's gate counts, so each one is kept (never sampled away).
fn flips(d: &Decision) -> bool {
    d.candidate.as_ref().is_some_and(|c| c.verdict != d.verdict)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use meshward_policy::decision::{
        Decision, PolicyRevision, Reason, Request, Source, Verdict, WorkloadRef,
    };
    use meshward_policy::decision_log::DecisionRecord;

    use super::{DecisionLog, ship_every};

    fn request() -> Request {
        Request {
            source: Source::Unauthenticated,
            destination: WorkloadRef::parse("shop/orders").unwrap_or_else(|e| panic!("{e}")),
            port: 80,
            http: None,
            at: SystemTime::now(),
        }
    }

    #[test]
    fn the_shipping_interval_keeps_to_the_budget() {
        let tick = Duration::from_millis(200);
        assert_eq!(ship_every(0, tick, 500), 1);
        assert_eq!(ship_every(100, tick, 500), 1, "exactly the budget");
        assert_eq!(ship_every(101, tick, 500), 2);
        assert_eq!(ship_every(960, tick, 500), 10);
        assert_eq!(ship_every(1_000_000, tick, 0), 1, "0: no limit");
    }

    #[test]
    fn an_allow_the_rollouts_candidate_would_deny_is_never_sampled_away() {
        let log = DecisionLog::without_file(10).with_shipping(100_000, 500);
        let q = log.ship.clone().unwrap_or_else(|| panic!("shipping is on"));
        let req = request();
        let mut same = Decision::bare(Verdict::Allow, Reason::AllowedByRule, PolicyRevision(1));
        same.candidate = Some(meshward_policy::decision::CandidateDecision {
            rollout: 4,
            verdict: Verdict::Allow,
            reason: Reason::AllowedByRule,
            policy: None,
        });
        let mut flip = same.clone();
        if let Some(c) = flip.candidate.as_mut() {
            c.verdict = Verdict::Deny;
            c.reason = Reason::NoAllowAtTier;
        }
        for _ in 0..100 {
            log.record(&req, &same);
        }
        for _ in 0..7 {
            log.record(&req, &flip);
        }
        let recs: Vec<DecisionRecord> = q
            .take(usize::MAX)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let flips: Vec<&DecisionRecord> = recs
            .iter()
            .filter(|r| r.candidate_verdict == Some(Verdict::Deny))
            .collect();
        assert_eq!(flips.len(), 7, "every flip, each of weight 1");
        assert!(flips.iter().all(|r| r.weight == 1
            && r.candidate_rollout == Some(4)
            && r.candidate_reason == Some(Reason::NoAllowAtTier)));
        let same_weight: u64 = recs
            .iter()
            .filter(|r| r.candidate_verdict == Some(Verdict::Allow))
            .map(|r| u64::from(r.weight))
            .sum();
        assert_eq!(same_weight, 100, "the others sampled (1 in 10), weighted");
    }

    #[test]
    fn thinned_allows_carry_the_weight_of_those_not_shipped_and_denies_all_ship() {
        let log = DecisionLog::without_file(10).with_shipping(100_000, 500);
        let q = log.ship.clone().unwrap_or_else(|| panic!("shipping is on"));
        let req = request();
        let allow = Decision::bare(Verdict::Allow, Reason::AllowedByRule, PolicyRevision(1));
        let deny = Decision::bare(Verdict::Deny, Reason::NoPolicy, PolicyRevision(1));
        // A busy 200 ms: 10,000 allows (1,000 sampled, 10x the budget) and 7 denies.
        for _ in 0..10_000 {
            log.record(&req, &allow);
        }
        assert_eq!(q.retune(Duration::from_millis(200)), 10);
        assert_eq!(q.take(usize::MAX).len(), 1_000, "shipped before the retune");
        // The next 200 ms at the same rate: one sampled allow in 10 is shipped.
        for _ in 0..10_000 {
            log.record(&req, &allow);
        }
        for _ in 0..5 {
            log.record(&req, &deny);
        }
        let recs: Vec<DecisionRecord> = q
            .take(usize::MAX)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let allows: Vec<&DecisionRecord> = recs
            .iter()
            .filter(|r| r.verdict == Verdict::Allow)
            .collect();
        assert_eq!(allows.len(), 100, "at the budget");
        assert!(
            allows.iter().all(|r| r.weight == 100),
            "10 (log) x 10 (thinning)"
        );
        assert_eq!(
            allows.iter().map(|r| u64::from(r.weight)).sum::<u64>(),
            10_000,
            "the weights still add up to every allow"
        );
        assert_eq!(
            recs.iter().filter(|r| r.verdict == Verdict::Deny).count(),
            5,
            "denies are never thinned"
        );
        // Quiet again: back to every sampled allow.
        assert_eq!(q.retune(Duration::from_millis(200)), 10);
        assert_eq!(q.retune(Duration::from_millis(200)), 1);
    }
}
