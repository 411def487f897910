//! Renderings of a plan: a table for people and a stable JSON document for scripts.

mod json;
mod table;

pub use json::json;
pub use table::table;

use std::collections::BTreeMap;

use hitless_coordinator::planner::Move;

/// `+2 v2@node-a, +1 v2@node-b` (or with `-`).
pub(crate) fn moves(sign: char, moves: &[Move]) -> String {
    if moves.is_empty() {
        return "-".to_owned();
    }
    moves.iter().map(|m| format!("{sign}{} {}@{}", m.count, m.version, m.node)).collect::<Vec<_>>().join(", ")
}

/// A percentage rounded to one decimal, for output that must not change with float noise.
pub(crate) fn round1(p: f64) -> f64 {
    (p * 10.0).round() / 10.0
}

/// `v1 83.3%, v2 16.7%`.
pub(crate) fn traffic(shares: &BTreeMap<String, f64>) -> String {
    if shares.is_empty() {
        return "none".to_owned();
    }
    shares.iter().map(|(v, p)| format!("{v} {}%", round1(*p))).collect::<Vec<_>>().join(", ")
}
