//! A pod-style instance (one hitless does not run) stopped the kubelet's way, without a
//! cluster: it is registered through its node's agent (`hitless-agent register` over
//! the agent's local socket, the agent renewing its lease), serves load through a VIP
//! from two nodes, and is stopped with `hitless-agent prestop` then SIGTERM: no request
//! fails, and the prestop ends when its connections end, not at its deadline. In the
//! same run, a second such instance stopped with the usual `sleep 2` then SIGTERM (no
//! drain) loses requests: what the hook is for. Run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hitless_tests::rig::{finish, http_loop};
use hitless_tests::{bin, Coordinator, Node, Proc, Summary};

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

/// Load through the VIP from every node while `stop` runs; the clients' summaries.
fn under_load(nodes: &[Node], dir: &Path, name: &str, warm: impl FnOnce(), stop: impl FnOnce()) -> Vec<Summary> {
    let stop_file = dir.join(format!("stop-{name}"));
    let loops = nodes.iter().map(|n| http_loop(n, VIP, &stop_file)).collect();
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
