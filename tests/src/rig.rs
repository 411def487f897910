//! The end-to-end rig: a coordinator and three simulated nodes whose agents run real
//! instances (`hitless-testsvc`) in their workload cgroups, with HTTP load through the
//! VIP on every node and clients with stale caches dialling instance addresses.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{bin, Coordinator, Node, Summary};

/// The VIP of the single-rollout test.
pub const VIP: &str = "127.77.60.1:8080";

/// The `web` architecture file at `version`, `per_node` instances on each node.
pub fn architecture(nodes: &[Node], version: &str, per_node: u32) -> String {
    architecture_with(nodes, version, per_node, &[], VIP)
}

/// Like [`architecture`] with extra `hitless-testsvc` flags and another VIP.
pub fn architecture_with(nodes: &[Node], version: &str, per_node: u32, extra: &[&str], vip: &str) -> String {
    let svc = bin("hitless-testsvc");
    let placement: Vec<String> = nodes.iter().map(|n| format!("{}: {per_node}", n.name)).collect();
    let extra: String = extra.iter().map(|e| format!(", \"{e}\"")).collect();
    format!(
        "services:\n  - name: web\n    version: {version}\n    port: 8080\n    vips: [\"{vip}\"]\n    run: {{ command: [\"{}\", \"--listen\", \"{{address}}:{{port}}\", \"--version\", \"{version}\"{extra}] }}\n    health: {{ http: /healthz }}\n    prestop: {{ http: /drain }}\n    drain_deadline: 5s\n    placement: {{ {} }}\n",
        svc.display(),
        placement.join(", ")
    )
}

/// Three nodes following `coord`, instance addresses from 127.16`k`.`i`.0/24.
pub fn nodes(coord: &Coordinator, name: &str, k: u8) -> Vec<Node> {
    nodes_with(coord, name, k, |_| Vec::new())
}

/// Like [`nodes`] with extra agent flags for node `i`.
pub fn nodes_with(coord: &Coordinator, name: &str, k: u8, extra: impl Fn(usize) -> Vec<String>) -> Vec<Node> {
    nodes_in(coord, name, &format!("127.16{k}."), extra)
}

/// Three nodes following `coord`, node `i`'s instance addresses from `{pool}{i}.0/24`
/// (`pool` like "127.175."), with extra agent flags for node `i`.
pub fn nodes_in(coord: &Coordinator, name: &str, pool: &str, extra: impl Fn(usize) -> Vec<String>) -> Vec<Node> {
    (0..3)
        .map(|i| {
            let mut n = Node::new(&format!("{name}{i}"));
            let workload = n.cgroup.path().join("workload");
            let state = n.dir.join("state");
            let pool = format!("{pool}{i}.0/24");
            let mut args = vec![
                "--workload-cgroup".to_owned(),
                workload.to_str().expect("utf-8").to_owned(),
                "--instance-addresses".to_owned(),
                pool,
                "--state-dir".to_owned(),
                state.to_str().expect("utf-8").to_owned(),
            ];
            args.extend(extra(i));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            n.agent_args(&args);
            n.follow(&coord.url);
            n.spawn_agent();
            n
        })
        .collect()
}

/// `hitless push --target ARCH --wait STRATEGY...`.
pub fn push(coord: &Coordinator, dir: &Path, arch: &str, strategy: &[&str]) -> std::process::Output {
    let file = dir.join("arch.yaml");
    std::fs::write(&file, arch).expect("architecture file");
    let mut args = vec!["push", "--target", file.to_str().expect("utf-8"), "--wait"];
    args.extend_from_slice(strategy);
    coord.cli(&args)
}

/// An HTTP client loop on `addr` from inside `node`, until `stop` exists.
pub fn http_loop(node: &Node, addr: &str, stop: &Path) -> Child {
    node.cgroup
        .command(bin("hitless-probe"))
        .args(["http-loop", addr, "--max-secs", "120", "--pause-ms", "5", "--stop-file"])
        .arg(stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("http loop")
}

/// Stops the loops and collects their summaries.
pub fn finish(children: Vec<Child>, stop: &Path) -> Vec<Summary> {
    std::fs::write(stop, "").expect("stop file");
    children
        .into_iter()
        .map(|c| serde_json::from_slice(&c.wait_with_output().expect("loop").stdout).expect("summary"))
        .collect()
}

/// Serving instances of `web` (stopped ones stay listed as `down` for stale clients).
pub fn instances(coord: &Coordinator) -> Vec<serde_json::Value> {
    let list = coord.json(&["registry", "list", "-o", "json"]);
    let all = list["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["instances"].as_array().cloned())
        .unwrap_or_default();
    all.into_iter().filter(|i| i["state"] == "serving").collect()
}

/// A coordinator and three nodes running web v1 (2 instances each), with VIP `vip`.
pub struct Rig {
    /// The coordinator.
    pub coord: Coordinator,
    /// Its three nodes.
    pub nodes: Vec<Node>,
    /// Scratch directory (node 0's).
    pub dir: PathBuf,
    /// The service's VIP.
    pub vip: String,
    /// Extra `hitless-testsvc` flags of every version pushed from now on.
    pub svc_flags: Vec<String>,
}

impl Rig {
    /// Starts the coordinator and nodes and deploys v1 straight.
    pub fn new(name: &str, k: u8) -> Self {
        Self::new_with(name, k, &[], |_| Vec::new())
    }

    /// Like [`Rig::new`] with extra coordinator flags and extra agent flags for node `i`.
    pub fn new_with(name: &str, k: u8, coordinator: &[&str], agent: impl Fn(usize) -> Vec<String>) -> Self {
        let coord = Coordinator::start_with(name, &format!("127.130.{}.1:7070", 10 + k), coordinator);
        let nodes = nodes_with(&coord, name, k, agent);
        Self::deploy(coord, nodes, &format!("127.77.6{k}.1:8080"), Vec::new())
    }

    /// Waits for the nodes' agents, then deploys v1 straight (with `svc_flags`) behind `vip`.
    pub fn deploy(coord: Coordinator, nodes: Vec<Node>, vip: &str, svc_flags: Vec<String>) -> Self {
        coord.wait_synced(nodes.len());
        let dir = nodes[0].dir.clone();
        let rig = Self { coord, nodes, dir, vip: vip.to_owned(), svc_flags };
        let out = rig.push("v1", &[], &["--strategy", "straight"]);
        assert!(out.status.success(), "first deploy: {}", String::from_utf8_lossy(&out.stderr));
        rig
    }

    /// The architecture at `version`.
    pub fn arch(&self, version: &str, extra: &[&str]) -> String {
        let mut flags: Vec<&str> = self.svc_flags.iter().map(String::as_str).collect();
        flags.extend_from_slice(extra);
        architecture_with(&self.nodes, version, 2, &flags, &self.vip)
    }

    /// Pushes `version` and waits for the end.
    pub fn push(&self, version: &str, extra: &[&str], strategy: &[&str]) -> std::process::Output {
        push(&self.coord, &self.dir, &self.arch(version, extra), strategy)
    }

    /// Starts a push without waiting.
    pub fn push_async(&self, version: &str, strategy: &[&str]) {
        let file = self.dir.join("arch.yaml");
        std::fs::write(&file, self.arch(version, &[])).expect("architecture file");
        let mut args = vec!["push", "--target", file.to_str().expect("utf-8")];
        args.extend_from_slice(strategy);
        let out = self.coord.cli(&args);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The rollout's status as JSON.
    pub fn rollout(&self) -> serde_json::Value {
        self.coord.json(&["status", "-o", "json"])["rollout"].clone()
    }

    /// Waits (up to 60 s) until the rollout is in one of `states`.
    pub fn wait_state(&self, states: &[&str]) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.rollout();
            if states.iter().any(|s| r["state"] == *s) {
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "rollout never reached {states:?}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// HTTP load through the VIP on every node, plus a stale client per node.
    pub fn load(&self, stop: &Path) -> Vec<Child> {
        let _ = std::fs::remove_file(stop);
        let serving = instances(&self.coord);
        let mut loops = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            loops.push(http_loop(n, &self.vip, stop));
            if let Some(a) = serving.get(i).and_then(|x| x["address"].as_str()) {
                loops.push(http_loop(n, a, stop));
            }
        }
        loops
    }

    /// Versions of the serving instances.
    pub fn versions(&self) -> Vec<String> {
        instances(&self.coord).iter().map(|i| i["version"].as_str().unwrap_or("").to_owned()).collect()
    }
}

/// Every client ran and lost nothing.
pub fn assert_no_loss(results: &[Summary], what: &str) {
    for (k, s) in results.iter().enumerate() {
        assert!(s.ok > 5, "{what}: client {k} ran: {s:?}");
        assert_eq!(s.failed, 0, "{what}: client {k} lost requests: {s:?}");
    }
}

/// Pids of the instances listening in `pool_prefix` (e.g. "127.166.0."), by address.
pub fn pids(pool_prefix: &str) -> std::collections::BTreeMap<String, String> {
    let out = std::process::Command::new("pgrep")
        .args(["-a", "-f", &format!("listen {pool_prefix}")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pid = it.next()?.to_owned();
            let addr = l.split("--listen ").nth(1)?.split_whitespace().next()?.to_owned();
            Some((addr, pid))
        })
        .collect()
}

/// xorshift64: small, seedable, reproducible (the chaos test and the soak replay seeds).
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn draw(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.draw() % (hi.saturating_sub(lo)).max(1)
    }
}
