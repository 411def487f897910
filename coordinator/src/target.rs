//! The target of a rollout: per service the version and placement wanted, and the order of
//! services (providers before consumers) taken from `depends_on`.

use std::collections::BTreeMap;

use hitless_model::{Architecture, Cluster, Group, ServiceState};

/// What one service should look like at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetService {
    /// Version every instance should run.
    pub version: String,
    /// Instances per node.
    pub placement: BTreeMap<String, u32>,
    /// Update wave: 0 for services that depend on nothing, else one more than the highest
    /// wave of what it depends on.
    pub wave: usize,
    /// The instances wanted, in canonical form.
    pub state: ServiceState,
}

impl TargetService {
    /// Instances wanted over all nodes.
    pub fn desired(&self) -> u32 {
        self.placement.values().sum()
    }
}

/// A target architecture prepared for planning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Target {
    services: BTreeMap<String, TargetService>,
    waves: usize,
}

impl Target {
    /// Prepares `arch` (validated: names unique, `depends_on` acyclic). Should a cycle slip
    /// through, its services go in the last wave rather than failing.
    pub fn new(arch: &Architecture) -> Self {
        let waves = waves(arch);
        let services: BTreeMap<String, TargetService> = arch
            .services
            .iter()
            .zip(&waves)
            .map(|(s, &wave)| {
                let state =
                    ServiceState::from_groups(s.placement.iter().map(|(node, &n)| Group::serving(&s.version, node, n)));
                (
                    s.name.clone(),
                    TargetService { version: s.version.clone(), placement: s.placement.clone(), wave, state },
                )
            })
            .collect();
        Self { waves: waves.iter().max().map_or(0, |w| w + 1), services }
    }

    /// The target of `service`, if the architecture has it.
    pub fn service(&self, service: &str) -> Option<&TargetService> {
        self.services.get(service)
    }

    /// Every service of the target, by name.
    pub fn services(&self) -> &BTreeMap<String, TargetService> {
        &self.services
    }

    /// How many waves the target's services form; services the target drops come after them.
    pub fn waves(&self) -> usize {
        self.waves
    }

    /// The update wave of `service`; services the target drops go last, after every wave.
    pub fn wave(&self, service: &str) -> usize {
        self.services.get(service).map_or(self.waves, |t| t.wave)
    }

    /// The cluster this target describes.
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for (name, t) in &self.services {
            c.set(name, t.state.clone());
        }
        c
    }

    /// Whether `state` (absent: no instance) is what the target wants for `service`.
    pub fn is_reached(&self, service: &str, state: Option<&ServiceState>) -> bool {
        let empty = ServiceState::default();
        let want = self.services.get(service).map_or(&empty, |t| &t.state);
        state.unwrap_or(&empty) == want
    }
}

/// The wave of every service, in file order (Kahn's algorithm over `depends_on`).
fn waves(arch: &Architecture) -> Vec<usize> {
    let index: BTreeMap<&str, usize> = arch.services.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let n = arch.services.len();
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut missing = vec![0usize; n];
    for (i, s) in arch.services.iter().enumerate() {
        for dep in &s.depends_on {
            if let Some(&j) = index.get(dep.as_str()) {
                if j != i {
                    consumers[j].push(i);
                    missing[i] += 1;
                }
            }
        }
    }
    let mut wave = vec![0usize; n];
    let mut ready: Vec<usize> = (0..n).filter(|&i| missing[i] == 0).collect();
    let mut placed = 0;
    while let Some(j) = ready.pop() {
        placed += 1;
        for &i in &consumers[j] {
            wave[i] = wave[i].max(wave[j] + 1);
            missing[i] -= 1;
            if missing[i] == 0 {
                ready.push(i);
            }
        }
    }
    if placed < n {
        let last = wave.iter().max().map_or(0, |w| w + 1);
        for i in (0..n).filter(|&i| missing[i] > 0) {
            wave[i] = last;
        }
    }
    wave
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_come_before_consumers() {
        let arch = Architecture::parse(
            "services:
  - { name: web, version: v1, port: 80, run: { command: [w] }, depends_on: [cart, auth] }
  - { name: cart, version: v1, port: 81, run: { command: [c] }, depends_on: [db] }
  - { name: db, version: v1, port: 82, run: { command: [d] } }
  - { name: auth, version: v1, port: 83, run: { command: [a] } }
",
        )
        .unwrap();
        let t = Target::new(&arch);
        assert_eq!([t.wave("db"), t.wave("auth"), t.wave("cart"), t.wave("web"), t.wave("gone")], [0, 0, 1, 2, 3]);
    }
}
