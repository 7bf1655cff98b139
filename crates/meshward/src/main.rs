//! `meshward`: the one binary of the mesh. This file only parses arguments and hands each
//! subcommand to the code that implements it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod policy_cmd;

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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lint, test, explain, diff and replay policy (policy as code).
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// Output format for commands that print results.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Output format for `lint`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LintFormat {
    Text,
    Json,
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
        #[arg(long, value_enum, default_value = "text")]
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
        #[arg(long, value_enum, default_value = "text")]
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
        #[arg(long, value_enum, default_value = "text")]
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
        #[arg(long)]
        log: PathBuf,
        /// Evaluate every record at this time (RFC 3339) instead of the record's own.
        #[arg(long)]
        at: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Exit 1 when any recorded request would flip.
        #[arg(long)]
        exit_code: bool,
    },
    /// Suggest least-privilege service-tier ALLOW policies from observed traffic.
    #[command(
        after_help = "Example:\n  meshward policy suggest --log decisions.jsonl > suggested.yaml"
    )]
    Suggest {
        /// A decision log (JSON lines); `-` reads standard input.
        #[arg(long)]
        log: PathBuf,
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
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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
                at,
                output,
                exit_code,
            } => policy_cmd::impact(&dir, &log, at.as_deref(), output, exit_code),
            PolicyCommand::Suggest {
                log,
                collapse_above,
                out,
            } => policy_cmd::suggest(&log, collapse_above, out.as_deref()),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
