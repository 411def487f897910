//! An instance that crashes while serving (SIGKILL from outside: the OOM killer, an
//! operator) is marked down on every node at once, as soon as its agent notices: the
//! kernel then steers every node's connects to its siblings, VIP and stale caches alike,
//! instead of refusing them until each node's outlier detection caught up. Run as root.

use std::time::{Duration, Instant};

use hitless_tests::rig::{finish, http_loop, instances, pids, Rig};

#[test]
fn an_instance_killed_while_serving_is_marked_down_on_every_node() {
    let rig = Rig::new("crash", 3);
    let before = instances(&rig.coord);
    assert_eq!(before.len(), 6, "{before:?}");
    let victim = before[0]["address"].as_str().expect("address").to_owned();
    let pid: libc::pid_t = pids("127.163.").get(&victim).expect("its process").parse().expect("pid");
    // SAFETY: kill(2) on the pid of an instance this test's rig started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    // The registry marks it down (a tombstone: kept, so stale clients are steered).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = rig.coord.json(&["registry", "list", "-o", "json"]);
        let state = list["services"][0]["instances"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["address"] == victim.as_str()).map(|i| i["state"].clone()));
        if state.as_ref().is_some_and(|s| s == "down") {
            break;
        }
        assert!(Instant::now() < deadline, "{victim} never marked down: {state:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every node's kernel holds it: no request fails, through the VIP or from a stale
    // cache dialling the dead address, and none reaches it.
    rig.coord.wait_synced(3);
    let stop = rig.dir.join("stop-crash");
    let _ = std::fs::remove_file(&stop);
    let mut loops = Vec::new();
    for node in &rig.nodes {
        loops.push(http_loop(node, &rig.vip, &stop));
        loops.push(http_loop(node, &victim, &stop));
    }
    std::thread::sleep(Duration::from_millis(1500));
    for (k, s) in finish(loops, &stop).iter().enumerate() {
        let what = if k % 2 == 0 { "VIP" } else { "stale cache" };
        assert!(s.ok > 5 && s.failed == 0, "node {}, {what}: {s:?}", k / 2);
        assert!(
            s.backends.keys().all(|b| !b.contains(&victim)),
            "node {}, {what}: reached the dead instance: {s:?}",
            k / 2
        );
    }
}
