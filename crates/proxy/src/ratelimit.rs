//! Inbound stage 4, step 6 of the request gate: the `RateLimitPolicy`s that target this
//! workload (docs/containment.md). Each limit of a policy applies to the sources its
//! `from` selects and counts, per `per`, each source identity's own budget (the default),
//! each source namespace's, or one shared by all of them:
//! - `requestsPerSecond` with `burst`: a token bucket, as GCRA (one atomic "theoretical
//!   arrival time" per budget, no lock, no timer);
//! - `maxConcurrent`: requests in progress at once (on a TCP port: open connections);
//! - `maxConnections`: open connections at once, on every port.
//!
//! A request is checked against its source's budgets from the narrowest (its own) to the
//! widest (shared), and takes from all of them or from none: a source over its own limit
//! is refused before it touches a shared budget, and a refusal by a wider budget gives
//! back what the narrower ones took. So a noisy source never spends anyone else's
//! budget. Callers without a certificate (on a port that allows them) share one budget,
//! named `unauthenticated`.
//!
//! The budgets live beside the view ([`Budgets`], keyed by the limit's own settings
//! and the source), so a new revision keeps every budget whose limit did not change. A
//! connection resolves its source's budgets once per revision ([`Resolved`]); the request
//! path then only touches atomics.
#![deny(clippy::disallowed_types)]

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshward_identity::SpiffeId;
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::{Other, PolicySet, SourceMatch};
use meshward_policy::reference::source_matches;
use meshward_policy::resource::{LimitPer, RateLimitPolicySpec};

/// A token bucket's settings, in nanoseconds: one request per `interval`, up to
/// `tolerance` ahead (burst × interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rate {
    interval: u64,
    tolerance: u64,
}

/// One limit of one `RateLimitPolicy`, compiled for this workload.
#[derive(Debug)]
pub struct Limit {
    /// The policy (`namespace/name`) and the limit's index in it, for the refusal.
    pub policy: Arc<str>,
    pub index: usize,
    /// The budgets' key: the policy and every setting of the limit, so a changed limit
    /// starts afresh and an unchanged one keeps its budgets across revisions.
    key: u64,
    from: Option<SourceMatch>,
    per: LimitPer,
    rate: Option<Rate>,
    max_concurrent: Option<u32>,
    max_connections: Option<u32>,
}

/// The limits of one revision for this workload, narrowest first (per identity, per
/// namespace, shared), in the view.
#[derive(Debug, Default)]
pub struct RateLimits {
    limits: Vec<Arc<Limit>>,
}

impl RateLimits {
    /// Compiles the `RateLimitPolicy`s that target this workload (the view has selected
    /// them).
    pub fn compile(specs: &[Other<RateLimitPolicySpec>]) -> RateLimits {
        let mut limits = vec![];
        for p in specs {
            for (index, l) in p.spec.limits.iter().enumerate() {
                let from = match &l.from {
                    Some(f) => match SourceMatch::of_valid(f) {
                        Some(m) => Some(m),
                        // (A loaded set has validated it: never here.)
                        None => continue,
                    },
                    None => None,
                };
                let mut h = DefaultHasher::new();
                (&*p.id, format!("{l:?}")).hash(&mut h);
                let rate = l.requests_per_second.map(|rps| {
                    let interval = 1_000_000_000 / u64::from(rps.max(1));
                    let burst = u64::from(l.burst.unwrap_or(rps).max(1));
                    Rate {
                        interval,
                        tolerance: interval.saturating_mul(burst),
                    }
                });
                limits.push(Arc::new(Limit {
                    policy: p.id.clone(),
                    index,
                    key: h.finish(),
                    from,
                    per: l.per,
                    rate,
                    max_concurrent: l.max_concurrent,
                    max_connections: l.max_connections,
                }));
            }
        }
        // Narrowest first (stable: configuration order within each kind).
        limits.sort_by_key(|l| l.per);
        RateLimits { limits }
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// The keys of every limit, for pruning the budgets of limits gone.
    fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.limits.iter().map(|l| l.key)
    }

    /// The budgets `source` (none: no certificate) draws on at `workload`, from the
    /// narrowest.
    pub fn resolve(
        &self,
        revision: u64,
        states: &Budgets,
        set: &PolicySet,
        workload: &WorkloadRef,
        source: Option<&SpiffeId>,
    ) -> Resolved {
        static NONE: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        let src_attrs = source
            .and_then(|s| set.workload_by_identity(s))
            .map_or(&NONE, |w| &w.attributes);
        let dst_attrs = set.workload(workload).map_or(&NONE, |w| &w.attributes);
        let td = set.mesh.trust_domain.as_str();
        let mut budgets = vec![];
        for l in &self.limits {
            if let Some(m) = &l.from
                && !source_matches(m, source, src_attrs, dst_attrs, td)
            {
                continue;
            }
            let who: Arc<str> = match (source, l.per) {
                (None, _) => "unauthenticated".into(),
                (Some(id), LimitPer::Identity) => id.as_str().into(),
                (Some(id), LimitPer::Namespace) => match id.namespace() {
                    Some(ns) => format!("{}/ns/{ns}", id.trust_domain_name()).into(),
                    None => id.as_str().into(),
                },
                (Some(_), LimitPer::Shared) => "*".into(),
            };
            budgets.push((l.clone(), states.budget(l.key, who)));
        }
        Resolved { revision, budgets }
    }
}

/// A source's budgets under one revision: what a connection keeps.
#[derive(Debug, Default)]
pub struct Resolved {
    pub revision: u64,
    budgets: Vec<(Arc<Limit>, Arc<Budget>)>,
}

/// Why a request or connection was refused.
#[derive(Debug, Clone)]
pub struct Over {
    pub policy: Arc<str>,
    pub index: usize,
    /// `rate`, `concurrency` or `connections`.
    pub kind: &'static str,
    /// When the rate allows the next one (rate only).
    pub retry_after: Option<Duration>,
}

impl Over {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
            .map(|s| s.max(1))
    }
}

/// What an admitted request or connection holds: its places in the concurrency budgets,
/// given back when it is dropped.
#[derive(Debug, Default)]
pub struct Permit {
    held: Vec<(Arc<Budget>, Slot)>,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Request,
    Connection,
}

impl Drop for Permit {
    fn drop(&mut self) {
        for (b, slot) in &self.held {
            b.counter(*slot).fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Resolved {
    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    /// One request on an HTTP port (`tcp`: one connection on a TCP port, where the rate
    /// and `maxConcurrent` count connections): every budget's rate and concurrency, all
    /// or none.
    pub fn request(&self, tcp: bool) -> Result<Permit, Over> {
        self.take(|l| (l.rate, l.max_concurrent), Slot::Request, tcp)
    }

    /// One connection (after the handshake, the source known): `maxConnections`.
    pub fn connection(&self) -> Result<Permit, Over> {
        self.take(|l| (None, l.max_connections), Slot::Connection, false)
    }

    fn take(
        &self,
        what: impl Fn(&Limit) -> (Option<Rate>, Option<u32>),
        slot: Slot,
        tcp: bool,
    ) -> Result<Permit, Over> {
        let mut permit = Permit::default();
        let now = now_ns();
        // On a refusal, the tokens the budgets before it took are given back (their
        // concurrency places go back with `permit`): all or none, no allocation.
        let refund = |upto: usize| {
            for (l, b) in &self.budgets[..upto] {
                if let (Some(r), _) = what(l) {
                    b.refund(r);
                }
            }
        };
        for (i, (l, b)) in self.budgets.iter().enumerate() {
            let (rate, max) = what(l);
            let over = |kind, retry_after| Over {
                policy: l.policy.clone(),
                index: l.index,
                kind,
                retry_after,
            };
            if let Some(max) = max {
                if !b.enter(slot, max) {
                    let kind = match slot {
                        Slot::Request if !tcp => "concurrency",
                        _ => "connections",
                    };
                    refund(i);
                    return Err(over(kind, None));
                }
                permit.held.push((b.clone(), slot));
            }
            if let Some(r) = rate
                && let Err(wait) = b.acquire(r, now)
            {
                refund(i);
                return Err(over("rate", Some(Duration::from_nanos(wait))));
            }
        }
        Ok(permit)
    }
}

/// One budget: a token bucket and two concurrency counters.
#[derive(Debug, Default)]
pub struct Budget {
    /// GCRA's theoretical arrival time, in nanoseconds since [`now_ns`]'s epoch.
    tat: AtomicU64,
    requests: AtomicU32,
    connections: AtomicU32,
}

impl Budget {
    fn counter(&self, slot: Slot) -> &AtomicU32 {
        match slot {
            Slot::Request => &self.requests,
            Slot::Connection => &self.connections,
        }
    }

    /// A place among at most `max`; false when they are all taken.
    fn enter(&self, slot: Slot, max: u32) -> bool {
        self.counter(slot)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// One token at `now`, or how long until there is one.
    fn acquire(&self, r: Rate, now: u64) -> Result<(), u64> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now) + r.interval;
            if next - now > r.tolerance {
                return Err(next - now - r.tolerance);
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(t) => tat = t,
            }
        }
    }

    /// Gives back a token [`Budget::acquire`] took.
    fn refund(&self, r: Rate) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(r.interval))
            });
    }

    /// Requests in progress (for tests and the admin endpoint).
    pub fn in_progress(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }
}

/// Nanoseconds since the first call (the budgets' clock: monotonic, process-wide; a fresh
/// budget, at 0, is a full one).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let e = EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Every budget, by limit and source: replaced whole (copy-on-write) when a source is
/// first seen or a view drops limits; read once per connection and revision, never per
/// request.
#[derive(Debug, Default)]
pub struct Budgets(ArcSwap<BudgetTable>);

/// Budgets by (limit key, source).
type BudgetTable = HashMap<(u64, Arc<str>), Arc<Budget>>;

impl Budgets {
    /// The budget of `who` under limit `key`, made when first asked for.
    fn budget(&self, key: u64, who: Arc<str>) -> Arc<Budget> {
        let k = (key, who);
        if let Some(b) = self.0.load().get(&k) {
            return b.clone();
        }
        self.0.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(k.clone()).or_default();
            m
        });
        self.0.load().get(&k).cloned().unwrap_or_default()
    }

    /// Keeps only the budgets of `limits` (the new view's).
    pub fn retain(&self, limits: &RateLimits) {
        let keep: std::collections::HashSet<u64> = limits.keys().collect();
        self.0.rcu(|m| {
            m.iter()
                .filter(|((k, _), _)| keep.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>()
        });
    }

    /// Requests (on a TCP port: connections) in progress over every budget (for tests and
    /// the admin endpoint).
    pub fn in_progress(&self) -> u32 {
        self.0.load().values().map(|b| b.in_progress()).sum()
    }

    /// How many budgets exist.
    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(rps: u64, burst: u64) -> Rate {
        let interval = 1_000_000_000 / rps;
        Rate {
            interval,
            tolerance: interval * burst,
        }
    }

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let b = Budget::default();
        let r = rate(10, 3);
        let t = 5_000_000_000;
        for _ in 0..3 {
            assert!(b.acquire(r, t).is_ok());
        }
        let wait = b
            .acquire(r, t)
            .expect_err("the 4th at once is over the burst");
        assert_eq!(wait, 100_000_000, "one interval until the next token");
        assert!(b.acquire(r, t + 99_000_000).is_err());
        assert!(b.acquire(r, t + 100_000_000).is_ok());
        // Idle for long: the burst again, never more.
        let later = t + 60_000_000_000;
        for _ in 0..3 {
            assert!(b.acquire(r, later).is_ok());
        }
        assert!(b.acquire(r, later).is_err());
    }

    #[test]
    fn a_refund_gives_the_token_back() {
        let b = Budget::default();
        let r = rate(1, 1);
        let t = 5_000_000_000;
        assert!(b.acquire(r, t).is_ok());
        assert!(b.acquire(r, t).is_err());
        b.refund(r);
        assert!(b.acquire(r, t).is_ok());
    }

    #[test]
    fn concurrency_places_are_given_back_on_drop() {
        let b = Arc::new(Budget::default());
        assert!(b.enter(Slot::Request, 2));
        assert!(b.enter(Slot::Request, 2));
        assert!(!b.enter(Slot::Request, 2));
        let p = Permit {
            held: vec![(b.clone(), Slot::Request)],
        };
        drop(p);
        assert_eq!(b.in_progress(), 1);
        assert!(b.enter(Slot::Request, 2));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let o = |ns| Over {
            policy: "a/b".into(),
            index: 0,
            kind: "rate",
            retry_after: Some(Duration::from_nanos(ns)),
        };
        assert_eq!(o(1).retry_after_secs(), Some(1));
        assert_eq!(o(1_000_000_000).retry_after_secs(), Some(1));
        assert_eq!(o(1_000_000_001).retry_after_secs(), Some(2));
    }
}
