//! What runs: instances with node, version, state and weight, kept as groups of identical
//! instances so that a cluster of thousands of instances stays small to compare and copy.
//!
//! Several versions of one service may run at once (old v1 ×4 and new v2 ×2 during a
//! rollout), each with its own backend weight; traffic shares follow from the weights.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::architecture::Architecture;

/// Backend weight of an instance that takes its plain share of traffic.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Life cycle of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Started, not yet healthy: gets no traffic.
    Starting,
    /// Healthy; gets new connections in proportion to its weight.
    Serving,
    /// Gets no new connections; its open connections finish.
    Draining,
    /// Being stopped (pre-stop hook done, signals sent).
    Stopping,
}

impl InstanceState {
    /// The lowercase name used in files and output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Stopping => "stopping",
        }
    }
}

/// One running instance as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Service it belongs to.
    pub service: String,
    /// Node it runs on.
    pub node: String,
    /// Address it listens on.
    pub address: SocketAddr,
    /// Version label.
    pub version: String,
    /// Where it is in its life cycle.
    pub state: InstanceState,
    /// Relative share of new connections while serving.
    pub weight: u32,
}

/// `count` identical instances of one service: same version, node, state and weight.
/// Names are shared (`Arc<str>`): the planner copies states at every step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Group {
    /// Version label.
    pub version: Arc<str>,
    /// Node they run on.
    pub node: Arc<str>,
    /// Their state.
    pub state: InstanceState,
    /// Backend weight of each of them.
    pub weight: u32,
    /// How many.
    pub count: u32,
}

impl Group {
    /// `count` serving instances of `version` on `node` with the default weight.
    pub fn serving(version: &str, node: &str, count: u32) -> Self {
        Self {
            version: version.into(),
            node: node.into(),
            state: InstanceState::Serving,
            weight: DEFAULT_WEIGHT,
            count,
        }
    }

    /// Whether these instances get new connections.
    pub fn takes_traffic(&self) -> bool {
        self.state == InstanceState::Serving && self.weight > 0
    }
}

/// The instances of one service, as canonical groups: sorted, merged, none empty. Two
/// states with the same instances are equal whatever order they were built in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceState {
    groups: Vec<Group>,
}

impl ServiceState {
    /// The canonical state holding `groups`.
    pub fn from_groups(groups: impl IntoIterator<Item = Group>) -> Self {
        let mut groups: Vec<Group> = groups.into_iter().filter(|g| g.count > 0).collect();
        groups.sort_by(|a, b| (&a.version, &a.node, a.state, a.weight).cmp(&(&b.version, &b.node, b.state, b.weight)));
        let mut merged: Vec<Group> = Vec::with_capacity(groups.len());
        for g in groups {
            match merged.last_mut() {
                Some(last)
                    if last.version == g.version
                        && last.node == g.node
                        && last.state == g.state
                        && last.weight == g.weight =>
                {
                    last.count = last.count.saturating_add(g.count);
                }
                _ => merged.push(g),
            }
        }
        Self { groups: merged }
    }

    /// The groups, in canonical order.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Whether no instance exists.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// All instances, whatever their state.
    pub fn total(&self) -> u32 {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Instances that get new connections (serving with a weight above 0).
    pub fn serving(&self) -> u32 {
        self.groups.iter().filter(|g| g.takes_traffic()).map(|g| g.count).sum()
    }

    /// Whether every instance is serving (nothing starting, draining or stopping).
    pub fn is_settled(&self) -> bool {
        self.groups.iter().all(|g| g.state == InstanceState::Serving)
    }

    /// The state once every started instance is up and every leaving one is gone: what an
    /// interrupted step would have reached.
    pub fn settled(&self) -> Self {
        Self::from_groups(self.groups.iter().filter_map(|g| match g.state {
            InstanceState::Starting | InstanceState::Serving => {
                Some(Group { state: InstanceState::Serving, ..g.clone() })
            }
            InstanceState::Draining | InstanceState::Stopping => None,
        }))
    }

    /// Traffic weight per version (count × weight of instances taking traffic), and the total.
    pub fn traffic(&self) -> (BTreeMap<&str, u64>, u64) {
        let mut per: BTreeMap<&str, u64> = BTreeMap::new();
        let mut total = 0;
        for g in self.groups.iter().filter(|g| g.takes_traffic()) {
            let w = u64::from(g.count) * u64::from(g.weight);
            *per.entry(g.version.as_ref()).or_default() += w;
            total += w;
        }
        (per, total)
    }

    /// Share of new connections per version, in percent (versions with none are left out).
    pub fn shares(&self) -> BTreeMap<String, f64> {
        let (per, total) = self.traffic();
        per.into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(v, w)| (v.to_owned(), (w as f64) * 100.0 / (total as f64)))
            .collect()
    }
}

/// A whole cluster: every service's instances. Services with no instance are absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cluster {
    /// Instances per service name.
    pub services: BTreeMap<String, ServiceState>,
}

impl Cluster {
    /// What `arch` asks for: every placed instance serving at the default weight.
    pub fn from_architecture(arch: &Architecture) -> Self {
        let mut services = BTreeMap::new();
        for s in &arch.services {
            let version: Arc<str> = s.version.as_str().into();
            let state = ServiceState::from_groups(s.placement.iter().map(|(node, &count)| Group {
                version: Arc::clone(&version),
                node: node.as_str().into(),
                state: InstanceState::Serving,
                weight: DEFAULT_WEIGHT,
                count,
            }));
            if !state.is_empty() {
                services.insert(s.name.clone(), state);
            }
        }
        Self { services }
    }

    /// The cluster the agents report, instance by instance.
    pub fn from_instances(instances: &[Instance]) -> Self {
        Self::from_each(
            instances.iter().map(|i| (i.service.as_str(), i.version.as_str(), i.node.as_str(), i.state, i.weight)),
        )
    }

    /// The cluster of single instances, each given as (service, version, node, state,
    /// weight).
    pub fn from_each<'a>(each: impl IntoIterator<Item = (&'a str, &'a str, &'a str, InstanceState, u32)>) -> Self {
        let mut per: BTreeMap<&str, Vec<Group>> = BTreeMap::new();
        for (service, version, node, state, weight) in each {
            per.entry(service).or_default().push(Group {
                version: version.into(),
                node: node.into(),
                state,
                weight,
                count: 1,
            });
        }
        let mut c = Self::default();
        for (name, groups) in per {
            c.set(name, ServiceState::from_groups(groups));
        }
        c
    }

    /// The instances of `service` (empty when it has none).
    pub fn service(&self, service: &str) -> Option<&ServiceState> {
        self.services.get(service)
    }

    /// Replaces the instances of `service`; an empty state removes it.
    pub fn set(&mut self, service: &str, state: ServiceState) {
        if state.is_empty() {
            self.services.remove(service);
        } else {
            self.services.insert(service.to_owned(), state);
        }
    }

    /// Every service settled (see [`ServiceState::settled`]).
    pub fn settled(&self) -> Self {
        let mut c = Self::default();
        for (name, s) in &self.services {
            c.set(name, s.settled());
        }
        c
    }

    /// Whether every instance of every service is serving.
    pub fn is_settled(&self) -> bool {
        self.services.values().all(ServiceState::is_settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(version: &str, node: &str, state: InstanceState, weight: u32, count: u32) -> Group {
        Group { version: version.into(), node: node.into(), state, weight, count }
    }

    #[test]
    fn canonical_form_merges_and_sorts() {
        let a = ServiceState::from_groups([
            g("v2", "b", InstanceState::Serving, 100, 1),
            g("v1", "a", InstanceState::Serving, 100, 2),
            g("v2", "b", InstanceState::Serving, 100, 2),
            g("v1", "c", InstanceState::Draining, 100, 0),
        ]);
        let b = ServiceState::from_groups([
            g("v1", "a", InstanceState::Serving, 100, 2),
            g("v2", "b", InstanceState::Serving, 100, 3),
        ]);
        assert_eq!(a, b);
        assert_eq!(a.total(), 5);
    }

    #[test]
    fn shares_follow_weights_of_serving_instances() {
        let s = ServiceState::from_groups([
            g("v1", "a", InstanceState::Serving, 95, 4),
            g("v2", "a", InstanceState::Serving, 20, 1),
            g("v2", "b", InstanceState::Starting, 100, 1),
            g("v1", "b", InstanceState::Draining, 100, 1),
        ]);
        let shares = s.shares();
        assert!((shares["v1"] - 95.0).abs() < 1e-9);
        assert!((shares["v2"] - 5.0).abs() < 1e-9);
        assert_eq!(s.serving(), 5);
        assert_eq!(s.settled().total(), 6);
        assert!(s.settled().is_settled());
    }

    #[test]
    fn from_instances_groups_them() {
        let addr = |s: &str| s.parse().unwrap();
        let inst = |node: &str, a: &str, v: &str| Instance {
            service: "cart".into(),
            node: node.into(),
            address: addr(a),
            version: v.into(),
            state: InstanceState::Serving,
            weight: 100,
        };
        let c = Cluster::from_instances(&[
            inst("node-a", "127.1.0.1:80", "v1"),
            inst("node-a", "127.1.0.2:80", "v1"),
            inst("node-b", "127.1.0.3:80", "v2"),
        ]);
        assert_eq!(
            c.service("cart").unwrap().groups(),
            &[Group::serving("v1", "node-a", 2), Group::serving("v2", "node-b", 1)]
        );
    }
}
