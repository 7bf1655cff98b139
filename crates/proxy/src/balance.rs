//! Outbound stage 2, balancing: which endpoint of a discovered set serves the next request
//! (pooled HTTP) or connection (tunnel, transparent capture). The one implementation of
//! endpoint choice; round robin today. Issue 14's power-of-two-choices over peak-EWMA
//! latency replaces [`RoundRobin::pick`] here and reads the endpoints'
//! [`crate::endpoint_state::EndpointState`].

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::discovery::{Endpoint, EndpointSet};

/// Round robin over whatever set it is given (the set of the view in force: a new view's
/// endpoints are chosen from the next pick on). One per outbound listener.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next endpoint of `set`, `None` when it has none.
    pub fn pick<'a>(&self, set: &'a EndpointSet) -> Option<&'a Endpoint> {
        let n = set.endpoints.len();
        if n == 0 {
            return None;
        }
        set.endpoints
            .get(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::endpoint_state::EndpointStates;
    use crate::view::tests::{orders, r, view};

    fn counts(rr: &RoundRobin, set: &EndpointSet, n: usize) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for _ in 0..n {
            let e = rr.pick(set).unwrap();
            *c.entry(e.addr().to_string()).or_default() += 1;
        }
        c
    }

    #[test]
    fn round_robin_spreads_evenly_and_skips_nothing() {
        let states = EndpointStates::default();
        let addrs = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];
        let v = view(1, &orders(&addrs, ""), &states);
        let set = v.discovery.explicit(&r("orders/orders"), 80);
        let rr = RoundRobin::default();
        // Every window of 3 picks visits each endpoint once, in order.
        let order: Vec<String> = (0..6)
            .map(|_| rr.pick(set).unwrap().addr().to_string())
            .collect();
        assert_eq!(order, [addrs, addrs].concat());
        let c = counts(&rr, set, 300);
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c.values().all(|&n| n == 100), "{c:?}");
    }

    #[test]
    fn round_robin_follows_a_new_view() {
        let states = EndpointStates::default();
        let rr = RoundRobin::default();
        let v1 = view(
            1,
            &orders(&["127.0.0.1:7001", "127.0.0.1:7002"], ""),
            &states,
        );
        let c = counts(&rr, v1.discovery.explicit(&r("orders/orders"), 80), 10);
        assert_eq!(c.len(), 2, "{c:?}");
        let v2 = view(2, &orders(&["127.0.0.1:7003"], ""), &states);
        let c = counts(&rr, v2.discovery.explicit(&r("orders/orders"), 80), 10);
        assert_eq!(c, BTreeMap::from([("127.0.0.1:7003".to_owned(), 10)]));
        assert!(
            rr.pick(v2.discovery.explicit(&r("orders/nope"), 80))
                .is_none()
        );
    }
}
