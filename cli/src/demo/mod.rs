//! `hitless demo`: a zero-downtime rollout on one machine, with the proof beside it.
//!
//! Simulated nodes are cgroups, each with its own agent and pinned datapath, all
//! following a coordinator embedded in this process. A demo HTTP service
//! (`hitless-testsvc`) runs at v1 on every node; clients on every node dial it through
//! the VIP and from registry caches that go stale between refreshes. The demo rolls
//! v1 → v2 the hitless way, then runs the same rollout the conventional way (deregister,
//! wait a fixed time, SIGTERM) on fresh nodes without hitless, and prints both side by
//! side. Everything it creates lives under one cgroup, one pin prefix and one scratch
//! directory, removed on exit, on Ctrl-C, and at the start of the next run if a
//! previous one was killed.

pub mod client;
mod conventional;
mod hitless;
mod host;
mod load;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use hitless_model::Duration as Span;
use hitless_proto::v1 as pb;

use client::Progress;
use load::{ClientSpec, Load};

/// The demo service.
const SERVICE: &str = "web";
/// Its VIP (loopback: a connect that is not steered never leaves the machine).
const VIP: &str = "127.77.10.1:8080";

/// `hitless demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Simulated nodes (cgroups, each with an agent and its own pinned datapath).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    nodes: u32,
    /// Instances of the service per node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
    instances: u32,
    /// Client threads per node that dial instance addresses from a cached registry.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=32))]
    cache_clients: u32,
    /// Client threads per node that dial the VIP (hitless run only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=32))]
    vip_clients: u32,
    /// How often cache clients fetch the registry again (Eureka's default is 30s).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    cache_refresh: Span,
    /// Conventional way: wait between deregistering an instance and its SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    fixed_wait: Span,
    /// Conventional way, safe: the wait that lets every cache refresh first (default: the
    /// cache refresh plus 1s). This run loses nothing too, and shows what it costs in time.
    #[arg(long, value_name = "DURATION")]
    safe_wait: Option<Span>,
    /// Load before each rollout starts.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    warmup: Span,
    /// Pause between two requests of one client thread.
    #[arg(long, value_name = "DURATION", default_value = "10ms")]
    pause: Span,
    /// Output: a live log and a table, or one JSON object at the end.
    #[arg(short = 'o', long = "output", value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

/// What one way of rolling out did, for the table.
#[derive(Debug, serde::Serialize)]
pub struct Observed {
    requests: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    rollout_s: f64,
    /// Longest time an instance kept getting new connections after it stopped being
    /// registered as serving.
    draining_new_connections_s: f64,
    extra_instances: usize,
    /// Stale-cache requests to a draining or stopped instance that another answered.
    steered: u64,
    versions: BTreeMap<String, u64>,
}

impl Observed {
    fn new(p: &Progress, rollout: Duration, drains: &BTreeMap<String, u64>, peak: usize, desired: usize) -> Self {
        let leak_ms = drains
            .iter()
            .filter_map(|(key, start)| p.last_connect_ms.get(key).map(|last| last.saturating_sub(*start)))
            .max()
            .unwrap_or(0);
        Self {
            requests: p.ok + p.failed,
            failed: p.failed,
            errors: p.errors.clone(),
            rollout_s: rollout.as_secs_f64(),
            draining_new_connections_s: leak_ms as f64 / 1000.0,
            extra_instances: peak.saturating_sub(desired),
            steered: p.steered,
            versions: p.versions.clone(),
        }
    }
}

/// The demo's scratch directory and cgroup root, and what it was asked to do.
pub struct Demo {
    args: DemoArgs,
    dir: PathBuf,
    cgroup_root: PathBuf,
    ok: AtomicBool,
}

impl Demo {
    /// Removes what a killed earlier run left, then creates the scratch directory.
    fn prepare(args: DemoArgs) -> anyhow::Result<Self> {
        let cgroup_root = hitless_agent::cgroup::v2_mount()?.join("hitless-demo");
        let dir = std::env::temp_dir().join("hitless-demo");
        let demo = Self { args, dir, cgroup_root, ok: AtomicBool::new(false) };
        demo.clean();
        std::fs::create_dir_all(&demo.dir).with_context(|| format!("creating {}", demo.dir.display()))?;
        std::fs::create_dir_all(&demo.cgroup_root)
            .with_context(|| format!("creating cgroup {}", demo.cgroup_root.display()))?;
        Ok(demo)
    }

    /// Kills every process of the demo (agents, instances, clients), unpins the
    /// demo nodes' datapaths and removes the scratch directory.
    fn clean(&self) {
        host::remove_tree(&self.cgroup_root);
        if let Ok(pins) = std::fs::read_dir(hitless_agent::loader::PIN_ROOT) {
            for name in pins.flatten().filter_map(|e| e.file_name().into_string().ok()) {
                if name.starts_with("demo-node") {
                    let _ = hitless_agent::loader::detach(&hitless_agent::loader::default_pin_dir(&name));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn json(&self) -> bool {
        self.args.output == "json"
    }

    fn say(&self, line: &str) {
        if !self.json() {
            println!("{line}");
        }
    }

    /// The last lines of a log in the scratch directory.
    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn desired(&self) -> usize {
        (self.args.nodes * self.args.instances) as usize
    }

    fn clients<'a>(&'a self, view: &'a Path, vip: bool) -> ClientSpec<'a> {
        ClientSpec {
            vip: (vip && self.args.vip_clients > 0).then_some((VIP, self.args.vip_clients)),
            cache: (self.args.cache_clients > 0).then_some((view, self.args.cache_clients)),
            refresh: self.args.cache_refresh.to_std(),
            pause: self.args.pause.to_std(),
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.ok.load(Ordering::SeqCst) || host::interrupted() {
            self.clean();
        } else {
            // Keep the logs of a failed run; the next run removes them.
            host::remove_tree(&self.cgroup_root);
            eprintln!("logs of this run: {}", self.dir.display());
        }
    }
}

/// Runs the demo; `Ok(false)` when the hitless way lost requests.
pub fn run(args: DemoArgs) -> anyhow::Result<bool> {
    if args.cache_clients + args.vip_clients == 0 {
        bail!("--cache-clients and --vip-clients are both 0: give at least one client thread per node");
    }
    let missing = host::preflight(&["hitless-agent", "hitless-testsvc"]);
    if !missing.is_empty() {
        bail!("hitless demo cannot run here; missing:\n  - {}", missing.join("\n  - "));
    }
    host::catch_interrupts();
    let demo = Demo::prepare(args)?;
    let log = std::fs::File::create(demo.dir.join("coordinator.log"))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(Mutex::new(log))
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let a = &demo.args;
    demo.say(&format!(
        "hitless demo: service {SERVICE} on {} nodes × {} instances, VIP {VIP}; per node {} VIP client(s) and {} client(s) with a registry cache refreshed every {}",
        a.nodes, a.instances, a.vip_clients, a.cache_clients, a.cache_refresh
    ));

    let hitless = hitless_way(&demo, &rt)?;
    let conventional = conventional_way(&demo, "plain-node", 172, demo.args.fixed_wait.to_std())?;
    let safe_wait =
        demo.args.safe_wait.map_or(demo.args.cache_refresh.to_std() + Duration::from_secs(1), |w| w.to_std());
    let safe = conventional_way(&demo, "safe-node", 173, safe_wait)?;
    let lost = hitless.failed > 0;
    if demo.json() {
        println!(
            "{}",
            serde_json::json!({ "hitless": hitless, "conventional": conventional, "conventional_safe": safe })
        );
    } else {
        print_table(&[("hitless", &hitless), ("conventional", &conventional), ("safe wait", &safe)], &demo);
    }
    demo.ok.store(!lost, Ordering::SeqCst);
    Ok(!lost)
}

fn hitless_way(demo: &Demo, rt: &tokio::runtime::Runtime) -> anyhow::Result<Observed> {
    demo.say("\n== the hitless way: drain in every node's kernel, then stop ==");
    let t = Instant::now();
    let cluster = hitless::Cluster::start(demo, rt)?;
    demo.say(&format!(
        "  {} agents connected to the coordinator at {} ({:.1?})",
        demo.args.nodes,
        cluster.url(),
        t.elapsed()
    ));
    let straight = pb::StrategySpec { name: "straight".into(), ..Default::default() };
    let took = cluster.rollout(rt, "v1", straight, |_| {})?;
    demo.say(&format!("  deployed v1: {} instances ({took:.1?})", demo.desired()));

    let view = demo.dir.join("view-hitless");
    let drains = cluster.watch_registry(rt, view.clone());
    wait_for_view(&view)?;
    let nodes: Vec<&host::Cgroup> = cluster.nodes.iter().collect();
    let load = Load::start(&host::sibling("hitless")?, &nodes, &demo.clients(&view, true))?;
    host::pause(demo.args.warmup.to_std())?;
    // Clients' first connections to v1 happened before the drain: forget no one.
    let rolling = pb::StrategySpec {
        name: "rolling".into(),
        max_surge: "1".into(),
        max_unavailable: "0".into(),
        ..Default::default()
    };
    demo.say("  rolling v1 → v2, one instance at a time (max surge 1, max unavailable 0):");
    let peak = Peak::start(&demo.cgroup_root, "demo-node");
    let mut shown = String::new();
    let mut last = Instant::now();
    let started = Instant::now();
    let took = cluster.rollout(rt, "v2", rolling, |r| {
        let line = progress_line(r, &load.tally());
        if line != shown || last.elapsed() > Duration::from_secs(2) {
            demo.say(&format!("  {:>5.1}s {line}", started.elapsed().as_secs_f64()));
            shown = line;
            last = Instant::now();
        }
    })?;
    let peak = peak.finish();
    demo.say(&format!("  done in {took:.1?}; clients keep going for one cache refresh ({})", demo.args.cache_refresh));
    host::pause(demo.args.cache_refresh.to_std())?;
    let seen = load.finish();
    let drains = lock(&drains).clone();
    let observed = Observed::new(&seen, took, &drains, peak, demo.desired());
    demo.say(&format!("  requests {}, failed {}", observed.requests, observed.failed));
    drop(cluster);
    Ok(observed)
}

/// The conventional way on fresh nodes (cgroups `{prefix}{i}`, addresses 127.`net`.x.y):
/// deregister, wait `wait`, SIGTERM.
fn conventional_way(demo: &Demo, prefix: &str, net: u8, wait: Duration) -> anyhow::Result<Observed> {
    demo.say(&format!(
        "\n== the conventional way: deregister, wait {wait:.1?}, SIGTERM (no hitless on these nodes) =="
    ));
    let mut fleet = conventional::Fleet::start(demo, "v1", prefix, net, wait)?;
    demo.say(&format!("  started v1: {} instances", demo.desired()));
    let view = demo.dir.join(format!("view-{prefix}"));
    let nodes: Vec<&host::Cgroup> = fleet.nodes.iter().collect();
    let load = Load::start(&host::sibling("hitless")?, &nodes, &demo.clients(&view, false))?;
    host::pause(demo.args.warmup.to_std())?;
    demo.say("  rolling v1 → v2, one instance at a time (one extra instance):");
    let peak = Peak::start(&demo.cgroup_root, prefix);
    let started = Instant::now();
    let drains = fleet.roll("v2", |line| {
        let t = load.tally();
        demo.say(&format!(
            "  {:>5.1}s {line} — requests {}, failed {}",
            started.elapsed().as_secs_f64(),
            t.ok + t.failed,
            t.failed
        ));
    })?;
    let took = started.elapsed();
    let peak = peak.finish();
    demo.say(&format!("  done in {took:.1?}; clients keep going for one cache refresh ({})", demo.args.cache_refresh));
    host::pause(demo.args.cache_refresh.to_std())?;
    let seen = load.finish();
    let observed = Observed::new(&seen, took, &drains, peak, demo.desired());
    demo.say(&format!("  requests {}, failed {}", observed.requests, observed.failed));
    Ok(observed)
}

fn progress_line(r: &pb::RolloutStatus, t: &Progress) -> String {
    let services: Vec<String> = r
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {}: {}/{} serving, {} old, {} starting, {} draining",
                s.service, s.version, s.new_serving, s.desired, s.old_serving, s.starting, s.draining
            )
        })
        .collect();
    format!("step {}/{} {} — requests {}, failed {}", r.step, r.steps, services.join("; "), t.ok + t.failed, t.failed)
}

fn wait_for_view(view: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(view).map_or(true, |s| s.trim().is_empty()) {
        if Instant::now() > deadline {
            bail!("the registry watch never listed a serving instance");
        }
        host::pause(Duration::from_millis(20))?;
    }
    Ok(())
}

/// Counts instance processes (in the nodes' `workload` cgroups) in the background and
/// keeps the highest count.
struct Peak {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Peak {
    fn start(root: &Path, prefix: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let (s, m, root, prefix) = (Arc::clone(&stop), Arc::clone(&max), root.to_owned(), prefix.to_owned());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let n: usize = std::fs::read_dir(&root)
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                            .map(|e| host::processes(&e.path().join("workload")))
                            .sum()
                    })
                    .unwrap_or(0);
                m.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, max, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.max.load(Ordering::Relaxed)
    }
}

/// Replaces the registry view clients read (write and rename: readers see all or nothing).
fn publish(view: &Path, addrs: &[String]) -> anyhow::Result<()> {
    let tmp = view.with_extension("tmp");
    std::fs::write(&tmp, addrs.join("\n") + "\n")?;
    std::fs::rename(&tmp, view)?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Writers only insert whole entries: a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How one row of the table renders one way's figures.
type Cell<'a> = &'a dyn Fn(&Observed) -> String;

fn print_table(ways: &[(&str, &Observed)], demo: &Demo) {
    let secs = |s: f64| format!("{s:.1} s");
    let ms = |s: f64| if s < 1.0 { format!("{:.0} ms", s * 1000.0) } else { format!("{s:.1} s") };
    let rows: [(&str, Cell); 6] = [
        ("requests sent", &|o| o.requests.to_string()),
        ("requests failed", &|o| o.failed.to_string()),
        ("rollout time", &|o| secs(o.rollout_s)),
        ("new connections to a draining instance, for", &|o| ms(o.draining_new_connections_s)),
        ("extra instances used", &|o| o.extra_instances.to_string()),
        ("stale-cache requests served by a sibling", &|o| o.steered.to_string()),
    ];
    println!();
    let head: String = ways.iter().map(|(name, _)| format!(" {name:>12} |")).collect();
    let rule: String = ways.iter().map(|_| format!("{}|", "-".repeat(14))).collect();
    println!("| {:<44} |{head}", "");
    println!("|{}|{rule}", "-".repeat(46));
    for (what, cell) in rows {
        let cells: String = ways.iter().map(|(_, o)| format!(" {:>12} |", cell(o))).collect();
        println!("| {what:<44} |{cells}");
    }
    for (name, o) in &ways[1..] {
        if !o.errors.is_empty() {
            let kinds: Vec<String> = o.errors.iter().map(|(k, v)| format!("{v} {k}")).collect();
            println!("\n{name} failures: {}", kinds.join(", "));
        }
    }
    let h = ways[0].1;
    if h.failed > 0 {
        let kinds: Vec<String> = h.errors.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!("\nhitless LOST REQUESTS: {} — this is a bug; logs in {}", kinds.join(", "), demo.dir.display());
    }
    println!(
        "\nThe conventional way sends stale clients to instances it already stopped until their cache refreshes\n(every {}); waiting long enough for every cache to refresh loses nothing but takes far longer.\nhitless steers those connects to a serving instance inside connect(), on every node, and stops each\ninstance as soon as its connections are done.",
        demo.args.cache_refresh
    );
}
