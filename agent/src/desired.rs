//! What the datapath should hold, computed from a registry without touching the kernel.
//!
//! Pure functions: the registry becomes per-service VIP keys, backends and weighted
//! slot tables, which [`crate::writer`] then writes in the safe order.

use crate::abi::{self, Endpoint};
use crate::registry::{BackendState, Policy, Protocol, Registry};

/// One service as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// Name from the registry (the agent's key for matching across applies).
    pub name: String,
    /// VIP keys.
    pub vips: Vec<Endpoint>,
    /// `abi::POLICY_*`.
    pub policy: u8,
    /// Backends with their state and weight.
    pub backends: Vec<DesiredBackend>,
}

/// One backend as the datapath sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredBackend {
    /// Address key.
    pub ep: Endpoint,
    /// `abi::STATE_*`.
    pub state: u8,
    /// Relative weight; 0 means no slots.
    pub weight: u32,
}

impl DesiredBackend {
    /// Whether the backend belongs in `table` (`abi::TABLE_V4` or `abi::TABLE_V6`).
    pub fn in_table(&self, table: u8) -> bool {
        self.state == abi::STATE_SERVING && self.weight > 0 && (table == abi::TABLE_V6 || self.ep.family() == 4)
    }
}

/// Translates a validated registry.
pub fn from_registry(reg: &Registry) -> Vec<DesiredService> {
    reg.services
        .iter()
        .map(|s| {
            let proto = match s.protocol {
                Protocol::Tcp => abi::PROTO_TCP,
                Protocol::Udp => abi::PROTO_UDP,
            };
            DesiredService {
                name: s.name.clone(),
                vips: s.vips.iter().map(|v| Endpoint::new(*v, proto)).collect(),
                policy: match s.policy {
                    Policy::Steer => abi::POLICY_STEER,
                    Policy::Reject => abi::POLICY_REJECT,
                    Policy::Allow => abi::POLICY_ALLOW,
                },
                backends: s
                    .backends
                    .iter()
                    .map(|b| DesiredBackend {
                        ep: Endpoint::new(b.address, proto),
                        state: match b.state {
                            BackendState::Serving => abi::STATE_SERVING,
                            BackendState::Draining => abi::STATE_DRAINING,
                            BackendState::Down => abi::STATE_DOWN,
                        },
                        weight: b.weight,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// A slot table for weights `w`: each entry is an index into `w`, and index `i` holds a
/// share of the slots proportional to `w[i]`. Weights are reduced by their greatest
/// common divisor and, when they still need more than [`abi::MAX_SLOTS`] slots, scaled
/// down with largest remainders, every positive weight keeping at least one slot.
///
/// Returns `None` when more than [`abi::MAX_SLOTS`] weights are positive.
pub fn slot_table(w: &[u32]) -> Option<Vec<usize>> {
    let positive = w.iter().filter(|&&x| x > 0).count();
    if positive > abi::MAX_SLOTS {
        return None;
    }
    let g = w.iter().copied().filter(|&x| x > 0).fold(0u64, |a, b| gcd(a, u64::from(b)));
    if g == 0 {
        return Some(Vec::new());
    }
    let reduced: Vec<u64> = w.iter().map(|&x| u64::from(x) / g).collect();
    let total: u64 = reduced.iter().sum();
    let counts: Vec<u64> = if total <= abi::MAX_SLOTS as u64 { reduced } else { scale(&reduced, total) };
    // Interleave (smooth weighted round robin) so that neighbouring slots name
    // different backends: the table reads well and any prefix is fair.
    let sum: u64 = counts.iter().sum();
    let mut current = vec![0i64; counts.len()];
    let mut table = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = usize::MAX;
        for (i, c) in counts.iter().enumerate() {
            if *c == 0 {
                continue;
            }
            current[i] += *c as i64;
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum as i64;
        table.push(best);
    }
    Some(table)
}

/// Scales positive counts summing to `total` down to at most `MAX_SLOTS`, each ≥ 1.
fn scale(reduced: &[u64], total: u64) -> Vec<u64> {
    let positive = reduced.iter().filter(|&&x| x > 0).count() as u64;
    // Every positive weight gets one slot first; the rest is shared by weight.
    let spare = abi::MAX_SLOTS as u64 - positive;
    let mut counts: Vec<u64> = reduced.iter().map(|&x| u64::from(x > 0) + x * spare / total).collect();
    let mut left = abi::MAX_SLOTS as u64 - counts.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..reduced.len()).filter(|&i| reduced[i] > 0).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse((reduced[i] * spare) % total));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(t: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in t {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn small_weights_are_reduced_exactly() {
        let t = slot_table(&[1, 1, 2]).unwrap();
        assert_eq!(shares(&t, 3), vec![1, 1, 2]);
        let t = slot_table(&[100, 100, 0]).unwrap();
        assert_eq!(shares(&t, 3), vec![1, 1, 0]);
        let t = slot_table(&[5, 95]).unwrap();
        assert_eq!(shares(&t, 2), vec![1, 19]);
    }

    #[test]
    fn no_positive_weight_means_no_slots() {
        assert_eq!(slot_table(&[0, 0]).unwrap(), Vec::<usize>::new());
        assert_eq!(slot_table(&[]).unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn large_weights_are_scaled_to_fit_and_keep_every_backend() {
        let w = [1_000_000, 1, 999_999, 7];
        let t = slot_table(&w).unwrap();
        assert!(t.len() <= abi::MAX_SLOTS);
        let s = shares(&t, 4);
        assert!(s.iter().all(|&c| c >= 1), "{s:?}");
        assert!(s[0].abs_diff(s[2]) <= 2, "{s:?}");
    }

    #[test]
    fn too_many_backends_is_refused() {
        assert!(slot_table(&vec![1; abi::MAX_SLOTS + 1]).is_none());
        assert_eq!(slot_table(&vec![3; abi::MAX_SLOTS]).unwrap().len(), abi::MAX_SLOTS);
    }

    #[test]
    fn slots_are_interleaved() {
        let t = slot_table(&[1, 1, 2]).unwrap();
        assert!(t.windows(2).all(|p| p[0] != p[1]), "{t:?}");
    }
}
