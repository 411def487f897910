//! `hitless-agent`: the node agent binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::info;

use hitless_agent::driver::Driver;
use hitless_agent::loader::{self, Capacities};
use hitless_agent::outlier::Outliers;
use hitless_agent::writer::{Maps, Writer};
use hitless_agent::{caps, cgroup, link, local_api, static_mode};
use hitless_tls::client::Transport;
use std::sync::Arc;

/// The hitless node agent: steers and drains connections inside connect().
#[derive(Parser)]
#[command(name = "hitless-agent", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Remove this node's programs, links and maps (refused while its agent runs).
    Detach {
        /// Node name.
        #[arg(long)]
        node: String,
        /// Pin directory (default /sys/fs/bpf/hitless/NODE).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Register an instance hitless does not run (a pod's) through this node's agent,
    /// which then renews its lease until its prestop (the caller may exit).
    Register {
        /// Service [default: $HITLESS_SERVICE].
        #[arg(long)]
        service: Option<String>,
        /// Where the instance listens (IP:PORT) [default: $HITLESS_ADDRESS].
        #[arg(long, value_name = "IP:PORT")]
        address: Option<String>,
        /// First wait (up to this long) until the address accepts a TCP connection, so
        /// no client is sent to an instance still starting (0s: register at once).
        #[arg(long, value_name = "DURATION", default_value = "0s")]
        wait: hitless_model::Duration,
        /// Version label.
        #[arg(long, default_value = "")]
        version: String,
        /// Relative weight.
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// The lease: the instance goes down when the agent stops renewing it this long.
        #[arg(long, value_name = "DURATION", default_value = "10s")]
        ttl: hitless_model::Duration,
        /// The agent's local API socket.
        #[arg(long, value_name = "PATH", default_value = local_api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// A pod's preStop: drain the instance on every node, wait until its connections
    /// end (or the deadline), print how long and why, and return (then SIGTERM).
    Prestop {
        /// The instance's address (IP:PORT), as registered [default: $HITLESS_ADDRESS].
        #[arg(long, value_name = "IP:PORT")]
        address: Option<String>,
        /// The longest wait, the barrier included.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        deadline: hitless_model::Duration,
        /// The agent's local API socket.
        #[arg(long, value_name = "PATH", default_value = local_api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Node name: keys the pin directory and the node's identity.
    #[arg(long)]
    node: Option<String>,
    /// Static mode: the registry file to steer by (applied on every change).
    #[arg(long, value_name = "FILE", conflicts_with = "coordinator")]
    registry_file: Option<PathBuf>,
    /// Coordinator mode: the coordinator's URL (https://HOST:PORT with --tls-dir,
    /// http://127.0.0.1:PORT with --insecure); the agent dials out.
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// Coordinator mode: mutual TLS with DIR/ca.pem and this node's certificate,
    /// DIR/node-NODE.pem and DIR/node-NODE-key.pem (`hitless certs issue --node NODE`),
    /// reloaded when they change. The coordinator takes the node's name from it.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Coordinator mode: plaintext gRPC instead of mutual TLS, to a coordinator on a
    /// loopback address only (development, tests, the demo).
    #[arg(long, conflicts_with = "tls_dir")]
    insecure: bool,
    /// Cgroup v2 directory to attach to (default: the cgroup v2 root, found in /proc/mounts).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Coordinator mode: the cgroup v2 directory under which this node's instances run,
    /// one child cgroup each (created if missing). Without it the agent runs no instances.
    #[arg(long, value_name = "DIR", requires = "instance_addresses")]
    workload_cgroup: Option<PathBuf>,
    /// The addresses instances get, an IPv4 CIDR such as 127.1.0.0/24.
    #[arg(long, value_name = "CIDR", requires = "workload_cgroup")]
    instance_addresses: Option<String>,
    /// Where instance records, their logs and the local API's registrations live
    /// (default /var/lib/hitless/NODE).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where programs and maps are pinned (default /sys/fs/bpf/hitless/NODE).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9477), at /metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Consecutive failed connects from this node that isolate a backend on this node.
    #[arg(long, value_name = "N", default_value_t = hitless_agent::outlier::DEFAULT_THRESHOLD)]
    outlier_failures: u64,
    /// How long an isolated backend gets no traffic from this node.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    outlier_period: hitless_model::Duration,
    /// Coordinator mode: serve the node-local API (register, prestop) on this unix
    /// socket, mode 0660 (off unless given).
    #[arg(long, value_name = "PATH")]
    local_api: Option<PathBuf>,
    /// The group that may use the local API socket besides root (a name or a gid).
    #[arg(long, value_name = "GROUP", requires = "local_api")]
    local_api_group: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How often the registry file is checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    poll_ms: u64,
    /// Capacity of the services map (fixed when the maps are first created).
    #[arg(long, default_value_t = Capacities::default().services)]
    max_services: u32,
    /// Capacity of the VIP map.
    #[arg(long, default_value_t = Capacities::default().vips)]
    max_vips: u32,
    /// Capacity of the backend maps.
    #[arg(long, default_value_t = Capacities::default().backends)]
    max_backends: u32,
    /// Capacity of the slot map (all services' slot tables together).
    #[arg(long, default_value_t = Capacities::default().slots)]
    max_slots: u32,
    /// Sockets whose dialled address is remembered for getpeername()/recvmsg() (LRU).
    #[arg(long, default_value_t = Capacities::default().connections)]
    max_connections: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.run.log_format);
    let result = match cli.command {
        Some(Command::Detach { node, pin_dir }) => detach(&node, pin_dir),
        Some(Command::Register { service, address, wait, version, weight, ttl, socket }) => {
            hook_arg("--service", service, SERVICE_ENV).and_then(|service| {
                let address = hook_arg("--address", address, ADDRESS_ENV)?;
                let req = hitless_proto::v1::LocalRegisterRequest {
                    service,
                    address,
                    version,
                    weight,
                    ttl_ms: ttl.to_std().as_millis() as u64,
                };
                local_call(local_api::client::register_when_listening(&socket, req, wait.to_std()))
            })
        }
        Some(Command::Prestop { address, deadline, socket }) => hook_arg("--address", address, ADDRESS_ENV)
            .and_then(|address| local_call(local_api::client::prestop(&socket, &address, deadline.to_std()))),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let other_cgroup =
                matches!(e.downcast_ref::<loader::LoadError>(), Some(loader::LoadError::OtherCgroup { .. }));
            let bad_request = e.downcast_ref::<local_api::client::ClientError>().is_some_and(|c| c.bad_input());
            if e.downcast_ref::<BadInput>().is_some()
                || e.downcast_ref::<static_mode::FileError>().is_some()
                || other_cgroup
                || bad_request
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// The oldest kernel the datapath loads on: `bpf_set_retval` (refusing a connect with
/// ECONNREFUSED rather than EPERM) came with Linux 5.18.
const MIN_KERNEL: (u32, u32) = (5, 18);

/// Refuses to start on an older kernel, naming what is missing (the program load would
/// fail with a verifier listing instead).
fn check_kernel() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next(), parts.next());
    match version {
        (Some(major), Some(minor)) if (major, minor) < MIN_KERNEL => anyhow::bail!(
            "Linux {} is older than {}.{}, which the datapath needs (bpf_set_retval, to refuse a connect with ECONNREFUSED); run the agent on a newer kernel",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
        _ => Ok(()),
    }
}

/// Where a pod's hooks find the instance's service when `--service` is not given.
const SERVICE_ENV: &str = "HITLESS_SERVICE";
/// Where a pod's hooks find the instance's address when `--address` is not given: a
/// Kubernetes exec hook's command gets no `$(VAR)` expansion, but runs with the
/// container's environment (`HITLESS_ADDRESS: $(POD_IP):8080`).
const ADDRESS_ENV: &str = "HITLESS_ADDRESS";

/// A hook's flag, or else its environment variable.
fn hook_arg(flag: &str, given: Option<String>, var: &str) -> anyhow::Result<String> {
    match given.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty())) {
        Some(v) => Ok(v),
        None => Err(BadInput(format!("{flag}: missing; give {flag} or set {var} in the environment")).into()),
    }
}

/// Bad flags: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

/// Runs one call of the local API's client on a small runtime.
fn local_call(
    call: impl std::future::Future<Output = Result<(), local_api::client::ClientError>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(call)?)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn node_name(node: &str) -> anyhow::Result<&str> {
    if hitless_model::registry::valid_node_name(node) {
        Ok(node)
    } else {
        Err(BadInput(format!(
            "--node {}: {} (it names the pin directory)",
            hitless_model::Quoted(node),
            hitless_model::registry::NODE_NAME_FIX
        ))
        .into())
    }
}

fn pin_dir_for(node: &str, pin_dir: Option<PathBuf>) -> PathBuf {
    pin_dir.unwrap_or_else(|| loader::default_pin_dir(node))
}

fn detach(node: &str, pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let node = node_name(node)?;
    let dir = pin_dir_for(node, pin_dir);
    if loader::detach(&dir)? {
        println!("detached node {node}: removed {}", dir.display());
    } else {
        println!("node {node} has no datapath at {}", dir.display());
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = node_name(args.node.as_deref().ok_or_else(|| BadInput("--node NAME is required".into()))?)?;
    // Static mode validates the file before touching the kernel: a bad file changes nothing.
    if args.registry_file.is_some() && args.workload_cgroup.is_some() {
        return Err(BadInput(
            "--workload-cgroup: instances are run in coordinator mode only; drop it or use --coordinator".into(),
        )
        .into());
    }
    let source = match (&args.registry_file, &args.coordinator) {
        (Some(file), None) => Source::File(file.clone(), static_mode::read(file)?),
        (None, Some(url)) => Source::Coordinator(coordinator_url(url)?, link_transport(&args, node, url)?),
        _ => return Err(BadInput("give --registry-file FILE (static mode) or --coordinator URL".into()).into()),
    };
    if let (Some(path), Source::File(..)) = (&args.local_api, &source) {
        return Err(BadInput(format!(
            "--local-api {}: the node-local API registers instances with a coordinator and drains them through its barrier, so it serves in coordinator mode only; use --coordinator URL, or drop --local-api",
            path.display()
        ))
        .into());
    }
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => cgroup::v2_mount().context("finding the cgroup v2 root to attach to")?,
    };
    if let Some(w) = &args.workload_cgroup {
        // Connections of instances outside the attached cgroup are invisible to the
        // counting program: every drain would end at once, "0 open", with requests in flight.
        let inside = cgroup::contains(&cgroup, w).with_context(|| {
            format!("comparing --workload-cgroup {} with --cgroup {}", w.display(), cgroup.display())
        })?;
        if !inside {
            return Err(BadInput(format!(
                "--workload-cgroup {} is not inside --cgroup {}: the datapath would not see the instances' connections and every drain would end with requests in flight; put the workload cgroup under {} (or attach higher with --cgroup)",
                w.display(),
                cgroup.display(),
                cgroup.display()
            ))
            .into());
        }
    }
    let pin_dir = pin_dir_for(node, args.pin_dir);
    let caps = Capacities {
        services: args.max_services,
        vips: args.max_vips,
        backends: args.max_backends,
        slots: args.max_slots,
        connections: args.max_connections,
    };
    caps::check().map_err(anyhow::Error::msg)?;
    check_kernel()?;
    let loaded = loader::load(&pin_dir, &cgroup, caps)?;
    info!(
        node,
        pin_dir = %pin_dir.display(),
        cgroup = %cgroup.display(),
        reused_maps = loaded.reused_maps,
        replaced = loaded.replaced,
        attached = loaded.attached,
        "datapath loaded"
    );
    let maps = Maps::open(&pin_dir)?;
    let cap = maps.capacity();
    if loaded.reused_maps && (cap.services != caps.services as usize || cap.slots != caps.slots as usize) {
        info!(?cap, "reused maps keep the capacities they were created with; detach the node to change them");
    }
    let mut writer = Writer::new(maps)?;
    let metrics = Arc::new(hitless_agent::metrics::State::default());
    if let Some(addr) = args.metrics_addr {
        let bound = hitless_agent::metrics::serve(addr, pin_dir.clone(), metrics.clone())
            .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
        info!(node, %bound, "metrics at http://{bound}/metrics");
    }
    match source {
        Source::File(file, reg) => {
            let mut outliers = Outliers::new(args.outlier_failures, args.outlier_period.to_std());
            // Counters already in the maps (a restart) are history, not failures in a row.
            outliers.observe(writer.maps(), &hitless_agent::desired::from_registry(&reg), std::time::Instant::now());
            static_mode::apply(&mut writer, &reg, &metrics, node, &outliers)?;
            let poll = Duration::from_millis(args.poll_ms.max(1));
            static_mode::watch(&file, &mut writer, poll, &metrics, node, reg, &mut outliers)
        }
        Source::Coordinator(url, transport) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let state_dir = args.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/hitless").join(node));
            let driver = match (&args.workload_cgroup, &args.instance_addresses) {
                (Some(cg), Some(pool)) => {
                    let d = Driver::open(node, cg, pool, &state_dir)?;
                    let adopted = d.adopt();
                    info!(node, adopted = adopted.len(), "instances adopted");
                    Some(Arc::new(d))
                }
                _ => None,
            };
            let outliers = Outliers::new(args.outlier_failures, args.outlier_period.to_std());
            let outliers = Arc::new(std::sync::Mutex::new(outliers));
            let local = match args.local_api {
                Some(socket) => {
                    let cfg = local_api::Config {
                        socket,
                        group: args.local_api_group,
                        coordinator: url.clone(),
                        transport: transport.clone(),
                        pin_dir: pin_dir.clone(),
                        node: node.to_owned(),
                    };
                    Some((local_api::bind_with_state(&cfg, &state_dir)?, cfg))
                }
                None => None,
            };
            let site = link::Site { driver, pin_dir: pin_dir.clone(), metrics, outliers };
            rt.block_on(async move {
                if let Some((listener, cfg)) = local {
                    tokio::spawn(local_api::serve(listener, cfg));
                }
                link::run(url, transport, node.to_owned(), writer, site).await
            })
        }
    }
}

enum Source {
    File(PathBuf, hitless_agent::registry::Registry),
    Coordinator(String, Transport),
}

/// How the agent reaches the coordinator: mutual TLS with its node's certificate, or
/// plaintext to loopback with --insecure; one of the two, and the URL to match.
fn link_transport(args: &RunArgs, node: &str, url: &str) -> anyhow::Result<Transport> {
    let transport = match (&args.tls_dir, args.insecure) {
        (Some(dir), _) => Transport::Tls(
            hitless_tls::ClientTls::load(dir, &format!("node-{node}")).map_err(|e| BadInput(format!("--tls-dir: {e}")))?,
        ),
        (None, true) => Transport::Insecure,
        (None, false) => {
            return Err(BadInput(format!(
                "--coordinator {url}: the coordinator speaks mutual TLS: give --tls-dir DIR with ca.pem and node-{node}.pem (`hitless certs issue --node {node}`), or --insecure for plaintext to a coordinator on loopback"
            ))
            .into())
        }
    };
    transport.check_url(url, "--coordinator").map_err(|e| BadInput(e.to_string()))?;
    Ok(transport)
}

fn coordinator_url(url: &str) -> anyhow::Result<String> {
    let ok = (url.starts_with("http://") || url.starts_with("https://")) && url.len() > "http://".len();
    if ok {
        Ok(url.to_owned())
    } else {
        Err(BadInput(format!("--coordinator {url:?}: give a URL such as https://coordinator:7070")).into())
    }
}
