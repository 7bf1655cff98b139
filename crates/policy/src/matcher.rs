//! Match primitives shared by the policy model: identity patterns, path patterns, host
//! patterns, header value matches and HTTP methods. Each is parsed once, at load.

use std::fmt;

use meshward_identity::{SpiffeId, TrustDomain};

use crate::path;

/// One segment of a segment glob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Lit(String),
    /// `*`: exactly one segment.
    Any,
}

/// A source identity matcher: an exact SPIFFE ID, or a pattern whose `*` stands for whole
/// path segments (`spiffe://td/ns/prod/sa/*`). A `*` in the middle matches exactly one
/// segment; a trailing `*` matches one or more. Never a substring match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityPattern {
    Exact(SpiffeId),
    Glob {
        trust_domain: TrustDomain,
        segs: Vec<Seg>,
        /// The last `*` matches one or more segments.
        tail: bool,
        text: String,
    },
}

impl IdentityPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.contains('*') {
            return SpiffeId::parse(s)
                .map(IdentityPattern::Exact)
                .map_err(|e| format!("invalid SPIFFE ID `{s}`: {e}"));
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| {
            format!("invalid identity pattern `{s}`: it must start with `spiffe://`")
        })?;
        let (td, path) = rest.split_once('/').ok_or_else(|| {
            format!("invalid identity pattern `{s}`: the trust domain cannot be a wildcard; use `trustDomains`")
        })?;
        let trust_domain = TrustDomain::parse(td)
            .map_err(|e| format!("invalid identity pattern `{s}`: {e}; use `trustDomains` to match whole trust domains"))?;
        let parts: Vec<&str> = path.split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            if *p == "*" {
                segs.push(Seg::Any);
            } else if p.contains('*') {
                return Err(format!(
                    "invalid identity pattern `{s}`: `*` must be a whole path segment (segment {i} is `{p}`); partial wildcards would match substrings"
                ));
            } else {
                // Validate the literal by the SPIFFE ID rules.
                SpiffeId::parse(&format!("spiffe://{td}/{p}"))
                    .map_err(|e| format!("invalid identity pattern `{s}`: {e}"))?;
                segs.push(Seg::Lit((*p).to_owned()));
            }
        }
        let tail = segs.last() == Some(&Seg::Any);
        Ok(IdentityPattern::Glob {
            trust_domain,
            segs,
            tail,
            text: s.to_owned(),
        })
    }

    /// Whether `id` matches this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == id,
            IdentityPattern::Glob {
                trust_domain,
                segs,
                tail,
                ..
            } => {
                if id.trust_domain_name() != trust_domain.as_str() {
                    return false;
                }
                let have: Vec<&str> = id.segments().collect();
                seg_match(segs, *tail, &have)
            }
        }
    }

    /// The literal part before the first `*`, as a SPIFFE ID prefix (`spiffe://td/ns/prod`),
    /// and the number of literal segments in it.
    pub fn literal_prefix(&self) -> (String, usize) {
        match self {
            IdentityPattern::Exact(e) => (e.as_str().to_owned(), e.segments().count()),
            IdentityPattern::Glob {
                trust_domain, segs, ..
            } => {
                let mut p = format!("spiffe://{trust_domain}");
                let mut n = 0;
                for s in segs {
                    match s {
                        Seg::Lit(l) => {
                            p.push('/');
                            p.push_str(l);
                            n += 1;
                        }
                        Seg::Any => break,
                    }
                }
                (p, n)
            }
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Exact(id) => write!(f, "{id}"),
            IdentityPattern::Glob { text, .. } => f.write_str(text),
        }
    }
}

/// Segment glob match: `*` is one segment; with `tail`, the last `*` is one or more.
fn seg_match(segs: &[Seg], tail: bool, have: &[&str]) -> bool {
    let fixed = if tail { segs.len() - 1 } else { segs.len() };
    if tail {
        if have.len() < segs.len() {
            return false;
        }
    } else if have.len() != segs.len() {
        return false;
    }
    segs[..fixed].iter().zip(have).all(|(s, h)| match s {
        Seg::Any => true,
        Seg::Lit(l) => l == h,
    })
}

/// A request path matcher. Paths are matched after normalization, case-sensitively.
/// - `/a/b` exact;
/// - `/a/*` the prefix `/a`: matches `/a`, `/a/` and everything below;
/// - `/a/*/c` a `*` in the middle matches exactly one segment;
/// - `*` or `/*` any path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathPattern {
    Any,
    Exact(String),
    Prefix(String),
    Glob {
        segs: Vec<Seg>,
        tail: bool,
        text: String,
    },
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" || s == "/*" {
            return Ok(PathPattern::Any);
        }
        if !s.starts_with('/') {
            return Err(format!("path pattern `{s}` must start with `/`"));
        }
        let segs_raw: Vec<&str> = s[1..].split('/').collect();
        for (i, p) in segs_raw.iter().enumerate() {
            if p.contains('*') && *p != "*" {
                return Err(format!(
                    "path pattern `{s}`: `*` must be a whole segment (segment {i} is `{p}`)"
                ));
            }
        }
        // Literal parts must already be normalized, or the pattern could never match.
        let literal = s.replace("/*", "/x");
        match path::normalize(&literal) {
            Ok(n) if n.path == literal && n.query.is_none() => {}
            Ok(n) => {
                return Err(format!(
                    "path pattern `{s}` is not normalized (the proxy normalizes `{literal}` to `{}`), so it can never match",
                    n.path
                ));
            }
            Err(e) => return Err(format!("path pattern `{s}`: {e}")),
        }
        if !s.contains('*') {
            return Ok(PathPattern::Exact(s.to_owned()));
        }
        let segs: Vec<Seg> = segs_raw
            .iter()
            .map(|p| {
                if *p == "*" {
                    Seg::Any
                } else {
                    Seg::Lit((*p).to_owned())
                }
            })
            .collect();
        let tail = segs.last() == Some(&Seg::Any);
        let only_tail = segs[..segs.len() - 1]
            .iter()
            .all(|s| matches!(s, Seg::Lit(_)));
        if tail && only_tail {
            return Ok(PathPattern::Prefix(s[..s.len() - 2].to_owned()));
        }
        Ok(PathPattern::Glob {
            segs,
            tail,
            text: s.to_owned(),
        })
    }

    /// Whether a normalized path matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(p) => p == path,
            PathPattern::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathPattern::Glob { segs, tail, .. } => {
                let have: Vec<&str> = path[1.min(path.len())..].split('/').collect();
                if *tail {
                    // `/a/*/c/*`: fixed part, then zero or more segments.
                    let fixed = &segs[..segs.len() - 1];
                    have.len() >= fixed.len()
                        && fixed.iter().zip(&have).all(|(s, h)| match s {
                            Seg::Any => !h.is_empty(),
                            Seg::Lit(l) => l == h,
                        })
                } else {
                    have.len() == segs.len()
                        && segs.iter().zip(&have).all(|(s, h)| match s {
                            Seg::Any => !h.is_empty(),
                            Seg::Lit(l) => l == h,
                        })
                }
            }
        }
    }

    /// The literal segments before the first `*` (for the path trie).
    pub fn literal_segments(&self) -> Option<Vec<&str>> {
        match self {
            PathPattern::Any => Some(vec![]),
            PathPattern::Exact(_) => None,
            PathPattern::Prefix(p) => Some(p[1..].split('/').filter(|s| !s.is_empty()).collect()),
            PathPattern::Glob { segs, .. } => Some(
                segs.iter()
                    .map_while(|s| match s {
                        Seg::Lit(l) => Some(l.as_str()),
                        Seg::Any => None,
                    })
                    .collect(),
            ),
        }
    }

    /// A path this pattern matches (for witnesses in lint and diff).
    pub fn example(&self) -> String {
        match self {
            PathPattern::Any => "/".into(),
            PathPattern::Exact(p) => p.clone(),
            PathPattern::Prefix(p) => format!("{p}/x"),
            PathPattern::Glob { segs, .. } => {
                let mut s = String::new();
                for seg in segs {
                    s.push('/');
                    s.push_str(match seg {
                        Seg::Lit(l) => l,
                        Seg::Any => "x",
                    });
                }
                s
            }
        }
    }

    /// Whether every path `other` matches is also matched by `self` (sound, not complete).
    pub fn covers(&self, other: &PathPattern) -> bool {
        match (self, other) {
            (PathPattern::Any, _) => true,
            (a, b) if a == b => true,
            (PathPattern::Prefix(p), PathPattern::Exact(e)) => {
                PathPattern::Prefix(p.clone()).matches(e)
            }
            (PathPattern::Prefix(p), PathPattern::Prefix(q)) => {
                PathPattern::Prefix(p.clone()).matches(q)
            }
            (PathPattern::Prefix(p), PathPattern::Glob { .. }) => {
                other.literal_segments().is_some_and(|l| {
                    PathPattern::Prefix(p.clone()).matches(&format!("/{}", l.join("/")))
                })
            }
            _ => false,
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Any => f.write_str("/*"),
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) => write!(f, "{p}/*"),
            PathPattern::Glob { text, .. } => f.write_str(text),
        }
    }
}

/// A host matcher: exact name, `*.suffix`, or `*`. Case-, port- and trailing-dot-insensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

/// Lower-cases a host, strips a port and a trailing dot (`API.Shop.:8080` → `api.shop`).
pub fn normalize_host(h: &str) -> String {
    let h = h.trim();
    let no_port = if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        match rest.find(']') {
            Some(i) => &h[..i + 2],
            None => h,
        }
    } else {
        match h.rfind(':') {
            Some(i) if h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &h[..i],
            _ => h,
        }
    };
    no_port.trim_end_matches('.').to_ascii_lowercase()
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!(
                    "host pattern `{s}`: only a leading `*.` is allowed"
                ));
            }
            return Ok(HostPattern::Suffix(format!(".{}", normalize_host(rest))));
        }
        if s.contains('*') {
            return Err(format!(
                "host pattern `{s}`: only a leading `*.` is allowed"
            ));
        }
        if s.is_empty() {
            return Err("host pattern is empty".into());
        }
        Ok(HostPattern::Exact(normalize_host(s)))
    }

    /// Whether a host, already normalized with [`normalize_host`], matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// A header value matcher: exact, `prefix*`, `*suffix`, or `*` (any value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Any => true,
            StringMatch::Exact(e) => e == v,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(p) => v.ends_with(p.as_str()),
        }
    }

    /// A value this matcher accepts.
    pub fn example(&self) -> String {
        match self {
            StringMatch::Any => "x".into(),
            StringMatch::Exact(e) | StringMatch::Prefix(e) | StringMatch::Suffix(e) => e.clone(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Any => f.write_str("*"),
            StringMatch::Exact(e) => f.write_str(e),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// Validates an HTTP method as written in policy: an upper-case token.
pub fn parse_method(s: &str) -> Result<String, String> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
    {
        return Err(format!("`{s}` is not an HTTP method"));
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "methods match exactly and are upper-case; did you mean `{}`?",
            s.to_ascii_uppercase()
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn identity_patterns_match_whole_segments_only() {
        let p = IdentityPattern::parse("spiffe://td/ns/prod/sa/*").unwrap();
        assert!(p.matches(&id("spiffe://td/ns/prod/sa/web")));
        assert!(!p.matches(&id("spiffe://td/ns/prod/sa")));
        assert!(p.matches(&id("spiffe://td/ns/prod/sa/web/extra")));
        assert!(!p.matches(&id("spiffe://td/ns/prod-2/sa/web")));
        assert!(!p.matches(&id("spiffe://other/ns/prod/sa/web")));
        let mid = IdentityPattern::parse("spiffe://td/ns/*/sa/web").unwrap();
        assert!(mid.matches(&id("spiffe://td/ns/a/sa/web")));
        assert!(!mid.matches(&id("spiffe://td/ns/a/b/sa/web")));
        // `cert-manager.io` must not match `cert-manager-io`: no substring matching anywhere.
        let cm = IdentityPattern::parse("spiffe://td/ns/cert-manager.io/*").unwrap();
        assert!(!cm.matches(&id("spiffe://td/ns/cert-manager-io/sa")));
        assert!(cm.matches(&id("spiffe://td/ns/cert-manager.io/sa")));
        let exact = IdentityPattern::parse("spiffe://cert-manager.io/ns/a/sa/b").unwrap();
        assert!(!exact.matches(&id("spiffe://cert-manager-io/ns/a/sa/b")));
        for bad in [
            "spiffe://td/ns/prod-*",
            "spiffe://*/ns/a",
            "spiffe://td*",
            "http://td/*",
            "spiffe://td/ns//*",
            "spiffe://td/../*",
        ] {
            assert!(IdentityPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_patterns() {
        let pre = PathPattern::parse("/admin/*").unwrap();
        assert_eq!(pre, PathPattern::Prefix("/admin".into()));
        for p in ["/admin", "/admin/", "/admin/users/1"] {
            assert!(pre.matches(p), "{p}");
        }
        for p in ["/administrator", "/", "/x/admin"] {
            assert!(!pre.matches(p), "{p}");
        }
        let g = PathPattern::parse("/api/*/orders").unwrap();
        assert!(g.matches("/api/v1/orders"));
        assert!(!g.matches("/api/v1/x/orders"));
        assert!(!g.matches("/api/orders"));
        let gt = PathPattern::parse("/api/*/orders/*").unwrap();
        assert!(gt.matches("/api/v1/orders"));
        assert!(gt.matches("/api/v1/orders/7"));
        assert!(PathPattern::parse("*").unwrap().matches("/anything"));
        assert!(PathPattern::parse("/a*").is_err());
        assert!(PathPattern::parse("a").is_err());
        assert!(PathPattern::parse("/a/../b").is_err());
        assert!(PathPattern::parse("//a").is_err());
        assert!(PathPattern::parse("/%61").is_err());
        assert!(pre.covers(&PathPattern::parse("/admin/x").unwrap()));
        assert!(pre.covers(&PathPattern::parse("/admin/x/*").unwrap()));
        assert!(!pre.covers(&PathPattern::parse("/adminx").unwrap()));
    }

    #[test]
    fn hosts_ignore_case_port_and_trailing_dot() {
        assert_eq!(normalize_host("API.Shop.Example.:8443"), "api.shop.example");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        let h = HostPattern::parse("Orders.Shop").unwrap();
        assert!(h.matches(&normalize_host("orders.shop.:80")));
        let w = HostPattern::parse("*.shop").unwrap();
        assert!(w.matches("a.shop"));
        assert!(!w.matches("shop"));
        assert!(!w.matches("evilshop"));
        assert!(HostPattern::parse("a*.shop").is_err());
    }

    #[test]
    fn methods_are_upper_case_tokens() {
        assert_eq!(parse_method("GET").unwrap(), "GET");
        assert!(parse_method("get").unwrap_err().contains("`GET`"));
        assert!(parse_method("G ET").is_err());
    }
}
