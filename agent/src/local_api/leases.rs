//! The leases of instances registered through the local API: renewed with one
//! `Registry.Heartbeat` for all of them, every third of the shortest lease, until each
//! one's pre-stop releases it. An instance the coordinator no longer knows (its lease
//! lapsed three times over while the coordinator was out of reach, or the coordinator
//! lost it) is registered again: it was never stopped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hitless_proto::v1::{self as pb, registry_client::RegistryClient};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::{info, warn};

/// (service, address).
pub type Key = (String, String);

/// The instances whose leases this agent renews.
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<BTreeMap<Key, pb::Instance>>,
    changed: Notify,
}

impl Leases {
    /// Renews `instance`'s lease from now on; returns how often leases are renewed.
    pub fn hold(&self, instance: pb::Instance) -> Duration {
        let key = (instance.service.clone(), instance.address.clone());
        let every = {
            let mut held = self.lock();
            held.insert(key, instance);
            every(&held)
        };
        self.changed.notify_one();
        every.unwrap_or(super::DEFAULT_TTL / 3)
    }

    /// Stops renewing the lease of `key`; whether it was held.
    pub fn release(&self, key: &Key) -> bool {
        let was = self.lock().remove(key).is_some();
        self.changed.notify_one();
        was
    }

    /// The service of the instance held at `address`.
    pub fn service_of(&self, address: &str) -> Option<String> {
        self.lock().keys().find(|(_, a)| a == address).map(|(s, _)| s.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, pb::Instance>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A third of the shortest lease held.
fn every(held: &BTreeMap<Key, pb::Instance>) -> Option<Duration> {
    held.values().map(|i| Duration::from_millis(i.ttl_ms) / 3).min()
}

/// Renews the held leases forever (errors are logged; the next round tries again).
pub async fn renew(leases: Arc<Leases>, coordinator: Channel) {
    let mut client = RegistryClient::new(coordinator);
    loop {
        let period = every(&leases.lock());
        match period {
            None => {
                leases.changed.notified().await;
                continue;
            }
            Some(d) => {
                // A new registration may shorten the period: look again at once.
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = leases.changed.notified() => continue,
                }
            }
        }
        let keys: Vec<pb::InstanceKey> = leases
            .lock()
            .keys()
            .map(|(service, address)| pb::InstanceKey { service: service.clone(), address: address.clone() })
            .collect();
        if keys.is_empty() {
            continue;
        }
        let unknown = match client.heartbeat(pb::HeartbeatRequest { keys }).await {
            Ok(r) => r.into_inner().unknown,
            Err(e) => {
                warn!(error = %e.message(), "lease renewal failed; trying again");
                continue;
            }
        };
        for k in unknown {
            // Released meanwhile (its pre-stop ran): leave it gone.
            let Some(instance) = leases.lock().get(&(k.service.clone(), k.address.clone())).cloned() else {
                continue;
            };
            match client.register(pb::RegisterRequest { instance: Some(instance) }).await {
                Ok(_) => {
                    info!(service = %k.service, address = %k.address, "the coordinator did not know the instance: registered it again")
                }
                Err(e) => {
                    warn!(service = %k.service, address = %k.address, error = %e.message(), "registering again failed")
                }
            }
        }
    }
}
