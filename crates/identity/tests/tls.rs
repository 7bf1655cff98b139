#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

//! Real TLS 1.3 handshakes over loopback with the SVID verifiers on both ends, and the
//! refusals a mesh must make: no client certificate (also from `openssl s_client`), a
//! certificate from another CA, a server that is not the expected identity, certificates
//! that break the X.509-SVID rules (the same refusals as `svid::validate`, readable back
//! from the handshake's error).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::ca::{Ca, CaLifetimes, new_workload_key};
use meshward_identity::svid::SvidError;
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::{
    Accept, SharedBundles, SvidClientVerifier, SvidServerVerifier, io_refusal_code, peer_identity,
    refusal, refusal_code,
};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::danger::ClientCertVerifier as _;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://shop.example/{s}")).unwrap()
}

struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn svid(ca: &Ca, who: &SpiffeId) -> Svid {
    let (key, csr) = new_workload_key(who).unwrap();
    let issued = ca
        .issue(who, &csr, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    Svid {
        chain: issued.chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn bundles(ca: &Ca) -> SharedBundles {
    let mut b = TrustBundles::new();
    b.set(TrustDomain::parse("shop.example").unwrap(), ca.bundle());
    SharedBundles::new(b)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves one connection: replies with the client's SPIFFE ID; returns the handshake result.
fn serve(ca: &Ca, me: &SpiffeId) -> (u16, std::thread::JoinHandle<Result<SpiffeId, String>>) {
    let s = svid(ca, me);
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(SvidClientVerifier::new(bundles(ca), Accept::AnyTrusted))
        .with_single_cert(s.chain, s.key)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let conn = ServerConnection::new(Arc::new(cfg)).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
        let peer = peer_identity(&tls.conn).ok_or("no peer identity")?;
        tls.write_all(peer.as_str().as_bytes())
            .map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        let _ = tls.flush();
        Ok(peer)
    });
    (port, h)
}

fn client(port: u16, cfg: ClientConfig) -> Result<(String, Option<SpiffeId>), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let conn = ClientConnection::new(Arc::new(cfg), ServerName::try_from("mesh.invalid").unwrap())
        .unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(b"hello").map_err(|e| e.to_string())?;
    let mut out = String::new();
    match tls.read_to_string(&mut out) {
        Ok(_) => {}
        Err(e) if out.is_empty() => return Err(e.to_string()),
        Err(_) => {}
    }
    Ok((out, peer_identity(&tls.conn)))
}

fn client_config(ca_for_trust: &Ca, own: Option<Svid>, accept: Accept) -> ClientConfig {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SvidServerVerifier::new(bundles(ca_for_trust), accept));
    match own {
        Some(s) => b.with_client_auth_cert(s.chain, s.key).unwrap(),
        None => b.with_no_client_auth(),
    }
}

fn ca() -> Ca {
    Ca::generate(
        TrustDomain::parse("shop.example").unwrap(),
        CaLifetimes::default(),
        SystemTime::now(),
    )
    .unwrap()
}

#[test]
fn mutual_tls_hands_both_identities_over() {
    let ca = ca();
    let (port, server) = serve(&ca, &id("ns/orders/sa/orders-api"));
    let cfg = client_config(
        &ca,
        Some(svid(&ca, &id("ns/web/sa/frontend"))),
        Accept::Only(vec![id("ns/orders/sa/orders-api")]),
    );
    let (reply, server_id) = client(port, cfg).unwrap();
    assert_eq!(reply, "spiffe://shop.example/ns/web/sa/frontend");
    assert_eq!(server_id, Some(id("ns/orders/sa/orders-api")));
    assert_eq!(server.join().unwrap().unwrap(), id("ns/web/sa/frontend"));
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let ca = ca();
    let (port, server) = serve(&ca, &id("ns/orders/sa/orders-api"));
    let r = client(port, client_config(&ca, None, Accept::AnyTrusted));
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|(s, _)| s.is_empty()),
        "{r:?}"
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(e.contains("certificate"), "{e}");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let ca = ca();
    let rogue = self::ca();
    let (port, server) = serve(&ca, &id("ns/orders/sa/orders-api"));
    let _ = client(
        port,
        client_config(
            &ca,
            Some(svid(&rogue, &id("ns/web/sa/frontend"))),
            Accept::AnyTrusted,
        ),
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[test]
fn a_server_that_is_not_the_expected_identity_is_refused() {
    let ca = ca();
    let (port, _server) = serve(&ca, &id("ns/evil/sa/impostor"));
    let e = client(
        port,
        client_config(
            &ca,
            Some(svid(&ca, &id("ns/web/sa/frontend"))),
            Accept::Only(vec![id("ns/orders/sa/orders-api")]),
        ),
    )
    .unwrap_err();
    assert!(
        e.contains("spiffe://shop.example/ns/evil/sa/impostor"),
        "{e}"
    );
}

#[test]
fn openssl_s_client_without_a_certificate_gets_no_session() {
    let ca = ca();
    let (port, server) = serve(&ca, &id("ns/orders/sa/orders-api"));
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"hello");
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("spiffe://shop.example/ns/"),
        "the server must not answer: {text}"
    );
    let e = server.join().unwrap().unwrap_err();
    assert!(e.contains("certificate"), "{e}");
}

/// Both rustls verifiers refuse what `svid::validate` refuses, and the error says which rule
/// (`refusal`) and its stable kind (`refusal_code`).
#[test]
fn the_verifiers_apply_every_svid_rule() {
    use rcgen::{CertificateParams, KeyUsagePurpose, SanType};
    use support::forge;
    let leaf_id = "spiffe://shop.example/ns/web/sa/frontend";
    let keep = |_: &mut CertificateParams| {};
    let no_path = forge("shop.example", leaf_id, keep, keep, |p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://shop.example".try_into().unwrap())]
    });
    let signing_leaf = forge("shop.example", leaf_id, keep, keep, |p| {
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ]
    });
    let weak_inter = forge(
        "shop.example",
        leaf_id,
        keep,
        |p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature],
        keep,
    );
    let good = forge("shop.example", leaf_id, keep, keep, |p| {
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1)
    });
    let now = UnixTime::now();
    for (f, want) in [
        (&no_path, "has no path"),
        (&signing_leaf, "allows `keyCertSign`"),
        (&weak_inter, "does not allow `keyCertSign`"),
    ] {
        let mut b = TrustBundles::new();
        b.set(
            TrustDomain::parse("shop.example").unwrap(),
            vec![f.root.clone()],
        );
        let b = SharedBundles::new(b);
        let server = SvidServerVerifier::new(b.clone(), Accept::AnyTrusted);
        let client = SvidClientVerifier::new(b, Accept::AnyTrusted);
        let name = ServerName::try_from("mesh.invalid").unwrap();
        let errs = [
            server
                .verify_server_cert(&f.chain[0], &f.chain[1..], &name, &[], now)
                .unwrap_err(),
            client
                .verify_client_cert(&f.chain[0], &f.chain[1..], now)
                .unwrap_err(),
        ];
        for e in errs {
            let svid = refusal(&e).unwrap_or_else(|| panic!("no SVID error in {e:?}"));
            assert!(svid.to_string().contains(want), "{svid}");
            assert_eq!(refusal_code(&e), Some("bad_svid"), "{e}");
        }
    }
    // Another CA's chain, and the kinds rustls carries itself.
    let mut b = TrustBundles::new();
    b.set(
        TrustDomain::parse("shop.example").unwrap(),
        vec![good.root.clone()],
    );
    let client = SvidClientVerifier::new(SharedBundles::new(b), Accept::AnyTrusted);
    let e = client
        .verify_client_cert(&no_path.chain[0], &no_path.chain[1..], now)
        .unwrap_err();
    assert_eq!(refusal_code(&e), Some("bad_svid"), "{e}");
    let e = client
        .verify_client_cert(&weak_inter.chain[0], &[], now)
        .unwrap_err();
    assert_eq!(refusal_code(&e), Some("unknown_ca"), "{e}");
    let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 400 * 86400));
    let e = client
        .verify_client_cert(&good.chain[0], &good.chain[1..], later)
        .unwrap_err();
    assert_eq!(refusal_code(&e), Some("expired"), "{e}");
    client
        .verify_client_cert(&good.chain[0], &good.chain[1..], now)
        .unwrap();
}

/// A real handshake with a server whose leaf names only the trust domain: the client
/// refuses it, and the I/O error the handshake returns carries the rule it broke.
#[test]
fn a_server_leaf_without_a_path_is_refused_in_the_handshake() {
    use support::forge;
    let keep = |_: &mut rcgen::CertificateParams| {};
    let f = forge("shop.example", "spiffe://shop.example", keep, keep, keep);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(f.key.serialize_der()));
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(f.chain.clone(), key)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut conn = ServerConnection::new(Arc::new(cfg)).unwrap();
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                break;
            }
        }
    });
    let mut b = TrustBundles::new();
    b.set(
        TrustDomain::parse("shop.example").unwrap(),
        vec![f.root.clone()],
    );
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SvidServerVerifier::new(
            SharedBundles::new(b),
            Accept::AnyTrusted,
        ))
        .with_no_client_auth();
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut conn =
        ClientConnection::new(Arc::new(cfg), ServerName::try_from("mesh.invalid").unwrap())
            .unwrap();
    let e = loop {
        match conn.complete_io(&mut tcp) {
            Ok(_) if conn.is_handshaking() => continue,
            Ok(_) => panic!("the handshake completed with a leaf without a path"),
            Err(e) => break e,
        }
    };
    assert_eq!(io_refusal_code(&e), Some("bad_svid"), "{e}");
    let inner = e
        .get_ref()
        .unwrap()
        .downcast_ref::<rustls::Error>()
        .unwrap();
    assert!(
        matches!(refusal(inner), Some(SvidError::LeafWithoutPath(id)) if id.as_str() == "spiffe://shop.example"),
        "{e}"
    );
    server.join().unwrap();
}
