//! Checks across fields of a decoded architecture: names, references, cycles, clashes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::architecture::Architecture;
use crate::decode::did_you_mean;
use crate::error::{FieldError, Quoted};

/// Appends every cross-field problem of `arch` to `errors`.
pub(crate) fn check(arch: &Architecture, errors: &mut Vec<FieldError>) {
    check_nodes(arch, errors);
    let names = check_service_names(arch, errors);
    for (i, s) in arch.services.iter().enumerate() {
        // Empty fields failed to decode and were reported already.
        if !s.version.is_empty() && !valid_version(&s.version) {
            errors.push(FieldError::new(
                format!("services[{i}].version"),
                format!("{} is not a valid version label", Quoted(&s.version)),
                "use 1 to 63 letters, digits, '.', '_', '+' or '-', e.g. v2 or 1.4.0",
            ));
        }
        check_depends_on(arch, i, &names, errors);
        check_placement(arch, i, errors);
    }
    check_cycles(arch, &names, errors);
    check_port_clashes(arch, errors);
    check_vip_clashes(arch, errors);
}

/// Service and node names: 1 to 63 lowercase letters, digits and '-', starting with a letter.
pub(crate) fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn valid_version(v: &str) -> bool {
    !v.is_empty() && v.len() <= 63 && v.bytes().all(|c| c.is_ascii_alphanumeric() || b"._+-".contains(&c))
}

const NAME_FIX: &str = "use 1 to 63 lowercase letters, digits and '-', starting with a letter";

fn check_nodes(arch: &Architecture, errors: &mut Vec<FieldError>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, n) in arch.nodes.iter().enumerate() {
        if !crate::registry::valid_node_name(n) {
            errors.push(FieldError::new(
                format!("nodes[{i}]"),
                format!("{} is not a valid node name", Quoted(n)),
                crate::registry::NODE_NAME_FIX,
            ));
        } else if let Some(first) = seen.insert(n, i) {
            errors.push(FieldError::new(
                format!("nodes[{i}]"),
                format!("node {} is already listed at nodes[{first}]", Quoted(n)),
                "list each node once",
            ));
        }
    }
}

/// Checks names and returns the index of each valid, first-defined service name.
fn check_service_names<'a>(arch: &'a Architecture, errors: &mut Vec<FieldError>) -> HashMap<&'a str, usize> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, s) in arch.services.iter().enumerate() {
        if s.name.is_empty() {
            continue;
        }
        if !valid_name(&s.name) {
            errors.push(FieldError::new(
                format!("services[{i}].name"),
                format!("{} is not a valid service name", Quoted(&s.name)),
                NAME_FIX,
            ));
        } else if let Some(&first) = names.get(s.name.as_str()) {
            errors.push(FieldError::new(
                format!("services[{i}].name"),
                format!("service {} is already defined at services[{first}]", Quoted(&s.name)),
                "give each service a unique name, or merge the two entries",
            ));
        } else {
            names.insert(&s.name, i);
        }
    }
    names
}

fn check_depends_on(arch: &Architecture, i: usize, names: &HashMap<&str, usize>, errors: &mut Vec<FieldError>) {
    let s = &arch.services[i];
    let known: Vec<&str> = names.keys().copied().collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (j, dep) in s.depends_on.iter().enumerate() {
        let at = format!("services[{i}].depends_on[{j}]");
        if dep == &s.name {
            errors.push(FieldError::new(
                at,
                format!("service {} depends on itself", Quoted(&s.name)),
                "remove it from its own depends_on",
            ));
        } else if !names.contains_key(dep.as_str()) {
            let fix = match did_you_mean(dep, &known) {
                Some(k) => format!("did you mean `{k}`? depends_on names services of this file"),
                None => "name a service defined in this file, or remove the entry".to_owned(),
            };
            errors.push(FieldError::new(at, format!("unknown service {}", Quoted(dep)), fix));
        } else if let Some(first) = seen.insert(dep, j) {
            errors.push(FieldError::new(
                at,
                format!("{} is already listed at services[{i}].depends_on[{first}]", Quoted(dep)),
                "list each dependency once",
            ));
        }
    }
}

fn check_placement(arch: &Architecture, i: usize, errors: &mut Vec<FieldError>) {
    if arch.nodes.is_empty() {
        for node in arch.services[i].placement.keys() {
            if !crate::registry::valid_node_name(node) {
                errors.push(FieldError::new(
                    format!("services[{i}].placement.{node}"),
                    format!("{} is not a valid node name", Quoted(node)),
                    crate::registry::NODE_NAME_FIX,
                ));
            }
        }
        return;
    }
    let known: Vec<&str> = arch.nodes.iter().map(String::as_str).collect();
    for node in arch.services[i].placement.keys() {
        if !known.contains(&node.as_str()) {
            let fix = match did_you_mean(node, &known) {
                Some(k) => format!("did you mean `{k}`? placement names nodes listed under `nodes`"),
                None => {
                    format!("use one of the listed nodes ({}), or add {} to `nodes`", known.join(", "), Quoted(node))
                }
            };
            errors.push(FieldError::new(
                format!("services[{i}].placement.{node}"),
                format!("unknown node {}", Quoted(node)),
                fix,
            ));
        }
    }
}

/// Reports every `depends_on` cycle once, at the service where the search entered it.
fn check_cycles(arch: &Architecture, names: &HashMap<&str, usize>, errors: &mut Vec<FieldError>) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let n = arch.services.len();
    let edges: Vec<Vec<usize>> = arch
        .services
        .iter()
        .map(|s| s.depends_on.iter().filter(|d| **d != s.name).filter_map(|d| names.get(d.as_str()).copied()).collect())
        .collect();
    let mut mark = vec![Mark::New; n];
    for start in 0..n {
        if mark[start] != Mark::New || names.get(arch.services[start].name.as_str()) != Some(&start) {
            continue;
        }
        // Iterative depth-first search; `stack` holds (service, next edge to follow).
        let mut stack = vec![(start, 0usize)];
        mark[start] = Mark::Active;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if let Some(&w) = edges[v].get(*next) {
                *next += 1;
                match mark[w] {
                    Mark::New => {
                        mark[w] = Mark::Active;
                        stack.push((w, 0));
                    }
                    Mark::Active => {
                        let from = stack.iter().position(|&(u, _)| u == w).unwrap_or(0);
                        let mut cycle: Vec<&str> =
                            stack[from..].iter().map(|&(u, _)| arch.services[u].name.as_str()).collect();
                        cycle.push(&arch.services[w].name);
                        errors.push(FieldError::new(
                            format!("services[{v}].depends_on"),
                            format!("dependency cycle: {}", cycle.join(" → ")),
                            "remove one of these dependencies; updates need providers before consumers",
                        ));
                    }
                    Mark::Done => {}
                }
            } else {
                mark[v] = Mark::Done;
                stack.pop();
            }
        }
    }
}

fn check_port_clashes(arch: &Architecture, errors: &mut Vec<FieldError>) {
    // (node, port) -> first service placed there with that port.
    let mut used: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for (i, s) in arch.services.iter().enumerate() {
        for (node, &count) in &s.placement {
            if count == 0 || s.port == 0 {
                continue;
            }
            match used.get(&(node.as_str(), s.port)) {
                Some(&first) if first != i => errors.push(FieldError::new(
                    format!("services[{i}].port"),
                    format!(
                        "port {} on node {node:?} is also used by services[{first}] ({})",
                        s.port, arch.services[first].name
                    ),
                    "give one of them another port, or place them on different nodes",
                )),
                Some(_) => {}
                None => {
                    used.insert((node, s.port), i);
                }
            }
        }
    }
}

fn check_vip_clashes(arch: &Architecture, errors: &mut Vec<FieldError>) {
    let mut used: HashMap<SocketAddr, String> = HashMap::new();
    for (i, s) in arch.services.iter().enumerate() {
        for (j, vip) in s.vips.iter().enumerate() {
            let at = format!("services[{i}].vips[{j}]");
            if let Some(first) = used.get(vip) {
                errors.push(FieldError::new(
                    at,
                    format!("VIP {vip} is already used at {first}"),
                    "give each service its own VIPs",
                ));
            } else {
                used.insert(*vip, at);
            }
        }
    }
}
