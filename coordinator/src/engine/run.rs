//! The rollout engine's loop: observe what runs, decide the next step ([`decide`]),
//! carry it out through the agents, record it, repeat until the target runs.
//!
//! Every step is recorded in the store after it acts, and every operation is
//! idempotent (an instance already started is awaited, one already draining is stopped),
//! so a coordinator killed at any moment and restarted re-observes and carries on.
//!
//! [`decide`]: super::decide

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_model::registry::{Policy, Protocol};
use hitless_model::{Architecture, Health, InstanceState, PreStop};
use hitless_proto::v1::{self as pb, coordinator_message::Msg};
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use super::decide::{next_step, Observed, ServiceOps};
use super::fleet::{may_steer, Fleet};
use super::record::{Phase, Rollout};
use crate::strategy::{Gate, Inconclusive};
use crate::target::Target;

/// Longest wait for a new instance to become healthy, unless the coordinator is told
/// otherwise (`hitless coordinator --health-timeout`).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Drain deadline when the architecture gives none.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// Time between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);

/// Runs rollouts forever.
pub async fn run<F: Fleet>(fleet: Arc<F>) {
    let mut interruptions = 0;
    loop {
        let woken = fleet.wake().notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let Some(mut r) = fleet.rollout().filter(|r| r.phase.is_active()) else {
            woken.await;
            continue;
        };
        let started = Instant::now();
        let result = match step(&*fleet, &r).await {
            Err(StepError::Interrupted(why)) if interruptions < MAX_INTERRUPTIONS => {
                interruptions += 1;
                info!(rollout = %r.id, step = r.step + 1, %why, "step interrupted; observing again");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(StepError::Interrupted(why)) => {
                Err(format!("{why} ({MAX_INTERRUPTIONS} times in a row: is an agent restarting in a loop?)"))
            }
            Err(StepError::Failed(e)) => Err(e),
            Ok(o) => Ok(o),
        };
        // The step is over; its outcome is not recorded yet.
        crate::failpoint!("coordinator.engine.step.after");
        interruptions = 0;
        // A push, pause or abort may have replaced the record while the step ran.
        if let Some(now) = fleet.rollout() {
            if now.id != r.id || now.target_yaml != r.target_yaml || now.phase != r.phase {
                r = now;
                if let Ok(Outcome::Stepped { .. }) = &result {
                    r.step += 1;
                }
                let _ = fleet.save_rollout(&r);
                continue;
            }
        }
        match result {
            Ok(Outcome::Done) => {
                let back = r.message.starts_with("abort") || r.message.starts_with("rollback");
                r.phase = if back { Phase::RolledBack } else { Phase::Done };
                r.previous_yaml = Some(r.target_yaml.clone());
                r.note(format!("target reached after {} steps", r.step));
                info!(rollout = %r.id, steps = r.step, "rollout done");
            }
            Ok(Outcome::Stepped { gate, line, stops }) => {
                step_done(&mut r, &line, &stops, started);
                if let Some(Gate::Approval) = gate {
                    r.phase = Phase::Waiting;
                    r.message = format!("approval after step {}: hitless promote (or abort)", r.step);
                }
                info!(rollout = %r.id, step = r.step, "step done");
            }
            Ok(Outcome::Held { line, stops, why }) => {
                step_done(&mut r, &line, &stops, started);
                r.note(format!("gate held: {why}"));
                r.phase = Phase::Waiting;
                r.message = format!("{why}: hitless promote to go on (or abort)");
                warn!(rollout = %r.id, step = r.step, %why, "analysis inconclusive: holding for an operator");
            }
            Ok(Outcome::GateFailed { line, why }) => {
                step_done(&mut r, &line, &[], started);
                r.note(format!("gate failed: {why}"));
                warn!(rollout = %r.id, step = r.step, %why, "analysis gate failed: rolling back");
                match r.previous_yaml.clone() {
                    Some(back) => {
                        r.target_yaml = back;
                        r.message = format!("rollback: {why}");
                    }
                    None => {
                        r.phase = Phase::Failed;
                        r.message = format!("gate failed and there is no previous architecture to return to: {why}");
                    }
                }
            }
            Err(e) => {
                warn!(rollout = %r.id, step = r.step + 1, error = %e, "rollout failed");
                r.phase = Phase::Failed;
                r.message = e.clone();
                r.note(format!("step {} failed: {e}", r.step + 1));
            }
        }
        if let Err(e) = fleet.save_rollout(&r) {
            warn!(error = %e, "could not record the rollout; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Counts a step that acted as done and logs it, with its time since `started` and the
/// instances it stopped.
fn step_done(r: &mut Rollout, line: &str, stops: &[String], started: Instant) {
    r.step += 1;
    r.note(format!("step {}: {line} ({} ms)", r.step, started.elapsed().as_millis()));
    for s in stops {
        r.note(format!("  stopped {s}"));
    }
}

/// Why a step did not finish.
#[derive(Debug)]
enum StepError {
    /// It cannot go on: the rollout fails with this message.
    Failed(String),
    /// An agent restarted mid-step, so the reports it owed for operations of its old
    /// session will never come: observe again and carry on from what really runs.
    Interrupted(String),
}

/// A step's error, injected by fail point `fp`.
#[cfg(feature = "failpoints")]
fn injected(fp: &str) -> StepError {
    StepError::Failed(format!("injected by failpoint {fp}"))
}

impl From<String> for StepError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

/// How often a wait for agents' reports checks that their sessions are still the ones
/// that were sent the operations.
const SESSION_CHECK: Duration = Duration::from_millis(100);

/// Each node's session in force.
fn sessions<F: Fleet>(fleet: &F) -> BTreeMap<String, u64> {
    fleet.nodes().into_iter().map(|(n, i)| (n, i.session)).collect()
}

/// `Interrupted` when the agent of one of `nodes` went away or is not the session that
/// was sent the operations (it restarted, and the reports it owed are lost).
fn same_sessions<'a, F: Fleet>(
    fleet: &F,
    sent: &BTreeMap<String, u64>,
    mut nodes: impl Iterator<Item = &'a str>,
    doing: &str,
) -> Result<(), StepError> {
    let now = fleet.nodes();
    match nodes.find(|n| !now.get(*n).is_some_and(|i| i.connected && sent.get(*n) == Some(&i.session))) {
        Some(n) => Err(StepError::Interrupted(format!("the agent of {n} restarted while {doing}"))),
        None => Ok(()),
    }
}

/// Consecutive interrupted attempts of one step before the rollout fails.
const MAX_INTERRUPTIONS: u32 = 50;

enum Outcome {
    Done,
    Stepped {
        gate: Option<Gate>,
        line: String,
        stops: Vec<String>,
    },
    /// The step's analysis gate failed: roll back.
    GateFailed {
        line: String,
        why: String,
    },
    /// The step's analysis had nothing to judge and its gate holds: wait for an
    /// operator, saying why.
    Held {
        line: String,
        stops: Vec<String>,
        why: String,
    },
}

/// What an analysis concluded when nothing failed it.
enum Judgement {
    /// Every judged version stayed within the limit.
    Pass,
    /// Nothing to judge (no connects to the new version, or no series of it): why.
    Inconclusive(String),
}

/// What runs, for the services of `arch` and any service with instances run by agents.
pub fn observe<F: Fleet>(fleet: &F) -> Vec<Observed> {
    let mut out = Vec::new();
    for (node, instances) in fleet.running() {
        for r in instances.values() {
            let key = (r.service.clone(), r.address.clone());
            let registered = fleet.instance(&key);
            let state = match r.phase() {
                pb::InstancePhase::Starting => InstanceState::Starting,
                pb::InstancePhase::Stopping => InstanceState::Stopping,
                pb::InstancePhase::Serving => match registered.as_ref().map(pb::Instance::state) {
                    Some(pb::InstanceState::Draining | pb::InstanceState::Down) => InstanceState::Draining,
                    // Healthy but not registered yet (a coordinator killed in between):
                    // still coming up from the rollout's point of view.
                    None => InstanceState::Starting,
                    Some(pb::InstanceState::Serving) => InstanceState::Serving,
                },
                _ => continue,
            };
            out.push(Observed {
                service: r.service.clone(),
                version: r.version.clone(),
                node: node.clone(),
                address: r.address.clone(),
                state,
                weight: registered.map_or(hitless_model::DEFAULT_WEIGHT, |i| i.weight),
            });
        }
    }
    out
}

async fn step<F: Fleet>(fleet: &F, r: &Rollout) -> Result<Outcome, StepError> {
    let arch = r.target()?;
    let target = Target::new(&arch);
    let (strategy, gates) = r.strategy.build().map_err(|p| p.join("; "))?;
    ensure_services(fleet, &arch)?;
    wait_for_nodes(fleet).await?;
    let observed = observe(fleet);
    crate::failpoint!("coordinator.engine.step.before", |fp| injected(fp));
    let Some(step) = next_step(&observed, &target, &strategy) else { return Ok(Outcome::Done) };
    let mut line = Vec::new();
    let mut stops = Vec::new();
    for (service, ops) in &step.services {
        let svc = arch.services.iter().find(|s| s.name == *service);
        stops.extend(execute(fleet, r, service, svc, ops, &observed).await?);
        line.push(format!("{service}: +{} -{} weights {}", ops.start.len(), ops.stop.len(), ops.weights.len()));
    }
    let next = r.step as usize + 1;
    let gate = step.gate.or_else(|| gates.iter().find(|g| g.step == next).map(|g| g.gate.clone()));
    // The way back (a rollback or an abort) passes no gate: it must not stop half-way.
    let rolling_back = r.message.starts_with("rollback") || r.message.starts_with("abort");
    if rolling_back {
        return Ok(Outcome::Stepped { gate: None, line: line.join(", "), stops });
    }
    if let Some(Gate::Analysis { window, max_error_permille, inconclusive }) = &gate {
        let line = line.join(", ");
        return Ok(match analyse(fleet, &arch, &step.services, window.to_std(), *max_error_permille, next).await {
            Err(why) => Outcome::GateFailed { line, why },
            Ok(Judgement::Pass) => Outcome::Stepped { gate: None, line, stops },
            Ok(Judgement::Inconclusive(why)) => match inconclusive {
                Inconclusive::Hold => Outcome::Held { line, stops, why },
                Inconclusive::Pass => {
                    Outcome::Stepped { gate: None, line: format!("{line}; {why}, passed as the gate says"), stops }
                }
                Inconclusive::Fail => Outcome::GateFailed { line, why: format!("{why}, failed as the gate says") },
            },
        });
    }
    Ok(Outcome::Stepped { gate, line: line.join(", "), stops })
}

/// Watches the new version of the step's services for `window`: the share of its connects
/// (from every node's clients) that failed or were reset must stay at or under the limit.
/// The counts come from the agents' summaries, or from Prometheus when one is
/// configured: the increase of the same kernel counters over the window, queried once
/// the server's scrape lag has passed. A server that cannot answer fails the gate, so a
/// rollout never goes on unjudged.
async fn analyse<F: Fleet>(
    fleet: &F,
    arch: &Architecture,
    services: &BTreeMap<String, ServiceOps>,
    window: Duration,
    max_permille: u32,
    step: usize,
) -> Result<Judgement, String> {
    let judged: Vec<&hitless_model::Service> =
        arch.services.iter().filter(|s| services.contains_key(&s.name)).collect();
    // (errors, attempts) of each judged service (None: no series), and where from.
    let mut counts: Vec<(u64, Option<u64>)> = Vec::new();
    let source = match fleet.prometheus() {
        Some((url, lag)) => {
            tokio::time::sleep(window).await;
            let end = std::time::SystemTime::now();
            tokio::time::sleep(lag).await;
            let asked = |e: super::prometheus::QueryError| format!("analysis after step {step}: {e}");
            for s in &judged {
                let (errors_q, attempts_q) = super::prometheus::failure_queries(&s.name, &s.version, window);
                let errors = url.query(&errors_q, end).await.map_err(asked)?.unwrap_or(0.0).round() as u64;
                let attempts = url.query(&attempts_q, end).await.map_err(asked)?.map(|a| a.round() as u64);
                counts.push((errors, attempts));
            }
            format!(" (prometheus {url})")
        }
        None => {
            // Ask the agents for these services' counters for the window (and no longer
            // than it: see SummariesWanted), and let one round of them arrive first, so
            // that `before` is not an old total.
            let _wanted = SummariesWanted::ask(fleet, judged.iter().map(|s| s.name.clone()));
            tokio::time::sleep(SUMMARY_ROUND).await;
            let before = fleet.version_totals();
            tokio::time::sleep(window).await;
            // Agents report every second: wait for one more report to cover the window's end.
            tokio::time::sleep(SUMMARY_ROUND).await;
            let after = fleet.version_totals();
            for s in &judged {
                let key = (s.name.clone(), s.version.clone());
                let (c0, f0, r0) = before.get(&key).copied().unwrap_or_default();
                let (c1, f1, r1) = after.get(&key).copied().unwrap_or_default();
                let attempts = (c1 - c0.min(c1)) + (f1 - f0.min(f1));
                let errors = (f1 - f0.min(f1)) + (r1 - r0.min(r1));
                counts.push((errors, Some(attempts)));
            }
            String::new()
        }
    };
    let verdict = Verdict { step, source: &source, window, max_permille };
    let mut unjudged = Vec::new();
    for (s, (errors, attempts)) in judged.into_iter().zip(counts) {
        match attempts {
            None => unjudged.push(format!("{} {}: no series", s.name, s.version)),
            Some(0) => unjudged.push(format!("{} {}: no connects", s.name, s.version)),
            Some(attempts) => verdict.judge(s, errors, attempts)?,
        }
    }
    if unjudged.is_empty() {
        return Ok(Judgement::Pass);
    }
    info!(step, source = %source, unjudged = ?unjudged, "analysis: nothing to judge");
    Ok(Judgement::Inconclusive(format!(
        "analysis after step {step}{source} inconclusive over {window:?}: {}",
        unjudged.join("; ")
    )))
}

/// A little more than the agents' summary interval (1 s).
const SUMMARY_ROUND: Duration = Duration::from_millis(1100);

/// The agents send the counters of these services while this lives (an analysis
/// window), none once it is dropped: idle agents read no counters for summaries.
struct SummariesWanted<'a, F: Fleet>(&'a F);

impl<'a, F: Fleet> SummariesWanted<'a, F> {
    fn ask(fleet: &'a F, services: impl IntoIterator<Item = String>) -> Self {
        fleet.want_summaries(services.into_iter().collect());
        Self(fleet)
    }
}

impl<F: Fleet> Drop for SummariesWanted<'_, F> {
    fn drop(&mut self) {
        self.0.want_summaries(std::collections::BTreeSet::new());
    }
}

/// An analysis gate's judgement of the counts of one window.
struct Verdict<'a> {
    step: usize,
    /// Where the counts came from, for the message ("" for the agents' own).
    source: &'a str,
    window: Duration,
    max_permille: u32,
}

impl Verdict<'_> {
    /// Fails when more than the allowed share of `attempts` (not 0) were `errors`.
    fn judge(&self, s: &hitless_model::Service, errors: u64, attempts: u64) -> Result<(), String> {
        let permille = errors * 1000 / attempts;
        info!(service = %s.name, version = %s.version, source = self.source, attempts, errors, permille, "analysis");
        if permille <= u64::from(self.max_permille) {
            return Ok(());
        }
        Err(format!(
            "analysis after step {}{}: {} {}: {errors} of {attempts} connects failed or were reset ({:.1} %) over {:?}, above the {:.1} % allowed",
            self.step,
            self.source,
            s.name,
            s.version,
            permille as f64 / 10.0,
            self.window,
            f64::from(self.max_permille) / 10.0
        ))
    }
}

/// Longest wait for the agents of nodes that run instances to (re)connect.
pub const NODE_WAIT: Duration = Duration::from_secs(30);

/// Waits until every node of the roster, and every node that runs registered instances,
/// has its agent connected: what runs is only known from the agents, and deciding
/// without a node's report would start its instances a second time (after a coordinator
/// restart, agents take a moment to redial). The roster is stored, so a node whose agent
/// is away while the coordinator restarts is waited for all the same.
async fn wait_for_nodes<F: Fleet>(fleet: &F) -> Result<(), String> {
    let deadline = Instant::now() + NODE_WAIT;
    loop {
        let running: std::collections::BTreeSet<String> = fleet
            .snapshot()
            .instances
            .iter()
            .filter(|i| !i.node.is_empty() && i.state() != pb::InstanceState::Down)
            .map(|i| i.node.clone())
            .collect();
        let nodes = fleet.nodes();
        let connected = |n: &String| nodes.get(n).is_some_and(|x| x.connected);
        let (with, without): (Vec<&String>, Vec<&String>) = nodes
            .keys()
            .chain(running.iter().filter(|n| !nodes.contains_key(*n)))
            .filter(|n| !connected(n))
            .partition(|n| running.contains(*n));
        if with.is_empty() && without.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let names = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            let mut why = Vec::new();
            if !with.is_empty() {
                why.push(format!(
                    "nodes {} run instances but their agents are not connected; start them or move the instances",
                    names(&with)
                ));
            }
            if !without.is_empty() {
                why.push(format!(
                    "nodes {} of the roster have no agent connected (within {NODE_WAIT:?}); start their agents, or retire a node that is gone with `hitless node remove NODE`",
                    names(&without)
                ));
            }
            return Err(why.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node that may steer connects to the instance holds `revision`:
/// the barrier counts connected agents only, but a node whose agent is down keeps
/// steering with its last maps (pinned), so stopping the instance before that agent
/// is back and has applied the drain would refuse that node's clients. The nodes are
/// those of the roster (stored: it outlives a coordinator restart, and only an
/// operator's `hitless node remove` shortens it) and those that run instances.
async fn applied_everywhere<F: Fleet>(fleet: &F, revision: u64, address: &str) -> Result<(), String> {
    let deadline = Instant::now() + NODE_WAIT;
    loop {
        let nodes = fleet.nodes();
        let behind: Vec<String> = may_steer(&nodes, &fleet.snapshot())
            .into_iter()
            .filter(|n| !nodes.get(n).is_some_and(|x| x.connected && x.applied >= revision))
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "drain of {address} not applied by {} within {NODE_WAIT:?} (agent disconnected): not stopping an instance their clients may still be steered to; restart the agents, or retire a node that is gone with `hitless node remove NODE`",
                behind.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The registry carries every target service with its VIPs. A new service gets the
/// protocol and policy the architecture names (TCP and steer when it names none); an
/// existing one keeps what the registry holds (`registry apply` may have set it) unless
/// the architecture names another.
fn ensure_services<F: Fleet>(fleet: &F, arch: &Architecture) -> Result<(), String> {
    for s in &arch.services {
        fleet
            .mutate(|st| {
                let held = st.service(&s.name);
                let svc = pb::Service {
                    name: s.name.clone(),
                    vips: s.vips.iter().map(ToString::to_string).collect(),
                    protocol: match s.protocol {
                        Some(Protocol::Tcp) => pb::Protocol::Tcp as i32,
                        Some(Protocol::Udp) => pb::Protocol::Udp as i32,
                        None => held.map_or(pb::Protocol::Tcp as i32, |h| h.protocol),
                    },
                    policy: match s.policy {
                        Some(Policy::Steer) => pb::Policy::Steer as i32,
                        Some(Policy::Reject) => pb::Policy::Reject as i32,
                        Some(Policy::Allow) => pb::Policy::Allow as i32,
                        None => held.map_or(pb::Policy::Steer as i32, |h| h.policy),
                    },
                };
                Ok(st.upsert_service(&svc))
            })
            .map_err(|e| e.message().to_owned())?;
    }
    Ok(())
}

async fn execute<F: Fleet>(
    fleet: &F,
    r: &Rollout,
    service: &str,
    svc: Option<&hitless_model::Service>,
    ops: &ServiceOps,
    observed: &[Observed],
) -> Result<Vec<String>, StepError> {
    let mut reports = Vec::new();
    let node_of: BTreeMap<&str, &str> =
        observed.iter().filter(|o| o.service == service).map(|o| (o.address.as_str(), o.node.as_str())).collect();
    if ops.start_first {
        start(fleet, r, service, svc, ops, observed).await?;
        weights(fleet, service, ops)?;
        for a in &ops.stop {
            reports.push(stop(fleet, service, a, node_of.get(a.as_str()).copied(), svc).await?);
        }
    } else {
        for a in &ops.stop {
            reports.push(stop(fleet, service, a, node_of.get(a.as_str()).copied(), svc).await?);
        }
        start(fleet, r, service, svc, ops, observed).await?;
        weights(fleet, service, ops)?;
    }
    Ok(reports)
}

/// Every weight of the step in one registry change: agents swap the whole slot table at
/// once, so traffic never passes through a moment where the old weights are down and
/// the new ones not yet up (blue-green's switch, weighted's shares).
fn weights<F: Fleet>(fleet: &F, service: &str, ops: &ServiceOps) -> Result<(), String> {
    crate::failpoint!("coordinator.engine.weights.before", |fp| format!("injected by failpoint {fp}"));
    if ops.weights.is_empty() {
        return Ok(());
    }
    fleet
        .mutate(|s| {
            let mut all = crate::registry::Changes::default();
            for (address, w) in &ops.weights {
                all.instances.extend(s.set_weight(&(service.to_owned(), address.clone()), *w)?.instances);
            }
            Ok(all)
        })
        .map(|_| ())
        .map_err(|e| e.message().to_owned())
}

fn spec(svc: &hitless_model::Service, version: &str) -> pb::InstanceSpec {
    let check = |h: &Health| pb::Check {
        kind: Some(match h {
            Health::Http(path) => pb::check::Kind::Http(path.clone()),
            Health::Tcp(b) => pb::check::Kind::Tcp(*b),
            Health::Exec(argv) => pb::check::Kind::Exec(pb::Argv { args: argv.clone() }),
        }),
    };
    pb::InstanceSpec {
        service: svc.name.clone(),
        version: version.to_owned(),
        port: u32::from(svc.port),
        command: svc.run.command.clone(),
        env: svc.run.env.clone().into_iter().collect(),
        config: svc.config.clone().into_iter().collect(),
        health: svc.health.as_ref().map(check),
        prestop: svc.prestop.as_ref().map(|p| pb::Check {
            kind: Some(match p {
                PreStop::Http(path) => pb::check::Kind::Http(path.clone()),
                PreStop::Exec(argv) => pb::check::Kind::Exec(pb::Argv { args: argv.clone() }),
            }),
        }),
        drain_deadline_ms: svc.drain_deadline.map_or(DEFAULT_DRAIN_DEADLINE, |d| d.to_std()).as_millis() as u64,
        grace_ms: GRACE.as_millis() as u64,
    }
}

/// Starts the step's new instances everywhere at once and waits until each is healthy
/// and registered; waits for the ones an interrupted step left starting.
async fn start<F: Fleet>(
    fleet: &F,
    r: &Rollout,
    service: &str,
    svc: Option<&hitless_model::Service>,
    ops: &ServiceOps,
    observed: &[Observed],
) -> Result<(), StepError> {
    let mut reports = fleet.reports();
    let sessions = sessions(fleet);
    let mut pending: BTreeMap<String, String> = BTreeMap::new(); // op id -> node
    for (i, (version, node, _weight)) in ops.start.iter().enumerate() {
        let Some(svc) = svc else { break };
        let op_id = format!("{}-{}-{}-{i}", r.id, r.step + 1, service);
        let msg = Msg::Start(pb::StartInstance {
            op_id: op_id.clone(),
            spec: Some(spec(svc, version)),
            health_timeout_ms: fleet.health_timeout().as_millis() as u64,
        });
        fleet.send_op(node, msg).map_err(|e| reconnecting(fleet, node, e))?;
        pending.insert(op_id, node.clone());
    }
    // Start operations sent; no report waited for yet.
    crate::failpoint!("coordinator.engine.start.after_send", |fp| injected(fp));
    let weight_of = |version: &str, node: &str| {
        ops.start.iter().find(|(v, n, _)| v == version && n == node).map_or(hitless_model::DEFAULT_WEIGHT, |s| s.2)
    };
    // Instances already starting (an interrupted step): wait for them by address. An
    // instance of this step joins them once reported starting, so that its serving
    // report counts whatever operation it carries (an agent that adopted it after a
    // restart, or that reports it on a later session, reports it under none).
    let mut awaiting: BTreeMap<String, String> = observed
        .iter()
        .filter(|o| o.service == service && ops.await_healthy.contains(&o.address))
        .map(|o| (o.address.clone(), o.node.clone()))
        .collect();
    let health_timeout = fleet.health_timeout();
    let mut deadline = Instant::now() + health_timeout + Duration::from_secs(5);
    let mut resynced = false;
    // Some may be healthy already and only need registering.
    let running = fleet.running();
    let healthy: Vec<&Observed> = observed
        .iter()
        .filter(|o| o.service == service && awaiting.contains_key(&o.address))
        .filter(|o| {
            running
                .get(&o.node)
                .and_then(|m| m.get(&o.address))
                .is_some_and(|x| x.phase() == pb::InstancePhase::Serving)
        })
        .collect();
    for o in healthy {
        register(fleet, service, &o.address, &o.version, &o.node, o.weight)?;
        awaiting.remove(&o.address);
    }
    while !pending.is_empty() || !awaiting.is_empty() {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            // Every agent reports serving or failed within the health timeout: a report
            // this late was lost with a session (the hello of the next one may have
            // listed the instance as still starting). Ask those agents to say hello
            // again, once; their new sessions interrupt the step, which observes anew.
            let owing: std::collections::BTreeSet<&String> = pending.values().chain(awaiting.values()).collect();
            let mut asked = false;
            for n in owing.into_iter().filter(|_| !resynced) {
                asked |= fleet.resync(n);
            }
            if !asked {
                return Err(format!("instances of {service} did not report healthy within {health_timeout:?}").into());
            }
            resynced = true;
            deadline = Instant::now() + NODE_WAIT;
            continue;
        }
        let (node, rep) = match tokio::time::timeout(wait.min(SESSION_CHECK), reports.recv()).await {
            Ok(Ok(x)) => x,
            Ok(Err(RecvError::Lagged(_))) => continue,
            Err(_) => {
                let nodes = pending.values().chain(awaiting.values()).map(String::as_str);
                same_sessions(fleet, &sessions, nodes, "starting instances")?;
                continue;
            }
            Ok(Err(RecvError::Closed)) => {
                return Err(format!("instances of {service} did not report healthy within {health_timeout:?}").into())
            }
        };
        let by_op = pending.get(&rep.op_id).is_some_and(|n| *n == node);
        let by_address = awaiting.get(&rep.address).is_some_and(|n| *n == node);
        if !(by_op || by_address) || rep.service != service {
            continue;
        }
        match rep.phase() {
            pb::InstancePhase::Serving => {
                // Healthy on its node, not registered yet.
                crate::failpoint!("coordinator.engine.start.before_register", |fp| injected(fp));
                register(fleet, service, &rep.address, &rep.version, &node, weight_of(&rep.version, &node))?;
                pending.remove(&rep.op_id);
                awaiting.remove(&rep.address);
            }
            pb::InstancePhase::Failed | pb::InstancePhase::Crashed if rep.killed => {
                // Killed from outside while starting (the OOM killer, an operator): not
                // the version's fault. Observe again; the next decision starts another.
                return Err(StepError::Interrupted(format!(
                    "instance {} of {service} on node {node} was killed while starting",
                    rep.address
                )));
            }
            pb::InstancePhase::Failed | pb::InstancePhase::Crashed => {
                return Err(format!(
                    "instance {} of {service} on node {node} never became healthy: {}",
                    rep.address, rep.detail
                )
                .into());
            }
            pb::InstancePhase::Starting if by_op && !rep.address.is_empty() => {
                pending.remove(&rep.op_id);
                awaiting.insert(rep.address.clone(), node);
            }
            _ => {}
        }
    }
    Ok(())
}

/// An operation that could not be sent to `node`: the step is interrupted when the node
/// has had an agent (it is reconnecting: observe again once it is back), and fails when
/// it never had one.
fn reconnecting<F: Fleet>(fleet: &F, node: &str, e: String) -> StepError {
    if fleet.nodes().contains_key(node) {
        StepError::Interrupted(e)
    } else {
        StepError::Failed(e)
    }
}

fn register<F: Fleet>(
    fleet: &F,
    service: &str,
    address: &str,
    version: &str,
    node: &str,
    weight: u32,
) -> Result<(), String> {
    let inst = pb::Instance {
        service: service.to_owned(),
        address: address.to_owned(),
        state: pb::InstanceState::Serving as i32,
        weight,
        version: version.to_owned(),
        node: node.to_owned(),
        ttl_ms: 0,
    };
    fleet.mutate(|s| s.register(&inst)).map(|_| ()).map_err(|e| e.message().to_owned())
}

/// Drains an instance on every node (barrier), has its agent stop it (connections, then
/// signals), and marks it down (removed after the tombstone time).
async fn stop<F: Fleet>(
    fleet: &F,
    service: &str,
    address: &str,
    node: Option<&str>,
    svc: Option<&hitless_model::Service>,
) -> Result<String, StepError> {
    let key = (service.to_owned(), address.to_owned());
    let mut detail = format!("{service} {address}: not run by any agent");
    let deadline = svc.and_then(|s| s.drain_deadline).map_or(DEFAULT_DRAIN_DEADLINE, |d| d.to_std());
    let mut handshakes = None;
    crate::failpoint!("coordinator.engine.stop.before_barrier", |fp| injected(fp));
    if fleet.instance(&key).is_some() {
        let d = fleet
            .barrier(key.clone(), pb::InstanceState::Draining, Duration::from_secs(10))
            .await
            .map_err(|e| e.message().to_owned())?;
        if !d.complete {
            let late: Vec<String> =
                d.nodes.iter().filter(|n| n.connected && !n.acked).map(|n| n.node.clone()).collect();
            return Err(format!("drain of {address} ({service}) not acknowledged by {}", late.join(", ")).into());
        }
        applied_everywhere(fleet, d.revision, address).await?;
        handshakes = Some(super::handshakes::quiet_everywhere(fleet, d.revision, address, deadline).await);
    }
    // Drained on every node; the stop not sent yet.
    crate::failpoint!("coordinator.engine.stop.after_barrier", |fp| injected(fp));
    if let Some(node) = node {
        let mut reports = fleet.reports();
        let sessions = sessions(fleet);
        // Unique per stop of an address (the registry revision only grows, also across
        // coordinator restarts): a late report of an earlier stop of a reused address
        // names another operation. A retried stop at the same revision is the same stop.
        let op_id = format!("stop-{service}-{address}-r{}", fleet.revision());
        fleet
            .send_op(
                node,
                Msg::Stop(pb::StopInstance {
                    op_id: op_id.clone(),
                    service: service.to_owned(),
                    address: address.to_owned(),
                }),
            )
            .map_err(|e| reconnecting(fleet, node, e))?;
        // The stop is on its way to the agent; its report not waited for yet.
        crate::failpoint!("coordinator.engine.stop.after_send", |fp| injected(fp));
        let until = Instant::now() + deadline + GRACE + Duration::from_secs(10);
        loop {
            let wait = until.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return Err(format!("instance {address} of {service} on node {node} did not stop in time").into());
            }
            match tokio::time::timeout(wait.min(SESSION_CHECK), reports.recv()).await {
                // Only the stop's own report: the node sent it, under its operation.
                Ok(Ok((from, rep))) if from == node && rep.op_id == op_id => match rep.phase() {
                    pb::InstancePhase::Stopped | pb::InstancePhase::Crashed => {
                        info!(%service, %address, %node, report = %rep.detail, "instance stopped");
                        detail = match &handshakes {
                            Some(h) => format!("{service} {address} on {node}: {h}, {}", rep.detail),
                            None => format!("{service} {address} on {node}: {}", rep.detail),
                        };
                        break;
                    }
                    // The agent could not stop it (it is still running): say why now
                    // rather than after the stop's whole time.
                    _ if rep.detail.starts_with("stop failed") => {
                        return Err(format!(
                            "instance {address} of {service} on node {node} could not be stopped: {}",
                            rep.detail
                        )
                        .into());
                    }
                    _ => {}
                },
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
                Err(_) => same_sessions(fleet, &sessions, std::iter::once(node), "stopping an instance")?,
                Ok(Err(RecvError::Closed)) => {
                    return Err(format!("instance {address} of {service} on node {node} did not stop in time").into())
                }
            }
        }
    }
    // Stopped; still registered as draining.
    crate::failpoint!("coordinator.engine.stop.before_bury", |fp| injected(fp));
    if fleet.instance(&key).is_some() {
        // Not deregistered yet: kept down, so that a client whose cache still lists the
        // address is steered to a sibling rather than refused.
        fleet.bury(&key).map_err(|e| e.message().to_owned())?;
    }
    Ok(detail)
}
