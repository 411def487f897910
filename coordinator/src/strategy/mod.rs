//! Update strategies as transitions: given where a service is and where it should be, the
//! next intermediate state, or nothing when it is there. Pure and deterministic, and they
//! remember nothing: the next step depends only on the current and target states, so a
//! rollout can resume from any state (after a crash, or with a new target pushed mid-way).

mod params;
mod view;

use std::collections::BTreeMap;
use std::fmt;

use hitless_model::{Cluster, ServiceState, DEFAULT_WEIGHT};
use serde::Serialize;

pub use params::{Amount, Gate, GateSpec, Inconclusive, ParamError};

use crate::target::{Target, TargetService};
use view::View;

/// How the instances of a service are replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Strategy {
    /// Stop every old instance, then start every new one: downtime in between.
    Straight,
    /// One old instance out, then one new in, repeated: capacity dips by one, no extra.
    Canary,
    /// Every new instance up (no traffic), switch all traffic, then the old ones out.
    BlueGreen,
    /// One new instance in, then one old out, repeated: one extra, no dip.
    Mixed,
    /// Batches bounded like a Kubernetes Deployment: never more than desired + `max_surge`
    /// instances, never fewer than desired − `max_unavailable` serving.
    Rolling {
        /// Extra instances allowed (percentages rounded up).
        max_surge: Amount,
        /// Serving instances that may be missing (percentages rounded down).
        max_unavailable: Amount,
    },
    /// A first batch, an approval gate, then the rest in `batches` equal batches; each batch
    /// starts its new instances before stopping as many old ones.
    Gray {
        /// Size of the first batch.
        first_batch: Amount,
        /// Batches after the gate.
        batches: u32,
    },
    /// Every new instance up, then the new version's share of new connections goes through
    /// `steps` (percent, increasing, ending at 100), expressed as backend weights; at 100 the
    /// old instances are stopped.
    Weighted {
        /// Traffic shares of the new version, in percent.
        steps: Vec<u32>,
    },
}

/// The order of a step's two halves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// New instances start and become healthy, then old ones drain and stop.
    StartFirst,
    /// Old instances drain and stop, then new ones start.
    DrainFirst,
}

/// One service's step: its next state and how to get there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state after the step (every instance serving).
    pub next: ServiceState,
    /// Which half of the step goes first.
    pub order: Order,
    /// A gate the strategy itself puts after this step (gray's first batch).
    pub gate: Option<Gate>,
}

/// The next intermediate architecture: the services that move in this step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Intermediate {
    /// Transitions by service name.
    pub services: BTreeMap<String, Transition>,
}

impl Intermediate {
    /// The cluster once this step is done.
    pub fn apply(&self, current: &Cluster) -> Cluster {
        let mut next = current.clone();
        for (name, t) in &self.services {
            next.set(name, t.next.clone());
        }
        next
    }
}

/// What a strategy promises about capacity for a service of `desired` instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promise {
    /// Fewest instances taking traffic during any step (when it started with at least these).
    pub min_serving: u32,
    /// Most instances during any step (when it started with at most these); `None`: no bound
    /// (blue-green and weighted run both versions in full).
    pub max_total: Option<u32>,
}

impl Strategy {
    /// The names accepted by [`Strategy::from_name`].
    pub const NAMES: [&'static str; 7] = ["straight", "canary", "blue-green", "mixed", "rolling", "gray", "weighted"];

    /// Defaults for the strategies with parameters: rolling 25%/25% (as Kubernetes),
    /// gray 1 then 3 batches, weighted 5, 25, 50, 100.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "straight" => Self::Straight,
            "canary" => Self::Canary,
            "blue-green" => Self::BlueGreen,
            "mixed" => Self::Mixed,
            "rolling" => Self::Rolling { max_surge: Amount::Percent(25), max_unavailable: Amount::Percent(25) },
            "gray" => Self::Gray { first_batch: Amount::Count(1), batches: 3 },
            "weighted" => Self::Weighted { steps: vec![5, 25, 50, 100] },
            _ => return None,
        })
    }

    /// The strategy's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Straight => "straight",
            Self::Canary => "canary",
            Self::BlueGreen => "blue-green",
            Self::Mixed => "mixed",
            Self::Rolling { .. } => "rolling",
            Self::Gray { .. } => "gray",
            Self::Weighted { .. } => "weighted",
        }
    }

    /// Checks the parameters, and ends weighted steps at 100.
    pub fn validated(self) -> Result<Self, ParamError> {
        match self {
            Self::Rolling { max_surge, max_unavailable } if max_surge.is_zero() && max_unavailable.is_zero() => {
                Err(ParamError::new(
                    "--max-surge and --max-unavailable are both 0: no instance could ever be replaced",
                    "allow a surge (--max-surge 1) or an unavailability (--max-unavailable 1)",
                ))
            }
            Self::Gray { first_batch, .. } if first_batch.is_zero() => {
                Err(ParamError::new("--first-batch is 0", "start with at least one instance: --first-batch 1"))
            }
            Self::Gray { batches: 0, .. } => Err(ParamError::new("--batches is 0", "use 1 or more batches")),
            Self::Weighted { mut steps } => {
                if steps.iter().any(|&p| p == 0 || p > 100) || steps.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(ParamError::new(
                        format!("--steps {steps:?} are not increasing percentages"),
                        "give increasing shares from 1 to 100, e.g. --steps 5,25,50,100",
                    ));
                }
                if steps.last() != Some(&100) {
                    steps.push(100);
                }
                Ok(Self::Weighted { steps })
            }
            s => Ok(s),
        }
    }

    /// The capacity promise for a service of `desired` instances.
    pub fn promise(&self, desired: u32) -> Promise {
        let (s, u) = self.surge_unavailable(desired);
        match self {
            Self::Straight => Promise { min_serving: 0, max_total: Some(desired) },
            Self::Canary | Self::Mixed | Self::Rolling { .. } => {
                Promise { min_serving: desired.saturating_sub(u), max_total: Some(desired.saturating_add(s)) }
            }
            Self::Gray { first_batch, batches } => {
                let (_, batch) = gray_sizes(*first_batch, *batches, desired);
                Promise { min_serving: desired, max_total: Some(desired.saturating_add(batch)) }
            }
            Self::BlueGreen | Self::Weighted { .. } => Promise { min_serving: desired, max_total: None },
        }
    }

    /// Surge and unavailability of the strategies built on rolling batches.
    fn surge_unavailable(&self, desired: u32) -> (u32, u32) {
        let (s, u) = match self {
            Self::Canary => (0, 1),
            Self::Mixed => (1, 0),
            Self::Rolling { max_surge, max_unavailable } => {
                (max_surge.round_up(desired), max_unavailable.round_down(desired))
            }
            _ => (0, 0),
        };
        // As Kubernetes: when both round to 0, one instance may be unavailable.
        if s == 0 && u == 0 {
            (0, 1)
        } else {
            (s, u)
        }
    }

    /// The next intermediate architecture from `current` toward `target`, or `None` when
    /// `current` is the target. An unsettled cluster (instances starting, draining or
    /// stopping: an interrupted step) first settles. Then services move wave by wave in
    /// `depends_on` order; every unfinished service of the lowest unfinished wave moves.
    pub fn next(&self, current: &Cluster, target: &Target) -> Option<Intermediate> {
        if !current.is_settled() {
            let services = current
                .services
                .iter()
                .filter(|(_, s)| !s.is_settled())
                .map(|(n, s)| (n.clone(), Transition { next: s.settled(), order: Order::DrainFirst, gate: None }))
                .collect();
            return Some(Intermediate { services });
        }
        let empty = ServiceState::default();
        let names = current.services.keys().chain(target.services().keys());
        let mut pending: BTreeMap<usize, BTreeMap<&String, Transition>> = BTreeMap::new();
        for name in names {
            let state = current.service(name).unwrap_or(&empty);
            if let Some(t) = self.next_service(state, target.service(name)) {
                pending.entry(target.wave(name)).or_default().insert(name, t);
            }
        }
        let (_, first) = pending.into_iter().next()?;
        Some(Intermediate { services: first.into_iter().map(|(n, t)| (n.clone(), t)).collect() })
    }

    /// One service's next state, from a settled `current` toward `target` (`None`: the
    /// target drops the service). `None` when it is there.
    pub fn next_service(&self, current: &ServiceState, target: Option<&TargetService>) -> Option<Transition> {
        let reached = match target {
            Some(t) => *current == t.state,
            None => current.is_empty(),
        };
        if reached {
            return None;
        }
        let v = View::new(current, target);
        let d = DEFAULT_WEIGHT;
        let (start, stop, order, (w_new, w_old), gate) = if v.desired == 0 {
            (0, v.old, Order::DrainFirst, (d, d), None)
        } else if v.old == 0 && v.kept == v.desired {
            (0, 0, Order::StartFirst, (d, d), None)
        } else {
            match self {
                Self::Straight if v.old > 0 => (0, v.old, Order::DrainFirst, (d, d), None),
                Self::Straight => (v.desired - v.kept, 0, Order::StartFirst, (d, d), None),
                Self::Canary | Self::Mixed | Self::Rolling { .. } => {
                    let (s, u) = self.surge_unavailable(v.desired);
                    let (start, stop, order) = rolling(&v, s, u);
                    (start, stop, order, (d, d), None)
                }
                Self::BlueGreen => blue_green(&v),
                Self::Gray { first_batch, batches } => gray(&v, *first_batch, *batches),
                Self::Weighted { steps } => weighted(&v, steps),
            }
        };
        let next = v.build(start, stop, w_new, w_old);
        Some(Transition { next, order, gate })
    }
}

type Counts = (u32, u32, Order, (u32, u32), Option<Gate>);

/// Start and stop counts of one rolling batch with surge `s` and unavailability `u`.
fn rolling(v: &View<'_>, s: u32, u: u32) -> (u32, u32, Order) {
    let (t, n, o, d, s, u) =
        (i64::from(v.total), i64::from(v.kept), i64::from(v.old), i64::from(v.desired), i64::from(s), i64::from(u));
    let clamp = |x: i64| u32::try_from(x.max(0)).unwrap_or(u32::MAX);
    if u > 0 {
        // Drain down to the floor first, then refill up to the ceiling.
        let stop = o.min(t - (d - u)).max(0);
        let start = (d - n).min(d + s - (t - stop));
        (clamp(start), clamp(stop), Order::DrainFirst)
    } else {
        // Fill up to the ceiling first, then drain down to the desired count.
        let start = (d - n).min(d + s - t).max(0);
        let stop = o.min(t + start - d);
        (clamp(start), clamp(stop), Order::StartFirst)
    }
}

fn blue_green(v: &View<'_>) -> Counts {
    let d = DEFAULT_WEIGHT;
    if v.other_versions() == 0 {
        // Nothing to switch from (a first deploy or a placement change): fill, then trim.
        return (v.desired - v.kept, v.old, Order::StartFirst, (d, d), None);
    }
    if v.kept < v.desired {
        // Green comes up beside blue and gets no traffic yet.
        (v.desired - v.kept, 0, Order::StartFirst, (0, d), None)
    } else if v.old_version_takes_traffic() {
        (0, 0, Order::StartFirst, (d, 0), None)
    } else {
        (0, v.old, Order::DrainFirst, (d, d), None)
    }
}

fn gray(v: &View<'_>, first_batch: Amount, batches: u32) -> Counts {
    let d = DEFAULT_WEIGHT;
    let (first, batch) = gray_sizes(first_batch, batches, v.desired);
    let rest = v.desired - first;
    // Batch boundaries depend only on the desired count, so a resumed rollout lands on them.
    let boundary = |i: u32| {
        let b = (u64::from(i) * u64::from(rest)).div_ceil(u64::from(batches));
        first + u32::try_from(b).unwrap_or(rest)
    };
    let next =
        if v.kept < first { first } else { (1..=batches).map(boundary).find(|&b| b > v.kept).unwrap_or(v.desired) };
    // Never more than one batch over the desired count (a cluster already above it shrinks first).
    let start = next.saturating_sub(v.kept).min((v.desired + batch).saturating_sub(v.total));
    let stop = v.old.min((v.total + start).saturating_sub(v.desired));
    let gate = (v.kept + start == first && first < v.desired && v.other_versions() > 0).then_some(Gate::Approval);
    (start, stop, Order::StartFirst, (d, d), gate)
}

/// Gray's first batch and largest batch for `desired` instances.
fn gray_sizes(first_batch: Amount, batches: u32, desired: u32) -> (u32, u32) {
    let first = first_batch.round_up(desired).clamp(1, desired.max(1)).min(desired);
    let rest = (desired - first).div_ceil(batches.max(1));
    (first, first.max(rest))
}

fn weighted(v: &View<'_>, steps: &[u32]) -> Counts {
    let d = DEFAULT_WEIGHT;
    let old_versions = v.other_versions();
    if old_versions == 0 {
        return (v.desired - v.kept, v.old, Order::StartFirst, (d, d), None);
    }
    // Current share of the target version, exactly: new / total of the traffic weights.
    let (per, total) = v.current.traffic();
    let new = v.version.and_then(|ver| per.get(ver).copied()).unwrap_or(0);
    let share = steps.iter().copied().find(|&p| u64::from(p) * total > 100 * new).unwrap_or(100);
    let start = v.desired - v.kept;
    if share >= 100 {
        return (start, v.old, Order::StartFirst, (d, d), None);
    }
    // n_new instances at w_new and n_old at w_old give the new version exactly `share`%.
    let n_new = v.total - old_versions + start;
    let (w_new, w_old) = (share * old_versions, (100 - share) * n_new);
    let g = gcd(w_new, w_old).max(1);
    (start, 0, Order::StartFirst, (w_new / g, w_old / g), None)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rolling { max_surge, max_unavailable } => {
                write!(f, "rolling (max surge {max_surge}, max unavailable {max_unavailable})")
            }
            Self::Gray { first_batch, batches } => {
                write!(f, "gray (first batch {first_batch}, then {batches} batches)")
            }
            Self::Weighted { steps } => {
                let s: Vec<String> = steps.iter().map(|p| format!("{p}%")).collect();
                write!(f, "weighted ({})", s.join(", "))
            }
            s => f.write_str(s.name()),
        }
    }
}
