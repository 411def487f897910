//! The leases of instances registered through the local API: renewed with one
//! `Registry.Heartbeat` for all of them, every third of the shortest lease, until each
//! one's pre-stop releases it. An instance the coordinator no longer knows (its lease
//! lapsed three times over while the coordinator was out of reach, or the coordinator
//! lost it) is registered again: it was never stopped.
//!
//! The held instances are also kept in the state directory ([`super::registrations`]):
//! a restarted agent holds them again and renews their leases from its first round.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hitless_proto::v1::{self as pb, registry_client::RegistryClient};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use super::registrations::{File, RegistrationsError};

/// (service, address).
pub type Key = (String, String);

/// The instances whose leases this agent renews.
#[derive(Debug, Default)]
pub struct Leases {
    held: Mutex<BTreeMap<Key, pb::Instance>>,
    changed: Notify,
    /// Where the held instances are kept across restarts (none: in memory only).
    file: Option<File>,
}

impl Leases {
    /// Leases kept in `file`, holding again what it lists (an earlier agent's).
    pub fn restore(file: File) -> Result<Self, RegistrationsError> {
        let held = file.load()?.into_iter().map(|i| ((i.service.clone(), i.address.clone()), i)).collect();
        Ok(Self { held: Mutex::new(held), changed: Notify::new(), file: Some(file) })
    }

    /// The instances held, by key.
    pub fn held(&self) -> Vec<Key> {
        self.lock().keys().cloned().collect()
    }

    /// Renews `instance`'s lease from now on, and records it; returns how often leases
    /// are renewed. A failed record is returned after the instance is held (its lease
    /// is renewed, but a restarted agent would not know it).
    pub fn hold(&self, instance: pb::Instance) -> Result<Duration, RegistrationsError> {
        let key = (instance.service.clone(), instance.address.clone());
        let (every, saved) = {
            let mut held = self.lock();
            held.insert(key, instance);
            (every(&held), self.save(&held))
        };
        self.changed.notify_one();
        saved.map(|()| every.unwrap_or(super::DEFAULT_TTL / 3))
    }

    /// Stops renewing the lease of `key`, and records that; whether it was held.
    pub fn release(&self, key: &Key) -> bool {
        let (was, saved) = {
            let mut held = self.lock();
            let was = held.remove(key).is_some();
            (was, if was { self.save(&held) } else { Ok(()) })
        };
        if let Err(e) = saved {
            // A restarted agent would renew the released lease again: say so loudly.
            error!(service = %key.0, address = %key.1, error = %e, "the released instance is still recorded; an agent restarted now would renew its lease");
        }
        self.changed.notify_one();
        was
    }

    /// Writes the held instances to the file (under the lock, so writes keep their order).
    fn save(&self, held: &BTreeMap<Key, pb::Instance>) -> Result<(), RegistrationsError> {
        self.file.as_ref().map_or(Ok(()), |f| f.save(held.values()))
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
    // Leases restored from an earlier agent: renew them at once, they may be about to lapse.
    let mut at_once = !leases.lock().is_empty();
    loop {
        let period = every(&leases.lock());
        match period {
            None => {
                leases.changed.notified().await;
                continue;
            }
            Some(_) if at_once => at_once = false,
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
