//! The hitless way: an embedded coordinator, one agent per simulated node running the
//! instances, and a rolling rollout pushed over the real gRPC API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hitless_proto::v1::{self as pb, coordinator_client::CoordinatorClient, registry_client::RegistryClient};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

use hitless_agent::loader::{default_pin_dir, detach};

use super::client::now_ms;
use super::host::{self, Cgroup, Proc};
use super::{Demo, SERVICE, VIP};

/// The coordinator (in this process) and the agents of the simulated nodes.
pub struct Cluster<'a> {
    demo: &'a Demo,
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Node cgroups: clients run here; instances in `workload` below.
    pub nodes: Vec<Cgroup>,
    agents: Vec<Proc>,
    /// The agents run in here, inside the demo's tree, so that removing the tree
    /// after a killed run stops them too.
    agent_cgroup: Cgroup,
}

impl<'a> Cluster<'a> {
    /// Starts the coordinator and one agent per node, and waits until every agent is
    /// connected and in sync.
    pub fn start(demo: &'a Demo, rt: &Runtime) -> anyhow::Result<Self> {
        let data = demo.dir.join("coordinator");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let server = rt.spawn(async move {
            let listen = SocketAddr::from(([127, 0, 0, 1], 0));
            let settings = hitless_coordinator::server::Settings {
                health_timeout: Duration::from_secs(30),
                prometheus: None,
                prometheus_lag: Duration::ZERO,
                tombstone: hitless_coordinator::server::TOMBSTONE_TTL,
                per_identity: Default::default(),
            };
            let ready = move |a| {
                let _ = bound_tx.send(a);
            };
            let stop = async move {
                let _ = rx.await;
            };
            // Plaintext (--insecure), on loopback: the demo's nodes are cgroups of this
            // machine and nothing leaves it. A deployment uses --tls-dir (README "Security").
            if let Err(e) = hitless_coordinator::server::serve(listen, &data, settings, None, ready, stop).await {
                tracing::error!("embedded coordinator: {e}");
            }
        });
        let bound = bound_rx.recv_timeout(Duration::from_secs(10)).context("the embedded coordinator did not start")?;
        let url = format!("http://{bound}");
        let mut cluster = Self {
            demo,
            url,
            shutdown: Some(tx),
            server: Some(server),
            nodes: Vec::new(),
            agents: Vec::new(),
            agent_cgroup: Cgroup::create(demo.cgroup_root.join("agents"))?,
        };
        let agent = host::sibling("hitless-agent")?;
        for i in 0..demo.args.nodes {
            let name = node_name(i);
            let cg = Cgroup::create(demo.cgroup_root.join(&name))?;
            let log = std::fs::File::create(demo.dir.join(format!("{name}.log")))?;
            let child = cluster
                .agent_cgroup
                .command(&agent)?
                .args(["--node", &name, "--insecure", "--coordinator", &cluster.url, "--cgroup"])
                .arg(cg.path())
                .arg("--pin-dir")
                .arg(default_pin_dir(&name))
                .arg("--workload-cgroup")
                .arg(cg.path().join("workload"))
                .args(["--instance-addresses", &format!("127.171.{i}.0/24"), "--state-dir"])
                .arg(demo.dir.join(format!("{name}-state")))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting hitless-agent")?;
            cluster.nodes.push(cg);
            cluster.agents.push(Proc(child));
        }
        cluster.wait_synced(rt)?;
        Ok(cluster)
    }

    /// The coordinator's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn client(&self) -> anyhow::Result<CoordinatorClient<Channel>> {
        Ok(CoordinatorClient::new(Channel::from_shared(self.url.clone())?.connect().await?))
    }

    fn wait_synced(&mut self, rt: &Runtime) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, a) in self.agents.iter_mut().enumerate() {
                if !a.running() {
                    bail!("the agent of {} exited:\n{}", node_name(i as u32), self.demo.log_tail(&node_name(i as u32)));
                }
            }
            let s = rt.block_on(async {
                self.client().await?.status(pb::StatusRequest {}).await.map_err(anyhow::Error::from)
            });
            if let Ok(s) = s {
                let s = s.into_inner();
                let synced = s.nodes.iter().filter(|n| n.connected && n.applied_revision == s.revision).count() as u32;
                if synced >= self.demo.args.nodes {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the agents did not connect within 20 s:\n{}", self.demo.log_tail(&node_name(0)));
            }
            host::pause(Duration::from_millis(50))?;
        }
    }

    /// Pushes `version` with `strategy` and follows the rollout to its end, calling
    /// `progress` with each status.
    pub fn rollout(
        &self,
        rt: &Runtime,
        version: &str,
        strategy: pb::StrategySpec,
        mut progress: impl FnMut(&pb::RolloutStatus),
    ) -> anyhow::Result<Duration> {
        let yaml = self.architecture(version)?;
        let started = Instant::now();
        let mut client = rt.block_on(self.client())?;
        rt.block_on(client.push(pb::PushRequest { architecture_yaml: yaml, strategy: Some(strategy) }))
            .map_err(|s| anyhow::anyhow!("push {version}: {}", s.message()))?;
        loop {
            host::pause(Duration::from_millis(100))?;
            let s = rt.block_on(client.status(pb::StatusRequest {}))?.into_inner();
            let Some(r) = s.rollout else { bail!("the rollout vanished") };
            progress(&r);
            match r.state.as_str() {
                "done" => return Ok(started.elapsed()),
                "failed" | "rolled-back" | "aborted" => bail!("rollout to {version} {}: {}", r.state, r.message),
                _ => {}
            }
        }
    }

    fn architecture(&self, version: &str) -> anyhow::Result<String> {
        let svc = host::sibling("hitless-testsvc")?;
        let placement: Vec<String> =
            (0..self.demo.args.nodes).map(|i| format!("{}: {}", node_name(i), self.demo.args.instances)).collect();
        Ok(format!(
            "services:\n  - name: {SERVICE}\n    version: {version}\n    port: 8080\n    vips: [\"{VIP}\"]\n    run: {{ command: [\"{}\", \"--listen\", \"{{address}}:{{port}}\", \"--version\", \"{version}\"] }}\n    health: {{ http: /healthz }}\n    prestop: {{ http: /drain }}\n    drain_deadline: 10s\n    placement: {{ {} }}\n",
            svc.display(),
            placement.join(", ")
        ))
    }

    /// Mirrors the registry into `view` (serving addresses, one per line, as a client
    /// cache would fetch them) and notes when each instance stopped serving.
    pub fn watch_registry(&self, rt: &Runtime, view: PathBuf) -> Arc<Mutex<BTreeMap<String, u64>>> {
        let drains = Arc::new(Mutex::new(BTreeMap::new()));
        let seen = Arc::clone(&drains);
        let url = self.url.clone();
        rt.spawn(async move {
            let Ok(ch) = Channel::from_shared(url).map(|e| e.connect_lazy()) else { return };
            let Ok(stream) = RegistryClient::new(ch).watch(pb::WatchRequest { after_revision: 0 }).await else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(snap)) = stream.message().await {
                let now = now_ms();
                let mut serving = Vec::new();
                for i in snap.instances.iter().filter(|i| i.service == SERVICE) {
                    if i.state == pb::InstanceState::Serving as i32 {
                        serving.push(i.address.clone());
                    } else {
                        super::lock(&seen).entry(format!("{} {}", i.version, i.address)).or_insert(now);
                    }
                }
                let _ = super::publish(&view, &serving);
            }
        });
        drains
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        // Agents first (instances keep running without them), then the datapath, then
        // the cgroups with every instance in them.
        self.agents.clear();
        for i in 0..self.demo.args.nodes {
            let _ = detach(&default_pin_dir(&node_name(i)));
        }
        self.nodes.clear();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            // The server returns within its shutdown grace; do not wait on a runtime here.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !server.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The demo's node names.
pub fn node_name(i: u32) -> String {
    format!("demo-node{i}")
}
