//! A pod's pre-stop, done by its node's agent: the coordinator marks the instance
//! draining and waits as a rollout's stop does (`Coordinator.DrainQuiet`): until every
//! live node's maps hold the drain (the barrier: no node opens a new connection to it),
//! then until no node has a connect to it in its handshake (each agent's count of its
//! clients' SYNs in flight, in its acks). Then the agent waits until this node's kernel
//! counts no open connection to it (`hl_active`) and no handshake in flight to it (this
//! node's clients' `hl_pending`, and the listener's half-open ones), or the deadline.
//! Its lease is then no longer renewed: it lapses to down, kept for stale clients, and
//! is removed three leases later. A coordinator without `DrainQuiet` (older) gets
//! `Drain`, the barrier alone, and the answer says other nodes' handshakes were not
//! waited for.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hitless_proto::v1::{self as pb, coordinator_client::CoordinatorClient, registry_client::RegistryClient};
use tonic::Status;
use tracing::{info, warn};

use super::{from_coordinator, parse_address, NodeApi, DEFAULT_DEADLINE};
use crate::abi::{Endpoint, PROTO_TCP};
use crate::writer::Maps;

/// How often the counts are read.
const POLL: Duration = Duration::from_millis(10);

/// Runs one pre-stop; answers when the wait is over.
pub async fn run(api: &NodeApi, req: pb::PreStopRequest) -> Result<pb::PreStopResponse, Status> {
    let t0 = Instant::now();
    let addr = parse_address(&req.address, "address")?;
    let address = addr.to_string();
    let deadline = t0
        + match req.deadline_ms {
            0 => DEFAULT_DEADLINE,
            ms => Duration::from_millis(ms),
        };
    let service = match api.leases.service_of(&address) {
        Some(s) => s,
        None => registered_service(api, &address).await?,
    };
    let key = pb::InstanceKey { service: service.clone(), address: address.clone() };

    // The barrier and every node's handshakes, within the deadline.
    let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let req = pb::DrainRequest { key: Some(key.clone()), timeout_ms: timeout.as_millis() as u64 };
    let mut coordinator = CoordinatorClient::new(api.coordinator.clone());
    let (drained, quiet) = match coordinator.drain_quiet(req.clone()).await {
        Ok(r) => {
            let r = r.into_inner();
            (r.barrier.unwrap_or_default(), Some((Duration::from_millis(r.quiet_ms), r.late)))
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            warn!(node = %api.node, %service, %address, "the coordinator has no DrainQuiet (older): draining with the barrier alone, other nodes' handshakes in flight are not waited for");
            let r = coordinator.drain(req).await.map_err(|s| from_coordinator("draining", &s))?;
            (r.into_inner(), None)
        }
        Err(s) => return Err(from_coordinator("draining", &s)),
    };
    let barrier = t0.elapsed() - quiet.as_ref().map_or(Duration::ZERO, |(q, _)| *q);
    let handshakes_late: Vec<String> =
        quiet.iter().flat_map(|(_, late)| late.iter()).map(|n| format!("{}: {}", n.node, n.handshakes)).collect();
    if !handshakes_late.is_empty() {
        warn!(node = %api.node, %service, %address, late = ?handshakes_late, "the deadline passed with other nodes' handshakes in flight to the instance");
    }
    let nodes_lost: Vec<String> = drained.nodes.iter().filter(|n| !n.connected).map(|n| n.node.clone()).collect();
    if !drained.complete {
        let late: Vec<&str> =
            drained.nodes.iter().filter(|n| n.connected && !n.acked).map(|n| n.node.as_str()).collect();
        warn!(node = %api.node, %service, %address, ?late, "the drain was not in effect on every node in time; waiting for connections anyway");
    }
    // A connect whose program ran before the drain counts itself a moment later.
    tokio::time::sleep(crate::inflight::SETTLE).await;

    let maps = Maps::open(&api.pin_dir)
        .map_err(|e| warn!(node = %api.node, %address, error = %e, "cannot read the connection counts; waiting for the deadline"))
        .ok();
    let ep = Endpoint::new(addr, PROTO_TCP);
    let (end, open, handshakes) = loop {
        let (open, handshakes) = match &maps {
            Some(m) => (m.active_connections(&ep), m.handshakes_in_flight(&ep) as u32 + half_open(addr)),
            // Connections it cannot see are never "0 open".
            None => (1, 0),
        };
        // Other nodes' handshakes still in flight: only the deadline ends the wait.
        if open <= 0 && handshakes == 0 && handshakes_late.is_empty() {
            break (pb::PreStopEnd::Connections, open.max(0), handshakes);
        }
        if Instant::now() >= deadline {
            break (pb::PreStopEnd::Deadline, open, handshakes);
        }
        tokio::time::sleep(POLL).await;
    };
    api.leases.release(&(service.clone(), address.clone()));
    let waited = t0.elapsed();
    info!(
        node = %api.node, %service, %address, revision = drained.revision, complete = drained.complete,
        barrier_ms = barrier.as_millis() as u64, waited_ms = waited.as_millis() as u64, end = ?end, open, handshakes,
        "pre-stop over; its lease is no longer renewed"
    );
    Ok(pb::PreStopResponse {
        service,
        drain_revision: drained.revision,
        barrier_complete: drained.complete,
        nodes_acked: drained.nodes.iter().filter(|n| n.acked).count() as u32,
        nodes_lost,
        barrier_ms: barrier.as_millis() as u64,
        waited_ms: waited.as_millis() as u64,
        end: end as i32,
        open_at_end: open,
        handshakes_at_end: handshakes,
        quiet_ms: quiet.as_ref().map_or(0, |(q, _)| q.as_millis() as u64),
        handshakes_late,
        quiet_checked: quiet.is_some(),
    })
}

fn half_open(addr: SocketAddr) -> u32 {
    u32::try_from(crate::inflight::half_open(addr)).unwrap_or(u32::MAX)
}

/// The service of the instance at `address` in the coordinator's registry (one not
/// registered through this agent: by hand, or through an agent that restarted).
async fn registered_service(api: &NodeApi, address: &str) -> Result<String, Status> {
    let list = RegistryClient::new(api.coordinator.clone())
        .list(pb::ListRequest {})
        .await
        .map_err(|s| from_coordinator("looking the instance up", &s))?
        .into_inner();
    list.instances.into_iter().find(|i| i.address == address).map(|i| i.service).ok_or_else(|| {
        Status::not_found(format!(
            "address: no instance at {address} in the coordinator's registry; nothing to drain (register it first: hitless-agent register)"
        ))
    })
}
