//! What a coordinator restart must not forget (see `fleet`): the tombstones of stopped
//! instances, and the node roster the engine waits for.

mod common;
mod fleet;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::{architecture, coordinator_with, push, registered, wait_end, Agent, AgentState, Scratch, Tasks};
use hitless_coordinator::server::{Settings, Shared};
use hitless_proto::v1 as pb;

const NODES: [&str; 2] = ["node-a", "node-b"];

fn settings(tombstone: Duration) -> Settings {
    Settings {
        health_timeout: Duration::from_secs(1),
        prometheus_lag: Duration::ZERO,
        tombstone,
        ..Settings::default()
    }
}

/// Stops the coordinator's tasks and the agents (keeping what each runs), so that the
/// store can be opened again.
async fn shut_down(shared: Arc<Shared>, tasks: Tasks, agents: Vec<Agent>) -> Vec<(String, Arc<Mutex<AgentState>>)> {
    tasks.stop().await;
    let mut states = Vec::new();
    for a in agents {
        let node = a.node.clone();
        states.push((node, a.stop().await));
    }
    assert_eq!(Arc::strong_count(&shared), 1, "nothing else holds the coordinator");
    drop(shared);
    states
}

/// The instances of `web` registered `down`.
fn down(shared: &Shared) -> Vec<String> {
    registered(shared).into_iter().filter(|i| i.1 == "down").map(|i| i.0).collect()
}

/// Waits up to `limit` for `f` to hold.
async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} (within {limit:?})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_outlive_a_coordinator_restart_and_are_removed_when_due() {
    let dir = Scratch::new("tombstones");
    let tombstone = Duration::from_secs(3);
    let (shared, tasks) = coordinator_with(&dir.0, settings(tombstone));
    let agents: Vec<Agent> = NODES.iter().enumerate().map(|(i, n)| Agent::start(&shared, n, 190 + i as u8)).collect();
    for (version, strategy) in [("v1", "straight"), ("v2", "rolling")] {
        push(&shared, &architecture(version, &NODES, 1), strategy);
        let (state, log) = wait_end(&shared, Duration::from_secs(20)).await;
        assert_eq!(state, "done", "{version}: {log:?}");
    }
    let buried = down(&shared);
    assert_eq!(buried.len(), 2, "v1's instances are tombstones: {:?}", registered(&shared));
    let at = Instant::now();

    // A restart at once: the tombstones are not due yet.
    let states = shut_down(shared, tasks, agents).await;
    let (shared, tasks) = coordinator_with(&dir.0, settings(tombstone));
    let agents: Vec<Agent> =
        states.into_iter().enumerate().map(|(i, (n, st))| Agent::resume(&shared, &n, 190 + i as u8, st)).collect();
    assert_eq!(down(&shared), buried, "still there after the restart: stale clients are still steered");

    // Then removed at their deadline, not a full period after the restart.
    eventually(Duration::from_secs(15), "the tombstones were never removed after the restart", || {
        down(&shared).is_empty()
    })
    .await;
    let took = at.elapsed();
    assert!(took < tombstone + Duration::from_secs(2), "removed {took:?} after the rollout, tombstone {tombstone:?}");
    assert!(shared.tombstones().is_empty());
    let serving: Vec<_> = registered(&shared).into_iter().filter(|i| i.1 == "serving").collect();
    assert!(serving.len() == 2 && serving.iter().all(|i| i.2 == "v2"), "{serving:?}");
    drop(agents);
    tasks.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_instance_of_an_older_store_gets_a_full_tombstone_period_and_a_registry_files_down_backend_none() {
    let dir = Scratch::new("old-tombstones");
    {
        // What an older coordinator left: an instance it stopped (down, on a node, no
        // lease) and no tombstone record; and a registry file's backend set down.
        let store = hitless_coordinator::store::Store::open(&dir.0).expect("store");
        let mut state = store.load().expect("load");
        let stopped = pb::Instance {
            service: "web".into(),
            address: "127.192.0.1:8080".into(),
            state: pb::InstanceState::Down as i32,
            weight: 100,
            version: "v1".into(),
            node: "node-a".into(),
            ttl_ms: 0,
        };
        let filed = pb::Instance { address: "127.192.0.2:8080".into(), node: String::new(), ..stopped.clone() };
        for i in [stopped, filed] {
            let c = state.register(&i).expect("register");
            store.commit(&c, state.revision() + 1).expect("commit");
            state.commit(&c);
        }
    }
    let tombstone = Duration::from_secs(2);
    let opened = Instant::now();
    let (shared, tasks) = coordinator_with(&dir.0, settings(tombstone));
    assert_eq!(down(&shared).len(), 2);
    eventually(Duration::from_secs(10), "the stopped instance was never removed", || down(&shared).len() == 1).await;
    assert!(opened.elapsed() >= tombstone, "kept a full period: {:?}", opened.elapsed());
    assert_eq!(down(&shared), ["127.192.0.2:8080"], "a registry file's down backend is no tombstone");
    tasks.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_only_node_whose_agent_is_down_across_a_coordinator_restart_is_still_waited_for() {
    let dir = Scratch::new("roster");
    let (shared, tasks) = coordinator_with(&dir.0, settings(Duration::from_secs(180)));
    // node-c runs only clients: no instance of it is ever registered.
    let mut agents: Vec<Agent> =
        NODES.iter().enumerate().map(|(i, n)| Agent::start(&shared, n, 194 + i as u8)).collect();
    agents.push(Agent::start(&shared, "node-c", 196));
    eventually(Duration::from_secs(5), "node-c never connected", || {
        shared.nodes().get("node-c").is_some_and(|n| n.connected)
    })
    .await;
    push(&shared, &architecture("v1", &NODES, 1), "straight");
    let (state, log) = wait_end(&shared, Duration::from_secs(20)).await;
    assert_eq!(state, "done", "{log:?}");

    // node-c's agent is down while the coordinator restarts, and stays down.
    let mut states = shut_down(shared, tasks, agents).await;
    let (_, c_state) = states.pop().expect("node-c");
    let (shared, tasks) = coordinator_with(&dir.0, settings(Duration::from_secs(180)));
    let agents: Vec<Agent> =
        states.into_iter().enumerate().map(|(i, (n, st))| Agent::resume(&shared, &n, 194 + i as u8, st)).collect();

    // A rolling update drains and stops v1: node-c's kernel still steers with the maps it
    // had, so nothing may stop before it holds the drain.
    push(&shared, &architecture("v2", &NODES, 1), "rolling");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v1: Vec<_> = registered(&shared).into_iter().filter(|i| i.2 == "v1").collect();
    assert!(v1.len() == 2 && v1.iter().all(|i| i.1 != "down"), "a v1 instance was stopped without node-c: {v1:?}");
    let still: usize = agents.iter().map(|a| a.addresses().len()).sum();
    assert!(still >= 2, "v1 still runs everywhere");
    let r = hitless_coordinator::engine::status(&shared).expect("a rollout");
    assert_eq!(r.state, "running", "{r:?}");
    let roster = shared.nodes();
    assert!(roster.get("node-c").is_some_and(|n| !n.connected), "node-c is in the roster, disconnected: {roster:?}");

    // node-c comes back: the rollout goes on and ends.
    let c = Agent::resume(&shared, "node-c", 196, c_state);
    let (state, log) = wait_end(&shared, Duration::from_secs(30)).await;
    assert_eq!(state, "done", "{log:?}");
    let serving: Vec<_> = registered(&shared).into_iter().filter(|i| i.1 == "serving").collect();
    assert!(serving.len() == 2 && serving.iter().all(|i| i.2 == "v2"), "{serving:?}");
    drop((agents, c));
    tasks.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_the_roster_only_when_gone_or_forced_and_stays_removed_after_a_restart() {
    let dir = Scratch::new("remove-node");
    let (shared, tasks) = coordinator_with(&dir.0, settings(Duration::from_secs(180)));
    let a = Agent::start(&shared, "node-a", 198);
    let c = Agent::start(&shared, "node-c", 199);
    push(&shared, &architecture("v1", &["node-a"], 1), "straight");
    let (state, log) = wait_end(&shared, Duration::from_secs(20)).await;
    assert_eq!(state, "done", "{log:?}");

    let e = shared.remove_node("node-c", false).expect_err("node-c's agent is connected");
    assert!(e.message().contains("its agent is connected") && e.message().contains("--force"), "{e:?}");
    let e = shared.remove_node("node-x", false).expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    let states = shut_down(shared, tasks, vec![a, c]).await;
    let (shared, tasks) = coordinator_with(&dir.0, settings(Duration::from_secs(180)));
    let roster: Vec<String> = shared.nodes().into_keys().collect();
    assert_eq!(roster, ["node-a", "node-c"], "the roster outlives the restart");
    // Both agents are down now: node-a still runs a registered instance, node-c nothing.
    let e = shared.remove_node("node-a", false).expect_err("node-a runs web");
    assert!(e.message().contains("runs 1 registered instances (web 127.198.0.1:8080)"), "{e:?}");
    let removed = shared.remove_node("node-c", false).expect("node-c is gone and runs nothing");
    assert!(!removed.was_connected && removed.instances.is_empty());
    let forced = shared.remove_node("node-a", true).expect("forced");
    assert_eq!(forced.instances.len(), 1, "its instance stays registered, and is said so");

    drop(shared);
    tasks.stop().await;
    let (shared, tasks) = coordinator_with(&dir.0, settings(Duration::from_secs(180)));
    assert!(shared.nodes().is_empty(), "removed for good: {:?}", shared.nodes());
    // An agent that says hello joins again.
    let (_, st) = states.into_iter().next().expect("node-a");
    let a = Agent::resume(&shared, "node-a", 198, st);
    eventually(Duration::from_secs(5), "node-a never joined again", || shared.knows_node("node-a")).await;
    drop(a);
    tasks.stop().await;
}
