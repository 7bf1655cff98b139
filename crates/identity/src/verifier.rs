//! rustls certificate verifiers that accept exactly X.509-SVIDs (see [`crate::svid`]) and
//! tell the caller who the peer is.
//!
//! Trust bundles sit behind an `ArcSwap`: a handshake loads the current snapshot without a
//! lock (no reader waits on another connection's handshake, nor on a bundle update), and
//! an update builds the next snapshot aside and swaps it in whole.
#![deny(clippy::disallowed_types)]

use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::SpiffeId;
use crate::svid::{self, SvidError, TrustBundles, Usage};

/// The trust bundles a verifier uses, replaceable while connections run.
#[derive(Debug, Clone, Default)]
pub struct SharedBundles(Arc<ArcSwap<TrustBundles>>);

impl SharedBundles {
    pub fn new(b: TrustBundles) -> Self {
        SharedBundles(Arc::new(ArcSwap::from_pointee(b)))
    }

    /// The current bundles (lock-free).
    pub fn load(&self) -> Arc<TrustBundles> {
        self.0.load_full()
    }

    /// Replaces the bundles for every later handshake.
    pub fn store(&self, b: TrustBundles) {
        self.0.store(Arc::new(b));
    }
}

/// Which peer identities a verifier accepts, beyond a valid SVID.
#[derive(Debug, Clone)]
pub enum Accept {
    /// Any valid SVID of a trusted trust domain (authorization decides the rest).
    AnyTrusted,
    /// Only these identities (e.g. the identities a service is declared to run as).
    Only(Vec<SpiffeId>),
}

/// Our refusal as a rustls error. Expiry and unknown issuers keep their own rustls kinds
/// (so the peer gets the matching TLS alert); every other refusal carries the
/// [`SvidError`] itself, which [`refusal_code`] and [`refusal`] read back.
fn to_rustls(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        SvidError::Expired => CertificateError::Expired,
        SvidError::NotYetValid => CertificateError::NotValidYet,
        SvidError::UnknownIssuer { .. } => CertificateError::UnknownIssuer,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// The [`SvidError`] a verifier of this module refused the peer's certificate with, when the
/// error carries it (see [`refusal_code`] for every refusal's kind).
pub fn refusal(err: &rustls::Error) -> Option<&SvidError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            e.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// The stable kind ([`SvidError::code`]) of a handshake this side refused because of the
/// peer's certificate, read from the rustls error the handshake ended with; `None` when the
/// handshake failed for another reason (not TLS, the peer refused us, a timeout).
pub fn refusal_code(err: &rustls::Error) -> Option<&'static str> {
    if let Some(e) = refusal(err) {
        return Some(e.code());
    }
    match err {
        rustls::Error::NoCertificatesPresented => Some(SvidError::NoCertificate.code()),
        rustls::Error::InvalidCertificate(c) => Some(match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                SvidError::Expired.code()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                SvidError::NotYetValid.code()
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            _ => "bad_svid",
        }),
        _ => None,
    }
}

/// The rustls error inside the I/O error a tokio-rustls handshake returns.
fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// [`refusal`] of the I/O error a tokio-rustls handshake returns.
pub fn io_refusal(err: &std::io::Error) -> Option<&SvidError> {
    refusal(rustls_error(err)?)
}

/// [`refusal_code`] of the I/O error a tokio-rustls handshake returns.
pub fn io_refusal_code(err: &std::io::Error) -> Option<&'static str> {
    refusal_code(rustls_error(err)?)
}

fn system_time(t: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

fn check(
    bundles: &SharedBundles,
    accept: &Accept,
    ee: &CertificateDer<'_>,
    rest: &[CertificateDer<'_>],
    usage: Usage,
    now: UnixTime,
) -> Result<SpiffeId, SvidError> {
    let mut chain = Vec::with_capacity(1 + rest.len());
    chain.push(ee.clone());
    chain.extend(rest.iter().cloned());
    let id = svid::validate(&chain, &bundles.load(), usage, system_time(now))?;
    match accept {
        Accept::AnyTrusted => Ok(id),
        Accept::Only(ids) if ids.contains(&id) => Ok(id),
        Accept::Only(ids) => Err(SvidError::WrongIdentity {
            got: id,
            expected: ids
                .iter()
                .map(|i| format!("`{i}`"))
                .collect::<Vec<_>>()
                .join(" or "),
        }),
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Verifies servers' SVIDs (used by the connecting side).
#[derive(Debug)]
pub struct SvidServerVerifier {
    bundles: SharedBundles,
    accept: Accept,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidServerVerifier {
    pub fn new(bundles: SharedBundles, accept: Accept) -> Arc<Self> {
        Arc::new(SvidServerVerifier {
            bundles,
            accept,
            algs: algorithms(),
        })
    }
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check(
            &self.bundles,
            &self.accept,
            end_entity,
            intermediates,
            Usage::Server,
            now,
        )
        .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies clients' SVIDs (used by the accepting side). A client certificate is required,
/// except with [`SvidClientVerifier::optional`], where a client may also come without one
/// (and authenticate otherwise, e.g. with a bearer or join token).
#[derive(Debug)]
pub struct SvidClientVerifier {
    bundles: SharedBundles,
    accept: Accept,
    algs: WebPkiSupportedAlgorithms,
    mandatory: bool,
    /// Accept a certificate that expired at most this long ago (checked as of its own
    /// expiry): only for the control plane's renewal endpoint, which must tell such peers
    /// apart (see [`expired_for`]) and let them do nothing but renew.
    expired_grace: Option<Duration>,
}

impl SvidClientVerifier {
    pub fn new(bundles: SharedBundles, accept: Accept) -> Arc<Self> {
        Arc::new(SvidClientVerifier {
            bundles,
            accept,
            algs: algorithms(),
            mandatory: true,
            expired_grace: None,
        })
    }

    /// A verifier that accepts clients without a certificate; a certificate that is
    /// presented must still be a valid SVID.
    pub fn optional(bundles: SharedBundles, accept: Accept) -> Arc<Self> {
        Arc::new(SvidClientVerifier {
            bundles,
            accept,
            algs: algorithms(),
            mandatory: false,
            expired_grace: None,
        })
    }

    /// [`SvidClientVerifier::optional`], also accepting an SVID that expired less than
    /// `grace` ago (verified as of its expiry): a proxy whose certificate ran out while the
    /// control plane was down can still renew. Everything else must refuse such a peer.
    pub fn optional_with_grace(
        bundles: SharedBundles,
        accept: Accept,
        grace: Duration,
    ) -> Arc<Self> {
        Arc::new(SvidClientVerifier {
            bundles,
            accept,
            algs: algorithms(),
            mandatory: false,
            expired_grace: Some(grace),
        })
    }
}

/// How long ago the peer's certificate expired (beyond the clock-skew allowance), if it
/// has: only a verifier built with [`SvidClientVerifier::optional_with_grace`] lets such a
/// peer complete the handshake.
pub fn expired_for(conn: &rustls::CommonState, now: SystemTime) -> Option<Duration> {
    let not_after = svid::not_after(conn.peer_certificates()?.first()?)?;
    now.duration_since(not_after + svid::CLOCK_SKEW)
        .ok()
        .filter(|d| !d.is_zero())
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut now = now;
        if let (Some(grace), Some(not_after)) = (self.expired_grace, svid::not_after(end_entity)) {
            let t = system_time(now);
            if t > not_after + svid::CLOCK_SKEW && t <= not_after + grace {
                // Verified as of its last valid second.
                let at = not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_sub(Duration::from_secs(1));
                now = UnixTime::since_unix_epoch(at);
            }
        }
        check(
            &self.bundles,
            &self.accept,
            end_entity,
            intermediates,
            Usage::Client,
            now,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The verified peer's SPIFFE ID after a handshake.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    svid::spiffe_id_of(conn.peer_certificates()?.first()?).ok()
}
