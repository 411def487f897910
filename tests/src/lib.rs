//! Test support: throwaway cgroups, simulated nodes (cgroup + agent + pin dir), and
//! the probe processes that serve and dial inside them. Every guard removes what it
//! created when dropped, also when the test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub mod gateway;
pub mod rig;

/// Fails the test with what is missing when it cannot touch the kernel.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "this test loads eBPF programs and creates cgroups: run it as root (sudo -E cargo test)");
    assert!(
        hitless_agent::cgroup::v2_mount().is_ok(),
        "this test needs a cgroup v2 hierarchy (none in /proc/mounts): mount one with mount -t cgroup2 none DIR"
    );
}

/// Path of a workspace binary built next to the test (cargo test --workspace builds them all).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo test --workspace builds every binary)",
        path.display()
    );
    path
}

/// A cgroup v2 directory that exists for the guard's lifetime; every process left
/// in it is killed on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/hitless-test-<name>-<pid>`.
    pub fn new(name: &str) -> Self {
        let root = hitless_agent::cgroup::v2_mount().expect("cgroup2 mount");
        let path = root.join(format!("hitless-test-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&path);
        assert!(path.join("cgroup.procs").exists(), "could not create cgroup {}", path.display());
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command whose process starts inside this cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        hitless_agent::cgroup::join_on_exec(&mut cmd, &self.path).expect("no NUL in the cgroup path");
        cmd
    }
}

/// Child cgroups below `dir`, deepest first.
fn descendants(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(descendants(&p));
                out.push(p);
            }
        }
    }
    out
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill takes the whole subtree (instances in workload cgroups included).
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            for child in descendants(&self.path) {
                let _ = std::fs::remove_dir(&child);
            }
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() && std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Wraps a spawned child.
    pub fn new(child: Child) -> Self {
        Self { child }
    }
    /// The child.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
    /// Sends SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a probe client saw (see `hitless-probe`).
#[derive(Debug, Deserialize, Default, Clone)]
pub struct Summary {
    /// Successful connects (or datagram round trips).
    pub ok: u64,
    /// Failed ones.
    pub failed: u64,
    /// Failures by error kind.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Backend that answered -> count.
    pub backends: std::collections::BTreeMap<String, u64>,
    /// Peer address the socket reported -> count.
    pub peers: std::collections::BTreeMap<String, u64>,
    /// Slowest failure in ms.
    pub max_fail_ms: u64,
    /// Connects that timed out, by where their SYN went and that listener's queue.
    #[serde(default)]
    pub timed_out: std::collections::BTreeMap<String, u64>,
    /// Connects that needed a SYN retransmission (a full accept queue), by peer.
    #[serde(default)]
    pub slow_connects: std::collections::BTreeMap<String, u64>,
}

impl Summary {
    /// Answers from `backend`.
    pub fn from(&self, backend: &str) -> u64 {
        self.backends.get(backend).copied().unwrap_or(0)
    }
}

/// Servers started by `hitless-probe serve` inside `cg`, ready when this returns.
pub fn serve(cg: Option<&Cgroup>, tcp: &[&str], udp: &[&str]) -> Proc {
    serve_with("serve", cg, tcp, udp)
}

/// Like [`serve`] with another probe server mode (`sink` accepts and closes at once).
pub fn serve_with(mode: &str, cg: Option<&Cgroup>, tcp: &[&str], udp: &[&str]) -> Proc {
    let probe = bin("hitless-probe");
    let mut cmd = match cg {
        Some(cg) => cg.command(&probe),
        None => Command::new(&probe),
    };
    cmd.arg(mode);
    for a in tcp {
        cmd.args(["--tcp", a]);
    }
    for a in udp {
        cmd.args(["--udp", a]);
    }
    spawn_ready(cmd)
}

/// Spawns a probe server and waits for its `ready` line.
pub fn spawn_ready(mut cmd: Command) -> Proc {
    let mut child = cmd.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().expect("spawn probe server");
    let out = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("probe output");
    assert_eq!(line.trim(), "ready", "probe server failed to start: {cmd:?}");
    Proc::new(child)
}

/// Runs `hitless-probe <args>` (inside `cg` when given) and parses its summary.
pub fn probe(cg: Option<&Cgroup>, args: &[&str]) -> Summary {
    let probe = bin("hitless-probe");
    let mut cmd = match cg {
        Some(cg) => cg.command(&probe),
        None => Command::new(&probe),
    };
    let out = cmd.args(args).stdin(Stdio::null()).output().expect("run probe");
    assert!(out.status.success(), "probe {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probe output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

/// `count` TCP connects to `addr` from inside `cg` (or from outside any node with `None`).
pub fn connects(cg: Option<&Cgroup>, addr: &str, count: u32) -> Summary {
    probe(cg, &["connect", addr, "--count", &count.to_string()])
}

/// `count` UDP round trips to `addr`.
pub fn datagrams(cg: Option<&Cgroup>, addr: &str, count: u32) -> Summary {
    probe(cg, &["connect", addr, "--count", &count.to_string(), "--udp"])
}

/// Connections held open by a probe until [`Held::release`].
pub struct Held {
    proc: Proc,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// How held connections ended.
#[derive(Debug, Deserialize)]
pub struct HoldSummary {
    /// Connections opened.
    pub opened: u64,
    /// Connections that still echoed when released.
    pub still_working: u64,
    /// Backend -> connections.
    pub backends: std::collections::BTreeMap<String, u64>,
}

impl Held {
    /// Opens `count` connections to `addr` from inside `cg`.
    pub fn open(cg: &Cgroup, addr: &str, count: u32) -> Self {
        Self::open_with(cg, addr, count, &[])
    }

    /// Opens `count` keep-alive HTTP connections to `addr` from inside `cg`.
    pub fn open_http(cg: &Cgroup, addr: &str, count: u32) -> Self {
        Self::open_with(cg, addr, count, &["--http"])
    }

    fn open_with(cg: &Cgroup, addr: &str, count: u32, extra: &[&str]) -> Self {
        let mut child = cg
            .command(bin("hitless-probe"))
            .args(["hold", addr, "--count", &count.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe hold");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("probe hold output");
        assert_eq!(line.trim(), "held", "probe hold could not open {count} connections to {addr}");
        Self { proc: Proc::new(child), stdin, stdout }
    }

    /// Checks every connection still echoes, closes them all, and reports.
    pub fn release(mut self) -> HoldSummary {
        drop(self.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("probe hold summary");
        let _ = self.proc.child().wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("hold summary {line:?}: {e}"))
    }
}

/// A simulated node: its own cgroup, pin directory, registry file and agent.
pub struct Node {
    /// Node name (unique per test process).
    pub name: String,
    /// The node's cgroup: clients and instances run inside it.
    pub cgroup: Cgroup,
    /// Where the node's datapath is pinned.
    pub pin_dir: PathBuf,
    /// Scratch directory (registry file, agent log).
    pub dir: PathBuf,
    agent: Option<Proc>,
    extra: Vec<String>,
    coordinator: Option<String>,
}

impl Node {
    /// Creates the node's cgroup and scratch dir; no agent yet.
    pub fn new(name: &str) -> Self {
        require_root();
        let full = format!("t-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("hitless-{full}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let pin_dir = PathBuf::from("/sys/fs/bpf/hitless").join(&full);
        Self { cgroup: Cgroup::new(name), name: full, pin_dir, dir, agent: None, extra: Vec::new(), coordinator: None }
    }

    /// Coordinator mode: the agent follows the coordinator at `url` instead of a file.
    pub fn follow(&mut self, url: &str) -> &mut Self {
        self.coordinator = Some(url.to_owned());
        self
    }

    /// Extra agent flags for the next start.
    pub fn agent_args(&mut self, args: &[&str]) -> &mut Self {
        self.extra = args.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The registry file path.
    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry.yaml")
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Replaces the registry file atomically (write + rename, as editors and ConfigMaps do).
    pub fn write_registry(&self, text: &str) {
        let tmp = self.dir.join("registry.yaml.tmp");
        std::fs::write(&tmp, text).expect("write registry");
        std::fs::rename(&tmp, self.registry()).expect("rename registry");
    }

    /// The agent command line for this node.
    pub fn agent_command(&self) -> Command {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("agent.log")).expect("log");
        let mut cmd = Command::new(bin("hitless-agent"));
        cmd.arg("--node").arg(&self.name);
        match &self.coordinator {
            // Plaintext to a loopback coordinator (--insecure): tests/tests/security.rs
            // runs the same processes with mutual TLS.
            Some(url) if url.starts_with("http://") => cmd.arg("--insecure").arg("--coordinator").arg(url),
            // https://: the test gives --tls-dir with agent_args.
            Some(url) => cmd.arg("--coordinator").arg(url),
            None => cmd.arg("--registry-file").arg(self.registry()),
        };
        cmd.arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Starts the agent and, in static mode, waits until it has applied the file.
    pub fn start_agent(&mut self) -> u64 {
        let before = self.revision();
        self.spawn_agent();
        self.wait_revision(before + 1)
    }

    /// Starts the agent without waiting.
    pub fn spawn_agent(&mut self) {
        let child = self.agent_command().spawn().expect("spawn agent");
        self.agent = Some(Proc::new(child));
    }

    /// SIGKILLs the agent; the pinned datapath stays.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// The revision the node's maps hold (0 when none).
    pub fn revision(&self) -> u64 {
        hitless_agent::writer::Maps::open(&self.pin_dir).and_then(|m| m.revision()).unwrap_or(0)
    }

    /// Waits until the maps hold `rev` or later; panics with the agent's log after 10 s.
    pub fn wait_revision(&mut self, rev: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.revision();
            if now >= rev {
                return now;
            }
            if let Some(a) = self.agent.as_mut() {
                if let Ok(Some(status)) = a.child().try_wait() {
                    panic!("agent of {} exited with {status}:\n{}", self.name, self.log());
                }
            }
            assert!(Instant::now() < deadline, "node {} never reached revision {rev}:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes a registry and waits until the agent has applied it.
    pub fn apply(&mut self, text: &str) -> u64 {
        let before = self.revision();
        self.write_registry(text);
        self.wait_revision(before + 1)
    }

    /// Slots in force that point at a backend that is not serving, read back from the
    /// kernel (the datapath's invariant: 0 after every test).
    pub fn slots_to_unserving(&self) -> usize {
        hitless_agent::writer::Maps::open(&self.pin_dir).map_or(usize::MAX, |m| m.slots_to_unserving())
    }

    /// Active server-side connections of a local backend, as the kernel counts them.
    pub fn active(&self, addr: &str) -> i64 {
        let ep = hitless_agent::abi::Endpoint::new(addr.parse().expect("addr"), hitless_agent::abi::PROTO_TCP);
        hitless_agent::writer::Maps::open(&self.pin_dir).map(|m| m.active_connections(&ep)).unwrap_or(-1)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        let _ = Command::new(bin("hitless-agent"))
            .args(["detach", "--node", &self.name, "--pin-dir"])
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .status();
        // HITLESS_KEEP_LOGS keeps the node's directory (agent log, instance logs) under
        // the temp dir as hitless-kept-NODE, as it keeps the coordinator's log.
        let kept = std::env::var_os("HITLESS_KEEP_LOGS").is_some_and(|_| {
            std::fs::rename(&self.dir, std::env::temp_dir().join(format!("hitless-kept-{}", self.name))).is_ok()
        });
        if !kept {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `hitless coordinator` process on a fixed address, killed on drop.
pub struct Coordinator {
    /// `http://ADDR`.
    pub url: String,
    listen: String,
    extra: Vec<String>,
    /// Its data directory.
    pub data_dir: PathBuf,
    proc: Option<Proc>,
}

impl Coordinator {
    /// Starts a coordinator on `listen` (e.g. `127.130.1.1:7070`) with a fresh data dir.
    pub fn start(name: &str, listen: &str) -> Self {
        Self::start_with(name, listen, &[])
    }

    /// Like [`Coordinator::start`] with extra `hitless coordinator` flags.
    pub fn start_with(name: &str, listen: &str, extra: &[&str]) -> Self {
        let data_dir = std::env::temp_dir().join(format!("hitless-coord-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let extra = extra.iter().map(|s| (*s).to_owned()).collect();
        let mut c = Self { url: format!("http://{listen}"), listen: listen.to_owned(), extra, data_dir, proc: None };
        c.restart();
        c
    }

    /// Like [`Coordinator::start`] with mutual TLS from `tls_dir` (`hitless certs`);
    /// its URL is `https://ADDR`.
    pub fn start_tls(name: &str, listen: &str, tls_dir: &Path) -> Self {
        let data_dir = std::env::temp_dir().join(format!("hitless-coord-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let extra = vec!["--tls-dir".to_owned(), tls_dir.display().to_string()];
        let mut c = Self { url: format!("https://{listen}"), listen: listen.to_owned(), extra, data_dir, proc: None };
        c.restart();
        c
    }

    /// Starts it again on the same address and data dir (after [`Coordinator::kill`]).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::env::temp_dir().join(format!("{}.log", self.data_dir.display())))
            .expect("log");
        let mut cmd = Command::new(bin("hitless"));
        // Plaintext on a loopback address (--insecure); tests/tests/security.rs runs it
        // with mutual TLS.
        cmd.args(["coordinator", "--listen", &self.listen, "--health-timeout", "5s", "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.extra)
            .stderr(log);
        if self.url.starts_with("http://") {
            cmd.arg("--insecure");
        }
        self.proc = Some(spawn_line(cmd, "listening on"));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Runs `hitless --coordinator URL <args>` (with `--insecure` for an `http://` URL;
    /// with TLS, `args` name the --tls-dir and --identity).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin("hitless"));
        if self.url.starts_with("http://") {
            cmd.arg("--insecure");
        }
        cmd.arg("--coordinator").arg(&self.url).args(args).output().expect("run hitless")
    }

    /// Runs the CLI and parses its `-o json` output; panics on failure.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "hitless {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("hitless {args:?} printed {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The registry revision.
    pub fn revision(&self) -> u64 {
        self.json(&["status", "-o", "json"])["revision"].as_u64().unwrap_or(0)
    }

    /// Waits until `n` agents are connected and hold the registry revision.
    pub fn wait_synced(&self, n: usize) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.json(&["status", "-o", "json"]);
            let rev = s["revision"].as_u64().unwrap_or(0);
            let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
            let synced = nodes
                .iter()
                .filter(|n| n["connected"].as_bool() == Some(true) && n["applied_revision"].as_u64() == Some(rev))
                .count();
            if synced >= n {
                return rev;
            }
            assert!(Instant::now() < deadline, "agents never synced: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if std::env::var_os("HITLESS_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{}.log", self.data_dir.display())));
        }
    }
}

/// Spawns a command and waits for a stdout line starting with `prefix`.
pub fn spawn_line(mut cmd: Command, prefix: &str) -> Proc {
    let mut child = cmd.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().expect("spawn");
    let out = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    assert!(line.starts_with(prefix), "expected a line starting with {prefix:?}, got {line:?} from {cmd:?}");
    Proc::new(child)
}
