//! `scale`: one real coordinator (`hitless coordinator`, its own process) and N
//! simulated agents: real `AgentLink` sessions over real loopback sockets, run as
//! tokio tasks in this process. A simulated agent says hello, applies nothing (no
//! kernel, no maps) and acks every snapshot or delta at once, and sends a metric
//! summary every second as a real agent does. What is left is the coordinator's own
//! cost: drain barriers over N sessions, snapshots of a large registry, and memory
//! and CPU at rest per session.
//!
//! This file runs the sizes and prints the table; [`sim`] holds the simulated agents,
//! [`barrier`] times drain barriers over their sessions, and [`snapshot`] times fresh
//! sessions receiving a large registry (their bytes counted by [`wire`]).

mod barrier;
mod sim;
mod snapshot;
mod wire;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use self::barrier::{barriers, wait_synced};
use self::sim::Fleet;
use self::snapshot::snapshot;
use super::{measured, thousands, Coord, Usage};

/// Where the coordinator listens (loopback only).
const LISTEN: &str = "127.131.0.1:7071";
const REGISTRY: &str = "services:\n  - name: cart\n    vips: [\"127.77.100.9:8080\"]\n    backends:\n      - { address: \"127.140.0.1:8080\" }\n      - { address: \"127.140.0.2:8080\" }\n";
/// Goal: the last ack of a drain barrier at 1,000 agents, p99.
const GOAL_AGENTS: usize = 1_000;
const GOAL_MS: f64 = 100.0;

/// Options of `hitless-bench scale`.
struct Opts {
    agents: Vec<usize>,
    drains: usize,
    instances: usize,
    window: Duration,
    snapshots: usize,
}

/// What one size measured.
struct Row {
    agents: usize,
    connect_secs: f64,
    idle: Usage,
    rest: Usage,
    ack_p50: f64,
    ack_p99: f64,
    rpc_p50: f64,
    rpc_p99: f64,
    incomplete: usize,
}

/// `hitless-bench scale [--agents 100,1000,5000,10000] [--drains 200]
/// [--instances 100000] [--window SECS] [--snapshots 5]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = Opts {
        agents: super::sizes(args, "--agents", &[100, 1_000, 5_000, 10_000])?,
        drains: crate::flag(args, "--drains").unwrap_or(200),
        instances: crate::flag(args, "--instances").unwrap_or(100_000),
        window: Duration::from_secs_f64(crate::flag(args, "--window").unwrap_or(10.0)),
        snapshots: crate::flag(args, "--snapshots").unwrap_or(5),
    };
    let biggest = opts.agents.iter().copied().max().unwrap_or(0) as u64;
    // One socket per session on each side, plus room for everything else.
    let nofile = super::raise_nofile(biggest + 1_024);
    println!(
        "scale: simulated agents are real AgentLink sessions over loopback TCP, run as tasks of this \
         process; they skip the kernel (apply nothing, ack at once) and send one metric summary a second"
    );
    println!("open files limit: {nofile} (this process and the coordinator it starts)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let mut rows = Vec::new();
    let mut broke: Option<String> = None;
    for &n in &opts.agents {
        if (n as u64) + 64 > nofile {
            broke = Some(format!("{n} agents: the open files limit is {nofile}"));
            break;
        }
        match size(&rt, n, &opts) {
            Ok(r) => rows.push(r),
            Err(e) => {
                broke = Some(format!("{n} agents: {e:#}"));
                break;
            }
        }
    }
    let snap = snapshot(&rt, &opts);

    println!("\nscale: one coordinator, N simulated agents; drain barriers on one instance, {} each", opts.drains);
    println!(
        "| agents | connect all | last ack p50 | last ack p99 | drain RPC p50 | drain RPC p99 | incomplete | RSS | RSS / agent | CPU at rest | CPU / agent |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let per_kib = r.rest.rss_kib.saturating_sub(r.idle.rss_kib) as f64 / r.agents as f64;
        let cpu = r.rest.cpu_pct - r.idle.cpu_pct;
        println!(
            "| {} | {:.1} s | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} | {:.1} MiB | {per_kib:.1} KiB | {:.2} % | {:.4} % |",
            thousands(r.agents),
            r.connect_secs,
            r.ack_p50,
            r.ack_p99,
            r.rpc_p50,
            r.rpc_p99,
            r.incomplete,
            r.rest.rss_kib as f64 / 1024.0,
            r.rest.cpu_pct,
            cpu / r.agents as f64,
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "RSS and CPU are the coordinator's (/proc/PID/status VmRSS, /proc/PID/stat utime+stime over {:.0} s at \
             rest); per agent: above the same coordinator with no agent ({:.1} MiB, {:.2} % of a core)",
            opts.window.as_secs_f64(),
            r.idle.rss_kib as f64 / 1024.0,
            r.idle.cpu_pct
        );
    }
    match &broke {
        Some(why) => println!("breaks at {why}"),
        None => println!("no break up to {} agents", thousands(rows.last().map_or(0, |r| r.agents))),
    }
    match &snap {
        Ok(s) => s.print(),
        Err(e) => println!("\nsnapshot: not measured: {e:#}"),
    }

    if let Some(r) = rows.iter().find(|r| r.agents == GOAL_AGENTS) {
        let ratio = r.ack_p99 / GOAL_MS;
        let what = format!("drain barrier last ack p99 at {} agents / {GOAL_MS:.0} ms", thousands(r.agents));
        crate::summary("scale", &what, ratio, "<= 1", Some(ratio <= 1.0 && r.incomplete == 0));
    }
    if let Some(r) = rows.last() {
        let per_kib = r.rest.rss_kib.saturating_sub(r.idle.rss_kib) as f64 / r.agents as f64;
        measured("scale", &format!("coordinator RSS per agent at {} agents", thousands(r.agents)), per_kib, "KiB");
        let cpu = (r.rest.cpu_pct - r.idle.cpu_pct) / r.agents as f64;
        measured(
            "scale",
            &format!("coordinator CPU at rest per agent at {} agents", thousands(r.agents)),
            cpu,
            "% of a core",
        );
    }
    if let Ok(s) = &snap {
        if let Some(t) = s.median_ms() {
            measured("scale", &format!("snapshot of {} instances, hello to whole", thousands(s.instances)), t, "ms");
        }
    }
    if rows.is_empty() {
        bail!("no size could be measured: {}", broke.unwrap_or_default());
    }
    Ok(())
}

/// One size: a fresh coordinator, N agents, rest, barriers.
fn size(rt: &tokio::runtime::Runtime, n: usize, opts: &Opts) -> anyhow::Result<Row> {
    let mut coord = Coord::start(&format!("scale{n}"), LISTEN);
    let pid = coord.pid();
    let url = coord.url.clone();
    rt.block_on(super::apply(&url, REGISTRY))?;
    let idle = super::usage(pid, opts.window, |_| {})?;

    let t = Instant::now();
    let fleet = Fleet::start(rt, &url, n);
    let deadline = Duration::from_secs(60) + Duration::from_millis(20 * n as u64);
    let failed = fleet.wait_connected(n, deadline);
    let connect_secs = t.elapsed().as_secs_f64();
    if let Some(e) = failed {
        bail!(
            "{} of {n} sessions connected within {deadline:?} ({}); coordinator log:\n{}",
            fleet.connected(),
            e,
            coord.log_tail()
        );
    }
    rt.block_on(wait_synced(&url, n, deadline)).with_context(|| coord.log_tail())?;
    eprintln!("scale: {n} agents connected and synced in {connect_secs:.1} s");
    std::thread::sleep(Duration::from_secs(2));
    let rest = super::usage(pid, opts.window, |_| {})?;

    let (mut acks, mut rpcs, incomplete) = rt.block_on(barriers(&url, n, opts.drains))?;
    acks.sort_by(f64::total_cmp);
    rpcs.sort_by(f64::total_cmp);
    if acks.is_empty() {
        bail!("no barrier completed");
    }
    let p = |v: &[f64], q| crate::percentile(v, q);
    let row = Row {
        agents: n,
        connect_secs,
        idle,
        rest,
        ack_p50: p(&acks, 0.5),
        ack_p99: p(&acks, 0.99),
        rpc_p50: p(&rpcs, 0.5),
        rpc_p99: p(&rpcs, 0.99),
        incomplete,
    };
    drop(fleet);
    drop(coord);
    Ok(row)
}
