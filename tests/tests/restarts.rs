//! Agent restarts that land on an instance operation: a rollout re-observes what runs
//! and carries on, whatever the agent managed to do and report before it died. Run as
//! root.
//!
//! Addresses: coordinator 127.130.47.1, VIP 127.77.77.1, instances 127.177.i.0/24 (no
//! other suite uses them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hitless_tests::rig::{instances, nodes_in, Rig};
use hitless_tests::Coordinator;

const POOL: &str = "127.177.";

/// A coordinator and three nodes running web v1 (2 instances each), instances slow to
/// boot (`boot_ms`) so that a kill lands while a new one starts.
fn rig(name: &str, boot_ms: u32) -> Rig {
    let coord = Coordinator::start(name, "127.130.47.1:7070");
    let nodes = nodes_in(&coord, name, POOL, |_| Vec::new());
    Rig::deploy(coord, nodes, "127.77.77.1:8080", vec!["--boot-ms".to_owned(), boot_ms.to_string()])
}

/// The instance cgroups (`inst-<id>`) in a node's workload cgroup.
fn instance_cgroups(workload: &Path) -> Vec<String> {
    std::fs::read_dir(workload)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("inst-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to 20 s) for a node's driver to create a new instance cgroup (the first
/// thing a start does, before the process runs); returns the node's index.
fn wait_for_a_start(rig: &Rig) -> usize {
    let workloads: Vec<PathBuf> = rig.nodes.iter().map(|n| n.cgroup.path().join("workload")).collect();
    let before: Vec<Vec<String>> = workloads.iter().map(|w| instance_cgroups(w)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, w) in workloads.iter().enumerate() {
            if instance_cgroups(w).iter().any(|c| !before[i].contains(c)) {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no instance was started: {}", rig.rollout());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The rollout reached v2 with exactly six serving instances, one process each.
fn assert_at_v2(rig: &Rig, what: &str) {
    let r = rig.wait_state(&["done", "failed", "rolled-back"]);
    assert_eq!(r["state"], "done", "{what}: the rollout carried on after the agent restart: {r}");
    let serving = instances(&rig.coord);
    assert_eq!(serving.len(), 6, "{what}: {serving:?}");
    assert!(serving.iter().all(|i| i["version"] == "v2"), "{what}: {serving:?}");
}

#[test]
fn an_agent_killed_as_a_start_reaches_it_does_not_fail_the_rollout() {
    let mut rig = rig("rsstart", 1000);
    rig.push_async("v2", &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0"]);
    let i = wait_for_a_start(&rig);
    rig.nodes[i].kill_agent();
    std::thread::sleep(Duration::from_millis(300));
    rig.nodes[i].spawn_agent();
    assert_at_v2(&rig, "agent killed as the start reached it");
}
