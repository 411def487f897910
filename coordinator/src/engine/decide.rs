//! What the rollout engine does next, decided purely from what runs and the target.
//!
//! The engine observes the instances agents report, asks the strategy for the next
//! intermediate architecture, and turns the difference into instance operations: which
//! instances to start where, which to drain and stop, which weights to change, and in
//! which order. Nothing here does I/O, so a coordinator restarted at any moment decides
//! again from what it observes and reaches the same target.

use std::collections::BTreeMap;

use hitless_model::{Cluster, InstanceState};

use crate::strategy::{Gate, Order, Strategy};
use crate::target::Target;

/// One instance as observed (agent reports joined with the registry's drain state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// Node that runs it.
    pub node: String,
    /// Its address.
    pub address: String,
    /// Where it is in its life cycle.
    pub state: InstanceState,
    /// Its backend weight.
    pub weight: u32,
}

/// The cluster the strategies plan from.
pub fn cluster(observed: &[Observed]) -> Cluster {
    Cluster::from_each(
        observed.iter().map(|o| (o.service.as_str(), o.version.as_str(), o.node.as_str(), o.state, o.weight)),
    )
}

/// Operations of one service in one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceOps {
    /// Start first or drain first.
    pub start_first: bool,
    /// Instances to start: (version, node, weight).
    pub start: Vec<(String, String, u32)>,
    /// Instances already starting: wait until they are healthy.
    pub await_healthy: Vec<String>,
    /// Instances to drain and stop (addresses), including those already draining.
    pub stop: Vec<String>,
    /// New weights: (address, weight).
    pub weights: Vec<(String, u32)>,
}

/// The next step of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepOps {
    /// Per service.
    pub services: BTreeMap<String, ServiceOps>,
    /// A gate the strategy puts after this step.
    pub gate: Option<Gate>,
}

/// The next step from `observed` toward `target`, or `None` when the target is reached.
pub fn next_step(observed: &[Observed], target: &Target, strategy: &Strategy) -> Option<StepOps> {
    let now = cluster(observed);
    let inter = strategy.next(&now, target)?;
    let mut step = StepOps::default();
    for (name, t) in &inter.services {
        let mine: Vec<&Observed> = observed.iter().filter(|o| o.service == *name).collect();
        let mut ops = ServiceOps { start_first: t.order == Order::StartFirst, ..ServiceOps::default() };
        // Leaving instances keep leaving; starting ones are awaited.
        for o in &mine {
            match o.state {
                InstanceState::Draining | InstanceState::Stopping => ops.stop.push(o.address.clone()),
                InstanceState::Starting => ops.await_healthy.push(o.address.clone()),
                InstanceState::Serving => {}
            }
        }
        // Instances per (version, node) now (not leaving) and wanted next.
        let mut have: BTreeMap<(String, String), Vec<&Observed>> = BTreeMap::new();
        for o in mine.iter().filter(|o| matches!(o.state, InstanceState::Serving | InstanceState::Starting)) {
            have.entry((o.version.clone(), o.node.clone())).or_default().push(o);
        }
        let mut want: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
        for g in t.next.groups() {
            let e = want.entry((g.version.to_string(), g.node.to_string())).or_insert((0, g.weight));
            e.0 += g.count;
        }
        for (key, (count, weight)) in &want {
            let present = have.get(key).map_or(&[][..], Vec::as_slice);
            let n = present.len() as u32;
            for _ in n..*count {
                ops.start.push((key.0.clone(), key.1.clone(), *weight));
            }
            // Keep the lowest addresses, stop the rest: deterministic on every replay.
            let mut sorted: Vec<&&Observed> = present.iter().collect();
            sorted.sort_by(|a, b| a.address.cmp(&b.address));
            for (i, o) in sorted.iter().enumerate() {
                if i as u32 >= *count {
                    ops.stop.push(o.address.clone());
                } else if o.weight != *weight {
                    ops.weights.push((o.address.clone(), *weight));
                }
            }
        }
        for (key, present) in &have {
            if !want.contains_key(key) {
                ops.stop.extend(present.iter().map(|o| o.address.clone()));
            }
        }
        ops.await_healthy.retain(|a| !ops.stop.contains(a));
        if t.gate.is_some() {
            step.gate = t.gate.clone();
        }
        step.services.insert(name.clone(), ops);
    }
    Some(step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hitless_model::Architecture;

    fn arch(version: &str, a: u32, b: u32) -> Architecture {
        Architecture::parse(&format!(
            "services:\n  - name: cart\n    version: {version}\n    port: 8080\n    run: {{ command: [\"./cart\"] }}\n    placement: {{ node-a: {a}, node-b: {b} }}\n"
        ))
        .unwrap()
    }

    fn obs(version: &str, node: &str, address: &str, state: InstanceState) -> Observed {
        Observed {
            service: "cart".into(),
            version: version.into(),
            node: node.into(),
            address: address.into(),
            state,
            weight: 100,
        }
    }

    fn running(version: &str) -> Vec<Observed> {
        vec![
            obs(version, "node-a", "127.1.0.1:8080", InstanceState::Serving),
            obs(version, "node-a", "127.1.0.2:8080", InstanceState::Serving),
            obs(version, "node-b", "127.2.0.1:8080", InstanceState::Serving),
        ]
    }

    fn replay(mut observed: Vec<Observed>, target: &Target, strategy: &Strategy) -> (usize, Vec<Observed>) {
        // Carry out every step as the executor would, with fresh addresses for new instances.
        let mut steps = 0;
        let mut next_addr = 100;
        while let Some(step) = next_step(&observed, target, strategy) {
            steps += 1;
            assert!(steps < 50, "no fix-point");
            for (svc, ops) in step.services {
                observed.retain(|o| o.service != svc || !ops.stop.contains(&o.address));
                for o in observed.iter_mut().filter(|o| o.service == svc) {
                    o.state = InstanceState::Serving;
                    if let Some((_, w)) = ops.weights.iter().find(|(a, _)| *a == o.address) {
                        o.weight = *w;
                    }
                }
                for (version, node, weight) in ops.start {
                    next_addr += 1;
                    observed.push(Observed {
                        service: svc.clone(),
                        version,
                        node,
                        address: format!("127.9.0.{next_addr}:8080"),
                        state: InstanceState::Serving,
                        weight,
                    });
                }
            }
        }
        (steps, observed)
    }

    #[test]
    fn every_strategy_reaches_the_target_through_operations() {
        let target = Target::new(&arch("v2", 2, 1));
        for name in Strategy::NAMES {
            let strategy = Strategy::from_name(name).unwrap();
            let (steps, end) = replay(running("v1"), &target, &strategy);
            assert!(steps >= 1, "{name}");
            assert_eq!(end.len(), 3, "{name}: {end:?}");
            assert!(end.iter().all(|o| o.version == "v2" && o.weight == 100), "{name}: {end:?}");
        }
    }

    #[test]
    fn rolling_starts_before_it_stops_and_names_what_to_stop() {
        let target = Target::new(&arch("v2", 2, 1));
        let strategy = Strategy::from_name("rolling").unwrap();
        let step = next_step(&running("v1"), &target, &strategy).unwrap();
        let ops = &step.services["cart"];
        assert!(ops.start_first);
        assert!(!ops.start.is_empty());
        assert!(ops.start.iter().all(|(v, _, _)| v == "v2"));
        assert!(ops.stop.iter().all(|a| a.starts_with("127.")), "{ops:?}");
    }

    #[test]
    fn an_interrupted_step_is_finished_first() {
        let target = Target::new(&arch("v2", 2, 1));
        let strategy = Strategy::from_name("rolling").unwrap();
        let mut observed = running("v1");
        observed[0].state = InstanceState::Draining;
        observed.push(obs("v2", "node-a", "127.1.0.9:8080", InstanceState::Starting));
        let step = next_step(&observed, &target, &strategy).unwrap();
        let ops = &step.services["cart"];
        assert_eq!(ops.stop, vec!["127.1.0.1:8080".to_owned()]);
        assert_eq!(ops.await_healthy, vec!["127.1.0.9:8080".to_owned()]);
        assert!(ops.start.is_empty(), "{ops:?}");
    }

    #[test]
    fn nothing_to_do_at_the_target() {
        let target = Target::new(&arch("v1", 2, 1));
        assert_eq!(next_step(&running("v1"), &target, &Strategy::from_name("canary").unwrap()), None);
    }

    #[test]
    fn pushing_the_old_version_mid_way_goes_back() {
        let strategy = Strategy::from_name("rolling").unwrap();
        let mut observed = running("v1");
        observed.push(obs("v2", "node-a", "127.1.0.9:8080", InstanceState::Serving));
        observed.remove(0);
        let (_, end) = replay(observed, &Target::new(&arch("v1", 2, 1)), &strategy);
        assert!(end.iter().all(|o| o.version == "v1"), "{end:?}");
        assert_eq!(end.len(), 3);
    }
}
