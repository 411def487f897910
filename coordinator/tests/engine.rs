//! The rollout engine against an in-memory fleet (see `fleet`): what it does when an
//! agent's reports go missing, come late or come from elsewhere.

mod common;
mod fleet;

use std::time::Duration;

use fleet::{architecture, coordinator, push, push_gated, registered, wait_end, Agent, OnStart, Scratch};

const NODES: [&str; 2] = ["node-a", "node-b"];

/// A coordinator with one fake agent per node, `web` v1 deployed (one instance each).
async fn deployed(
    name: &str,
    health_timeout: Duration,
) -> (Scratch, std::sync::Arc<hitless_coordinator::server::Shared>, Vec<Agent>) {
    let dir = Scratch::new(name);
    let shared = coordinator(&dir.0, health_timeout);
    let agents: Vec<Agent> = NODES.iter().enumerate().map(|(i, n)| Agent::start(&shared, n, 180 + i as u8)).collect();
    push(&shared, &architecture("v1", &NODES, 1), "straight");
    let (state, log) = wait_end(&shared, Duration::from_secs(10)).await;
    assert_eq!(state, "done", "first deploy: {log:?}");
    (dir, shared, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_report_lost_with_its_session_does_not_fail_the_rollout() {
    let (_dir, shared, agents) = deployed("lost-serving", Duration::from_secs(1)).await;
    // node-a's next instance comes up, but the report that says so is lost: the
    // agent's hello listed it starting, and its serving report went to the session
    // that ended (a coordinator restarted while it started). Only a new hello tells.
    agents[0].state.lock().expect("state").on_start.push(OnStart::LoseServing);
    push(&shared, &architecture("v2", &NODES, 1), "rolling");
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "done", "a lost report must not fail the step: {log:?}");
    let serving: Vec<_> = registered(&shared).into_iter().filter(|i| i.1 == "serving").collect();
    assert_eq!(serving.len(), 2, "{serving:?}");
    assert!(serving.iter().all(|i| i.2 == "v2"), "{serving:?}");
    assert!(agents[0].state.lock().expect("state").sessions >= 2, "the agent was asked to say hello again");
    let running: usize = agents.iter().map(|a| a.addresses().len()).sum();
    assert_eq!(running, 2, "nothing started twice or left running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_reported_starting_counts_as_serving_under_any_operation() {
    let (_dir, shared, agents) = deployed("no-op-id", Duration::from_secs(1)).await;
    // Starting under the step's operation, serving under none (the agent that reports
    // it adopted it): the step goes on at once, without waiting for a resync.
    agents[1].state.lock().expect("state").on_start.push(OnStart::ServeWithoutOp);
    push(&shared, &architecture("v2", &NODES, 1), "rolling");
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "done", "{log:?}");
    assert_eq!(agents[1].state.lock().expect("state").sessions, 1, "no resync was needed: the report counted at once");
}

/// The registry's service `web`: (protocol, policy).
fn web_service(shared: &hitless_coordinator::server::Shared) -> (i32, i32) {
    let snap = shared.snapshot();
    let s = snap.services.iter().find(|s| s.name == "web").expect("service web");
    (s.protocol, s.policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_keeps_the_policy_registry_apply_set_unless_the_architecture_names_one() {
    use hitless_proto::v1 as pb;
    let dir = Scratch::new("policy");
    let shared = coordinator(&dir.0, Duration::from_secs(1));
    let _agents: Vec<Agent> = NODES.iter().enumerate().map(|(i, n)| Agent::start(&shared, n, 182 + i as u8)).collect();
    let reg = hitless_model::registry::Registry::parse(
        "services:\n  - name: web\n    vips: [\"127.77.90.1:8080\"]\n    policy: reject\n    backends: []\n",
    )
    .expect("registry file");
    shared.mutate(|s| Ok(s.apply(&reg))).expect("registry apply");
    let reject = (pb::Protocol::Tcp as i32, pb::Policy::Reject as i32);
    assert_eq!(web_service(&shared), reject);
    for (version, strategy) in [("v1", "straight"), ("v2", "rolling")] {
        push(&shared, &architecture(version, &NODES, 1), strategy);
        let (state, log) = wait_end(&shared, Duration::from_secs(20)).await;
        assert_eq!(state, "done", "{log:?}");
        assert_eq!(web_service(&shared), reject, "{version}: the rollout kept the policy registry apply set");
    }
    // An architecture that names a policy sets it; the protocol it does not name stays.
    let allow = architecture("v3", &NODES, 1).replace("    drain_deadline", "    policy: allow\n    drain_deadline");
    push(&shared, &allow, "rolling");
    let (state, log) = wait_end(&shared, Duration::from_secs(20)).await;
    assert_eq!(state, "done", "{log:?}");
    assert_eq!(web_service(&shared), (pb::Protocol::Tcp as i32, pb::Policy::Allow as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_the_report_of_its_own_node_and_operation() {
    let (_dir, shared, agents) = deployed("late-stop", Duration::from_secs(1)).await;
    agents[0].state.lock().expect("state").hold_stops = true;
    push(&shared, &architecture("v2", &NODES, 1), "rolling");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let op = loop {
        if let Some(op) = agents[0].state.lock().expect("state").held.first().cloned() {
            break op;
        }
        assert!(std::time::Instant::now() < deadline, "node-a was never asked to stop an instance");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Late reports on the same address: another node's (an earlier instance that had
    // the address), and this node's under another operation (an earlier stop).
    shared.instance_report("node-b", fleet::stopped(&op.address, &op.op_id));
    shared.instance_report("node-a", fleet::stopped(&op.address, "stop-web-an-earlier-one"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = registered(&shared);
    let state = listed.iter().find(|i| i.0 == op.address).map(|i| i.1.clone());
    assert_eq!(state.as_deref(), Some("draining"), "the stop still waits for its own report: {listed:?}");
    // Its own report: the rollout goes on.
    agents[0].state.lock().expect("state").running.remove(&op.address);
    shared.instance_report("node-a", fleet::stopped(&op.address, &op.op_id));
    agents[0].state.lock().expect("state").hold_stops = false;
    let (state, log) = wait_end(&shared, Duration::from_secs(20)).await;
    assert_eq!(state, "done", "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_while_starting_is_started_again_and_one_failing_on_its_own_fails_the_rollout() {
    let (_dir, shared, agents) = deployed("killed-start", Duration::from_secs(1)).await;
    // SIGKILLed from outside while it started (the OOM killer, an operator): not the
    // version's fault, so the engine starts another and the rollout goes on.
    agents[0].state.lock().expect("state").on_start.push(OnStart::Killed);
    push(&shared, &architecture("v2", &NODES, 1), "rolling");
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "done", "a killed start must be retried: {log:?}");
    let serving: Vec<_> = registered(&shared).into_iter().filter(|i| i.1 == "serving").collect();
    assert!(serving.len() == 2 && serving.iter().all(|i| i.2 == "v2"), "{serving:?}");
    // An instance that fails on its own still fails the rollout, as before.
    agents[1].state.lock().expect("state").on_start.push(OnStart::Fail);
    push(&shared, &architecture("v3", &NODES, 1), "rolling");
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_ne!(state, "done", "a version that fails on its own must not pass: {log:?}");
    assert!(log.iter().any(|l| l.contains("never became healthy")), "{log:?}");
}

/// Waits until the rollout is waiting at a gate (up to `limit`); its status.
async fn wait_waiting(
    shared: &hitless_coordinator::server::Shared,
    limit: Duration,
) -> hitless_proto::v1::RolloutStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let r = hitless_coordinator::engine::status(shared).expect("a rollout");
        if r.state == "waiting" {
            return r;
        }
        assert!(!["done", "failed", "rolled-back"].contains(&r.state.as_str()), "it ended instead of holding: {r:?}");
        assert!(std::time::Instant::now() < deadline, "never held: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analysis_with_nothing_to_judge_holds_passes_or_fails_as_its_gate_says_never_silently() {
    // The fleet's agents send no counters: no connect to v2 is ever seen.
    let (_dir, shared, _agents) = deployed("inconclusive", Duration::from_secs(1)).await;
    push_gated(&shared, &architecture("v2", &NODES, 1), "rolling", &["1:analysis=1s,1%"]);
    let held = wait_waiting(&shared, Duration::from_secs(30)).await;
    assert!(held.waiting_for.contains("inconclusive") && held.waiting_for.contains("web v2: no connects"), "{held:?}");
    assert!(held.waiting_for.contains("hitless promote"), "says what to do: {held:?}");
    hitless_coordinator::engine::promote(&shared).expect("promote");
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "done", "promoted, it goes on: {log:?}");

    push_gated(&shared, &architecture("v3", &NODES, 1), "rolling", &["1:analysis=1s,1%,pass"]);
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "done", "{log:?}");
    assert!(log.iter().any(|l| l.contains("inconclusive") && l.contains("passed as the gate says")), "noted: {log:?}");

    push_gated(&shared, &architecture("v4", &NODES, 1), "rolling", &["1:analysis=1s,1%,fail"]);
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "rolled-back", "{log:?}");
    assert!(log.iter().any(|l| l.contains("gate failed") && l.contains("inconclusive")), "{log:?}");
    let serving: Vec<_> = registered(&shared).into_iter().filter(|i| i.1 == "serving").collect();
    assert!(serving.iter().all(|i| i.2 == "v3"), "back on v3: {serving:?}");
}
