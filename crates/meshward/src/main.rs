//! `meshward`: the one binary of the mesh. This file only parses arguments and hands each
//! subcommand to the code that implements it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod control_cmd;
mod demo_app;
mod drill;
mod logs;
mod policy_cmd;
mod proxy_cmd;
mod up;

#[derive(Debug, Parser)]
#[command(
    name = "meshward",
    version,
    about = "Meshward: a service mesh that proves its security policy before it ships",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: control_cmd::Conn,
    /// Log lines as `text` or `json` (one object per line) [env: MESHWARD_LOG_FORMAT]. What
    /// is logged: RUST_LOG, e.g. `info` (the default), `warn,meshward_proxy=debug`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Exit codes (docs/cli.md): 0 done; 1 findings (lint errors, failed tests, failed drill
/// expectations, a broken audit chain, a rollout followed with `--watch` that was not
/// promoted); 2 a usage error or bad input; 3 the control plane
/// could not be reached; 4 the control plane refused; 130 interrupted.
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;
pub(crate) const EXIT_REFUSED: u8 = 4;

/// The exit code of a command that failed with `e`: unreachable and refused by what the
/// error chain holds, everything else a usage or input error.
fn exit_code_of(e: &anyhow::Error) -> u8 {
    use meshward_control::client::ClientError;
    for cause in e.chain() {
        match cause.downcast_ref::<ClientError>() {
            Some(ClientError::Connect { .. } | ClientError::Protocol(_)) => {
                return EXIT_UNREACHABLE;
            }
            Some(ClientError::Status { .. }) => return EXIT_REFUSED,
            _ => {}
        }
        if cause.downcast_ref::<control_cmd::Refusal>().is_some() {
            return EXIT_REFUSED;
        }
    }
    EXIT_USAGE
}

/// The log format in force, for the processes this one starts (`meshward up`).
pub(crate) static LOG_FORMAT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Structured logs through `tracing` on stderr: the filter from RUST_LOG (targets and
/// levels, `info` by default), text or JSON lines.
fn init_logs(format: Option<LogFormat>) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let format = match format {
        Some(f) => f,
        None => match std::env::var("MESHWARD_LOG_FORMAT").ok().as_deref() {
            None | Some("" | "text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(format!(
                    "MESHWARD_LOG_FORMAT `{other}`: use `text` or `json`"
                ));
            }
        },
    };
    let _ = LOG_FORMAT.set(if format == LogFormat::Json {
        "json"
    } else {
        "text"
    });
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let spec = if spec.trim().is_empty() {
        "info".to_owned()
    } else {
        spec
    };
    let filter: tracing_subscriber::filter::Targets = spec.parse().map_err(|e| {
        format!("RUST_LOG `{spec}`: {e} (write levels and targets, e.g. `info` or `warn,meshward_proxy=debug`)")
    })?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    }
    .map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lint, test, explain, diff and replay policy (policy as code).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the control plane: store, CA, operator API, controllers.
    #[command(
        after_help = "Example:\n  meshward control --data /var/lib/meshward --trust-domain shop.example --listen 127.0.0.1:7443\n\nOn first start it creates the CA, an `admin` operator and DATA/admin.token, and prints\nthe MESHWARD_* variables the other commands read."
    )]
    Control {
        /// Data directory (store, CA, operators).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// Where proxies connect (gRPC over mTLS).
        #[arg(long, default_value = "127.0.0.1:7444")]
        proxy_listen: String,
        /// How often controllers (override expiry) run.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        controller_interval: std::time::Duration,
        /// Plain HTTP, loopback only: Prometheus `/metrics` and the dashboard `/ui`. Serve
        /// it to others through a TLS reverse proxy (docs/telemetry.md).
        #[arg(long, default_value = "127.0.0.1:7445")]
        http_listen: String,
        /// Allow `--http-listen` on a non-loopback address: the dashboard's session cookie
        /// and metrics then cross the network in plain text. Prefer a TLS reverse proxy.
        #[arg(long)]
        insecure_remote_http: bool,
        /// Space kept in the data directory for certificate renewals once the disk fills
        /// (released then; changes are refused until space is freed). `0` disables it.
        #[arg(long, default_value = "32MiB", value_parser = parse_size)]
        disk_reserve: u64,
    },
    /// Apply a policy repository as a new revision (validated, tested, permission-checked).
    #[command(
        after_help = "Examples:\n  meshward apply -f examples/policies --reason \"allow storefronts to POST orders\"\n  meshward apply -f examples/policies --progressive --reason \"tighten payments\"\n\nBaseline, Mesh and federation changes wait for a second platform-security operator:\n`meshward approve ID`. --progressive runs the change in shadow, enforces it only if it\ndenies nothing allowed today, and rolls it back if healthy edges get worse\n(docs/rollout.md; follow it with `meshward rollout status`)."
    )]
    Apply {
        #[arg(short = 'f', long = "filename")]
        dir: PathBuf,
        #[arg(long, default_value = "")]
        reason: String,
        /// Roll the change out progressively: shadow, gate, enforce, watch, roll back on
        /// harm (docs/rollout.md).
        #[arg(long)]
        progressive: bool,
        /// With --progressive: how long the shadow runs (default: the Mesh's
        /// `rollout.bake`, else 60s).
        #[arg(long, value_parser = humantime::parse_duration, requires = "progressive")]
        bake: Option<std::time::Duration>,
        /// With --progressive: how long healthy edges are watched after enforcement
        /// (default: the Mesh's `rollout.watch`, else 120s).
        #[arg(long, value_parser = humantime::parse_duration, requires = "progressive")]
        watch: Option<std::time::Duration>,
        /// With --progressive: enforce even when no traffic reached the affected sidecars
        /// during the bake (a replay of the recorded window must still be clean).
        #[arg(long, requires = "progressive")]
        allow_no_traffic: bool,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// A progressive rollout (`apply --progressive`): its stage and evidence; promote it
    /// past its gate or end it.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The changes waiting for a second platform-security operator: who proposed what,
    /// what it changes, and whose approval it waits for.
    #[command(after_help = "Example:\n  meshward proposals\n  meshward proposals --output json")]
    Proposals {
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Approve a pending change (a second platform-security operator).
    #[command(after_help = "Example:\n  meshward approve 3")]
    Approve {
        id: u64,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List the revisions of the policy set.
    #[command(after_help = "Example:\n  meshward history --output json")]
    History {
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Restore an earlier revision as a new one.
    #[command(
        after_help = "Example:\n  meshward rollback --to 4 --reason \"revert INC-12 change\""
    )]
    Rollback {
        #[arg(long)]
        to: u64,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The head revision and the revision every connected proxy runs (stale ones marked).
    #[command(after_help = "Example:\n  meshward status --output json")]
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The service graph from the decisions proxies ship: workloads, and edges with
    /// request rate, allows, denies (by reason), mTLS and p99 latency.
    #[command(
        after_help = "Examples:\n  meshward graph --output dot | dot -Tsvg > mesh.svg\n  meshward graph --window 15m --output json"
    )]
    Graph {
        /// How far back (e.g. 5m, 1h).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
        /// Only this namespace (its workloads' edges).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: GraphFormat,
    },
    /// A live table of the mesh's traffic: every edge's rate, allows, denies, deny reasons,
    /// p99 latency and mTLS, refreshed until Ctrl-C.
    #[command(
        after_help = "Examples:\n  meshward top\n  meshward top --window 1m --interval 5s\n  meshward top --once --output json"
    )]
    Top {
        /// The window each refresh summarizes.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        window: std::time::Duration,
        /// How often to refresh.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        /// Only this namespace (its workloads' edges).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Read and verify the hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Workload identities: join tokens.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Break-glass overrides: always time-bound, always audited.
    #[command(subcommand)]
    Override(OverrideCommand),
    /// What anomaly detection reported, throttled or quarantined, and releasing it.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// The certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Operators of the control plane.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Bring up a whole local mesh: control plane, policies, a sidecar per workload, apps.
    #[command(
        after_help = "Examples:\n  meshward up examples/quickstart\n  sudo meshward up --isolated examples/quickstart\n\nDIR holds mesh.yaml (workloads, their apps, ports and calls) and policies/.\nState goes to DIR/.meshward/. Ctrl-C stops everything.\n--isolated (root, Linux): each workload in its own network namespace with its own address\non a bridge, all its TCP captured by its sidecar (transparent mode), like pods on a node."
    )]
    Up {
        dir: PathBuf,
        /// Each workload in its own network namespace, transparent mode (root).
        #[arg(long)]
        isolated: bool,
        /// --isolated: the workloads' /24 network; the bridge takes .1, workloads .10 on.
        #[arg(long, default_value = "10.88.0.0/24", requires = "isolated")]
        subnet: String,
        /// --isolated: the bridge's name, at most 12 characters (also the prefix of the
        /// namespaces' names).
        #[arg(long, default_value = "mw-br0", requires = "isolated")]
        bridge: String,
    },
    /// Chaos drills: rehearse failures against a running mesh and judge the result.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// The access log: every request's status, bytes, duration, caller, verdict and reason
    /// (every deny, sampled allows), from the sidecars' files or the control plane.
    #[command(
        after_help = "Examples:\n  meshward logs                                  # the mesh `meshward up` runs here\n  meshward logs -f --verdict deny                # follow the denies\n  meshward logs --mesh examples/quickstart --source web/frontend --status 4xx\n  meshward logs --file /var/lib/meshward/proxy/decisions.jsonl -o json\n  meshward logs --from-control --since 5m --destination payments\n\nFormat of each record: docs/decision-log.md. Sampled allows carry their weight (x10)."
    )]
    Logs {
        /// The mesh directory of `meshward up` (its `.meshward/proxies/*/decisions.jsonl`).
        #[arg(long, default_value = ".", conflicts_with_all = ["file", "from_control"])]
        mesh: PathBuf,
        /// Read these decision-log files instead (repeatable).
        #[arg(long, conflicts_with = "from_control")]
        file: Vec<PathBuf>,
        /// Read the control plane's decision window (what the sidecars shipped: every
        /// deny, allows thinned and weighted) instead of files.
        #[arg(long)]
        from_control: bool,
        /// Keep printing records as the sidecars write them.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The caller: a SPIFFE ID, `namespace/serviceaccount`, or a namespace.
        #[arg(long)]
        source: Option<String>,
        /// The destination workload `namespace/name`, or a namespace.
        #[arg(long)]
        destination: Option<String>,
        /// Only records whose destination is in this namespace (with --destination NAME:
        /// that workload of the namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long, value_parser = ["allow", "deny"])]
        verdict: Option<String>,
        /// A status (`403`) or a class (`5xx`).
        #[arg(long)]
        status: Option<String>,
        /// A reason code (`denied_by_rule`, `rate_limited`, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only records this recent (`30s`, `5m`, `1h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only the last N records of what is there now (then follow).
        #[arg(long)]
        tail: Option<usize>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The demo app: an HTTP echo server that calls its upstreams in a loop.
    #[command(
        name = "demo-app",
        after_help = "Example:\n  meshward demo-app --listen 127.0.0.1:18080 --name web/frontend --call GET=http://127.0.0.1:15001/orders@2s"
    )]
    DemoApp {
        #[arg(long)]
        listen: String,
        #[arg(long, default_value = "demo")]
        name: String,
        /// `[METHOD=]URL[@EVERY]` to call in a loop (repeatable).
        #[arg(long = "call")]
        calls: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh or fish).
    #[command(
        after_help = "Examples:\n  meshward completion bash > /etc/bash_completion.d/meshward\n  source <(meshward completion bash)\n  meshward completion zsh > \"${fpath[1]}/_meshward\"\n  meshward completion fish > ~/.config/fish/completions/meshward.fish"
    )]
    Completion {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Run the sidecar proxy of one workload (explicit or transparent mode).
    #[command(
        after_help = "Examples:\n  meshward proxy --workload web/frontend --control 127.0.0.1:7444 --ca-file DATA/bundle.pem \\\n    --join-token-file frontend.token --state-dir /var/lib/meshward-proxy/frontend \\\n    --upstream 127.0.0.1:15001=orders/orders:80 --admin 127.0.0.1:15000\n  ip netns exec pod1 meshward proxy --transparent --workload web/frontend --control 10.0.0.2:7444 \\\n    --ca-file bundle.pem --join-token-file frontend.token --state-dir /var/lib/meshward-proxy/frontend\n\nExplicit mode: inbound listeners are the `inbound` addresses of the workload's ports in the\npolicy set; the app listens on 127.0.0.1:PORT. Upstreams are loopback listeners the app calls\nin plaintext; the proxy carries them over mTLS.\nTransparent mode (--transparent, after `meshward proxy init-netns`): all TCP of the network\nnamespace passes through the proxy; see docs/operations.md."
    )]
    Proxy(Box<ProxyArgs>),
}

/// `meshward proxy` reads the mesh's root certificates from the global `--ca-file`
/// (the control plane's DATA/bundle.pem).
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ProxyArgs {
    #[command(subcommand)]
    command: Option<ProxyCommand>,
    /// The workload this sidecar serves, `namespace/name`.
    #[arg(long, required = true)]
    workload: Option<String>,
    /// The control plane's proxy API, `host:port`.
    #[arg(long, required = true)]
    control: Option<String>,
    /// The identity to run as (default `spiffe://TD/ns/NAMESPACE/sa/NAME`).
    #[arg(long)]
    identity: Option<String>,
    /// Worker threads serving connections, 1 to 64. 1 (a current-thread runtime) is what
    /// a sidecar beside one app needs; more for a proxy that is CPU-bound
    /// (docs/proxy.md#workers).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// A file with a single-use join token (needed until the state directory holds an SVID).
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Where the SVID, bundle and last-known-good configuration are kept (mode 0600).
    #[arg(long, required = true)]
    state_dir: Option<PathBuf>,
    /// `LISTEN=NAMESPACE/SERVICE:PORT`, e.g. `127.0.0.1:15001=orders/orders:80` (repeatable).
    #[arg(long = "upstream")]
    upstreams: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: String,
    /// Write the decision log (JSON lines, docs/decision-log.md) here.
    #[arg(long)]
    decision_log: Option<PathBuf>,
    /// Log one allow in this many (every deny is logged).
    #[arg(long, default_value_t = 10)]
    sample_allows: u64,
    /// Ship the decision records (the same ones as the log) to the control plane, keeping
    /// at most this many waiting while it is unreachable (then dropping, counted); 0: off.
    #[arg(long, default_value_t = 2_000)]
    ship_queue: usize,
    /// Ship at most this many sampled allows per second (every deny is shipped); above it
    /// one in N is shipped with N times the weight, so counts stay right; 0: no limit.
    #[arg(long, default_value_t = 500)]
    ship_allows_per_second: u64,
    /// Export a span per request (OpenTelemetry, OTLP/gRPC) to this collector, e.g.
    /// `http://127.0.0.1:4317`; off by default. (`meshward up` reads MESHWARD_OTLP_ENDPOINT.)
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// `off`: no per-request metrics and no decision shipping (the decision log, if
    /// configured, still works); for measuring telemetry's cost.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    telemetry: String,
    /// How upstream traffic goes to the next proxy: `tunnel` (bytes, one mTLS connection
    /// per app connection), `http1` (HTTP/1.1 over a pool of mTLS connections) or `http2`
    /// (multiplexed); see docs/proxy.md for the measured choice.
    #[arg(long, default_value = "tunnel", value_parser = ["tunnel", "http1", "http2"])]
    upstream_protocol: String,
    /// The loopback address the app listens on (explicit mode): the sidecar forwards
    /// inbound traffic to APP_HOST:PORT. Several replicas on one host each bind their own
    /// (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value = "127.0.0.1")]
    app_host: String,
    /// Explicit mode: how often the sidecar checks that its app accepts connections on
    /// every declared port; after two failed checks callers pass this endpoint over until
    /// it accepts again (docs/resilience.md). `0s`: never.
    #[arg(long, default_value = "2s")]
    app_probe_interval: String,
    /// On SIGTERM, tell callers this endpoint is going away and keep serving this long
    /// before exiting, so no request is lost; `0s`: exit at once.
    #[arg(long, default_value = "5s")]
    drain_time: String,
    /// Transparent mode: serve the capture ports that `meshward proxy init-netns` redirects
    /// all TCP of the network namespace to (run as root; see docs/operations.md).
    #[arg(long)]
    transparent: bool,
    /// Transparent mode: the inbound capture listener.
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_capture: String,
    /// Transparent mode: the outbound capture listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_capture: String,
    /// Transparent mode: the socket mark on the proxy's own connections (must match
    /// init-netns).
    #[arg(long, default_value_t = meshward_proxy::transparent::DEFAULT_MARK)]
    mark: u32,
    /// Connections each inbound listener holds at most, handshaking or established, where
    /// the policy's `connectionLimits.total` sets none (default: 8192, or fewer if the
    /// open-file limit leaves room for fewer; docs/proxy.md, "Resource limits").
    #[arg(long, value_name = "N")]
    max_connections: Option<u64>,
    /// Connections one source identity holds at most on each inbound listener, where the
    /// policy's `connectionLimits.perIdentity` sets none (default: an eighth of the total,
    /// at most 1024).
    #[arg(long, value_name = "N")]
    max_connections_per_identity: Option<u64>,
    /// How long a request head may take (the first from the handshake, later ones from
    /// their first byte), where the policy's `connectionLimits.headerReadTimeout` sets
    /// none (default 10s).
    #[arg(long, value_name = "DURATION")]
    header_read_timeout: Option<String>,
    /// How long an inbound connection may sit with no request in progress, where the
    /// policy's `connectionLimits.idleTimeout` sets none (default 2m).
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// The longest an inbound connection may live (e.g. `30m`); it ends at the expiry of
    /// either side's certificate in any case. Unset: certificate expiry only.
    #[arg(long, value_name = "DURATION")]
    max_connection_age: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DrillCommand {
    /// Run a drill: probe traffic, a steady state, each step's failure for its duration
    /// (then undone, also on Ctrl-C), expectations judged with the measured values.
    #[command(
        after_help = "Examples:\n  meshward drill run examples/drills/replica-loss.yaml --mesh examples/quickstart\n  meshward drill run examples/drills/slow-dependency.yaml --mesh examples/quickstart --junit drill.xml\n  meshward drill run drill.yaml --server 127.0.0.1:7443 --output json   # probes by `address`, fault steps only\n\nExit status: 0 every expectation passed, 1 one failed or a step could not be made or undone,\n2 a bad file or an unreachable mesh (nothing changed), 130 interrupted. See docs/drills.md."
    )]
    Run {
        file: PathBuf,
        /// The directory of a running `meshward up` (reads DIR/.meshward/up.json): probes
        /// by `from`/`to`, `stopApp` steps, and its control plane.
        #[arg(long)]
        mesh: Option<PathBuf>,
        /// Also write the results as JUnit XML.
        #[arg(long)]
        junit: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum ProxyCommand {
    /// Install the iptables rules that send all TCP of a network namespace through its
    /// sidecar (the role of Istio's init container). Run as root.
    #[command(
        name = "init-netns",
        after_help = "Examples:\n  ip netns exec pod1 meshward proxy init-netns --exclude-inbound-ports 22\n  meshward proxy init-netns --netns pod1 --policies examples/quickstart/policies --workload web/frontend\n  meshward proxy init-netns --dry-run\n  meshward proxy init-netns --netns pod1 --remove\n\nInbound TCP goes to --inbound-port (15006), outbound TCP to --outbound-port (15001), except\nthe proxy's own connections (socket mark --mark, or --proxy-uid), loopback, and the excluded\nports: the flags plus the workload's `spec.interception` when --policies and --workload are given."
    )]
    InitNetns(InitNetnsArgs),
}

#[derive(Debug, clap::Args)]
struct InitNetnsArgs {
    /// Run in this named network namespace (`ip netns exec NAME`); default: the current one.
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, default_value_t = meshward_proxy::transparent::INBOUND_CAPTURE_PORT)]
    inbound_port: u16,
    #[arg(long, default_value_t = meshward_proxy::transparent::OUTBOUND_CAPTURE_PORT)]
    outbound_port: u16,
    #[arg(long, default_value_t = meshward_proxy::transparent::DEFAULT_MARK)]
    mark: u32,
    /// Also let this user's traffic through uncaptured (a proxy running as its own UID).
    #[arg(long)]
    proxy_uid: Option<u32>,
    /// Inbound ports that reach the app directly, comma-separated.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports the app may dial directly, comma-separated.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// A policy directory to read the workload's `spec.interception` from.
    #[arg(long, requires = "workload")]
    policies: Option<PathBuf>,
    /// The workload (`namespace/name`) whose exclusions to read from --policies.
    #[arg(long)]
    workload: Option<String>,
    /// Print the rules instead of installing them.
    #[arg(long)]
    dry_run: bool,
    /// Remove Meshward's rules instead.
    #[arg(long)]
    remove: bool,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Add an operator (on the control plane's host); prints the file holding its token.
    #[command(
        after_help = "Examples:\n  meshward operator add bob --data /var/lib/meshward --role platform-security\n  meshward operator add carol --data /var/lib/meshward --namespace payments\n\nA running control plane picks the change up at once."
    )]
    Add {
        name: String,
        #[arg(long)]
        data: PathBuf,
        /// A role, e.g. `platform-security` (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// A namespace the operator owns (repeatable).
        #[arg(long = "namespace")]
        namespaces: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// List audit entries.
    #[command(after_help = "Example:\n  meshward audit log --action apply --limit 20")]
    Log {
        #[arg(long)]
        actor: Option<String>,
        /// Actions starting with this (`apply`, `token`, `svid`, `override`).
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Check the hash chain; names the first edited, deleted or reordered entry.
    #[command(
        after_help = "Examples:\n  meshward audit verify\n  meshward audit verify --data /var/lib/meshward   # offline, on the store itself\n\nExit status 1 when the chain is broken."
    )]
    Verify {
        /// Verify the store in this data directory directly (no server needed).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum WorkloadCommand {
    /// Issue a single-use join token bound to one workload identity.
    #[command(
        after_help = "Example:\n  meshward workload token --identity spiffe://shop.example/ns/web/sa/frontend --ttl 10m"
    )]
    Token {
        #[arg(long)]
        identity: String,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// The rollout running now (or the last one): stage, time left, the edges the
    /// candidate would change with counts, the sidecars, the outcome.
    #[command(
        after_help = "Examples:\n  meshward rollout status\n  meshward rollout status --watch\n  meshward rollout status -o json"
    )]
    Status {
        /// Follow it until it ends, printing every change of stage.
        #[arg(long)]
        watch: bool,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Enforce a rollout now (in shadow or held at the gate; the watch still follows),
    /// or end its watch as promoted.
    #[command(
        after_help = "Example:\n  meshward rollout promote --reason \"the denied caller is retired (INC-88)\""
    )]
    Promote {
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// End a rollout: before enforcement nothing changes; during the watch the change is
    /// rolled back.
    #[command(
        after_help = "Example:\n  meshward rollout abort --reason \"breaks the nightly export\""
    )]
    Abort {
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum OverrideCommand {
    /// Create an override (expiry required, capped by the Mesh).
    #[command(
        after_help = "Example:\n  meshward override create inc-4711 -n payments --allow \\\n    --from spiffe://shop.example/ns/web/sa/frontend --to payments-api \\\n    --reason \"diagnose checkout\" --ticket INC-4711 --expires-in 30m"
    )]
    Create {
        name: String,
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long, group = "action")]
        allow: bool,
        #[arg(long, group = "action")]
        deny: bool,
        #[arg(long, group = "action")]
        quarantine: bool,
        /// Subject identity (repeatable).
        #[arg(long)]
        from: Vec<String>,
        /// Target workload `name` or `ns/name` (repeatable).
        #[arg(long)]
        to: Vec<String>,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        ticket: Option<String>,
        #[arg(long)]
        requester: Option<String>,
        #[arg(long)]
        approver: Option<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: std::time::Duration,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List overrides in force.
    #[command(
        after_help = "Examples:\n  meshward override list --output json\n  meshward override list -n payments"
    )]
    List {
        /// Only overrides of this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Revoke an override before it expires.
    #[command(
        after_help = "Examples:\n  meshward override revoke payments/inc-4711\n  meshward override revoke inc-4711 -n payments"
    )]
    Revoke {
        /// `namespace/name`, or `name` with -n.
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum QuarantineCommand {
    /// Identities anomaly detection reported (last hour), throttled or quarantined, with
    /// the evidence.
    #[command(after_help = "Example:\n  meshward quarantine list --output json")]
    List {
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
    },
    /// Lift an identity's throttle and quarantine (its namespace owner or
    /// platform-security; audited).
    #[command(
        after_help = "Example:\n  meshward quarantine release spiffe://shop.example/ns/web/sa/frontend \\\n    --reason \"INC-4711: image rebuilt, credentials rotated\""
    )]
    Release {
        /// The identity, or the `namespace/name` `quarantine list` shows.
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Rotate the CA: the intermediate, or the root in two steps with an overlap.
    #[command(
        after_help = "Examples:\n  meshward ca rotate                   # new intermediate; old leaves stay valid until they expire\n  meshward ca rotate --root            # step 1: the new root joins the bundle, pushed to every proxy\n  meshward status                      # wait until no proxy is STALE\n  meshward ca rotate --root --finish   # step 2: sign with the new root's intermediate"
    )]
    Rotate {
        /// Rotate the root (step 1; with --finish, step 2).
        #[arg(long)]
        root: bool,
        /// Finish a root rotation.
        #[arg(long, requires = "root")]
        finish: bool,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

/// Output format for commands that print results.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

impl Output {
    /// `v` as the structured format's document (`None`: text output).
    pub fn doc<T: serde::Serialize + ?Sized>(self, v: &T) -> Option<String> {
        let v = serde_json::to_value(v).unwrap_or_default();
        match self {
            Output::Text => None,
            Output::Json => Some(serde_json::to_string_pretty(&v).unwrap_or_default()),
            Output::Yaml => Some(to_yaml(&v)),
        }
    }
}

/// A JSON value as one YAML document (`---` first; strings that would read as another
/// type are quoted).
pub fn to_yaml(v: &serde_json::Value) -> String {
    fn conv(v: &serde_json::Value) -> yaml_rust2::Yaml {
        use yaml_rust2::Yaml;
        match v {
            serde_json::Value::Null => Yaml::Null,
            serde_json::Value::Bool(b) => Yaml::Boolean(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            serde_json::Value::String(s) => Yaml::String(s.clone()),
            serde_json::Value::Array(a) => Yaml::Array(a.iter().map(conv).collect()),
            serde_json::Value::Object(o) => Yaml::Hash(
                o.iter()
                    .map(|(k, v)| (Yaml::String(k.clone()), conv(v)))
                    .collect(),
            ),
        }
    }
    let mut out = String::new();
    let _ = yaml_rust2::YamlEmitter::new(&mut out).dump(&conv(v));
    out
}

/// Output format for `graph`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum GraphFormat {
    Text,
    Json,
    Yaml,
    Dot,
}

/// Output format for `lint`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LintFormat {
    Text,
    Json,
    Yaml,
    Sarif,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check a policy repository: schema, references and semantics, with stable codes.
    #[command(
        after_help = "Examples:\n  meshward policy lint examples/policies\n  meshward policy lint examples/policies --format sarif > lint.sarif\n\nExit status: 0 clean or warnings only, 1 errors found."
    )]
    Lint {
        /// A directory of YAML files (read recursively) or one file.
        dir: PathBuf,
        /// `-o`/`--output` as in every other command.
        #[arg(
            short = 'o',
            long,
            visible_alias = "output",
            value_enum,
            default_value = "text"
        )]
        format: LintFormat,
        /// Judge override expiry against this time (RFC 3339) instead of now.
        #[arg(long)]
        now: Option<String>,
    },
    /// Run the PolicyTest scenarios of a policy repository.
    #[command(
        after_help = "Examples:\n  meshward policy test examples/policies\n  meshward policy test examples/policies --junit policy-tests.xml\n\nEnds with the line `N passed, N failed`; exit status 1 when any scenario fails."
    )]
    Test {
        dir: PathBuf,
        /// Also write JUnit XML to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
        /// Evaluate scenarios without their own time at this time (RFC 3339) instead of now.
        #[arg(long)]
        now: Option<String>,
    },
    /// Explain the verdict for one request, tier by tier.
    #[command(
        after_help = "Example:\n  meshward policy explain examples/policies \\\n    --from spiffe://shop.example/ns/web/sa/frontend --to payments/payments-api \\\n    --port 8443 --method POST --path /v1/charges"
    )]
    Explain(ExplainArgs),
    /// Semantic diff: which edges change verdict between two policy sets.
    #[command(
        after_help = "Example:\n  meshward policy diff old-policies/ examples/policies --output json\n\nExit status: 0, or 1 with --exit-code when any edge changes."
    )]
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
        /// Evaluate at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// Exit 1 when any edge changes verdict.
        #[arg(long)]
        exit_code: bool,
    },
    /// Replay a recorded decision log against a candidate policy set.
    #[command(
        after_help = "Example:\n  meshward policy impact examples/policies --log decisions.jsonl\n\nThe log format is described in docs/decision-log.md."
    )]
    Impact {
        /// The candidate policy set.
        dir: PathBuf,
        /// A decision log (JSON lines); `-` reads standard input.
        #[arg(
            long,
            required_unless_present = "from_control",
            conflicts_with = "from_control"
        )]
        log: Option<PathBuf>,
        /// Replay the decision window the control plane keeps (shipped by every proxy)
        /// instead of a file (uses --server, --token-file, --ca-file).
        #[arg(long)]
        from_control: bool,
        /// With --from-control: only the last DURATION (e.g. 1h); default all it keeps.
        #[arg(long, value_parser = humantime::parse_duration, requires = "from_control")]
        window: Option<std::time::Duration>,
        /// Evaluate every record at this time (RFC 3339) instead of the record's own.
        #[arg(long)]
        at: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
        /// Exit 1 when any recorded request would flip.
        #[arg(long)]
        exit_code: bool,
    },
    /// Suggest least-privilege service-tier ALLOW policies from observed traffic.
    #[command(
        after_help = "Examples:\n  meshward policy suggest --log decisions.jsonl > suggested.yaml\n  meshward policy suggest --from-control --window 24h -o suggested.yaml"
    )]
    Suggest {
        /// A decision log (JSON lines); `-` reads standard input.
        #[arg(
            long,
            required_unless_present = "from_control",
            conflicts_with = "from_control"
        )]
        log: Option<PathBuf>,
        /// Mine the decision window the control plane keeps instead of a file.
        #[arg(long)]
        from_control: bool,
        /// With --from-control: only the last DURATION (e.g. 24h).
        #[arg(long, value_parser = humantime::parse_duration, requires = "from_control")]
        window: Option<std::time::Duration>,
        /// Collapse more than this many sibling paths into `parent/*` (0 = never).
        #[arg(long, default_value_t = 8)]
        collapse_above: usize,
        /// Write the YAML here instead of standard output.
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ExplainArgs {
    dir: PathBuf,
    /// The source SPIFFE ID, or `unauthenticated`.
    #[arg(long)]
    from: String,
    /// The destination workload, `namespace/name`.
    #[arg(long)]
    to: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    method: Option<String>,
    /// The request path; normalized as the proxy would.
    #[arg(long)]
    path: Option<String>,
    #[arg(long)]
    host: Option<String>,
    /// A request header `name=value`; repeat for more.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Evaluate at this time (RFC 3339) instead of now.
    #[arg(long)]
    at: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

/// The shells `meshward completion` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logs(cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let sh = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = Vec::new();
            clap_complete::generate(sh, &mut Cli::command(), "meshward", &mut script);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(cmd) => match cmd {
            PolicyCommand::Lint { dir, format, now } => {
                policy_cmd::lint(&dir, format, now.as_deref())
            }
            PolicyCommand::Test {
                dir,
                junit,
                output,
                now,
            } => policy_cmd::test(&dir, junit.as_deref(), output, now.as_deref()),
            PolicyCommand::Explain(a) => policy_cmd::explain(&policy_cmd::ExplainInput {
                dir: a.dir,
                from: a.from,
                to: a.to,
                port: a.port,
                method: a.method,
                path: a.path,
                host: a.host,
                headers: a.headers,
                at: a.at,
                output: a.output,
            }),
            PolicyCommand::Diff {
                old,
                new,
                output,
                at,
                exit_code,
            } => policy_cmd::diff(&old, &new, output, at.as_deref(), exit_code),
            PolicyCommand::Impact {
                dir,
                log,
                from_control,
                window,
                at,
                output,
                exit_code,
            } => policy_cmd::LogSource::new(log, from_control, window, &cli.conn)
                .and_then(|src| policy_cmd::impact(&dir, &src, at.as_deref(), output, exit_code)),
            PolicyCommand::Suggest {
                log,
                from_control,
                window,
                collapse_above,
                out,
            } => policy_cmd::LogSource::new(log, from_control, window, &cli.conn)
                .and_then(|src| policy_cmd::suggest(&src, collapse_above, out.as_deref())),
        },
        Command::Control {
            data,
            trust_domain,
            listen,
            proxy_listen,
            controller_interval,
            http_listen,
            insecure_remote_http,
            disk_reserve,
        } => control_cmd::control(
            &data,
            &trust_domain,
            &listen,
            &proxy_listen,
            controller_interval,
            &http_listen,
            insecure_remote_http,
            disk_reserve,
        ),
        Command::Status { output } => control_cmd::status(&cli.conn, output),
        Command::Graph {
            window,
            namespace,
            output,
        } => control_cmd::graph(&cli.conn, window, namespace.as_deref(), output),
        Command::Top {
            window,
            interval,
            once,
            namespace,
            output,
        } => control_cmd::top(
            &cli.conn,
            window,
            interval,
            once,
            namespace.as_deref(),
            output,
        ),
        Command::Proxy(a) => proxy_cmd::run(*a, &cli.conn),
        Command::Up {
            dir,
            isolated,
            subnet,
            bridge,
        } => up::run(&dir, isolated.then_some(up::Isolation { subnet, bridge })),
        Command::DemoApp {
            listen,
            name,
            calls,
        } => demo_app::run(&listen, &name, &calls),
        Command::Operator(OperatorCommand::Add {
            name,
            data,
            roles,
            namespaces,
        }) => meshward_control::server::add_operator(&data, &name, roles, namespaces)
            .map_err(anyhow::Error::msg)
            .map(|f| {
                println!(
                    "added operator `{name}`; its bearer token is in {}",
                    f.display()
                );
                println!("  export MESHWARD_TOKEN_FILE={}", f.display());
                ExitCode::SUCCESS
            }),
        Command::Logs {
            mesh,
            file,
            from_control,
            follow,
            source,
            destination,
            namespace,
            verdict,
            status,
            reason,
            since,
            tail,
            output,
        } => {
            let destination = match (namespace, destination) {
                (None, d) => Ok(d),
                (Some(ns), None) => Ok(Some(ns)),
                (Some(ns), Some(d)) if !d.contains('/') => Ok(Some(format!("{ns}/{d}"))),
                (Some(_), Some(_)) => Err(anyhow::anyhow!(
                    "with -n NAMESPACE give --destination as a workload name, not `namespace/name`"
                )),
            };
            let from = if from_control {
                logs::From::Control
            } else if !file.is_empty() {
                logs::From::Files(file)
            } else {
                logs::From::Mesh(mesh)
            };
            destination.and_then(|destination| {
                let filter = logs::Filter {
                    source,
                    destination,
                    verdict: verdict.map(|v| {
                        if v == "allow" {
                            meshward_policy::decision::Verdict::Allow
                        } else {
                            meshward_policy::decision::Verdict::Deny
                        }
                    }),
                    status,
                    reason,
                    since,
                };
                logs::run(&cli.conn, from, &filter, follow, tail, output)
            })
        }
        Command::Drill(DrillCommand::Run {
            file,
            mesh,
            junit,
            output,
        }) => drill::run(&cli.conn, &file, mesh.as_deref(), junit.as_deref(), output),
        Command::Apply {
            dir,
            reason,
            progressive,
            bake,
            watch,
            allow_no_traffic,
            output,
        } => {
            let progressive = progressive.then(|| {
                serde_json::json!({
                    "bake_seconds": bake.map(|d| d.as_secs_f64()),
                    "watch_seconds": watch.map(|d| d.as_secs_f64()),
                    "allow_no_traffic": allow_no_traffic,
                })
            });
            control_cmd::apply(&cli.conn, &dir, &reason, progressive, output)
        }
        Command::Rollout(RolloutCommand::Status { watch, output }) => {
            control_cmd::rollout_status(&cli.conn, watch, output)
        }
        Command::Rollout(RolloutCommand::Promote { reason, output }) => {
            control_cmd::rollout_act(&cli.conn, "promote", &reason, output)
        }
        Command::Rollout(RolloutCommand::Abort { reason, output }) => {
            control_cmd::rollout_act(&cli.conn, "abort", &reason, output)
        }
        Command::Approve { id, output } => control_cmd::approve(&cli.conn, id, output),
        Command::Proposals { output } => control_cmd::proposals(&cli.conn, output),
        Command::History { output } => control_cmd::history(&cli.conn, output),
        Command::Rollback { to, reason, output } => {
            control_cmd::rollback(&cli.conn, to, &reason, output)
        }
        Command::Audit(AuditCommand::Log {
            actor,
            action,
            limit,
            output,
        }) => control_cmd::audit_log(
            &cli.conn,
            actor.as_deref(),
            action.as_deref(),
            limit,
            output,
        ),
        Command::Audit(AuditCommand::Verify { data, output }) => {
            control_cmd::audit_verify(&cli.conn, data.as_deref(), output)
        }
        Command::Workload(WorkloadCommand::Token {
            identity,
            ttl,
            output,
        }) => control_cmd::token(&cli.conn, &identity, ttl, output),
        Command::Override(OverrideCommand::Create {
            name,
            namespace,
            allow,
            deny,
            quarantine,
            from,
            to,
            reason,
            ticket,
            requester,
            approver,
            expires_in,
            output,
        }) => {
            let action = match (allow, deny, quarantine) {
                (true, _, _) => Some("allow"),
                (_, true, _) => Some("deny"),
                (_, _, true) => Some("quarantine"),
                _ => None,
            };
            match action {
                None => Err(anyhow::anyhow!(
                    "say what the override does: --allow, --deny or --quarantine"
                )),
                Some(action) => control_cmd::override_create(
                    &cli.conn,
                    &control_cmd::OverrideInput {
                        name,
                        namespace,
                        action,
                        from,
                        to,
                        reason,
                        ticket,
                        requester,
                        approver,
                        expires_in,
                    },
                    output,
                ),
            }
        }
        Command::Override(OverrideCommand::List { namespace, output }) => {
            control_cmd::override_list(&cli.conn, namespace.as_deref(), output)
        }
        Command::Override(OverrideCommand::Revoke {
            name,
            namespace,
            output,
        }) => match (name.split_once('/'), namespace) {
            (Some((ns, n)), None) => control_cmd::override_revoke(&cli.conn, ns, n, output),
            (None, Some(ns)) => control_cmd::override_revoke(&cli.conn, &ns, &name, output),
            (Some(_), Some(_)) => Err(anyhow::anyhow!(
                "give the override as `namespace/name` or as `name -n namespace`, not both"
            )),
            (None, None) => Err(anyhow::anyhow!(
                "name the override as `namespace/name` or `name -n namespace`"
            )),
        },
        Command::Quarantine(QuarantineCommand::List { output }) => {
            control_cmd::quarantine_list(&cli.conn, output)
        }
        Command::Quarantine(QuarantineCommand::Release { id, reason, output }) => {
            control_cmd::quarantine_release(&cli.conn, &id, &reason, output)
        }
        Command::Ca(CaCommand::Rotate {
            root,
            finish,
            output,
        }) => control_cmd::ca_rotate(&cli.conn, root, finish, output),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// `32MiB`, `512KiB`, `1GiB` or a number of bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size: write e.g. 32MiB, 512KiB or 0"))
}
