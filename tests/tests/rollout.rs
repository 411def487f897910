//! Rollouts end to end: a coordinator, three simulated nodes whose agents run real
//! instances (`hitless-testsvc`) in their workload cgroups, HTTP load through the VIP on
//! every node, and clients with stale caches dialling one instance address directly.
//! Run as root.

use std::path::PathBuf;
use std::time::Duration;

use hitless_tests::rig::{architecture, assert_no_loss, finish, http_loop, instances, nodes, pids, push, Rig, VIP};
use hitless_tests::Coordinator;

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
    // The last probe's answer, as the driver saw it: the instance's /healthz said 503.
    assert!(
        err.contains("GET /healthz") && err.contains("answered 503"),
        "carries the last health check's answer: {err}"
    );
    assert_eq!(rig.rollout()["state"], "failed");
    assert_no_loss(&finish(loops, &stop), "failed rollout");
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "traffic stays on the healthy v1 instances");
}

/// The serving versions once both v1 and `new` serve (polled up to 30 s): proof that a
/// rollout to `new` is half-way, not yet begun or already done.
fn mixed_versions(rig: &Rig, new: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = rig.versions();
        if v.iter().any(|x| x == new) && v.iter().any(|x| x == "v1") {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "never half-way to {new}: {v:?}, {}", rig.rollout());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The rollout's step once nothing is starting or stopping any more, in two looks
/// 300 ms apart with the same step (between a step's stop and its start nothing is
/// busy for a moment), up to 30 s.
fn step_settled(rig: &Rig) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let idle = |r: &serde_json::Value| {
        !r["services"].as_array().is_some_and(|s| s.iter().any(|s| s["starting"] != 0 || s["draining"] != 0))
    };
    let mut last: Option<serde_json::Value> = None;
    loop {
        let r = rig.rollout();
        if idle(&r) {
            if last.as_ref() == Some(&r["step"]) {
                return r["step"].clone();
            }
            last = Some(r["step"].clone());
        } else {
            last = None;
        }
        assert!(std::time::Instant::now() < deadline, "the step in flight never finished: {r}");
        std::thread::sleep(Duration::from_millis(300));
    }
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
    // The step in flight when the pause came finishes (a stop may wait a second for
    // handshakes in flight); no new one starts.
    let held = step_settled(&rig);
    let versions = rig.versions();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(rig.rollout()["step"], held, "no step while paused");
    assert_eq!(rig.versions(), versions, "nothing moves while paused");
    assert!(rig.coord.cli(&["resume"]).status.success());
    // Retarget mid-way, once v1 and v2 both serve: back to v1.
    let mixed = mixed_versions(&rig, "v2");
    rig.push_async("v1", &["--strategy", "canary"]);
    rig.wait_state(&["done"]);
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "pushing v1 again (from {mixed:?}) returns to v1");
    // Abort a v3 rollout half-way (held by a pause once v1 and v3 both serve): back to
    // the last completed architecture (v1), the safe way.
    rig.push_async("v3", &["--strategy", "canary"]);
    mixed_versions(&rig, "v3");
    assert!(rig.coord.cli(&["pause"]).status.success());
    rig.wait_state(&["paused"]);
    step_settled(&rig);
    let held = rig.versions();
    assert!(held.iter().any(|v| v == "v3") && held.iter().any(|v| v == "v1"), "paused half-way: {held:?}");
    let out = rig.coord.cli(&["abort"]);
    assert!(out.status.success(), "abort: {}", String::from_utf8_lossy(&out.stderr));
    rig.wait_state(&["rolled-back"]);
    let out = rig.coord.cli(&["abort"]);
    assert_eq!(out.status.code(), Some(1), "nothing left to abort: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "abort returns to v1");
    assert_no_loss(&finish(loops, &stop), "pause/retarget/abort");
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

/// Pushes, under load, a v2 that resets half of its connections with `gate` after step
/// 1, and checks the gate rolled it back: push exits 1, v1 serves again, and status
/// names the gate with the measured values. Returns push's stderr and (failed, sent).
fn faulty_v2_is_rolled_back(rig: &Rig, gate: &str) -> (String, u64, u64) {
    let stop = rig.dir.join("stop");
    let loops = rig.load(&stop);
    std::thread::sleep(Duration::from_millis(300));
    let out = rig.push(
        "v2",
        &["--reset-half"],
        &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0", "--gate", gate],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "a failed gate ends the push with exit 1: {err}");
    assert!(err.contains("rolled-back") && err.contains("analysis after step 1") && err.contains("web v2"), "{err}");
    let results = finish(loops, &stop);
    let failed: u64 = results.iter().map(|s| s.failed).sum();
    let sent: u64 = results.iter().map(|s| s.ok + s.failed).sum();
    println!("requests failed before the rollback: {failed} of {sent}");
    assert!(failed > 0, "v2 really reset connections: {results:?}");
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6], "back on v1");
    let r = rig.rollout();
    println!("status: {}", r["message"]);
    assert_eq!(r["state"], "rolled-back", "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("failed or were reset"),
        "status says which gate failed and the measured values: {r}"
    );
    (err, failed, sent)
}

#[test]
fn an_analysis_gate_rolls_back_a_version_that_resets_its_connections() {
    let rig = Rig::new("gate", 8);
    let (_, failed, sent) = faulty_v2_is_rolled_back(&rig, "1:analysis=3s,10%");
    assert!(failed * 4 < sent, "the gate's window bounds the damage: {failed} of {sent}");
}

/// A real Prometheus server scraping `targets` every second; killed and removed on drop.
struct Prometheus {
    _proc: hitless_tests::Proc,
    dir: PathBuf,
}

impl Prometheus {
    fn start(listen: &str, targets: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!("hitless-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let quoted: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: hitless\n    static_configs: [{{ targets: [{}] }}]\n",
            quoted.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("prometheus log"))
            .spawn()
            .expect("the prometheus server is missing: apt-get install prometheus (CI installs it)");
        let prom = Self { _proc: hitless_tests::Proc::new(child), dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ready(listen) {
            assert!(std::time::Instant::now() < deadline, "prometheus never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        prom
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` over HTTP/1.0: the whole answer, or "" when nothing answered.
fn get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

fn ready(addr: &str) -> bool {
    let answer = get(addr, "/-/ready");
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

/// Waits until Prometheus has scraped every target at least twice.
fn wait_scraped(addr: &str, targets: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let want = format!("\"{}\"", targets);
    loop {
        // count_over_time(up[5s]) >= 2 for every target: two samples make an increase().
        let answer = get(addr, "/api/v1/query?query=count(count_over_time(up%5B5s%5D)%20%3E%3D%202)");
        if answer.contains(&want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "prometheus never scraped the agents: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_analysis_gate_can_ask_prometheus_and_rolls_back_on_its_answer() {
    let metrics = |i: usize| format!("127.130.19.{}:9477", 10 + i);
    let prom = "127.130.19.9:9090";
    let _server = Prometheus::start(prom, &(0..3).map(metrics).collect::<Vec<_>>());
    let rig =
        Rig::new_with("prom", 9, &["--prometheus-url", &format!("http://{prom}"), "--prometheus-lag", "2500ms"], |i| {
            vec!["--metrics-addr".to_owned(), metrics(i)]
        });
    wait_scraped(prom, 3);
    let (err, _, _) = faulty_v2_is_rolled_back(&rig, "1:analysis=4s,10%");
    assert!(err.contains(&format!("(prometheus http://{prom})")), "the gate asked Prometheus: {err}");
}
