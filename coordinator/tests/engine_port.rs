//! The rollout engine against an in-memory fleet behind its port
//! (`engine::fleet::Fleet`): no sockets, no gRPC, no server state, no store. The fake
//! agents start an instance (starting, then serving) and stop it the moment they are
//! told; the registry is a `RegistryState` in memory. Every strategy the planner knows
//! is replayed to its target, through its gates, and back (a failed analysis, an abort),
//! and a journal of what the fleet saw after each operation checks what each strategy
//! promises: its capacity bounds, and its order (straight stops everything first,
//! blue-green starts everything first and never splits traffic, weighted moves traffic
//! in its steps, gray waits for approval after its first batch).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use hitless_coordinator::engine::fleet::{Fleet, NodeInfo, Running, VersionTotals};
use hitless_coordinator::engine::prometheus::PromUrl;
use hitless_coordinator::engine::record::Rollout;
use hitless_coordinator::registry::{Changes, Key, RegistryError, RegistryState};
use hitless_coordinator::{engine, Strategy};
use hitless_proto::v1::{self as pb, coordinator_message::Msg};
use tokio::sync::{broadcast, Notify};
use tonic::Status;

mod common;

use common::report;

const NODES: [&str; 2] = ["node-a", "node-b"];
/// Instances per node: 4 in all.
const PER_NODE: u32 = 2;
const DESIRED: u32 = PER_NODE * NODES.len() as u32;

/// One operation as the fleet saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// An agent was told to start an instance of `version`.
    Start(String),
    /// A registry change (a registration, a weight, a drain, a burial).
    Registry,
    /// A drain barrier of an instance of `version`.
    Drain(String),
    /// An agent was told to stop an instance of `version`.
    Stop(String),
}

/// The fleet right after an operation.
#[derive(Debug, Clone)]
struct Moment {
    op: Op,
    /// Instances running on a node (starting, serving or draining).
    running: u32,
    /// Per version: the instances taking traffic (running, registered serving, weight
    /// above 0) and the sum of their weights.
    taking: BTreeMap<String, (u32, u64)>,
}

impl Moment {
    fn serving(&self) -> u32 {
        self.taking.values().map(|t| t.0).sum()
    }

    /// The share (percent) of new connections `version` gets.
    fn share(&self, version: &str) -> f64 {
        let total: u64 = self.taking.values().map(|t| t.1).sum();
        let mine = self.taking.get(version).map_or(0, |t| t.1);
        if total == 0 {
            0.0
        } else {
            mine as f64 * 100.0 / total as f64
        }
    }
}

/// The fleet in memory: the registry, the rollout's record, and one fake agent per node
/// that does at once what it is told.
#[derive(Default)]
struct MemFleet {
    registry: Mutex<RegistryState>,
    rollout: Mutex<Option<Rollout>>,
    wake: Notify,
    running: Mutex<Running>,
    reports: Option<broadcast::Sender<(String, pb::InstanceReport)>>,
    next_address: Mutex<u32>,
    journal: Mutex<Vec<Moment>>,
    /// What must not happen (a stop of an instance that does not run, an operation for
    /// a node that does not exist), as it happened.
    problems: Mutex<Vec<String>>,
    /// Versions whose connects fail (for analysis gates).
    failing: Mutex<BTreeSet<String>>,
    totals: Mutex<VersionTotals>,
    /// Each set of services the engine asked summaries for, in order.
    summaries: Mutex<Vec<BTreeSet<String>>>,
    /// Records saved so far.
    saves: Mutex<u32>,
}

/// More records than any rollout here saves: past it, the engine is going round a
/// step that changes nothing. The save panics, which ends the engine's task: a loop
/// that never waits could not be stopped otherwise (nor the test's runtime).
const MAX_SAVES: u32 = 2_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("a test lock")
}

impl MemFleet {
    fn new() -> Arc<Self> {
        let (reports, _) = broadcast::channel(4096);
        Arc::new(Self { reports: Some(reports), ..Self::default() })
    }

    /// Notes the fleet as it is after `op`. Locks: registry, then running.
    fn note(&self, op: Op) {
        let registry = lock(&self.registry);
        let running = lock(&self.running);
        let mut taking: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let mut count = 0;
        for (address, r) in running.values().flatten() {
            count += 1;
            let registered = registry.instance(&(r.service.clone(), address.clone()));
            if let Some(i) = registered.filter(|i| i.state() == pb::InstanceState::Serving && i.weight > 0) {
                let t = taking.entry(r.version.clone()).or_default();
                t.0 += 1;
                t.1 += u64::from(i.weight);
            }
        }
        drop((registry, running));
        lock(&self.journal).push(Moment { op, running: count, taking });
    }

    fn problem(&self, what: String) {
        lock(&self.problems).push(what);
    }

    fn send(&self, node: &str, report: pb::InstanceReport) {
        if let Some(tx) = &self.reports {
            let _ = tx.send((node.to_owned(), report));
        }
    }

    /// Forgets the journal (after a first deploy).
    fn forget(&self) {
        lock(&self.journal).clear();
    }

    fn journal(&self) -> Vec<Moment> {
        lock(&self.journal).clone()
    }
}

impl Fleet for MemFleet {
    fn rollout(&self) -> Option<Rollout> {
        lock(&self.rollout).clone()
    }

    fn save_rollout(&self, r: &Rollout) -> Result<(), Status> {
        let saves = {
            let mut n = lock(&self.saves);
            *n += 1;
            *n
        };
        assert!(
            saves <= MAX_SAVES,
            "{MAX_SAVES} records saved: the engine repeats a step that changes nothing ({} at step {}: {:?})",
            r.strategy.name,
            r.step,
            r.log.last()
        );
        *lock(&self.rollout) = Some(r.clone());
        self.wake.notify_one();
        Ok(())
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    fn revision(&self) -> u64 {
        lock(&self.registry).revision()
    }

    fn snapshot(&self) -> Arc<pb::Snapshot> {
        Arc::new(lock(&self.registry).snapshot())
    }

    fn instance(&self, key: &Key) -> Option<pb::Instance> {
        lock(&self.registry).instance(key).cloned()
    }

    fn mutate<C>(&self, change: C) -> Result<u64, Status>
    where
        C: FnOnce(&RegistryState) -> Result<Changes, RegistryError>,
    {
        let (revision, changed) = {
            let mut registry = lock(&self.registry);
            let changes = change(&registry).map_err(Status::from)?;
            (registry.commit(&changes), !changes.is_empty())
        };
        if changed {
            self.note(Op::Registry);
        }
        Ok(revision)
    }

    fn bury(&self, key: &Key) -> Result<u64, Status> {
        self.mutate(|s| s.set_state(key, pb::InstanceState::Down))
    }

    fn barrier(
        &self,
        key: Key,
        state: pb::InstanceState,
        _timeout: Duration,
    ) -> impl Future<Output = Result<pb::DrainResponse, Status>> + Send {
        // Every agent applies at once: the barrier is complete as soon as it is decided.
        let version = self.instance(&key).map(|i| i.version).unwrap_or_default();
        let result = self.mutate(|s| s.set_state(&key, state)).map(|revision| {
            let nodes = NODES
                .iter()
                .map(|n| pb::NodeAck { node: (*n).to_owned(), acked: true, latency_us: 0, connected: true })
                .collect();
            pb::DrainResponse { revision, nodes, complete: true }
        });
        if state == pb::InstanceState::Draining {
            self.note(Op::Drain(version));
        }
        std::future::ready(result)
    }

    fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        let revision = self.revision();
        NODES
            .iter()
            .map(|n| {
                let info = NodeInfo {
                    session: 1,
                    connected: true,
                    applied: revision,
                    last_contact: UNIX_EPOCH,
                    settled: revision,
                    in_flight: BTreeMap::new(),
                };
                ((*n).to_owned(), info)
            })
            .collect()
    }

    fn running(&self) -> Running {
        lock(&self.running).clone()
    }

    fn reports(&self) -> broadcast::Receiver<(String, pb::InstanceReport)> {
        self.reports.as_ref().expect("made by MemFleet::new").subscribe()
    }

    fn send_op(&self, node: &str, msg: Msg) -> Result<(), String> {
        let Some(n) = NODES.iter().position(|x| *x == node) else {
            self.problem(format!("an operation for {node}, which is no node"));
            return Err(format!("node {node} has no agent connected"));
        };
        match msg {
            Msg::Start(op) => {
                let spec = op.spec.unwrap_or_default();
                let address = {
                    let mut next = lock(&self.next_address);
                    *next += 1;
                    format!("127.0.{}.{}:{}", n + 1, *next, spec.port)
                };
                let starting = report(&spec.service, &spec.version, &address, pb::InstancePhase::Starting, &op.op_id);
                lock(&self.running).entry(node.to_owned()).or_default().insert(address.clone(), starting.clone());
                self.send(node, starting);
                self.note(Op::Start(spec.version.clone()));
                let serving = report(&spec.service, &spec.version, &address, pb::InstancePhase::Serving, &op.op_id);
                lock(&self.running).entry(node.to_owned()).or_default().insert(address, serving.clone());
                self.send(node, serving);
            }
            Msg::Stop(op) => {
                let gone = lock(&self.running).get_mut(node).and_then(|m| m.remove(&op.address));
                let version = match gone {
                    Some(r) => r.version,
                    None => {
                        self.problem(format!("a stop of {} on {node}, which runs no such instance", op.address));
                        String::new()
                    }
                };
                self.note(Op::Stop(version.clone()));
                self.send(node, report(&op.service, &version, &op.address, pb::InstancePhase::Stopped, &op.op_id));
            }
            other => self.problem(format!("an operation the engine does not send: {other:?}")),
        }
        Ok(())
    }

    fn resync(&self, node: &str) -> bool {
        self.problem(format!("a resync of {node}: no report of this fleet is ever lost"));
        false
    }

    fn want_summaries(&self, services: BTreeSet<String>) {
        lock(&self.summaries).push(services);
    }

    /// Each call counts 100 more connects to every instance taking traffic; those of a
    /// failing version all fail.
    fn version_totals(&self) -> VersionTotals {
        let last = lock(&self.journal).last().cloned();
        let failing = lock(&self.failing).clone();
        let mut totals = lock(&self.totals);
        for (version, (n, _)) in last.map(|m| m.taking).unwrap_or_default() {
            let t = totals.entry(("web".to_owned(), version.clone())).or_default();
            if failing.contains(&version) {
                t.1 += 100 * u64::from(n);
            } else {
                t.0 += 100 * u64::from(n);
            }
        }
        totals.clone()
    }

    fn prometheus(&self) -> Option<(&PromUrl, Duration)> {
        None
    }

    fn health_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// The architecture: `web` at `version`, [`PER_NODE`] instances on each node.
fn architecture(version: &str) -> String {
    let placement: Vec<String> = NODES.iter().map(|n| format!("{n}: {PER_NODE}")).collect();
    format!(
        "services:\n  - name: web\n    version: {version}\n    port: 8080\n    run: {{ command: [\"./web\"] }}\n    placement: {{ {} }}\n",
        placement.join(", ")
    )
}

/// The engine running over a fresh in-memory fleet; it stops when dropped.
struct Engine {
    fleet: Arc<MemFleet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Engine {
    fn start() -> Self {
        let fleet = MemFleet::new();
        let task = tokio::spawn(engine::run::run(fleet.clone()));
        Self { fleet, task }
    }

    /// Pushes `web` at `version` with `strategy` and `gates` (as the CLI writes them).
    fn push(&self, version: &str, strategy: &str, gates: &[&str]) {
        let spec = pb::StrategySpec {
            name: strategy.to_owned(),
            gates: gates.iter().map(|g| (*g).to_owned()).collect(),
            ..Default::default()
        };
        let req = pb::PushRequest { architecture_yaml: architecture(version), strategy: Some(spec) };
        engine::push(&*self.fleet, &req).expect("push");
    }

    /// Waits until the rollout ends or waits at a gate; returns its status.
    async fn settle(&self) -> pb::RolloutStatus {
        let start = Instant::now();
        loop {
            let r = engine::status(&*self.fleet).expect("a rollout");
            if ["done", "failed", "rolled-back", "waiting"].contains(&r.state.as_str()) {
                return r;
            }
            assert!(!self.task.is_finished(), "the engine's task ended (it panicked: see above)");
            // A bound on the wait, not a timing goal: a rollout here takes milliseconds
            // (seconds with an analysis window).
            assert!(start.elapsed() < Duration::from_secs(120), "the rollout never settled: {r:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Pushes, promotes at every approval gate, and returns the end state and how many
    /// gates it waited at.
    async fn roll(&self, version: &str, strategy: &str, gates: &[&str]) -> (pb::RolloutStatus, u32) {
        self.push(version, strategy, gates);
        let mut waited = 0;
        loop {
            let r = self.settle().await;
            if r.state != "waiting" {
                return (r, waited);
            }
            waited += 1;
            assert!(waited <= 10, "it waits at gate after gate: {r:?}");
            self.on_gate(&r);
            engine::promote(&*self.fleet).expect("promote");
        }
    }

    /// Checks what a rollout waiting at a gate has done so far (gray: its first batch).
    fn on_gate(&self, r: &pb::RolloutStatus) {
        if r.strategy == "gray" {
            let last = self.fleet.journal().last().cloned().expect("steps before the gate");
            let new: u32 = last.taking.iter().filter(|(v, _)| *v != "v1").map(|(_, t)| t.0).sum();
            assert_eq!(new, 1, "gray's first batch is one instance, then it waits: {last:?}");
        }
    }

    /// Asserts the fleet runs exactly `version`: [`DESIRED`] instances, each registered
    /// serving, each node its share; nothing else running, nothing else serving, and no
    /// operation that must not happen.
    fn assert_runs_only(&self, version: &str, log: &[String]) {
        let f = &self.fleet;
        assert_eq!(*lock(&f.problems), Vec::<String>::new(), "{log:?}");
        let running = f.running();
        for node in NODES {
            let here: Vec<&pb::InstanceReport> = running.get(node).map(|m| m.values().collect()).unwrap_or_default();
            assert_eq!(here.len() as u32, PER_NODE, "{node} runs {here:?}; {log:?}");
            assert!(here.iter().all(|r| r.version == version), "{node} runs another version: {here:?}");
        }
        let snapshot = f.snapshot();
        let serving: Vec<&pb::Instance> =
            snapshot.instances.iter().filter(|i| i.state() != pb::InstanceState::Down).collect();
        assert_eq!(serving.len() as u32, DESIRED, "registered and not down: {serving:?}");
        for i in serving {
            assert!(
                i.state() == pb::InstanceState::Serving && i.version == version && i.weight > 0,
                "registered but not serving {version} with traffic: {i:?}"
            );
            assert!(
                running.get(&i.node).is_some_and(|m| m.contains_key(&i.address)),
                "registered but not running (orphaned): {i:?}"
            );
        }
        // Every instance stopped is kept down (a tombstone), none still draining.
        let down = snapshot.instances.iter().filter(|i| i.state() == pb::InstanceState::Down);
        for i in down {
            assert!(!running.values().any(|m| m.contains_key(&i.address)), "down but still running: {i:?}");
        }
    }
}

/// Index of the first and last moments whose op matches.
fn span(journal: &[Moment], f: impl Fn(&Op) -> bool) -> Option<(usize, usize)> {
    let first = journal.iter().position(|m| f(&m.op))?;
    let last = journal.iter().rposition(|m| f(&m.op))?;
    Some((first, last))
}

/// What `name` promises about its order, checked on the journal of a v1 → v2 rollout.
fn assert_order(name: &str, journal: &[Moment]) {
    let starts = span(journal, |o| *o == Op::Start("v2".into())).expect("v2 started");
    let stops = span(journal, |o| *o == Op::Stop("v1".into())).expect("v1 stopped");
    let drains = span(journal, |o| *o == Op::Drain("v1".into())).expect("v1 drained");
    match name {
        "straight" => {
            assert!(stops.1 < starts.0, "straight stops every v1 before it starts a v2: {journal:#?}");
        }
        "blue-green" => {
            assert!(starts.1 < drains.0, "blue-green starts every v2 before it drains a v1: {journal:#?}");
            let split = journal.iter().find(|m| m.taking.len() > 1);
            assert!(split.is_none(), "blue-green never sends traffic to both versions: {split:?}");
            let switched = journal.iter().position(|m| m.share("v2") == 100.0).expect("the switch");
            assert!(switched < drains.0, "the switch comes before any drain: {journal:#?}");
        }
        "weighted" => {
            assert!(starts.1 < drains.0, "weighted starts every v2 before it drains a v1: {journal:#?}");
            let mut seen: Vec<u32> = journal.iter().map(|m| m.share("v2").round() as u32).filter(|s| *s > 0).collect();
            seen.dedup();
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "the new version's share only grows: {seen:?}");
            for step in [5, 25, 50, 100] {
                assert!(seen.contains(&step), "weighted passes {step} %: {seen:?}");
            }
            let before_drain = journal[..drains.0].iter().map(|m| m.share("v2")).fold(0.0, f64::max);
            assert!(before_drain >= 50.0, "the old version is drained only at the last step: {journal:#?}");
        }
        "mixed" | "gray" => {
            assert!(starts.0 < drains.0, "{name} starts a new instance before it drains an old one: {journal:#?}");
        }
        "canary" => {
            assert!(drains.0 < starts.0, "canary takes one out before it puts one in: {journal:#?}");
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_deploys_then_replaces_a_version_keeping_its_promises() {
    for name in Strategy::NAMES {
        let e = Engine::start();
        // A first deploy, from nothing.
        let (r, _) = e.roll("v1", name, &[]).await;
        assert_eq!(r.state, "done", "{name}: first deploy: {r:?}");
        e.assert_runs_only("v1", &r.log);

        e.fleet.forget();
        let (r, gates) = e.roll("v2", name, &[]).await;
        assert_eq!(r.state, "done", "{name}: v1 -> v2: {r:?}");
        e.assert_runs_only("v2", &r.log);
        assert_eq!(gates, u32::from(name == "gray"), "{name}: gates waited at: {r:?}");

        let journal = e.fleet.journal();
        let strategy = Strategy::from_name(name).and_then(|s| s.validated().ok()).expect("a strategy");
        let promise = strategy.promise(DESIRED);
        let fewest = journal.iter().map(Moment::serving).min().expect("a journal");
        assert!(fewest >= promise.min_serving, "{name}: {fewest} serving, below {promise:?}: {journal:#?}");
        if let Some(most) = promise.max_total {
            let peak = journal.iter().map(|m| m.running).max().expect("a journal");
            assert!(peak <= most, "{name}: {peak} running, above {promise:?}: {journal:#?}");
        }
        assert_order(name, &journal);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analysis_gate_passes_a_good_version_and_rolls_a_failing_one_back() {
    let e = Engine::start();
    let (r, _) = e.roll("v1", "straight", &[]).await;
    assert_eq!(r.state, "done", "{r:?}");

    let (r, _) = e.roll("v2", "rolling", &["1:analysis=1s,5%"]).await;
    assert_eq!(r.state, "done", "a version whose connects succeed passes: {r:?}");
    e.assert_runs_only("v2", &r.log);
    let asked = lock(&e.fleet.summaries).clone();
    let web: BTreeSet<String> = ["web".to_owned()].into();
    assert_eq!(asked, [web.clone(), BTreeSet::new()], "summaries asked for the window only");

    lock(&e.fleet.failing).insert("v3".into());
    let (r, _) = e.roll("v3", "rolling", &["1:analysis=1s,5%"]).await;
    assert_eq!(r.state, "rolled-back", "a version whose connects fail is rolled back: {r:?}");
    assert!(r.log.iter().any(|l| l.contains("gate failed") && l.contains("web v3")), "{r:?}");
    e.assert_runs_only("v2", &r.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_at_an_approval_gate_returns_to_the_last_completed_architecture() {
    let e = Engine::start();
    let (r, _) = e.roll("v1", "rolling", &[]).await;
    assert_eq!(r.state, "done", "{r:?}");

    e.push("v2", "rolling", &["1:approval"]);
    let r = e.settle().await;
    assert_eq!(r.state, "waiting", "{r:?}");
    let new = e.fleet.journal().last().map(|m| m.taking.get("v2").map_or(0, |t| t.0));
    assert!(new.is_some_and(|n| n > 0 && n < DESIRED), "one step of v2, then the gate: {new:?}");

    engine::abort(&*e.fleet).expect("abort");
    let r = e.settle().await;
    assert_eq!(r.state, "rolled-back", "{r:?}");
    e.assert_runs_only("v1", &r.log);
}
