//! The policy set: every resource of a policy repository, loaded, checked and resolved into
//! the typed model both evaluators read. Loading never panics on bad input and never stops
//! at the first problem: it collects a [`Diagnostic`] for each, and builds what it can.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::{SpiffeId, TrustDomain};

use crate::decision::{PolicyRevision, WorkloadRef};
use crate::diag::{Diagnostic, Severity, Sources};
use crate::matcher::{HostPattern, IdentityPattern, PathPattern, StringMatch, parse_method};
use crate::resource::{self as r, Action, DefaultAction, Mode, MtlsMode, OverrideAction, Tier};
use crate::yaml::{self, Node, NodeKind, PathSeg, Span};

/// Where a resource was read from; finds the position of any of its fields.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<str>,
    pub doc: Arc<Node>,
}

impl Origin {
    /// The position of a field (or of the nearest enclosing node that exists).
    pub fn span(&self, path: &[PathSeg]) -> Span {
        self.doc.find(path).span
    }

    /// A diagnostic located at a field of this resource.
    pub fn diag(
        &self,
        code: &'static str,
        sev: Severity,
        path: &[PathSeg],
        msg: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(code, sev, &self.file, self.span(path), msg).field(yaml::path_string(path))
    }
}

/// A `Drill` (crates/meshward/src/drill.rs): beside the policies in a repository, not in
/// the policy set.
pub const DRILL: &str = "Drill";

/// Builds a field path: `p!["spec", "rules", 0]`.
#[macro_export]
macro_rules! p {
    ($($seg:expr),* $(,)?) => { [$($crate::model::IntoSeg::into_seg($seg)),*] };
}

/// Conversion for the [`p!`] macro.
pub trait IntoSeg {
    fn into_seg(self) -> PathSeg;
}
impl IntoSeg for &str {
    fn into_seg(self) -> PathSeg {
        PathSeg::Key(self.to_owned())
    }
}
impl IntoSeg for usize {
    fn into_seg(self) -> PathSeg {
        PathSeg::Index(self)
    }
}

/// The mesh-wide settings.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub trust_domain: TrustDomain,
    pub default_action: DefaultAction,
    pub mtls_mode: MtlsMode,
    pub certificate_lifetime: Duration,
    pub max_override_duration: Duration,
    pub outbound: r::OutboundTraffic,
    /// Request headers with `_` in the name: refused or dropped by the inbound proxy.
    pub headers_with_underscores: r::HeadersWithUnderscores,
    /// Inbound connection caps and timeouts for every sidecar (validated; fields unset
    /// fall back to the proxy's flags).
    pub connection_limits: r::ConnectionLimits,
    /// The control plane's anomaly detection (validated, with defaults).
    pub anomaly: crate::anomaly::AnomalyDetection,
    /// Progressive rollout's settings (validated, with defaults).
    pub rollout: crate::rollout::RolloutSettings,
    pub origin: Option<Origin>,
}

/// A workload with its identity.
#[derive(Debug, Clone)]
pub struct Workload {
    pub id: WorkloadRef,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub ports: Vec<r::WorkloadPort>,
    /// Transparent mode: the workload's address.
    pub address: Option<std::net::IpAddr>,
    pub interception: r::Interception,
    /// This workload's own connection caps and timeouts (validated), over the `Mesh`'s.
    pub connection_limits: r::ConnectionLimits,
    /// Where it runs (`spec.locality`, else the topology labels).
    pub locality: Option<r::Locality>,
    pub origin: Option<Origin>,
}

impl Workload {
    /// The declared protocol of a port.
    pub fn protocol(&self, port: u16) -> Option<r::Protocol> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.protocol)
    }
}

/// A service and the workloads behind it.
#[derive(Debug, Clone)]
pub struct Service {
    pub id: WorkloadRef,
    /// Indexes into [`PolicySet::workloads`].
    pub workloads: Vec<usize>,
    pub ports: Vec<r::ServicePort>,
    pub hosts: Vec<String>,
    /// Transparent mode: virtual addresses.
    pub addresses: Vec<std::net::IpAddr>,
    /// The app routes paths case-insensitively (`spec.pathCaseInsensitive`).
    pub path_case_insensitive: bool,
    /// `spec.objective.availability`: percent of requests answered without a 5xx.
    pub objective: Option<f64>,
    pub origin: Origin,
}

impl Service {
    /// Whether the service sends traffic to app port `port` of its workloads.
    pub fn targets_port(&self, port: u16) -> bool {
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|p| p.target_port.unwrap_or(p.port) == port)
    }
}

/// Which destinations a policy applies to (fields AND, values OR; empty = all).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    /// Named workloads, services expanded; `None` when neither was given.
    pub named: Option<BTreeSet<WorkloadRef>>,
    /// The services named (already expanded into `named`): kept so that what a target
    /// reaches includes a service's namespace even while the service has no workloads.
    pub services: Vec<WorkloadRef>,
    pub namespaces: Vec<String>,
    pub labels: Vec<(String, String)>,
    pub attributes: Vec<(String, Vec<String>)>,
}

impl Target {
    pub fn matches(&self, w: &Workload) -> bool {
        self.named.as_ref().is_none_or(|n| n.contains(&w.id))
            && (self.namespaces.is_empty() || self.namespaces.contains(&w.id.namespace))
            && self.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            && self
                .attributes
                .iter()
                .all(|(k, vs)| w.attributes.get(k).is_some_and(|v| vs.contains(v)))
    }

    pub fn is_everything(&self) -> bool {
        self.named.is_none()
            && self.namespaces.is_empty()
            && self.labels.is_empty()
            && self.attributes.is_empty()
    }
}

/// Who a rule is about (fields AND, values OR).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceMatch {
    pub identities: Vec<IdentityPattern>,
    pub not_identities: Vec<IdentityPattern>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
    pub attributes: Vec<(String, Vec<String>)>,
    pub not_attributes: Vec<(String, Vec<String>)>,
    pub same_attributes: Vec<String>,
    pub different_attributes: Vec<String>,
    pub unauthenticated: bool,
}

impl SourceMatch {
    /// The matcher of a `from` entry a loaded set has validated already (identity
    /// patterns and trust domains parse); `None` when one does not.
    pub fn of_valid(s: &r::SourceSpec) -> Option<SourceMatch> {
        let ids = |l: &[String]| {
            l.iter()
                .map(|i| IdentityPattern::parse(i).ok())
                .collect::<Option<Vec<_>>>()
        };
        let tds = |l: &[String]| {
            l.iter()
                .map(|t| TrustDomain::parse(t).ok().map(|t| t.as_str().to_owned()))
                .collect::<Option<Vec<_>>>()
        };
        let pairs = |m: &BTreeMap<String, r::OneOrMany>| {
            m.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()
        };
        Some(SourceMatch {
            identities: ids(&s.identities)?,
            not_identities: ids(&s.not_identities)?,
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            trust_domains: tds(&s.trust_domains)?,
            not_trust_domains: tds(&s.not_trust_domains)?,
            attributes: pairs(&s.attributes),
            not_attributes: pairs(&s.not_attributes),
            same_attributes: s.same_attributes.clone(),
            different_attributes: s.different_attributes.clone(),
            unauthenticated: s.unauthenticated,
        })
    }

    /// True when no positive field is set, so the entry also matches plaintext sources.
    pub fn is_negative_only(&self) -> bool {
        !self.unauthenticated
            && self.identities.is_empty()
            && self.namespaces.is_empty()
            && self.trust_domains.is_empty()
            && self.attributes.is_empty()
            && self.same_attributes.is_empty()
    }
}

/// What a rule is about on the destination (fields AND, values OR).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<PathPattern>,
    pub not_paths: Vec<PathPattern>,
    pub hosts: Vec<HostPattern>,
}

impl Operation {
    /// The matcher of a `to` entry, or every invalid entry as (field, index, why).
    pub fn parse(o: &r::OperationSpec) -> Result<Operation, Vec<(&'static str, usize, String)>> {
        let mut errors = vec![];
        let mut op = Operation {
            ports: o.ports.clone(),
            ..Default::default()
        };
        for (i, port) in o.ports.iter().enumerate() {
            if *port == 0 {
                errors.push(("ports", i, "port 0 is not a port".to_owned()));
            }
        }
        for (name, list, out) in [
            ("methods", &o.methods, &mut op.methods),
            ("notMethods", &o.not_methods, &mut op.not_methods),
        ] {
            for (i, m) in list.iter().enumerate() {
                match parse_method(m) {
                    Ok(m) => out.push(m),
                    Err(e) => errors.push((name, i, e)),
                }
            }
        }
        for (name, list, out) in [
            ("paths", &o.paths, &mut op.paths),
            ("notPaths", &o.not_paths, &mut op.not_paths),
        ] {
            for (i, p) in list.iter().enumerate() {
                match PathPattern::parse(p) {
                    Ok(p) => out.push(p),
                    Err(e) => errors.push((name, i, e)),
                }
            }
        }
        for (i, h) in o.hosts.iter().enumerate() {
            match HostPattern::parse(h) {
                Ok(h) => op.hosts.push(h),
                Err(e) => errors.push(("hosts", i, e)),
            }
        }
        if errors.is_empty() {
            Ok(op)
        } else {
            Err(errors)
        }
    }

    /// Whether any HTTP-only field is set.
    pub fn has_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty())
    }
}

/// A header condition.
#[derive(Debug, Clone, PartialEq)]
pub enum CondKind {
    Values(Vec<StringMatch>),
    NotValues(Vec<StringMatch>),
    Present(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Lower-case header name.
    pub header: String,
    pub kind: CondKind,
}

/// One rule of a policy: matches when any `from` entry, any `to` entry and every `when`
/// condition match (an empty list matches everything).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: Arc<str>,
    pub from: Vec<SourceMatch>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the rule has HTTP-only conditions.
    pub fn has_http(&self) -> bool {
        !self.when.is_empty() || self.to.iter().any(Operation::has_http)
    }
}

/// An authorization policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `namespace/name`.
    pub id: Arc<str>,
    pub namespace: String,
    pub name: String,
    pub tier: Tier,
    pub action: Action,
    pub mode: Mode,
    pub overridable: bool,
    pub target: Target,
    pub rules: Vec<Rule>,
    pub origin: Option<Origin>,
}

/// A break-glass override.
#[derive(Debug, Clone)]
pub struct Override {
    pub id: Arc<str>,
    pub action: OverrideAction,
    pub subject: Option<SourceMatch>,
    pub target: Option<Target>,
    pub to: Vec<Operation>,
    /// Quarantine only: the peers the subject may still talk to, either way.
    pub except: Option<SourceMatch>,
    pub reason: String,
    pub ticket: Option<String>,
    pub requester: Option<String>,
    pub approver: Option<String>,
    pub starts_at: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    pub origin: Option<Origin>,
}

impl Override {
    /// In force at `t`: has an expiry, has started, has not expired.
    pub fn active_at(&self, t: SystemTime) -> bool {
        self.expires_at.is_some_and(|e| t < e) && self.starts_at.is_none_or(|s| s <= t)
    }
}

/// A `PolicyTest` resource.
#[derive(Debug, Clone)]
pub struct PolicyTest {
    pub id: Arc<str>,
    pub spec: r::PolicyTestSpec,
    pub origin: Origin,
}

/// Another resource kind, parsed and validated, enforced by later components.
#[derive(Debug, Clone)]
pub struct Other<T> {
    pub id: Arc<str>,
    pub spec: T,
    pub origin: Origin,
}

/// A whole policy set.
#[derive(Debug, Clone)]
pub struct PolicySet {
    pub mesh: Mesh,
    /// Sorted by namespace/name.
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// In evaluation order: tier, then namespace/name.
    pub policies: Vec<Policy>,
    /// Sorted by namespace/name.
    pub overrides: Vec<Override>,
    pub tests: Vec<PolicyTest>,
    pub rate_limits: Vec<Other<r::RateLimitPolicySpec>>,
    pub traffic: Vec<Other<r::TrafficPolicySpec>>,
    pub faults: Vec<Other<r::FaultInjectionSpec>>,
    pub federations: Vec<Other<r::TrustDomainFederationSpec>>,
    pub revision: PolicyRevision,
    by_ref: HashMap<WorkloadRef, usize>,
    by_identity: HashMap<SpiffeId, usize>,
}

static EMPTY_ATTRS: BTreeMap<String, String> = BTreeMap::new();

impl PolicySet {
    /// Whether app port `port` of `workload` routes paths case-insensitively: some service
    /// in front of that port says `pathCaseInsensitive` (then the inbound proxy lower-cases
    /// the path for policy and app alike).
    pub fn path_case_insensitive(&self, workload: &WorkloadRef, port: u16) -> bool {
        let Some(w) = self.workloads.iter().position(|x| &x.id == workload) else {
            return false;
        };
        self.services
            .iter()
            .any(|s| s.path_case_insensitive && s.workloads.contains(&w) && s.targets_port(port))
    }

    /// Builds a set from already-typed parts (used by generators and tests). Sorts into
    /// evaluation order. Workloads sharing an identity must share attributes.
    pub fn from_parts(
        mesh: Mesh,
        mut workloads: Vec<Workload>,
        mut policies: Vec<Policy>,
        mut overrides: Vec<Override>,
    ) -> Self {
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        policies.sort_by(|a, b| (a.tier, &a.id).cmp(&(b.tier, &b.id)));
        overrides.sort_by(|a, b| a.id.cmp(&b.id));
        let mut set = PolicySet {
            mesh,
            workloads,
            services: vec![],
            policies,
            overrides,
            tests: vec![],
            rate_limits: vec![],
            traffic: vec![],
            faults: vec![],
            federations: vec![],
            revision: PolicyRevision(0),
            by_ref: HashMap::new(),
            by_identity: HashMap::new(),
        };
        set.reindex();
        set
    }

    fn reindex(&mut self) {
        self.by_ref = self
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (w.id.clone(), i))
            .collect();
        self.by_identity.clear();
        for (i, w) in self.workloads.iter().enumerate() {
            self.by_identity.entry(w.identity.clone()).or_insert(i);
        }
    }

    pub fn workload(&self, r: &WorkloadRef) -> Option<&Workload> {
        self.by_ref.get(r).map(|&i| &self.workloads[i])
    }

    /// The connection limits the sidecar of `w` enforces: the workload's fields, then the
    /// `Mesh`'s (unset ones fall back to the proxy's flags).
    pub fn connection_limits(&self, w: &WorkloadRef) -> r::ConnectionLimits {
        let own = self
            .workload(w)
            .map(|x| x.connection_limits)
            .unwrap_or_default();
        own.or(self.mesh.connection_limits)
    }

    pub fn workload_index(&self, r: &WorkloadRef) -> Option<usize> {
        self.by_ref.get(r).copied()
    }

    /// The attributes of the workload(s) running as `id` (empty when unknown).
    pub fn attributes_of(&self, id: Option<&SpiffeId>) -> &BTreeMap<String, String> {
        id.and_then(|id| self.by_identity.get(id))
            .map_or(&EMPTY_ATTRS, |&i| &self.workloads[i].attributes)
    }

    /// The workload running as `id`.
    pub fn workload_by_identity(&self, id: &SpiffeId) -> Option<&Workload> {
        self.by_identity.get(id).map(|&i| &self.workloads[i])
    }

    /// Every namespace that has a workload.
    pub fn namespaces(&self) -> BTreeSet<&str> {
        self.workloads
            .iter()
            .map(|w| w.id.namespace.as_str())
            .collect()
    }

    pub fn with_revision(mut self, rev: PolicyRevision) -> Self {
        self.revision = rev;
        self
    }
}

/// The outcome of loading: the set (built from every resource that was valid) and every
/// diagnostic found.
#[derive(Debug)]
pub struct Loaded {
    pub set: Option<PolicySet>,
    pub diagnostics: Vec<Diagnostic>,
    pub sources: Sources,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The set, only if loading found no error (fail closed).
    pub fn into_valid(self) -> Result<PolicySet, Box<Loaded>> {
        if self.has_errors() {
            return Err(Box::new(self));
        }
        match self.set {
            Some(s) => Ok(s),
            None => Err(Box::new(Loaded { set: None, ..self })),
        }
    }
}

/// Lists the YAML files of a policy repository (a file, or a directory walked recursively,
/// hidden entries skipped), sorted.
pub fn yaml_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = vec![];
    if root.is_file() {
        out.push(root.to_owned());
        return Ok(out);
    }
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Loads a policy repository from disk.
pub fn load_path(root: &Path) -> Loaded {
    let mut inputs = vec![];
    let mut diags = vec![];
    match yaml_files(root) {
        Ok(files) => {
            if files.is_empty() {
                let f: Arc<str> = root.display().to_string().into();
                diags.push(
                    Diagnostic::new(
                        "MW109",
                        Severity::Error,
                        &f,
                        Span::default(),
                        "no YAML files found",
                    )
                    .help("point at a directory of `.yaml` files or at one file"),
                );
            }
            for f in files {
                let name: Arc<str> = f.display().to_string().into();
                match std::fs::read_to_string(&f) {
                    Ok(text) => inputs.push((name, Arc::<str>::from(text))),
                    Err(e) => diags.push(Diagnostic::new(
                        "MW109",
                        Severity::Error,
                        &name,
                        Span::default(),
                        format!("cannot read the file: {e}"),
                    )),
                }
            }
        }
        Err(e) => {
            let f: Arc<str> = root.display().to_string().into();
            diags.push(Diagnostic::new(
                "MW109",
                Severity::Error,
                &f,
                Span::default(),
                format!("cannot read `{}`: {e}", root.display()),
            ));
        }
    }
    if inputs.is_empty() {
        // Nothing was read: say only that, not what the (empty) set lacks.
        return Loaded {
            set: None,
            diagnostics: diags,
            sources: Sources::default(),
        };
    }
    let mut loaded = load_sources(inputs);
    diags.append(&mut loaded.diagnostics);
    loaded.diagnostics = diags;
    loaded
}

/// Loads a policy set from `(file name, text)` pairs.
pub fn load_sources(inputs: Vec<(Arc<str>, Arc<str>)>) -> Loaded {
    let mut b = Builder::default();
    for (file, text) in inputs {
        b.sources.insert(file.clone(), text.clone());
        match yaml::parse_documents(&text) {
            Ok(docs) => {
                for doc in docs {
                    b.document(&file, Arc::new(doc));
                }
            }
            Err(e) => b.diags.push(
                Diagnostic::new(
                    "MW101",
                    Severity::Error,
                    &file,
                    e.span,
                    format!("YAML syntax error: {}", e.message),
                )
                .help("fix the YAML syntax; every document must be a mapping"),
            ),
        }
    }
    b.finish()
}

/// A typed but not yet resolved document.
struct Doc {
    kind: String,
    meta: r::Metadata,
    namespace: String,
    origin: Origin,
}

impl Doc {
    fn id(&self) -> Arc<str> {
        format!("{}/{}", self.namespace, self.meta.name.0).into()
    }
    fn label(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.meta.name.0)
    }
}

#[derive(Default)]
struct Builder {
    sources: Sources,
    diags: Vec<Diagnostic>,
    meshes: Vec<(Doc, r::MeshSpec)>,
    workloads: Vec<(Doc, r::WorkloadSpec)>,
    services: Vec<(Doc, r::ServiceSpec)>,
    policies: Vec<(Doc, r::AuthorizationPolicySpec)>,
    overrides: Vec<(Doc, r::OverrideSpec)>,
    tests: Vec<(Doc, r::PolicyTestSpec)>,
    rate_limits: Vec<(Doc, r::RateLimitPolicySpec)>,
    traffic: Vec<(Doc, r::TrafficPolicySpec)>,
    faults: Vec<(Doc, r::FaultInjectionSpec)>,
    federations: Vec<(Doc, r::TrustDomainFederationSpec)>,
    seen: HashMap<(String, String, String), Span>,
}

fn de_code(e: &yaml::DeError) -> &'static str {
    if e.message.starts_with("unknown field") {
        "MW102"
    } else if e.message.starts_with("missing field") {
        "MW104"
    } else if e.message.contains("SPIFFE ID") || e.message.contains("trust domain") {
        "MW107"
    } else {
        "MW103"
    }
}

const TOP_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

impl Builder {
    fn de_diag(
        &self,
        file: &Arc<str>,
        base: &[PathSeg],
        at: Span,
        e: yaml::DeError,
        resource: Option<String>,
    ) -> Diagnostic {
        let mut path = base.to_vec();
        path.extend(e.path.iter().cloned());
        let mut d = Diagnostic::new(
            de_code(&e),
            Severity::Error,
            file,
            e.span.unwrap_or(at),
            e.message.clone(),
        )
        .field(yaml::path_string(&path));
        d.help = e.help.clone();
        if d.help.is_none() && d.code == "MW104" {
            d.help = Some("add the field; see docs/policy.md for the schema".into());
        }
        d.resource = resource;
        d
    }

    fn document(&mut self, file: &Arc<str>, doc: Arc<Node>) {
        let NodeKind::Map(entries) = &doc.kind else {
            self.diags.push(Diagnostic::new(
                "MW103",
                Severity::Error,
                file,
                doc.span,
                "a resource must be a mapping with `apiVersion`, `kind`, `metadata` and `spec`",
            ));
            return;
        };
        for (k, _) in entries {
            let key = k.as_str().unwrap_or_default();
            if !TOP_FIELDS.contains(&key) {
                let mut d = Diagnostic::new(
                    "MW102",
                    Severity::Error,
                    file,
                    k.span,
                    format!("unknown field `{key}`"),
                )
                .field(key);
                d.help = Some(match yaml::did_you_mean(key, TOP_FIELDS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => {
                        "a resource has only `apiVersion`, `kind`, `metadata` and `spec`".into()
                    }
                });
                self.diags.push(d);
            }
        }
        let kind = match doc.get("kind").and_then(Node::as_str) {
            // Read and checked by `meshward drill run` (and `meshward policy lint`, which
            // runs the drill's own checks: MW110); not part of the policy set.
            Some(DRILL) => return,
            Some(k) if r::KINDS.contains(&k) => k.to_owned(),
            Some(k) => {
                let span = doc.find(&p!["kind"]).span;
                let mut d = Diagnostic::new(
                    "MW105",
                    Severity::Error,
                    file,
                    span,
                    format!("unknown kind `{k}`"),
                )
                .field("kind");
                d.help = Some(match yaml::did_you_mean(k, r::KINDS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("known kinds: {}", r::KINDS.join(", ")),
                });
                self.diags.push(d);
                return;
            }
            None => {
                self.diags.push(
                    Diagnostic::new(
                        "MW104",
                        Severity::Error,
                        file,
                        doc.span,
                        "missing field `kind`",
                    )
                    .help(format!("one of: {}", r::KINDS.join(", "))),
                );
                return;
            }
        };
        match doc.get("apiVersion").and_then(Node::as_str) {
            Some(r::API_VERSION) => {}
            Some(v) => self.diags.push(
                Diagnostic::new(
                    "MW105",
                    Severity::Error,
                    file,
                    doc.find(&p!["apiVersion"]).span,
                    format!("unsupported apiVersion `{v}`"),
                )
                .field("apiVersion")
                .help(format!("use `{}`", r::API_VERSION)),
            ),
            None => self.diags.push(
                Diagnostic::new(
                    "MW104",
                    Severity::Error,
                    file,
                    doc.span,
                    "missing field `apiVersion`",
                )
                .help(format!("add `apiVersion: {}`", r::API_VERSION)),
            ),
        }
        let Some(meta_node) = doc.get("metadata") else {
            self.diags.push(
                Diagnostic::new(
                    "MW104",
                    Severity::Error,
                    file,
                    doc.span,
                    "missing field `metadata`",
                )
                .help("add `metadata: {name: ...}`"),
            );
            return;
        };
        let meta: r::Metadata = match yaml::from_node(meta_node) {
            Ok(m) => m,
            Err(e) => {
                let d = self.de_diag(file, &p!["metadata"], meta_node.span, e, None);
                self.diags.push(d);
                return;
            }
        };
        let namespace = meta
            .namespace
            .clone()
            .map_or_else(|| "default".to_owned(), |n| n.0);
        let d = Doc {
            kind: kind.clone(),
            meta,
            namespace,
            origin: Origin {
                file: file.clone(),
                doc: doc.clone(),
            },
        };
        let key = (kind.clone(), d.namespace.clone(), d.meta.name.0.clone());
        let name_span = doc.find(&p!["metadata", "name"]).span;
        if let Some(prev) = self.seen.get(&key) {
            self.diags.push(
                Diagnostic::new("MW106", Severity::Error, file, name_span, format!("duplicate {} `{}/{}`", kind, key.1, key.2))
                    .help(format!("another document defines it at line {}; names are unique per kind and namespace", prev.line))
                    .field("metadata.name"),
            );
            return;
        }
        self.seen.insert(key, name_span);
        let Some(spec) = doc.get("spec") else {
            self.diags.push(
                Diagnostic::new(
                    "MW104",
                    Severity::Error,
                    file,
                    doc.span,
                    "missing field `spec`",
                )
                .resource(d.label()),
            );
            return;
        };
        macro_rules! typed {
            ($field:ident) => {
                match yaml::from_node(spec) {
                    Ok(s) => self.$field.push((d, s)),
                    Err(e) => {
                        let diag = self.de_diag(file, &p!["spec"], spec.span, e, Some(d.label()));
                        self.diags.push(diag);
                    }
                }
            };
        }
        match kind.as_str() {
            "Mesh" => typed!(meshes),
            "Workload" => typed!(workloads),
            "Service" => typed!(services),
            "AuthorizationPolicy" => typed!(policies),
            "Override" => typed!(overrides),
            "PolicyTest" => typed!(tests),
            "RateLimitPolicy" => typed!(rate_limits),
            "TrafficPolicy" => typed!(traffic),
            "FaultInjection" => typed!(faults),
            "TrustDomainFederation" => typed!(federations),
            _ => {}
        }
    }

    fn finish(mut self) -> Loaded {
        let meshes = std::mem::take(&mut self.meshes);
        let mesh = match meshes.len() {
            0 => {
                let file: Arc<str> = self
                    .policies
                    .first()
                    .map(|(d, _)| d.origin.file.clone())
                    .or_else(|| self.workloads.first().map(|(d, _)| d.origin.file.clone()))
                    .unwrap_or_else(|| "<policy set>".into());
                self.diags.push(
                    Diagnostic::new("MW204", Severity::Error, &file, Span::default(), "the policy set has no `Mesh` resource")
                        .help("add one `kind: Mesh` document with `spec.trustDomain`; without it no identity can be checked"),
                );
                None
            }
            n => {
                if n > 1 {
                    for (d, _) in &meshes[1..] {
                        self.diags.push(
                            d.origin
                                .diag(
                                    "MW204",
                                    Severity::Error,
                                    &p!["kind"],
                                    "more than one `Mesh` resource",
                                )
                                .help("keep exactly one"),
                        );
                    }
                }
                let (d, spec) = &meshes[0];
                Some(self.mesh(d, spec))
            }
        };
        let Some(mesh) = mesh else {
            return Loaded {
                set: None,
                diagnostics: self.diags,
                sources: self.sources,
            };
        };
        let mut workloads = vec![];
        for (d, spec) in std::mem::take(&mut self.workloads) {
            if let Some(w) = self.workload(&mesh, d, spec) {
                workloads.push(w);
            }
        }
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        // Workloads that share an identity must agree on attributes, or policy on attributes
        // would be ambiguous.
        let mut by_id: HashMap<&SpiffeId, &Workload> = HashMap::new();
        for w in &workloads {
            if let Some(prev) = by_id.insert(&w.identity, w)
                && prev.attributes != w.attributes
            {
                let Some(origin) = &w.origin else { continue };
                self.diags.push(
                        origin
                            .diag("MW313", Severity::Error, &p!["spec", "attributes"], format!("workloads `{}` and `{}` share the identity `{}` but declare different attributes", prev.id, w.id, w.identity))
                            .help("give each workload its own service account, or the same attributes"),
                    );
            }
        }
        let by_ref: HashMap<WorkloadRef, usize> = workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (w.id.clone(), i))
            .collect();
        let mut services = vec![];
        for (d, spec) in std::mem::take(&mut self.services) {
            services.push(self.service(&workloads, &by_ref, d, spec));
        }
        services.sort_by(|a, b| a.id.cmp(&b.id));
        let namespaces: BTreeSet<String> =
            workloads.iter().map(|w| w.id.namespace.clone()).collect();
        let ctx = Ctx {
            mesh: &mesh,
            workloads: &workloads,
            by_ref: &by_ref,
            services: &services,
            namespaces: &namespaces,
        };
        let mut policies = vec![];
        for (d, spec) in std::mem::take(&mut self.policies) {
            if let Some(p) = self.policy(&ctx, d, spec) {
                policies.push(p);
            }
        }
        let mut overrides = vec![];
        for (d, spec) in std::mem::take(&mut self.overrides) {
            if let Some(o) = self.override_(&ctx, d, spec) {
                overrides.push(o);
            }
        }
        let mut tests = vec![];
        for (d, spec) in std::mem::take(&mut self.tests) {
            self.check_test(&ctx, &d, &spec);
            tests.push(PolicyTest {
                id: d.id(),
                spec,
                origin: d.origin,
            });
        }
        macro_rules! others {
            ($field:ident, $target:expr) => {{
                let mut out = vec![];
                for (d, spec) in std::mem::take(&mut self.$field) {
                    #[allow(clippy::redundant_closure_call)]
                    ($target)(&mut self, &ctx, &d, &spec);
                    out.push(Other {
                        id: d.id(),
                        spec,
                        origin: d.origin,
                    });
                }
                out
            }};
        }
        let rate_limits = others!(
            rate_limits,
            |b: &mut Builder, ctx: &Ctx<'_>, d: &Doc, s: &r::RateLimitPolicySpec| {
                b.target(ctx, d, &s.target, &p!["spec", "target"]);
                for (i, l) in s.limits.iter().enumerate() {
                    if let Some(f) = &l.from {
                        b.source(ctx, d, f, &p!["spec", "limits", i, "from"]);
                    }
                    for (field, v) in [
                        ("requestsPerSecond", l.requests_per_second),
                        ("burst", l.burst),
                        ("maxConcurrent", l.max_concurrent),
                        ("maxConnections", l.max_connections),
                    ] {
                        if v == Some(0) {
                            b.diags.push(
                                d.origin
                                    .diag(
                                        "MW103",
                                        Severity::Error,
                                        &p!["spec", "limits", i, field],
                                        format!("`{field}` must be at least 1"),
                                    )
                                    .help("leave the field out for no limit of that kind")
                                    .resource(d.label()),
                            );
                        }
                    }
                    if l.requests_per_second.is_none()
                        && l.max_concurrent.is_none()
                        && l.max_connections.is_none()
                    {
                        b.diags.push(
                            d.origin
                                .diag(
                                    "MW103",
                                    Severity::Error,
                                    &p!["spec", "limits", i],
                                    "a limit must set `requestsPerSecond`, `maxConcurrent` or `maxConnections`",
                                )
                                .resource(d.label()),
                        );
                    } else if l.burst.is_some() && l.requests_per_second.is_none() {
                        b.diags.push(
                            d.origin
                                .diag(
                                    "MW103",
                                    Severity::Error,
                                    &p!["spec", "limits", i, "burst"],
                                    "`burst` needs `requestsPerSecond`",
                                )
                                .resource(d.label()),
                        );
                    }
                }
            }
        );
        let traffic = others!(
            traffic,
            |b: &mut Builder, ctx: &Ctx<'_>, d: &Doc, s: &r::TrafficPolicySpec| {
                b.target(ctx, d, &s.target, &p!["spec", "target"]);
                if let Some(o) = &s.outlier_detection
                    && o.max_ejection_percent.is_some_and(|p| p > 100)
                {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW103",
                                Severity::Error,
                                &p!["spec", "outlierDetection", "maxEjectionPercent"],
                                "`maxEjectionPercent` is a percentage (0-100)",
                            )
                            .resource(d.label()),
                    );
                }
                if let Some(r) = &s.retries {
                    lint_retries(b, d, r, s.timeout, &p!["spec", "retries"]);
                }
                for (i, route) in s.routes.iter().enumerate() {
                    lint_route(b, d, s, route, &p!["spec", "routes", i]);
                }
                if let Some(o) = &s.outlier_detection
                    && o.failure_percent.is_some_and(|p| p == 0 || p > 100)
                {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW103",
                                Severity::Error,
                                &p!["spec", "outlierDetection", "failurePercent"],
                                "`failurePercent` is a percentage (1-100)",
                            )
                            .resource(d.label()),
                    );
                }
                if let Some(fb) = &s.fallback
                    && s.target.services.iter().any(|t| {
                        let q = if t.contains('/') {
                            t.clone()
                        } else {
                            format!("{}/{t}", d.namespace)
                        };
                        q == *fb
                    })
                {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW103",
                                Severity::Warning,
                                &p!["spec", "fallback"],
                                format!("the fallback `{fb}` is the service it falls back from: when every endpoint is down it is down too"),
                            )
                            .help("name another service (for example a degraded read-only replica) as the fallback")
                            .resource(d.label()),
                    );
                }
                if let Some(fb) = &s.fallback {
                    let found = WorkloadRef::parse(fb)
                        .ok()
                        .is_some_and(|r| ctx.services.iter().any(|s| s.id == r));
                    if !found {
                        b.diags.push(
                            d.origin
                                .diag(
                                    "MW202",
                                    Severity::Error,
                                    &p!["spec", "fallback"],
                                    format!("unknown fallback service `{fb}`"),
                                )
                                .help("name a `Service` as `namespace/name`")
                                .resource(d.label()),
                        );
                    }
                }
            }
        );
        let faults = others!(
            faults,
            |b: &mut Builder, ctx: &Ctx<'_>, d: &Doc, s: &r::FaultInjectionSpec| {
                b.target(ctx, d, &s.target, &p!["spec", "target"]);
                for (field, pct) in [
                    ("delay", s.delay.as_ref().map(|x| x.percent)),
                    ("abort", s.abort.as_ref().map(|x| x.percent)),
                ] {
                    if pct.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
                        b.diags.push(
                            d.origin
                                .diag(
                                    "MW103",
                                    Severity::Error,
                                    &p!["spec", field, "percent"],
                                    "`percent` must be between 0 and 100",
                                )
                                .resource(d.label()),
                        );
                    }
                }
                if let Some(f) = &s.from {
                    b.source(ctx, d, f, &p!["spec", "from"]);
                }
                for (i, o) in s.to.iter().enumerate() {
                    b.operation(d, o, &p!["spec", "to", i]);
                }
                if let Some(a) = &s.abort {
                    b.fault_abort(d, a);
                }
                if s.delay.is_none() && s.abort.is_none() {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW104",
                                Severity::Error,
                                &p!["spec"],
                                "a fault needs `delay` or `abort`",
                            )
                            .resource(d.label()),
                    );
                }
            }
        );
        let federations = others!(
            federations,
            |b: &mut Builder, ctx: &Ctx<'_>, d: &Doc, s: &r::TrustDomainFederationSpec| {
                if s.trust_domain == ctx.mesh.trust_domain {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW103",
                                Severity::Error,
                                &p!["spec", "trustDomain"],
                                "a mesh cannot federate with its own trust domain",
                            )
                            .resource(d.label()),
                    );
                }
                if s.bundle_endpoint.is_none() && s.bundle.is_none() {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW104",
                                Severity::Error,
                                &p!["spec"],
                                "a federation needs `bundleEndpoint` or an inline `bundle`",
                            )
                            .resource(d.label()),
                    );
                }
                if let Some(e) = &s.bundle_endpoint {
                    if !e.url.starts_with("https://") {
                        b.diags.push(
                            d.origin
                                .diag(
                                    "MW103",
                                    Severity::Error,
                                    &p!["spec", "bundleEndpoint", "url"],
                                    "the bundle endpoint must be an `https://` URL",
                                )
                                .resource(d.label()),
                        );
                    }
                    if e.profile == r::BundleProfile::HttpsSpiffe && e.endpoint_spiffe_id.is_none()
                    {
                        b.diags.push(
                            d.origin
                                .diag(
                                    "MW104",
                                    Severity::Error,
                                    &p!["spec", "bundleEndpoint"],
                                    "profile `https_spiffe` needs `endpointSpiffeId`",
                                )
                                .resource(d.label()),
                        );
                    }
                }
                if let Some(bundle) = &s.bundle
                    && !serde_json::from_str::<serde_json::Value>(bundle)
                        .is_ok_and(|v| v.get("keys").is_some())
                {
                    b.diags.push(
                        d.origin
                            .diag(
                                "MW103",
                                Severity::Error,
                                &p!["spec", "bundle"],
                                "the inline bundle is not a SPIFFE bundle (JWKS JSON with `keys`)",
                            )
                            .resource(d.label()),
                    );
                }
            }
        );
        let mut set = PolicySet::from_parts(mesh, workloads, policies, overrides);
        set.services = services;
        set.tests = tests;
        set.rate_limits = rate_limits;
        set.traffic = traffic;
        set.faults = faults;
        set.federations = federations;
        self.diags
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Loaded {
            set: Some(set),
            diagnostics: self.diags,
            sources: self.sources,
        }
    }

    fn mesh(&mut self, d: &Doc, s: &r::MeshSpec) -> Mesh {
        let lifetime = s
            .certificate_lifetime
            .map_or(Duration::from_secs(3600), |x| x.0);
        if !(Duration::from_secs(60)..=Duration::from_secs(86400)).contains(&lifetime) {
            self.diags.push(
                d.origin
                    .diag(
                        "MW103",
                        Severity::Error,
                        &p!["spec", "certificateLifetime"],
                        "`certificateLifetime` must be between 1m and 24h",
                    )
                    .resource(d.label()),
            );
        }
        let max_override_duration = s
            .max_override_duration
            .map_or(Duration::from_secs(86400), |x| x.0);
        let (anomaly, problems) =
            crate::anomaly::validate(s.anomaly_detection.as_ref(), max_override_duration);
        for (path, why) in problems {
            let field = path.last().cloned().unwrap_or_default();
            let mut at = p!["spec", "anomalyDetection"].to_vec();
            at.extend(path.into_iter().map(|f| match f.parse::<usize>() {
                Ok(i) => PathSeg::Index(i),
                Err(_) => PathSeg::Key(f),
            }));
            self.diags.push(
                d.origin
                    .diag("MW103", Severity::Error, &at, format!("`{field}` {why}"))
                    .resource(d.label()),
            );
        }
        let (rollout, problems) = crate::rollout::validate(s.rollout.as_ref());
        for (field, why) in problems {
            self.diags.push(
                d.origin
                    .diag(
                        "MW103",
                        Severity::Error,
                        &p!["spec", "rollout", field.as_str()],
                        format!("`{field}` {why}"),
                    )
                    .resource(d.label()),
            );
        }
        Mesh {
            anomaly,
            rollout,
            trust_domain: s.trust_domain.clone(),
            default_action: s.default_action,
            mtls_mode: s.mtls_mode,
            certificate_lifetime: lifetime,
            max_override_duration,
            outbound: s.outbound_traffic.clone().unwrap_or_default(),
            headers_with_underscores: s.headers_with_underscores,
            connection_limits: self.connection_limits(d, s.connection_limits),
            origin: Some(d.origin.clone()),
        }
    }

    /// Checks `spec.connectionLimits` (a `Mesh`'s or a `Workload`'s): a value out of range
    /// is reported at its field and left unset.
    fn connection_limits(
        &mut self,
        d: &Doc,
        limits: Option<r::ConnectionLimits>,
    ) -> r::ConnectionLimits {
        let Some(l) = limits else {
            return r::ConnectionLimits::default();
        };
        let mut bad = |field: &str, msg: String| {
            self.diags.push(
                d.origin
                    .diag(
                        "MW103",
                        Severity::Error,
                        &p!["spec", "connectionLimits", field],
                        msg,
                    )
                    .resource(d.label()),
            );
        };
        let mut count = |field: &str, v: Option<u64>| {
            v.filter(|&n| {
                let ok = r::ConnectionLimits::COUNTS.contains(&n);
                if !ok {
                    bad(
                        field,
                        format!("`{field}` must be between 1 and 1000000 connections, not {n}"),
                    );
                }
                ok
            })
        };
        let per_identity = count("perIdentity", l.per_identity);
        let total = count("total", l.total);
        let mut time =
            |field: &str, v: Option<r::Dur>, range: std::ops::RangeInclusive<Duration>| {
                let (min, max) = (*range.start(), *range.end());
                v.filter(|t| {
                    let ok = range.contains(&t.0);
                    if !ok {
                        bad(
                            field,
                            format!(
                                "`{field}` must be between {} and {}, not {}",
                                humantime::format_duration(min),
                                humantime::format_duration(max),
                                humantime::format_duration(t.0)
                            ),
                        );
                    }
                    ok
                })
            };
        let header_read_timeout = time(
            "headerReadTimeout",
            l.header_read_timeout,
            r::ConnectionLimits::HEADER_READ,
        );
        let idle_timeout = time("idleTimeout", l.idle_timeout, r::ConnectionLimits::IDLE);
        r::ConnectionLimits {
            per_identity,
            total,
            header_read_timeout,
            idle_timeout,
        }
    }

    fn workload(&mut self, mesh: &Mesh, d: Doc, s: r::WorkloadSpec) -> Option<Workload> {
        let sa = s
            .service_account
            .as_ref()
            .map_or(d.meta.name.0.as_str(), |n| n.0.as_str());
        let identity = match SpiffeId::workload(&mesh.trust_domain, &d.namespace, sa) {
            Ok(id) => id,
            Err(e) => {
                self.diags.push(
                    d.origin
                        .diag(
                            "MW107",
                            Severity::Error,
                            &p!["spec", "serviceAccount"],
                            format!("cannot form the workload identity: {e}"),
                        )
                        .resource(d.label()),
                );
                return None;
            }
        };
        let mut seen = BTreeSet::new();
        for (i, port) in s.ports.iter().enumerate() {
            if let Some(a) = &port.inbound
                && a.parse::<std::net::SocketAddr>().is_err()
            {
                self.diags.push(
                    d.origin
                        .diag(
                            "MW103",
                            Severity::Error,
                            &p!["spec", "ports", i, "inbound"],
                            format!("`{a}` is not an `ip:port` address"),
                        )
                        .resource(d.label()),
                );
            }
            if port.port == 0 || !seen.insert(port.port) {
                self.diags.push(
                    d.origin
                        .diag(
                            "MW103",
                            Severity::Error,
                            &p!["spec", "ports", i, "port"],
                            format!("port {} is zero or declared twice", port.port),
                        )
                        .resource(d.label()),
                );
            }
        }
        let address = s.address.as_deref().and_then(|a| match a.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.diags.push(
                    d.origin
                        .diag(
                            "MW103",
                            Severity::Error,
                            &p!["spec", "address"],
                            format!("`{a}` is not an IP address"),
                        )
                        .resource(d.label()),
                );
                None
            }
        });
        let connection_limits = self.connection_limits(&d, s.connection_limits);
        Some(Workload {
            id: WorkloadRef {
                namespace: d.namespace.clone(),
                name: d.meta.name.0.clone(),
            },
            identity,
            labels: d.meta.labels.clone(),
            attributes: s.attributes,
            ports: s.ports,
            address,
            interception: s.interception.unwrap_or_default(),
            connection_limits,
            locality: s.locality.or_else(|| {
                let label = |k: &str| d.meta.labels.get(k).cloned();
                let l = r::Locality {
                    region: label("topology.kubernetes.io/region"),
                    zone: label("topology.kubernetes.io/zone"),
                };
                (l.region.is_some() || l.zone.is_some()).then_some(l)
            }),
            origin: Some(d.origin),
        })
    }

    fn service(
        &mut self,
        workloads: &[Workload],
        by_ref: &HashMap<WorkloadRef, usize>,
        d: Doc,
        s: r::ServiceSpec,
    ) -> Service {
        let mut members = BTreeSet::new();
        if !s.selector.is_empty() {
            for (i, w) in workloads.iter().enumerate() {
                if w.id.namespace == d.namespace
                    && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                {
                    members.insert(i);
                }
            }
        }
        for (i, name) in s.workloads.iter().enumerate() {
            let r = qualify(name, &d.namespace);
            match r.as_ref().ok().and_then(|r| by_ref.get(r)) {
                Some(&w) => {
                    members.insert(w);
                }
                None => self.diags.push(
                    d.origin
                        .diag(
                            "MW201",
                            Severity::Error,
                            &p!["spec", "workloads", i],
                            format!("unknown workload `{name}`"),
                        )
                        .help(suggest_workload(name, workloads))
                        .resource(d.label()),
                ),
            }
        }
        if s.selector.is_empty() && s.workloads.is_empty() {
            self.diags.push(
                d.origin
                    .diag(
                        "MW104",
                        Severity::Error,
                        &p!["spec"],
                        "a service needs a `selector` or `workloads`",
                    )
                    .resource(d.label()),
            );
        } else if members.is_empty() {
            self.diags.push(
                d.origin
                    .diag(
                        "MW201",
                        Severity::Warning,
                        &p!["spec", "selector"],
                        "the service selects no workload",
                    )
                    .resource(d.label()),
            );
        }
        let mut addresses = vec![];
        for (i, a) in s.addresses.iter().enumerate() {
            match a.parse() {
                Ok(ip) => addresses.push(ip),
                Err(_) => self.diags.push(
                    d.origin
                        .diag(
                            "MW103",
                            Severity::Error,
                            &p!["spec", "addresses", i],
                            format!("`{a}` is not an IP address"),
                        )
                        .resource(d.label()),
                ),
            }
        }
        let objective = match &s.objective {
            Some(o) if !(o.availability > 0.0 && o.availability < 100.0) => {
                self.diags.push(
                    d.origin
                        .diag(
                            "MW103",
                            Severity::Error,
                            &p!["spec", "objective", "availability"],
                            format!(
                                "availability `{}` is not a percentage strictly between 0 and 100 (for example 99.9)",
                                o.availability
                            ),
                        )
                        .resource(d.label()),
                );
                None
            }
            o => o.as_ref().map(|o| o.availability),
        };
        Service {
            id: WorkloadRef {
                namespace: d.namespace.clone(),
                name: d.meta.name.0.clone(),
            },
            workloads: members.into_iter().collect(),
            objective,
            ports: s.ports,
            hosts: s.hosts,
            addresses,
            path_case_insensitive: s.path_case_insensitive,
            origin: d.origin,
        }
    }

    fn target(&mut self, ctx: &Ctx<'_>, d: &Doc, t: &r::TargetSpec, at: &[PathSeg]) -> Target {
        let mut named: Option<BTreeSet<WorkloadRef>> = None;
        let mut services = vec![];
        let field = |f: &str, i: usize| {
            let mut v = at.to_vec();
            v.push(PathSeg::Key(f.into()));
            v.push(PathSeg::Index(i));
            v
        };
        for (i, w) in t.workloads.iter().enumerate() {
            let set = named.get_or_insert_with(BTreeSet::new);
            match qualify(w, &d.namespace) {
                Ok(r) if ctx.by_ref.contains_key(&r) => {
                    set.insert(r);
                }
                _ => self.diags.push(
                    d.origin
                        .diag(
                            "MW201",
                            Severity::Error,
                            &field("workloads", i),
                            format!("unknown workload `{w}`"),
                        )
                        .help(suggest_workload(w, ctx.workloads))
                        .resource(d.label()),
                ),
            }
        }
        for (i, s) in t.services.iter().enumerate() {
            let set = named.get_or_insert_with(BTreeSet::new);
            let found = qualify(s, &d.namespace)
                .ok()
                .and_then(|r| ctx.services.iter().find(|x| x.id == r));
            match found {
                Some(svc) => {
                    services.push(svc.id.clone());
                    set.extend(svc.workloads.iter().map(|&i| ctx.workloads[i].id.clone()));
                }
                None => {
                    let names: Vec<String> =
                        ctx.services.iter().map(|s| s.id.to_string()).collect();
                    let help = match yaml::did_you_mean(s, names.iter().map(String::as_str)) {
                        Some(x) => format!("did you mean `{x}`?"),
                        None => {
                            "name a `Service` as `name` (same namespace) or `namespace/name`".into()
                        }
                    };
                    self.diags.push(
                        d.origin
                            .diag(
                                "MW202",
                                Severity::Error,
                                &field("services", i),
                                format!("unknown service `{s}`"),
                            )
                            .help(help)
                            .resource(d.label()),
                    );
                }
            }
        }
        for (i, ns) in t.namespaces.iter().enumerate() {
            self.check_namespace(ctx, d, ns, &field("namespaces", i));
        }
        Target {
            named,
            services,
            namespaces: t.namespaces.clone(),
            labels: t
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            attributes: t
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
        }
    }

    fn check_namespace(&mut self, ctx: &Ctx<'_>, d: &Doc, ns: &str, at: &[PathSeg]) {
        if !ctx.namespaces.contains(ns) {
            let help = match yaml::did_you_mean(ns, ctx.namespaces.iter().map(String::as_str)) {
                Some(x) => format!("did you mean `{x}`?"),
                None => "no workload in this policy set runs in that namespace".into(),
            };
            self.diags.push(
                d.origin
                    .diag(
                        "MW203",
                        Severity::Warning,
                        at,
                        format!("unknown namespace `{ns}`"),
                    )
                    .help(help)
                    .resource(d.label()),
            );
        }
    }

    fn source(
        &mut self,
        ctx: &Ctx<'_>,
        d: &Doc,
        s: &r::SourceSpec,
        at: &[PathSeg],
    ) -> Option<SourceMatch> {
        let f = |name: &str| {
            let mut v = at.to_vec();
            v.push(PathSeg::Key(name.into()));
            v
        };
        let fi = |name: &str, i: usize| {
            let mut v = f(name);
            v.push(PathSeg::Index(i));
            v
        };
        let mut ok = true;
        let mut ids = |list: &[String], name: &str, diags: &mut Vec<Diagnostic>| {
            let mut out = vec![];
            for (i, s) in list.iter().enumerate() {
                match IdentityPattern::parse(s) {
                    Ok(p) => out.push(p),
                    Err(e) => {
                        ok = false;
                        diags.push(d.origin.diag("MW107", Severity::Error, &fi(name, i), e).help("write `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT`; `*` may stand for whole segments").resource(d.label()));
                    }
                }
            }
            out
        };
        let identities = ids(&s.identities, "identities", &mut self.diags);
        let not_identities = ids(&s.not_identities, "notIdentities", &mut self.diags);
        let mut tds = |list: &[String], name: &str, diags: &mut Vec<Diagnostic>| {
            let mut out = vec![];
            for (i, s) in list.iter().enumerate() {
                match TrustDomain::parse(s) {
                    Ok(t) => out.push(t.as_str().to_owned()),
                    Err(e) => {
                        ok = false;
                        diags.push(
                            d.origin
                                .diag(
                                    "MW107",
                                    Severity::Error,
                                    &fi(name, i),
                                    format!("invalid trust domain `{s}`: {e}"),
                                )
                                .resource(d.label()),
                        );
                    }
                }
            }
            out
        };
        let trust_domains = tds(&s.trust_domains, "trustDomains", &mut self.diags);
        let not_trust_domains = tds(&s.not_trust_domains, "notTrustDomains", &mut self.diags);
        for (name, list) in [
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
        ] {
            for (i, ns) in list.iter().enumerate() {
                self.check_namespace(ctx, d, ns, &fi(name, i));
            }
        }
        let m = SourceMatch {
            identities,
            not_identities,
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            trust_domains,
            not_trust_domains,
            attributes: s
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
            not_attributes: s
                .not_attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
            same_attributes: s.same_attributes.clone(),
            different_attributes: s.different_attributes.clone(),
            unauthenticated: s.unauthenticated,
        };
        if m.unauthenticated
            && m != (SourceMatch {
                unauthenticated: true,
                ..Default::default()
            })
        {
            ok = false;
            self.diags.push(d.origin.diag("MW103", Severity::Error, &f("unauthenticated"), "`unauthenticated: true` matches plaintext sources only and cannot be combined with other source fields").help("put it in a `from` entry of its own").resource(d.label()));
        }
        if m == SourceMatch::default() {
            ok = false;
            self.diags.push(d.origin.diag("MW103", Severity::Error, at, "an empty `from` entry would match every source").help("remove `from` to match every source, or name identities, namespaces or attributes").resource(d.label()));
        }
        ok.then_some(m)
    }

    /// A `FaultInjection`'s `abort`: exactly one way to end the request, each valid.
    fn fault_abort(&mut self, d: &Doc, a: &r::FaultAbort) {
        let err = |b: &mut Builder, field: &str, msg: String| {
            b.diags.push(
                d.origin
                    .diag("MW103", Severity::Error, &p!["spec", "abort", field], msg)
                    .resource(d.label()),
            );
        };
        let ways = usize::from(a.http_status.is_some())
            + usize::from(a.grpc_status.is_some())
            + usize::from(a.tcp_reset);
        if ways != 1 {
            err(
                self,
                "httpStatus",
                "an abort ends the request one way: set exactly one of `httpStatus`, `grpcStatus` and `tcpReset: true`".into(),
            );
        }
        if a.http_status.is_some_and(|c| !(200..=599).contains(&c)) {
            err(
                self,
                "httpStatus",
                "`httpStatus` must be an HTTP status code (200-599)".into(),
            );
        }
        if let Some(g) = &a.grpc_status
            && r::grpc_status_code(g).is_none_or(|c| c == 0)
        {
            err(
                self,
                "grpcStatus",
                format!(
                    "`{g}` is not a gRPC error status: name one such as UNAVAILABLE or DEADLINE_EXCEEDED, or give its code (1-16)"
                ),
            );
        }
    }

    fn operation(&mut self, d: &Doc, o: &r::OperationSpec, at: &[PathSeg]) -> Option<Operation> {
        let errors = match Operation::parse(o) {
            Ok(op) => return Some(op),
            Err(e) => e,
        };
        for (field, i, msg) in errors {
            let mut path = at.to_vec();
            path.push(PathSeg::Key(field.into()));
            path.push(PathSeg::Index(i));
            let code = if field == "ports" { "MW103" } else { "MW108" };
            let mut diag = d.origin.diag(code, Severity::Error, &path, msg);
            if field.ends_with("aths") {
                diag = diag.help("write `/exact`, `/prefix/*` or `/a/*/b` (whole segments)");
            }
            self.diags.push(diag.resource(d.label()));
        }
        None
    }

    fn condition(&mut self, d: &Doc, c: &r::ConditionSpec, at: &[PathSeg]) -> Option<Condition> {
        let header = c.header.to_ascii_lowercase();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            let mut path = at.to_vec();
            path.push(PathSeg::Key("header".into()));
            self.diags.push(
                d.origin
                    .diag(
                        "MW108",
                        Severity::Error,
                        &path,
                        format!("`{}` is not a valid header name", c.header),
                    )
                    .resource(d.label()),
            );
            return None;
        }
        let set = usize::from(!c.values.is_empty())
            + usize::from(!c.not_values.is_empty())
            + usize::from(c.present.is_some());
        if set != 1 {
            self.diags.push(
                d.origin
                    .diag(
                        "MW103",
                        Severity::Error,
                        at,
                        "a condition needs exactly one of `values`, `notValues` or `present`",
                    )
                    .resource(d.label()),
            );
            return None;
        }
        // What the proxy never lets a condition see: a header named with `_` (refused or
        // dropped), a value element with a `,` (values are split at commas).
        let never = if c.header.contains('_') {
            Some((
                PathSeg::Key("header".into()),
                format!(
                    "`{}` can never match: the proxy refuses or drops header names with `_` (`Mesh.spec.headersWithUnderscores`)",
                    c.header
                ),
            ))
        } else {
            c.values
                .iter()
                .chain(&c.not_values)
                .find(|v| v.contains(','))
                .map(|v| {
                    (
                        PathSeg::Key(if c.values.is_empty() { "notValues" } else { "values" }.into()),
                        format!("`{v}` can never match: header values are compared element by element, split at commas"),
                    )
                })
        };
        if let Some((seg, msg)) = never {
            let mut path = at.to_vec();
            path.push(seg);
            self.diags.push(
                d.origin
                    .diag("MW108", Severity::Error, &path, msg)
                    .resource(d.label()),
            );
            return None;
        }
        let kind = if let Some(p) = c.present {
            CondKind::Present(p)
        } else if !c.values.is_empty() {
            CondKind::Values(c.values.iter().map(|v| StringMatch::parse(v)).collect())
        } else {
            CondKind::NotValues(c.not_values.iter().map(|v| StringMatch::parse(v)).collect())
        };
        Some(Condition { header, kind })
    }

    fn rules(&mut self, ctx: &Ctx<'_>, d: &Doc, rules: &[r::RuleSpec]) -> Option<Vec<Rule>> {
        let mut out = vec![];
        let mut ok = true;
        let mut names = BTreeSet::new();
        for (i, rs) in rules.iter().enumerate() {
            let name: Arc<str> = rs
                .name
                .clone()
                .unwrap_or_else(|| format!("rule-{i}"))
                .into();
            if !names.insert(name.clone()) {
                ok = false;
                self.diags.push(
                    d.origin
                        .diag(
                            "MW106",
                            Severity::Error,
                            &p!["spec", "rules", i, "name"],
                            format!("duplicate rule name `{name}`"),
                        )
                        .resource(d.label()),
                );
            }
            let mut rule = Rule {
                name,
                from: vec![],
                to: vec![],
                when: vec![],
            };
            for (j, s) in rs.from.iter().enumerate() {
                match self.source(ctx, d, s, &p!["spec", "rules", i, "from", j]) {
                    Some(m) => rule.from.push(m),
                    None => ok = false,
                }
            }
            for (j, o) in rs.to.iter().enumerate() {
                match self.operation(d, o, &p!["spec", "rules", i, "to", j]) {
                    Some(m) => rule.to.push(m),
                    None => ok = false,
                }
            }
            for (j, c) in rs.when.iter().enumerate() {
                match self.condition(d, c, &p!["spec", "rules", i, "when", j]) {
                    Some(m) => rule.when.push(m),
                    None => ok = false,
                }
            }
            out.push(rule);
        }
        ok.then_some(out)
    }

    fn policy(&mut self, ctx: &Ctx<'_>, d: Doc, s: r::AuthorizationPolicySpec) -> Option<Policy> {
        let mut ok = true;
        let target = self.target(ctx, &d, &s.target, &p!["spec", "target"]);
        if s.overridable && !(s.tier == Tier::Baseline && s.action == Action::Deny) {
            ok = false;
            self.diags.push(
                d.origin
                    .diag(
                        "MW103",
                        Severity::Error,
                        &p!["spec", "overridable"],
                        "`overridable` applies to baseline DENY policies only",
                    )
                    .resource(d.label()),
            );
        }
        match s.tier {
            Tier::Service => {
                if s.target.workloads.is_empty() && s.target.services.is_empty() {
                    ok = false;
                    self.diags.push(
                        d.origin
                            .diag(
                                "MW312",
                                Severity::Error,
                                &p!["spec", "target"],
                                "a service-tier policy must name its `workloads` or `services`",
                            )
                            .help("use tier `domain` or `baseline` for broader targets")
                            .resource(d.label()),
                    );
                }
                if let Some(named) = &target.named
                    && let Some(other) = named.iter().find(|w| w.namespace != d.namespace)
                {
                    ok = false;
                    self.diags.push(d.origin.diag("MW312", Severity::Error, &p!["spec", "target"], format!("a service-tier policy in namespace `{}` targets `{other}` in another namespace", d.namespace)).help("service policies belong to the namespace of the workloads they protect").resource(d.label()));
                }
            }
            Tier::Domain => {
                if target.is_everything() {
                    ok = false;
                    self.diags.push(d.origin.diag("MW312", Severity::Error, &p!["spec", "target"], "a domain-tier policy must name its domain (`namespaces`, `attributes` or `labels`)").help("a policy over the whole mesh belongs to the baseline tier").resource(d.label()));
                }
            }
            Tier::Baseline => {}
        }
        let rules = self.rules(ctx, &d, &s.rules);
        let (Some(rules), true) = (rules, ok) else {
            return None;
        };
        Some(Policy {
            id: d.id(),
            namespace: d.namespace.clone(),
            name: d.meta.name.0.clone(),
            tier: s.tier,
            action: s.action,
            mode: s.mode,
            overridable: s.overridable,
            target,
            rules,
            origin: Some(d.origin),
        })
    }

    fn override_(&mut self, ctx: &Ctx<'_>, d: Doc, s: r::OverrideSpec) -> Option<Override> {
        let mut ok = true;
        let subject = match &s.subject {
            Some(x) => {
                let m = self.source(ctx, &d, x, &p!["spec", "subject"]);
                ok &= m.is_some();
                m
            }
            None => None,
        };
        let target = s
            .target
            .as_ref()
            .map(|t| self.target(ctx, &d, t, &p!["spec", "target"]));
        let except = match &s.except {
            Some(x) => {
                let m = self.source(ctx, &d, x, &p!["spec", "except"]);
                ok &= m.is_some();
                m
            }
            None => None,
        };
        let mut to = vec![];
        for (i, o) in s.to.iter().enumerate() {
            match self.operation(&d, o, &p!["spec", "to", i]) {
                Some(op) => to.push(op),
                None => ok = false,
            }
        }
        let need = |b: &mut Builder, what: &str| {
            b.diags.push(
                d.origin
                    .diag("MW104", Severity::Error, &p!["spec"], what.to_owned())
                    .resource(d.label()),
            );
        };
        match s.action {
            OverrideAction::Allow if subject.is_none() || target.is_none() => {
                ok = false;
                need(
                    self,
                    "an allow override needs both `subject` and `target`: a mesh-wide allow is never an emergency fix",
                );
            }
            OverrideAction::Deny if subject.is_none() && target.is_none() => {
                ok = false;
                need(
                    self,
                    "a deny override needs a `subject`, a `target` or both",
                );
            }
            OverrideAction::Quarantine
                if subject.is_none() || target.is_some() || !s.to.is_empty() =>
            {
                ok = false;
                need(
                    self,
                    "a quarantine override takes a `subject` (the identities to isolate) and no `target` or `to`",
                );
            }
            _ => {}
        }
        if s.except.is_some() && s.action != OverrideAction::Quarantine {
            ok = false;
            self.diags.push(
                d.origin
                    .diag(
                        "MW104",
                        Severity::Error,
                        &p!["spec", "except"],
                        "`except` belongs to a quarantine override (the peers it may still talk to)",
                    )
                    .resource(d.label())
                    .help("narrow an allow or deny override with `target` and `to` instead"),
            );
        }
        if s.reason.trim().is_empty() {
            ok = false;
            self.diags.push(
                d.origin
                    .diag(
                        "MW104",
                        Severity::Error,
                        &p!["spec", "reason"],
                        "an override needs a `reason`",
                    )
                    .resource(d.label()),
            );
        }
        if let (Some(a), Some(b)) = (s.starts_at, s.expires_at)
            && b <= a
        {
            ok = false;
            self.diags.push(
                d.origin
                    .diag(
                        "MW103",
                        Severity::Error,
                        &p!["spec", "expiresAt"],
                        "`expiresAt` is not after `startsAt`",
                    )
                    .resource(d.label()),
            );
        }
        ok.then(|| Override {
            id: d.id(),
            action: s.action,
            subject,
            target,
            to,
            except,
            reason: s.reason,
            ticket: s.ticket,
            requester: s.requester,
            approver: s.approver,
            starts_at: s.starts_at.map(|t| t.0),
            expires_at: s.expires_at.map(|t| t.0),
            origin: Some(d.origin),
        })
    }

    fn check_test(&mut self, ctx: &Ctx<'_>, d: &Doc, s: &r::PolicyTestSpec) {
        for (i, sc) in s.scenarios.iter().enumerate() {
            let at = |f: &str| p!["spec", "scenarios", i, "request", f];
            if let Err(e) = crate::decision::Source::parse(&sc.request.from) {
                self.diags.push(
                    d.origin
                        .diag("MW107", Severity::Error, &at("from"), e)
                        .resource(d.label()),
                );
            }
            match WorkloadRef::parse(&sc.request.to) {
                Ok(r) if ctx.by_ref.contains_key(&r) => {}
                _ => self.diags.push(
                    d.origin
                        .diag(
                            "MW201",
                            Severity::Error,
                            &at("to"),
                            format!("unknown workload `{}`", sc.request.to),
                        )
                        .help(suggest_workload(&sc.request.to, ctx.workloads))
                        .resource(d.label()),
                ),
            }
            if let Some(m) = &sc.request.method
                && let Err(e) = parse_method(m)
            {
                self.diags.push(
                    d.origin
                        .diag("MW108", Severity::Error, &at("method"), e)
                        .resource(d.label()),
                );
            }
            if let Some(path) = &sc.request.path
                && !path.starts_with('/')
            {
                self.diags.push(
                    d.origin
                        .diag(
                            "MW108",
                            Severity::Error,
                            &at("path"),
                            format!("`{path}` is not a request path"),
                        )
                        .resource(d.label()),
                );
            }
        }
    }
}

struct Ctx<'a> {
    mesh: &'a Mesh,
    workloads: &'a [Workload],
    by_ref: &'a HashMap<WorkloadRef, usize>,
    services: &'a [Service],
    namespaces: &'a BTreeSet<String>,
}

/// `name` → `ns/name`; `other/name` stays.
fn qualify(name: &str, ns: &str) -> Result<WorkloadRef, String> {
    if name.contains('/') {
        WorkloadRef::parse(name)
    } else {
        Ok(WorkloadRef {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn suggest_workload(name: &str, workloads: &[Workload]) -> String {
    let names: Vec<String> = workloads.iter().map(|w| w.id.to_string()).collect();
    let short = name.rsplit('/').next().unwrap_or(name);
    let by_short = yaml::did_you_mean(short, workloads.iter().map(|w| w.id.name.as_str()))
        .and_then(|n| workloads.iter().find(|w| w.id.name == n))
        .map(|w| w.id.to_string());
    match (
        yaml::did_you_mean(name, names.iter().map(String::as_str)),
        by_short,
    ) {
        (Some(s), _) => format!("did you mean `{s}`?"),
        (None, Some(s)) => format!("did you mean `{s}`?"),
        _ => "name a `Workload` as `name` (same namespace) or `namespace/name`".into(),
    }
}

/// `retries` of a `TrafficPolicy` or of one of its routes (`at`), with the timeout that
/// applies there.
fn lint_retries(
    b: &mut Builder,
    d: &Doc,
    r: &r::RetryPolicy,
    timeout: Option<r::Dur>,
    at: &[PathSeg],
) {
    let field = |f: &str| {
        let mut v = at.to_vec();
        v.push(PathSeg::Key(f.to_owned()));
        v
    };
    for (i, c) in r.retry_on.iter().enumerate() {
        let known = matches!(
            c.as_str(),
            "connect-failure" | "reset" | "timeout" | "per-try-timeout" | "5xx" | "gateway-error"
        ) || c.parse::<u16>().is_ok_and(|n| (500..=599).contains(&n));
        if !known {
            let mut path = field("retryOn");
            path.push(PathSeg::Index(i));
            b.diags.push(
                d.origin
                    .diag("MW103", Severity::Error, &path, format!("`{c}` is not a retry condition"))
                    .help("use connect-failure, reset, timeout, 5xx, gateway-error or a 5xx status code; a 4xx (a policy refusal above all) is never retried")
                    .resource(d.label()),
            );
        }
    }
    if let (Some(per_try), Some(total)) = (r.per_try_timeout, timeout)
        && per_try > total
    {
        b.diags.push(
            d.origin
                .diag(
                    "MW103",
                    Severity::Warning,
                    &field("perTryTimeout"),
                    format!(
                        "`perTryTimeout` ({}) is longer than `timeout` ({}): no attempt can use it",
                        humantime::format_duration(per_try.0),
                        humantime::format_duration(total.0)
                    ),
                )
                .help("make the per-try timeout shorter than the overall one, or drop it")
                .resource(d.label()),
        );
    }
    if r.budget_percent.is_some_and(|p| p > 100) {
        b.diags.push(
            d.origin
                .diag(
                    "MW103",
                    Severity::Error,
                    &field("budgetPercent"),
                    "`budgetPercent` is a percentage (0-100)",
                )
                .resource(d.label()),
        );
    }
}

/// Methods repeated without the service's say-so (RFC 9110 §9.2.2).
pub fn idempotent_method(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// One route of a `TrafficPolicy` (`at`): its methods and paths parse, its retries are
/// sound, and retries that can never apply (a non-idempotent route without the
/// `retryable` mark) are said.
fn lint_route(
    b: &mut Builder,
    d: &Doc,
    s: &r::TrafficPolicySpec,
    route: &r::TrafficRoute,
    at: &[PathSeg],
) {
    let field = |f: &str| {
        let mut v = at.to_vec();
        v.push(PathSeg::Key(f.to_owned()));
        v
    };
    let name = route
        .name
        .as_deref()
        .map_or_else(String::new, |n| format!("route `{n}`: "));
    for (i, m) in route.methods.iter().enumerate() {
        if let Err(e) = parse_method(m) {
            let mut path = field("methods");
            path.push(PathSeg::Index(i));
            b.diags.push(
                d.origin
                    .diag("MW103", Severity::Error, &path, format!("{name}{e}"))
                    .resource(d.label()),
            );
        }
    }
    for (i, p) in route.paths.iter().enumerate() {
        if let Err(e) = PathPattern::parse(p) {
            let mut path = field("paths");
            path.push(PathSeg::Index(i));
            b.diags.push(
                d.origin
                    .diag("MW103", Severity::Error, &path, format!("{name}{e}"))
                    .resource(d.label()),
            );
        }
    }
    let timeout = route.timeout.or(s.timeout);
    if let Some(r) = &route.retries {
        lint_retries(b, d, r, timeout, &field("retries"));
    } else if let (Some(t), Some(per_try)) = (
        route.timeout,
        s.retries.as_ref().and_then(|r| r.per_try_timeout),
    ) && per_try > t
    {
        b.diags.push(
            d.origin
                .diag(
                    "MW103",
                    Severity::Warning,
                    &field("timeout"),
                    format!(
                        "{name}`timeout` ({}) is shorter than the policy's `perTryTimeout` ({}): no attempt can use it",
                        humantime::format_duration(t.0),
                        humantime::format_duration(per_try.0)
                    ),
                )
                .help("give the route its own `retries` with a shorter `perTryTimeout`")
                .resource(d.label()),
        );
    }
    let retries = route.retries.as_ref().or(s.retries.as_ref());
    let retried = retries.is_some_and(|r| r.attempts > 0);
    let marked = route.retryable || retries.is_some_and(|r| r.non_idempotent);
    let never_idempotent =
        !route.methods.is_empty() && route.methods.iter().all(|m| !idempotent_method(m));
    if retried && never_idempotent && !marked {
        b.diags.push(
            d.origin
                .diag(
                    "MW103",
                    Severity::Warning,
                    &field("methods"),
                    format!(
                        "{name}retries are set for {}, which are not idempotent: without the `retryable` mark they are never retried",
                        route.methods.join(", ")
                    ),
                )
                .help("add `retryable: true` to the route if repeating these calls is safe (for example the app dedups by an idempotency key), or drop the retries")
                .resource(d.label()),
        );
    }
}
