//! `meshward policy …`: output and exit codes around the policy library.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use meshward_policy::decision_log::for_each_record;
use meshward_policy::diag::{self, Diagnostic};
use meshward_policy::engine::Engine;
use meshward_policy::model::{Loaded, PolicySet, load_path};
use meshward_policy::resource::{OneOrMany, ScenarioRequest, Time};
use meshward_policy::{
    diff as sdiff, impact as simpact, lint as slint, reference, scenario, suggest as ssuggest,
};

use crate::{LintFormat, Output};

fn parse_time(t: Option<&str>) -> Result<SystemTime> {
    match t {
        None => Ok(SystemTime::now()),
        Some(s) => Time::parse(s).map(|t| t.0).map_err(anyhow::Error::msg),
    }
}

/// Loads a set that must be free of errors; prints the diagnostics otherwise.
fn load_valid(dir: &Path) -> Result<PolicySet> {
    let loaded = load_path(dir);
    match loaded.into_valid() {
        Ok(set) => Ok(set),
        Err(l) => {
            let errors: Vec<Diagnostic> = l
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .cloned()
                .collect();
            eprint!("{}", diag::render_text(&errors, &l.sources));
            bail!(
                "the policy set in `{}` has {} error(s); fix them (see `meshward policy lint {}`)",
                dir.display(),
                errors.len(),
                dir.display()
            )
        }
    }
}

fn all_diagnostics(loaded: &Loaded, now: SystemTime) -> Vec<Diagnostic> {
    let mut d = loaded.diagnostics.clone();
    if let Some(set) = &loaded.set {
        d.extend(slint::lint(set, now));
    }
    d.sort_by(|a, b| (&a.file, a.line, a.column, a.code).cmp(&(&b.file, b.line, b.column, b.code)));
    d.dedup();
    d
}

pub fn lint(dir: &Path, format: LintFormat, now: Option<&str>) -> Result<ExitCode> {
    let now = parse_time(now)?;
    let loaded = load_path(dir);
    let mut diags = all_diagnostics(&loaded, now);
    // Drills beside the policies: the drill's own checks (`meshward drill run` runs the
    // same before it changes anything). A directory of drills alone has no policy set
    // to miss a Mesh.
    let (drills, others) = drill_files(dir);
    if !drills.is_empty() && others == 0 {
        diags.retain(|d| d.code != "MW204");
    }
    for f in &drills {
        if let Err(e) = crate::drill::check(f) {
            diags.push(drill_diagnostic(f, &format!("{e:#}")));
        }
    }
    let out = match format {
        LintFormat::Text => diag::render_text(&diags, &loaded.sources),
        LintFormat::Json => diag::render_json(&diags) + "\n",
        LintFormat::Yaml => {
            crate::to_yaml(&serde_json::from_str(&diag::render_json(&diags))?) + "\n"
        }
        LintFormat::Sarif => {
            // Code scanning maps URIs relative to the repository's root: the nearest
            // directory above the working directory with `.git`, else the working directory.
            let cwd = std::env::current_dir()?;
            let root = cwd
                .ancestors()
                .find(|d| d.join(".git").exists())
                .unwrap_or(&cwd)
                .to_path_buf();
            diag::render_sarif(&diags, env!("CARGO_PKG_VERSION"), &root, &cwd) + "\n"
        }
    };
    print!("{out}");
    Ok(if diags.iter().any(Diagnostic::is_error) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The YAML files under `dir` with a `kind: Drill` document, and how many documents of
/// other kinds there are.
fn drill_files(dir: &Path) -> (Vec<PathBuf>, usize) {
    let mut drills = vec![];
    let mut others = 0;
    for f in meshward_policy::model::yaml_files(dir).unwrap_or_default() {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let docs = meshward_policy::yaml::parse_documents(&text).unwrap_or_default();
        let is_drill = |d: &meshward_policy::yaml::Node| {
            d.get("kind").and_then(meshward_policy::yaml::Node::as_str)
                == Some(meshward_policy::model::DRILL)
        };
        others += docs.iter().filter(|d| !is_drill(d)).count();
        if docs.iter().any(is_drill) {
            drills.push(f);
        }
    }
    (drills, others)
}

/// A drill's error (`file:line: field: why`, or `file: why`) as a lint diagnostic.
fn drill_diagnostic(f: &Path, e: &str) -> Diagnostic {
    let file = f.display().to_string();
    let rest = e
        .strip_prefix(&format!("{file}:"))
        .unwrap_or(e)
        .trim_start();
    let (line, rest) = match rest.split_once(':') {
        Some((n, r)) if n.parse::<u32>().is_ok() => (n.parse().unwrap_or(1), r.trim_start()),
        _ => (1, rest),
    };
    // `spec.steps[0]: why`, or `COL: why` from the YAML parser.
    let (field, message) = match rest.split_once(": ") {
        Some((f, m)) if f.starts_with("spec") || f == "kind" || f == "metadata" => {
            (Some(f.to_owned()), m.to_owned())
        }
        Some((c, m)) if c.parse::<u32>().is_ok() => (None, m.to_owned()),
        _ => (None, rest.to_owned()),
    };
    Diagnostic {
        code: "MW110",
        severity: diag::Severity::Error,
        message,
        help: Some("see docs/drills.md for the step and expectation vocabulary".into()),
        file: file.into(),
        line,
        column: 1,
        field,
        resource: None,
    }
}

pub fn test(
    dir: &Path,
    junit: Option<&Path>,
    output: Output,
    now: Option<&str>,
) -> Result<ExitCode> {
    let now = parse_time(now)?;
    let set = load_valid(dir)?;
    let engine = Engine::compile(&set);
    let results = scenario::run(&set, &engine, now);
    if let Some(path) = junit {
        std::fs::write(path, scenario::junit(&results))
            .with_context(|| format!("cannot write JUnit XML to `{}`", path.display()))?;
    }
    let passed = results.iter().filter(|r| r.passed).count();
    let failed = results.len() - passed;
    if let Some(d) =
        output.doc(&serde_json::json!({ "passed": passed, "failed": failed, "results": results }))
    {
        println!("{d}");
    } else {
        for r in &results {
            if r.passed {
                println!("ok    {} :: {}", r.test, r.name);
            } else {
                println!("FAIL  {} :: {}  ({}:{})", r.test, r.name, r.file, r.line);
                for f in &r.failures {
                    println!("      {f}");
                }
                if let Some(t) = &r.trace {
                    println!("      trace:");
                    for line in scenario::render_trace(t).lines() {
                        println!("    {line}");
                    }
                }
            }
        }
        if results.is_empty() {
            println!("no PolicyTest scenarios found in `{}`", dir.display());
        }
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Arguments of `policy explain`.
#[derive(Debug)]
pub struct ExplainInput {
    pub dir: PathBuf,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub headers: Vec<String>,
    pub at: Option<String>,
    pub output: Output,
}

pub fn explain(a: &ExplainInput) -> Result<ExitCode> {
    let set = load_valid(&a.dir)?;
    let at = parse_time(a.at.as_deref())?;
    let mut headers: BTreeMap<String, OneOrMany> = BTreeMap::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("`--header {h}`: write NAME=VALUE"))?;
        headers
            .entry(k.to_owned())
            .or_insert_with(|| OneOrMany(vec![]))
            .0
            .push(v.to_owned());
    }
    let sr = ScenarioRequest {
        from: a.from.clone(),
        to: a.to.clone(),
        port: a.port,
        method: a.method.clone(),
        path: a.path.clone(),
        host: a.host.clone(),
        headers,
        at: None,
    };
    let req = scenario::build_request(&set, &sr, at).map_err(anyhow::Error::msg)?;
    if set.workload(&req.destination).is_none() {
        let names: Vec<String> = set.workloads.iter().map(|w| w.id.to_string()).collect();
        bail!(
            "`{}` is not a workload of this policy set; known workloads: {}",
            a.to,
            names.join(", ")
        );
    }
    let (reference_decision, trace) = reference::explain(&set, &req);
    let d = Engine::compile(&set).decide(&req);
    if !d.same_outcome(&reference_decision) {
        bail!(
            "internal error: the compiled engine and the reference evaluator disagree on this request; please report it with the policy set"
        );
    }
    if let Some(doc) = a
        .output
        .doc(&serde_json::json!({ "decision": d, "trace": trace }))
    {
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "request: {} -> {} port {}{}",
        req.source,
        req.destination,
        req.port,
        req.http
            .as_ref()
            .map(|h| format!(" {} {}", h.method, h.path))
            .unwrap_or_else(|| " (tcp)".into())
    );
    print!("{}", scenario::render_trace(&trace));
    println!(
        "verdict: {} ({}){}{}",
        d.verdict.as_str().to_uppercase(),
        d.reason,
        d.policy
            .as_deref()
            .map(|p| format!(" by `{p}`"))
            .unwrap_or_default(),
        d.rule
            .as_deref()
            .map(|r| format!(" rule `{r}`"))
            .unwrap_or_default()
    );
    if let Some(s) = &d.shadow {
        println!(
            "shadow (dry-run) verdict: {} ({}){}",
            s.verdict.as_str().to_uppercase(),
            s.reason,
            s.policy
                .as_deref()
                .map(|p| format!(" by `{p}`"))
                .unwrap_or_default()
        );
    }
    for m in &d.audit {
        println!("audit mark: `{}` rule `{}`", m.policy, m.rule);
    }
    println!("policy revision: {}", d.revision);
    Ok(ExitCode::SUCCESS)
}

pub fn diff(
    old: &Path,
    new: &Path,
    output: Output,
    at: Option<&str>,
    exit_code: bool,
) -> Result<ExitCode> {
    let at = parse_time(at)?;
    let (a, b) = (load_valid(old)?, load_valid(new)?);
    let pb = indicatif::ProgressBar::new(0);
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} comparing destination {pos}/{len} [{bar:30}] eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    let d = sdiff::diff_with_progress(&a, &b, at, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    if let Some(doc) = output.doc(&d) {
        println!("{doc}");
    } else {
        if d.changes.is_empty() {
            println!(
                "no edge changes verdict ({} edges compared, {} destinations unchanged)",
                d.edges_compared, d.destinations_unchanged
            );
        }
        for c in &d.changes {
            let op = match (&c.method, &c.path) {
                (Some(m), Some(p)) => format!("{m} {p}"),
                _ => "tcp".into(),
            };
            println!(
                "{} {} -> {} port {} {}: {} ({}) -> {} ({}){}",
                if c.new == meshward_policy::Verdict::Allow {
                    "+"
                } else {
                    "-"
                },
                c.source,
                c.destination,
                c.port,
                op,
                c.old,
                c.old_reason,
                c.new,
                c.new_reason,
                c.new_policy
                    .as_deref()
                    .map(|p| format!(" by `{p}`"))
                    .unwrap_or_default()
            );
        }
        if !d.changes.is_empty() {
            println!(
                "{} edge(s) change verdict ({} compared, {} destinations unchanged)",
                d.changes.len(),
                d.edges_compared,
                d.destinations_unchanged
            );
        }
    }
    Ok(if exit_code && !d.changes.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Where decision records come from: a file (or `-`), or the control plane's window.
#[derive(Debug)]
pub enum LogSource {
    File(PathBuf),
    /// The JSON lines fetched from the control plane.
    Control(String),
}

impl LogSource {
    pub fn new(
        log: Option<PathBuf>,
        from_control: bool,
        window: Option<std::time::Duration>,
        conn: &crate::control_cmd::Conn,
    ) -> Result<Self> {
        match (log, from_control) {
            (Some(p), false) => Ok(LogSource::File(p)),
            (None, true) => Ok(LogSource::Control(crate::control_cmd::fetch_decisions(
                conn, window,
            )?)),
            _ => anyhow::bail!("pass --log FILE or --from-control"),
        }
    }

    fn open(&self) -> Result<(Box<dyn Read>, Option<u64>)> {
        match self {
            LogSource::File(p) => open_log(p),
            LogSource::Control(text) => {
                let len = text.len() as u64;
                Ok((
                    Box::new(std::io::Cursor::new(text.clone().into_bytes())),
                    Some(len),
                ))
            }
        }
    }

    fn label(&self) -> String {
        match self {
            LogSource::File(p) => p.display().to_string(),
            LogSource::Control(_) => "the control plane's decision window".into(),
        }
    }
}

fn open_log(log: &Path) -> Result<(Box<dyn Read>, Option<u64>)> {
    if log == Path::new("-") {
        return Ok((Box::new(std::io::stdin()), None));
    }
    let f = File::open(log)
        .with_context(|| format!("cannot open the decision log `{}`", log.display()))?;
    let len = f.metadata().ok().map(|m| m.len());
    Ok((Box::new(f), len))
}

fn progress(len: Option<u64>) -> indicatif::ProgressBar {
    let pb = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} replaying {bytes}/{total_bytes} [{bar:20}] {percent}% eta {eta} {msg}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

pub fn impact(
    dir: &Path,
    log: &LogSource,
    at: Option<&str>,
    output: Output,
    exit_code: bool,
) -> Result<ExitCode> {
    let set = load_valid(dir)?;
    let at = at.map(|t| parse_time(Some(t))).transpose()?;
    let engine = Engine::compile(&set);
    let (reader, len) = log.open()?;
    let pb = progress(len);
    let mut replay = simpact::Replay::new(&engine, at);
    let mut n = 0u64;
    for_each_record(
        BufReader::with_capacity(1 << 16, reader),
        |line, bytes, rec| {
            replay.add(line, rec);
            n += 1;
            if n.is_multiple_of(4096) {
                pb.set_position(bytes);
                pb.set_message(format!("{n} records"));
            }
        },
    )
    .with_context(|| format!("cannot read {}", log.label()))?;
    pb.finish_and_clear();
    let r = replay.finish();
    if let Some(doc) = output.doc(&r) {
        println!("{doc}");
    } else {
        println!(
            "replayed {} records ({} requests) against `{}`: {} allowed would be denied, {} denied would be allowed",
            r.records,
            r.requests,
            dir.display(),
            r.allow_to_deny_requests,
            r.deny_to_allow_requests
        );
        for f in &r.flips {
            let op = match (&f.method, &f.path) {
                (Some(m), Some(p)) => format!("{m} {p}"),
                _ => "tcp".into(),
            };
            println!(
                "  {:>6} x  {} -> {} port {} {}: {} -> {} ({}{})  e.g. line {}",
                f.requests,
                f.source,
                f.destination,
                f.port,
                op,
                f.recorded,
                f.candidate,
                f.candidate_reason,
                f.candidate_policy
                    .as_deref()
                    .map(|p| format!(" by `{p}`"))
                    .unwrap_or_default(),
                f.example_lines.first().copied().unwrap_or_default()
            );
        }
        if r.skipped > 0 {
            println!(
                "skipped {} records no policy decided (rate limits, handshakes, ports, egress)",
                r.skipped
            );
        }
        if r.invalid_lines > 0 {
            println!("{} invalid line(s) ignored:", r.invalid_lines);
            for (l, e) in &r.invalid_examples {
                println!("  line {l}: {e}");
            }
        }
    }
    let flips = r.allow_to_deny_records + r.deny_to_allow_records;
    Ok(if exit_code && flips > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn suggest(log: &LogSource, collapse_above: usize, out: Option<&Path>) -> Result<ExitCode> {
    let (reader, len) = log.open()?;
    let pb = progress(len);
    let mut obs = ssuggest::Observed::default();
    let mut invalid = 0u64;
    for_each_record(
        BufReader::with_capacity(1 << 16, reader),
        |_, bytes, rec| {
            match rec {
                Ok(r) => obs.add(&r),
                Err(_) => invalid += 1,
            }
            pb.set_position(bytes);
        },
    )
    .with_context(|| format!("cannot read {}", log.label()))?;
    pb.finish_and_clear();
    if invalid > 0 {
        eprintln!(
            "warning: {invalid} invalid line(s) in {} were ignored",
            log.label()
        );
    }
    let yaml = ssuggest::suggest(&obs, ssuggest::SuggestOptions { collapse_above });
    match out {
        Some(p) => {
            std::fs::write(p, yaml).with_context(|| format!("cannot write `{}`", p.display()))?
        }
        None => std::io::stdout().write_all(yaml.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}
