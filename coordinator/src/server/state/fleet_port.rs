//! The server's side of the engine's port: [`Shared`] is the fleet the rollout engine
//! drives, each method forwarding to the state's own (or to the control service's drain
//! barrier). The engine names only the port (`engine::fleet`), never the server.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hitless_proto::v1::{self as pb, coordinator_message::Msg};
use tokio::sync::{broadcast, Notify};
use tonic::Status;

use super::Shared;
use crate::engine::fleet::{Fleet, NodeInfo, Running, VersionTotals};
use crate::engine::prometheus::PromUrl;
use crate::engine::record::Rollout;
use crate::registry::{Changes, Key, RegistryError, RegistryState};
use crate::server::control::barrier;

impl Fleet for Shared {
    fn rollout(&self) -> Option<Rollout> {
        Shared::rollout(self)
    }

    fn save_rollout(&self, r: &Rollout) -> Result<(), Status> {
        Shared::save_rollout(self, r)
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    fn revision(&self) -> u64 {
        Shared::revision(self)
    }

    fn snapshot(&self) -> Arc<pb::Snapshot> {
        Shared::snapshot(self)
    }

    fn instance(&self, key: &Key) -> Option<pb::Instance> {
        Shared::instance(self, key)
    }

    fn mutate<C>(&self, change: C) -> Result<u64, Status>
    where
        C: FnOnce(&RegistryState) -> Result<Changes, RegistryError>,
    {
        Shared::mutate(self, change)
    }

    fn bury(&self, key: &Key) -> Result<u64, Status> {
        Shared::bury(self, key)
    }

    fn barrier(
        &self,
        key: Key,
        state: pb::InstanceState,
        timeout: Duration,
    ) -> impl Future<Output = Result<pb::DrainResponse, Status>> + Send {
        barrier(self, key, state, timeout)
    }

    fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        Shared::nodes(self)
    }

    fn running(&self) -> Running {
        Shared::running(self)
    }

    fn reports(&self) -> broadcast::Receiver<(String, pb::InstanceReport)> {
        self.reports.subscribe()
    }

    fn send_op(&self, node: &str, msg: Msg) -> Result<(), String> {
        Shared::send_op(self, node, msg)
    }

    fn resync(&self, node: &str) -> bool {
        Shared::resync(self, node)
    }

    fn want_summaries(&self, services: BTreeSet<String>) {
        self.summaries.send_replace(services);
    }

    fn version_totals(&self) -> VersionTotals {
        Shared::version_totals(self)
    }

    fn prometheus(&self) -> Option<(&PromUrl, Duration)> {
        self.prometheus.as_ref().map(|(url, lag)| (url, *lag))
    }

    fn health_timeout(&self) -> Duration {
        self.health_timeout
    }
}
