//! `hitless`: the operator's command line. Exit status: 0 success, 1 the operation failed,
//! 2 bad input (flags, files, parameters), with every problem reported at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hitless_coordinator::planner::{self, PlanError};
use hitless_coordinator::Target;
use hitless_model::{Architecture, Cluster};

mod certs;
mod demo;
mod remote;
mod render;

/// Zero-downtime rollouts for microservices, enforced by eBPF in every node's kernel.
#[derive(Parser)]
#[command(name = "hitless", version)]
struct Cli {
    /// Address of the coordinator (for the commands that talk to one): https://HOST:PORT
    /// with --tls-dir [default: https://127.0.0.1:7070], http://127.0.0.1:PORT with --insecure.
    #[arg(long, global = true, value_name = "URL")]
    coordinator: Option<String>,
    /// Mutual TLS: the directory with ca.pem and the certificates (`hitless certs`);
    /// the coordinator serves coordinator.pem, the other commands present --identity's.
    #[arg(long, global = true, value_name = "DIR", env = "HITLESS_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The certificate the commands present, as its file stem in --tls-dir:
    /// operator-NAME for DIR/operator-NAME.pem and DIR/operator-NAME-key.pem.
    #[arg(long, global = true, value_name = "operator-NAME", env = "HITLESS_IDENTITY")]
    identity: Option<String>,
    /// Plaintext gRPC instead of mutual TLS: anyone who can reach the port may do
    /// anything. Allowed on loopback addresses only (development, tests, the demo).
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preview a rollout: every step from the current architecture to the target, touching nothing.
    Plan(PlanArgs),
    /// Create a CA and issue certificates for the coordinator, agents and operators.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Run the coordinator server (registry, agent sessions, drain barriers).
    Coordinator(remote::ServeArgs),
    /// Show the registry revision and every node's agent: applied revision, lag, last contact.
    Status(remote::StatusArgs),
    /// Mark an instance draining; returns once every live agent has it in its kernel maps.
    Drain(remote::DrainArgs),
    /// Put a drained instance back in service, with the same barrier.
    Undrain(remote::DrainArgs),
    /// Read and change the coordinator's registry.
    #[command(subcommand)]
    Registry(remote::RegistryCommand),
    /// The node roster: list it, or retire a node that is gone.
    #[command(subcommand)]
    Node(remote::NodeCommand),
    /// Start a rollout to a target architecture (or retarget the one running).
    Push(remote::PushArgs),
    /// Hold the rollout before its next step.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Open the approval gate the rollout waits at.
    Promote,
    /// Return to the last completed architecture, the safe way.
    Abort,
    /// Print the running architecture as an architecture file (for `plan --current`).
    Pull,
    /// Roll a demo service v1 → v2 on simulated nodes the hitless way and the
    /// conventional way, and compare (root; builds nothing, needs the sibling binaries).
    Demo(demo::DemoArgs),
    /// The demo's load generator (run by `hitless demo` inside a node's cgroup).
    #[command(hide = true)]
    DemoClient(demo::client::ClientArgs),
}

#[derive(Args)]
struct PlanArgs {
    /// Architecture file to reach.
    #[arg(long, value_name = "FILE")]
    target: PathBuf,
    /// Architecture file of what runs now (as `hitless pull` prints it); default: nothing runs.
    #[arg(long, value_name = "FILE")]
    current: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The strategy and its parameters.
    #[command(flatten)]
    strategy: remote::StrategyArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Bad input: every problem, one per line; exit status 2.
struct BadInput(Vec<String>);

enum Failure {
    BadInput(BadInput),
    Failed(anyhow::Error),
}

impl From<remote::RemoteError> for Failure {
    fn from(e: remote::RemoteError) -> Self {
        match e {
            remote::RemoteError::BadInput(text) => Self::BadInput(BadInput(text.lines().map(str::to_owned).collect())),
            remote::RemoteError::Failed(e) => Self::Failed(e),
        }
    }
}

impl From<BadInput> for Failure {
    fn from(b: BadInput) -> Self {
        Self::BadInput(b)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = remote::ConnectFlags {
        url: cli.coordinator.as_deref(),
        tls_dir: cli.tls_dir.as_deref(),
        identity: cli.identity.as_deref(),
        insecure: cli.insecure,
    };
    let to = || remote::Target::from_flags(&flags).map_err(Failure::from);
    let result = match cli.command {
        Command::Plan(args) => plan(&args),
        Command::Certs(cmd) => certs::run(&cmd).map_err(Failure::from),
        Command::Coordinator(args) => remote::serve(&args, flags.tls_dir, flags.insecure).map_err(Failure::from),
        Command::Status(args) => to().and_then(|to| remote::status(&to, &args).map_err(Failure::from)),
        Command::Drain(args) => to().and_then(|to| remote::drain(&to, &args, false).map_err(Failure::from)),
        Command::Undrain(args) => to().and_then(|to| remote::drain(&to, &args, true).map_err(Failure::from)),
        Command::Registry(cmd) => to().and_then(|to| remote::registry(&to, &cmd).map_err(Failure::from)),
        Command::Node(cmd) => to().and_then(|to| remote::node(&to, &cmd).map_err(Failure::from)),
        Command::Push(args) => to().and_then(|to| remote::push(&to, &args).map_err(Failure::from)),
        Command::Pause => to().and_then(|to| remote::control(&to, "pause").map_err(Failure::from)),
        Command::Resume => to().and_then(|to| remote::control(&to, "resume").map_err(Failure::from)),
        Command::Promote => to().and_then(|to| remote::control(&to, "promote").map_err(Failure::from)),
        Command::Abort => to().and_then(|to| remote::control(&to, "abort").map_err(Failure::from)),
        Command::Pull => to().and_then(|to| remote::pull(&to).map_err(Failure::from)),
        Command::Demo(args) => match demo::run(args) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::Failed(anyhow::anyhow!("the hitless way lost requests (see the table)"))),
            Err(e) => Err(Failure::Failed(e)),
        },
        Command::DemoClient(args) => demo::client::run(&args).map_err(Failure::Failed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(BadInput(problems))) => {
            for p in problems {
                eprintln!("error: {p}");
            }
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn plan(args: &PlanArgs) -> Result<(), Failure> {
    let mut problems = Vec::new();
    let strategy = args.strategy.build().map_err(|p| problems.extend(p)).ok();
    let target = read_architecture(&args.target, "--target").map_err(|p| problems.extend(p)).ok();
    let current = match &args.current {
        Some(path) => read_architecture(path, "--current").map_err(|p| problems.extend(p)).ok(),
        None => Some(Architecture::default()),
    };
    let (Some((strategy, gates)), Some(target), Some(current)) = (strategy, target, current) else {
        return Err(BadInput(problems).into());
    };
    let plan = planner::plan(&Cluster::from_architecture(&current), &Target::new(&target), &strategy, &gates).map_err(
        |e| match e {
            PlanError::GateBeyondPlan { .. } => Failure::BadInput(BadInput(vec![e.to_string()])),
            e => Failure::Failed(anyhow::Error::new(e).context("planning failed")),
        },
    )?;
    let text = match args.output {
        Output::Table => render::table(&plan),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(&render::json(&plan))
                .context("rendering the plan as JSON")
                .map_err(Failure::Failed)?;
            s.push('\n');
            s
        }
    };
    print!("{text}");
    Ok(())
}

/// Reads and validates an architecture file; problems are prefixed with the file's name.
fn read_architecture(path: &Path, flag: &str) -> Result<Architecture, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{flag} {}: cannot read the file: {e}", path.display())])?;
    Architecture::parse(&text).map_err(|e| e.problems().iter().map(|p| format!("{}: {p}", path.display())).collect())
}
