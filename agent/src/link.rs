//! Coordinator mode: the agent's end of the `AgentLink` session.
//!
//! The agent dials out, says which revision its pinned maps hold, receives the
//! registry as a snapshot and then as deltas, applies each to the maps through the
//! [`Writer`], and only then acknowledges the revision. When the coordinator is
//! unreachable the maps keep the last state (fail static) and the agent redials with
//! backoff; a delta that does not follow what it holds ends the session, and the next
//! one starts from a snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hitless_proto::v1::{self as pb, agent_link_client::AgentLinkClient, agent_message, coordinator_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::desired;
use crate::registry::{BackendSpec, BackendState, Policy, Protocol, Registry, ServiceSpec};
use crate::writer::{WriteError, Writer};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {url}: {source}")]
    Connect {
        /// Its URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The stream failed.
    #[error("session failed: {0}")]
    Stream(#[from] tonic::Status),
    /// The coordinator closed the session.
    #[error("the coordinator closed the session")]
    Closed,
    /// A delta did not start where the mirror is.
    #[error("delta from revision {base} but the agent holds {have}; resyncing from a snapshot")]
    OutOfSync {
        /// Revision the delta starts from.
        base: u64,
        /// Revision the agent holds.
        have: u64,
    },
    /// The maps could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The registry as the agent mirrors it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mirror {
    /// Revision of the last snapshot or delta.
    pub revision: u64,
    services: BTreeMap<String, pb::Service>,
    instances: BTreeMap<(String, String), pb::Instance>,
}

impl Mirror {
    /// The registry at a snapshot.
    pub fn from_snapshot(s: pb::Snapshot) -> Self {
        Self {
            revision: s.revision,
            services: s.services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            instances: s.instances.into_iter().map(|i| ((i.service.clone(), i.address.clone()), i)).collect(),
        }
    }

    /// Moves the mirror forward by a delta that starts where it is.
    pub fn apply_delta(&mut self, d: pb::Delta) -> Result<(), LinkError> {
        if d.base_revision != self.revision {
            return Err(LinkError::OutOfSync { base: d.base_revision, have: self.revision });
        }
        for name in d.removed_services {
            self.services.remove(&name);
        }
        for s in d.services {
            self.services.insert(s.name.clone(), s);
        }
        for k in d.removed_instances {
            self.instances.remove(&(k.service, k.address));
        }
        for i in d.instances {
            self.instances.insert((i.service.clone(), i.address.clone()), i);
        }
        self.revision = d.revision;
        Ok(())
    }

    /// The registry the datapath should steer by. The coordinator validated every
    /// entry; one that still does not parse is skipped with a warning, never fatal.
    pub fn to_registry(&self) -> Registry {
        let mut services = Vec::with_capacity(self.services.len());
        for s in self.services.values() {
            let vips = s
                .vips
                .iter()
                .filter_map(|v| {
                    v.parse::<SocketAddr>()
                        .map_err(|_| warn!(service = %s.name, vip = %v, "skipping unparsable VIP"))
                        .ok()
                })
                .collect();
            let backends = self
                .instances
                .range((s.name.clone(), String::new())..)
                .take_while(|((svc, _), _)| *svc == s.name)
                .filter_map(|(_, i)| {
                    let address = i
                        .address
                        .parse::<SocketAddr>()
                        .map_err(
                            |_| warn!(service = %s.name, address = %i.address, "skipping unparsable instance address"),
                        )
                        .ok()?;
                    Some(BackendSpec {
                        address,
                        state: match i.state() {
                            pb::InstanceState::Serving => BackendState::Serving,
                            pb::InstanceState::Draining => BackendState::Draining,
                            pb::InstanceState::Down => BackendState::Down,
                        },
                        weight: i.weight,
                        version: (!i.version.is_empty()).then(|| i.version.clone()),
                    })
                })
                .collect();
            services.push(ServiceSpec {
                name: s.name.clone(),
                vips,
                protocol: match s.protocol() {
                    pb::Protocol::Tcp => Protocol::Tcp,
                    pb::Protocol::Udp => Protocol::Udp,
                },
                policy: match s.policy() {
                    pb::Policy::Steer => Policy::Steer,
                    pb::Policy::Reject => Policy::Reject,
                    pb::Policy::Allow => Policy::Allow,
                },
                backends,
            });
        }
        Registry { services }
    }
}

/// Runs sessions forever, redialling with backoff; the maps keep the last state in
/// between (fail static).
pub async fn run(url: String, node: String, mut writer: Writer) -> ! {
    let mut backoff = MIN_BACKOFF;
    loop {
        let e = session(&url, &node, &mut writer, &mut backoff).await;
        let held = writer.maps().revision().unwrap_or(0);
        warn!(%node, error = %e, revision = held, retry_ms = backoff.as_millis() as u64, "no coordinator session; steering with the state in force");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One session: hello, then apply-and-ack until the stream ends (always with an error).
async fn session(url: &str, node: &str, writer: &mut Writer, backoff: &mut Duration) -> LinkError {
    match session_inner(url, node, writer, backoff).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    url: &str,
    node: &str,
    writer: &mut Writer,
    backoff: &mut Duration,
) -> Result<std::convert::Infallible, LinkError> {
    let mut client = AgentLinkClient::connect(url.to_owned())
        .await
        .map_err(|source| LinkError::Connect { url: url.to_owned(), source })?;
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        node: node.to_owned(),
        applied_revision: writer.maps().revision()?,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        instances: Vec::new(),
    };
    // The channel has room: the receiver is not even polled yet.
    let _ = tx.try_send(pb::AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) });
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    info!(%node, %url, "coordinator session open");
    *backoff = MIN_BACKOFF;
    let mut mirror: Option<Mirror> = None;
    while let Some(msg) = inbound.message().await? {
        let next = match msg.msg {
            Some(coordinator_message::Msg::Snapshot(s)) => Mirror::from_snapshot(s),
            Some(coordinator_message::Msg::Delta(d)) => {
                let mut m = mirror.take().unwrap_or_default();
                m.apply_delta(d)?;
                m
            }
            Some(coordinator_message::Msg::Start(op)) => {
                let spec = op.spec.unwrap_or_default();
                refuse(&tx, &op.op_id, &spec.service, &spec.version, "").await;
                continue;
            }
            Some(coordinator_message::Msg::Stop(op)) => {
                refuse(&tx, &op.op_id, &op.service, "", &op.address).await;
                continue;
            }
            None => continue,
        };
        let started = std::time::Instant::now();
        let report = writer.apply(&desired::from_registry(&next.to_registry()), next.revision)?;
        info!(
            %node,
            revision = next.revision,
            services = report.services,
            backends = report.backends,
            writes = report.writes,
            micros = started.elapsed().as_micros() as u64,
            "registry applied"
        );
        let ack = pb::AgentMessage { msg: Some(agent_message::Msg::Ack(pb::Ack { revision: next.revision })) };
        if tx.send(ack).await.is_err() {
            return Err(LinkError::Closed);
        }
        mirror = Some(next);
    }
    Err(LinkError::Closed)
}

/// Answers an instance operation this agent cannot carry out.
async fn refuse(tx: &mpsc::Sender<pb::AgentMessage>, op_id: &str, service: &str, version: &str, address: &str) {
    let report = pb::InstanceReport {
        service: service.to_owned(),
        version: version.to_owned(),
        address: address.to_owned(),
        phase: pb::InstancePhase::Failed as i32,
        detail: "this agent runs no instances: start it with --workload-cgroup and --instance-addresses".to_owned(),
        op_id: op_id.to_owned(),
        id: String::new(),
    };
    let _ = tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Instance(report)) }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(svc: &str, addr: &str, state: pb::InstanceState) -> pb::Instance {
        pb::Instance {
            service: svc.into(),
            address: addr.into(),
            state: state as i32,
            weight: 100,
            ..Default::default()
        }
    }

    #[test]
    fn deltas_move_the_mirror_and_out_of_order_ones_are_refused() {
        let mut m = Mirror::from_snapshot(pb::Snapshot {
            revision: 3,
            services: vec![pb::Service {
                name: "cart".into(),
                vips: vec!["127.77.0.1:80".into()],
                ..Default::default()
            }],
            instances: vec![inst("cart", "127.0.1.1:80", pb::InstanceState::Serving)],
        });
        m.apply_delta(pb::Delta {
            base_revision: 3,
            revision: 4,
            instances: vec![
                inst("cart", "127.0.1.1:80", pb::InstanceState::Draining),
                inst("cart", "127.0.1.2:80", pb::InstanceState::Serving),
            ],
            ..Default::default()
        })
        .unwrap();
        let reg = m.to_registry();
        assert_eq!(reg.services[0].backends.len(), 2);
        assert_eq!(reg.services[0].backends[0].state, BackendState::Draining);
        let err = m.apply_delta(pb::Delta { base_revision: 9, revision: 10, ..Default::default() }).unwrap_err();
        assert!(matches!(err, LinkError::OutOfSync { base: 9, have: 4 }));
    }

    #[test]
    fn instances_are_grouped_under_their_own_service_only() {
        let m = Mirror::from_snapshot(pb::Snapshot {
            revision: 1,
            services: vec![
                pb::Service { name: "a".into(), ..Default::default() },
                pb::Service { name: "ab".into(), ..Default::default() },
            ],
            instances: vec![
                inst("a", "127.0.1.1:80", pb::InstanceState::Serving),
                inst("ab", "127.0.1.2:80", pb::InstanceState::Serving),
            ],
        });
        let reg = m.to_registry();
        assert_eq!(reg.services[0].backends.len(), 1);
        assert_eq!(reg.services[1].backends.len(), 1);
    }
}
