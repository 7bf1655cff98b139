//! What the data path reads: the compiled policy with its data-plane view
//! ([`crate::view`]) and the workload's certificate, each an immutable snapshot behind an
//! `ArcSwap` — built off to the side, swapped in, never locked on the request path — and,
//! beside them, the long-lived state a new revision keeps ([`crate::endpoint_state`]).

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use meshward_identity::verifier::SharedBundles;
use meshward_policy::decision::WorkloadRef;
use meshward_policy::engine::Engine;
use meshward_policy::model::PolicySet;
use rustls::sign::CertifiedKey;

/// A compiled policy revision.
#[derive(Debug)]
pub struct Policy {
    pub revision: u64,
    pub set: PolicySet,
    pub engine: Engine,
    /// Lower-case names of the headers some rule's condition reads: only these are copied
    /// out of a request for the decision (and the decision log).
    pub headers: Vec<String>,
    /// This workload's `connectionLimits` over the `Mesh`'s (unset fields: the flags).
    pub limits: meshward_policy::resource::ConnectionLimits,
    /// App ports of this workload behind a `pathCaseInsensitive` service: their paths are
    /// lower-cased for policy and app alike.
    pub lower_paths: Vec<u16>,
    /// The data-plane view compiled from the same revision (endpoint tables, resolved
    /// settings, header lists).
    pub view: crate::view::View,
    /// A progressive rollout's candidate, evaluated beside this revision and never
    /// enforced (docs/rollout.md).
    pub candidate: Option<Candidate>,
}

/// A rollout's candidate set, compiled.
#[derive(Debug)]
pub struct Candidate {
    pub rollout: u64,
    pub set: PolicySet,
    pub engine: Engine,
    /// Its `RateLimitPolicy`s for this workload, metered on budgets of their own (the
    /// shadow never spends the enforced revision's).
    pub rate_limiter: crate::ratelimit::RateLimits,
    pub budgets: crate::ratelimit::Budgets,
}

impl Policy {
    /// `d`, the enforced revision's decision on `req`, with what the candidate decides
    /// beside it (through `judge`, the same steps the enforced decision went through),
    /// its rate limits included (`tcp`: a connection on a TCP port). The shadow meters
    /// rates and quotas; it takes no place of a concurrency cap (the permit is given back
    /// at once).
    pub fn with_candidate(
        &self,
        mut d: meshward_policy::Decision,
        judge: impl FnOnce(&PolicySet, meshward_policy::Decision) -> meshward_policy::Decision,
        req: &meshward_policy::Request,
        tcp: bool,
    ) -> meshward_policy::Decision {
        if let Some(c) = &self.candidate {
            let mut cd = judge(&c.set, c.engine.decide(req));
            if cd.verdict == meshward_policy::Verdict::Allow && !c.rate_limiter.is_empty() {
                let source = req.source.identity();
                let r =
                    c.rate_limiter
                        .resolve(c.rollout, &c.budgets, &c.set, &req.destination, source);
                if let Err(over) = r.request(tcp) {
                    cd.verdict = meshward_policy::Verdict::Deny;
                    cd.reason = meshward_policy::Reason::RateLimited;
                    cd.policy = Some(over.policy);
                }
            }
            d.candidate = Some(meshward_policy::decision::CandidateDecision {
                rollout: c.rollout,
                verdict: cd.verdict,
                reason: cd.reason,
                policy: cd.policy,
            });
        }
        d
    }

    /// What to do with request headers named with `_`.
    pub fn underscores(&self) -> meshward_policy::resource::HeadersWithUnderscores {
        self.set.mesh.headers_with_underscores
    }
}

/// The workload's current SVID.
#[derive(Debug)]
pub struct Svid {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
}

/// Everything the listeners share.
#[derive(Debug)]
pub struct Shared {
    pub workload: WorkloadRef,
    pub policy: ArcSwapOption<Policy>,
    pub svid: ArcSwapOption<Svid>,
    pub bundles: SharedBundles,
    pub log: crate::decision_log::DecisionLog,
    /// Every listener: whether it accepts, what it holds.
    pub listeners: crate::listener::Listeners,
    /// The limits where the policy sets none (the proxy's flags over the built-in
    /// defaults).
    pub default_limits: crate::listener::Limits,
    /// Per-endpoint state that outlives revisions (the views hand it out).
    pub endpoints: crate::endpoint_state::EndpointStates,
    /// The rate-limit and quota budgets, across revisions (beside the view).
    pub budgets: crate::ratelimit::Budgets,
    /// The revision just installed, for what is open to decide again
    /// ([`crate::recheck`]).
    pub revisions: tokio::sync::watch::Sender<u64>,
    /// What the control-plane agent could not do (save state, reach the control plane).
    pub health: crate::agent::Health,
    /// This sidecar's span exporter (`--otlp-endpoint`), under its own `service.name`;
    /// unset, spans go to the process's default tracer, if any.
    pub tracer: std::sync::OnceLock<meshward_telemetry::trace::Tracer>,
}

impl Shared {
    /// The state of a proxy with the built-in connection limits.
    pub fn new(
        workload: WorkloadRef,
        bundles: SharedBundles,
        log: crate::decision_log::DecisionLog,
    ) -> Arc<Self> {
        Self::with_limits(workload, bundles, log, crate::listener::Limits::defaults())
    }

    /// The state of a proxy whose inbound listeners default to `limits`.
    pub fn with_limits(
        workload: WorkloadRef,
        bundles: SharedBundles,
        log: crate::decision_log::DecisionLog,
        default_limits: crate::listener::Limits,
    ) -> Arc<Self> {
        Arc::new(Shared {
            workload,
            policy: ArcSwapOption::empty(),
            svid: ArcSwapOption::empty(),
            bundles,
            log,
            listeners: crate::listener::Listeners::default(),
            default_limits,
            endpoints: crate::endpoint_state::EndpointStates::default(),
            budgets: crate::ratelimit::Budgets::default(),
            revisions: tokio::sync::watch::Sender::new(0),
            health: crate::agent::Health::default(),
            tracer: std::sync::OnceLock::new(),
        })
    }

    /// The connection limits in force now: the policy's, then the defaults.
    pub fn limits(&self) -> crate::listener::Limits {
        match self.policy.load().as_ref() {
            Some(p) => self.default_limits.with(&p.limits),
            None => self.default_limits,
        }
    }

    /// Compiles and swaps in a policy set.
    pub fn set_policy(&self, revision: u64, set: PolicySet) {
        self.set_policy_with(revision, set, None);
    }

    /// Compiles and swaps in a policy set, with a rollout's candidate `(rollout, set)` to
    /// evaluate beside it.
    pub fn set_policy_with(
        &self,
        revision: u64,
        set: PolicySet,
        candidate: Option<(u64, PolicySet)>,
    ) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.log.metrics.config_updated.set(now);
        let engine = Engine::compile(
            &set.clone()
                .with_revision(meshward_policy::PolicyRevision(revision)),
        );
        let view = crate::view::View::build(revision, &set, &self.workload, &self.endpoints);
        self.endpoints.apply_readiness(&view.discovery);
        self.budgets.retain(&view.rate_limiter);
        let candidate = candidate.map(|(rollout, set)| Candidate {
            rollout,
            engine: Engine::compile(&set),
            rate_limiter: crate::ratelimit::RateLimits::compile(&crate::view::rate_limits_for(
                &set,
                &self.workload,
            )),
            budgets: crate::ratelimit::Budgets::default(),
            set,
        });
        // The headers either set's conditions read: the candidate judges the same request.
        let mut headers = view.headers.clone();
        if let Some(c) = &candidate {
            headers.extend(crate::view::header_names(&c.set));
            headers.sort();
            headers.dedup();
        }
        let lower_paths = set
            .workloads
            .iter()
            .filter(|w| w.id == self.workload)
            .flat_map(|w| w.ports.iter().map(|p| p.port))
            .filter(|&port| set.path_case_insensitive(&self.workload, port))
            .collect();
        let limits = set.connection_limits(&self.workload);
        self.policy.store(Some(Arc::new(Policy {
            revision,
            set,
            engine,
            headers,
            lower_paths,
            limits,
            view,
            candidate,
        })));
        // Open connections and streams are decided again under it.
        self.revisions.send_replace(revision);
    }

    /// The SVID to present, unless it has expired (then none: new connections fail closed).
    pub fn current_svid(&self) -> Option<Arc<CertifiedKey>> {
        let s = self.svid.load_full()?;
        if SystemTime::now() >= s.not_after {
            return None;
        }
        Some(s.key.clone())
    }
}

/// Presents the current SVID as server certificate.
#[derive(Debug)]
pub struct ServerCert(pub Arc<Shared>);

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let c = self.0.current_svid();
        if c.is_none() {
            tracing::warn!(
                "no valid certificate (expired or not yet issued): refusing the connection (fail closed)"
            );
        }
        c
    }
}

/// Presents the current SVID as client certificate.
#[derive(Debug)]
pub struct ClientCert(pub Arc<Shared>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current_svid()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::{orders, r};
    use meshward_policy::{Decision, Reason, Request, Source, Verdict};

    #[test]
    fn the_candidates_rate_limits_are_metered_in_shadow_on_budgets_of_their_own() {
        let allow_all = "---\napiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: orders}\nspec: {tier: service, action: ALLOW, target: {workloads: [orders-api-0]}, rules: [{name: any, from: [{identities: [\"spiffe://shop.example/ns/web/sa/frontend\"]}]}]}\n";
        let limit = "---\napiVersion: meshward.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: tight, namespace: orders}\nspec: {target: {workloads: [orders-api-0]}, limits: [{requestsPerSecond: 1, burst: 2}]}\n";
        let enforced = orders(&["127.0.0.1:1"], allow_all);
        let candidate = orders(&["127.0.0.1:1"], &format!("{allow_all}{limit}"));
        let shared = Shared::new(
            r("orders/orders-api-0"),
            SharedBundles::default(),
            crate::decision_log::DecisionLog::disabled(),
        );
        shared.set_policy_with(3, enforced, Some((7, candidate)));
        let p = shared.policy.load_full().unwrap();
        let req = Request {
            source: Source::Authenticated(
                meshward_identity::SpiffeId::parse("spiffe://shop.example/ns/web/sa/frontend")
                    .unwrap(),
            ),
            destination: r("orders/orders-api-0"),
            port: 8080,
            http: None,
            at: SystemTime::now(),
        };
        let verdicts: Vec<(Verdict, Verdict, Reason)> = (0..4)
            .map(|_| {
                let d: Decision = p.with_candidate(p.engine.decide(&req), |_, d| d, &req, true);
                let c = d.candidate.unwrap();
                assert_eq!(c.rollout, 7);
                (d.verdict, c.verdict, c.reason)
            })
            .collect();
        // Enforced: all allowed. Candidate: the burst (2), then over its rate.
        assert!(
            verdicts.iter().all(|v| v.0 == Verdict::Allow),
            "{verdicts:?}"
        );
        assert_eq!(
            verdicts.iter().map(|v| v.1).collect::<Vec<_>>(),
            [Verdict::Allow, Verdict::Allow, Verdict::Deny, Verdict::Deny]
        );
        assert_eq!(verdicts[3].2, Reason::RateLimited);
        assert!(
            shared.budgets.is_empty(),
            "the enforced budgets are untouched"
        );
    }
}
