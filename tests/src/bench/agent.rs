//! `agent`: one real `hitless-agent` (release), in static mode (a registry file) and
//! in coordinator mode (against a real coordinator), steering 100 to 50,000 backends
//! (services x 10). Each run has its own throwaway cgroup and pin directory (removed
//! with `hitless-agent detach` by the node guard). Measured from /proc: the agent's
//! RSS and CPU (share of one core) over a window at rest once it settled, and over a
//! window of churn: a share of the backends flipped between draining and serving
//! every second (the file rewritten atomically, or the coordinator's Drain/Undrain).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use hitless_tests::{Node, Proc};

use super::{registry_yaml, thousands, Coord, Usage};

/// Where the coordinator of coordinator mode listens (loopback only).
const LISTEN: &str = "127.131.0.2:7072";
/// Goals at 10,000 backends.
const GOAL_BACKENDS: usize = 10_000;
const GOAL_RSS_MIB: f64 = 25.0;
const GOAL_CPU_PCT: f64 = 0.5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Static,
    Coordinator,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Static => "static",
            Mode::Coordinator => "coordinator",
        }
    }
}

/// What one run measured.
struct Row {
    mode: Mode,
    backends: usize,
    settle_secs: f64,
    rest: Usage,
    churn: Usage,
    /// Flips per second actually made during the churn window.
    flips_per_sec: f64,
    /// Drain barriers that did not complete within their 5 s (coordinator mode).
    incomplete: usize,
}

impl Row {
    /// CPU time per flip above rest, in ms.
    fn ms_per_flip(&self) -> f64 {
        (self.churn.cpu_pct - self.rest.cpu_pct) / 100.0 * 1e3 / self.flips_per_sec.max(1e-9)
    }
}

/// `hitless-bench agent [--backends 100,1000,10000,50000] [--window SECS]
/// [--churn PCT_PER_SEC] [--settle SECS] [--modes static,coordinator]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    hitless_tests::require_root();
    let sizes = super::sizes(args, "--backends", &[100, 1_000, 10_000, 50_000])?;
    let window = Duration::from_secs_f64(crate::flag(args, "--window").unwrap_or(10.0));
    let settle = Duration::from_secs_f64(crate::flag(args, "--settle").unwrap_or(3.0));
    let churn: f64 = crate::flag(args, "--churn").unwrap_or(1.0);
    let modes_arg: String = crate::flag(args, "--modes").unwrap_or_else(|| "static,coordinator".into());
    let mut modes = Vec::new();
    for m in modes_arg.split(',') {
        modes.push(match m.trim() {
            "static" => Mode::Static,
            "coordinator" => Mode::Coordinator,
            other => bail!("--modes: unknown mode {other:?}; static, coordinator"),
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for &mode in &modes {
        for &n in &sizes {
            eprintln!("agent: {} mode, {n} backends", mode.name());
            match measure(&rt, mode, n, window, settle, churn) {
                Ok(r) => rows.push(r),
                Err(e) => skipped.push(format!("{} mode, {} backends: {e:#}", mode.name(), thousands(n))),
            }
        }
    }
    // Linear in churn: the same size at a tenth of the rate.
    let lin_size = sizes.iter().copied().filter(|n| *n <= GOAL_BACKENDS).max();
    let mut lin = Vec::new();
    if let Some(n) = lin_size {
        for &mode in &modes {
            eprintln!("agent: {} mode, {n} backends, churn {:.2} %/s", mode.name(), churn / 10.0);
            match measure(&rt, mode, n, window, settle, churn / 10.0) {
                Ok(r) => lin.push(r),
                Err(e) => skipped.push(format!(
                    "{} mode, {} backends at a tenth of the churn: {e:#}",
                    mode.name(),
                    thousands(n)
                )),
            }
        }
    }

    println!("\nagent: one hitless-agent (release), its RSS (VmRSS) and CPU (utime+stime, share of one core)");
    println!(
        "over {:.0} s at rest after it settled ({:.0} s), and over {:.0} s of churn: {churn} % of the backends \
         flipped draining <-> serving per second, in 10 steps a second (coordinator mode: one Drain/Undrain \
         barrier per flip, a step's all at once, 5 s each; flips/s is what was reached)",
        window.as_secs_f64(),
        settle.as_secs_f64(),
        window.as_secs_f64()
    );
    println!(
        "| mode | backends | apply | RSS at rest | CPU at rest | RSS in churn | CPU in churn | flips/s | late barriers | CPU per flip |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows.iter().chain(&lin) {
        println!(
            "| {} | {} | {:.1} s | {:.1} MiB | {:.2} % | {:.1} MiB | {:.2} % | {:.1} | {} | {:.3} ms |",
            r.mode.name(),
            thousands(r.backends),
            r.settle_secs,
            r.rest.rss_kib as f64 / 1024.0,
            r.rest.cpu_pct,
            r.churn.rss_kib as f64 / 1024.0,
            r.churn.cpu_pct,
            r.flips_per_sec,
            r.incomplete,
            r.ms_per_flip()
        );
    }
    for s in &skipped {
        println!("not measured: {s}");
    }
    println!("goals at {} backends: <= {GOAL_RSS_MIB} MiB RSS and <= {GOAL_CPU_PCT} % of a core at rest; churn cost linear in the churn rate", thousands(GOAL_BACKENDS));
    println!(
        "anchor: no published figure of kube-proxy's own memory and CPU at rest that could be checked is quoted; \
         `cargo xtask bench datapath` measures the iptables DNAT side it programs"
    );

    for mode in &modes {
        if let Some(r) = rows.iter().find(|r| r.mode == *mode && r.backends == GOAL_BACKENDS) {
            let rss = r.rest.rss_kib as f64 / 1024.0 / GOAL_RSS_MIB;
            let what = format!("{} mode, 10,000 backends: RSS at rest / {GOAL_RSS_MIB} MiB", mode.name());
            crate::summary("agent", &what, rss, "<= 1", Some(rss <= 1.0));
            let cpu = r.rest.cpu_pct / GOAL_CPU_PCT;
            let what = format!("{} mode, 10,000 backends: CPU at rest / {GOAL_CPU_PCT} % of a core", mode.name());
            crate::summary("agent", &what, cpu, "<= 1", Some(cpu <= 1.0));
        }
        let full = rows.iter().find(|r| r.mode == *mode && Some(r.backends) == lin_size);
        let tenth = lin.iter().find(|r| r.mode == *mode);
        if let (Some(full), Some(tenth)) = (full, tenth) {
            // Linear: the CPU per flip does not grow with the rate (noisy when the
            // extra CPU at the low rate is small next to the rest CPU).
            let ratio = full.ms_per_flip() / tenth.ms_per_flip();
            let what = format!(
                "{} mode, {} backends: CPU per flip at {churn} vs {} %/s churn",
                mode.name(),
                thousands(full.backends),
                churn / 10.0
            );
            crate::summary("agent", &what, ratio, "<= 1.5", Some(ratio.is_finite() && ratio <= 1.5));
        }
    }
    if rows.is_empty() {
        bail!("nothing measured:\n{}", skipped.join("\n"));
    }
    Ok(())
}

/// Map capacities for `n` backends in services of 10: the defaults, or more.
fn capacities(n: usize) -> Vec<String> {
    let services = (n / 10 + 1_024).max(16_384);
    let backends = (n + n / 4 + 1_024).max(65_536);
    let slots = (2 * n + 4_096).max(131_072);
    vec![
        "--max-services".into(),
        services.to_string(),
        "--max-vips".into(),
        services.to_string(),
        "--max-backends".into(),
        backends.to_string(),
        "--max-slots".into(),
        slots.to_string(),
    ]
}

/// The registry with backend `k` draining when `draining[k]`.
fn yaml(n: usize, draining: &[bool]) -> String {
    let (services, per) = if n >= 10 { (n / 10, 10) } else { (1, n) };
    registry_yaml(services, per, |k| if draining.get(k).copied().unwrap_or(false) { "draining" } else { "serving" })
}

/// One run: a node, its agent, the registry; rest, then churn.
fn measure(
    rt: &tokio::runtime::Runtime,
    mode: Mode,
    n: usize,
    window: Duration,
    settle: Duration,
    churn: f64,
) -> anyhow::Result<Row> {
    let n = if n >= 10 { n / 10 * 10 } else { n };
    let mut draining = vec![false; n];
    let mut node = Node::new(&format!("ab-{}-{n}", &mode.name()[..1]));
    let caps = capacities(n);
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    node.agent_args(&caps);
    // Declared after the node: dropped (the coordinator killed) before it.
    let coord = match mode {
        Mode::Static => {
            node.write_registry(&yaml(n, &draining));
            None
        }
        Mode::Coordinator => {
            let c = Coord::start(&format!("agent{n}"), LISTEN);
            rt.block_on(super::apply(&c.url, &yaml(n, &draining)))
                .context("applying the registry to the coordinator")?;
            node.follow(&c.url);
            Some(c)
        }
    };
    let t = Instant::now();
    let mut agent = Proc::new(node.agent_command().spawn().context("spawning hitless-agent")?);
    let pid = agent.child().id();
    wait_applied(rt, &node, &mut agent, coord.as_ref(), Duration::from_secs(180))?;
    let settle_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(settle);
    let rest = super::usage(pid, window, |_| {})?;

    // Churn: flip backends round robin, `churn` % of them per second, 10 steps a second.
    let mut next = 0usize;
    let mut flipped = 0usize;
    let mut failed: Option<String> = None;
    let mut incomplete = 0;
    let client = match &coord {
        Some(c) => Some(rt.block_on(CoordinatorClient::connect(c.url.clone()))?),
        None => None,
    };
    let t0 = Instant::now();
    let churned = super::usage(pid, window, |elapsed| {
        let due = (n as f64 * churn / 100.0 * elapsed.as_secs_f64()) as usize;
        if due <= flipped || failed.is_some() {
            return;
        }
        let batch: Vec<usize> = (flipped..due)
            .map(|_| {
                let k = next % n;
                next += 1;
                k
            })
            .collect();
        for &k in &batch {
            draining[k] = !draining[k];
        }
        let r = match &client {
            None => {
                node.write_registry(&yaml(n, &draining));
                Ok(0)
            }
            Some(c) => rt.block_on(flip(c, &batch, &draining)),
        };
        match r {
            Ok(late) => {
                flipped = due;
                incomplete += late;
            }
            Err(e) => failed = Some(format!("{e:#}")),
        }
    })?;
    let flips_per_sec = flipped as f64 / t0.elapsed().as_secs_f64();
    if let Some(e) = failed {
        bail!("churn failed after {flipped} flips: {e}");
    }
    if agent.child().try_wait()?.is_some() {
        bail!("the agent exited during the run:\n{}", tail(&node.log()));
    }
    drop(agent);
    drop(coord);
    drop(node);
    Ok(Row { mode, backends: n, settle_secs, rest, churn: churned, flips_per_sec, incomplete })
}

/// Drains or undrains each backend of `batch` (as `draining` says) through the
/// coordinator, all at once; each returns when the agent holds it, or after 5 s.
/// Returns how many barriers did not complete in time.
async fn flip(
    client: &CoordinatorClient<tonic::transport::Channel>,
    batch: &[usize],
    draining: &[bool],
) -> anyhow::Result<usize> {
    let mut set = tokio::task::JoinSet::new();
    for &k in batch {
        let mut c = client.clone();
        let i = k / 10;
        let req = pb::DrainRequest {
            key: Some(pb::InstanceKey { service: format!("s{i}"), address: super::backend_addr(k) }),
            timeout_ms: 5_000,
        };
        let drain = draining[k];
        set.spawn(async move {
            let r = if drain { c.drain(req).await } else { c.undrain(req).await };
            r.map(|r| r.into_inner().complete)
        });
    }
    let mut late = 0;
    while let Some(r) = set.join_next().await {
        if !r?? {
            late += 1;
        }
    }
    Ok(late)
}

/// Waits until the node's maps hold the registry (static: any revision; coordinator:
/// the coordinator's revision, as its status reports).
fn wait_applied(
    rt: &tokio::runtime::Runtime,
    node: &Node,
    agent: &mut Proc,
    coord: Option<&Coord>,
    within: Duration,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        if let Some(status) = agent.child().try_wait()? {
            bail!("the agent exited with {status}:\n{}", tail(&node.log()));
        }
        let done = match coord {
            None => node.revision() >= 1,
            Some(c) => rt.block_on(async {
                let mut cl = CoordinatorClient::connect(c.url.clone()).await?;
                let s = cl.status(pb::StatusRequest {}).await?.into_inner();
                anyhow::Ok(
                    s.nodes.iter().any(|x| x.node == node.name && x.connected && x.applied_revision == s.revision),
                )
            })?,
        };
        if done {
            return Ok(());
        }
        if t.elapsed() > within {
            bail!("the agent did not apply the registry within {within:?}:\n{}", tail(&node.log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
