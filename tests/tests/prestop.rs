//! A pod-style instance (one hitless does not run) stopped the kubelet's way, without a
//! cluster: it is registered through its node's agent (`hitless-agent register` over
//! the agent's local socket, the agent renewing its lease), serves load through a VIP
//! from two nodes, and is stopped with `hitless-agent prestop` then SIGTERM: no request
//! fails, and the prestop ends when its connections end, not at its deadline. In the
//! same run, a second such instance stopped with the usual `sleep 2` then SIGTERM (no
//! drain) loses requests: what the hook is for. Also: the registrations outlive an agent
//! killed and restarted; a prestop waits for another node's handshake in flight to the
//! instance; the deadline ends a prestop with exit status 1 saying what was still open;
//! `register --wait` waits for the instance to listen. Run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hitless_tests::rig::{finish, http_loop};
use hitless_tests::{bin, Coordinator, Held, Node, Proc, Summary};

const VIP: &str = "127.77.190.1:8080";
/// Declared in the registry file, always serving: where the load goes meanwhile.
const SIBLING: &str = "127.190.0.1:8080";
/// The pod stopped with its prestop hook.
const POD_HOOKED: &str = "127.190.0.2:8080";
/// The pod stopped with `sleep 2` and SIGTERM.
const POD_SLEEP: &str = "127.190.0.3:8080";

/// A `hitless-testsvc` at `address` in `node`'s cgroup, listening when this returns.
/// Its output goes to a file (a pipe closed early would fail its last line).
fn instance(node: &Node, address: &str) -> Proc {
    let out = node.dir.join(format!("testsvc-{address}.log"));
    let mut cmd = node.cgroup.command(bin("hitless-testsvc"));
    cmd.args(["--listen", address, "--version", "v1"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("instance log"));
    let mut p = Proc::new(cmd.spawn().expect("hitless-testsvc"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&out).unwrap_or_default().contains("listening on") {
        if let Ok(Some(status)) = p.child().try_wait() {
            panic!("hitless-testsvc at {address} exited with {status}");
        }
        assert!(Instant::now() < deadline, "hitless-testsvc at {address} never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

/// `hitless-agent <args> --socket SOCKET`.
fn agent_cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("hitless-agent")).args(args).arg("--socket").arg(socket).output().expect("run hitless-agent")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Waits until the agent of `node` has created its local API socket.
fn wait_socket(node: &Node, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no local API socket at {}:\n{}", socket.display(), node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the local API socket's mode");
}

/// SIGTERM, as the kubelet sends it; waits until the instance has exited.
fn sigterm(pod: &mut Proc) {
    let pid = i32::try_from(pod.child().id()).expect("pid");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = pod.child().wait().expect("wait");
    assert!(status.success(), "the instance exited with {status} after SIGTERM");
}

/// Load through `vip` from every node while `stop` runs; the clients' summaries.
fn under_load(
    nodes: &[Node],
    vip: &str,
    dir: &Path,
    name: &str,
    warm: impl FnOnce(),
    stop: impl FnOnce(),
) -> Vec<Summary> {
    let stop_file = dir.join(format!("stop-{name}"));
    let loops = nodes.iter().map(|n| http_loop(n, vip, &stop_file)).collect();
    warm();
    stop();
    // Clients keep going after the instance is gone: a stale slot would fail them now.
    std::thread::sleep(Duration::from_millis(700));
    finish(loops, &stop_file)
}

fn answers_from(results: &[Summary], address: &str) -> u64 {
    results.iter().flat_map(|s| s.backends.iter()).filter(|(b, _)| b.contains(address)).map(|(_, n)| n).sum()
}

#[test]
fn a_pod_stopped_with_prestop_loses_no_request_and_one_stopped_after_a_sleep_does() {
    let coord = Coordinator::start("prestop", "127.130.190.1:7070");
    let mut nodes: Vec<Node> = (0..2).map(|i| Node::new(&format!("prestop{i}"))).collect();
    let sockets: Vec<PathBuf> = nodes.iter().map(|n| n.dir.join("agent.sock")).collect();
    for (n, socket) in nodes.iter_mut().zip(&sockets) {
        n.agent_args(&["--local-api", socket.to_str().expect("utf-8")]);
        n.follow(&coord.url);
        n.spawn_agent();
    }
    coord.wait_synced(2);
    for (n, socket) in nodes.iter().zip(&sockets) {
        wait_socket(n, socket);
    }
    let dir = nodes[0].dir.clone();

    // The service and its VIP, with one always-serving instance on node 1.
    let file = dir.join("registry.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - name: web\n    vips: [\"{VIP}\"]\n    backends: [{{ address: \"{SIBLING}\", version: v1 }}]\n"
        ),
    )
    .expect("registry file");
    let applied = coord.cli(&["registry", "apply", file.to_str().expect("utf-8")]);
    assert!(applied.status.success(), "registry apply: {}", text(&applied));
    let _sibling = instance(&nodes[1], SIBLING);

    // A pod on node 0: started, then registered through its node's agent; the
    // register command returns and the agent renews the lease (2 s) from then on.
    let mut pod = instance(&nodes[0], POD_HOOKED);
    let reg = agent_cli(
        &sockets[0],
        &["register", "--service", "web", "--address", POD_HOOKED, "--version", "v1", "--ttl", "2s"],
    );
    assert!(reg.status.success(), "register: {}\nagent:\n{}", text(&reg), nodes[0].log());
    assert!(text(&reg).starts_with(&format!("registered web {POD_HOOKED}")), "{}", text(&reg));
    coord.wait_synced(2);

    // The kubelet's way, with the hook: prestop, then SIGTERM.
    let mut said = String::new();
    let hooked = under_load(
        &nodes,
        VIP,
        &dir,
        "hooked",
        // Longer than the lease: the agent's renewals keep it serving.
        || std::thread::sleep(Duration::from_millis(2_500)),
        || {
            let t = Instant::now();
            let out = agent_cli(&sockets[0], &["prestop", "--address", POD_HOOKED, "--deadline", "10s"]);
            said = text(&out);
            eprintln!("prestop ({:?}): {said}", t.elapsed());
            assert!(out.status.success(), "prestop: {said}\nagent:\n{}", nodes[0].log());
            sigterm(&mut pod);
        },
    );
    eprintln!("with prestop: {hooked:?}");
    assert!(answers_from(&hooked, POD_HOOKED) > 0, "the pod never served before its prestop: {hooked:?}");
    for (k, s) in hooked.iter().enumerate() {
        assert!(s.ok > 5, "client on node {k} ran: {s:?}");
        assert_eq!(s.failed, 0, "client on node {k} lost requests to a pod stopped with prestop: {s:?}");
    }
    assert!(
        said.contains("ended because its connections ended"),
        "the prestop wait must end when the connections end, not at the deadline: {said}"
    );
    assert!(said.contains("draining on every node (2 acked)"), "{said}");

    // The same stop without the hook: `sleep 2`, then SIGTERM.
    let mut pod = instance(&nodes[1], POD_SLEEP);
    let reg = agent_cli(&sockets[1], &["register", "--service", "web", "--address", POD_SLEEP, "--ttl", "2s"]);
    assert!(reg.status.success(), "register: {}\nagent:\n{}", text(&reg), nodes[1].log());
    coord.wait_synced(2);
    let slept = under_load(
        &nodes,
        VIP,
        &dir,
        "sleep",
        || std::thread::sleep(Duration::from_millis(1_000)),
        || {
            std::thread::sleep(Duration::from_secs(2));
            sigterm(&mut pod);
        },
    );
    eprintln!("with sleep 2: {slept:?}");
    assert!(answers_from(&slept, POD_SLEEP) > 0, "the second pod never served: {slept:?}");
    let lost: u64 = slept.iter().map(|s| s.failed).sum();
    assert!(lost > 0, "a pod stopped with sleep 2 and SIGTERM lost no request, so this test proves nothing: {slept:?}");
}

#[test]
fn the_local_api_serves_in_coordinator_mode_only_and_a_missing_socket_is_named() {
    let mut node = Node::new("prestop-static");
    node.write_registry("services: []\n");
    let socket = node.dir.join("agent.sock");
    node.agent_args(&["--local-api", socket.to_str().expect("utf-8")]);
    let out = node.agent_command().stderr(Stdio::piped()).output().expect("agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("coordinator mode only"), "{err}");

    let out = agent_cli(&socket, &["prestop", "--address", POD_HOOKED]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&format!("cannot reach the agent at {}", socket.display())), "{}", text(&out));
}

/// `service`'s state of the instance at `address` in the coordinator's registry.
fn state_of(coord: &Coordinator, address: &str) -> Option<String> {
    let list = coord.json(&["registry", "list", "-o", "json"]);
    let found = list["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .find(|i| i["address"].as_str() == Some(address));
    found.map(|i| i["state"].as_str().unwrap_or_default().to_owned())
}

/// A registry file with service `web` at `vip` and `backends` (addresses), applied.
fn apply_web(coord: &Coordinator, dir: &Path, vip: &str, backends: &[&str]) {
    let list: Vec<String> = backends.iter().map(|b| format!("{{ address: \"{b}\", version: v1 }}")).collect();
    let file = dir.join("registry.yaml");
    std::fs::write(
        &file,
        format!("services:\n  - name: web\n    vips: [\"{vip}\"]\n    backends: [{}]\n", list.join(", ")),
    )
    .expect("registry file");
    let applied = coord.cli(&["registry", "apply", file.to_str().expect("utf-8")]);
    assert!(applied.status.success(), "registry apply: {}", text(&applied));
}

/// Waits until `node`'s agent log says "local API listening" `times` times (a restarted
/// agent's socket replaces the stale one its killed predecessor left).
fn wait_listening(node: &Node, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.log().matches("local API listening").count() < times {
        assert!(Instant::now() < deadline, "the agent never served its local API:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn registrations_outlive_an_agent_killed_and_restarted() {
    const VIP: &str = "127.77.191.1:8080";
    const SIBLING: &str = "127.191.0.1:8080";
    const POD: &str = "127.191.0.2:8080";
    let coord = Coordinator::start("prestop-restart", "127.130.191.1:7070");
    let mut node = Node::new("prestop-restart");
    let socket = node.dir.join("agent.sock");
    let state = node.dir.join("state");
    node.agent_args(&["--local-api", socket.to_str().expect("utf-8"), "--state-dir", state.to_str().expect("utf-8")]);
    node.follow(&coord.url);
    node.spawn_agent();
    coord.wait_synced(1);
    wait_listening(&node, 1);
    let dir = node.dir.clone();
    apply_web(&coord, &dir, VIP, &[SIBLING]);
    let _sibling = instance(&node, SIBLING);
    let mut pod = instance(&node, POD);
    let reg = agent_cli(&socket, &["register", "--service", "web", "--address", POD, "--ttl", "1s"]);
    assert!(reg.status.success(), "register: {}\nagent:\n{}", text(&reg), node.log());

    // The agent is killed (no chance to save anything then) and started again.
    node.kill_agent();
    node.spawn_agent();
    wait_listening(&node, 2);
    coord.wait_synced(1);
    assert!(
        node.log().contains("renewing the leases of instances registered before this agent started"),
        "{}",
        node.log()
    );
    // Longer than three leases: an instance whose lease nobody renews is down after one
    // and out of the registry after three more.
    std::thread::sleep(Duration::from_millis(4_500));
    assert_eq!(
        state_of(&coord, POD).as_deref(),
        Some("serving"),
        "the pod registered before the restart must still be serving: its lease renewed by the new agent\n{}",
        node.log()
    );

    // And its prestop drains it: no request lost under load, ended by its connections.
    let mut said = String::new();
    let results = under_load(
        std::slice::from_ref(&node),
        VIP,
        &dir,
        "restart",
        || std::thread::sleep(Duration::from_millis(500)),
        || {
            let out = agent_cli(&socket, &["prestop", "--address", POD, "--deadline", "10s"]);
            said = text(&out);
            assert!(out.status.success(), "prestop: {said}\nagent:\n{}", node.log());
            sigterm(&mut pod);
        },
    );
    eprintln!("prestop after the agent's restart: {said}\n{results:?}");
    assert!(answers_from(&results, POD) > 0, "the pod never served after the restart: {results:?}\n{}", node.log());
    assert!(results.iter().all(|s| s.failed == 0 && s.ok > 5), "requests lost: {results:?}");
    assert!(said.contains("ended because its connections ended"), "{said}");
    // Released: a third start holds nothing.
    let recorded = std::fs::read_to_string(state.join("local-registrations")).expect("registrations file");
    assert_eq!(recorded.lines().count(), 1, "only the header after the prestop: {recorded:?}");
}

/// A listener with an accept queue of one that accepts nothing until asked: the second
/// SYN to it is dropped and retransmitted a second later, as under overload.
fn tiny_listener(addr: std::net::SocketAddrV4) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr is
    // built in full before use.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in).cast(), len), 0, "bind {addr}");
        assert_eq!(libc::listen(fd.as_raw_fd(), 0), 0, "listen");
        fd
    }
}

fn accept_one(l: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: accept on a listening socket this test owns; the result is checked.
    let fd = unsafe { libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    assert!(fd >= 0, "accept: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor from accept, owned from here on.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

#[test]
fn a_prestop_waits_for_another_nodes_handshake_in_flight() {
    use hitless_agent::abi::{Endpoint, PROTO_TCP};
    const VIP: &str = "127.77.192.1:8080";
    const POD: &str = "127.192.0.2:8080";
    let coord = Coordinator::start("prestop-syn", "127.130.192.1:7070");
    let mut nodes: Vec<Node> = (0..2).map(|i| Node::new(&format!("prestop-syn{i}"))).collect();
    let socket = nodes[0].dir.join("agent.sock");
    nodes[0].agent_args(&["--local-api", socket.to_str().expect("utf-8")]);
    for n in &mut nodes {
        n.follow(&coord.url);
        n.spawn_agent();
    }
    coord.wait_synced(2);
    wait_listening(&nodes[0], 1);
    apply_web(&coord, &nodes[0].dir, VIP, &[]);
    // The pod on node 0, overloaded: the first connect fills its accept queue.
    let listener = tiny_listener(POD.parse().expect("addr"));
    let reg = agent_cli(&socket, &["register", "--service", "web", "--address", POD]);
    assert!(reg.status.success(), "register: {}\nagent:\n{}", text(&reg), nodes[0].log());
    coord.wait_synced(2);

    // Node 1's clients dial the VIP: the first connects, the second's SYN is dropped and
    // stays in flight (node 1 counts it) until its retransmission finds room.
    let maps = hitless_agent::writer::Maps::open(&nodes[1].pin_dir).expect("node 1's maps");
    let ep = Endpoint::new(POD.parse().expect("addr"), PROTO_TCP);
    let dial = || {
        Proc::new(
            nodes[1]
                .cgroup
                .command("timeout")
                .args(["20", "bash", "-c", "exec 3<>/dev/tcp/127.77.192.1/8080 && sleep 15"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("bash"),
        )
    };
    let connects = || maps.backend_stats(&ep).map_or(0, |s| s.connects);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < end, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let _first = dial();
    wait("the first connect never established", &|| connects() == 1);
    let _second = dial();
    wait("the second connect was never in flight", &|| maps.handshakes_in_flight(&ep) == 1);

    // The prestop, on node 0, which sees nothing of node 1's handshake.
    let mut prestop = Command::new(bin("hitless-agent"))
        .args(["prestop", "--address", POD, "--deadline", "20s", "--socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prestop");
    // While node 1's SYN waits for its retransmission, the prestop must not end. The
    // count is read after the exit is seen: once 0 it stays 0, so 1 then means 1 when
    // the prestop ended.
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(10));
        if prestop.try_wait().expect("try_wait").is_some() {
            let in_flight = maps.handshakes_in_flight(&ep);
            let out = prestop.wait_with_output().expect("prestop output");
            assert_ne!(
                in_flight,
                1,
                "the prestop ended while node 1 had a handshake in flight to the pod: {}",
                text(&out)
            );
            panic!("node 1's SYN got through on its own before the test let it (inconclusive): {}", text(&out));
        }
    }
    assert_eq!(
        maps.handshakes_in_flight(&ep),
        1,
        "node 1's handshake still in flight after the prestop's first 600 ms"
    );

    // Room in the queue: the retransmitted SYN gets through, and the prestop ends.
    let _a = accept_one(&listener);
    let out = prestop.wait_with_output().expect("prestop");
    let said = text(&out);
    eprintln!("prestop: {said}");
    assert!(out.status.success(), "prestop: {said}\nagent:\n{}", nodes[0].log());
    assert_eq!(connects(), 2, "the second connect established before the prestop ended");
    assert!(said.contains("no node's handshake in flight to it after"), "{said}");
    assert!(said.contains("ended because its connections ended"), "{said}");
    let _b = accept_one(&listener);
}

#[test]
fn a_prestop_past_its_deadline_exits_1_and_register_waits_for_the_instance() {
    const VIP: &str = "127.77.193.1:8080";
    const SIBLING: &str = "127.193.0.1:8080";
    const POD: &str = "127.193.0.2:8080";
    let coord = Coordinator::start("prestop-deadline", "127.130.193.1:7070");
    let mut node = Node::new("prestop-deadline");
    let socket = node.dir.join("agent.sock");
    node.agent_args(&["--local-api", socket.to_str().expect("utf-8")]);
    node.follow(&coord.url);
    node.spawn_agent();
    coord.wait_synced(1);
    wait_listening(&node, 1);
    apply_web(&coord, &node.dir, VIP, &[SIBLING]);

    // Neither flag nor environment: a bad request, named.
    let out = agent_cli(&socket, &["register", "--service", "web"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--address: missing; give --address or set HITLESS_ADDRESS"), "{}", text(&out));
    // Nothing listens at the address: register --wait says so and registers nothing.
    let out = agent_cli(&socket, &["register", "--service", "web", "--address", POD, "--wait", "300ms"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&format!("nothing accepted a TCP connection at {POD}")), "{}", text(&out));
    assert_eq!(state_of(&coord, POD), None, "nothing registered");

    // A pod's postStart, as the example Deployment writes it: the address and service
    // from the environment, registered once the instance listens.
    let mut hook = Command::new(bin("hitless-agent"))
        .args(["register", "--wait", "20s", "--socket"])
        .arg(&socket)
        .env("HITLESS_ADDRESS", POD)
        .env("HITLESS_SERVICE", "web")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("register");
    std::thread::sleep(Duration::from_millis(300));
    assert!(hook.try_wait().expect("try_wait").is_none(), "register --wait returned before the instance listened");
    assert_eq!(state_of(&coord, POD), None, "registered before the instance listened");
    let _pod = instance(&node, POD);
    let out = hook.wait_with_output().expect("register");
    assert!(out.status.success(), "register: {}\nagent:\n{}", text(&out), node.log());
    assert_eq!(state_of(&coord, POD).as_deref(), Some("serving"));

    // A connection that stays open: the deadline ends the prestop, exit status 1.
    let held = Held::open_http(&node.cgroup, POD, 1);
    let out = Command::new(bin("hitless-agent"))
        .args(["prestop", "--deadline", "1s", "--socket"])
        .arg(&socket)
        .env("HITLESS_ADDRESS", POD)
        .output()
        .expect("prestop");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("ended at the deadline (1.000s) with 1 connections and 0 handshakes still open"),
        "{stdout}"
    );
    assert!(
        stderr.contains("error: the deadline passed with connections still open (the instance is draining everywhere; SIGTERM may cut them)"),
        "{stderr}"
    );
    assert_eq!(state_of(&coord, POD).as_deref(), Some("draining"));
    let summary = held.release();
    assert_eq!(summary.still_working, 1, "the held connection was not cut by the drain: {summary:?}");
}

#[test]
fn the_local_api_speaks_to_a_mutual_tls_coordinator_with_the_nodes_certificate() {
    const POD: &str = "127.194.0.2:8080";
    let mut node = Node::new("prestop-tls");
    let tls = node.dir.join("tls");
    let tls_arg = tls.to_str().expect("utf-8").to_owned();
    for args in [
        vec!["certs", "init", "--dir", &tls_arg, "--san", "127.130.194.1"],
        vec!["certs", "issue", "--dir", &tls_arg, "--node", &node.name],
    ] {
        let out = Command::new(bin("hitless")).args(&args).output().expect("hitless certs");
        assert!(out.status.success(), "hitless {args:?}: {}", text(&out));
    }
    let coord = Coordinator::start_tls("prestop-tls", "127.130.194.1:7070", &tls);
    let socket = node.dir.join("agent.sock");
    node.follow(&coord.url).agent_args(&["--tls-dir", &tls_arg, "--local-api", socket.to_str().expect("utf-8")]);
    node.spawn_agent();
    wait_listening(&node, 1);
    let _pod = instance(&node, POD);

    // Register, renew and drain go to the coordinator as this node, over mutual TLS.
    let reg = agent_cli(&socket, &["register", "--service", "web", "--address", POD, "--ttl", "1s"]);
    assert!(reg.status.success(), "register: {}\nagent:\n{}", text(&reg), node.log());
    std::thread::sleep(Duration::from_millis(1_500));
    let out = agent_cli(&socket, &["prestop", "--address", POD, "--deadline", "10s"]);
    let said = text(&out);
    assert!(out.status.success(), "prestop: {said}\nagent:\n{}", node.log());
    assert!(said.contains("no node's handshake in flight to it after"), "{said}");
    assert!(!node.log().contains("lease renewal failed"), "renewals over TLS failed:\n{}", node.log());
}
