//! The data-plane view: what the request path reads of one revision, compiled when the
//! snapshot arrives (off the request path, [`crate::state::Shared::set_policy`]) and
//! swapped in whole with the policy it came from. It holds:
//! - the endpoint tables by service ([`Discovery`]: address, accepted identity, locality);
//! - the resolved settings for this workload: the `TrafficPolicy`s of each service it
//!   calls, compiled into [`crate::resilience::Resilience`] (the caller's sidecar enforces
//!   those), the `RateLimitPolicy`s that target it (compiled) and the `FaultInjection`s
//!   (raw specs: not enforced yet, lint MW315);
//! - this workload's own locality (failover prefers endpoints near it);
//! - the header lists: the names some rule's condition reads.
//!
//! Long-lived state (per-endpoint counters now; health, limiter buckets and breaker
//! counters later) is not in the view: it lives beside it in
//! [`crate::endpoint_state::EndpointStates`], keyed by stable names, so a new revision does
//! not reset it.

use std::collections::HashMap;
use std::sync::Arc;

use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::{Other, PolicySet, Workload};
use meshward_policy::resource::{RateLimitPolicySpec, TargetSpec, TrafficPolicySpec};

use crate::discovery::Discovery;
use crate::endpoint_state::EndpointStates;
use crate::resilience::{Resilience, Settings};

/// One revision, compiled for one workload.
#[derive(Debug, Default)]
pub struct View {
    pub revision: u64,
    pub discovery: Discovery,
    /// By service: the `TrafficPolicy`s that apply to calls to it, in configuration order.
    pub traffic: HashMap<WorkloadRef, Vec<Other<TrafficPolicySpec>>>,
    /// By service: what this workload's calls to it do (every service, defaults where no
    /// `TrafficPolicy` applies).
    pub resilience: HashMap<WorkloadRef, Arc<Resilience>>,
    /// For a callee with no entry above (a workload called at its own address).
    pub default_resilience: Arc<Resilience>,
    /// This workload's locality.
    pub locality: Option<crate::discovery::Locality>,
    /// The `RateLimitPolicy`s that target this workload.
    pub rate_limits: Vec<Other<RateLimitPolicySpec>>,
    /// Their limits, compiled (the gate's step 6, [`crate::limits`]).
    pub rate_limiter: crate::ratelimit::RateLimits,
    /// The `FaultInjection`s that target this workload, compiled (the gate's step 7,
    /// [`crate::fault`]).
    pub faults: crate::fault::Faults,
    /// Lower-case names of the headers some rule's condition reads, sorted.
    pub headers: Vec<String>,
}

impl View {
    /// Compiles `set` (revision `revision`) for `workload`, taking each endpoint's state
    /// from `states` and keeping there only the endpoints this view has.
    pub fn build(
        revision: u64,
        set: &PolicySet,
        workload: &WorkloadRef,
        states: &EndpointStates,
    ) -> View {
        let mut b = states.builder();
        let discovery = Discovery::build(set, &mut b);
        let own = set.workload(workload);
        let traffic: HashMap<WorkloadRef, Vec<Other<TrafficPolicySpec>>> = set
            .services
            .iter()
            .filter_map(|svc| {
                let members: Vec<&Workload> = svc
                    .workloads
                    .iter()
                    .filter_map(|&i| set.workloads.get(i))
                    .collect();
                let specs: Vec<_> = set
                    .traffic
                    .iter()
                    .filter(|t| {
                        let ns = namespace_of(&t.id);
                        if t.spec.target.services.is_empty() {
                            members.iter().any(|w| selects(&t.spec.target, ns, set, w))
                        } else {
                            names(&t.spec.target.services, ns, &svc.id)
                        }
                    })
                    .cloned()
                    .collect();
                (!specs.is_empty()).then(|| (svc.id.clone(), specs))
            })
            .collect();
        let mut resilience = HashMap::new();
        for svc in &set.services {
            let settings = traffic
                .get(&svc.id)
                .map(|specs| Settings::compile(specs))
                .unwrap_or_default();
            // The protocol of each port callers use: the service's, else its members'.
            let ports = svc
                .ports
                .iter()
                .filter_map(|sp| {
                    let target = sp.target_port.unwrap_or(sp.port);
                    let proto = sp.protocol.or_else(|| {
                        svc.workloads
                            .iter()
                            .filter_map(|&i| set.workloads.get(i))
                            .find_map(|w| w.protocol(target))
                    })?;
                    Some((sp.port, proto))
                })
                .collect();
            resilience.insert(
                svc.id.clone(),
                Arc::new(Resilience {
                    service: svc.id.clone(),
                    settings,
                    state: b.service(&svc.id),
                    ports,
                }),
            );
        }
        states.commit(b);
        let targets_me =
            |t: &TargetSpec, id: &str| own.is_some_and(|w| selects(t, namespace_of(id), set, w));
        let rate_limits = rate_limits_for(set, workload);
        View {
            revision,
            discovery,
            traffic,
            resilience,
            default_resilience: Arc::new(Resilience {
                service: workload.clone(),
                settings: Settings::default(),
                state: Arc::default(),
                ports: HashMap::new(),
            }),
            locality: own.and_then(crate::discovery::Locality::of),
            rate_limiter: crate::ratelimit::RateLimits::compile(&rate_limits),
            rate_limits,
            faults: crate::fault::Faults::compile(
                &set.faults
                    .iter()
                    .filter(|f| targets_me(&f.spec.target, &f.id))
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
            headers: header_names(set),
        }
    }

    /// What calls to `service` do.
    pub fn resilience(&self, service: &WorkloadRef) -> &Arc<Resilience> {
        self.resilience
            .get(service)
            .unwrap_or(&self.default_resilience)
    }
}

/// The `RateLimitPolicy`s of `set` that target `workload`.
pub fn rate_limits_for(set: &PolicySet, workload: &WorkloadRef) -> Vec<Other<RateLimitPolicySpec>> {
    let own = set.workload(workload);
    set.rate_limits
        .iter()
        .filter(|r| own.is_some_and(|w| selects(&r.spec.target, namespace_of(&r.id), set, w)))
        .cloned()
        .collect()
}

/// Lower-case names of the headers some rule's condition reads: only these are copied out
/// of a request for the decision (and the decision log).
pub fn header_names(set: &PolicySet) -> Vec<String> {
    let mut headers: Vec<String> = set
        .policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .flat_map(|r| r.when.iter())
        .map(|c| c.header.clone())
        .collect();
    headers.sort();
    headers.dedup();
    headers
}

/// The namespace of a resource id (`namespace/name`).
fn namespace_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(ns, _)| ns)
}

/// Whether `names` (bare names in `ns`, or `namespace/name`) include `r`.
fn names(names: &[String], ns: &str, r: &WorkloadRef) -> bool {
    names.iter().any(|n| match n.split_once('/') {
        Some((n_ns, name)) => n_ns == r.namespace && name == r.name,
        None => ns == r.namespace && n == &r.name,
    })
}

/// Whether a target as written (in a resource of namespace `ns`) selects workload `w`:
/// the same rules as a policy's target (fields AND, values OR, named services expanded to
/// their workloads, empty selects all).
fn selects(t: &TargetSpec, ns: &str, set: &PolicySet, w: &Workload) -> bool {
    let named = t.workloads.is_empty() && t.services.is_empty()
        || names(&t.workloads, ns, &w.id)
        || set.services.iter().any(|s| {
            names(&t.services, ns, &s.id)
                && s.workloads
                    .iter()
                    .any(|&i| set.workloads.get(i).is_some_and(|x| x.id == w.id))
        });
    named
        && (t.namespaces.is_empty() || t.namespaces.contains(&w.id.namespace))
        && t.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        && t.attributes
            .iter()
            .all(|(k, vs)| w.attributes.get(k).is_some_and(|v| vs.0.contains(v)))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A policy set: the Mesh, the `web/frontend` caller, the `orders/orders` service over
    /// `orders/orders-api-N` for each sidecar address in `replicas`, and `more` documents.
    pub(crate) fn orders(replicas: &[&str], more: &str) -> PolicySet {
        let mut yaml = String::from(
            r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec: {trustDomain: shop.example}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: web}
spec: {ports: [{port: 9000, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: orders, namespace: orders}
spec: {selector: {app: orders-api}, ports: [{port: 80, targetPort: 8080}]}
"#,
        );
        for (i, inbound) in replicas.iter().enumerate() {
            yaml.push_str(&format!(
                r#"---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: orders-api-{i}, namespace: orders, labels: {{app: orders-api, topology.kubernetes.io/zone: z{i}}}}}
spec: {{serviceAccount: orders-api, address: "10.0.0.{i}", ports: [{{port: 8080, protocol: HTTP, inbound: "{inbound}"}}]}}
"#
            ));
        }
        yaml.push_str(more);
        meshward_policy::load_sources(vec![(Arc::from("p.yaml"), Arc::from(yaml))])
            .into_valid()
            .unwrap_or_else(|l| panic!("{:#?}", l.diagnostics))
    }

    pub(crate) fn r(s: &str) -> WorkloadRef {
        WorkloadRef::parse(s).unwrap()
    }

    pub(crate) fn view(rev: u64, set: &PolicySet, states: &EndpointStates) -> View {
        View::build(rev, set, &r("web/frontend"), states)
    }

    #[test]
    fn endpoint_tables_by_service() {
        let set = orders(&["127.0.0.1:7001", "127.0.0.1:7002"], "");
        let states = EndpointStates::default();
        let v = view(3, &set, &states);
        assert_eq!(v.revision, 3);
        let eps = v.discovery.explicit(&r("orders/orders"), 80);
        let addrs: Vec<String> = eps.endpoints.iter().map(|e| e.addr().to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:7001", "127.0.0.1:7002"]);
        assert_eq!(
            eps.endpoints[0].identity.as_str(),
            "spiffe://shop.example/ns/orders/sa/orders-api"
        );
        assert_eq!(
            eps.endpoints[1]
                .locality
                .as_ref()
                .and_then(|l| l.zone.as_deref()),
            Some("z1")
        );
        assert_eq!(eps.allowed.len(), 2);
        // The workloads' own port reaches them too; an unknown port or service reaches none.
        assert_eq!(
            v.discovery
                .explicit(&r("orders/orders"), 8080)
                .endpoints
                .len(),
            2
        );
        assert!(v.discovery.explicit(&r("orders/orders"), 81).is_empty());
        assert!(v.discovery.explicit(&r("orders/nope"), 80).is_empty());
        // Capture: a workload's own address on a declared port is that workload alone.
        match v.discovery.capture("10.0.0.1:8080".parse().unwrap()) {
            crate::discovery::Target::Mesh {
                destination,
                endpoints,
            } => {
                assert_eq!(destination, r("orders/orders-api-1"));
                assert_eq!(endpoints.endpoints.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            v.discovery.capture("10.0.0.1:9999".parse().unwrap()),
            crate::discovery::Target::UndeclaredPort { .. }
        ));
        assert!(matches!(
            v.discovery.capture("192.0.2.1:80".parse().unwrap()),
            crate::discovery::Target::External
        ));
        // Every endpoint of every table has its state registered under a stable name.
        assert_eq!(states.len(), 4, "{:?}", states.snapshot());
    }

    #[test]
    fn endpoint_state_survives_a_revision_that_keeps_the_endpoint() {
        let states = EndpointStates::default();
        let v1 = view(
            1,
            &orders(&["127.0.0.1:7001", "127.0.0.1:7002"], ""),
            &states,
        );
        let eps = v1.discovery.explicit(&r("orders/orders"), 80);
        for _ in 0..3 {
            eps.endpoints[0].state.started();
        }
        eps.endpoints[0].state.failed();
        eps.endpoints[1].state.started();
        let kept = eps.endpoints[0].key.clone();
        let gone = eps.endpoints[1].key.clone();
        // Revision 2 keeps 7001, drops 7002 and adds 7003.
        let v2 = view(
            2,
            &orders(&["127.0.0.1:7001", "127.0.0.1:7003"], ""),
            &states,
        );
        let eps2 = v2.discovery.explicit(&r("orders/orders"), 80);
        assert_eq!(eps2.endpoints[0].key, kept);
        assert_eq!(eps2.endpoints[0].state.requests(), 3);
        assert_eq!(eps2.endpoints[0].state.failures(), 1);
        assert!(Arc::ptr_eq(
            &eps.endpoints[0].state,
            &eps2.endpoints[0].state
        ));
        assert_eq!(states.get(&kept).map(|s| s.requests()), Some(3));
        assert_eq!(
            eps2.endpoints[1].state.requests(),
            0,
            "a new endpoint starts afresh"
        );
        assert!(states.get(&gone).is_none(), "{:?}", states.snapshot());
        // An endpoint that comes back starts afresh too.
        let v3 = view(
            3,
            &orders(&["127.0.0.1:7001", "127.0.0.1:7002"], ""),
            &states,
        );
        let back = v3.discovery.explicit(&r("orders/orders"), 80);
        assert_eq!(back.endpoints[1].key, gone);
        assert_eq!(back.endpoints[1].state.requests(), 0);
        assert_eq!(back.endpoints[0].state.requests(), 3);
    }

    #[test]
    fn resolved_settings_for_this_workload() {
        let more = r#"---
apiVersion: meshward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: orders-resilience, namespace: orders}
spec: {target: {services: [orders]}, timeout: 2s}
---
apiVersion: meshward.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: frontend-limit, namespace: web}
spec: {target: {workloads: [frontend]}, limits: [{requestsPerSecond: 10}]}
---
apiVersion: meshward.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: orders-limit, namespace: orders}
spec: {target: {services: [orders]}, limits: [{requestsPerSecond: 5}]}
"#;
        let set = orders(&["127.0.0.1:7001"], more);
        let states = EndpointStates::default();
        let v = view(1, &set, &states);
        let t = &v.traffic[&r("orders/orders")];
        assert_eq!(t.len(), 1);
        assert_eq!(&*t[0].id, "orders/orders-resilience");
        let ids: Vec<&str> = v.rate_limits.iter().map(|x| &*x.id).collect();
        assert_eq!(ids, ["web/frontend-limit"]);
        // The orders workload's own view has the other one.
        let o = View::build(1, &set, &r("orders/orders-api-0"), &states);
        let ids: Vec<&str> = o.rate_limits.iter().map(|x| &*x.id).collect();
        assert_eq!(ids, ["orders/orders-limit"]);
    }
}
