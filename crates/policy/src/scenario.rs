//! `PolicyTest` scenarios: requests with the verdict (and reason, policy, rule) they must
//! get. Run with the compiled engine, the one the proxy runs; failures are explained with
//! the reference evaluator's trace.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::decision::{Decision, HttpAttrs, Request, Source, WorkloadRef};
use crate::engine::Engine;
use crate::matcher::normalize_host;
use crate::model::PolicySet;
use crate::path;
use crate::reference::{self, Trace};
use crate::resource::{Scenario, ScenarioRequest};

/// The outcome of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// `namespace/name` of the `PolicyTest`.
    pub test: Arc<str>,
    pub name: String,
    pub file: Arc<str>,
    pub line: u32,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub failures: Vec<String>,
    pub decision: Option<Decision>,
    #[serde(skip)]
    pub trace: Option<Trace>,
}

/// Turns a scenario's request into an engine request, normalizing the path as the proxy
/// would. The request is HTTP when the destination declares the port as HTTP, or when it
/// names a method or path.
pub fn build_request(
    set: &PolicySet,
    r: &ScenarioRequest,
    at: SystemTime,
) -> Result<Request, String> {
    let source = Source::parse(&r.from)?;
    let destination = WorkloadRef::parse(&r.to)?;
    let declared_http = set
        .workload(&destination)
        .and_then(|w| w.protocol(r.port))
        .map(|p| p.is_http());
    let wants_http =
        r.method.is_some() || r.path.is_some() || r.host.is_some() || !r.headers.is_empty();
    if declared_http == Some(false) && wants_http {
        return Err(format!(
            "port {} of `{destination}` carries plain TCP: a request there has no method, path, host or headers",
            r.port
        ));
    }
    let http = if declared_http == Some(true) || (declared_http.is_none() && wants_http) {
        let raw = r.path.clone().unwrap_or_else(|| "/".into());
        let norm = path::normalize(&raw).map_err(|e| format!("the proxy would answer 400: {e}"))?;
        let mut headers = vec![];
        for (k, vs) in &r.headers {
            for v in &vs.0 {
                headers.push((k.to_ascii_lowercase(), v.clone()));
            }
        }
        Some(HttpAttrs {
            method: r.method.clone().unwrap_or_else(|| "GET".into()),
            path: norm.path,
            host: r.host.as_deref().map(normalize_host),
            headers,
        })
    } else {
        None
    };
    Ok(Request {
        source,
        destination,
        port: r.port,
        http,
        at: r.at.map_or(at, |t| t.0),
    })
}

fn check(s: &Scenario, d: &Decision) -> Vec<String> {
    let mut f = vec![];
    if d.verdict != s.expect.verdict {
        f.push(format!(
            "expected verdict {}, got {}",
            s.expect.verdict, d.verdict
        ));
    }
    if let Some(r) = s.expect.reason
        && r != d.reason
    {
        f.push(format!("expected reason {r}, got {}", d.reason));
    }
    if let Some(p) = &s.expect.policy
        && d.policy.as_deref() != Some(p.as_str())
    {
        f.push(format!(
            "expected deciding policy `{p}`, got {}",
            d.policy
                .as_deref()
                .map_or("none".into(), |x| format!("`{x}`"))
        ));
    }
    if let Some(r) = &s.expect.rule
        && d.rule.as_deref() != Some(r.as_str())
    {
        f.push(format!(
            "expected deciding rule `{r}`, got {}",
            d.rule
                .as_deref()
                .map_or("none".into(), |x| format!("`{x}`"))
        ));
    }
    f
}

/// Runs every scenario of every `PolicyTest` in the set.
pub fn run(set: &PolicySet, engine: &Engine, now: SystemTime) -> Vec<ScenarioResult> {
    let mut out = vec![];
    for t in &set.tests {
        let default_at = t.spec.at.map_or(now, |x| x.0);
        for (i, s) in t.spec.scenarios.iter().enumerate() {
            let line = t.origin.span(&crate::p!["spec", "scenarios", i]).line;
            let base = ScenarioResult {
                test: t.id.clone(),
                name: s.name.clone(),
                file: t.origin.file.clone(),
                line,
                passed: false,
                failures: vec![],
                decision: None,
                trace: None,
            };
            match build_request(set, &s.request, default_at) {
                Err(e) => out.push(ScenarioResult {
                    failures: vec![e],
                    ..base
                }),
                Ok(req) => {
                    let d = engine.decide(&req);
                    let failures = check(s, &d);
                    let trace = (!failures.is_empty()).then(|| reference::explain(set, &req).1);
                    out.push(ScenarioResult {
                        passed: failures.is_empty(),
                        failures,
                        decision: Some(d),
                        trace,
                        ..base
                    });
                }
            }
        }
    }
    out
}

/// Renders a trace for people, one step a line.
pub fn render_trace(trace: &Trace) -> String {
    let mut s = String::new();
    for st in &trace.steps {
        let mark = if st.matched { "✔" } else { "·" };
        let tier = st
            .tier
            .map_or(String::new(), |t| format!("[{}] ", t.as_str()));
        let _ = writeln!(s, "  step {} {mark} {tier}{}", st.step, st.what);
    }
    s
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// JUnit XML for CI systems.
pub fn junit(results: &[ScenarioResult]) -> String {
    let mut by_test: Vec<(&str, Vec<&ScenarioResult>)> = vec![];
    for r in results {
        match by_test.iter_mut().find(|(t, _)| *t == &*r.test) {
            Some((_, v)) => v.push(r),
            None => by_test.push((&r.test, vec![r])),
        }
    }
    let failures = results.iter().filter(|r| !r.passed).count();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"meshward policy test\" tests=\"{}\" failures=\"{failures}\" errors=\"0\">",
        results.len()
    );
    for (t, rs) in by_test {
        let f = rs.iter().filter(|r| !r.passed).count();
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\" errors=\"0\">",
            xml_escape(t),
            rs.len()
        );
        for r in rs {
            let _ = write!(
                x,
                "    <testcase classname=\"{}\" name=\"{}\" file=\"{}\" line=\"{}\"",
                xml_escape(t),
                xml_escape(&r.name),
                xml_escape(&r.file),
                r.line
            );
            if r.passed {
                x.push_str("/>\n");
            } else {
                let msg = r.failures.join("; ");
                let body = r.trace.as_ref().map(render_trace).unwrap_or_default();
                let _ = writeln!(
                    x,
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                    xml_escape(&msg),
                    xml_escape(&body)
                );
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}
