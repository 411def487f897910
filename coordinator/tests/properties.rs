//! Property tests over random architectures × every strategy and parameters: plans end in
//! the target within the bound, keep the strategy's promise at every step, resume from any
//! step (settled or mid-step) to the same target, and are deterministic.

#![allow(clippy::unwrap_used, reason = "test helpers fail loudly")]

mod common;

use std::collections::BTreeMap;

use hitless_coordinator::planner::{plan, step_bound, Plan};
use hitless_coordinator::{Amount, Strategy as Strat, Target};
use hitless_model::{Architecture, Cluster, Group, InstanceState, RunSpec, Service, ServiceState};
use proptest::prelude::*;

/// One service of a scenario: target and current version and placement, dependencies.
#[derive(Debug, Clone)]
struct Spec {
    target_version: u8,
    target_placement: Vec<u32>,
    current: Option<(u8, Vec<u32>)>,
    deps: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Scenario {
    nodes: usize,
    services: Vec<Spec>,
}

fn placement(nodes: usize) -> impl proptest::strategy::Strategy<Value = Vec<u32>> {
    // 0–6 per node on up to 5 nodes: 0–30 instances.
    prop::collection::vec(prop_oneof![2 => Just(0u32), 5 => 1u32..=6], nodes)
}

fn scenario() -> impl proptest::strategy::Strategy<Value = Scenario> {
    (1usize..=5, 1usize..=20).prop_flat_map(|(nodes, n)| {
        let spec = (
            0u8..3,
            placement(nodes),
            prop::option::weighted(0.85, (0u8..3, placement(nodes))),
            prop::collection::vec(0usize..20, 0..3),
        )
            .prop_map(|(target_version, target_placement, current, deps)| Spec {
                target_version,
                target_placement,
                current,
                deps,
            });
        prop::collection::vec(spec, n).prop_map(move |services| Scenario { nodes, services })
    })
}

fn amount() -> impl proptest::strategy::Strategy<Value = Amount> {
    prop_oneof![(0u32..4).prop_map(Amount::Count), (0u32..=100).prop_map(Amount::Percent)]
}

fn any_strategy() -> impl proptest::strategy::Strategy<Value = Strat> {
    prop_oneof![
        Just(Strat::Straight),
        Just(Strat::Canary),
        Just(Strat::BlueGreen),
        Just(Strat::Mixed),
        (amount(), amount()).prop_map(|(max_surge, max_unavailable)| Strat::Rolling { max_surge, max_unavailable }),
        (amount(), 1u32..5).prop_map(|(first_batch, batches)| Strat::Gray { first_batch, batches }),
        prop::collection::btree_set(1u32..=100, 1..5)
            .prop_map(|steps| Strat::Weighted { steps: steps.into_iter().collect() }),
    ]
    .prop_filter_map("valid parameters", |s| s.validated().ok())
}

fn service(i: usize, version: u8, placement: &[u32], deps: Vec<String>) -> Service {
    Service {
        name: format!("svc-{i}"),
        version: format!("v{version}"),
        port: 8000 + u16::try_from(i).unwrap(),
        vips: Vec::new(),
        protocol: None,
        policy: None,
        run: RunSpec { command: vec!["./svc".into()], env: BTreeMap::new() },
        health: None,
        prestop: None,
        drain_deadline: None,
        config: BTreeMap::new(),
        depends_on: deps,
        placement: placement.iter().enumerate().map(|(n, &c)| (format!("node-{n}"), c)).collect(),
    }
}

impl Scenario {
    fn nodes(&self) -> Vec<String> {
        (0..self.nodes).map(|n| format!("node-{n}")).collect()
    }

    fn target(&self) -> Architecture {
        let services = self
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // Only earlier services: no cycles.
                let mut deps: Vec<String> = s.deps.iter().filter(|&&d| d < i).map(|d| format!("svc-{d}")).collect();
                deps.sort();
                deps.dedup();
                service(i, s.target_version, &s.target_placement, deps)
            })
            .collect();
        let arch = Architecture { nodes: self.nodes(), services };
        arch.validate().expect("generated architectures are valid");
        arch
    }

    fn current(&self) -> Architecture {
        let services = self
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.current.as_ref().map(|(v, p)| service(i, *v, p, Vec::new())))
            .collect();
        Architecture { nodes: self.nodes(), services }
    }
}

/// The cluster after each step, starting with `from` itself.
fn states(from: &Cluster, p: &Plan) -> Vec<Cluster> {
    let mut out = vec![from.clone()];
    let mut cur = from.clone();
    for step in &p.steps {
        for s in &step.services {
            cur.set(&s.service, s.after.clone());
        }
        out.push(cur.clone());
    }
    out
}

/// The new version's traffic share (numerator, denominator) in a service state.
fn share(s: Option<&ServiceState>, version: &str) -> (u64, u64) {
    let Some(s) = s else { return (0, 0) };
    let (per, total) = s.traffic();
    (per.get(version).copied().unwrap_or(0), total)
}

/// A state caught mid-step: the step's new instances still starting, its leaving ones draining.
fn mid_step(before: &Cluster, after: &Cluster) -> Cluster {
    let mut c = before.clone();
    for (name, a) in &after.services {
        let b = before.service(name).cloned().unwrap_or_default();
        let count = |s: &ServiceState, v: &str, n: &str| -> u32 {
            s.groups().iter().filter(|g| &*g.version == v && &*g.node == n).map(|g| g.count).sum()
        };
        let mut groups: Vec<Group> = b.groups().to_vec();
        for g in a.groups() {
            let extra = g.count.saturating_sub(count(&b, &g.version, &g.node));
            if extra > 0 {
                groups.push(Group { state: InstanceState::Starting, count: extra, ..g.clone() });
            }
        }
        c.set(name, ServiceState::from_groups(groups));
    }
    for (name, b) in &before.services {
        let a = after.service(name).cloned().unwrap_or_default();
        let mut groups = Vec::new();
        for g in c.service(name).map(|s| s.groups().to_vec()).unwrap_or_default() {
            let keep: u32 =
                a.groups().iter().filter(|x| x.version == g.version && x.node == g.node).map(|x| x.count).sum();
            if g.state == InstanceState::Serving && g.count > keep {
                groups.push(Group { count: keep, ..g.clone() });
                groups.push(Group { state: InstanceState::Draining, count: g.count - keep, ..g.clone() });
            } else {
                groups.push(g);
            }
        }
        let _ = b;
        c.set(name, ServiceState::from_groups(groups));
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn plans_reach_the_target_and_keep_the_promise(sc in scenario(), strategy in any_strategy()) {
        let (target_arch, current) = (sc.target(), Cluster::from_architecture(&sc.current()));
        let target = Target::new(&target_arch);
        let p = plan(&current, &target, &strategy, &[]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(p.steps.len() <= step_bound(&current, &target, &strategy));
        let all = states(&current, &p);
        prop_assert_eq!(all.last().unwrap(), &target.cluster());

        for (i, step) in p.steps.iter().enumerate() {
            // The planner's own check finds nothing: no serving below, no instances above the promise.
            for w in &step.warnings {
                prop_assert_eq!(w.kind.as_str(), "downtime", "{}", w.message);
            }
            for s in &step.services {
                let before = all[i].service(&s.service).cloned().unwrap_or_default();
                prop_assert_eq!(s.serving_before, before.serving());
                prop_assert!(s.serving_min <= s.serving_before.min(s.serving_after));
                prop_assert!(s.peak >= before.total().max(s.after.total()));
                let d = s.desired;
                match &strategy {
                    Strat::Rolling { max_surge, max_unavailable } => {
                        let (mut su, mut un) = (max_surge.round_up(d), max_unavailable.round_down(d));
                        if su == 0 && un == 0 { un = 1; su = 0; }
                        prop_assert!(s.serving_min >= d.saturating_sub(un).min(s.serving_before), "rolling floor: {:?}", s);
                        prop_assert!(s.peak <= (d + su).max(before.total()), "rolling ceiling: {:?}", s);
                    }
                    Strat::Canary => prop_assert!(s.serving_min >= d.saturating_sub(1).min(s.serving_before)),
                    Strat::Mixed => prop_assert!(s.peak <= (d + 1).max(before.total())),
                    Strat::BlueGreen => {
                        // Until the switch (old versions still take traffic), nothing old leaves.
                        let version = target.service(&s.service).map(|t| t.version.as_str());
                        let old_serving = s.after.groups().iter().any(|g| Some(g.version.as_ref()) != version && g.takes_traffic());
                        if old_serving {
                            prop_assert!(s.serving_min >= s.serving_before, "blue-green before the switch: {:?}", s);
                        }
                        prop_assert!(s.serving_min >= d.min(s.serving_before), "blue-green floor: {:?}", s);
                    }
                    Strat::Gray { .. } | Strat::Weighted { .. } => {
                        prop_assert!(s.serving_min >= d.min(s.serving_before), "{} floor: {:?}", strategy.name(), s);
                    }
                    Strat::Straight => {}
                }
                if s.serving_before > 0 && s.serving_min == 0 && d > 0 {
                    prop_assert!(step.warnings.iter().any(|w| w.service == s.service), "downtime not warned");
                }
            }
        }

        // Weighted: the new version's share never goes down.
        if let Strat::Weighted { .. } = strategy {
            for (name, t) in target.services() {
                let mut last = (0u64, 1u64);
                for c in &all[1..] {
                    let (n, d) = share(c.service(name), &t.version);
                    if d == 0 { continue; }
                    prop_assert!(u128::from(n) * u128::from(last.1) >= u128::from(last.0) * u128::from(d),
                        "share of {} fell from {}/{} to {}/{}", name, last.0, last.1, n, d);
                    last = (n, d);
                }
            }
        }
    }

    #[test]
    fn plans_resume_from_any_step_and_are_deterministic(
        sc in scenario(), strategy in any_strategy(), pick in any::<prop::sample::Index>(),
    ) {
        let (target_arch, current) = (sc.target(), Cluster::from_architecture(&sc.current()));
        let target = Target::new(&target_arch);
        let p = plan(&current, &target, &strategy, &[]).unwrap();
        prop_assert_eq!(&p, &plan(&current, &target, &strategy, &[]).unwrap());
        let all = states(&current, &p);
        let k = pick.index(all.len());

        // From a settled step: the rest of the same plan.
        let rest = plan(&all[k], &target, &strategy, &[]).unwrap();
        let afters = |p: &Plan| p.steps.iter().map(|s| s.services.iter().map(|x| (x.service.clone(), x.after.clone())).collect::<Vec<_>>()).collect::<Vec<_>>();
        prop_assert_eq!(afters(&rest), afters(&p)[k..].to_vec());

        // From mid-step (a crash while instances start and drain): settle, then reach the target.
        if k + 1 < all.len() {
            let mid = mid_step(&all[k], &all[k + 1]);
            let resumed = plan(&mid, &target, &strategy, &[]).unwrap();
            let end = states(&mid, &resumed);
            prop_assert_eq!(end.last().unwrap(), &target.cluster());
            if !mid.is_settled() {
                prop_assert!(resumed.steps[0].resume);
            }

            // Rollback mid-way: back to what ran before, with any strategy.
            let back = Target::new(&sc.current());
            let rb = plan(&mid, &back, &strategy, &[]).unwrap();
            let end = states(&mid, &rb);
            prop_assert_eq!(end.last().unwrap(), &back.cluster());
        }
    }

    #[test]
    fn planner_is_the_fix_point_of_the_transition(sc in scenario(), strategy in any_strategy()) {
        let (target_arch, current) = (sc.target(), Cluster::from_architecture(&sc.current()));
        let target = Target::new(&target_arch);
        let p = plan(&current, &target, &strategy, &[]).unwrap();
        // Iterating `Strat::next` by hand visits the same states as the planner.
        let mut cur = current.clone();
        let mut visited = Vec::new();
        while let Some(next) = strategy.next(&cur, &target) {
            cur = next.apply(&cur);
            visited.push(cur.clone());
            prop_assert!(visited.len() <= p.steps.len());
        }
        prop_assert_eq!(visited, states(&current, &p)[1..].to_vec());
    }
}
