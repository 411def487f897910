//! Helpers shared by the coordinator's tests.

#![allow(dead_code, reason = "each test file uses a different subset")]

use hitless_coordinator::planner::Plan;
use hitless_model::Architecture;
use hitless_proto::v1 as pb;

/// One service `cart` with 2 instances on each of 3 nodes, at `version`.
pub fn six(version: &str) -> Architecture {
    Architecture::parse(&format!(
        "nodes: [node-a, node-b, node-c]
services:
  - name: cart
    version: {version}
    port: 8080
    run: {{ command: [./cart] }}
    placement: {{ node-a: 2, node-b: 2, node-c: 2 }}
"
    ))
    .expect("the example parses")
}

/// One line per service step: `N start | stop | serving before→min→after | extra | traffic`,
/// then `gate ...` and warnings.
pub fn summary(plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    for step in &plan.steps {
        for s in &step.services {
            let m = |sign, v: &[hitless_coordinator::planner::Move]| {
                v.iter().map(|m| format!("{sign}{}{}@{}", m.count, m.version, m.node)).collect::<Vec<_>>().join(" ")
            };
            let traffic: Vec<String> =
                s.traffic().iter().map(|(v, p)| format!("{v}:{}", (p * 10.0).round() / 10.0)).collect();
            out.push(format!(
                "{} {} | {} | {}→{}→{} | +{} | {}",
                step.number,
                m('+', &s.starting),
                m('-', &s.stopping),
                s.serving_before,
                s.serving_min,
                s.serving_after,
                s.extra,
                traffic.join(" ")
            ));
        }
        if let Some(g) = &step.gate {
            out.push(format!("gate {} ({})", g.gate, g.source));
        }
        for w in &step.warnings {
            out.push(format!("warning {}", w.kind.as_str()));
        }
    }
    out
}

/// An agent's report of an instance of `service` at `address`, answering `op_id`.
pub fn report(
    service: &str,
    version: &str,
    address: &str,
    phase: pb::InstancePhase,
    op_id: &str,
) -> pb::InstanceReport {
    pb::InstanceReport {
        service: service.to_owned(),
        version: version.to_owned(),
        address: address.to_owned(),
        phase: phase as i32,
        detail: String::new(),
        op_id: op_id.to_owned(),
        id: address.to_owned(),
        killed: false,
    }
}
