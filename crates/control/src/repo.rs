//! A policy set as files: splitting into resources, summarizing changes between two
//! revisions, and adding or removing one resource document.

use std::collections::BTreeMap;
use std::sync::Arc;

use meshward_policy::yaml::{self, Node, NodeKind};

use crate::store::Files;

/// A resource's identity in a policy set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One resource of a policy set: its key, tier (for AuthorizationPolicy) and content.
#[derive(Debug, Clone)]
pub struct Resource {
    pub key: Key,
    pub tier: Option<String>,
    /// Span-free canonical form, to tell a change from a move.
    pub canonical: String,
}

fn canonical(n: &Node, out: &mut String) {
    match &n.kind {
        NodeKind::Scalar { value, .. } => {
            out.push_str(&serde_json::to_string(value).unwrap_or_default());
        }
        NodeKind::Seq(items) => {
            out.push('[');
            for i in items {
                canonical(i, out);
                out.push(',');
            }
            out.push(']');
        }
        NodeKind::Map(entries) => {
            let mut sorted: Vec<&(Node, Node)> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.as_str().cmp(&b.0.as_str()));
            out.push('{');
            for (k, v) in sorted {
                canonical(k, out);
                out.push(':');
                canonical(v, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

/// The resources of a set of files (documents that do not parse are skipped: validation
/// reports them).
pub fn resources(files: &Files) -> BTreeMap<Key, Resource> {
    let mut out = BTreeMap::new();
    for (_, text) in files {
        let Ok(docs) = yaml::parse_documents(text) else {
            continue;
        };
        for d in docs {
            let s = |path: &[&str]| {
                path.iter()
                    .try_fold(&d, |cur, p| cur.get(p))
                    .and_then(Node::as_str)
                    .map(str::to_owned)
            };
            let (Some(kind), Some(name)) = (s(&["kind"]), s(&["metadata", "name"])) else {
                continue;
            };
            let namespace = s(&["metadata", "namespace"]).unwrap_or_else(|| "default".into());
            let mut c = String::new();
            canonical(&d, &mut c);
            let key = Key {
                kind,
                namespace,
                name,
            };
            out.insert(
                key.clone(),
                Resource {
                    key,
                    tier: s(&["spec", "tier"]),
                    canonical: c,
                },
            );
        }
    }
    out
}

/// How a resource changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    Modified,
}

/// The resources that differ between two sets, with the old and new version.
pub fn changes(old: &Files, new: &Files) -> Vec<(Change, Key, Option<Resource>, Option<Resource>)> {
    let (a, b) = (resources(old), resources(new));
    let mut out = vec![];
    for (k, r) in &a {
        match b.get(k) {
            None => out.push((Change::Removed, k.clone(), Some(r.clone()), None)),
            Some(n) if n.canonical != r.canonical => out.push((
                Change::Modified,
                k.clone(),
                Some(r.clone()),
                Some(n.clone()),
            )),
            Some(_) => {}
        }
    }
    for (k, r) in &b {
        if !a.contains_key(k) {
            out.push((Change::Added, k.clone(), None, Some(r.clone())));
        }
    }
    out
}

/// `+Kind ns/name, ~Kind ns/name, -Kind ns/name` (or `no change`).
pub fn summary(old: &Files, new: &Files) -> String {
    let c = changes(old, new);
    if c.is_empty() {
        return "no change".into();
    }
    let shown = 6;
    let mut parts: Vec<String> = c
        .iter()
        .take(shown)
        .map(|(ch, k, _, _)| {
            let sign = match ch {
                Change::Added => '+',
                Change::Removed => '-',
                Change::Modified => '~',
            };
            format!("{sign}{k}")
        })
        .collect();
    if c.len() > shown {
        parts.push(format!("and {} more", c.len() - shown));
    }
    parts.join(", ")
}

/// Removes every document that is the resource `key`. Documents are split at `---` lines.
pub fn remove(files: &Files, key: &Key) -> Files {
    let mut out = vec![];
    for (name, text) in files {
        let mut kept = vec![];
        for chunk in split_docs(text) {
            let one: Files = vec![(name.clone(), chunk.to_owned())];
            if resources(&one).contains_key(key) {
                continue;
            }
            kept.push(chunk);
        }
        let joined = kept.join("---\n");
        if !joined.trim().is_empty() {
            out.push((name.clone(), joined));
        }
    }
    out
}

fn split_docs(text: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            out.push(&text[start..pos]);
            start = pos + line.len();
        }
        pos += line.len();
    }
    out.push(&text[start..]);
    out.into_iter().filter(|c| !c.trim().is_empty()).collect()
}

/// Loads files as a policy set for validation.
pub fn load(files: &Files) -> meshward_policy::model::Loaded {
    meshward_policy::load_sources(
        files
            .iter()
            .map(|(n, t)| (Arc::<str>::from(n.as_str()), Arc::<str>::from(t.as_str())))
            .collect(),
    )
}

/// The documents of `files` whose resource `keep` accepts (documents without a key are
/// dropped). Files left empty are omitted.
pub fn select(files: &Files, keep: impl Fn(&Key) -> bool) -> Files {
    let mut out = vec![];
    for (name, text) in files {
        let kept: Vec<&str> = split_docs(text)
            .into_iter()
            .filter(|chunk| {
                let one: Files = vec![(name.clone(), (*chunk).to_owned())];
                resources(&one).keys().next().is_some_and(&keep)
            })
            .collect();
        if !kept.is_empty() {
            out.push((name.clone(), kept.join("---\n")));
        }
    }
    out
}
