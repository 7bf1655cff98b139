//! Meshward's sidecar proxy (data plane).
//!
//! One per workload. Inbound, it accepts only mutual TLS from valid SVIDs and authorizes
//! every connection (TCP) and request (HTTP) locally with the compiled policy engine —
//! the control plane is never on the request path, and with no policy at all it denies.
//! Outbound, it originates mutual TLS to the service's endpoints and accepts only the
//! identities the service is declared to run as. State the data path reads is swapped in
//! atomically ([`state`]). Explicit mode here; transparent capture shares everything after
//! accept.

pub mod admin;
pub mod agent;
pub mod balance;
pub mod clock;
pub mod decision_log;
pub mod discovery;
pub mod endpoint_state;
pub mod expiry;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod gate;
pub mod h1;
pub mod h1_out;
pub mod handshake;
pub mod hygiene;
pub mod inbound;
pub mod interpret;
pub mod listener;
pub mod outbound;
pub mod peer;
pub mod pool;
pub mod ratelimit;
pub mod recheck;
pub mod rescue;
pub mod resilience;
pub mod run;
pub mod state;
pub mod transparent;
pub mod transport;
pub mod view;
