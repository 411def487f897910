//! `hitless-soak`: chaos at scale. Rollouts of every lossless strategy under real
//! clients (nginx in node 0 proxying to the VIP with a new upstream connection per
//! request, driven by wrk; probe loops through the VIP and from stale caches on every
//! node), with seeded SIGKILLs of the coordinator, of agents and of starting instances,
//! most while a step is in flight. Ends with one line:
//!
//! `soak: R rollouts, K kills (C coordinator, A agent, I instance, M mid-step), F failed requests, O orphaned, D doubled, T targets reached`
//!
//! and exits 1 on any loss, orphan, double or missed target. `HITLESS_SEED` or `--seed`
//! replays a run. Run as root (`cargo xtask soak --rollouts N --kills K [--seed S]`).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hitless_tests::gateway::{require_tools, Gateway, Upstream, Wrk};
use hitless_tests::rig::{finish, instances, nodes_in, pids, Rig, Rng};
use hitless_tests::{require_root, Coordinator};

const STRATEGIES: [&[&str]; 6] = [
    &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0"],
    &["--strategy", "canary"],
    &["--strategy", "blue-green"],
    &["--strategy", "mixed"],
    &["--strategy", "weighted", "--steps", "50,100"],
    &["--strategy", "rolling", "--max-surge", "2", "--max-unavailable", "0"],
];
/// The instances' addresses: node i takes 127.175.i.0/24 (no other suite uses 127.175).
const POOL: &str = "127.175.";
const COORDINATOR: &str = "127.130.75.1:7070";
const VIP: &str = "127.77.175.1:8080";
/// Bound of one rollout's load, in seconds.
const MAX_LOAD_SECS: u64 = 120;

#[derive(Default)]
struct Tally {
    rollouts: u32,
    kills: u32,
    coordinator: u32,
    agent: u32,
    instance: u32,
    mid_step: u32,
    failed: u64,
    orphaned: u64,
    doubled: u64,
    targets: u32,
    /// Node checks that found a slot pointing at a backend that is not serving.
    invariant: u32,
}

impl Tally {
    fn line(&self) -> String {
        format!(
            "soak: {} rollouts, {} kills ({} coordinator, {} agent, {} instance, {} mid-step), {} failed requests, {} orphaned, {} doubled, {} targets reached, {} invariant violations",
            self.rollouts,
            self.kills,
            self.coordinator,
            self.agent,
            self.instance,
            self.mid_step,
            self.failed,
            self.orphaned,
            self.doubled,
            self.targets,
            self.invariant
        )
    }

    fn clean(&self) -> bool {
        self.failed == 0
            && self.orphaned == 0
            && self.doubled == 0
            && self.targets == self.rollouts
            && self.invariant == 0
    }
}

fn flag(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("hitless-soak [--rollouts N (12)] [--kills K (48)] [--seed S]  (as root; needs nginx-light and wrk)");
        return ExitCode::SUCCESS;
    }
    let rollouts = flag(&args, "--rollouts").unwrap_or(12).max(1) as u32;
    let kills = flag(&args, "--kills").unwrap_or(48) as u32;
    let seed = flag(&args, "--seed")
        .or_else(|| std::env::var("HITLESS_SEED").ok().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    require_root();
    require_tools();
    println!("soak: {rollouts} rollouts, {kills} kills, seed {seed} (--seed {seed} replays it)");
    let mut tally = Tally::default();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| soak(rollouts, kills, seed, &mut tally)));
    if let Err(e) = &outcome {
        let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()));
        println!("soak: stopped early (seed {seed}): {}", why.unwrap_or_default());
    }
    println!("{}", tally.line());
    if outcome.is_ok() && tally.clean() {
        ExitCode::SUCCESS
    } else {
        println!("soak: FAILED (seed {seed})");
        ExitCode::FAILURE
    }
}

/// Whether a step is in flight: an instance is starting or draining.
fn mid_step(rig: &Rig) -> bool {
    rig.rollout()["services"].as_array().is_some_and(|s| s.iter().any(|s| s["starting"] != 0 || s["draining"] != 0))
}

fn soak(rollouts: u32, kills: u32, seed: u64, t: &mut Tally) {
    let mut rng = Rng(seed);
    let mut rig = rig();
    let gw = Gateway::start(
        rig.nodes[0].cgroup.path(),
        "soak-vip",
        "127.180.7.1:8081",
        &Upstream::PerRequest(vec![rig.vip.clone()]),
    );
    let per_rollout = kills.div_ceil(rollouts);
    let mut left = kills;
    for round in 0..rollouts {
        let strategy = STRATEGIES[round as usize % STRATEGIES.len()];
        let version = format!("v{}", round + 2);
        let what = format!("rollout {round} {strategy:?} → {version}");
        let stop = rig.dir.join("stop");
        let loops = rig.load(&stop);
        let mark = gw.log_mark();
        let queues = listen_drops();
        let wrk = Wrk::start(&gw.url(), MAX_LOAD_SECS);
        std::thread::sleep(Duration::from_millis(300));
        rig.push_async(&version, strategy);
        t.rollouts += 1;
        for _ in 0..per_rollout.min(left) {
            left -= 1;
            // Most kills land mid-step: wait (bounded) for a start or a drain.
            let until = Instant::now() + Duration::from_millis(rng.between(50, 1500));
            while Instant::now() < until && !mid_step(&rig) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let busy = mid_step(&rig);
            let down = Duration::from_millis(rng.between(20, 300));
            let who = match rng.between(0, 3) {
                0 => {
                    rig.coord.kill();
                    std::thread::sleep(down);
                    rig.coord.restart();
                    t.coordinator += 1;
                    "the coordinator".to_owned()
                }
                2 if kill_starting_instance(&rig, &mut rng, Duration::from_secs(1)).is_some() => {
                    t.instance += 1;
                    "a starting instance".to_owned()
                }
                _ => {
                    let i = rng.between(0, rig.nodes.len() as u64) as usize;
                    let node = &mut rig.nodes[i];
                    node.kill_agent();
                    std::thread::sleep(down);
                    node.spawn_agent();
                    t.agent += 1;
                    format!("the agent of {}", node.name)
                }
            };
            t.kills += 1;
            t.mid_step += u32::from(busy);
            println!("{what}: SIGKILL {who}{}", if busy { " (mid-step)" } else { "" });
        }
        let r = rig.wait_state(&["done", "failed", "rolled-back"]);
        rig.coord.wait_synced(3);
        std::thread::sleep(Duration::from_millis(300));
        let wrk = wrk.stop();
        let probes = finish(loops, &stop);
        let nginx = gw.errors_since(mark);
        let lost = wrk.failed() + nginx.len() as u64 + probes.iter().map(|s| s.failed).sum::<u64>();
        for line in nginx.iter().take(5) {
            println!("{what}: nginx: {line}");
        }
        for (k, p) in probes.iter().enumerate().filter(|(_, p)| p.failed > 0) {
            println!("{what}: probe {k} (node {}, {}): {p:?}", k / 2, if k % 2 == 0 { "VIP" } else { "stale cache" });
        }
        t.failed += lost;

        let serving = instances(&rig.coord);
        let listed: BTreeSet<String> =
            serving.iter().filter_map(|i| i["address"].as_str().map(str::to_owned)).collect();
        let at_target = serving.iter().all(|i| i["version"] == version.as_str()) && listed.len() == 6;
        if r["state"] == "done" && at_target {
            t.targets += 1;
        } else {
            println!("{what}: target not reached: state {}, serving {serving:?}", r["state"]);
        }
        t.doubled += serving.len().saturating_sub(listed.len()) as u64 + listed.len().saturating_sub(6) as u64;
        // Instances stopped at the end of the rollout may take a moment to exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut running = pids(POOL);
        while running.keys().any(|a| !listed.contains(a)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            running = pids(POOL);
        }
        let orphans: Vec<&String> = running.keys().filter(|a| !listed.contains(*a)).collect();
        if !orphans.is_empty() {
            println!("{what}: orphaned instances (running, not serving in the registry): {orphans:?}");
        }
        t.orphaned += orphans.len() as u64;
        // The datapath's invariant on every node: no slot in force points at a backend
        // that is not serving.
        for n in &rig.nodes {
            let bad = n.slots_to_unserving();
            if bad != 0 {
                println!("{what}: node {}: {bad} slots point at a backend that is not serving", n.name);
                t.invariant += 1;
            }
        }
        let dropped = listen_drops().saturating_sub(queues);
        let slow: u64 = probes.iter().flat_map(|p| p.slow_connects.values()).sum();
        println!(
            "{what}: {}; wrk {} requests at {:.0}/s, {} failed; probes {} failed, {slow} connects after a SYN retransmission; nginx {} errors; {dropped} SYNs dropped by full accept queues",
            r["state"],
            wrk.requests,
            wrk.rate(),
            wrk.failed(),
            probes.iter().map(|s| s.failed).sum::<u64>(),
            nginx.len()
        );
        if !t.clean() {
            // Later rollouts would start from a broken state: stop here with the seed.
            return;
        }
    }
}

/// A coordinator and three nodes running web v1, 2 instances per node. The instances
/// are slow to boot and their accept queue overflows under load: kills land while
/// instances start, and handshakes are in flight when instances drain.
fn rig() -> Rig {
    let coord = Coordinator::start("soak", COORDINATOR);
    let nodes = nodes_in(&coord, "soak", POOL, |_| Vec::new());
    Rig::deploy(coord, nodes, VIP, ["--boot-ms", "150", "--backlog", "5"].map(str::to_owned).to_vec())
}

/// Milliseconds since process `pid` started (from /proc: start time in clock ticks
/// since boot, against the uptime).
fn age_ms(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid …": field 22 (starttime) counted after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let start_ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?.max(1);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    Some(((uptime * 1000.0) as u64).saturating_sub(start_ticks * 1000 / hz))
}

/// Instances boot for 150 ms before they listen (`--boot-ms`): one younger than this
/// cannot be healthy, so cannot be registered, so carries no traffic.
const STARTING_AGE_MS: u64 = 100;

/// SIGKILLs one instance that is still booting (younger than [`STARTING_AGE_MS`], not
/// registered), if any: a kill that could land on a serving instance would fail its
/// requests in flight, which no rollout can prevent.
fn kill_starting_instance(rig: &Rig, rng: &mut Rng, within: Duration) -> Option<String> {
    let end = Instant::now() + within;
    loop {
        if let Some(a) = kill_one_booting(rig, rng) {
            return Some(a);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill_one_booting(rig: &Rig, rng: &mut Rng) -> Option<String> {
    let registered: BTreeSet<String> = rig.coord.json(&["registry", "list", "-o", "json"])["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["address"].as_str().map(str::to_owned))
        .collect();
    let starting: Vec<(String, String)> = pids(POOL)
        .into_iter()
        .filter(|(a, pid)| !registered.contains(a) && age_ms(pid).is_some_and(|ms| ms < STARTING_AGE_MS))
        .collect();
    if starting.is_empty() {
        return None;
    }
    let (addr, pid) = &starting[rng.between(0, starting.len() as u64) as usize];
    let pid: libc::pid_t = pid.parse().ok()?;
    // SAFETY: kill(2) on a pid just listed as an instance of this soak's pool.
    (unsafe { libc::kill(pid, libc::SIGKILL) } == 0).then(|| addr.clone())
}

/// The kernel's count of SYNs dropped because a listener's accept queue was full
/// (TcpExt ListenOverflows in /proc/net/netstat): instances this soak starts have a
/// backlog of 5, so load overflows them, and a client's SYN waits for its retransmission.
fn listen_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
