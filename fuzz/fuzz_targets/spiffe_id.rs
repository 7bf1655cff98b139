//! SPIFFE ID parsing: never panics; an accepted ID obeys the spec (scheme, lower-case trust
//! domain of allowed characters, no empty, `.` or `..` segments, no query or fragment, at
//! most 2048 bytes), prints as exactly its input, and parses again to the same ID; its
//! trust domain parses on its own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_identity::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(id) = SpiffeId::parse(s) else {
        return;
    };
    assert!(s.len() <= 2048);
    assert_eq!(id.as_str(), s, "an accepted ID is kept byte for byte");
    let rest = s.strip_prefix("spiffe://").expect("scheme");
    let (td, path) = rest.split_once('/').map_or((rest, ""), |(t, p)| (t, p));
    assert!(!td.is_empty());
    assert!(td.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')), "{s:?}");
    if !path.is_empty() {
        for seg in path.split('/') {
            assert!(!seg.is_empty() && seg != "." && seg != "..", "{s:?}");
            assert!(
                seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
                "{s:?}"
            );
        }
    }
    assert_eq!(SpiffeId::parse(&id.to_string()).expect("round trip"), id);
    TrustDomain::parse(td).expect("the trust domain of an accepted ID");
});
