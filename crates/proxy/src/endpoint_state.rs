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
use std::sync::atomic::{AtomicU64, Ordering};

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

/// What the proxy knows about one endpoint across revisions.
#[derive(Debug, Default)]
pub struct EndpointState {
    requests: AtomicU64,
    failures: AtomicU64,
}

impl EndpointState {
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
}

/// Every endpoint's state, by stable name. Replaced whole (copy-on-write) when a view is
/// built; never read on the request path.
#[derive(Debug, Default)]
pub struct EndpointStates(ArcSwap<HashMap<EndpointKey, Arc<EndpointState>>>);

impl EndpointStates {
    /// Starts building the states of the next view from the current ones.
    pub fn builder(&self) -> StatesBuilder {
        StatesBuilder {
            old: self.0.load_full(),
            new: HashMap::new(),
        }
    }

    /// Keeps exactly the states the next view asked for (the others are dropped).
    pub fn commit(&self, b: StatesBuilder) {
        self.0.store(Arc::new(b.new));
    }

    /// The state of `key`, if some view in force has that endpoint.
    pub fn get(&self, key: &EndpointKey) -> Option<Arc<EndpointState>> {
        self.0.load().get(key).cloned()
    }

    /// How many endpoints have state.
    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(endpoint, requests, failures)` of every endpoint, sorted by name.
    pub fn snapshot(&self) -> Vec<(EndpointKey, u64, u64)> {
        let mut v: Vec<_> = self
            .0
            .load()
            .iter()
            .map(|(k, s)| (k.clone(), s.requests(), s.failures()))
            .collect();
        v.sort();
        v
    }
}

/// Hands out the state of each endpoint of a view being built: the existing one when the
/// previous view had the endpoint, a fresh one otherwise.
#[derive(Debug)]
pub struct StatesBuilder {
    old: Arc<HashMap<EndpointKey, Arc<EndpointState>>>,
    new: HashMap<EndpointKey, Arc<EndpointState>>,
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
}
