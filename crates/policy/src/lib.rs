//! Meshward's policy engine.
//!
//! The library both the proxy and the control plane use to read, check and evaluate
//! authorization policy (ARCHITECTURE §3–§5): [`model`] loads a policy repository of
//! Kubernetes-style YAML into a typed [`model::PolicySet`], collecting every problem as a
//! [`diag::Diagnostic`]; [`lint`] adds semantic checks; [`reference`] evaluates a request
//! straight from the specification; [`engine`] compiles the set into per-destination
//! indexes and decides in constant time; [`explain`], [`scenario`], [`diff`], [`impact`]
//! and [`suggest`] are the policy-as-code tools behind `meshward policy …`.

pub mod anomaly;
pub mod decision;
pub mod decision_log;
pub mod diag;
pub mod diff;
pub mod engine;
pub mod impact;
pub mod lint;
pub mod matcher;
pub mod model;
pub mod path;
pub mod reference;
pub mod resource;
pub mod rollout;
pub mod scenario;
pub mod scope;
pub mod suggest;
pub mod yaml;

pub use decision::{Decision, PolicyRevision, Reason, Request, Source, Verdict, WorkloadRef};
pub use model::{PolicySet, load_path, load_sources};
