//! Rollouts end to end: a coordinator, three simulated nodes whose agents run real
//! instances (`hitless-testsvc`) in their workload cgroups, HTTP load through the VIP on
//! every node, and clients with stale caches dialling one instance address directly.
//! Run as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use hitless_tests::{bin, Coordinator, Node, Summary};

const VIP: &str = "127.77.60.1:8080";

fn architecture(nodes: &[Node], version: &str, per_node: u32) -> String {
    architecture_with(nodes, version, per_node, &[], VIP)
}

fn architecture_with(nodes: &[Node], version: &str, per_node: u32, extra: &[&str], vip: &str) -> String {
    let svc = bin("hitless-testsvc");
    let placement: Vec<String> = nodes.iter().map(|n| format!("{}: {per_node}", n.name)).collect();
    let extra: String = extra.iter().map(|e| format!(", \"{e}\"")).collect();
    format!(
        "services:\n  - name: web\n    version: {version}\n    port: 8080\n    vips: [\"{vip}\"]\n    run: {{ command: [\"{}\", \"--listen\", \"{{address}}:{{port}}\", \"--version\", \"{version}\"{extra}] }}\n    health: {{ http: /healthz }}\n    prestop: {{ http: /drain }}\n    drain_deadline: 5s\n    placement: {{ {} }}\n",
        svc.display(),
        placement.join(", ")
    )
}

fn nodes(coord: &Coordinator, name: &str, k: u8) -> Vec<Node> {
    (0..3)
        .map(|i| {
            let mut n = Node::new(&format!("{name}{i}"));
            let workload = n.cgroup.path().join("workload");
            let state = n.dir.join("state");
            let pool = format!("127.16{k}.{i}.0/24");
            n.agent_args(&[
                "--workload-cgroup",
                workload.to_str().expect("utf-8"),
                "--instance-addresses",
                &pool,
                "--state-dir",
                state.to_str().expect("utf-8"),
            ]);
            n.follow(&coord.url);
            n.spawn_agent();
            n
        })
        .collect()
}

fn push(coord: &Coordinator, dir: &Path, arch: &str, strategy: &[&str]) -> std::process::Output {
    let file = dir.join("arch.yaml");
    std::fs::write(&file, arch).expect("architecture file");
    let mut args = vec!["push", "--target", file.to_str().expect("utf-8"), "--wait"];
    args.extend_from_slice(strategy);
    coord.cli(&args)
}

fn http_loop(node: &Node, addr: &str, stop: &Path) -> Child {
    node.cgroup
        .command(bin("hitless-probe"))
        .args(["http-loop", addr, "--max-secs", "120", "--pause-ms", "5", "--stop-file"])
        .arg(stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("http loop")
}

fn finish(children: Vec<Child>, stop: &Path) -> Vec<Summary> {
    std::fs::write(stop, "").expect("stop file");
    children
        .into_iter()
        .map(|c| serde_json::from_slice(&c.wait_with_output().expect("loop").stdout).expect("summary"))
        .collect()
}

/// Serving instances of `web` (stopped ones stay listed as `down` for stale clients).
fn instances(coord: &Coordinator) -> Vec<serde_json::Value> {
    let list = coord.json(&["registry", "list", "-o", "json"]);
    let all = list["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["instances"].as_array().cloned())
        .unwrap_or_default();
    all.into_iter().filter(|i| i["state"] == "serving").collect()
}

#[test]
fn a_rolling_update_under_load_loses_no_request_and_a_plain_stop_does() {
    let coord = Coordinator::start("roll", "127.130.6.1:7070");
    let nodes = nodes(&coord, "roll", 1);
    coord.wait_synced(3);
    let dir: PathBuf = nodes[0].dir.clone();

    let out = push(&coord, &dir, &architecture(&nodes, "v1", 2), &["--strategy", "straight"]);
    assert!(
        out.status.success(),
        "first deploy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v1 = instances(&coord);
    assert_eq!(v1.len(), 6, "{v1:?}");
    coord.wait_synced(3);

    // Load through the VIP on every node, and one stale client per node that keeps
    // dialling the address of a v1 instance it learned before the rollout.
    let stop = dir.join("stop");
    let _ = std::fs::remove_file(&stop);
    let mut loops = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        loops.push(http_loop(n, VIP, &stop));
        let stale = v1[i]["address"].as_str().expect("address").to_owned();
        loops.push(http_loop(n, &stale, &stop));
    }
    std::thread::sleep(Duration::from_millis(500));
    let out = push(
        &coord,
        &dir,
        &architecture(&nodes, "v2", 2),
        &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0"],
    );
    assert!(
        out.status.success(),
        "rollout: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    let results = finish(loops, &stop);
    let _ = std::fs::remove_file(&stop);
    let v2 = instances(&coord);
    assert_eq!(v2.len(), 6, "{v2:?}");
    assert!(v2.iter().all(|i| i["version"] == "v2"), "{v2:?}");
    for (k, s) in results.iter().enumerate() {
        assert!(s.ok > 20, "client {k} ran: {s:?}");
        assert_eq!(s.failed, 0, "client {k} lost requests during the rollout: {s:?}");
        assert!(s.backends.keys().any(|b| b.starts_with("v2 ")), "client {k} reached v2: {s:?}");
    }

    // Baseline, same run: stop an instance the plain way (SIGTERM, no drain) while a
    // stale client dials it. It loses requests: the test can fail.
    let victim = v2[0]["address"].as_str().expect("address").to_owned();
    let stale = http_loop(&nodes[0], &victim, &stop);
    std::thread::sleep(Duration::from_millis(300));
    let killed = std::process::Command::new("pkill")
        .args(["-TERM", "-f", &format!("listen {victim} ")])
        .status()
        .expect("pkill");
    assert!(killed.success(), "no process listened on {victim}");
    std::thread::sleep(Duration::from_millis(500));
    let base = finish(vec![stale], &stop).remove(0);
    assert!(base.failed > 0, "stopping without a drain should lose requests of a stale client: {base:?}");
}

/// A coordinator and three nodes running web v1 (2 instances each), with VIP `vip`.
struct Rig {
    coord: Coordinator,
    nodes: Vec<Node>,
    dir: PathBuf,
    vip: String,
}

impl Rig {
    fn new(name: &str, k: u8) -> Self {
        let coord = Coordinator::start(name, &format!("127.130.{}.1:7070", 10 + k));
        let nodes = nodes(&coord, name, k);
        coord.wait_synced(3);
        let dir = nodes[0].dir.clone();
        let rig = Self { coord, nodes, dir, vip: format!("127.77.6{k}.1:8080") };
        let out = rig.push("v1", &[], &["--strategy", "straight"]);
        assert!(out.status.success(), "first deploy: {}", String::from_utf8_lossy(&out.stderr));
        rig
    }

    fn arch(&self, version: &str, extra: &[&str]) -> String {
        architecture_with(&self.nodes, version, 2, extra, &self.vip)
    }

    fn push(&self, version: &str, extra: &[&str], strategy: &[&str]) -> std::process::Output {
        push(&self.coord, &self.dir, &self.arch(version, extra), strategy)
    }

    /// Starts a push without waiting.
    fn push_async(&self, version: &str, strategy: &[&str]) {
        let file = self.dir.join("arch.yaml");
        std::fs::write(&file, self.arch(version, &[])).expect("architecture file");
        let mut args = vec!["push", "--target", file.to_str().expect("utf-8")];
        args.extend_from_slice(strategy);
        let out = self.coord.cli(&args);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn rollout(&self) -> serde_json::Value {
        self.coord.json(&["status", "-o", "json"])["rollout"].clone()
    }

    fn wait_state(&self, states: &[&str]) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.rollout();
            if states.iter().any(|s| r["state"] == *s) {
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "rollout never reached {states:?}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// HTTP load through the VIP on every node, plus a stale client per node.
    fn load(&self, stop: &Path) -> Vec<Child> {
        let _ = std::fs::remove_file(stop);
        let serving = instances(&self.coord);
        let mut loops = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            loops.push(http_loop(n, &self.vip, stop));
            if let Some(a) = serving.get(i).and_then(|x| x["address"].as_str()) {
                loops.push(http_loop(n, a, stop));
            }
        }
        loops
    }

    fn versions(&self) -> Vec<String> {
        instances(&self.coord).iter().map(|i| i["version"].as_str().unwrap_or("").to_owned()).collect()
    }
}

fn assert_no_loss(results: &[Summary], what: &str) {
    for (k, s) in results.iter().enumerate() {
        assert!(s.ok > 5, "{what}: client {k} ran: {s:?}");
        assert_eq!(s.failed, 0, "{what}: client {k} lost requests: {s:?}");
    }
}

#[test]
fn every_strategy_reaches_the_target_and_all_but_straight_lose_nothing() {
    let rig = Rig::new("strat", 2);
    let strategies: [(&str, &[&str]); 6] = [
        ("canary", &[]),
        ("blue-green", &[]),
        ("mixed", &[]),
        ("rolling", &["--max-surge", "2", "--max-unavailable", "0"]),
        ("gray", &["--first-batch", "1", "--batches", "2"]),
        ("weighted", &["--steps", "25,50,100"]),
    ];
    for (i, (name, params)) in strategies.iter().enumerate() {
        let version = format!("v{}", i + 2);
        let stop = rig.dir.join("stop");
        let loops = rig.load(&stop);
        std::thread::sleep(Duration::from_millis(200));
        let mut args = vec!["--strategy", name];
        args.extend_from_slice(params);
        if *name == "gray" {
            // Gray waits for approval after its first batch.
            rig.push_async(&version, &args);
            let r = rig.wait_state(&["waiting"]);
            assert!(r["waiting_for"].as_str().unwrap_or("").contains("promote"), "{r}");
            let out = rig.coord.cli(&["promote"]);
            assert!(out.status.success(), "promote: {}", String::from_utf8_lossy(&out.stderr));
            rig.wait_state(&["done"]);
        } else {
            let out = rig.push(&version, &[], &args);
            assert!(
                out.status.success(),
                "{name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_no_loss(&finish(loops, &stop), name);
        assert_eq!(rig.versions(), vec![version.clone(); 6], "{name}");
    }
    // Straight stops every old instance before starting new ones: it reaches the
    // target, with the downtime its plan warns of.
    let out = rig.push("v9", &[], &["--strategy", "straight"]);
    assert!(out.status.success(), "straight: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rig.versions(), vec!["v9".to_owned(); 6]);
}

#[test]
fn an_instance_that_never_becomes_healthy_fails_the_rollout_and_traffic_stays() {
    let rig = Rig::new("sick", 3);
    let stop = rig.dir.join("stop");
    let loops = rig.load(&stop);
    let out =
        rig.push("v2", &["--unhealthy"], &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("never became healthy") && err.contains("instance 127.163."), "names the instance: {err}");
    assert!(err.contains("503") || err.contains("health"), "carries the last health output: {err}");
    assert_eq!(rig.rollout()["state"], "failed");
    assert_no_loss(&finish(loops, &stop), "failed rollout");
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "traffic stays on the healthy v1 instances");
}

#[test]
fn a_rollout_can_be_paused_resumed_retargeted_and_aborted() {
    let rig = Rig::new("ctl", 4);
    let stop = rig.dir.join("stop");
    let loops = rig.load(&stop);
    // Pause at once, check nothing moves, resume.
    rig.push_async("v2", &["--strategy", "canary"]);
    let out = rig.coord.cli(&["pause"]);
    assert!(out.status.success(), "pause: {}", String::from_utf8_lossy(&out.stderr));
    rig.wait_state(&["paused"]);
    // The step in flight when the pause came finishes; no new one starts.
    std::thread::sleep(Duration::from_millis(1500));
    let held = rig.rollout()["step"].clone();
    let versions = rig.versions();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(rig.rollout()["step"], held, "no step while paused");
    assert_eq!(rig.versions(), versions, "nothing moves while paused");
    assert!(rig.coord.cli(&["resume"]).status.success());
    // Retarget mid-way: back to v1.
    std::thread::sleep(Duration::from_millis(300));
    rig.push_async("v1", &["--strategy", "canary"]);
    rig.wait_state(&["done"]);
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "pushing v1 again returns to v1");
    // Abort a v3 rollout half-way (held by a pause): back to the last completed
    // architecture (v1), the safe way.
    rig.push_async("v3", &["--strategy", "canary"]);
    assert!(rig.coord.cli(&["pause"]).status.success());
    rig.wait_state(&["paused"]);
    std::thread::sleep(Duration::from_millis(1000));
    let out = rig.coord.cli(&["abort"]);
    assert!(out.status.success(), "abort: {}", String::from_utf8_lossy(&out.stderr));
    rig.wait_state(&["rolled-back"]);
    let out = rig.coord.cli(&["abort"]);
    assert_eq!(out.status.code(), Some(1), "nothing left to abort: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "abort returns to v1");
    assert_no_loss(&finish(loops, &stop), "pause/retarget/abort");
}

#[test]
fn killing_the_coordinator_mid_rollout_loses_nothing_and_it_completes() {
    let seed: u64 = std::env::var("HITLESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("HITLESS_SEED={seed}");
    let mut rig = Rig::new("chaos", 5);
    let mut rng = seed;
    for round in 0..3 {
        let version = format!("v{}", round + 2);
        let stop = rig.dir.join("stop");
        let loops = rig.load(&stop);
        rig.push_async(&version, &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0"]);
        // xorshift: a reproducible kill moment in the first 1.5 s of the rollout.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let after = Duration::from_millis(100 + rng % 1400);
        std::thread::sleep(after);
        println!("round {round}: SIGKILL the coordinator {after:?} into the rollout");
        rig.coord.kill();
        std::thread::sleep(Duration::from_millis(200));
        rig.coord.restart();
        rig.wait_state(&["done"]);
        std::thread::sleep(Duration::from_millis(200));
        assert_no_loss(&finish(loops, &stop), &format!("kill round {round} (seed {seed})"));
        let v = rig.versions();
        assert_eq!(v, vec![version.clone(); 6], "round {round} (seed {seed}): no instance orphaned or doubled");
        let running: usize = rig.coord.json(&["status", "-o", "json"])["rollout"]["services"][0]["new_serving"]
            .as_u64()
            .unwrap_or(0) as usize;
        assert_eq!(running, 6, "round {round} (seed {seed}): agents run exactly the target");
    }
}

/// Pids of the instances listening in `pool_prefix` (e.g. "127.166.0."), by address.
fn pids(pool_prefix: &str) -> std::collections::BTreeMap<String, String> {
    let out = std::process::Command::new("pgrep")
        .args(["-a", "-f", &format!("listen {pool_prefix}")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pid = it.next()?.to_owned();
            let addr = l.split("--listen ").nth(1)?.split_whitespace().next()?.to_owned();
            Some((addr, pid))
        })
        .collect()
}

#[test]
fn an_agent_killed_mid_rollout_adopts_its_instances_instead_of_restarting_them() {
    let mut rig = Rig::new("adopt", 6);
    let stop = rig.dir.join("stop");
    let loops = rig.load(&stop);
    rig.push_async("v2", &["--strategy", "canary"]);
    assert!(rig.coord.cli(&["pause"]).status.success());
    rig.wait_state(&["paused"]);
    std::thread::sleep(Duration::from_millis(1000));
    let before = pids("127.166.0.");
    assert!(!before.is_empty(), "node 0 runs instances");
    rig.nodes[0].kill_agent();
    std::thread::sleep(Duration::from_millis(300));
    rig.nodes[0].spawn_agent();
    rig.coord.wait_synced(3);
    assert_eq!(pids("127.166.0."), before, "the restarted agent adopted its instances: same addresses, same pids");
    assert!(rig.coord.cli(&["resume"]).status.success());
    rig.wait_state(&["done"]);
    std::thread::sleep(Duration::from_millis(200));
    assert_no_loss(&finish(loops, &stop), "agent restart mid-rollout");
    assert_eq!(rig.versions(), vec!["v2".to_owned(); 6]);
    assert_eq!(pids("127.166.0.").len(), 2, "node 0 runs exactly its 2 instances: none orphaned or doubled");
}

#[test]
fn a_draining_instance_stops_when_its_connections_close_or_at_its_deadline() {
    let rig = Rig::new("conns", 7);
    let v1 = instances(&rig.coord);
    let early = v1[0]["address"].as_str().expect("address").to_owned();
    let late = v1[1]["address"].as_str().expect("address").to_owned();
    // Long-lived connections (clients that dialled the instances before the rollout).
    let released = hitless_tests::Held::open_http(&rig.nodes[1].cgroup, &early, 3);
    let _kept = hitless_tests::Held::open_http(&rig.nodes[1].cgroup, &late, 2);
    rig.push_async("v2", &["--strategy", "rolling", "--max-surge", "6", "--max-unavailable", "0"]);
    std::thread::sleep(Duration::from_millis(1500));
    let h = released.release();
    assert_eq!(h.still_working, 3, "open connections keep working while their instance drains: {h:?}");
    let r = rig.wait_state(&["done"]);
    let log = r["log"].as_array().cloned().unwrap_or_default();
    let line = |addr: &str| {
        log.iter().filter_map(|l| l.as_str()).find(|l| l.contains(addr) && l.contains("stopped")).map(str::to_owned)
    };
    let e = line(&early).unwrap_or_else(|| panic!("no stop report for {early}: {r}"));
    let l = line(&late).unwrap_or_else(|| panic!("no stop report for {late}: {r}"));
    assert!(e.contains("Connections"), "{early} stopped once its connections closed: {e}");
    assert!(l.contains("Deadline"), "{late} stopped at its drain deadline: {l}");
}

#[test]
fn an_analysis_gate_rolls_back_a_version_that_resets_its_connections() {
    let rig = Rig::new("gate", 8);
    let stop = rig.dir.join("stop");
    let loops = rig.load(&stop);
    std::thread::sleep(Duration::from_millis(300));
    let out = rig.push(
        "v2",
        &["--reset-half"],
        &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0", "--gate", "1:analysis=3s,10%"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a failed gate ends the push with exit 1: {err}");
    assert!(err.contains("rolled-back") && err.contains("analysis after step 1") && err.contains("web v2"), "{err}");
    let results = finish(loops, &stop);
    let failed: u64 = results.iter().map(|s| s.failed).sum();
    let sent: u64 = results.iter().map(|s| s.ok + s.failed).sum();
    println!("requests failed before the rollback: {failed} of {sent}");
    assert!(failed > 0, "v2 really reset connections: {results:?}");
    assert!(failed * 4 < sent, "the gate's window bounds the damage: {failed} of {sent}");
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "back on v1");
    let r = rig.rollout();
    println!("status: {}", r["message"]);
    assert_eq!(r["state"], "rolled-back", "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("failed or were reset"),
        "status says which gate failed and the measured values: {r}"
    );
}
