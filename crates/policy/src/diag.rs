//! Diagnostics: every problem found in a policy repository, with a stable code, the file,
//! line, column and field it concerns, and a way to fix it. Rendered for people (rustc-like,
//! with the source line), as JSON, or as SARIF 2.1.0 for code-scanning tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

use crate::yaml::Span;

/// How bad a diagnostic is. Errors block `apply` and make `lint` exit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Note,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Stable code, `MW1xx` syntax and schema, `MW2xx` references, `MW3xx` semantics.
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    pub file: Arc<str>,
    pub line: u32,
    pub column: u32,
    /// The field path inside the document, e.g. `spec.rules[0].from[0].identities[1]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `Kind namespace/name` of the resource, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

impl Diagnostic {
    pub fn new(
        code: &'static str,
        severity: Severity,
        file: &Arc<str>,
        span: Span,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            code,
            severity,
            message: message.into(),
            help: None,
            file: file.clone(),
            line: span.line,
            column: span.col,
            field: None,
            resource: None,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        let f = field.into();
        if !f.is_empty() {
            self.field = Some(f);
        }
        self
    }

    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The text of every file read, for source snippets.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    files: BTreeMap<Arc<str>, Arc<str>>,
}

impl Sources {
    pub fn insert(&mut self, file: Arc<str>, text: Arc<str>) {
        self.files.insert(file, text);
    }

    pub fn line(&self, file: &str, line: u32) -> Option<&str> {
        let text = self.files.get(file)?;
        crate::yaml::lines(text)
            .get(usize::try_from(line).ok()?.checked_sub(1)?)
            .copied()
    }
}

/// Renders diagnostics as rustc does, with the source line and a caret under the field.
pub fn render_text(diags: &[Diagnostic], sources: &Sources) -> String {
    let mut out = String::new();
    for d in diags {
        let _ = writeln!(out, "{}[{}]: {}", d.severity.as_str(), d.code, d.message);
        let lno = d.line.to_string();
        let pad = " ".repeat(lno.len());
        if d.line == 0 {
            let _ = writeln!(out, "{pad}--> {}", d.file);
        } else {
            let _ = writeln!(out, "{pad}--> {}:{}:{}", d.file, d.line, d.column);
        }
        if let Some(src) = sources.line(&d.file, d.line) {
            let col = usize::try_from(d.column.saturating_sub(1)).unwrap_or(0);
            let rest = src.get(col..).unwrap_or("");
            let len = rest
                .find([':', ',', ']', '}', '#'])
                .unwrap_or(rest.len())
                .max(1);
            let len = rest[..len.min(rest.len())].trim_end().len().max(1);
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{lno} | {src}");
            let _ = writeln!(out, "{pad} | {}{}", " ".repeat(col), "^".repeat(len));
        }
        if let Some(r) = &d.resource {
            let _ = writeln!(out, "{pad} = in: {r}");
        }
        if let Some(f) = &d.field {
            let _ = writeln!(out, "{pad} = field: {f}");
        }
        if let Some(h) = &d.help {
            let _ = writeln!(out, "{pad} = help: {h}");
        }
        out.push('\n');
    }
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diags
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .count();
    let _ = writeln!(out, "{errors} error(s), {warnings} warning(s)");
    out
}

/// Renders diagnostics as a JSON array.
pub fn render_json(diags: &[Diagnostic]) -> String {
    serde_json::to_string_pretty(diags).unwrap_or_else(|_| "[]".into())
}

/// Percent-encodes a path for a URI (RFC 3986): every byte but the unreserved characters
/// and `/` (so `my policies/a.yaml` is `my%20policies/a.yaml`).
fn uri_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.replace('\\', "/").bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a diagnostic's file is, as code scanning reads it: relative to `root` (the
/// repository's root) with `uriBaseId` `%SRCROOT%` when the file is under it, else an
/// absolute `file://` URI; percent-encoded either way.
fn sarif_location(file: &str, root: &std::path::Path, cwd: &std::path::Path) -> serde_json::Value {
    // Lexically: `../x` and `./x` as the path they name.
    let mut abs = std::path::PathBuf::new();
    for c in cwd.join(file).components() {
        match c {
            std::path::Component::ParentDir => {
                abs.pop();
            }
            std::path::Component::CurDir => {}
            c => abs.push(c),
        }
    }
    match abs.strip_prefix(root) {
        Ok(rel) => serde_json::json!({
            "uri": uri_path(&rel.to_string_lossy()),
            "uriBaseId": "%SRCROOT%",
        }),
        Err(_) => {
            serde_json::json!({ "uri": format!("file://{}", uri_path(&abs.to_string_lossy())) })
        }
    }
}

/// Renders diagnostics as a SARIF 2.1.0 log. Artifact URIs are relative to `root` (the
/// repository's root, `%SRCROOT%`) for files under it, files named relative to `cwd`.
pub fn render_sarif(
    diags: &[Diagnostic],
    version: &str,
    root: &std::path::Path,
    cwd: &std::path::Path,
) -> String {
    let rules: Vec<serde_json::Value> = crate::lint::CODES
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.code,
                "name": c.name,
                "shortDescription": { "text": c.summary },
                "fullDescription": { "text": c.summary },
                "defaultConfiguration": { "level": sarif_level(c.severity) },
                "helpUri": format!("https://meshward.io/docs/policy#{}", c.code.to_ascii_lowercase()),
            })
        })
        .collect();
    let results: Vec<serde_json::Value> = diags
        .iter()
        .map(|d| {
            let rule_index = crate::lint::CODES.iter().position(|c| c.code == d.code);
            let mut text = d.message.clone();
            if let Some(h) = &d.help {
                text.push_str(" (help: ");
                text.push_str(h);
                text.push(')');
            }
            let mut r = serde_json::json!({
                "ruleId": d.code,
                "level": sarif_level(d.severity),
                "message": { "text": text },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": sarif_location(&d.file, root, cwd),
                        "region": { "startLine": d.line.max(1), "startColumn": d.column.max(1) }
                    }
                }],
            });
            if let (Some(i), Some(obj)) = (rule_index, r.as_object_mut()) {
                obj.insert("ruleIndex".into(), serde_json::json!(i));
            }
            r
        })
        .collect();
    let log = serde_json::json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "meshward",
                "version": version,
                "informationUri": "https://meshward.io/docs/policy",
                "rules": rules,
            }},
            "originalUriBaseIds": {
                "%SRCROOT%": { "uri": format!("file://{}/", uri_path(&root.to_string_lossy()).trim_end_matches('/')) },
            },
            "results": results,
        }],
    });
    serde_json::to_string_pretty(&log).unwrap_or_default()
}

fn sarif_level(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "note",
    }
}
