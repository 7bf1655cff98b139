//! Impact analysis: replays a recorded decision log against a candidate policy set and
//! reports exactly which recorded requests would flip verdict, grouped by edge.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use crate::decision::{Reason, Verdict};
use crate::decision_log::DecisionRecord;
use crate::engine::Engine;

/// One edge (source, destination, port, method, path) whose recorded requests flip.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeFlip {
    pub source: String,
    pub destination: String,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    pub recorded: Verdict,
    pub candidate: Verdict,
    pub candidate_reason: Reason,
    pub candidate_policy: Option<String>,
    /// Log records that flip.
    pub records: u64,
    /// Requests they stand for (records weighted by their sampling).
    pub requests: u64,
    /// Line numbers of the first few records, to find them in the log.
    pub example_lines: Vec<u64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ImpactReport {
    pub records: u64,
    pub requests: u64,
    pub allow_to_deny_records: u64,
    pub allow_to_deny_requests: u64,
    pub deny_to_allow_records: u64,
    pub deny_to_allow_requests: u64,
    /// Records not replayed because no policy decided them (e.g. rate limited).
    pub skipped: u64,
    pub invalid_lines: u64,
    /// The first invalid lines with the reason.
    pub invalid_examples: Vec<(u64, String)>,
    pub flips: Vec<EdgeFlip>,
}

type Key = (
    String,
    String,
    u16,
    Option<String>,
    Option<String>,
    Verdict,
    Verdict,
);

/// Accumulates a replay.
#[derive(Debug)]
pub struct Replay<'e> {
    engine: &'e Engine,
    at: Option<SystemTime>,
    report: ImpactReport,
    flips: BTreeMap<Key, EdgeFlip>,
}

impl<'e> Replay<'e> {
    /// `at` evaluates every record at that time instead of its own (overrides differ).
    pub fn new(engine: &'e Engine, at: Option<SystemTime>) -> Self {
        Replay {
            engine,
            at,
            report: ImpactReport::default(),
            flips: BTreeMap::new(),
        }
    }

    /// Adds one line of the log.
    pub fn add(&mut self, line: u64, rec: Result<DecisionRecord, String>) {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => return self.invalid(line, e),
        };
        if !rec.reason.is_policy() || rec.direction != "inbound" {
            self.report.skipped += 1;
            return;
        }
        let mut req = match rec.to_request() {
            Ok(r) => r,
            Err(e) => return self.invalid(line, e),
        };
        if let Some(t) = self.at {
            req.at = t;
        }
        let w = u64::from(rec.weight.max(1));
        self.report.records += 1;
        self.report.requests += w;
        let d = self.engine.decide(&req);
        if d.verdict == rec.verdict {
            return;
        }
        if rec.verdict == Verdict::Allow {
            self.report.allow_to_deny_records += 1;
            self.report.allow_to_deny_requests += w;
        } else {
            self.report.deny_to_allow_records += 1;
            self.report.deny_to_allow_requests += w;
        }
        let key: Key = (
            rec.source
                .clone()
                .unwrap_or_else(|| "unauthenticated".into()),
            rec.destination.clone(),
            rec.port,
            rec.method.clone(),
            rec.path.clone(),
            rec.verdict,
            d.verdict,
        );
        let e = self.flips.entry(key).or_insert_with(|| EdgeFlip {
            source: rec
                .source
                .clone()
                .unwrap_or_else(|| "unauthenticated".into()),
            destination: rec.destination.clone(),
            port: rec.port,
            method: rec.method.clone(),
            path: rec.path.clone(),
            recorded: rec.verdict,
            candidate: d.verdict,
            candidate_reason: d.reason,
            candidate_policy: d.policy.as_deref().map(String::from),
            records: 0,
            requests: 0,
            example_lines: vec![],
        });
        e.records += 1;
        e.requests += w;
        if e.example_lines.len() < 3 {
            e.example_lines.push(line);
        }
    }

    fn invalid(&mut self, line: u64, e: String) {
        self.report.invalid_lines += 1;
        if self.report.invalid_examples.len() < 10 {
            self.report.invalid_examples.push((line, e));
        }
    }

    /// The report, flips ordered by request count (largest first).
    pub fn finish(mut self) -> ImpactReport {
        let mut flips: Vec<EdgeFlip> = self.flips.into_values().collect();
        flips.sort_by(|a, b| {
            b.requests.cmp(&a.requests).then_with(|| {
                (&a.source, &a.destination, a.port, &a.method, &a.path).cmp(&(
                    &b.source,
                    &b.destination,
                    b.port,
                    &b.method,
                    &b.path,
                ))
            })
        });
        self.report.flips = flips;
        self.report
    }
}
