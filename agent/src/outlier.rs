//! Per-node outlier isolation: a backend whose connects from this node keep failing is
//! taken out of this node's slot tables for a while, then given traffic again (the
//! next real connects are the probe), like a client library's instance isolation but
//! for every client on the node at once. Never the last serving backend of a service.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::abi::{self, Endpoint};
use crate::desired::{DesiredBackend, DesiredService};
use crate::writer::Maps;

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
    /// `desired`; returns whether the set of isolated backends changed.
    pub fn observe(&mut self, maps: &Maps, desired: &[DesiredService], now: Instant) -> bool {
        let mut changed = false;
        for s in desired {
            // Backends of the service that take traffic on this node: never isolate the
            // last one (the overlay would keep it in the table anyway, and the log and
            // metrics would say otherwise).
            let mut taking = s
                .backends
                .iter()
                .filter(|b| takes(b) && self.tracks.get(&b.ep).is_none_or(|t| t.until.is_none()))
                .count();
            for b in s.backends.iter().filter(|b| b.ep.proto == abi::PROTO_TCP && b.state == abi::STATE_SERVING) {
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
                if t.until.is_some_and(|u| now >= u) {
                    t.until = None;
                    t.consecutive = 0;
                    changed = true;
                    taking += usize::from(takes(b));
                    info!(service = %s.name, backend = %b.ep.socket_addr(), "outlier period over: backend gets traffic again");
                }
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
