//! The HTTP/1.1 fast path's reading of a request head (hygiene, httparse, the
//! absolute-form split, `interpret::head`, path normalization) over arbitrary bytes: never
//! panics; an accepted head obeys the documented rules (docs/proxy.md, "One reading of a
//! request"): an upper-case method token; exactly one well-formed host, which an
//! absolute-form target agrees with; a `Host` header unless the target carried the
//! authority; no header with `_` under the default `REFUSE`, no `HTTP2-Settings`; a
//! normalized origin-form target (no empty or dot segments, no `;`, no control
//! characters) that normalizes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_policy::path::normalize;
use meshward_policy::resource::HeadersWithUnderscores;
use meshward_proxy::fuzzing::fast_path_head;
use meshward_proxy::interpret::valid_host;

fuzz_target!(|data: &[u8]| {
    let Some(r) = fast_path_head(data, HeadersWithUnderscores::Refuse) else {
        return;
    };
    assert!(
        !r.method.is_empty() && !r.method.bytes().any(|b| b.is_ascii_lowercase()),
        "{r:?}"
    );
    assert_ne!(r.method, "CONNECT");
    let host = r.host.as_deref().expect("an HTTP/1.1 request has a host");
    assert!(valid_host(host), "{r:?}");
    if let Some(a) = &r.authority {
        assert!(a.eq_ignore_ascii_case(host), "{r:?}");
    } else {
        assert!(r.host_header, "{r:?}");
    }
    let (path, _query) = r.target.split_once('?').unwrap_or((&r.target, ""));
    assert!(path.starts_with('/'), "{r:?}");
    assert!(!path.contains(';') && !path.contains("//"), "{r:?}");
    assert!(
        path.split('/').skip(1).all(|s| s != "." && s != ".."),
        "{r:?}"
    );
    assert!(
        !r.target.bytes().any(|b| b < 0x20 || b == 0x7f || b == b' '),
        "{r:?}"
    );
    let again = normalize(&r.target).expect("a normalized target normalizes");
    assert_eq!(again.target(), r.target, "idempotent");
    // What the head held, read again: no header the gate must refuse slipped through.
    let text = String::from_utf8_lossy(data);
    let head = &text[..text.find("\r\n\r\n").unwrap_or(text.len())];
    for line in head.split("\r\n").skip(1) {
        let name = line.split(':').next().unwrap_or("");
        assert!(!name.contains('_') || is_dropped(name), "{line:?}");
        assert!(!name.eq_ignore_ascii_case("http2-settings"), "{line:?}");
    }
});

/// The identity header in any spelling is dropped (not refused) even with `_`.
fn is_dropped(name: &str) -> bool {
    !meshward_proxy::interpret::forwarded(name, HeadersWithUnderscores::Refuse)
}
