//! One service seen against its target: which instances stay (target version on a node that
//! wants them), which are old (another version, or more than the node wants), and how a
//! step's counts become concrete instances on concrete nodes.

use std::collections::BTreeMap;
use std::sync::Arc;

use hitless_model::{Group, InstanceState, ServiceState};

use crate::target::TargetService;

/// Instances of one (version, node), with the shared version and node names.
type Count<'a> = (u32, &'a Arc<str>, &'a Arc<str>);

/// A settled service state measured against its target.
pub(crate) struct View<'a> {
    /// The current instances (all serving).
    pub current: &'a ServiceState,
    /// Target version (`None`: the target drops the service).
    pub version: Option<&'a str>,
    /// Instances wanted per node, with the node's shared name.
    pub want: BTreeMap<&'a str, (u32, &'a Arc<str>)>,
    /// The target version's shared name (when any instance is wanted).
    version_name: Option<&'a Arc<str>>,
    /// Target-version instances per node (kept or excess).
    pub new_per_node: BTreeMap<&'a str, u32>,
    /// Desired instances (D).
    pub desired: u32,
    /// Target-version instances that stay (N).
    pub kept: u32,
    /// Instances that must go: other versions, and target-version ones beyond a node's want (O).
    pub old: u32,
    /// All instances (T = N + O).
    pub total: u32,
}

impl<'a> View<'a> {
    pub fn new(current: &'a ServiceState, target: Option<&'a TargetService>) -> Self {
        let version = target.map(|t| t.version.as_str());
        // The target state holds one serving group per node that wants instances.
        let wanted = target.map(|t| t.state.groups()).unwrap_or_default();
        let want: BTreeMap<&str, (u32, &Arc<str>)> =
            wanted.iter().map(|g| (g.node.as_ref(), (g.count, &g.node))).collect();
        let version_name = wanted.first().map(|g| &g.version);
        let mut new_per_node: BTreeMap<&str, u32> = BTreeMap::new();
        for g in current.groups().iter().filter(|g| Some(g.version.as_ref()) == version) {
            *new_per_node.entry(&g.node).or_default() += g.count;
        }
        let kept = new_per_node.iter().map(|(n, &c)| c.min(want.get(n).map_or(0, |w| w.0))).sum();
        let total = current.total();
        let desired = want.values().map(|w| w.0).sum();
        Self { current, version, version_name, desired, want, new_per_node, kept, old: total - kept, total }
    }

    /// Whether any instance of another version takes traffic.
    pub fn old_version_takes_traffic(&self) -> bool {
        self.current.groups().iter().any(|g| Some(g.version.as_ref()) != self.version && g.takes_traffic())
    }

    /// Instances of other versions.
    pub fn other_versions(&self) -> u32 {
        self.current.groups().iter().filter(|g| Some(g.version.as_ref()) != self.version).map(|g| g.count).sum()
    }

    /// The state after starting `start` target-version instances where nodes lack them,
    /// stopping `stop` old instances, and weighting target-version instances `w_new` and
    /// the others `w_old`.
    pub fn build(&self, start: u32, stop: u32, w_new: u32, w_old: u32) -> ServiceState {
        // (version, node) -> count and shared names, for every instance.
        let mut counts: BTreeMap<(&str, &str), Count<'_>> = BTreeMap::new();
        for g in self.current.groups() {
            counts.entry((&g.version, &g.node)).or_insert((0, &g.version, &g.node)).0 += g.count;
        }
        if let (Some(version), Some(version_name)) = (self.version, self.version_name) {
            // Each new instance goes to the node missing the most (ties: first by name).
            let mut deficit: BTreeMap<&str, (u32, &Arc<str>)> = self
                .want
                .iter()
                .map(|(&n, &(w, name))| (n, (w.saturating_sub(self.new_per_node.get(n).copied().unwrap_or(0)), name)))
                .filter(|(_, d)| d.0 > 0)
                .collect();
            for _ in 0..start {
                let Some((&node, _)) =
                    deficit.iter().filter(|(_, d)| d.0 > 0).max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(a.0)))
                else {
                    break;
                };
                if let Some(d) = deficit.get_mut(node) {
                    d.0 -= 1;
                    counts.entry((version, node)).or_insert((0, version_name, d.1)).0 += 1;
                }
            }
        }
        // Each stopped instance comes from: target-version excess first, then the node with
        // the most old instances (ties: first version, then first node by name).
        let mut excess: BTreeMap<&str, u32> = self
            .new_per_node
            .iter()
            .map(|(&n, &c)| (n, c.saturating_sub(self.want.get(n).map_or(0, |w| w.0))))
            .filter(|(_, e)| *e > 0)
            .collect();
        let mut old_per_node: BTreeMap<&str, u32> = BTreeMap::new();
        for ((v, n), c) in &counts {
            if Some(*v) != self.version {
                *old_per_node.entry(n).or_default() += c.0;
            }
        }
        for _ in 0..stop {
            if let Some((&node, _)) = excess.iter().find(|(_, e)| **e > 0) {
                if let (Some(version), Some(e)) = (self.version, excess.get_mut(node)) {
                    *e -= 1;
                    if let Some(c) = counts.get_mut(&(version, node)) {
                        c.0 -= 1;
                    }
                }
                continue;
            }
            let Some((&node, _)) =
                old_per_node.iter().filter(|(_, c)| **c > 0).max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            else {
                break;
            };
            let key =
                counts.iter().find(|((v, n), c)| *n == node && Some(*v) != self.version && c.0 > 0).map(|(k, _)| *k);
            if let Some(key) = key {
                if let (Some(c), Some(o)) = (counts.get_mut(&key), old_per_node.get_mut(node)) {
                    c.0 -= 1;
                    *o -= 1;
                }
            }
        }
        ServiceState::from_groups(counts.into_iter().map(|((version, _), (count, version_name, node))| Group {
            version: Arc::clone(version_name),
            node: Arc::clone(node),
            state: InstanceState::Serving,
            weight: if Some(version) == self.version { w_new } else { w_old },
            count,
        }))
    }
}
