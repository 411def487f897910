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
    let svc = bin("hitless-testsvc");
    let placement: Vec<String> = nodes.iter().map(|n| format!("{}: {per_node}", n.name)).collect();
    format!(
        "services:\n  - name: web\n    version: {version}\n    port: 8080\n    vips: [\"{VIP}\"]\n    run: {{ command: [\"{}\", \"--listen\", \"{{address}}:{{port}}\", \"--version\", \"{version}\"] }}\n    health: {{ http: /healthz }}\n    prestop: {{ http: /drain }}\n    drain_deadline: 5s\n    placement: {{ {} }}\n",
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
