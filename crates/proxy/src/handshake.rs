//! Why an mTLS handshake failed, on either side: one kind for the
//! `meshward_tls_handshake_failures_total` metric and one readable detail for the decision
//! log. When this proxy's verifier refused the peer's certificate, both come from the
//! verifier's own error (`meshward_identity::verifier::io_refusal`), not from its message.

use meshward_identity::verifier::{io_refusal, io_refusal_code};
use meshward_telemetry::HandshakeFailure;

/// A failed handshake: its metric kind, and the detail a decision record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: HandshakeFailure,
    pub detail: String,
}

impl Failure {
    /// From the error a tokio-rustls handshake returned.
    pub fn of_io(err: &std::io::Error) -> Self {
        let kind = io_refusal_code(err)
            .and_then(HandshakeFailure::from_code)
            .unwrap_or_else(|| HandshakeFailure::classify(&err.to_string()));
        match io_refusal(err) {
            Some(svid) => Self::new(kind, &svid.to_string()),
            None => Self::new(kind, &err.to_string()),
        }
    }

    /// From a description (a timeout, a peer without an identity), classified by its words.
    pub fn of_message(msg: &str) -> Self {
        Self::new(HandshakeFailure::classify(msg), msg)
    }

    fn new(kind: HandshakeFailure, why: &str) -> Self {
        use HandshakeFailure as H;
        let what = match kind {
            H::NotTls => "not TLS (plaintext?)",
            H::NoCertificate => "no client certificate",
            H::BadSvid => "not a valid X.509-SVID",
            H::UnknownCa => "certificate from an unknown CA",
            H::Expired => "expired certificate",
            H::NotYetValid => "certificate not valid yet",
            H::WrongIdentity => "wrong identity",
            H::NoOwnCertificate => "this proxy has no valid certificate (fail closed)",
            H::Timeout => "no handshake in time",
            H::Other => "handshake failed",
        };
        Failure {
            kind,
            detail: format!("{what}: {why}"),
        }
    }
}
