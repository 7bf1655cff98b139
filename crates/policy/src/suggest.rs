//! Least-privilege policy suggestions: service-tier ALLOW policies that admit exactly the
//! allowed requests observed in a decision log (per destination, per source, per port and
//! method, the paths seen), written as YAML that passes lint.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::decision::{Verdict, WorkloadRef};
use crate::decision_log::DecisionRecord;

/// Options for [`suggest`].
#[derive(Debug, Clone, Copy)]
pub struct SuggestOptions {
    /// When one source calls more than this many distinct paths under one parent on one
    /// port and method, suggest `parent/*` instead of listing them (0: never collapse).
    pub collapse_above: usize,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        SuggestOptions { collapse_above: 8 }
    }
}

/// source ("" = plaintext) → port → method ("" = TCP) → paths.
type BySource = BTreeMap<String, BTreeMap<u16, BTreeMap<String, BTreeSet<String>>>>;

/// Observed allowed traffic, accumulated from records.
#[derive(Debug, Default)]
pub struct Observed {
    /// destination → source ("" = plaintext) → port → method ("" = TCP) → paths
    edges: BTreeMap<String, BySource>,
    pub records: u64,
}

impl Observed {
    pub fn add(&mut self, r: &DecisionRecord) {
        if r.verdict != Verdict::Allow || !r.reason.is_policy() || r.direction != "inbound" {
            return;
        }
        self.records += 1;
        let paths = self
            .edges
            .entry(r.destination.clone())
            .or_default()
            .entry(r.source.clone().unwrap_or_default())
            .or_default()
            .entry(r.port)
            .or_default()
            .entry(r.method.clone().unwrap_or_default())
            .or_default();
        if let Some(p) = &r.path
            && let Ok(n) = crate::path::normalize(p)
        {
            paths.insert(n.path);
        }
    }
}

fn collapse(paths: &BTreeSet<String>, above: usize) -> Vec<String> {
    if above == 0 || paths.len() <= above {
        return paths.iter().cloned().collect();
    }
    let mut by_parent: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for p in paths {
        let parent = match p.rfind('/') {
            Some(0) | None => "/".to_owned(),
            Some(i) => p[..i].to_owned(),
        };
        by_parent.entry(parent).or_default().push(p);
    }
    let mut out = vec![];
    for (parent, ps) in by_parent {
        if ps.len() > above && parent != "/" {
            out.push(format!("{parent}/*"));
        } else {
            out.extend(ps.into_iter().cloned());
        }
    }
    out
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out.trim_matches('-').chars().take(50).collect()
}

/// YAML with one policy per destination.
pub fn suggest(obs: &Observed, opts: SuggestOptions) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# Suggested by `meshward policy suggest` from {} observed allowed requests.",
        obs.records
    );
    let _ = writeln!(
        y,
        "# Each policy admits exactly the traffic observed; review before applying."
    );
    for (dest, sources) in &obs.edges {
        let Ok(d) = WorkloadRef::parse(dest) else {
            continue;
        };
        y.push_str("---\n");
        let _ = writeln!(y, "apiVersion: {}", crate::resource::API_VERSION);
        y.push_str("kind: AuthorizationPolicy\nmetadata:\n");
        let _ = writeln!(y, "  name: {}", slug(&format!("suggested-{}", d.name)));
        let _ = writeln!(y, "  namespace: {}", d.namespace);
        y.push_str("spec:\n  tier: service\n  action: ALLOW\n  target:\n");
        let _ = writeln!(y, "    workloads: [{}]", q(&d.name));
        y.push_str("  rules:\n");
        let mut names = BTreeSet::new();
        for (src, ports) in sources {
            let base = if src.is_empty() {
                "from-plaintext".to_owned()
            } else {
                slug(&format!("from-{}", src.trim_start_matches("spiffe://")))
            };
            let mut name = base.clone();
            let mut k = 2;
            while !names.insert(name.clone()) {
                name = format!("{base}-{k}");
                k += 1;
            }
            let _ = writeln!(y, "    - name: {name}");
            if src.is_empty() {
                y.push_str("      from:\n        - unauthenticated: true\n");
            } else {
                let _ = writeln!(y, "      from:\n        - identities: [{}]", q(src));
            }
            y.push_str("      to:\n");
            for (port, methods) in ports {
                for (method, paths) in methods {
                    let _ = writeln!(y, "        - ports: [{port}]");
                    if !method.is_empty() {
                        let _ = writeln!(y, "          methods: [{}]", q(method));
                        let ps: Vec<String> = collapse(paths, opts.collapse_above)
                            .iter()
                            .map(|p| q(p))
                            .collect();
                        if !ps.is_empty() {
                            let _ = writeln!(y, "          paths: [{}]", ps.join(", "));
                        }
                    }
                }
            }
        }
    }
    y
}
