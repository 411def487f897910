//! Each strategy against a hand-checked plan: one service, 6 instances on 3 nodes,
//! v1 → v2, and the first deploy of the same.

#![allow(clippy::unwrap_used, reason = "test helpers fail loudly")]

mod common;

use common::{six, summary};
use hitless_coordinator::planner::plan;
use hitless_coordinator::{Amount, GateSpec, Strategy, Target};
use hitless_model::Cluster;

fn rollout(strategy: &Strategy) -> Vec<String> {
    let p = plan(&Cluster::from_architecture(&six("v1")), &Target::new(&six("v2")), strategy, &[]).unwrap();
    summary(&p)
}

fn named(name: &str) -> Strategy {
    Strategy::from_name(name).unwrap().validated().unwrap()
}

#[test]
fn straight_stops_everything_then_starts_everything_and_warns() {
    assert_eq!(
        rollout(&named("straight")),
        [
            "1  | -2v1@node-a -2v1@node-b -2v1@node-c | 6→0→0 | +0 | ",
            "warning downtime",
            "2 +2v2@node-a +2v2@node-b +2v2@node-c |  | 0→0→6 | +0 | v2:100",
        ]
    );
}

#[test]
fn canary_takes_one_out_then_puts_one_in() {
    assert_eq!(
        rollout(&named("canary")),
        [
            "1 +1v2@node-a | -1v1@node-a | 6→5→6 | +0 | v1:83.3 v2:16.7",
            "2 +1v2@node-b | -1v1@node-b | 6→5→6 | +0 | v1:66.7 v2:33.3",
            "3 +1v2@node-c | -1v1@node-c | 6→5→6 | +0 | v1:50 v2:50",
            "4 +1v2@node-a | -1v1@node-a | 6→5→6 | +0 | v1:33.3 v2:66.7",
            "5 +1v2@node-b | -1v1@node-b | 6→5→6 | +0 | v1:16.7 v2:83.3",
            "6 +1v2@node-c | -1v1@node-c | 6→5→6 | +0 | v2:100",
        ]
    );
}

#[test]
fn blue_green_brings_all_up_switches_then_removes() {
    assert_eq!(
        rollout(&named("blue-green")),
        [
            "1 +2v2@node-a +2v2@node-b +2v2@node-c |  | 6→6→6 | +6 | v1:100",
            "2  |  | 6→6→6 | +6 | v2:100",
            "3  | -2v1@node-a -2v1@node-b -2v1@node-c | 6→6→6 | +6 | v2:100",
        ]
    );
}

#[test]
fn mixed_puts_one_in_then_takes_one_out() {
    let s = rollout(&named("mixed"));
    assert_eq!(s.len(), 6, "{s:#?}");
    assert_eq!(s[0], "1 +1v2@node-a | -1v1@node-a | 6→6→6 | +1 | v1:83.3 v2:16.7");
    assert_eq!(s[5], "6 +1v2@node-c | -1v1@node-c | 6→6→6 | +1 | v2:100");
}

#[test]
fn rolling_respects_surge_and_unavailability() {
    // 25% of 6: surge rounds up to 2, unavailability down to 1.
    assert_eq!(
        rollout(&named("rolling")),
        [
            "1 +1v2@node-a +1v2@node-b +1v2@node-c | -1v1@node-a | 6→5→8 | +2 | v1:62.5 v2:37.5",
            "2 +1v2@node-a +1v2@node-b +1v2@node-c | -1v1@node-a -1v1@node-b -1v1@node-c | 8→5→8 | +2 | v1:25 v2:75",
            "3  | -1v1@node-b -1v1@node-c | 8→6→6 | +2 | v2:100",
        ]
    );
    let surge_only = Strategy::Rolling { max_surge: Amount::Percent(25), max_unavailable: Amount::Count(0) };
    assert_eq!(
        rollout(&surge_only),
        [
            "1 +1v2@node-a +1v2@node-b | -1v1@node-a -1v1@node-b | 6→6→6 | +2 | v1:66.7 v2:33.3",
            "2 +1v2@node-a +1v2@node-c | -1v1@node-a -1v1@node-c | 6→6→6 | +2 | v1:33.3 v2:66.7",
            "3 +1v2@node-b +1v2@node-c | -1v1@node-b -1v1@node-c | 6→6→6 | +2 | v2:100",
        ]
    );
    let unavailable_only = Strategy::Rolling { max_surge: Amount::Count(0), max_unavailable: Amount::Count(3) };
    assert_eq!(
        rollout(&unavailable_only),
        [
            // Spread over the nodes: the one missing the most goes first.
            "1 +1v2@node-a +1v2@node-b +1v2@node-c | -1v1@node-a -1v1@node-b -1v1@node-c | 6→3→6 | +0 | v1:50 v2:50",
            "2 +1v2@node-a +1v2@node-b +1v2@node-c | -1v1@node-a -1v1@node-b -1v1@node-c | 6→3→6 | +0 | v2:100",
        ]
    );
}

#[test]
fn gray_gates_the_first_batch_then_runs_the_batches() {
    assert_eq!(
        rollout(&named("gray")),
        [
            "1 +1v2@node-a | -1v1@node-a | 6→6→6 | +1 | v1:83.3 v2:16.7",
            "gate approval (strategy)",
            "2 +1v2@node-b +1v2@node-c | -1v1@node-b -1v1@node-c | 6→6→6 | +2 | v1:50 v2:50",
            "3 +1v2@node-a +1v2@node-b | -1v1@node-a -1v1@node-b | 6→6→6 | +2 | v1:16.7 v2:83.3",
            "4 +1v2@node-c | -1v1@node-c | 6→6→6 | +1 | v2:100",
        ]
    );
    let two = Strategy::Gray { first_batch: Amount::Percent(50), batches: 1 };
    assert_eq!(rollout(&two).len(), 3, "first half, gate, then the rest");
}

#[test]
fn weighted_moves_traffic_shares_by_weights() {
    assert_eq!(
        rollout(&named("weighted")),
        [
            "1 +2v2@node-a +2v2@node-b +2v2@node-c |  | 6→6→12 | +6 | v1:95 v2:5",
            "2  |  | 12→12→12 | +6 | v1:75 v2:25",
            "3  |  | 12→12→12 | +6 | v1:50 v2:50",
            "4  | -2v1@node-a -2v1@node-b -2v1@node-c | 12→6→6 | +6 | v2:100",
        ]
    );
    let p = plan(&Cluster::from_architecture(&six("v1")), &Target::new(&six("v2")), &named("weighted"), &[]).unwrap();
    // 5% as backend weights: 6 new at 6×5, 6 old at 6×95, reduced.
    let weights: Vec<(String, u32)> =
        p.steps[0].services[0].after.groups().iter().map(|g| (g.version.to_string(), g.weight)).collect();
    assert!(weights.contains(&("v1".into(), 19)) && weights.contains(&("v2".into(), 1)), "{weights:?}");
}

#[test]
fn first_deploy_starts_everything_at_once_except_gray() {
    for name in Strategy::NAMES {
        let p = plan(&Cluster::default(), &Target::new(&six("v1")), &named(name), &[]).unwrap();
        let expected = if name == "gray" { 4 } else { 1 };
        assert_eq!(p.steps.len(), expected, "{name}:\n{}", summary(&p).join("\n"));
        assert!(p.steps.iter().all(|s| s.warnings.is_empty()), "{name}");
    }
}

#[test]
fn operator_gates_land_on_their_steps() {
    let gates = ["2".parse::<GateSpec>().unwrap(), "3:analysis".parse().unwrap()];
    let p = plan(&Cluster::from_architecture(&six("v1")), &Target::new(&six("v2")), &named("canary"), &gates).unwrap();
    let s = summary(&p);
    assert!(s.contains(&"gate approval (operator)".to_owned()), "{s:#?}");
    assert!(s.contains(&"gate analysis 2m, errors ≤ 1.0% (operator)".to_owned()), "{s:#?}");
    let far = ["9".parse::<GateSpec>().unwrap()];
    let e =
        plan(&Cluster::from_architecture(&six("v1")), &Target::new(&six("v2")), &named("canary"), &far).unwrap_err();
    assert_eq!(e.to_string(), "--gate 9: the plan has only 6 steps; gate a step from 1 to 6");
}

#[test]
fn nothing_to_do_is_an_empty_plan() {
    for name in Strategy::NAMES {
        let p = plan(&Cluster::from_architecture(&six("v2")), &Target::new(&six("v2")), &named(name), &[]).unwrap();
        assert!(p.steps.is_empty(), "{name}");
    }
}
