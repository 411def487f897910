//! The conventional way, for comparison: the same service on the same simulated nodes
//! without hitless. A rolling script starts a new instance, registers it, deregisters
//! an old one, waits a fixed time and sends it SIGTERM. Clients learn of changes only
//! when they refresh their cached copy of the registry.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::client::now_ms;
use super::host::{self, Cgroup, Proc};
use super::{Demo, SERVICE};

/// One instance the script runs.
struct Instance {
    addr: SocketAddr,
    version: String,
    proc: Proc,
}

/// The simulated nodes of the conventional run and the instances on them.
pub struct Fleet {
    /// Node cgroups: clients run here, instances in `workload` below.
    pub nodes: Vec<Cgroup>,
    instances: Vec<(usize, Instance)>,
    next_host: u32,
    /// The second octet of the instances' addresses (127.NET.node.host).
    net: u8,
    /// Wait between deregistering an instance and its SIGTERM.
    wait: Duration,
    /// The registry as its clients fetch it.
    view: std::path::PathBuf,
}

impl Fleet {
    /// Creates the nodes (cgroups `{prefix}{i}`) and starts `version` on each, registered
    /// once healthy, on addresses 127.`net`.node.host. `wait` is the script's fixed wait.
    pub fn start(demo: &Demo, version: &str, prefix: &str, net: u8, wait: Duration) -> anyhow::Result<Self> {
        let view = demo.dir.join(format!("view-{prefix}"));
        let mut fleet = Self { nodes: Vec::new(), instances: Vec::new(), next_host: 1, net, wait, view };
        for i in 0..demo.args.nodes {
            fleet.nodes.push(Cgroup::create(demo.cgroup_root.join(format!("{prefix}{i}")))?);
        }
        for _ in 0..demo.args.instances {
            for node in 0..fleet.nodes.len() {
                let inst = fleet.launch(node, version)?;
                fleet.instances.push((node, inst));
            }
        }
        fleet.publish()?;
        Ok(fleet)
    }

    fn launch(&mut self, node: usize, version: &str) -> anyhow::Result<Instance> {
        let addr: SocketAddr = format!("127.{}.{node}.{}:8080", self.net, self.next_host).parse()?;
        self.next_host += 1;
        let svc = host::sibling("hitless-testsvc")?;
        let cg = self.nodes[node].path().join("workload");
        std::fs::create_dir_all(&cg).with_context(|| format!("creating cgroup {}", cg.display()))?;
        let child = host::command_in(&cg, &svc)?
            .args(["--listen", &addr.to_string(), "--version", version])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting hitless-testsvc")?;
        let mut proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !healthy(addr) {
            if !proc.running() || Instant::now() > deadline {
                bail!("instance {addr} did not become healthy");
            }
            host::pause(Duration::from_millis(20))?;
        }
        Ok(Instance { addr, version: version.to_owned(), proc })
    }

    /// Writes the registry as clients fetch it: every registered instance.
    fn publish(&self) -> anyhow::Result<()> {
        let addrs: Vec<String> = self.instances.iter().map(|(_, i)| i.addr.to_string()).collect();
        super::publish(&self.view, &addrs)
    }

    /// Replaces every instance by one of `version`, one at a time (one extra instance
    /// at most): start and register the new one, deregister the old one, wait the
    /// fleet's fixed wait, SIGTERM it. Returns when each old instance was deregistered.
    pub fn roll(&mut self, version: &str, mut progress: impl FnMut(&str)) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut drains = BTreeMap::new();
        for _ in 0..self.instances.len() {
            let (node, _) = self.instances[0];
            let new = self.launch(node, version)?;
            let new_addr = new.addr;
            self.instances.push((node, new));
            self.publish()?;
            let (_, mut gone) = self.instances.remove(0);
            self.publish()?;
            drains.insert(format!("{} {}", gone.version, gone.addr), now_ms());
            progress(&format!(
                "{SERVICE}: started {new_addr}, deregistered {}, waiting {:.1?} before SIGTERM",
                gone.addr, self.wait
            ));
            host::pause(self.wait)?;
            gone.proc.stop(Duration::from_secs(10));
        }
        Ok(drains)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.instances.clear();
        self.nodes.clear();
    }
}

/// `GET /healthz` answers 200.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}
