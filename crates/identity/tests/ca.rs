#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! The CA and X.509-SVID validation: issued certificates are valid SVIDs (checked by our
//! validator, by `openssl verify` and by Python `cryptography`'s strict DER parser), every
//! refusal of the CA and every rule of the validator has a case, and rotation keeps old
//! leaves valid.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use meshward_identity::bundle::Bundle;
use meshward_identity::ca::{Ca, CaError, CaLifetimes, cert_pem, new_workload_key};
use meshward_identity::svid::{SvidError, TrustBundles, Usage, validate};
use meshward_identity::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::parse("shop.example").unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://shop.example/{s}")).unwrap()
}

fn ca() -> Ca {
    Ca::generate(td(), CaLifetimes::default(), SystemTime::now()).unwrap()
}

fn bundles(ca: &Ca) -> TrustBundles {
    let mut b = TrustBundles::new();
    b.set(td(), ca.bundle());
    b
}

fn issue(ca: &Ca, who: &SpiffeId) -> Vec<CertificateDer<'static>> {
    let (_key, csr) = new_workload_key(who).unwrap();
    ca.issue(who, &csr, HOUR, SystemTime::now()).unwrap().chain
}

/// `openssl verify` of a chain against a bundle; returns its output.
fn openssl_verify(
    dir: &Path,
    bundle: &[CertificateDer<'_>],
    chain: &[CertificateDer<'_>],
) -> (bool, String) {
    let b: String = bundle.iter().map(cert_pem).collect();
    std::fs::write(dir.join("bundle.pem"), b).unwrap();
    std::fs::write(dir.join("leaf.pem"), cert_pem(&chain[0])).unwrap();
    let inter: String = chain[1..].iter().map(cert_pem).collect();
    std::fs::write(dir.join("inter.pem"), inter).unwrap();
    let o = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg("-untrusted")
        .arg(dir.join("inter.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .expect("openssl");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn openssl_text(dir: &Path, cert: &CertificateDer<'_>) -> String {
    std::fs::write(dir.join("c.pem"), cert_pem(cert)).unwrap();
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("c.pem"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn issued_svids_are_valid_for_us_and_for_openssl() {
    let ca = ca();
    let who = id("ns/web/sa/frontend");
    let chain = issue(&ca, &who);
    assert_eq!(
        validate(&chain, &bundles(&ca), Usage::Client, SystemTime::now()).unwrap(),
        who
    );
    assert_eq!(
        validate(&chain, &bundles(&ca), Usage::Server, SystemTime::now()).unwrap(),
        who
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = openssl_verify(dir.path(), &ca.bundle(), &chain);
    assert!(ok, "openssl verify failed: {out}");
    let text = openssl_text(dir.path(), &chain[0]);
    assert!(
        text.contains("URI:spiffe://shop.example/ns/web/sa/frontend"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("X509v3 Key Usage: critical\n                Digital Signature\n"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
}

/// Python `cryptography` (a strict DER parser, the one py-spiffe uses) loads each
/// certificate, reads every extension and checks each signature by the next certificate
/// (the last by itself); prints what it read as JSON.
const STRICT_PARSE: &str = r#"
import json, sys
from cryptography import x509
certs = [x509.load_der_x509_certificate(open(p, "rb").read()) for p in sys.argv[1:]]
out = []
for i, c in enumerate(certs):
    exts = {e.oid.dotted_string: e.critical for e in c.extensions}
    c.verify_directly_issued_by(certs[min(i + 1, len(certs) - 1)])
    bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
    ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    out.append({"extensions": exts, "ca": bc.ca, "path_length": bc.path_length,
                "digital_signature": ku.digital_signature, "key_cert_sign": ku.key_cert_sign,
                "uris": san.get_values_for_type(x509.UniformResourceIdentifier)})
print(json.dumps(out))
"#;

fn strict_parse(dir: &Path, certs: &[&CertificateDer<'_>]) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", STRICT_PARSE]);
    for (i, c) in certs.iter().enumerate() {
        let path = dir.join(format!("{i}.der"));
        std::fs::write(&path, c.as_ref()).unwrap();
        cmd.arg(path);
    }
    let o = cmd
        .output()
        .expect("python3 (with `cryptography`: scripts/test.sh installs it)");
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&o.stdout).unwrap())
}

/// rcgen before 0.14.10 wrote the default `cA FALSE` into the leaf's BasicConstraints,
/// which is not DER: strict parsers refused every SVID.
#[test]
fn issued_certificates_are_strict_der() {
    let ca = ca();
    let chain = issue(&ca, &id("ns/web/sa/frontend"));
    let root = &ca.bundle()[0];
    let dir = tempfile::tempdir().unwrap();
    let v = strict_parse(dir.path(), &[&chain[0], &chain[1], root])
        .unwrap_or_else(|e| panic!("python cryptography refused our certificates: {e}"));
    let (leaf, inter, root) = (&v[0], &v[1], &v[2]);
    assert_eq!(leaf["ca"], false, "{v}");
    assert_eq!(leaf["digital_signature"], true, "{v}");
    assert_eq!(leaf["key_cert_sign"], false, "{v}");
    assert_eq!(
        leaf["uris"],
        serde_json::json!(["spiffe://shop.example/ns/web/sa/frontend"])
    );
    assert_eq!(
        leaf["extensions"]["2.5.29.19"], true,
        "basic constraints critical: {v}"
    );
    assert_eq!(inter["ca"], true, "{v}");
    assert_eq!(inter["path_length"], 0, "{v}");
    assert_eq!(inter["key_cert_sign"], true, "{v}");
    assert_eq!(root["ca"], true, "{v}");
    assert_eq!(root["path_length"], 1, "{v}");
    assert_eq!(root["uris"], serde_json::json!(["spiffe://shop.example"]));
}

#[test]
fn the_ca_builds_the_certificate_itself_from_the_proven_identity() {
    let ca = ca();
    let who = id("ns/web/sa/frontend");
    // A CSR asking for a CA flag, extra SANs, a subject and certificate-signing usage.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::URI(who.as_str().try_into().unwrap()));
    p.distinguished_name.push(DnType::CommonName, "admin");
    // basicConstraints cA:TRUE as a raw extension (rcgen will not put a CA flag in a CSR).
    p.custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 19],
            vec![0x30, 0x03, 0x01, 0x01, 0xff],
        ));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let csr = p.serialize_request(&key).unwrap();
    let issued = ca
        .issue(&who, csr.der(), HOUR, SystemTime::now())
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let text = openssl_text(dir.path(), &issued.chain[0]);
    assert!(
        !text.contains("evil.example"),
        "extra SANs must be dropped: {text}"
    );
    assert!(
        !text.contains("admin"),
        "the CSR's subject must be dropped: {text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    validate(
        &issued.chain,
        &bundles(&ca),
        Usage::Client,
        SystemTime::now(),
    )
    .unwrap();
}

#[test]
fn refusals() {
    let ca = ca();
    let who = id("ns/web/sa/frontend");
    // A CSR for another identity than the proven one.
    let (_k, other) = new_workload_key(&id("ns/payments/sa/payments-api")).unwrap();
    assert!(matches!(
        ca.issue(&who, &other, HOUR, SystemTime::now()),
        Err(CaError::IdentityMismatch { .. })
    ));
    // Lifetimes outside 1 minute..24 hours.
    let (_k, csr) = new_workload_key(&who).unwrap();
    assert!(matches!(
        ca.issue(&who, &csr, 48 * HOUR, SystemTime::now()),
        Err(CaError::BadLifetime { .. })
    ));
    assert!(matches!(
        ca.issue(&who, &csr, Duration::from_secs(59), SystemTime::now()),
        Err(CaError::BadLifetime { .. })
    ));
    // Another trust domain.
    let foreign = SpiffeId::parse("spiffe://other.example/ns/a/sa/b").unwrap();
    let (_k, fcsr) = new_workload_key(&foreign).unwrap();
    assert!(matches!(
        ca.issue(&foreign, &fcsr, HOUR, SystemTime::now()),
        Err(CaError::WrongTrustDomain(..))
    ));
    // A CSR whose signature does not verify (proof of possession).
    let mut bad = csr.clone();
    let n = bad.len();
    bad[n - 5] ^= 0xff;
    assert!(matches!(
        ca.issue(&who, &bad, HOUR, SystemTime::now()),
        Err(CaError::BadCsr(_))
    ));
    // Never beyond the intermediate's own expiry.
    let short = Ca::generate(
        td(),
        CaLifetimes {
            root: 1000 * HOUR,
            intermediate: 2 * HOUR,
        },
        SystemTime::now(),
    )
    .unwrap();
    let issued = short
        .issue(&who, &csr, 24 * HOUR, SystemTime::now())
        .unwrap();
    assert!(issued.not_after <= short.intermediate_not_after());
}

/// A CA outside Meshward's, to forge certificates the CA would never issue.
fn rogue_chain(
    td_name: &str,
    f: impl FnOnce(&mut CertificateParams),
) -> (Vec<CertificateDer<'static>>, CertificateDer<'static>) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let root = rp.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(rp, root_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut lp = CertificateParams::new(Vec::<String>::new()).unwrap();
    lp.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td_name}/ns/x/sa/y").try_into().unwrap(),
    )];
    lp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    lp.is_ca = IsCa::ExplicitNoCa;
    f(&mut lp);
    let leaf = lp.signed_by(&key, &issuer).unwrap();
    (vec![leaf.der().clone()], root.der().clone())
}

#[test]
fn validation_rejects_what_the_spec_forbids() {
    let ca = ca();
    let b = bundles(&ca);
    let now = SystemTime::now();
    let good = issue(&ca, &id("ns/web/sa/frontend"));

    // Another CA for the same trust domain.
    let (forged, _) = rogue_chain("shop.example", |_| {});
    assert!(matches!(
        validate(&forged, &b, Usage::Client, now),
        Err(SvidError::UnknownIssuer { .. })
    ));
    // A trust domain we have no bundle for.
    let (foreign, _) = rogue_chain("other.example", |_| {});
    assert_eq!(
        validate(&foreign, &b, Usage::Client, now),
        Err(SvidError::UnknownTrustDomain("other.example".into()))
    );
    // Expired, and not yet valid (beyond the clock skew).
    assert_eq!(
        validate(&good, &b, Usage::Client, now + 2 * HOUR),
        Err(SvidError::Expired)
    );
    assert_eq!(
        validate(&good, &b, Usage::Client, now - HOUR),
        Err(SvidError::NotYetValid)
    );
    // Within the tolerated skew.
    validate(
        &good,
        &b,
        Usage::Client,
        now + HOUR + Duration::from_secs(20),
    )
    .unwrap();
    // A signing certificate presented as a leaf.
    let inter_as_leaf = vec![ca.intermediate().clone()];
    assert_eq!(
        validate(&inter_as_leaf, &b, Usage::Client, now),
        Err(SvidError::LeafIsCa)
    );
    // Two URI SANs; none; no digitalSignature.
    let mut own = TrustBundles::new();
    let (two, root) = rogue_chain("shop.example", |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://shop.example/ns/z/sa/z".try_into().unwrap(),
        ))
    });
    own.set(td(), vec![root]);
    assert_eq!(
        validate(&two, &own, Usage::Client, now),
        Err(SvidError::UriSanCount(2))
    );
    let (none, _) = rogue_chain("shop.example", |p| {
        p.subject_alt_names = vec![SanType::DnsName("a.example".try_into().unwrap())]
    });
    assert_eq!(
        validate(&none, &own, Usage::Client, now),
        Err(SvidError::UriSanCount(0))
    );
    let (noku, _) = rogue_chain("shop.example", |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
    });
    assert_eq!(
        validate(&noku, &own, Usage::Client, now),
        Err(SvidError::NoDigitalSignature)
    );
    let (badid, _) = rogue_chain("shop.example", |p| {
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://shop.example/ns/../x".try_into().unwrap(),
        )]
    });
    assert!(matches!(
        validate(&badid, &own, Usage::Client, now),
        Err(SvidError::BadSpiffeId(_))
    ));
    assert_eq!(
        validate(&[], &own, Usage::Client, now),
        Err(SvidError::NoCertificate)
    );
}

/// Each X.509-SVID rule (go-spiffe's `x509svid.Verify` and the specification's signing
/// certificate rules) broken by one forged chain, refused with its own readable reason.
#[test]
fn every_x509_svid_rule_has_its_refusal() {
    use support::forge;
    let now = SystemTime::now();
    let leaf_id = "spiffe://shop.example/ns/web/sa/frontend";
    let keep = |_: &mut CertificateParams| {};
    let ku = |k: Vec<KeyUsagePurpose>| move |p: &mut CertificateParams| p.key_usages = k;
    let uri = |u: &'static str| {
        move |p: &mut CertificateParams| {
            p.subject_alt_names = vec![SanType::URI(u.try_into().unwrap())]
        }
    };
    type Case = (
        &'static str,
        support::Forged,
        fn(&SvidError) -> bool,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "valid",
            forge("shop.example", leaf_id, keep, keep, keep),
            |_| false,
            "",
        ),
        (
            "leaf without a path",
            forge(
                "shop.example",
                leaf_id,
                keep,
                keep,
                uri("spiffe://shop.example"),
            ),
            |e| matches!(e, SvidError::LeafWithoutPath(_)),
            "has no path",
        ),
        (
            "leaf with another scheme",
            forge(
                "shop.example",
                leaf_id,
                keep,
                keep,
                uri("https://shop.example/ns/a"),
            ),
            |e| {
                matches!(
                    e,
                    SvidError::BadSpiffeId(meshward_identity::IdError::WrongScheme)
                )
            },
            "spiffe://",
        ),
        (
            "leaf with two URI SANs",
            forge("shop.example", leaf_id, keep, keep, |p| {
                p.subject_alt_names.push(SanType::URI(
                    "spiffe://shop.example/ns/b/sa/b".try_into().unwrap(),
                ))
            }),
            |e| *e == SvidError::UriSanCount(2),
            "exactly one",
        ),
        (
            "leaf is a CA",
            forge("shop.example", leaf_id, keep, keep, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            }),
            |e| *e == SvidError::LeafIsCa,
            "is a CA certificate",
        ),
        (
            "leaf without key usage",
            forge("shop.example", leaf_id, keep, keep, ku(vec![])),
            |e| *e == SvidError::NoKeyUsage,
            "no key usage",
        ),
        (
            "leaf without digitalSignature",
            forge(
                "shop.example",
                leaf_id,
                keep,
                keep,
                ku(vec![KeyUsagePurpose::KeyEncipherment]),
            ),
            |e| *e == SvidError::NoDigitalSignature,
            "lacks `digitalSignature`",
        ),
        (
            "leaf with keyCertSign",
            forge(
                "shop.example",
                leaf_id,
                keep,
                keep,
                ku(vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ]),
            ),
            |e| *e == SvidError::LeafKeyCertSign,
            "allows `keyCertSign`",
        ),
        (
            "leaf with cRLSign",
            forge(
                "shop.example",
                leaf_id,
                keep,
                keep,
                ku(vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::CrlSign,
                ]),
            ),
            |e| *e == SvidError::LeafCrlSign,
            "allows `cRLSign`",
        ),
        (
            "intermediate is not a CA",
            forge(
                "shop.example",
                leaf_id,
                keep,
                |p| p.is_ca = IsCa::ExplicitNoCa,
                keep,
            ),
            |e| matches!(e, SvidError::SignerNotCa { which } if which.contains("forged intermediate")),
            "is not a CA",
        ),
        (
            "intermediate without keyCertSign",
            forge(
                "shop.example",
                leaf_id,
                keep,
                ku(vec![KeyUsagePurpose::CrlSign]),
                keep,
            ),
            |e| matches!(e, SvidError::SignerNoKeyCertSign { which } if which.contains("forged intermediate")),
            "does not allow `keyCertSign`",
        ),
        (
            "root without keyCertSign",
            forge(
                "shop.example",
                leaf_id,
                ku(vec![KeyUsagePurpose::CrlSign]),
                keep,
                keep,
            ),
            |e| matches!(e, SvidError::SignerNoKeyCertSign { which } if which.starts_with("root")),
            "root `CN=forged root` does not allow `keyCertSign`",
        ),
        (
            "root without key usage",
            forge("shop.example", leaf_id, ku(vec![]), keep, keep),
            |e| matches!(e, SvidError::SignerNoKeyCertSign { which } if which.starts_with("root")),
            "does not allow `keyCertSign`",
        ),
    ];
    for (name, f, want, words) in cases {
        let mut b = TrustBundles::new();
        b.set(td(), vec![f.root.clone()]);
        for usage in [Usage::Client, Usage::Server] {
            match validate(&f.chain, &b, usage, now) {
                Ok(got) if name == "valid" => assert_eq!(got.as_str(), leaf_id),
                Ok(got) => panic!("{name}: accepted as `{got}`"),
                Err(e) => {
                    assert!(want(&e), "{name}: refused for the wrong reason: {e:?}");
                    assert!(
                        e.to_string().contains(words),
                        "{name}: `{e}` lacks `{words}`"
                    );
                    assert_eq!(e.code(), "bad_svid", "{name}");
                }
            }
        }
    }
}

/// The chain must lead to the bundle of the leaf's own trust domain: a partner's CA cannot
/// vouch for our IDs, nor ours for the partner's.
#[test]
fn a_chain_must_lead_to_the_bundle_of_its_own_trust_domain() {
    use support::forge;
    let keep = |_: &mut CertificateParams| {};
    let ours = forge(
        "shop.example",
        "spiffe://shop.example/ns/a/sa/a",
        keep,
        keep,
        keep,
    );
    let partner = TrustDomain::parse("partner.example").unwrap();
    // Our CA signs a leaf claiming the partner's trust domain.
    let claim = forge(
        "shop.example",
        "spiffe://partner.example/ns/a/sa/a",
        keep,
        keep,
        keep,
    );
    let mut b = TrustBundles::new();
    b.set(td(), vec![ours.root.clone(), claim.root.clone()]);
    let partner_ca = forge(
        "partner.example",
        "spiffe://partner.example/x",
        keep,
        keep,
        keep,
    );
    b.set(partner.clone(), vec![partner_ca.root.clone()]);
    let now = SystemTime::now();
    validate(&ours.chain, &b, Usage::Client, now).unwrap();
    validate(&partner_ca.chain, &b, Usage::Client, now).unwrap();
    let e = validate(&claim.chain, &b, Usage::Client, now).unwrap_err();
    assert!(
        matches!(&e, SvidError::UnknownIssuer { td, .. } if td == "partner.example"),
        "{e:?}"
    );
    assert_eq!(e.code(), "unknown_ca");
    assert!(
        e.to_string().contains("trust bundle of `partner.example`"),
        "{e}"
    );
}

#[test]
fn intermediate_rotation_keeps_old_leaves_valid() {
    let mut ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let old = issue(&ca, &id("ns/web/sa/frontend"));
    let bundle_before = ca.bundle();
    ca.rotate_intermediate(SystemTime::now()).unwrap();
    let new = issue(&ca, &id("ns/web/sa/frontend"));
    assert_ne!(old[1], new[1], "a new intermediate signs");
    assert_eq!(
        ca.bundle(),
        bundle_before,
        "the bundle (roots) is unchanged"
    );
    for chain in [&old, &new] {
        validate(chain, &bundles(&ca), Usage::Client, SystemTime::now()).unwrap();
        let (ok, out) = openssl_verify(dir.path(), &ca.bundle(), chain);
        assert!(ok, "{out}");
    }
}

#[test]
fn root_rotation_overlaps_old_and_new_roots() {
    let mut ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let old = issue(&ca, &id("ns/web/sa/frontend"));
    ca.begin_root_rotation(SystemTime::now()).unwrap();
    assert_eq!(ca.bundle().len(), 2, "the new root joins the bundle first");
    // Until the rotation finishes, the old intermediate still signs.
    let during = issue(&ca, &id("ns/web/sa/frontend"));
    assert_eq!(during[1], old[1]);
    ca.finish_root_rotation().unwrap();
    let new = issue(&ca, &id("ns/web/sa/frontend"));
    assert_ne!(new[1], old[1]);
    assert_eq!(
        ca.bundle().len(),
        2,
        "the old root stays while its leaves may live"
    );
    for chain in [&old, &new] {
        validate(chain, &bundles(&ca), Usage::Client, SystemTime::now()).unwrap();
        let (ok, out) = openssl_verify(dir.path(), &ca.bundle(), chain);
        assert!(ok, "{out}");
    }
    // A bundle with only the new root refuses the old leaves.
    let mut only_new = TrustBundles::new();
    only_new.set(td(), vec![ca.bundle()[0].clone()]);
    assert!(validate(&new, &only_new, Usage::Client, SystemTime::now()).is_ok());
    assert!(validate(&old, &only_new, Usage::Client, SystemTime::now()).is_err());
}

#[test]
fn save_and_load_and_bring_your_own_root() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    ca.save(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for k in ["root.key", "intermediate.key"] {
            let mode = std::fs::metadata(dir.path().join(k))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{k}");
        }
    }
    let loaded = Ca::load(dir.path(), td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    assert_eq!(loaded.bundle(), ca.bundle());
    let chain = issue(&loaded, &id("ns/a/sa/b"));
    validate(&chain, &bundles(&ca), Usage::Client, SystemTime::now()).unwrap();
    // The root key may stay offline when an intermediate is supplied.
    std::fs::remove_file(dir.path().join("root.key")).unwrap();
    let offline = Ca::load(dir.path(), td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    validate(
        &issue(&offline, &id("ns/a/sa/b")),
        &bundles(&ca),
        Usage::Client,
        SystemTime::now(),
    )
    .unwrap();
    // Without the intermediate's key, it is refused with the file named.
    std::fs::remove_file(dir.path().join("intermediate.key")).unwrap();
    let e = Ca::load(dir.path(), td(), CaLifetimes::default(), SystemTime::now()).unwrap_err();
    assert!(e.to_string().contains("intermediate.key"), "{e}");
}

#[test]
fn spiffe_bundle_round_trip() {
    let mut ca = ca();
    ca.begin_root_rotation(SystemTime::now()).unwrap();
    let b = Bundle {
        trust_domain: td(),
        roots: ca.bundle(),
        sequence: 7,
        refresh_hint: Some(Duration::from_secs(300)),
    };
    let json = b.to_jwks().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_sequence"], 7);
    assert_eq!(v["spiffe_refresh_hint"], 300);
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    assert_eq!(v["keys"][0]["kty"], "EC");
    assert_eq!(v["keys"][0]["crv"], "P-256");
    let back = Bundle::from_jwks(td(), &json).unwrap();
    assert_eq!(back, b);
    // Tampered coordinates are refused; jwt-svid keys are skipped.
    let tampered = json.replacen(v["keys"][0]["x"].as_str().unwrap(), "AAAA", 1);
    assert!(Bundle::from_jwks(td(), &tampered).is_err());
    assert!(Bundle::from_jwks(td(), r#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#).is_err());
}

#[test]
fn a_root_rotation_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = ca();
    let old = issue(&ca, &id("ns/web/sa/frontend"));
    ca.begin_root_rotation(SystemTime::now()).unwrap();
    ca.save(dir.path()).unwrap();
    let mut loaded = Ca::load(dir.path(), td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    assert!(loaded.rotating_root());
    assert_eq!(loaded.bundle(), ca.bundle());
    loaded.finish_root_rotation().unwrap();
    loaded.save(dir.path()).unwrap();
    assert!(!dir.path().join("pending").exists());
    let after = Ca::load(dir.path(), td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    assert!(!after.rotating_root());
    assert_eq!(
        after.bundle().len(),
        2,
        "the retired root stays in the bundle"
    );
    let new = issue(&after, &id("ns/web/sa/frontend"));
    for chain in [&old, &new] {
        validate(chain, &bundles(&after), Usage::Client, SystemTime::now()).unwrap();
    }
}
