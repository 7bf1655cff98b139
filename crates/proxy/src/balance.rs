//! Outbound stage 2, balancing: which endpoint of a discovered set serves the next request
//! (pooled HTTP) or connection (tunnel, transparent capture) — the one implementation of
//! endpoint choice. The candidates are the endpoints ready (as their own sidecar says),
//! not ejected and not failing, in the
//! best locality tier that has any (the caller's zone, its region, the `failover` order,
//! the rest), then the fallback service's; among them, power of two choices on peak-EWMA
//! latency × in-flight load ([`crate::endpoint_state::EndpointState::cost`]): Linkerd's
//! balancer, with its 30 ms initial estimate and 10 s decay.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::discovery::{Endpoint, EndpointSet, Locality};
use crate::endpoint_state::now_ms;
use crate::resilience::{DEFAULT_RTT, Event, Settings};

/// The tier of an endpoint for a caller: 0 its own zone, 1 its own region, 2 + i the
/// i-th `failover` locality, then the rest. Without a caller locality every endpoint is
/// tier 0 unless `failover` orders them.
fn tier(ep: &Endpoint, caller: Option<&Locality>, failover: &[String]) -> usize {
    let loc = ep.locality.as_ref();
    if let (Some(c), Some(l)) = (caller, loc) {
        if c.region.is_some() && c.region == l.region && c.zone.is_some() && c.zone == l.zone {
            return 0;
        }
        if c.region.is_some() && c.region == l.region {
            return 1;
        }
    }
    if let Some(l) = loc {
        for (i, f) in failover.iter().enumerate() {
            let (region, zone) = match f.split_once('/') {
                Some((r, z)) => (r, Some(z)),
                None => (f.as_str(), None),
            };
            if l.region.as_deref() == Some(region)
                && zone.is_none_or(|z| l.zone.as_deref() == Some(z))
            {
                return 2 + i;
            }
        }
    }
    if caller.is_none() && failover.is_empty() {
        0
    } else {
        2 + failover.len()
    }
}

/// A cheap random number per call (SplitMix64 over a shared counter): the balancer's
/// two choices and the fault draws ([`crate::fault`]) need no more.
pub(crate) fn random() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut z = SEQ
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(now_ms());
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Where the request or connection goes: an endpoint, and whether it is the fallback's.
#[derive(Debug)]
pub struct Choice<'a> {
    pub endpoint: &'a Endpoint,
    pub set: &'a EndpointSet,
    pub fallback: bool,
}

/// Balancing over the endpoints that may serve: of `primary`, those not ejected and not
/// failing, in the best locality tier that has any; if none, the same of `fallback`; if
/// none either, an endpoint of `primary` (then `fallback`) that is merely ejected, then
/// one that is failing, then one not ready — trying a failing endpoint beats refusing at
/// once. Among the candidates: power of two choices on
/// [`crate::endpoint_state::EndpointState::cost`] (peak-EWMA latency × load). `avoid`: an
/// endpoint a retry should not go back to when another exists.
pub fn choose<'a>(
    primary: &'a EndpointSet,
    fallback: Option<&'a EndpointSet>,
    caller: Option<&Locality>,
    settings: &Settings,
    avoid: Option<std::net::SocketAddr>,
) -> Option<(Choice<'a>, Option<Event>)> {
    let now = now_ms();
    let usable = |e: &Endpoint| {
        e.state.is_ready()
            && !e.state.is_ejected(now)
            && !e.state.is_failing(now, &settings.outlier)
    };
    for (set, fb) in [(Some(primary), false), (fallback, true)] {
        let Some(set) = set else { continue };
        if let Some(ep) = pick(
            set,
            now,
            |e| usable(e) && Some(e.addr()) != avoid,
            caller,
            settings,
        )
        .or_else(|| pick(set, now, usable, caller, settings))
        {
            let event = fb.then_some(Event::Fallback);
            return Some((
                Choice {
                    endpoint: ep,
                    set,
                    fallback: fb,
                },
                event,
            ));
        }
    }
    // Panic mode: every endpoint is ejected, failing or not ready. Ejection is what gives
    // way first — an endpoint ejected a while ago whose sidecar says it is ready beats
    // one failing right now (which, answering fast with errors, would look cheapest) —
    // then failing, then readiness.
    let relaxed: [&dyn Fn(&Endpoint) -> bool; 3] = [
        &|e: &Endpoint| e.state.is_ready() && !e.state.is_failing(now, &settings.outlier),
        &|e: &Endpoint| e.state.is_ready(),
        &|_: &Endpoint| true,
    ];
    for ok in relaxed {
        for (set, fb) in [(Some(primary), false), (fallback, true)] {
            let Some(set) = set else { continue };
            if let Some(ep) = pick(set, now, ok, caller, settings) {
                return Some((
                    Choice {
                        endpoint: ep,
                        set,
                        fallback: fb,
                    },
                    Some(Event::AllEjected),
                ));
            }
        }
    }
    None
}

/// Power of two choices among the endpoints of `set` that pass `ok`, in their best tier.
fn pick<'a>(
    set: &'a EndpointSet,
    now: u64,
    ok: impl Fn(&Endpoint) -> bool,
    caller: Option<&Locality>,
    settings: &Settings,
) -> Option<&'a Endpoint> {
    let mut best = usize::MAX;
    let mut n = 0usize;
    for e in set.endpoints.iter().filter(|e| ok(e)) {
        let t = tier(e, caller, &settings.failover);
        if t < best {
            (best, n) = (t, 1);
        } else if t == best {
            n += 1;
        }
    }
    if n == 0 {
        return None;
    }
    let nth = |k: usize| {
        set.endpoints
            .iter()
            .filter(|e| ok(e) && tier(e, caller, &settings.failover) == best)
            .nth(k)
    };
    let r = random();
    let n64 = n as u64;
    let a = usize::try_from(r % n64).unwrap_or(0);
    if n == 1 {
        return nth(a);
    }
    // A second, different one.
    let b = (a + 1 + usize::try_from((r >> 32) % (n64 - 1)).unwrap_or(0)) % n;
    let (ea, eb) = (nth(a)?, nth(b)?);
    let default = DEFAULT_RTT.as_nanos() as f64;
    Some(
        if eb.state.cost(now, default) < ea.state.cost(now, default) {
            eb
        } else {
            ea
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::endpoint_state::EndpointStates;
    use crate::view::tests::{orders, r, view};

    fn counts(set: &EndpointSet, n: usize) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for _ in 0..n {
            let (ch, _) = choose(set, None, None, &Settings::default(), None).unwrap();
            *c.entry(ch.endpoint.addr().to_string()).or_default() += 1;
        }
        c
    }

    #[test]
    fn equal_endpoints_share_the_load_and_a_slow_one_gets_little() {
        let states = EndpointStates::default();
        let addrs = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];
        let v = view(1, &orders(&addrs, ""), &states);
        let set = v.discovery.explicit(&r("orders/orders"), 80);
        let c = counts(set, 3000);
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c.values().all(|&n| (700..=1300).contains(&n)), "{c:?}");
        // One endpoint answers in 300 ms, the others in 1 ms.
        let now = now_ms();
        for e in &set.endpoints {
            let ms = if e.addr().port() == 7001 { 300.0 } else { 1.0 };
            e.state.observe(now, ms * 1e6);
        }
        let c = counts(set, 3000);
        let slow = c.get("127.0.0.1:7001").copied().unwrap_or(0);
        // Two choices: the slow one wins only when it is drawn against itself — never.
        assert!(slow < 30, "{c:?}");
    }

    #[test]
    fn ejected_endpoints_are_passed_over_and_a_new_view_is_followed() {
        let states = EndpointStates::default();
        let v1 = view(
            1,
            &orders(&["127.0.0.1:7001", "127.0.0.1:7002"], ""),
            &states,
        );
        let set = v1.discovery.explicit(&r("orders/orders"), 80);
        let o = Settings::default().outlier;
        set.endpoints[0]
            .state
            .eject(now_ms(), &o, crate::endpoint_state::Ejected::Consecutive);
        let c = counts(set, 100);
        assert_eq!(c, BTreeMap::from([("127.0.0.1:7002".to_owned(), 100)]));
        let v2 = view(2, &orders(&["127.0.0.1:7003"], ""), &states);
        let c = counts(v2.discovery.explicit(&r("orders/orders"), 80), 10);
        assert_eq!(c, BTreeMap::from([("127.0.0.1:7003".to_owned(), 10)]));
        assert!(
            choose(
                v2.discovery.explicit(&r("orders/nope"), 80),
                None,
                None,
                &Settings::default(),
                None
            )
            .is_none()
        );
    }

    #[test]
    fn when_all_are_ejected_a_ready_one_that_stopped_failing_is_tried_first() {
        // payments-0 ejected a while ago, its sidecar ready again; payments-1 failing
        // now (fast errors: it looks cheapest) and then not ready.
        let states = EndpointStates::default();
        let v = view(
            1,
            &orders(&["127.0.0.1:7001", "127.0.0.1:7002"], ""),
            &states,
        );
        let set = v.discovery.explicit(&r("orders/orders"), 80);
        let o = Settings::default().outlier;
        let (back, broken) = (&set.endpoints[0].state, &set.endpoints[1].state);
        back.eject(now_ms(), &o, crate::endpoint_state::Ejected::Consecutive);
        back.eject(now_ms(), &o, crate::endpoint_state::Ejected::Consecutive);
        for _ in 0..o.consecutive.max(1) {
            let _ = broken.failed_at(now_ms(), &o);
        }
        broken.eject(now_ms(), &o, crate::endpoint_state::Ejected::Consecutive);
        let only_back = BTreeMap::from([("127.0.0.1:7001".to_owned(), 50)]);
        assert_eq!(counts(set, 50), only_back);
        broken.set_not_ready(Some(std::sync::Arc::new("app down".into())));
        assert_eq!(counts(set, 50), only_back);
        // Both failing: readiness decides.
        for _ in 0..o.consecutive.max(1) {
            let _ = back.failed_at(now_ms(), &o);
        }
        assert_eq!(counts(set, 50), only_back);
        let (ch, ev) = choose(set, None, None, &Settings::default(), None).unwrap();
        assert_eq!(ch.endpoint.addr().to_string(), "127.0.0.1:7001");
        assert!(matches!(ev, Some(Event::AllEjected)));
    }
}
