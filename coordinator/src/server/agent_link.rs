//! The `AgentLink` service: one session per agent. The agent says hello with the
//! revision its maps hold; the coordinator sends a snapshot, then a delta for every
//! change; the agent acks each revision once its maps hold it.
//!
//! A snapshot (or delta) larger than [`PART_BYTES`] goes to an agent that can assemble
//! parts (`Hello.snapshot_parts`) as a snapshot in [`pb::SnapshotPart`]s, so no message
//! comes near a client's 4 MiB decode limit however large the registry. Older agents
//! get one message, as before.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hitless_proto::v1::{self as pb, agent_link_server, agent_message, coordinator_message};
use hitless_tls::{Identity, Peer};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use super::state::Shared;
use crate::registry::delta;

/// The `AgentLink` service.
pub struct AgentLinkApi {
    /// Shared state.
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl agent_link_server::AgentLink for AgentLinkApi {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = req.extensions().get::<Peer>().cloned();
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "hello: the first message of a session must be hello { node, applied_revision }",
                ))
            }
        };
        if !hitless_model::registry::valid_node_name(&hello.node) {
            return Err(Status::invalid_argument(format!(
                "hello.node: {} is not a node name; {}",
                hitless_model::Quoted(&hello.node),
                hitless_model::registry::NODE_NAME_FIX
            )));
        }
        speaks_for(peer.as_ref(), &hello.node)?;
        if let Some(r) = hello.instances.iter().find(|r| !reports_own(&self.shared, &hello.node, r)) {
            return Err(refuse_report(peer.as_ref(), &hello.node, r));
        }
        crate::failpoint!("coordinator.agent_link.hello", |fp| Status::unavailable(format!(
            "injected by failpoint {fp}"
        )));
        let node = hello.node.clone();
        // What the hello says the maps hold is a claim: the node counts as holding a
        // revision only once it acks one this session sent (its snapshot comes first).
        let session = self.shared.connect(&node, 0);
        bury_crashed(&self.shared, &node, &hello.instances);
        self.shared.set_instances(&node, hello.instances);
        let (tx, rx) = mpsc::channel(16);
        // The newest revision this session sent; an ack of a later one is a claim.
        let sent = Arc::new(AtomicU64::new(0));
        let sent_out = Arc::clone(&sent);
        let (ops_tx, mut ops_rx) = mpsc::channel(256);
        self.shared.set_ops(&node, session, ops_tx);

        let tx_refuse = tx.clone();
        // Outbound: a snapshot first (the agent builds its mirror from it), then the
        // difference to each newer registry. Coalesces bursts: an agent always gets
        // the latest state, never a queue of stale ones.
        let parts = hello.snapshot_parts;
        let mut published = self.shared.published.subscribe();
        let mut wanted = self.shared.summaries.subscribe();
        // Tell the agent at once which counters to send (an older agent ignores it).
        wanted.mark_changed();
        tokio::spawn(async move {
            let mut last: Option<Arc<pb::Snapshot>> = None;
            loop {
                let now = published.borrow_and_update().clone();
                let msg = match &last {
                    None if parts && now.encoded_len() > PART_BYTES => None,
                    None => Some(coordinator_message::Msg::Snapshot((*now).clone())),
                    Some(prev) if prev.revision == now.revision => None,
                    Some(prev) => match delta(prev, &now) {
                        d if parts && d.encoded_len() > PART_BYTES => None,
                        d => Some(coordinator_message::Msg::Delta(d)),
                    },
                };
                // `return`: the stream to the agent fails (the session ends).
                crate::failpoint!("coordinator.agent_link.send_update", break);
                if last.as_ref().is_none_or(|p| p.revision != now.revision) {
                    sent_out.fetch_max(now.revision, Ordering::SeqCst);
                }
                let outcome = match msg {
                    Some(msg) => Some(tx.send(Ok(pb::CoordinatorMessage { msg: Some(msg) })).await.is_ok()),
                    None if last.as_ref().is_some_and(|p| p.revision == now.revision) => None,
                    None => Some(send_parts(&tx, &now).await),
                };
                match outcome {
                    Some(false) => break,
                    Some(true) => last = Some(now),
                    None => {}
                }
                // Instance operations go out between registry updates, in order.
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { break },
                    op = ops_rx.recv() => match op {
                        Some(op) => {
                            crate::failpoint!("coordinator.agent_link.send_op", break);
                            if tx.send(Ok(op)).await.is_err() { break }
                        }
                        None => break,
                    },
                    changed = wanted.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let services = wanted.borrow_and_update().iter().cloned().collect();
                        let msg = coordinator_message::Msg::Summaries(pb::Summaries { services });
                        if tx.send(Ok(pb::CoordinatorMessage { msg: Some(msg) })).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });

        // Inbound: acks, until the agent goes away.
        let shared = self.shared.clone();
        let refused = tx_refuse;
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                // `return`: the stream from the agent fails here (this message is lost).
                crate::failpoint!("coordinator.agent_link.recv", break);
                match m.msg {
                    Some(agent_message::Msg::Ack(a)) if a.revision > sent.load(Ordering::SeqCst) => {
                        warn!(peer = %describe(peer.as_ref(), &node), revision = a.revision, sent = sent.load(Ordering::SeqCst), "ignored an ack of a revision this session never sent");
                    }
                    Some(agent_message::Msg::Ack(a)) => shared.ack(&node, session, &a),
                    Some(agent_message::Msg::Instance(r)) if !reports_own(&shared, &node, &r) => {
                        let _ = refused.send(Err(refuse_report(peer.as_ref(), &node, &r))).await;
                        break;
                    }
                    Some(agent_message::Msg::Instance(r)) => {
                        bury_crashed(&shared, &node, std::slice::from_ref(&r));
                        shared.instance_report(&node, r);
                    }
                    Some(agent_message::Msg::Metrics(m)) => shared.metrics(&node, m),
                    Some(agent_message::Msg::Hello(_)) | None => {}
                }
            }
            shared.disconnect(&node, session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Refuses a hello for a node other than the one the connection's certificate names
/// (with mutual TLS; plaintext on loopback trusts the hello).
fn speaks_for(peer: Option<&Peer>, node: &str) -> Result<(), Status> {
    let Some(p) = peer.filter(|p| p.tls) else { return Ok(()) };
    if matches!(&p.identity, Some(Identity::Node(n)) if n == node) {
        return Ok(());
    }
    warn!(peer = %p.describe(), claimed = %node, "refused: a hello for another node");
    Err(Status::permission_denied(format!(
        "hello.node: {}, but this connection is {}: an agent speaks for its own node only (its --node must be the NAME of its node-NAME.pem)",
        hitless_model::Quoted(node),
        p.describe()
    )))
}

/// Whether a report from `node` is about an instance of its own: not one the registry
/// places on another node.
fn reports_own(shared: &Shared, node: &str, r: &pb::InstanceReport) -> bool {
    shared.instance(&(r.service.clone(), r.address.clone())).is_none_or(|i| i.node.is_empty() || i.node == node)
}

fn refuse_report(peer: Option<&Peer>, node: &str, r: &pb::InstanceReport) -> Status {
    warn!(peer = %describe(peer, node), service = %r.service, address = %r.address, "refused: a report about another node's instance; session ended, nothing changed");
    Status::permission_denied(format!(
        "instance {} {}: the registry places it on another node; node {node} reports its own instances only",
        r.service, r.address
    ))
}

/// The peer for logs: its certificate's identity, or the node a plaintext hello named.
fn describe(peer: Option<&Peer>, node: &str) -> String {
    match peer.filter(|p| p.tls) {
        Some(p) => p.describe(),
        None => format!("node {node} (plaintext)"),
    }
}

/// Marks down, on every node at once, each registered instance its own node reports
/// crashed: its process is gone, so every connect steered to it would be refused until
/// each node's outlier detection caught up. Kept as a tombstone, like a stopped one
/// (stale clients are steered to a sibling); a rollout starts its replacement.
fn bury_crashed(shared: &Shared, node: &str, reports: &[pb::InstanceReport]) {
    for r in reports.iter().filter(|r| r.phase() == pb::InstancePhase::Crashed) {
        let key = (r.service.clone(), r.address.clone());
        let Some(i) = shared.instance(&key) else { continue };
        if i.node != node || i.state() == pb::InstanceState::Down {
            continue;
        }
        match shared.bury(&key) {
            Ok(revision) => {
                warn!(%node, service = %r.service, address = %r.address, revision, detail = %r.detail, "instance crashed: marked down on every node")
            }
            Err(e) => {
                warn!(%node, service = %r.service, address = %r.address, error = %e.message(), "instance crashed but could not be marked down")
            }
        }
    }
}

/// Largest snapshot or delta sent as one message to an agent that assembles parts;
/// also the size of each part. A quarter of the 4 MiB decode limit, so a part stays
/// far below it whatever the framing adds.
pub const PART_BYTES: usize = 1 << 20;

/// The next part of `s` from `at` (services, then instances), of at most `max` encoded
/// bytes but never empty; `None` once everything was cut.
fn next_part(s: &pb::Snapshot, at: &mut (usize, usize), max: usize) -> Option<pb::SnapshotPart> {
    // Each entry costs its encoding plus a tag and a length prefix (at most 4 bytes
    // below 2 MiB).
    let mut part = pb::Snapshot { revision: s.revision, ..Default::default() };
    let mut size = 0;
    while let Some(svc) = s.services.get(at.0) {
        let n = svc.encoded_len() + 4;
        if size + n > max && size > 0 {
            break;
        }
        size += n;
        part.services.push(svc.clone());
        at.0 += 1;
    }
    while let Some(i) = s.instances.get(at.1) {
        let n = i.encoded_len() + 4;
        if size + n > max && size > 0 {
            break;
        }
        size += n;
        part.instances.push(i.clone());
        at.1 += 1;
    }
    if size == 0 {
        return None;
    }
    let last = at.0 == s.services.len() && at.1 == s.instances.len();
    Some(pb::SnapshotPart { part: Some(part), last })
}

/// Sends `s` as parts of at most [`PART_BYTES`], one after the other, each cut only
/// when the channel has room (a slow agent holds at most the channel's worth, not a
/// second copy of the registry). Returns false when the session is gone.
async fn send_parts(tx: &mpsc::Sender<Result<pb::CoordinatorMessage, Status>>, s: &pb::Snapshot) -> bool {
    let mut at = (0, 0);
    loop {
        let Ok(permit) = tx.reserve().await else { return false };
        match next_part(s, &mut at, PART_BYTES) {
            Some(p) => {
                let last = p.last;
                permit.send(Ok(pb::CoordinatorMessage { msg: Some(coordinator_message::Msg::SnapshotPart(p)) }));
                if last {
                    return true;
                }
            }
            // An empty registry: one empty part, marked last.
            None if at == (0, 0) => {
                let part = pb::Snapshot { revision: s.revision, ..Default::default() };
                let p = pb::SnapshotPart { part: Some(part), last: true };
                permit.send(Ok(pb::CoordinatorMessage { msg: Some(coordinator_message::Msg::SnapshotPart(p)) }));
                return true;
            }
            None => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(services: usize, per: usize) -> pb::Snapshot {
        let mut s = pb::Snapshot { revision: 7, ..Default::default() };
        for k in 0..services {
            s.services.push(pb::Service {
                name: format!("s{k}"),
                vips: vec![format!("127.78.0.{k}:80")],
                ..Default::default()
            });
            for j in 0..per {
                s.instances.push(pb::Instance {
                    service: format!("s{k}"),
                    address: format!("127.112.{k}.{j}:80"),
                    weight: 100,
                    version: "v1".into(),
                    ..Default::default()
                });
            }
        }
        s
    }

    #[test]
    fn parts_stay_under_the_bound_and_reassemble_to_the_snapshot() {
        let s = snapshot(200, 50);
        let max = 4096;
        let mut at = (0, 0);
        let mut whole = pb::Snapshot { revision: s.revision, ..Default::default() };
        let mut n = 0;
        while let Some(p) = next_part(&s, &mut at, max) {
            let part = p.part.expect("a part");
            assert!(part.encoded_len() <= max, "part {n} is {} bytes", part.encoded_len());
            assert_eq!(part.revision, 7);
            whole.services.extend(part.services);
            whole.instances.extend(part.instances);
            n += 1;
            assert_eq!(p.last, next_part(&s, &mut at.clone(), max).is_none(), "only the final part is last");
        }
        assert!(n > 10, "{n} parts");
        assert_eq!(whole, s);
    }

    #[tokio::test]
    async fn an_empty_registry_is_one_empty_last_part() {
        let (tx, mut rx) = mpsc::channel(4);
        assert!(send_parts(&tx, &pb::Snapshot { revision: 3, ..Default::default() }).await);
        drop(tx);
        let m = rx.recv().await.expect("a message").expect("ok");
        let Some(coordinator_message::Msg::SnapshotPart(p)) = m.msg else { panic!("{m:?}") };
        assert!(p.last);
        assert_eq!(p.part.map(|s| s.revision), Some(3));
        assert!(rx.recv().await.is_none());
    }
}
