//! Outbound stage 1, discovery: the endpoints of each service from the configuration,
//! compiled once per revision into tables ([`Discovery`], part of
//! [`crate::view::View`]) so the request path does a hash lookup instead of scanning
//! services and workloads. Two tables, one per way an app reaches a service:
//! - explicit mode: a loopback listener per upstream `service:port`; an endpoint is the
//!   `inbound` address of a workload's sidecar for the service's target port;
//! - transparent capture: the original destination is a service's virtual address (its
//!   endpoints are the workloads' own addresses on the target port) or a workload's own
//!   address (that workload alone).
//!
//! Every endpoint carries the identity it must present (checked at the handshake,
//! [`crate::peer`]), its locality when the workload declares one, and its long-lived state
//! ([`crate::endpoint_state`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use meshward_identity::SpiffeId;
use meshward_policy::decision::WorkloadRef;
use meshward_policy::model::{PolicySet, Workload};

use crate::endpoint_state::{EndpointKey, EndpointState, StatesBuilder};

/// Where an endpoint runs (the `Workload`'s `locality`, or its topology labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locality {
    pub region: Option<String>,
    pub zone: Option<String>,
}

impl Locality {
    pub fn of(w: &Workload) -> Option<Locality> {
        w.locality.as_ref().map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
        })
    }
}

/// One endpoint of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its stable name: the service and the address dialed.
    pub key: EndpointKey,
    /// The workload behind it.
    pub workload: WorkloadRef,
    /// The identity its sidecar must present.
    pub identity: SpiffeId,
    pub locality: Option<Locality>,
    /// Long-lived: shared with the same endpoint of the previous and next views.
    pub state: Arc<EndpointState>,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        self.key.addr
    }
}

/// The endpoints of one service port, in configuration order, and every identity the
/// service is declared to run as.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    /// The identities of all endpoints (what a tunnel to any of them accepts).
    pub allowed: Vec<SpiffeId>,
}

impl EndpointSet {
    fn new(endpoints: Vec<Endpoint>) -> Arc<Self> {
        let allowed = endpoints.iter().map(|e| e.identity.clone()).collect();
        Arc::new(EndpointSet { endpoints, allowed })
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoint dialed at `addr` (a pooled connection is opened per endpoint).
    pub fn get(&self, addr: SocketAddr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.addr() == addr)
    }
}

/// Where a captured outbound connection goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A workload or service of the mesh: dial one of `endpoints` with mTLS, accepting
    /// only the identities listed there.
    Mesh {
        destination: WorkloadRef,
        endpoints: Arc<EndpointSet>,
    },
    /// A mesh address, on a port the workload or service does not declare.
    UndeclaredPort { destination: WorkloadRef },
    /// Outside the mesh.
    External,
}

/// A mesh address in the capture table: its workload or service and the endpoints of
/// each declared port.
#[derive(Debug)]
struct Captured {
    destination: WorkloadRef,
    ports: HashMap<u16, Arc<EndpointSet>>,
}

/// The endpoint tables of one revision.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Explicit mode: by service, by the port the caller uses.
    explicit: HashMap<WorkloadRef, HashMap<u16, Arc<EndpointSet>>>,
    /// Transparent capture: services' virtual addresses.
    services_by_ip: HashMap<IpAddr, Captured>,
    /// Transparent capture: workloads' own addresses.
    workloads_by_ip: HashMap<IpAddr, Captured>,
    /// Transparent capture by service (a fallback is named, not addressed).
    captured_by_service: HashMap<WorkloadRef, HashMap<u16, Arc<EndpointSet>>>,
    empty: Arc<EndpointSet>,
}

impl Discovery {
    /// Every endpoint of every table (one may appear more than once).
    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        let sets = self
            .explicit
            .values()
            .chain(self.captured_by_service.values())
            .chain(self.services_by_ip.values().map(|c| &c.ports))
            .chain(self.workloads_by_ip.values().map(|c| &c.ports))
            .flat_map(|ports| ports.values());
        sets.flat_map(|set| set.endpoints.iter())
    }

    /// The tables of `set`; each endpoint's state comes from `states`.
    pub fn build(set: &PolicySet, states: &mut StatesBuilder) -> Discovery {
        let mut d = Discovery::default();
        let mut endpoint = |service: &WorkloadRef, addr: SocketAddr, w: &Workload| Endpoint {
            key: EndpointKey {
                service: service.clone(),
                addr,
            },
            workload: w.id.clone(),
            identity: w.identity.clone(),
            locality: Locality::of(w),
            state: states.state(&EndpointKey {
                service: service.clone(),
                addr,
            }),
        };
        for svc in &set.services {
            let members: Vec<&Workload> = svc
                .workloads
                .iter()
                .filter_map(|&i| set.workloads.get(i))
                .collect();
            // The port a caller uses → the workloads' port it reaches: the service's
            // ports, and any port of a member not declared by the service (as is).
            let mut targets: Vec<(u16, u16)> = svc
                .ports
                .iter()
                .map(|sp| (sp.port, sp.target_port.unwrap_or(sp.port)))
                .collect();
            for w in &members {
                for p in &w.ports {
                    if !targets.iter().any(|(port, _)| *port == p.port) {
                        targets.push((p.port, p.port));
                    }
                }
            }
            let mut explicit = HashMap::new();
            for (port, target) in targets {
                let eps = members
                    .iter()
                    .filter_map(|w| {
                        let addr = w
                            .ports
                            .iter()
                            .find(|p| p.port == target)?
                            .inbound
                            .as_deref()?
                            .parse()
                            .ok()?;
                        Some(endpoint(&svc.id, addr, w))
                    })
                    .collect();
                explicit.insert(port, EndpointSet::new(eps));
            }
            d.explicit.entry(svc.id.clone()).or_insert(explicit);
            if svc.addresses.is_empty() {
                continue;
            }
            let mut captured = HashMap::new();
            for sp in &svc.ports {
                let target = sp.target_port.unwrap_or(sp.port);
                let eps = members
                    .iter()
                    .filter(|w| w.ports.iter().any(|p| p.port == target))
                    .filter_map(|w| Some(endpoint(&svc.id, SocketAddr::new(w.address?, target), w)))
                    .collect();
                captured
                    .entry(sp.port)
                    .or_insert_with(|| EndpointSet::new(eps));
            }
            d.captured_by_service
                .entry(svc.id.clone())
                .or_insert_with(|| captured.clone());
            for ip in &svc.addresses {
                // The first service with an address wins (configuration order).
                d.services_by_ip.entry(*ip).or_insert_with(|| Captured {
                    destination: svc.id.clone(),
                    ports: captured.clone(),
                });
            }
        }
        for w in &set.workloads {
            let Some(ip) = w.address else { continue };
            if d.workloads_by_ip.contains_key(&ip) {
                continue;
            }
            let ports = w
                .ports
                .iter()
                .map(|p| {
                    let addr = SocketAddr::new(ip, p.port);
                    (p.port, EndpointSet::new(vec![endpoint(&w.id, addr, w)]))
                })
                .collect();
            d.workloads_by_ip.insert(
                ip,
                Captured {
                    destination: w.id.clone(),
                    ports,
                },
            );
        }
        d
    }

    /// Explicit mode: the endpoints of `service` for callers on `port` (empty when the
    /// service or the port is unknown).
    pub fn explicit(&self, service: &WorkloadRef, port: u16) -> &Arc<EndpointSet> {
        self.explicit
            .get(service)
            .and_then(|ports| ports.get(&port))
            .unwrap_or(&self.empty)
    }

    /// The endpoints of a fallback service for callers on `port`: its explicit-mode set,
    /// or (transparent capture) the set reached at its own addresses.
    pub fn fallback(
        &self,
        service: &WorkloadRef,
        port: u16,
        transparent: bool,
    ) -> &Arc<EndpointSet> {
        if transparent {
            return self
                .captured_by_service
                .get(service)
                .and_then(|ports| ports.get(&port))
                .unwrap_or(&self.empty);
        }
        self.explicit(service, port)
    }

    /// Transparent capture: maps an original destination to the mesh — a service's
    /// virtual address (balanced over its workloads), or a workload's own address.
    pub fn capture(&self, dst: SocketAddr) -> Target {
        let ip = dst.ip();
        let Some(c) = self
            .services_by_ip
            .get(&ip)
            .or_else(|| self.workloads_by_ip.get(&ip))
        else {
            return Target::External;
        };
        match c.ports.get(&dst.port()) {
            Some(endpoints) => Target::Mesh {
                destination: c.destination.clone(),
                endpoints: endpoints.clone(),
            },
            None => Target::UndeclaredPort {
                destination: c.destination.clone(),
            },
        }
    }
}
