//! X.509-SVID validation by the SPIFFE X.509-SVID specification.
//!
//! The leaf must carry exactly one URI SAN holding a valid SPIFFE ID, must not be a CA,
//! must allow `digitalSignature` and must not allow `keyCertSign` or `cRLSign`. The chain
//! is verified by webpki against the trust bundle of the leaf's own trust domain, so a
//! certificate from another trust domain's CA never passes for ours. Signing certificates
//! are never accepted as leaves.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::{IdError, SpiffeId, TrustDomain};

/// Clock skew tolerated on both ends of a certificate's validity.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a certificate chain is not an acceptable X.509-SVID. The `code` of each is the reason
/// label telemetry counts handshake failures by.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("no certificate was presented")]
    NoCertificate,
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the leaf has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(IdError),
    #[error("the leaf is a CA certificate; signing certificates are never accepted as SVIDs")]
    LeafIsCa,
    #[error("the leaf's key usage lacks digitalSignature or allows certificate or CRL signing")]
    BadKeyUsage,
    #[error("no trust bundle for trust domain `{0}`")]
    UnknownTrustDomain(String),
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate is not valid yet")]
    NotYetValid,
    #[error("the chain does not lead to the trust bundle of `{td}`: {reason}")]
    UnknownIssuer { td: String, reason: String },
    #[error("the peer is `{got}`, expected {expected}")]
    WrongIdentity { got: SpiffeId, expected: String },
}

impl SvidError {
    /// A short, stable reason label.
    pub fn code(&self) -> &'static str {
        match self {
            SvidError::NoCertificate => "no_certificate",
            SvidError::Malformed(_)
            | SvidError::UriSanCount(_)
            | SvidError::BadSpiffeId(_)
            | SvidError::LeafIsCa
            | SvidError::BadKeyUsage => "invalid_svid",
            SvidError::UnknownTrustDomain(_) | SvidError::UnknownIssuer { .. } => "unknown_ca",
            SvidError::Expired => "expired",
            SvidError::NotYetValid => "not_yet_valid",
            SvidError::WrongIdentity { .. } => "wrong_identity",
        }
    }
}

/// Trust bundles by trust domain: the root certificates each trust domain's SVIDs chain to.
#[derive(Debug, Clone, Default)]
pub struct TrustBundles {
    bundles: HashMap<TrustDomain, Vec<CertificateDer<'static>>>,
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (replaces) the roots of one trust domain.
    pub fn set(&mut self, td: TrustDomain, roots: Vec<CertificateDer<'static>>) {
        self.bundles.insert(td, roots);
    }

    pub fn get(&self, td: &str) -> Option<&[CertificateDer<'static>]> {
        self.bundles
            .iter()
            .find(|(k, _)| k.as_str() == td)
            .map(|(_, v)| v.as_slice())
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }
}

/// What the leaf says, before its chain is checked.
fn leaf_identity(leaf: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let mut uris = vec![];
    let mut is_ca = false;
    let mut ku_ok = None;
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push((*u).to_owned());
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                ku_ok = Some(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
            }
            _ => {}
        }
    }
    if is_ca {
        return Err(SvidError::LeafIsCa);
    }
    if ku_ok != Some(true) {
        return Err(SvidError::BadKeyUsage);
    }
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    SpiffeId::parse(&uris[0]).map_err(SvidError::BadSpiffeId)
}

/// The SPIFFE ID in a leaf certificate, without verifying anything else (for reading the
/// identity of a peer whose chain the handshake already verified).
pub fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| SvidError::Malformed(e.to_string()))?;
    leaf_identity(&cert)
}

/// Which end of a connection the SVID authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default())
}

/// Validates an X.509-SVID chain (leaf first) at `now` and returns its SPIFFE ID.
pub fn validate(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    usage: Usage,
    now: SystemTime,
) -> Result<SpiffeId, SvidError> {
    let leaf_der = chain.first().ok_or(SvidError::NoCertificate)?;
    let (_, leaf) =
        X509Certificate::from_der(leaf_der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let id = leaf_identity(&leaf)?;
    let td = id.trust_domain_name().to_owned();
    let roots = bundles
        .get(&td)
        .ok_or_else(|| SvidError::UnknownTrustDomain(td.clone()))?;
    let anchors: Vec<rustls::pki_types::TrustAnchor<'_>> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    if anchors.is_empty() {
        return Err(SvidError::UnknownTrustDomain(td));
    }
    let ee = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| SvidError::Malformed(format!("{e:?}")))?;
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let verify = |t: SystemTime| {
        ee.verify_for_usage(algs, &anchors, &chain[1..], unix(t), eku, None, None)
            .map(|_| ())
    };
    // Verify at `now`; tolerate the clock skew at either end of the validity window.
    let result = match verify(now) {
        Err(webpki::Error::CertNotValidYet { .. }) => verify(now + CLOCK_SKEW),
        Err(webpki::Error::CertExpired { .. }) => verify(now - CLOCK_SKEW),
        r => r,
    };
    match result {
        Ok(()) => Ok(id),
        Err(webpki::Error::CertExpired { .. }) => Err(SvidError::Expired),
        Err(webpki::Error::CertNotValidYet { .. }) => Err(SvidError::NotYetValid),
        Err(e) => Err(SvidError::UnknownIssuer {
            td,
            reason: format!("{e:?}"),
        }),
    }
}

/// When a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, c) = X509Certificate::from_der(cert).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
