//! The planner: a fix-point loop that asks the strategy for the next intermediate
//! architecture, applies it to a model of the cluster, and repeats until the model is the
//! target. Pure: it touches nothing, so `hitless plan` previews exactly what a rollout does,
//! and the engine can plan again from whatever state it finds after a crash.

use std::collections::BTreeMap;
use std::sync::Arc;

use hitless_model::{Cluster, InstanceState, ServiceState};

use crate::strategy::{Gate, GateSpec, Order, Strategy, Transition};
use crate::target::{Target, TargetService};

/// A whole plan: every step from the current cluster to the target.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The strategy that made it.
    pub strategy: Strategy,
    /// Steps in order; empty when the cluster already is the target.
    pub steps: Vec<Step>,
}

/// One step: services that move together, then maybe a gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 1-based position in the plan.
    pub number: usize,
    /// Whether this step only finishes an interrupted one (instances left starting,
    /// draining or stopping).
    pub resume: bool,
    /// The services that move, by name.
    pub services: Vec<ServiceStep>,
    /// A pause after this step.
    pub gate: Option<StepGate>,
    /// Where capacity falls short of what the strategy promises.
    pub warnings: Vec<Warning>,
}

/// A gate after a step and who asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepGate {
    /// The gate.
    pub gate: Gate,
    /// `strategy` (gray's first batch) or `operator` (`--gate`).
    pub source: &'static str,
}

/// Instances of one version on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Version label.
    pub version: Arc<str>,
    /// Node.
    pub node: Arc<str>,
    /// How many.
    pub count: u32,
}

/// What one service does in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStep {
    /// Service name.
    pub service: String,
    /// Which half goes first.
    pub order: Order,
    /// Instances started in this step (starting, then serving).
    pub starting: Vec<Move>,
    /// Instances taken out in this step (draining, then stopping).
    pub stopping: Vec<Move>,
    /// Instances the target wants.
    pub desired: u32,
    /// Instances taking traffic before the step.
    pub serving_before: u32,
    /// Fewest instances taking traffic during the step.
    pub serving_min: u32,
    /// Instances taking traffic after the step.
    pub serving_after: u32,
    /// Most instances alive during the step.
    pub peak: u32,
    /// Instances over the desired count at the peak (the step's extra cost).
    pub extra: u32,
    /// The service's instances after the step.
    pub after: ServiceState,
}

impl ServiceStep {
    /// Share of new connections per version after the step, in percent (derived from the
    /// instances' weights, so the plan does not store it).
    pub fn traffic(&self) -> BTreeMap<String, f64> {
        self.after.shares()
    }
}

/// A capacity problem in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Service concerned.
    pub service: String,
    /// What kind.
    pub kind: WarningKind,
    /// For people.
    pub message: String,
}

/// Kinds of [`Warning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarningKind {
    /// No instance takes traffic for a while: requests fail.
    Downtime,
    /// Fewer instances serve than the strategy promises.
    BelowPromise,
    /// More instances run than the strategy promises.
    AbovePromise,
}

impl WarningKind {
    /// Name in the JSON output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Downtime => "downtime",
            Self::BelowPromise => "below-promise",
            Self::AbovePromise => "above-promise",
        }
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The strategy kept going past the bound: a strategy bug, reported instead of a hang.
    #[error("the {strategy} strategy did not reach the target within {bound} steps (a bug in the strategy; please report it)")]
    StepBound {
        /// Strategy name.
        strategy: &'static str,
        /// The bound.
        bound: usize,
    },
    /// The strategy returned the state it was given.
    #[error("the {strategy} strategy made no progress on service {service:?} at step {step} (a bug in the strategy; please report it)")]
    NoProgress {
        /// Strategy name.
        strategy: &'static str,
        /// Service that did not move.
        service: String,
        /// Step number.
        step: usize,
    },
    /// A `--gate` names a step the plan does not have.
    #[error("--gate {step}: the plan has only {steps} steps; gate a step from 1 to {steps}")]
    GateBeyondPlan {
        /// Gated step.
        step: usize,
        /// Steps in the plan.
        steps: usize,
    },
}

/// Most steps a correct strategy may take from `current` to `target`: every step moves at
/// least one instance or one traffic share of one service, and no instance moves twice.
pub fn step_bound(current: &Cluster, target: &Target, strategy: &Strategy) -> usize {
    let shares = match strategy {
        Strategy::Weighted { steps } => steps.len(),
        Strategy::Gray { batches, .. } => usize::try_from(*batches).unwrap_or(usize::MAX),
        _ => 0,
    };
    let mut bound = 1usize;
    for (_, now, want) in union(current, target) {
        let now = now.map_or(0, ServiceState::total);
        let want = want.map_or(0, TargetService::desired);
        let moves = usize::try_from(u64::from(now) + u64::from(want)).unwrap_or(usize::MAX);
        bound = bound.saturating_add(moves.saturating_mul(2)).saturating_add(shares).saturating_add(4);
    }
    bound
}

/// Every service of `current` or `target`, by name, with its state and its target: one
/// merge of two sorted maps, no lookups, so planning stays linear in the number of services.
fn union<'a>(
    current: &'a Cluster,
    target: &'a Target,
) -> impl Iterator<Item = (&'a str, Option<&'a ServiceState>, Option<&'a TargetService>)> {
    let mut cur = current.services.iter().peekable();
    let mut tgt = target.services().iter().peekable();
    std::iter::from_fn(move || match (cur.peek(), tgt.peek()) {
        (Some((c, _)), Some((t, _))) if c == t => {
            let ((name, state), (_, want)) = (cur.next()?, tgt.next()?);
            Some((name.as_str(), Some(state), Some(want)))
        }
        (Some((c, _)), Some((t, _))) if c > t => tgt.next().map(|(name, want)| (name.as_str(), None, Some(want))),
        (Some(_), _) => cur.next().map(|(name, state)| (name.as_str(), Some(state), None)),
        (None, _) => tgt.next().map(|(name, want)| (name.as_str(), None, Some(want))),
    })
}

/// Plans from `current` (any state, even mid-step) to `target` with `strategy`, putting the
/// operator's `gates` on their steps.
pub fn plan(current: &Cluster, target: &Target, strategy: &Strategy, gates: &[GateSpec]) -> Result<Plan, PlanError> {
    let bound = step_bound(current, target, strategy);
    let mut steps = Vec::new();

    let settled;
    let cur = match (!current.is_settled()).then(|| strategy.next(current, target)).flatten() {
        Some(settle) => {
            let services =
                settle.services.iter().map(|(name, t)| resume_step(name, current.service(name), t, target)).collect();
            steps.push(Step { number: 1, resume: true, services, gate: None, warnings: Vec::new() });
            settled = settle.apply(current);
            &settled
        }
        None => current,
    };

    // The same order as `Strategy::next`: wave by wave, services by name within a wave. Each
    // wave holds its unfinished services with their targets and a working copy of their state.
    let empty = ServiceState::default();
    let mut waves: Vec<Vec<(&str, Option<&TargetService>, ServiceState)>> = vec![Vec::new(); target.waves() + 1];
    for (name, state, want) in union(cur, target) {
        let state = state.unwrap_or(&empty);
        if state != want.map_or(&empty, |t| &t.state) {
            let wave = want.map_or(target.waves(), |t| t.wave);
            if let Some(w) = waves.get_mut(wave) {
                w.push((name, want, state.clone()));
            }
        }
    }
    for mut pending in waves {
        while !pending.is_empty() {
            let number = steps.len() + 1;
            if number > bound {
                return Err(PlanError::StepBound { strategy: strategy.name(), bound });
            }
            let mut services = Vec::with_capacity(pending.len());
            let mut warnings = Vec::new();
            let mut gate = None;
            for (name, want, state) in &mut pending {
                let Some(t) = strategy.next_service(state, *want) else { continue };
                if t.next == *state {
                    return Err(PlanError::NoProgress {
                        strategy: strategy.name(),
                        service: (*name).to_owned(),
                        step: number,
                    });
                }
                let s = service_step(name, state, &t, want.map_or(0, TargetService::desired));
                warnings.extend(check_promise(strategy, &s, state.total()));
                gate = gate.or_else(|| t.gate.clone().map(|gate| StepGate { gate, source: "strategy" }));
                *state = t.next;
                services.push(s);
            }
            steps.push(Step { number, resume: false, services, gate, warnings });
            pending.retain(|(_, want, state)| *state != *want.map_or(&empty, |t| &t.state));
        }
    }

    for g in gates {
        let Some(step) = steps.get_mut(g.step.wrapping_sub(1)) else {
            return Err(PlanError::GateBeyondPlan { step: g.step, steps: steps.len() });
        };
        step.gate = Some(StepGate { gate: g.gate.clone(), source: "operator" });
    }
    Ok(Plan { strategy: strategy.clone(), steps })
}

/// Counts per (version, node), whatever the state and weight.
fn placement(s: &ServiceState) -> BTreeMap<(&Arc<str>, &Arc<str>), u32> {
    let mut out = BTreeMap::new();
    for g in s.groups() {
        *out.entry((&g.version, &g.node)).or_default() += g.count;
    }
    out
}

fn moves<'a>(items: impl Iterator<Item = ((&'a Arc<str>, &'a Arc<str>), u32)>) -> Vec<Move> {
    items
        .filter(|(_, c)| *c > 0)
        .map(|((v, n), count)| Move { version: Arc::clone(v), node: Arc::clone(n), count })
        .collect()
}

fn service_step(name: &str, before: &ServiceState, t: &Transition, desired: u32) -> ServiceStep {
    let (b, a) = (placement(before), placement(&t.next));
    let starting = moves(a.iter().map(|(k, &c)| (*k, c.saturating_sub(b.get(k).copied().unwrap_or(0)))));
    let stopping = moves(b.iter().map(|(k, &c)| (*k, c.saturating_sub(a.get(k).copied().unwrap_or(0)))));
    let started: u32 = starting.iter().map(|m| m.count).sum();
    let (serving_before, serving_after) = (before.serving(), t.next.serving());
    let (serving_min, peak) = match t.order {
        Order::StartFirst => (serving_before.min(serving_after), before.total() + started),
        Order::DrainFirst => {
            // Count every stopped instance as one that was serving: the conservative view.
            let mut serving: BTreeMap<(&Arc<str>, &Arc<str>), u32> = BTreeMap::new();
            for g in before.groups().iter().filter(|g| g.takes_traffic()) {
                *serving.entry((&g.version, &g.node)).or_default() += g.count;
            }
            let lost: u32 =
                stopping.iter().map(|m| m.count.min(serving.get(&(&m.version, &m.node)).copied().unwrap_or(0))).sum();
            (serving_before.saturating_sub(lost).min(serving_after), before.total().max(t.next.total()))
        }
    };
    ServiceStep {
        service: name.to_owned(),
        order: t.order,
        starting,
        stopping,
        desired,
        serving_before,
        serving_min,
        serving_after,
        peak,
        extra: peak.saturating_sub(desired),
        after: t.next.clone(),
    }
}

/// The step that finishes an interrupted one: starting instances become serving, draining
/// and stopping ones are gone.
fn resume_step(name: &str, before: Option<&ServiceState>, t: &Transition, target: &Target) -> ServiceStep {
    let empty = ServiceState::default();
    let before = before.unwrap_or(&empty);
    let pick = |states: &[InstanceState]| {
        let mut m: BTreeMap<(&Arc<str>, &Arc<str>), u32> = BTreeMap::new();
        for g in before.groups().iter().filter(|g| states.contains(&g.state)) {
            *m.entry((&g.version, &g.node)).or_default() += g.count;
        }
        moves(m.into_iter())
    };
    let desired = target.service(name).map_or(0, |t| t.desired());
    let (serving_before, serving_after) = (before.serving(), t.next.serving());
    ServiceStep {
        service: name.to_owned(),
        order: t.order,
        starting: pick(&[InstanceState::Starting]),
        stopping: pick(&[InstanceState::Draining, InstanceState::Stopping]),
        desired,
        serving_before,
        serving_min: serving_before.min(serving_after),
        serving_after,
        peak: before.total(),
        extra: before.total().saturating_sub(desired),
        after: t.next.clone(),
    }
}

/// Warnings for one service step: downtime, and any breach of the strategy's promise
/// (measured against where the step started, so a cluster that was already short is not
/// blamed on the strategy).
fn check_promise(strategy: &Strategy, s: &ServiceStep, total_before: u32) -> Vec<Warning> {
    let mut out = Vec::new();
    let promise = strategy.promise(s.desired);
    if s.desired > 0 && s.serving_before > 0 && s.serving_min == 0 {
        out.push(Warning {
            service: s.service.clone(),
            kind: WarningKind::Downtime,
            message: format!("{}: no instance serves during this step: requests fail (downtime)", s.service),
        });
    }
    let floor = promise.min_serving.min(s.serving_before);
    if s.serving_min < floor {
        out.push(Warning {
            service: s.service.clone(),
            kind: WarningKind::BelowPromise,
            message: format!(
                "{}: {} of {} instances serve, below the {} serving that {} promises",
                s.service,
                s.serving_min,
                s.desired,
                floor,
                strategy.name()
            ),
        });
    }
    if let Some(max) = promise.max_total.map(|m| m.max(total_before)) {
        if s.peak > max {
            out.push(Warning {
                service: s.service.clone(),
                kind: WarningKind::AbovePromise,
                message: format!(
                    "{}: {} instances run, above the {} that {} promises",
                    s.service,
                    s.peak,
                    max,
                    strategy.name()
                ),
            });
        }
    }
    out
}
