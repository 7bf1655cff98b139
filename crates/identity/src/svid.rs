//! X.509-SVID validation by the SPIFFE X.509-SVID specification, with the checks go-spiffe
//! (`svid/x509svid`, `bundle/x509bundle`) makes.
//!
//! The leaf must carry exactly one URI SAN holding a valid SPIFFE ID with a path, must not
//! be a CA, must allow `digitalSignature` and must not allow `keyCertSign` or `cRLSign`.
//! Every signing certificate (the intermediates presented and the root the chain ends at)
//! must be a CA that allows `keyCertSign`. The chain is verified by webpki against the trust
//! bundle of the leaf's own trust domain, so a certificate from another trust domain's CA
//! never passes for ours. Signing certificates are never accepted as leaves.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::{IdError, SpiffeId, TrustDomain};

/// Clock skew tolerated on both ends of a certificate's validity.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a certificate chain is not an acceptable X.509-SVID. The [`SvidError::code`] of each
/// is the reason label telemetry counts handshake failures by.
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
    #[error(
        "the leaf's SPIFFE ID `{0}` has no path; only a signing certificate may name the trust domain alone"
    )]
    LeafWithoutPath(SpiffeId),
    #[error("the leaf is a CA certificate; signing certificates are never accepted as SVIDs")]
    LeafIsCa,
    #[error("the leaf has no key usage extension; an X.509-SVID must allow `digitalSignature`")]
    NoKeyUsage,
    #[error("the leaf's key usage lacks `digitalSignature`")]
    NoDigitalSignature,
    #[error("the leaf's key usage allows `keyCertSign`; only signing certificates may")]
    LeafKeyCertSign,
    #[error("the leaf's key usage allows `cRLSign`; only signing certificates may")]
    LeafCrlSign,
    #[error("signing certificate {which} is not a CA (basic constraints without `cA`)")]
    SignerNotCa { which: String },
    #[error("signing certificate {which} does not allow `keyCertSign`")]
    SignerNoKeyCertSign { which: String },
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
    /// A short, stable reason label: `no_certificate`, `bad_svid` (the certificates break
    /// the X.509-SVID rules), `unknown_ca`, `expired`, `not_yet_valid`, `wrong_identity`.
    pub fn code(&self) -> &'static str {
        match self {
            SvidError::NoCertificate => "no_certificate",
            SvidError::Malformed(_)
            | SvidError::UriSanCount(_)
            | SvidError::BadSpiffeId(_)
            | SvidError::LeafWithoutPath(_)
            | SvidError::LeafIsCa
            | SvidError::NoKeyUsage
            | SvidError::NoDigitalSignature
            | SvidError::LeafKeyCertSign
            | SvidError::LeafCrlSign
            | SvidError::SignerNotCa { .. }
            | SvidError::SignerNoKeyCertSign { .. } => "bad_svid",
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

/// The basic constraints' `cA` flag and the key usage (`None` without the extension).
struct Usages {
    is_ca: bool,
    /// `(digitalSignature, keyCertSign, cRLSign)`.
    key_usage: Option<(bool, bool, bool)>,
}

fn usages(cert: &X509Certificate<'_>) -> Usages {
    let mut u = Usages {
        is_ca: false,
        key_usage: None,
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => u.is_ca = bc.ca,
            ParsedExtension::KeyUsage(ku) => {
                u.key_usage = Some((ku.digital_signature(), ku.key_cert_sign(), ku.crl_sign()));
            }
            _ => {}
        }
    }
    u
}

/// What the leaf says, before its chain is checked.
fn leaf_identity(leaf: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let mut uris = vec![];
    for ext in leaf.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    uris.push((*u).to_owned());
                }
            }
        }
    }
    let u = usages(leaf);
    if u.is_ca {
        return Err(SvidError::LeafIsCa);
    }
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(SvidError::BadSpiffeId)?;
    if id.path().is_empty() {
        return Err(SvidError::LeafWithoutPath(id));
    }
    match u.key_usage {
        None => Err(SvidError::NoKeyUsage),
        Some((false, _, _)) => Err(SvidError::NoDigitalSignature),
        Some((_, true, _)) => Err(SvidError::LeafKeyCertSign),
        Some((_, _, true)) => Err(SvidError::LeafCrlSign),
        Some((true, false, false)) => Ok(id),
    }
}

/// A signing certificate (intermediate or root) must be a CA allowed to sign certificates.
fn check_signer(cert: &X509Certificate<'_>, role: &str) -> Result<(), SvidError> {
    let which = || {
        let subject = cert.subject().to_string();
        if subject.is_empty() {
            role.to_owned()
        } else {
            format!("{role} `{subject}`")
        }
    };
    let u = usages(cert);
    if !u.is_ca {
        return Err(SvidError::SignerNotCa { which: which() });
    }
    match u.key_usage {
        Some((_, true, _)) => Ok(()),
        _ => Err(SvidError::SignerNoKeyCertSign { which: which() }),
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| SvidError::Malformed(e.to_string()))
}

/// The SPIFFE ID in a leaf certificate, without verifying anything else (for reading the
/// identity of a peer whose chain the handshake already verified).
pub fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    leaf_identity(&parse(leaf)?)
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
    let id = leaf_identity(&parse(leaf_der)?)?;
    for (i, der) in chain.iter().enumerate().skip(1) {
        check_signer(&parse(der)?, &format!("#{i} in the chain"))?;
    }
    let td = id.trust_domain_name().to_owned();
    let roots = bundles
        .get(&td)
        .ok_or_else(|| SvidError::UnknownTrustDomain(td.clone()))?;
    let anchors: Vec<(rustls::pki_types::TrustAnchor<'_>, &CertificateDer<'_>)> = roots
        .iter()
        .filter_map(|r| Some((webpki::anchor_from_trusted_cert(r).ok()?, r)))
        .collect();
    if anchors.is_empty() {
        return Err(SvidError::UnknownTrustDomain(td));
    }
    let trust: Vec<_> = anchors.iter().map(|(a, _)| a.clone()).collect();
    let ee = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| SvidError::Malformed(format!("{e:?}")))?;
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    // The root certificates of the anchor the verified path ends at (one, unless the
    // bundle holds two certificates of the same name and key), for the signing rules.
    let root_of = |path: &webpki::VerifiedPath<'_>| {
        let a = path.anchor();
        anchors
            .iter()
            .filter(|(t, _)| {
                t.subject == a.subject && t.subject_public_key_info == a.subject_public_key_info
            })
            .map(|(_, der)| (*der).clone())
            .collect::<Vec<_>>()
    };
    let verify = |t: SystemTime| {
        ee.verify_for_usage(algs, &trust, &chain[1..], unix(t), eku, None, None)
            .map(|path| root_of(&path))
    };
    // Verify at `now`; tolerate the clock skew at either end of the validity window.
    let result = match verify(now) {
        Err(webpki::Error::CertNotValidYet { .. }) => verify(now + CLOCK_SKEW),
        Err(webpki::Error::CertExpired { .. }) => verify(now - CLOCK_SKEW),
        r => r,
    };
    match result {
        Ok(roots) => {
            let mut refusal = SvidError::UnknownIssuer {
                td,
                reason: "the verified path ends at no root of the bundle".into(),
            };
            for root in roots {
                match check_signer(&parse(&root)?, "root") {
                    Ok(()) => return Ok(id),
                    Err(e) => refusal = e,
                }
            }
            Err(refusal)
        }
        Err(webpki::Error::CertExpired { .. }) => Err(SvidError::Expired),
        Err(webpki::Error::CertNotValidYet { .. }) => Err(SvidError::NotYetValid),
        Err(e) => Err(SvidError::UnknownIssuer {
            td,
            reason: format!("{e:?}"),
        }),
    }
}

/// A certificate's serial number (lower-case hex) and validity period.
pub fn serial_and_validity(cert: &CertificateDer<'_>) -> Option<(String, SystemTime, SystemTime)> {
    let (_, c) = X509Certificate::from_der(cert).ok()?;
    let at = |t: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?));
    Some((
        c.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
        at(c.validity().not_before.timestamp())?,
        at(c.validity().not_after.timestamp())?,
    ))
}

/// When a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, c) = X509Certificate::from_der(cert).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
