//! The agent's least-privilege capability set, proven in the real kernel. Run as root.
//!
//! The set is read from the DaemonSet manifest (`deploy/kubernetes/base/agent.yaml`), so
//! the manifest and this proof cannot drift. The agent then runs under `setpriv` the way
//! a container runtime starts a non-privileged container as uid 0: the bounding set is
//! exactly the manifest's `capabilities.add`, nothing inheritable or ambient, no new
//! privileges; exec as uid 0 makes permitted = effective = that set, which each test
//! checks in `/proc/PID/status` before it trusts the rest. Sufficient: static mode and
//! coordinator mode with instances work under the set. Necessary: without any one of its
//! capabilities the agent refuses to start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use hitless_tests::rig::{architecture_with, assert_no_loss, finish, http_loop, instances, push};
use hitless_tests::{connects, serve, Coordinator, Node, Proc};

/// Capability names by number (`include/uapi/linux/capability.h`), as Kubernetes spells them.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The agent container's security context in the DaemonSet.
#[derive(Debug, Clone)]
struct Confinement {
    /// `capabilities.add`, e.g. `["BPF", "NET_ADMIN", "PERFMON"]`.
    caps: Vec<String>,
    /// `runAsUser`.
    uid: u32,
    /// The pod's `supplementalGroups`.
    groups: Vec<u32>,
    /// The container's `args`.
    args: Vec<String>,
}

impl Confinement {
    /// Reads the agent container of the DaemonSet in the manifest, and checks the parts of
    /// its security context that this proof relies on.
    fn from_manifest() -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/agent.yaml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let daemonset = serde_yaml::Deserializer::from_str(&text)
            .map(|doc| serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .find(|doc| doc["kind"].as_str() == Some("DaemonSet"))
            .unwrap_or_else(|| panic!("{}: no DaemonSet", path.display()));
        let containers = daemonset["spec"]["template"]["spec"]["containers"].as_sequence().cloned().unwrap_or_default();
        let agent = containers
            .iter()
            .find(|c| c["name"].as_str() == Some("hitless-agent"))
            .unwrap_or_else(|| panic!("{}: no container hitless-agent in the DaemonSet", path.display()));
        let sc = &agent["securityContext"];
        let names = |v: &serde_yaml::Value| -> Vec<String> {
            v.as_sequence().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_owned)).collect()
        };
        assert_eq!(sc["privileged"].as_bool(), Some(false), "the agent must not be privileged: {sc:?}");
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{sc:?}");
        assert_eq!(names(&sc["capabilities"]["drop"]), ["ALL"], "the agent must drop every capability first: {sc:?}");
        let caps = names(&sc["capabilities"]["add"]);
        for c in &caps {
            assert!(CAPABILITIES.contains(&c.as_str()), "{}: unknown capability {c:?}", path.display());
        }
        let uid = sc["runAsUser"].as_u64().and_then(|u| u32::try_from(u).ok()).expect("runAsUser");
        let groups = daemonset["spec"]["template"]["spec"]["securityContext"]["supplementalGroups"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|g| g.as_u64().and_then(|g| u32::try_from(g).ok()).expect("supplementalGroups: gids"))
            .collect();
        Self { caps, uid, groups, args: names(&agent["args"]) }
    }

    /// The same set without `cap`.
    fn without(&self, cap: &str) -> Self {
        assert!(self.caps.iter().any(|c| c == cap), "{cap} is not in the DaemonSet's set {:?}", self.caps);
        Self { caps: self.caps.iter().filter(|c| *c != cap).cloned().collect(), ..self.clone() }
    }

    /// The value of the container's `--NAME=VALUE` argument.
    fn arg(&self, name: &str) -> Option<String> {
        let prefix = format!("--{name}=");
        self.args.iter().find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
    }

    /// The set as a bit mask, as `/proc/PID/status` shows it.
    fn mask(&self) -> u64 {
        self.caps.iter().map(|c| 1u64 << CAPABILITIES.iter().position(|k| k == c).expect("known")).sum()
    }

    /// `setpriv` options for this set: `-all,+bpf,+net_admin,+perfmon`.
    fn setpriv_args(&self) -> Vec<String> {
        let set: String = self.caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
        vec![
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.uid),
            if self.groups.is_empty() {
                "--clear-groups".into()
            } else {
                format!("--groups={}", self.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            },
            "--no-new-privs".into(),
            "--inh-caps=-all".into(),
            "--ambient-caps=-all".into(),
            format!("--bounding-set=-all{set}"),
        ]
    }

    /// Starts `node`'s agent under this confinement (its log goes to the node's agent log).
    fn spawn_agent(&self, node: &Node) -> Proc {
        let agent = node.agent_command();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.dir.join("agent.log")).expect("log");
        let mut cmd = Command::new("setpriv");
        cmd.args(self.setpriv_args())
            .arg("--")
            .arg(agent.get_program())
            .args(agent.get_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Proc::new(cmd.spawn().expect("setpriv (util-linux; cargo xtask deps installs it)"))
    }
}

/// Checks the running agent holds exactly `want`: the proof is only as good as this.
fn assert_holds_exactly(agent: &mut Proc, want: &Confinement) {
    let pid = agent.child().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let field = |name: &str| -> u64 {
        let v = status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("{name} in {status}"));
        u64::from_str_radix(v.trim(), 16).unwrap_or_else(|e| panic!("{name} {v}: {e}"))
    };
    let mask = want.mask();
    assert_eq!(field("CapEff:"), mask, "effective capabilities of the agent (want {:?})", want.caps);
    assert_eq!(field("CapPrm:"), mask, "permitted capabilities of the agent (want {:?})", want.caps);
    assert_eq!(field("CapBnd:"), mask, "bounding set of the agent (want {:?})", want.caps);
    assert_eq!(field("CapInh:"), 0, "inheritable capabilities of the agent");
    assert_eq!(field("CapAmb:"), 0, "ambient capabilities of the agent");
    assert_eq!(field("NoNewPrivs:"), 1, "no_new_privs (allowPrivilegeEscalation: false)");
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).expect("Uid");
    assert!(uid.split_whitespace().all(|u| u == want.uid.to_string()), "agent uids {uid}, want {}", want.uid);
    let groups: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .expect("Groups")
        .split_whitespace()
        .map(|g| g.parse().expect("gid"))
        .collect();
    assert_eq!(groups, want.groups, "supplementary groups of the agent (the pod's supplementalGroups)");
}

/// Waits until `node`'s maps hold `rev`, failing with the agent's log if it exits.
fn wait_applied(node: &Node, agent: &mut Proc, rev: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.revision() < rev {
        if let Ok(Some(status)) = agent.child().try_wait() {
            panic!("the confined agent of {} exited with {status}:\n{}", node.name, node.log());
        }
        assert!(Instant::now() < deadline, "node {} never reached revision {rev}:\n{}", node.name, node.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/1.0 GET; the whole answer, head and body.
fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").expect("request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    answer
}

#[test]
fn static_mode_steers_with_exactly_the_daemonsets_capabilities() {
    let confinement = Confinement::from_manifest();
    let mut node = Node::new("caps-static");
    let (vip, backend, metrics) = ("127.77.176.1:8080", "127.176.0.1:8080", "127.88.176.1:9477");
    let _srv = serve(Some(&node.cgroup), &[backend], &[]);
    node.write_registry(&format!(
        "services:\n  - name: cart\n    vips: [\"{vip}\"]\n    backends: [{{ address: \"{backend}\", version: v1 }}]\n"
    ));
    node.agent_args(&["--metrics-addr", metrics]);
    // Declared after the node: dropped (killed) before the node detaches its datapath.
    let mut agent = confinement.spawn_agent(&node);
    wait_applied(&node, &mut agent, 1);
    assert_holds_exactly(&mut agent, &confinement);

    // Loaded, pinned, attached and applied: a connect to the VIP from inside the cgroup
    // reaches the backend, and the socket reports the VIP it dialled.
    let s = connects(Some(&node.cgroup), vip, 50);
    assert_eq!((s.ok, s.from(backend)), (50, 50), "{s:?}");
    assert_eq!(s.peers.get(vip), Some(&50), "{s:?}");

    // The readiness probe's endpoint answers from the maps under the same set.
    let scrape = get(metrics, "/metrics");
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let applied = format!("hitless_agent_applied_revision{{node=\"{}\"}} 1", node.name);
    assert!(scrape.contains(&applied), "no `{applied}` in the scrape:\n{scrape}");

    // A change to the file (a drain) is applied under the set too.
    node.write_registry(&format!(
        "services:\n  - name: cart\n    vips: [\"{vip}\"]\n    policy: reject\n    backends: [{{ address: \"{backend}\", state: down, version: v1 }}]\n"
    ));
    wait_applied(&node, &mut agent, 2);
    let s = connects(Some(&node.cgroup), vip, 10);
    assert_eq!(s.errors.get("ConnectionRefused"), Some(&10), "{s:?}");
}

/// Why each capability of the set is needed, as the agent's refusal says it.
const REFUSALS: [(&str, &str); 3] = [
    ("BPF", "to create the BPF maps and load the programs"),
    ("NET_ADMIN", "to attach the programs to the cgroup"),
    ("PERFMON", "for the sock_ops program's pointer reads"),
];

/// Every capability of the set is needed: without any one of them the agent exits 1
/// before it loads anything, naming that capability (and only it) and why it is needed.
#[test]
fn without_any_one_capability_of_the_set_the_agent_refuses_to_start() {
    let full = Confinement::from_manifest();
    for (i, cap) in full.caps.iter().enumerate() {
        let confinement = full.without(cap);
        let node = Node::new(&format!("caps-no{i}"));
        let vip = format!("127.77.176.{}:8080", 10 + i);
        node.write_registry(&format!(
            "services:\n  - name: cart\n    vips: [\"{vip}\"]\n    backends: [{{ address: \"127.176.0.{}:8080\" }}]\n",
            10 + i
        ));
        let mut agent = confinement.spawn_agent(&node);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = agent.child().try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the agent without CAP_{cap} kept running:\n{}", node.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = node.log();
        assert_eq!(status.code(), Some(1), "without CAP_{cap}: {log}");
        let said = log.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
        eprintln!("without CAP_{cap} the agent says: {}", said.chars().take(140).collect::<String>());
        let (_, why) = REFUSALS.iter().find(|(c, _)| c == cap).unwrap_or_else(|| panic!("no refusal known for {cap}"));
        let want = format!("error: the agent lacks CAP_{cap} ({why}");
        assert!(said.starts_with(&want), "without CAP_{cap}: want {want:?}, got:\n{log}");
        let named = said.split("; nothing was loaded").next().unwrap_or_default();
        for other in full.caps.iter().filter(|c| *c != cap) {
            assert!(!named.contains(&format!("CAP_{other}")), "without CAP_{cap} only, it names CAP_{other}: {said}");
        }
        assert!(!log.contains("prohibited for !root"), "a verifier listing instead of the refusal:\n{log}");
        // Nothing was attached: no link pinned, and the VIP is not steered.
        let links = std::fs::read_dir(node.pin_dir.join("links")).map(Iterator::count).unwrap_or(0);
        assert_eq!(links, 0, "links pinned by an agent without CAP_{cap}");
        let s = connects(Some(&node.cgroup), &vip, 5);
        assert_eq!(s.ok, 0, "without CAP_{cap}: {s:?}");
    }
}

#[test]
fn coordinator_mode_runs_drains_and_adopts_instances_with_the_same_capabilities() {
    let confinement = Confinement::from_manifest();
    let coord = Coordinator::start("caps", "127.130.176.1:7070");
    let mut node = Node::new("caps-coord");
    let workload = node.cgroup.path().join("workload");
    let state = node.dir.join("state");
    node.agent_args(&[
        "--workload-cgroup",
        workload.to_str().expect("utf-8"),
        "--instance-addresses",
        "127.176.1.0/24",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    node.follow(&coord.url);
    let mut agent = confinement.spawn_agent(&node);
    coord.wait_synced(1);
    assert_holds_exactly(&mut agent, &confinement);

    let vip = "127.77.176.2:8080";
    let nodes = std::slice::from_ref(&node);
    let arch = |version: &str| architecture_with(nodes, version, 1, &[], vip);
    let versions = || -> Vec<String> {
        instances(&coord).iter().map(|i| i["version"].as_str().unwrap_or_default().to_owned()).collect()
    };
    let pushed = |out: std::process::Output, what: &str| {
        assert!(
            out.status.success(),
            "{what}: {}{}\nagent:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
    };

    // Start: a cgroup per instance, a process in it, a health check.
    pushed(push(&coord, &node.dir, &arch("v1"), &["--strategy", "straight"]), "deploy v1");
    assert_eq!(versions(), ["v1"]);

    // Replace under load through the VIP: start v2, drain v1 in the kernel, pre-stop hook,
    // wait for its connections to close (counted by sock_ops), SIGTERM, remove its cgroup.
    let stop = node.dir.join("stop");
    let load = http_loop(&node, vip, &stop);
    std::thread::sleep(Duration::from_millis(300));
    pushed(
        push(&coord, &node.dir, &arch("v2"), &["--strategy", "rolling", "--max-surge", "1", "--max-unavailable", "0"]),
        "roll v1 -> v2",
    );
    std::thread::sleep(Duration::from_millis(300));
    let results = finish(vec![load], &stop);
    assert_no_loss(&results, "HTTP through the VIP while the confined agent replaced v1 with v2");
    assert_eq!(versions(), ["v2"]);

    // A restarted agent, confined the same way, adopts the running instance and stops it.
    agent.kill();
    let mut agent = confinement.spawn_agent(&node);
    coord.wait_synced(1);
    assert_holds_exactly(&mut agent, &confinement);
    pushed(push(&coord, &node.dir, &arch("v3"), &["--strategy", "straight"]), "replace the adopted v2 with v3");
    assert_eq!(versions(), ["v3"]);
    let left: Vec<_> = std::fs::read_dir(&workload)
        .expect("workload cgroup")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "one instance cgroup (v3) left, the adopted v2's removed: {left:?}");
}

/// `hitless-agent prestop` against `socket` as uid/gid 65534 with `groups`: its output.
fn prestop_as_nobody(socket: &std::path::Path, groups: &[u32]) -> std::process::Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!("--groups={}", groups.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
    };
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", &groups, "--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(hitless_tests::bin("hitless-agent"))
        .args(["prestop", "--address", "127.0.0.9:9", "--deadline", "1s", "--socket"])
        .arg(socket)
        .output()
        .expect("setpriv")
}

#[test]
fn the_local_api_socket_admits_its_group_and_nobody_else() {
    use std::os::unix::fs::MetadataExt;
    let confinement = Confinement::from_manifest();
    let socket_arg = confinement.arg("local-api").expect("the DaemonSet passes --local-api=PATH");
    assert_eq!(socket_arg, "/run/hitless/agent.sock", "the socket the pods' hooks dial by default");
    let gid: u32 = confinement
        .arg("local-api-group")
        .expect("the DaemonSet passes --local-api-group=GID")
        .parse()
        .expect("--local-api-group: a numeric gid (the image has no /etc/group)");
    assert!(
        confinement.groups.contains(&gid),
        "the agent pod's supplementalGroups {:?} must hold the socket's group {gid}",
        confinement.groups
    );

    let coord = Coordinator::start("caps-local", "127.130.177.1:7070");
    let mut node = Node::new("caps-local");
    let socket = node.dir.join("agent.sock");
    let gid_text = gid.to_string();
    let state = node.dir.join("state");
    node.agent_args(&[
        "--local-api",
        socket.to_str().expect("utf-8"),
        "--local-api-group",
        &gid_text,
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    node.follow(&coord.url);

    // Confined as the DaemonSet says, but not in the group: refused at start, saying why.
    let outside = Confinement { groups: Vec::new(), ..confinement.clone() };
    let mut agent = outside.spawn_agent(&node);
    let status = agent.child().wait().expect("wait");
    assert_eq!(status.code(), Some(1), "the agent outside the group:\n{}", node.log());
    assert!(node.log().contains("supplementalGroups"), "the refusal names the fix:\n{}", node.log());
    assert!(!socket.exists(), "a refused agent leaves no socket behind");

    // In the group: the socket is root's and the group's, 0660.
    let mut agent = confinement.spawn_agent(&node);
    coord.wait_synced(1);
    assert_holds_exactly(&mut agent, &confinement);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let meta = std::fs::metadata(&socket).expect("socket");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, gid, 0o660), "the socket's owner, group and mode");

    // A non-root pod user in the group reaches the agent (which answers: nothing to drain).
    let member = prestop_as_nobody(&socket, &[gid]);
    let said = format!("{}{}", String::from_utf8_lossy(&member.stdout), String::from_utf8_lossy(&member.stderr));
    assert!(said.contains("no instance at 127.0.0.9:9"), "a member of group {gid}: {said}");
    // The same user without the group does not.
    let stranger = prestop_as_nobody(&socket, &[]);
    let said = format!("{}{}", String::from_utf8_lossy(&stranger.stdout), String::from_utf8_lossy(&stranger.stderr));
    assert_eq!(stranger.status.code(), Some(1), "{said}");
    assert!(said.contains("cannot reach the agent") && said.contains("ermission denied"), "a non-member: {said}");
}
