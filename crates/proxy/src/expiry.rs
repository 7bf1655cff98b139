//! A connection does not outlive the certificates that authenticated it: each mTLS
//! connection, inbound and outbound, ends at the earlier of the peer's and its own
//! certificate's expiry, or at the listener's maximum age (`--max-connection-age`) when
//! that comes first. Inbound, the end is graceful (HTTP/2 GOAWAY; HTTP/1 closed after the
//! response in progress, at once when idle; TCP closed); outbound, a pooled connection is
//! retired [`RETIRE_EARLY`] before, so the client's next request goes on a new connection
//! with the current certificate instead of racing the close (docs/operations.md).

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;

use crate::state::Shared;

/// How long before its end a pooled outbound connection stops taking new requests.
pub const RETIRE_EARLY: Duration = Duration::from_secs(2);
/// How long requests in progress at the end may go on before the connection is cut.
pub const GRACE: Duration = Duration::from_secs(5);

/// When a connection must end, and why (`certificate` or `max_age`, the metric label).
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    pub at: tokio::time::Instant,
    pub why: &'static str,
}

fn instant(t: SystemTime) -> tokio::time::Instant {
    let now = SystemTime::now();
    tokio::time::Instant::now() + t.duration_since(now).unwrap_or_default()
}

impl Expiry {
    /// For a connection just authenticated with `peer`'s chain, this proxy presenting its
    /// current SVID.
    pub fn of(
        shared: &Shared,
        peer: Option<&[CertificateDer<'_>]>,
        max_age: Option<Duration>,
    ) -> Self {
        let theirs = peer
            .and_then(|c| c.first())
            .and_then(meshward_identity::svid::not_after);
        let ours = shared.svid.load().as_ref().map(|s| s.not_after);
        let cert = match (theirs, ours) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let aged = max_age.map(|d| tokio::time::Instant::now() + d);
        match (cert.map(instant), aged) {
            (Some(c), Some(a)) if a < c => Expiry {
                at: a,
                why: "max_age",
            },
            (Some(c), _) => Expiry {
                at: c,
                why: "certificate",
            },
            (None, Some(a)) => Expiry {
                at: a,
                why: "max_age",
            },
            // (A verified connection always has a peer certificate.)
            (None, None) => Expiry {
                at: tokio::time::Instant::now(),
                why: "certificate",
            },
        }
    }

    /// Resolves at the end (counted then).
    pub async fn reached(self, shared: &Shared) {
        tokio::time::sleep_until(self.at).await;
        shared.log.metrics.connection_expired(self.why);
    }

    /// Whether the end has passed.
    pub fn passed(&self) -> bool {
        tokio::time::Instant::now() >= self.at
    }
}
