//! Workload identity for Meshward.
//!
//! Every workload in the mesh is named by a SPIFFE ID,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. This crate owns the
//! strictly parsed [`SpiffeId`] and [`TrustDomain`] types that the policy engine, the proxy
//! and the control plane pass around instead of strings (ARCHITECTURE §2). Parsing follows
//! the SPIFFE ID specification; anything it does not allow is an error, never "fixed up".

mod spiffe;

pub use spiffe::{IdError, SpiffeId, TrustDomain, WorkloadName};
