//! The last wait of a drain before an instance is stopped: no node may still have a
//! connect to it in its handshake.
//!
//! Once every node's kernel holds the drain, no new connect goes to the instance. But
//! a connect steered to it just before may still be in its handshake: a SYN that a full
//! accept queue dropped is retransmitted a second later (then 3 s, 7 s…), and would be
//! refused if the instance were stopped meanwhile. Each agent counts its node's
//! handshakes per backend in the kernel and lists those to draining backends in its
//! acks; an instance is stopped only once every node has a settled list without it.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::fleet::{may_steer, Fleet};

/// How often the wait re-reads what the agents reported.
const POLL: Duration = Duration::from_millis(5);

/// What the wait found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quiet {
    /// Time spent waiting.
    pub waited: Duration,
    /// Nodes that still had handshakes in flight (or no settled list) when the limit
    /// ran out, with their counts; empty when the wait ended because none had.
    pub late: Vec<(String, u64)>,
}

impl std::fmt::Display for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.late.is_empty() {
            write!(f, "handshakes {:.1?}", self.waited)
        } else {
            let late: Vec<String> = self.late.iter().map(|(n, c)| format!("{n}: {c}")).collect();
            write!(f, "handshakes {:.1?} (deadline, still in flight on {})", self.waited, late.join(", "))
        }
    }
}

/// Waits until no node that may steer to `address` has a connect to it in its
/// handshake, as of a settled report of `revision` or later. The nodes are those of
/// the roster (stored, so it outlives a coordinator restart) and those that run
/// instances. Bounded by
/// `limit` (the drain deadline, the operator's bound on the whole drain): past it the
/// stop goes on, and the result names the nodes that were late.
pub async fn quiet_everywhere<F: Fleet>(fleet: &F, revision: u64, address: &str, limit: Duration) -> Quiet {
    crate::failpoint!("coordinator.engine.handshakes.quiet");
    let start = Instant::now();
    loop {
        let nodes = fleet.nodes();
        let late: Vec<(String, u64)> = may_steer(&nodes, &fleet.snapshot())
            .into_iter()
            .filter_map(|name| match nodes.get(&name) {
                Some(n) if n.connected && n.applied >= revision && n.settled >= revision => {
                    n.in_flight.get(address).map(|c| (name, *c))
                }
                Some(n) => Some((name, n.in_flight.get(address).copied().unwrap_or(0))),
                None => Some((name, 0)),
            })
            .collect();
        let waited = start.elapsed();
        if late.is_empty() {
            if waited > Duration::from_millis(50) {
                info!(%address, revision, waited_ms = waited.as_millis() as u64, "handshakes in flight to a draining instance are over");
            }
            return Quiet { waited, late };
        }
        if waited >= limit {
            warn!(%address, revision, ?late, "drain deadline passed with handshakes still in flight; stopping anyway");
            return Quiet { waited, late };
        }
        tokio::time::sleep(POLL).await;
    }
}
