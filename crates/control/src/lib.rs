//! Meshward's control plane.
//!
//! Holds every revision of the policy set in a [`store`], keeps the hash-chained
//! [`audit`] log, and (in later modules) serves operators and proxies. The control plane is
//! never on the request path: proxies decide locally from the configuration it streams.

pub mod api;
pub mod audit;
pub mod auth;
pub mod client;
pub mod decisions;
pub mod disk;
pub mod grpc;
pub mod repo;
pub mod server;
pub mod service;
pub mod store;
pub mod ui;
