//! The rollout engine: executes a plan through the agents, step by step, and can be
//! killed at any moment and resumed. [`decide`] is its pure core, [`run`] its loop,
//! [`record`] what it stores; the functions here are the operator's controls.

pub mod decide;
pub mod fleet;
pub mod handshakes;
pub mod prometheus;
pub mod record;
pub mod run;

use hitless_model::Architecture;
use hitless_proto::v1 as pb;
use tonic::Status;

use self::fleet::Fleet;
use self::record::{Phase, Rollout, StrategyRecord};
use crate::target::Target;

/// `push`: starts a rollout to the target, or replaces the target of the one running.
pub fn push<F: Fleet>(fleet: &F, req: &pb::PushRequest) -> Result<pb::PushResponse, Status> {
    let arch = Architecture::parse(&req.architecture_yaml).map_err(|e| {
        let lines: Vec<String> = e.problems().iter().map(|p| format!("architecture_yaml: {p}")).collect();
        Status::invalid_argument(lines.join("\n"))
    })?;
    let spec = req.strategy.as_ref().ok_or_else(|| Status::invalid_argument("strategy: missing; give { name }"))?;
    let strategy = StrategyRecord::from(spec);
    let (s, gates) = strategy.build().map_err(|p| Status::invalid_argument(p.join("\n")))?;
    let observed = run::observe(fleet);
    let planned = crate::planner::plan(&decide::cluster(&observed), &Target::new(&arch), &s, &gates)
        .map_err(|e| Status::invalid_argument(format!("strategy: {e}")))?;
    let previous = fleet.rollout();
    let id = format!("r{}", fleet.revision());
    let previous_yaml = previous.as_ref().and_then(|p| p.previous_yaml.clone());
    let mut r = Rollout {
        id: id.clone(),
        target_yaml: req.architecture_yaml.clone(),
        strategy,
        phase: Phase::Running,
        step: 0,
        message: String::new(),
        previous_yaml,
        log: previous.map(|p| p.log).unwrap_or_default(),
    };
    r.note(format!("push {id}: {} steps planned with {}", planned.steps.len(), spec.name));
    fleet.save_rollout(&r)?;
    Ok(pb::PushResponse { rollout_id: id, steps: planned.steps.len() as u32 })
}

fn change<F: Fleet>(
    fleet: &F,
    f: impl FnOnce(&mut Rollout) -> Result<(), Status>,
) -> Result<pb::RolloutResponse, Status> {
    let mut r = fleet.rollout().ok_or_else(|| Status::failed_precondition("no rollout: push one first"))?;
    f(&mut r)?;
    fleet.save_rollout(&r)?;
    Ok(pb::RolloutResponse { rollout: status(fleet) })
}

/// `pause`: no new step starts until `resume`.
pub fn pause<F: Fleet>(fleet: &F) -> Result<pb::RolloutResponse, Status> {
    change(fleet, |r| match r.phase {
        Phase::Running => {
            r.phase = Phase::Paused;
            r.note("paused");
            Ok(())
        }
        p => Err(Status::failed_precondition(format!("the rollout is {}, not running", p.as_str()))),
    })
}

/// `resume`: continues a paused rollout.
pub fn resume<F: Fleet>(fleet: &F) -> Result<pb::RolloutResponse, Status> {
    change(fleet, |r| match r.phase {
        Phase::Paused => {
            r.phase = Phase::Running;
            r.note("resumed");
            Ok(())
        }
        p => Err(Status::failed_precondition(format!("the rollout is {}, not paused", p.as_str()))),
    })
}

/// `promote`: opens the approval gate.
pub fn promote<F: Fleet>(fleet: &F) -> Result<pb::RolloutResponse, Status> {
    change(fleet, |r| match r.phase {
        Phase::Waiting => {
            r.phase = Phase::Running;
            r.message.clear();
            r.note("promoted");
            Ok(())
        }
        p => Err(Status::failed_precondition(format!("the rollout is {}, not waiting at a gate", p.as_str()))),
    })
}

/// `abort`: returns to the last completed architecture, the safe way (with the same
/// strategy's care: drains before stops).
pub fn abort<F: Fleet>(fleet: &F) -> Result<pb::RolloutResponse, Status> {
    change(fleet, |r| {
        if matches!(r.phase, Phase::Done | Phase::RolledBack) {
            return Err(Status::failed_precondition(format!(
                "the rollout is {}: nothing to abort; push the architecture you want instead",
                r.phase.as_str()
            )));
        }
        let back = r.previous_yaml.clone().ok_or_else(|| {
            Status::failed_precondition("no completed architecture to return to; push the one you want instead")
        })?;
        r.target_yaml = back;
        r.phase = Phase::Running;
        r.message = "abort: returning to the last completed architecture".into();
        r.note("abort");
        Ok(())
    })
}

/// `pull`: the running architecture, as an architecture file: each service of the last
/// pushed target with the version most of its instances run and where they run now.
pub fn pull<F: Fleet>(fleet: &F) -> Result<String, Status> {
    let r = fleet.rollout().ok_or_else(|| {
        Status::failed_precondition("nothing was deployed through hitless yet: push an architecture first")
    })?;
    let arch = r.target().map_err(Status::internal)?;
    let observed = run::observe(fleet);
    let mut services = Vec::new();
    for s in &arch.services {
        let mine: Vec<&decide::Observed> = observed
            .iter()
            .filter(|o| o.service == s.name && o.state == hitless_model::InstanceState::Serving)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let mut versions: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
        let mut placement: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
        for o in &mine {
            *versions.entry(o.version.as_str()).or_default() += 1;
            *placement.entry(o.node.clone()).or_default() += 1;
        }
        let version =
            versions.iter().max_by_key(|(v, n)| (**n, *v)).map_or(s.version.clone(), |(v, _)| (*v).to_owned());
        services.push(hitless_model::Service { version, placement, ..s.clone() });
    }
    let running = Architecture { nodes: arch.nodes.clone(), services };
    serde_yaml::to_string(&running).map_err(|e| Status::internal(format!("rendering the architecture: {e}")))
}

/// The rollout as `status` shows it.
pub fn status<F: Fleet>(fleet: &F) -> Option<pb::RolloutStatus> {
    let r = fleet.rollout()?;
    let arch = r.target().ok()?;
    let observed = run::observe(fleet);
    let steps = r
        .strategy
        .build()
        .ok()
        .and_then(|(s, g)| crate::planner::plan(&decide::cluster(&observed), &Target::new(&arch), &s, &g).ok())
        .map_or(0, |p| p.steps.len() as u32);
    let services = arch
        .services
        .iter()
        .map(|s| {
            let mine = observed.iter().filter(|o| o.service == s.name);
            let mut p = pb::ServiceProgress {
                service: s.name.clone(),
                version: s.version.clone(),
                desired: s.placement.values().sum(),
                ..Default::default()
            };
            for o in mine {
                match o.state {
                    hitless_model::InstanceState::Serving if o.version == s.version => p.new_serving += 1,
                    hitless_model::InstanceState::Serving => p.old_serving += 1,
                    hitless_model::InstanceState::Starting => p.starting += 1,
                    _ => p.draining += 1,
                }
            }
            p
        })
        .collect();
    Some(pb::RolloutStatus {
        id: r.id.clone(),
        state: r.phase.as_str().to_owned(),
        step: r.step,
        steps: r.step + steps,
        waiting_for: if r.phase == Phase::Waiting { r.message.clone() } else { String::new() },
        message: r.message.clone(),
        services,
        strategy: r.strategy.name.clone(),
        log: r.log.iter().rev().take(20).rev().cloned().collect(),
    })
}
