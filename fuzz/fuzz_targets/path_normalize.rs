//! Path normalization: never panics; its output is a canonical path (starts with `/`, no
//! empty, `.` or `..` segments, no encoded unreserved characters, no control characters)
//! and normalizing it again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_policy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(n) = normalize(s) else { return };
    let p = &n.path;
    assert!(p.starts_with('/'), "{p:?}");
    assert!(!p.contains("//"), "{p:?}");
    for seg in p[1..].split('/') {
        assert!(seg != "." && seg != "..", "dot segment in {p:?}");
    }
    assert!(!p.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'\\' || b == b'#' || b == b'?'), "{p:?}");
    let lower = p.to_ascii_lowercase();
    for enc in ["%2f", "%5c", "%2e", "%41", "%7e", "%5f", "%2d"] {
        assert!(!lower.contains(enc), "undecoded or forbidden escape {enc} in {p:?}");
    }
    let again = normalize(p).expect("a normalized path is accepted");
    assert_eq!(&again.path, p, "not idempotent");
});
