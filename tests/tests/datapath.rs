//! The datapath in the real kernel: programs attached to throwaway cgroups, real
//! sockets, real agents in static mode. Run as root.

use std::process::Stdio;
use std::time::{Duration, Instant};

use hitless_tests::{connects, datagrams, serve, Held, Node};

/// A service `name` with `vips` and backends `(address, state, weight)`.
fn service(name: &str, vips: &[&str], policy: &str, backends: &[(&str, &str, u32)]) -> String {
    let vips = vips.iter().map(|v| format!("\"{v}\"")).collect::<Vec<_>>().join(", ");
    let mut s = format!("  - name: {name}\n    vips: [{vips}]\n    policy: {policy}\n    backends:\n");
    for (a, st, w) in backends {
        s += &format!("      - {{ address: \"{a}\", state: {st}, weight: {w}, version: v1 }}\n");
    }
    s
}

fn registry(services: &[String]) -> String {
    format!("services:\n{}", services.concat())
}

fn share(n: u64, total: u64) -> f64 {
    100.0 * n as f64 / total as f64
}

#[test]
fn vip_connects_split_by_weight_inside_the_cgroup_only() {
    let mut node = Node::new("weights");
    let b = ["127.101.0.1:8080", "127.101.0.2:8080", "127.101.0.3:8080"];
    let _srv = serve(Some(&node.cgroup), &b, &[]);
    node.write_registry(&registry(&[service(
        "cart",
        &["127.77.1.1:8080"],
        "steer",
        &[(b[0], "serving", 1), (b[1], "serving", 1), (b[2], "serving", 2)],
    )]));
    node.start_agent();

    let s = connects(Some(&node.cgroup), "127.77.1.1:8080", 2000);
    assert_eq!((s.ok, s.failed), (2000, 0), "{s:?}");
    for (addr, want) in [(b[0], 25.0), (b[1], 25.0), (b[2], 50.0)] {
        let got = share(s.from(addr), 2000);
        assert!((got - want).abs() <= 5.0, "{addr}: {got:.1}% of connects, want {want}% ± 5: {s:?}");
    }
    // getpeername() shows the VIP the application dialled, not the backend.
    assert_eq!(s.peers.get("127.77.1.1:8080"), Some(&2000), "{s:?}");

    // Outside the node's cgroup nothing is steered: nobody listens on the VIP.
    let outside = connects(None, "127.77.1.1:8080", 50);
    assert_eq!(outside.ok, 0, "{outside:?}");
    assert_eq!(outside.errors.get("ConnectionRefused"), Some(&50), "{outside:?}");
}

#[test]
fn a_drained_backend_gets_no_new_connects_and_keeps_its_open_ones() {
    let mut node = Node::new("drain");
    let b = ["127.102.0.1:8080", "127.102.0.2:8080", "127.102.0.3:8080"];
    let _srv = serve(Some(&node.cgroup), &b, &[]);
    let with = |third: &str| {
        registry(&[service(
            "cart",
            &["127.77.2.1:8080"],
            "steer",
            &[(b[0], "serving", 100), (b[1], "serving", 100), (b[2], third, 100)],
        )])
    };
    node.write_registry(&with("serving"));
    node.start_agent();
    // Connections opened to the third backend before the drain.
    let held = Held::open(&node.cgroup, b[2], 4);

    node.apply(&with("draining"));
    let s = connects(Some(&node.cgroup), "127.77.2.1:8080", 1000);
    assert_eq!((s.ok, s.failed), (1000, 0), "{s:?}");
    assert_eq!(s.from(b[2]), 0, "a draining backend got new connects: {s:?}");

    let h = held.release();
    assert_eq!((h.opened, h.still_working), (4, 4), "open connections must keep working while draining: {h:?}");

    node.apply(&with("serving"));
    let s = connects(Some(&node.cgroup), "127.77.2.1:8080", 300);
    assert!(s.from(b[2]) > 0, "undrained backend is back in rotation: {s:?}");
}

#[test]
fn a_stale_client_dialling_a_draining_instance_is_steered_or_refused_by_policy() {
    let mut node = Node::new("stale");
    let b = ["127.103.0.1:8080", "127.103.0.2:8080"];
    let _srv = serve(Some(&node.cgroup), &b, &[]);
    let with = |policy: &str| {
        registry(&[service("cart", &["127.77.3.1:8080"], policy, &[(b[0], "serving", 100), (b[1], "draining", 100)])])
    };
    node.write_registry(&with("steer"));
    node.start_agent();

    let s = connects(Some(&node.cgroup), b[1], 200);
    assert_eq!((s.ok, s.from(b[0])), (200, 200), "steer: served by the serving sibling: {s:?}");
    assert_eq!(s.peers.get(b[1]), Some(&200), "the socket still reports the address it dialled: {s:?}");

    node.apply(&with("reject"));
    let s = connects(Some(&node.cgroup), b[1], 200);
    assert_eq!(s.ok, 0, "{s:?}");
    assert_eq!(s.errors.get("ConnectionRefused"), Some(&200), "reject: ECONNREFUSED: {s:?}");
    assert!(s.max_fail_ms < 500, "refused at once, not after a timeout: {s:?}");

    node.apply(&with("allow"));
    let s = connects(Some(&node.cgroup), b[1], 50);
    assert_eq!(s.from(b[1]), 50, "allow: left alone: {s:?}");

    // A VIP with no serving backend fails at once.
    node.apply(&registry(&[service("cart", &["127.77.3.1:8080"], "steer", &[(b[0], "down", 100)])]));
    let s = connects(Some(&node.cgroup), "127.77.3.1:8080", 20);
    assert_eq!(s.errors.get("ConnectionRefused"), Some(&20), "{s:?}");
    assert!(s.max_fail_ms < 500, "{s:?}");
}

#[test]
fn ipv6_and_udp_behave_like_ipv4_tcp() {
    let mut node = Node::new("v6udp");
    let tcp6 = ["[::1]:28081", "[::1]:28082"];
    let udp4 = ["127.104.0.1:5353", "127.104.0.2:5353"];
    let udp6 = ["[::1]:25353"];
    let tcp4 = ["127.104.0.3:8080"];
    let _srv = serve(Some(&node.cgroup), &[tcp6[0], tcp6[1], tcp4[0]], &[udp4[0], udp4[1], udp6[0]]);
    let udp = |name: &str, vip: &str, b: &[&str], state: &str| {
        let mut s = service(name, &[vip], "steer", &b.iter().map(|a| (*a, state, 100)).collect::<Vec<_>>());
        s = s.replace("    policy: steer\n", "    policy: steer\n    protocol: udp\n");
        s
    };
    node.write_registry(&registry(&[
        service("web6", &["[::1]:18081"], "steer", &[(tcp6[0], "serving", 100), (tcp6[1], "draining", 100)]),
        // An IPv6 VIP in front of an IPv4 backend: the socket connects IPv4-mapped.
        service("mixed", &["[::1]:18082"], "steer", &[(tcp4[0], "serving", 100)]),
        udp("dns", "127.77.4.1:53", &udp4, "serving"),
        udp("dns6", "[::1]:15353", &udp6, "serving"),
    ]));
    node.start_agent();

    let s = connects(Some(&node.cgroup), "[::1]:18081", 300);
    assert_eq!((s.ok, s.from(tcp6[0])), (300, 300), "{s:?}");
    assert_eq!(s.peers.get("[::1]:18081"), Some(&300), "getpeername6 shows the VIP: {s:?}");
    let s = connects(Some(&node.cgroup), tcp6[1], 100);
    assert_eq!(s.from(tcp6[0]), 100, "stale IPv6 client steered off the draining backend: {s:?}");
    let s = connects(Some(&node.cgroup), "[::1]:18082", 100);
    assert_eq!(s.from(tcp4[0]), 100, "{s:?}");

    let s = datagrams(Some(&node.cgroup), "127.77.4.1:53", 400);
    assert_eq!((s.ok, s.failed), (400, 0), "{s:?}");
    assert!(s.from(udp4[0]) > 100 && s.from(udp4[1]) > 100, "UDP split over both backends: {s:?}");
    assert_eq!(s.peers.get("127.77.4.1:53"), Some(&400), "recvmsg4 shows the VIP as the source: {s:?}");
    let s = datagrams(Some(&node.cgroup), "[::1]:15353", 100);
    assert_eq!((s.ok, s.from(udp6[0])), (100, 100), "{s:?}");
    assert_eq!(s.peers.get("[::1]:15353"), Some(&100), "recvmsg6 shows the VIP: {s:?}");

    // Draining a UDP backend in its own service moves new datagrams off it too: through
    // the VIP, and from a stale client sending to the drained address itself.
    let dns = service("dns", &["127.77.4.1:53"], "steer", &[(udp4[0], "serving", 100), (udp4[1], "draining", 100)])
        .replace("    policy: steer\n", "    policy: steer\n    protocol: udp\n");
    node.apply(&registry(&[dns]));
    let s = datagrams(Some(&node.cgroup), "127.77.4.1:53", 100);
    assert_eq!((s.ok, s.from(udp4[0])), (100, 100), "{s:?}");
    let s = datagrams(Some(&node.cgroup), udp4[1], 100);
    assert_eq!((s.ok, s.from(udp4[0])), (100, 100), "a stale UDP client is steered off the draining backend: {s:?}");
}

#[test]
fn sockops_counts_the_connections_held_open_to_a_backend() {
    let mut node = Node::new("sockops");
    let b = "127.105.0.1:8080";
    let _srv = serve(Some(&node.cgroup), &[b], &[]);
    node.write_registry(&registry(&[service("cart", &["127.77.5.1:8080"], "steer", &[(b, "serving", 100)])]));
    node.start_agent();
    assert_eq!(node.active(b), 0);

    let held = Held::open(&node.cgroup, "127.77.5.1:8080", 5);
    wait_for(|| node.active(b) == 5, "5 active connections", || node.active(b));
    let h = held.release();
    assert_eq!(h.still_working, 5, "{h:?}");
    wait_for(|| node.active(b) == 0, "0 active connections after close", || node.active(b));
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str, now: impl Fn() -> i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "never saw {what}; the kernel counts {}", now());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_and_restarting_the_agent_never_drops_a_connect() {
    let mut node = Node::new("restart");
    let b = ["127.106.0.1:8080", "127.106.0.2:8080"];
    let _srv = serve(Some(&node.cgroup), &b, &[]);
    node.write_registry(&registry(&[service(
        "cart",
        &["127.77.6.1:8080"],
        "steer",
        &[(b[0], "serving", 100), (b[1], "draining", 100)],
    )]));
    node.start_agent();

    let stop = node.dir.join("stop");
    let client = node
        .cgroup
        .command(hitless_tests::bin("hitless-probe"))
        .args(["loop", "127.77.6.1:8080", "--max-secs", "120", "--stop-file"])
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("client loop");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(30));
        node.kill_agent();
        node.start_agent();
    }
    // With the agent gone for good, the pinned datapath keeps steering.
    node.kill_agent();
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&stop, "").expect("stop file");
    let out = client.wait_with_output().expect("client summary");
    let s: hitless_tests::Summary = serde_json::from_slice(&out.stdout).expect("summary json");
    assert!(s.ok > 100, "the loop ran: {s:?}");
    assert_eq!(s.failed, 0, "connects failed across 20 agent restarts: {s:?}");
    assert_eq!(s.from(b[1]), 0, "the draining backend got connects: {s:?}");

    let after = connects(Some(&node.cgroup), "127.77.6.1:8080", 100);
    assert_eq!(after.from(b[0]), 100, "agent stopped, datapath still steers: {after:?}");
}

#[test]
fn two_nodes_on_one_machine_steer_independently() {
    let mut a = Node::new("node-a");
    let mut b = Node::new("node-b");
    let ba = "127.107.0.1:8080";
    let bb = "127.107.0.2:8080";
    let _srv = serve(None, &[ba, bb], &[]);
    a.write_registry(&registry(&[service("cart", &["127.77.7.1:8080"], "steer", &[(ba, "serving", 100)])]));
    b.write_registry(&registry(&[service("cart", &["127.77.7.1:8080"], "steer", &[(bb, "serving", 100)])]));
    a.start_agent();
    b.start_agent();
    assert_eq!(connects(Some(&a.cgroup), "127.77.7.1:8080", 100).from(ba), 100);
    assert_eq!(connects(Some(&b.cgroup), "127.77.7.1:8080", 100).from(bb), 100);
    // Draining on node a changes nothing on node b.
    a.apply(&registry(&[service("cart", &["127.77.7.1:8080"], "steer", &[(ba, "down", 100)])]));
    assert_eq!(connects(Some(&a.cgroup), "127.77.7.1:8080", 20).errors.get("ConnectionRefused"), Some(&20));
    assert_eq!(connects(Some(&b.cgroup), "127.77.7.1:8080", 100).from(bb), 100);
}

#[test]
fn a_bad_file_names_the_field_and_changes_nothing() {
    let mut node = Node::new("badfile");
    let b = "127.108.0.1:8080";
    let _srv = serve(Some(&node.cgroup), &[b], &[]);

    // At start: exit status 2, the field named, nothing loaded.
    node.write_registry("services:\n  - name: cart\n    backends: [{ address: \"127.108.0.1:8080\", wieght: 3 }]\n");
    let out = node.agent_command().stderr(Stdio::piped()).output().expect("agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("services[0].backends[0].wieght: unknown field `wieght`; did you mean `weight`?"), "{err}");
    assert!(!node.pin_dir.exists(), "a bad file must not load anything");

    let good = registry(&[service("cart", &["127.77.8.1:8080"], "steer", &[(b, "serving", 100)])]);
    node.write_registry(&good);
    let rev = node.start_agent();

    // While running: each bad file is logged with its field, the last good state stays.
    for (bad, field) in [
        ("services:\n  - name: cart\n    policy: stear\n", "services[0].policy"),
        ("services:\n  - name: cart\n    vips: [\"127.77.8.1:8080\"]\n    backends: [{ address: \"127.108.0.1:8080\", weight: lots }]\n", "services[0].backends[0].weight"),
        (
            "services:\n  - name: cart\n    backends: [{ address: \"127.108.0.1:8080\" }, { address: \"127.108.0.1:8080\" }]\n",
            "services[0].backends[1].address",
        ),
    ] {
        node.write_registry(bad);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !node.log().contains(field) {
            assert!(Instant::now() < deadline, "no error naming {field} in:\n{}", node.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(node.revision(), rev, "a bad file must not be applied");
        assert_eq!(connects(Some(&node.cgroup), "127.77.8.1:8080", 20).from(b), 20);
    }
}

#[test]
fn more_than_the_maps_hold_is_refused_whole() {
    let mut node = Node::new("overflow");
    node.agent_args(&["--max-services", "2", "--max-backends", "4"]);
    let svc = |i: u32| {
        service(
            &format!("s{i}"),
            &[&format!("127.77.9.{i}:8080")],
            "steer",
            &[(&format!("127.109.0.{i}:8080"), "serving", 100)],
        )
    };
    node.write_registry(&registry(&[svc(1), svc(2)]));
    let rev = node.start_agent();

    node.write_registry(&registry(&[svc(1), svc(2), svc(3)]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.log().contains("--max-services") {
        assert!(Instant::now() < deadline, "no capacity error in:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(node.log().contains("nothing was changed"), "{}", node.log());
    assert_eq!(node.revision(), rev);
    // The two services in force still steer, and nothing of the third was written.
    let _srv = serve(Some(&node.cgroup), &["127.109.0.1:8080", "127.109.0.3:8080"], &[]);
    assert_eq!(connects(Some(&node.cgroup), "127.77.9.1:8080", 10).from("127.109.0.1:8080"), 10);
    assert_eq!(connects(Some(&node.cgroup), "127.77.9.3:8080", 10).ok, 0);
}

#[test]
fn a_workload_cgroup_outside_the_attached_one_is_refused_at_start() {
    let mut node = Node::new("wlout");
    // A sibling of the node's cgroup: the counting program attached to the node's
    // cgroup would never see the instances' connections.
    let outside = node.cgroup.path().with_file_name(format!("{}-workload", node.name));
    node.follow("http://127.0.0.1:1");
    node.agent_args(&["--workload-cgroup", outside.to_str().expect("utf-8"), "--instance-addresses", "127.109.0.0/24"]);
    let (status, err) = refused(node.agent_command(), "a workload cgroup it cannot see");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--workload-cgroup") && err.contains("is not inside --cgroup"), "{err}");
    assert!(!node.pin_dir.exists(), "a refused start must not load anything");
    assert!(!outside.exists(), "a refused start must not create the workload cgroup");
}

#[test]
fn restarting_the_agent_with_another_cgroup_is_refused_and_changes_nothing() {
    let mut node = Node::new("movecg");
    let b = "127.110.0.1:8080";
    let _srv = serve(Some(&node.cgroup), &[b], &[]);
    node.write_registry(&registry(&[service("cart", &["127.77.9.1:8080"], "steer", &[(b, "serving", 100)])]));
    node.start_agent();
    node.kill_agent();
    // The same node, restarted with another --cgroup: its pinned links stay attached
    // to the first one, so a restart that swapped programs behind them would keep
    // steering there and never where it is asked to.
    let other = hitless_tests::Cgroup::new("movecg-other");
    let mut cmd = std::process::Command::new(hitless_tests::bin("hitless-agent"));
    cmd.args(["--node", &node.name, "--registry-file"])
        .arg(node.registry())
        .arg("--cgroup")
        .arg(other.path())
        .arg("--pin-dir")
        .arg(&node.pin_dir)
        .stdin(Stdio::null());
    let (status, err) = refused(cmd, "another cgroup than its pinned links'");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("is attached to cgroup") && err.contains("hitless-agent detach"), "names the fix: {err}");
    assert!(err.contains(node.cgroup.path().to_str().expect("utf-8")), "names where it is attached: {err}");
    // Nothing changed: the first cgroup is still steered, the other is not.
    assert_eq!(connects(Some(&node.cgroup), "127.77.9.1:8080", 20).from(b), 20);
    assert_eq!(connects(Some(&other), "127.77.9.1:8080", 5).ok, 0, "no datapath in the other cgroup");
}

/// Runs an agent that must refuse to start: its exit status and stderr. One that keeps
/// running is killed after 10 s and fails the test (it accepted what it must refuse).
fn refused(mut cmd: std::process::Command, what: &str) -> (std::process::ExitStatus, String) {
    let mut agent = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("agent");
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("the agent started with {what}; it must refuse");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().expect("piped"), &mut err).expect("stderr");
    (status, err)
}
