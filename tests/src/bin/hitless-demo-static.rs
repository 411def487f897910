//! `hitless-demo-static` (run by `cargo xtask demo`): one node, three instances
//! behind a VIP, a client on the VIP and a client with a stale cache that keeps
//! dialling instance 3 directly. Instance 3 is stopped twice: once the hitless way
//! (drain in the kernel, wait for its connections to reach 0, then stop) and once
//! the conventional way (deregister, wait a fixed time, stop: the stale client never
//! hears of it). This is the static-mode slice of `hitless demo`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hitless_tests::{bin, require_root, serve, Cgroup, Node, Summary};

const VIP: &str = "127.77.100.1:8080";
const INSTANCES: [&str; 3] = ["127.120.0.1:8080", "127.120.0.2:8080", "127.120.0.3:8080"];

fn registry(third: &str) -> String {
    let mut s = format!("services:\n  - name: cart\n    vips: [\"{VIP}\"]\n    policy: steer\n    backends:\n");
    for (i, a) in INSTANCES.iter().enumerate() {
        let state = if i == 2 { third } else { "serving" };
        s += &format!("      - {{ address: \"{a}\", state: {state}, weight: 100, version: v1 }}\n");
    }
    s
}

fn start(cg: &Cgroup, addrs: &[&str], stop: &Path) -> Vec<Child> {
    let _ = std::fs::remove_file(stop);
    addrs
        .iter()
        .map(|a| {
            cg.command(bin("hitless-probe"))
                .args(["loop", a, "--max-secs", "30", "--stop-file"])
                .arg(stop)
                .stdout(Stdio::piped())
                .spawn()
                .expect("client")
        })
        .collect()
}

fn finish(clients: Vec<Child>, stop: &Path) -> Vec<Summary> {
    std::fs::write(stop, "").expect("stop file");
    clients
        .into_iter()
        .map(|c| serde_json::from_slice(&c.wait_with_output().expect("client").stdout).unwrap_or_default())
        .collect()
}

fn row(way: &str, client: &str, s: &Summary) {
    println!("| {way:<12} | {client:<38} | {:>8} | {:>6} |", s.ok + s.failed, s.failed);
}

fn main() {
    require_root();
    println!("service cart: VIP {VIP}, instances {}", INSTANCES.join(", "));
    println!("clients: one through the VIP; one with a stale cache dialling {} directly\n", INSTANCES[2]);

    let mut node = Node::new("demo");
    let _first_two = serve(Some(&node.cgroup), &INSTANCES[..2], &[]);
    let mut third = serve(Some(&node.cgroup), &INSTANCES[2..], &[]);
    node.write_registry(&registry("serving"));
    node.start_agent();

    // The hitless way: drain in the kernel, wait for the connections, then stop.
    let stop = node.dir.join("stop");
    let clients = start(&node.cgroup, &[VIP, INSTANCES[2]], &stop);
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    node.apply(&registry("draining"));
    let drained = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.active(INSTANCES[2]) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let idle = t.elapsed();
    third.kill();
    println!("hitless: drain in effect in {drained:.1?}, instance 3 idle after {idle:.1?}, then stopped");
    std::thread::sleep(Duration::from_secs(2));
    let hitless = finish(clients, &stop);

    // The conventional way: deregister (the stale cache does not notice), wait, stop.
    let plain = Cgroup::new("demo-plain");
    let mut third = serve(None, &INSTANCES[2..], &[]);
    let clients = start(&plain, &[INSTANCES[0], INSTANCES[2]], &stop);
    std::thread::sleep(Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500)); // the fixed "sleep and hope"
    third.kill();
    println!("conventional: deregistered, waited 500ms, stopped\n");
    std::thread::sleep(Duration::from_secs(2));
    let conventional = finish(clients, &stop);

    println!("| {:<12} | {:<38} | {:>8} | {:>6} |", "way", "client", "requests", "failed");
    println!("|{}|{}|{}|{}|", "-".repeat(14), "-".repeat(40), "-".repeat(10), "-".repeat(8));
    row("hitless", "through the VIP", &hitless[0]);
    row("hitless", &format!("stale cache, dials {}", INSTANCES[2]), &hitless[1]);
    row("conventional", &format!("fresh cache, dials {}", INSTANCES[0]), &conventional[0]);
    row("conventional", &format!("stale cache, dials {}", INSTANCES[2]), &conventional[1]);
}
