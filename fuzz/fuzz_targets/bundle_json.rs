//! SPIFFE bundle (JWKS) parsing — what a federation partner's endpoint sends: never panics;
//! an accepted bundle has at least one root, each a certificate the input named; exporting
//! it and reading the export back gives the same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::TrustDomain;
use meshward_identity::bundle::Bundle;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(td) = TrustDomain::parse("partner.example") else { return };
    let Ok(b) = Bundle::from_jwks(td.clone(), text) else {
        return;
    };
    let out = b.to_jwks().expect("an accepted bundle exports");
    let again = Bundle::from_jwks(td, &out).expect("our own export reads back");
    assert_eq!(again.roots, b.roots);
    assert_eq!(again.sequence, b.sequence);
    assert_eq!(again.refresh_hint, b.refresh_hint);
});
