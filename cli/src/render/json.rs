//! The plan as JSON, a stable schema for scripts (`hitless.plan/v1`, see `docs/plan.md`).
//! Fields are only ever added; a field's meaning never changes within a schema version.

use serde::Serialize;
use serde_json::{json as j, Value};

use hitless_coordinator::planner::{Move, Plan};

/// Schema name and version of the document.
pub const SCHEMA: &str = "hitless.plan/v1";

#[derive(Serialize)]
struct Instances<'a> {
    version: &'a str,
    node: &'a str,
    count: u32,
}

fn moves(m: &[Move]) -> Vec<Instances<'_>> {
    m.iter().map(|m| Instances { version: &m.version, node: &m.node, count: m.count }).collect()
}

/// Renders `plan` as a JSON value.
pub fn json(plan: &Plan) -> Value {
    let steps: Vec<Value> = plan
        .steps
        .iter()
        .map(|step| {
            let services: Vec<Value> = step
                .services
                .iter()
                .map(|s| {
                    j!({
                        "service": s.service,
                        "order": s.order,
                        "starting": moves(&s.starting),
                        "stopping": moves(&s.stopping),
                        "serving": {
                            "before": s.serving_before,
                            "min": s.serving_min,
                            "after": s.serving_after,
                            "desired": s.desired,
                        },
                        "peak": s.peak,
                        "extra": s.extra,
                        "traffic": s.traffic().iter()
                            .map(|(v, p)| j!({ "version": v, "percent": super::round1(*p) }))
                            .collect::<Vec<_>>(),
                        "after": s.after.groups(),
                    })
                })
                .collect();
            let gate = step.gate.as_ref().map(|g| {
                let mut v = serde_json::to_value(&g.gate).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("source".into(), g.source.into());
                }
                v
            });
            let warnings: Vec<Value> = step
                .warnings
                .iter()
                .map(|w| j!({ "service": w.service, "kind": w.kind.as_str(), "message": w.message }))
                .collect();
            j!({
                "step": step.number,
                "resume": step.resume,
                "services": services,
                "gate": gate,
                "warnings": warnings,
            })
        })
        .collect();
    let max_extra = plan.steps.iter().flat_map(|s| &s.services).map(|s| s.extra).max().unwrap_or(0);
    j!({
        "schema": SCHEMA,
        "strategy": plan.strategy,
        "summary": {
            "steps": plan.steps.len(),
            "gates": plan.steps.iter().filter(|s| s.gate.is_some()).count(),
            "warnings": plan.steps.iter().map(|s| s.warnings.len()).sum::<usize>(),
            "max_extra": max_extra,
        },
        "steps": steps,
    })
}
