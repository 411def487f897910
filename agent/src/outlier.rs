//! Per-node outlier isolation: a backend whose connects from this node keep failing is
//! taken out of this node's slot tables for a while, then given traffic again (the
//! next real connects are the probe), like a client library's instance isolation but
//! for every client on the node at once. Never the last serving backend of a service.
//!
//! The work follows failures, not the size of the registry: the datapath signals each
//! backend a connect failed to ([`Signals`]), the agent reads the counters of those
//! backends only ([`Outliers::on_failures`]), and an isolated backend returns at its
//! deadline ([`Outliers::next_deadline`], [`Outliers::on_deadline`]). With no failure and
//! nothing isolated the agent reads no counter at all. [`Outliers::observe`], which reads
//! every serving backend's counters, remains for a full look (the agent's start).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::abi::{self, Endpoint};
use crate::desired::{DesiredBackend, DesiredService};
use crate::writer::Maps;

mod signals;
pub use signals::{failure_ring_bytes, FailureWatch, Signals};

/// Consecutive failed connects that isolate a backend.
pub const DEFAULT_THRESHOLD: u64 = 2;
/// How long an isolated backend gets no traffic from this node.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone)]
struct Track {
    connects: u64,
    failed: u64,
    consecutive: u64,
    until: Option<Instant>,
    isolations: u64,
}

/// The outlier detector of one node.
#[derive(Debug)]
pub struct Outliers {
    threshold: u64,
    period: Duration,
    tracks: BTreeMap<Endpoint, Track>,
    /// Whether the first look happened. Only for maps no [`crate::writer::Writer`]
    /// took (see [`Maps::stats_at_start`]): counters seen at the first look are then
    /// history; a backend first seen later starts from zero.
    primed: bool,
}

impl Default for Outliers {
    fn default() -> Self {
        Self::new(DEFAULT_THRESHOLD, DEFAULT_PERIOD)
    }
}

impl Outliers {
    /// A detector isolating after `threshold` consecutive failures for `period`.
    pub fn new(threshold: u64, period: Duration) -> Self {
        Self { threshold: threshold.max(1), period, tracks: BTreeMap::new(), primed: false }
    }

    /// Reads the kernel's per-backend counters for the serving TCP backends of
    /// `desired`; returns whether the set of isolated backends changed. One lookup per
    /// backend: for a full look only (the agent's start); the running agent follows
    /// [`Self::on_failures`] and [`Self::on_deadline`].
    pub fn observe(&mut self, maps: &Maps, desired: &[DesiredService], now: Instant) -> bool {
        self.judge(maps, desired, now, |_| true)
    }

    /// Reads the counters of the backends the datapath signalled (from
    /// [`Signals::take`]) and of nothing else, and isolates those whose connects keep
    /// failing; returns whether the set of isolated backends changed.
    pub fn on_failures(
        &mut self,
        maps: &Maps,
        desired: &[DesiredService],
        signalled: &BTreeSet<Endpoint>,
        now: Instant,
    ) -> bool {
        if signalled.is_empty() {
            return false;
        }
        self.judge(maps, desired, now, |ep| signalled.contains(ep))
    }

    /// When the earliest isolated backend is due back: wake then and call
    /// [`Self::on_deadline`]. `None` while nothing is isolated.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tracks.values().filter_map(|t| t.until).min()
    }

    /// Gives traffic back to the isolated backends whose period is over, and judges
    /// again their siblings that reached the threshold while they were the last backend
    /// taking traffic (they may be isolated now). Reads the counters of those backends
    /// only; before the next deadline it reads nothing and returns false.
    pub fn on_deadline(&mut self, maps: &Maps, desired: &[DesiredService], now: Instant) -> bool {
        let due: BTreeSet<Endpoint> =
            self.tracks.iter().filter(|(_, t)| t.until.is_some_and(|u| now >= u)).map(|(ep, _)| *ep).collect();
        if due.is_empty() {
            return false;
        }
        let mut pick = due.clone();
        for s in desired.iter().filter(|s| s.backends.iter().any(|b| due.contains(&b.ep))) {
            for b in &s.backends {
                if self.tracks.get(&b.ep).is_some_and(|t| t.until.is_none() && t.consecutive >= self.threshold) {
                    pick.insert(b.ep);
                }
            }
        }
        let mut changed = self.judge(maps, desired, now, |ep| pick.contains(ep));
        // Due backends no longer in the registry as serving TCP backends: the judge did
        // not see them; their period is over all the same (no deadline left behind).
        for ep in due {
            if let Some(t) = self.tracks.get_mut(&ep).filter(|t| t.until.is_some()) {
                t.until = None;
                t.consecutive = 0;
                changed = true;
            }
        }
        changed
    }

    /// Judges the serving TCP backends of `desired` that `pick` selects: reads their
    /// counters, gives traffic back to those whose period is over, then isolates those
    /// whose run of failures reached the threshold (never the last backend of a service
    /// that takes traffic). Returns whether the set of isolated backends changed.
    fn judge(
        &mut self,
        maps: &Maps,
        desired: &[DesiredService],
        now: Instant,
        pick: impl Fn(&Endpoint) -> bool,
    ) -> bool {
        let mut changed = false;
        for s in desired {
            let picked: Vec<&DesiredBackend> = s
                .backends
                .iter()
                .filter(|b| b.ep.proto == abi::PROTO_TCP && b.state == abi::STATE_SERVING && pick(&b.ep))
                .collect();
            if picked.is_empty() {
                continue;
            }
            // Backends of the service that take traffic on this node: never isolate the
            // last one (the overlay would keep it in the table anyway, and the log and
            // metrics would say otherwise).
            let mut taking = s
                .backends
                .iter()
                .filter(|b| takes(b) && self.tracks.get(&b.ep).is_none_or(|t| t.until.is_none()))
                .count();
            let mut seen = Vec::with_capacity(picked.len());
            for b in picked {
                let Some(st) = maps.backend_stats(&b.ep) else { continue };
                // Where the backend's run of failures starts counting: from the counters
                // the agent found when it started (a backend dialled only since then
                // starts from zero). Without them (maps no writer took), from the first
                // look, as before; that look can come after the agent's first apply, and
                // failures in between were lost (issue 12).
                let start = match maps.stats_at_start() {
                    Some(at_start) => at_start.get(&b.ep).copied().unwrap_or_default(),
                    None if self.primed => (0, 0),
                    None => (st.connects, st.failed),
                };
                let t = self.tracks.entry(b.ep).or_insert_with(|| Track {
                    connects: start.0,
                    failed: start.1,
                    ..Track::default()
                });
                let (dc, df) = (st.connects.saturating_sub(t.connects), st.failed.saturating_sub(t.failed));
                t.connects = st.connects;
                t.failed = st.failed;
                // Within one look the order is unknown: any success breaks the run.
                t.consecutive = if dc > 0 { 0 } else { t.consecutive + df };
                seen.push(b);
            }
            // Returns first: a sibling judged below may leave now that one more backend
            // takes traffic, whatever their order in the registry.
            for b in &seen {
                let Some(t) = self.tracks.get_mut(&b.ep) else { continue };
                if t.until.is_some_and(|u| now >= u) {
                    t.until = None;
                    t.consecutive = 0;
                    changed = true;
                    taking += usize::from(takes(b));
                    info!(service = %s.name, backend = %b.ep.socket_addr(), "outlier period over: backend gets traffic again");
                }
            }
            for b in seen {
                let Some(t) = self.tracks.get_mut(&b.ep) else { continue };
                if t.until.is_none() && t.consecutive >= self.threshold && !(takes(b) && taking <= 1) {
                    t.until = Some(now + self.period);
                    taking -= usize::from(takes(b));
                    t.isolations += 1;
                    changed = true;
                    warn!(
                        service = %s.name,
                        backend = %b.ep.socket_addr(),
                        failed_in_a_row = t.consecutive,
                        period_ms = self.period.as_millis() as u64,
                        "outlier: connects from this node keep failing; isolated on this node"
                    );
                }
            }
        }
        self.primed = true;
        changed
    }

    /// The backends isolated now.
    pub fn isolated(&self) -> BTreeSet<Endpoint> {
        self.tracks.iter().filter(|(_, t)| t.until.is_some()).map(|(ep, _)| *ep).collect()
    }

    /// Isolations so far, per backend.
    pub fn isolations(&self) -> BTreeMap<Endpoint, u64> {
        self.tracks.iter().map(|(ep, t)| (*ep, t.isolations)).collect()
    }

    /// `desired` with the isolated backends given no slots (weight 0); a service keeps
    /// at least one backend that takes traffic.
    pub fn overlay(&self, desired: &[DesiredService]) -> Vec<DesiredService> {
        let isolated = self.isolated();
        desired
            .iter()
            .map(|s| {
                let mut s = s.clone();
                let healthy = s.backends.iter().filter(|b| takes(b) && !isolated.contains(&b.ep)).count();
                if healthy > 0 {
                    for b in s.backends.iter_mut().filter(|b| isolated.contains(&b.ep)) {
                        b.weight = 0;
                    }
                }
                s
            })
            .collect()
    }
}

/// Whether the backend takes traffic when not isolated: serving, with slots.
fn takes(b: &DesiredBackend) -> bool {
    b.state == abi::STATE_SERVING && b.weight > 0
}
