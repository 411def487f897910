//! The `Coordinator` service for the CLI: status, and drain/undrain with a barrier
//! that returns once every live agent has the change in its kernel maps.
//!
//! Lost nodes: the barrier waits for the agents connected when the drain is decided.
//! A node whose agent is disconnected is reported (`connected: false`), never silently
//! counted; its datapath keeps steering with the last state it applied (fail static)
//! and it receives the drain as soon as it reconnects. A drain is complete when every
//! live agent acked within the timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_proto::v1::{self as pb, coordinator_server};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};
use tracing::info;

use super::state::Shared;
use crate::registry::{validate_key, Key};

/// Default wait of a drain barrier.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Coordinator` service.
pub struct ControlApi {
    /// Shared state.
    pub shared: Arc<Shared>,
}

impl ControlApi {
    async fn barrier(&self, req: pb::DrainRequest, state: pb::InstanceState) -> Result<pb::DrainResponse, Status> {
        let k = req.key.ok_or_else(|| Status::invalid_argument("key: missing; give { service, address }"))?;
        let key = validate_key(&k.service, &k.address, "key")?;
        let timeout = match req.timeout_ms {
            0 => DEFAULT_DRAIN_TIMEOUT,
            ms => Duration::from_millis(ms.min(600_000)),
        };
        barrier(&self.shared, key, state, timeout).await
    }
}

/// Sets an instance's state, then waits until every live agent's maps hold it.
pub async fn barrier(
    shared: &Shared,
    key: Key,
    state: pb::InstanceState,
    timeout: Duration,
) -> Result<pb::DrainResponse, Status> {
    {
        // Listen before deciding, so no ack can slip between the two.
        let mut acks = shared.acks.subscribe();
        let decided = Instant::now();
        let revision = shared.mutate(|s| s.set_state(&key, state))?;
        // Decided and durable; no ack waited for yet.
        crate::failpoint!("coordinator.barrier.after_commit", |fp| Status::unavailable(format!(
            "injected by failpoint {fp}"
        )));
        let deadline = decided + timeout;

        // Acks that already arrived (agents are fast): keep their exact times.
        let mut early: BTreeMap<String, Instant> = BTreeMap::new();
        while let Ok(ev) = acks.try_recv() {
            if ev.revision >= revision {
                early.entry(ev.node).or_insert(ev.at);
            }
        }
        let mut result: BTreeMap<String, pb::NodeAck> = BTreeMap::new();
        // A set: each ack removes its node in O(1) (a Vec scan made a barrier O(n²)).
        let mut pending = std::collections::HashSet::new();
        for (name, n) in shared.nodes() {
            let ack = pb::NodeAck { node: name.clone(), acked: false, latency_us: 0, connected: n.connected };
            if n.connected && n.applied >= revision {
                // No event: it held the revision before (the change was a no-op).
                let latency = early.get(&name).map_or(0, |at| at.saturating_duration_since(decided).as_micros() as u64);
                result.insert(name, pb::NodeAck { acked: true, latency_us: latency, ..ack });
            } else {
                if n.connected {
                    pending.insert(name.clone());
                }
                result.insert(name, ack);
            }
        }
        while !pending.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            let event = tokio::time::timeout(wait.min(Duration::from_millis(50)), acks.recv()).await;
            match event {
                Ok(Ok(ev)) if ev.revision >= revision => {
                    if pending.remove(&ev.node) {
                        if let Some(r) = result.get_mut(&ev.node) {
                            r.acked = true;
                            r.latency_us = ev.at.saturating_duration_since(decided).as_micros() as u64;
                        }
                    }
                }
                // An ack of an older revision (a late one, or a list of handshakes in
                // flight re-sent): nothing to learn; re-reading every node here made
                // a barrier O(n²) at a thousand agents.
                Ok(Ok(_)) => {}
                Err(_) | Ok(Err(RecvError::Lagged(_))) => {
                    // Timeout tick or missed events: re-read the nodes, catching acks
                    // we missed and agents that went away while we waited.
                    let nodes = shared.nodes();
                    pending.retain(|p| {
                        let Some(n) = nodes.get(p) else { return false };
                        let r = result.get_mut(p);
                        if !n.connected {
                            if let Some(r) = r {
                                r.connected = false;
                            }
                            return false;
                        }
                        if n.applied >= revision {
                            if let Some(r) = r {
                                r.acked = true;
                                r.latency_us = decided.elapsed().as_micros() as u64;
                            }
                            return false;
                        }
                        true
                    });
                }
                Ok(Err(RecvError::Closed)) => break,
            }
        }
        let nodes: Vec<pb::NodeAck> = result.into_values().collect();
        let complete = nodes.iter().all(|n| n.acked || !n.connected);
        info!(
            service = %key.0,
            address = %key.1,
            state = ?state,
            revision,
            acked = nodes.iter().filter(|n| n.acked).count(),
            lost = nodes.iter().filter(|n| !n.connected).count(),
            complete,
            micros = decided.elapsed().as_micros() as u64,
            "barrier"
        );
        Ok(pb::DrainResponse { revision, nodes, complete })
    }
}

#[tonic::async_trait]
impl coordinator_server::Coordinator for ControlApi {
    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let revision = self.shared.revision();
        let nodes = self
            .shared
            .nodes()
            .into_iter()
            .map(|(node, n)| pb::NodeStatus {
                node,
                connected: n.connected,
                applied_revision: n.applied,
                lag: revision.saturating_sub(n.applied),
                last_contact_ms_ago: n.last_contact.elapsed().map_or(0, |d| d.as_millis() as u64),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse { revision, nodes, rollout: crate::engine::status(&self.shared) }))
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(self.barrier(req.into_inner(), pb::InstanceState::Draining).await?))
    }

    async fn undrain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(self.barrier(req.into_inner(), pb::InstanceState::Serving).await?))
    }

    async fn drain_quiet(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainQuietResponse>, Status> {
        let (start, req) = (Instant::now(), req.into_inner());
        let k = req.key.clone().unwrap_or_default();
        let (_, address) = validate_key(&k.service, &k.address, "key")?;
        let timeout = match req.timeout_ms {
            0 => DEFAULT_DRAIN_TIMEOUT,
            ms => Duration::from_millis(ms.min(600_000)),
        };
        let barrier = self.barrier(req, pb::InstanceState::Draining).await?;
        let (t, left) = (Instant::now(), timeout.saturating_sub(start.elapsed()));
        let quiet = crate::engine::handshakes::quiet_everywhere(&*self.shared, barrier.revision, &address, left).await;
        let late = quiet.late.into_iter().map(|(node, handshakes)| pb::NodeInFlight { node, handshakes }).collect();
        Ok(Response::new(pb::DrainQuietResponse {
            barrier: Some(barrier),
            quiet_ms: t.elapsed().as_millis() as u64,
            late,
        }))
    }

    async fn push(&self, req: Request<pb::PushRequest>) -> Result<Response<pb::PushResponse>, Status> {
        Ok(Response::new(crate::engine::push(&self.shared, req.get_ref())?))
    }

    async fn pause(&self, _req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutResponse>, Status> {
        Ok(Response::new(crate::engine::pause(&self.shared)?))
    }

    async fn resume(&self, _req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutResponse>, Status> {
        Ok(Response::new(crate::engine::resume(&self.shared)?))
    }

    async fn promote(&self, _req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutResponse>, Status> {
        Ok(Response::new(crate::engine::promote(&self.shared)?))
    }

    async fn abort(&self, _req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutResponse>, Status> {
        Ok(Response::new(crate::engine::abort(&self.shared)?))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let req = req.into_inner();
        if req.node.is_empty() {
            return Err(Status::invalid_argument("node: missing; give the node's name (hitless node list)"));
        }
        let removed = self.shared.remove_node(&req.node, req.force)?;
        Ok(Response::new(pb::RemoveNodeResponse {
            was_connected: removed.was_connected,
            still_registered: removed
                .instances
                .into_iter()
                .map(|(service, address)| pb::InstanceKey { service, address })
                .collect(),
        }))
    }

    async fn pull(&self, _req: Request<pb::PullRequest>) -> Result<Response<pb::PullResponse>, Status> {
        Ok(Response::new(pb::PullResponse { architecture_yaml: crate::engine::pull(&self.shared)? }))
    }
}
