//! Entry points for the fuzz targets (`fuzz/`): the request-path parsers of untrusted
//! bytes, driven without sockets. Not an API; hidden from the docs.

use meshward_policy::path::normalize;
use meshward_policy::resource::HeadersWithUnderscores;

use crate::hygiene::{Hygiene, Refusal, check_head};
use crate::interpret::{self, Version, split_target};

/// Feeds `pieces` in order to the HTTP/1 hygiene scanner, as reads of one connection:
/// the bytes it lets through to the parser, and its refusal (it stops at the first).
pub fn hygiene_pieces(pieces: &[&[u8]]) -> (Vec<u8>, Option<Refusal>) {
    let mut h = Hygiene::new(());
    let mut passed = vec![];
    for p in pieces {
        match h.feed(p) {
            Ok(()) => passed.extend_from_slice(p),
            Err((n, r)) => {
                passed.extend_from_slice(p.get(..n).unwrap_or(p));
                return (passed, Some(r));
            }
        }
    }
    (passed, None)
}

/// What the fast path makes of an accepted request head.
#[derive(Debug)]
pub struct Interpreted {
    pub method: String,
    /// The normalized target (path and query) the app receives.
    pub target: String,
    /// The request's one host.
    pub host: Option<String>,
    /// Whether the head had a `Host` header.
    pub host_header: bool,
    /// The authority of an absolute-form target.
    pub authority: Option<String>,
}

/// The HTTP/1.1 fast path's reading of a head (`crate::h1`, then steps 1 and 3 of the
/// request gate), in its order: hygiene, httparse, the absolute-form split, interpret,
/// normalize. `None`: handed over to the general path, or refused.
pub fn fast_path_head(head: &[u8], underscores: HeadersWithUnderscores) -> Option<Interpreted> {
    let end = crate::hygiene::head_end(head)?;
    let head = &head[..end];
    if end > crate::hygiene::MAX_HEAD
        || !matches!(check_head(head), Ok(crate::hygiene::State0::Length(0)))
    {
        return None;
    }
    let mut hs = [httparse::EMPTY_HEADER; crate::h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    let (Ok(httparse::Status::Complete(_)), Some(method), Some(target), Some(1)) =
        (req.parse(head), req.method, req.path, req.version)
    else {
        return None;
    };
    if method == "CONNECT" {
        return None;
    }
    let (authority, origin) = split_target(target);
    let facts = interpret::head(
        Version::Http11,
        method,
        authority,
        req.headers.iter().map(|h| (h.name, h.value)),
        underscores,
    )
    .ok()?;
    if facts.expect || facts.upgrade {
        return None;
    }
    let norm = normalize(origin).ok()?;
    Some(Interpreted {
        method: method.to_owned(),
        target: norm.target(),
        host: facts.host.map(str::to_owned),
        host_header: facts.host_header,
        authority: authority.map(str::to_owned),
    })
}
