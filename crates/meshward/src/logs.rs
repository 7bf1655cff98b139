//! `meshward logs`: the access log — every request's decision record (docs/decision-log.md)
//! — read from the sidecars' own files (`meshward up`'s `.meshward/proxies/*/decisions.jsonl`
//! or files named on the command line) or from the control plane's decision window, filtered
//! and printed as a table or as JSON lines; `--follow` keeps reading the files as the
//! sidecars write them, across rotations and sidecars that start later.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use meshward_policy::decision::Verdict;
use meshward_policy::decision_log::DecisionRecord;

use crate::Output;
use crate::control_cmd::Conn;

/// What to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// A SPIFFE ID, `namespace/serviceaccount`, or a namespace.
    pub source: Option<String>,
    /// A workload `namespace/name`, or a namespace.
    pub destination: Option<String>,
    pub verdict: Option<Verdict>,
    /// `403`, or a class: `4xx`, `5xx`.
    pub status: Option<String>,
    pub reason: Option<String>,
    /// Only records at most this old.
    pub since: Option<Duration>,
}

/// Where the records come from.
#[derive(Debug)]
pub enum From {
    /// A mesh directory of `meshward up`.
    Mesh(PathBuf),
    Files(Vec<PathBuf>),
    Control,
}

impl Filter {
    /// Checks the filter's own values before anything is read.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = &self.status {
            let ok = s.len() == 3
                && (s.bytes().all(|b| b.is_ascii_digit())
                    || (s.as_bytes()[0].is_ascii_digit() && &s[1..] == "xx"));
            if !ok {
                bail!("--status `{s}`: give a status such as 403, or a class such as 5xx");
            }
        }
        if let Some(r) = &self.reason
            && serde_json::from_value::<meshward_policy::Reason>(serde_json::json!(r)).is_err()
        {
            bail!(
                "--reason `{r}` is not a reason code (docs/decision-log.md lists them, e.g. denied_by_rule, no_allow_at_tier, rate_limited)"
            );
        }
        Ok(())
    }

    pub fn matches(&self, r: &DecisionRecord, now: SystemTime) -> bool {
        if let Some(s) = &self.source {
            let Some(id) = &r.source else { return false };
            if !(id == s
                || short_source(id).is_some_and(|(ns, sa)| *s == ns || *s == format!("{ns}/{sa}")))
            {
                return false;
            }
        }
        if let Some(d) = &self.destination
            && !(r.destination == *d || r.destination.split('/').next() == Some(d.as_str()))
        {
            return false;
        }
        if self.verdict.is_some_and(|v| v != r.verdict) {
            return false;
        }
        if let Some(s) = &self.status {
            let Some(st) = r.status else { return false };
            let st = st.to_string();
            let ok = if let Some(class) = s.strip_suffix("xx") {
                st.starts_with(class)
            } else {
                st == *s
            };
            if !ok {
                return false;
            }
        }
        if let Some(reason) = &self.reason
            && r.reason.as_str() != reason
        {
            return false;
        }
        if let Some(since) = self.since {
            match parse_ts(&r.ts) {
                Some(t) if now.duration_since(t).unwrap_or_default() <= since => {}
                _ => return false,
            }
        }
        true
    }
}

fn parse_ts(ts: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(ts.trim_end_matches('Z'))
        .ok()
        .or_else(|| humantime::parse_rfc3339(ts).ok())
}

/// `spiffe://td/ns/NS/sa/SA` → (NS, SA).
fn short_source(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("spiffe://")?;
    let path = &rest[rest.find('/')?..];
    let mut p = path.split('/').skip(1);
    match (p.next(), p.next(), p.next(), p.next(), p.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
        _ => None,
    }
}

/// One record as a table row.
pub fn row(r: &DecisionRecord) -> String {
    let source = match &r.source {
        None => "unauthenticated".to_owned(),
        Some(id) => short_source(id).map_or_else(|| id.clone(), |(ns, sa)| format!("{ns}/{sa}")),
    };
    let mut s = format!(
        "{} {:<8} {} -> {}:{}",
        r.ts, r.direction, source, r.destination, r.port
    );
    if let (Some(m), Some(p)) = (&r.method, &r.path) {
        s.push_str(&format!(" {m} {p}"));
    }
    s.push_str(&format!(
        " {}",
        r.status.map_or_else(|| "-".to_owned(), |c| c.to_string())
    ));
    if let Some(b) = r.response_bytes {
        s.push_str(&format!(" {b}B"));
    }
    if let Some(d) = r.duration_ns {
        s.push_str(&format!(" {:.1}ms", d as f64 / 1e6));
    }
    s.push_str(&format!(" {} {}", r.verdict.as_str(), r.reason.as_str()));
    if let Some(p) = &r.policy {
        s.push_str(&format!(" ({p}"));
        if let Some(rule) = &r.rule {
            s.push_str(&format!(" rule {rule}"));
        }
        s.push(')');
    }
    if let Some(e) = &r.endpoint {
        s.push_str(&format!(" endpoint {e}"));
    }
    if let Some(a) = r.attempts {
        s.push_str(&format!(" attempts {a}"));
    }
    if r.weight > 1 {
        s.push_str(&format!(" x{}", r.weight));
    }
    if let Some(d) = &r.detail {
        s.push_str(&format!(" [{d}]"));
    }
    s
}

fn print(r: &DecisionRecord, output: Output, out: &mut impl std::io::Write) -> std::io::Result<()> {
    match output {
        Output::Json => writeln!(out, "{}", r.to_line()),
        Output::Yaml => writeln!(out, "{}", output.doc(r).unwrap_or_default()),
        Output::Text => writeln!(out, "{}", row(r)),
    }
}

/// The decision logs of a mesh directory (`meshward up`'s, or one holding `.meshward/`).
fn mesh_files(dir: &Path) -> Vec<PathBuf> {
    let proxies = dir.join(".meshward").join("proxies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&proxies)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("decisions.jsonl"))
        .filter(|p| p.exists())
        .collect();
    files.sort();
    files
}

/// Parses the lines of `text` from `what`, reporting the first bad one.
fn parse(text: &str, what: &str, first_line: usize) -> Result<Vec<DecisionRecord>> {
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let r: DecisionRecord = serde_json::from_str(l)
            .with_context(|| format!("{what}:{}: not a decision record", first_line + i))?;
        out.push(r);
    }
    Ok(out)
}

/// `meshward logs`.
pub fn run(
    conn: &Conn,
    from: From,
    filter: &Filter,
    follow: bool,
    tail: Option<usize>,
    output: Output,
) -> Result<ExitCode> {
    filter.validate()?;
    let now = SystemTime::now();
    let mut out = std::io::stdout().lock();
    let files = match &from {
        From::Control => {
            if follow {
                bail!(
                    "--follow reads the sidecars' own files (--mesh DIR or --file F); the control plane's window is read once"
                );
            }
            let text = crate::control_cmd::fetch_decisions(conn, filter.since)?;
            let mut recs = parse(&text, "the control plane's decision window", 1)?;
            recs.retain(|r| filter.matches(r, now));
            recs.sort_by(|a, b| a.ts.cmp(&b.ts));
            let skip = tail.map_or(0, |n| recs.len().saturating_sub(n));
            for r in &recs[skip..] {
                print(r, output, &mut out)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        From::Files(f) => {
            for p in f {
                if !p.exists() {
                    bail!("{}: no such file", p.display());
                }
            }
            f.clone()
        }
        From::Mesh(dir) => {
            let f = mesh_files(dir);
            if f.is_empty() && !follow {
                bail!(
                    "no decision logs under {}: is `meshward up {}` running (or has it run) there?",
                    dir.join(".meshward/proxies").display(),
                    dir.display()
                );
            }
            f
        }
    };
    // What is there now: merged in time order.
    let mut readers: HashMap<PathBuf, Reader> = HashMap::new();
    let mut recs = vec![];
    for p in &files {
        let mut r = Reader::default();
        recs.extend(r.read(p)?);
        readers.insert(p.clone(), r);
    }
    recs.retain(|r| filter.matches(r, now));
    recs.sort_by(|a, b| a.ts.cmp(&b.ts));
    let skip = tail.map_or(0, |n| recs.len().saturating_sub(n));
    for r in &recs[skip..] {
        print(r, output, &mut out)?;
    }
    out.flush()?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    // Then as it is written: every file polled; a mesh's new sidecars joined.
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut now_files = files.clone();
        if let From::Mesh(dir) = &from {
            now_files = mesh_files(dir);
        }
        for p in now_files {
            let r = readers.entry(p.clone()).or_default();
            for rec in r.read(&p)? {
                if filter.matches(&rec, SystemTime::now()) {
                    print(&rec, output, &mut out)?;
                }
            }
        }
        if out.flush().is_err() {
            // The reader went away (`| head`).
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Reads a decision log from where it stopped: whole lines only, and across a rotation
/// (the sidecar renames the file to `.jsonl.1` and starts a new one), the old file's rest
/// first.
#[derive(Debug, Default)]
struct Reader {
    offset: u64,
    /// The file read so far (device, inode).
    id: Option<(u64, u64)>,
    /// Lines read so far (for error locations).
    line: usize,
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (m.dev(), m.ino())
}

impl Reader {
    fn read(&mut self, path: &Path) -> Result<Vec<DecisionRecord>> {
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(vec![]);
        };
        let mut recs = vec![];
        if self.id.is_some_and(|id| id != file_id(&meta)) {
            // Rotated: the rest of the file read so far, now `.jsonl.1`, then the new one.
            let old = path.with_extension("jsonl.1");
            if let Ok(m) = std::fs::metadata(&old)
                && Some(file_id(&m)) == self.id
            {
                recs.extend(self.read_from(&old)?);
            }
            self.offset = 0;
            self.line = 0;
        } else if meta.len() < self.offset {
            // Truncated in place.
            self.offset = 0;
            self.line = 0;
        }
        self.id = Some(file_id(&meta));
        recs.extend(self.read_from(path)?);
        Ok(recs)
    }

    fn read_from(&mut self, path: &Path) -> Result<Vec<DecisionRecord>> {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        // Only whole lines: a line being written is read next time.
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(vec![]);
        };
        let text = String::from_utf8_lossy(&buf[..=end]);
        let recs = parse(&text, &path.display().to_string(), self.line + 1)?;
        self.line += text.lines().count();
        self.offset += end as u64 + 1;
        Ok(recs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(line: &str) -> DecisionRecord {
        serde_json::from_str(line).unwrap()
    }

    const DENY: &str = r#"{"ts":"2026-12-06T10:00:00.000Z","revision":3,"direction":"inbound","source":"spiffe://shop.example/ns/web/sa/frontend","destination":"payments/payments-0","port":8080,"method":"POST","path":"/charge","verdict":"deny","reason":"no_allow_at_tier","decision_ns":900,"weight":1,"status":403}"#;

    #[test]
    fn filters_match_by_short_names_classes_and_reasons() {
        let r = rec(DENY);
        let now = parse_ts("2026-12-06T10:00:30.000Z").unwrap();
        let f = |f: Filter| f.matches(&r, now);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            source: Some("web/frontend".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            source: Some("web".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            source: Some("spiffe://shop.example/ns/web/sa/frontend".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            source: Some("web/front".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            destination: Some("payments".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            destination: Some("payments/payments".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            status: Some("4xx".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            status: Some("5xx".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            verdict: Some(Verdict::Deny),
            ..Default::default()
        }));
        assert!(!f(Filter {
            verdict: Some(Verdict::Allow),
            ..Default::default()
        }));
        assert!(f(Filter {
            reason: Some("no_allow_at_tier".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            since: Some(Duration::from_secs(60)),
            ..Default::default()
        }));
        assert!(!f(Filter {
            since: Some(Duration::from_secs(10)),
            ..Default::default()
        }));
        assert!(
            Filter {
                status: Some("40".into()),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Filter {
                reason: Some("nope".into()),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn a_row_names_the_edge_status_and_reason() {
        let s = row(&rec(DENY));
        assert_eq!(
            s,
            "2026-12-06T10:00:00.000Z inbound  web/frontend -> payments/payments-0:8080 POST /charge 403 deny no_allow_at_tier"
        );
    }

    #[test]
    fn the_reader_takes_whole_lines_and_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("decisions.jsonl");
        std::fs::write(&p, format!("{DENY}\n{}", &DENY[..20])).unwrap();
        let mut r = Reader::default();
        assert_eq!(r.read(&p).unwrap().len(), 1, "the half line waits");
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        write!(f, "{}\n{DENY}\n", &DENY[20..]).unwrap();
        assert_eq!(r.read(&p).unwrap().len(), 2);
        // The sidecar rotates after one more line; the new file gets two.
        writeln!(f, "{DENY}").unwrap();
        std::fs::rename(&p, p.with_extension("jsonl.1")).unwrap();
        std::fs::write(&p, format!("{DENY}\n{DENY}\n")).unwrap();
        assert_eq!(
            r.read(&p).unwrap().len(),
            3,
            "the old file's rest, then the new one"
        );
        assert!(r.read(&p).unwrap().is_empty());
        std::fs::write(&p, "{\"ts\":1}\n").unwrap();
        let e = r.read(&p).unwrap_err();
        assert!(
            format!("{e:#}").contains("decisions.jsonl:1: not a decision record"),
            "{e:#}"
        );
    }
}
