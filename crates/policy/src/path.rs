//! Request path normalization (ARCHITECTURE §4). The proxy uses this function and nothing
//! else, so that the path the policy matched is exactly the path the application receives.

use std::fmt;

/// Why a request path is refused (answered with 400 by the proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRejection {
    /// The request target is not in origin form (`/...`).
    NotOriginForm,
    /// The target carries a `#fragment`.
    Fragment,
    /// A raw control character, space or non-ASCII byte.
    ControlCharacter,
    /// `%2F` or `%5C`: an encoded `/` or `\` would let a path mean two things.
    EncodedSlash,
    /// A raw `\`.
    Backslash,
    /// An encoded control character (`%00`–`%1F`, `%7F`).
    EncodedControl,
    /// `%` not followed by two hex digits.
    BadPercentEncoding,
    /// A `;` or `%3B`: path parameters, which Java servlet containers and others strip
    /// before routing (`/admin;x` reaches their `/admin`), so the app would not read the
    /// path that policy evaluated.
    PathParameter,
}

impl PathRejection {
    /// Stable reason code, used in 400 responses and the decision log.
    pub fn code(self) -> &'static str {
        match self {
            PathRejection::NotOriginForm => "path_not_origin_form",
            PathRejection::Fragment => "path_fragment",
            PathRejection::ControlCharacter => "path_control_character",
            PathRejection::EncodedSlash => "path_encoded_slash",
            PathRejection::Backslash => "path_backslash",
            PathRejection::EncodedControl => "path_encoded_control",
            PathRejection::BadPercentEncoding => "path_bad_percent_encoding",
            PathRejection::PathParameter => "path_parameter",
        }
    }
}

impl fmt::Display for PathRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathRejection::NotOriginForm => "the request path must start with `/`",
            PathRejection::Fragment => "the request path carries a fragment (`#`)",
            PathRejection::ControlCharacter => {
                "the request path has a control character, space or non-ASCII byte"
            }
            PathRejection::EncodedSlash => "the request path has an encoded `/` or `\\`",
            PathRejection::Backslash => "the request path has a `\\`",
            PathRejection::EncodedControl => "the request path has an encoded control character",
            PathRejection::BadPercentEncoding => "the request path has a malformed `%` escape",
            PathRejection::PathParameter => {
                "the request path has a `;` (path parameters are read differently by apps)"
            }
        })
    }
}

/// A normalized request target: the path that policy matches and the app receives, and the
/// query string untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    pub path: String,
    pub query: Option<String>,
}

impl NormalizedPath {
    /// Path and query as one request target.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes a request target: rejects fragments, control characters, backslashes,
/// `;` path parameters and encoded `/`, `\\` or `;`; decodes percent-encoded unreserved
/// characters and `%2A` (a `*`, matched literally like any other character), upper-casing
/// the hex of the escapes it keeps; merges repeated slashes; removes dot segments. The query
/// string is split off and returned unchanged (it is not matched by policy).
pub fn normalize(target: &str) -> Result<NormalizedPath, PathRejection> {
    let bytes = target.as_bytes();
    if bytes
        .iter()
        .any(|&b| b < 0x20 || b == 0x7f || b == b' ' || b >= 0x80)
    {
        return Err(PathRejection::ControlCharacter);
    }
    if bytes.contains(&b'#') {
        return Err(PathRejection::Fragment);
    }
    let (raw_path, query) = match target.find('?') {
        Some(i) => (&target[..i], Some(target[i + 1..].to_owned())),
        None => (target, None),
    };
    if !raw_path.starts_with('/') {
        return Err(PathRejection::NotOriginForm);
    }
    // Pass 1: percent-decoding of unreserved characters, rejections.
    let raw = raw_path.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'\\' => return Err(PathRejection::Backslash),
            b';' => return Err(PathRejection::PathParameter),
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRejection::BadPercentEncoding);
                };
                let v = h * 16 + l;
                if v == b'/' || v == b'\\' {
                    return Err(PathRejection::EncodedSlash);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(PathRejection::EncodedControl);
                }
                if v == b';' {
                    return Err(PathRejection::PathParameter);
                }
                // `*` too: it has no special meaning in a path, and an app that decodes
                // `%2A` must see the same path as one sent `*`.
                if is_unreserved(v) || v == b'*' {
                    decoded.push(char::from(v));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(raw[i + 1].to_ascii_uppercase()));
                    decoded.push(char::from(raw[i + 2].to_ascii_uppercase()));
                }
                i += 3;
            }
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    // Pass 2: merge slashes and remove dot segments (RFC 3986 §5.2.4 over segments).
    let trailing_slash = decoded.len() > 1 && decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    let mut last_was_dot = false;
    for seg in decoded.split('/') {
        last_was_dot = false;
        match seg {
            "" => {}
            "." => last_was_dot = true,
            ".." => {
                out.pop();
                last_was_dot = true;
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || ((trailing_slash || last_was_dot) && !path.ends_with('/')) {
        path.push('/');
    }
    Ok(NormalizedPath { path, query })
}

/// The path lower-cased for a service that routes case-insensitively: ASCII letters
/// outside percent escapes (whose hex stays upper-case, as [`normalize`] writes it). The
/// proxy forwards this path too, so the policy and the app read the same one.
pub fn lower_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut escape = 0;
    for c in path.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c);
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<String, PathRejection> {
        normalize(s).map(|p| p.path)
    }

    #[test]
    fn normalizes() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/%2E%2E/admin", "/admin"),
            ("/%7euser", "/~user"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a/*", "/a/*"),
            ("/a/%2a/b", "/a/*/b"),
            ("/a%2Ab", "/a*b"),
        ];
        for (input, want) in cases {
            assert_eq!(n(input).as_deref(), Ok(want), "{input}");
        }
        let q = normalize("/a//b?x=1&y=/../").unwrap();
        assert_eq!(q.path, "/a/b");
        assert_eq!(q.query.as_deref(), Some("x=1&y=/../"));
        assert_eq!(q.target(), "/a/b?x=1&y=/../");
    }

    #[test]
    fn rejects() {
        let cases = [
            ("/a%2Fb", PathRejection::EncodedSlash),
            ("/a%2fb", PathRejection::EncodedSlash),
            ("/a%5cb", PathRejection::EncodedSlash),
            ("/a\\b", PathRejection::Backslash),
            ("/a#frag", PathRejection::Fragment),
            ("/a\nb", PathRejection::ControlCharacter),
            ("/a\tb", PathRejection::ControlCharacter),
            ("/a b", PathRejection::ControlCharacter),
            ("/a\u{e9}", PathRejection::ControlCharacter),
            ("/a%00", PathRejection::EncodedControl),
            ("/a%0d%0a", PathRejection::EncodedControl),
            ("/a%7F", PathRejection::EncodedControl),
            ("/a%zz", PathRejection::BadPercentEncoding),
            ("/a%2", PathRejection::BadPercentEncoding),
            ("/admin/..;/x", PathRejection::PathParameter),
            ("/admin;jsessionid=1", PathRejection::PathParameter),
            ("/admin%3bx", PathRejection::PathParameter),
            ("/admin%3B", PathRejection::PathParameter),
            ("a/b", PathRejection::NotOriginForm),
            ("*", PathRejection::NotOriginForm),
            ("", PathRejection::NotOriginForm),
        ];
        for (input, want) in cases {
            assert_eq!(n(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn lower_case_keeps_escapes() {
        assert_eq!(lower_case("/Admin/%C3%A9/X"), "/admin/%C3%A9/x");
    }

    #[test]
    fn normalization_is_idempotent() {
        for p in ["/a/../b//c/./", "/%41/%2e/x", "/x/y/../../z"] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once);
        }
    }
}
