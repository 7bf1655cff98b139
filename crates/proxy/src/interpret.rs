//! What an inbound request means, decided once for every codec: the HTTP/1.1 fast path
//! ([`crate::h1`]), the general path (hyper, HTTP/1 and HTTP/2) all call these functions, so
//! that what policy evaluates is exactly what the app receives, and a request two readers
//! could understand differently is refused (400, reason `bad_request`) instead:
//!
//! - the method is a case-sensitive token: `get` is refused (`lowercase_method`);
//! - exactly one `Host` (`ambiguous_host`), well formed (`bad_host`: empty, userinfo, a
//!   port that is not a number, a list); HTTP/1.1 needs one (`missing_host`); an
//!   absolute-form target or HTTP/2 `:authority` must agree with it (`host_mismatch`);
//! - header names with `_` are refused (`header_underscore`) or dropped, per `Mesh`;
//!   every spelling of the identity header and `x-forwarded-client-cert` are dropped;
//! - `Upgrade: h2c` and `HTTP2-Settings` are refused (`h2c_upgrade`), as is any upgrade
//!   but WebSocket (`unsupported_upgrade`); a WebSocket upgrade and `CONNECT` pass only
//!   where a rule allows them by name ([`upgrade_allowed`]).
//!
//! Paths are normalized by [`meshward_policy::path::normalize`] (which refuses `;`).
//! The common request (one `Host`, nothing odd) is read in one pass without allocating.
//!
//! Stage: step 1 of the request gate ([`crate::gate`]).
#![deny(clippy::disallowed_types)]

use meshward_policy::decision::{Decision, Reason, Verdict};
use meshward_policy::model::PolicySet;
use meshward_policy::resource::HeadersWithUnderscores;

/// The header that carries the verified peer SPIFFE ID to the app.
pub const IDENTITY_HEADER: &str = "x-meshward-peer-identity";

/// A request refused before policy: a stable code and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub detail: &'static str,
}

const fn refusal(code: &'static str, detail: &'static str) -> Refusal {
    Refusal { code, detail }
}

/// The HTTP version a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
    Http2,
}

/// What one pass over a request head found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// The request's one host: `Host`, or the absolute-form / `:authority` authority.
    pub host: Option<&'a str>,
    /// Whether a `Host` header is there (else the proxy adds one for the app).
    pub host_header: bool,
    /// `Connection: close`.
    pub close: bool,
    /// An `Expect` header.
    pub expect: bool,
    /// A WebSocket upgrade (`Upgrade: websocket`).
    pub upgrade: bool,
    /// The method is `CONNECT`.
    pub connect: bool,
    /// Some header is not forwarded ([`forwarded`] says which): the common request has
    /// none, so the fast path copies the head without looking again.
    pub strips: bool,
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// `name` is the identity header in some spelling: any case, `_` for `-`.
fn is_identity_spelling(name: &str) -> bool {
    name.len() == IDENTITY_HEADER.len()
        && name
            .bytes()
            .zip(IDENTITY_HEADER.bytes())
            .all(|(a, b)| a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-'))
}

/// Whether a request header reaches the app (and policy). Not: any spelling of the
/// identity header (the proxy sets the verified one), `x-forwarded-client-cert` (a caller
/// could claim a certificate), and, under `DROP`, names with `_`.
pub fn forwarded(name: &str, underscores: HeadersWithUnderscores) -> bool {
    !(is_identity_spelling(name)
        || name.eq_ignore_ascii_case("x-forwarded-client-cert")
        || (underscores == HeadersWithUnderscores::Drop && name.contains('_')))
}

/// The method: a token, case-sensitive, so never with lower-case letters.
pub fn method(m: &str) -> Result<(), Refusal> {
    if m.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(refusal(
            "lowercase_method",
            "methods are case-sensitive; `get` is not `GET`",
        ));
    }
    Ok(())
}

/// A well-formed `host[:port]`: a name of letters, digits, `-`, `.`, `_`, or a
/// bracketed IPv6 address; a port of digits up to 65535. No userinfo, list or spaces.
pub fn valid_host(h: &str) -> bool {
    let (name, port) = if let Some(rest) = h.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let v6 = &rest[..end];
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        ("v6", &rest[end + 1..])
    } else {
        match h.find(':') {
            Some(i) => (&h[..i], &h[i..]),
            None => (h, ""),
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
        });
    port_ok
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Splits an HTTP/1 request target into the authority of an absolute-form target
/// (`http://host/path`) and the origin-form rest; other targets pass whole.
pub fn split_target(target: &str) -> (Option<&str>, &str) {
    let rest = if target.len() > 7 && target[..7].eq_ignore_ascii_case("http://") {
        &target[7..]
    } else if target.len() > 8 && target[..8].eq_ignore_ascii_case("https://") {
        &target[8..]
    } else {
        return (None, target);
    };
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (Some(&rest[..i]), &rest[i..]),
        Some(i) => (Some(&rest[..i]), "/"),
        None => (Some(rest), "/"),
    }
}

/// Reads a request head once: the checks above, and the facts the codecs need.
/// `authority` is the absolute-form target's or HTTP/2's `:authority` (for `CONNECT` in
/// HTTP/1, the authority-form target).
pub fn head<'a>(
    version: Version,
    method_name: &str,
    authority: Option<&'a str>,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    underscores: HeadersWithUnderscores,
) -> Result<Facts<'a>, Refusal> {
    method(method_name)?;
    let mut f = Facts {
        connect: method_name == "CONNECT",
        ..Facts::default()
    };
    let mut upgrade: Option<&[u8]> = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("host") {
            if f.host_header {
                return Err(refusal(
                    "ambiguous_host",
                    "more than one `Host` header: apps would disagree on which one counts",
                ));
            }
            f.host_header = true;
            f.host = Some(
                std::str::from_utf8(value)
                    .ok()
                    .filter(|h| valid_host(h))
                    .ok_or(refusal(
                        "bad_host",
                        "the `Host` header is not a valid `host[:port]`",
                    ))?,
            );
        } else if name.eq_ignore_ascii_case("connection") {
            f.close |= has_token(value, "close");
        } else if name.eq_ignore_ascii_case("expect") {
            f.expect = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            if upgrade.is_some() {
                return Err(refusal(
                    "unsupported_upgrade",
                    "more than one `Upgrade` header",
                ));
            }
            upgrade = Some(value);
        } else if name.eq_ignore_ascii_case("http2-settings") {
            return Err(H2C);
        } else if !forwarded(name, underscores) {
            f.strips = true;
        } else if name.contains('_') {
            return Err(refusal(
                "header_underscore",
                "a header name with `_`: many servers read it as `-`",
            ));
        }
    }
    if let Some(u) = upgrade {
        let mut any = false;
        for t in u.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            let proto = t.split(|b| *b == b'/').next().unwrap_or(t);
            if proto.eq_ignore_ascii_case(b"h2c") {
                return Err(H2C);
            }
            if !proto.eq_ignore_ascii_case(b"websocket") {
                return Err(refusal(
                    "unsupported_upgrade",
                    "only WebSocket upgrades are relayed",
                ));
            }
            any = true;
        }
        f.upgrade = any;
    }
    if let Some(a) = authority {
        if !valid_host(a) {
            return Err(refusal(
                "bad_host",
                "the request's authority is not a valid `host[:port]`",
            ));
        }
        match f.host {
            Some(h) if !h.eq_ignore_ascii_case(a) => {
                return Err(refusal(
                    "host_mismatch",
                    "the target's authority and the `Host` header differ",
                ));
            }
            _ => f.host = Some(a),
        }
    }
    if f.host.is_none() && version == Version::Http11 {
        return Err(refusal(
            "missing_host",
            "an HTTP/1.1 request needs a `Host` header",
        ));
    }
    Ok(f)
}

const H2C: Refusal = Refusal {
    code: "h2c_upgrade",
    detail: "upgrades to cleartext HTTP/2 are refused",
};

/// A refused chunked request body.
pub const BAD_CHUNK: Refusal = Refusal {
    code: "bad_chunk",
    detail: "a malformed chunk in the request body",
};

/// An allowed WebSocket upgrade or `CONNECT` passes only when a rule (or allow override)
/// admitted it by name — never by the mesh default; `CONNECT` only when that rule lists the
/// `CONNECT` method (an empty `methods` list does not count). Otherwise the decision
/// becomes a deny `upgrade_refused`.
pub fn upgrade_allowed(set: &PolicySet, facts: &Facts<'_>, d: Decision) -> Decision {
    if d.verdict != Verdict::Allow || !(facts.upgrade || facts.connect) {
        return d;
    }
    let by_rule = matches!(d.reason, Reason::AllowedByRule | Reason::OverrideAllow);
    let named = !facts.connect || names_connect(set, &d);
    if by_rule && named {
        return d;
    }
    Decision {
        verdict: Verdict::Deny,
        reason: Reason::UpgradeRefused,
        ..d
    }
}

/// Whether the deciding rule or override lists `CONNECT` in its methods.
fn names_connect(set: &PolicySet, d: &Decision) -> bool {
    let Some(id) = d.policy.as_deref() else {
        return false;
    };
    let lists = |ops: &[meshward_policy::model::Operation]| {
        ops.iter().any(|o| o.methods.iter().any(|m| m == "CONNECT"))
    };
    if d.reason == Reason::OverrideAllow {
        return set.overrides.iter().any(|o| &*o.id == id && lists(&o.to));
    }
    set.policies.iter().filter(|p| &*p.id == id).any(|p| {
        p.rules
            .iter()
            .any(|r| Some(&*r.name) == d.rule.as_deref() && lists(&r.to))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSE: HeadersWithUnderscores = HeadersWithUnderscores::Refuse;

    fn run(
        version: Version,
        m: &str,
        authority: Option<&str>,
        h: &[(&str, &str)],
    ) -> Result<(), &'static str> {
        head(
            version,
            m,
            authority,
            h.iter().map(|(k, v)| (*k, v.as_bytes())),
            REFUSE,
        )
        .map(|_| ())
        .map_err(|r| r.code)
    }

    #[test]
    fn hosts() {
        for ok in ["a", "a.b:80", "[::1]:8080", "127.0.0.1", "x_y.svc"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "", "x@a", "a:b", "a,b", "a b", "a:", "a:99999", "[zz]", "a:1:2",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
        let v = Version::Http11;
        assert_eq!(
            run(v, "GET", None, &[("host", "a"), ("Host", "b")]),
            Err("ambiguous_host")
        );
        assert_eq!(run(v, "GET", None, &[]), Err("missing_host"));
        assert_eq!(run(Version::Http10, "GET", None, &[]), Ok(()));
        assert_eq!(
            run(v, "GET", Some("a"), &[("host", "b")]),
            Err("host_mismatch")
        );
        assert_eq!(run(v, "GET", Some("A"), &[("host", "a")]), Ok(()));
        assert_eq!(run(Version::Http2, "GET", Some("a"), &[]), Ok(()));
    }

    #[test]
    fn targets() {
        assert_eq!(split_target("/a?b"), (None, "/a?b"));
        assert_eq!(split_target("http://h:1/a?b"), (Some("h:1"), "/a?b"));
        assert_eq!(split_target("HTTP://h"), (Some("h"), "/"));
        assert_eq!(split_target("http://h?q"), (Some("h"), "/"));
    }

    #[test]
    fn headers_methods_upgrades() {
        let v = Version::Http11;
        assert_eq!(
            run(v, "get", None, &[("host", "a")]),
            Err("lowercase_method")
        );
        assert_eq!(
            run(v, "GET", None, &[("host", "a"), ("x_role", "admin")]),
            Err("header_underscore")
        );
        assert_eq!(
            run(v, "GET", None, &[("host", "a"), ("upgrade", "h2c")]),
            Err("h2c_upgrade")
        );
        assert_eq!(
            run(v, "GET", None, &[("host", "a"), ("HTTP2-Settings", "x")]),
            Err("h2c_upgrade")
        );
        assert_eq!(
            run(v, "GET", None, &[("host", "a"), ("upgrade", "foo")]),
            Err("unsupported_upgrade")
        );
        let f = head(
            v,
            "GET",
            None,
            [("host", &b"a"[..]), ("upgrade", b"WebSocket")].into_iter(),
            REFUSE,
        )
        .unwrap();
        assert!(f.upgrade && !f.strips);
        for spelling in [
            "X-Meshward-Peer-Identity",
            "x_meshward_peer_identity",
            "X-MESHWARD_PEER-identity",
            "x-forwarded-client-cert",
        ] {
            assert!(!forwarded(spelling, REFUSE), "{spelling}");
            let f = head(
                v,
                "GET",
                None,
                [("host", &b"a"[..]), (spelling, b"x")].into_iter(),
                REFUSE,
            )
            .unwrap();
            assert!(f.strips, "{spelling}");
        }
        assert!(forwarded("x_role", REFUSE) && !forwarded("x_role", HeadersWithUnderscores::Drop));
        let f = head(
            v,
            "GET",
            None,
            [("host", &b"a"[..]), ("x_role", b"x")].into_iter(),
            HeadersWithUnderscores::Drop,
        )
        .unwrap();
        assert!(f.strips);
    }
}
