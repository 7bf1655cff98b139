//! Certificates Meshward's CA would never issue, built with rcgen to break one X.509-SVID
//! rule at a time (shared by the identity test binaries).

#![allow(dead_code, reason = "each test binary uses part of it")]

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

/// A forged chain: `chain` is (leaf, intermediate), `root` anchors it, `key` is the leaf's.
pub struct Forged {
    pub chain: Vec<CertificateDer<'static>>,
    pub root: CertificateDer<'static>,
    pub key: KeyPair,
}

fn ca_params(cn: &str, td: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    p
}

/// A valid leaf's parameters for `id`, as the X.509-SVID rules want them.
pub fn leaf_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.is_ca = IsCa::ExplicitNoCa;
    p
}

/// Root -> intermediate -> leaf for `id` in trust domain `td`; each closure may break its
/// certificate's parameters (a valid chain when none does).
pub fn forge(
    td: &str,
    id: &str,
    root: impl FnOnce(&mut CertificateParams),
    intermediate: impl FnOnce(&mut CertificateParams),
    leaf: impl FnOnce(&mut CertificateParams),
) -> Forged {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = ca_params("forged root", td);
    root(&mut rp);
    let root_cert = rp.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(rp, root_key);
    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = ca_params("forged intermediate", td);
    intermediate(&mut ip);
    let inter = ip.signed_by(&inter_key, &root_issuer).unwrap();
    let inter_issuer = Issuer::new(ip, inter_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut lp = leaf_params(id);
    leaf(&mut lp);
    let leaf = lp.signed_by(&key, &inter_issuer).unwrap();
    Forged {
        chain: vec![leaf.der().clone(), inter.der().clone()],
        root: root_cert.der().clone(),
        key,
    }
}
