//! The built-in registry: services and instances under one monotonically increasing
//! revision.
//!
//! Pure: every operation computes a [`Changes`] from the current state without
//! touching it; the server persists the changes, then commits them here and
//! publishes the new snapshot. So a failed write changes nothing, and what agents
//! see is always what the store holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hitless_model::registry::{BackendState, Policy, Protocol, Registry};
use hitless_proto::v1 as pb;

/// Largest weight an instance may carry (weights are relative).
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Largest number of instances the registry accepts (a request past it is refused).
pub const MAX_INSTANCES: usize = 100_000;

/// Identifies an instance: (service, address).
pub type Key = (String, String);

/// A request the registry refuses; nothing changed. Maps to `InvalidArgument` or
/// `NotFound`, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A field of the request is wrong.
    #[error("{field}: {problem}; {fix}")]
    Invalid {
        /// Field path in the request.
        field: String,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// The instance is not registered.
    #[error(
        "instance {address} of service {service} is not registered; register it first (hitless registry register)"
    )]
    NotFound {
        /// Service.
        service: String,
        /// Address.
        address: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> RegistryError {
    RegistryError::Invalid { field: field.into(), problem: problem.into(), fix: fix.into() }
}

/// What an operation changes: upserts and removals, in the order to apply them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// Services added or changed.
    pub services: Vec<pb::Service>,
    /// Services removed (with all their instances).
    pub removed_services: Vec<String>,
    /// Instances added or changed.
    pub instances: Vec<pb::Instance>,
    /// Instances removed.
    pub removed_instances: Vec<Key>,
}

impl Changes {
    /// Whether nothing changes (no new revision then).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.removed_services.is_empty()
            && self.instances.is_empty()
            && self.removed_instances.is_empty()
    }
}

/// The registry at a revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistryState {
    revision: u64,
    services: BTreeMap<String, pb::Service>,
    instances: BTreeMap<Key, pb::Instance>,
}

impl RegistryState {
    /// A state as loaded from the store.
    pub fn from_parts(revision: u64, services: Vec<pb::Service>, instances: Vec<pb::Instance>) -> Self {
        Self {
            revision,
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            instances: instances.into_iter().map(|i| ((i.service.clone(), i.address.clone()), i)).collect(),
        }
    }

    /// The revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The registry's service `name`.
    pub fn service(&self, name: &str) -> Option<&pb::Service> {
        self.services.get(name)
    }

    /// An instance.
    pub fn instance(&self, key: &Key) -> Option<&pb::Instance> {
        self.instances.get(key)
    }

    /// Every instance.
    pub fn instances(&self) -> impl Iterator<Item = &pb::Instance> {
        self.instances.values()
    }

    /// The whole registry.
    pub fn snapshot(&self) -> pb::Snapshot {
        pb::Snapshot {
            revision: self.revision,
            services: self.services.values().cloned().collect(),
            instances: self.instances.values().cloned().collect(),
        }
    }

    /// Applies changes the store already holds, as the next revision.
    pub fn commit(&mut self, c: &Changes) -> u64 {
        if c.is_empty() {
            return self.revision;
        }
        for name in &c.removed_services {
            self.services.remove(name);
            self.instances.retain(|(svc, _), _| svc != name);
        }
        for s in &c.services {
            self.services.insert(s.name.clone(), s.clone());
        }
        for k in &c.removed_instances {
            self.instances.remove(k);
        }
        for i in &c.instances {
            self.instances.insert((i.service.clone(), i.address.clone()), i.clone());
        }
        self.revision += 1;
        self.revision
    }

    /// `registry apply`: the file's services replace the registry's. Instances the
    /// file lists replace the file-managed ones; instances registered with a lease or
    /// run by an agent stay while their service does.
    pub fn apply(&self, reg: &Registry) -> Changes {
        let mut c = Changes::default();
        let wanted: BTreeMap<&str, _> = reg.services.iter().map(|s| (s.name.as_str(), s)).collect();
        for name in self.services.keys() {
            if !wanted.contains_key(name.as_str()) {
                c.removed_services.push(name.clone());
            }
        }
        for s in &reg.services {
            let svc = pb::Service {
                name: s.name.clone(),
                vips: s.vips.iter().map(ToString::to_string).collect(),
                protocol: match s.protocol {
                    Protocol::Tcp => pb::Protocol::Tcp,
                    Protocol::Udp => pb::Protocol::Udp,
                } as i32,
                policy: match s.policy {
                    Policy::Steer => pb::Policy::Steer,
                    Policy::Reject => pb::Policy::Reject,
                    Policy::Allow => pb::Policy::Allow,
                } as i32,
            };
            if self.services.get(&s.name) != Some(&svc) {
                c.services.push(svc);
            }
            let mut listed = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let inst = pb::Instance {
                    service: s.name.clone(),
                    address: b.address.to_string(),
                    state: state_pb(b.state) as i32,
                    weight: b.weight,
                    version: b.version.clone().unwrap_or_default(),
                    node: String::new(),
                    ttl_ms: 0,
                };
                listed.push(inst.address.clone());
                if self.instances.get(&(inst.service.clone(), inst.address.clone())) != Some(&inst) {
                    c.instances.push(inst);
                }
            }
            for ((svc, addr), i) in self.instances.range((s.name.clone(), String::new())..) {
                if *svc != s.name {
                    break;
                }
                let file_managed = i.node.is_empty() && i.ttl_ms == 0;
                if file_managed && !listed.contains(addr) {
                    c.removed_instances.push((svc.clone(), addr.clone()));
                }
            }
        }
        c
    }

    /// `register`: adds or replaces one instance; its service is created (no VIPs) when new.
    pub fn register(&self, i: &pb::Instance) -> Result<Changes, RegistryError> {
        let i = validate_instance(i, "instance")?;
        if self.instances.len() >= MAX_INSTANCES
            && !self.instances.contains_key(&(i.service.clone(), i.address.clone()))
        {
            return Err(invalid(
                "instance",
                format!("the registry holds {MAX_INSTANCES} instances already"),
                "deregister instances that are gone",
            ));
        }
        if let Some(other) = self.instances.values().find(|o| o.address == i.address && o.service != i.service) {
            return Err(invalid(
                "instance.address",
                format!("{} is already an instance of service {}", i.address, other.service),
                "an address belongs to one service; deregister it there first",
            ));
        }
        let mut c = Changes::default();
        if !self.services.contains_key(&i.service) {
            c.services.push(pb::Service { name: i.service.clone(), ..Default::default() });
        }
        if self.instances.get(&(i.service.clone(), i.address.clone())) != Some(&i) {
            c.instances.push(i);
        }
        Ok(c)
    }

    /// `deregister`: removes one instance.
    pub fn deregister(&self, key: &Key) -> Result<Changes, RegistryError> {
        if !self.instances.contains_key(key) {
            return Err(RegistryError::NotFound { service: key.0.clone(), address: key.1.clone() });
        }
        Ok(Changes { removed_instances: vec![key.clone()], ..Changes::default() })
    }

    /// Adds or updates a service's VIPs and policy, keeping its instances.
    pub fn upsert_service(&self, svc: &pb::Service) -> Changes {
        if self.services.get(&svc.name) == Some(svc) {
            return Changes::default();
        }
        Changes { services: vec![svc.clone()], ..Changes::default() }
    }

    /// Sets an instance's weight.
    pub fn set_weight(&self, key: &Key, weight: u32) -> Result<Changes, RegistryError> {
        let Some(i) = self.instances.get(key) else {
            return Err(RegistryError::NotFound { service: key.0.clone(), address: key.1.clone() });
        };
        if i.weight == weight {
            return Ok(Changes::default());
        }
        let mut i = i.clone();
        i.weight = weight;
        Ok(Changes { instances: vec![i], ..Changes::default() })
    }

    /// `drain` / `undrain` (or a lease that lapsed): sets an instance's state.
    pub fn set_state(&self, key: &Key, state: pb::InstanceState) -> Result<Changes, RegistryError> {
        let Some(i) = self.instances.get(key) else {
            return Err(RegistryError::NotFound { service: key.0.clone(), address: key.1.clone() });
        };
        if i.state() == state {
            return Ok(Changes::default());
        }
        let mut i = i.clone();
        i.set_state(state);
        Ok(Changes { instances: vec![i], ..Changes::default() })
    }
}

fn state_pb(s: BackendState) -> pb::InstanceState {
    match s {
        BackendState::Serving => pb::InstanceState::Serving,
        BackendState::Draining => pb::InstanceState::Draining,
        BackendState::Down => pb::InstanceState::Down,
    }
}

/// Checks an instance from a request, naming the field at fault.
pub fn validate_instance(i: &pb::Instance, at: &str) -> Result<pb::Instance, RegistryError> {
    let (_, address) = validate_key(&i.service, &i.address, at)?;
    if pb::InstanceState::try_from(i.state).is_err() {
        return Err(invalid(
            format!("{at}.state"),
            format!("unknown state {}", i.state),
            "use SERVING, DRAINING or DOWN",
        ));
    }
    if i.weight > MAX_WEIGHT {
        return Err(invalid(
            format!("{at}.weight"),
            format!("weight {} is out of range", i.weight),
            format!("use 0 to {MAX_WEIGHT}"),
        ));
    }
    if i.version.len() > 128 {
        return Err(invalid(format!("{at}.version"), "is longer than 128 bytes", "use a short version label"));
    }
    let mut i = i.clone();
    i.address = address;
    Ok(i)
}

/// Checks a (service, address) pair from a request and returns it as a key, the address
/// in canonical form so that one instance has one key.
pub fn validate_key(service: &str, address: &str, at: &str) -> Result<Key, RegistryError> {
    if !hitless_model::registry::valid_name(service) {
        return Err(invalid(
            format!("{at}.service"),
            format!("{} is not a valid service name", hitless_model::Quoted(service)),
            "use 1 to 63 lowercase letters, digits and '-', starting with a letter",
        ));
    }
    match address.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Ok((service.to_owned(), a.to_string())),
        _ => Err(invalid(
            format!("{at}.address"),
            format!("{} is not an IP address with a port", hitless_model::Quoted(address)),
            "write it as 127.0.1.1:8080 or [::1]:8080",
        )),
    }
}

/// What changed between two snapshots, as a delta from `old` to `new`.
pub fn delta(old: &pb::Snapshot, new: &pb::Snapshot) -> pb::Delta {
    let old_s: BTreeMap<&str, &pb::Service> = old.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_s: BTreeMap<&str, &pb::Service> = new.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let old_i: BTreeMap<(&str, &str), &pb::Instance> =
        old.instances.iter().map(|i| ((i.service.as_str(), i.address.as_str()), i)).collect();
    let new_i: BTreeMap<(&str, &str), &pb::Instance> =
        new.instances.iter().map(|i| ((i.service.as_str(), i.address.as_str()), i)).collect();
    pb::Delta {
        base_revision: old.revision,
        revision: new.revision,
        services: new_s.iter().filter(|(n, s)| old_s.get(*n) != Some(*s)).map(|(_, s)| (*s).clone()).collect(),
        removed_services: old_s.keys().filter(|n| !new_s.contains_key(*n)).map(|n| (*n).to_owned()).collect(),
        instances: new_i.iter().filter(|(k, i)| old_i.get(*k) != Some(*i)).map(|(_, i)| (*i).clone()).collect(),
        removed_instances: old_i
            .keys()
            .filter(|k| !new_i.contains_key(*k))
            .map(|(s, a)| pb::InstanceKey { service: (*s).to_owned(), address: (*a).to_owned() })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Registry {
        Registry::parse(text).unwrap()
    }

    fn inst(svc: &str, addr: &str) -> pb::Instance {
        pb::Instance { service: svc.into(), address: addr.into(), weight: 100, ttl_ms: 3000, ..Default::default() }
    }

    #[test]
    fn apply_then_register_then_drain_bump_the_revision_once_each() {
        let mut r = RegistryState::default();
        let reg = file(
            "services:\n  - name: cart\n    vips: [\"127.77.0.1:80\"]\n    backends: [{ address: \"127.0.1.1:80\" }]\n",
        );
        let c = r.apply(&reg);
        assert_eq!(r.commit(&c), 1);
        assert!(r.apply(&reg).is_empty(), "applying the same file again changes nothing");

        let c = r.register(&inst("cart", "127.0.1.2:80")).unwrap();
        assert_eq!(r.commit(&c), 2);
        let key = ("cart".to_owned(), "127.0.1.2:80".to_owned());
        let c = r.set_state(&key, pb::InstanceState::Draining).unwrap();
        assert_eq!(r.commit(&c), 3);
        assert!(r.set_state(&key, pb::InstanceState::Draining).unwrap().is_empty());
        assert_eq!(r.snapshot().instances.len(), 2);

        // The file no longer lists 127.0.1.1; the registered instance stays.
        let c = r.apply(&file("services:\n  - name: cart\n    vips: [\"127.77.0.1:80\"]\n"));
        assert_eq!(c.removed_instances, vec![("cart".to_owned(), "127.0.1.1:80".to_owned())]);
        r.commit(&c);
        assert_eq!(r.snapshot().instances.len(), 1);
    }

    #[test]
    fn bad_requests_name_the_field_and_change_nothing() {
        let r = RegistryState::default();
        let e = r.register(&inst("Cart", "127.0.1.1:80")).unwrap_err();
        assert!(e.to_string().starts_with("instance.service: \"Cart\""), "{e}");
        let e = r.register(&inst("cart", "localhost:80")).unwrap_err();
        assert!(e.to_string().starts_with("instance.address:"), "{e}");
        let mut i = inst("cart", "127.0.1.1:80");
        i.weight = MAX_WEIGHT + 1;
        assert!(r.register(&i).unwrap_err().to_string().starts_with("instance.weight:"));
        i.weight = 1;
        i.state = 9;
        assert!(r.register(&i).unwrap_err().to_string().starts_with("instance.state:"));
        let e = r.deregister(&("cart".into(), "127.0.1.1:80".into())).unwrap_err();
        assert!(matches!(e, RegistryError::NotFound { .. }));
    }

    #[test]
    fn an_address_belongs_to_one_service() {
        let mut r = RegistryState::default();
        let c = r.register(&inst("a", "127.0.1.1:80")).unwrap();
        r.commit(&c);
        let e = r.register(&inst("b", "127.0.1.1:80")).unwrap_err();
        assert!(e.to_string().contains("already an instance of service a"), "{e}");
    }

    #[test]
    fn delta_carries_exactly_the_differences() {
        let mut r = RegistryState::default();
        let c = r.register(&inst("a", "127.0.1.1:80")).unwrap();
        r.commit(&c);
        let c = r.register(&inst("a", "127.0.1.2:80")).unwrap();
        r.commit(&c);
        let before = r.snapshot();
        let c = r.set_state(&("a".into(), "127.0.1.1:80".into()), pb::InstanceState::Draining).unwrap();
        r.commit(&c);
        let c = r.deregister(&("a".into(), "127.0.1.2:80".into())).unwrap();
        r.commit(&c);
        let d = delta(&before, &r.snapshot());
        assert_eq!((d.base_revision, d.revision), (2, 4));
        assert_eq!(d.instances.len(), 1);
        assert_eq!(d.instances[0].state(), pb::InstanceState::Draining);
        assert_eq!(d.removed_instances.len(), 1);
        assert!(d.services.is_empty() && d.removed_services.is_empty());
    }
}
