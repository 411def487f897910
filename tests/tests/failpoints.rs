//! Fail points: each (fail point, action) case of the table arms one point on one
//! process (node 1's agent, or the coordinator) through `FAILPOINTS`, runs one small
//! rollout under load (probe loops through the VIP and from stale caches on every node),
//! and acts as a supervisor: a process that dies (a `panic` action) is started again,
//! with `FAILPOINTS` cleared. After each case: no request lost, the target reached (a
//! rollout the fault failed must say why, and a clean push then reaches it), the
//! instances the registry lists serving are exactly the processes running, and no
//! node has a slot in force pointing at a backend that is not serving. One line per
//! case. Built only with `--features failpoints`, against binaries built with
//! `hitless-agent/failpoints` and `hitless-coordinator/failpoints` (`cargo xtask test`
//! builds both into target/failpoints). Run as root.
#![cfg(feature = "failpoints")]

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::{Duration, Instant};

use hitless_tests::rig::{assert_no_loss, finish, http_loop, instances, pids, Rig};
use hitless_tests::{bin, spawn_line, Proc};

/// Which process a case arms.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Coordinator,
    /// Node 1's agent.
    Agent,
}
use Who::{Agent, Coordinator};

/// Node whose agent the agent cases arm (it runs instances and a client).
const NODE: usize = 1;
/// Instance addresses: node i takes 127.169.i.0/24.
const POOL: &str = "127.169.";

/// (fail point, action, process). `N*off->ACTION` skips the evaluations a restart makes
/// before the rollout (the snapshot's apply and ack, the sessions' hellos and snapshots).
const CASES: &[(&str, &str, Who)] = &[
    ("agent.writer.backend_insert", "panic", Agent),
    ("agent.writer.backend_insert", "2*return", Agent),
    ("agent.writer.backend_addr_insert", "panic", Agent),
    ("agent.writer.backend_addr_insert", "return", Agent),
    ("agent.writer.slot_insert", "panic", Agent),
    ("agent.writer.slot_insert", "2*return", Agent),
    ("agent.writer.service_swap", "panic", Agent),
    ("agent.writer.service_swap", "sleep(300)", Agent),
    ("agent.writer.slot_remove", "panic", Agent),
    ("agent.writer.slot_remove", "2*return", Agent),
    ("agent.writer.backend_remove", "panic", Agent),
    ("agent.writer.backend_remove", "2*return", Agent),
    ("agent.writer.revision_set", "1*off->panic", Agent),
    ("agent.writer.revision_set", "1*off->2*return", Agent),
    ("agent.apply.after_write", "1*off->panic", Agent),
    ("agent.apply.after_write", "sleep(300)", Agent),
    ("agent.link.connect", "3*return", Agent),
    ("agent.link.apply", "1*off->panic", Agent),
    ("agent.link.apply", "1*off->2*return", Agent),
    ("agent.link.ack_send", "1*off->panic", Agent),
    ("agent.link.ack_send", "1*off->2*return", Agent),
    ("agent.link.report_send", "panic", Agent),
    ("agent.link.report_send", "sleep(500)", Agent),
    ("agent.link.report_send", "1*return", Agent),
    ("agent.driver.record.before_fsync", "panic", Agent),
    ("agent.driver.record.before_fsync", "1*return", Agent),
    ("agent.driver.record.before_rename", "panic", Agent),
    ("agent.driver.start.cgroup_create", "1*return", Agent),
    ("agent.driver.spawn", "panic", Agent),
    ("agent.driver.spawn", "1*return", Agent),
    ("agent.driver.start.after_spawn", "panic", Agent),
    ("agent.driver.health.mark_serving", "panic", Agent),
    ("agent.driver.health.mark_serving", "sleep(500)", Agent),
    ("agent.driver.stop.before_prestop", "panic", Agent),
    ("agent.driver.stop.before_prestop", "1*return", Agent),
    ("agent.driver.stop.before_sigterm", "panic", Agent),
    ("agent.driver.stop.before_sigterm", "1*return", Agent),
    ("agent.driver.stop.cgroup_remove", "1*return", Agent),
    ("agent.driver.stop.record_remove", "panic", Agent),
    ("agent.driver.stop.record_remove", "1*return", Agent),
    ("store.commit.before_fsync", "panic", Coordinator),
    ("store.commit.before_fsync", "1*return", Coordinator),
    ("store.commit.after_fsync", "panic", Coordinator),
    ("store.put_record.before_fsync", "panic", Coordinator),
    ("store.put_record.before_fsync", "1*off->1*return", Coordinator),
    ("store.write_row.before_fsync", "3*return", Coordinator),
    ("store.put_nodes.before_fsync", "return", Coordinator),
    ("coordinator.state.commit.after_store", "panic", Coordinator),
    ("coordinator.state.save_rollout.after_store", "panic", Coordinator),
    ("coordinator.state.ack", "3*off->panic", Coordinator),
    ("coordinator.state.ack", "sleep(200)", Coordinator),
    ("coordinator.agent_link.hello", "3*return", Coordinator),
    ("coordinator.agent_link.send_update", "3*off->2*return", Coordinator),
    ("coordinator.agent_link.send_op", "panic", Coordinator),
    ("coordinator.agent_link.send_op", "1*return", Coordinator),
    ("coordinator.agent_link.recv", "3*off->1*return", Coordinator),
    ("coordinator.barrier.after_commit", "panic", Coordinator),
    ("coordinator.barrier.after_commit", "1*return", Coordinator),
    ("coordinator.engine.step.before", "panic", Coordinator),
    ("coordinator.engine.step.before", "1*return", Coordinator),
    ("coordinator.engine.step.after", "panic", Coordinator),
    ("coordinator.engine.start.after_send", "panic", Coordinator),
    ("coordinator.engine.start.before_register", "panic", Coordinator),
    ("coordinator.engine.weights.before", "panic", Coordinator),
    ("coordinator.engine.stop.before_barrier", "panic", Coordinator),
    ("coordinator.engine.stop.after_barrier", "panic", Coordinator),
    ("coordinator.engine.stop.after_send", "panic", Coordinator),
    ("coordinator.engine.stop.before_bury", "panic", Coordinator),
    ("coordinator.engine.stop.before_bury", "1*return", Coordinator),
    ("coordinator.engine.handshakes.quiet", "panic", Coordinator),
    ("coordinator.engine.handshakes.quiet", "sleep(300)", Coordinator),
];

const STRATEGIES: [&[&str]; 2] =
    [&["--strategy", "blue-green"], &["--strategy", "rolling", "--max-surge", "2", "--max-unavailable", "0"]];

/// The supervisor of the armed process.
struct Armed {
    who: Who,
    proc: Option<Proc>,
    /// Times the armed process died and was started again, clean.
    deaths: u32,
}

impl Armed {
    /// Restarts `who` with `FAILPOINTS=point=action`.
    fn arm(rig: &mut Rig, who: Who, spec: &str) -> Self {
        let proc = match who {
            Agent => {
                let node = &mut rig.nodes[NODE];
                node.kill_agent();
                let child = node.agent_command().env("FAILPOINTS", spec).spawn().expect("spawn agent");
                Proc::new(child)
            }
            Coordinator => {
                rig.coord.kill();
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(std::env::temp_dir().join(format!("{}.log", rig.coord.data_dir.display())))
                    .expect("log");
                let listen = rig.coord.url.trim_start_matches("http://").to_owned();
                let mut cmd = Command::new(bin("hitless"));
                cmd.args([
                    "coordinator",
                    "--insecure",
                    "--listen",
                    &listen,
                    "--health-timeout",
                    "5s",
                    "--tombstone",
                    "60s",
                ])
                .arg("--data-dir")
                .arg(&rig.coord.data_dir)
                .env("FAILPOINTS", spec)
                .stderr(log);
                spawn_line(cmd, "listening on")
            }
        };
        Self { who, proc: Some(proc), deaths: 0 }
    }

    /// Starts the armed process again, clean, if it died.
    fn supervise(&mut self, rig: &mut Rig) {
        let dead = self.proc.as_mut().is_some_and(|p| matches!(p.child().try_wait(), Ok(Some(_))));
        if dead {
            self.proc = None;
            self.deaths += 1;
            self.start_clean(rig);
        }
    }

    /// Ends the armed process (if alive) and starts it again without fail points.
    fn disarm(&mut self, rig: &mut Rig) {
        self.supervise(rig);
        if let Some(mut p) = self.proc.take() {
            p.kill();
            self.start_clean(rig);
        }
    }

    fn start_clean(&self, rig: &mut Rig) {
        match self.who {
            Agent => rig.nodes[NODE].spawn_agent(),
            Coordinator => rig.coord.restart(),
        }
    }
}

/// The rollout as `status` shows it, or None while the coordinator does not answer.
fn rollout(rig: &Rig) -> Option<serde_json::Value> {
    let out = rig.coord.cli(&["status", "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().map(|s| s["rollout"].clone())
}

fn is_end(r: &serde_json::Value, version: &str) -> bool {
    r["services"][0]["version"] == version && ["done", "failed", "rolled-back"].iter().any(|s| r["state"] == *s)
}

/// Like [`Rig::load`], but waits (supervising) while the armed coordinator is down.
fn load(rig: &mut Rig, armed: &mut Armed, stop: &std::path::Path) -> Vec<std::process::Child> {
    let _ = std::fs::remove_file(stop);
    let deadline = Instant::now() + Duration::from_secs(30);
    let serving: Vec<String> = loop {
        armed.supervise(rig);
        let out = rig.coord.cli(&["registry", "list", "-o", "json"]);
        if let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let all = list["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "web"))
                .and_then(|s| s["instances"].as_array().cloned())
                .unwrap_or_default();
            break all
                .iter()
                .filter(|i| i["state"] == "serving")
                .filter_map(|i| i["address"].as_str().map(str::to_owned))
                .collect();
        }
        assert!(Instant::now() < deadline, "the coordinator never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut loops = Vec::new();
    for (i, n) in rig.nodes.iter().enumerate() {
        loops.push(http_loop(n, &rig.vip, stop));
        if let Some(a) = serving.get(i) {
            loops.push(http_loop(n, a, stop));
        }
    }
    loops
}

/// Waits (supervising) until `n` agents hold the registry revision, up to `limit`.
fn settle(rig: &mut Rig, armed: &mut Armed, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        armed.supervise(rig);
        let out = rig.coord.cli(&["status", "-o", "json"]);
        if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let rev = s["revision"].as_u64();
            let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
            let synced = nodes
                .iter()
                .filter(|n| n["connected"].as_bool() == Some(true) && n["applied_revision"].as_u64() == rev)
                .count();
            if synced >= 3 {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// One case; returns its line. Panics on a broken invariant.
fn case(rig: &mut Rig, n: usize, point: &str, action: &str, who: Who) -> String {
    let version = format!("v{}", n + 2);
    let strategy = STRATEGIES[n % 2];
    let what = format!("{point}={action} ({who:?}, {})", strategy[1]);
    let t0 = Instant::now();
    let coord_log = std::env::temp_dir().join(format!("{}.log", rig.coord.data_dir.display()));
    let coord_text = || std::fs::read_to_string(&coord_log).unwrap_or_default();
    let (agent_from, coord_from) = (rig.nodes[NODE].log().len(), coord_text().len());
    let mut armed = Armed::arm(rig, who, &format!("{point}={action}"));
    settle(rig, &mut armed, Duration::from_secs(20));
    let stop = rig.dir.join("stop");
    let loops = load(rig, &mut armed, &stop);
    std::thread::sleep(Duration::from_millis(200));

    let file = rig.dir.join("arch.yaml");
    std::fs::write(&file, rig.arch(&version, &[])).expect("architecture file");
    let mut args = vec!["push", "--target", file.to_str().expect("utf-8")];
    args.extend_from_slice(strategy);
    let pushed = rig.coord.cli(&args);
    let mut outcome = if pushed.status.success() {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            armed.supervise(rig);
            match rollout(rig) {
                Some(r) if is_end(&r, &version) => break format!("{}: {}", r["state"], r["message"]),
                _ if Instant::now() >= deadline => break "HANG: no end within 90 s".to_owned(),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    } else {
        format!("push refused: {}", String::from_utf8_lossy(&pushed.stderr).trim())
    };
    armed.disarm(rig);
    let died = armed.deaths;
    // Whether the point acted: its process died, or an injected error names it in a log.
    let needle = format!("failpoint {point}");
    let logged = rig.nodes[NODE].log().get(agent_from..).is_some_and(|t| t.contains(&needle))
        || coord_text().get(coord_from..).is_some_and(|t| t.contains(&needle));
    let fired = if died > 0 {
        format!("died {died}x")
    } else if logged {
        "error logged".to_owned()
    } else {
        "no death, no error logged".to_owned()
    };
    assert!(!outcome.starts_with("HANG"), "{what}: {outcome}");
    if !outcome.starts_with("\"done\"") {
        // Failed with a message: it must say why, and a clean push must reach the target.
        assert!(outcome.len() > 20, "{what}: a failure without a message: {outcome}");
        assert!(settle(rig, &mut armed, Duration::from_secs(30)), "{what}: agents never synced after the fault");
        let out = rig.push(&version, &[], strategy);
        let r = rollout(rig).unwrap_or_default();
        assert!(out.status.success() && r["state"] == "done", "{what}: the clean push after `{outcome}`: {r}");
        outcome.push_str("; clean push: done");
    }
    assert!(settle(rig, &mut armed, Duration::from_secs(30)), "{what}: agents never synced");
    std::thread::sleep(Duration::from_millis(200));
    assert_no_loss(&finish(loops, &stop), &what);

    let serving = instances(&rig.coord);
    let listed: BTreeSet<String> = serving.iter().filter_map(|i| i["address"].as_str().map(str::to_owned)).collect();
    assert!(serving.iter().all(|i| i["version"] == version.as_str()), "{what}: target reached: {serving:?}");
    assert_eq!(listed.len(), 6, "{what}: six serving instances: {serving:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut running = pids(POOL);
    while running.len() != 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        running = pids(POOL);
    }
    let processes: BTreeSet<String> = running.keys().cloned().collect();
    assert_eq!(processes, listed, "{what}: the processes running are exactly the instances listed");
    for node in &rig.nodes {
        assert_eq!(node.slots_to_unserving(), 0, "{what}: node {}: a slot points at a backend not serving", node.name);
    }
    format!("{what}: {outcome}; {fired}; {:.1?}", t0.elapsed())
}

/// Fails unless `name` was built with its fail points (their names are in the binary).
fn require_failpoints(name: &str, point: &str) {
    let bytes = std::fs::read(bin(name)).expect("binary");
    assert!(
        bytes.windows(point.len()).any(|w| w == point.as_bytes()),
        "{} has no fail points: build it with --features hitless-agent/failpoints,hitless-coordinator/failpoints (cargo xtask test does)",
        bin(name).display()
    );
}

#[test]
fn every_fail_point_during_a_rollout_loses_nothing_and_leaves_no_orphan() {
    require_failpoints("hitless-agent", "agent.writer.backend_insert");
    require_failpoints("hitless", "store.commit.before_fsync");
    let started = Instant::now();
    let mut rig = Rig::new_with("fp", 9, &["--tombstone", "60s"], |_| Vec::new());
    let mut failures = Vec::new();
    for (n, (point, action, who)) in CASES.iter().enumerate() {
        match std::panic::catch_unwind(AssertUnwindSafe(|| case(&mut rig, n, point, action, *who))) {
            Ok(line) => println!("case {n:2} ok: {line}"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                println!("case {n:2} FAILED: {point}={action}: {msg}");
                failures.push(format!("{point}={action}: {msg}"));
                // The next case starts from a rig whose processes are all clean again.
                rig.coord.kill();
                rig.coord.restart();
                for node in &mut rig.nodes {
                    node.kill_agent();
                    node.spawn_agent();
                }
            }
        }
    }
    println!("{} cases, {} failed, {:.0?}", CASES.len(), failures.len(), started.elapsed());
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}
