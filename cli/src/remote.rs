//! The `hitless` commands that run or talk to a coordinator: `coordinator`, `status`,
//! `drain`, `undrain`, `registry ...` and `node ...`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use hitless_coordinator::engine::record::StrategyRecord;
use hitless_coordinator::server::{MAX_REGISTRY_TEXT, MAX_REGISTRY_YAML};
use hitless_coordinator::{GateSpec, Strategy};
use hitless_model::Duration;
use hitless_proto::v1::{self as pb, coordinator_client::CoordinatorClient, registry_client::RegistryClient};
use tonic::transport::Channel;

/// Where a coordinator listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// `hitless coordinator`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Directory of the coordinator's store (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Log format.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Longest wait for a new instance to become healthy before its step fails.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub health_timeout: Duration,
    /// Prometheus server whose HTTP API evaluates analysis gates (http://HOST:PORT);
    /// without it, gates read the counters agents send.
    #[arg(long, value_name = "URL")]
    pub prometheus_url: Option<hitless_coordinator::engine::prometheus::PromUrl>,
    /// How long after a gate's window Prometheus has scraped the window's last samples
    /// (about two scrape intervals).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub prometheus_lag: Duration,
    /// How long a stopped instance stays registered as `down` (so that clients whose
    /// registry cache still lists it are steered to a sibling) before it is removed.
    #[arg(long, value_name = "DURATION", default_value = "3m")]
    pub tombstone: Duration,
}

/// `hitless node ...`.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// Print the node roster: every node whose agent said hello, connected or not, with
    /// its last contact.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Retire a node from the roster (rollouts stop waiting for it). Refused while its
    /// agent is connected or it runs registered instances, unless --force.
    Remove {
        /// Node name.
        node: String,
        /// Remove it anyway: a connected agent's session ends (it joins again at its
        /// next hello); its registered instances stay registered.
        #[arg(long)]
        force: bool,
    },
}

/// `hitless drain` / `hitless undrain`.
#[derive(Args)]
pub struct DrainArgs {
    /// Service of the instance.
    pub service: String,
    /// Address of the instance (IP:port).
    pub address: String,
    /// Longest wait for every live agent to acknowledge.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// The strategy flags of `plan` and `push`, as the gRPC `StrategySpec` carries them:
/// one builder ([`StrategyRecord::build_named`]) checks them for both.
#[derive(Args)]
pub struct StrategyArgs {
    /// Update strategy: straight, canary, blue-green, mixed, rolling, gray, weighted.
    #[arg(long, value_name = "S")]
    pub strategy: String,
    /// rolling: instances allowed over the desired count, N or P% [default: 25%].
    #[arg(long, value_name = "N|P%", default_value = "")]
    pub max_surge: String,
    /// rolling: serving instances allowed under the desired count, N or P% [default: 25%].
    #[arg(long, value_name = "N|P%", default_value = "")]
    pub max_unavailable: String,
    /// gray: size of the first batch, before its approval gate [default: 1].
    #[arg(long, value_name = "N|P%", default_value = "")]
    pub first_batch: String,
    /// gray: batches after the first [default: 3].
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub batches: u32,
    /// weighted: traffic shares of the new version, in percent [default: 5,25,50,100].
    #[arg(long, value_name = "P,P,...", value_delimiter = ',')]
    pub steps: Vec<u32>,
    /// Pause after a step: STEP (approval), STEP:approval, STEP:analysis or
    /// STEP:analysis=WINDOW,MAX%[,hold|pass|fail] (e.g. 2:analysis=5m,0.5%; the last part
    /// says what a window with nothing to judge does, hold by default). Repeatable.
    #[arg(long = "gate", value_name = "SPEC")]
    pub gates: Vec<String>,
}

impl StrategyArgs {
    /// The flags as the gRPC request carries them.
    pub fn spec(&self) -> pb::StrategySpec {
        pb::StrategySpec {
            name: self.strategy.clone(),
            max_surge: self.max_surge.clone(),
            max_unavailable: self.max_unavailable.clone(),
            first_batch: self.first_batch.clone(),
            batches: self.batches,
            steps: self.steps.clone(),
            gates: self.gates.clone(),
        }
    }

    /// The strategy and gates, or every problem, each naming its flag.
    pub fn build(&self) -> Result<(Strategy, Vec<GateSpec>), Vec<String>> {
        StrategyRecord::from(&self.spec()).build_named(&|field| match field {
            "" | "name" => "--strategy".to_owned(),
            f if f.starts_with("gates[") => {
                format!("--gate #{}", f[6..f.len() - 1].parse::<usize>().map_or(0, |i| i + 1))
            }
            f => format!("--{}", f.replace('_', "-")),
        })
    }
}

/// `hitless push`.
#[derive(Args)]
pub struct PushArgs {
    /// Architecture file to reach.
    #[arg(long, value_name = "FILE")]
    pub target: PathBuf,
    /// The strategy and its parameters.
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// Follow the rollout until it ends: exit 0 when it reaches the target, 1 when it
    /// fails or rolls back.
    #[arg(long)]
    pub wait: bool,
}

/// `hitless status`.
#[derive(Args)]
pub struct StatusArgs {
    /// Keep showing the status, refreshed, until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

/// `hitless registry ...`.
#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Replace the registry with a registry file (the static-mode format).
    Apply {
        /// The registry file.
        file: PathBuf,
    },
    /// Print services and instances.
    List {
        /// Output format.
        #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Register an instance (its service is created when new).
    Register {
        /// Service.
        service: String,
        /// Instance address (IP:port).
        address: String,
        /// Version label.
        #[arg(long, default_value = "")]
        version: String,
        /// Relative weight.
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Lease: the instance goes down when no heartbeat renews it within this time.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<Duration>,
    },
    /// Remove an instance.
    Deregister {
        /// Service.
        service: String,
        /// Instance address.
        address: String,
    },
}

/// How a remote command ended, for the exit status.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The request was refused as bad input (exit 2).
    #[error("{0}")]
    BadInput(String),
    /// The operation failed or the coordinator is unreachable (exit 1).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RemoteError {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(e)
    }
}

fn status_error(s: tonic::Status) -> RemoteError {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => RemoteError::BadInput(s.message().to_owned()),
        tonic::Code::Unavailable => {
            RemoteError::Failed(anyhow::anyhow!("the coordinator is unavailable: {}", s.message()))
        }
        _ => RemoteError::Failed(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, RemoteError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(RemoteError::Failed)
}

async fn channel(url: &str) -> Result<Channel, RemoteError> {
    let endpoint = Channel::from_shared(url.to_owned())
        .map_err(|_| RemoteError::BadInput(format!("--coordinator {url:?}: give a URL such as {DEFAULT_URL}")))?;
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}; is `hitless coordinator` running there?"))
        .map_err(RemoteError::Failed)
}

/// Runs the coordinator until SIGINT or SIGTERM.
pub fn serve(args: &ServeArgs) -> Result<(), RemoteError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    runtime()?.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        let settings = hitless_coordinator::server::Settings {
            health_timeout: args.health_timeout.to_std(),
            prometheus: args.prometheus_url.clone(),
            prometheus_lag: args.prometheus_lag.to_std(),
            tombstone: args.tombstone.to_std(),
        };
        hitless_coordinator::server::serve(args.listen, &args.data_dir, settings, |addr| println!("listening on {addr}"), shutdown)
            .await
            .map_err(|e| RemoteError::Failed(e.into()))
    })
}

/// `drain` or `undrain`; fails (exit 1) unless every live agent acknowledged in time.
pub fn drain(url: &str, args: &DrainArgs, undrain: bool) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = CoordinatorClient::new(channel(url).await?);
        let req = pb::DrainRequest {
            key: Some(pb::InstanceKey { service: args.service.clone(), address: args.address.clone() }),
            timeout_ms: args.timeout.as_millis(),
        };
        let resp = if undrain { client.undrain(req).await } else { client.drain(req).await };
        let r = resp.map_err(status_error)?.into_inner();
        let verb = if undrain { "undrain" } else { "drain" };
        if args.output == "json" {
            let nodes: Vec<serde_json::Value> = r
                .nodes
                .iter()
                .map(|n| {
                    serde_json::json!({ "node": n.node, "acked": n.acked, "connected": n.connected, "latency_us": n.latency_us })
                })
                .collect();
            let v = serde_json::json!({ "revision": r.revision, "complete": r.complete, "nodes": nodes });
            println!("{v}");
        } else {
            println!("{verb} {} {}: revision {}", args.service, args.address, r.revision);
            println!("{:<24} {:<10} {:>12}", "NODE", "ACK", "LATENCY");
            for n in &r.nodes {
                let ack = match (n.acked, n.connected) {
                    (true, _) => "yes",
                    (false, true) => "TIMEOUT",
                    (false, false) => "LOST",
                };
                let latency = if n.acked { format!("{:.2}ms", n.latency_us as f64 / 1000.0) } else { "-".into() };
                println!("{:<24} {:<10} {:>12}", n.node, ack, latency);
            }
            if r.nodes.iter().any(|n| !n.connected) {
                println!("LOST: the agent is disconnected; its node keeps steering with its last state and gets the {verb} when it reconnects");
            }
        }
        if r.complete {
            Ok(())
        } else {
            let late: Vec<&str> = r.nodes.iter().filter(|n| n.connected && !n.acked).map(|n| n.node.as_str()).collect();
            Err(RemoteError::Failed(anyhow::anyhow!(
                "{verb} not acknowledged within {} by: {}",
                args.timeout,
                late.join(", ")
            )))
        }
    })
}

/// `push`: starts (or retargets) a rollout; with `--wait`, follows it to its end.
pub fn push(url: &str, args: &PushArgs) -> Result<(), RemoteError> {
    let text = std::fs::read_to_string(&args.target)
        .map_err(|e| RemoteError::BadInput(format!("--target {}: cannot read the file: {e}", args.target.display())))?;
    if let Err(e) = hitless_model::Architecture::parse(&text) {
        let lines: Vec<String> = e.problems().iter().map(|p| format!("{}: {p}", args.target.display())).collect();
        return Err(RemoteError::BadInput(lines.join("\n")));
    }
    if let Err(p) = args.strategy.build() {
        return Err(RemoteError::BadInput(p.join("\n")));
    }
    let spec = args.strategy.spec();
    runtime()?.block_on(async {
        let mut client = CoordinatorClient::new(channel(url).await?);
        let r = client
            .push(pb::PushRequest { architecture_yaml: text, strategy: Some(spec) })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("rollout {}: {} steps planned", r.rollout_id, r.steps);
        if !args.wait {
            return Ok(());
        }
        let mut shown = String::new();
        loop {
            let s = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
            let Some(ro) = s.rollout else { return Err(RemoteError::Failed(anyhow::anyhow!("the rollout vanished"))) };
            let line = progress_line(&ro);
            if line != shown {
                println!("{line}");
                shown = line;
            }
            match ro.state.as_str() {
                "done" => return Ok(()),
                "failed" | "rolled-back" => {
                    return Err(RemoteError::Failed(anyhow::anyhow!("rollout {} {}: {}", ro.id, ro.state, ro.message)))
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    })
}

fn progress_line(r: &pb::RolloutStatus) -> String {
    let services: Vec<String> = r
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {}: {}/{} new serving, {} old, {} starting, {} draining",
                s.service, s.version, s.new_serving, s.desired, s.old_serving, s.starting, s.draining
            )
        })
        .collect();
    let mut line = format!("[{}] step {}/{} {} — {}", r.state, r.step, r.steps, r.strategy, services.join("; "));
    if !r.waiting_for.is_empty() {
        line += &format!(" — waiting for {}", r.waiting_for);
    }
    line
}

/// `pull`: prints the running architecture as an architecture file.
pub fn pull(url: &str) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = CoordinatorClient::new(channel(url).await?);
        let r = client
            .pull(pb::PullRequest {})
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => RemoteError::Failed(anyhow::anyhow!("pull: {}", s.message())),
                _ => status_error(s),
            })?
            .into_inner();
        print!("{}", r.architecture_yaml);
        Ok(())
    })
}

/// `pause`, `resume`, `promote`, `abort`.
pub fn control(url: &str, what: &str) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = CoordinatorClient::new(channel(url).await?);
        let req = pb::RolloutRequest {};
        let r = match what {
            "pause" => client.pause(req).await,
            "resume" => client.resume(req).await,
            "promote" => client.promote(req).await,
            _ => client.abort(req).await,
        }
        .map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition => RemoteError::Failed(anyhow::anyhow!("{what}: {}", s.message())),
            _ => status_error(s),
        })?
        .into_inner();
        if let Some(ro) = r.rollout {
            println!("{}", progress_line(&ro));
        }
        Ok(())
    })
}

/// `status`: the registry revision, every node's agent, and the rollout. With
/// `--watch`, redrawn in place every 500 ms (crossterm moves the cursor home and clears
/// what the last frame left below each line), over one connection.
pub fn status(url: &str, args: &StatusArgs) -> Result<(), RemoteError> {
    let json = args.output == "json";
    runtime()?.block_on(async {
        let mut client = CoordinatorClient::new(channel(url).await?);
        if !args.watch {
            let r = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
            print!("{}", render_status(&r, json));
            return Ok(());
        }
        let mut term = std::io::stdout();
        let _ = crossterm::execute!(term, crossterm::terminal::Clear(crossterm::terminal::ClearType::All));
        loop {
            let r = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
            draw(&mut term, &render_status(&r, json));
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
}

/// One frame in place: from the top-left corner, each line then the rest of it cleared,
/// then everything below the frame cleared (a shorter frame leaves nothing behind).
fn draw(term: &mut std::io::Stdout, frame: &str) {
    use crossterm::terminal::{Clear, ClearType};
    use crossterm::{cursor::MoveTo, queue, style::Print};
    let _ = queue!(term, MoveTo(0, 0));
    for line in frame.lines() {
        let _ = queue!(term, Print(line), Clear(ClearType::UntilNewLine), Print("\r\n"));
    }
    let _ = queue!(term, Clear(ClearType::FromCursorDown));
    let _ = std::io::Write::flush(term);
}

/// The status as a table (or one JSON line).
fn render_status(r: &pb::StatusResponse, json: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json {
        let nodes: Vec<serde_json::Value> = r
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node": n.node, "connected": n.connected, "applied_revision": n.applied_revision,
                    "lag": n.lag, "last_contact_ms_ago": n.last_contact_ms_ago,
                })
            })
            .collect();
        let rollout = r.rollout.as_ref().map(|ro| {
            let services: Vec<serde_json::Value> = ro
                .services
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "service": s.service, "version": s.version, "desired": s.desired,
                        "new_serving": s.new_serving, "old_serving": s.old_serving,
                        "starting": s.starting, "draining": s.draining,
                    })
                })
                .collect();
            serde_json::json!({
                "id": ro.id, "state": ro.state, "step": ro.step, "steps": ro.steps,
                "strategy": ro.strategy, "waiting_for": ro.waiting_for, "message": ro.message,
                "services": services, "log": ro.log,
            })
        });
        let _ = writeln!(out, "{}", serde_json::json!({ "revision": r.revision, "nodes": nodes, "rollout": rollout }));
    } else {
        let _ = writeln!(out, "registry revision {}", r.revision);
        let _ = writeln!(out, "{:<24} {:<12} {:>10} {:>6} {:>14}", "NODE", "AGENT", "APPLIED", "LAG", "LAST CONTACT");
        for n in &r.nodes {
            let agent = if n.connected { "connected" } else { "LOST" };
            let _ = writeln!(
                out,
                "{:<24} {:<12} {:>10} {:>6} {:>12}ms",
                n.node, agent, n.applied_revision, n.lag, n.last_contact_ms_ago
            );
        }
        if let Some(ro) = &r.rollout {
            let _ = writeln!(out, "\nrollout {} ({}): {}", ro.id, ro.strategy, ro.state);
            let _ = writeln!(out, "step {} of {}", ro.step, ro.steps);
            let _ = writeln!(
                out,
                "{:<16} {:<10} {:>8} {:>8} {:>9} {:>9} {:>8}",
                "SERVICE", "TARGET", "NEW", "OLD", "STARTING", "DRAINING", "DESIRED"
            );
            for s in &ro.services {
                let _ = writeln!(
                    out,
                    "{:<16} {:<10} {:>8} {:>8} {:>9} {:>9} {:>8}",
                    s.service, s.version, s.new_serving, s.old_serving, s.starting, s.draining, s.desired
                );
            }
            if !ro.waiting_for.is_empty() {
                let _ = writeln!(out, "waiting for: {}", ro.waiting_for);
            } else if !ro.message.is_empty() {
                let _ = writeln!(out, "{}", ro.message);
            }
            for l in &ro.log {
                let _ = writeln!(out, "  {l}");
            }
        }
    }
    out
}

/// `node list|remove`.
pub fn node(url: &str, cmd: &NodeCommand) -> Result<(), RemoteError> {
    runtime()?.block_on(async {
        let mut client = CoordinatorClient::new(channel(url).await?);
        match cmd {
            NodeCommand::List { output } => {
                let r = client.status(pb::StatusRequest {}).await.map_err(status_error)?.into_inner();
                if output == "json" {
                    let nodes: Vec<serde_json::Value> = r
                        .nodes
                        .iter()
                        .map(|n| {
                            serde_json::json!({
                                "node": n.node, "connected": n.connected, "applied_revision": n.applied_revision,
                                "last_contact_ms_ago": n.last_contact_ms_ago,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::json!({ "nodes": nodes }));
                } else {
                    println!("{:<24} {:<12} {:>10} {:>16}", "NODE", "AGENT", "APPLIED", "LAST CONTACT");
                    for n in &r.nodes {
                        let agent = if n.connected { "connected" } else { "LOST" };
                        let ago = hitless_model::Duration::from_millis(n.last_contact_ms_ago);
                        println!("{:<24} {:<12} {:>10} {:>12} ago", n.node, agent, n.applied_revision, ago.to_string());
                    }
                }
            }
            NodeCommand::Remove { node, force } => {
                let r = client
                    .remove_node(pb::RemoveNodeRequest { node: node.clone(), force: *force })
                    .await
                    .map_err(|s| match s.code() {
                        tonic::Code::FailedPrecondition => RemoteError::Failed(anyhow::anyhow!("{}", s.message())),
                        _ => status_error(s),
                    })?
                    .into_inner();
                println!("node {node} removed from the roster");
                if r.was_connected {
                    println!("its agent was connected: its session ended, and it joins again at its next hello");
                }
                if !r.still_registered.is_empty() {
                    let list: Vec<String> =
                        r.still_registered.iter().map(|k| format!("{} {}", k.service, k.address)).collect();
                    println!(
                        "still registered on it: {} (rollouts wait for a node that runs registered instances: deregister them)",
                        list.join(", ")
                    );
                }
            }
        }
        Ok(())
    })
}

/// The size of one part of a registry sent with `ApplyStream`.
const APPLY_PART: usize = 1 << 20;

/// `registry apply|list|register|deregister`.
pub fn registry(url: &str, cmd: &RegistryCommand) -> Result<(), RemoteError> {
    // Read and check the file before dialling: bad input is exit 2 even with no coordinator.
    let yaml = match cmd {
        RegistryCommand::Apply { file } => {
            let unreadable =
                |e: std::io::Error| RemoteError::BadInput(format!("{}: cannot read the file: {e}", file.display()));
            let size = std::fs::metadata(file).map_err(unreadable)?.len() as usize;
            if size > MAX_REGISTRY_TEXT {
                return Err(RemoteError::BadInput(format!(
                    "{}: {size} bytes is more than the {} MiB a registry may have (about 150,000 instances); nothing was sent. Split the fleet's services over several coordinators, or drop instances hitless does not steer",
                    file.display(),
                    MAX_REGISTRY_TEXT >> 20
                )));
            }
            let text = std::fs::read_to_string(file).map_err(unreadable)?;
            // A file that fits one request is checked here (its errors need no coordinator);
            // a larger one is checked by the coordinator, which parses it anyway: parsing
            // takes about 35 times a file's size in memory.
            if size <= MAX_REGISTRY_YAML {
                if let Err(e) = hitless_model::registry::Registry::parse(&text) {
                    let lines: Vec<String> = e.problems().iter().map(|p| format!("{}: {p}", file.display())).collect();
                    return Err(RemoteError::BadInput(lines.join("\n")));
                }
            }
            Some(text)
        }
        _ => None,
    };
    runtime()?.block_on(async {
        let mut client = RegistryClient::new(channel(url).await?);
        match cmd {
            RegistryCommand::Apply { .. } => {
                let registry_yaml = yaml.unwrap_or_default();
                let r = if registry_yaml.len() <= MAX_REGISTRY_YAML {
                    client.apply(pb::ApplyRequest { registry_yaml }).await
                } else {
                    // In parts: one message could not carry it.
                    let parts: Vec<pb::ApplyChunk> = registry_yaml
                        .as_bytes()
                        .chunks(APPLY_PART)
                        .map(|p| pb::ApplyChunk { registry_yaml_part: p.to_vec() })
                        .collect();
                    client.apply_stream(tokio_stream::iter(parts)).await
                }
                .map_err(status_error)?
                .into_inner();
                println!("applied: registry revision {}", r.revision);
            }
            RegistryCommand::List { output } => {
                let s = client.list(pb::ListRequest {}).await.map_err(status_error)?.into_inner();
                print_list(&s, output == "json");
            }
            RegistryCommand::Register { service, address, version, weight, ttl } => {
                let instance = pb::Instance {
                    service: service.clone(),
                    address: address.clone(),
                    state: pb::InstanceState::Serving as i32,
                    weight: *weight,
                    version: version.clone(),
                    node: String::new(),
                    ttl_ms: ttl.map_or(0, Duration::as_millis),
                };
                let r = client
                    .register(pb::RegisterRequest { instance: Some(instance) })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!("registered {service} {address}: registry revision {}", r.revision);
            }
            RegistryCommand::Deregister { service, address } => {
                let key = pb::InstanceKey { service: service.clone(), address: address.clone() };
                let r = client
                    .deregister(pb::DeregisterRequest { key: Some(key) })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!("deregistered {service} {address}: registry revision {}", r.revision);
            }
        }
        Ok(())
    })
}

fn state_name(s: pb::InstanceState) -> &'static str {
    match s {
        pb::InstanceState::Serving => "serving",
        pb::InstanceState::Draining => "draining",
        pb::InstanceState::Down => "down",
    }
}

/// A service's protocol as registry files spell it.
fn protocol_name(p: pb::Protocol) -> &'static str {
    match p {
        pb::Protocol::Tcp => "tcp",
        pb::Protocol::Udp => "udp",
    }
}

/// A service's direct-connect policy as registry files spell it.
fn policy_name(p: pb::Policy) -> &'static str {
    match p {
        pb::Policy::Steer => "steer",
        pb::Policy::Reject => "reject",
        pb::Policy::Allow => "allow",
    }
}

fn print_list(s: &pb::Snapshot, json: bool) {
    if json {
        let services: Vec<serde_json::Value> = s
            .services
            .iter()
            .map(|svc| {
                let instances: Vec<serde_json::Value> = s
                    .instances
                    .iter()
                    .filter(|i| i.service == svc.name)
                    .map(|i| {
                        serde_json::json!({
                            "address": i.address, "state": state_name(i.state()), "weight": i.weight,
                            "version": i.version, "node": i.node, "ttl_ms": i.ttl_ms,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": svc.name, "vips": svc.vips, "protocol": protocol_name(svc.protocol()),
                    "policy": policy_name(svc.policy()), "instances": instances,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "revision": s.revision, "services": services }));
        return;
    }
    println!("registry revision {}", s.revision);
    println!("{:<16} {:<24} {:<10} {:>7} {:<10} {:<12}", "SERVICE", "ADDRESS", "STATE", "WEIGHT", "VERSION", "NODE");
    for svc in &s.services {
        let vips = if svc.vips.is_empty() { "none".to_owned() } else { svc.vips.join(", ") };
        println!(
            "{:<16} VIPs {vips}; {}, policy {}",
            svc.name,
            protocol_name(svc.protocol()),
            policy_name(svc.policy())
        );
        for i in s.instances.iter().filter(|i| i.service == svc.name) {
            println!(
                "{:<16} {:<24} {:<10} {:>7} {:<10} {:<12}",
                svc.name,
                i.address,
                state_name(i.state()),
                i.weight,
                i.version,
                i.node
            );
        }
    }
}
