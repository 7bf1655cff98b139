//! The SPIFFE bundle format: a JWK Set whose `x509-svid` keys carry the trust domain's
//! root certificates in `x5c`, with `spiffe_sequence` and `spiffe_refresh_hint`. Used to
//! publish our bundle and to import federated trust domains' bundles. Roots may have EC
//! (P-256, P-384: `crv`, `x`, `y`) or RSA (2048 to 8192 bits: `n`, `e`) keys; on import
//! each JWK's members must describe its certificate's key.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::TrustDomain;

/// A trust domain's bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub trust_domain: TrustDomain,
    pub roots: Vec<CertificateDer<'static>>,
    pub sequence: u64,
    pub refresh_hint: Option<Duration>,
}

/// Why a bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("the bundle is not JSON: {0}")]
    Json(String),
    #[error("the bundle has no `keys` array")]
    NoKeys,
    #[error("key {0}: {1}")]
    Key(usize, String),
    #[error("the bundle has no x509-svid key")]
    NoX509Keys,
}

/// A root's public key as the JWK members that describe it.
#[derive(Debug, PartialEq, Eq)]
enum KeyMembers {
    /// `kty: EC`: the curve and the point's coordinates (base64url).
    Ec {
        crv: &'static str,
        x: String,
        y: String,
    },
    /// `kty: RSA`: modulus and public exponent (base64url, big-endian, no leading zeros).
    Rsa { n: String, e: String },
}

impl KeyMembers {
    /// The JWK members a certificate's public key has.
    fn of_certificate(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let spki = cert.public_key();
        let parsed = spki.parsed().map_err(|e| e.to_string())?;
        match parsed {
            PublicKey::RSA(rsa) => {
                let bits = rsa.key_size();
                if !(2048..=8192).contains(&bits) {
                    return Err(format!(
                        "an RSA key of {bits} bits; roots must have 2048 to 8192 bits"
                    ));
                }
                Ok(KeyMembers::Rsa {
                    n: URL_SAFE_NO_PAD.encode(unsigned(rsa.modulus)),
                    e: URL_SAFE_NO_PAD.encode(unsigned(rsa.exponent)),
                })
            }
            PublicKey::EC(point) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok());
                let crv = match curve {
                    Some(c) if c == OID_EC_P256 => "P-256",
                    Some(c) if c == OID_NIST_EC_P384 => "P-384",
                    _ => return Err("an EC key on a curve other than P-256 and P-384".into()),
                };
                let point = point.data();
                let half = point.len().saturating_sub(1) / 2;
                if point.first() != Some(&4) || point.len() != 1 + 2 * half {
                    return Err("compressed EC points are not supported".into());
                }
                Ok(KeyMembers::Ec {
                    crv,
                    x: URL_SAFE_NO_PAD.encode(&point[1..=half]),
                    y: URL_SAFE_NO_PAD.encode(&point[1 + half..]),
                })
            }
            _ => Err("an unsupported public key; roots must be RSA or ECDSA P-256/P-384".into()),
        }
    }

    /// The JWK of a root: these members, `use` and the certificate in `x5c`.
    fn jwk(&self, der: &[u8]) -> Value {
        let x5c = [STANDARD.encode(der)];
        match self {
            KeyMembers::Ec { crv, x, y } => {
                json!({"use": "x509-svid", "kty": "EC", "crv": crv, "x": x, "y": y, "x5c": x5c})
            }
            KeyMembers::Rsa { n, e } => {
                json!({"use": "x509-svid", "kty": "RSA", "n": n, "e": e, "x5c": x5c})
            }
        }
    }

    /// Whether a JWK's own members say the same as the certificate's key.
    fn matches(&self, jwk: &Value) -> bool {
        let field = |f: &str| jwk.get(f).and_then(Value::as_str);
        match self {
            KeyMembers::Ec { crv, x, y } => {
                field("kty") == Some("EC")
                    && field("crv") == Some(crv)
                    && field("x") == Some(x)
                    && field("y") == Some(y)
            }
            KeyMembers::Rsa { n, e } => {
                field("kty") == Some("RSA") && field("n") == Some(n) && field("e") == Some(e)
            }
        }
    }
}

/// A DER INTEGER's bytes without the leading zeros (JWK integers are unsigned, minimal).
fn unsigned(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[start..]
}

impl Bundle {
    /// The bundle as a SPIFFE bundle JSON document.
    pub fn to_jwks(&self) -> Result<String, BundleError> {
        let mut keys = vec![];
        for (i, r) in self.roots.iter().enumerate() {
            let members = KeyMembers::of_certificate(r).map_err(|e| BundleError::Key(i, e))?;
            keys.push(members.jwk(r));
        }
        let mut doc = json!({"keys": keys, "spiffe_sequence": self.sequence});
        if let (Some(h), Some(o)) = (self.refresh_hint, doc.as_object_mut()) {
            o.insert("spiffe_refresh_hint".into(), json!(h.as_secs()));
        }
        serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Json(e.to_string()))
    }

    /// Reads a SPIFFE bundle JSON document for `trust_domain`. Keys of other uses
    /// (`jwt-svid`) are skipped; each `x509-svid` key must carry exactly one certificate
    /// whose public key the JWK describes (`kty` and `crv`/`x`/`y` or `n`/`e`).
    pub fn from_jwks(trust_domain: TrustDomain, text: &str) -> Result<Self, BundleError> {
        let v: Value = serde_json::from_str(text).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::NoKeys)?;
        let mut roots = vec![];
        for (i, k) in keys.iter().enumerate() {
            if k.get("use").and_then(Value::as_str) != Some("x509-svid") {
                continue;
            }
            let x5c = k
                .get("x5c")
                .and_then(Value::as_array)
                .ok_or_else(|| BundleError::Key(i, "no `x5c`".into()))?;
            if x5c.len() != 1 {
                return Err(BundleError::Key(
                    i,
                    format!(
                        "`x5c` has {} certificates; exactly one is allowed",
                        x5c.len()
                    ),
                ));
            }
            let der = x5c[0]
                .as_str()
                .and_then(|s| STANDARD.decode(s).ok())
                .ok_or_else(|| BundleError::Key(i, "`x5c[0]` is not base64".into()))?;
            let members = KeyMembers::of_certificate(&der).map_err(|e| BundleError::Key(i, e))?;
            if !members.matches(k) {
                return Err(BundleError::Key(
                    i,
                    "the JWK's `kty` and key members do not match the certificate's public key"
                        .into(),
                ));
            }
            roots.push(CertificateDer::from(der));
        }
        if roots.is_empty() {
            return Err(BundleError::NoX509Keys);
        }
        Ok(Bundle {
            trust_domain,
            roots,
            sequence: v
                .get("spiffe_sequence")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            refresh_hint: v
                .get("spiffe_refresh_hint")
                .and_then(Value::as_u64)
                .map(Duration::from_secs),
        })
    }
}
