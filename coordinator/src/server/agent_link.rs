//! The `AgentLink` service: one session per agent. The agent says hello with the
//! revision its maps hold; the coordinator sends a snapshot, then a delta for every
//! change; the agent acks each revision once its maps hold it.

use std::pin::Pin;
use std::sync::Arc;

use hitless_proto::v1::{self as pb, agent_link_server, agent_message, coordinator_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

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
                "hello.node: {:?} is not a node name; use 1 to 63 lowercase letters, digits, '-' or '_'",
                hello.node
            )));
        }
        let node = hello.node.clone();
        let session = self.shared.connect(&node, hello.applied_revision);
        self.shared.set_instances(&node, hello.instances);
        let (tx, rx) = mpsc::channel(16);
        let (ops_tx, mut ops_rx) = mpsc::channel(256);
        self.shared.set_ops(&node, session, ops_tx);

        // Outbound: a snapshot first (the agent builds its mirror from it), then the
        // difference to each newer registry. Coalesces bursts: an agent always gets
        // the latest state, never a queue of stale ones.
        let mut published = self.shared.published.subscribe();
        tokio::spawn(async move {
            let mut last: Option<Arc<pb::Snapshot>> = None;
            loop {
                let now = published.borrow_and_update().clone();
                let msg = match &last {
                    None => Some(coordinator_message::Msg::Snapshot((*now).clone())),
                    Some(prev) if prev.revision == now.revision => None,
                    Some(prev) => Some(coordinator_message::Msg::Delta(delta(prev, &now))),
                };
                if let Some(msg) = msg {
                    if tx.send(Ok(pb::CoordinatorMessage { msg: Some(msg) })).await.is_err() {
                        break;
                    }
                    last = Some(now);
                }
                // Instance operations go out between registry updates, in order.
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { break },
                    op = ops_rx.recv() => match op {
                        Some(op) => if tx.send(Ok(op)).await.is_err() { break },
                        None => break,
                    },
                }
            }
        });

        // Inbound: acks, until the agent goes away.
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(agent_message::Msg::Ack(a)) => shared.ack(&node, session, &a),
                    Some(agent_message::Msg::Instance(r)) => shared.instance_report(&node, r),
                    Some(agent_message::Msg::Metrics(m)) => shared.metrics(&node, m),
                    Some(agent_message::Msg::Hello(_)) | None => {}
                }
            }
            shared.disconnect(&node, session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
