//! The `Registry` service: register, deregister, heartbeat, list, watch, apply.

use std::pin::Pin;
use std::sync::Arc;

use hitless_model::registry::Registry;
use hitless_proto::v1::{self as pb, registry_server};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::state::Shared;
use crate::registry::{validate_instance, validate_key, Key};

/// Largest registry file `Apply` accepts in one message.
pub const MAX_REGISTRY_YAML: usize = 1 << 20;

/// Largest registry file `ApplyStream` accepts (about 150,000 instances; parsing one
/// takes about 35 times its size in memory for a moment).
pub const MAX_REGISTRY_TEXT: usize = 16 << 20;

/// Validates and applies a whole registry file.
fn apply_text(shared: &Shared, yaml: &str) -> Result<pb::ApplyResponse, Status> {
    let reg = Registry::parse(yaml).map_err(|e| {
        let lines: Vec<String> = e.problems().iter().map(|p| format!("registry_yaml: {p}")).collect();
        Status::invalid_argument(lines.join("\n"))
    })?;
    let revision = shared.mutate(|s| Ok(s.apply(&reg)))?;
    Ok(pb::ApplyResponse { revision })
}

/// The `Registry` service.
pub struct RegistryApi {
    /// Shared state.
    pub shared: Arc<Shared>,
}

fn key(k: Option<&pb::InstanceKey>, at: &str) -> Result<Key, Status> {
    let k = k.ok_or_else(|| Status::invalid_argument(format!("{at}: missing; give {{ service, address }}")))?;
    Ok(validate_key(&k.service, &k.address, at)?)
}

#[tonic::async_trait]
impl registry_server::Registry for RegistryApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let i = req
            .into_inner()
            .instance
            .ok_or_else(|| Status::invalid_argument("instance: missing; give the instance to register"))?;
        let i = validate_instance(&i, "instance")?;
        if !i.node.is_empty() && !self.shared.knows_node(&i.node) {
            return Err(Status::invalid_argument(format!(
                "instance.node: {:?} is not in the node roster (no agent of that name has said hello to this coordinator); start the node's agent first, or leave node empty",
                i.node
            )));
        }
        let revision = self.shared.mutate(|s| s.register(&i))?;
        Ok(Response::new(pb::RegisterResponse { revision }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let k = key(req.get_ref().key.as_ref(), "key")?;
        let revision = self.shared.mutate(|s| s.deregister(&k))?;
        Ok(Response::new(pb::DeregisterResponse { revision }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let keys = req
            .get_ref()
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| key(Some(k), &format!("keys[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let (revision, unknown) = self.shared.heartbeat(&keys)?;
        let unknown = unknown.into_iter().map(|(service, address)| pb::InstanceKey { service, address }).collect();
        Ok(Response::new(pb::HeartbeatResponse { revision, unknown }))
    }

    async fn list(&self, _req: Request<pb::ListRequest>) -> Result<Response<pb::Snapshot>, Status> {
        Ok(Response::new((*self.shared.snapshot()).clone()))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Snapshot, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let after = req.get_ref().after_revision;
        let stream = WatchStream::new(self.shared.published.subscribe())
            .filter(move |s| s.revision > after || after == 0)
            .map(|s| Ok((*s).clone()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let yaml = &req.get_ref().registry_yaml;
        if yaml.len() > MAX_REGISTRY_YAML {
            return Err(Status::invalid_argument(format!(
                "registry_yaml: {} bytes is more than the {MAX_REGISTRY_YAML} one Apply accepts; send it in parts with ApplyStream (`hitless registry apply` does)",
                yaml.len()
            )));
        }
        Ok(Response::new(apply_text(&self.shared, yaml)?))
    }

    async fn apply_stream(
        &self,
        req: Request<tonic::Streaming<pb::ApplyChunk>>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let mut parts = req.into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = parts.message().await? {
            if text.len() + chunk.registry_yaml_part.len() > MAX_REGISTRY_TEXT {
                return Err(Status::invalid_argument(format!(
                    "registry_yaml: more than the {} MiB a registry may have; nothing was changed. Split the fleet's services over several coordinators, or drop instances hitless does not steer",
                    MAX_REGISTRY_TEXT >> 20
                )));
            }
            text.extend_from_slice(&chunk.registry_yaml_part);
        }
        let yaml = String::from_utf8(text).map_err(|e| {
            Status::invalid_argument(format!(
                "registry_yaml: not UTF-8 text (at byte {}); save the file as UTF-8",
                e.utf8_error().valid_up_to()
            ))
        })?;
        Ok(Response::new(apply_text(&self.shared, &yaml)?))
    }
}
