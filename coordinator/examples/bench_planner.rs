//! Planner benchmark: plans v1 → v2 of 100 and of 1,000 services × 10 instances (5 nodes,
//! `depends_on` a tree of fan-out 3) with every strategy, and prints the time ratio
//! 1000/100 per strategy; near-linear planning keeps it at or under 12×.
//!
//! `cargo run --release -p hitless-coordinator --example bench_planner` (or
//! `cargo xtask bench planner`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hitless_coordinator::planner::plan;
use hitless_coordinator::{Strategy, Target};
use hitless_model::{Architecture, Cluster, RunSpec, Service};

const NODES: usize = 5;
const PER_SERVICE: u32 = 10;
const TARGET_RATIO: f64 = 12.0;
const ROUNDS: usize = 15;

fn architecture(services: usize, version: &str) -> Architecture {
    let nodes: Vec<String> = (0..NODES).map(|n| format!("node-{n}")).collect();
    let services = (0..services)
        .map(|i| Service {
            name: format!("svc-{i}"),
            version: version.to_owned(),
            port: 10_000 + u16::try_from(i).unwrap_or(0),
            vips: Vec::new(),
            protocol: None,
            policy: None,
            run: RunSpec { command: vec!["./svc".into()], env: BTreeMap::new() },
            health: None,
            prestop: None,
            drain_deadline: None,
            config: BTreeMap::new(),
            depends_on: if i == 0 { Vec::new() } else { vec![format!("svc-{}", (i - 1) / 3)] },
            placement: nodes.iter().map(|n| (n.clone(), PER_SERVICE / u32::try_from(NODES).unwrap_or(1))).collect(),
        })
        .collect();
    Architecture { nodes, services }
}

/// One planning problem, prepared outside the timing.
struct Case {
    current: Cluster,
    target: Target,
    best: Duration,
    steps: usize,
}

impl Case {
    fn new(services: usize) -> Self {
        Self {
            current: Cluster::from_architecture(&architecture(services, "v1")),
            target: Target::new(&architecture(services, "v2")),
            best: Duration::MAX,
            steps: 0,
        }
    }

    /// Plans once and keeps the fastest time seen.
    fn run(&mut self, strategy: &Strategy) {
        let start = cpu_time();
        match plan(&self.current, &self.target, strategy, &[]) {
            Ok(p) => {
                self.best = self.best.min(cpu_time().saturating_sub(start));
                self.steps = p.steps.len();
            }
            Err(e) => {
                eprintln!("{strategy}: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// This thread's time on a CPU: unlike wall time, it does not grow when other work on the
/// machine preempts the benchmark (long runs are preempted more often than short ones,
/// which would inflate the ratio). Falls back to wall time if the clock is unavailable.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return START.with(Instant::elapsed);
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

thread_local! {
    static START: Instant = Instant::now();
}

fn main() {
    // Optional sizes, e.g. `bench_planner 1000 10000`, to look at other scales.
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = match args[..] {
        [a, b] => (a, b),
        _ => (100, 1000),
    };
    println!(
        "planner: v1 → v2, 10 instances per service on {NODES} nodes, on-CPU time, fastest of 15 interleaved rounds"
    );
    println!();
    println!("| strategy | {} services | {} services | ratio {}/{} |", sizes.0, sizes.1, sizes.1, sizes.0);
    println!("|---|---:|---:|---:|");
    // Rounds interleaved across strategies and sizes, fastest of each kept: a burst of
    // other work on the machine only slows the runs it overlaps, and spread this way
    // it cannot cover every round of one strategy.
    let strategies: Vec<(&str, Strategy)> = Strategy::NAMES
        .iter()
        .filter_map(|name| Strategy::from_name(name).map(Strategy::validated).and_then(Result::ok).map(|s| (*name, s)))
        .collect();
    let mut cases: Vec<(Case, Case)> = strategies.iter().map(|_| (Case::new(sizes.0), Case::new(sizes.1))).collect();
    for _ in 0..ROUNDS {
        for ((_, strategy), (small, large)) in strategies.iter().zip(&mut cases) {
            for _ in 0..10 {
                small.run(strategy);
            }
            large.run(strategy);
        }
    }
    let mut worst: f64 = 0.0;
    for ((name, _), (small, large)) in strategies.iter().zip(&cases) {
        let ratio = large.best.as_secs_f64() / small.best.as_secs_f64().max(1e-9);
        worst = worst.max(ratio);
        println!(
            "| {name} | {:.2} ms ({} steps) | {:.2} ms ({} steps) | {ratio:.1}× |",
            small.best.as_secs_f64() * 1e3,
            small.steps,
            large.best.as_secs_f64() * 1e3,
            large.steps,
        );
    }
    println!();
    let verdict = if worst <= TARGET_RATIO { "ok" } else { "ABOVE TARGET" };
    println!("worst ratio {worst:.1}× (target ≤ {TARGET_RATIO}×): {verdict}");
    // The row of `cargo xtask bench`'s summary (tab-separated, see hitless-bench).
    if let Some(path) = std::env::var_os("HITLESS_BENCH_SUMMARY") {
        let met = if worst <= TARGET_RATIO { "met" } else { "NOT MET" };
        let line = format!(
            "planner\tworst strategy, {} vs {} services: planning time\t{worst:.4}\t<= {TARGET_RATIO}\t{met}\n",
            sizes.1, sizes.0
        );
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Err(e) = file.and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes())) {
            eprintln!("cannot append to the summary: {e}");
        }
    }
}
