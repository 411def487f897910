//! An in-memory fleet for engine tests: the coordinator's shared state and rollout
//! engine, driven by fake agents that speak to it the way `agent_link` relays a real
//! agent (hello, acks, instance reports), and that can be told to misbehave the way a
//! real agent does around a restart (a report lost, a late one).

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hitless_coordinator::server::{Settings, Shared};
use hitless_coordinator::store::Store;
use hitless_proto::v1::{self as pb, coordinator_message::Msg};
use tokio::sync::mpsc;

use crate::common::report;

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory named after `name` and the process.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hitless-fleet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens the store in `dir` and starts the engine over it, as `hitless coordinator`
/// does (lease and tombstone expiry included).
pub fn coordinator(dir: &std::path::Path, health_timeout: Duration) -> Arc<Shared> {
    let settings = Settings { health_timeout, prometheus_lag: Duration::ZERO, ..Settings::default() };
    coordinator_with(dir, settings).0
}

/// The tasks of a coordinator started by [`coordinator_with`].
pub struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    /// Stops them and waits until they are gone (with them their hold on the store, once
    /// the test drops its `Shared` and the agents too).
    pub async fn stop(self) {
        for t in &self.0 {
            t.abort();
        }
        for t in self.0 {
            let _ = t.await;
        }
    }
}

/// Like [`coordinator`], with `settings`, and the tasks so that a test can stop them (a
/// coordinator restart: stop, drop every `Shared` and agent, open the same `dir` again).
pub fn coordinator_with(dir: &std::path::Path, settings: Settings) -> (Arc<Shared>, Tasks) {
    let store = Store::open(dir).expect("store");
    let state = store.load().expect("load");
    let shared = Shared::new(state, store, settings);
    let expiry = shared.clone();
    let reaper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            expiry.expire_leases();
        }
    });
    let engine = tokio::spawn(hitless_coordinator::engine::run::run(shared.clone()));
    (shared, Tasks(vec![reaper, engine]))
}

/// What a fake agent does with the next start it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStart {
    /// Reports starting, then serving.
    Serve,
    /// Reports starting; the instance becomes healthy but the serving report is lost
    /// (as when the session it was owed on ended: a coordinator restart while the
    /// agent's hello listed it as starting).
    LoseServing,
    /// Reports starting under the operation, then serving under none (as an agent that
    /// restarted and adopted the instance does).
    ServeWithoutOp,
    /// Reports starting, then failed because something outside SIGKILLed it (`killed`).
    Killed,
    /// Reports starting, then failed on its own (it exited with an error).
    Fail,
}

/// One instance a fake agent runs.
#[derive(Debug, Clone)]
pub struct Running {
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// Serving (else starting).
    pub serving: bool,
}

/// The state of a fake agent, shared with the test.
#[derive(Debug, Default)]
pub struct AgentState {
    /// What it runs, by address.
    pub running: BTreeMap<String, Running>,
    /// What it does with the next starts (then `Serve`).
    pub on_start: Vec<OnStart>,
    /// Sessions opened so far.
    pub sessions: u32,
    /// Keep stops without carrying them out (the test answers them from `held`).
    pub hold_stops: bool,
    /// Stops held.
    pub held: Vec<pb::StopInstance>,
    /// Last octet of the next address.
    next: u8,
}

/// A fake agent of `node`; its instances get addresses 127.`net`.0.x:8080.
pub struct Agent {
    /// Node name.
    pub node: String,
    /// Its state.
    pub state: Arc<Mutex<AgentState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Agent {
    /// Connects a fake agent of `node` to `shared`; it redials at once whenever its
    /// session ends.
    pub fn start(shared: &Arc<Shared>, node: &str, net: u8) -> Self {
        let state = Arc::new(Mutex::new(AgentState { next: 1, ..AgentState::default() }));
        Self::resume(shared, node, net, state)
    }

    /// Stops the agent (its session ends unannounced, as when it is killed) and returns
    /// its state, to start it again with [`Agent::resume`].
    pub async fn stop(mut self) -> Arc<Mutex<AgentState>> {
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        task.abort();
        let _ = task.await;
        self.state.clone()
    }

    /// Starts an agent of `node` again with the state it had (what it runs survives it),
    /// connected to `shared` (maybe another coordinator).
    pub fn resume(shared: &Arc<Shared>, node: &str, net: u8, state: Arc<Mutex<AgentState>>) -> Self {
        let (shared, name, st) = (shared.clone(), node.to_owned(), state.clone());
        let task = tokio::spawn(async move {
            loop {
                session(&shared, &name, net, &st).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { node: node.to_owned(), state, task }
    }

    /// Addresses it runs.
    pub fn addresses(&self) -> Vec<String> {
        self.state.lock().expect("state").running.keys().cloned().collect()
    }
}

/// One session: hello with what runs, then acks and operations until the coordinator
/// ends it (its operation channel closes).
async fn session(shared: &Arc<Shared>, node: &str, net: u8, st: &Arc<Mutex<AgentState>>) {
    let session = shared.connect(node, 0);
    let hello: Vec<pb::InstanceReport> = {
        let mut s = st.lock().expect("state");
        s.sessions += 1;
        s.running
            .iter()
            .map(|(a, r)| {
                let phase = if r.serving { pb::InstancePhase::Serving } else { pb::InstancePhase::Starting };
                report(&r.service, &r.version, a, phase, "")
            })
            .collect()
    };
    shared.set_instances(node, hello);
    let (tx, mut ops) = mpsc::channel(256);
    shared.set_ops(node, session, tx);
    let mut published = shared.published.subscribe();
    loop {
        let revision = published.borrow_and_update().revision;
        shared.ack(node, session, &pb::Ack { revision, in_flight: Vec::new(), settled: true });
        tokio::select! {
            _ = published.changed() => {}
            op = ops.recv() => match op.and_then(|m| m.msg) {
                Some(Msg::Start(op)) => {
                    let spec = op.spec.unwrap_or_default();
                    let (address, on_start) = {
                        let mut s = st.lock().expect("state");
                        let a = format!("127.{net}.0.{}:8080", s.next);
                        s.next += 1;
                        let on = if s.on_start.is_empty() { OnStart::Serve } else { s.on_start.remove(0) };
                        s.running.insert(a.clone(), Running { service: spec.service.clone(), version: spec.version.clone(), serving: true });
                        (a, on)
                    };
                    shared.instance_report(node, report(&spec.service, &spec.version, &address, pb::InstancePhase::Starting, &op.op_id));
                    if let OnStart::Killed | OnStart::Fail = on_start {
                        st.lock().expect("state").running.remove(&address);
                        let mut r = report(&spec.service, &spec.version, &address, pb::InstancePhase::Failed, &op.op_id);
                        r.killed = on_start == OnStart::Killed;
                        r.detail = if r.killed { "killed by signal 9" } else { "exited with status 1" }.to_owned();
                        shared.instance_report(node, r);
                        continue;
                    }
                    let op_id = match on_start {
                        OnStart::Serve => Some(op.op_id.as_str()),
                        OnStart::ServeWithoutOp => Some(""),
                        OnStart::LoseServing | OnStart::Killed | OnStart::Fail => None,
                    };
                    if let Some(op_id) = op_id {
                        shared.instance_report(node, report(&spec.service, &spec.version, &address, pb::InstancePhase::Serving, op_id));
                    }
                }
                Some(Msg::Stop(op)) if st.lock().expect("state").hold_stops => {
                    st.lock().expect("state").held.push(op);
                }
                Some(Msg::Stop(op)) => {
                    let gone = st.lock().expect("state").running.remove(&op.address);
                    let version = gone.map(|r| r.version).unwrap_or_default();
                    shared.instance_report(node, report(&op.service, &version, &op.address, pb::InstancePhase::Stopped, &op.op_id));
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    shared.disconnect(node, session);
}

/// An architecture of one service `web` at `version`, `per_node` instances on each node.
pub fn architecture(version: &str, nodes: &[&str], per_node: u32) -> String {
    let placement: Vec<String> = nodes.iter().map(|n| format!("{n}: {per_node}")).collect();
    format!(
        "services:\n  - name: web\n    version: {version}\n    port: 8080\n    vips: [\"127.77.90.1:8080\"]\n    run: {{ command: [\"./web\"] }}\n    drain_deadline: 1s\n    placement: {{ {} }}\n",
        placement.join(", ")
    )
}

/// Pushes `yaml` with `strategy` (and rolling's max surge 1, max unavailable 0).
pub fn push(shared: &Shared, yaml: &str, strategy: &str) {
    push_gated(shared, yaml, strategy, &[]);
}

/// Like [`push`], with gates as the CLI writes them (`1:analysis=1s,1%`).
pub fn push_gated(shared: &Shared, yaml: &str, strategy: &str, gates: &[&str]) {
    let spec = pb::StrategySpec {
        name: strategy.to_owned(),
        max_surge: if strategy == "rolling" { "1".into() } else { String::new() },
        max_unavailable: if strategy == "rolling" { "0".into() } else { String::new() },
        gates: gates.iter().map(|g| (*g).to_owned()).collect(),
        ..Default::default()
    };
    hitless_coordinator::engine::push(
        shared,
        &pb::PushRequest { architecture_yaml: yaml.to_owned(), strategy: Some(spec) },
    )
    .expect("push");
}

/// Waits up to `limit` for the rollout to end; returns its phase and log.
pub async fn wait_end(shared: &Shared, limit: Duration) -> (String, Vec<String>) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(r) = hitless_coordinator::engine::status(shared) {
            if ["done", "failed", "rolled-back"].contains(&r.state.as_str()) {
                return (r.state, r.log);
            }
            assert!(Instant::now() < deadline, "the rollout did not end within {limit:?}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The registry's instances of `web`: (address, state, version).
pub fn registered(shared: &Shared) -> Vec<(String, String, String)> {
    shared
        .snapshot()
        .instances
        .iter()
        .filter(|i| i.service == "web")
        .map(|i| {
            let state = match i.state() {
                pb::InstanceState::Serving => "serving",
                pb::InstanceState::Draining => "draining",
                pb::InstanceState::Down => "down",
            };
            (i.address.clone(), state.to_owned(), i.version.clone())
        })
        .collect()
}

/// A `Stopped` report of `address` of `web` under `op_id`.
pub fn stopped(address: &str, op_id: &str) -> pb::InstanceReport {
    report("web", "v1", address, pb::InstancePhase::Stopped, op_id)
}
