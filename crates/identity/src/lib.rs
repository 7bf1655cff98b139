//! Workload identity for Meshward.
//!
//! Every workload in the mesh is named by a SPIFFE ID,
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, and proves it with a
//! short-lived X.509-SVID (ARCHITECTURE §2). This crate owns the strictly parsed
//! [`SpiffeId`] and [`TrustDomain`] types, the [`ca`] that signs SVIDs for proven
//! identities, [`svid`] validation by the X.509-SVID specification, the rustls
//! [`verifier`]s that apply it in every handshake, and the SPIFFE [`bundle`] format.
//!
//! One crypto provider for the workspace: ring. Binaries call [`install_crypto_provider`]
//! once at start-up (with two providers compiled in, rustls would panic choosing one).

pub mod bundle;
pub mod ca;
mod spiffe;
pub mod svid;
pub mod verifier;

pub use spiffe::{IdError, SpiffeId, TrustDomain, WorkloadName};

/// The SPIFFE ID the control plane serves its API as ([`SpiffeId::control`]), if the
/// trust domain forms a valid ID.
pub fn control_identity(td: &TrustDomain) -> Option<SpiffeId> {
    SpiffeId::control(td).ok()
}

/// Installs ring as the process-wide rustls crypto provider; harmless if already done.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
