#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Federation partners' bundles with RSA roots: an RSA root made by `openssl` (the kind a
//! partner's CA has) goes through the SPIFFE bundle JSON both ways with `kty: RSA`, `n`,
//! `e` and `x5c`, and a chain under it verifies, by us and by `openssl verify`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshward_identity::bundle::{Bundle, BundleError};
use meshward_identity::ca::{Ca, CaLifetimes, cert_pem, certs_from_pem, key_from_pem};
use meshward_identity::svid::{SvidError, TrustBundles, Usage, validate};
use meshward_identity::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

fn partner() -> TrustDomain {
    TrustDomain::parse("partner.example").unwrap()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "openssl {args:?}: {text}");
    text
}

/// A partner's RSA root, made by openssl: its certificate and key (PKCS#8 PEM).
fn rsa_root(dir: &Path, bits: u32, key_usage: &str) -> (CertificateDer<'static>, String) {
    let bits = format!("rsa_keygen_bits:{bits}");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &bits,
            "-out",
            "root.key",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-days",
            "2",
            "-subj",
            "/O=Partner/CN=partner RSA root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            &format!("keyUsage=critical,{key_usage}"),
            "-addext",
            "subjectAltName=URI:spiffe://partner.example",
            "-out",
            "root.pem",
        ],
    );
    let cert = certs_from_pem(&std::fs::read_to_string(dir.join("root.pem")).unwrap());
    let key = std::fs::read_to_string(dir.join("root.key")).unwrap();
    (cert[0].clone(), key)
}

/// An ECDSA intermediate signed by `root` (RSA), and a leaf for `id` under it.
fn chain_under(
    root: &CertificateDer<'static>,
    root_key: &str,
    id: &str,
) -> Vec<CertificateDer<'static>> {
    let root_issuer = Issuer::from_ca_cert_der(root, key_from_pem(root_key).unwrap()).unwrap();
    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.distinguished_name = DistinguishedName::new();
    ip.distinguished_name
        .push(DnType::CommonName, "partner intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.use_authority_key_identifier_extension = true;
    let inter = ip.signed_by(&inter_key, &root_issuer).unwrap();
    let inter_issuer = Issuer::new(ip, inter_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut lp = CertificateParams::new(Vec::<String>::new()).unwrap();
    lp.distinguished_name = DistinguishedName::new();
    lp.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    lp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    lp.is_ca = IsCa::ExplicitNoCa;
    lp.use_authority_key_identifier_extension = true;
    let leaf = lp.signed_by(&key, &inter_issuer).unwrap();
    vec![leaf.der().clone(), inter.der().clone()]
}

#[test]
fn an_rsa_root_round_trips_through_the_spiffe_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _key) = rsa_root(dir.path(), 2048, "keyCertSign,cRLSign");
    // Our own (EC) root beside the partner's RSA root: both kinds in one document.
    let ec = Ca::generate(partner(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let b = Bundle {
        trust_domain: partner(),
        roots: vec![root.clone(), ec.bundle()[0].clone()],
        sequence: 3,
        refresh_hint: Some(Duration::from_secs(60)),
    };
    let json = b.to_jwks().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let k = &v["keys"][0];
    assert_eq!(k["use"], "x509-svid", "{json}");
    assert_eq!(k["kty"], "RSA", "{json}");
    assert_eq!(k["e"], "AQAB", "{json}");
    assert!(k.get("crv").is_none() && k.get("x").is_none(), "{json}");
    assert_eq!(
        k["x5c"][0],
        base64::engine::general_purpose::STANDARD.encode(&root)
    );
    // `n` is the modulus openssl sees, unsigned and without leading zeros.
    let n = URL_SAFE_NO_PAD.decode(k["n"].as_str().unwrap()).unwrap();
    assert_eq!(n.len(), 256, "2048 bits, no leading zero byte");
    let modulus = openssl(
        dir.path(),
        &["x509", "-noout", "-modulus", "-in", "root.pem"],
    );
    let hex: String = n.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(modulus.trim(), format!("Modulus={hex}"));
    assert_eq!(v["keys"][1]["kty"], "EC", "{json}");

    let back = Bundle::from_jwks(partner(), &json).unwrap();
    assert_eq!(back, b);

    // A JWK whose members do not describe its certificate is refused: another modulus,
    // or an RSA certificate filed as `kty: EC`.
    let other = {
        let d = tempfile::tempdir().unwrap();
        rsa_root(d.path(), 2048, "keyCertSign").0
    };
    let mut forged = v.clone();
    forged["keys"][0]["x5c"][0] = base64::engine::general_purpose::STANDARD
        .encode(&other)
        .into();
    let e = Bundle::from_jwks(partner(), &forged.to_string()).unwrap_err();
    assert!(
        matches!(&e, BundleError::Key(0, why) if why.contains("do not match")),
        "{e}"
    );
    let mut as_ec = v.clone();
    as_ec["keys"][0]["kty"] = "EC".into();
    assert!(Bundle::from_jwks(partner(), &as_ec.to_string()).is_err());
}

#[test]
fn a_weak_rsa_root_is_refused_in_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (root, _key) = rsa_root(dir.path(), 1024, "keyCertSign");
    let b = Bundle {
        trust_domain: partner(),
        roots: vec![root],
        sequence: 1,
        refresh_hint: None,
    };
    let e = b.to_jwks().unwrap_err();
    assert!(e.to_string().contains("1024 bits"), "{e}");
}

#[test]
fn a_chain_under_an_rsa_root_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (root, key) = rsa_root(dir.path(), 2048, "keyCertSign,cRLSign");
    let id = "spiffe://partner.example/ns/billing/sa/invoices";
    let chain = chain_under(&root, &key, id);
    // The root as a partner publishes it, imported from its bundle document.
    let doc = Bundle {
        trust_domain: partner(),
        roots: vec![root.clone()],
        sequence: 1,
        refresh_hint: None,
    }
    .to_jwks()
    .unwrap();
    let imported = Bundle::from_jwks(partner(), &doc).unwrap();
    let mut b = TrustBundles::new();
    b.set(partner(), imported.roots);
    for usage in [Usage::Client, Usage::Server] {
        assert_eq!(
            validate(&chain, &b, usage, SystemTime::now()).unwrap(),
            SpiffeId::parse(id).unwrap()
        );
    }
    // openssl agrees.
    std::fs::write(dir.path().join("inter.pem"), cert_pem(&chain[1])).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), cert_pem(&chain[0])).unwrap();
    let out = openssl(
        dir.path(),
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "inter.pem",
            "leaf.pem",
        ],
    );
    assert!(out.contains("leaf.pem: OK"), "{out}");
    // The RSA signature is really checked: the same chain under another RSA root fails.
    let other = {
        let d = tempfile::tempdir().unwrap();
        rsa_root(d.path(), 2048, "keyCertSign").0
    };
    let mut wrong = TrustBundles::new();
    wrong.set(partner(), vec![other]);
    assert!(matches!(
        validate(&chain, &wrong, Usage::Client, SystemTime::now()),
        Err(SvidError::UnknownIssuer { .. })
    ));
}
