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
    /// Allowed requests answered with a 5xx (the app's, an injected abort's, or the
    /// proxy's own 502).
    pub errors: u64,
    pub rate_per_sec: f64,
    /// Whether the source proved an identity with mTLS (`false`: plaintext or refused).
    pub mtls: bool,
    /// Of allowed HTTP requests with a recorded duration.
    pub p99_ms: Option<f64>,
    /// Deny reason (and deciding policy) → requests.
    pub denials: BTreeMap<String, u64>,
    /// Deny reason (as in `denials`) → the latest request denied for that reason.
    pub denial_examples: BTreeMap<String, String>,
    /// The latest denied request: method and path, or the port for TCP.
    pub example_denied: Option<String>,
}

/// A `Service` with an availability objective, and how its workloads served in the
/// window: requests policy allowed, those answered with a 5xx, and the burn rate of the
/// error budget (error rate ÷ (1 − objective); 1 spends the budget exactly at the pace
/// the objective allows).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceHealth {
    pub id: String,
    pub workloads: Vec<String>,
    /// Percent (`spec.objective.availability`).
    pub objective: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    /// Fraction of requests answered without a 5xx; `None` without traffic.
    pub availability: Option<f64>,
    pub burn_rate: Option<f64>,
}

/// The service graph of a window of records.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Graph {
    pub window_secs: u64,
    pub records: usize,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub services: Vec<ServiceHealth>,
}

fn p99(mut v: Vec<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() as f64) * 0.99).ceil() as usize;
    Some(v[i.clamp(1, v.len()) - 1] as f64 / 1e6)
}

/// Error rate ÷ the error budget.
fn burn(objective: Option<f64>, requests: u64, errors: u64) -> Option<f64> {
    let budget = 1.0 - objective? / 100.0;
    (requests > 0 && budget > 0.0).then(|| errors as f64 / requests as f64 / budget)
}

/// Where a record belongs in the graph: `(source node, destination node)`, or `None` for
/// a record the graph does not count (an outbound record the destination's sidecar also
/// saw: a refusal by policy is the destination's, a served retry too).
fn endpoints(r: &DecisionRecord, set: Option<&PolicySet>) -> Option<(String, String)> {
    // Outbound records only add what the destination's sidecar cannot see: calls out of
    // the mesh and refusals at the source.
    if r.direction == "outbound" && (r.reason.is_policy() || r.reason == Reason::Retried) {
        return None;
    }
    let src = match &r.source {
        None => "unauthenticated".into(),
        Some(s) => set
            .and_then(|set| {
                let id = meshward_identity::SpiffeId::parse(s).ok()?;
                set.workload_by_identity(&id).map(|w| w.id.to_string())
            })
            .unwrap_or_else(|| s.clone()),
    };
    let dst = if r.destination.starts_with("external/") {
        "external".to_owned()
    } else {
        r.destination.clone()
    };
    Some((src, dst))
}

fn deny_key(r: &DecisionRecord) -> String {
    match &r.policy {
        Some(p) => format!("{} ({p})", r.reason),
        None => r.reason.to_string(),
    }
}

fn example(r: &DecisionRecord) -> String {
    match (&r.method, &r.path) {
        (Some(m), Some(p)) => format!("{m} {p}"),
        _ => format!("TCP port {}", r.port),
    }
}

fn is_error(r: &DecisionRecord) -> bool {
    r.verdict == Verdict::Allow && r.status.is_some_and(|s| s >= 500)
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
    #[derive(Default)]
    struct Acc {
        allowed: u64,
        denied: u64,
        errors: u64,
        mtls: bool,
        durations: Vec<u64>,
        denials: BTreeMap<String, u64>,
        examples: BTreeMap<String, String>,
        example: Option<String>,
    }
    let mut acc: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for r in records {
        let Some((src, dst)) = endpoints(r, set) else {
            continue;
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
                if is_error(r) {
                    a.errors += w;
                }
                if let Some(d) = r.duration_ns {
                    a.durations.push(d);
                }
            }
            Verdict::Deny => {
                a.denied += w;
                let key = deny_key(r);
                *a.denials.entry(key.clone()).or_default() += w;
                let ex = example(r);
                a.examples.insert(key, ex.clone());
                a.example = Some(ex);
            }
        }
    }
    let secs = window_secs.max(1) as f64;
    let edges: Vec<Edge> = acc
        .into_iter()
        .map(|((source, destination), a)| Edge {
            source,
            destination,
            rate_per_sec: (a.allowed + a.denied) as f64 / secs,
            allowed: a.allowed,
            denied: a.denied,
            errors: a.errors,
            mtls: a.mtls,
            p99_ms: p99(a.durations),
            denials: a.denials,
            denial_examples: a.examples,
            example_denied: a.example,
        })
        .collect();
    let services = set
        .map(|set| {
            set.services
                .iter()
                .map(|s| {
                    let workloads: Vec<String> = s
                        .workloads
                        .iter()
                        .filter_map(|&i| set.workloads.get(i))
                        .map(|w| w.id.to_string())
                        .collect();
                    let (requests, errors) = edges
                        .iter()
                        .filter(|e| workloads.contains(&e.destination))
                        .fold((0, 0), |(r, x), e| (r + e.allowed, x + e.errors));
                    ServiceHealth {
                        id: s.id.to_string(),
                        workloads,
                        objective: s.objective,
                        requests,
                        errors,
                        availability: (requests > 0).then(|| 1.0 - errors as f64 / requests as f64),
                        burn_rate: burn(s.objective, requests, errors),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Graph {
        window_secs,
        records: records.len(),
        nodes: nodes.into_values().collect(),
        edges,
        services,
    }
}

/// Which traffic a time series follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SeriesOf {
    /// Every edge of the graph.
    #[default]
    Mesh,
    /// One edge: source node → destination node (node ids as in the graph).
    Edge(String, String),
    /// What a node serves (its inbound edges).
    Node(String),
    /// What a `Service`'s workloads serve.
    Service(String),
}

/// One step of a time series.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Bucket {
    pub t_ms: i64,
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub denied_by_reason: BTreeMap<String, u64>,
    pub p99_ms: Option<f64>,
}

/// Something that changed the mesh, for the series' time axis.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Marker {
    pub t_ms: i64,
    /// `revision`, `override`, `fault`, `quarantine`, `rollout` or `drill`.
    pub kind: &'static str,
    pub label: String,
    pub detail: String,
}

/// A time series of the window, with the changes that happened in it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    pub start_ms: i64,
    pub step_ms: i64,
    pub buckets: Vec<Bucket>,
    /// The objective of the service followed (`SeriesOf::Service`, or a node that belongs
    /// to a service with one).
    pub objective: Option<f64>,
    /// Per bucket: error rate ÷ error budget (`None` without an objective or traffic).
    pub burn_rate: Vec<Option<f64>>,
    pub markers: Vec<Marker>,
}

/// Buckets `records` of `[start, start + n·step)` for `of`.
pub fn series(
    records: &[DecisionRecord],
    set: Option<&PolicySet>,
    of: &SeriesOf,
    start_ms: i64,
    step_ms: i64,
    steps: usize,
) -> Series {
    let step_ms = step_ms.max(1);
    let members: Vec<String> = match of {
        SeriesOf::Service(id) => set
            .and_then(|set| {
                let s = set.services.iter().find(|s| s.id.to_string() == *id)?;
                Some(
                    s.workloads
                        .iter()
                        .filter_map(|&i| set.workloads.get(i))
                        .map(|w| w.id.to_string())
                        .collect(),
                )
            })
            .unwrap_or_default(),
        SeriesOf::Node(n) => vec![n.clone()],
        _ => vec![],
    };
    let objective = set.and_then(|set| match of {
        SeriesOf::Service(id) => set
            .services
            .iter()
            .find(|s| s.id.to_string() == *id)
            .and_then(|s| s.objective),
        // The destination's: the first service of the workload with an objective.
        SeriesOf::Node(w) | SeriesOf::Edge(_, w) => set
            .services
            .iter()
            .filter(|s| {
                s.workloads
                    .iter()
                    .filter_map(|&i| set.workloads.get(i))
                    .any(|x| x.id.to_string() == *w)
            })
            .find_map(|s| s.objective),
        SeriesOf::Mesh => None,
    });
    let mut buckets: Vec<Bucket> = (0..steps)
        .map(|i| Bucket {
            t_ms: start_ms + step_ms * i as i64,
            ..Bucket::default()
        })
        .collect();
    let mut durations: Vec<Vec<u64>> = vec![vec![]; steps];
    for r in records {
        let Some((src, dst)) = endpoints(r, set) else {
            continue;
        };
        let wanted = match of {
            SeriesOf::Mesh => true,
            SeriesOf::Edge(s, d) => *s == src && *d == dst,
            SeriesOf::Node(_) | SeriesOf::Service(_) => members.contains(&dst),
        };
        let Some(t) = record_ms(r) else { continue };
        if !wanted || t < start_ms {
            continue;
        }
        let Ok(i) = usize::try_from((t - start_ms) / step_ms) else {
            continue;
        };
        let Some(b) = buckets.get_mut(i) else {
            continue;
        };
        let w = u64::from(r.weight.max(1));
        b.requests += w;
        match r.verdict {
            Verdict::Allow => {
                b.allowed += w;
                if is_error(r) {
                    b.errors += w;
                }
                if let Some(d) = r.duration_ns {
                    durations[i].push(d);
                }
            }
            Verdict::Deny => {
                b.denied += w;
                *b.denied_by_reason.entry(deny_key(r)).or_default() += w;
            }
        }
    }
    for (b, d) in buckets.iter_mut().zip(durations) {
        b.p99_ms = p99(d);
    }
    let burn_rate = buckets
        .iter()
        .map(|b| burn(objective, b.allowed, b.errors))
        .collect();
    Series {
        start_ms,
        step_ms,
        buckets,
        objective,
        burn_rate,
        markers: vec![],
    }
}

/// A record's time (its `ts`), in Unix milliseconds.
fn record_ms(r: &DecisionRecord) -> Option<i64> {
    r.time().map(ms)
}

/// Markers for the revisions of `[start_ms, …)`: each revision becomes a marker of the kind
/// of change it carried (a drill's, a fault, an override — the anomaly detector's throttles
/// and quarantines — or a plain policy revision).
pub fn revision_markers(revisions: &[crate::store::Revision], start_ms: i64) -> Vec<Marker> {
    revisions
        .iter()
        .filter(|r| r.created_ms >= start_ms)
        .map(|r| {
            let kind = if r.reason.starts_with("drill") {
                "drill"
            } else if r.reason.starts_with("rollout ") {
                "rollout"
            } else if r.reason.starts_with("anomaly detection") {
                // The detector's throttles and quarantines.
                "quarantine"
            } else if r.summary.contains("Override") {
                "override"
            } else if r.summary.contains("FaultInjection") {
                "fault"
            } else {
                "revision"
            };
            Marker {
                t_ms: r.created_ms,
                kind,
                label: format!("rev {}", r.rev),
                detail: if r.reason.is_empty() {
                    format!("{} by {}", r.summary, r.author)
                } else {
                    format!("{} by {} — {}", r.summary, r.author, r.reason)
                },
            }
        })
        .collect()
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

    fn rec(
        sec: u32,
        verdict: &str,
        reason: &str,
        policy: Option<&str>,
        path: &str,
        status: Option<u16>,
    ) -> DecisionRecord {
        let mut v = serde_json::json!({
            "ts": format!("2026-12-01T10:00:{sec:02}.000Z"),
            "source": "spiffe://shop.example/ns/web/sa/frontend",
            "destination": "orders/orders",
            "port": 80, "method": "GET", "path": path,
            "verdict": verdict, "reason": reason, "decision_ns": 1, "duration_ns": 1_000_000,
        });
        if let Some(p) = policy {
            v["policy"] = p.into();
        }
        if let Some(s) = status {
            v["status"] = s.into();
        }
        serde_json::from_value(v).unwrap()
    }

    fn shop() -> PolicySet {
        let repo = r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: shop.example}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: web}
spec: {ports: [{port: 9000, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: orders, namespace: orders, labels: {app: orders}}
spec: {ports: [{port: 80, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: orders, namespace: orders}
spec: {selector: {app: orders}, objective: {availability: 99}}
"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), repo).unwrap();
        let loaded = meshward_policy::load_path(dir.path());
        assert!(
            meshward_policy::lint::errors(&loaded, SystemTime::now()).is_empty(),
            "{:?}",
            meshward_policy::lint::errors(&loaded, SystemTime::now())
        );
        loaded.set.unwrap()
    }

    #[test]
    fn each_reason_keeps_its_own_example_and_services_burn_their_budget() {
        let set = shop();
        let mut recs = vec![
            rec(
                1,
                "deny",
                "no_allow_at_tier",
                Some("orders/a"),
                "/admin",
                None,
            ),
            rec(
                2,
                "deny",
                "denied_by_rule",
                Some("orders/b"),
                "/secret",
                None,
            ),
        ];
        // 96 answered, 4 of them 5xx: 4 % errors against a 1 % budget.
        for i in 0..96 {
            recs.push(rec(
                3 + i % 50,
                "allow",
                "allowed_by_rule",
                None,
                "/x",
                Some(if i < 4 { 503 } else { 200 }),
            ));
        }
        let g = graph(&recs, Some(&set), 60);
        let e = g
            .edges
            .iter()
            .find(|e| e.source == "web/frontend" && e.destination == "orders/orders")
            .unwrap();
        assert_eq!(
            e.denial_examples["no_allow_at_tier (orders/a)"],
            "GET /admin"
        );
        assert_eq!(
            e.denial_examples["denied_by_rule (orders/b)"],
            "GET /secret"
        );
        assert_eq!(e.errors, 4);
        let s = g.services.iter().find(|s| s.id == "orders/orders").unwrap();
        assert_eq!(s.objective, Some(99.0));
        assert_eq!((s.requests, s.errors), (96, 4));
        let burn = s.burn_rate.unwrap();
        assert!((burn - 4.0 / 96.0 / 0.01).abs() < 1e-9, "{burn}");
    }

    #[test]
    fn series_buckets_by_time_per_edge_with_the_services_objective() {
        let set = shop();
        let recs = vec![
            rec(0, "allow", "allowed_by_rule", None, "/x", Some(200)),
            rec(4, "allow", "allowed_by_rule", None, "/x", Some(500)),
            rec(
                12,
                "deny",
                "no_allow_at_tier",
                Some("orders/a"),
                "/admin",
                None,
            ),
            rec(25, "allow", "allowed_by_rule", None, "/x", Some(200)),
        ];
        let start = humantime::parse_rfc3339("2026-12-01T10:00:00Z")
            .map(ms)
            .unwrap();
        let of = SeriesOf::Edge("web/frontend".into(), "orders/orders".into());
        let s = series(&recs, Some(&set), &of, start, 10_000, 3);
        let counts: Vec<(u64, u64, u64)> = s
            .buckets
            .iter()
            .map(|b| (b.requests, b.denied, b.errors))
            .collect();
        assert_eq!(counts, vec![(2, 0, 1), (1, 1, 0), (1, 0, 0)]);
        assert_eq!(
            s.buckets[1].denied_by_reason["no_allow_at_tier (orders/a)"],
            1
        );
        assert_eq!(s.objective, Some(99.0));
        // 1 error in 2 answered against a 1 % budget: burning 50×.
        assert!((s.burn_rate[0].unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(s.burn_rate[1], None, "nothing answered");
        // Another edge sees nothing; the node view sees what orders served.
        let other = series(
            &recs,
            Some(&set),
            &SeriesOf::Edge("a".into(), "b".into()),
            start,
            10_000,
            3,
        );
        assert!(other.buckets.iter().all(|b| b.requests == 0));
        let node = series(
            &recs,
            Some(&set),
            &SeriesOf::Node("orders/orders".into()),
            start,
            10_000,
            3,
        );
        assert_eq!(node.buckets.iter().map(|b| b.requests).sum::<u64>(), 4);
    }

    #[test]
    fn revisions_become_markers_of_their_kind() {
        let rev = |rev: u64, author: &str, reason: &str, summary: &str| crate::store::Revision {
            rev,
            created_ms: 1_000 + rev as i64,
            author: author.into(),
            reason: reason.into(),
            summary: summary.into(),
            files: vec![],
        };
        let m = revision_markers(
            &[
                rev(1, "alice", "initial", "+AuthorizationPolicy a/b"),
                rev(
                    2,
                    "ci",
                    "drill slow: fault injected",
                    "+FaultInjection orders/drill",
                ),
                rev(3, "bob", "", "+FaultInjection orders/x"),
                rev(4, "bob", "incident", "+Override payments/inc-1"),
                rev(
                    5,
                    "detector",
                    "anomaly detection: quarantine x",
                    "+Override web/anomaly-q",
                ),
            ],
            1_002,
        );
        let kinds: Vec<&str> = m.iter().map(|m| m.kind).collect();
        assert_eq!(kinds, vec!["drill", "fault", "override", "quarantine"]);
        assert_eq!(m[0].label, "rev 2");
        assert!(m[0].detail.contains("drill slow"), "{}", m[0].detail);
    }
}
