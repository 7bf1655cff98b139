//! The decision window: the decision records proxies ship (every deny, sampled allows),
//! kept in a bounded table of this replica's own SQLite file (`DATA/decisions.db`, not the
//! versioned store: it is telemetry, lost at no cost, and never replicated). It feeds the
//! service graph, `meshward top`, and `policy impact|suggest --from-control`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use meshward_policy::decision::{Reason, Verdict};
use meshward_policy::decision_log::DecisionRecord;
use meshward_policy::model::PolicySet;
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::store::{StoreError, ms};

/// How many records the window keeps by default.
pub const DEFAULT_MAX_RECORDS: u64 = 200_000;

/// The bounded window of shipped decision records.
#[derive(Debug)]
pub struct DecisionWindow {
    conn: Mutex<Connection>,
    max_records: u64,
}

impl DecisionWindow {
    /// Opens (creating) the window at `path`, keeping at most `max_records`.
    pub fn open(path: &Path, max_records: u64) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Telemetry: a crash may lose the last records, never the store's data.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS decisions (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL,
                 proxy TEXT NOT NULL, line TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts_ms);",
        )?;
        Ok(DecisionWindow {
            conn: Mutex::new(conn),
            max_records: max_records.max(1),
        })
    }

    /// Stores the valid records of a batch from `proxy`; returns (accepted, invalid).
    pub fn append(&self, proxy: &str, lines: &[String]) -> Result<(u64, u64), StoreError> {
        let mut ok = vec![];
        let mut invalid = 0;
        for l in lines {
            match serde_json::from_str::<DecisionRecord>(l) {
                Ok(r) => ok.push((r.time().map_or(0, ms), r.to_line())),
                Err(_) => invalid += 1,
            }
        }
        let mut c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = c.transaction()?;
        for (ts, line) in &ok {
            tx.execute(
                "INSERT INTO decisions (ts_ms, proxy, line) VALUES (?1, ?2, ?3)",
                params![ts, proxy, line],
            )?;
        }
        // Keep the newest `max_records`.
        let max = i64::try_from(self.max_records).unwrap_or(i64::MAX);
        tx.execute(
            "DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - ?1",
            params![max],
        )?;
        tx.commit()?;
        Ok((ok.len() as u64, invalid))
    }

    /// Records at or after `since` (all kept when `None`), oldest first, at most `limit`
    /// (the newest ones).
    pub fn records(
        &self,
        since: Option<SystemTime>,
        limit: usize,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        let c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let mut st = c.prepare(
            "SELECT line FROM (SELECT id, line FROM decisions WHERE ts_ms >= ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
        )?;
        let rows = st.query_map(
            params![
                since.map_or(0, ms),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| r.get::<_, String>(0),
        )?;
        let mut out = vec![];
        for line in rows {
            if let Ok(r) = serde_json::from_str::<DecisionRecord>(&line?) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

impl DecisionWindow {
    /// Records stored after row `after` (in arrival order), at most `limit`, with their
    /// row ids: a reader that keeps the last id sees every record once, however late its
    /// timestamp.
    pub fn records_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, DecisionRecord)>, StoreError> {
        let c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        let mut st =
            c.prepare("SELECT id, line FROM decisions WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let rows = st.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )?;
        let mut out = vec![];
        for row in rows {
            let (id, line) = row?;
            if let Ok(r) = serde_json::from_str::<DecisionRecord>(&line) {
                out.push((id, r));
            }
        }
        Ok(out)
    }

    /// The id of the newest record stored (0: none).
    pub fn last_id(&self) -> Result<i64, StoreError> {
        let c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM decisions", [], |r| {
                r.get(0)
            })?,
        )
    }
}

/// A node of the service graph: a workload, or `unauthenticated` / `external`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    pub id: String,
    pub identity: Option<String>,
    pub kind: &'static str,
}

/// An edge: traffic from one node to another in the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    /// Requests (weighted: a sampled allow stands for its sampling interval).
    pub allowed: u64,
    pub denied: u64,
    pub rate_per_sec: f64,
    /// Whether the source proved an identity with mTLS (`false`: plaintext or refused).
    pub mtls: bool,
    /// Of allowed HTTP requests with a recorded duration.
    pub p99_ms: Option<f64>,
    /// Deny reason (and deciding policy) → requests.
    pub denials: BTreeMap<String, u64>,
    /// A denied request, as an example: method and path, or the port for TCP.
    pub example_denied: Option<String>,
}

/// The service graph of a window of records.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Graph {
    pub window_secs: u64,
    pub records: usize,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

fn p99(mut v: Vec<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    Some(v[i.clamp(1, v.len()) - 1] as f64 / 1e6)
}

/// Builds the graph: every workload of `set` is a node (traffic or not); edges from the
/// inbound records (the destination's sidecar decided), plus outbound refusals to
/// destinations outside the mesh.
pub fn graph(records: &[DecisionRecord], set: Option<&PolicySet>, window_secs: u64) -> Graph {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    if let Some(set) = set {
        for w in &set.workloads {
            nodes.insert(
                w.id.to_string(),
                Node {
                    id: w.id.to_string(),
                    identity: Some(w.identity.to_string()),
                    kind: "workload",
                },
            );
        }
    }
    let source_node = |src: &Option<String>| -> String {
        match src {
            None => "unauthenticated".into(),
            Some(s) => set
                .and_then(|set| {
                    let id = meshward_identity::SpiffeId::parse(s).ok()?;
                    set.workload_by_identity(&id).map(|w| w.id.to_string())
                })
                .unwrap_or_else(|| s.clone()),
        }
    };
    #[derive(Default)]
    struct Acc {
        allowed: u64,
        denied: u64,
        mtls: bool,
        durations: Vec<u64>,
        denials: BTreeMap<String, u64>,
        example: Option<String>,
    }
    let mut acc: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for r in records {
        let outbound = r.direction == "outbound";
        // Outbound records only add what the destination's sidecar cannot see: calls out
        // of the mesh and refusals at the source (a call served after retries is counted
        // by the destination's own record).
        if outbound && (r.reason.is_policy() || r.reason == Reason::Retried) {
            continue;
        }
        let src = source_node(&r.source);
        let dst = if r.destination.starts_with("external/") {
            "external".to_owned()
        } else {
            r.destination.clone()
        };
        for (id, kind) in [(&src, "source"), (&dst, "destination")] {
            nodes.entry(id.clone()).or_insert_with(|| Node {
                id: id.clone(),
                identity: None,
                kind: match id.as_str() {
                    "unauthenticated" => "unauthenticated",
                    "external" => "external",
                    _ if kind == "source" => "identity",
                    _ => "workload",
                },
            });
        }
        let a = acc.entry((src, dst)).or_default();
        let w = u64::from(r.weight.max(1));
        if r.source.is_some() && r.reason != Reason::HandshakeFailed {
            a.mtls = true;
        }
        match r.verdict {
            Verdict::Allow => {
                a.allowed += w;
                if let Some(d) = r.duration_ns {
                    a.durations.push(d);
                }
            }
            Verdict::Deny => {
                a.denied += w;
                let key = match &r.policy {
                    Some(p) => format!("{} ({p})", r.reason),
                    None => r.reason.to_string(),
                };
                *a.denials.entry(key).or_default() += w;
                a.example = Some(match (&r.method, &r.path) {
                    (Some(m), Some(p)) => format!("{m} {p}"),
                    _ => format!("TCP port {}", r.port),
                });
            }
        }
    }
    let secs = window_secs.max(1) as f64;
    let edges = acc
        .into_iter()
        .map(|((source, destination), a)| Edge {
            source,
            destination,
            rate_per_sec: (a.allowed + a.denied) as f64 / secs,
            allowed: a.allowed,
            denied: a.denied,
            mtls: a.mtls,
            p99_ms: p99(a.durations),
            denials: a.denials,
            example_denied: a.example,
        })
        .collect();
    Graph {
        window_secs,
        records: records.len(),
        nodes: nodes.into_values().collect(),
        edges,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn line(i: u32, verdict: &str) -> String {
        format!(
            r#"{{"ts":"2026-12-01T10:00:{:02}.000Z","source":"spiffe://td/ns/a/sa/a","destination":"b/b","port":80,"method":"GET","path":"/x","verdict":"{verdict}","reason":"{}","decision_ns":1,"duration_ns":{}}}"#,
            i % 60,
            if verdict == "allow" {
                "allowed_by_rule"
            } else {
                "no_allow_at_tier"
            },
            u64::from(i) * 1_000_000
        )
    }

    #[test]
    fn the_window_is_bounded_and_invalid_lines_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let w = DecisionWindow::open(&dir.path().join("d.db"), 5).unwrap();
        let mut batch: Vec<String> = (0..8).map(|i| line(i, "allow")).collect();
        batch.push("not json".into());
        let (ok, invalid) = w.append("spiffe://td/ns/a/sa/a", &batch).unwrap();
        assert_eq!((ok, invalid), (8, 1));
        let recs = w.records(None, 100).unwrap();
        assert_eq!(recs.len(), 5, "only the newest 5 are kept");
        assert_eq!(recs[0].duration_ns, Some(3_000_000), "oldest kept first");
        assert_eq!(w.records(None, 2).unwrap().len(), 2);
    }

    #[test]
    fn graph_edges_count_weights_reasons_and_latency() {
        let recs: Vec<DecisionRecord> = (1..=100)
            .map(|i| {
                serde_json::from_str(&line(i, if i % 4 == 0 { "deny" } else { "allow" })).unwrap()
            })
            .collect();
        let g = graph(&recs, None, 100);
        assert_eq!(g.edges.len(), 1);
        let e = &g.edges[0];
        assert_eq!((e.allowed, e.denied), (75, 25));
        assert!(e.mtls);
        assert_eq!(e.denials.get("no_allow_at_tier"), Some(&25));
        assert_eq!(e.example_denied.as_deref(), Some("GET /x"));
        // 75 allowed durations 1..=99 ms (not multiples of 4); nearest rank: the
        // ceil(0.99 * 75) = 75th, the largest.
        assert_eq!(e.p99_ms, Some(99.0));
        assert!((e.rate_per_sec - 1.0).abs() < 1e-9);
    }
}
