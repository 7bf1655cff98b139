//! A YAML loader that keeps the line and column of every node, and a serde deserializer
//! over it whose errors name the field path and the position of the offending node.
//!
//! Why not `serde_yaml`-style deserialization straight from text: lint, explain and every
//! diagnostic need the position of fields *after* parsing (a rule, an identity, a path), and
//! errors must name the field path and suggest close field names. Owning the tree gives both.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Upper bound on nodes built from one file, alias expansion included ("billion laughs").
const MAX_NODES: usize = 1_000_000;

/// A position in a source file, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span {
    pub line: u32,
    pub col: u32,
}

impl Span {
    fn from_marker(m: &Marker) -> Self {
        Span {
            line: u32::try_from(m.line()).unwrap_or(u32::MAX),
            col: u32::try_from(m.col() + 1).unwrap_or(u32::MAX),
        }
    }
}

/// One YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub span: Span,
    pub kind: NodeKind,
}

/// The shape of a YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `plain` is false when it was quoted or a block scalar.
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order; keys are unique (checked at load).
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The value of a scalar node.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// True for `~`, `null` or an empty plain scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { value, plain: true } if is_null_str(value))
    }

    /// The entry of a mapping node by key.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            NodeKind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The node at a field path such as `["spec", "rules", "0", "from"]`, as far as it exists;
    /// returns the deepest node found, so a diagnostic always has a position.
    pub fn find(&self, path: &[PathSeg]) -> &Node {
        let mut cur = self;
        for seg in path {
            let next = match (seg, &cur.kind) {
                (PathSeg::Key(k), NodeKind::Map(_)) => cur.get(k),
                (PathSeg::Index(i), NodeKind::Seq(items)) => items.get(*i),
                _ => None,
            };
            match next {
                Some(n) => cur = n,
                None => break,
            }
        }
        cur
    }

    fn kind_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "null",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

fn is_null_str(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

/// The lines of a text as YAML counts them: `\r\n`, a lone `\r` and `\n` all end a line,
/// so line numbers in diagnostics and the snippets shown with them agree.
pub fn lines(text: &str) -> Vec<&str> {
    let mut out = vec![];
    let b = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'\n' => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            b'\r' => {
                out.push(&text[start..i]);
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < b.len() {
        out.push(&text[start..]);
    }
    out
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub span: Span,
    pub message: String,
}

/// Parses every document of a YAML stream. Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            span: Span::from_marker(e.marker()),
            message: e.info().to_owned(),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.docs)
}

enum Frame {
    Seq(Span, usize, Vec<Node>),
    Map(Span, usize, Vec<(Node, Node)>, Option<Node>),
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    error: Option<SyntaxError>,
}

fn count(n: &Node) -> usize {
    match &n.kind {
        NodeKind::Scalar { .. } => 1,
        NodeKind::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        NodeKind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count(k) + count(v))
                .sum::<usize>()
        }
    }
}

impl Builder {
    fn fail(&mut self, span: Span, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { span, message });
        }
    }

    fn push_node(&mut self, node: Node, anchor: usize) {
        if self.error.is_some() {
            return;
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if !node.is_null() {
                    self.docs.push(node);
                }
            }
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(map_span, _, entries, pending)) => match pending.take() {
                None => {
                    // A block mapping's start event is marked at its first `:`; point
                    // at its first key instead.
                    if entries.is_empty() {
                        *map_span = node.span;
                    }
                    let dup = entries
                        .iter()
                        .any(|(k, _)| k.as_str().is_some() && k.as_str() == node.as_str());
                    if dup {
                        let key = node.as_str().unwrap_or_default().to_owned();
                        self.fail(
                            node.span,
                            format!("duplicate key `{key}`; each key may appear once"),
                        );
                    } else if !matches!(node.kind, NodeKind::Scalar { .. }) {
                        self.fail(node.span, "mapping keys must be scalars".into());
                    } else {
                        *pending = Some(node);
                    }
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let span = Span::from_marker(&mark);
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            self.fail(span, format!("document too large (over {MAX_NODES} nodes)"));
            return;
        }
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                self.push_node(
                    Node {
                        span,
                        kind: NodeKind::Scalar { value, plain },
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(span, anchor, vec![])),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(span, anchor, vec![], None))
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq(span, anchor, items)) => self.push_node(
                    Node {
                        span,
                        kind: NodeKind::Seq(items),
                    },
                    anchor,
                ),
                Some(Frame::Map(span, anchor, entries, _)) => self.push_node(
                    Node {
                        span,
                        kind: NodeKind::Map(entries),
                    },
                    anchor,
                ),
                None => self.fail(span, "unbalanced collection end".into()),
            },
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => {
                    self.nodes += count(&node);
                    if self.nodes > MAX_NODES {
                        self.fail(span, format!("aliases expand to over {MAX_NODES} nodes"));
                        return;
                    }
                    self.push_node(Node { span, ..node }, 0);
                }
                None => self.fail(span, "alias to an unknown anchor".into()),
            },
            Event::DocumentStart => self.anchors.clear(),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// Renders a field path as `spec.rules[0].from`.
pub fn path_string(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            PathSeg::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

/// A deserialization error with the field path (relative to the node deserialized) and the
/// position of the node it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeError {
    pub message: String,
    pub help: Option<String>,
    pub span: Option<Span>,
    /// Innermost segment last.
    pub path: Vec<PathSeg>,
}

impl DeError {
    fn within(mut self, seg: PathSeg, span: Span) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        }
        self.path.insert(0, seg);
        self
    }

    fn at(mut self, span: Span) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            help: None,
            span: None,
            path: vec![],
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let mut e = Self::custom(format_args!("unknown field `{field}`"));
        e.help = Some(match did_you_mean(field, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("expected one of {}", backticked(expected)),
        });
        e
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let mut e = Self::custom(format_args!("unknown value `{variant}`"));
        e.help = Some(match did_you_mean(variant, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("expected one of {}", backticked(expected)),
        });
        e
    }

    fn missing_field(field: &'static str) -> Self {
        Self::custom(format_args!("missing field `{field}`"))
    }
}

fn backticked(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The closest candidate to `input` by edit distance (case-insensitive), if close enough.
pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let input_l = input.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (levenshtein(&input_l, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len().max(input.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance with adjacent transpositions (optimal string alignment): `wbe` → `web` is 1.
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// Deserializes a typed value from a node.
pub fn from_node<T: de::DeserializeOwned>(node: &Node) -> Result<T, DeError> {
    T::deserialize(NodeDe(node)).map_err(|e| e.at(node.span))
}

/// A serde deserializer over one [`Node`].
#[derive(Debug, Clone, Copy)]
pub struct NodeDe<'a>(pub &'a Node);

impl<'a> NodeDe<'a> {
    fn scalar(&self) -> Result<&'a str, DeError> {
        match &self.0.kind {
            NodeKind::Scalar { value, .. } => Ok(value),
            _ => Err(de::Error::custom(format_args!(
                "expected a scalar, found {}",
                self.0.kind_name()
            ))),
        }
    }

    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, DeError> {
        let s = self.scalar()?;
        s.trim()
            .parse()
            .map_err(|_| de::Error::custom(format_args!("expected {what}, found `{s}`")))
    }
}

macro_rules! parse_num {
    ($($method:ident => $visit:ident, $ty:ty, $what:expr;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            visitor.$visit(self.parse::<$ty>($what)?)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            NodeKind::Scalar { value, plain: true } => {
                if is_null_str(value) {
                    visitor.visit_unit()
                } else if value == "true" {
                    visitor.visit_bool(true)
                } else if value == "false" {
                    visitor.visit_bool(false)
                } else if let Ok(n) = value.parse::<u64>() {
                    visitor.visit_u64(n)
                } else if let Ok(n) = value.parse::<i64>() {
                    visitor.visit_i64(n)
                } else {
                    visitor.visit_str(value)
                }
            }
            NodeKind::Scalar {
                value,
                plain: false,
            } => visitor.visit_str(value),
            NodeKind::Seq(items) => visitor.visit_seq(SeqDe { items, idx: 0 }),
            NodeKind::Map(entries) => visitor.visit_map(MapDe {
                entries,
                idx: 0,
                key: None,
            }),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar()? {
            "true" => visitor.visit_bool(true),
            "false" => visitor.visit_bool(false),
            other => Err(de::Error::custom(format_args!(
                "expected `true` or `false`, found `{other}`"
            ))),
        }
    }

    parse_num! {
        deserialize_u8 => visit_u8, u8, "an integer from 0 to 255";
        deserialize_u16 => visit_u16, u16, "an integer from 0 to 65535";
        deserialize_u32 => visit_u32, u32, "a non-negative integer";
        deserialize_u64 => visit_u64, u64, "a non-negative integer";
        deserialize_i8 => visit_i8, i8, "an integer";
        deserialize_i16 => visit_i16, i16, "an integer";
        deserialize_i32 => visit_i32, i32, "an integer";
        deserialize_i64 => visit_i64, i64, "an integer";
        deserialize_f32 => visit_f32, f32, "a number";
        deserialize_f64 => visit_f64, f64, "a number";
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str(self.scalar()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.0.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.0.is_null() {
            visitor.visit_unit()
        } else {
            Err(de::Error::custom("expected null"))
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            NodeKind::Seq(items) => visitor.visit_seq(SeqDe { items, idx: 0 }),
            _ if self.0.is_null() => visitor.visit_seq(SeqDe { items: &[], idx: 0 }),
            _ => Err(de::Error::custom(format_args!(
                "expected a list, found {}",
                self.0.kind_name()
            ))),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            NodeKind::Map(entries) => visitor.visit_map(MapDe {
                entries,
                idx: 0,
                key: None,
            }),
            _ if self.0.is_null() => visitor.visit_map(MapDe {
                entries: &[],
                idx: 0,
                key: None,
            }),
            _ => Err(de::Error::custom(format_args!(
                "expected a mapping, found {}",
                self.0.kind_name()
            ))),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let s = self.scalar()?;
        visitor.visit_enum(IntoDeserializer::<DeError>::into_deserializer(s))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bytes byte_buf unit_struct tuple tuple_struct
    }
}

struct SeqDe<'a> {
    items: &'a [Node],
    idx: usize,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(item) = self.items.get(self.idx) else {
            return Ok(None);
        };
        let i = self.idx;
        self.idx += 1;
        seed.deserialize(NodeDe(item))
            .map(Some)
            .map_err(|e| e.within(PathSeg::Index(i), item.span))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.idx)
    }
}

struct MapDe<'a> {
    entries: &'a [(Node, Node)],
    idx: usize,
    key: Option<&'a Node>,
}

impl<'de> de::MapAccess<'de> for MapDe<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((k, _)) = self.entries.get(self.idx) else {
            return Ok(None);
        };
        self.key = Some(k);
        let name = k.as_str().unwrap_or_default().to_owned();
        seed.deserialize(NodeDe(k))
            .map(Some)
            .map_err(|e| e.within(PathSeg::Key(name), k.span))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((k, v)) = self.entries.get(self.idx) else {
            return Err(de::Error::custom("value without key"));
        };
        self.idx += 1;
        let name = k.as_str().unwrap_or_default().to_owned();
        seed.deserialize(NodeDe(v))
            .map_err(|e| e.within(PathSeg::Key(name), v.span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Spec {
        name: String,
        #[serde(default)]
        ports: Vec<u16>,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        enabled: bool,
    }

    #[test]
    fn positions_are_one_based() {
        let docs = parse_documents("a: 1\nb:\n  - x\n").unwrap();
        let b = docs[0].get("b").unwrap();
        match &b.kind {
            NodeKind::Seq(items) => assert_eq!(items[0].span, Span { line: 3, col: 5 }),
            _ => panic!("not a seq"),
        }
        assert_eq!(docs[0].get("a").unwrap().span, Span { line: 1, col: 4 });
    }

    #[test]
    fn lines_end_where_yaml_says() {
        assert_eq!(lines("a\r\nb\rc\nd"), vec!["a", "b", "c", "d"]);
        assert_eq!(lines("a\n"), vec!["a"]);
        // The scanner agrees: `b` is on line 2 after a lone CR.
        let docs = parse_documents("x: 1\ry: 2\n").unwrap();
        assert_eq!(docs[0].get("y").unwrap().span.line, 2);
    }

    #[test]
    fn multi_document_streams_skip_empty_documents() {
        let docs = parse_documents("---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
    }

    #[test]
    fn unknown_field_names_path_position_and_suggestion() {
        let docs = parse_documents("name: x\ninner:\n  enabeld: true\n").unwrap();
        let err = from_node::<Spec>(&docs[0]).unwrap_err();
        assert_eq!(err.message, "unknown field `enabeld`");
        assert_eq!(err.help.as_deref(), Some("did you mean `enabled`?"));
        assert_eq!(path_string(&err.path), "inner.enabeld");
        assert_eq!(err.span, Some(Span { line: 3, col: 3 }));
    }

    #[test]
    fn type_errors_point_at_the_value() {
        let docs = parse_documents("name: x\nports: [80, 70000]\n").unwrap();
        let err = from_node::<Spec>(&docs[0]).unwrap_err();
        assert_eq!(path_string(&err.path), "ports[1]");
        assert_eq!(err.span, Some(Span { line: 2, col: 13 }));
        assert!(err.message.contains("70000"), "{}", err.message);
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_are_reported() {
        let e = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.span.line, 2);
        assert!(e.message.contains("duplicate key `a`"));
        let e = parse_documents("a: [1, 2\n").unwrap_err();
        assert!(e.span.line >= 1);
    }

    #[test]
    fn aliases_expand_and_are_bounded() {
        let docs = parse_documents("a: &x {enabled: true}\nb: *x\n").unwrap();
        assert_eq!(
            from_node::<Inner>(docs[0].get("b").unwrap()).unwrap(),
            Inner { enabled: true }
        );
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
                p = i - 1
            ));
        }
        let e = parse_documents(&bomb).unwrap_err();
        assert!(e.message.contains("nodes"), "{}", e.message);
    }

    #[test]
    fn did_you_mean_is_conservative() {
        assert_eq!(
            did_you_mean("identites", ["identities", "namespaces"]),
            Some("identities")
        );
        assert_eq!(did_you_mean("zzz", ["identities", "namespaces"]), None);
    }
}
