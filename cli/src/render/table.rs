//! The plan as a table for people: one row per service and step, then the step's gate and
//! warnings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hitless_coordinator::planner::{Plan, ServiceStep};
use hitless_coordinator::Order;

const HEADERS: [&str; 7] = ["STEP", "SERVICE", "START (new)", "DRAIN+STOP (old)", "SERVING", "EXTRA", "TRAFFIC"];

/// Renders `plan` as text.
pub fn table(plan: &Plan) -> String {
    let mut out = String::new();
    let max_extra = plan.steps.iter().flat_map(|s| &s.services).map(|s| s.extra).max().unwrap_or(0);
    let warnings: usize = plan.steps.iter().map(|s| s.warnings.len()).sum();
    let gates = plan.steps.iter().filter(|s| s.gate.is_some()).count();
    let _ = writeln!(
        out,
        "strategy {}: {} step{}, {} gate{}, at most {} extra instance{}, {} warning{}",
        plan.strategy,
        plan.steps.len(),
        plural(plan.steps.len()),
        gates,
        plural(gates),
        max_extra,
        plural(max_extra as usize),
        warnings,
        plural(warnings)
    );
    if plan.steps.is_empty() {
        out.push_str("nothing to do: the cluster already is the target\n");
        return out;
    }
    let mut rows: Vec<[String; 7]> = Vec::new();
    let mut notes: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for step in &plan.steps {
        for (i, s) in step.services.iter().enumerate() {
            let number = match (i, step.resume) {
                (0, true) => format!("{} (resume)", step.number),
                (0, false) => step.number.to_string(),
                _ => String::new(),
            };
            rows.push(row(number, s));
        }
        let at = rows.len();
        let lines = notes.entry(at).or_default();
        if let Some(g) = &step.gate {
            lines.push(format!("  ⏸ after step {}: gate ({}): {}", step.number, g.source, g.gate));
        }
        for w in &step.warnings {
            lines.push(format!("  ⚠ {}", w.message));
        }
    }
    let mut widths = HEADERS.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    line(&mut out, &HEADERS.map(str::to_owned), &widths);
    for (i, r) in rows.iter().enumerate() {
        line(&mut out, r, &widths);
        for n in notes.get(&(i + 1)).into_iter().flatten() {
            out.push_str(n);
            out.push('\n');
        }
    }
    out
}

fn row(number: String, s: &ServiceStep) -> [String; 7] {
    let order = match s.order {
        Order::StartFirst => "",
        Order::DrainFirst if !s.starting.is_empty() && !s.stopping.is_empty() => " (drained first)",
        Order::DrainFirst => "",
    };
    [
        number,
        s.service.clone(),
        super::moves('+', &s.starting),
        format!("{}{order}", super::moves('-', &s.stopping)),
        format!("{}→{}→{} of {}", s.serving_before, s.serving_min, s.serving_after, s.desired),
        format!("+{}", s.extra),
        super::traffic(&s.traffic()),
    ]
}

fn line(out: &mut String, cells: &[String; 7], widths: &[usize; 7]) {
    let mut text = String::new();
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            text.push_str(cell);
        } else {
            let _ = write!(text, "{cell:<w$}  ");
        }
    }
    out.push_str(text.trim_end());
    out.push('\n');
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
