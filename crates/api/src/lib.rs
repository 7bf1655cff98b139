//! The wire protocol between proxies and the control plane (`proto/meshward.proto`):
//! `Identity.Sign` for certificates and `Config.Stream` for per-workload configuration.
#![allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_debug_implementations,
    unused_qualifications,
    reason = "generated code"
)]

/// Generated messages and services of package `meshward.v1`.
pub mod v1 {
    tonic::include_proto!("meshward.v1");
}
