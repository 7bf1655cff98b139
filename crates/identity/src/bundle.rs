//! The SPIFFE bundle format: a JWK Set whose `x509-svid` keys carry the trust domain's
//! root certificates in `x5c`, with `spiffe_sequence` and `spiffe_refresh_hint`. Used to
//! publish our bundle and to import federated trust domains' bundles.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};

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

fn ec_point(der: &[u8]) -> Result<(String, String, &'static str), String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let spki = cert.public_key();
    let point: &[u8] = &spki.subject_public_key.data;
    let crv = match point.len() {
        65 => "P-256",
        97 => "P-384",
        n => {
            return Err(format!(
                "unsupported public key ({n} bytes); roots must be ECDSA P-256 or P-384"
            ));
        }
    };
    if point.first() != Some(&4) {
        return Err("compressed EC points are not supported".into());
    }
    let half = (point.len() - 1) / 2;
    Ok((
        URL_SAFE_NO_PAD.encode(&point[1..=half]),
        URL_SAFE_NO_PAD.encode(&point[1 + half..]),
        crv,
    ))
}

impl Bundle {
    /// The bundle as a SPIFFE bundle JSON document.
    pub fn to_jwks(&self) -> Result<String, BundleError> {
        let mut keys = vec![];
        for (i, r) in self.roots.iter().enumerate() {
            let (x, y, crv) = ec_point(r).map_err(|e| BundleError::Key(i, e))?;
            keys.push(json!({"use": "x509-svid", "kty": "EC", "crv": crv, "x": x, "y": y, "x5c": [STANDARD.encode(r)]}));
        }
        let mut doc = json!({"keys": keys, "spiffe_sequence": self.sequence});
        if let (Some(h), Some(o)) = (self.refresh_hint, doc.as_object_mut()) {
            o.insert("spiffe_refresh_hint".into(), json!(h.as_secs()));
        }
        serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Json(e.to_string()))
    }

    /// Reads a SPIFFE bundle JSON document for `trust_domain`. Keys of other uses
    /// (`jwt-svid`) are skipped; each `x509-svid` key must carry exactly one certificate
    /// whose public key matches the JWK's coordinates.
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
            let (x, y, crv) = ec_point(&der).map_err(|e| BundleError::Key(i, e))?;
            let field = |f: &str| k.get(f).and_then(Value::as_str).map(str::to_owned);
            if field("x") != Some(x)
                || field("y") != Some(y)
                || field("crv").as_deref() != Some(crv)
            {
                return Err(BundleError::Key(
                    i,
                    "the JWK coordinates do not match the certificate's public key".into(),
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
