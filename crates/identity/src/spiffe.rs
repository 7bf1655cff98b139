//! SPIFFE IDs and trust domains, parsed by the SPIFFE ID specification.

use std::fmt;
use std::sync::Arc;

/// The longest SPIFFE ID the specification allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("a SPIFFE ID must start with `spiffe://`")]
    WrongScheme,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error(
        "the trust domain has the character `{0}`; only lower-case letters, digits, `.`, `-` and `_` are allowed (no port, user info or upper case)"
    )]
    BadTrustDomainChar(char),
    #[error("path segment {index} is empty (no `//` and no trailing `/`)")]
    EmptySegment { index: usize },
    #[error("path segment {index} is `{segment}`; dot segments are not allowed")]
    DotSegment { index: usize, segment: String },
    #[error(
        "path segment {index} has the character `{ch}`; only letters, digits, `.`, `-` and `_` are allowed (no query, fragment or percent-encoding)"
    )]
    BadPathChar { index: usize, ch: char },
    #[error("the SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    #[error("expected a workload identity `spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`")]
    NotWorkloadForm,
}

/// A trust domain: the authority part of a SPIFFE ID, e.g. `shop.example`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Parses a bare trust domain name (`shop.example`) or a `spiffe://shop.example` URI.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        validate_trust_domain(name)?;
        Ok(TrustDomain(name.into()))
    }

    /// The trust domain name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_trust_domain(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A SPIFFE ID, `spiffe://trust-domain/path`, valid by the specification.
///
/// Cheap to clone; compares and hashes by its canonical string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Byte offset in `uri` where the path starts (== uri.len() when there is no path).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID strictly by the specification.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if !path.is_empty() {
            for (index, segment) in path[1..].split('/').enumerate() {
                if segment.is_empty() {
                    return Err(IdError::EmptySegment { index });
                }
                if segment == "." || segment == ".." {
                    return Err(IdError::DotSegment {
                        index,
                        segment: segment.to_owned(),
                    });
                }
                if let Some(ch) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(IdError::BadPathChar { index, ch });
                }
            }
        }
        Ok(SpiffeId {
            uri: s.into(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// The mesh's workload identity `spiffe://TD/ns/NS/sa/SA`.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The identity the control plane serves its API as, `spiffe://TD/meshward/control`:
    /// proxies, the CLI and the control plane itself agree on it here.
    pub fn control(trust_domain: &TrustDomain) -> Result<Self, IdError> {
        Self::parse(&format!("{SCHEME}{trust_domain}/meshward/control"))
    }

    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The whole ID as a shared string (cloning it copies nothing).
    pub fn as_arc(&self) -> &Arc<str> {
        &self.uri
    }

    /// The trust domain name.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The trust domain as a typed value.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().into())
    }

    /// The path, `""` or `/seg/seg...`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// The path segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        let p = self.path();
        p.get(1..)
            .unwrap_or("")
            .split('/')
            .filter(|s| !s.is_empty())
    }

    /// `(namespace, service account)` when the ID has the mesh workload form.
    pub fn workload_parts(&self) -> Option<WorkloadName<'_>> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                Some(WorkloadName {
                    namespace,
                    service_account,
                })
            }
            _ => None,
        }
    }

    /// The namespace of a workload-form ID.
    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().map(|w| w.namespace)
    }
}

/// The namespace and service account of a workload-form SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadName<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SpiffeId::parse(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid SPIFFE ID `{s}`: {e}")))
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TrustDomain::parse(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid trust domain `{s}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for ok in [
            "spiffe://shop.example/ns/web/sa/frontend",
            "spiffe://td",
            "spiffe://a-b_c.9/x/Y.z/-_",
        ] {
            assert!(SpiffeId::parse(ok).is_ok(), "{ok}");
        }
        let id = SpiffeId::parse("spiffe://shop.example/ns/web/sa/frontend").unwrap();
        assert_eq!(id.trust_domain_name(), "shop.example");
        assert_eq!(id.path(), "/ns/web/sa/frontend");
        let w = id.workload_parts().unwrap();
        assert_eq!((w.namespace, w.service_account), ("web", "frontend"));
        assert_eq!(
            SpiffeId::parse("spiffe://td/ns/a/sa/b/c")
                .unwrap()
                .workload_parts(),
            None
        );
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        let cases: &[(&str, IdError)] = &[
            ("http://td/x", IdError::WrongScheme),
            ("SPIFFE://td/x", IdError::WrongScheme),
            ("spiffe://", IdError::EmptyTrustDomain),
            ("spiffe:///x", IdError::EmptyTrustDomain),
            ("spiffe://TD/x", IdError::BadTrustDomainChar('T')),
            ("spiffe://td:443/x", IdError::BadTrustDomainChar(':')),
            ("spiffe://user@td/x", IdError::BadTrustDomainChar('@')),
            ("spiffe://td/", IdError::EmptySegment { index: 0 }),
            ("spiffe://td/a//b", IdError::EmptySegment { index: 1 }),
            ("spiffe://td/a/", IdError::EmptySegment { index: 1 }),
            (
                "spiffe://td/a/..",
                IdError::DotSegment {
                    index: 1,
                    segment: "..".into(),
                },
            ),
            (
                "spiffe://td/.",
                IdError::DotSegment {
                    index: 0,
                    segment: ".".into(),
                },
            ),
            (
                "spiffe://td/a?x=1",
                IdError::BadPathChar { index: 0, ch: '?' },
            ),
            (
                "spiffe://td/a#f",
                IdError::BadPathChar { index: 0, ch: '#' },
            ),
            (
                "spiffe://td/a%2F",
                IdError::BadPathChar { index: 0, ch: '%' },
            ),
            ("spiffe://td?x", IdError::BadTrustDomainChar('?')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(2040));
        assert!(matches!(SpiffeId::parse(&long), Err(IdError::TooLong(_))));
    }

    #[test]
    fn trust_domain_accepts_uri_form() {
        assert_eq!(TrustDomain::parse("spiffe://td").unwrap().as_str(), "td");
        assert!(TrustDomain::parse("Td").is_err());
    }
}
