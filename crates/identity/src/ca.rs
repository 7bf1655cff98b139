//! The certificate authority: a root and an online intermediate (ECDSA P-256) that sign
//! workload X.509-SVIDs for identities the caller has already proven.
//!
//! The trust bundle is the set of roots; a workload's chain carries the intermediate.
//! Rotating the intermediate therefore needs no bundle change: leaves of the old
//! intermediate stay valid until they expire, new ones come from the new intermediate.
//! Rotating the root adds the new root to the bundle first ([`Ca::begin_root_rotation`]),
//! keeps signing with the old intermediate until the new bundle has been distributed, and
//! only then switches ([`Ca::finish_root_rotation`]); the old root leaves the bundle after
//! its last leaf expires ([`Ca::prune`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{SpiffeId, TrustDomain};

/// Shortest workload certificate lifetime the CA issues (below 5 minutes is for drills:
/// proxies renew at half the lifetime).
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest workload certificate lifetime the CA issues.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaves start this much before "now", for peers whose clocks run slightly behind.
const BACKDATE: Duration = Duration::from_secs(30);

/// Why the CA refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR asks for `{requested}` but the caller proved `{proven}`")]
    IdentityMismatch { requested: String, proven: SpiffeId },
    #[error("`{0}` is not in this CA's trust domain `{1}`")]
    WrongTrustDomain(SpiffeId, TrustDomain),
    #[error("a lifetime of {requested:?} is outside {min:?}..={max:?}")]
    BadLifetime {
        requested: Duration,
        min: Duration,
        max: Duration,
    },
    #[error("the intermediate CA has expired; rotate it (`meshward ca rotate`)")]
    IntermediateExpired,
    #[error("the root key is offline; supply an intermediate signed by it")]
    RootKeyOffline,
    #[error("no root rotation is in progress")]
    NoRotation,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a usable certificate or key: {why}")]
    BadFile { path: PathBuf, why: String },
}

/// A CA certificate with, for an online CA, the issuer (its key) that signs with it.
struct CaCert {
    der: CertificateDer<'static>,
    issuer: Option<Issuer<'static, KeyPair>>,
    not_after: SystemTime,
}

impl std::fmt::Debug for CaCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCert")
            .field("not_after", &self.not_after)
            .field("online", &self.issuer.is_some())
            .finish()
    }
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn not_after_of(der: &[u8]) -> Result<SystemTime, String> {
    let (_, c) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let secs = c.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn ca_params(
    td: &TrustDomain,
    cn: &str,
    now: SystemTime,
    ttl: Duration,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Meshward");
    // The creation time makes every generation's name unique, so that chain builders
    // (openssl among them) never confuse an old root with its successor.
    let stamp = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    dn.push(DnType::CommonName, format!("{cn} {td} {stamp}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td}")
            .try_into()
            .unwrap_or_else(|_| unreachable_uri()),
    )];
    p.not_before = odt(now - BACKDATE);
    p.not_after = odt(now + ttl);
    p.use_authority_key_identifier_extension = true;
    p
}

#[expect(
    clippy::panic,
    reason = "a validated trust domain is always a valid IA5 string"
)]
fn unreachable_uri() -> rcgen::string::Ia5String {
    panic!("trust domain is not IA5")
}

/// Lifetimes of the CA's own certificates.
#[derive(Debug, Clone, Copy)]
pub struct CaLifetimes {
    pub root: Duration,
    pub intermediate: Duration,
}

impl Default for CaLifetimes {
    fn default() -> Self {
        CaLifetimes {
            root: Duration::from_secs(10 * 365 * 86400),
            intermediate: Duration::from_secs(90 * 86400),
        }
    }
}

/// A signed workload certificate: the chain to present (leaf, intermediate).
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub spiffe_id: SpiffeId,
    pub not_after: SystemTime,
}

/// The mesh's certificate authority.
#[derive(Debug)]
pub struct Ca {
    td: TrustDomain,
    lifetimes: CaLifetimes,
    /// Current root first; during a root rotation, the new root second.
    roots: Vec<CaCert>,
    /// The intermediate that signs now.
    intermediate: CaCert,
    /// A new intermediate under a new root, waiting for the bundle to be distributed.
    pending: Option<(CaCert, CaCert)>,
    /// Roots that were rotated out but may still anchor unexpired leaves.
    retired: Vec<CaCert>,
}

impl Ca {
    /// A new root and intermediate for a trust domain.
    pub fn generate(
        td: TrustDomain,
        lifetimes: CaLifetimes,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let root = Self::new_root(&td, lifetimes, now)?;
        let intermediate = Self::new_intermediate(&td, &root, lifetimes, now)?;
        Ok(Ca {
            td,
            lifetimes,
            roots: vec![root],
            intermediate,
            pending: None,
            retired: vec![],
        })
    }

    fn new_root(td: &TrustDomain, l: CaLifetimes, now: SystemTime) -> Result<CaCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(td, "Meshward root CA", now, l.root, Some(1));
        let cert = params.self_signed(&key)?;
        Ok(CaCert {
            der: cert.der().clone(),
            not_after: now + l.root,
            issuer: Some(Issuer::new(params, key)),
        })
    }

    fn new_intermediate(
        td: &TrustDomain,
        root: &CaCert,
        l: CaLifetimes,
        now: SystemTime,
    ) -> Result<CaCert, CaError> {
        let root_issuer = root.issuer.as_ref().ok_or(CaError::RootKeyOffline)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ttl = l
            .intermediate
            .min(root.not_after.duration_since(now).unwrap_or_default());
        let params = ca_params(td, "Meshward intermediate CA", now, ttl, Some(0));
        let cert = params.signed_by(&key, root_issuer)?;
        Ok(CaCert {
            der: cert.der().clone(),
            not_after: now + ttl,
            issuer: Some(Issuer::new(params, key)),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The trust bundle: every root that may anchor a valid leaf.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.roots
            .iter()
            .chain(&self.retired)
            .map(|c| c.der.clone())
            .chain(self.pending.as_ref().map(|(r, _)| r.der.clone()))
            .collect()
    }

    /// The intermediate that signs now.
    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.intermediate.der
    }

    /// When the signing intermediate expires.
    pub fn intermediate_not_after(&self) -> SystemTime {
        self.intermediate.not_after
    }

    /// Signs a workload certificate for `proven`, the identity the caller has already proven
    /// (join token, Kubernetes token or current SVID). The CA builds the certificate itself:
    /// of the CSR it uses only the public key (after checking the CSR's signature); a CSR
    /// that names a different SPIFFE ID is refused; other SANs, subject, CA flag, key usages
    /// are ignored. `lifetime` must lie within 1 minute and 24 hours and is cut at the
    /// intermediate's own expiry.
    pub fn issue(
        &self,
        proven: &SpiffeId,
        csr_der: &[u8],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        if proven.trust_domain_name() != self.td.as_str() {
            return Err(CaError::WrongTrustDomain(proven.clone(), self.td.clone()));
        }
        if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
            return Err(CaError::BadLifetime {
                requested: lifetime,
                min: MIN_LIFETIME,
                max: MAX_LIFETIME,
            });
        }
        if now >= self.intermediate.not_after {
            return Err(CaError::IntermediateExpired);
        }
        let public_key = csr_public_key(csr_der, proven)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names =
            vec![SanType::URI(proven.as_str().try_into().map_err(|_| {
                CaError::BadCsr("identity is not IA5".into())
            })?)];
        // A critical BasicConstraints without `cA` (DER omits the default FALSE; rcgen
        // before 0.14.10 wrote it, and strict parsers refused the certificate).
        p.is_ca = IsCa::ExplicitNoCa;
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let not_after = (now + lifetime).min(self.intermediate.not_after);
        p.not_before = odt(now - BACKDATE);
        p.not_after = odt(not_after);
        let issuer = self
            .intermediate
            .issuer
            .as_ref()
            .ok_or(CaError::RootKeyOffline)?;
        let leaf = p.signed_by(&public_key, issuer)?;
        Ok(Issued {
            chain: vec![leaf.der().clone(), self.intermediate.der.clone()],
            spiffe_id: proven.clone(),
            not_after,
        })
    }

    /// Replaces the signing intermediate with a new one under the same root. Leaves of the
    /// old intermediate stay valid (the bundle holds the root) until they expire.
    pub fn rotate_intermediate(&mut self, now: SystemTime) -> Result<(), CaError> {
        let root = self.roots.first().ok_or(CaError::RootKeyOffline)?;
        self.intermediate = Self::new_intermediate(&self.td, root, self.lifetimes, now)?;
        Ok(())
    }

    /// Starts a root rotation: a new root (and an intermediate under it) join the bundle,
    /// while the old intermediate keeps signing until [`Ca::finish_root_rotation`].
    pub fn begin_root_rotation(&mut self, now: SystemTime) -> Result<(), CaError> {
        let root = Self::new_root(&self.td, self.lifetimes, now)?;
        let inter = Self::new_intermediate(&self.td, &root, self.lifetimes, now)?;
        self.pending = Some((root, inter));
        Ok(())
    }

    /// Switches signing to the new root's intermediate. The old root stays in the bundle
    /// until [`Ca::prune`] finds no leaf can still chain to it.
    pub fn finish_root_rotation(&mut self) -> Result<(), CaError> {
        let (root, inter) = self.pending.take().ok_or(CaError::NoRotation)?;
        let old = std::mem::replace(&mut self.roots, vec![root]);
        self.retired.extend(old);
        self.intermediate = inter;
        Ok(())
    }

    /// Drops retired roots once no leaf signed under them can still be valid.
    pub fn prune(&mut self, now: SystemTime) {
        let horizon = now
            .checked_sub(MAX_LIFETIME)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.retired
            .retain(|c| c.not_after > now && c.not_after > horizon);
    }

    // -- persistence -----------------------------------------------------------------------

    /// Writes the CA to a directory: `root.pem`, `root.key` (if online), `intermediate.pem`,
    /// `intermediate.key` (keys with mode 0600); during a root rotation the new pair in
    /// `pending/`; rotated-out roots that may still anchor leaves in `retired.pem`. Each
    /// file is written to a temporary name and renamed, so a crash leaves the old or the new
    /// file, never half of one.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let root = self.roots.first().ok_or(CaError::RootKeyOffline)?;
        save_pair(dir, root, &self.intermediate)?;
        let pending = dir.join("pending");
        match &self.pending {
            Some((r, i)) => save_pair(&pending, r, i)?,
            None if pending.exists() => {
                std::fs::remove_dir_all(&pending).map_err(|source| CaError::Io {
                    path: pending.clone(),
                    source,
                })?
            }
            None => {}
        }
        let retired: String = self
            .retired
            .iter()
            .map(|c| pem("CERTIFICATE", &c.der))
            .collect();
        write_atomic(&dir.join("retired.pem"), retired.as_bytes(), false)
    }

    /// Loads a CA from a directory written by [`Ca::save`], or one a user prepared: their
    /// own root (`root.pem`, with `root.key` or, to keep the root key offline, with an
    /// `intermediate.pem` + `intermediate.key` signed by it).
    pub fn load(
        dir: &Path,
        td: TrustDomain,
        lifetimes: CaLifetimes,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (root, intermediate) = load_pair(dir, &td, lifetimes, now)?;
        let pending_dir = dir.join("pending");
        let pending = if pending_dir.join("root.pem").exists() {
            Some(load_pair(&pending_dir, &td, lifetimes, now)?)
        } else {
            None
        };
        let retired_file = dir.join("retired.pem");
        let mut retired = vec![];
        if retired_file.exists() {
            let text = std::fs::read_to_string(&retired_file).map_err(|source| CaError::Io {
                path: retired_file.clone(),
                source,
            })?;
            for der in certs_from_pem(&text) {
                let not_after = not_after_of(&der).map_err(|why| CaError::BadFile {
                    path: retired_file.clone(),
                    why,
                })?;
                retired.push(CaCert {
                    der,
                    issuer: None,
                    not_after,
                });
            }
        }
        Ok(Ca {
            td,
            lifetimes,
            roots: vec![root],
            intermediate,
            pending,
            retired,
        })
    }

    /// Whether a root rotation is in progress.
    pub fn rotating_root(&self) -> bool {
        self.pending.is_some()
    }
}

fn save_pair(dir: &Path, root: &CaCert, inter: &CaCert) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_atomic(
        &dir.join("root.pem"),
        pem("CERTIFICATE", &root.der).as_bytes(),
        false,
    )?;
    if let Some(i) = &root.issuer {
        write_atomic(&dir.join("root.key"), key_pem(i.key()).as_bytes(), true)?;
    }
    write_atomic(
        &dir.join("intermediate.pem"),
        pem("CERTIFICATE", &inter.der).as_bytes(),
        false,
    )?;
    if let Some(i) = &inter.issuer {
        write_atomic(
            &dir.join("intermediate.key"),
            key_pem(i.key()).as_bytes(),
            true,
        )?;
    }
    Ok(())
}

fn load_pair(
    dir: &Path,
    td: &TrustDomain,
    lifetimes: CaLifetimes,
    now: SystemTime,
) -> Result<(CaCert, CaCert), CaError> {
    let root = load_ca_cert(&dir.join("root.pem"), &dir.join("root.key"))?;
    let inter_pem = dir.join("intermediate.pem");
    let intermediate = if inter_pem.exists() {
        load_ca_cert(&inter_pem, &dir.join("intermediate.key"))?
    } else {
        Ca::new_intermediate(td, &root, lifetimes, now)?
    };
    if intermediate.issuer.is_none() {
        return Err(CaError::BadFile {
            path: dir.join("intermediate.key"),
            why: "the intermediate's key is required".into(),
        });
    }
    Ok((root, intermediate))
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {tag}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {tag}-----\n"));
    s
}

/// PEM of a certificate.
pub fn cert_pem(der: &CertificateDer<'_>) -> String {
    pem("CERTIFICATE", der)
}

fn load_ca_cert(cert: &Path, key: &Path) -> Result<CaCert, CaError> {
    let text = std::fs::read_to_string(cert).map_err(|source| CaError::Io {
        path: cert.to_owned(),
        source,
    })?;
    let key = match std::fs::read_to_string(key) {
        Ok(k) => Some(key_from_pem(&k).map_err(|why| CaError::BadFile {
            path: key.to_owned(),
            why,
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(CaError::Io {
                path: key.to_owned(),
                source,
            });
        }
    };
    let bad = |why: String| CaError::BadFile {
        path: cert.to_owned(),
        why,
    };
    let der = pem_decode(&text).ok_or_else(|| bad("no PEM CERTIFICATE block".into()))?;
    let not_after = not_after_of(&der).map_err(bad)?;
    let der = CertificateDer::from(der);
    let issuer = match key {
        Some(k) => Some(Issuer::from_ca_cert_der(&der, k).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    Ok(CaCert {
        der,
        issuer,
        not_after,
    })
}

fn pem_decode(text: &str) -> Option<Vec<u8>> {
    pem_block(text, "CERTIFICATE")
}

/// The DER of the first PEM block labelled `label` in `text`.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let begin = format!("-----BEGIN {label}-----");
    let start = text.find(&begin)? + begin.len();
    let end = text[start..].find(&format!("-----END {label}-----"))? + start;
    let b64: String = text[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// A key pair as PEM (`PRIVATE KEY`, PKCS#8), as written to `*.key` files.
pub fn key_pem(key: &KeyPair) -> String {
    pem("PRIVATE KEY", &key.serialize_der())
}

/// Reads a PKCS#8 `PRIVATE KEY` PEM (as [`key_pem`] writes and `openssl genpkey` makes).
pub fn key_from_pem(text: &str) -> Result<KeyPair, String> {
    let der = pem_block(text, "PRIVATE KEY").ok_or("no PEM PRIVATE KEY (PKCS#8) block")?;
    KeyPair::try_from(der).map_err(|e| e.to_string())
}

/// Writes a file atomically (temporary file, fsync, rename); `secret` files get mode 0600.
pub fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), CaError> {
    use std::io::Write as _;
    let err = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk: the partial copy would only take more of what is left.
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// A new workload key pair (ECDSA P-256) and a CSR for `id`: what a proxy sends to the CA.
/// The private key never leaves the caller.
pub fn new_workload_key(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names =
        vec![SanType::URI(id.as_str().try_into().map_err(|_| {
            CaError::BadCsr("identity is not IA5".into())
        })?)];
    let csr = p.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// The public key of a CSR, after checking its signature (proof of possession) and that
/// any SPIFFE ID it names is `proven`. Everything else in the CSR is ignored.
fn csr_public_key(csr_der: &[u8], proven: &SpiffeId) -> Result<SubjectPublicKeyInfo, CaError> {
    let (_, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CaError::BadCsr(format!("cannot parse: {e}")))?;
    csr.verify_signature()
        .map_err(|_| CaError::BadCsr("its signature does not verify".into()))?;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n
                        && *u != proven.as_str()
                    {
                        return Err(CaError::IdentityMismatch {
                            requested: (*u).to_owned(),
                            proven: proven.clone(),
                        });
                    }
                }
            }
        }
    }
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| CaError::BadCsr(format!("unsupported public key: {e}")))
}

/// The trust domain a Meshward CA certificate is for (its `spiffe://TD` URI SAN).
pub fn trust_domain_of(ca_cert: &[u8]) -> Option<TrustDomain> {
    let (_, c) = X509Certificate::from_der(ca_cert).ok()?;
    let san = c.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => TrustDomain::parse(u).ok(),
        _ => None,
    })
}

/// Certificates from PEM text (every `CERTIFICATE` block).
pub fn certs_from_pem(text: &str) -> Vec<CertificateDer<'static>> {
    use base64::Engine as _;
    let mut out = vec![];
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let body = &rest[start + "-----BEGIN CERTIFICATE-----".len()..];
        let Some(end) = body.find("-----END CERTIFICATE-----") else {
            break;
        };
        let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(CertificateDer::from(der));
        }
        rest = &body[end..];
    }
    out
}
