//! The fleet as the engine sees it: a port. The engine needs the rollout's record, the
//! registry, the agents' sessions and reports, and a way to send them operations; it
//! names exactly that here, and whatever holds the fleet implements it: the gRPC server's
//! shared state in production (`server::fleet_port`), an in-memory fleet in tests
//! (`tests/engine_port.rs`), another store (etcd) later. Nothing under `engine/` names
//! the server or the store.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hitless_proto::v1::{self as pb, coordinator_message::Msg};
use tokio::sync::{broadcast, Notify};
use tonic::Status;

use super::prometheus::PromUrl;
use super::record::Rollout;
use crate::registry::{Changes, Key, RegistryError, RegistryState};

/// What the coordinator knows of one node's agent.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Id of the session in force (a reconnecting agent gets a new one).
    pub session: u64,
    /// A session is open.
    pub connected: bool,
    /// Revision its maps hold, as last acknowledged.
    pub applied: u64,
    /// Last message from it (wall clock: it is stored, and survives a restart).
    pub last_contact: SystemTime,
    /// The latest revision whose list of handshakes in flight is settled (see
    /// `settled` in the `Ack` message); 0 before any.
    pub settled: u64,
    /// Connects from this node still in their handshake, by backend address, to
    /// backends that are draining or down, as of its latest ack.
    pub in_flight: BTreeMap<String, u64>,
}

/// Totals of one version of a service over every node: (connects, failed, resets).
pub type VersionTotals = BTreeMap<(String, String), (u64, u64, u64)>;

/// What runs, per node, by address, as each node's agent last reported it.
pub type Running = BTreeMap<String, BTreeMap<String, pb::InstanceReport>>;

/// Everything the rollout engine needs from the fleet and its state. An implementation
/// keeps the registry's changes strictly ordered (each committed change gets the next
/// revision) and durable before they are visible.
pub trait Fleet: Send + Sync + 'static {
    // The rollout's record.

    /// The rollout as last stored.
    fn rollout(&self) -> Option<Rollout>;
    /// Stores the rollout durably, makes it the one in force, and notifies [`Fleet::wake`].
    fn save_rollout(&self, r: &Rollout) -> Result<(), Status>;
    /// Notified whenever the record changes (a push, pause, resume, promote or abort).
    fn wake(&self) -> &Notify;

    // The registry.

    /// The registry revision.
    fn revision(&self) -> u64;
    /// The registry now.
    fn snapshot(&self) -> Arc<pb::Snapshot>;
    /// The registered instance at `key`.
    fn instance(&self, key: &Key) -> Option<pb::Instance>;
    /// Computes a change from the registry in force, makes it durable and publishes it;
    /// returns the revision it got (the current one when there was nothing to change).
    fn mutate<C>(&self, change: C) -> Result<u64, Status>
    where
        C: FnOnce(&RegistryState) -> Result<Changes, RegistryError>;
    /// Marks a stopped instance down and keeps it for the tombstone time.
    fn bury(&self, key: &Key) -> Result<u64, Status>;
    /// Sets an instance's state, then waits (up to `timeout`) until every connected
    /// agent's maps hold it: a drain barrier.
    fn barrier(
        &self,
        key: Key,
        state: pb::InstanceState,
        timeout: Duration,
    ) -> impl Future<Output = Result<pb::DrainResponse, Status>> + Send;

    // The agents.

    /// The node roster with each node's agent session.
    fn nodes(&self) -> BTreeMap<String, NodeInfo>;
    /// What every node's agent runs.
    fn running(&self) -> Running;
    /// Instance reports as they arrive, with the node that sent each.
    fn reports(&self) -> broadcast::Receiver<(String, pb::InstanceReport)>;
    /// Sends an instance operation to `node`'s agent (its session in force only).
    fn send_op(&self, node: &str, msg: Msg) -> Result<(), String>;
    /// Asks `node`'s agent to reconnect and report what it runs; false when it has no
    /// session open.
    fn resync(&self, node: &str) -> bool;

    // Analysis gates.

    /// The services whose per-backend counters the agents should send (empty: none).
    fn want_summaries(&self, services: BTreeSet<String>);
    /// What every node's clients saw, per (service, version), summed over nodes.
    fn version_totals(&self) -> VersionTotals;
    /// The Prometheus server analysis gates query, if any, and its scrape lag.
    fn prometheus(&self) -> Option<(&PromUrl, Duration)>;

    // Settings.

    /// Longest wait for a new instance to become healthy.
    fn health_timeout(&self) -> Duration;
}

/// The nodes whose kernels may steer connects to an instance: every node of the roster
/// (`nodes`, stored: it outlives a coordinator restart, and only an operator's
/// `hitless node remove` shortens it) and every node that runs registered instances.
pub fn may_steer(nodes: &BTreeMap<String, NodeInfo>, registry: &pb::Snapshot) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = nodes.keys().cloned().collect();
    out.extend(registry.instances.iter().filter(|i| !i.node.is_empty()).map(|i| i.node.clone()));
    out
}

/// A shared fleet is a fleet: a handler or a test holding an `Arc` passes it as it is.
impl<F: Fleet> Fleet for Arc<F> {
    fn rollout(&self) -> Option<Rollout> {
        (**self).rollout()
    }
    fn save_rollout(&self, r: &Rollout) -> Result<(), Status> {
        (**self).save_rollout(r)
    }
    fn wake(&self) -> &Notify {
        (**self).wake()
    }
    fn revision(&self) -> u64 {
        (**self).revision()
    }
    fn snapshot(&self) -> Arc<pb::Snapshot> {
        (**self).snapshot()
    }
    fn instance(&self, key: &Key) -> Option<pb::Instance> {
        (**self).instance(key)
    }
    fn mutate<C>(&self, change: C) -> Result<u64, Status>
    where
        C: FnOnce(&RegistryState) -> Result<Changes, RegistryError>,
    {
        (**self).mutate(change)
    }
    fn bury(&self, key: &Key) -> Result<u64, Status> {
        (**self).bury(key)
    }
    fn barrier(
        &self,
        key: Key,
        state: pb::InstanceState,
        timeout: Duration,
    ) -> impl Future<Output = Result<pb::DrainResponse, Status>> + Send {
        (**self).barrier(key, state, timeout)
    }
    fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        (**self).nodes()
    }
    fn running(&self) -> Running {
        (**self).running()
    }
    fn reports(&self) -> broadcast::Receiver<(String, pb::InstanceReport)> {
        (**self).reports()
    }
    fn send_op(&self, node: &str, msg: Msg) -> Result<(), String> {
        (**self).send_op(node, msg)
    }
    fn resync(&self, node: &str) -> bool {
        (**self).resync(node)
    }
    fn want_summaries(&self, services: BTreeSet<String>) {
        (**self).want_summaries(services)
    }
    fn version_totals(&self) -> VersionTotals {
        (**self).version_totals()
    }
    fn prometheus(&self) -> Option<(&PromUrl, Duration)> {
        (**self).prometheus()
    }
    fn health_timeout(&self) -> Duration {
        (**self).health_timeout()
    }
}

#[cfg(test)]
mod tests {
    /// The engine reaches the fleet through [`super::Fleet`] only: no file under
    /// `src/engine/` names the server or the store (issue 17: no cycle between engine
    /// and server; a second store slides in under the port).
    #[test]
    fn the_engine_names_neither_the_server_nor_the_store() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
        let mut read = 0;
        for entry in std::fs::read_dir(&dir).expect("src/engine") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("source");
            // Spelled in halves, so that this file does not name them itself.
            let banned = [concat!("crate::", "server"), concat!("crate::", "store"), concat!("super::super", "::")];
            for banned in banned {
                assert!(!text.contains(banned), "{} names `{banned}`: reach it through the Fleet port", path.display());
            }
            read += 1;
        }
        assert!(read >= 7, "only {read} engine files read from {}", dir.display());
    }
}
